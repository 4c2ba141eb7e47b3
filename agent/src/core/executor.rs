//! The executor: the one task that owns the postmaster and every long operation. One loop waits
//! for the next event (a request, the postmaster's exit, a tick, the end of a crash backoff, an
//! operation's task ending, shutdown); requests go through [`admit`] and the admitted step is
//! carried out here; after every event the snapshot is published.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpilot_common::api::{
    BackupProgress, BackupRequest, LifecycleResponse, ReloadResponse, RestoreAccepted,
    RestorePhase, RestoreRequest, ShutdownMode,
};
use pgpilot_common::state::{AgentState, BootstrapMethod, OperationKind, Role};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::admission::{Command, InFlight, Situation, Step, admit};
use super::{OpRecord, Reply, Request, RuntimeInfo, Snapshot};
use crate::archive::backup::{self, Run};
use crate::context::Context;
use crate::error::AgentError;
use crate::postgres::process::Postmaster;
use crate::postgres::{bootstrap, conf, sql};
use crate::replication::live::LiveOp;
use crate::restore::{self, RestoreError, RestorePlan};

mod reparent;

/// How long a fast or smart shutdown may take before the agent escalates to immediate.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run this long resets the crash backoff.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// How often a starting Postgres is probed, and how often a running one is looked at.
const PROBE_STARTING: Duration = Duration::from_millis(100);
const PROBE_RUNNING: Duration = Duration::from_millis(500);
/// How often slots, registration and lag are looked at.
const REPLICATION_CHECK: Duration = Duration::from_secs(2);
/// How long a cancelled backup may take to end (its session closes, Postgres aborts it).
const CANCEL_GRACE: Duration = Duration::from_secs(10);

/// How the agent begins, decided by `run` from the data dir and the command line.
pub enum Begin {
    /// The data dir holds a cluster: start it.
    Existing,
    /// The data dir is empty: initdb, then start.
    Initdb,
    /// The data dir is empty: restore into it (`run --bootstrap-from-backup`, or `[bootstrap]`
    /// from another cluster's archive: the source given here).
    Restore(Box<RestoreRequest>, Option<Box<RestoreSource>>),
    /// The data dir is empty and another instance leads the shard: clone it, then follow it.
    Clone,
}

/// Another cluster's archive a `[bootstrap]` restore reads (base backup and WAL).
#[derive(Clone)]
pub struct RestoreSource {
    pub store: crate::store::Store,
    pub layout: pgpilot_common::layout::Layout,
    /// For the runtime file, so `wal-fetch`'s direct path reads the same archive.
    pub fetch_from: crate::archive::runtime::FetchSource,
}

/// The long operation the executor is carrying out.
enum OpTask {
    Backup {
        run: Arc<Run>,
        task: JoinHandle<()>,
        cancel: CancellationToken,
    },
    /// A planned switchover (carried out inline by the executor; recorded for `/v1/status`).
    Live { op: LiveOp },
    Restore {
        plan: Box<RestorePlan>,
        progress: restore::Progress,
        /// Set while the base backup downloads (polled by the executor's loop, dropped to
        /// abandon it); `None` once Postgres replays.
        download: Option<Download>,
    },
}

impl OpTask {
    fn in_flight(&self) -> InFlight {
        match self {
            OpTask::Backup { run, .. } => InFlight {
                kind: OperationKind::Backup,
                id: run.id.clone(),
            },
            OpTask::Restore { plan, .. } => InFlight {
                kind: OperationKind::Restore,
                id: plan.manifest.id.clone(),
            },
            OpTask::Live { op } => {
                let o = op.lock();
                InFlight {
                    kind: o.kind,
                    id: o.id.clone(),
                }
            }
        }
    }
}

/// The download of a restore: a future the executor polls in its loop (its stream of
/// per-file futures is not `Send`, so it is not a spawned task; dropping it abandons it).
type Download = Pin<Box<dyn Future<Output = Result<(), RestoreError>>>>;

enum Event {
    Shutdown,
    Request(Request),
    Exited(std::io::Result<std::process::ExitStatus>),
    Tick,
    Retry,
    BackupEnded,
    Downloaded(Result<(), RestoreError>),
}

pub struct Executor {
    ctx: Arc<Context>,
    status: watch::Sender<Snapshot>,
    requests: mpsc::Receiver<Request>,
    state: AgentState,
    pm: Option<Postmaster>,
    runtime: RuntimeInfo,
    ever_running: bool,
    /// In a crash backoff: when to start again.
    retry_at: Option<tokio::time::Instant>,
    backoff: Duration,
    next_tick: tokio::time::Instant,
    /// Start and restart requests answered once Postgres accepts connections.
    pending_start: Vec<Reply<LifecycleResponse>>,
    op: Option<OpTask>,
    last_op: Option<OpRecord>,
    last_restore: Option<restore::Progress>,
    /// A failed restore ends the agent (it was `run --bootstrap-from-backup`).
    exit_on_restore_failure: bool,
    /// The archive of the initial `[bootstrap]` restore, until it completes.
    restore_source: Option<RestoreSource>,
    /// Replication housekeeping (slots, registration, lag metrics) is due.
    next_replication_check: tokio::time::Instant,
    repl: reparent::ReplicationState,
    /// The agent's shutdown, for steps that wait long (a reinitialize's clone).
    shutdown: CancellationToken,
    /// The drain handshake (its state is part of every admission).
    drain: super::drain_record::DrainRecord,
    /// Kubernetes mode: the config file's parameters last applied, and what Postgres says
    /// needs a restart.
    applied_params: Option<BTreeMap<String, String>>,
    pending_restart: Vec<String>,
}

impl Executor {
    pub(super) fn new(
        ctx: Arc<Context>,
        status: watch::Sender<Snapshot>,
        requests: mpsc::Receiver<Request>,
        initial: AgentState,
        drain: super::drain_record::DrainRecord,
    ) -> Executor {
        Executor {
            ctx,
            status,
            requests,
            state: initial,
            pm: None,
            runtime: RuntimeInfo::default(),
            ever_running: false,
            retry_at: None,
            backoff: BACKOFF_MIN,
            next_tick: tokio::time::Instant::now(),
            pending_start: Vec::new(),
            op: None,
            last_op: None,
            last_restore: None,
            exit_on_restore_failure: false,
            restore_source: None,
            next_replication_check: tokio::time::Instant::now(),
            repl: reparent::ReplicationState::default(),
            shutdown: CancellationToken::new(),
            drain,
            applied_params: None,
            pending_restart: Vec::new(),
        }
    }

    /// Runs until `shutdown` is cancelled, then ends every operation, stops Postgres (fast) and
    /// returns. An error says why the agent could not start at all (initdb or the initial
    /// restore failed).
    pub async fn run(mut self, begin: Begin, shutdown: CancellationToken) -> Result<(), String> {
        self.shutdown = shutdown.clone();
        self.prepare_replication()?;
        match begin {
            Begin::Clone => {
                if !self.clone_bootstrap(&shutdown).await? {
                    self.set_state(AgentState::Stopped);
                    return Ok(());
                }
                self.spawn_postgres();
            }
            Begin::Existing => self.spawn_postgres(),
            Begin::Initdb => {
                self.set_state(AgentState::Bootstrapping {
                    method: BootstrapMethod::Initdb,
                });
                let ctx = &self.ctx;
                let cfg = &ctx.cfg;
                if let Err(e) = bootstrap::initdb(
                    &ctx.bins,
                    &cfg.data_dir,
                    &cfg.superuser,
                    &ctx.superuser_password,
                    &cfg.socket_dir(),
                    ctx.owner.as_ref(),
                )
                .await
                {
                    let reason = e.to_string();
                    self.set_state(AgentState::Failed {
                        reason: reason.clone(),
                    });
                    return Err(reason);
                }
                self.spawn_postgres();
            }
            Begin::Restore(req, source) => {
                self.set_state(AgentState::Bootstrapping {
                    method: BootstrapMethod::Restore,
                });
                self.exit_on_restore_failure = true;
                if let Some(src) = source {
                    tracing::info!(source = %src.store, cluster = %src.fetch_from.cluster, shard = %src.fetch_from.shard, "bootstrapping from another cluster's archive");
                    self.point_fetching_at(Some(&src));
                    self.restore_source = Some(*src);
                }
                let plan = self.plan_restore(&req).await.map_err(|e| e.to_string())?;
                self.begin_restore(plan, false);
            }
        }
        loop {
            self.publish();
            let event = tokio::select! {
                _ = shutdown.cancelled() => Event::Shutdown,
                Some(req) = self.requests.recv() => Event::Request(req),
                status = wait_exit(&mut self.pm) => Event::Exited(status),
                _ = wait_until(self.retry_at) => Event::Retry,
                ended = wait_op(&mut self.op) => ended,
                _ = tokio::time::sleep_until(self.next_tick) => Event::Tick,
            };
            match event {
                Event::Shutdown => {
                    self.shut_down().await;
                    return Ok(());
                }
                Event::Request(req) => self.handle(req).await,
                Event::Exited(status) => self.on_exit(status),
                Event::Retry => {
                    self.retry_at = None;
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    self.spawn_postgres();
                }
                Event::Tick => self.on_tick().await,
                Event::BackupEnded => {
                    if let Some(OpTask::Backup { run, .. }) = self.op.take() {
                        self.last_op = Some(OpRecord::Backup(run));
                    }
                }
                Event::Downloaded(result) => {
                    if let Err(reason) = self.on_downloaded(result) {
                        self.publish();
                        return Err(reason);
                    }
                }
            }
        }
    }

    // ----- state and snapshot -----

    fn set_state(&mut self, new: AgentState) {
        if self.state != new {
            tracing::info!(from = %self.state, to = %new, "agent state");
        }
        if new.accepts_connections() {
            self.ever_running = true;
        }
        self.ctx.metrics.set_state(&new);
        self.state = new;
        self.publish();
    }

    fn publish(&self) {
        let operation = match &self.op {
            Some(OpTask::Backup { run, .. }) => Some(OpRecord::Backup(run.clone())),
            Some(OpTask::Restore { progress, .. }) => Some(OpRecord::Restore(progress.clone())),
            Some(OpTask::Live { op }) => Some(OpRecord::Live(op.clone())),
            None => self.last_op.clone(),
        };
        self.ctx
            .metrics
            .postgres_up
            .set(i64::from(self.state.accepts_connections()));
        self.status.send_replace(Snapshot {
            state: self.state.clone(),
            in_flight: self.op.as_ref().map(OpTask::in_flight),
            operation,
            restore: self.last_restore.clone(),
            runtime: self.runtime.clone(),
            ever_running: self.ever_running,
            receiver: self.repl.receiver.clone(),
            registry: self.repl.registry.clone(),
            upstream: self.repl.upstream.as_ref().map(|u| u.url.clone()),
            pending_restart: self.pending_restart.clone(),
        });
    }

    fn situation(&self) -> Situation {
        Situation {
            state: self.state.clone(),
            in_flight: self.op.as_ref().map(OpTask::in_flight),
            drain: self.drain.state(),
        }
    }

    fn conflict(&self, message: impl Into<String>) -> AgentError {
        AgentError::conflict(&self.state, message)
    }

    // ----- requests -----

    async fn handle(&mut self, req: Request) {
        let cmd = match &req {
            Request::Stop { req, .. } => Command::Stop {
                mode: req.mode,
                cancel_backup: req.cancel_backup,
            },
            Request::Start { .. } => Command::Start,
            Request::Restart { req, .. } => Command::Restart {
                mode: req.mode,
                cancel_backup: req.cancel_backup,
            },
            Request::Reload { .. } => Command::Reload,
            Request::Restore { req, .. } => Command::Restore {
                force: req.force,
                replaces_cluster: std::fs::read_dir(&self.ctx.cfg.data_dir)
                    .is_ok_and(|mut d| d.next().is_some()),
                cancel_backup: req.cancel_backup,
            },
            Request::Backup { .. } => Command::Backup,
            Request::Register { .. } => Command::Register,
            Request::Promote { .. } => Command::Promote,
            Request::Demote { .. } => Command::Demote,
            Request::Follow { .. } => Command::Follow,
            Request::Switchover { .. } => Command::Switchover,
            Request::Reinitialize { .. } => Command::Reinitialize,
            Request::Drain { .. } => Command::Drain,
            Request::DrainStop { .. } => {
                if let Request::DrainStop { reply } = req {
                    let _ = reply.send(self.drain_stop().await);
                }
                return;
            }
        };
        // Bad input before state: a follow of this agent's own URL is never right.
        let step = match self.input_error(&req) {
            Some(e) => Err(e),
            None => admit(&self.situation(), &cmd),
        };
        tracing::debug!(?cmd, ?step, "admission");
        let step = match step {
            Ok(step) => step,
            Err(e) => return req.refuse(e),
        };
        match (req, step) {
            (Request::Stop { reply, .. }, step) => {
                let r = self.stop_step(step).await;
                let _ = reply.send(r);
            }
            (Request::Start { reply }, _) => {
                self.retry_at = None;
                self.backoff = BACKOFF_MIN;
                self.pending_start.push(reply);
                self.spawn_postgres();
            }
            (Request::Restart { reply, .. }, step) => self.restart_step(step, reply).await,
            (Request::Reload { reply }, _) => {
                let _ = reply.send(self.reload().await);
            }
            (Request::Restore { req, reply }, Step::Restore { cancel }) => {
                self.restore_step(*req, cancel, reply).await
            }
            (Request::Restore { reply, .. }, step) => {
                let _ = reply.send(Err(AgentError::Failed(format!(
                    "internal: restore admitted as {step:?}"
                ))));
            }
            (Request::Backup { req, reply }, _) => {
                let _ = reply.send(self.begin_backup(req).await);
            }
            (Request::Register { req, reply }, _) => {
                let _ = reply.send(self.serve_register(req).await);
            }
            (Request::Promote { reply }, _) => {
                let _ = reply.send(self.promote().await);
            }
            (Request::Demote { reply }, _) => {
                let _ = reply.send(self.demote().await);
            }
            (Request::Follow { req, reply }, _) => {
                let _ = reply.send(self.follow(req).await);
            }
            (Request::Reinitialize { req, reply }, _) => {
                let _ = reply.send(self.reinitialize(req).await);
            }
            (Request::Switchover { req, reply }, _) => {
                let _ = reply.send(self.switchover(req).await);
            }
            (Request::Drain { req, by, reply }, _) => {
                let default = self.ctx.cfg.replication.drain_timeout;
                let _ = reply.send(Ok(self.drain.begin(&req, by, default, &self.ctx)));
            }
            (Request::DrainStop { reply }, _) => {
                let _ = reply.send(Err(AgentError::Failed(
                    "internal: a drain's stop went through admission".into(),
                )));
            }
        }
    }

    /// The drain's stop: a fast shutdown (ending a backup in flight), and Postgres stays
    /// stopped.
    async fn drain_stop(&mut self) -> Result<(), AgentError> {
        if self.drain.state() != pgpilot_common::state::DrainState::Draining {
            return Err(self.conflict("no drain is in progress"));
        }
        // The stop request's own step, ending a backup in flight; with no postmaster, the
        // crash backoff ends and Postgres stays stopped.
        let step = if self.pm.is_some() {
            Step::Stop {
                mode: ShutdownMode::Fast,
                cancel: matches!(self.op, Some(OpTask::Backup { .. })),
            }
        } else {
            Step::StayStopped
        };
        self.stop_step(step).await.map(|_| ())
    }

    async fn stop_step(&mut self, step: Step) -> Result<LifecycleResponse, AgentError> {
        match step {
            Step::Stop { mode, cancel } => {
                if cancel {
                    self.cancel_backup("stop requested with cancel_backup")
                        .await;
                }
                self.stop_postgres(mode).await?;
                self.set_state(AgentState::Stopped);
                // A start or restart still waiting for connections will not get them.
                for reply in self.pending_start.drain(..) {
                    let _ = reply.send(Err(AgentError::conflict(
                        &AgentState::Stopped,
                        "Postgres was stopped before it accepted connections",
                    )));
                }
            }
            Step::StayStopped => {
                self.retry_at = None;
                self.backoff = BACKOFF_MIN;
                self.set_state(AgentState::Stopped);
            }
            other => {
                return Err(AgentError::Failed(format!(
                    "internal: stop admitted as {other:?}"
                )));
            }
        }
        Ok(LifecycleResponse {
            state: self.state.clone(),
            postmaster_pid: None,
        })
    }

    async fn restart_step(&mut self, step: Step, reply: Reply<LifecycleResponse>) {
        match step {
            Step::Restart { mode, cancel } => {
                self.ctx.metrics.requested_restarts.inc();
                self.runtime.requested_restarts += 1;
                if cancel {
                    self.cancel_backup("restart requested with cancel_backup")
                        .await;
                }
                if let Err(e) = self.stop_postgres(mode).await {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
            Step::Start => {
                self.retry_at = None;
                self.backoff = BACKOFF_MIN;
            }
            other => {
                let _ = reply.send(Err(AgentError::Failed(format!(
                    "internal: restart admitted as {other:?}"
                ))));
                return;
            }
        }
        self.pending_start.push(reply);
        self.spawn_postgres();
    }

    /// Re-renders the configuration from the config file and signals Postgres to re-read it.
    async fn reload(&mut self) -> Result<ReloadResponse, AgentError> {
        let ctx = self.ctx.clone();
        let cfg = &ctx.cfg;
        let params: BTreeMap<String, String> = cfg
            .reread_parameters()
            .map_err(|e| AgentError::Failed(format!("config file not reloaded: {e}")))?;
        let changed = self
            .render_conf_with(&params)
            .map_err(|e| AgentError::Failed(format!("cannot render configuration: {e}")))?;
        let Some(pm) = &self.pm else {
            return Err(self.conflict("Postgres is not running; nothing to reload"));
        };
        pm.reload();
        tracing::info!(?changed, "configuration reloaded");
        // Postgres applies SIGHUP asynchronously; give it a moment before asking what is pending.
        let client = ctx.monitor.client().await.map_err(|e| {
            AgentError::Failed(format!("reload sent, but cannot connect to check it: {e}"))
        })?;
        let mut pending_restart = Vec::new();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            pending_restart = sql::pending_restart(&client).await.map_err(|e| {
                AgentError::Failed(format!(
                    "reload sent, but pg_settings could not be read: {e}"
                ))
            })?;
            if !pending_restart.is_empty() {
                break;
            }
        }
        Ok(ReloadResponse {
            changed,
            pending_restart,
        })
    }

    // ----- the postmaster -----

    /// Re-renders pgpilot.conf and pg_hba.conf for the current role, with the config file's
    /// parameters (those read at agent start when the file is unreadable now); returns the
    /// settings that changed.
    fn render_conf(&self) -> std::io::Result<Vec<String>> {
        let cfg = &self.ctx.cfg;
        let params = cfg.reread_parameters().unwrap_or_else(|e| {
            tracing::warn!("config file: {e}; rendering the parameters read at agent start");
            cfg.parameters.clone()
        });
        self.render_conf_with(&params)
    }

    fn render_conf_with(&self, params: &BTreeMap<String, String>) -> std::io::Result<Vec<String>> {
        let standby = self.standby_conf();
        // A restore in flight, or one interrupted by an agent restart (recovery.signal).
        let restoring = matches!(self.op, Some(OpTask::Restore { .. }))
            || self
                .ctx
                .cfg
                .data_dir
                .join(crate::files::RECOVERY_SIGNAL)
                .exists();
        let replicas: Vec<String> = self
            .repl
            .registry
            .replicas
            .values()
            .filter_map(|url| pgpilot_common::client::url_host(url))
            .collect();
        conf::render_all(
            &self.ctx.cfg,
            params,
            standby.as_ref(),
            self.ctx.owner.as_ref(),
            restoring,
            &replicas,
        )
    }

    /// Renders the configuration and starts the postmaster; `Starting` until it accepts
    /// connections (see `on_tick`).
    fn spawn_postgres(&mut self) {
        let ctx = self.ctx.clone();
        let cfg = &ctx.cfg;
        self.set_state(AgentState::Starting);
        if let Err(e) = self.ensure_standby_signal() {
            return self.crashed(
                format!(
                    "cannot prepare {} for its role: {e}",
                    cfg.data_dir.display()
                ),
                false,
            );
        }
        if let Err(e) = self.render_conf() {
            return self.crashed(
                format!(
                    "cannot render configuration into {}: {e}",
                    cfg.data_dir.display()
                ),
                false,
            );
        }
        // The synchronous standby (Kubernetes synchronous mode) is chosen afresh by the running
        // primary's agent; one left from an earlier life (or copied by a clone) would make the
        // first commit wait for a standby that may never connect.
        if let Err(e) = conf::forget_auto_setting(&cfg.data_dir, "synchronous_standby_names") {
            tracing::warn!("cannot clear synchronous_standby_names from postgresql.auto.conf: {e}");
        }
        match Postmaster::spawn(&ctx.bins, &cfg.data_dir, ctx.owner.as_ref(), &ctx.pg_log) {
            Ok(pm) => {
                self.runtime.postmaster_pid = Some(pm.pid());
                self.runtime.running_since = None;
                self.pm = Some(pm);
                self.next_tick = tokio::time::Instant::now() + PROBE_STARTING;
            }
            Err(e) => self.crashed(
                format!("cannot start {}: {e}", ctx.bins.path("postgres").display()),
                false,
            ),
        }
    }

    async fn stop_postgres(&mut self, mode: ShutdownMode) -> Result<(), AgentError> {
        let Some(mut pm) = self.pm.take() else {
            return Ok(());
        };
        let was_primary = self.state.role() == Some(Role::Primary);
        self.set_state(AgentState::Stopping);
        tracing::info!(postmaster_pid = pm.pid(), ?mode, "stopping Postgres");
        // The agent's own session first: a smart shutdown waits for every session to end, and
        // with the monitor's open it waited out SHUTDOWN_GRACE and ended immediate (found by
        // the R5 trial, docs/chaos.md). Postgres refuses new sessions from here on.
        self.ctx.monitor.reset().await;
        let result = pm.shutdown(mode, SHUTDOWN_GRACE).await;
        self.postmaster_gone().await;
        if was_primary {
            self.note_primary_end(result.is_ok() && mode != ShutdownMode::Immediate);
        }
        match result {
            Ok(status) => {
                tracing::info!(postmaster_pid = pm.pid(), %status, "Postgres stopped");
                Ok(())
            }
            Err(e) => {
                let reason = format!("waiting for the postmaster to exit: {e}");
                self.set_state(AgentState::Failed {
                    reason: reason.clone(),
                });
                Err(AgentError::Failed(reason))
            }
        }
    }

    async fn postmaster_gone(&mut self) {
        self.runtime.postmaster_pid = None;
        self.runtime.running_since = None;
        self.ctx.monitor.reset().await;
    }

    /// The postmaster exited on its own.
    fn on_exit(&mut self, status: std::io::Result<std::process::ExitStatus>) {
        self.pm = None;
        if self.state.role() == Some(Role::Primary) {
            self.note_primary_end(false);
        }
        let stable = self
            .runtime
            .running_since
            .is_some_and(|t| t.elapsed() >= STABLE_RUN);
        self.runtime.postmaster_pid = None;
        self.runtime.running_since = None;
        let reason = match status {
            Ok(s) => format!("postmaster exited unexpectedly ({s})"),
            Err(e) => format!("lost track of the postmaster: {e}"),
        };
        // While recovering towards a restore target, an exit ends the restore: no restart, the
        // data dir is left for inspection.
        if matches!(self.op, Some(OpTask::Restore { download: None, .. })) {
            let why = self.ctx.pg_log.worst().unwrap_or(reason);
            let reason = format!(
                "Postgres stopped during recovery: {why}. The data dir {} is left as it is for inspection",
                self.ctx.cfg.data_dir.display()
            );
            self.fail_restore(reason);
            return;
        }
        self.crashed(reason, stable);
    }

    /// Postgres is down for a reason other than a request: count it, answer waiting starts,
    /// retry after the backoff.
    fn crashed(&mut self, reason: String, stable: bool) {
        self.pm = None;
        if stable {
            self.backoff = BACKOFF_MIN;
        }
        self.ctx.metrics.crash_restarts.inc();
        self.runtime.crash_restarts += 1;
        self.runtime.last_failure = Some(reason.clone());
        for reply in self.pending_start.drain(..) {
            let _ = reply.send(Err(AgentError::Failed(format!(
                "Postgres did not start: {reason}"
            ))));
        }
        let backoff = self.backoff;
        tracing::error!(retry_in = ?backoff, "Postgres is down: {reason}");
        self.set_state(AgentState::Failed {
            reason: format!("{reason}; restarting in {backoff:?}"),
        });
        self.retry_at = Some(tokio::time::Instant::now() + backoff);
    }

    /// Starting: probe until Postgres accepts connections. Running or recovering: follow role
    /// changes (a promotion) and a restore's replay.
    async fn on_tick(&mut self) {
        let period = if self.state == AgentState::Starting {
            PROBE_STARTING
        } else {
            PROBE_RUNNING
        };
        self.next_tick = tokio::time::Instant::now() + period;
        if self.pm.is_none() {
            return;
        }
        let ctx = self.ctx.clone();
        let obs = match ctx.monitor.observe().await {
            Ok(o) => o,
            Err(e) => {
                if e.is_wrong_password() {
                    // A data dir restored from another node's backup keeps that node's
                    // superuser password: waiting will not help, say so once.
                    let msg = format!(
                        "Postgres refuses the superuser password from {}: it is not this cluster's password \
                         (a restored backup keeps the password of the cluster it was taken from)",
                        ctx.cfg.superuser_password.path.display()
                    );
                    if self.runtime.last_failure.as_deref() != Some(msg.as_str()) {
                        tracing::error!("{msg}");
                        self.runtime.last_failure = Some(msg);
                    }
                    self.next_tick = tokio::time::Instant::now() + Duration::from_secs(1);
                }
                return;
            }
        };
        if self.state == AgentState::Starting {
            self.runtime.running_since = Some(Instant::now());
            self.runtime.last_failure = None;
        }
        // A restore's replay: progress, and completion once Postgres left recovery (whether or
        // not a tick saw it in recovery: a short replay ends before the first probe).
        if let Some(OpTask::Restore {
            progress,
            download: None,
            ..
        }) = &self.op
        {
            let progress = progress.clone();
            if obs.replayed_lsn.is_some() {
                progress.lock().expect("progress lock").replayed_lsn = obs.replayed_lsn.clone();
            }
            if obs.in_recovery {
                if self.state != AgentState::Recovering {
                    self.set_state(AgentState::Recovering);
                }
            } else {
                self.complete_restore(progress).await;
            }
        }
        let new = if self.op_is_replaying() {
            AgentState::Recovering
        } else {
            AgentState::Running {
                role: if obs.in_recovery {
                    Role::Replica
                } else {
                    Role::Primary
                },
            }
        };
        if new != self.state {
            // The replication role exists before anyone is told this is a running primary.
            if new.role() == Some(Role::Primary) {
                self.ensure_roles().await;
            }
            // A replica looks at its WAL receiver and registers with its primary (where its
            // agent answers now) at once, before it reports ready.
            if new.role() == Some(Role::Replica) {
                self.next_replication_check = tokio::time::Instant::now();
            }
            self.set_state(new);
        }
        if tokio::time::Instant::now() >= self.next_replication_check {
            self.next_replication_check = tokio::time::Instant::now() + REPLICATION_CHECK;
            self.replication_housekeeping().await;
            self.follow_config_file().await;
        }
        if !self.pending_start.is_empty() {
            let resp = LifecycleResponse {
                state: self.state.clone(),
                postmaster_pid: self.runtime.postmaster_pid,
            };
            for reply in self.pending_start.drain(..) {
                let _ = reply.send(Ok(resp.clone()));
            }
        }
    }

    /// Kubernetes mode: the config file is a ConfigMap the operator rewrites when the
    /// cluster's parameters change. When its parameters differ from those last applied, reload
    /// (as `POST /v1/reload` does); and keep what Postgres says needs a restart in the snapshot
    /// (`/v1/status` `pending_restart`), for the operator to report.
    async fn follow_config_file(&mut self) {
        let ctx = self.ctx.clone();
        if ctx.kube.is_none() || !self.state.accepts_connections() {
            return;
        }
        let mut reloaded = false;
        match ctx.cfg.reread_parameters() {
            Ok(params) => {
                let first = self.applied_params.is_none();
                if self.applied_params.as_ref() != Some(&params) {
                    reloaded = true;
                    if !first {
                        match self.reload().await {
                            Ok(r) => {
                                tracing::info!(changed = ?r.changed, pending_restart = ?r.pending_restart, "the config file changed: reloaded")
                            }
                            Err(e) => tracing::warn!(
                                "the config file changed, but the reload failed: {e}"
                            ),
                        }
                    }
                    self.applied_params = Some(params);
                }
            }
            Err(e) => {
                self.warn_now_and_then(format!("config file: {e}; keeping the parameters applied"))
            }
        }
        // What needs a restart changes only by a reload (or clears by a restart): no query of
        // pg_settings every 2 s while nothing is pending.
        if !reloaded && self.pending_restart.is_empty() {
            return;
        }
        if let Ok(client) = ctx.monitor.client().await
            && let Ok(pending) = sql::pending_restart(&client).await
            && pending != self.pending_restart
        {
            self.pending_restart = pending;
            self.publish();
        }
    }

    fn op_is_replaying(&self) -> bool {
        matches!(self.op, Some(OpTask::Restore { download: None, .. }))
    }

    async fn ensure_roles(&self) {
        let ctx = &self.ctx;
        let cfg = &ctx.cfg;
        let result = async {
            let client = ctx.monitor.client().await.map_err(|e| e.to_string())?;
            sql::ensure_replication_role(
                &client,
                &cfg.replication_user,
                ctx.replication_password.expose(),
            )
            .await
            .map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = result {
            tracing::error!(role = %cfg.replication_user, "cannot create or update the replication role: {e}");
        }
    }

    // ----- base backups -----

    async fn begin_backup(&mut self, req: BackupRequest) -> Result<BackupProgress, AgentError> {
        let Some(archiver) = &self.ctx.archiver else {
            return Err(
                self.conflict("base backups need a backup store: no [backup] store is configured")
            );
        };
        let deps = backup::BackupDeps {
            cfg: self.ctx.cfg.clone(),
            superuser_password: self.ctx.superuser_password.clone(),
            store: archiver.store().clone(),
            layout: archiver.layout().clone(),
            metrics: self.ctx.metrics.archive.clone(),
            runs: self.ctx.backups.clone(),
            primary: self
                .repl
                .upstream
                .as_ref()
                .map(|u| crate::replication::switchover::peer(&self.ctx, &u.url)),
        };
        let cancel = CancellationToken::new();
        let started = backup::begin(deps, req, cancel.clone()).await?;
        let snapshot = started.run.snapshot();
        self.op = Some(OpTask::Backup {
            run: started.run,
            task: started.task,
            cancel,
        });
        Ok(snapshot)
    }

    /// Cancels the backup in flight, if any, and waits (bounded) for its task to end.
    async fn cancel_backup(&mut self, why: &str) {
        if let Some(OpTask::Backup { run, task, cancel }) = self.op.take() {
            tracing::warn!(backup = %run.id, "cancelling the base backup: {why}");
            cancel.cancel();
            if tokio::time::timeout(CANCEL_GRACE, task).await.is_err() {
                tracing::error!(backup = %run.id, "the cancelled backup did not end within {CANCEL_GRACE:?}");
            }
            self.last_op = Some(OpRecord::Backup(run));
        }
    }

    // ----- restores -----

    async fn plan_restore(&self, req: &RestoreRequest) -> Result<RestorePlan, AgentError> {
        let Some(archiver) = &self.ctx.archiver else {
            return Err(self.conflict(
                "no backup store is configured ([backup] in the config, or --backup-store)",
            ));
        };
        let (store, layout) = self.restore_archive(archiver);
        restore::plan(&store, &layout, req)
            .await
            .map_err(AgentError::from)
    }

    /// The archive a restore reads: the `[bootstrap]` source until the initial restore
    /// completes, this cluster's own otherwise.
    fn restore_archive(
        &self,
        archiver: &crate::archive::push::WalArchiver,
    ) -> (crate::store::Store, pgpilot_common::layout::Layout) {
        match &self.restore_source {
            Some(src) => (src.store.clone(), src.layout.clone()),
            None => (archiver.store().clone(), archiver.layout().clone()),
        }
    }

    /// Where recovery's WAL comes from: another cluster's archive during a `[bootstrap]`
    /// restore (`Some`), this cluster's own otherwise. Both the fetcher and the runtime file
    /// (`wal-fetch`'s direct path) follow.
    fn point_fetching_at(&self, source: Option<&RestoreSource>) {
        let ctx = &self.ctx;
        let (Some(archiver), Some(fetcher), Some(store_cfg)) =
            (&ctx.archiver, &ctx.fetcher, &ctx.cfg.backup)
        else {
            return;
        };
        match source {
            Some(src) => fetcher.redirect(src.store.clone(), src.layout.clone()),
            None => fetcher.redirect(archiver.store().clone(), archiver.layout().clone()),
        }
        if let Err(e) = crate::archive::runtime::ArchiveRuntime::write(
            &ctx.cfg,
            store_cfg,
            ctx.api_token.current().expose(),
            ctx.owner.as_ref(),
            source.map(|s| s.fetch_from.clone()),
        ) {
            tracing::error!("cannot rewrite the archive runtime file: {e}");
        }
    }

    async fn restore_step(
        &mut self,
        req: RestoreRequest,
        cancel: bool,
        reply: Reply<RestoreAccepted>,
    ) {
        let plan = match self.plan_restore(&req).await {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if cancel {
            self.cancel_backup("restore requested with cancel_backup")
                .await;
        }
        // The progress is published before the answer, so a caller polling /v1/status never
        // mistakes the previous restore's result for this one's.
        let progress = self.install_progress(&plan);
        let accepted = RestoreAccepted {
            backup_id: plan.manifest.id.clone(),
            target: plan.description.clone(),
            started_at: progress.lock().expect("progress lock").started_at.clone(),
        };
        let _ = reply.send(Ok(accepted));
        self.retry_at = None;
        if let Err(e) = self.stop_postgres(ShutdownMode::Fast).await {
            let reason = format!("could not stop Postgres before restoring: {e}");
            let mut p = progress.lock().expect("progress lock");
            p.phase = RestorePhase::Failed;
            p.error = Some(reason.clone());
            p.finished_at = Some(crate::time::now());
            drop(p);
            self.last_op = Some(OpRecord::Restore(progress));
            self.set_state(AgentState::Failed { reason });
            return;
        }
        self.begin_restore_with(plan, req.force, progress);
    }

    fn begin_restore(&mut self, plan: RestorePlan, force: bool) {
        let progress = self.install_progress(&plan);
        self.begin_restore_with(plan, force, progress);
    }

    /// A new restore's progress, published at once as the current restore's record.
    fn install_progress(&mut self, plan: &RestorePlan) -> restore::Progress {
        let progress = restore::new_progress(plan);
        self.last_restore = Some(progress.clone());
        self.publish();
        progress
    }

    /// Downloads the backup in a task (`Restoring`); the executor keeps answering requests.
    fn begin_restore_with(&mut self, plan: RestorePlan, force: bool, progress: restore::Progress) {
        self.set_state(AgentState::Restoring);
        tracing::info!(backup = %plan.manifest.id, "restoring {}", plan.description);
        let ctx = self.ctx.clone();
        let task_plan = plan.clone();
        let task_progress = progress.clone();
        let source = self.ctx.archiver.as_ref().map(|a| self.restore_archive(a));
        let download: Download = Box::pin(async move {
            let (store, layout) =
                source.ok_or_else(|| RestoreError::Failed("no backup store".into()))?;
            if let Some(f) = &ctx.fetcher {
                f.set_segment_size(task_plan.manifest.wal_segment_size);
                let _ = f.reset_spool();
            }
            restore::run::download_and_prepare(
                &ctx.cfg,
                &store,
                &layout,
                &task_plan,
                ctx.owner.as_ref(),
                force,
                &task_progress,
            )
            .await
        });
        self.op = Some(OpTask::Restore {
            plan: Box::new(plan),
            progress,
            download: Some(download),
        });
    }

    /// The download ended: start Postgres in recovery, or fail the restore.
    fn on_downloaded(&mut self, result: Result<(), RestoreError>) -> Result<(), String> {
        match result {
            Ok(()) => {
                if let Some(OpTask::Restore {
                    progress, download, ..
                }) = &mut self.op
                {
                    *download = None;
                    progress.lock().expect("progress lock").phase = RestorePhase::Replaying;
                }
                self.spawn_postgres();
                Ok(())
            }
            Err(e) => {
                let id = match &self.op {
                    Some(OpTask::Restore { plan, .. }) => plan.manifest.id.clone(),
                    _ => "?".into(),
                };
                let reason = format!("restore of backup {id} failed: {e}");
                self.fail_restore(reason.clone());
                if self.exit_on_restore_failure {
                    Err(reason)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Ends the restore in flight as failed; Postgres stays down (`Failed`).
    fn fail_restore(&mut self, reason: String) {
        if let Some(OpTask::Restore { progress, .. }) = self.op.take() {
            restore::run::mark_failed(&progress, &reason);
            self.last_op = Some(OpRecord::Restore(progress));
        }
        tracing::error!("{reason}");
        self.set_state(AgentState::Failed { reason });
    }

    /// Postgres promoted at the target: the restore is complete.
    async fn complete_restore(&mut self, progress: restore::Progress) {
        let timeline = self
            .ctx
            .monitor
            .status()
            .await
            .ok()
            .and_then(|s| s.timeline);
        let started = self.runtime.running_since;
        restore::run::mark_completed(&self.ctx.cfg, &progress, timeline, started);
        if self.restore_source.take().is_some() {
            // Promoted: from now on this cluster's own archive is the one recovery reads.
            self.point_fetching_at(None);
        }
        self.own_the_restored_catalog().await;
    }

    /// The restored catalog holds the backup's superuser password (another cluster's, or an
    /// older one): set this agent's, then drop the socket trust line of the restore (the
    /// replication role's password is set as the instance becomes the primary, just after).
    async fn own_the_restored_catalog(&mut self) {
        let cfg = &self.ctx.cfg;
        let result = async {
            let client = self.ctx.monitor.client().await.map_err(|e| e.to_string())?;
            sql::set_password(
                &client,
                &cfg.superuser,
                self.ctx.superuser_password.expose(),
            )
            .await
            .map_err(|e| format!("setting the superuser's password: {e}"))?;
            self.render_conf()
                .map_err(|e| format!("rendering pg_hba.conf: {e}"))?;
            client
                .batch_execute("SELECT pg_reload_conf()")
                .await
                .map_err(|e| format!("reloading pg_hba.conf: {e}"))
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(role = %cfg.superuser, "restored catalog: the superuser's password is this agent's; the restore's trust line is gone")
            }
            Err(e) => tracing::error!("after the restore: {e}"),
        }
        if let Some(OpTask::Restore { progress, .. }) = self.op.take() {
            self.last_op = Some(OpRecord::Restore(progress));
        }
    }

    // ----- shutdown -----

    async fn shut_down(&mut self) {
        match self.op.take() {
            Some(OpTask::Backup { run, task, cancel }) => {
                self.op = Some(OpTask::Backup { run, task, cancel });
                self.cancel_backup("the agent is shutting down").await;
            }
            Some(OpTask::Restore {
                plan,
                progress,
                download,
            }) => {
                if let Some(d) = download {
                    drop(d);
                    tracing::warn!(backup = %plan.manifest.id, "restore download abandoned: the agent is shutting down");
                    restore::run::mark_failed(&progress, "the agent shut down during the download");
                }
                self.last_op = Some(OpRecord::Restore(progress));
            }
            Some(OpTask::Live { op }) => self.last_op = Some(OpRecord::Live(op)),
            None => {}
        }
        let _ = self.stop_postgres(ShutdownMode::Fast).await;
        for reply in self.pending_start.drain(..) {
            let _ = reply.send(Err(AgentError::Failed("the agent is shutting down".into())));
        }
        self.set_state(AgentState::Stopped);
    }
}

async fn wait_exit(pm: &mut Option<Postmaster>) -> std::io::Result<std::process::ExitStatus> {
    match pm {
        Some(pm) => pm.wait().await,
        None => std::future::pending().await,
    }
}

async fn wait_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn wait_op(op: &mut Option<OpTask>) -> Event {
    match op {
        Some(OpTask::Backup { task, .. }) => {
            let _ = task.await;
            Event::BackupEnded
        }
        Some(OpTask::Restore {
            download: Some(d), ..
        }) => Event::Downloaded(d.await),
        _ => std::future::pending().await,
    }
}
