//! What the operator's end-to-end test binaries share.

use std::path::PathBuf;

/// Test logs through the test writer, filtered by `PGPILOT_LOG` (default `warn`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PGPILOT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A binary of this workspace's build, next to this test's own directory (the agent, which
/// this package's tests do not build themselves: `make test` builds it first).
pub fn built(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p pgpilot-agent; make test does)",
        bin.display()
    );
    bin
}

/// The rules of the chart's RBAC (charts/pgpilot/templates/rbac.yaml) for the operator's
/// ServiceAccount: the operator's (Cluster)Role, and its leader-election Role. Read from the
/// template with its `{{ }}` lines left out: the rules themselves are plain YAML, the same in
/// either scope.
#[allow(dead_code)] // operator.rs only
pub fn chart_rules() -> ChartRules {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/pgpilot/templates/rbac.yaml");
    let text = std::fs::read_to_string(&path).expect("charts/pgpilot/templates/rbac.yaml");
    let mut out = ChartRules {
        operator: serde_json::Value::Null,
        leader_election: serde_json::Value::Null,
    };
    for doc in text.split("\n---\n") {
        let Some((head, rules)) = doc.split_once("\nrules:\n") else {
            continue;
        };
        let rules: String = rules
            .lines()
            .take_while(|l| l.starts_with(' ') || l.starts_with('#') || l.is_empty())
            .filter(|l| !l.contains("{{"))
            .map(|l| format!("{l}\n"))
            .collect();
        let rules: serde_json::Value =
            serde_saphyr::from_str(&format!("rules:\n{rules}")).expect("the chart's rules parse");
        let rules = rules["rules"].clone();
        if head.contains("-leader-election") {
            out.leader_election = rules;
        } else {
            out.operator = rules;
        }
    }
    assert!(
        out.operator.is_array() && out.leader_election.is_array(),
        "both Roles' rules found in {}",
        path.display()
    );
    out
}

#[allow(dead_code)]
pub struct ChartRules {
    pub operator: serde_json::Value,
    pub leader_election: serde_json::Value,
}

/// The chart's default ServiceAccount of the operator (release `pgpilot`).
#[allow(dead_code)]
pub const OPERATOR_SA: &str = "pgpilot";
pub mod rbac;

/// Fails when a value of a Secret of `ns` appears where it must never be (docs/security.md):
/// Events, ConfigMaps, the pods (specs and statuses), the custom resources, `logs` (every
/// container's output: the agents', the operator's in the chart test), and the command line
/// of every process on this machine not running as root (`ps`: the pods' processes). Certificates are public and not searched for; a
/// PEM private key is searched for by each line of its body.
#[allow(dead_code)] // not every test binary uses it
pub async fn assert_no_secret_leaks(client: &kube::Client, ns: &str, logs: &str) {
    use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod, Secret};
    use kube::api::{Api, ListParams};
    use pgpilot_common::crd::{PostgresBackup, PostgresCluster};
    let lp = ListParams::default();
    let mut needles: Vec<(String, String)> = Vec::new();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for s in secrets.list(&lp).await.expect("list Secrets") {
        let name = s.metadata.name.clone().unwrap_or_default();
        for (key, value) in s.data.unwrap_or_default() {
            if key.ends_with(".crt") {
                continue;
            }
            let text = String::from_utf8_lossy(&value.0).to_string();
            let what = format!("Secret {name} key {key}");
            if text.contains("-----BEGIN") {
                for line in text
                    .lines()
                    .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                {
                    needles.push((what.clone(), line.to_string()));
                }
            } else if text.trim().len() >= 8 {
                needles.push((what, text.trim().to_string()));
            }
        }
    }
    assert!(
        !needles.is_empty(),
        "no Secret values in {ns} to search for"
    );
    let mut places: Vec<(String, String)> = vec![("container logs".into(), logs.to_string())];
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    places.push((
        "Events".into(),
        json(&events.list(&lp).await.expect("Events").items),
    ));
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    places.push((
        "ConfigMaps".into(),
        json(&cms.list(&lp).await.expect("ConfigMaps").items),
    ));
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    places.push((
        "Pods".into(),
        json(&pods.list(&lp).await.expect("Pods").items),
    ));
    let pcs: Api<PostgresCluster> = Api::namespaced(client.clone(), ns);
    places.push((
        "PostgresClusters".into(),
        json(&pcs.list(&lp).await.expect("clusters").items),
    ));
    let pbs: Api<PostgresBackup> = Api::namespaced(client.clone(), ns);
    places.push((
        "PostgresBackups".into(),
        json(&pbs.list(&lp).await.expect("backups").items),
    ));
    // The pods' processes: none runs as root (the test's own fixtures, such as the S3 server
    // with its keys on its command line, do).
    let mut cmdlines = String::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let root = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .is_none_or(|l| l.split_whitespace().nth(1) == Some("0"));
        if root {
            continue;
        }
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            cmdlines.push_str(&String::from_utf8_lossy(&raw).replace('\0', " "));
            cmdlines.push('\n');
        }
    }
    places.push(("process command lines".into(), cmdlines));
    let leaks: Vec<String> = needles
        .iter()
        .flat_map(|(what, value)| {
            places
                .iter()
                .filter(|(_, hay)| hay.contains(value.as_str()))
                .map(move |(place, _)| format!("{what} appears in {place}"))
        })
        .collect();
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}

/// Anything serializable, as JSON text.
#[allow(dead_code)]
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
