//! Kubernetes mode: the shard's `coordination.k8s.io/v1` Lease is the only record of who leads
//! (shared/DESIGN.md, "Replication and reparenting"). [`KubeLeadership`] implements
//! [`Leadership`] on it; [`super::failover`] renews it, fences, and takes it over.
//!
//! - Lease `<cluster>-<shard>` in the pod's namespace; `holderIdentity` is the pod name.
//! - Every write is a replace guarded by the `resourceVersion` last read (optimistic
//!   concurrency): two agents never both believe they took it.
//! - Peers are the pods labelled `pgpilot.io/cluster` and `pgpilot.io/shard` like this one;
//!   a pod's agent URL is `http://<status.podIP>:<this agent's API port>` (never DNS).
//! - The primary publishes its WAL position in the annotation `pgpilot.io/leader-lsn` at every
//!   renewal, so a replica can tell how much a takeover would lose.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use super::Leadership;
use crate::config::{Config, Kubernetes};

pub use pgpilot_common::names::{LABEL_CLUSTER, LABEL_ROLE, LABEL_SHARD};
pub const ANNOTATION_LEADER_LSN: &str = "pgpilot.io/leader-lsn";
/// Synchronous mode: the replicas that may hold acknowledged commits (comma-separated names).
pub const ANNOTATION_SYNC: &str = "pgpilot.io/sync";

/// How long one API call may take before the agent treats the API server as unreachable.
pub const API_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The Lease as last read.
#[derive(Debug, Clone, Default)]
pub struct LeaseRecord {
    /// `None`: no Lease object exists.
    pub lease: Option<Lease>,
}

impl LeaseRecord {
    pub fn holder(&self) -> Option<&str> {
        self.spec()
            .and_then(|s| s.holder_identity.as_deref())
            .filter(|h| !h.is_empty())
    }

    fn spec(&self) -> Option<&LeaseSpec> {
        self.lease.as_ref().and_then(|l| l.spec.as_ref())
    }

    pub fn renew_time(&self) -> Option<jiff::Timestamp> {
        self.spec().and_then(|s| s.renew_time.as_ref()).map(|t| t.0)
    }

    pub fn transitions(&self) -> i32 {
        self.spec().and_then(|s| s.lease_transitions).unwrap_or(0)
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.lease
            .as_ref()
            .and_then(|l| l.metadata.resource_version.as_deref())
    }

    /// Synchronous mode: the replicas the primary named as possibly holding acknowledged
    /// commits; `None` when the annotation is absent.
    pub fn sync_set(&self) -> Option<std::collections::BTreeSet<String>> {
        let text = self
            .lease
            .as_ref()?
            .metadata
            .annotations
            .as_ref()?
            .get(ANNOTATION_SYNC)?;
        Some(
            text.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        )
    }

    /// The WAL position the holder published at its last renewal.
    pub fn leader_lsn(&self) -> Option<u64> {
        self.lease
            .as_ref()
            .and_then(|l| l.metadata.annotations.as_ref())
            .and_then(|a| a.get(ANNOTATION_LEADER_LSN))
            .and_then(|s| super::lsn(s))
    }
}

/// What a guarded write of the Lease came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Write {
    Done,
    /// Someone else wrote it since it was read (409): re-read, and nothing was changed.
    Conflict,
}

struct View {
    record: LeaseRecord,
    /// When `record` was read from (or written to) the API server, by this agent's clock.
    read_at: Option<Instant>,
    /// Pod name → agent URL, for the shard's pods that have an IP.
    urls: BTreeMap<String, String>,
    /// Set, to the Lease's resourceVersion then, when this instance stops leading (fence,
    /// demote, hand-over): while the Lease is still that version it never counts as the
    /// leader, whatever it names. A newer Lease naming this pod (it took it, or a switchover
    /// handed it back) is leadership again.
    stepped_down: Option<String>,
    /// The resourceVersion of the Lease as this instance handed it over (switchover): it may
    /// take it back while the Lease is still exactly that.
    handed: Option<String>,
    /// A replica: why it did not take the expired Lease (`/v1/status`).
    refusal: Option<String>,
}

impl View {
    /// The Lease as last read names `me`, and this instance has not stepped down since.
    fn held_by(&self, me: &str) -> bool {
        !self.stepped_down() && self.record.holder() == Some(me)
    }

    fn stepped_down(&self) -> bool {
        self.stepped_down
            .as_deref()
            .is_some_and(|rv| Some(rv) == self.record.resource_version().or(Some("")))
    }
}

/// Leadership by Lease. [`Leadership::leader`] answers from the last read (the failover loop
/// re-reads every renew interval); the writes go to the API server.
pub struct KubeLeadership {
    pub settings: Kubernetes,
    pub name: String,
    pub my_url: String,
    api_port: u16,
    /// `https` with `[tls]`: the shard's agents share one configuration.
    api_scheme: &'static str,
    selector: String,
    leases: Api<Lease>,
    pods: Api<Pod>,
    pub client: kube::Client,
    /// The same API server without a read timeout, for watches.
    watch_client: kube::Client,
    view: Mutex<View>,
}

impl KubeLeadership {
    /// Connects to the API server (in-cluster config or `KUBECONFIG`), checks this pod
    /// carries its shard's labels, and reads the Lease and the shard's pods once.
    pub async fn connect(cfg: &Config, settings: &Kubernetes) -> anyhow::Result<KubeLeadership> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut kc = kube::Config::infer()
            .await
            .map_err(|e| anyhow::anyhow!("Kubernetes mode: cannot find the API server: {e}"))?;
        kc.connect_timeout = Some(API_CALL_TIMEOUT);
        kc.read_timeout = Some(API_CALL_TIMEOUT);
        kc.write_timeout = Some(API_CALL_TIMEOUT);
        // Watches wait for events much longer than a call may take.
        let mut wc = kc.clone();
        wc.read_timeout = None;
        let client = kube::Client::try_from(kc)
            .map_err(|e| anyhow::anyhow!("Kubernetes mode: cannot build the API client: {e}"))?;
        let watch_client = kube::Client::try_from(wc)
            .map_err(|e| anyhow::anyhow!("Kubernetes mode: cannot build the API client: {e}"))?;
        let mut lead = Self::with_client(client, cfg, settings).await?;
        lead.watch_client = watch_client;
        Ok(lead)
    }

    /// [`KubeLeadership::connect`] with a client made elsewhere (tests, other API servers).
    pub async fn with_client(
        client: kube::Client,
        cfg: &Config,
        settings: &Kubernetes,
    ) -> anyhow::Result<KubeLeadership> {
        let ns = &settings.namespace;
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let me = timed(pods.get(&settings.pod_name)).await.map_err(|e| {
            anyhow::anyhow!(
                "Kubernetes mode: cannot read this pod {ns}/{}: {e}",
                settings.pod_name
            )
        })?;
        let labels = me.metadata.labels.clone().unwrap_or_default();
        for (key, want) in [
            (LABEL_CLUSTER, &cfg.cluster.name),
            (LABEL_SHARD, &cfg.cluster.shard),
        ] {
            match labels.get(key) {
                Some(v) if v == want => {}
                other => anyhow::bail!(
                    "Kubernetes mode: pod {ns}/{} must carry the label {key}={want} (from [cluster] in the config), \
                     it has {}",
                    settings.pod_name,
                    other.map_or("none".to_string(), |v| format!("{key}={v}"))
                ),
            }
        }
        let lead = KubeLeadership {
            settings: settings.clone(),
            name: format!("{}-{}", cfg.cluster.name, cfg.cluster.shard),
            my_url: cfg.replication.advertise_url.clone(),
            api_port: cfg.api_listen.port(),
            api_scheme: cfg.api_scheme(),
            selector: format!(
                "{LABEL_CLUSTER}={},{LABEL_SHARD}={}",
                cfg.cluster.name, cfg.cluster.shard
            ),
            leases: Api::namespaced(client.clone(), ns),
            pods,
            watch_client: client.clone(),
            client,
            view: Mutex::new(View {
                record: LeaseRecord::default(),
                read_at: None,
                urls: BTreeMap::new(),
                stepped_down: None,
                handed: None,
                refusal: None,
            }),
        };
        lead.refresh().await?;
        Ok(lead)
    }

    pub fn me(&self) -> &str {
        &self.settings.pod_name
    }

    /// Re-reads the shard's pods and the Lease.
    pub async fn refresh(&self) -> anyhow::Result<LeaseRecord> {
        let list = timed(
            self.pods
                .list(&ListParams::default().labels(&self.selector)),
        )
        .await?;
        let urls: BTreeMap<String, String> = list
            .items
            .iter()
            .filter_map(|p| {
                let name = p.metadata.name.clone()?;
                let ip = p.status.as_ref()?.pod_ip.clone()?;
                Some((
                    name,
                    format!("{}://{ip}:{}", self.api_scheme, self.api_port),
                ))
            })
            .collect();
        let lease = timed(self.leases.get_opt(&self.name)).await?;
        let record = LeaseRecord { lease };
        let mut v = self.view.lock().expect("lease view");
        v.urls = urls;
        v.record = record.clone();
        v.read_at = Some(Instant::now());
        Ok(record)
    }

    pub fn record(&self) -> LeaseRecord {
        self.view.lock().expect("lease view").record.clone()
    }

    /// The shard's other pods with an IP: (pod name, agent URL).
    pub fn peers(&self) -> Vec<(String, String)> {
        let v = self.view.lock().expect("lease view");
        v.urls
            .iter()
            .filter(|(n, _)| n.as_str() != self.me())
            .map(|(n, u)| (n.clone(), u.clone()))
            .collect()
    }

    /// Whether this pod and every other pod of the shard are being deleted (a whole cluster or
    /// shard going away, a single-instance shard's pod deleted): nobody can take over, so a
    /// drain need not wait for a replica. Read from the API server now.
    pub async fn shard_going_away(&self) -> anyhow::Result<bool> {
        let list = timed(
            self.pods
                .list(&ListParams::default().labels(&self.selector)),
        )
        .await?;
        let me_deleted = list.items.iter().any(|p| {
            p.metadata.name.as_deref() == Some(self.me()) && p.metadata.deletion_timestamp.is_some()
        });
        Ok(me_deleted
            && list
                .items
                .iter()
                .all(|p| p.metadata.deletion_timestamp.is_some()))
    }

    pub fn url_of(&self, pod: &str) -> Option<String> {
        self.view.lock().expect("lease view").urls.get(pod).cloned()
    }

    fn pod_of(&self, url: &str) -> Option<String> {
        let v = self.view.lock().expect("lease view");
        v.urls
            .iter()
            .find(|(_, u)| u.as_str() == url)
            .map(|(n, _)| n.clone())
    }

    /// This instance holds the Lease (as last read) and has not stepped down since.
    pub fn holds(&self) -> bool {
        self.view.lock().expect("lease view").held_by(self.me())
    }

    /// When this instance last learned, from the API server, that it holds the Lease (as last
    /// read, not stepped down since): a switchover's candidate counts its renew deadline from
    /// there, as from a renewal.
    pub fn held_since(&self) -> Option<Instant> {
        let v = self.view.lock().expect("lease view");
        v.read_at.filter(|_| v.held_by(self.me()))
    }

    /// Records (or clears) why this replica does not take the expired Lease.
    pub fn set_refusal(&self, why: Option<String>) {
        self.view.lock().expect("lease view").refusal = why;
    }

    /// Why this replica does not take the expired Lease, if it does not.
    pub fn refusal(&self) -> Option<String> {
        self.view.lock().expect("lease view").refusal.clone()
    }

    pub fn step_down(&self) {
        let mut v = self.view.lock().expect("lease view");
        v.stepped_down = Some(v.record.resource_version().unwrap_or("").to_string());
    }

    /// Takes the Lease for `holder`: creates it when absent, else replaces it guarded by
    /// the resourceVersion of `seen`.
    pub async fn write(
        &self,
        seen: &LeaseRecord,
        holder: Option<&str>,
        leader_lsn: Option<&str>,
    ) -> anyhow::Result<Write> {
        let now = MicroTime(jiff::Timestamp::now());
        let same_holder = seen.holder() == holder;
        let mut lease = seen.lease.clone().unwrap_or_else(|| Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec::default()),
        });
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = holder.map(str::to_string);
        spec.lease_duration_seconds = Some(self.settings.lease_duration.as_secs() as i32);
        spec.renew_time = Some(now.clone());
        if !same_holder || seen.lease.is_none() {
            spec.acquire_time = Some(now);
            spec.lease_transitions = Some(seen.transitions() + i32::from(seen.lease.is_some()));
        }
        let annotations = lease.metadata.annotations.get_or_insert_with(BTreeMap::new);
        match leader_lsn {
            Some(lsn) => {
                annotations.insert(ANNOTATION_LEADER_LSN.into(), lsn.into());
            }
            None if !same_holder => {
                annotations.remove(ANNOTATION_LEADER_LSN);
            }
            None => {}
        }
        if !same_holder && holder.is_some() && annotations.contains_key(ANNOTATION_SYNC) {
            // Synchronous mode: the names were the previous holder's standbys. The new holder
            // commits asynchronously until it names its own, so nobody may take over from it.
            // (A release keeps them: the named still hold every acknowledged commit.)
            annotations.insert(ANNOTATION_SYNC.into(), String::new());
        }
        let create = seen.lease.is_none();
        let written = self.put(&lease, create).await?;
        if written == Write::Done && holder == Some(self.me()) {
            self.view.lock().expect("lease view").stepped_down = None;
        }
        Ok(written)
    }

    /// Creates or replaces (guarded by the resourceVersion `lease` carries) the Lease; on
    /// success the view holds what the server wrote.
    async fn put(&self, lease: &Lease, create: bool) -> anyhow::Result<Write> {
        let pp = PostParams::default();
        let result = if create {
            timed(self.leases.create(&pp, lease)).await
        } else {
            timed(self.leases.replace(&self.name, &pp, lease)).await
        };
        match result {
            Ok(written) => {
                let mut v = self.view.lock().expect("lease view");
                v.record = LeaseRecord {
                    lease: Some(written),
                };
                v.read_at = Some(Instant::now());
                Ok(Write::Done)
            }
            Err(e) if is_conflict(&e) => Ok(Write::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Synchronous mode: records `set` in the Lease (guarded by the resourceVersion of `seen`).
    pub async fn write_sync(
        &self,
        seen: &LeaseRecord,
        set: &std::collections::BTreeSet<String>,
    ) -> anyhow::Result<Write> {
        let Some(mut lease) = seen.lease.clone() else {
            anyhow::bail!(
                "no Lease {} to record the synchronous replicas in",
                self.name
            );
        };
        let text = set.iter().cloned().collect::<Vec<_>>().join(",");
        lease
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANNOTATION_SYNC.into(), text);
        self.put(&lease, false).await
    }

    /// Labels this pod `pgpilot.io/role=<role>` (a merge patch of its labels only).
    pub async fn label_role(&self, role: &str) -> anyhow::Result<()> {
        self.patch_me(serde_json::json!({"metadata": {"labels": {LABEL_ROLE: role}}}))
            .await
    }

    /// A merge patch of this pod.
    async fn patch_me(&self, patch: serde_json::Value) -> anyhow::Result<()> {
        timed(
            self.pods
                .patch(self.me(), &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .await?;
        Ok(())
    }

    /// The pods of this namespace, through the client for watches.
    pub fn watched_pods(&self) -> Api<Pod> {
        Api::namespaced(self.watch_client.clone(), &self.settings.namespace)
    }

    /// Sets (or, with `None`, removes) `pgpilot.io/drain` on this pod, with the message in
    /// `pgpilot.io/drain-message`.
    pub async fn annotate_drain(&self, value: Option<&str>, message: &str) -> anyhow::Result<()> {
        use pgpilot_common::names::{
            ANNOTATION_DRAIN as ANNOTATION, ANNOTATION_DRAIN_MESSAGE as MESSAGE_ANNOTATION,
        };
        self.patch_me(serde_json::json!({"metadata": {"annotations": {
            ANNOTATION: value,
            MESSAGE_ANNOTATION: message,
        }}}))
        .await
    }

    /// Sets `pgpilot.io/drain-message` alone.
    pub async fn annotate_message(&self, message: &str) -> anyhow::Result<()> {
        self.patch_me(serde_json::json!({"metadata": {"annotations": {
            pgpilot_common::names::ANNOTATION_DRAIN_MESSAGE: message,
        }}}))
        .await
    }

    /// Records an Event on this pod (best effort: an Event is never worth failing for).
    pub async fn event(&self, type_: &str, reason: &str, message: &str) {
        let pod = k8s_openapi::api::core::v1::ObjectReference {
            kind: Some("Pod".into()),
            api_version: Some("v1".into()),
            name: Some(self.me().to_string()),
            namespace: Some(self.settings.namespace.clone()),
            ..Default::default()
        };
        self.event_on(pod, type_, reason, message).await;
    }

    /// Records an Event on `object` (best effort), reported by this pod.
    pub async fn event_on(
        &self,
        object: k8s_openapi::api::core::v1::ObjectReference,
        type_: &str,
        reason: &str,
        message: &str,
    ) {
        use k8s_openapi::api::core::v1::Event;
        let ns = &self.settings.namespace;
        let now = jiff::Timestamp::now();
        let ev = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", object.name.as_deref().unwrap_or(self.me()))),
                ..Default::default()
            },
            involved_object: object,
            reason: Some(reason.into()),
            message: Some(message.chars().take(1000).collect()),
            type_: Some(type_.into()),
            first_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
            last_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
            count: Some(1),
            reporting_component: Some("pgpilot-agent".into()),
            reporting_instance: Some(self.me().to_string()),
            ..Default::default()
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), ns);
        if let Err(e) = timed(events.create(&PostParams::default(), &ev)).await {
            tracing::warn!(reason, "cannot record the Event: {e}");
        }
    }
}

impl Leadership for KubeLeadership {
    fn peer_url(&self, name: &str) -> Option<String> {
        self.view
            .lock()
            .expect("lease view")
            .urls
            .get(name)
            .cloned()
    }

    fn leader(&self) -> Option<String> {
        let v = self.view.lock().expect("lease view");
        let holder = v.record.holder()?;
        if holder == self.me() {
            return (!v.stepped_down()).then(|| self.my_url.clone());
        }
        v.urls.get(holder).cloned()
    }

    fn may_promote(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(self.may_promote_now())
    }

    fn reclaim<'a>(&'a self, _me: &'a str, _from: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.reclaim_lease())
    }

    fn set_leader<'a>(&'a self, url: Option<&'a str>) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            match url {
                Some(u) if u == self.my_url => self.may_promote_now().await,
                Some(u) => {
                    if !self.holds() {
                        // Following: the Lease must name that primary already (as the API
                        // server has it: a switchover re-points replicas right after it
                        // moved the Lease).
                        if self.leader().as_deref() != Some(u)
                            && let Err(e) = self.refresh().await
                        {
                            return Err(format!("cannot read the Lease {}: {e}", self.name));
                        }
                        return match self.leader() {
                            Some(l) if l == u => Ok(()),
                            other => Err(format!(
                                "{u} does not hold the Lease {} (its holder is {})",
                                self.name,
                                other.unwrap_or_else(|| "nobody".into())
                            )),
                        };
                    }
                    // Handing over (switchover): the candidate holds it before it promotes.
                    let pod = self
                        .pod_of(u)
                        .ok_or_else(|| format!("no pod of this shard has the agent URL {u}"))?;
                    let seen = self.refresh().await.map_err(|e| e.to_string())?;
                    if seen.holder() != Some(self.me()) {
                        return Err(format!(
                            "the Lease {} moved to {} meanwhile",
                            self.name,
                            seen.holder().unwrap_or("nobody")
                        ));
                    }
                    self.step_down();
                    match self.write(&seen, Some(&pod), None).await {
                        Ok(Write::Done) => {
                            let mut v = self.view.lock().expect("lease view");
                            v.handed = v.record.resource_version().map(str::to_string);
                            drop(v);
                            tracing::info!(to = %pod, lease = %self.name, "handed the Lease over");
                            Ok(())
                        }
                        Ok(Write::Conflict) => Err(format!(
                            "the Lease {} changed while handing it to {pod}",
                            self.name
                        )),
                        Err(e) => Err(format!("cannot hand the Lease over to {pod}: {e}")),
                    }
                }
                None => {
                    let held = self.holds();
                    self.step_down();
                    if held {
                        // Release, so a replica need not wait for the expiry. Best effort: a
                        // fence runs exactly when the API server may be unreachable.
                        let seen = self.record();
                        match self.write(&seen, None, None).await {
                            Ok(_) => tracing::info!(lease = %self.name, "released the Lease"),
                            Err(e) => {
                                tracing::warn!(lease = %self.name, "cannot release the Lease (it will expire): {e}")
                            }
                        }
                    }
                    Ok(())
                }
            }
        })
    }
}

impl KubeLeadership {
    /// Before the executor starts: settles this pod's role from the Lease. Returns whether
    /// this pod holds it (freshly taken or renewed).
    ///
    /// - No Lease yet: the pod with an empty data dir or a primary's data dir creates it
    ///   (create is atomic: one pod wins) and initialises or starts as the primary.
    /// - Held by this pod (a restart within the Lease): renewed, and it starts as the primary.
    /// - Held by another pod: this pod is a replica; with an empty data dir it waits until the
    ///   holder has an IP to clone from. A primary's data dir here is a former primary whose
    ///   WAL may have gone past the fork: recorded, so that following rewinds it.
    pub async fn settle(&self, cfg: &Config, data_empty: bool) -> anyhow::Result<bool> {
        let standby = cfg.data_dir.join(crate::files::STANDBY_SIGNAL).exists();
        let primary_data = !data_empty && !standby;
        let mut waited = Instant::now();
        loop {
            let rec = self.refresh().await?;
            match rec.holder() {
                Some(h) if h == self.me() => {
                    if self.write(&rec, Some(self.me()), None).await? == Write::Done {
                        tracing::info!(lease = %self.name, "this pod holds the Lease: starting as the primary");
                        return Ok(true);
                    }
                    continue;
                }
                Some(h) => {
                    if primary_data && super::load_primary_end(cfg).is_none() {
                        match super::controldata(&cfg.data_dir) {
                            Ok(cd) => {
                                let end = super::PrimaryEnd {
                                    clean: cd.shut_down_as_primary(),
                                    timeline: cd.timeline,
                                    lsn: cd.checkpoint_lsn,
                                };
                                super::save_primary_end(cfg, &end)?;
                            }
                            Err(e) => tracing::warn!("cannot read pg_control: {e}"),
                        }
                    }
                    if !data_empty || self.url_of(h).is_some() {
                        tracing::info!(lease = %self.name, holder = %h, "another pod holds the Lease: starting as a replica");
                        return Ok(false);
                    }
                }
                None if rec.lease.is_none() && (data_empty || primary_data) => {
                    if self.write(&rec, Some(self.me()), None).await? == Write::Done {
                        tracing::info!(lease = %self.name, "created the Lease: this pod starts as the primary");
                        return Ok(true);
                    }
                    continue;
                }
                None if !data_empty => return Ok(false),
                None => {}
            }
            if waited.elapsed() > Duration::from_secs(10) {
                tracing::info!(lease = %self.name, "waiting for a primary to clone from");
                waited = Instant::now();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// [`Leadership::reclaim`]: the Lease comes back if it is still exactly as handed over
    /// (or never left).
    /// A promotion needs the Lease, as the API server has it now: a switchover's candidate
    /// learns it was handed the Lease a moment ago, not at its next refresh.
    async fn may_promote_now(&self) -> Result<(), String> {
        if self.holds() {
            return Ok(());
        }
        if let Err(e) = self.refresh().await {
            return Err(format!("cannot read the Lease {}: {e}", self.name));
        }
        if self.holds() {
            return Ok(());
        }
        Err(match self.record().holder() {
            Some(h) => format!(
                "the Lease {} is held by {h}: in Kubernetes mode only its holder is the primary \
                 (a switchover moves it; a failover takes it when it expires)",
                self.name
            ),
            None => format!(
                "this pod does not hold the Lease {}: a replica takes it only when it expires",
                self.name
            ),
        })
    }

    async fn reclaim_lease(&self) -> Result<(), String> {
        let seen = self.refresh().await.map_err(|e| e.to_string())?;
        let handed = self.view.lock().expect("lease view").handed.take();
        let untouched = seen.holder() == Some(self.me())
            || (handed.is_some() && seen.resource_version() == handed.as_deref());
        if !untouched {
            return Err(format!(
                "the Lease {} is held by {} and changed since the hand-over",
                self.name,
                seen.holder().unwrap_or("nobody")
            ));
        }
        match self.write(&seen, Some(self.me()), None).await {
            Ok(Write::Done) => Ok(()),
            Ok(Write::Conflict) => Err(format!("the Lease {} changed meanwhile", self.name)),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// One API call, bounded (on top of the client's own timeouts).
pub async fn timed<T>(fut: impl Future<Output = kube::Result<T>>) -> anyhow::Result<T> {
    match tokio::time::timeout(API_CALL_TIMEOUT + Duration::from_millis(500), fut).await {
        Ok(r) => r.map_err(anyhow::Error::from),
        Err(_) => anyhow::bail!("the API server did not answer within {API_CALL_TIMEOUT:?}"),
    }
}

fn is_conflict(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<kube::Error>(), Some(kube::Error::Api(s)) if s.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgpilot_kube_testserver::{KubeTestServer, TestNamespace};

    async fn agent(client: &kube::Client, ns: &str, pod: &str) -> KubeLeadership {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "data_dir = \"{}\"\n[cluster]\nname = \"demo\"\nshard = \"0\"\n\
             [kubernetes]\nmode = \"on\"\nnamespace = \"{ns}\"\npod_name = \"{pod}\"\n",
            dir.path().join("pg").display()
        );
        let path = dir.path().join("pgpilot.toml");
        std::fs::write(&path, toml).unwrap();
        let cfg = Config::load(&crate::config::RunArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let obj: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": pod, "labels": {LABEL_CLUSTER: "demo", LABEL_SHARD: "0"}},
            "spec": {"containers": [{"name": "postgres", "image": "pgpilot/agent:test"}]}
        }))
        .unwrap();
        pods.create(&PostParams::default(), &obj).await.unwrap();
        let settings = cfg.kubernetes.clone().expect("Kubernetes mode");
        KubeLeadership::with_client(client.clone(), &cfg, &settings)
            .await
            .unwrap()
    }

    /// Two replicas that both saw the same expired Lease write it at the same time: exactly
    /// one takes it, every time, and the other changed nothing.
    #[tokio::test]
    async fn two_racers_for_an_expired_lease_exactly_one_wins() {
        let server = KubeTestServer::start().await.unwrap();
        let client = server.client();
        let ns = TestNamespace::create(&client, "lease-race").await.unwrap();
        let a = agent(&client, ns.name(), "db-1").await;
        let b = agent(&client, ns.name(), "db-2").await;
        let old = agent(&client, ns.name(), "db-0").await;
        let first = old.refresh().await.unwrap();
        assert_eq!(
            old.write(&first, Some("db-0"), None).await.unwrap(),
            Write::Done
        );
        let (mut holder, mut transitions) = ("db-0", 0);
        for round in 0..20 {
            let (seen_a, seen_b) = (a.refresh().await.unwrap(), b.refresh().await.unwrap());
            assert_eq!(seen_a.resource_version(), seen_b.resource_version());
            let (ra, rb) = tokio::join!(
                a.write(&seen_a, Some("db-1"), None),
                b.write(&seen_b, Some("db-2"), None)
            );
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            assert!(
                (ra == Write::Done) != (rb == Write::Done),
                "round {round}: exactly one wins ({ra:?}, {rb:?})"
            );
            let winner = if ra == Write::Done { "db-1" } else { "db-2" };
            let now = a.refresh().await.unwrap();
            assert_eq!(now.holder(), Some(winner), "round {round}");
            // A take by the holder itself is a renewal, not a transition.
            if winner != holder {
                transitions += 1;
                holder = winner;
            }
            assert_eq!(now.transitions(), transitions, "round {round}");
            // The winner counts as the leader only on its own side.
            assert_eq!(a.holds(), winner == "db-1");
            b.refresh().await.unwrap();
            assert_eq!(b.holds(), winner == "db-2");
        }
        ns.cleanup().await.unwrap();
    }

    /// A hand-over (switchover): the candidate learns it holds the Lease, and counts its renew
    /// deadline from then; the previous holder's synchronous names do not carry over to the
    /// new holder (it names its own), while renewals and a release keep them.
    #[tokio::test]
    async fn a_hand_over_counts_as_a_renewal_and_clears_the_synchronous_names() {
        let server = KubeTestServer::start().await.unwrap();
        let client = server.client();
        let ns = TestNamespace::create(&client, "lease-hand-over")
            .await
            .unwrap();
        let old = agent(&client, ns.name(), "db-0").await;
        let new = agent(&client, ns.name(), "db-1").await;
        let seen = old.refresh().await.unwrap();
        assert_eq!(
            old.write(&seen, Some("db-0"), None).await.unwrap(),
            Write::Done
        );
        assert!(old.held_since().is_some());
        let named: std::collections::BTreeSet<String> = ["db-1".to_string()].into();
        assert_eq!(
            old.write_sync(&old.record(), &named).await.unwrap(),
            Write::Done
        );
        // A renewal keeps the names.
        assert_eq!(
            old.write(&old.record(), Some("db-0"), Some("0/5000000"))
                .await
                .unwrap(),
            Write::Done
        );
        assert_eq!(old.record().sync_set(), Some(named.clone()));

        // The hand-over: the old holder steps down, the candidate reads that it holds it.
        new.refresh().await.unwrap();
        assert_eq!(new.held_since(), None, "a replica holds nothing");
        old.step_down();
        assert_eq!(
            old.write(&old.record(), Some("db-1"), None).await.unwrap(),
            Write::Done
        );
        assert_eq!(old.held_since(), None, "stepped down");
        let before = Instant::now();
        new.refresh().await.unwrap();
        let since = new.held_since().expect("the candidate holds the Lease");
        assert!(since >= before, "counted from when it learned it");
        assert_eq!(
            new.record().sync_set(),
            Some(Default::default()),
            "the new holder's names start empty"
        );

        // A release keeps the names: the named replicas still hold every acknowledged commit.
        assert_eq!(
            new.write_sync(&new.record(), &["db-0".to_string()].into())
                .await
                .unwrap(),
            Write::Done
        );
        new.step_down();
        assert_eq!(
            new.write(&new.record(), None, None).await.unwrap(),
            Write::Done
        );
        assert_eq!(new.record().sync_set(), Some(["db-0".to_string()].into()));
        ns.cleanup().await.unwrap();
    }
}
