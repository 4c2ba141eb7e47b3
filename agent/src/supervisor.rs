//! The supervisor: the one task that owns the postmaster. Lifecycle requests from the API and
//! signals reach it through a channel, so every action is checked against the state it will
//! act on, with no race between two requests; a request that does not fit is answered with a
//! conflict naming the state, before anything is done.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgpilot_common::api::{
    LifecycleResponse, ReloadResponse, RestoreAccepted, RestorePhase, RestoreProgress,
    RestoreRequest, ShutdownMode,
};
use pgpilot_common::state::{AgentState, Role};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::postgres::bins::PgBinaries;
use crate::postgres::process::{LogTail, Postmaster};
use crate::postgres::{OsUser, conf, sql};
use crate::restore::{self, RestorePlan};
use crate::secrets::Secret;

/// How long a fast or smart shutdown may take before the agent escalates to immediate.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run this long resets the crash backoff.
const STABLE_RUN: Duration = Duration::from_secs(60);

/// Why a request was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{message} (agent state: {state})")]
    Conflict { state: AgentState, message: String },
    /// The request cannot be carried out as asked (an impossible restore target); nothing was
    /// touched.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

type Reply<T> = oneshot::Sender<Result<T, ActionError>>;

/// Requests the supervisor serves.
#[derive(Debug)]
pub enum Request {
    Stop {
        mode: ShutdownMode,
        reply: Reply<LifecycleResponse>,
    },
    Start {
        reply: Reply<LifecycleResponse>,
    },
    Restart {
        mode: ShutdownMode,
        reply: Reply<LifecycleResponse>,
    },
    Reload {
        reply: Reply<ReloadResponse>,
    },
    Restore {
        req: RestoreRequest,
        reply: Reply<RestoreAccepted>,
    },
}

/// Facts about the running Postgres that `/v1/status` reports.
#[derive(Debug, Clone, Default)]
pub struct RuntimeInfo {
    pub postmaster_pid: Option<u32>,
    pub running_since: Option<Instant>,
    pub crash_restarts: u64,
    pub requested_restarts: u64,
    pub last_failure: Option<String>,
}

/// State shared between the supervisor, the HTTP server and the CLI-facing parts.
pub struct Shared {
    pub cfg: Config,
    pub bins: PgBinaries,
    pub owner: Option<OsUser>,
    pub superuser_password: Secret,
    pub replication_password: Secret,
    pub api_token: Secret,
    pub metrics: Metrics,
    /// WAL archiving, when a backup store is configured.
    pub archiver: Option<Arc<crate::archive::push::WalArchiver>>,
    /// WAL fetching for recovery, when a backup store is configured.
    pub fetcher: Option<Arc<crate::archive::fetch::WalFetcher>>,
    /// Base backup runs of this agent (API progress, one at a time).
    pub backups: crate::archive::backup::BackupRuns,
    /// The current or last restore's progress.
    pub restore: Mutex<Option<restore::Progress>>,
    /// Postgres' last log lines.
    pub pg_log: LogTail,
    pub started_at: Instant,
    /// Set once Postgres first accepted connections (the startup probe).
    pub ever_running: AtomicBool,
    state: watch::Sender<AgentState>,
    info: Mutex<RuntimeInfo>,
    requests: mpsc::Sender<Request>,
}

impl Shared {
    pub fn state(&self) -> AgentState {
        self.state.borrow().clone()
    }

    /// The current or last restore's progress.
    pub fn restore_progress(&self) -> Option<RestoreProgress> {
        let guard = self.restore.lock().expect("restore lock");
        guard
            .as_ref()
            .map(|p| p.lock().expect("progress lock").clone())
    }

    pub fn subscribe(&self) -> watch::Receiver<AgentState> {
        self.state.subscribe()
    }

    pub fn info(&self) -> RuntimeInfo {
        self.info.lock().expect("info lock").clone()
    }

    fn update_info(&self, f: impl FnOnce(&mut RuntimeInfo)) {
        f(&mut self.info.lock().expect("info lock"));
    }

    pub fn set_state(&self, new: AgentState) {
        let old = self.state.send_replace(new.clone());
        if old != new {
            tracing::info!(from = %old, to = %new, "agent state");
        }
        if matches!(new, AgentState::Running { .. }) {
            self.ever_running.store(true, Ordering::Relaxed);
        }
        self.metrics.set_state(&new);
    }

    /// Sends a request to the supervisor and waits for its answer.
    pub async fn request<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Request,
    ) -> Result<T, ActionError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(make(tx))
            .await
            .map_err(|_| ActionError::Failed("the agent is shutting down".into()))?;
        rx.await
            .map_err(|_| ActionError::Failed("the agent is shutting down".into()))?
    }
}

/// Everything the supervisor needs, built by [`crate::run`].
pub struct Parts {
    pub cfg: Config,
    pub bins: PgBinaries,
    pub owner: Option<OsUser>,
    pub superuser_password: Secret,
    pub replication_password: Secret,
    pub api_token: Secret,
    pub metrics: Metrics,
    pub archiver: Option<Arc<crate::archive::push::WalArchiver>>,
    pub fetcher: Option<Arc<crate::archive::fetch::WalFetcher>>,
}

pub fn new(parts: Parts, initial: AgentState) -> (Arc<Shared>, mpsc::Receiver<Request>) {
    let (tx, rx) = mpsc::channel(16);
    let (state, _) = watch::channel(initial.clone());
    parts.metrics.set_state(&initial);
    let shared = Arc::new(Shared {
        cfg: parts.cfg,
        bins: parts.bins,
        owner: parts.owner,
        superuser_password: parts.superuser_password,
        replication_password: parts.replication_password,
        api_token: parts.api_token,
        metrics: parts.metrics,
        archiver: parts.archiver,
        fetcher: parts.fetcher,
        backups: Default::default(),
        restore: Mutex::new(None),
        pg_log: LogTail::default(),
        started_at: Instant::now(),
        ever_running: AtomicBool::new(false),
        state,
        info: Mutex::new(RuntimeInfo::default()),
        requests: tx,
    });
    (shared, rx)
}

/// How one run of the postmaster ended.
enum RunEnd {
    /// It exited on its own: a crash (or someone else stopped it). `stable` when it had run
    /// long enough to reset the crash backoff.
    Crashed { reason: String, stable: bool },
    /// Stopped on request; `then_start` for a restart.
    Stopped {
        then_start: bool,
        reply: Option<Reply<LifecycleResponse>>,
    },
    /// The agent is shutting down.
    Shutdown,
    /// A restore was accepted and Postgres is stopped: carry it out.
    Restore(Accepted),
    /// Postgres exited while recovering towards a restore target: no restart, the data dir is
    /// left for inspection.
    RestoreFailed(String),
}

/// Runs Postgres until `shutdown` is cancelled, then stops it (fast) and returns.
///
/// `initial_restore` (from `run --bootstrap-from-backup`) restores into the empty data dir
/// first; an error says why it could not start.
pub async fn run(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
    initial_restore: Option<RestoreRequest>,
) -> Result<(), String> {
    let mut backoff = BACKOFF_MIN;
    let mut next = Next {
        want_running: true,
        down_state: AgentState::Stopped,
        restoring: None,
    };
    // A lifecycle request answered once Postgres is up again (start, restart).
    let mut pending: Option<Reply<LifecycleResponse>> = None;
    if let Some(req) = initial_restore {
        let plan = plan_restore(&shared, &req, false)
            .await
            .map_err(|e| e.to_string())?;
        let progress = install_progress(&shared, &plan);
        match perform_restore(&shared, &mut requests, &shutdown, plan, false, progress).await {
            RestoreEnd::Started(p) => next.restoring = Some(p),
            RestoreEnd::Failed(reason) => return Err(reason),
            RestoreEnd::Shutdown => return Ok(()),
        }
    }
    loop {
        if !next.want_running {
            shared.set_state(next.down_state.clone());
            match wait_stopped(&shared, &mut requests, &shutdown).await {
                Stopped::Start(reply) => {
                    pending = Some(reply);
                    next.want_running = true;
                    next.down_state = AgentState::Stopped;
                }
                Stopped::Restore(accepted) => {
                    if !carry_out(&shared, &mut requests, &shutdown, accepted, &mut next).await {
                        return Ok(());
                    }
                    continue;
                }
                Stopped::Shutdown => return Ok(()),
            }
        }
        shared.set_state(AgentState::Starting);
        let end = run_once(
            &shared,
            &mut requests,
            &shutdown,
            &mut pending,
            &mut next.restoring,
        )
        .await;
        shared.update_info(|i| {
            i.postmaster_pid = None;
            i.running_since = None;
        });
        match end {
            RunEnd::Shutdown => {
                shared.set_state(AgentState::Stopped);
                return Ok(());
            }
            RunEnd::Restore(accepted) => {
                if !carry_out(&shared, &mut requests, &shutdown, accepted, &mut next).await {
                    return Ok(());
                }
            }
            RunEnd::RestoreFailed(reason) => {
                if let Some(p) = next.restoring.take() {
                    let mut p = p.lock().expect("progress lock");
                    p.phase = RestorePhase::Failed;
                    p.error = Some(reason.clone());
                    p.finished_at =
                        Some(crate::archive::push::timestamp(std::time::SystemTime::now()));
                }
                tracing::error!("restore failed: {reason}");
                next.want_running = false;
                next.down_state = AgentState::Failed { reason };
            }
            RunEnd::Stopped { then_start, reply } => {
                backoff = BACKOFF_MIN;
                next.want_running = then_start;
                if then_start {
                    pending = reply;
                } else if let Some(reply) = reply {
                    shared.set_state(AgentState::Stopped);
                    let _ = reply.send(Ok(LifecycleResponse {
                        state: AgentState::Stopped,
                        postmaster_pid: None,
                    }));
                }
            }
            RunEnd::Crashed { reason, stable } => {
                if stable {
                    backoff = BACKOFF_MIN;
                }
                shared.metrics.crash_restarts.inc();
                shared.update_info(|i| {
                    i.crash_restarts += 1;
                    i.last_failure = Some(reason.clone());
                });
                if let Some(reply) = pending.take() {
                    let _ = reply.send(Err(ActionError::Failed(format!(
                        "Postgres did not start: {reason}"
                    ))));
                }
                tracing::error!(retry_in = ?backoff, "Postgres is down: {reason}");
                shared.set_state(AgentState::Failed {
                    reason: format!("{reason}; restarting in {backoff:?}"),
                });
                match wait_backoff(&shared, &mut requests, &shutdown, backoff).await {
                    BackoffEnd::Elapsed => backoff = (backoff * 2).min(BACKOFF_MAX),
                    BackoffEnd::Start(reply) => {
                        pending = Some(reply);
                        backoff = BACKOFF_MIN;
                    }
                    BackoffEnd::Stop(reply) => {
                        next.want_running = false;
                        backoff = BACKOFF_MIN;
                        let _ = reply.send(Ok(LifecycleResponse {
                            state: AgentState::Stopped,
                            postmaster_pid: None,
                        }));
                    }
                    BackoffEnd::Restore(accepted) => {
                        if !carry_out(&shared, &mut requests, &shutdown, accepted, &mut next).await
                        {
                            return Ok(());
                        }
                    }
                    BackoffEnd::Shutdown => {
                        shared.set_state(AgentState::Stopped);
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// One life of the postmaster: render config, start, wait until ready, serve requests until it
/// ends one way or another.
async fn run_once(
    shared: &Arc<Shared>,
    requests: &mut mpsc::Receiver<Request>,
    shutdown: &CancellationToken,
    pending: &mut Option<Reply<LifecycleResponse>>,
    restoring: &mut Option<restore::Progress>,
) -> RunEnd {
    let cfg = &shared.cfg;
    let started_at = Instant::now();
    // While restoring, an exit of the postmaster ends the restore instead of being restarted.
    let exited = |shared: &Arc<Shared>, restoring: &Option<restore::Progress>, status, stable| {
        let reason = exit_reason(status);
        if restoring.is_some() {
            let why = shared.pg_log.worst().unwrap_or_else(|| reason.clone());
            RunEnd::RestoreFailed(format!(
                "Postgres stopped during recovery: {why}. The data dir {} is left as it is for inspection",
                shared.cfg.data_dir.display()
            ))
        } else {
            RunEnd::Crashed { reason, stable }
        }
    };
    let params = match cfg.reread_parameters() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("config file: {e}; starting with the parameters read at agent start");
            cfg.parameters.clone()
        }
    };
    if let Err(e) = conf::render_all(cfg, &params, shared.owner.as_ref()) {
        return crashed(format!(
            "cannot render configuration into {}: {e}",
            cfg.data_dir.display()
        ));
    }
    let mut pm = match Postmaster::spawn(
        &shared.bins,
        &cfg.data_dir,
        shared.owner.as_ref(),
        &shared.pg_log,
    ) {
        Ok(pm) => pm,
        Err(e) => {
            return crashed(format!(
                "cannot start {}: {e}",
                shared.bins.path("postgres").display()
            ));
        }
    };
    shared.update_info(|i| i.postmaster_pid = Some(pm.pid()));

    // Starting: wait for connections while watching the child, requests and shutdown.
    let role = loop {
        tokio::select! {
            status = pm.wait() => return exited(shared, restoring, status, false),
            _ = shutdown.cancelled() => {
                let _ = stop(shared, &mut pm, ShutdownMode::Fast).await;
                return RunEnd::Shutdown;
            }
            Some(req) = requests.recv() => {
                if let Some(end) = handle_while_starting(shared, &mut pm, req).await {
                    return end;
                }
            }
            ready = probe(shared) => if let Some(role) = ready { break role },
        }
    };
    shared.update_info(|i| {
        i.running_since = Some(Instant::now());
        i.last_failure = None;
    });
    shared.set_state(AgentState::Running { role });
    if role == Role::Primary {
        ensure_roles(shared).await;
    }
    if let Some(reply) = pending.take() {
        let _ = reply.send(Ok(LifecycleResponse {
            state: shared.state(),
            postmaster_pid: Some(pm.pid()),
        }));
    }
    let started = Instant::now();
    let mut role = role;
    let mut tick = tokio::time::interval(Duration::from_millis(500));

    loop {
        tokio::select! {
            status = pm.wait() => {
                return exited(shared, restoring, status, started.elapsed() >= STABLE_RUN);
            }
            _ = tick.tick() => {
                // Follow role changes (a promotion) and the progress of a restore.
                if let Some(now) = follow(shared, role, restoring, started_at).await {
                    role = now;
                }
            }
            _ = shutdown.cancelled() => {
                let _ = stop(shared, &mut pm, ShutdownMode::Fast).await;
                return RunEnd::Shutdown;
            }
            Some(req) = requests.recv() => match req {
                Request::Reload { reply } => {
                    let _ = reply.send(reload(shared, &pm).await);
                }
                Request::Start { reply } => {
                    let _ = reply.send(Err(conflict(shared, "Postgres is already running")));
                }
                Request::Stop { mode, reply } => {
                    return match stop(shared, &mut pm, mode).await {
                        Ok(()) => RunEnd::Stopped { then_start: false, reply: Some(reply) },
                        Err(e) => { let _ = reply.send(Err(e)); crashed("stop failed".into()) }
                    };
                }
                Request::Restore { req, reply } => {
                    if restoring.is_some() {
                        let _ = reply.send(Err(conflict(shared, "a restore is in progress")));
                        continue;
                    }
                    if !req.force {
                        let _ = reply.send(Err(conflict(shared, "Postgres runs on a data dir that holds a cluster; restoring replaces it: pass force to confirm")));
                        continue;
                    }
                    match plan_restore(shared, &req, true).await {
                        Ok(plan) => {
                            let progress = install_progress(shared, &plan);
                            let _ = reply.send(Ok(accepted(&plan, &progress)));
                            if let Err(e) = stop(shared, &mut pm, ShutdownMode::Fast).await {
                                return RunEnd::RestoreFailed(format!("could not stop Postgres before restoring: {e}"));
                            }
                            return RunEnd::Restore(Accepted { plan: Box::new(plan), force: true, progress });
                        }
                        Err(e) => { let _ = reply.send(Err(e)); }
                    }
                }
                Request::Restart { mode, reply } => {
                    shared.metrics.requested_restarts.inc();
                    shared.update_info(|i| i.requested_restarts += 1);
                    return match stop(shared, &mut pm, mode).await {
                        Ok(()) => RunEnd::Stopped { then_start: true, reply: Some(reply) },
                        Err(e) => { let _ = reply.send(Err(e)); crashed("restart failed".into()) }
                    };
                }
            },
        }
    }
}

/// While starting, only a stop (or a restart, treated as stop-then-start) makes sense.
async fn handle_while_starting(
    shared: &Arc<Shared>,
    pm: &mut Postmaster,
    req: Request,
) -> Option<RunEnd> {
    match req {
        Request::Stop { mode, reply } => match stop(shared, pm, mode).await {
            Ok(()) => Some(RunEnd::Stopped {
                then_start: false,
                reply: Some(reply),
            }),
            Err(e) => {
                let _ = reply.send(Err(e));
                None
            }
        },
        Request::Restart { reply, .. } => {
            let _ = reply.send(Err(conflict(
                shared,
                "Postgres is still starting; retry when it runs",
            )));
            None
        }
        Request::Start { reply } => {
            let _ = reply.send(Err(conflict(shared, "Postgres is already starting")));
            None
        }
        Request::Reload { reply } => {
            let _ = reply.send(Err(conflict(
                shared,
                "Postgres is not running yet; nothing to reload",
            )));
            None
        }
        Request::Restore { reply, .. } => {
            let _ = reply.send(Err(conflict(
                shared,
                "Postgres is starting; retry when it runs or stop it first",
            )));
            None
        }
    }
}

async fn stop(
    shared: &Arc<Shared>,
    pm: &mut Postmaster,
    mode: ShutdownMode,
) -> Result<(), ActionError> {
    shared.set_state(AgentState::Stopping);
    tracing::info!(postmaster_pid = pm.pid(), ?mode, "stopping Postgres");
    match pm.shutdown(mode, SHUTDOWN_GRACE).await {
        Ok(status) => {
            tracing::info!(postmaster_pid = pm.pid(), %status, "Postgres stopped");
            Ok(())
        }
        Err(e) => Err(ActionError::Failed(format!(
            "waiting for the postmaster to exit: {e}"
        ))),
    }
}

/// Re-renders the configuration from the config file and signals Postgres to re-read it.
async fn reload(shared: &Arc<Shared>, pm: &Postmaster) -> Result<ReloadResponse, ActionError> {
    let cfg = &shared.cfg;
    let params: BTreeMap<String, String> = cfg
        .reread_parameters()
        .map_err(|e| ActionError::Failed(format!("config file not reloaded: {e}")))?;
    let changed = conf::render_all(cfg, &params, shared.owner.as_ref())
        .map_err(|e| ActionError::Failed(format!("cannot render configuration: {e}")))?;
    pm.reload();
    tracing::info!(?changed, "configuration reloaded");
    // Postgres applies SIGHUP asynchronously; give it a moment before asking what is pending.
    let client = sql::connect(
        cfg,
        shared.superuser_password.expose(),
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| {
        ActionError::Failed(format!("reload sent, but cannot connect to check it: {e}"))
    })?;
    let mut pending_restart = Vec::new();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        pending_restart = sql::pending_restart(&client).await.map_err(|e| {
            ActionError::Failed(format!(
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

/// One readiness probe: connect and ask the role. `None` while Postgres does not accept
/// connections yet.
async fn probe(shared: &Arc<Shared>) -> Option<Role> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = match sql::connect(
        &shared.cfg,
        shared.superuser_password.expose(),
        Duration::from_secs(2),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            // Postgres accepts connections but not our password: waiting will not help (a data dir
            // restored from another node's backup keeps that node's superuser password).
            if e.code() == Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD) {
                let msg = format!(
                    "Postgres refuses the superuser password from {}: it is not this cluster's password \
                     (a restored backup keeps the password of the cluster it was taken from)",
                    shared.cfg.superuser_password.path.display()
                );
                if shared.info().last_failure.as_deref() != Some(msg.as_str()) {
                    tracing::error!("{msg}");
                    shared.update_info(|i| i.last_failure = Some(msg));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            return None;
        }
    };
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .ok()?
        .get(0);
    Some(if in_recovery {
        Role::Replica
    } else {
        Role::Primary
    })
}

async fn ensure_roles(shared: &Arc<Shared>) {
    let cfg = &shared.cfg;
    let result = async {
        let client = sql::connect(
            cfg,
            shared.superuser_password.expose(),
            Duration::from_secs(5),
        )
        .await?;
        sql::ensure_replication_role(
            &client,
            &cfg.replication_user,
            shared.replication_password.expose(),
        )
        .await
    }
    .await;
    if let Err(e) = result {
        tracing::error!(role = %cfg.replication_user, "cannot create or update the replication role: {e}");
    }
}

fn crashed(reason: String) -> RunEnd {
    RunEnd::Crashed {
        reason,
        stable: false,
    }
}

fn conflict(shared: &Arc<Shared>, message: &str) -> ActionError {
    ActionError::Conflict {
        state: shared.state(),
        message: message.to_string(),
    }
}

fn exit_reason(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => format!("postmaster exited unexpectedly ({s})"),
        Err(e) => format!("lost track of the postmaster: {e}"),
    }
}

/// What ends a stop.
enum Stopped {
    Start(Reply<LifecycleResponse>),
    Restore(Accepted),
    Shutdown,
}

/// While stopped (on request, or after a failed restore): wait for a start, a restore or
/// shutdown; refuse the rest.
async fn wait_stopped(
    shared: &Arc<Shared>,
    requests: &mut mpsc::Receiver<Request>,
    shutdown: &CancellationToken,
) -> Stopped {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Stopped::Shutdown,
            req = requests.recv() => match req {
                None => return Stopped::Shutdown,
                Some(Request::Start { reply }) => return Stopped::Start(reply),
                Some(Request::Stop { reply, .. }) => { let _ = reply.send(Err(conflict(shared, "Postgres is already stopped"))); }
                Some(Request::Restart { reply, .. }) => { let _ = reply.send(Err(conflict(shared, "Postgres is stopped; start it instead (POST /v1/start)"))); }
                Some(Request::Reload { reply }) => { let _ = reply.send(Err(conflict(shared, "Postgres is stopped; nothing to reload"))); }
                Some(Request::Restore { req, reply }) => {
                    if let Some((plan, progress)) = accept_restore(shared, &req, reply).await {
                        return Stopped::Restore(Accepted { plan: Box::new(plan), force: req.force, progress });
                    }
                }
            }
        }
    }
}

enum BackoffEnd {
    Elapsed,
    Start(Reply<LifecycleResponse>),
    Stop(Reply<LifecycleResponse>),
    Restore(Accepted),
    Shutdown,
}

/// Waits out the crash backoff; a start or restart request cuts it short, a stop ends retrying,
/// a restore replaces the data dir.
async fn wait_backoff(
    shared: &Arc<Shared>,
    requests: &mut mpsc::Receiver<Request>,
    shutdown: &CancellationToken,
    backoff: Duration,
) -> BackoffEnd {
    let sleep = tokio::time::sleep(backoff);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return BackoffEnd::Elapsed,
            _ = shutdown.cancelled() => return BackoffEnd::Shutdown,
            req = requests.recv() => match req {
                None => return BackoffEnd::Shutdown,
                Some(Request::Start { reply }) | Some(Request::Restart { reply, .. }) => return BackoffEnd::Start(reply),
                Some(Request::Stop { reply, .. }) => return BackoffEnd::Stop(reply),
                Some(Request::Reload { reply }) => { let _ = reply.send(Err(conflict(shared, "Postgres is down; nothing to reload"))); }
                Some(Request::Restore { req, reply }) => {
                    if let Some((plan, progress)) = accept_restore(shared, &req, reply).await {
                        return BackoffEnd::Restore(Accepted { plan: Box::new(plan), force: req.force, progress });
                    }
                }
            }
        }
    }
}

/// Plans a restore while Postgres is down and answers the request; `Some` when accepted.
async fn accept_restore(
    shared: &Arc<Shared>,
    req: &RestoreRequest,
    reply: Reply<RestoreAccepted>,
) -> Option<(RestorePlan, restore::Progress)> {
    let has_cluster = std::fs::read_dir(&shared.cfg.data_dir).is_ok_and(|mut d| d.next().is_some());
    if has_cluster && !req.force {
        let _ = reply.send(Err(conflict(
            shared,
            &format!(
                "the data dir {} is not empty; restoring replaces it: pass force to confirm",
                shared.cfg.data_dir.display()
            ),
        )));
        return None;
    }
    match plan_restore(shared, req, has_cluster).await {
        Ok(plan) => {
            let progress = install_progress(shared, &plan);
            let _ = reply.send(Ok(accepted(&plan, &progress)));
            Some((plan, progress))
        }
        Err(e) => {
            let _ = reply.send(Err(e));
            None
        }
    }
}

/// Publishes a new restore's progress before the request is answered, so a caller polling
/// `/v1/status` never mistakes the previous restore's result for this one's.
fn install_progress(shared: &Arc<Shared>, plan: &RestorePlan) -> restore::Progress {
    let progress = restore::new_progress(plan);
    *shared.restore.lock().expect("restore lock") = Some(progress.clone());
    progress
}

fn accepted(plan: &RestorePlan, progress: &restore::Progress) -> RestoreAccepted {
    RestoreAccepted {
        backup_id: plan.manifest.id.clone(),
        target: plan.description.clone(),
        started_at: progress.lock().expect("progress lock").started_at.clone(),
    }
}

/// Checks a restore request against the store (refusals before anything is touched).
async fn plan_restore(
    shared: &Arc<Shared>,
    req: &RestoreRequest,
    _replacing: bool,
) -> Result<RestorePlan, ActionError> {
    let Some(archiver) = &shared.archiver else {
        return Err(conflict(
            shared,
            "no backup store is configured ([backup] in the config, or --backup-store)",
        ));
    };
    restore::plan(archiver.store(), archiver.layout(), req)
        .await
        .map_err(|e| match e {
            restore::RestoreError::Refused(m) => ActionError::Refused(m),
            restore::RestoreError::Failed(m) => ActionError::Failed(m),
        })
}

/// A restore accepted by the supervisor, to carry out once Postgres is down.
struct Accepted {
    plan: Box<RestorePlan>,
    force: bool,
    progress: restore::Progress,
}

/// What the supervisor loop does next.
struct Next {
    want_running: bool,
    /// The state to show while Postgres stays down on purpose.
    down_state: AgentState,
    /// Set while Postgres recovers towards a restore target.
    restoring: Option<restore::Progress>,
}

/// Carries out an accepted restore and sets what follows: Postgres started in recovery, or kept
/// down as Failed. False when the agent is shutting down.
async fn carry_out(
    shared: &Arc<Shared>,
    requests: &mut mpsc::Receiver<Request>,
    shutdown: &CancellationToken,
    accepted: Accepted,
    next: &mut Next,
) -> bool {
    let Accepted {
        plan,
        force,
        progress,
    } = accepted;
    match perform_restore(shared, requests, shutdown, *plan, force, progress).await {
        RestoreEnd::Started(p) => {
            next.restoring = Some(p);
            next.want_running = true;
            true
        }
        RestoreEnd::Failed(reason) => {
            next.want_running = false;
            next.down_state = AgentState::Failed { reason };
            true
        }
        RestoreEnd::Shutdown => false,
    }
}

enum RestoreEnd {
    /// Files restored and verified, recovery settings written: start Postgres in recovery.
    Started(restore::Progress),
    Failed(String),
    Shutdown,
}

/// Downloads the backup into the (emptied) data dir and writes the recovery settings, while
/// answering other requests with 409.
async fn perform_restore(
    shared: &Arc<Shared>,
    requests: &mut mpsc::Receiver<Request>,
    shutdown: &CancellationToken,
    plan: RestorePlan,
    force: bool,
    progress: restore::Progress,
) -> RestoreEnd {
    shared.set_state(AgentState::Restoring);
    tracing::info!(backup = %plan.manifest.id, "restoring {}", plan.description);
    let archiver = shared.archiver.as_ref().expect("planned with a store");
    if let Some(f) = &shared.fetcher {
        f.set_segment_size(plan.manifest.wal_segment_size);
        let _ = f.reset_spool();
    }
    let work_progress = progress.clone();
    let work = async {
        let progress = work_progress;
        if force {
            // Unlinking gigabytes blocks: keep it off the async workers.
            let dir = shared.cfg.data_dir.clone();
            tokio::task::spawn_blocking(move || restore::empty_data_dir(&dir))
                .await
                .map_err(|e| restore::RestoreError::Failed(e.to_string()))??;
        }
        let concurrency = archiver.store().upload_concurrency() * 2;
        restore::download(
            archiver.store(),
            archiver.layout(),
            &plan,
            &shared.cfg.data_dir,
            shared.owner.as_ref(),
            concurrency,
            &progress,
        )
        .await?;
        restore::write_recovery_config(&shared.cfg, &plan, shared.owner.as_ref())
    };
    tokio::pin!(work);
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = shutdown.cancelled() => return RestoreEnd::Shutdown,
            Some(req) = requests.recv() => refuse_while_restoring(shared, req),
        }
    };
    match result {
        Ok(()) => {
            progress.lock().expect("progress lock").phase = RestorePhase::Replaying;
            RestoreEnd::Started(progress)
        }
        Err(e) => {
            let reason = format!("restore of backup {} failed: {e}", plan.manifest.id);
            let mut p = progress.lock().expect("progress lock");
            p.phase = RestorePhase::Failed;
            p.error = Some(reason.clone());
            p.finished_at = Some(crate::archive::push::timestamp(std::time::SystemTime::now()));
            tracing::error!("{reason}");
            RestoreEnd::Failed(reason)
        }
    }
}

fn refuse_while_restoring(shared: &Arc<Shared>, req: Request) {
    let msg = "a restore is in progress";
    match req {
        Request::Stop { reply, .. } | Request::Start { reply } | Request::Restart { reply, .. } => {
            let _ = reply.send(Err(conflict(shared, msg)));
        }
        Request::Reload { reply } => {
            let _ = reply.send(Err(conflict(shared, msg)));
        }
        Request::Restore { reply, .. } => {
            let _ = reply.send(Err(conflict(shared, msg)));
        }
    }
}

/// Every half second while running: notice a role change (promotion), and follow a restore's
/// replay until Postgres promotes at the target. Returns the role when it changed.
async fn follow(
    shared: &Arc<Shared>,
    role: Role,
    restoring: &mut Option<restore::Progress>,
    started_at: Instant,
) -> Option<Role> {
    if role == Role::Primary && restoring.is_none() {
        return None;
    }
    let client = sql::connect(
        &shared.cfg,
        shared.superuser_password.expose(),
        Duration::from_secs(2),
    )
    .await
    .ok()?;
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text",
            &[],
        )
        .await
        .ok()?;
    let in_recovery: bool = row.get(0);
    let replayed: Option<String> = row.get(1);
    if let Some(p) = restoring.as_ref() {
        let mut p = p.lock().expect("progress lock");
        if replayed.is_some() {
            p.replayed_lsn = replayed;
        }
    }
    let now = if in_recovery {
        Role::Replica
    } else {
        Role::Primary
    };
    // A restore is complete once Postgres has left recovery, whether or not this tick saw the
    // role change: a short replay can finish before the first readiness probe succeeds.
    if !in_recovery && let Some(p) = restoring.take() {
        restore::clear_recovery_config(&shared.cfg);
        let timeline = sql::status(&client).await.ok().and_then(|s| s.timeline);
        let mut p = p.lock().expect("progress lock");
        p.phase = RestorePhase::Completed;
        p.timeline = timeline;
        p.replay_seconds = Some(started_at.elapsed().as_secs_f64());
        p.finished_at = Some(crate::archive::push::timestamp(std::time::SystemTime::now()));
        tracing::info!(backup = %p.backup_id, ?timeline, "restore complete: promoted at {}", p.target);
    }
    if now == role {
        return None;
    }
    shared.set_state(AgentState::Running { role: now });
    if now == Role::Primary {
        ensure_roles(shared).await;
    }
    Some(now)
}
