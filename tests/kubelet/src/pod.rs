//! One pod's life on this kubelet: volumes, env, init containers in order, then every
//! container under its restart policy with crash backoff and its probes, the status written
//! back to the API server, and graceful termination (preStop, SIGTERM, SIGKILL after the grace
//! period) before the pod object is removed.
//!
//! Containers share the host's filesystem, so a `volumeMount` is a host directory, and the
//! kubelet rewrites every mount path that appears in the container's `command`, `args`, env
//! values and `workingDir` to that directory. A program that takes its paths from its arguments
//! or env (as ours do) runs unchanged. A container with `readOnlyRootFilesystem` gets a mount
//! namespace in which all of that filesystem but its volumes is read-only
//! ([`crate::isolation`]).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::images::ImageTable;
use crate::isolation::Isolation;
use crate::kubelet::Shared;
use crate::net::ApiProxy;
use crate::probe::{ProbeSpec, run_handler};

const SETPRIV: &str = "/usr/bin/setpriv";

/// The token of the pod's service account (`spec.serviceAccountName`, else `default`): the test
/// API server takes it as that account and applies RBAC to it.
fn sa_token(pod: &Value) -> String {
    let ns = pod
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let sa = ["/spec/serviceAccountName", "/spec/serviceAccount"]
        .iter()
        .find_map(|p| {
            pod.pointer(p)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        })
        .unwrap_or("default");
    pgpilot_kube_testserver::service_account_token(ns, sa)
}

/// Where a pod's service-account token and namespace are mounted.
const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// What the kubelet knows about one container of a running pod.
#[derive(Debug, Clone)]
pub(crate) struct ContainerState {
    pub name: String,
    pub image: String,
    pub init: bool,
    /// Process group of the running process (its pid).
    pub pid: Option<i32>,
    pub restart_count: u32,
    pub started: bool,
    pub ready: bool,
    pub state: Value,
    pub last_state: Value,
}

/// One pod incarnation (one uid) on this kubelet.
pub(crate) struct PodRt {
    pub ns: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub host: u8,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub logs: PathBuf,
    pub proxy: ApiProxy,
    /// The `cgroup.procs` of the pod's cgroup, which its processes join (see `peers.rs`).
    pub cgroup: Option<PathBuf>,
    /// Cancelled when the pod is deleted: containers stop gracefully.
    pub terminate: CancellationToken,
    /// The grace period in force when `terminate` fired.
    pub grace: Mutex<Duration>,
    /// Cancelled when the pod object is gone (forced deletion): everything is killed now.
    pub gone: CancellationToken,
    pub containers: Mutex<Vec<ContainerState>>,
    pub initialized: Mutex<bool>,
    pub phase: Mutex<&'static str>,
    pub dirty: Notify,
    /// When this kubelet took the pod: a failing test's logs are printed oldest first, so the
    /// pods it was waiting for (usually the newest) end the output, the part an excerpt keeps.
    pub taken: Instant,
}

impl PodRt {
    pub fn with_container<R>(
        &self,
        name: &str,
        f: impl FnOnce(&mut ContainerState) -> R,
    ) -> Option<R> {
        let mut cs = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        let out = cs.iter_mut().find(|c| c.name == name).map(f);
        drop(cs);
        self.dirty.notify_one();
        out
    }

    /// Sends `sig` to every running container's process group, and to every process below it
    /// that moved to a group of its own (the agent runs its postmaster in one): a frozen or
    /// crashed node stops every process of the pod, as the cgroup freezer does.
    pub fn signal(&self, container: Option<&str>, sig: Signal) -> usize {
        let cs = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        cs.iter()
            .filter(|c| container.is_none_or(|n| n == c.name))
            .filter_map(|c| c.pid)
            .filter(|pid| {
                let hit = killpg(Pid::from_raw(*pid), sig).is_ok();
                for d in descendants(*pid) {
                    let _ = nix::sys::signal::kill(Pid::from_raw(d), sig);
                }
                hit
            })
            .count()
    }

    pub fn begin_termination(&self, grace: Duration) {
        if !self.terminate.is_cancelled() {
            *self.grace.lock().unwrap_or_else(|p| p.into_inner()) = grace;
            self.terminate.cancel();
        }
    }
}

/// How to run a process of one container: program lookup, env, mounts and user.
pub(crate) struct ContainerRun {
    pub spec: Value,
    pub image: String,
    pub images: ImageTable,
    pub env: Vec<(String, String)>,
    /// `(mountPath, host dir)`, longest mount path first.
    pub mounts: Vec<(String, PathBuf)>,
    /// Applied between fork and exec: the read-only root and the user.
    pub isolation: Isolation,
    pub workdir: PathBuf,
    pub log: PathBuf,
}

impl ContainerRun {
    /// Replaces every mount path in `s` (at a path boundary) with its host directory.
    pub fn rewrite(&self, s: &str) -> String {
        let mut out = s.to_string();
        for (mp, host) in &self.mounts {
            let mp = mp.trim_end_matches('/');
            let mut result = String::new();
            let mut rest = out.as_str();
            while let Some(i) = rest.find(mp) {
                let after = rest[i + mp.len()..].chars().next();
                let before_ok = i == 0
                    || !rest[..i].ends_with(|c: char| {
                        c.is_alphanumeric() || c == '/' || c == '_' || c == '-' || c == '.'
                    });
                let after_ok = after
                    .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-' || c == '.'));
                result.push_str(&rest[..i]);
                if before_ok && after_ok {
                    result.push_str(&host.to_string_lossy());
                } else {
                    result.push_str(mp);
                }
                rest = &rest[i + mp.len()..];
            }
            result.push_str(rest);
            out = result;
        }
        out
    }

    /// A command for `argv` (resolved in the image) followed by `args`, with the container's env,
    /// user, working dir and log file.
    pub fn command(
        &self,
        argv: &[String],
        args: Option<&[String]>,
    ) -> Result<tokio::process::Command, String> {
        let argv: Vec<String> = argv
            .iter()
            .map(|a| self.rewrite(&expand(a, &self.env)))
            .collect();
        let (program, pre) = self.images.resolve(&self.image, &argv)?;
        // With setpriv (util-linux) the process gets SIGKILL when the kubelet's thread dies, so a
        // test killed by its harness (no destructors run) leaves no container behind.
        let mut cmd = if Path::new(SETPRIV).exists() {
            let mut c = tokio::process::Command::new(SETPRIV);
            c.args(["--pdeathsig", "KILL", "--"]).arg(&program);
            c
        } else {
            tokio::process::Command::new(&program)
        };
        cmd.args(pre);
        for a in args.unwrap_or_default() {
            cmd.arg(self.rewrite(&expand(a, &self.env)));
        }
        cmd.env_clear();
        let path: Vec<PathBuf> = self
            .images
            .path_of(&self.image)
            .into_iter()
            .chain(
                std::env::var_os("PATH")
                    .iter()
                    .flat_map(std::env::split_paths),
            )
            .collect();
        if let Ok(p) = std::env::join_paths(path) {
            cmd.env("PATH", p);
        }
        for (k, v) in &self.env {
            cmd.env(k, self.rewrite(v));
        }
        cmd.current_dir(&self.workdir);
        if !self.isolation.is_empty() {
            let isolation = self.isolation.clone();
            // SAFETY: `apply` runs in the forked child and only makes system calls (unshare,
            // mount, setgroups, setgid, setuid) on data allocated before the fork: no lock, no
            // allocation, which is what `pre_exec` requires.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(move || isolation.apply());
            }
        }
        cmd.stdin(std::process::Stdio::null());
        Ok(cmd)
    }

    fn log_files(&self) -> std::io::Result<(std::fs::File, std::fs::File)> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        Ok((f.try_clone()?, f))
    }
}

/// `$(VAR)` references to earlier env entries, as Kubernetes expands them (`$$` escapes).
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(t) = tail.strip_prefix("$$") {
            out.push('$');
            rest = t;
        } else if let Some(end) = tail.strip_prefix("$(").and_then(|t| t.find(')'))
            && let Some((_, v)) = env.iter().rev().find(|(k, _)| *k == tail[2..2 + end])
        {
            out.push_str(v);
            rest = &tail[3 + end..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The items of the JSON array at `pointer` (none when absent).
fn list<'a>(v: &'a Value, pointer: &str) -> impl Iterator<Item = &'a Value> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn strs(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(String::from))
        .collect()
}

/// A downward-API field of the pod (`metadata.labels['k']` included).
fn field_ref(pod: &Value, ip: Ipv4Addr, path: &str) -> Option<String> {
    let map_key = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['").and_then(|r| r.strip_suffix("']")))
            .map(String::from)
    };
    if let Some(k) = map_key("metadata.labels") {
        return pod
            .pointer("/metadata/labels")
            .and_then(|l| l.get(&k))
            .and_then(Value::as_str)
            .map(String::from);
    }
    if let Some(k) = map_key("metadata.annotations") {
        return pod
            .pointer("/metadata/annotations")
            .and_then(|l| l.get(&k))
            .and_then(Value::as_str)
            .map(String::from);
    }
    match path {
        "status.podIP" => Some(ip.to_string()),
        "status.podIPs" => Some(ip.to_string()),
        "status.hostIP" | "status.hostIPs" => Some("127.0.0.1".into()),
        "metadata.labels" | "metadata.annotations" => pod
            .pointer(&format!("/{}", path.replace('.', "/")))
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", v.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join("\n")
            }),
        other => pod
            .pointer(&format!("/{}", other.replace('.', "/")))
            .and_then(Value::as_str)
            .map(String::from),
    }
}

/// A Secret's or ConfigMap's keys as bytes: its text map, then its bytes map.
fn key_bytes(
    text: Option<std::collections::BTreeMap<String, String>>,
    bytes: Option<std::collections::BTreeMap<String, k8s_openapi::ByteString>>,
) -> HashMap<String, Vec<u8>> {
    let mut m: HashMap<String, Vec<u8>> = text
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    m.extend(bytes.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)));
    m
}

/// Key → bytes of a Secret or ConfigMap source (`secretName`/`name`), `None` when absent.
async fn source_data(
    shared: &Shared,
    ns: &str,
    kind: &str,
    name: &str,
) -> Result<Option<HashMap<String, Vec<u8>>>, String> {
    let client = shared.client.clone();
    let got = if kind == "secret" {
        Api::<Secret>::namespaced(client, ns)
            .get_opt(name)
            .await
            .map(|s| s.map(|s| key_bytes(s.string_data, s.data)))
    } else {
        Api::<ConfigMap>::namespaced(client, ns)
            .get_opt(name)
            .await
            .map(|c| c.map(|c| key_bytes(c.data, c.binary_data)))
    };
    got.map_err(|e| format!("reading {kind} {name}: {e}"))
}

/// The container's environment: the kubelet's in-cluster variables, then `envFrom`, then `env`.
async fn container_env(
    shared: &Shared,
    rt: &PodRt,
    pod: &Value,
    c: &Value,
) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = vec![
        (
            "HOSTNAME".into(),
            pod.pointer("/spec/hostname")
                .and_then(Value::as_str)
                .unwrap_or(&rt.name)
                .to_string(),
        ),
        (
            "KUBERNETES_SERVICE_HOST".into(),
            rt.proxy.addr.ip().to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT".into(),
            rt.proxy.addr.port().to_string(),
        ),
        (
            "KUBECONFIG".into(),
            rt.dir.join("kubeconfig").to_string_lossy().into_owned(),
        ),
    ];
    for from in list(c, "/envFrom") {
        let prefix = from
            .get("prefix")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let (kind, r) = match (from.get("secretRef"), from.get("configMapRef")) {
            (Some(r), _) => ("secret", r),
            (_, Some(r)) => ("configmap", r),
            _ => continue,
        };
        let name = r.get("name").and_then(Value::as_str).unwrap_or_default();
        match source_data(shared, &rt.ns, kind, name).await? {
            Some(data) => {
                for (k, v) in data {
                    env.push((
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v).into_owned(),
                    ));
                }
            }
            None if r.get("optional") == Some(&json!(true)) => {}
            None => return Err(format!("{kind} {name:?} not found")),
        }
    }
    for e in list(c, "/env") {
        let name = e
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if let Some(v) = e.get("value").and_then(Value::as_str) {
            let v = expand(v, &env);
            env.push((name, v));
            continue;
        }
        let Some(from) = e.get("valueFrom") else {
            env.push((name, String::new()));
            continue;
        };
        let value = if let Some(f) = from.get("fieldRef") {
            let path = f
                .get("fieldPath")
                .and_then(Value::as_str)
                .unwrap_or_default();
            Some(field_ref(pod, rt.ip, path).unwrap_or_default())
        } else {
            let (kind, r) = match (from.get("secretKeyRef"), from.get("configMapKeyRef")) {
                (Some(r), _) => ("secret", r),
                (_, Some(r)) => ("configmap", r),
                _ => return Err(format!("env {name}: unsupported valueFrom {from}")),
            };
            let src = r.get("name").and_then(Value::as_str).unwrap_or_default();
            let key = r.get("key").and_then(Value::as_str).unwrap_or_default();
            let v = source_data(shared, &rt.ns, kind, src)
                .await?
                .and_then(|d| d.get(key).map(|v| String::from_utf8_lossy(v).into_owned()));
            if v.is_none() && r.get("optional") != Some(&json!(true)) {
                return Err(format!(
                    "env {name}: key {key:?} of {kind} {src:?} not found"
                ));
            }
            v
        };
        if let Some(v) = value {
            env.push((name, v));
        }
    }
    Ok(env)
}

/// Writes `files` into `dir` (atomically per file); true if anything changed.
fn write_files(
    dir: &Path,
    files: &[(String, Vec<u8>, u32)],
    user: Option<(u32, u32)>,
) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut changed = false;
    for (rel, data, mode) in files {
        let path = dir.join(rel);
        if std::fs::read(&path).is_ok_and(|old| old == *data) {
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension("kubelet-tmp");
        std::fs::write(&tmp, data)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
        }
        std::fs::rename(&tmp, &path)?;
        changed = true;
    }
    Ok(changed)
}

/// The files of a Secret, ConfigMap, projected or downward-API volume.
async fn projection_files(
    shared: &Shared,
    rt: &PodRt,
    pod: &Value,
    vol: &Value,
) -> Result<Vec<(String, Vec<u8>, u32)>, String> {
    // `defaultMode` sits in the source: `secret`, `configMap`, `downwardAPI` or `projected`.
    let default_mode = ["secret", "configMap", "downwardAPI", "projected"]
        .iter()
        .find_map(|k| vol.get(*k)?.get("defaultMode")?.as_u64())
        .unwrap_or(0o644) as u32;
    let mut sources: Vec<(&str, &Value)> = Vec::new();
    if let Some(s) = vol.get("secret") {
        sources.push(("secret", s));
    }
    if let Some(c) = vol.get("configMap") {
        sources.push(("configmap", c));
    }
    if let Some(d) = vol.get("downwardAPI") {
        sources.push(("downward", d));
    }
    for s in list(vol, "/projected/sources") {
        for (k, kind) in [
            ("secret", "secret"),
            ("configMap", "configmap"),
            ("downwardAPI", "downward"),
            ("serviceAccountToken", "token"),
        ] {
            if let Some(x) = s.get(k) {
                sources.push((kind, x));
            }
        }
    }
    let mut files = Vec::new();
    for (kind, src) in sources {
        match kind {
            "token" => {
                let path = src.get("path").and_then(Value::as_str).unwrap_or("token");
                files.push((path.to_string(), sa_token(pod).into_bytes(), default_mode));
            }
            "downward" => {
                for item in list(src, "/items") {
                    let path = item.get("path").and_then(Value::as_str).unwrap_or_default();
                    let field = item
                        .pointer("/fieldRef/fieldPath")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    files.push((
                        path.to_string(),
                        field_ref(pod, rt.ip, field)
                            .unwrap_or_default()
                            .into_bytes(),
                        default_mode,
                    ));
                }
            }
            _ => {
                let name = src
                    .get("secretName")
                    .or_else(|| src.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let Some(data) = source_data(shared, &rt.ns, kind, name).await? else {
                    if src.get("optional") == Some(&json!(true)) {
                        continue;
                    }
                    return Err(format!("{kind} {name:?} not found"));
                };
                let items = src.get("items").and_then(Value::as_array);
                match items {
                    Some(items) => {
                        for item in items {
                            let key = item.get("key").and_then(Value::as_str).unwrap_or_default();
                            let path = item.get("path").and_then(Value::as_str).unwrap_or(key);
                            let mode = item
                                .get("mode")
                                .and_then(Value::as_u64)
                                .map_or(default_mode, |m| m as u32);
                            let v = data.get(key).ok_or_else(|| {
                                format!("key {key:?} of {kind} {name:?} not found")
                            })?;
                            files.push((path.to_string(), v.clone(), mode));
                        }
                    }
                    None => files.extend(data.into_iter().map(|(k, v)| (k, v, default_mode))),
                }
            }
        }
    }
    Ok(files)
}

/// The pod's user: the container's `securityContext.runAsUser`/`runAsGroup`, else the pod's,
/// applied only when the kubelet runs as root.
fn user_of(images: &ImageTable, pod: &Value, c: &Value) -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let get = |k: &str| {
        c.pointer(&format!("/securityContext/{k}"))
            .or_else(|| pod.pointer(&format!("/spec/securityContext/{k}")))
            .and_then(Value::as_u64)
            .map(|v| v as u32)
    };
    let uid = get("runAsUser")?;
    Some(images.local_user(uid, get("runAsGroup").unwrap_or(uid)))
}

/// Makes every volume's directory; returns volume name → host dir.
async fn prepare_volumes(
    shared: &Shared,
    rt: &PodRt,
    pod: &Value,
) -> Result<HashMap<String, PathBuf>, String> {
    let mut out = HashMap::new();
    let owner = pod
        .pointer("/spec/containers/0")
        .and_then(|c| user_of(&shared.opts.images, pod, c));
    for vol in list(pod, "/spec/volumes") {
        let name = vol
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let dir = if let Some(claim) = vol
            .pointer("/persistentVolumeClaim/claimName")
            .and_then(Value::as_str)
        {
            // A claim must exist, as the real kubelet waits for it to be bound.
            let pvcs: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
                Api::namespaced(shared.client.clone(), &rt.ns);
            if pvcs
                .get_opt(claim)
                .await
                .map_err(|e| e.to_string())?
                .is_none()
            {
                return Err(format!("persistentvolumeclaim {claim:?} not found"));
            }
            shared.pvc_dir(&rt.ns, claim)
        } else {
            rt.dir.join("volumes").join(&name)
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        if let Some((uid, gid)) = owner {
            let fs_group = pod
                .pointer("/spec/securityContext/fsGroup")
                .and_then(Value::as_u64)
                .map(|g| shared.opts.images.local_group(g as u32));
            std::os::unix::fs::chown(&dir, Some(uid), Some(fs_group.unwrap_or(gid)))
                .map_err(|e| e.to_string())?;
        }
        if vol.get("secret").is_some()
            || vol.get("configMap").is_some()
            || vol.get("projected").is_some()
            || vol.get("downwardAPI").is_some()
        {
            let files = projection_files(shared, rt, pod, vol).await?;
            write_files(&dir, &files, owner).map_err(|e| format!("writing volume {name}: {e}"))?;
        }
        out.insert(name, dir);
    }
    let sa = rt.dir.join("serviceaccount");
    let files = vec![
        ("token".to_string(), sa_token(pod).into_bytes(), 0o644),
        ("namespace".to_string(), rt.ns.as_bytes().to_vec(), 0o644),
    ];
    write_files(&sa, &files, owner)
        .map_err(|e| format!("writing the service account token: {e}"))?;
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: in-cluster\n  cluster:\n    server: http://{}\ncontexts:\n- name: in-cluster\n  context:\n    cluster: in-cluster\n    user: sa\n    namespace: {}\ncurrent-context: in-cluster\nusers:\n- name: sa\n  user:\n    tokenFile: {}\n",
        rt.proxy.addr,
        rt.ns,
        sa.join("token").display()
    );
    write_files(
        &rt.dir,
        &[("kubeconfig".into(), kubeconfig.into_bytes(), 0o644)],
        owner,
    )
    .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Rewrites Secret, ConfigMap and projected volumes when their sources change, as the kubelet's
/// periodic sync does.
async fn sync_volumes(
    shared: Arc<Shared>,
    rt: Arc<PodRt>,
    pod: Value,
    dirs: HashMap<String, PathBuf>,
) {
    let owner = pod
        .pointer("/spec/containers/0")
        .and_then(|c| user_of(&shared.opts.images, &pod, c));
    loop {
        tokio::select! {
            _ = rt.gone.cancelled() => return,
            _ = tokio::time::sleep(shared.opts.volume_sync) => {}
        }
        for vol in list(&pod, "/spec/volumes") {
            if vol.get("secret").is_none()
                && vol.get("configMap").is_none()
                && vol.get("projected").is_none()
            {
                continue;
            }
            let name = vol.get("name").and_then(Value::as_str).unwrap_or_default();
            let (Some(dir), Ok(files)) = (
                dirs.get(name),
                projection_files(&shared, &rt, &pod, vol).await,
            ) else {
                continue;
            };
            if let Err(e) = write_files(dir, &files, owner) {
                tracing::warn!("updating volume {name} of {}/{}: {e}", rt.ns, rt.name);
            }
        }
    }
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .to_string()
}

/// Exit code as the container runtime reports it: 128 + signal for a killed process.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Runs one pod until it is deleted (or completes), then removes it.
pub(crate) async fn run(shared: Arc<Shared>, rt: Arc<PodRt>, pod: Value) {
    let writer = tokio::spawn(status_writer(shared.clone(), rt.clone()));
    let outcome = run_containers(&shared, &rt, &pod).await;
    if let Err(e) = outcome {
        shared.event(&rt, "Warning", "Failed", &e).await;
        *rt.phase.lock().unwrap_or_else(|p| p.into_inner()) = "Failed";
        rt.dirty.notify_one();
    }
    // Wait for the deletion when the pod ended on its own (completed or failed).
    tokio::select! {
        _ = rt.terminate.cancelled() => {}
        _ = rt.gone.cancelled() => {}
    }
    rt.gone.cancel();
    let _ = writer.await;
    if let Ok(Some(_)) = Api::<Pod>::namespaced(shared.client.clone(), &rt.ns)
        .get_opt(&rt.name)
        .await
    {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(rt.uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        if let Err(e) = Api::<Pod>::namespaced(shared.client.clone(), &rt.ns)
            .delete(&rt.name, &dp)
            .await
        {
            tracing::debug!("removing pod {}/{}: {e}", rt.ns, rt.name);
        }
    }
    let _ = std::fs::remove_dir_all(&rt.dir);
    shared.forget(&rt.uid, rt.host);
}

async fn run_containers(shared: &Arc<Shared>, rt: &Arc<PodRt>, pod: &Value) -> Result<(), String> {
    let dirs = match prepare_volumes(shared, rt, pod).await {
        Ok(d) => d,
        Err(e) => return Err(format!("MountVolume failed: {e}")),
    };
    let sync = tokio::spawn(sync_volumes(
        shared.clone(),
        rt.clone(),
        pod.clone(),
        dirs.clone(),
    ));
    let policy = pod
        .pointer("/spec/restartPolicy")
        .and_then(Value::as_str)
        .unwrap_or("Always")
        .to_string();
    let sa = pod.pointer("/spec/automountServiceAccountToken") != Some(&json!(false));
    let mut runs = Vec::new();
    let mut specs: Vec<(bool, Value)> = Vec::new();
    for (key, init) in [("initContainers", true), ("containers", false)] {
        for c in pod
            .pointer(&format!("/spec/{key}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            specs.push((init, c.clone()));
        }
    }
    for (init, c) in &specs {
        let (init, c) = (*init, c);
        let mut mounts: Vec<(String, PathBuf)> = list(c, "/volumeMounts")
            .filter_map(|m| {
                let dir = dirs.get(m.get("name")?.as_str()?)?;
                let sub = m.get("subPath").and_then(Value::as_str).unwrap_or_default();
                Some((
                    m.get("mountPath")?.as_str()?.to_string(),
                    if sub.is_empty() {
                        dir.clone()
                    } else {
                        dir.join(sub)
                    },
                ))
            })
            .collect();
        if sa {
            mounts.push((SA_MOUNT.into(), rt.dir.join("serviceaccount")));
        }
        mounts.sort_by_key(|(mp, _)| std::cmp::Reverse(mp.len()));
        let name = c
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let mut run = ContainerRun {
            spec: c.clone(),
            image: c
                .get("image")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            images: shared.opts.images.clone(),
            env: Vec::new(),
            mounts,
            isolation: Isolation::default(),
            workdir: rt.dir.clone(),
            log: rt.logs.join(format!("{name}.log")),
        };
        let read_only = c
            .pointer("/securityContext/readOnlyRootFilesystem")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let writable: Vec<PathBuf> = run
            .mounts
            .iter()
            .filter(|(mp, _)| mp != SA_MOUNT)
            .map(|(_, dir)| dir.clone())
            .collect();
        let user = user_of(&shared.opts.images, pod, c);
        run.isolation = Isolation::new(read_only, &writable, user, rt.cgroup.as_deref());
        if read_only && !run.isolation.enforced() {
            tracing::warn!(
                "{}/{} container {name}: readOnlyRootFilesystem is not enforced (the kubelet does not run as root)",
                rt.ns,
                rt.name
            );
        }
        run.env = container_env(shared, rt, pod, c).await?;
        if let Some(w) = c.get("workingDir").and_then(Value::as_str) {
            run.workdir = PathBuf::from(run.rewrite(w));
        }
        runs.push((init, Arc::new(run)));
    }
    for (_, run) in runs.iter().filter(|(init, _)| *init) {
        let code = container_loop(shared.clone(), rt.clone(), run.clone(), &policy, true).await;
        if rt.terminate.is_cancelled() {
            return Ok(());
        }
        if code != Some(0) {
            return Err(format!("init container {} failed", run.spec["name"]));
        }
    }
    *rt.initialized.lock().unwrap_or_else(|p| p.into_inner()) = true;
    *rt.phase.lock().unwrap_or_else(|p| p.into_inner()) = "Running";
    rt.dirty.notify_one();
    let loops: Vec<_> = runs
        .iter()
        .filter(|(init, _)| !*init)
        .map(|(_, run)| {
            let (shared, rt, run, policy) =
                (shared.clone(), rt.clone(), run.clone(), policy.clone());
            tokio::spawn(async move { container_loop(shared, rt, run, &policy, false).await })
        })
        .collect();
    let codes = futures::future::join_all(loops).await;
    sync.abort();
    if !rt.terminate.is_cancelled() {
        let ok = codes.iter().all(|c| matches!(c, Ok(Some(0))));
        *rt.phase.lock().unwrap_or_else(|p| p.into_inner()) =
            if ok { "Succeeded" } else { "Failed" };
        rt.dirty.notify_one();
    }
    Ok(())
}

/// Runs one container under the restart policy (init containers until they succeed); returns
/// the last exit code, or `None` when stopped by the pod's termination.
async fn container_loop(
    shared: Arc<Shared>,
    rt: Arc<PodRt>,
    run: Arc<ContainerRun>,
    policy: &str,
    init: bool,
) -> Option<i32> {
    let name = run.spec["name"].as_str().unwrap_or_default().to_string();
    let mut backoff = shared.opts.backoff_initial;
    loop {
        let code = run_once(&shared, &rt, &run, &name).await?;
        let restart = match policy {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => !init || code != 0,
        };
        if !restart {
            return Some(code);
        }
        rt.with_container(&name, |c| {
            c.state = json!({"waiting": {"reason": "CrashLoopBackOff",
                "message": format!("back-off {backoff:?} restarting failed container={name} pod={}", rt.name)}});
        });
        shared
            .event(
                &rt,
                "Warning",
                "BackOff",
                &format!(
                    "Back-off restarting failed container {name} in pod {}_{}",
                    rt.name, rt.ns
                ),
            )
            .await;
        tokio::select! {
            _ = rt.terminate.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(shared.opts.backoff_max);
        rt.with_container(&name, |c| c.restart_count += 1);
    }
}

/// Starts the process, probes it, and waits for it to exit (returning its code) or for the pod's
/// termination (stopping it gracefully, returning `None`).
async fn run_once(
    shared: &Arc<Shared>,
    rt: &Arc<PodRt>,
    run: &Arc<ContainerRun>,
    name: &str,
) -> Option<i32> {
    let spawned = run
        .command(
            &strs(run.spec.get("command")),
            Some(&strs(run.spec.get("args"))),
        )
        .and_then(|mut cmd| {
            let (out, err) = run.log_files().map_err(|e| e.to_string())?;
            cmd.stdout(out)
                .stderr(err)
                .process_group(0)
                .kill_on_drop(true);
            cmd.spawn()
                .map_err(|e| format!("starting container {name}: {e}"))
        });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            rt.with_container(name, |c| {
                c.state = json!({"waiting": {"reason": "CreateContainerError", "message": e}})
            });
            shared.event(rt, "Warning", "Failed", &e).await;
            return Some(128);
        }
    };
    let pid = child.id().map(|p| p as i32);
    let started_at = now();
    rt.with_container(name, |c| {
        c.pid = pid;
        c.state = json!({"running": {"startedAt": started_at}});
    });
    shared
        .event(
            rt,
            "Normal",
            "Started",
            &format!("Started container {name}"),
        )
        .await;
    let probes = CancellationToken::new();
    tokio::spawn(probe_container(
        shared.clone(),
        rt.clone(),
        run.clone(),
        name.to_string(),
        probes.clone(),
    ));
    let _stop_probes = probes.drop_guard();
    let status = tokio::select! {
        s = child.wait() => s.ok(),
        _ = rt.terminate.cancelled() => {
            stop_container(shared, rt, run, name, &mut child).await;
            None
        }
    };
    let code = status.map(exit_code);
    let finished = now();
    let reason = match code {
        Some(0) => "Completed",
        _ => "Error",
    };
    rt.with_container(name, |c| {
        c.pid = None;
        c.ready = false;
        c.started = false;
        let term = json!({"terminated": {"exitCode": code.unwrap_or(137), "reason": reason,
            "startedAt": started_at, "finishedAt": finished}});
        c.last_state = term.clone();
        c.state = term;
    });
    code
}

/// preStop, then SIGTERM, then SIGKILL once the grace period (preStop's time included) is over.
async fn stop_container(
    shared: &Arc<Shared>,
    rt: &Arc<PodRt>,
    run: &ContainerRun,
    name: &str,
    child: &mut tokio::process::Child,
) {
    let grace = *rt.grace.lock().unwrap_or_else(|p| p.into_inner());
    let deadline = Instant::now() + grace;
    if rt.gone.is_cancelled() {
        let _ = child.start_kill();
    }
    if let Some(hook) = run.spec.pointer("/lifecycle/preStop")
        && let Err(e) = run_handler(hook, rt.ip, run, grace).await
    {
        shared
            .event(
                rt,
                "Warning",
                "FailedPreStopHook",
                &format!("PreStopHook failed: {e}"),
            )
            .await;
    }
    shared
        .event(
            rt,
            "Normal",
            "Killing",
            &format!("Stopping container {name}"),
        )
        .await;
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));
    if let Some(p) = pgid {
        let _ = killpg(p, Signal::SIGTERM);
    }
    // A preStop that used the whole grace period still leaves the process 2 s, as kubelet does.
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(2));
    tokio::select! {
        _ = child.wait() => {}
        _ = tokio::time::sleep(wait) => {}
        _ = rt.gone.cancelled() => {}
    }
    if let Some(p) = pgid {
        let _ = killpg(p, Signal::SIGKILL);
    }
    let _ = child.wait().await;
}

/// Startup, then liveness and readiness probes of one running container.
async fn probe_container(
    shared: Arc<Shared>,
    rt: Arc<PodRt>,
    run: Arc<ContainerRun>,
    name: String,
    stop: CancellationToken,
) {
    let startup = ProbeSpec::from(run.spec.get("startupProbe"));
    let liveness = ProbeSpec::from(run.spec.get("livenessProbe"));
    let readiness = ProbeSpec::from(run.spec.get("readinessProbe"));
    let fail = |kind: &'static str| {
        let (shared, rt) = (shared.clone(), rt.clone());
        move |msg: String| {
            let (shared, rt) = (shared.clone(), rt.clone());
            async move {
                shared
                    .event(
                        &rt,
                        "Warning",
                        "Unhealthy",
                        &format!("{kind} probe failed: {msg}"),
                    )
                    .await;
            }
        }
    };
    let body = async {
        if let Some(p) = &startup {
            let ok = probe_loop(&rt, &run, p, true, fail("Startup"), |_| {}).await;
            if !ok {
                restart_unhealthy(&shared, &rt, &name, "startup").await;
                return;
            }
        }
        rt.with_container(&name, |c| c.started = true);
        let readiness_task = async {
            match &readiness {
                Some(p) => {
                    probe_loop(&rt, &run, p, false, fail("Readiness"), |ready| {
                        rt.with_container(&name, |c| c.ready = ready);
                    })
                    .await;
                }
                None => {
                    rt.with_container(&name, |c| c.ready = true);
                    std::future::pending::<()>().await;
                }
            }
        };
        let liveness_task = async {
            if let Some(p) = &liveness {
                if !probe_loop(&rt, &run, p, true, fail("Liveness"), |_| {}).await {
                    restart_unhealthy(&shared, &rt, &name, "liveness").await;
                }
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::join!(readiness_task, liveness_task);
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = rt.terminate.cancelled() => {}
        _ = body => {}
    }
}

/// Probes every period, recording an Unhealthy event for each failure. A startup probe returns
/// true at its first success; a `decisive` probe (startup, liveness) returns false once failures
/// reach the threshold; readiness runs on, reporting transitions through `on_change`.
async fn probe_loop<F, Fut>(
    rt: &PodRt,
    run: &ContainerRun,
    p: &ProbeSpec,
    decisive: bool,
    on_fail: F,
    on_change: impl Fn(bool),
) -> bool
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let startup = run
        .spec
        .get("startupProbe")
        .map(|s| s == &p.handler)
        .unwrap_or(false);
    tokio::time::sleep(p.initial_delay).await;
    let (mut successes, mut failures) = (0u32, 0u32);
    let mut ready = false;
    loop {
        match run_handler(&p.handler, rt.ip, run, p.timeout).await {
            Ok(()) => {
                failures = 0;
                successes += 1;
                if startup {
                    return true;
                }
                if successes >= p.success_threshold && !ready {
                    ready = true;
                    on_change(true);
                }
            }
            Err(msg) => {
                successes = 0;
                failures += 1;
                on_fail(msg).await;
                if failures >= p.failure_threshold {
                    if decisive {
                        return false;
                    }
                    if ready {
                        ready = false;
                        on_change(false);
                    }
                }
            }
        }
        tokio::time::sleep(p.period).await;
    }
}

/// A failed startup or liveness probe: the container is killed (and restarted by its loop).
async fn restart_unhealthy(shared: &Shared, rt: &PodRt, name: &str, kind: &str) {
    shared
        .event(
            rt,
            "Normal",
            "Killing",
            &format!("Container {name} failed {kind} probe, will be restarted"),
        )
        .await;
    rt.signal(Some(name), Signal::SIGTERM);
    // Probe-triggered kills get a short grace here (Kubernetes uses the pod's grace period).
    tokio::time::sleep(Duration::from_secs(2)).await;
    rt.signal(Some(name), Signal::SIGKILL);
}

/// The pod's status as the kubelet reports it.
fn status_of(rt: &PodRt, conds: &mut HashMap<&'static str, (bool, String)>) -> Value {
    let cs = rt
        .containers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let initialized = *rt.initialized.lock().unwrap_or_else(|p| p.into_inner());
    let terminating = rt.terminate.is_cancelled();
    let containers_ready = cs.iter().filter(|c| !c.init).all(|c| c.ready) && !terminating;
    let mut set = |t: &'static str, v: bool| {
        let e = conds.entry(t).or_insert_with(|| (v, now()));
        if e.0 != v {
            *e = (v, now());
        }
        let e = e.clone();
        json!({"type": t, "status": if e.0 { "True" } else { "False" }, "lastTransitionTime": e.1})
    };
    let conditions = vec![
        set("PodScheduled", true),
        set("Initialized", initialized),
        set("ContainersReady", containers_ready),
        set("Ready", containers_ready),
    ];
    let statuses = |init: bool| -> Vec<Value> {
        cs.iter()
            .filter(|c| c.init == init)
            .map(|c| {
                let mut v = json!({"name": c.name, "image": c.image, "imageID": "", "ready": c.ready,
                    "started": c.started, "restartCount": c.restart_count, "state": c.state});
                if !c.last_state.is_null() {
                    v["lastState"] = c.last_state.clone();
                }
                v
            })
            .collect()
    };
    let phase = *rt.phase.lock().unwrap_or_else(|p| p.into_inner());
    json!({"phase": phase, "podIP": rt.ip.to_string(), "podIPs": [{"ip": rt.ip.to_string()}],
        "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "conditions": conditions,
        "initContainerStatuses": statuses(true), "containerStatuses": statuses(false), "qosClass": "BestEffort"})
}

/// Writes the status whenever it changes (and the node is ready), until the pod is gone.
async fn status_writer(shared: Arc<Shared>, rt: Arc<PodRt>) {
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &rt.ns);
    let mut conds = HashMap::new();
    let mut last = Value::Null;
    let start = now();
    loop {
        let gone = rt.gone.is_cancelled();
        if shared.node_ready(&rt.node) {
            let mut status = status_of(&rt, &mut conds);
            status["startTime"] = json!(start);
            if status != last {
                let patch = Patch::Merge(json!({"status": status}));
                match api
                    .patch_status(&rt.name, &PatchParams::default(), &patch)
                    .await
                {
                    Ok(_) => last = status,
                    Err(e) => tracing::debug!("status of {}/{}: {e}", rt.ns, rt.name),
                }
            }
        } else {
            last = Value::Null;
        }
        if gone {
            return;
        }
        tokio::select! {
            _ = rt.dirty.notified() => {}
            _ = rt.gone.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// A new pod's runtime state.
pub(crate) fn new_pod(shared: &Shared, pod: &Value, host: u8, proxy: ApiProxy) -> PodRt {
    let s = |p: &str| {
        pod.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (ns, name, uid) = (
        s("/metadata/namespace"),
        s("/metadata/name"),
        s("/metadata/uid"),
    );
    let containers = [("initContainers", true), ("containers", false)]
        .iter()
        .flat_map(|(k, init)| {
            pod.pointer(&format!("/spec/{k}"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(move |c| ContainerState {
                    name: c
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .into(),
                    image: c
                        .get("image")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .into(),
                    init: *init,
                    pid: None,
                    restart_count: 0,
                    started: false,
                    ready: false,
                    state: json!({"waiting": {"reason": "ContainerCreating"}}),
                    last_state: Value::Null,
                })
        })
        .collect();
    let dir = shared.root.join("pods").join(&uid);
    let logs = shared.root.join("logs").join(format!("{ns}_{name}_{uid}"));
    let cgroup = shared
        .peers
        .as_ref()
        .ok()
        .and_then(|p| match p.add_pod(&uid) {
            Ok(procs) => Some(procs),
            Err(e) => {
                tracing::warn!("{ns}/{name}: no cgroup of its own: {e}");
                None
            }
        });
    PodRt {
        cgroup,
        node: s("/spec/nodeName"),
        ip: shared.subnet.ip(host),
        host,
        dir,
        logs,
        proxy,
        terminate: CancellationToken::new(),
        grace: Mutex::new(Duration::from_secs(30)),
        gone: CancellationToken::new(),
        containers: Mutex::new(containers),
        initialized: Mutex::new(false),
        phase: Mutex::new("Pending"),
        dirty: Notify::new(),
        taken: Instant::now(),
        ns,
        name,
        uid,
    }
}

/// Events the kubelet records for a pod (`source.component: kubelet`).
pub(crate) async fn record_event(
    client: &kube::Client,
    rt: &PodRt,
    type_: &str,
    reason: &str,
    message: &str,
) {
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &rt.ns);
    let t = now();
    let ev = json!({"apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": format!("{}.", rt.name)},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": rt.name, "namespace": rt.ns, "uid": rt.uid},
        "reason": reason, "message": message, "type": type_, "count": 1,
        "firstTimestamp": t, "lastTimestamp": t,
        "source": {"component": "kubelet", "host": rt.node}, "reportingComponent": "kubelet", "reportingInstance": rt.node});
    match serde_json::from_value(ev) {
        Ok(ev) => {
            if let Err(e) = api.create(&PostParams::default(), &ev).await {
                tracing::debug!("event {reason} for {}/{}: {e}", rt.ns, rt.name);
            }
        }
        Err(e) => tracing::debug!("event {reason}: {e}"),
    }
}

/// Every process below `root` (children, their children, …), from /proc.
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            // /proc/<pid>/stat: "pid (comm) state ppid …"; comm may hold spaces and parens.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_env_references() {
        let env = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "x".to_string()),
        ];
        assert_eq!(expand("$(A)-$(B)-$(C)-$$(A)", &env), "1-x-$(C)-$(A)");
    }

    #[test]
    fn rewrites_mount_paths_at_boundaries_only() {
        let run = ContainerRun {
            spec: json!({}),
            image: String::new(),
            images: ImageTable::new(),
            env: Vec::new(),
            mounts: vec![("/data".into(), PathBuf::from("/tmp/x/pvc"))],
            isolation: Isolation::default(),
            workdir: PathBuf::from("/"),
            log: PathBuf::from("/dev/null"),
        };
        assert_eq!(run.rewrite("--dir=/data/pg"), "--dir=/tmp/x/pvc/pg");
        assert_eq!(run.rewrite("/data"), "/tmp/x/pvc");
        assert_eq!(run.rewrite("/database /x/data"), "/database /x/data");
    }
}
