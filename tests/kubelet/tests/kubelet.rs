//! The kubelet through kube-rs (and kubectl): pods that really run, on their own loopback IPs,
//! with volumes, probes, restarts, graceful termination, evictions and faults.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Event, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Api;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, EvictParams, Patch, PatchParams, PostParams,
};
use pgpilot_kube_testserver::{KubeTestServer, TestNamespace, kubectl_args};
use pgpilot_test_kubelet::wait::is_ready;
use pgpilot_test_kubelet::{
    ApiFault, ImageTable, Kubelet, KubeletOptions, PeerFault, server_options,
};
use serde_json::{Value, json};

const APP: &str = env!("CARGO_BIN_EXE_kubelet-test-app");
const WAIT: Duration = Duration::from_secs(60);

struct Cluster {
    client: kube::Client,
    ns: TestNamespace,
    kubelet: Kubelet,
    server: KubeTestServer,
}

impl Cluster {
    async fn start(prefix: &str) -> Self {
        Self::start_with(prefix, ImageTable::new().binary("kubelet-test-app:*", APP)).await
    }

    async fn start_with(prefix: &str, images: ImageTable) -> Self {
        let opts = KubeletOptions {
            images,
            ..KubeletOptions::default()
        };
        Self::start_with_options(prefix, opts).await
    }

    async fn start_with_options(prefix: &str, opts: KubeletOptions) -> Self {
        let server = KubeTestServer::start_with(server_options())
            .await
            .expect("server");
        let kubelet = Kubelet::start(&server, opts).await.expect("kubelet");
        let client = server.client();
        let ns = TestNamespace::create(&client, prefix)
            .await
            .expect("namespace");
        // The test app reads its own pod as the namespace's `default` ServiceAccount, and the
        // test API server enforces RBAC for service accounts.
        let rbac = "rbac.authorization.k8s.io/v1";
        for (plural, obj) in [
            (
                "roles",
                json!({"apiVersion": rbac, "kind": "Role", "metadata": {"name": "read-pods"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}),
            ),
            (
                "rolebindings",
                json!({"apiVersion": rbac, "kind": "RoleBinding", "metadata": {"name": "read-pods"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-pods"},
                "subjects": [{"kind": "ServiceAccount", "name": "default"}]}),
            ),
        ] {
            let ar = ApiResource {
                group: "rbac.authorization.k8s.io".into(),
                version: "v1".into(),
                api_version: rbac.into(),
                kind: obj["kind"].as_str().unwrap_or_default().into(),
                plural: plural.into(),
            };
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns.name(), &ar);
            let obj: DynamicObject = serde_json::from_value(obj).expect("an object");
            api.create(&PostParams::default(), &obj)
                .await
                .expect("the test app's RBAC");
        }
        Self {
            client,
            ns,
            kubelet,
            server,
        }
    }

    /// A cluster running StatefulSet `web` of the test app with `replicas` ready pods.
    async fn with_web(prefix: &str, replicas: u32) -> Self {
        let c = Self::start(prefix).await;
        c.create::<StatefulSet>(statefulset("web", replicas, app_container(json!([]))))
            .await;
        for i in 0..replicas {
            c.ready_pod(&format!("web-{i}"), None).await;
        }
        c
    }

    fn ns(&self) -> &str {
        self.ns.name()
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), self.ns())
    }

    async fn create<K>(&self, v: Value) -> K
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + serde::Serialize,
        <K as kube::Resource>::DynamicType: Default,
    {
        let obj: K = serde_json::from_value(v).expect("a valid object");
        self.api::<K>()
            .create(&PostParams::default(), &obj)
            .await
            .expect("create")
    }

    /// kubectl in the test namespace; its stdout. tokio's Command, because the API server runs
    /// on this test's runtime and must keep serving.
    async fn kubectl(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new(
            std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into()),
        )
        .args(kubectl_args(Some(&self.server)))
        .args(["-n", self.ns()])
        .args(args)
        .output()
        .await
        .expect("kubectl runs");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn pod(&self, name: &str) -> Option<Pod> {
        self.api::<Pod>().get_opt(name).await.expect("get pod")
    }

    /// The pod once it is Ready (a new incarnation when `not_uid` is given).
    async fn ready_pod(&self, name: &str, not_uid: Option<&str>) -> Pod {
        eventually(&format!("pod {name} ready"), || async {
            self.pod(name)
                .await
                .filter(|p| is_ready(p) && p.metadata.uid.as_deref() != not_uid)
        })
        .await
    }

    async fn get(&self, ip: Ipv4Addr, path: &str) -> Result<String, String> {
        http(ip, "GET", path, "").await
    }

    async fn events(&self, reason: &str) -> Vec<Event> {
        pgpilot_test_kubelet::wait::events(&self.client, self.ns(), reason).await
    }
}

fn pod_ip(p: &Pod) -> Ipv4Addr {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .expect("a pod IP")
}

/// Polls `f` until it gives a value; panics naming `what` after [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    pgpilot_test_kubelet::wait::eventually(what, WAIT, f).await
}

/// A plain HTTP/1.1 request to a pod; the body on 2xx, else the status line and the body.
async fn http(ip: Ipv4Addr, method: &str, path: &str, body: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect((ip, 8080))
        .await
        .map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    let (head, rest) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    if head.starts_with("HTTP/1.1 2") {
        Ok(rest.to_string())
    } else {
        // The status line, then the body (the error a test app route reports).
        let status = head.lines().next().unwrap_or_default();
        Err(format!("{status} {rest}").trim_end().to_string())
    }
}

/// The test app's container: pod IP, name and a data dir from the env, an HTTP readiness probe.
fn app_container(extra_env: Value) -> Value {
    let mut env = json!([
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "APP_LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "GREETING", "value": "hello from $(POD_NAME)"},
    ]);
    env.as_array_mut()
        .expect("array")
        .extend(extra_env.as_array().cloned().unwrap_or_default());
    json!({"name": "app", "image": "kubelet-test-app:1", "env": env,
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1},
        "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1, "failureThreshold": 5}})
}

fn statefulset(name: &str, replicas: u32, container: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name},
        "spec": {"replicas": replicas, "serviceName": name, "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"terminationGracePeriodSeconds": 5, "containers": [container]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}})
}

fn with_data_mount(mut c: Value) -> Value {
    c["volumeMounts"] = json!([{"name": "data", "mountPath": "/var/lib/app"}]);
    c["env"]
        .as_array_mut()
        .expect("env")
        .push(json!({"name": "DATA_DIR", "value": "/var/lib/app"}));
    c
}

async fn service(c: &Cluster, name: &str) {
    c.create::<Service>(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))
        .await;
}

#[tokio::test]
async fn statefulset_of_three_pods_runs_and_is_ready() {
    let c = Cluster::start("sts").await;
    service(&c, "web").await;
    c.create::<StatefulSet>(statefulset(
        "web",
        3,
        with_data_mount(app_container(json!([]))),
    ))
    .await;
    let sts: Api<StatefulSet> = c.api();
    eventually("3 ready replicas", || async {
        let s = sts.get("web").await.ok()?;
        (s.status?.ready_replicas == Some(3)).then_some(())
    })
    .await;

    let mut ips = Vec::new();
    for i in 0..3 {
        let name = format!("web-{i}");
        let p = c.pod(&name).await.expect("pod");
        let ip = pod_ip(&p);
        assert_eq!(ip.octets()[0..2], [127, 0], "pod IPs are on loopback");
        assert_eq!(
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some("node-0")
        );
        // The process serves on its own pod IP, with env from the downward API and $(VAR) expansion.
        assert_eq!(
            c.get(ip, "/env/POD_NAME").await.as_deref(),
            Ok(name.as_str())
        );
        assert_eq!(c.get(ip, "/env/APP_LABEL").await.as_deref(), Ok("web"));
        assert_eq!(
            c.get(ip, "/env/GREETING").await,
            Ok(format!("hello from {name}"))
        );
        // And reaches the API server with kube-rs' Client::try_default().
        eventually(&format!("{name} reads its pod through the API"), || async {
            let api: Value = serde_json::from_str(&c.get(ip, "/api").await.ok()?).ok()?;
            (api["ok"].as_u64()? > 0).then_some(())
        })
        .await;
        let status = p.status.expect("status");
        let cs = &status.container_statuses.expect("container statuses")[0];
        assert!(cs.ready && cs.state.as_ref().and_then(|s| s.running.as_ref()).is_some());
        ips.push(ip);
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3, "every pod has its own IP");
    let endpoints = eventually("3 ready endpoints", || async {
        let e = c.kubelet.service_ips(c.ns(), "web").await.ok()?;
        (e.len() == 3).then_some(e)
    })
    .await;
    assert_eq!(endpoints, ips);
    assert!(
        !c.events("Started").await.is_empty(),
        "Started events are recorded"
    );

    let phases = c
        .kubectl(&["get", "pods", "-o", "jsonpath={.items[*].status.phase}"])
        .await;
    assert_eq!(phases, "Running Running Running");
    // kubectl logs: the API server proxies pods/log to the kubelet.
    let log = c.kubectl(&["logs", "web-1"]).await;
    assert!(
        log.contains(&format!(
            "listening on {}:8080",
            pod_ip(&c.pod("web-1").await.expect("pod"))
        )),
        "{log}"
    );
    c.ns.cleanup().await.expect("cleanup");
}

#[tokio::test]
async fn pvc_data_survives_pod_deletion() {
    let c = Cluster::start("pvc").await;
    c.create::<StatefulSet>(statefulset(
        "db",
        1,
        with_data_mount(app_container(json!([]))),
    ))
    .await;
    let first = c.ready_pod("db-0", None).await;
    let ip = pod_ip(&first);
    http(ip, "PUT", "/files/DATA_DIR/hello", "kept")
        .await
        .expect("write");
    // An emptyDir-like file in the pod dir would go; the claim's directory stays.
    c.api::<Pod>()
        .delete("db-0", &DeleteParams::default())
        .await
        .expect("delete");
    let second = c.ready_pod("db-0", first.metadata.uid.as_deref()).await;
    assert_eq!(
        c.get(pod_ip(&second), "/files/DATA_DIR/hello")
            .await
            .as_deref(),
        Ok("kept")
    );
    assert!(
        c.kubelet
            .pvc_dir(c.ns(), "data-db-0")
            .join("hello")
            .exists()
    );
    c.ns.cleanup().await.expect("cleanup");
}

#[tokio::test]
async fn read_only_root_filesystem_and_run_as_user_are_enforced() {
    // uid 999 in the image is this machine's `postgres` user, as for the agents' pods.
    let images = ImageTable::new()
        .binary("kubelet-test-app:*", APP)
        .user(999, "postgres");
    let c = Cluster::start_with("rofs", images).await;
    let postgres = nix::unistd::User::from_name("postgres")
        .expect("passwd")
        .expect("a postgres user");
    // A directory outside every volume that anyone may write: only the read-only root stops it.
    let outside = tempfile::tempdir().expect("tempdir");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod");
    let mut container = with_data_mount(app_container(json!([
        {"name": "OUTSIDE_DIR", "value": outside.path().to_str().expect("utf-8")},
        {"name": "SCRATCH_DIR", "value": "/scratch"},
    ])));
    container["volumeMounts"]
        .as_array_mut()
        .expect("mounts")
        .push(json!({"name": "scratch", "mountPath": "/scratch"}));
    container["securityContext"] = json!({"readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}});
    let mut sts = statefulset("ro", 1, container);
    sts["spec"]["template"]["spec"]["securityContext"] =
        json!({"runAsUser": 999, "runAsGroup": 999, "fsGroup": 999, "runAsNonRoot": true});
    sts["spec"]["template"]["spec"]["volumes"] = json!([{"name": "scratch", "emptyDir": {}}]);
    c.create::<StatefulSet>(sts).await;
    let ip = pod_ip(&c.ready_pod("ro-0", None).await);
    // The volumes are writable, by the mapped user.
    for var in ["DATA_DIR", "SCRATCH_DIR"] {
        http(ip, "PUT", &format!("/files/{var}/f"), "x")
            .await
            .unwrap_or_else(|e| panic!("writing into {var}: {e}"));
    }
    let meta = std::fs::metadata(c.kubelet.pvc_dir(c.ns(), "data-ro-0").join("f")).expect("f");
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(
        (meta.uid(), meta.gid()),
        (postgres.uid.as_raw(), postgres.gid.as_raw())
    );
    // Anywhere else is the image's read-only filesystem.
    let refused = http(ip, "PUT", "/files/OUTSIDE_DIR/f", "x")
        .await
        .expect_err("a write outside the volumes");
    assert!(refused.contains("Read-only file system"), "{refused}");
    assert!(!outside.path().join("f").exists());
    // The host's view is unchanged.
    std::fs::write(outside.path().join("host"), "x").expect("the host still writes there");
    c.ns.cleanup().await.expect("cleanup");
}

#[tokio::test]
async fn secret_update_reaches_the_mounted_file() {
    let c = Cluster::start("secret").await;
    c.create::<Secret>(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
        "stringData": {"password": "one"}}),
    )
    .await;
    let mut container = app_container(json!([
        {"name": "SECRET_DIR", "value": "/etc/creds"},
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
    ]));
    container["volumeMounts"] = json!([{"name": "creds", "mountPath": "/etc/creds"}]);
    c.create::<Pod>(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reader", "labels": {"app": "reader"}},
        "spec": {"containers": [container], "volumes": [{"name": "creds", "secret": {"secretName": "creds"}}]}}))
        .await;
    let ip = pod_ip(&c.ready_pod("reader", None).await);
    assert_eq!(
        c.get(ip, "/files/SECRET_DIR/password").await.as_deref(),
        Ok("one")
    );
    assert_eq!(c.get(ip, "/env/PASSWORD").await.as_deref(), Ok("one"));
    c.api::<Secret>()
        .patch(
            "creds",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"password": "two"}})),
        )
        .await
        .expect("update secret");
    eventually("the new password in the mounted file", || async {
        (c.get(ip, "/files/SECRET_DIR/password").await.as_deref() == Ok("two")).then_some(())
    })
    .await;
    // Env is fixed at container start, as in Kubernetes.
    assert_eq!(c.get(ip, "/env/PASSWORD").await.as_deref(), Ok("one"));
    c.ns.cleanup().await.expect("cleanup");
}

#[tokio::test]
async fn failing_readiness_drops_the_pod_from_service_endpoints() {
    let c = Cluster::with_web("ready", 2).await;
    service(&c, "web").await;
    let p0 = pod_ip(&c.ready_pod("web-0", None).await);
    let p1 = pod_ip(&c.ready_pod("web-1", None).await);
    let mut both = vec![p0, p1];
    both.sort();
    eventually("both pods behind the service", || async {
        (c.kubelet.service_ips(c.ns(), "web").await.ok()? == both).then_some(())
    })
    .await;

    http(p0, "POST", "/ready/false", "")
        .await
        .expect("make web-0 unready");
    eventually("web-0 unready", || async {
        c.pod("web-0").await.filter(|p| !is_ready(p))
    })
    .await;
    eventually("only web-1 behind the service", || async {
        (c.kubelet.service_ips(c.ns(), "web").await.ok()? == vec![p1]).then_some(())
    })
    .await;
    assert!(
        c.events("Unhealthy").await.iter().any(|e| e
            .message
            .as_deref()
            .is_some_and(|m| m.contains("Readiness probe failed"))),
        "an Unhealthy event names the readiness probe"
    );
    // Still running: readiness failures do not restart.
    let restarts = c
        .pod("web-0")
        .await
        .and_then(|p| p.status?.container_statuses)
        .map(|s| s[0].restart_count);
    assert_eq!(restarts, Some(0));

    http(p0, "POST", "/ready/true", "")
        .await
        .expect("make web-0 ready");
    eventually("both pods behind the service again", || async {
        (c.kubelet.service_ips(c.ns(), "web").await.ok()? == both).then_some(())
    })
    .await;
    c.ns.cleanup().await.expect("cleanup");
}

#[tokio::test]
async fn prestop_runs_before_sigterm_within_the_grace_period() {
    let c = Cluster::start("prestop").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("marker");
    let mut container = app_container(json!([
        {"name": "MARKER_FILE", "value": marker.to_string_lossy()},
        {"name": "IGNORE_SIGTERM", "value": "1"},
    ]));
    // The hook outlasts the 3 s grace period: it is cut short, then SIGTERM, then SIGKILL.
    container["lifecycle"] = json!({"preStop": {"exec": {"command": ["sh", "-c",
        "echo prestop-start >> \"$MARKER_FILE\"; sleep 30; echo prestop-end >> \"$MARKER_FILE\""]}}});
    c.create::<Pod>(
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "slow"},
        "spec": {"terminationGracePeriodSeconds": 3, "containers": [container]}}),
    )
    .await;
    c.ready_pod("slow", None).await;
    let pid: i32 = std::fs::read_to_string(&marker)
        .expect("marker")
        .lines()
        .find_map(|l| {
            l.strip_prefix("started pid=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("the app's pid");

    c.api::<Pod>()
        .delete("slow", &DeleteParams::default())
        .await
        .expect("delete");
    let deleting = c
        .pod("slow")
        .await
        .expect("a bound pod stays while it terminates");
    assert_eq!(deleting.metadata.deletion_grace_period_seconds, Some(3));
    eventually("the pod object removed", || async {
        c.pod("slow").await.is_none().then_some(())
    })
    .await;

    // The object went only once the process was gone.
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    assert!(
        !alive,
        "the container process is gone when the pod object is"
    );
    let lines: Vec<String> = std::fs::read_to_string(&marker)
        .expect("marker")
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        lines,
        ["started", "prestop-start", "sigterm"],
        "preStop first, cut at the grace period, then SIGTERM"
    );
    let log = c.kubelet.logs(c.ns(), "slow", "app");
    assert!(
        log.contains("got SIGTERM"),
        "the container log is kept: {log}"
    );
    assert!(!c.events("Killing").await.is_empty());
    c.ns.cleanup().await.expect("cleanup");
}

#[tokio::test]
async fn eviction_honours_the_disruption_budget() {
    let c = Cluster::with_web("evict", 2).await;
    c.create::<PodDisruptionBudget>(json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "web"}, "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}}))
        .await;
    // kube 5's default client retries 429 up to 15 times with growing back-off, which turns a
    // refused eviction into a long hang; a drain must see the refusal at once.
    let mut config = kube::Config::new(c.server.url().parse().expect("url"));
    config.default_retry = false;
    let pods: Api<Pod> = Api::namespaced(kube::Client::try_from(config).expect("client"), c.ns());
    match pods.evict("web-0", &EvictParams::default()).await {
        Err(kube::Error::Api(e)) => assert_eq!(
            (e.code, e.reason.as_str()),
            (429, "TooManyRequests"),
            "{e:?}"
        ),
        other => panic!("eviction should be refused, got {other:?}"),
    }
    let pdb: Api<PodDisruptionBudget> = c.api();
    let status = pdb
        .get("web")
        .await
        .expect("pdb")
        .status
        .expect("pdb status");
    assert_eq!(
        (
            status.disruptions_allowed,
            status.current_healthy,
            status.desired_healthy
        ),
        (Some(0), Some(2), Some(2))
    );

    pdb.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"minAvailable": 1}})),
    )
    .await
    .expect("relax the budget");
    let uid = c.pod("web-0").await.and_then(|p| p.metadata.uid);
    pods.evict("web-0", &EvictParams::default())
        .await
        .expect("eviction allowed");
    c.ready_pod("web-0", uid.as_deref()).await;
    c.ns.cleanup().await.expect("cleanup");
}

#[tokio::test]
async fn killed_container_restarts_with_backoff() {
    let c = Cluster::with_web("kill", 1).await;
    for round in 1..=2 {
        c.kubelet.kill(c.ns(), "web-0", None).expect("kill -9");
        let p = eventually(&format!("restart {round}"), || async {
            c.pod("web-0").await.filter(|p| {
                is_ready(p)
                    && p.status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .is_some_and(|cs| cs[0].restart_count == round)
            })
        })
        .await;
        let cs = &p
            .status
            .expect("status")
            .container_statuses
            .expect("statuses")[0];
        let last = cs
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .expect("last state");
        assert_eq!(last.exit_code, 137, "SIGKILL shows as 128+9");
    }
    assert!(
        c.events("BackOff").await.len() >= 2,
        "each restart waits out a back-off"
    );
    c.ns.cleanup().await.expect("cleanup");
}

#[tokio::test]
async fn cut_api_connection_times_out_and_recovers() {
    let c = Cluster::with_web("cut", 1).await;
    let ip = pod_ip(&c.ready_pod("web-0", None).await);
    let api = || async { serde_json::from_str::<Value>(&c.get(ip, "/api").await.ok()?).ok() };
    eventually("API calls succeed", || async {
        (api().await?["ok"].as_u64()? > 0).then_some(())
    })
    .await;

    c.kubelet
        .set_api_fault(c.ns(), "web-0", ApiFault::Blackhole)
        .expect("cut");
    let cut = eventually("a timed-out API call", || async {
        let a = api().await?;
        a["lastError"].as_str()?.contains("timed out").then_some(a)
    })
    .await;
    // The kubelet itself still reaches the API: the pod stays Ready.
    assert!(is_ready(&c.pod("web-0").await.expect("pod")));

    c.kubelet
        .set_api_fault(c.ns(), "web-0", ApiFault::None)
        .expect("restore");
    let ok_at_cut = cut["ok"].as_u64().expect("ok count");
    eventually("API calls succeed again", || async {
        (api().await?["ok"].as_u64()? > ok_at_cut).then_some(())
    })
    .await;
    c.ns.cleanup().await.expect("cleanup");
}

/// A pod cut off its peers: its connections to the other pods and theirs to it are refused (or
/// hang, blackholed), both ways, while the other pods still reach each other, the test and the
/// kubelet's probes still reach it (it stays Ready) and it still reaches the API server. Lifted,
/// everything flows again.
#[tokio::test]
async fn cut_off_peers_both_ways_and_restored() {
    let c = Cluster::with_web("peers", 3).await;
    let mut ips: Vec<Ipv4Addr> = Vec::new();
    for i in 0..3 {
        ips.push(pod_ip(&c.ready_pod(&format!("web-{i}"), None).await));
    }
    let ips = &ips;
    let dial = |from: usize, to: usize| {
        let (from, to) = (ips[from], ips[to]);
        async move { http(from, "GET", &format!("/dial/{to}:8080"), "").await }
    };
    let all_pairs_reach = || async {
        for (a, b) in [(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0)] {
            if dial(a, b).await.is_err() {
                return None;
            }
        }
        Some(())
    };
    eventually("every pod reaches every other", all_pairs_reach).await;
    let api_ok = || async {
        serde_json::from_str::<Value>(&c.get(ips[0], "/api").await.ok()?).ok()?["ok"].as_u64()
    };

    for (fault, expect) in [
        (PeerFault::Refuse, "Connection refused"),
        (PeerFault::Blackhole, "timed out"),
    ] {
        c.kubelet
            .set_peer_fault(c.ns(), "web-0", fault)
            .expect("cut web-0 off its peers");
        for (a, b) in [(0, 1), (0, 2), (1, 0), (2, 0)] {
            let err = dial(a, b)
                .await
                .expect_err(&format!("web-{a} -> web-{b} must fail under {fault:?}"));
            assert!(
                err.contains(expect),
                "web-{a} -> web-{b} ({fault:?}): {err}"
            );
        }
        // The peers still reach each other, and web-0 still reaches itself.
        dial(1, 2).await.expect("web-1 -> web-2");
        dial(2, 1).await.expect("web-2 -> web-1");
        dial(0, 0).await.expect("web-0 -> itself");
        // The test reaches it (these requests), the kubelet's probes too, and it reaches the
        // API server.
        let before = api_ok().await.expect("api counters");
        eventually("web-0 still reaches the API server", || async {
            (api_ok().await? > before).then_some(())
        })
        .await;
        assert!(is_ready(&c.pod("web-0").await.expect("pod")));
    }

    c.kubelet
        .set_peer_fault(c.ns(), "web-0", PeerFault::None)
        .expect("restore");
    eventually("every pod reaches every other again", all_pairs_reach).await;
    c.ns.cleanup().await.expect("cleanup");
}

/// Three pods of real PostgreSQL 15, run as the `postgres` user with data on their claims, each
/// listening on its own pod IP at 5432. Prints how long the set took to become Ready (never
/// asserted; see docs/kubelet.md for the figure on a 2-core machine).
#[tokio::test]
async fn statefulset_of_three_postgres_pods() {
    let bin = std::path::Path::new("/usr/lib/postgresql/15/bin");
    assert!(
        bin.join("postgres").exists(),
        "PostgreSQL 15 is missing: apt-get install -y postgresql-15 (scripts/install-test-deps.sh)"
    );
    let c = Cluster::start_with(
        "pg",
        ImageTable::new().directory("postgres:15*", bin, Some("postgres")),
    )
    .await;
    let (client, ns) = (c.client.clone(), c.ns());
    let uid = nix::unistd::User::from_name("postgres")
        .expect("users")
        .expect("a postgres user")
        .uid
        .as_raw();
    let pgdata = "/var/lib/postgresql/data/pgdata";
    let env = json!([
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "PGDATA", "value": pgdata},
    ]);
    let mounts = json!([{"name": "data", "mountPath": "/var/lib/postgresql/data"}]);
    let sts = json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "pg"},
        "spec": {"replicas": 3, "serviceName": "pg", "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "pg"}},
            "template": {"metadata": {"labels": {"app": "pg"}},
                "spec": {"securityContext": {"runAsUser": uid, "fsGroup": uid},
                    "initContainers": [{"name": "initdb", "image": "postgres:15", "env": env, "volumeMounts": mounts,
                        "command": ["sh", "-c", format!("test -f {pgdata}/PG_VERSION || initdb -D {pgdata} -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 --no-sync")]}],
                    "containers": [{"name": "postgres", "image": "postgres:15", "env": env, "volumeMounts": mounts,
                        "args": ["-D", pgdata, "-c", "listen_addresses=$(POD_IP)", "-c", "unix_socket_directories=", "-p", "5432"],
                        "readinessProbe": {"exec": {"command": ["pg_isready", "-h", "$(POD_IP)", "-p", "5432"]}, "periodSeconds": 1}}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}});
    let started = Instant::now();
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(sts).expect("sts"),
    )
    .await
    .expect("create");
    eventually("3 ready PostgreSQL pods", || async {
        (api.get("pg").await.ok()?.status?.ready_replicas == Some(3)).then_some(())
    })
    .await;
    eprintln!("3 PostgreSQL pods Ready in {:.1?}", started.elapsed());
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for i in 0..3 {
        let ip = pod_ip(&pods.get(&format!("pg-{i}")).await.expect("pod"));
        let out = tokio::process::Command::new(bin.join("psql"))
            .args([
                "-h",
                &ip.to_string(),
                "-U",
                "postgres",
                "-At",
                "-c",
                "select current_setting('listen_addresses')",
            ])
            .output()
            .await
            .expect("psql runs");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            ip.to_string(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    c.ns.cleanup().await.expect("cleanup");
}

#[tokio::test]
async fn frozen_pod_and_not_ready_node_make_the_pod_unready() {
    let c = Cluster::with_web("freeze", 1).await;

    // SIGSTOP: the probes time out, the pod turns unready; SIGCONT brings it back.
    c.kubelet.freeze(c.ns(), "web-0", true).expect("freeze");
    eventually("frozen pod unready", || async {
        c.pod("web-0").await.filter(|p| !is_ready(p))
    })
    .await;
    c.kubelet.freeze(c.ns(), "web-0", false).expect("thaw");
    c.ready_pod("web-0", None).await;

    // A node gone NotReady: the Node says so and its pods are unready, the process keeps running.
    c.kubelet
        .set_node_ready("node-0", false)
        .await
        .expect("node down");
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(c.client.clone());
    let node = nodes.get("node-0").await.expect("node");
    let ready = node
        .status
        .and_then(|s| s.conditions)
        .and_then(|cs| cs.into_iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status);
    assert_eq!(ready.as_deref(), Some("Unknown"));
    let p = c.pod("web-0").await.expect("pod");
    assert!(!is_ready(&p));
    assert_eq!(c.get(pod_ip(&p), "/healthz").await.as_deref(), Ok("ok"));
    c.kubelet
        .set_node_ready("node-0", true)
        .await
        .expect("node back");
    c.ready_pod("web-0", None).await;
    c.ns.cleanup().await.expect("cleanup");
}

#[tokio::test]
async fn kubectl_drain_moves_pods_within_the_budget() {
    let opts = KubeletOptions {
        nodes: vec!["node-0".into(), "node-1".into()],
        images: ImageTable::new().binary("kubelet-test-app:*", APP),
        ..KubeletOptions::default()
    };
    let c = Cluster::start_with_options("drain", opts).await;
    c.create::<StatefulSet>(statefulset("web", 2, app_container(json!([]))))
        .await;
    c.create::<PodDisruptionBudget>(json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "web"}, "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}}))
        .await;
    let node_of = |p: &Pod| p.spec.as_ref().and_then(|s| s.node_name.clone());
    let mut on_node0 = Vec::new();
    for i in 0..2 {
        let p = c.ready_pod(&format!("web-{i}"), None).await;
        if node_of(&p).as_deref() == Some("node-0") {
            on_node0.push((format!("web-{i}"), p.metadata.uid.clone()));
        }
    }
    assert!(!on_node0.is_empty(), "pods are spread over both nodes");

    c.kubectl(&[
        "drain",
        "node-0",
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--timeout=60s",
    ])
    .await;
    for (name, uid) in on_node0 {
        let p = c.ready_pod(&name, uid.as_deref()).await;
        assert_eq!(node_of(&p).as_deref(), Some("node-1"), "{name} moved");
    }
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(c.client.clone());
    let cordoned = nodes
        .get("node-0")
        .await
        .expect("node")
        .spec
        .and_then(|s| s.unschedulable);
    assert_eq!(cordoned, Some(true));
    c.ns.cleanup().await.expect("cleanup");
}
