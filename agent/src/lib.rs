//! pgpilot-agent: runs beside PostgreSQL (as its parent process) and owns it: bootstrap,
//! supervision, the HTTP API, and in later parts archiving, restore and reparenting.
//!
//! [`run`] is the `pgpilot-agent run` command: validate, lock the data dir, bootstrap if
//! needed, then supervise Postgres and serve the API until SIGTERM or SIGINT.
#![deny(unsafe_code)]

pub mod archive;
pub mod config;
pub mod context;
pub mod core;
pub mod databases;
pub mod drain;
pub mod error;
pub mod files;
pub mod http;
pub mod install;
pub mod logging;
pub mod metrics;
pub mod postgres;
pub mod replication;
pub mod restore;
pub mod secrets;
pub mod store;
pub mod time;
pub mod units;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use pgpilot_common::state::AgentState;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RunArgs};
use crate::core::executor::Begin;
use crate::postgres::OsUser;
use crate::postgres::bins::PgBinaries;
use crate::postgres::bootstrap::{self, DataDirState};

/// How long, once Postgres has stopped, the agent waits for abandoned background work to unwind
/// (normally at once: each task is dropped at its next poll).
const BACKGROUND_SHUTDOWN_BOUND: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs the agent until a termination signal, then stops Postgres (fast) and returns.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut cfg = Config::load(&args)?;
    let owner = OsUser::for_postgres(&cfg.postgres_user)?;
    let bins = PgBinaries::discover(cfg.pg_bin_dir.as_deref())?;
    tracing::info!(bin_dir = %bins.bin_dir.display(), version = %bins.version, "PostgreSQL binaries");

    std::fs::create_dir_all(&cfg.state_dir).with_context(|| {
        format!(
            "cannot create the state dir {}; is its parent writable?",
            cfg.state_dir.display()
        )
    })?;
    let _lock = lock_data_dir(&cfg)?;
    bootstrap::check_reachable(&cfg.data_dir, owner.as_ref())?;
    check_writable(&cfg.state_dir)?;

    let api_token = secrets::Tokens::load("API token", &cfg.api_token)?;
    let superuser_password = secrets::load("superuser password", &cfg.superuser_password)?;
    let replication_password = secrets::load("replication password", &cfg.replication_password)?;

    let loopback = bind(cfg.api_loopback_listen, "api_loopback_listen").await?;
    let external = bind(cfg.api_listen, "api_listen").await?;

    postgres::process::stop_leftover_postmaster(&cfg.data_dir).await?;
    check_port_free(cfg.postgres_port)?;
    bootstrap::prepare_dir(&cfg.socket_dir(), 0o755, owner.as_ref())?;
    // Postgres' copy of the certificate, before a clone's pg_basebackup needs its CA.
    postgres::tls::install(&cfg, owner.as_ref())
        .map_err(|e| anyhow::anyhow!("[tls] for Postgres: {e}"))?;

    let data_state = bootstrap::inspect(&cfg.data_dir, &bins)?;
    let initial_restore = if args.bootstrap_from_backup {
        if cfg.backup.is_none() {
            anyhow::bail!(
                "--bootstrap-from-backup needs a backup store: set [backup] store or --backup-store"
            );
        }
        if data_state != DataDirState::Empty {
            anyhow::bail!(
                "--bootstrap-from-backup restores only into an empty data dir, and {} holds a cluster; \
                 use `pgpilot-agent restore --force` against a running agent to replace it",
                cfg.data_dir.display()
            );
        }
        Some(args.restore_target.request(&args.restore_options, false))
    } else {
        None
    };
    if data_state == DataDirState::Empty {
        check_writable(cfg.data_dir.parent().unwrap_or(Path::new("/")))?;
    }

    if cfg.backup.is_some() {
        // archive_command runs as the Postgres user: it must be able to run this binary.
        cfg.archive_exes = Some(install::exes_for_postgres(&cfg.state_dir, owner.as_ref())?);
    }
    let metrics = metrics::Metrics::new();
    let tls = match &cfg.tls {
        Some(t) => Some(
            http::tls::ServerTls::load(t, &metrics).map_err(|e| anyhow::anyhow!("[tls]: {e}"))?,
        ),
        None => None,
    };
    let shutdown = CancellationToken::new();
    let background = archive::background::Background::new(shutdown.clone());
    let (archiver, fetcher) = match &cfg.backup {
        Some(store_cfg) => {
            let (a, f) = open_archive(
                &cfg,
                store_cfg,
                &api_token.current(),
                owner.as_ref(),
                &metrics,
                &background,
            )?;
            (Some(a), Some(f))
        }
        None => (None, None),
    };
    let kube = match &cfg.kubernetes {
        Some(k) => {
            let lead = Arc::new(replication::lease::KubeLeadership::connect(&cfg, k).await?);
            let held = lead
                .settle(&cfg, data_state == DataDirState::Empty)
                .await
                .context("Kubernetes mode: settling leadership through the Lease")?;
            Some((lead, held))
        }
        None => None,
    };
    let ctx = context::Context::new(
        cfg,
        bins,
        owner,
        superuser_password,
        replication_password,
        api_token,
        metrics,
        archiver,
        fetcher,
    );
    let ctx = Arc::new(match &kube {
        Some((lead, _)) => ctx.with_kube(lead.clone()),
        None => ctx,
    });
    // `[bootstrap]`: the first instance of a new shard (the one that leads it) restores
    // another cluster's archive; `--bootstrap-from-backup` reads it too when it is configured.
    let bootstrap_restore = initial_restore.is_none()
        && data_state == DataDirState::Empty
        && ctx.cfg.bootstrap.is_some()
        && ctx.is_leader();
    let source = match &ctx.cfg.bootstrap {
        Some(b) if bootstrap_restore || initial_restore.is_some() => {
            Some(Box::new(restore_source(&ctx.cfg, b)?))
        }
        _ => None,
    };
    let initial_restore = match (initial_restore, &ctx.cfg.bootstrap) {
        (None, Some(b)) if bootstrap_restore => Some(pgpilot_common::api::RestoreRequest {
            target: match &b.target_time {
                Some(time) => pgpilot_common::api::RestoreTarget::Time { time: time.clone() },
                None => pgpilot_common::api::RestoreTarget::Latest,
            },
            backup_id: None,
            inclusive: None,
            timeline: None,
            force: false,
            cancel_backup: false,
        }),
        (r, _) => r,
    };
    let begin = match (data_state, initial_restore) {
        (_, Some(req)) => Begin::Restore(Box::new(req), source),
        // Another instance leads the shard: an empty data dir is a new replica of it.
        (DataDirState::Empty, None) if !ctx.is_leader() => Begin::Clone,
        (DataDirState::Empty, None) => Begin::Initdb,
        _ => Begin::Existing,
    };
    let (handle, executor) = core::new(ctx.clone(), AgentState::Initializing);
    if let Some(tls) = &tls {
        // A new certificate reaches Postgres too: its copy is rewritten and Postgres reloaded.
        let h = handle.clone();
        let postgres = postgres::tls::enabled(&ctx.cfg).is_some();
        tokio::spawn(tls.clone().watch(shutdown.clone(), move || {
            if postgres {
                let h = h.clone();
                tokio::spawn(async move {
                    match h.reload().await {
                        Ok(_) => tracing::info!("Postgres reloaded with the new TLS certificate"),
                        Err(e) => {
                            tracing::debug!("Postgres not reloaded for the new certificate: {e}")
                        }
                    }
                });
            }
        }));
    }
    let server = tokio::spawn(http::server::serve(
        handle.clone(),
        loopback,
        external,
        tls,
        shutdown.clone(),
    ));
    tokio::spawn(watch_signals(shutdown.clone()));
    if let Some(archiver) = &ctx.archiver {
        tokio::spawn(archiver.clone().run_background(shutdown.clone()));
    }
    tokio::spawn(announce_when_running(handle.clone()));
    tokio::spawn(reload_tokens(ctx.clone(), shutdown.clone()));
    if let Some((lead, held)) = kube {
        tokio::spawn(drain::watch_annotation(
            handle.clone(),
            lead.clone(),
            shutdown.clone(),
        ));
        if let Some(interval) = lead.settings.catalog_interval {
            tokio::spawn(databases::run(
                handle.clone(),
                lead.clone(),
                interval,
                shutdown.clone(),
            ));
        }
        tokio::spawn(replication::failover::run(
            handle.clone(),
            lead,
            held,
            shutdown.clone(),
        ));
    }
    let result = executor.run(begin, shutdown.clone()).await;
    shutdown.cancel();
    // Postgres has stopped: nobody waits for uploads, prefetches or a backup any more.
    background.shutdown(BACKGROUND_SHUTDOWN_BOUND).await;
    server
        .await
        .context("API server task")?
        .context("API server")?;
    if let Err(reason) = result {
        anyhow::bail!("{reason}");
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// How often the API token file is re-read.
pub const TOKEN_RELOAD: std::time::Duration = std::time::Duration::from_secs(2);

/// Re-reads the API token file every [`TOKEN_RELOAD`], so a rotation (docs/security.md) needs no
/// restart; `wal-push`'s runtime file follows the first token.
async fn reload_tokens(ctx: Arc<context::Context>, shutdown: CancellationToken) {
    let reload = || ctx.api_token.reload().map_err(|e| e.to_string());
    let changed = || {
        ctx.metrics.api_token_reloads.inc();
        tracing::info!(
            accepted = ctx.api_token.count(),
            path = %ctx.cfg.api_token.path.display(),
            "API tokens reloaded"
        );
        if ctx.cfg.backup.is_some()
            && let Err(e) = archive::runtime::ArchiveRuntime::rotate_token(
                &ctx.cfg,
                ctx.api_token.current().expose(),
                ctx.owner.as_ref(),
            )
        {
            tracing::error!("API token rotation: {e}");
        }
    };
    reload_every(
        TOKEN_RELOAD,
        shutdown,
        "cannot reload the API tokens (the accepted ones stay)",
        reload,
        changed,
    )
    .await
}

/// Calls `reload` every `period` until `shutdown`, and `changed` when it reports a change. A
/// failure is logged (after `failure`) once, until it changes or clears: what is in use stays.
pub(crate) async fn reload_every(
    period: std::time::Duration,
    shutdown: CancellationToken,
    failure: &str,
    mut reload: impl FnMut() -> Result<bool, String>,
    mut changed: impl FnMut(),
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match reload() {
            Ok(true) => {
                last_error = None;
                changed();
            }
            Ok(false) => last_error = None,
            Err(why) => {
                if last_error.as_ref() != Some(&why) {
                    tracing::warn!("{failure}: {why}");
                }
                last_error = Some(why);
            }
        }
    }
}

/// The archive a `[bootstrap]` restore reads.
fn restore_source(
    cfg: &Config,
    b: &config::BootstrapSection,
) -> anyhow::Result<core::executor::RestoreSource> {
    let store_cfg = b
        .store
        .clone()
        .expect("checked at load: the source store is set");
    let shard = b.shard.clone().unwrap_or_else(|| cfg.cluster.shard.clone());
    let store = store::Store::open(&store_cfg).context("[bootstrap] store")?;
    let layout =
        pgpilot_common::layout::Layout::new(&b.cluster, &shard).map_err(anyhow::Error::msg)?;
    Ok(core::executor::RestoreSource {
        store,
        layout,
        fetch_from: archive::runtime::FetchSource {
            store: store_cfg,
            cluster: b.cluster.clone(),
            shard,
        },
    })
}

/// Opens the backup store and sets up WAL archiving and fetching: the runtime file that
/// archive_command and restore_command read, the archiver and the fetcher.
fn open_archive(
    cfg: &Config,
    store_cfg: &store::StoreConfig,
    token: &secrets::Secret,
    owner: Option<&OsUser>,
    metrics: &metrics::Metrics,
    background: &archive::background::Background,
) -> anyhow::Result<(
    Arc<archive::push::WalArchiver>,
    Arc<archive::fetch::WalFetcher>,
)> {
    let store = store::Store::open(store_cfg).context("backup store")?;
    let layout = pgpilot_common::layout::Layout::new(&cfg.cluster.name, &cfg.cluster.shard)
        .map_err(anyhow::Error::msg)?;
    archive::runtime::ArchiveRuntime::write(cfg, store_cfg, token.expose(), owner, None)
        .context("writing the archive runtime file")?;
    let concurrency = cfg
        .archive
        .push_concurrency
        .unwrap_or(store.upload_concurrency());
    let archiver = archive::push::WalArchiver::new(
        store.clone(),
        layout.clone(),
        &cfg.data_dir,
        concurrency,
        cfg.archive.verify,
        metrics.archive.clone(),
        background.clone(),
    );
    let fetcher = archive::fetch::WalFetcher::new(
        store,
        layout,
        &cfg.data_dir,
        cfg.archive.prefetch,
        owner.cloned(),
        metrics.archive.clone(),
        background.clone(),
    );
    fetcher
        .reset_spool()
        .context("clearing the WAL prefetch spool")?;
    tracing::info!(store = %store_cfg, concurrency, "WAL archiving enabled");
    Ok((archiver, fetcher))
}

/// One agent per data dir: an exclusive flock held for the agent's life (released by the
/// kernel when the process dies, however it dies).
fn lock_data_dir(cfg: &Config) -> anyhow::Result<Flock<std::fs::File>> {
    let path = cfg.lock_file();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            use std::io::{Seek, Write};
            let mut f: &std::fs::File = &lock;
            f.set_len(0)?;
            f.seek(std::io::SeekFrom::Start(0))?;
            writeln!(f, "{}", std::process::id())?;
            Ok(lock)
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!(
                "another pgpilot-agent (pid {}) already runs on data dir {} (lock {}); stop it first",
                holder.trim(),
                cfg.data_dir.display(),
                path.display()
            )
        }
        Err((_, e)) => Err(anyhow::anyhow!("cannot lock {}: {e}", path.display())),
    }
}

fn check_writable(dir: &Path) -> anyhow::Result<()> {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK)
        .with_context(|| format!("directory {} is not writable by the agent", dir.display()))
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} ({key}): is another agent or program using the port? choose another with --{}", key.replace('_', "-"))
    })
}

fn check_port_free(port: u16) -> anyhow::Result<()> {
    std::net::TcpListener::bind(("127.0.0.1", port)).map(drop).with_context(|| {
        format!("PostgreSQL port {port} is already in use on 127.0.0.1 (another PostgreSQL?); choose another with --postgres-port")
    })
}

async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping Postgres (fast) and exiting"),
        _ = int.recv() => tracing::info!("SIGINT: stopping Postgres (fast) and exiting"),
    }
    shutdown.cancel();
}

/// Prints how to connect, once, when Postgres first accepts connections.
async fn announce_when_running(handle: core::Handle) {
    let mut rx = handle.subscribe();
    if rx
        .wait_for(|s| matches!(s.state, AgentState::Running { .. }))
        .await
        .is_err()
    {
        return;
    }
    let cfg = &handle.ctx.cfg;
    let host = if cfg
        .postgres_listen_addresses
        .split(',')
        .any(|a| a.trim() == "*" || a.trim() == "0.0.0.0")
    {
        "127.0.0.1".to_string()
    } else {
        cfg.postgres_listen_addresses
            .split(',')
            .next()
            .unwrap_or("127.0.0.1")
            .trim()
            .to_string()
    };
    let pw: PathBuf = cfg.superuser_password.path.clone();
    println!(
        "\npgpilot-agent: PostgreSQL {} is running.\n  psql: PGPASSWORD=\"$(cat {})\" psql -h {host} -p {} -U {} postgres\n  API:  {}://{}/v1/status  (loopback http://{}; token in {})\n",
        handle.ctx.bins.major,
        pw.display(),
        cfg.postgres_port,
        cfg.superuser,
        cfg.api_scheme(),
        cfg.api_listen,
        cfg.api_loopback_listen,
        cfg.api_token.path.display(),
    );
}
