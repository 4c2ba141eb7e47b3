//! The one error kind of the agent's API surface: every module's refusal or failure ends up as an
//! [`AgentError`], and `http/error.rs` is the one place that maps it to a status code and the
//! JSON error body. Domain errors (store, archive, backup, restore) keep their own detail and say
//! here, once, which kind they are.

use pgpilot_common::state::AgentState;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// Malformed or invalid input: a body that does not parse, a name that is not a WAL file,
    /// a label too long (400).
    #[error("{0}")]
    BadRequest(String),
    /// No credential, or a wrong one (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The thing named does not exist: a route, a backup id, a WAL segment (404).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// Too many wrong tokens from this peer lately (429): refused without looking at the
    /// credential, for `retry_after_secs`.
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after_secs: u64,
    },
    /// A request body over [`crate::http::MAX_BODY_BYTES`] (413); nothing was read past it.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request does not fit the agent's state, or another operation is in flight; nothing
    /// was done (409). `message` names what is in the way.
    #[error("{message} (agent state: {state})")]
    Conflict { state: AgentState, message: String },
    /// Well-formed, but impossible with what exists (a restore target no backup can reach);
    /// refused before anything was touched (422).
    #[error("{0}")]
    Refused(String),
    /// The request fits the state, but what it needs is not there yet: a switchover candidate
    /// that is not streaming or lags (412). Nothing was done.
    #[error("{0}")]
    PreconditionFailed(String),
    /// Not able to serve now (probes and role checks, 503).
    #[error("{message}")]
    Unavailable {
        state: Option<AgentState>,
        message: String,
    },
    /// The work was attempted and failed; the message says on what (500).
    #[error("{0}")]
    Failed(String),
}

impl AgentError {
    pub fn conflict(state: &AgentState, message: impl Into<String>) -> AgentError {
        AgentError::Conflict {
            state: state.clone(),
            message: message.into(),
        }
    }

    /// A low-cardinality label for metrics (`pgpilot_api_errors_total{kind=…}`) and the error
    /// body's `error` field.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::BadRequest(_) => "bad_request",
            AgentError::Unauthorized(_) => "unauthorized",
            AgentError::NotFound(_) => "not_found",
            AgentError::MethodNotAllowed(_) => "method_not_allowed",
            AgentError::PayloadTooLarge(_) => "payload_too_large",
            AgentError::TooManyRequests { .. } => "too_many_requests",
            AgentError::Conflict { .. } => "conflict",
            AgentError::Refused(_) => "refused",
            AgentError::PreconditionFailed(_) => "precondition_failed",
            AgentError::Unavailable { .. } => "unavailable",
            AgentError::Failed(_) => "internal",
        }
    }

    /// The agent state the refusal names, if any.
    pub fn state(&self) -> Option<&AgentState> {
        match self {
            AgentError::Conflict { state, .. } => Some(state),
            AgentError::Unavailable { state, .. } => state.as_ref(),
            _ => None,
        }
    }
}
