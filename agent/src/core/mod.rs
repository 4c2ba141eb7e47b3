//! The agent's core: one state machine that owns every operation.
//!
//! - [`admission`] is the pure rule book: situation × command → step or refusal.
//! - [`executor`] is the one task that owns the postmaster and every long operation (base
//!   backups, restores; next switchover and drain). It admits each request through
//!   [`admission::admit`], carries out the step, and publishes one [`Snapshot`].
//! - [`Handle`] is what everything else holds: the read-only [`Context`], a request sender and
//!   a `watch` of the snapshot. Nothing outside the executor changes the agent's state.
//! - [`monitor`] is the one long-lived monitoring connection to Postgres.

pub mod admission;
pub mod drain_record;
pub mod executor;
pub mod monitor;

use std::sync::Arc;
use std::time::Instant;

use pgpilot_common::api::{
    BackupProgress, BackupRequest, BackupState, DrainRequest, DrainStatus, FollowRequest,
    LifecycleResponse, RegisterReplicaRequest, RegisterReplicaResponse, ReloadResponse,
    ReparentResponse, RestoreAccepted, RestorePhase, RestoreProgress, RestoreRequest,
    ShutdownRequest, SwitchoverRequest, SwitchoverResponse,
};
use pgpilot_common::state::{AgentState, Operation, OperationKind, Outcome, Progress};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::archive::backup::Run;
use crate::context::Context;
use crate::error::AgentError;
use crate::restore;
use drain_record::DrainRecord;

pub use admission::InFlight;

type Reply<T> = oneshot::Sender<Result<T, AgentError>>;

/// Requests the executor serves, each with its reply channel.
#[derive(Debug)]
pub(crate) enum Request {
    Stop {
        req: ShutdownRequest,
        reply: Reply<LifecycleResponse>,
    },
    Start {
        reply: Reply<LifecycleResponse>,
    },
    Restart {
        req: ShutdownRequest,
        reply: Reply<LifecycleResponse>,
    },
    Reload {
        reply: Reply<ReloadResponse>,
    },
    Restore {
        req: Box<RestoreRequest>,
        reply: Reply<RestoreAccepted>,
    },
    Backup {
        req: BackupRequest,
        reply: Reply<BackupProgress>,
    },
    Register {
        req: RegisterReplicaRequest,
        reply: Reply<RegisterReplicaResponse>,
    },
    Promote {
        reply: Reply<ReparentResponse>,
    },
    Demote {
        reply: Reply<ReparentResponse>,
    },
    Follow {
        req: FollowRequest,
        reply: Reply<ReparentResponse>,
    },
    Switchover {
        req: SwitchoverRequest,
        reply: Reply<SwitchoverResponse>,
    },
    Reinitialize {
        req: pgpilot_common::api::ReinitializeRequest,
        reply: Reply<ReparentResponse>,
    },
    /// Begin (or join) the drain: its status, and the token of one that has just begun.
    Drain {
        req: DrainRequest,
        by: &'static str,
        reply: Reply<(DrainStatus, Option<CancellationToken>)>,
    },
    /// The drain's stop of Postgres (not admitted as a command: only a drain under way asks).
    DrainStop {
        reply: Reply<()>,
    },
}

impl Request {
    /// Answers the request with `e`: admission refused it, nothing was done.
    pub(crate) fn refuse(self, e: AgentError) {
        match self {
            Request::Stop { reply, .. }
            | Request::Start { reply }
            | Request::Restart { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Request::Reload { reply } => {
                let _ = reply.send(Err(e));
            }
            Request::Restore { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Request::Backup { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Request::Register { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Request::Promote { reply }
            | Request::Demote { reply }
            | Request::Follow { reply, .. }
            | Request::Reinitialize { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Request::Switchover { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Request::Drain { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Request::DrainStop { reply } => {
                let _ = reply.send(Err(e));
            }
        }
    }
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

/// The live record of an operation: its progress is updated by the task doing the work.
#[derive(Clone)]
pub enum OpRecord {
    Backup(Arc<Run>),
    Restore(restore::Progress),
    /// A clone or a switchover: the record is the operation itself.
    Live(crate::replication::live::LiveOp),
}

impl OpRecord {
    /// The operation in the one shape every kind reports in.
    pub fn view(&self) -> Operation {
        match self {
            OpRecord::Backup(run) => {
                let p = run.snapshot();
                Operation {
                    kind: OperationKind::Backup,
                    id: p.id,
                    step: step_name(p.phase),
                    outcome: match p.state {
                        BackupState::Running => Outcome::Running,
                        BackupState::Completed => Outcome::Succeeded,
                        BackupState::Failed | BackupState::Incomplete => Outcome::Failed,
                    },
                    started_at: p.started_at.unwrap_or_default(),
                    finished_at: p.finished_at,
                    progress: progress(p.bytes_done, p.bytes_total, p.files_done, p.files_total),
                    error: p.reason,
                }
            }
            OpRecord::Live(op) => op.lock().clone(),
            OpRecord::Restore(record) => {
                let p = record.lock().expect("progress lock").clone();
                Operation {
                    kind: OperationKind::Restore,
                    id: p.backup_id,
                    step: step_name(p.phase),
                    outcome: match p.phase {
                        RestorePhase::Downloading | RestorePhase::Replaying => Outcome::Running,
                        RestorePhase::Completed => Outcome::Succeeded,
                        RestorePhase::Failed => Outcome::Failed,
                    },
                    started_at: p.started_at,
                    finished_at: p.finished_at,
                    progress: progress(p.bytes_done, p.bytes_total, p.files_done, p.files_total),
                    error: p.error,
                }
            }
        }
    }
}

/// A phase enum's serialized name (`copying`, `replaying`), as the operation's step.
fn step_name(phase: impl serde::Serialize) -> String {
    serde_json::to_value(phase)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

fn progress(bytes_done: u64, bytes_total: u64, files_done: u64, files_total: u64) -> Progress {
    Progress {
        bytes_done,
        bytes_total,
        files_done,
        files_total,
    }
}

/// What the executor publishes after every event.
#[derive(Clone)]
pub struct Snapshot {
    pub state: AgentState,
    /// The long operation in flight, if any.
    pub in_flight: Option<InFlight>,
    /// The operation in flight, or else the last one since the agent started.
    pub operation: Option<OpRecord>,
    /// The current or last restore (its own record for `/v1/status`).
    pub restore: Option<restore::Progress>,
    pub runtime: RuntimeInfo,
    /// Postgres has accepted connections at least once since the agent started.
    pub ever_running: bool,
    /// On a replica: its WAL receiver as last seen (every few seconds).
    pub receiver: Option<crate::replication::sql::ReceiverStatus>,
    /// On a primary: the replicas that registered (name → API URL).
    pub registry: crate::replication::slots::Registry,
    /// On a replica: the agent URL of the primary it registered with.
    pub upstream: Option<String>,
    /// Kubernetes mode: parameters Postgres says need a restart to take effect.
    pub pending_restart: Vec<String>,
}

impl Snapshot {
    pub fn new(state: AgentState) -> Snapshot {
        Snapshot {
            state,
            in_flight: None,
            operation: None,
            restore: None,
            runtime: RuntimeInfo::default(),
            ever_running: false,
            receiver: None,
            registry: Default::default(),
            upstream: None,
            pending_restart: Vec::new(),
        }
    }

    pub fn restore_progress(&self) -> Option<RestoreProgress> {
        self.restore
            .as_ref()
            .map(|p| p.lock().expect("progress lock").clone())
    }
}

/// What the HTTP routes, the CLI-facing parts and `run` hold: the read-only context, the way
/// to ask the executor for something, and the published snapshot.
#[derive(Clone)]
pub struct Handle {
    pub ctx: Arc<Context>,
    requests: mpsc::Sender<Request>,
    status: watch::Receiver<Snapshot>,
    /// Held while a switchover request is being served, so a second one is refused at once
    /// (409) instead of queueing behind it.
    switchover: Arc<tokio::sync::Mutex<()>>,
    drain: DrainRecord,
}

impl Handle {
    pub fn snapshot(&self) -> Snapshot {
        self.status.borrow().clone()
    }

    pub fn state(&self) -> AgentState {
        self.status.borrow().state.clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.status.clone()
    }

    async fn request<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, AgentError> {
        // Nothing was done: a conflict with the agent's state (documented on every route
        // that takes a request), not an internal error.
        let gone = || AgentError::Conflict {
            state: self.state(),
            message: "the agent is shutting down".into(),
        };
        let (tx, rx) = oneshot::channel();
        self.requests.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn stop(&self, req: ShutdownRequest) -> Result<LifecycleResponse, AgentError> {
        self.request(|reply| Request::Stop { req, reply }).await
    }

    pub async fn start(&self) -> Result<LifecycleResponse, AgentError> {
        self.request(|reply| Request::Start { reply }).await
    }

    pub async fn restart(&self, req: ShutdownRequest) -> Result<LifecycleResponse, AgentError> {
        self.request(|reply| Request::Restart { req, reply }).await
    }

    pub async fn reload(&self) -> Result<ReloadResponse, AgentError> {
        self.request(|reply| Request::Reload { reply }).await
    }

    pub async fn restore(&self, req: RestoreRequest) -> Result<RestoreAccepted, AgentError> {
        self.request(|reply| Request::Restore {
            req: Box::new(req),
            reply,
        })
        .await
    }

    pub async fn backup(&self, req: BackupRequest) -> Result<BackupProgress, AgentError> {
        self.request(|reply| Request::Backup { req, reply }).await
    }

    pub async fn register_replica(
        &self,
        req: RegisterReplicaRequest,
    ) -> Result<RegisterReplicaResponse, AgentError> {
        self.request(|reply| Request::Register { req, reply }).await
    }

    pub async fn promote(&self) -> Result<ReparentResponse, AgentError> {
        self.request(|reply| Request::Promote { reply }).await
    }

    pub async fn demote(&self) -> Result<ReparentResponse, AgentError> {
        self.request(|reply| Request::Demote { reply }).await
    }

    pub async fn follow(&self, req: FollowRequest) -> Result<ReparentResponse, AgentError> {
        self.request(|reply| Request::Follow { req, reply }).await
    }

    pub async fn reinitialize(
        &self,
        req: pgpilot_common::api::ReinitializeRequest,
    ) -> Result<ReparentResponse, AgentError> {
        self.request(|reply| Request::Reinitialize { req, reply })
            .await
    }

    /// The drain handshake of this instance, live.
    pub fn drain_record(&self) -> DrainRecord {
        self.drain.clone()
    }

    /// Begins the drain (or joins the one under way): its status, and the token of one that
    /// has just begun, whose task the caller starts (`crate::drain::start`).
    pub async fn begin_drain(
        &self,
        req: DrainRequest,
        by: &'static str,
    ) -> Result<(DrainStatus, Option<CancellationToken>), AgentError> {
        self.request(|reply| Request::Drain { req, by, reply })
            .await
    }

    /// Cancels a drain before it stops Postgres.
    pub fn cancel_drain(&self, why: &str) -> Result<DrainStatus, AgentError> {
        self.drain.cancel(&self.ctx, &self.state(), why)
    }

    pub(crate) async fn drain_stop(&self) -> Result<(), AgentError> {
        self.request(|reply| Request::DrainStop { reply }).await
    }

    pub async fn switchover(
        &self,
        req: SwitchoverRequest,
    ) -> Result<SwitchoverResponse, AgentError> {
        let Ok(_guard) = self.switchover.try_lock() else {
            return Err(AgentError::conflict(
                &self.state(),
                "a switchover is already in progress on this agent",
            ));
        };
        self.request(|reply| Request::Switchover { req, reply })
            .await
    }
}

/// Creates the handle and the executor that serves it, starting in `initial`.
pub fn new(ctx: Arc<Context>, initial: AgentState) -> (Handle, executor::Executor) {
    let (tx, rx) = mpsc::channel(16);
    ctx.metrics.set_state(&initial);
    let (status_tx, status_rx) = watch::channel(Snapshot::new(initial.clone()));
    let drain = DrainRecord::default();
    let handle = Handle {
        ctx: ctx.clone(),
        requests: tx,
        status: status_rx,
        switchover: Arc::new(tokio::sync::Mutex::new(())),
        drain: drain.clone(),
    };
    let exec = executor::Executor::new(ctx, status_tx, rx, initial, drain);
    (handle, exec)
}
