//! The one place that maps errors to HTTP status codes and the one JSON error body
//! ([`pgpilot_common::api::ErrorBody`]).

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use pgpilot_common::api::ErrorBody;
use pgpilot_common::state::AgentState;

use crate::supervisor::ActionError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{message}")]
    Conflict { state: AgentState, message: String },
    /// Well-formed, but impossible with what exists (a restore target no backup can reach).
    #[error("{0}")]
    Unprocessable(String),
    #[error("{message}")]
    Unavailable {
        state: Option<AgentState>,
        message: String,
    },
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Conflict { .. } => "conflict",
            ApiError::Unprocessable(_) => "refused",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> Self {
        match e {
            ActionError::Conflict { state, message } => ApiError::Conflict {
                message: format!("{message} (agent state: {state})"),
                state,
            },
            ActionError::Refused(message) => ApiError::Unprocessable(message),
            ActionError::Failed(message) => ApiError::Internal(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            // Logged here, where it is handled, not where it was passed up.
            tracing::error!(code = status.as_u16(), "API request failed: {self}");
        }
        let state = match &self {
            ApiError::Conflict { state, .. } => Some(state.clone()),
            ApiError::Unavailable { state, .. } => state.clone(),
            _ => None,
        };
        let body = ErrorBody {
            error: self.kind().to_string(),
            message: self.to_string(),
            state,
        };
        let mut resp = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
