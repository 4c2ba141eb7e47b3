//! `POST /v1/backups` (start a base backup; answers 202 with its id at once), `GET /v1/backups`
//! (the store's backups and the recoverability window) and `GET /v1/backups/{id}` (one backup
//! and its progress).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use pgpilot_common::api::{BackupList, BackupProgress, BackupRequest, ErrorBody};

use crate::archive::catalog;
use crate::core::Handle;
use crate::error::AgentError;
use crate::http::extract::OptionalJson;

fn conflict(h: &Handle, message: String) -> AgentError {
    AgentError::conflict(&h.state(), message)
}

/// Start an online base backup of the primary. Runs in the background: poll
/// `GET /v1/backups/{id}` for progress.
#[utoipa::path(post, path = "/v1/backups", tag = "backups", security(("bearer" = [])),
    request_body(content = Option<BackupRequest>, description = "optional"),
    responses((status = 202, description = "started", body = BackupProgress), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 409, description = "an operation is in flight (named), no store is configured, or the agent is not a running primary", body = ErrorBody),
        (status = 500, body = ErrorBody)))]
pub async fn start(
    State(h): State<Handle>,
    OptionalJson(req): OptionalJson<BackupRequest>,
) -> Result<(StatusCode, Json<BackupProgress>), AgentError> {
    let p = h.backup(req).await?;
    Ok((StatusCode::ACCEPTED, Json(p)))
}

/// The backups in the store (completed, incomplete, failed, running) and the recoverability
/// window.
#[utoipa::path(get, path = "/v1/backups", tag = "backups",
    responses((status = 200, body = BackupList), (status = 409, description = "no store configured", body = ErrorBody),
        (status = 500, description = "the store could not be listed", body = ErrorBody)))]
pub async fn list(State(h): State<Handle>) -> Result<Json<BackupList>, AgentError> {
    let archiver = h
        .ctx
        .archiver
        .as_ref()
        .ok_or_else(|| conflict(&h, "no backup store is configured ([backup] store)".into()))?;
    let cat = catalog::load(archiver.store(), archiver.layout())
        .await
        .map_err(|e| AgentError::Failed(format!("listing backups: {e}")))?;
    let runs = h.ctx.backups.all();
    let list = catalog::list(&cat, &runs);
    if let Some(newest) = list
        .backups
        .iter()
        .rev()
        .find(|b| b.state == pgpilot_common::api::BackupState::Completed)
        && let Some(time) = &newest.stop_time
    {
        h.ctx
            .backups
            .note_completed(pgpilot_common::api::LastBackup {
                id: newest.id.clone(),
                time: time.clone(),
            });
    }
    Ok(Json(list))
}

/// One backup: progress while it runs (this agent's runs), or what the store holds.
#[utoipa::path(get, path = "/v1/backups/{id}", tag = "backups",
    params(("id" = String, Path, description = "backup id, e.g. 20261123T181500Z")),
    responses((status = 200, body = BackupProgress), (status = 400, body = ErrorBody),
        (status = 404, description = "no such backup", body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 500, body = ErrorBody)))]
pub async fn get(
    State(h): State<Handle>,
    Path(id): Path<String>,
) -> Result<Json<BackupProgress>, AgentError> {
    if !catalog::valid_id(&id) {
        return Err(AgentError::BadRequest(format!(
            "{id:?} is not a backup id (like 20261123T181500Z)"
        )));
    }
    // This agent's own runs, in whatever state: a completed one stays completed even while
    // retention deletes it (manifest first, so the store would call it incomplete) or once it
    // is gone. Other ids (older runs, another agent's) are answered from the store.
    if let Some(p) = h.ctx.backups.get(&id) {
        return Ok(Json(p));
    }
    let archiver = h
        .ctx
        .archiver
        .as_ref()
        .ok_or_else(|| conflict(&h, "no backup store is configured ([backup] store)".into()))?;
    let found = catalog::load_backups(archiver.store(), archiver.layout(), Some(&id))
        .await
        .map_err(|e| AgentError::Failed(format!("looking up backup {id}: {e}")))?;
    match found.into_iter().find(|b| b.id == id) {
        Some(b) => Ok(Json(catalog::progress_from_store(&b))),
        None => Err(AgentError::NotFound(format!(
            "backup {id} not found in {}",
            archiver.store()
        ))),
    }
}
