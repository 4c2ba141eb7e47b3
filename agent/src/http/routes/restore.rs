//! `POST /v1/restore`: point-in-time restore. Checked against the store before anything is
//! touched; then it runs in the background (state `Restoring`, progress in `/v1/status`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use pgpilot_common::api::{ErrorBody, RestoreAccepted, RestoreRequest};

use crate::core::Handle;
use crate::error::AgentError;
use crate::http::extract::OptionalJson;

/// Restore a base backup and replay archived WAL to a target, then promote.
#[utoipa::path(post, path = "/v1/restore", tag = "restore", security(("bearer" = [])),
    request_body = RestoreRequest,
    responses((status = 202, description = "accepted; follow `restore` in /v1/status", body = RestoreAccepted),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "the data dir holds a cluster and force is not set, a restore runs, or a backup is in flight (named) without cancel_backup", body = ErrorBody),
        (status = 422, description = "refused before anything was touched: impossible target, WAL gap, unreadable backup", body = ErrorBody)))]
pub async fn restore(
    State(h): State<Handle>,
    OptionalJson(req): OptionalJson<Option<RestoreRequest>>,
) -> Result<(StatusCode, Json<RestoreAccepted>), AgentError> {
    let req = req.ok_or_else(|| {
        AgentError::BadRequest(
            "a body with a target is required, e.g. {\"target\": {\"type\": \"latest\"}}".into(),
        )
    })?;
    let accepted = h.restore(req).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}
