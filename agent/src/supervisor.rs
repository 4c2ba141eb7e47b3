//! The supervisor: the one task that owns the postmaster. Lifecycle requests from the API and
//! signals reach it through a channel, so every action is checked against the state it will
//! act on, with no race between two requests; a request that does not fit is answered with a
//! conflict naming the state, before anything is done.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgpilot_common::api::{LifecycleResponse, ReloadResponse, ShutdownMode};
use pgpilot_common::state::{AgentState, Role};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::postgres::bins::PgBinaries;
use crate::postgres::process::Postmaster;
use crate::postgres::{OsUser, conf, sql};
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
}

/// Runs Postgres until `shutdown` is cancelled, then stops it (fast) and returns.
pub async fn run(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut want_running = true;
    // A lifecycle request answered once Postgres is up again (start, restart).
    let mut pending: Option<Reply<LifecycleResponse>> = None;
    loop {
        if !want_running {
            shared.set_state(AgentState::Stopped);
            match wait_stopped(&shared, &mut requests, &shutdown).await {
                Some(reply) => {
                    pending = Some(reply);
                    want_running = true;
                }
                None => return,
            }
        }
        shared.set_state(AgentState::Starting);
        let end = run_once(&shared, &mut requests, &shutdown, &mut pending).await;
        shared.update_info(|i| {
            i.postmaster_pid = None;
            i.running_since = None;
        });
        match end {
            RunEnd::Shutdown => {
                shared.set_state(AgentState::Stopped);
                return;
            }
            RunEnd::Stopped { then_start, reply } => {
                backoff = BACKOFF_MIN;
                want_running = then_start;
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
                        want_running = false;
                        backoff = BACKOFF_MIN;
                        let _ = reply.send(Ok(LifecycleResponse {
                            state: AgentState::Stopped,
                            postmaster_pid: None,
                        }));
                    }
                    BackoffEnd::Shutdown => {
                        shared.set_state(AgentState::Stopped);
                        return;
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
) -> RunEnd {
    let cfg = &shared.cfg;
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
    let mut pm = match Postmaster::spawn(&shared.bins, &cfg.data_dir, shared.owner.as_ref()) {
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
            status = pm.wait() => return crashed(exit_reason(status)),
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

    loop {
        tokio::select! {
            status = pm.wait() => {
                return RunEnd::Crashed { reason: exit_reason(status), stable: started.elapsed() >= STABLE_RUN };
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
    let client = sql::connect(
        &shared.cfg,
        shared.superuser_password.expose(),
        Duration::from_secs(2),
    )
    .await
    .ok()?;
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

/// While stopped on request: wait for a start (returned) or shutdown (None); refuse the rest.
async fn wait_stopped(
    shared: &Arc<Shared>,
    requests: &mut mpsc::Receiver<Request>,
    shutdown: &CancellationToken,
) -> Option<Reply<LifecycleResponse>> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            req = requests.recv() => match req? {
                Request::Start { reply } => return Some(reply),
                Request::Stop { reply, .. } => { let _ = reply.send(Err(conflict(shared, "Postgres is already stopped"))); }
                Request::Restart { reply, .. } => { let _ = reply.send(Err(conflict(shared, "Postgres is stopped; start it instead (POST /v1/start)"))); }
                Request::Reload { reply } => { let _ = reply.send(Err(conflict(shared, "Postgres is stopped; nothing to reload"))); }
            }
        }
    }
}

enum BackoffEnd {
    Elapsed,
    Start(Reply<LifecycleResponse>),
    Stop(Reply<LifecycleResponse>),
    Shutdown,
}

/// Waits out the crash backoff; a start or restart request cuts it short, a stop ends retrying.
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
            }
        }
    }
}
