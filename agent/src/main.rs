//! `pgpilot-agent`: the thin binary. Logic lives in the library.

mod alloc;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use pgpilot_agent::config::RunArgs;
use pgpilot_common::api::{ShutdownMode, ShutdownRequest, StatusResponse};
use pgpilot_common::client::AgentClient;

/// pgpilot-agent owns one PostgreSQL: bootstrap, supervision, backups, restore, reparenting.
#[derive(Debug, Parser)]
#[command(name = "pgpilot-agent", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: bootstrap the data dir if empty, supervise Postgres, serve the API.
    Run(Box<RunArgs>),
    /// Show the agent's and Postgres' status.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        /// Print the raw JSON status.
        #[arg(long)]
        json: bool,
    },
    /// Stop Postgres (the agent keeps running; `start` brings it back).
    Stop {
        #[command(flatten)]
        api: ApiArgs,
        /// Shutdown mode.
        #[arg(long, value_enum, default_value = "fast")]
        mode: Mode,
        /// Cancel a base backup in flight instead of being refused.
        #[arg(long)]
        cancel_backup: bool,
    },
    /// Start Postgres after a stop.
    Start {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Restart Postgres.
    Restart {
        #[command(flatten)]
        api: ApiArgs,
        /// Shutdown mode.
        #[arg(long, value_enum, default_value = "fast")]
        mode: Mode,
        /// Cancel a base backup in flight instead of being refused.
        #[arg(long)]
        cancel_backup: bool,
    },
    /// Re-read [postgres.parameters] from the config file and reload Postgres.
    Reload {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Restore a base backup and replay archived WAL to a target, then promote (Postgres ends
    /// Running(Primary) on a new timeline). Refusals (impossible target, WAL gap, unreadable
    /// backup) come before anything is touched.
    Restore {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        target: pgpilot_agent::restore::cli::RestoreTargetArgs,
        #[command(flatten)]
        options: pgpilot_agent::restore::cli::RestoreOptions,
        /// Replace the data dir of the running cluster (it is deleted).
        #[arg(long)]
        force: bool,
    },
    /// Planned switchover (run against the primary's agent): the named replica, or the best
    /// one, becomes primary; this primary and the other replicas follow it.
    Switchover {
        #[command(flatten)]
        api: ApiArgs,
        /// The replica to promote (its [replication] name). Default: the healthy streaming
        /// replica with the highest received LSN.
        #[arg(long)]
        to: Option<String>,
    },
    /// Promote this replica (low-level step; prefer `switchover`).
    Promote {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop writes on this primary and start it again as a standby (low-level step).
    Demote {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stream from another primary, given by its agent API URL (low-level step).
    Follow {
        #[command(flatten)]
        api: ApiArgs,
        /// The primary's agent API URL, e.g. http://10.0.0.5:8008.
        primary: String,
    },
    /// Throw this replica's data dir away and clone its primary again.
    Reinitialize {
        #[command(flatten)]
        api: ApiArgs,
        /// The primary to clone and follow (agent API URL); default: the one recorded.
        #[arg(long)]
        primary: Option<String>,
    },
    /// Drain this instance before its pod goes (the preStop hook runs `drain --wait`): it stops
    /// competing for leadership, a primary switches over to its best replica, WAL is archived
    /// to the stop point, Postgres stops. Exit codes: 0 drained, 1 the agent could not be
    /// asked, 2 the drain failed or was cancelled, 3 --timeout ran out while still draining.
    Drain {
        #[command(flatten)]
        api: ApiArgs,
        /// Follow the drain until it ends (or --timeout runs out), showing its steps.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this many seconds (the drain goes on). Also the
        /// drain's own timeout when it begins here.
        #[arg(long)]
        timeout: Option<u64>,
        /// Stop the only writer when no replica can take over in time (after archiving).
        #[arg(long)]
        force: bool,
        /// Cancel the drain under way instead (before it stops Postgres).
        #[arg(long, conflicts_with_all = ["wait", "force", "timeout"])]
        cancel: bool,
    },
    /// Install this binary into a directory as `pgpilot-agent` (the operator's init container:
    /// the agent then runs from that shared volume in any Postgres image).
    Install {
        /// The directory (created if missing).
        dir: PathBuf,
    },
    /// Print the OpenAPI document of the agent's HTTP API.
    Openapi,
    /// archive_command: archive one WAL file (`%p`); exit 0 only once stored and verified.
    WalPush {
        /// The agent's runtime file (written by `run`; the rendered archive_command names it).
        #[arg(long, env = "PGPILOT_ARCHIVE_RUNTIME")]
        runtime: PathBuf,
        /// `%p`: the file, relative to the data dir.
        path: String,
        /// Upload to the store without asking the agent (what `pgpilot-wal` runs once the
        /// agent proved unreachable).
        #[arg(long, hide = true)]
        direct: bool,
    },
    /// Take an online base backup (and, by default, follow it with a progress bar).
    Backup {
        #[command(flatten)]
        api: ApiArgs,
        /// Label recorded in backup_label and the manifest.
        #[arg(long)]
        label: Option<String>,
        /// Wait for the backup to end, showing progress (`--wait=false` returns the id at once).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        wait: bool,
    },
    /// List backups and the recoverability window.
    Backups {
        #[command(flatten)]
        api: ApiArgs,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-read a backup (default: the newest complete one) and the WAL it needs, checking every
    /// checksum; exit non-zero on any problem.
    Verify {
        /// The agent's runtime file (store settings): `<state_dir>/run/archive-runtime.json`.
        #[arg(
            long,
            env = "PGPILOT_ARCHIVE_RUNTIME",
            default_value = "./data/run/archive-runtime.json"
        )]
        runtime: PathBuf,
        /// Backup id, e.g. 20261123T181500Z.
        backup_id: Option<String>,
    },
    /// Delete old backups and the WAL only they need.
    Retention {
        /// The agent's runtime file (store settings): `<state_dir>/run/archive-runtime.json`.
        #[arg(
            long,
            env = "PGPILOT_ARCHIVE_RUNTIME",
            default_value = "./data/run/archive-runtime.json"
        )]
        runtime: PathBuf,
        /// Keep the newest N complete backups.
        #[arg(long)]
        keep_last: Option<usize>,
        /// Keep backups that stopped within this long (30m, 12h, 7d, 2w).
        #[arg(long)]
        keep_within: Option<String>,
        /// Print what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// restore_command: restore one WAL file (`%f`) into `%p`; exit 1 quietly when the archive
    /// does not hold it.
    WalFetch {
        /// The agent's runtime file.
        #[arg(long, env = "PGPILOT_ARCHIVE_RUNTIME")]
        runtime: PathBuf,
        /// `%f`: the WAL file name.
        name: String,
        /// `%p`: where to put it, relative to the data dir.
        dest: PathBuf,
        /// Read the store without asking the agent (what `pgpilot-wal` runs once the agent
        /// proved unreachable).
        #[arg(long, hide = true)]
        direct: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Mode {
    Smart,
    Fast,
    Immediate,
}

impl From<Mode> for ShutdownMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Smart => ShutdownMode::Smart,
            Mode::Fast => ShutdownMode::Fast,
            Mode::Immediate => ShutdownMode::Immediate,
        }
    }
}

#[derive(Debug, Args)]
struct ApiArgs {
    /// The agent's API URL.
    #[arg(long, env = "PGPILOT_API_URL", default_value = "http://127.0.0.1:8009")]
    api_url: String,
    /// File holding the API bearer token (routes that change state need it). Default:
    /// ./data/api-token when it exists.
    #[arg(long, env = "PGPILOT_API_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl ApiArgs {
    fn client(&self, needs_token: bool) -> anyhow::Result<AgentClient> {
        let default = PathBuf::from("./data/api-token");
        let path = match &self.token_file {
            Some(p) => Some(p.clone()),
            None => default.exists().then_some(default),
        };
        let token = match (path, needs_token) {
            // The first line: during a rotation the file holds the new token above the old.
            (Some(p), _) => Some(
                pgpilot_agent::secrets::Tokens::load(
                    "API token",
                    &pgpilot_agent::config::SecretFile {
                        path: p,
                        generate_if_missing: false,
                    },
                )?
                .current()
                .expose()
                .to_string(),
            ),
            (None, true) => anyhow::bail!(
                "this command needs the API token: pass --token-file or set PGPILOT_API_TOKEN_FILE"
            ),
            (None, false) => None,
        };
        Ok(AgentClient::new(&self.api_url, token))
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    pgpilot_agent::logging::init();
    // archive_command and restore_command make one loopback call per WAL file: on one thread
    // they skip starting and joining the worker threads, milliseconds a call on a loaded
    // 2-core machine. Their direct fallback still seals chunks on the blocking pool.
    let mut builder = match &cli.command {
        Command::WalPush { .. } | Command::WalFetch { .. } => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder
        .enable_all()
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // Dropping a runtime waits for every blocking task without limit; a codec worker of
    // abandoned work must not keep the process alive after its command is done.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_BOUND);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line, no backtrace: these are user-facing errors.
            eprintln!("error: {e:#}");
            match e.downcast_ref::<pgpilot_agent::drain::cli::Unfinished>() {
                Some(u) => std::process::ExitCode::from(u.code),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

/// How long an idle blocking thread (a codec worker) lives on; Tokio's default is 10 s. Each
/// holds its stack and cached zstd contexts, so the agent's memory only falls back after this.
const BLOCKING_THREAD_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(3);

/// How long the process waits, after its command ended, for blocking tasks still running.
const RUNTIME_SHUTDOWN_BOUND: std::time::Duration = std::time::Duration::from_secs(2);

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            alloc::trim_periodically();
            pgpilot_agent::run(*args).await
        }
        Command::Status { api, json } => {
            let client = api.client(false)?;
            let status = client.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_status(client.base_url(), &status));
            }
            Ok(())
        }
        Command::Stop {
            api,
            mode,
            cancel_backup,
        } => {
            let r = api
                .client(true)?
                .stop(&ShutdownRequest {
                    mode: mode.into(),
                    cancel_backup,
                })
                .await?;
            println!("Postgres stopped; agent state {}", r.state);
            Ok(())
        }
        Command::Start { api } => {
            let r = api.client(true)?.start().await?;
            println!(
                "Postgres started (pid {}); agent state {}",
                fmt_opt(r.postmaster_pid),
                r.state
            );
            Ok(())
        }
        Command::Restart {
            api,
            mode,
            cancel_backup,
        } => {
            let r = api
                .client(true)?
                .restart(&ShutdownRequest {
                    mode: mode.into(),
                    cancel_backup,
                })
                .await?;
            println!(
                "Postgres restarted (pid {}); agent state {}",
                fmt_opt(r.postmaster_pid),
                r.state
            );
            Ok(())
        }
        Command::Backup { api, label, wait } => {
            pgpilot_agent::archive::cli::backup(&api.client(true)?, label, wait).await
        }
        Command::Backups { api, json } => {
            pgpilot_agent::archive::cli::backups(&api.client(false)?, json).await
        }
        Command::Verify { runtime, backup_id } => {
            pgpilot_agent::archive::cli::verify(&runtime, backup_id.as_deref()).await
        }
        Command::Retention {
            runtime,
            keep_last,
            keep_within,
            dry_run,
        } => {
            pgpilot_agent::archive::cli::retention(
                &runtime,
                keep_last,
                keep_within.as_deref(),
                dry_run,
            )
            .await
        }
        Command::WalPush {
            runtime,
            path,
            direct,
        } => {
            use pgpilot_agent::archive::cmd::{self as wal, Route};
            wal::wal_push(&runtime, &path, Route::from_direct_flag(direct)).await
        }
        Command::WalFetch {
            runtime,
            name,
            dest,
            direct,
        } => {
            use pgpilot_agent::archive::cmd::{self as wal, Fetched, Route};
            match wal::wal_fetch(&runtime, &name, &dest, Route::from_direct_flag(direct)).await {
                Ok(Fetched::Done) => Ok(()),
                // Postgres asks for files past the end of the archive on purpose; say nothing.
                Ok(Fetched::Missing) => std::process::exit(1),
                // Postgres runs restore_command in the data dir.
                Err(e) if wal::in_archive_recovery(std::path::Path::new(".")) => {
                    eprintln!(
                        "error: {e:#}; stopping recovery here rather than ending it early at {name} (exit {})",
                        wal::FETCH_FATAL_EXIT
                    );
                    std::process::exit(wal::FETCH_FATAL_EXIT.into())
                }
                Err(e) => Err(e),
            }
        }
        Command::Restore {
            api,
            target,
            options,
            force,
        } => {
            let req = target.request(&options, force);
            pgpilot_agent::restore::cli::run_restore(&api.client(true)?, &req).await
        }
        Command::Openapi => {
            print!("{}", pgpilot_agent::http::openapi::document());
            Ok(())
        }
        Command::Install { dir } => {
            let path = pgpilot_agent::install::install_named(&dir)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Drain {
            api,
            wait,
            timeout,
            force,
            cancel,
        } => {
            let client = api.client(true)?;
            if cancel {
                let st = client.cancel_drain().await.context("cancel the drain")?;
                println!("drain cancelled: {}", st.message);
                return Ok(());
            }
            let req = pgpilot_common::api::DrainRequest {
                force,
                timeout_secs: timeout,
            };
            let st = pgpilot_agent::drain::cli::drain(
                &client,
                &req,
                wait,
                timeout.map(std::time::Duration::from_secs),
            )
            .await?;
            match st.state {
                pgpilot_common::state::DrainState::Drained => println!("{}", st.message),
                _ => println!(
                    "draining ({}): {}",
                    st.step.as_deref().unwrap_or("-"),
                    st.message
                ),
            }
            Ok(())
        }
        Command::Switchover { api, to } => {
            let client = api.client(true)?;
            eprintln!(
                "switchover to {} ...",
                to.as_deref().unwrap_or("the best replica")
            );
            let r = client
                .switchover(&pgpilot_common::api::SwitchoverRequest { candidate: to })
                .await
                .context("switchover")?;
            println!(
                "{} is the primary (timeline {}); {} follows it; writes paused {} ms, {} ms in all",
                r.new_primary,
                fmt_opt(r.timeline),
                r.followers.join(", "),
                r.write_pause_ms,
                r.duration_ms
            );
            for n in &r.not_followed {
                println!("not re-pointed: {n}");
            }
            Ok(())
        }
        Command::Reinitialize { api, primary } => {
            eprintln!("reinitializing: cloning the primary again ...");
            let client = api.client(true)?;
            let r = pgpilot_agent::replication::cli::reinitialize(
                &client,
                &pgpilot_common::api::ReinitializeRequest { primary },
            )
            .await
            .context("reinitialize")?;
            println!(
                "reinitialized; following {}; agent state {}",
                r.upstream.as_deref().unwrap_or("-"),
                r.state
            );
            Ok(())
        }
        Command::Promote { api } => {
            let r = api.client(true)?.promote().await.context("promote")?;
            println!(
                "promoted; agent state {}, timeline {}",
                r.state,
                fmt_opt(r.timeline)
            );
            Ok(())
        }
        Command::Demote { api } => {
            let r = api.client(true)?.demote().await.context("demote")?;
            println!(
                "demoted at checkpoint {}; agent state {}",
                r.checkpoint_lsn.as_deref().unwrap_or("-"),
                r.state
            );
            Ok(())
        }
        Command::Follow { api, primary } => {
            let r = api
                .client(true)?
                .follow(&pgpilot_common::api::FollowRequest { primary })
                .await
                .context("follow")?;
            println!(
                "following {}; agent state {}",
                r.upstream.as_deref().unwrap_or("-"),
                r.state
            );
            Ok(())
        }
        Command::Reload { api } => {
            let r = api.client(true)?.reload().await.context("reload")?;
            println!(
                "reloaded; changed: {}",
                if r.changed.is_empty() {
                    "nothing".into()
                } else {
                    r.changed.join(", ")
                }
            );
            if !r.pending_restart.is_empty() {
                println!(
                    "needs a restart to take effect: {}",
                    r.pending_restart.join(", ")
                );
            }
            Ok(())
        }
    }
}

fn fmt_opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

fn fmt_secs(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn render_operation(op: &pgpilot_common::state::Operation) -> String {
    let p = &op.progress;
    let mut line = format!("{} {}: {} ({:?})", op.kind, op.id, op.step, op.outcome);
    if p.files_total > 0 {
        line += &format!(", {}/{} files", p.files_done, p.files_total);
    }
    if p.bytes_total > 0 {
        line += &format!(
            ", {:.0} %",
            100.0 * p.bytes_done as f64 / p.bytes_total as f64
        );
    }
    if let Some(e) = &op.error {
        line += &format!(": {e}");
    }
    line
}

fn render_status(url: &str, s: &StatusResponse) -> String {
    let mut out = format!("pgpilot-agent at {url}\n");
    out += &format!("  state:     {}\n", s.state);
    if let Some(op) = &s.operation {
        out += &format!("  operation: {}\n", render_operation(op));
    }
    // The drain, once there is something to say (under way, done, failed or cancelled).
    if s.drain.state != pgpilot_common::state::DrainState::Running || s.drain.step.is_some() {
        out += &format!(
            "  drain:     {} ({}): {}\n",
            s.drain.state,
            s.drain.step.as_deref().unwrap_or("-"),
            s.drain.message
        );
    }
    if !s.pending_restart.is_empty() {
        out += &format!("  pending restart: {}\n", s.pending_restart.join(", "));
    }
    out += &format!(
        "  postgres:  {} (major {}), pid {}, port {}, up {}\n",
        s.postgres_version.as_deref().unwrap_or("-"),
        s.postgres_major,
        fmt_opt(s.postmaster_pid),
        s.postgres_port,
        s.postgres_uptime_seconds
            .map(fmt_secs)
            .unwrap_or_else(|| "-".into())
    );
    out += &format!("  data dir:  {}\n", s.data_dir);
    out += &format!(
        "  WAL:       timeline {}, current {}, flushed {}\n",
        fmt_opt(s.timeline),
        s.current_lsn.as_deref().unwrap_or("-"),
        s.flushed_lsn.as_deref().unwrap_or("-")
    );
    out += &format!(
        "  restarts:  {} after crashes, {} requested\n",
        s.crash_restarts, s.requested_restarts
    );
    if let Some(f) = &s.last_failure {
        out += &format!("  last failure: {f}\n");
    }
    if let Some(r) = &s.replication {
        out += &format!("  instance:  {}", r.name);
        match &r.upstream {
            Some(u) => {
                out += &format!(
                    ", follows {u}, {}, received {}, replayed {}, lag {} bytes / {}\n",
                    if r.streaming {
                        "streaming"
                    } else {
                        "NOT streaming"
                    },
                    r.receive_lsn.as_deref().unwrap_or("-"),
                    r.replay_lsn.as_deref().unwrap_or("-"),
                    fmt_opt(r.lag_bytes),
                    r.lag_seconds
                        .map(|s| format!("{s:.1}s"))
                        .unwrap_or_else(|| "-".into())
                );
            }
            None => out.push('\n'),
        }
        for rep in &r.replicas {
            out += &format!(
                "  replica:   {} {} from {}, replayed {}, lag {} bytes\n",
                rep.name,
                rep.state,
                rep.client_addr.as_deref().unwrap_or("local"),
                rep.replay_lsn.as_deref().unwrap_or("-"),
                fmt_opt(rep.lag_bytes)
            );
        }
        for slot in &r.slots {
            out += &format!(
                "  slot:      {} ({}), keeps {} bytes of WAL\n",
                slot.name,
                if slot.active { "active" } else { "inactive" },
                fmt_opt(slot.retained_bytes)
            );
        }
    }
    if let Some(b) = &s.last_backup {
        out += &format!("  last backup: {} (stopped {})\n", b.id, b.time);
    }
    out += &format!("  agent up:  {}\n", fmt_secs(s.agent_uptime_seconds));
    out
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
