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
