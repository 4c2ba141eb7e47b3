//! "helm install" as a user does it, end to end: the chart rendered (scripts/chart.sh, Helm's
//! Go SDK) and applied with kubectl to the test API server; its operator Deployment's two pods
//! run by the test kubelet from this workspace's binary, as the chart's non-root user; then the
//! `test:` blocks of docs/user-guide.md run in order with kubectl, and the guide's first
//! cluster becomes Ready with real PostgreSQL. Every metric the chart's alerts and dashboard
//! name is checked against what the running operator and agents export.
//!
//! With `KUBECONFIG` set, against that cluster instead: the images are the chart's defaults
//! unless `PGPILOT_TEST_OPERATOR_IMAGE` / `PGPILOT_TEST_AGENT_IMAGE` name others, and the pods
//! must be routable from here (see operator/tests/operator.rs).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use pgpilot_common::crd::PostgresCluster;
use pgpilot_kube_testserver::{KubeTestServer, TestNamespace};
use pgpilot_test_kubelet::{ImageTable, Kubelet, start_cluster};
use serde_json::json;

const BIN: &str = "/usr/lib/postgresql/15/bin";
const WAIT: Duration = Duration::from_secs(180);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// One fenced block of the guide marked `test:<name>`.
#[derive(Debug)]
struct Block {
    name: String,
    lang: String,
    /// `file=<name>` for a block that is a file the next commands use.
    file: Option<String>,
    /// `expect:<name>`: lines (or parts of lines) the `test:<name>` commands printed.
    expect: bool,
    body: String,
}

/// The guide's `test:` blocks, in order.
fn guide_blocks(text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let mut words = info.split_whitespace();
        let lang = words.next().unwrap_or_default().to_string();
        let mut name = None;
        let mut file = None;
        let mut expect = false;
        for w in words {
            if let Some(n) = w.strip_prefix("test:") {
                name = Some(n.to_string());
            } else if let Some(n) = w.strip_prefix("expect:") {
                name = Some(n.to_string());
                expect = true;
            } else if let Some(f) = w.strip_prefix("file=") {
                file = Some(f.to_string());
            }
        }
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        if let Some(name) = name {
            out.push(Block {
                name,
                lang,
                file,
                expect,
                body: body.join("\n") + "\n",
            });
        }
    }
    out
}

struct Env {
    client: Client,
    ns: TestNamespace,
    dir: tempfile::TempDir,
    /// A kubeconfig whose current context is the test namespace: the guide's commands name
    /// no namespace, as a user's would not.
    kubeconfig: PathBuf,
    _kubelet: Option<Kubelet>,
    _server: Option<KubeTestServer>,
}

impl Env {
    async fn start() -> Env {
        support::init_tracing();
        let dir = tempfile::tempdir().expect("temp dir");
        let real = std::env::var_os("KUBECONFIG").filter(|k| !k.is_empty());
        let (client, server, kubelet, source) = match real {
            Some(path) => {
                pgpilot_kube_testserver::install_crypto_provider();
                let client = Client::try_default()
                    .await
                    .expect("the cluster of KUBECONFIG");
                (client, None, None, PathBuf::from(path))
            }
            None => {
                // The image holds the binary where the chart's non-root user can run it (this
                // clone may sit in a directory only root can enter).
                let image = dir.path().join("operator-image");
                std::fs::create_dir_all(&image).expect("image dir");
                let op = image.join("pgpilot-operator");
                std::fs::copy(env!("CARGO_BIN_EXE_pgpilot-operator"), &op)
                    .expect("copy the operator");
                use std::os::unix::fs::PermissionsExt as _;
                for p in [dir.path(), image.as_path()] {
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
                        .expect("chmod");
                }
                let images = ImageTable::new()
                    .binary("ghcr.io/pgpilot/pgpilot-operator:*", op)
                    .binary(
                        "ghcr.io/pgpilot/pgpilot-agent:*",
                        support::built("pgpilot-agent"),
                    )
                    .directory("postgres:*", BIN, None)
                    // The postgres images' uid 999 is this machine's postgres user.
                    .user(999, "postgres");
                let (server, kubelet) = start_cluster(images)
                    .await
                    .expect("test API server and kubelet");
                let path = server.kubeconfig_path().to_path_buf();
                (server.client(), Some(server), Some(kubelet), path)
            }
        };
        let ns = TestNamespace::create(&client, "chart")
            .await
            .expect("namespace");
        let kubeconfig = dir.path().join("kubeconfig");
        let flat = std::process::Command::new(kubectl())
            .env("KUBECONFIG", &source)
            .args(["config", "view", "--flatten", "--minify"])
            .output()
            .expect("kubectl config view");
        assert!(
            flat.status.success(),
            "{}",
            String::from_utf8_lossy(&flat.stderr)
        );
        std::fs::write(&kubeconfig, &flat.stdout).expect("kubeconfig");
        let env = Env {
            client,
            ns,
            dir,
            kubeconfig,
            _kubelet: kubelet,
            _server: server,
        };
        env.sh(&format!(
            "kubectl config set-context --current --namespace={}",
            env.ns.name()
        ))
        .await;
        env
    }

    /// Runs `script` with bash in the test's directory, kubectl pointed at the test namespace;
    /// panics with its output when it fails.
    async fn sh(&self, script: &str) -> String {
        let out = self.bash(&["-euo", "pipefail", "-c", script]).await;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            // What a user would look at next.
            let look = self
                .bash(&[
                    "-c",
                    "kubectl get pods -o wide --show-labels; kubectl get postgresclusters -o yaml",
                ])
                .await;
            panic!(
                "{script}\nfailed: {}\n{stdout}\n--- then:\n{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&look.stdout)
            );
        }
        stdout
    }

    /// bash with `args`, in the test's directory, kubectl pointed at the test namespace.
    async fn bash(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new("bash")
            .args(args)
            .current_dir(self.dir.path())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("PATH", path_with_kubectl())
            .output()
            .await
            .expect("bash")
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), self.ns.name())
    }
}

/// Every one of `items` appears in what kubectl printed.
fn assert_lists(printed: &str, items: &[&str]) {
    for item in items {
        assert!(printed.contains(item), "{item} not in\n{printed}");
    }
}

fn kubectl() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

/// PATH with the directory of `$KUBECTL` first, when set.
fn path_with_kubectl() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    match std::env::var("KUBECTL").ok().as_deref().map(Path::new) {
        Some(k) if k.is_absolute() => format!("{}:{path}", k.parent().unwrap().display()),
        _ => path,
    }
}

/// Metric names an alert or dashboard expression reads: every `pgpilot_…` identifier, with
/// a histogram's `_bucket`/`_count`/`_sum` taken back to the histogram.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("pgpilot_") {
        let start = i + at;
        let boundary = start == 0
            || !(bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'_'
                || bytes[start - 1] == b'.');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        // `pgpilot_io_cluster` and friends are labels (from the pods' pgpilot.io/* labels).
        let name = &text[start..end];
        if boundary && !name.starts_with("pgpilot_io_") {
            out.insert(name.to_string());
        }
        i = end;
    }
    out
}

/// Metric families in a Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// `/metrics` as Prometheus scrapes it: the operator over HTTP, the agents over HTTPS without
/// verifying their certificate (the chart's PodMonitor, `monitoring.podMonitor.scheme`).
async fn scrape(ip: &str, port: u16, scheme: &str) -> String {
    let url = format!("{scheme}://{ip}:{port}/metrics");
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .expect("a client");
    http.get(&url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .expect("metrics body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installs_the_operator_and_the_guide_works() {
    assert!(
        Path::new(BIN).join("postgres").exists(),
        "PostgreSQL 15 is missing: scripts/install-test-deps.sh"
    );
    let env = Env::start().await;
    let ns = env.ns.name().to_string();

    // 1. helm install, as `helm template --include-crds | kubectl apply` does it. The
    //    operator watches the test's namespace only (the Role variant of its RBAC), so that
    //    on a shared cluster it leaves everything else alone.
    let mut values = json!({
        "operator": {"watchNamespace": ns, "drainTimeoutSeconds": 30},
        "agent": {"allowNetworks": ["127.0.0.0/8"]},
    });
    for (var, key) in [
        ("PGPILOT_TEST_OPERATOR_IMAGE", "operator"),
        ("PGPILOT_TEST_AGENT_IMAGE", "agent"),
    ] {
        if let Ok(image) = std::env::var(var) {
            let (repo, tag) = image.rsplit_once(':').expect("image with a tag");
            values[key]["image"] = json!({"repository": repo, "tag": tag});
        }
    }
    if std::env::var_os("KUBECONFIG").is_some() {
        values["agent"]["allowNetworks"] = json!(["0.0.0.0/0"]);
    }
    let chart = root().join("scripts/chart.sh");
    let rendered = env
        .sh(&format!(
            "{} render pgpilot {ns} --set-json '{values}' > pgpilot.yaml && kubectl apply -f pgpilot.yaml",
            chart.display()
        ))
        .await;
    assert_lists(
        &rendered,
        &[
            "customresourcedefinition.apiextensions.k8s.io/postgresclusters.pgpilot.io",
            "deployment.apps/pgpilot created",
            "serviceaccount/pgpilot created",
            "role.rbac.authorization.k8s.io/pgpilot created",
            "service/pgpilot-metrics created",
        ],
    );
    let status = env
        .sh("kubectl rollout status deployment/pgpilot --timeout=120s")
        .await;
    assert!(status.contains("successfully rolled out"), "{status}");

    // Two operator pods, running as the chart's non-root user; one of them leads.
    let operators = env
        .pods()
        .list(&ListParams::default().labels("app.kubernetes.io/name=pgpilot-operator"))
        .await
        .expect("operator pods");
    let names: BTreeSet<String> = operators.items.iter().map(|p| p.name_any()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), &ns);
    let leader = pgpilot_test_kubelet::wait::eventually("an operator leads", WAIT, || async {
        leases
            .get_opt("pgpilot-operator")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    })
    .await;
    assert!(
        names.contains(&leader),
        "leader {leader} is not one of {names:?}"
    );

    // 2. The guide, block by block, as one shell session (exported variables carry over),
    //    in a directory holding the repository's charts/ as a user's clone would. Its S3
    //    section runs against s3s-fs on 127.0.0.1, unless AWS_ENDPOINT names another store.
    std::os::unix::fs::symlink(root().join("charts"), env.dir.path().join("charts"))
        .expect("charts link");
    let _s3 = if std::env::var_os("AWS_ENDPOINT").is_none() {
        let s3 = pgpilot_test_support::s3::S3Server::start().expect("s3s-fs");
        s3.create_bucket("orders-backups").expect("bucket");
        let exports = format!(
            "export AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={} AWS_ENDPOINT={} AWS_ALLOW_HTTP=true\n",
            s3.access_key, s3.secret_key, s3.endpoint
        );
        std::fs::write(env.dir.path().join(SESSION), exports).expect("session env");
        Some(s3)
    } else {
        None
    };
    let guide = std::fs::read_to_string(root().join("docs/user-guide.md")).expect("the guide");
    let blocks = guide_blocks(&guide);
    for name in [
        "first-cluster",
        "connect",
        "switchover",
        "backups",
        "pitr",
        "rollouts",
    ] {
        assert!(
            blocks.iter().any(|b| b.name == name),
            "no test:{name} block in the guide"
        );
    }
    let mut outputs: Vec<(String, String)> = Vec::new();
    for b in &blocks {
        match (&b.file, b.lang.as_str()) {
            (Some(file), _) => {
                std::fs::write(env.dir.path().join(file), &b.body).expect("guide file")
            }
            (None, "sh") => {
                let script = format!(
                    "[ ! -f {SESSION} ] || source {SESSION}\n{}export -p > {SESSION}\n",
                    b.body
                );
                let out = env.sh(&script).await;
                eprintln!("--- guide test:{}\n{}{out}", b.name, b.body);
                outputs.push((b.name.clone(), out));
            }
            (None, "text") if b.expect => {
                let printed: String = outputs
                    .iter()
                    .filter(|(n, _)| *n == b.name)
                    .map(|(_, o)| o.as_str())
                    .collect();
                for line in b.body.lines().filter(|l| !l.trim().is_empty()) {
                    assert!(
                        printed.lines().any(|l| l.contains(line.trim_end())),
                        "the guide says test:{} prints {line:?}; it printed:\n{printed}",
                        b.name
                    );
                }
            }
            (None, other) => panic!(
                "guide block test:{} in {other} is neither a file=, a sh block nor an expect:",
                b.name
            ),
        }
    }

    // What the guide promised along the way is checked by its expect: blocks; here what a
    // user sees of it all: the first cluster Ready, and `kubectl get` listing its parts.
    let clusters: Api<PostgresCluster> = Api::namespaced(env.client.clone(), &ns);
    let pc = clusters.get("orders").await.expect("orders");
    let ready = pc
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone());
    assert_eq!(ready.as_deref(), Some("True"), "{:?}", pc.status);
    let get = &outputs
        .iter()
        .find(|(n, _)| n == "first-cluster")
        .expect("first-cluster ran")
        .1;
    assert_lists(
        get,
        &[
            "postgrescluster.pgpilot.io/orders",
            "statefulset.apps/orders-shard-0",
            "pod/orders-shard-0-0",
            "pod/orders-shard-0-1",
            "service/orders-shard-0-rw",
        ],
    );

    // 3. Every metric the alerts and the dashboard read is exported by the operator that leads
    //    now or by the agents (the guide gave `orders` a backup schedule, so the operator's
    //    backup series exist).
    let leader = leases
        .get("pgpilot-operator")
        .await
        .expect("the operator's Lease")
        .spec
        .and_then(|s| s.holder_identity)
        .expect("a holder");
    let leader_ip = pod_ip(&env, &leader).await;
    let wanted: BTreeSet<String> = [
        root().join("charts/pgpilot/files/alerts.yaml"),
        root().join("charts/pgpilot/files/dashboard.json"),
    ]
    .iter()
    .flat_map(|f| metric_names(&std::fs::read_to_string(f).expect("chart file")))
    .collect();
    let mut have = exported(&scrape(&leader_ip, 8080, "http").await);
    for p in env
        .pods()
        .list(&ListParams::default().labels("pgpilot.io/cluster=orders"))
        .await
        .expect("agent pods")
    {
        have.extend(exported(
            &scrape(&pod_ip(&env, &p.name_any()).await, 8008, "https").await,
        ));
    }
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|m| {
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| m.strip_suffix(s))
                .unwrap_or(m);
            !have.contains(m.as_str()) && !have.contains(base)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the chart's alerts or dashboard read metrics nothing exports: {missing:?}"
    );
    assert!(wanted.len() > 20, "{wanted:?}");
    eprintln!(
        "{} metric names of alerts and dashboard, all exported",
        wanted.len()
    );

    // The chart's operator pods and their agents ran under the chart's RBAC (the test server
    // enforces it): nothing refused, and the grants support/rbac.rs assigns to this test used.
    if let Some(server) = &env._server {
        let denied = server.denied();
        assert!(
            denied.is_empty(),
            "RBAC refused requests (charts/pgpilot/templates/rbac.yaml or pgpilot_common::rbac lack them):\n{}",
            denied.join("\n")
        );
        support::rbac::check_used(
            server,
            support::OPERATOR_SA,
            "the_chart_installs_the_operator_and_the_guide_works",
        );
    }

    // No Secret value in an Event, an object, a log (the operator pods' too) or a pod's
    // command line.
    let logs = env
        ._kubelet
        .as_ref()
        .map(|k| k.namespace_logs(env.ns.name()))
        .unwrap_or_default();
    support::assert_no_secret_leaks(&env.client, env.ns.name(), &logs).await;

    for c in ["orders", "orders-restored"] {
        let _ = clusters.delete(c, &Default::default()).await;
    }
    env.ns.cleanup().await.expect("cleanup");
}

/// The guide session's exported variables, between blocks.
const SESSION: &str = ".guide-session";

async fn pod_ip(env: &Env, pod: &str) -> String {
    env.pods()
        .get(pod)
        .await
        .expect("pod")
        .status
        .and_then(|s| s.pod_ip)
        .unwrap_or_else(|| panic!("{pod} has no IP"))
}

#[test]
fn guide_blocks_are_found_with_their_files() {
    let text = "x\n```yaml test:a file=a.yaml\nk: v\n```\n```sh\nnot run\n```\n```sh test:b\necho hi\n```\n```text expect:b\nhi\n```\n";
    let b = guide_blocks(text);
    assert_eq!(b.len(), 3);
    assert!(b[2].expect && !b[1].expect && b[2].name == "b");
    assert_eq!(
        (b[0].name.as_str(), b[0].file.as_deref(), b[0].body.as_str()),
        ("a", Some("a.yaml"), "k: v\n")
    );
    assert_eq!(
        (b[1].name.as_str(), b[1].lang.as_str(), b[1].body.as_str()),
        ("b", "sh", "echo hi\n")
    );
}

#[test]
fn metric_names_skip_labels_and_keep_histograms() {
    let names = metric_names(
        r#"sum by (pgpilot_io_shard) (rate(pgpilot_wal_archive_duration_seconds_bucket[5m])) > pgpilot_x and on(pod) foo_pgpilot_y"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["pgpilot_wal_archive_duration_seconds_bucket", "pgpilot_x"]
    );
}
