//! The reconciler (kube-runtime `Controller`): for each `PostgresCluster`, check the spec (an
//! invalid one gets `Ready=False, reason InvalidSpec` and an Event, and nothing is built),
//! make the generated Secret once, apply every object of [`objects::desired`] that is not
//! already as desired (server-side apply, field manager `pgpilot-operator`), then report each
//! shard's primary, ready instances and phase, and the `Ready`, `Progressing` and `Degraded`
//! conditions. Owned objects and the cluster's pods are watched, so a pod becoming ready or a
//! primary changing updates the status within a second or so.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use pgpilot_common::crd::{Condition, PostgresCluster, PostgresClusterStatus, ShardStatus};
use pgpilot_common::names::{
    ANNOTATION_DRAIN, ANNOTATION_DRAIN_MESSAGE, ANNOTATION_SWITCHOVER, DRAIN_STARTED,
    LABEL_CLUSTER, LABEL_ROLE, LABEL_SHARD,
};

use crate::metrics::Metrics;
use crate::objects::{self, DESIRED_HASH, Desired, MANAGER, Names, Options, SecretRefs};
use crate::rollout;

/// How often a cluster is looked at again without any event.
const RESYNC: Duration = Duration::from_secs(30);

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

/// What every reconcile shares.
pub struct Ctx {
    pub client: Client,
    pub opts: Options,
    pub metrics: Metrics,
    recorder: Recorder,
    /// Per cluster (namespace, name): when a rollout's switchover was first refused with
    /// nothing done (412), while it is retried.
    refused_switchovers: std::sync::Mutex<BTreeMap<(String, String), std::time::Instant>>,
    /// The operator's client certificates, per cluster (`spec.tls`).
    pub identities: crate::tls::Identities,
}

/// How long a rollout retries a switchover its agent refused with nothing done (a candidate
/// that has just come back, not yet reachable or caught up) before it halts.
const SWITCHOVER_RETRY_FOR: Duration = Duration::from_secs(60);

impl Ctx {
    /// The API of a namespaced kind over what this operator watches: one namespace
    /// (`--watch-namespace`) or all.
    pub fn watched<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match &self.opts.watch_namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    pub fn new(client: Client, opts: Options, metrics: Metrics) -> Ctx {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Ctx {
            refused_switchovers: Default::default(),
            identities: Default::default(),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            opts,
            metrics,
        }
    }
}

/// Runs the controllers (PostgresCluster, PostgresBackup) until `shutdown` is cancelled.
pub async fn run(ctx: Arc<Ctx>, shutdown: tokio_util::sync::CancellationToken) {
    futures::join!(
        clusters(ctx.clone(), shutdown.clone().cancelled_owned()),
        crate::backup::run(ctx, shutdown.cancelled_owned()),
    );
}

async fn clusters(ctx: Arc<Ctx>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let clusters: Api<PostgresCluster> = ctx.watched();
    let pods: Api<Pod> = ctx.watched();
    let cfg = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    Controller::new(clusters, watcher::Config::default())
        .owns(ctx.watched::<StatefulSet>(), cfg.clone())
        .owns(ctx.watched::<Service>(), cfg.clone())
        .owns(ctx.watched::<ConfigMap>(), cfg.clone())
        .watches(pods, cfg, |pod: Pod| {
            let ns = pod.namespace()?;
            let cluster = pod.labels().get(LABEL_CLUSTER)?.clone();
            Some(ObjectRef::<PostgresCluster>::new(&cluster).within(&ns))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("reconcile: {e}");
            }
        })
        .await;
}

fn error_policy(pc: Arc<PostgresCluster>, e: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[&pc.name_any()])
        .inc();
    tracing::warn!(cluster = %pc.name_any(), "reconcile failed, retrying in 5 s: {e}");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(pc: Arc<PostgresCluster>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let timer = std::time::Instant::now();
    let name = pc.name_any();
    let result = reconcile_inner(&pc, &ctx).await;
    let m = &ctx.metrics;
    m.reconciles.with_label_values(&[&name]).inc();
    // The error series exists from the first reconcile on, so that a rate sees the first error.
    m.reconcile_errors.with_label_values(&[&name]);
    m.reconcile_duration.observe(timer.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(pc: &PostgresCluster, ctx: &Ctx) -> Result<Action, Error> {
    let ns = pc
        .namespace()
        .ok_or_else(|| Error::Other("a PostgresCluster is namespaced".into()))?;
    let name = pc.name_any();
    let api: Api<PostgresCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let status = pc.status.clone().unwrap_or_default();
    let generation = pc.metadata.generation;
    if pc.spec.paused {
        let mut st = status.clone();
        set_condition(
            &mut st,
            "Progressing",
            "False",
            "Paused",
            "spec.paused is true: the operator takes no action on this cluster",
            generation,
        );
        write_status(&api, &name, &status, st, ctx).await?;
        return Ok(Action::await_change());
    }
    let built = (!status.shards.is_empty()).then_some(status.shards.len() as u32);
    let problems = pc.spec.problems(built);
    let (missing, secrets) = missing_secrets(pc, &ns, ctx).await?;
    if !problems.is_empty() || !missing.is_empty() {
        let mut all = problems;
        all.extend(missing);
        let message = all.join("; ");
        let mut st = status.clone();
        let changed = st
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .is_none_or(|c| c.message != message);
        set_condition(
            &mut st,
            "Ready",
            "False",
            "InvalidSpec",
            &message,
            generation,
        );
        set_condition(
            &mut st,
            "Progressing",
            "False",
            "InvalidSpec",
            "nothing is built until the spec is fixed",
            generation,
        );
        st.observed_generation = generation;
        write_status(&api, &name, &status, st, ctx).await?;
        if changed {
            event(ctx, pc, EventType::Warning, "InvalidSpec", &message).await;
        }
        ctx.metrics.set_phase(&name, "Invalid");
        return Ok(Action::await_change());
    }
    ensure_secret(pc, &ns, ctx).await?;
    // Before the workloads that mount it.
    let renew_in = crate::tls::ensure(pc, &ns, ctx).await?;
    for d in objects::desired(pc, &ctx.opts, &secrets) {
        apply(pc, &ns, &d, ctx).await?;
    }
    let (shards, views) = observe(pc, &ns, ctx).await?;
    if requested_switchover(pc, &ns, &views, &status, &api, ctx).await? {
        // The shards changed under the views just taken: look again.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let mut st = status.clone();
    st.observed_generation = generation;
    let healthy = shards.iter().filter(|s| s.phase == "Healthy").count();
    let all_ready = healthy == shards.len();
    let waiting: Vec<String> = shards
        .iter()
        .filter(|s| s.phase != "Healthy")
        .map(|s| {
            format!(
                "{}: {}/{} ready, primary {}",
                s.name,
                s.ready_instances,
                s.instances,
                s.primary.as_deref().unwrap_or("none")
            )
        })
        .collect();
    let was_ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if all_ready {
        set_condition(
            &mut st,
            "Ready",
            "True",
            "AllShardsHealthy",
            &format!(
                "{} shards, each with a primary and every instance ready",
                shards.len()
            ),
            generation,
        );
        set_condition(
            &mut st,
            "Progressing",
            "False",
            "Settled",
            "every shard is as the spec says",
            generation,
        );
        set_condition(
            &mut st,
            "Degraded",
            "False",
            "AllShardsHealthy",
            "",
            generation,
        );
    } else {
        let msg = waiting.join("; ");
        set_condition(
            &mut st,
            "Ready",
            "False",
            "ShardsNotReady",
            &msg,
            generation,
        );
        set_condition(
            &mut st,
            "Progressing",
            "True",
            "ShardsStarting",
            &msg,
            generation,
        );
        let degraded = was_ready;
        set_condition(
            &mut st,
            "Degraded",
            if degraded { "True" } else { "False" },
            if degraded {
                "ShardUnhealthy"
            } else {
                "Starting"
            },
            &msg,
            generation,
        );
    }
    st.shards = shards;
    databases_condition(pc, &mut st, generation, ctx);
    let roll_again = roll(pc, &ns, &views, &secrets, &api, &status, &mut st, ctx).await?;
    // Progress comes as events (owned objects and pods are watched): no faster polling while
    // a cluster is not ready, so a thousand pending clusters cost nothing between events.
    let mut next = RESYNC;
    if let Some(wait) = renew_in {
        next = next.min(wait);
    }
    if let Some(wait) = scheduled_backup(pc, &ns, &api, &mut st, ctx).await? {
        next = next.min(wait);
    }
    if let Some(wait) = roll_again {
        next = next.min(wait);
    }
    if all_ready && !was_ready {
        event(
            ctx,
            pc,
            EventType::Normal,
            "Ready",
            "every shard has a primary and all its instances ready",
        )
        .await;
    }
    write_status(&api, &name, &status, st, ctx).await?;
    ctx.metrics
        .set_phase(&name, if all_ready { "Ready" } else { "Progressing" });
    Ok(Action::requeue(next))
}

/// `spec.backup.schedule`: creates the `PostgresBackup` of the latest scheduled minute not run
/// yet (never one from before the cluster existed; after an outage of the operator, only the
/// latest missed run), named `<cluster>-<yyyymmddhhmm>` so that a run is created once whatever
/// restarts. Returns how long until the next minute, when a schedule is set.
async fn scheduled_backup(
    pc: &PostgresCluster,
    ns: &str,
    clusters: &Api<PostgresCluster>,
    st: &mut PostgresClusterStatus,
    ctx: &Ctx,
) -> Result<Option<Duration>, Error> {
    let Some(spec) = pc.spec.backup.as_ref().and_then(|b| b.schedule.as_deref()) else {
        return Ok(None);
    };
    let Ok(schedule) = pgpilot_common::schedule::Schedule::parse(spec) else {
        return Ok(None);
    };
    let now = jiff::Timestamp::now();
    let to_next_minute = Duration::from_secs(61 - now.as_second().rem_euclid(60) as u64);
    let created = pc.metadata.creation_timestamp.as_ref().map(|t| t.0);
    // What the backup-age alert compares: the time between two runs, and (until a backup
    // completes) the cluster's creation as the last success.
    let cluster = pc.name_any();
    if let Some(next) = schedule.next_run(now, 31 * 24 * 60)
        && let Some(after) = schedule.next_run(next, 366 * 24 * 60)
    {
        ctx.metrics
            .backup_interval
            .with_label_values(&[ns, &cluster])
            .set((after - next).get_seconds());
    }
    if let Some(c) = created {
        ctx.metrics.backup_succeeded(ns, &cluster, c.as_second());
    }
    let Some(due) = schedule.last_run(now, 24 * 60) else {
        return Ok(Some(to_next_minute));
    };
    let previous = st
        .last_scheduled_backup
        .as_deref()
        .and_then(|s| s.parse::<jiff::Timestamp>().ok());
    if created.is_some_and(|c| due < c) || previous.is_some_and(|p| due <= p) {
        return Ok(Some(to_next_minute));
    }
    let name = pc.name_any();
    // The reconcile works on the cluster as it was when it began, seconds ago under load: a
    // schedule removed or changed since creates no run.
    let now_spec = clusters
        .get(&name)
        .await?
        .spec
        .backup
        .and_then(|b| b.schedule);
    if now_spec.as_deref() != Some(spec) {
        return Ok(Some(to_next_minute));
    }
    let run = format!(
        "{name}-{}",
        due.to_zoned(jiff::tz::TimeZone::UTC).strftime("%Y%m%d%H%M")
    );
    let backup = pgpilot_common::crd::PostgresBackup {
        metadata: kube::api::ObjectMeta {
            name: Some(run.clone()),
            labels: serde_json::from_value(objects::labels(&name, None)).ok(),
            owner_references: pc.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: pgpilot_common::crd::PostgresBackupSpec {
            cluster: name.clone(),
            shard: None,
        },
        status: None,
    };
    let api: Api<pgpilot_common::crd::PostgresBackup> = Api::namespaced(ctx.client.clone(), ns);
    create_once(
        &api,
        &backup,
        ctx,
        pc,
        "BackupScheduled",
        &format!("PostgresBackup {run} for the run of {due}"),
    )
    .await?;
    st.last_scheduled_backup = Some(due.to_string());
    Ok(Some(to_next_minute))
}

/// Credentials the spec names that do not exist, one message each; and the Secrets'
/// references with the names of the encryption keys they really hold (a key Secret without
/// the encrypting key, or with no key at all, is a problem too).
async fn missing_secrets(
    pc: &PostgresCluster,
    ns: &str,
    ctx: &Ctx,
) -> Result<(Vec<String>, SecretRefs), Error> {
    let name = pc.name_any();
    let generated = Names { cluster: &name }.secret();
    let refs = SecretRefs::of(pc);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut out = Vec::new();
    let mut named: Vec<(&str, String)> = [
        ("spec.secrets.superuser", &refs.superuser),
        ("spec.secrets.replication", &refs.replication),
        ("spec.secrets.apiToken", &refs.token),
    ]
    .into_iter()
    .filter(|(_, (s, _))| *s != generated)
    .map(|(f, (s, _))| (f, s.clone()))
    .collect();
    if pc.spec.tls_mode() == pgpilot_common::crd::TlsMode::Secret
        && let Some(s) = crate::tls::agent_secret(pc)
    {
        named.push(("spec.tls.secretName", s));
    }
    let mut key_secrets: Vec<(&str, String, Option<String>)> = Vec::new();
    if let Some(b) = &pc.spec.backup {
        if let Some(s) = &b.credentials_secret {
            named.push(("spec.backup.credentialsSecret", s.clone()));
        }
        if let Some(s) = &b.encryption_key_secret {
            let current = b
                .encryption_key_id
                .clone()
                .unwrap_or(objects::DEFAULT_KEY_ID.into());
            key_secrets.push(("spec.backup.encryptionKeySecret", s.clone(), Some(current)));
        }
    }
    if let Some(fb) = pc.spec.from_backup() {
        if let Some(s) = &fb.credentials_secret {
            named.push(("spec.bootstrap.fromBackup.credentialsSecret", s.clone()));
        }
        if let Some(s) = &fb.encryption_key_secret {
            key_secrets.push((
                "spec.bootstrap.fromBackup.encryptionKeySecret",
                s.clone(),
                None,
            ));
        }
    }
    for (field, secret) in named {
        if api.get_opt(&secret).await?.is_none() {
            out.push(format!(
                "{field}: Secret {secret:?} does not exist in namespace {ns}"
            ));
        }
    }
    let mut keys = objects::KeyIds::default();
    for (field, secret, current) in key_secrets {
        let Some(s) = api.get_opt(&secret).await? else {
            out.push(format!(
                "{field}: Secret {secret:?} does not exist in namespace {ns}"
            ));
            continue;
        };
        let names: Vec<String> = s
            .data
            .iter()
            .flat_map(|d| d.keys())
            .chain(s.string_data.iter().flat_map(|d| d.keys()))
            .cloned()
            .collect();
        if names.is_empty() {
            out.push(format!("{field}: Secret {secret:?} holds no key"));
            continue;
        }
        match current {
            Some(c) => {
                if !names.contains(&c) {
                    out.push(format!(
                        "spec.backup.encryptionKeyId {c:?}: Secret {secret:?} has no such key (it has {})",
                        names.join(", ")
                    ));
                }
                keys.backup = objects::KeyIds::ordered(names, &c);
            }
            None => keys.bootstrap = objects::KeyIds::ordered(names, objects::DEFAULT_KEY_ID),
        }
    }
    Ok((out, refs.with_keys(keys)))
}

/// The generated Secret, made once with random credentials (never rewritten: the pods' data
/// depends on them). Owned by the cluster, so deleting the cluster deletes it.
async fn ensure_secret(pc: &PostgresCluster, ns: &str, ctx: &Ctx) -> Result<(), Error> {
    let name = pc.name_any();
    let secret_name = Names { cluster: &name }.secret();
    if !SecretRefs::of(pc).uses_generated(&secret_name) {
        return Ok(());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    if api.get_opt(&secret_name).await?.is_some() {
        return Ok(());
    }
    let random = || -> Result<String, Error> {
        let mut b = [0u8; 24];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(|e| Error::Other(format!("cannot read /dev/urandom: {e}")))?;
        Ok(b.iter().map(|x| format!("{x:02x}")).collect())
    };
    let mut data = BTreeMap::new();
    for key in ["superuser-password", "replication-password", "token"] {
        data.insert(key.to_string(), random()?);
    }
    let mut s = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(secret_name.clone()),
            labels: serde_json::from_value(objects::labels(&name, None)).ok(),
            owner_references: pc.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        string_data: Some(data),
        ..Default::default()
    };
    s.type_ = Some("Opaque".into());
    create_once(
        &api,
        &s,
        ctx,
        pc,
        "Created",
        &format!("Secret {secret_name} with generated credentials"),
    )
    .await
}

/// Applies `d` unless the live object already carries its desired hash.
async fn apply(pc: &PostgresCluster, ns: &str, d: &Desired, ctx: &Ctx) -> Result<(), Error> {
    let (group, version) = match d.api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", d.api_version),
    };
    // Every kind applied here pluralises regularly (PodDisruptionBudget too).
    let ar = ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: d.api_version.into(),
        kind: d.kind.into(),
        plural: format!("{}s", d.kind.to_lowercase()),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
    let want = d.body["metadata"]["annotations"][DESIRED_HASH].as_str();
    let live = api.get_opt(&d.name).await?;
    if let Some(live) = &live
        && live.annotations().get(DESIRED_HASH).map(String::as_str) == want
    {
        return Ok(());
    }
    let pp = PatchParams::apply(MANAGER).force();
    api.patch(&d.name, &pp, &Patch::Apply(&d.body)).await?;
    ctx.metrics.writes.inc();
    let verb = if live.is_some() { "Updated" } else { "Created" };
    tracing::info!(cluster = %pc.name_any(), kind = d.kind, name = %d.name, "{}", verb.to_lowercase());
    event(
        ctx,
        pc,
        EventType::Normal,
        verb,
        &format!("{} {}", d.kind, d.name),
    )
    .await;
    Ok(())
}

/// Each shard as its pods and StatefulSet show it, and as the rollout planner sees it.
async fn observe(
    pc: &PostgresCluster,
    ns: &str,
    ctx: &Ctx,
) -> Result<(Vec<ShardStatus>, Vec<rollout::ShardView>), Error> {
    let name = pc.name_any();
    let n = Names { cluster: &name };
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let mut out = Vec::new();
    let mut views = Vec::new();
    for shard in pc.spec.shard_names() {
        let pods = shard_pods(ctx, ns, &name, &shard).await?;
        let ready_instances = pods.iter().filter(|p| pod_ready(p)).count() as u32;
        let primaries: Vec<String> = pods
            .iter()
            .filter(|p| pod_ready(p) && pod_role(p) == Some("primary"))
            .map(|p| p.name_any())
            .collect();
        let revision = sets
            .get_opt(&n.shard(&shard))
            .await?
            .and_then(|s| s.status)
            .and_then(|s| s.update_revision);
        // What the agents say: restarts pending, lag, archiving (their /v1/status is open; a
        // pod that does not answer in time is left out until the next look).
        let mut pending_restart = std::collections::BTreeSet::new();
        let mut pod_views = Vec::new();
        let tls = crate::tls::client(pc, ns, ctx).await?;
        for p in &pods {
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.as_deref());
            let mut agent_status = None;
            if let Some(ip) = ip.filter(|_| pod_ready(p)) {
                let agent = agent_at(ip, None, tls.clone());
                if let Ok(Ok(st)) =
                    tokio::time::timeout(Duration::from_secs(2), agent.status()).await
                {
                    pending_restart.extend(st.pending_restart.iter().cloned());
                    agent_status = Some(st);
                }
            }
            pod_views.push(pod_view(p, agent_status.as_ref()));
        }
        let instances = pc.spec.instances_per_shard;
        let labels = [ns, name.as_str(), shard.as_str()];
        let m = &ctx.metrics;
        m.shard_primaries
            .with_label_values(&labels)
            .set(primaries.len() as i64);
        m.shard_ready_instances
            .with_label_values(&labels)
            .set(i64::from(ready_instances));
        m.shard_instances
            .with_label_values(&labels)
            .set(i64::from(instances));
        let primary = (primaries.len() == 1).then(|| primaries[0].clone());
        let phase = if primary.is_some() && ready_instances >= instances {
            "Healthy"
        } else if pods.is_empty() {
            "Pending"
        } else {
            "Degraded"
        };
        views.push(rollout::ShardView {
            name: shard.clone(),
            pods: pod_views,
            instances: instances as usize,
        });
        out.push(ShardStatus {
            name: shard,
            primary,
            ready_instances,
            instances,
            revision,
            phase: phase.into(),
            pending_restart: pending_restart.into_iter().collect(),
        });
    }
    Ok((out, views))
}

/// A pod as the rollout planner sees it.
fn pod_view(p: &Pod, st: Option<&pgpilot_common::api::StatusResponse>) -> rollout::PodView {
    let annotations = p.annotations();
    let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
    rollout::PodView {
        name: p.name_any(),
        ip: p.status.as_ref().and_then(|s| s.pod_ip.clone()),
        revision: p.labels().get(objects::LABEL_REVISION).cloned(),
        ready: pod_ready(p),
        primary: pod_role(p) == Some("primary"),
        deleting: p.metadata.deletion_timestamp.is_some(),
        age: created
            .and_then(|c| Duration::try_from(jiff::Timestamp::now().duration_since(c)).ok())
            .unwrap_or_default(),
        unready_for: if pod_ready(p) {
            Duration::ZERO
        } else {
            ready_condition(p)
                .and_then(|c| c.last_transition_time.as_ref())
                .or(p.metadata.creation_timestamp.as_ref())
                .and_then(|t| Duration::try_from(jiff::Timestamp::now().duration_since(t.0)).ok())
                .unwrap_or_default()
        },
        lag_bytes: st.and_then(|s| match s.role {
            Some(pgpilot_common::state::Role::Primary) => Some(0),
            _ => s.replication.as_ref()?.lag_bytes,
        }),
        archive_backlog: st.and_then(|s| s.archive.as_ref()).map(|a| a.ready),
        streaming: st
            .and_then(|s| s.replication.as_ref())
            .is_some_and(|r| r.streaming),
        drain: annotations.get(ANNOTATION_DRAIN).map(|v| {
            (
                v.clone(),
                annotations
                    .get(ANNOTATION_DRAIN_MESSAGE)
                    .cloned()
                    .unwrap_or_default(),
            )
        }),
    }
}

/// The pods of one shard of a cluster.
pub async fn shard_pods(
    ctx: &Ctx,
    ns: &str,
    cluster: &str,
    shard: &str,
) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let sel = format!("{LABEL_CLUSTER}={cluster},{LABEL_SHARD}={shard}");
    Ok(pods.list(&ListParams::default().labels(&sel)).await?.items)
}

/// The pod's `pgpilot.io/role` label (`primary`, `replica`), as its agent set it.
pub fn pod_role(p: &Pod) -> Option<&str> {
    p.labels().get(LABEL_ROLE).map(String::as_str)
}

/// `pgpilot.io/switchover: <pod>` on the cluster: a planned switchover of that pod's shard to
/// it, once. The annotation is removed whatever the outcome, which an Event reports
/// (`Switchover`, or `SwitchoverRefused` with the reason): a request is never retried behind
/// the user's back. Refused while a rollout is in progress (it moves primaries itself) and
/// when the shard has no ready primary; the agent refuses a candidate that is not streaming or
/// lags (412, its reason in the Event). True when a switchover was made.
async fn requested_switchover(
    pc: &PostgresCluster,
    ns: &str,
    views: &[rollout::ShardView],
    status: &PostgresClusterStatus,
    api: &Api<PostgresCluster>,
    ctx: &Ctx,
) -> Result<bool, Error> {
    let Some(target) = pc.annotations().get(ANNOTATION_SWITCHOVER).cloned() else {
        return Ok(false);
    };
    let name = pc.name_any();
    let rolling = status
        .rollout
        .as_ref()
        .is_some_and(|r| r.phase == rollout::IN_PROGRESS);
    let outcome: Result<Option<String>, String> = async {
        let (shard, pod) = views
            .iter()
            .find_map(|s| s.pods.iter().find(|p| p.name == target).map(|p| (s, p)))
            .ok_or_else(|| format!("pod {target:?} is not an instance of cluster {name}"))?;
        if pod.primary {
            return Ok(None);
        }
        if rolling {
            return Err(format!(
                "a rollout is in progress ({}); it moves the primaries itself",
                status
                    .rollout
                    .as_ref()
                    .and_then(|r| r.step.clone())
                    .unwrap_or_default()
            ));
        }
        let primary = shard
            .pods
            .iter()
            .find(|p| p.primary && p.ready)
            .ok_or_else(|| format!("{} has no ready primary to hand over", shard.name))?;
        if !pod.ready {
            return Err(format!("{target} is not ready"));
        }
        let ip = primary
            .ip
            .clone()
            .ok_or_else(|| format!("the primary {} has no IP", primary.name))?;
        let token = agent_token(pc, ns, ctx)
            .await
            .map_err(|e| e.to_string())??;
        let tls = crate::tls::client(pc, ns, ctx)
            .await
            .map_err(|e| e.to_string())?;
        match switch_over(&ip, token, tls, &target).await {
            Ok(done) => Ok(Some(format!(
                "{}: switchover {} → {} (writes paused {} ms)",
                shard.name, done.old_primary, done.new_primary, done.write_pause_ms
            ))),
            Err((_, why)) => Err(format!(
                "the switchover of {} to {target} failed: {why}",
                shard.name
            )),
        }
    }
    .await;
    let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION_SWITCHOVER: null}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    ctx.metrics.writes.inc();
    match &outcome {
        Ok(Some(note)) => {
            tracing::info!(cluster = %name, "{note}");
            event(ctx, pc, EventType::Normal, "Switchover", note).await;
        }
        Ok(None) => {
            let note = format!("{target} is already the primary: nothing to do");
            event(ctx, pc, EventType::Normal, "Switchover", &note).await;
        }
        Err(why) => {
            tracing::warn!(cluster = %name, "switchover refused: {why}");
            event(ctx, pc, EventType::Warning, "SwitchoverRefused", why).await;
        }
    }
    Ok(matches!(outcome, Ok(Some(_))))
}

/// A planned switchover by the agent of the primary at `ip` to `candidate`, given 120 s. The
/// error says why, with the agent's HTTP status when it answered (412: refused, nothing done).
async fn switch_over(
    ip: &str,
    token: String,
    tls: Option<rustls::ClientConfig>,
    candidate: &str,
) -> Result<pgpilot_common::api::SwitchoverResponse, (Option<u16>, String)> {
    let req = pgpilot_common::api::SwitchoverRequest {
        candidate: Some(candidate.to_string()),
    };
    let agent = agent_at(ip, Some(token), tls);
    match tokio::time::timeout(Duration::from_secs(120), agent.switchover(&req)).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(e)) => Err((e.status(), e.to_string())),
        Err(_) => Err((None, "no answer within 120 s".into())),
    }
}

/// A client for the agent of the pod at `ip` (its external API port), over HTTPS with `tls`
/// (see [`crate::tls::client`]).
pub fn agent_at(
    ip: &str,
    token: Option<String>,
    tls: Option<rustls::ClientConfig>,
) -> pgpilot_common::client::AgentClient {
    let scheme = if tls.is_some() { "https" } else { "http" };
    pgpilot_common::client::AgentClient::with_tls(
        format!("{scheme}://{ip}:{}", objects::API_PORT),
        token,
        tls,
    )
}

/// The pod's `Ready` condition is true.
pub fn pod_ready(p: &Pod) -> bool {
    ready_condition(p).is_some_and(|c| c.status == "True")
}

fn ready_condition(p: &Pod) -> Option<&k8s_openapi::api::core::v1::PodCondition> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

/// Sets condition `type_`, keeping its transition time when the status does not change.
fn set_condition(
    st: &mut PostgresClusterStatus,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let now = jiff::Timestamp::now().to_string();
    match st.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Some(now);
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => st.conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: Some(now),
            observed_generation: generation,
        }),
    }
}

/// The rollout (docs/rollouts.md): plans the next step from what was observed
/// ([`rollout::plan`]), applies it, and sets `status.rollout`, the `RolloutHalted` condition
/// (and `Progressing` while it rolls) and an Event per step. Returns how soon to look again.
#[allow(clippy::too_many_arguments)]
async fn roll(
    pc: &PostgresCluster,
    ns: &str,
    views: &[rollout::ShardView],
    secrets: &SecretRefs,
    api: &Api<PostgresCluster>,
    before: &PostgresClusterStatus,
    st: &mut PostgresClusterStatus,
    ctx: &Ctx,
) -> Result<Option<Duration>, Error> {
    use rollout::Step;
    let generation = pc.metadata.generation;
    let target = objects::revision(pc, secrets, &ctx.opts);
    let settings = rollout::Settings::of(pc.spec.rollout.as_ref());
    let last = st.rollout.clone();
    let (step, mut rs) = rollout::plan(&rollout::Observed {
        target: &target,
        generation,
        settings: &settings,
        shards: views,
        last: last.as_ref(),
        now: jiff::Timestamp::now(),
    });
    let new_step = last.as_ref().and_then(|l| l.step.as_ref()) != rs.step.as_ref();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let name = pc.name_any();
    let describe = step.describe();
    match &step {
        Step::DrainPod { shard, pod } => {
            let patch =
                serde_json::json!({"metadata": {"annotations": {ANNOTATION_DRAIN: DRAIN_STARTED}}});
            pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            ctx.metrics.writes.inc();
            let note = format!("{shard}: draining pod {pod} for revision {target}");
            event(ctx, pc, EventType::Normal, "RolloutDrain", &note).await;
        }
        Step::DeletePod { shard, pod } => {
            match pods.delete(pod, &Default::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            ctx.metrics.writes.inc();
            let note = format!("{shard}: deleting pod {pod}; it comes back at revision {target}");
            event(ctx, pc, EventType::Normal, "RolloutDelete", &note).await;
        }
        Step::Switchover { shard, from, to } => {
            // The intent first: an operator that stops during the switchover knows, from
            // the recorded step, that the new primary is its own doing.
            let mut intent = st.clone();
            intent.rollout = Some(rs.clone());
            write_status(api, &name, before, intent.clone(), ctx).await?;
            let ip = views
                .iter()
                .flat_map(|s| s.pods.iter())
                .find(|p| &p.name == from)
                .and_then(|p| p.ip.clone())
                .ok_or_else(|| Error::Other(format!("pod {from} has no IP")))?;
            let token = agent_token(pc, ns, ctx).await?.map_err(Error::Other)?;
            let tls = crate::tls::client(pc, ns, ctx).await?;
            let outcome = switch_over(&ip, token, tls, to).await;
            // Refused with nothing done (412): retried for a while, from the first refusal.
            let retry = {
                let key = (ns.to_string(), name.clone());
                let mut refused = ctx.refused_switchovers.lock().expect("refusals lock");
                match &outcome {
                    Err((Some(412), _)) => {
                        let since = *refused
                            .entry(key.clone())
                            .or_insert_with(std::time::Instant::now);
                        let within = since.elapsed() < SWITCHOVER_RETRY_FOR;
                        if !within {
                            refused.remove(&key);
                        }
                        within
                    }
                    _ => {
                        refused.remove(&key);
                        false
                    }
                }
            };
            match outcome {
                Ok(done) => {
                    let note = format!(
                        "{shard}: switchover {} → {} for revision {target} (writes paused {} ms)",
                        done.old_primary, done.new_primary, done.write_pause_ms
                    );
                    tracing::info!(cluster = %name, "{note}");
                    event(ctx, pc, EventType::Normal, "RolloutSwitchover", &note).await;
                }
                // Refused with nothing done: the candidate may have come back a moment ago.
                // The plan is made again on the next reconcile, for a while.
                Err((_, why)) if retry => {
                    let note =
                        format!("{shard}: the switchover to {to} was refused, retrying: {why}");
                    tracing::info!(cluster = %name, "{note}");
                    rs.shard_primary = None;
                    rs.switchover_from = None;
                    rs.switchover_at = None;
                    rs.step = Some(format!("waiting: {note}"));
                    // The recorded intent is withdrawn now (the final status write compares
                    // with the status before the intent, so it would leave it in place).
                    let mut withdrawn = st.clone();
                    withdrawn.rollout = Some(rs.clone());
                    write_status(api, &name, &intent, withdrawn, ctx).await?;
                }
                Err((_, why)) => {
                    let reason = format!("the switchover of {shard} to {to} failed: {why}");
                    rs.phase = rollout::HALTED.into();
                    rs.step = Some(format!("halted: {reason}"));
                    rs.reason = Some(reason.clone());
                    rs.halted_generation = generation;
                    event(ctx, pc, EventType::Warning, "RolloutHalted", &reason).await;
                }
            }
        }
        Step::Halt(reason) if new_step => {
            tracing::warn!(cluster = %name, "rollout halted: {reason}");
            event(ctx, pc, EventType::Warning, "RolloutHalted", reason).await;
        }
        Step::Complete if last.as_ref().is_none_or(|l| l.phase != rollout::COMPLETE) => {
            let note = format!("every shard runs revision {target}");
            event(ctx, pc, EventType::Normal, "RolloutComplete", &note).await;
        }
        Step::WaitForRelease if new_step => {
            let note = rs.step.clone().unwrap_or_default();
            event(
                ctx,
                pc,
                EventType::Normal,
                "RolloutWaitingForRelease",
                &note,
            )
            .await;
        }
        Step::Soak { shard, .. } if new_step && rs.soak_started.is_some() => {
            let note = format!("{shard} runs revision {target}: soaking");
            event(ctx, pc, EventType::Normal, "RolloutSoak", &note).await;
        }
        _ => {}
    }
    if new_step {
        tracing::info!(cluster = %name, phase = %rs.phase, "rollout: {describe}");
    }
    let halted = rs.phase == rollout::HALTED;
    ctx.metrics
        .rollout_halted
        .with_label_values(&[ns, &name])
        .set(i64::from(halted));
    set_condition(
        st,
        "RolloutHalted",
        if halted { "True" } else { "False" },
        if halted { "Halted" } else { "NotHalted" },
        rs.reason.as_deref().unwrap_or(""),
        generation,
    );
    if rs.phase == rollout::IN_PROGRESS {
        set_condition(
            st,
            "Progressing",
            "True",
            "RollingOut",
            &format!("revision {target}: {}", rs.step.as_deref().unwrap_or("")),
            generation,
        );
    }
    let again = match rs.phase.as_str() {
        rollout::IN_PROGRESS => Some(Duration::from_secs(2)),
        rollout::PENDING => Some(Duration::from_secs(1)),
        _ => None,
    };
    st.rollout = Some(rs);
    Ok(again)
}

/// The agents' API token (from the Secret the spec names or the generated one), or why it
/// is not there.
pub async fn agent_token(
    pc: &PostgresCluster,
    ns: &str,
    ctx: &Ctx,
) -> Result<Result<String, String>, Error> {
    let (secret, key) = SecretRefs::of(pc).token;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let token = api
        .get_opt(&secret)
        .await?
        .and_then(|s| s.data)
        .and_then(|d| {
            d.get(&key).and_then(|v| {
                pgpilot_common::client::presented_token(&String::from_utf8_lossy(&v.0))
                    .map(str::to_string)
            })
        });
    Ok(token.ok_or_else(|| {
        format!("the agents' API token (Secret {secret:?}, key {key:?}) is missing")
    }))
}

/// `DatabasesInSync` from what the shards' agents report in `status.databases` (they write
/// it; the operator only reads it), and the drift gauge.
fn databases_condition(
    pc: &PostgresCluster,
    st: &mut PostgresClusterStatus,
    generation: Option<i64>,
    ctx: &Ctx,
) {
    let mut off = Vec::new();
    for d in &st.databases {
        let shards: Vec<String> = d
            .drifted()
            .map(|s| match (&s.message, s.state.as_str()) {
                (Some(m), _) => format!("{}: {m}", s.shard),
                (None, "Present") => format!(
                    "{}: owner {:?}, declared {:?}",
                    s.shard,
                    s.owner.as_deref().unwrap_or(""),
                    d.owner.as_deref().unwrap_or("")
                ),
                (None, state) => format!("{}: {state}", s.shard),
            })
            .collect();
        if !shards.is_empty() {
            off.push(format!("{:?} ({})", d.name, shards.join(", ")));
        }
    }
    // A declared database that a shard's primary has not reported yet is not in sync either:
    // `kubectl wait --for=condition=DatabasesInSync` returns once every one exists everywhere.
    for d in &pc.spec.databases {
        if d.ensure == Some(pgpilot_common::crd::Ensure::Absent) {
            continue;
        }
        let reported = st.databases.iter().find(|s| s.name == d.name);
        let unreported: Vec<String> = pc
            .spec
            .shard_names()
            .into_iter()
            .filter(|shard| reported.is_none_or(|r| !r.shards.iter().any(|s| &s.shard == shard)))
            .map(|shard| format!("{shard}: not reported yet"))
            .collect();
        if !unreported.is_empty() {
            off.push(format!("{:?} ({})", d.name, unreported.join(", ")));
        }
    }
    ctx.metrics
        .database_drift
        .with_label_values(&[&pc.name_any()])
        .set(off.len() as i64);
    let (status, reason, message) = if off.is_empty() {
        (
            "True",
            "InSync",
            format!(
                "{} databases as declared on every shard",
                st.databases.len()
            ),
        )
    } else {
        ("False", "Drift", off.join("; "))
    };
    set_condition(st, "DatabasesInSync", status, reason, &message, generation);
}

/// Writes the status subresource when it changed. `status.databases` is the agents' (each
/// shard's primary applies its own items): it is never written here, so a reconcile that
/// read an older status cannot undo what an agent wrote since.
async fn write_status(
    api: &Api<PostgresCluster>,
    name: &str,
    before: &PostgresClusterStatus,
    mut after: PostgresClusterStatus,
    ctx: &Ctx,
) -> Result<(), Error> {
    if *before == after {
        return Ok(());
    }
    after.databases.clear();
    let mut old = serde_json::to_value(before).expect("a status");
    if let Some(o) = old.as_object_mut() {
        o.remove("databases");
    }
    let new = serde_json::to_value(&after).expect("a status");
    // A merge patch from what was read: a field that went away (a rollout's current shard,
    // a soak start) is written as null, so it is really removed.
    let patch = serde_json::json!({"status": merge_patch(&old, &new)});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    ctx.metrics.writes.inc();
    Ok(())
}

/// The JSON merge patch (RFC 7386) that turns `old` into `new`: changed and new keys, removed
/// keys as null, objects compared key by key.
fn merge_patch(old: &serde_json::Value, new: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut out = serde_json::Map::new();
            for (k, v) in n {
                match o.get(k) {
                    Some(ov) if ov == v => {}
                    Some(ov @ Value::Object(_)) if v.is_object() => {
                        out.insert(k.clone(), merge_patch(ov, v));
                    }
                    _ => {
                        out.insert(k.clone(), v.clone());
                    }
                }
            }
            for k in o.keys() {
                if !n.contains_key(k) {
                    out.insert(k.clone(), Value::Null);
                }
            }
            Value::Object(out)
        }
        _ => new.clone(),
    }
}

pub(crate) async fn event(
    ctx: &Ctx,
    pc: &PostgresCluster,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    publish(ctx, &pc.object_ref(&()), type_, reason, note).await;
}

/// Records an Event on `object` (best effort).
pub async fn publish(
    ctx: &Ctx,
    object: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, object).await {
        tracing::debug!("cannot record an Event: {e}");
    }
}

/// Creates `obj` unless it exists (a name that says what it is for, so a restart never makes
/// a second one), with an Event when it was made.
pub(crate) async fn create_once<K>(
    api: &Api<K>,
    obj: &K,
    ctx: &Ctx,
    pc: &PostgresCluster,
    reason: &str,
    note: &str,
) -> Result<(), Error>
where
    K: Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => {
            ctx.metrics.writes.inc();
            event(ctx, pc, EventType::Normal, reason, note).await;
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::merge_patch;
    use serde_json::json;

    #[test]
    fn a_merge_patch_removes_fields_that_went_away_and_leaves_equal_ones_out() {
        let old = json!({"rollout": {"phase": "InProgress", "currentShard": "shard-0", "completedShards": []},
                         "observedGeneration": 3});
        let new = json!({"rollout": {"phase": "InProgress", "completedShards": ["shard-0"]},
                         "observedGeneration": 3});
        assert_eq!(
            merge_patch(&old, &new),
            json!({"rollout": {"currentShard": null, "completedShards": ["shard-0"]}})
        );
    }
}
