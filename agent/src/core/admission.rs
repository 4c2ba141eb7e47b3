//! The admission rules of the agent: a pure function from the situation (state and the long
//! operation in flight) and a command to the step the executor carries out, or a refusal that
//! names what is in the way. No I/O here: the table test below covers every situation × every
//! command, and `README` table is generated from the same function (see `readme_table`).

use pgpilot_common::api::ShutdownMode;
use pgpilot_common::state::{AgentState, DrainState, OperationKind, Role};

use crate::error::AgentError;

/// The long operation in flight, as admission sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    pub kind: OperationKind,
    pub id: String,
}

/// What admission decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Situation {
    pub state: AgentState,
    pub in_flight: Option<InFlight>,
    /// The drain handshake: a draining instance takes no leadership and no new work.
    pub drain: DrainState,
}

/// A request, without its reply channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Stop {
        mode: ShutdownMode,
        cancel_backup: bool,
    },
    Start,
    Restart {
        mode: ShutdownMode,
        cancel_backup: bool,
    },
    Reload,
    Restore {
        force: bool,
        /// The data dir holds a cluster, which the restore would replace.
        replaces_cluster: bool,
        cancel_backup: bool,
    },
    Backup,
    /// A replica registers with this primary (its slot is created).
    Register,
    Promote,
    Demote,
    Follow,
    Switchover,
    Reinitialize,
    /// Start (or join) the drain of this instance.
    Drain,
}

/// What the executor does for an admitted command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Stop the postmaster and keep it stopped; `cancel` a backup in flight first.
    Stop { mode: ShutdownMode, cancel: bool },
    /// No postmaster runs (crash backoff): end retrying and stay stopped.
    StayStopped,
    /// Start the postmaster (from Stopped, or cutting a crash backoff short).
    Start,
    /// Stop then start; `cancel` a backup in flight first.
    Restart { mode: ShutdownMode, cancel: bool },
    /// Re-render the configuration and signal the postmaster.
    Reload,
    /// Plan the restore against the store (refusals before anything is touched), then stop
    /// Postgres if it runs, and download; `cancel` a backup in flight first.
    Restore { cancel: bool },
    /// Start a base backup.
    Backup,
    /// Create the replica's slot and record it.
    Register,
    /// Promote this replica (`pg_promote`).
    Promote,
    /// Stop writes (fast shutdown) and start again as a standby.
    Demote,
    /// Register with another primary and stream from it (reload, no restart).
    Follow,
    /// The planned switchover sequence.
    Switchover,
    /// Stop Postgres, empty the data dir, clone the primary again.
    Reinitialize,
    /// Begin the drain (or answer with the one under way).
    Drain,
}

impl Step {
    /// A short name, for the README table and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Step::Stop { .. } => "stop",
            Step::StayStopped => "stay stopped",
            Step::Start => "start",
            Step::Restart { .. } => "restart",
            Step::Reload => "reload",
            Step::Restore { .. } => "restore",
            Step::Backup => "backup",
            Step::Register => "register",
            Step::Promote => "promote",
            Step::Demote => "demote",
            Step::Follow => "follow",
            Step::Switchover => "switchover",
            Step::Reinitialize => "reinitialize",
            Step::Drain => "drain",
        }
    }
}

/// Decides whether `cmd` fits `s`. A refusal is a 409 naming the state and, when an operation
/// is in the way, that operation.
pub fn admit(s: &Situation, cmd: &Command) -> Result<Step, AgentError> {
    let st = &s.state;
    let refuse = |msg: String| Err(AgentError::conflict(st, msg));
    // An operation that is not a step of Postgres' own life cycle blocks what would end it.
    let busy = s.in_flight.as_ref();
    let backup = busy.filter(|op| op.kind == OperationKind::Backup);
    let restore = busy.filter(|op| op.kind == OperationKind::Restore);
    let blocked_by_backup = |cancel: bool, what: &str| -> Option<String> {
        match backup {
            Some(op) if !cancel => Some(format!(
                "backup {} is in progress and {what} would end it: wait for it, or cancel it with cancel_backup (CLI --cancel-backup)",
                op.id
            )),
            _ => None,
        }
    };
    let not_yet = |what: &str| format!("the agent is not ready for {what} yet");
    use AgentState as S;
    // A leaving instance: no leadership, no new work; only what the drain itself needs.
    match (s.drain, cmd) {
        (DrainState::Running, _) | (_, Command::Drain) => {}
        (DrainState::Draining, Command::Promote) => {
            return refuse(
                "this instance is draining: it does not take leadership; cancel the drain (DELETE /v1/drain) first"
                    .into(),
            );
        }
        (
            DrainState::Draining,
            Command::Start
            | Command::Restart { .. }
            | Command::Restore { .. }
            | Command::Backup
            | Command::Reinitialize,
        ) => {
            return refuse(
                "this instance is draining: it takes no new work; cancel the drain (DELETE /v1/drain) first"
                    .into(),
            );
        }
        (DrainState::Draining, _) => {}
        (DrainState::Drained, Command::Stop { .. } | Command::Reload | Command::Demote) => {}
        (DrainState::Drained, _) => {
            return refuse(
                "this instance is drained: it takes no new work until its agent restarts (delete the pod, or restart pgpilot-agent)"
                    .into(),
            );
        }
    }
    match cmd {
        Command::Drain => {
            if let Some(m) = restore_msg(restore) {
                return refuse(format!("{m}; drain once it is done"));
            }
            if let Some(op) = busy.filter(|op| op.kind == OperationKind::Clone) {
                return refuse(format!(
                    "clone {} is in progress; drain once it is done",
                    op.id
                ));
            }
            match st {
                S::Running { .. } | S::Stopped | S::Failed { .. } => Ok(Step::Drain),
                S::Starting | S::Stopping => {
                    refuse(format!("Postgres is {st}; retry once it settles"))
                }
                S::Initializing | S::Bootstrapping { .. } | S::Restoring | S::Recovering => {
                    refuse(not_yet("a drain"))
                }
            }
        }
        Command::Backup => {
            if let Some(op) = busy {
                return refuse(match op.kind {
                    OperationKind::Backup => {
                        format!("backup {} is already running; wait for it to finish", op.id)
                    }
                    other => format!("{other} of backup {} is in progress", op.id),
                });
            }
            match st {
                S::Running { .. } => Ok(Step::Backup),
                _ => refuse(format!(
                    "a base backup needs a running Postgres (primary or replica); the agent is {st}"
                )),
            }
        }
        Command::Register => match st {
            S::Running {
                role: Role::Primary,
            } => Ok(Step::Register),
            _ => refuse(format!(
                "replicas register with a running primary; this instance is {st}"
            )),
        },
        Command::Promote => match st {
            S::Running {
                role: Role::Replica,
            } => Ok(Step::Promote),
            S::Running {
                role: Role::Primary,
            } => refuse("this instance is already the primary".into()),
            S::Recovering => refuse(
                restore_msg(restore)
                    .map(|m| format!("{m}: it promotes at its target"))
                    .unwrap_or_else(|| "a restore replays WAL: it promotes at its target".into()),
            ),
            _ => refuse(format!(
                "only a running replica can be promoted; this instance is {st}"
            )),
        },
        Command::Demote | Command::Switchover => {
            let what = if *cmd == Command::Demote {
                "a demote"
            } else {
                "a switchover"
            };
            if let Some(op) = busy {
                return refuse(format!(
                    "{} {} is in progress; {what} waits for it to end",
                    op.kind, op.id
                ));
            }
            match st {
                S::Running {
                    role: Role::Primary,
                } => Ok(if *cmd == Command::Demote {
                    Step::Demote
                } else {
                    Step::Switchover
                }),
                S::Running {
                    role: Role::Replica,
                } => refuse(format!(
                    "this instance is a replica: {what} runs on the shard's primary"
                )),
                _ => refuse(format!("{what} needs a running primary; the agent is {st}")),
            }
        }
        Command::Reinitialize => match st {
            S::Running {
                role: Role::Replica,
            }
            | S::Stopped
            | S::Failed { .. } => Ok(Step::Reinitialize),
            S::Running {
                role: Role::Primary,
            } => refuse(
                "this instance is the primary: reinitializing it would throw away the shard's data"
                    .into(),
            ),
            S::Recovering => {
                refuse(restore_msg(restore).unwrap_or_else(|| {
                    "a restore replays WAL; reinitialize once it is done".into()
                }))
            }
            S::Starting | S::Stopping => refuse(format!("Postgres is {st}; retry once it settles")),
            S::Initializing | S::Bootstrapping { .. } | S::Restoring => {
                refuse(restore_msg(restore).unwrap_or_else(|| not_yet("a reinitialize")))
            }
        },
        Command::Follow => match st {
            S::Running {
                role: Role::Replica,
            }
            | S::Stopped
            | S::Failed { .. } => Ok(Step::Follow),
            S::Running {
                role: Role::Primary,
            } => refuse(
                "a running primary does not follow another: demote it first, or run a switchover"
                    .into(),
            ),
            S::Recovering => refuse(
                restore_msg(restore)
                    .unwrap_or_else(|| "a restore replays WAL; follow once it is done".into()),
            ),
            S::Starting | S::Stopping => refuse(format!("Postgres is {st}; retry once it settles")),
            S::Initializing | S::Bootstrapping { .. } | S::Restoring => {
                refuse(restore_msg(restore).unwrap_or_else(|| not_yet("a follow")))
            }
        },
        Command::Reload => match st {
            S::Running { .. } | S::Recovering => Ok(Step::Reload),
            S::Starting => refuse("Postgres is not running yet; nothing to reload".into()),
            S::Stopped | S::Stopping | S::Failed { .. } => {
                refuse("Postgres is not running; nothing to reload".into())
            }
            S::Initializing | S::Bootstrapping { .. } | S::Restoring => {
                refuse(restore_msg(restore).unwrap_or_else(|| not_yet("a reload")))
            }
        },
        Command::Start => match st {
            S::Stopped | S::Failed { .. } => Ok(Step::Start),
            S::Running { .. } | S::Recovering => refuse("Postgres is already running".into()),
            S::Starting => refuse("Postgres is already starting".into()),
            S::Stopping => refuse("Postgres is stopping; start it once it is stopped".into()),
            S::Initializing | S::Bootstrapping { .. } | S::Restoring => {
                refuse(restore_msg(restore).unwrap_or_else(|| not_yet("a start")))
            }
        },
        Command::Stop {
            mode,
            cancel_backup,
        } => match st {
            S::Starting | S::Running { .. } | S::Recovering => {
                match blocked_by_backup(*cancel_backup, "stopping Postgres") {
                    Some(m) => refuse(m),
                    None => Ok(Step::Stop {
                        mode: *mode,
                        cancel: backup.is_some(),
                    }),
                }
            }
            S::Failed { .. } => Ok(Step::StayStopped),
            S::Stopped => refuse("Postgres is already stopped".into()),
            S::Stopping => refuse("Postgres is already stopping".into()),
            S::Initializing | S::Bootstrapping { .. } | S::Restoring => {
                refuse(restore_msg(restore).unwrap_or_else(|| not_yet("a stop")))
            }
        },
        Command::Restart {
            mode,
            cancel_backup,
        } => match st {
            S::Running { .. } | S::Recovering => {
                match blocked_by_backup(*cancel_backup, "restarting Postgres") {
                    Some(m) => refuse(m),
                    None => Ok(Step::Restart {
                        mode: *mode,
                        cancel: backup.is_some(),
                    }),
                }
            }
            S::Failed { .. } => Ok(Step::Start),
            S::Starting => refuse("Postgres is still starting; retry when it runs".into()),
            S::Stopped => refuse("Postgres is stopped; start it instead (POST /v1/start)".into()),
            S::Stopping => refuse("Postgres is stopping; start it once it is stopped".into()),
            S::Initializing | S::Bootstrapping { .. } | S::Restoring => {
                refuse(restore_msg(restore).unwrap_or_else(|| not_yet("a restart")))
            }
        },
        Command::Restore {
            force,
            replaces_cluster,
            cancel_backup,
        } => {
            if let Some(m) = restore_msg(restore) {
                return refuse(m);
            }
            if let Some(m) = blocked_by_backup(*cancel_backup, "a restore") {
                return refuse(m);
            }
            match st {
                S::Running { .. } | S::Stopped | S::Failed { .. } => {
                    if *replaces_cluster && !*force {
                        let how = if matches!(st, S::Running { .. }) {
                            "Postgres runs on a data dir that holds a cluster"
                        } else {
                            "the data dir is not empty"
                        };
                        refuse(format!(
                            "{how}; restoring replaces it: pass force to confirm"
                        ))
                    } else {
                        Ok(Step::Restore {
                            cancel: backup.is_some(),
                        })
                    }
                }
                S::Starting => {
                    refuse("Postgres is starting; retry when it runs or stop it first".into())
                }
                S::Stopping => refuse("Postgres is stopping; retry once it is stopped".into()),
                S::Recovering | S::Restoring => refuse("a restore is in progress".into()),
                S::Initializing | S::Bootstrapping { .. } => refuse(not_yet("a restore")),
            }
        }
    }
}

fn restore_msg(restore: Option<&InFlight>) -> Option<String> {
    restore.map(|op| format!("a restore of backup {} is in progress", op.id))
}

/// Sample situations, one per row of the README table (and of the tests).
pub fn sample_situations() -> Vec<(&'static str, Situation)> {
    use pgpilot_common::state::BootstrapMethod;
    let at = |state: AgentState| Situation {
        state,
        in_flight: None,
        drain: DrainState::Running,
    };
    let with = |state: AgentState, kind: OperationKind| Situation {
        state,
        in_flight: Some(InFlight {
            kind,
            id: "B1".into(),
        }),
        drain: DrainState::Running,
    };
    let leaving = |state: AgentState, drain: DrainState| Situation {
        state,
        in_flight: None,
        drain,
    };
    let primary = AgentState::Running {
        role: Role::Primary,
    };
    vec![
        ("Initializing", at(AgentState::Initializing)),
        (
            "Bootstrapping",
            at(AgentState::Bootstrapping {
                method: BootstrapMethod::Initdb,
            }),
        ),
        (
            "Restoring (restore in flight)",
            with(AgentState::Restoring, OperationKind::Restore),
        ),
        ("Starting", at(AgentState::Starting)),
        (
            "Recovering (restore in flight)",
            with(AgentState::Recovering, OperationKind::Restore),
        ),
        ("Running(Primary)", at(primary.clone())),
        (
            "Running(Primary), backup in flight",
            with(primary, OperationKind::Backup),
        ),
        (
            "Running(Replica)",
            at(AgentState::Running {
                role: Role::Replica,
            }),
        ),
        ("Stopping", at(AgentState::Stopping)),
        ("Stopped", at(AgentState::Stopped)),
        (
            "Failed",
            at(AgentState::Failed {
                reason: "crash".into(),
            }),
        ),
        (
            "Running(Primary), draining",
            leaving(
                AgentState::Running {
                    role: Role::Primary,
                },
                DrainState::Draining,
            ),
        ),
        (
            "Running(Replica), draining",
            leaving(
                AgentState::Running {
                    role: Role::Replica,
                },
                DrainState::Draining,
            ),
        ),
        (
            "Stopped, drained",
            leaving(AgentState::Stopped, DrainState::Drained),
        ),
    ]
}

/// Sample commands, one per column of the README table.
pub fn sample_commands() -> Vec<(&'static str, Command)> {
    let fast = ShutdownMode::Fast;
    vec![
        (
            "stop",
            Command::Stop {
                mode: fast,
                cancel_backup: false,
            },
        ),
        (
            "stop +cancel_backup",
            Command::Stop {
                mode: fast,
                cancel_backup: true,
            },
        ),
        ("start", Command::Start),
        (
            "restart",
            Command::Restart {
                mode: fast,
                cancel_backup: false,
            },
        ),
        ("reload", Command::Reload),
        (
            "restore (empty dir)",
            Command::Restore {
                force: false,
                replaces_cluster: false,
                cancel_backup: false,
            },
        ),
        (
            "restore (cluster)",
            Command::Restore {
                force: false,
                replaces_cluster: true,
                cancel_backup: false,
            },
        ),
        (
            "restore +force",
            Command::Restore {
                force: true,
                replaces_cluster: true,
                cancel_backup: false,
            },
        ),
        (
            "restore +force +cancel_backup",
            Command::Restore {
                force: true,
                replaces_cluster: true,
                cancel_backup: true,
            },
        ),
        ("backup", Command::Backup),
        ("register", Command::Register),
        ("promote", Command::Promote),
        ("demote", Command::Demote),
        ("follow", Command::Follow),
        ("switchover", Command::Switchover),
        ("reinitialize", Command::Reinitialize),
        ("drain", Command::Drain),
    ]
}

/// The admission table as markdown: rows are situations, columns commands; a cell is the step
/// taken or `409`. agent/README.md carries it; a test keeps the two equal.
pub fn readme_table() -> String {
    let cmds = sample_commands();
    let mut out = String::from("| state \\ request |");
    for (name, _) in &cmds {
        out += &format!(" {name} |");
    }
    out += "\n|---|";
    for _ in &cmds {
        out += "---|";
    }
    out.push('\n');
    for (row, s) in sample_situations() {
        out += &format!("| {row} |");
        for (_, c) in &cmds {
            match admit(&s, c) {
                Ok(step) => out += &format!(" {} |", step.name()),
                Err(_) => out += " 409 |",
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expected outcome of every situation × command: a step name, or `409:<words the
    /// refusal must contain>`. Rows in the order of `sample_situations`, columns in the order
    /// of `sample_commands`.
    const EXPECTED: &[[&str; 10]] = &[
        // stop, stop+cancel, start, restart, reload, restore empty, restore cluster, restore force, restore force+cancel, backup
        [
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:running Postgres",
        ],
        [
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:not ready",
            "409:running Postgres",
        ],
        [
            "409:restore of backup B1",
            "409:restore of backup B1",
            "409:restore of backup B1",
            "409:restore of backup B1",
            "409:restore of backup B1",
            "409:restore of backup B1",
            "409:restore of backup B1",
            "409:restore of backup B1",
            "409:restore of backup B1",
            "409:restore of backup B1",
        ],
        [
            "stop",
            "stop",
            "409:already starting",
            "409:still starting",
            "409:not running yet",
            "409:starting",
            "409:starting",
            "409:starting",
            "409:starting",
            "409:running Postgres",
        ],
        [
            "stop",
            "stop",
            "409:already running",
            "restart",
            "reload",
            "409:restore of backup B1",
            "409:restore of backup B1",
            "409:restore of backup B1",
            "409:restore of backup B1",
            "409:restore of backup B1",
        ],
        [
            "stop",
            "stop",
            "409:already running",
            "restart",
            "reload",
            "restore",
            "409:pass force",
            "restore",
            "restore",
            "backup",
        ],
        [
            "409:backup B1 is in progress",
            "stop",
            "409:already running",
            "409:backup B1 is in progress",
            "reload",
            "409:backup B1 is in progress",
            "409:backup B1 is in progress",
            "409:backup B1 is in progress",
            "restore",
            "409:backup B1 is already running",
        ],
        [
            "stop",
            "stop",
            "409:already running",
            "restart",
            "reload",
            "restore",
            "409:pass force",
            "restore",
            "restore",
            "backup",
        ],
        [
            "409:already stopping",
            "409:already stopping",
            "409:stopping",
            "409:stopping",
            "409:not running",
            "409:stopping",
            "409:stopping",
            "409:stopping",
            "409:stopping",
            "409:running Postgres",
        ],
        [
            "409:already stopped",
            "409:already stopped",
            "start",
            "409:start it instead",
            "409:not running",
            "restore",
            "409:pass force",
            "restore",
            "restore",
            "409:running Postgres",
        ],
        [
            "stay stopped",
            "stay stopped",
            "start",
            "start",
            "409:not running",
            "restore",
            "409:pass force",
            "restore",
            "restore",
            "409:running Postgres",
        ],
        // Running(Primary), draining
        [
            "stop",
            "stop",
            "409:draining",
            "409:draining",
            "reload",
            "409:draining",
            "409:draining",
            "409:draining",
            "409:draining",
            "409:draining",
        ],
        // Running(Replica), draining
        [
            "stop",
            "stop",
            "409:draining",
            "409:draining",
            "reload",
            "409:draining",
            "409:draining",
            "409:draining",
            "409:draining",
            "409:draining",
        ],
        // Stopped, drained
        [
            "409:already stopped",
            "409:already stopped",
            "409:drained",
            "409:drained",
            "409:not running",
            "409:drained",
            "409:drained",
            "409:drained",
            "409:drained",
            "409:drained",
        ],
    ];

    /// The replication columns: register, promote, demote, follow, switchover, reinitialize.
    const EXPECTED_REPARENT: &[[&str; 6]] = &[
        // Initializing
        [
            "409:register with a running primary",
            "409:only a running replica",
            "409:needs a running primary",
            "409:not ready",
            "409:needs a running primary",
            "409:not ready",
        ],
        // Bootstrapping
        [
            "409:register with a running primary",
            "409:only a running replica",
            "409:needs a running primary",
            "409:not ready",
            "409:needs a running primary",
            "409:not ready",
        ],
        // Restoring (restore in flight)
        [
            "409:register with a running primary",
            "409:only a running replica",
            "409:restore B1 is in progress",
            "409:restore of backup B1",
            "409:restore B1 is in progress",
            "409:restore of backup B1",
        ],
        // Starting
        [
            "409:register with a running primary",
            "409:only a running replica",
            "409:needs a running primary",
            "409:retry once it settles",
            "409:needs a running primary",
            "409:retry once it settles",
        ],
        // Recovering (restore in flight)
        [
            "409:register with a running primary",
            "409:promotes at its target",
            "409:restore B1 is in progress",
            "409:restore of backup B1",
            "409:restore B1 is in progress",
            "409:restore of backup B1",
        ],
        // Running(Primary)
        [
            "register",
            "409:already the primary",
            "demote",
            "409:demote it first",
            "switchover",
            "409:throw away",
        ],
        // Running(Primary), backup in flight
        [
            "register",
            "409:already the primary",
            "409:backup B1 is in progress",
            "409:demote it first",
            "409:backup B1 is in progress",
            "409:throw away",
        ],
        // Running(Replica)
        [
            "409:register with a running primary",
            "promote",
            "409:runs on the shard's primary",
            "follow",
            "409:runs on the shard's primary",
            "reinitialize",
        ],
        // Stopping
        [
            "409:register with a running primary",
            "409:only a running replica",
            "409:needs a running primary",
            "409:retry once it settles",
            "409:needs a running primary",
            "409:retry once it settles",
        ],
        // Stopped
        [
            "409:register with a running primary",
            "409:only a running replica",
            "409:needs a running primary",
            "follow",
            "409:needs a running primary",
            "reinitialize",
        ],
        // Failed
        [
            "409:register with a running primary",
            "409:only a running replica",
            "409:needs a running primary",
            "follow",
            "409:needs a running primary",
            "reinitialize",
        ],
        // Running(Primary), draining: it still serves its replicas and switches over.
        [
            "register",
            "409:does not take leadership",
            "demote",
            "409:demote it first",
            "switchover",
            "409:draining",
        ],
        // Running(Replica), draining: it keeps following, never leads.
        [
            "409:register with a running primary",
            "409:does not take leadership",
            "409:runs on the shard's primary",
            "follow",
            "409:runs on the shard's primary",
            "409:draining",
        ],
        // Stopped, drained
        [
            "409:drained",
            "409:drained",
            "409:needs a running primary",
            "409:drained",
            "409:drained",
            "409:drained",
        ],
    ];

    /// The drain column: refused only while a restore or the bootstrap is under way, or while
    /// Postgres is between states; a drain under way is joined.
    const EXPECTED_DRAIN: &[&str] = &[
        "409:not ready",
        "409:not ready",
        "409:restore of backup B1",
        "409:retry once it settles",
        "409:restore of backup B1",
        "drain",
        "drain",
        "drain",
        "409:retry once it settles",
        "drain",
        "drain",
        "drain",
        "drain",
        "drain",
    ];

    #[test]
    fn every_state_times_every_request() {
        let situations = sample_situations();
        let commands = sample_commands();
        assert_eq!(situations.len(), EXPECTED.len(), "one row per situation");
        // Every state of the type appears in the table.
        for name in AgentState::NAMES {
            assert!(
                situations.iter().any(|(_, s)| s.state.name() == *name),
                "state {name} has no row"
            );
        }
        assert_eq!(
            situations.len(),
            EXPECTED_REPARENT.len(),
            "one row per situation"
        );
        assert_eq!(
            situations.len(),
            EXPECTED_DRAIN.len(),
            "one row per situation"
        );
        for ((((row, s), expected), reparent), drain) in situations
            .iter()
            .zip(EXPECTED)
            .zip(EXPECTED_REPARENT)
            .zip(EXPECTED_DRAIN)
        {
            let expected: Vec<&str> = expected
                .iter()
                .chain(reparent.iter())
                .chain(std::iter::once(drain))
                .copied()
                .collect();
            assert_eq!(commands.len(), expected.len());
            for ((col, c), want) in commands.iter().zip(expected.iter()) {
                let got = admit(s, c);
                match (want.strip_prefix("409:"), got) {
                    (Some(words), Err(e)) => {
                        assert_eq!(e.kind(), "conflict", "{row} × {col}");
                        assert_eq!(e.state(), Some(&s.state), "{row} × {col}: names the state");
                        assert!(
                            e.to_string().contains(words),
                            "{row} × {col}: refusal {e:?} should say {words:?}"
                        );
                    }
                    (None, Ok(step)) => assert_eq!(step.name(), *want, "{row} × {col}"),
                    (_, got) => panic!("{row} × {col}: expected {want}, got {got:?}"),
                }
            }
        }
    }

    #[test]
    fn cancel_is_carried_only_when_a_backup_is_in_flight() {
        let s = &sample_situations()[6].1;
        let stop = Command::Stop {
            mode: ShutdownMode::Fast,
            cancel_backup: true,
        };
        assert_eq!(
            admit(s, &stop).unwrap(),
            Step::Stop {
                mode: ShutdownMode::Fast,
                cancel: true
            }
        );
        let idle = &sample_situations()[5].1;
        assert_eq!(
            admit(idle, &stop).unwrap(),
            Step::Stop {
                mode: ShutdownMode::Fast,
                cancel: false
            }
        );
    }

    #[test]
    fn readme_carries_the_admission_table() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
        let readme = std::fs::read_to_string(&path).unwrap();
        let (begin, end) = (
            "<!-- admission-table:begin -->\n",
            "<!-- admission-table:end -->",
        );
        let start = readme.find(begin).expect("README has the table markers") + begin.len();
        let stop = readme.find(end).expect("README has the end marker");
        let table = readme_table();
        if std::env::var_os("UPDATE_README").is_some() {
            let updated = format!("{}{table}{}", &readme[..start], &readme[stop..]);
            std::fs::write(&path, updated).unwrap();
            return;
        }
        assert!(
            readme[start..stop] == table,
            "agent/README.md's admission table is stale: run `UPDATE_README=1 cargo test -p pgpilot-agent readme_carries` and commit it"
        );
    }
}
