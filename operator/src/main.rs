//! `pgpilot-operator`: `run` reconciles PostgresCluster resources (docs/operator.md); `crds`
//! prints the CRD manifests generated from the types.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgpilot_operator::controller::{self, Ctx};
use pgpilot_operator::metrics::Metrics;
use pgpilot_operator::objects::Options;

/// pgpilot-operator: turns PostgresCluster resources into running shards.
#[derive(Debug, Parser)]
#[command(name = "pgpilot-operator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Reconcile PostgresCluster resources in every namespace the service account can see (or
    /// in one, `--watch-namespace`).
    Run {
        /// Watch and act in this namespace only (a Role instead of a ClusterRole suffices).
        #[arg(long, env = "PGPILOT_WATCH_NAMESPACE")]
        watch_namespace: Option<String>,
        /// `/metrics` and `/healthz`.
        #[arg(long, env = "PGPILOT_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// The agent image for clusters that name none.
        #[arg(long, env = "PGPILOT_AGENT_IMAGE")]
        agent_image: Option<String>,
        /// Where Postgres images keep their binaries (`{major}` is replaced).
        #[arg(
            long,
            env = "PGPILOT_PG_BIN_DIR",
            default_value = "/usr/lib/postgresql/{major}/bin"
        )]
        pg_bin_dir: String,
        /// Networks allowed to connect to Postgres (password authentication), comma-separated.
        #[arg(
            long,
            env = "PGPILOT_ALLOW_NETWORKS",
            value_delimiter = ',',
            default_value = "0.0.0.0/0,::/0"
        )]
        allow_networks: Vec<String>,
        /// The drain's timeout in the pods (their grace period is 30 s more).
        #[arg(long, default_value_t = 300)]
        drain_timeout_secs: u64,
        /// Life of the agents' certificates the operator issues (`spec.tls.mode: operator`), in
        /// days; each is renewed in its last third, at most 30 days before it ends.
        #[arg(long, env = "PGPILOT_AGENT_CERT_DAYS", default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=3650))]
        agent_cert_days: u64,
        /// The user id the Postgres images run Postgres as (999 in the Debian-based `postgres`
        /// images, 70 in the Alpine ones): the agents' pods run as it, never as root.
        #[arg(long, env = "PGPILOT_POSTGRES_UID", default_value_t = 999, value_parser = clap::value_parser!(u32).range(1..))]
        postgres_uid: u32,
        /// Namespace of the leader-election Lease `pgpilot-operator`.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// This replica's identity in the election; default the pod name, else host and pid.
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
    },
    /// A cluster's rollout at a glance: each shard's pods with role, readiness and revision,
    /// and the plan (in-cluster config or KUBECONFIG).
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Print the CRD manifests (YAML, one document each) generated from the types.
    Crds {
        /// Write one file per CRD into this directory instead.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Print the rollout status of one PostgresCluster.
    Status {
        cluster: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Rollout {
            command: RolloutCommand::Status { cluster, namespace },
        } => tokio::runtime::Runtime::new()?.block_on(rollout_status(&cluster, &namespace)),
        Command::Crds { dir } => {
            for (file, body) in pgpilot_operator::crds::manifests() {
                match &dir {
                    Some(d) => {
                        std::fs::create_dir_all(d)?;
                        std::fs::write(d.join(file), body)?;
                    }
                    None => print!("---\n{body}"),
                }
            }
            Ok(())
        }
        Command::Run {
            watch_namespace,
            listen,
            agent_image,
            pg_bin_dir,
            allow_networks,
            drain_timeout_secs,
            agent_cert_days,
            postgres_uid,
            lease_namespace,
            identity,
        } => {
            init_logging();
            let mut opts = Options {
                pg_bin_dir,
                allow_networks,
                drain_timeout_secs,
                watch_namespace,
                agent_cert_lifetime: std::time::Duration::from_secs(agent_cert_days * 86400),
                postgres_uid,
                ..Options::default()
            };
            if let Some(i) = agent_image {
                opts.agent_image = i;
            }
            let identity = identity.unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                format!("{}-{}", host.trim(), std::process::id())
            });
            let election = pgpilot_operator::leader::Election::new(&lease_namespace, &identity);
            tokio::runtime::Runtime::new()?.block_on(run(listen, opts, election))
        }
    }
}

async fn rollout_status(cluster: &str, ns: &str) -> anyhow::Result<()> {
    use kube::api::{Api, ListParams};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API server (in-cluster config or KUBECONFIG)")?;
    let clusters: Api<pgpilot_common::crd::PostgresCluster> = Api::namespaced(client.clone(), ns);
    let pc = clusters
        .get_opt(cluster)
        .await?
        .with_context(|| format!("no PostgresCluster {ns}/{cluster}"))?;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client, ns);
    let sel = format!("{}={cluster}", pgpilot_common::names::LABEL_CLUSTER);
    let list = pods.list(&ListParams::default().labels(&sel)).await?;
    print!("{}", render(&pc, &list.items));
    Ok(())
}

/// `pgpilot-operator rollout status`: each shard's pods with role, readiness and revision,
/// and the plan, at a glance.
fn render(
    pc: &pgpilot_common::crd::PostgresCluster,
    pods: &[k8s_openapi::api::core::v1::Pod],
) -> String {
    use kube::ResourceExt;
    use pgpilot_common::names::LABEL_SHARD;
    use pgpilot_operator::controller::{pod_ready, pod_role};
    use pgpilot_operator::rollout::Settings;
    let r = pc
        .status
        .as_ref()
        .and_then(|s| s.rollout.clone())
        .unwrap_or_default();
    let target = r.target_revision.as_deref().unwrap_or("?");
    let s = Settings::of(pc.spec.rollout.as_ref());
    let mut out = format!(
        "cluster {}: rollout {}, target revision {target} ({:?}, canary shards {}, release {})\n",
        pc.name_any(),
        if r.phase.is_empty() {
            "unknown"
        } else {
            &r.phase
        },
        s.mode,
        s.canaries,
        s.release.as_deref().unwrap_or("none"),
    );
    if let Some(step) = &r.step {
        out += &format!("step: {step}\n");
    }
    if let Some(reason) = &r.reason {
        out += &format!("halted: {reason}\n");
    }
    out += &format!(
        "{:<10} {:<12} {:<32} {:<8} {:<6} REVISION\n",
        "SHARD", "SHARD STATE", "POD", "ROLE", "READY"
    );
    for shard in pc.spec.shard_names() {
        let state = if r.completed_shards.contains(&shard) {
            "done"
        } else if r.current_shard.as_deref() == Some(shard.as_str()) {
            "rolling"
        } else {
            "waiting"
        };
        let mut mine: Vec<&k8s_openapi::api::core::v1::Pod> = pods
            .iter()
            .filter(|p| p.labels().get(LABEL_SHARD) == Some(&shard))
            .collect();
        mine.sort_by_key(|p| p.name_any());
        for p in mine {
            let rev = p
                .labels()
                .get(pgpilot_operator::objects::LABEL_REVISION)
                .map_or("?", String::as_str);
            out += &format!(
                "{:<10} {:<12} {:<32} {:<8} {:<6} {rev}{}\n",
                shard,
                state,
                p.name_any(),
                pod_role(p).unwrap_or("-"),
                if pod_ready(p) { "yes" } else { "no" },
                if rev == target { "" } else { " (old)" },
            );
        }
    }
    out
}

/// JSON logs in a pod, human ones elsewhere.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGPILOT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(
    listen: SocketAddr,
    opts: Options,
    election: pgpilot_operator::leader::Election,
) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API server (in-cluster config or KUBECONFIG)")?;
    let metrics = Metrics::new();
    let ctx = Arc::new(Ctx::new(client, opts, metrics.clone()));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server: {e}");
        }
    });
    tracing::info!(%listen, identity = %election.identity, "pgpilot-operator running; waiting to lead");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        on_signal.cancel();
    });
    pgpilot_operator::leader::run(ctx.client.clone(), election, shutdown, move |lost| {
        controller::run(ctx, lost)
    })
    .await
    .map_err(|why| {
        anyhow::anyhow!("leadership lost: {why}; exiting so that a follower takes over")
    })?;
    tracing::info!("pgpilot-operator stopped");
    Ok(())
}
