//! The agent's explicit state machine (drawn in agent/README.md) and the one shape in which every
//! long operation reports its progress.
//!
//! Every API request is checked against the current state by the agent's pure admission
//! function; one that does not fit gets 409 with the state in the body, never a half-done action.
//! State names come from the types (`strum`), never from a hand-kept list.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Replication role of a running Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Role {
    /// Accepts writes.
    Primary,
    /// Streams or replays WAL from a primary and follows it (not a restore's replay: that is
    /// [`AgentState::Recovering`]).
    Replica,
}

/// How the data dir is being brought into existence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootstrapMethod {
    Initdb,
    /// From a base backup and archived WAL (`run --bootstrap-from-backup`).
    Restore,
    /// A replica's copy of its primary, streamed over the replication protocol.
    Clone,
}

/// The agent's state. Serialized as `{"state": "Running", "role": "Primary"}` and so on.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[serde(tag = "state")]
pub enum AgentState {
    /// Validating configuration and inspecting the data dir.
    Initializing,
    /// Creating the data dir.
    Bootstrapping { method: BootstrapMethod },
    /// Restoring a base backup into the data dir (the `restore` operation's download step,
    /// progress in `/v1/status` `operation`). Postgres then starts and replays WAL
    /// (`Recovering`) until it promotes at the target.
    Restoring,
    /// The postmaster is started and the agent waits until it accepts connections.
    Starting,
    /// Postgres accepts connections and replays archived WAL towards a restore target; it
    /// promotes there (then `Running(Primary)`). It is neither a primary nor a replica: role
    /// checks (`/primary`, `/replica`) answer 503.
    Recovering,
    /// Postgres accepts connections.
    Running { role: Role },
    /// A shutdown of Postgres was requested and is in progress.
    Stopping,
    /// Postgres is stopped on request (API or agent shutdown) and stays stopped.
    Stopped,
    /// Postgres is not running for a reason other than a request (crash, failed start, failed
    /// restore). After a crash the agent retries with backoff; `reason` says what happened.
    Failed { reason: String },
}

impl AgentState {
    /// The state's name without its details, as used in metrics labels and 409 bodies.
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// Every state name, for metrics that export one series per state (derived from the type).
    pub const NAMES: &'static [&'static str] = <AgentState as strum::VariantNames>::VARIANTS;

    /// Postgres runs and accepts connections: as primary or replica, or replaying a restore.
    pub fn accepts_connections(&self) -> bool {
        matches!(self, AgentState::Running { .. } | AgentState::Recovering)
    }

    /// The role of a running Postgres; `None` in every other state (a restore's replay
    /// included).
    pub fn role(&self) -> Option<Role> {
        match self {
            AgentState::Running { role } => Some(*role),
            _ => None,
        }
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentState::Running { role } => write!(f, "Running({role:?})"),
            AgentState::Bootstrapping { method } => write!(f, "Bootstrapping({method:?})"),
            AgentState::Failed { reason } => write!(f, "Failed({reason})"),
            other => f.write_str(other.name()),
        }
    }
}

/// Where this instance stands in the drain handshake (shared/DESIGN.md, "Drain handshake"):
/// a normal member, leaving (it refuses leadership and evacuates it), or gone (leadership
/// evacuated, WAL archived to the stop point, Postgres stopped). A failed or cancelled drain
/// returns to `Running`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    strum::IntoStaticStr,
    strum::VariantNames,
    strum::Display,
)]
pub enum DrainState {
    /// A normal member of its shard.
    #[default]
    Running,
    /// Leaving: no longer a candidate for leadership; a primary switches over, WAL is archived,
    /// then Postgres stops.
    Draining,
    /// Gone: the pod may be deleted. Postgres stays stopped until the agent restarts.
    Drained,
}

impl DrainState {
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// Every state name, for the metric that exports one series per state.
    pub const NAMES: &'static [&'static str] = <DrainState as strum::VariantNames>::VARIANTS;
}

/// The kinds of long operation the agent carries out, one at a time. Replication adds
/// switchover, the drain handshake adds drain.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    strum::IntoStaticStr,
    strum::Display,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum OperationKind {
    /// A base backup (`POST /v1/backups`).
    Backup,
    /// A point-in-time restore (`POST /v1/restore`, `run --bootstrap-from-backup`).
    Restore,
    /// A replica's clone of its primary (an empty data dir with `[replication] primary`, or
    /// `POST /v1/reinitialize`).
    Clone,
    /// A planned switchover (`POST /v1/switchover`).
    Switchover,
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Running,
    Succeeded,
    Failed,
}

/// Counters every long operation reports, in the same shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub bytes_done: u64,
    /// 0 while unknown.
    pub bytes_total: u64,
    pub files_done: u64,
    /// 0 while unknown.
    pub files_total: u64,
}

/// A long operation of the agent (the one in flight, or the last one since the agent started),
/// as `/v1/status` reports it. The kind's own record has the details: `GET /v1/backups/{id}`
/// for a backup, `/v1/status` `restore` for a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Operation {
    pub kind: OperationKind,
    /// The backup's id; for a restore, the id of the backup being restored.
    pub id: String,
    /// The kind's current step, e.g. `copying` (backup) or `replaying` (restore).
    pub step: String,
    pub outcome: Outcome,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339, once it ended.
    pub finished_at: Option<String>,
    pub progress: Progress,
    /// Why it failed, in words.
    pub error: Option<String>,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.kind, self.id, self.step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_with_state_tag() {
        let running = AgentState::Running {
            role: Role::Primary,
        };
        let json = serde_json::to_value(&running).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"state": "Running", "role": "Primary"})
        );
        let back: AgentState = serde_json::from_value(json).unwrap();
        assert_eq!(back, running);
        assert_eq!(
            serde_json::to_value(AgentState::Stopped).unwrap(),
            serde_json::json!({"state": "Stopped"})
        );
    }

    /// The derived names are the serde tags: a metric label, a 409 body and the JSON agree.
    #[test]
    fn names_are_the_serialized_tags() {
        let all = [
            AgentState::Initializing,
            AgentState::Bootstrapping {
                method: BootstrapMethod::Initdb,
            },
            AgentState::Restoring,
            AgentState::Starting,
            AgentState::Recovering,
            AgentState::Running {
                role: Role::Replica,
            },
            AgentState::Stopping,
            AgentState::Stopped,
            AgentState::Failed { reason: "x".into() },
        ];
        assert_eq!(all.len(), AgentState::NAMES.len());
        for s in &all {
            let tag = serde_json::to_value(s).unwrap()["state"].clone();
            assert_eq!(tag, s.name(), "{s}");
            assert!(AgentState::NAMES.contains(&s.name()), "{s}");
        }
    }

    #[test]
    fn operation_kind_serializes_lowercase() {
        assert_eq!(
            serde_json::to_value(OperationKind::Backup).unwrap(),
            "backup"
        );
        assert_eq!(OperationKind::Restore.to_string(), "restore");
    }
}
