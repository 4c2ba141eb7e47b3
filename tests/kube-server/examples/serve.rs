//! Runs a test API server until interrupted, for poking at it by hand:
//! `cargo run -p pgpilot-kube-testserver --example serve`, then
//! `kubectl --kubeconfig <printed path> get ns`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = pgpilot_kube_testserver::KubeTestServer::start().await?;
    println!("url: {}", server.url());
    println!("kubeconfig: {}", server.kubeconfig_path().display());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
