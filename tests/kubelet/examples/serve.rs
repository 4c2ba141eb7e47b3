//! A test API server with the test kubelet running its pods, until interrupted: what the
//! Kubernetes suites run against when `KUBECONFIG` names it, to exercise their real-cluster path
//! on one machine (docs/kubelet.md). Images: `pgpilot/agent:*` is the agent binary
//! (`PGPILOT_AGENT_BIN`, default `target/debug/pgpilot-agent`), `postgres:*` the server binaries
//! in `PGPILOT_PG_BIN` (default `/usr/lib/postgresql/15/bin`).
//!
//! ```sh
//! cargo build -p pgpilot-agent
//! cargo run -p pgpilot-test-kubelet --example serve &     # prints the kubeconfig path
//! KUBECONFIG=<that path> cargo nextest run -p pgpilot-operator
//! ```

use pgpilot_test_kubelet::{ImageTable, start_cluster};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    pgpilot_kube_testserver::install_crypto_provider();
    let agent =
        std::env::var("PGPILOT_AGENT_BIN").unwrap_or_else(|_| "target/debug/pgpilot-agent".into());
    let agent = std::path::absolute(&agent)?;
    anyhow::ensure!(
        agent.exists(),
        "{} is missing: cargo build -p pgpilot-agent (or set PGPILOT_AGENT_BIN)",
        agent.display()
    );
    let pg_bin =
        std::env::var("PGPILOT_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    let images = ImageTable::new()
        .binary("pgpilot/agent:*", agent)
        .directory("postgres:*", &pg_bin, None);
    let (server, _kubelet) = start_cluster(images).await?;
    println!("url: {}", server.url());
    println!("kubeconfig: {}", server.kubeconfig_path().display());
    // SIGINT or SIGTERM: return, so the kubelet stops its pods and removes its directory.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
