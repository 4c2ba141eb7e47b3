//! `POST /v1/stop`, `/v1/start`, `/v1/restart`, `/v1/reload`. Each waits until the action is
//! done (they take seconds, bounded by the shutdown grace) and answers with the new state; a
//! request that does not fit the current state gets 409 naming it.

use axum::Json;
use axum::extract::State;
use pgpilot_common::api::{ErrorBody, LifecycleResponse, ReloadResponse, ShutdownRequest};

use crate::core::Handle;
use crate::error::AgentError;
use crate::http::extract::OptionalJson;

/// Stop Postgres; the agent keeps running.
#[utoipa::path(post, path = "/v1/stop", tag = "lifecycle", security(("bearer" = [])),
    request_body(content = Option<ShutdownRequest>, description = "optional; default mode fast"),
    responses((status = 200, body = LifecycleResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 409, description = "not in a state that allows it, or a backup in flight (named) without cancel_backup", body = ErrorBody)))]
pub async fn stop(
    State(h): State<Handle>,
    OptionalJson(body): OptionalJson<ShutdownRequest>,
) -> Result<Json<LifecycleResponse>, AgentError> {
    Ok(Json(h.stop(body).await?))
}

/// Start Postgres after a stop (or cut a crash backoff short).
#[utoipa::path(post, path = "/v1/start", tag = "lifecycle", security(("bearer" = [])),
    responses((status = 200, body = LifecycleResponse), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 500, description = "Postgres did not start", body = ErrorBody)))]
pub async fn start(State(h): State<Handle>) -> Result<Json<LifecycleResponse>, AgentError> {
    Ok(Json(h.start().await?))
}

/// Restart Postgres; answers once it accepts connections again.
#[utoipa::path(post, path = "/v1/restart", tag = "lifecycle", security(("bearer" = [])),
    request_body(content = Option<ShutdownRequest>, description = "optional; default mode fast"),
    responses((status = 200, body = LifecycleResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 409, body = ErrorBody), (status = 500, body = ErrorBody)))]
pub async fn restart(
    State(h): State<Handle>,
    OptionalJson(body): OptionalJson<ShutdownRequest>,
) -> Result<Json<LifecycleResponse>, AgentError> {
    Ok(Json(h.restart(body).await?))
}

/// Re-read `[postgres.parameters]` from the config file, re-render pgpilot.conf and signal
/// Postgres (SIGHUP).
#[utoipa::path(post, path = "/v1/reload", tag = "lifecycle", security(("bearer" = [])),
    responses((status = 200, body = ReloadResponse), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 500, description = "config file invalid; nothing changed", body = ErrorBody)))]
pub async fn reload(State(h): State<Handle>) -> Result<Json<ReloadResponse>, AgentError> {
    Ok(Json(h.reload().await?))
}
