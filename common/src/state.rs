//! The agent's explicit state machine (drawn in agent/README.md).
//!
//! Every API request is checked against the current state; one that does not fit gets 409 with
//! the state in the body, never a half-done action.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Replication role of a running Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Role {
    Primary,
    Replica,
}

/// How the data dir is being brought into existence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BootstrapMethod {
    Initdb,
    /// From a base backup and archived WAL (`run --bootstrap-from-backup`).
    Restore,
}

/// The agent's state. Serialized as `{"state": "Running", "role": "Primary"}` and so on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "state")]
pub enum AgentState {
    /// Validating configuration and inspecting the data dir.
    Initializing,
    /// Creating the data dir.
    Bootstrapping { method: BootstrapMethod },
    /// Restoring a base backup into the data dir (progress in `/v1/status`, `restore`). Postgres
    /// then starts in recovery (`Starting`, `Running(Replica)`) and promotes at the target.
    Restoring,
    /// The postmaster is started and the agent waits until it accepts connections.
    Starting,
    /// Postgres accepts connections.
    Running { role: Role },
    /// A shutdown of Postgres was requested and is in progress.
    Stopping,
    /// Postgres is stopped on request (API or agent shutdown) and stays stopped.
    Stopped,
    /// Postgres is not running for a reason other than a request (crash, failed start). The
    /// agent retries with backoff; `reason` says what happened.
    Failed { reason: String },
}

impl AgentState {
    /// The state's name without its details, as used in metrics labels and 409 bodies.
    pub fn name(&self) -> &'static str {
        match self {
            AgentState::Initializing => "Initializing",
            AgentState::Bootstrapping { .. } => "Bootstrapping",
            AgentState::Restoring => "Restoring",
            AgentState::Starting => "Starting",
            AgentState::Running { .. } => "Running",
            AgentState::Stopping => "Stopping",
            AgentState::Stopped => "Stopped",
            AgentState::Failed { .. } => "Failed",
        }
    }

    /// Every state name, for metrics that export one series per state.
    pub const NAMES: [&'static str; 8] = [
        "Initializing",
        "Bootstrapping",
        "Restoring",
        "Starting",
        "Running",
        "Stopping",
        "Stopped",
        "Failed",
    ];

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

    #[test]
    fn names_cover_every_state() {
        let all = [
            AgentState::Initializing,
            AgentState::Bootstrapping {
                method: BootstrapMethod::Initdb,
            },
            AgentState::Restoring,
            AgentState::Starting,
            AgentState::Running {
                role: Role::Replica,
            },
            AgentState::Stopping,
            AgentState::Stopped,
            AgentState::Failed { reason: "x".into() },
        ];
        for s in &all {
            assert!(AgentState::NAMES.contains(&s.name()), "{s}");
        }
        assert_eq!(all.len(), AgentState::NAMES.len());
    }
}
