//! `POST /v1/restore`: point-in-time restore. Checked against the store before anything is
//! touched; then it runs in the background (state `Restoring`, progress in `/v1/status`).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use pgpilot_common::api::{ErrorBody, RestoreAccepted, RestoreRequest};

use crate::http::ApiError;
use crate::http::extract::OptionalJson;
use crate::supervisor::{Request, Shared};

/// Restore a base backup and replay archived WAL to a target, then promote.
#[utoipa::path(post, path = "/v1/restore", tag = "restore", security(("bearer" = [])),
    request_body = RestoreRequest,
    responses((status = 202, description = "accepted; follow `restore` in /v1/status", body = RestoreAccepted),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "the data dir holds a cluster and force is not set, or a restore runs", body = ErrorBody),
        (status = 422, description = "refused before anything was touched: impossible target, WAL gap, unreadable backup", body = ErrorBody)))]
pub async fn restore(
    State(shared): State<Arc<Shared>>,
    OptionalJson(req): OptionalJson<Option<RestoreRequest>>,
) -> Result<(StatusCode, Json<RestoreAccepted>), ApiError> {
    let req = req.ok_or_else(|| {
        ApiError::BadRequest(
            "a body with a target is required, e.g. {\"target\": {\"type\": \"latest\"}}".into(),
        )
    })?;
    let accepted = shared
        .request(|reply| Request::Restore { req, reply })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}
