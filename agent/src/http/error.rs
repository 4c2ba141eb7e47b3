//! The one place that maps the agent's one error kind ([`AgentError`]) to HTTP status codes and
//! the one JSON error body ([`pgpilot_common::api::ErrorBody`]).

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use pgpilot_common::api::ErrorBody;

use crate::error::AgentError;

fn status(e: &AgentError) -> StatusCode {
    match e {
        AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
        AgentError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        AgentError::NotFound(_) => StatusCode::NOT_FOUND,
        AgentError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        AgentError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        AgentError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
        AgentError::Conflict { .. } => StatusCode::CONFLICT,
        AgentError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
        AgentError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
        AgentError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        AgentError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let code = status(&self);
        if code.is_server_error() {
            // Logged here, where it is handled, not where it was passed up.
            tracing::error!(code = code.as_u16(), "API request failed: {self}");
        }
        let retry_after = match &self {
            AgentError::TooManyRequests {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        };
        let body = ErrorBody {
            error: self.kind().to_string(),
            message: self.to_string(),
            state: self.state().cloned(),
        };
        let mut resp = (code, Json(body)).into_response();
        // The error kind travels to the metrics middleware (`pgpilot_api_errors_total{kind}`).
        resp.extensions_mut().insert(ErrorKind(self.kind()));
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        if code == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// The kind of an error response, for the metrics middleware.
#[derive(Debug, Clone, Copy)]
pub struct ErrorKind(pub &'static str);
