//! The operator end to end: the reconciler (in this process) against the test API server, its
//! pods run by the test kubelet as real pgpilot-agents with PostgreSQL 15 (docs/operator.md).
//! With `KUBECONFIG` set, against that cluster instead (no server or kubelet started here): its
//! nodes run the pods from `PGPILOT_TEST_AGENT_IMAGE` and `postgres:15`; the tests reach the pods
//! by their IPs and the backup test's S3 server (s3s-fs) on this host's 127.0.0.1, so the
//! cluster's pods must be routable from here and reach it (the test kubelet's `examples/serve`
//! does both).
//! What a user sees: the cluster's status and conditions, its Services, and the rows in each
//! shard's Postgres.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{CustomResourceExt, ResourceExt};
use pgpilot_common::crd::{PostgresBackup, PostgresCluster};
use pgpilot_kube_testserver::{KubeTestServer, TestNamespace};
use pgpilot_operator::controller::{self, Ctx};
use pgpilot_operator::leader::{self, Election};
use pgpilot_operator::metrics::Metrics;
use pgpilot_operator::objects::Options;
use pgpilot_test_kubelet::{ImageTable, Kubelet, start_cluster};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const BIN: &str = "/usr/lib/postgresql/15/bin";
const WAIT: Duration = Duration::from_secs(120);

async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    pgpilot_test_kubelet::wait::eventually(what, WAIT, f).await
}

struct Env {
    client: kube::Client,
    ns: TestNamespace,
    /// `None` with `KUBECONFIG`: that cluster runs the pods.
    kubelet: Option<Kubelet>,
    kubeconfig: std::path::PathBuf,
    metrics: Metrics,
    /// With leader election: each replica's metrics and task.
    replicas: Vec<(Metrics, tokio::task::JoinHandle<Result<(), String>>)>,
    _server: Checked,
}

/// The test server, which on drop checks that RBAC refused no request of the operator or of
/// an agent (code may only log a 403, or retry it, so a test could pass with a Role that lacks
/// a verb), and that the test used every grant support/rbac.rs assigns to it.
struct Checked(Option<KubeTestServer>);

impl Drop for Checked {
    fn drop(&mut self) {
        let Some(server) = self.0.as_ref() else {
            return;
        };
        if std::thread::panicking() {
            return;
        }
        let denied = server.denied();
        assert!(
            denied.is_empty(),
            "RBAC refused requests (the chart's rules in charts/pgpilot/templates/rbac.yaml or the agents' in pgpilot_common::rbac lack them):\n{}",
            denied.join("\n")
        );
        // libtest runs each test on a thread named after it, where its Env drops.
        let thread = std::thread::current();
        let test = thread.name().unwrap_or_default();
        assert!(
            !test.is_empty() && test != "main",
            "an Env dropped off its test's thread ({test:?}): the RBAC use check needs the test's name"
        );
        let test = test.rsplit("::").next().unwrap_or(test);
        support::rbac::check_used(server, support::OPERATOR_SA, test);
    }
}

/// The table of grants in support/rbac.rs against the chart's rules and the agents' Role.
#[test]
fn every_grant_of_the_chart_and_the_agents_role_is_listed_with_its_test() {
    let chart = support::chart_rules();
    support::rbac::check_table(
        &[&chart.operator, &chart.leader_election],
        &pgpilot_common::rbac::agent_role_rules(),
    );
}

/// The chart's RBAC for its operator ServiceAccount in `ns`: its Role and leader-election Role
/// and their RoleBindings, as `helm install` with `operator.watchNamespace` creates them.
async fn grant_chart_rbac(client: &kube::Client, ns: &str) {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let rules = support::chart_rules();
    let sa = support::OPERATOR_SA;
    let pp = PostParams::default();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let account = serde_json::from_value(json!({"metadata": {"name": sa}})).expect("an account");
    accounts
        .create(&pp, &account)
        .await
        .expect("the operator's ServiceAccount");
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    for (name, rules) in [
        (sa.to_string(), rules.operator),
        (format!("{sa}-leader-election"), rules.leader_election),
    ] {
        let role = serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules}))
            .expect("a Role");
        roles.create(&pp, &role).await.expect("the chart's Role");
        let binding = serde_json::from_value(json!({"metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]}))
        .expect("a RoleBinding");
        bindings
            .create(&pp, &binding)
            .await
            .expect("the chart's RoleBinding");
    }
}

impl Env {
    /// One operator (the controller alone).
    async fn start(prefix: &str) -> Env {
        Self::start_with(prefix, 0).await
    }

    /// With `elected` > 0: that many operator replicas competing for the leader Lease (short
    /// timings), instead of one controller; `usize::MAX`: no operator in this process.
    async fn start_with(prefix: &str, elected: usize) -> Env {
        support::init_tracing();
        assert!(
            std::path::Path::new(BIN).join("postgres").exists(),
            "PostgreSQL 15 is missing: scripts/install-test-deps.sh"
        );
        let real = std::env::var_os("KUBECONFIG").filter(|k| !k.is_empty());
        let (client, server, kubelet, kubeconfig) = match real {
            Some(path) => {
                pgpilot_kube_testserver::install_crypto_provider();
                let client = kube::Client::try_default()
                    .await
                    .expect("the cluster named by KUBECONFIG");
                (client, None, None, std::path::PathBuf::from(path))
            }
            None => {
                let images = ImageTable::new()
                    .binary("pgpilot/agent:*", support::built("pgpilot-agent"))
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
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in [PostgresCluster::crd(), PostgresBackup::crd()] {
            crds.patch(
                &crd.name_any(),
                &PatchParams::apply("pgpilot-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .expect("install the CRD");
        }
        let ns = TestNamespace::create(&client, prefix)
            .await
            .expect("namespace");
        // On the test server the operator runs as the chart's ServiceAccount with the chart's
        // rules (scoped to its namespace, as with `operator.watchNamespace`), which the server
        // enforces: every test here proves the chart grants what the operator calls.
        let operator = match &server {
            Some(server) => {
                grant_chart_rbac(&client, ns.name()).await;
                server.client_as(ns.name(), support::OPERATOR_SA)
            }
            None => client.clone(),
        };
        let metrics = Metrics::new();
        let env_or =
            |var: &str, default: &str| std::env::var(var).unwrap_or_else(|_| default.into());
        let opts = Options {
            agent_image: env_or("PGPILOT_TEST_AGENT_IMAGE", "pgpilot/agent:test"),
            pg_bin_dir: "/usr/lib/postgresql/{major}/bin".into(),
            allow_networks: env_or("PGPILOT_TEST_ALLOW_NETWORKS", "127.0.0.0/8")
                .split(',')
                .map(str::to_string)
                .collect(),
            drain_timeout_secs: 30,
            // Its own namespace only: with KUBECONFIG the tests share one API server, and each
            // test's operator must act on its own clusters (as one operator per cluster would).
            watch_namespace: Some(ns.name().to_string()),
            agent_cert_lifetime: Options::default().agent_cert_lifetime,
            postgres_uid: Options::default().postgres_uid,
        };
        let mut replicas = Vec::new();
        let elected = (elected != usize::MAX).then_some(elected);
        if elected == Some(0) {
            let ctx = Arc::new(Ctx::new(operator.clone(), opts.clone(), metrics.clone()));
            tokio::spawn(controller::run(ctx, CancellationToken::new()));
        }
        for i in 0..elected.unwrap_or(0) {
            let m = Metrics::new();
            let ctx = Arc::new(Ctx::new(operator.clone(), opts.clone(), m.clone()));
            let mut e = Election::new(ns.name(), &format!("operator-{i}"));
            e.duration = Duration::from_secs(4);
            e.renew = Duration::from_millis(500);
            e.deadline = Duration::from_secs(3);
            let c = operator.clone();
            let task = tokio::spawn(async move {
                leader::run(c, e, CancellationToken::new(), move |lost| {
                    controller::run(ctx, lost)
                })
                .await
            });
            replicas.push((m, task));
        }
        Env {
            client,
            ns,
            kubelet,
            kubeconfig,
            metrics,
            replicas,
            _server: Checked(server),
        }
    }

    fn clusters(&self) -> Api<PostgresCluster> {
        Api::namespaced(self.client.clone(), self.ns.name())
    }

    async fn create(&self, name: &str, spec: serde_json::Value) {
        let pc: PostgresCluster = serde_json::from_value(json!({
            "apiVersion": "pgpilot.io/v1alpha1", "kind": "PostgresCluster",
            "metadata": {"name": name}, "spec": spec}))
        .expect("a PostgresCluster");
        self.clusters()
            .create(&PostParams::default(), &pc)
            .await
            .expect("create");
    }

    /// The spec every test starts from: PostgreSQL 15, `shards` × `instances`, 1 Gi volumes,
    /// plus the fields of `extra`.
    fn spec(shards: u32, instances: u32, extra: serde_json::Value) -> serde_json::Value {
        let mut spec = json!({"postgresVersion": 15, "image": "postgres:15", "shards": shards,
            "instancesPerShard": instances, "storage": {"size": "1Gi"}});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        spec
    }

    /// Creates `name` from [`Env::spec`] and waits until it is Ready.
    async fn create_ready(
        &self,
        name: &str,
        shards: u32,
        instances: u32,
        extra: serde_json::Value,
    ) -> PostgresCluster {
        self.create(name, Self::spec(shards, instances, extra))
            .await;
        self.ready(name, "True").await
    }

    /// The cluster once its `Ready` condition has `status`.
    async fn ready(&self, name: &str, status: &str) -> PostgresCluster {
        eventually(&format!("{name} Ready={status}"), || async {
            let pc = self.clusters().get(name).await.ok()?;
            tracing::info!(st = ?pc.status, "status");
            (condition(&pc, "Ready")?.status == status).then_some(pc)
        })
        .await
    }

    /// A connection to the Postgres behind Service `svc` (its first endpoint) of `orders`.
    async fn sql(&self, svc: &str) -> tokio_postgres::Client {
        self.sql_of("orders", svc).await
    }

    /// A connection to the Postgres behind Service `svc` of `cluster`, as its superuser.
    async fn sql_of(&self, cluster: &str, svc: &str) -> tokio_postgres::Client {
        let password = self.superuser_password(cluster).await;
        eventually(&format!("a connection through {svc}"), || {
            connect_first(&self.client, self.ns.name(), cluster, svc, &password)
        })
        .await
    }

    async fn superuser_password(&self, cluster: &str) -> String {
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.client.clone(), self.ns.name());
        let s = secrets
            .get(&format!("{cluster}-secrets"))
            .await
            .expect("the generated Secret");
        let data = s.data.expect("data");
        String::from_utf8(data["superuser-password"].0.clone()).expect("utf-8")
    }

    fn writes(&self) -> u64 {
        self.metrics.writes.get()
    }
}

/// A cluster of 2 shards × 2 instances becomes Ready: each shard has one primary behind its rw
/// Service and one streaming replica; a write through each rw Service lands on that shard only;
/// a steady-state reconcile writes nothing; scaling to 3 instances adds a streaming replica; an
/// invalid spec gets its condition and no workload.
#[tokio::test]
async fn a_sharded_cluster_becomes_ready_serves_each_shard_and_scales() {
    let env = Env::start("operator").await;
    let pc = env
        .create_ready(
            "orders",
            2,
            2,
            json!({"parameters": {"max_connections": "50"}, "rollout": {"mode": "Manual"}}),
        )
        .await;
    let st = pc.status.expect("status");
    assert_eq!(st.shards.len(), 2);
    for s in &st.shards {
        assert_eq!((s.ready_instances, s.instances), (2, 2), "{s:?}");
        assert_eq!(s.phase, "Healthy");
        let primary = s.primary.as_deref().expect("a primary");
        assert!(primary.starts_with(&format!("orders-{}-", s.name)), "{s:?}");
    }

    // Each shard's rw Service reaches its own primary; a row written there stays in the shard.
    for shard in ["shard-0", "shard-1"] {
        let db = env.sql(&format!("orders-{shard}-rw")).await;
        db.batch_execute(&format!(
            "CREATE TABLE t (shard text); INSERT INTO t VALUES ('{shard}');"
        ))
        .await
        .unwrap_or_else(|e| panic!("write through orders-{shard}-rw: {e}"));
        let max: String = db
            .query_one("SHOW max_connections", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(max, "50", "spec.parameters reach Postgres");
    }
    for shard in ["shard-0", "shard-1"] {
        let ro = env.sql(&format!("orders-{shard}-ro")).await;
        let rows: Vec<String> = eventually(&format!("the row on {shard}'s replica"), || async {
            let r = ro.query("SELECT shard FROM t", &[]).await.ok()?;
            let v: Vec<String> = r.iter().map(|r| r.get(0)).collect();
            (!v.is_empty()).then_some(v)
        })
        .await;
        assert_eq!(rows, [shard.to_string()], "{shard} holds only its own row");
        let recovering: bool = ro
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(recovering, "the ro Service reaches a replica");
    }

    // Steady state: a reconcile (forced by an annotation) writes nothing. The status may still
    // be settling (a probe flips, a lag is first reported): a write is then legitimate, so the
    // touch is repeated until the cluster is quiet, within a few tries.
    let reconciles = || env.metrics.reconciles.with_label_values(&["orders"]).get();
    let mut quiet = false;
    for i in 0..5 {
        let before = env.writes();
        let count = reconciles();
        let touch = json!({"metadata": {"annotations": {"test/touch": i.to_string()}}});
        env.clusters()
            .patch("orders", &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .unwrap();
        eventually("a reconcile after the touch", || async {
            (reconciles() > count).then_some(())
        })
        .await;
        if env.writes() == before {
            quiet = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(quiet, "a steady-state reconcile writes nothing");

    tls_is_issued_enforced_and_renewed(&env).await;
    postgres_is_tls_only_unprivileged_and_read_only(&env).await;

    // Scale 2 → 3: a third instance per shard, streaming.
    let scale = json!({"spec": {"instancesPerShard": 3}});
    env.clusters()
        .patch("orders", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    let pc = eventually("3 ready instances per shard", || async {
        let pc = env.clusters().get("orders").await.ok()?;
        let st = pc.status.as_ref()?;
        (st.shards.iter().all(|s| s.ready_instances == 3)
            && st.observed_generation == pc.metadata.generation)
            .then_some(pc)
    })
    .await;
    let sets: Api<StatefulSet> = Api::namespaced(env.client.clone(), env.ns.name());
    let sts = sets.get("orders-shard-0").await.unwrap();
    assert_eq!(sts.spec.replicas, Some(3));
    assert_eq!(condition(&pc, "Ready").unwrap().status, "True");
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(env.client.clone(), env.ns.name());
    let third = pods
        .get("orders-shard-0-2")
        .await
        .expect("the third pod")
        .status
        .and_then(|s| s.pod_ip)
        .expect("its IP");
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(third.to_string())
        .port(5432)
        .user("postgres")
        .password(env.superuser_password("orders").await)
        .dbname("postgres");
    let c = pg_connect(&env.client, env.ns.name(), "orders", cfg)
        .await
        .expect("connect");
    let rows: Vec<String> = c
        .query("SELECT shard FROM t", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["shard-0"], "the new replica cloned shard-0");

    // Parameters changed in the spec: one the agents apply by a reload, one that needs a
    // restart and is reported as pending per shard. The restart is a new revision's rollout,
    // which (Manual mode) waits for its release (docs/rollouts.md).
    let params = json!({"spec": {"parameters": {"max_connections": "60", "work_mem": "7MB"}}});
    env.clusters()
        .patch("orders", &PatchParams::default(), &Patch::Merge(&params))
        .await
        .unwrap();
    let db = env.sql("orders-shard-1-rw").await;
    eventually("work_mem reloaded on shard-1's primary", || async {
        let v: String = db.query_one("SHOW work_mem", &[]).await.ok()?.get(0);
        (v == "7MB").then_some(())
    })
    .await;
    eventually(
        "max_connections pending a restart on every shard",
        || async {
            let pc = env.clusters().get("orders").await.ok()?;
            let st = pc.status?;
            st.shards
                .iter()
                .all(|s| s.pending_restart == ["max_connections"])
                .then_some(())
        },
    )
    .await;
    eventually("the restart planned, waiting for its release", || async {
        let pc = env.clusters().get("orders").await.ok()?;
        (pc.status?.rollout?.phase == "WaitingForRelease").then_some(())
    })
    .await;

    // An invalid spec: a condition that names it, an Event, no workload.
    env.create(
        "broken",
        json!({"postgresVersion": 9, "shards": 1, "storage": {"size": "lots"}}),
    )
    .await;
    let pc = env.ready("broken", "False").await;
    let ready = condition(&pc, "Ready").unwrap();
    assert_eq!(ready.reason, "InvalidSpec");
    for words in ["spec.postgresVersion 9", "spec.storage.size \"lots\""] {
        assert!(ready.message.contains(words), "{words}: {}", ready.message);
    }
    assert!(sets.get_opt("broken-shard-0").await.unwrap().is_none());
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), env.ns.name());
    let invalid = eventually("an InvalidSpec Event on the cluster", || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("InvalidSpec")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")
        })
    })
    .await;
    assert!(
        invalid
            .note
            .unwrap_or_default()
            .contains("spec.postgresVersion 9"),
        "the Event says what is wrong"
    );

    // Nothing secret reached the Events, the objects, a log or a command line.
    let logs = env
        .kubelet
        .as_ref()
        .map(|k| k.namespace_logs(env.ns.name()))
        .unwrap_or_default();
    support::assert_no_secret_leaks(&env.client, env.ns.name(), &logs).await;
    env.ns.cleanup().await.expect("cleanup");
}

/// Writes Secret `secret` (type kubernetes.io/tls) with a certificate for `cluster`'s agents
/// from a CA of the test's own; returns that CA's PEM.
async fn own_tls_secret(env: &Env, cluster: &str, secret: &str) -> String {
    use pgpilot_common::tls::issue::{Validity, leaf, new_ca};
    let v = Validity::starting_now(Duration::from_secs(30 * 86400));
    let ca = new_ca("the test's own CA", v).unwrap();
    let name = pgpilot_operator::tls::server_name(cluster, env.ns.name());
    let cert = leaf(&ca, &[name], v).unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.client.clone(), env.ns.name());
    let body = serde_json::from_value(json!({"metadata": {"name": secret},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert.cert_pem, "tls.key": cert.key_pem, "ca.crt": ca.cert_pem}}))
    .unwrap();
    secrets.create(&PostParams::default(), &body).await.unwrap();
    ca.cert_pem
}

/// Every agent of `cluster` serves the certificate of Secret-mode TLS (verified against
/// `ca_pem` under the cluster's name), and the operator made no CA of its own.
async fn assert_serves_own_certificate(env: &Env, cluster: &str, ca_pem: &str) {
    let ns = env.ns.name();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(env.client.clone(), ns);
    assert!(
        secrets
            .get_opt(&format!("{cluster}-ca"))
            .await
            .unwrap()
            .is_none(),
        "mode secret: the operator keeps no CA"
    );
    let name = pgpilot_operator::tls::server_name(cluster, ns);
    let tls = pgpilot_common::tls::client_config(ca_pem.as_bytes(), &name, None).unwrap();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(env.client.clone(), ns);
    let list = pods
        .list(&kube::api::ListParams::default().labels(&format!("pgpilot.io/cluster={cluster}")))
        .await
        .unwrap();
    assert!(!list.items.is_empty());
    for pod in list.items {
        let ip = pod.status.and_then(|s| s.pod_ip).expect("a pod IP");
        let r = http
            .get(format!("https://{ip}:8008/healthz"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{ip}: {e:?}"));
        assert_eq!(r.status(), 200);
    }
}

/// Postgres serves the operator's certificate and takes TCP only over TLS, the replicas stream
/// over verified TLS, and everything in the pods runs as the image's postgres user on a
/// read-only root filesystem (the test kubelet enforces it: its `isolation` module).
async fn postgres_is_tls_only_unprivileged_and_read_only(env: &Env) {
    let db = env.sql("orders-shard-0-rw").await;
    let streaming_over_tls: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) \
             WHERE r.state = 'streaming' AND s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(streaming_over_tls, 1, "the replica streams over TLS");
    let ip = pgpilot_test_kubelet::service_ips(&env.client, env.ns.name(), "orders-shard-0-rw")
        .await
        .unwrap()[0];
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(ip.to_string())
        .port(5432)
        .user("postgres")
        .password(env.superuser_password("orders").await)
        .dbname("postgres");
    let plain = cfg.connect(tokio_postgres::NoTls).await.err();
    assert!(
        plain
            .as_ref()
            .is_some_and(|e| format!("{e:?}").contains("no encryption")),
        "{plain:?}"
    );
    if env.kubelet.is_some() {
        // The image's uid 999 is this machine's postgres user in the test kubelet.
        let status: String = db
            .query_one("SELECT pg_read_file('/proc/self/status')", &[])
            .await
            .unwrap()
            .get(0);
        let uid = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a postgres user")
            .uid;
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            line.split_whitespace()
                .skip(1)
                .all(|u| u == uid.to_string()),
            "Postgres runs as {line}"
        );
    }
    let write = db
        .batch_execute("COPY (SELECT 1) TO '/tmp/pgpilot-read-only-root-probe'")
        .await
        .err()
        .map(|e| format!("{e:?}"));
    assert!(
        write
            .as_ref()
            .is_some_and(|e| e.contains("Read-only file system")),
        "a write outside the volumes: {write:?}"
    );
}

/// `spec.tls` by default (mode `operator`): the cluster's CA and the agents' certificate in
/// Secrets; the agents speak only HTTPS on 8008 (the probes too), verified under the cluster's
/// DNS name; the operator's client certificate authenticates without a token; a certificate
/// near its end is renewed by the operator and picked up by every agent without a restart.
async fn tls_is_issued_enforced_and_renewed(env: &Env) {
    use k8s_openapi::api::core::v1::{Pod, Secret};
    use pgpilot_common::tls::{cert_info, certs, client_config, issue};
    let ns = env.ns.name();
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), ns);
    let data =
        |s: &Secret, key: &str| String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap();
    let ca_secret = secrets.get("orders-ca").await.expect("the cluster's CA");
    let ca = issue::Issued {
        cert_pem: data(&ca_secret, "ca.crt"),
        key_pem: data(&ca_secret, "ca.key"),
    };
    let agent_secret = secrets
        .get("orders-agent-tls")
        .await
        .expect("the agents' certificate");
    assert_eq!(agent_secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let name = pgpilot_operator::tls::server_name("orders", ns);
    let first = cert_info(&certs(data(&agent_secret, "tls.crt").as_bytes(), "tls.crt").unwrap()[0])
        .unwrap();
    assert_eq!(first.names, std::slice::from_ref(&name));
    assert_eq!(data(&agent_secret, "ca.crt"), ca.cert_pem);

    let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let ip = pods
        .get("orders-shard-0-0")
        .await
        .unwrap()
        .status
        .unwrap()
        .pod_ip
        .unwrap();
    let https = |identity: Option<&issue::Issued>| {
        reqwest::Client::builder()
            .use_preconfigured_tls(
                client_config(
                    ca.cert_pem.as_bytes(),
                    &name,
                    identity.map(|i| (i.cert_pem.as_bytes(), i.key_pem.as_bytes())),
                )
                .unwrap(),
            )
            .build()
            .unwrap()
    };
    let base = format!("https://{ip}:8008");
    assert!(
        reqwest::get(format!("http://{ip}:8008/healthz"))
            .await
            .is_err(),
        "plain HTTP answered on 8008"
    );
    assert_eq!(
        https(None)
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let anonymous = https(None)
        .post(format!("{base}/v1/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        anonymous.status(),
        401,
        "a state-changing route without credentials"
    );
    // The operator's own client: its certificate, no token.
    let ctx = Ctx::new(env.client.clone(), Options::default(), Metrics::new());
    let pc = env.clusters().get("orders").await.unwrap();
    let tls = pgpilot_operator::tls::client(&pc, ns, &ctx).await.unwrap();
    let reload = controller::agent_at(&ip, None, tls).reload().await;
    assert!(
        reload.is_ok(),
        "the operator's certificate authenticates: {reload:?}"
    );

    // A certificate in its last days (as if the operator had been away): renewed, and every
    // agent serves the renewed one without a restart.
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(86400);
    let late = issue::leaf(
        &ca,
        std::slice::from_ref(&name),
        issue::Validity {
            not_before: now - 88 * day,
            not_after: now + 2 * day,
        },
    )
    .unwrap();
    let mut s = agent_secret.clone();
    let d = s.data.as_mut().unwrap();
    d.insert(
        "tls.crt".into(),
        k8s_openapi::ByteString(late.cert_pem.clone().into_bytes()),
    );
    d.insert(
        "tls.key".into(),
        k8s_openapi::ByteString(late.key_pem.clone().into_bytes()),
    );
    secrets
        .replace("orders-agent-tls", &PostParams::default(), &s)
        .await
        .unwrap();
    let renewed = eventually("the late certificate renewed by the operator", || async {
        let s = secrets.get("orders-agent-tls").await.ok()?;
        let info = cert_info(&certs(data(&s, "tls.crt").as_bytes(), "c").ok()?[0]).ok()?;
        (info.not_after > first.not_after - 3600).then_some(info)
    })
    .await;
    let renewal = operator_events(env, "CertificateRenewed").await;
    assert!(
        renewal
            .iter()
            .any(|e| e.note.as_deref().unwrap_or("").contains("it ends in")),
        "{renewal:?}"
    );
    for pod in [
        "orders-shard-0-0",
        "orders-shard-0-1",
        "orders-shard-1-0",
        "orders-shard-1-1",
    ] {
        let ip = pods.get(pod).await.unwrap().status.unwrap().pod_ip.unwrap();
        eventually(&format!("{pod} serves the renewed certificate"), || async {
            let text = https(None)
                .get(format!("https://{ip}:8008/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let expiry: i64 = text
                .lines()
                .find_map(|l| l.strip_prefix("pgpilot_tls_certificate_expiry_timestamp_seconds "))?
                .trim()
                .parse()
                .ok()?;
            (expiry == renewed.not_after).then_some(())
        })
        .await;
    }
}

/// The field managers that own entry `name` of `spec.databases` (from managedFields, as
/// `kubectl get -o yaml --show-managed-fields` shows them).
fn entry_owners(pc: &PostgresCluster, name: &str) -> Vec<String> {
    let key = format!("k:{}", json!({ "name": name }));
    let mut out: Vec<String> = pc
        .managed_fields()
        .iter()
        .filter(|m| m.subresource.as_deref().unwrap_or("").is_empty())
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .and_then(|f| f.0.pointer("/f:spec/f:databases"))
                .is_some_and(|d| d.get(&key).is_some())
        })
        .filter_map(|m| m.manager.clone())
        .collect();
    out.sort();
    out
}

/// Whether `name` exists in the Postgres behind `db`.
async fn has_database(db: &tokio_postgres::Client, name: &str) -> Option<bool> {
    let row = db
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .ok()?;
    Some(row.get::<_, i64>(0) == 1)
}

/// This shard's state of `name` in `status.databases`.
fn db_state(pc: &PostgresCluster, name: &str, shard: &str) -> Option<String> {
    let d = pc
        .status
        .as_ref()?
        .databases
        .iter()
        .find(|d| d.name == name)?;
    Some(d.shards.iter().find(|s| s.shard == shard)?.state.clone())
}

/// Catalog to resource sync (docs/databases.md) on 2 shards × 2 instances, with the users'
/// writes made as a GitOps tool makes them (server-side apply, field manager `gitops`):
/// - `CREATE DATABASE "Sales Q4"` (and a name with a quote, double quotes and a non-ASCII
///   letter) on shard 0 is adopted into `spec.databases` under field manager `pgpilot-agent`,
///   with an Event, and shard 1 creates it; the status says `AdoptedFromSQL`, present on both;
/// - a user then declares "Sales Q4" with another field: no conflict, the agent lets go of
///   the entry (managedFields name only the user), no write loop (the generation stays);
/// - `DROP DATABASE "Sales Q4"` on shard 1: re-created because declared, with an Event;
/// - the adopted odd name dropped with SQL on shard 0: reported `Missing`, never re-created;
/// - a database created just before a switchover of shard 0 is adopted all the same;
/// - a declared owner role that does not exist: `Failed` with the reason, an Event,
///   `DatabasesInSync=False` and the drift gauge, and no database;
/// - `ensure: absent`: dropped on every shard;
/// - the cluster deleted with its pods orphaned: a database made then never brings it back.
#[tokio::test]
async fn databases_made_with_sql_are_adopted_and_every_shard_converges() {
    const SALES: &str = "Sales Q4";
    const ODD: &str = "o'Brien \"Ü\"";
    let env = Env::start("dbsync").await;
    // `spec.tls.mode: secret`: the agents' certificate from a Secret of one's own, as
    // cert-manager writes one (tls.crt, tls.key, ca.crt); the operator keeps no CA then and
    // calls the agents with the token, verifying them against that ca.crt.
    let own_ca = own_tls_secret(&env, "orders", "orders-own-tls").await;
    env.create_ready(
        "orders",
        2,
        2,
        json!({"tls": {"mode": "secret", "secretName": "orders-own-tls"}}),
    )
    .await;
    assert_serves_own_certificate(&env, "orders", &own_ca).await;
    let get = || async { env.clusters().get("orders").await.ok() };
    let s0 = env.sql("orders-shard-0-rw").await;
    let s1 = env.sql("orders-shard-1-rw").await;

    // Adopted from shard 0, created on shard 1.
    // (One statement per call: CREATE DATABASE cannot run in a multi-statement query's
    // implicit transaction.)
    for q in [
        r#"CREATE DATABASE "Sales Q4""#,
        r#"CREATE DATABASE "o'Brien ""Ü""""#,
    ] {
        s0.batch_execute(q)
            .await
            .expect("CREATE DATABASE on shard 0");
    }
    let pc = eventually("both adopted into spec.databases", || async {
        let pc = get().await?;
        let names: Vec<&str> = pc.spec.databases.iter().map(|d| d.name.as_str()).collect();
        (names.contains(&SALES) && names.contains(&ODD)).then_some(pc)
    })
    .await;
    assert!(
        !pc.spec
            .databases
            .iter()
            .any(|d| ["postgres", "template0", "template1"].contains(&d.name.as_str())),
        "PostgreSQL's own databases are never adopted: {:?}",
        pc.spec.databases
    );
    for name in [SALES, ODD] {
        assert_eq!(entry_owners(&pc, name), ["pgpilot-agent"], "{name}");
        let d = pc.spec.databases.iter().find(|d| d.name == name).unwrap();
        assert_eq!(
            d.owner.as_deref(),
            Some("postgres"),
            "adopted with its owner"
        );
        eventually(&format!("{name:?} on shard 1"), || async {
            has_database(&s1, name).await?.then_some(())
        })
        .await;
    }
    let pc = eventually("the status shows both on both shards", || async {
        let pc = get().await?;
        [SALES, ODD]
            .iter()
            .all(|n| {
                ["shard-0", "shard-1"]
                    .iter()
                    .all(|s| db_state(&pc, n, s).as_deref() == Some("Present"))
            })
            .then_some(pc)
    })
    .await;
    let st = pc.status.unwrap();
    let sales = st.databases.iter().find(|d| d.name == SALES).unwrap();
    assert_eq!(sales.origin, "AdoptedFromSQL");
    assert_eq!(sales.owner.as_deref(), Some("postgres"));
    assert_eq!(
        sales.present_on().collect::<Vec<_>>(),
        ["shard-0", "shard-1"]
    );
    let adopted =
        pgpilot_test_kubelet::wait::events(&env.client, env.ns.name(), "DatabaseAdopted").await;
    assert!(
        adopted
            .iter()
            .any(|e| e.message.as_deref().unwrap_or("").contains("\"Sales Q4\"")),
        "an Event for the adoption: {adopted:?}"
    );

    // A user declares it too, with another field: no conflict; the entry becomes the user's.
    let declare = |dbs: serde_json::Value| {
        json!({"apiVersion": "pgpilot.io/v1alpha1", "kind": "PostgresCluster",
               "metadata": {"name": "orders"}, "spec": {"databases": dbs}})
    };
    let clusters = env.clusters();
    let apply = |body: serde_json::Value| {
        let clusters = clusters.clone();
        async move {
            clusters
                .patch(
                    "orders",
                    &PatchParams::apply("gitops"),
                    &Patch::Apply(&body),
                )
                .await
        }
    };
    apply(declare(
        json!([{"name": SALES, "owner": "postgres", "ensure": "present"}]),
    ))
    .await
    .expect("a user's apply of an adopted entry meets no conflict");
    let pc = eventually("the agent lets go of the user's entry", || async {
        let pc = get().await?;
        (entry_owners(&pc, SALES) == ["gitops"]).then_some(pc)
    })
    .await;
    assert_eq!(
        entry_owners(&pc, ODD),
        ["pgpilot-agent"],
        "its own entries stay"
    );
    let d = pc.spec.databases.iter().find(|d| d.name == SALES).unwrap();
    assert_eq!(d.owner.as_deref(), Some("postgres"));
    let generation = pc.metadata.generation;
    eventually("the status says Declared", || async {
        let pc = get().await?;
        let d = pc.status?.databases.into_iter().find(|d| d.name == SALES)?;
        (d.origin == "Declared").then_some(())
    })
    .await;
    // Two rounds of every agent later, nobody wrote the spec again.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        get().await.unwrap().metadata.generation,
        generation,
        "no write loop over spec.databases"
    );

    // Dropped with SQL on shard 1: re-created, because a user declares it.
    s1.batch_execute(r#"DROP DATABASE "Sales Q4""#)
        .await
        .expect("DROP DATABASE on shard 1");
    eventually("a DatabaseRecreated Event for shard 1", || async {
        let ev =
            pgpilot_test_kubelet::wait::events(&env.client, env.ns.name(), "DatabaseRecreated")
                .await;
        ev.iter()
            .any(|e| e.message.as_deref().unwrap_or("").contains("shard-1"))
            .then_some(())
    })
    .await;
    assert_eq!(has_database(&s1, SALES).await, Some(true));

    // Shard 1's primary cut off from the API server (3 s, under its 5 s renew deadline: it stays
    // primary) while a database is created there: the round fails, is retried after a
    // backoff, and the database is adopted once the API server answers again. (With
    // KUBECONFIG there is no kubelet to cut a pod off: that step is skipped.)
    //
    // The primary tries to renew every second and fences at the deadline, 5 s after its last
    // renewal, so its last try is 4 s after it. The cut starts right after a renewal, so it
    // heals a second before that try. (A cut begun anywhere in the second left 0 to 1 s, and a
    // timer woken late under load fenced the primary.)
    if let Some(kubelet) = &env.kubelet {
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(env.client.clone(), env.ns.name());
        let primary = pods
            .list(&kube::api::ListParams::default().labels(
                "pgpilot.io/cluster=orders,pgpilot.io/shard=shard-1,pgpilot.io/role=primary",
            ))
            .await
            .unwrap()
            .items[0]
            .name_any();
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(env.client.clone(), env.ns.name());
        let renewed_at = || async {
            let lease = leases.get("orders-shard-1").await.ok()?;
            lease.spec?.renew_time
        };
        let before = renewed_at().await;
        let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
        while renewed_at().await == before {
            assert!(
                tokio::time::Instant::now() < give_up,
                "shard 1's primary did not renew its Lease within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cut = pgpilot_test_kubelet::ApiFault::Refuse;
        kubelet.set_api_fault(env.ns.name(), &primary, cut).unwrap();
        let cut_at = tokio::time::Instant::now();
        s1.batch_execute(r#"CREATE DATABASE "during cut""#)
            .await
            .expect("CREATE DATABASE while cut off");
        // 3 s from the cut, however long CREATE DATABASE took.
        tokio::time::sleep_until(cut_at + Duration::from_secs(3)).await;
        let heal = pgpilot_test_kubelet::ApiFault::None;
        kubelet
            .set_api_fault(env.ns.name(), &primary, heal)
            .unwrap();
        eventually(
            "\"during cut\" adopted once the API server answers",
            || async {
                let pc = get().await?;
                (entry_owners(&pc, "during cut") == ["pgpilot-agent"]).then_some(())
            },
        )
        .await;
        eventually("\"during cut\" on shard 0", || async {
            has_database(&s0, "during cut").await?.then_some(())
        })
        .await;
    }

    // The agent's own entry dropped with SQL where it was adopted: reported, not re-created.
    s0.batch_execute(r#"DROP DATABASE "o'Brien ""Ü""""#)
        .await
        .expect("DROP DATABASE on shard 0");
    eventually("shard 0 reports the odd name Missing", || async {
        let pc = get().await?;
        (db_state(&pc, ODD, "shard-0").as_deref() == Some("Missing")).then_some(())
    })
    .await;
    let missing =
        pgpilot_test_kubelet::wait::events(&env.client, env.ns.name(), "DatabaseMissing").await;
    assert!(!missing.is_empty(), "an Event for the drop");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(has_database(&s0, ODD).await, Some(false), "not re-created");
    let pc = get().await.unwrap();
    assert!(
        pc.spec.databases.iter().any(|d| d.name == ODD),
        "the entry stays"
    );
    assert_eq!(db_state(&pc, ODD, "shard-1").as_deref(), Some("Present"));

    // Created on shard 0 just before its switchover: adopted all the same.
    s0.batch_execute(r#"CREATE DATABASE "after switch""#)
        .await
        .expect("CREATE DATABASE before the switchover");
    let ip = pgpilot_test_kubelet::service_ips(&env.client, env.ns.name(), "orders-shard-0-rw")
        .await
        .expect("the rw endpoint")[0];
    let token = {
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(env.client.clone(), env.ns.name());
        let s = secrets.get("orders-secrets").await.expect("the Secret");
        String::from_utf8(s.data.unwrap()["token"].0.clone()).unwrap()
    };
    // As a person with the token would: HTTPS, the agent verified against the CA of the
    // cluster's own certificate (mode secret).
    let tls = pgpilot_common::tls::client_config(
        own_ca.as_bytes(),
        &pgpilot_operator::tls::server_name("orders", env.ns.name()),
        None,
    )
    .unwrap();
    let done = controller::agent_at(&ip.to_string(), Some(token), Some(tls))
        .switchover(&pgpilot_common::api::SwitchoverRequest { candidate: None })
        .await
        .expect("switchover of shard 0");
    assert_ne!(done.old_primary, done.new_primary);
    let pc = eventually("\"after switch\" adopted", || async {
        let pc = get().await?;
        (entry_owners(&pc, "after switch") == ["pgpilot-agent"]).then_some(pc)
    })
    .await;
    assert!(pc.spec.databases.iter().any(|d| d.name == SALES));
    eventually("\"after switch\" on shard 1", || async {
        has_database(&s1, "after switch").await?.then_some(())
    })
    .await;

    // A declared owner that does not exist: nothing created, reported everywhere.
    apply(declare(json!([
        {"name": SALES, "owner": "postgres", "ensure": "present"},
        {"name": "needs_role", "owner": "nobody"},
    ])))
    .await
    .expect("declare needs_role");
    let pc = eventually("needs_role Failed on both shards", || async {
        let pc = get().await?;
        ["shard-0", "shard-1"]
            .iter()
            .all(|s| db_state(&pc, "needs_role", s).as_deref() == Some("Failed"))
            .then_some(pc)
    })
    .await;
    let d = pc
        .status
        .as_ref()
        .unwrap()
        .databases
        .iter()
        .find(|d| d.name == "needs_role")
        .unwrap();
    let why = d.shards[0].message.clone().unwrap_or_default();
    assert!(why.contains("\"nobody\" does not exist"), "{why}");
    let s0 = env.sql("orders-shard-0-rw").await;
    assert_eq!(has_database(&s0, "needs_role").await, Some(false));
    eventually("DatabasesInSync=False and the drift gauge", || async {
        let pc = get().await?;
        let c = condition(&pc, "DatabasesInSync")?;
        let drift = env
            .metrics
            .database_drift
            .with_label_values(&["orders"])
            .get();
        (c.status == "False" && c.message.contains("needs_role") && drift >= 1).then_some(())
    })
    .await;
    assert!(
        !pgpilot_test_kubelet::wait::events(&env.client, env.ns.name(), "DatabaseNotCreated")
            .await
            .is_empty()
    );

    // ensure: absent drops it on every shard; the user's other entry leaves the spec.
    apply(declare(json!([{"name": SALES, "ensure": "absent"}])))
        .await
        .expect("ensure: absent");
    eventually("Sales Q4 dropped on both shards", || async {
        let s1 = env.sql("orders-shard-1-rw").await;
        (!has_database(&s0, SALES).await? && !has_database(&s1, SALES).await?).then_some(())
    })
    .await;
    eventually("no status for Sales Q4 nor needs_role", || async {
        let pc = get().await?;
        let st = pc.status?;
        (!st.databases
            .iter()
            .any(|d| d.name == SALES || d.name == "needs_role"))
        .then_some(())
    })
    .await;
    let pc = get().await.unwrap();
    assert!(!pc.spec.databases.iter().any(|d| d.name == "needs_role"));

    // The cluster resource deleted while its pods still run (orphaned): the agents stop
    // syncing, and a database made now never brings the resource back (their applies carry
    // the resourceVersion they read, so none can create it).
    // (The session is opened first: its TLS is verified against the CA the cluster names.)
    let s0 = env.sql("orders-shard-0-rw").await;
    let orphan = kube::api::DeleteParams {
        propagation_policy: Some(kube::api::PropagationPolicy::Orphan),
        ..Default::default()
    };
    env.clusters()
        .delete("orders", &orphan)
        .await
        .expect("delete the cluster, orphaning its pods");
    eventually("the cluster gone", || async {
        env.clusters()
            .get_opt("orders")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    s0.batch_execute(r#"CREATE DATABASE "after delete""#)
        .await
        .expect("CREATE DATABASE after the cluster was deleted");
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(
        env.clusters().get_opt("orders").await.unwrap().is_none(),
        "no agent brought the deleted cluster back"
    );
    env.ns.cleanup().await.expect("cleanup");
}

/// A write loop through a shard's rw Service: every acknowledged id with its time
/// (`PGPILOT_TEST_TRACE_WRITER=1` prints every failed write and reconnect, to see where a write
/// gap comes from).
struct Writer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(i64, std::time::Instant)>>,
}

impl Writer {
    async fn start(env: &Env, shard: &str) -> Writer {
        let client = env.client.clone();
        let ns = env.ns.name().to_string();
        let svc = format!("orders-{shard}-rw");
        let password = env.superuser_password("orders").await;
        let db = env.sql(&svc).await;
        db.batch_execute("CREATE TABLE IF NOT EXISTS acks (id bigint PRIMARY KEY)")
            .await
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = stop.clone();
        let task = tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut db: Option<tokio_postgres::Client> = None;
            let mut id = 0i64;
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                if db.as_ref().is_none_or(|c| c.is_closed()) {
                    db = connect_first(&client, &ns, "orders", &svc, &password).await;
                    if std::env::var_os("PGPILOT_TEST_TRACE_WRITER").is_some() {
                        let ips = pgpilot_test_kubelet::service_ips(&client, &ns, &svc).await;
                        eprintln!(
                            "{} writer {svc}: reconnect -> {} {ips:?}",
                            jiff::Timestamp::now(),
                            db.is_some()
                        );
                    }
                }
                if let Some(c) = &db {
                    id += 1;
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                    let insert = c.execute("INSERT INTO acks VALUES ($1)", &params);
                    match tokio::time::timeout(Duration::from_secs(3), insert).await {
                        Ok(Ok(_)) => acked.push((id, std::time::Instant::now())),
                        other => {
                            if std::env::var_os("PGPILOT_TEST_TRACE_WRITER").is_some() {
                                eprintln!(
                                    "{} writer {svc}: {:?}",
                                    jiff::Timestamp::now(),
                                    other.map(|r| r.map(|_| ()))
                                );
                            }
                            db = None
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            acked
        });
        Writer { stop, task }
    }

    /// The acknowledged ids, and the longest time between two acknowledgements.
    async fn stop(self) -> (Vec<i64>, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let acked = self.task.await.unwrap();
        let gap = acked
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .max()
            .unwrap_or_default();
        (acked.into_iter().map(|(id, _)| id).collect(), gap)
    }
}

/// A connection to the first endpoint of `svc` of `cluster`, or none (3 s bound).
async fn connect_first(
    client: &kube::Client,
    ns: &str,
    cluster: &str,
    svc: &str,
    password: &str,
) -> Option<tokio_postgres::Client> {
    let ip = *pgpilot_test_kubelet::service_ips(client, ns, svc)
        .await
        .ok()?
        .first()?;
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(ip.to_string())
        .port(5432)
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    tokio::time::timeout(Duration::from_secs(3), pg_connect(client, ns, cluster, cfg))
        .await
        .ok()?
        .ok()
}

/// Connects as a client of the cluster's Postgres does: over TLS verified against the CA in
/// the agents' Secret under the cluster's certificate name when the cluster has TLS (Postgres
/// takes TCP connections over TLS only, then), plain otherwise.
async fn pg_connect(
    client: &kube::Client,
    ns: &str,
    cluster: &str,
    cfg: tokio_postgres::Config,
) -> Result<tokio_postgres::Client, String> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let clusters: Api<PostgresCluster> = Api::namespaced(client.clone(), ns);
    let pc = clusters.get(cluster).await.map_err(|e| e.to_string())?;
    let ca = match pgpilot_operator::tls::agent_secret(&pc) {
        Some(secret) => secrets
            .get_opt(&secret)
            .await
            .map_err(|e| e.to_string())?
            .and_then(|s| s.data?.remove("ca.crt")),
        None => None,
    };
    let name = pgpilot_operator::tls::server_name(cluster, ns);
    let tls = ca
        .map(|ca| pgpilot_common::tls::client_config(&ca.0, &name, None))
        .transpose()?;
    pgpilot_common::tls::postgres::connect(&cfg, tls)
        .await
        .map_err(|e| e.to_string())
}

/// The cluster's condition `type_`, if set.
fn condition(pc: &PostgresCluster, type_: &str) -> Option<pgpilot_common::crd::Condition> {
    pc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .cloned()
}

/// The operator's Events (events.k8s.io/v1, as its recorder writes them) with `reason`.
async fn operator_events(env: &Env, reason: &str) -> Vec<k8s_openapi::api::events::v1::Event> {
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(env.client.clone(), env.ns.name());
    events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

/// Each pod of the cluster with its `pgpilot.io/revision`.
async fn pod_revisions(env: &Env, shard: &str) -> Vec<(String, String)> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(env.client.clone(), env.ns.name());
    let sel = format!("pgpilot.io/cluster=orders,pgpilot.io/shard={shard}");
    let mut out: Vec<(String, String)> = pods
        .list(&kube::api::ListParams::default().labels(&sel))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| {
            let rev = p
                .labels()
                .get("pgpilot.io/revision")
                .cloned()
                .unwrap_or_default();
            (p.name_any(), rev)
        })
        .collect();
    out.sort();
    out
}

/// Gated, shard-by-shard rollouts (docs/rollouts.md) on 3 shards × 2 instances with a write
/// loop on each shard, two operator replicas (leader election):
/// - Manual mode, canaryShards 1: a new image → `WaitingForRelease` with the target revision;
///   `release: <rev>` → only shard-0 rolls, then `WaitingForRelease` again; `<rev>/all` →
///   shards 1 and 2 roll, the operator leader killed (its task aborted, as kill -9) during a
///   drain and the other replica goes on → `Complete`; every pod at the revision; every
///   acknowledged write on every shard's primary; each shard's longest write gap reported;
/// - a restart-only parameter that stops Postgres from starting: halted on the canary after
///   the ready timeout, shards 1 and 2 untouched, the condition and an Event say why; going
///   back to the good spec repairs the canary and completes;
/// - Automatic mode: a new agent image rolls every shard without a gate.
#[tokio::test]
async fn rollouts_go_shard_by_shard_behind_gates_and_halt_on_a_bad_revision() {
    let env = Env::start_with("rollout", 2).await;
    // The ready timeout of a good revision leaves room for a loaded 2-core machine (a pod
    // restarts, catches up and registers); the bad revision below gets a short one.
    let rollout = json!({"mode": "Manual", "canaryShards": 1, "soakSeconds": 2,
        "readyTimeoutSeconds": 90});
    env.create_ready("orders", 3, 2, json!({ "rollout": rollout }))
        .await;
    let get = || async { env.clusters().get("orders").await.ok() };
    // Every rollout status the test sees, printed when it changes (shown if the test fails).
    let seen = std::sync::Mutex::new(String::new());
    let rollout = |pc: &PostgresCluster| {
        let r = pc.status.as_ref().and_then(|s| s.rollout.clone());
        let line = format!(
            "{:?}",
            r.as_ref()
                .map(|r| (&r.phase, &r.current_shard, &r.step, &r.reason))
        );
        let mut last = seen.lock().unwrap();
        if *last != line {
            eprintln!("rollout status: {line}");
            *last = line;
        }
        r
    };
    let first = eventually("an idle rollout", || async {
        let r = rollout(&get().await?)?;
        (r.phase == "Idle").then_some(r)
    })
    .await;
    let old_rev = first.target_revision.clone().expect("the current revision");
    let shards = ["shard-0", "shard-1", "shard-2"];
    let mut writers = Vec::new();
    for s in shards {
        writers.push(Writer::start(&env, s).await);
    }
    let clusters = env.clusters();
    let patch = |v: serde_json::Value| {
        let clusters = clusters.clone();
        async move {
            clusters
                .patch("orders", &PatchParams::default(), &Patch::Merge(&v))
                .await
                .expect("patch the cluster");
        }
    };
    let started = std::time::Instant::now();

    // A new image: planned, waiting for the release.
    patch(json!({"spec": {"image": "postgres:15.18"}})).await;
    let waiting = eventually("WaitingForRelease", || async {
        let r = rollout(&get().await?)?;
        (r.phase == "WaitingForRelease" && r.target_revision.as_deref() != Some(&old_rev))
            .then_some(r)
    })
    .await;
    let rev = waiting.target_revision.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for s in shards {
        assert!(
            pod_revisions(&env, s)
                .await
                .iter()
                .all(|(_, r)| r == &old_rev),
            "nothing moves before the release"
        );
    }

    // Released: the canary only, then waiting again.
    patch(json!({"spec": {"rollout": {"release": rev}}})).await;
    let r = eventually("the canary done, waiting for the rest", || async {
        let r = rollout(&get().await?)?;
        (r.phase == "WaitingForRelease" && r.completed_shards == ["shard-0"]).then_some(r)
    })
    .await;
    assert!(r.step.unwrap().contains(&format!("{rev}/all")));
    assert!(
        pod_revisions(&env, "shard-0")
            .await
            .iter()
            .all(|(_, r)| r == &rev)
    );
    for s in ["shard-1", "shard-2"] {
        assert!(
            pod_revisions(&env, s)
                .await
                .iter()
                .all(|(_, r)| r == &old_rev),
            "{s} untouched after the canary"
        );
    }

    // The rest, with the operator leader killed during a drain.
    patch(json!({"spec": {"rollout": {"release": format!("{rev}/all")}}})).await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(env.client.clone(), env.ns.name());
    eventually("a drain of shard-1", || async {
        let list = pods
            .list(&kube::api::ListParams::default().labels("pgpilot.io/shard=shard-1"))
            .await
            .ok()?;
        list.items
            .iter()
            .any(|p| p.annotations().contains_key("pgpilot.io/drain"))
            .then_some(())
    })
    .await;
    let leader = if env.replicas[0].0.writes.get() > env.replicas[1].0.writes.get() {
        0
    } else {
        1
    };
    env.replicas[leader].1.abort();
    let done = eventually("Complete", || async {
        let r = rollout(&get().await?)?;
        (r.phase == "Complete").then_some(r)
    })
    .await;
    let took = started.elapsed();
    assert_eq!(done.completed_shards, shards);
    for s in shards {
        assert!(
            pod_revisions(&env, s).await.iter().all(|(_, r)| r == &rev),
            "{s}"
        );
    }
    // The CLI view, as a user runs it (async: the test API server runs on this runtime).
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgpilot-operator"))
        .args(["rollout", "status", "orders", "-n", env.ns.name()])
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .await
        .expect("pgpilot-operator rollout status");
    let view = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{view} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(view.contains("rollout Complete"), "{view}");
    assert_eq!(view.matches(" done ").count(), 6, "{view}");
    assert!(!view.contains("(old)"), "{view}");
    // (The recorder folds repeats of a reason into one Event with a series count.)
    let switchovers: i32 = operator_events(&env, "RolloutSwitchover")
        .await
        .iter()
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .sum();
    assert!(switchovers >= 3, "a switchover per shard: {switchovers}");
    env.ready("orders", "True").await;
    for (s, w) in shards.iter().zip(writers) {
        let (acked, gap) = w.stop().await;
        let db = env.sql(&format!("orders-{s}-rw")).await;
        let ids: Vec<i64> = db
            .query("SELECT id FROM acks", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let have: std::collections::BTreeSet<i64> = ids.into_iter().collect();
        let lost: Vec<&i64> = acked.iter().filter(|id| !have.contains(id)).collect();
        assert!(lost.is_empty(), "{s}: acknowledged writes lost: {lost:?}");
        eprintln!(
            "rollout {s}: {} acknowledged writes, none lost, longest write gap {:.2} s",
            acked.len(),
            gap.as_secs_f64()
        );
    }
    eprintln!(
        "rollout of 3 shards × 2 instances, Manual with 2 gates: {:.1} s from the spec change",
        took.as_secs_f64()
    );

    // A bad revision (Postgres cannot start with it): halted on the canary.
    patch(json!({"spec": {"parameters": {"shared_buffers": "100TB"},
        "rollout": {"readyTimeoutSeconds": 25}}}))
    .await;
    let bad = eventually("WaitingForRelease for the bad revision", || async {
        let r = rollout(&get().await?)?;
        (r.phase == "WaitingForRelease" && r.target_revision.as_deref() != Some(&rev)).then_some(r)
    })
    .await
    .target_revision
    .unwrap();
    patch(json!({"spec": {"rollout": {"release": bad}}})).await;
    let halted = eventually("Halted on the canary", || async {
        let pc = get().await?;
        let r = rollout(&pc)?;
        (r.phase == "Halted").then_some(pc)
    })
    .await;
    let r = rollout(&halted).unwrap();
    assert_eq!(r.current_shard.as_deref(), Some("shard-0"));
    assert!(r.reason.as_deref().unwrap().contains("not Ready"), "{r:?}");
    let cond = condition(&halted, "RolloutHalted").unwrap();
    assert_eq!(cond.status, "True");
    assert!(!operator_events(&env, "RolloutHalted").await.is_empty());
    for s in ["shard-1", "shard-2"] {
        assert!(
            pod_revisions(&env, s).await.iter().all(|(_, r)| r == &rev),
            "{s} untouched by the halted rollout"
        );
    }
    // Back to the good spec: the canary is repaired, the others need nothing.
    patch(json!({"spec": {"parameters": null,
        "rollout": {"release": rev, "readyTimeoutSeconds": 90}}}))
    .await;
    eventually("Complete again at the good revision", || async {
        let r = rollout(&get().await?)?;
        (r.phase == "Complete" && r.target_revision.as_deref() == Some(&rev)).then_some(())
    })
    .await;
    env.ready("orders", "True").await;

    // Automatic mode: every shard, no gate.
    patch(json!({"spec": {"agentImage": "pgpilot/agent:next", "rollout": {"mode": "Automatic"}}}))
        .await;
    let auto = eventually("an automatic rollout complete", || async {
        let r = rollout(&get().await?)?;
        (r.phase == "Complete" && r.target_revision.as_deref() != Some(&rev)).then_some(r)
    })
    .await;
    let next = auto.target_revision.unwrap();
    for s in shards {
        assert!(
            pod_revisions(&env, s).await.iter().all(|(_, r)| r == &next),
            "{s}"
        );
    }
    env.ns.cleanup().await.expect("cleanup");
}

/// Two operator replicas: only the Lease holder acts. Killed (its task aborted mid-work, the
/// Lease not released, as kill -9), the other takes over once the Lease expires and converges
/// the cluster without duplicates.
#[tokio::test]
async fn two_operator_replicas_never_both_act_and_a_killed_leader_is_replaced() {
    let env = Env::start_with("operator-ha", 2).await;
    env.create_ready("orders", 1, 1, json!({})).await;
    let writes = |i: usize| env.replicas[i].0.writes.get();
    let reconciles = |i: usize| {
        env.replicas[i]
            .0
            .reconciles
            .with_label_values(&["orders"])
            .get()
    };
    let leader = if writes(0) > 0 { 0 } else { 1 };
    let follower = 1 - leader;
    assert!(writes(leader) > 0);
    assert_eq!(
        (writes(follower), reconciles(follower)),
        (0, 0),
        "the follower never acted"
    );

    // kill -9 of the leader, then a change: the follower takes the Lease and acts on it.
    env.replicas[leader].1.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let by_the_dead = writes(leader);
    let scale = json!({"spec": {"instancesPerShard": 2}});
    env.clusters()
        .patch("orders", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    eventually("2 ready instances, by the new leader", || async {
        let pc = env.clusters().get("orders").await.ok()?;
        let st = pc.status.as_ref()?;
        (st.shards.first()?.ready_instances == 2 && writes(follower) > 0).then_some(())
    })
    .await;
    assert_eq!(
        writes(leader),
        by_the_dead,
        "the killed leader acts no more"
    );
    let sets: Api<StatefulSet> = Api::namespaced(env.client.clone(), env.ns.name());
    let all = sets.list(&Default::default()).await.unwrap();
    assert_eq!(all.items.len(), 1, "one StatefulSet, no duplicate");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.client.clone(), env.ns.name());
    let generated = secrets
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|s| s.name_any().starts_with("orders-secrets"))
        .count();
    assert_eq!(generated, 1, "the generated Secret made once");
    let lease: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), env.ns.name());
    let holder = lease
        .get("pgpilot-operator")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder, Some(format!("operator-{follower}")));
    env.ns.cleanup().await.expect("cleanup");
}

/// `PostgresBackup`: a base backup of every shard, then of one, taken on the shards' replicas,
/// with ids, LSNs and sizes in the status; retention keeps the newest; requests that cannot be
/// served fail at once, saying why; a schedule creates runs; a new cluster bootstrapped
/// `fromBackup` with a time target has exactly the rows committed before it.
#[tokio::test]
async fn postgres_backups_retention_schedule_and_a_cluster_restored_from_them() {
    let env = Env::start("operator-backup").await;
    // The store: an S3 server (s3s-fs keeps each object as a file under the bucket's dir, so
    // the test reads what was stored from there). The pods' root filesystem is read-only: a
    // store must be a service, and file:// is refused for clusters.
    let s3 = pgpilot_test_support::s3::S3Server::start().expect("s3s-fs");
    s3.create_bucket("backups").expect("bucket");
    let store = s3.data_dir().join("backups");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.client.clone(), env.ns.name());
    let creds = serde_json::from_value(json!({"metadata": {"name": "store-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT": s3.endpoint, "AWS_ALLOW_HTTP": "true"}}))
    .unwrap();
    secrets
        .create(&PostParams::default(), &creds)
        .await
        .expect("the store's credentials");
    let url = "s3://backups";
    let backup = json!({"store": url, "credentialsSecret": "store-credentials",
        "compression": "lz4", "retention": {"keepLast": 1}});
    env.create_ready("orders", 2, 2, json!({ "backup": backup }))
        .await;
    let backups: Api<PostgresBackup> = Api::namespaced(env.client.clone(), env.ns.name());
    let create = |name: &str, spec: serde_json::Value| {
        let b: PostgresBackup = serde_json::from_value(json!({
            "apiVersion": "pgpilot.io/v1alpha1", "kind": "PostgresBackup",
            "metadata": {"name": name}, "spec": spec}))
        .expect("a PostgresBackup");
        let backups = backups.clone();
        async move {
            backups
                .create(&PostParams::default(), &b)
                .await
                .expect("create")
        }
    };
    let finished = |name: &'static str| {
        let backups = backups.clone();
        async move {
            eventually(&format!("{name} finished"), || async {
                let b = backups.get(name).await.ok()?;
                let st = b.status?;
                matches!(st.phase.as_deref(), Some("Completed" | "Failed")).then_some(st)
            })
            .await
        }
    };
    create("all", json!({"cluster": "orders"})).await;
    create("one", json!({"cluster": "orders", "shard": "shard-1"})).await;
    create("nope", json!({"cluster": "nope"})).await;
    create("typo", json!({"cluster": "orders", "shard": "shard-9"})).await;

    let st = finished("all").await;
    let all_shard_1 = st.shards.get(1).and_then(|s| s.backup_id.clone());
    assert_eq!(st.phase.as_deref(), Some("Completed"), "{st:?}");
    let shards: Vec<&str> = st.shards.iter().map(|s| s.shard.as_str()).collect();
    assert_eq!(shards, ["shard-0", "shard-1"]);
    for s in &st.shards {
        assert_eq!(s.phase, "Completed", "{s:?}");
        assert!(
            s.backup_id.is_some() && s.start_lsn.is_some() && s.end_lsn.is_some(),
            "{s:?}"
        );
        assert!(s.size_bytes.unwrap_or(0) > 0, "{s:?}");
        // Taken on the shard's ready replica, sparing the primary.
        assert_eq!(s.role.as_deref(), Some("replica"), "{s:?}");
        assert!(
            s.instance
                .as_deref()
                .is_some_and(|p| p.starts_with(&format!("orders-{}-", s.shard))),
            "{s:?}"
        );
    }
    let st = finished("one").await;
    assert_eq!(st.phase.as_deref(), Some("Completed"), "{st:?}");
    assert_eq!(st.shards.len(), 1);
    assert_eq!(st.shards[0].shard, "shard-1");
    // Retention (keepLast 1), applied by the agent before a backup shows completed: shard-1
    // took two backups and keeps only the newest; shard-0 keeps its one.
    let manifests = |shard: &str| -> Vec<String> {
        let dir = store.join(format!("orders/{shard}/backups"));
        let mut ids: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(Result::ok).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.path().join("manifest.json.pgpilot").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        ids
    };
    let newest = st.shards[0].backup_id.clone().max(all_shard_1).unwrap();
    assert_eq!(
        manifests("shard-1"),
        [newest],
        "retention keeps the newest backup of shard-1 only"
    );
    assert_eq!(manifests("shard-0").len(), 1);
    let st = finished("nope").await;
    assert_eq!(st.phase.as_deref(), Some("Failed"));
    assert!(st.error.unwrap().contains("no PostgresCluster \"nope\""));
    let st = finished("typo").await;
    assert_eq!(st.phase.as_deref(), Some("Failed"));
    let err = st.error.unwrap();
    assert!(
        err.contains("\"shard-9\"") && err.contains("shard-0, shard-1"),
        "{err}"
    );

    // A schedule: every minute (the shortest a cron schedule says) a PostgresBackup of every
    // shard, named after its minute, created once.
    let every_minute = json!({"spec": {"backup": {"schedule": "* * * * *"}}});
    env.clusters()
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(&every_minute),
        )
        .await
        .unwrap();
    let run = eventually("a scheduled backup completed", || async {
        let list = backups.list(&Default::default()).await.ok()?;
        list.items.into_iter().find(|b| {
            b.name_any().starts_with("orders-")
                && b.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Completed")
        })
    })
    .await;
    assert_eq!(run.status.unwrap().shards.len(), 2, "every shard");
    // Each run is named after its minute; the status records the latest minute run, which may
    // already be the next one.
    let pc = env.clusters().get("orders").await.unwrap();
    let last: jiff::Timestamp = pc
        .status
        .unwrap()
        .last_scheduled_backup
        .expect("recorded")
        .parse()
        .unwrap();
    let run_name = run.metadata.name.clone().unwrap();
    let minute = jiff::civil::DateTime::strptime("%Y%m%d%H%M", &run_name["orders-".len()..])
        .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC))
        .map(|z| z.timestamp())
        .unwrap_or_else(|e| panic!("{run_name} is not named after a minute: {e}"));
    let created = pc.metadata.creation_timestamp.unwrap().0;
    assert!(
        minute <= last && minute.as_second() > created.as_second() - 60,
        "{run_name}: the run of a minute since the cluster exists, up to the latest run {last}"
    );
    let latest = format!(
        "orders-{}",
        last.to_zoned(jiff::tz::TimeZone::UTC)
            .strftime("%Y%m%d%H%M")
    );
    assert!(
        backups.get_opt(&latest).await.unwrap().is_some(),
        "the latest run recorded, {latest}, exists"
    );

    // bootstrap.fromBackup with a time target: no schedule from now on (with keepLast 1 a
    // backup after the target would retire the one before it), and every run finished.
    let no_schedule = json!({"spec": {"backup": {"schedule": null}}});
    let generation = env
        .clusters()
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(&no_schedule),
        )
        .await
        .unwrap()
        .metadata
        .generation;
    // A reconcile that began before the patch may still create the run of a minute that has
    // just started; it ends before the one that sees the patch writes its generation.
    eventually("the operator saw the schedule removed", || async {
        let pc = env.clusters().get("orders").await.ok()?;
        (pc.status?.observed_generation == generation).then_some(())
    })
    .await;
    eventually("every backup run finished", || async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let list = backups.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .all(|b| {
                matches!(
                    b.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Completed" | "Failed")
                )
            })
            .then_some(())
    })
    .await;
    let db = env.sql("orders-shard-0-rw").await;
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let target = jiff::Timestamp::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    db.batch_execute("INSERT INTO t SELECT generate_series(101, 200)")
        .await
        .unwrap();
    let seg: String = db
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    let archived = store.join(format!("orders/shard-0/wal/{seg}.pgpilot"));
    eventually("the rows after the target archived", || async {
        archived.exists().then_some(())
    })
    .await;
    env.create_ready(
        "copy",
        1,
        2,
        json!({"backup": {"store": url, "credentialsSecret": "store-credentials"},
            "bootstrap": {"fromBackup": {"store": url, "credentialsSecret": "store-credentials",
                "cluster": "orders", "targetTime": target.to_string()}}}),
    )
    .await;
    let rows: Vec<i32> = env
        .sql_of("copy", "copy-shard-0-rw")
        .await
        .query("SELECT id FROM t ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        (1..=100).collect::<Vec<i32>>(),
        "exactly the rows committed before the target"
    );
    // The copy archives into its own prefix, and its replica streams from the restored primary.
    let copy_wal = store.join("copy/shard-0/wal");
    eventually("the copy archives its own WAL", || async {
        std::fs::read_dir(&copy_wal).ok()?.next().map(|_| ())
    })
    .await;
    env.ns.cleanup().await.expect("cleanup");
}

/// Benchmark (benches/operator.sh, `make bench-operator`), not a check. The operator binary
/// runs as its own process against the test API server (KUBECONFIG), so its memory is its own:
/// (1) time from creating a 2 shards × 2 instances cluster to `Ready`, three times; (2) its RSS
/// idle; (3) with the node cordoned (pods stay Pending, as on a cluster out of capacity),
/// `PGPILOT_OPERATOR_CLUSTERS` more clusters (default 50; benches/operator.sh runs it against
/// a release build of the test API server, which a debug build cannot keep up with): the
/// operator's peak RSS while reconciling them, and the writes one changed cluster costs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench-operator"]
async fn operator_trials() {
    use std::time::Instant;
    let env = Env::start_with("operator-bench", usize::MAX).await;
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgpilot-operator"))
        .args([
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--agent-image",
            "pgpilot/agent:test",
            "--allow-networks",
            "127.0.0.0/8",
            "--watch-namespace",
            env.ns.name(),
            "--lease-namespace",
            env.ns.name(),
            "--identity",
            "bench",
        ])
        .env("KUBECONFIG", env.kubeconfig.clone())
        .env("PGPILOT_LOG", "warn")
        .spawn()
        .expect("pgpilot-operator");
    let pid = child.id();
    let rss = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    };
    let metric = |name: &'static str| async move {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
    };
    for trial in 1..=3 {
        let name = format!("bench{trial}");
        let at = Instant::now();
        env.create_ready(&name, 2, 2, json!({})).await;
        eprintln!("trial {trial}: 2 x 2 Ready in {:.1?}", at.elapsed());
        // Paused, then left: deleting a whole cluster drains each pod in turn (docs/drain.md).
        let pause = json!({"spec": {"paused": true}});
        env.clusters()
            .patch(&name, &PatchParams::default(), &Patch::Merge(&pause))
            .await
            .expect("pause");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    eprintln!("OPERATOR RSS idle: {} MiB", rss() / 1024);

    // The node cordoned: the pods of the 50 stay Pending.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(env.client.clone());
    nodes
        .patch(
            "node-0",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"unschedulable": true}})),
        )
        .await
        .expect("cordon");
    let many: usize = std::env::var("PGPILOT_OPERATOR_CLUSTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    eprintln!("node cordoned; creating {many} clusters");
    let at = Instant::now();
    let mut peak = 0;
    for i in 0..many {
        env.create(&format!("many{i}"), Env::spec(2, 2, json!({})))
            .await;
        peak = peak.max(rss());
        if i % 10 == 9 {
            eprintln!("{} clusters created", i + 1);
        }
    }
    let deadline = Instant::now() + WAIT;
    let mut done = 0;
    while Instant::now() < deadline {
        peak = peak.max(rss());
        let list = env
            .clusters()
            .list(&Default::default())
            .await
            .expect("list");
        done = list
            .items
            .iter()
            .filter(|c| {
                c.status
                    .as_ref()
                    .is_some_and(|s| s.observed_generation.is_some() && !s.shards.is_empty())
            })
            .count();
        if done >= many + 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{done} of {} clusters reconciled after {:.1?}; OPERATOR RSS peak while reconciling: {} MiB",
        many + 3,
        at.elapsed(),
        peak / 1024
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = metric("pgpilot_operator_writes_total").await.unwrap_or(0.0);
    let quiet = metric("pgpilot_operator_writes_total").await.unwrap_or(0.0);
    let change = json!({"spec": {"parameters": {"work_mem": "8MB"}}});
    env.clusters()
        .patch("many7", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = metric("pgpilot_operator_writes_total").await.unwrap_or(0.0);
    eprintln!(
        "OPERATOR writes for one changed cluster among {}: {} (and {} with nothing changed); RSS after: {} MiB",
        many + 3,
        after - before,
        quiet - before,
        rss() / 1024
    );
    let _ = child.kill();
    let _ = child.wait();
    env.ns.cleanup().await.expect("cleanup");
}

/// A free port on 127.0.0.1 for the operator's metrics listener (the operator does not take
/// the test-support crate, whose `net::free_port` needs the archive feature of common).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
