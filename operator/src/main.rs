//! `pgpilot-operator`: turns PostgresCluster resources into per-shard workloads. The reconciler
//! arrives with the operator issue; for now the binary only identifies itself.

use clap::Parser;

/// pgpilot-operator: reconciles PostgresCluster resources (work in progress).
#[derive(Debug, Parser)]
#[command(name = "pgpilot-operator", version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("pgpilot-operator has no reconciler yet; see the operator issue")
}
