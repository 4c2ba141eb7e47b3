//! The kubelet itself: registers its nodes, binds pending pods to them (it doubles as the
//! scheduler), watches the pods bound to them and runs each with [`crate::pod`], and offers a
//! test the faults and views a real node would give it.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use kube::{Api, Client};
use nix::sys::signal::Signal;
use pgpilot_kube_testserver::{KubeTestServer, ServerOptions, StoreOptions};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::images::ImageTable;
use crate::net::{ApiFault, ApiProxy, Subnet};
use crate::peers::{PeerFault, PeerFirewall};
use crate::pod::{PodRt, new_pod, record_event};

/// What the kubelet runs and how fast it retries.
#[derive(Debug, Clone)]
pub struct KubeletOptions {
    /// The fake nodes; pods are bound to them in turn.
    pub nodes: Vec<String>,
    pub images: ImageTable,
    /// First crash-loop back-off (Kubernetes: 10 s, doubling to 5 min). Shorter here, so tests
    /// see restarts quickly.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How often Secret and ConfigMap volumes are refreshed (Kubernetes: about a minute).
    pub volume_sync: Duration,
}

impl Default for KubeletOptions {
    fn default() -> Self {
        Self {
            nodes: vec!["node-0".into()],
            images: ImageTable::new(),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(16),
            volume_sync: Duration::from_millis(500),
        }
    }
}

/// Server options with the controllers that pods running on a kubelet need: StatefulSets,
/// Deployments, EndpointSlices and PodDisruptionBudget status.
pub fn server_options() -> ServerOptions {
    ServerOptions {
        store: StoreOptions {
            statefulset_controller: true,
            deployment_controller: true,
            endpointslice_controller: true,
            disruption_controller: true,
            ..StoreOptions::default()
        },
        ..ServerOptions::default()
    }
}

/// A test API server with [`server_options`] and a kubelet running its pods from `images`:
/// what every end-to-end suite starts (keep both alive for the test).
pub async fn start_cluster(images: ImageTable) -> anyhow::Result<(KubeTestServer, Kubelet)> {
    let server = KubeTestServer::start_with(server_options()).await?;
    let kubelet = Kubelet::start(
        &server,
        KubeletOptions {
            images,
            ..KubeletOptions::default()
        },
    )
    .await?;
    Ok((server, kubelet))
}

pub(crate) struct Shared {
    pub client: Client,
    pub opts: KubeletOptions,
    pub root: PathBuf,
    api: SocketAddr,
    pub subnet: Subnet,
    /// Per-pod cgroups and the iptables chain that cuts pods off their peers, or why there
    /// are none.
    pub peers: Result<PeerFirewall, String>,
    pods: Mutex<HashMap<String, Arc<PodRt>>>,
    hosts: Mutex<BTreeSet<u8>>,
    not_ready: Mutex<BTreeSet<String>>,
}

impl Shared {
    pub fn pvc_dir(&self, ns: &str, claim: &str) -> PathBuf {
        self.root.join("pvc").join(ns).join(claim)
    }

    pub fn node_ready(&self, node: &str) -> bool {
        !self
            .not_ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(node)
    }

    pub async fn event(&self, rt: &PodRt, type_: &str, reason: &str, message: &str) {
        record_event(&self.client, rt, type_, reason, message).await;
    }

    pub fn forget(&self, uid: &str, host: u8) {
        if let Ok(peers) = &self.peers {
            peers.remove_pod(uid);
        }
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
        self.hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&host);
    }

    fn find(&self, ns: &str, name: &str) -> Option<Arc<PodRt>> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|p| p.ns == ns && p.name == name && !p.terminate.is_cancelled())
            .cloned()
    }

    fn all(&self) -> Vec<Arc<PodRt>> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// A running kubelet. Dropping it kills every pod process and removes its directories; while a
/// test panics it first prints every container's log, the pods it took last at the end.
pub struct Kubelet {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    log_task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Kubelet {
    /// Starts a kubelet for `server` (which should run with [`server_options`]).
    pub async fn start(server: &KubeTestServer, opts: KubeletOptions) -> anyhow::Result<Self> {
        let api: SocketAddr = server
            .url()
            .trim_start_matches("http://")
            .parse()
            .context("the test server's address")?;
        remove_stale_dirs();
        let dir = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir()?;
        std::fs::write(
            dir.path().join("kubelet.pid"),
            std::process::id().to_string(),
        )?;
        // Pods may run as another user, who must reach their directories.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let client = server.client();
        let mut opts = opts;
        let images = dir.path().join("images");
        opts.images
            .pull_into(&images)
            .with_context(|| format!("copying the images' binaries into {}", images.display()))?;
        std::fs::set_permissions(&images, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let subnet = Subnet::lease()?;
        let peers = PeerFirewall::new(subnet.third);
        if let Err(e) = &peers {
            tracing::info!("pods cannot be cut off their peers here: {e}");
        }
        let shared = Arc::new(Shared {
            client: client.clone(),
            opts: opts.clone(),
            root: dir.path().to_path_buf(),
            api,
            subnet,
            peers,
            pods: Mutex::new(HashMap::new()),
            hosts: Mutex::new(BTreeSet::new()),
            not_ready: Mutex::new(BTreeSet::new()),
        });
        let (log_port, log_task) = serve_logs(dir.path().to_path_buf()).await?;
        let nodes: Api<Node> = Api::all(client.clone());
        for n in &opts.nodes {
            let node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n, "labels": {"kubernetes.io/hostname": n}}}))?;
            match nodes.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e).with_context(|| format!("registering node {n}")),
            }
            write_node_status(&nodes, n, true).await?;
            let endpoints =
                json!({"status": {"daemonEndpoints": {"kubeletEndpoint": {"Port": log_port}}}});
            nodes
                .patch_status(n, &PatchParams::default(), &Patch::Merge(endpoints))
                .await
                .with_context(|| format!("writing the kubelet endpoint of node {n}"))?;
        }
        let task = tokio::spawn(watch_pods(shared.clone()));
        Ok(Self {
            shared,
            task,
            log_task,
            _dir: dir,
        })
    }

    /// The IP of a pod running here.
    pub fn pod_ip(&self, ns: &str, pod: &str) -> Option<Ipv4Addr> {
        self.shared.find(ns, pod).map(|p| p.ip)
    }

    /// The host directory backing a PersistentVolumeClaim (it outlives pods).
    pub fn pvc_dir(&self, ns: &str, claim: &str) -> PathBuf {
        self.shared.pvc_dir(ns, claim)
    }

    /// What a name lookup of the Service would give inside the cluster: the ready endpoints of
    /// its EndpointSlices. In-cluster DNS is not simulated; this is for tests only.
    pub async fn service_ips(&self, ns: &str, service: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
        service_ips(&self.shared.client, ns, service).await
    }

    /// Everything a container of the pod wrote to stdout and stderr, over all its restarts.
    pub fn logs(&self, ns: &str, pod: &str, container: &str) -> String {
        container_logs(&self.shared.root, ns, pod, container)
    }

    /// Every log line any container of any pod of `ns` wrote, over all incarnations: what a
    /// test searches for what must never be logged (secrets).
    pub fn namespace_logs(&self, ns: &str) -> String {
        let prefix = format!("{ns}_");
        let mut out = String::new();
        for pod in std::fs::read_dir(self.shared.root.join("logs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        {
            for file in std::fs::read_dir(pod.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                out.push_str(&std::fs::read_to_string(file.path()).unwrap_or_default());
            }
        }
        out
    }

    /// kill -9 of one container's processes (or the whole pod's), with no hooks: the containers
    /// restart under their restart policy, as after an OOM kill or a crash.
    pub fn kill(&self, ns: &str, pod: &str, container: Option<&str>) -> anyhow::Result<()> {
        self.signal(ns, pod, container, Signal::SIGKILL)
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) to every process of the pod.
    pub fn freeze(&self, ns: &str, pod: &str, frozen: bool) -> anyhow::Result<()> {
        let sig = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        self.signal(ns, pod, None, sig)
    }

    fn signal(
        &self,
        ns: &str,
        pod: &str,
        container: Option<&str>,
        sig: Signal,
    ) -> anyhow::Result<()> {
        let rt = self
            .shared
            .find(ns, pod)
            .with_context(|| format!("pod {ns}/{pod} is not running here"))?;
        if rt.signal(container, sig) == 0 {
            anyhow::bail!(
                "pod {ns}/{pod} has no running process{}",
                container
                    .map(|c| format!(" in container {c}"))
                    .unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Cuts the pod off the API server (or restores it): its API traffic goes through its own
    /// proxy, which refuses or blackholes connections.
    pub fn set_api_fault(&self, ns: &str, pod: &str, fault: ApiFault) -> anyhow::Result<()> {
        let rt = self
            .shared
            .find(ns, pod)
            .with_context(|| format!("pod {ns}/{pod} is not running here"))?;
        rt.proxy.set(fault);
        Ok(())
    }

    /// Cuts the pod off the other pods (or restores it): TCP between its processes and theirs
    /// is refused or blackholed both ways, while the test, the kubelet's probes and the API
    /// server still reach it and it still reaches the API server. Per-pod cgroups matched by
    /// iptables (see `peers.rs`); an error says why when this machine cannot (not root, no
    /// cgroup v2, no iptables). The cut lasts until lifted or the pod is gone; a new
    /// incarnation of the pod starts uncut.
    pub fn set_peer_fault(&self, ns: &str, pod: &str, fault: PeerFault) -> anyhow::Result<()> {
        let rt = self
            .shared
            .find(ns, pod)
            .with_context(|| format!("pod {ns}/{pod} is not running here"))?;
        let peers = self
            .shared
            .peers
            .as_ref()
            .map_err(|e| anyhow::anyhow!("cannot cut {ns}/{pod} off its peers: {e}"))?;
        if rt.cgroup.is_none() {
            anyhow::bail!("pod {ns}/{pod} has no cgroup of its own");
        }
        peers
            .set(&rt.uid, rt.ip, fault)
            .map_err(|e| anyhow::anyhow!("cutting {ns}/{pod} off its peers: {e}"))
    }

    /// Marks a node NotReady (its kubelet stops reporting, and its pods become unready, as the
    /// node lifecycle controller makes them) or Ready again. Processes keep running.
    pub async fn set_node_ready(&self, node: &str, ready: bool) -> anyhow::Result<()> {
        {
            let mut nr = self
                .shared
                .not_ready
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if ready {
                nr.remove(node);
            } else {
                nr.insert(node.to_string());
            }
        }
        write_node_status(&Api::all(self.shared.client.clone()), node, ready).await?;
        if !ready {
            for rt in self.shared.all().into_iter().filter(|p| p.node == node) {
                let conds = json!([{"type": "Ready", "status": "False", "reason": "NodeNotReady"},
                    {"type": "ContainersReady", "status": "False", "reason": "NodeNotReady"}]);
                let patch = Patch::Strategic(json!({"status": {"conditions": conds}}));
                Api::<Pod>::namespaced(self.shared.client.clone(), &rt.ns)
                    .patch_status(&rt.name, &PatchParams::default(), &patch)
                    .await
                    .with_context(|| format!("marking pod {}/{} not ready", rt.ns, rt.name))?;
            }
        }
        for rt in self.shared.all() {
            rt.dirty.notify_one();
        }
        Ok(())
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        self.log_task.abort();
        let mut pods = self.shared.all();
        pods.sort_by_key(|p| p.taken);
        if std::thread::panicking() {
            for rt in &pods {
                for c in rt
                    .containers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                {
                    eprintln!(
                        "----- logs of {}/{} container {} -----",
                        rt.ns, rt.name, c.name
                    );
                    eprintln!("{}", self.logs(&rt.ns, &rt.name, &c.name));
                }
            }
        }
        for rt in pods {
            rt.gone.cancel();
            rt.signal(None, Signal::SIGCONT);
            rt.signal(None, Signal::SIGKILL);
        }
    }
}

/// A container's logs over all its pod's incarnations, oldest first.
fn container_logs(root: &Path, ns: &str, pod: &str, container: &str) -> String {
    let prefix = format!("{ns}_{pod}_");
    let mut entries: Vec<_> = std::fs::read_dir(root.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    entries.sort_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    entries
        .iter()
        .map(|e| {
            std::fs::read_to_string(e.path().join(format!("{container}.log"))).unwrap_or_default()
        })
        .collect()
}

/// The kubelet's HTTP endpoint, which the API server proxies `pods/<name>/log` to (what
/// `kubectl logs` reads).
async fn serve_logs(root: PathBuf) -> anyhow::Result<(u16, JoinHandle<()>)> {
    use axum::extract::Path as P;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the kubelet's log endpoint")?;
    let port = listener.local_addr()?.port();
    let router = axum::Router::new().route(
        "/containerLogs/{ns}/{pod}/{container}",
        axum::routing::get(
            move |P((ns, pod, container)): P<(String, String, String)>| {
                let root = root.clone();
                async move { container_logs(&root, &ns, &pod, &container) }
            },
        ),
    );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((port, task))
}

const DIR_PREFIX: &str = "pgpilot-kubelet-";

/// Removes the directories of kubelets whose process died without cleaning up (a test killed by
/// its harness); their pods died with them (see `pod::SETPRIV`).
fn remove_stale_dirs() {
    let tmp = std::env::temp_dir();
    for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let path = e.path();
        if !e.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let Ok(pid) = std::fs::read_to_string(path.join("kubelet.pid")) else {
            continue;
        };
        if !Path::new(&format!("/proc/{}", pid.trim())).exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

async fn write_node_status(nodes: &Api<Node>, name: &str, ready: bool) -> anyhow::Result<()> {
    let now = jiff::Timestamp::now()
        .round(jiff::Unit::Second)?
        .to_string();
    let (status, reason) = if ready {
        ("True", "KubeletReady")
    } else {
        ("Unknown", "NodeStatusUnknown")
    };
    let patch = Patch::Merge(json!({"status": {
        "conditions": [{"type": "Ready", "status": status, "reason": reason,
            "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
        "nodeInfo": {"kubeletVersion": "v1.32.0-pgpilot-test", "operatingSystem": "linux", "architecture": "amd64",
            "containerRuntimeVersion": "local-process://0", "kernelVersion": "", "osImage": "", "kubeProxyVersion": "",
            "machineID": "", "systemUUID": "", "bootID": ""}}}));
    nodes
        .patch_status(name, &PatchParams::default(), &patch)
        .await
        .with_context(|| format!("writing the status of node {name}"))?;
    Ok(())
}

async fn watch_pods(shared: Arc<Shared>) {
    let api: Api<Pod> = Api::all(shared.client.clone());
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut next_node = 0usize;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                let Ok(v) = serde_json::to_value(&p) else {
                    continue;
                };
                handle(&shared, v, &mut next_node).await;
            }
            Ok(watcher::Event::Delete(p)) => {
                let uid = p.metadata.uid.unwrap_or_default();
                let rt = shared
                    .pods
                    .lock()
                    .unwrap_or_else(|x| x.into_inner())
                    .get(&uid)
                    .cloned();
                if let Some(rt) = rt {
                    rt.gone.cancel();
                    rt.begin_termination(Duration::ZERO);
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("kubelet pod watch: {e}"),
        }
    }
}

async fn handle(shared: &Arc<Shared>, pod: Value, next_node: &mut usize) {
    let s = |p: &str| {
        pod.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (ns, name, uid, node) = (
        s("/metadata/namespace"),
        s("/metadata/name"),
        s("/metadata/uid"),
        s("/spec/nodeName"),
    );
    let deleting = pod.pointer("/metadata/deletionTimestamp").is_some();
    if node.is_empty() {
        let scheduler = s("/spec/schedulerName");
        if deleting || !(scheduler.is_empty() || scheduler == "default-scheduler") {
            return;
        }
        // Ready and not cordoned (`kubectl cordon`/`drain` set spec.unschedulable).
        let nodes: Api<Node> = Api::all(shared.client.clone());
        let mut ready: Vec<&String> = Vec::new();
        for n in shared.opts.nodes.iter().filter(|n| shared.node_ready(n)) {
            let cordoned = nodes
                .get_opt(n)
                .await
                .ok()
                .flatten()
                .and_then(|node| node.spec?.unschedulable)
                .unwrap_or(false);
            if !cordoned {
                ready.push(n);
            }
        }
        if ready.is_empty() {
            return;
        }
        let target = ready[*next_node % ready.len()].clone();
        *next_node += 1;
        let body = json!({"apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name}, "target": {"apiVersion": "v1", "kind": "Node", "name": target}});
        let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
        let bound: Result<Value, _> = api
            .create_subresource("binding", &name, &PostParams::default(), &body)
            .await;
        if let Err(e) = bound {
            tracing::debug!("binding {ns}/{name}: {e}");
        }
        return;
    }
    if !shared.opts.nodes.contains(&node) {
        return;
    }
    let known = shared
        .pods
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&uid)
        .cloned();
    match known {
        Some(rt) if deleting => {
            let grace = pod
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(30);
            rt.begin_termination(Duration::from_secs(grace));
        }
        Some(_) => {}
        None if deleting => {
            let _ = Api::<Pod>::namespaced(shared.client.clone(), &ns)
                .delete(
                    &name,
                    &kube::api::DeleteParams {
                        grace_period_seconds: Some(0),
                        ..Default::default()
                    },
                )
                .await;
        }
        None => {
            let phase = s("/status/phase");
            if matches!(phase.as_str(), "Succeeded" | "Failed") {
                return;
            }
            let host = {
                let mut hosts = shared.hosts.lock().unwrap_or_else(|p| p.into_inner());
                let Some(h) = (2..=254u8).find(|h| !hosts.contains(h)) else {
                    tracing::warn!("no free pod IP for {ns}/{name}");
                    return;
                };
                hosts.insert(h);
                h
            };
            let proxy = match ApiProxy::start(shared.api).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("API proxy for {ns}/{name}: {e}");
                    shared
                        .hosts
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&host);
                    return;
                }
            };
            let rt = Arc::new(new_pod(shared, &pod, host, proxy));
            shared
                .pods
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(uid, rt.clone());
            let _ = std::fs::create_dir_all(&rt.logs);
            let _ = std::fs::create_dir_all(&rt.dir);
            let _ = std::fs::set_permissions(
                &rt.dir,
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            );
            tokio::spawn(crate::pod::run(shared.clone(), rt, pod));
        }
    }
}

/// The ready endpoint addresses of a Service, from its EndpointSlices (the API only: the same
/// on a real cluster), sorted.
pub async fn service_ips(
    client: &Client,
    ns: &str,
    service: &str,
) -> anyhow::Result<Vec<Ipv4Addr>> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let mut out: Vec<Ipv4Addr> = slices
        .list(&lp)
        .await
        .with_context(|| format!("listing EndpointSlices of service {ns}/{service}"))?
        .items
        .into_iter()
        .flat_map(|s| s.endpoints.into_iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses)
        .filter_map(|a| a.parse().ok())
        .collect();
    out.sort();
    Ok(out)
}
