//! `POST /v1/wal/push` and `/v1/wal/fetch`: what `wal-push` (archive_command) and `wal-fetch`
//! (restore_command) call on the loopback listener.

use std::path::Path;

use axum::Json;
use axum::extract::State;
use pgpilot_common::api::{
    ErrorBody, WalFetchRequest, WalFetchResponse, WalPushRequest, WalPushResponse,
    WalSwitchResponse,
};

use crate::archive::fetch::FetchError;
use crate::archive::push::PushError;
use crate::core::Handle;
use crate::error::AgentError;
use crate::http::extract::OptionalJson;

/// Close the primary's current WAL segment (`pg_switch_wal()`), so that it and every segment
/// before it are archived: a replica taking a base backup asks its primary for this, as the
/// WAL its backup needs is archived by the primary. Only a running primary does it.
#[utoipa::path(post, path = "/v1/wal/switch", tag = "archive", security(("bearer" = [])),
    responses((status = 200, body = WalSwitchResponse), (status = 401, body = ErrorBody),
        (status = 409, description = "not a running primary", body = ErrorBody),
        (status = 500, body = ErrorBody)))]
pub async fn switch(State(h): State<Handle>) -> Result<Json<WalSwitchResponse>, AgentError> {
    use pgpilot_common::state::{AgentState, Role};
    let state = h.state();
    if state
        != (AgentState::Running {
            role: Role::Primary,
        })
    {
        return Err(AgentError::conflict(
            &state,
            format!("only a running primary switches WAL; this agent is {state}"),
        ));
    }
    let client = h.ctx.monitor.client().await.map_err(|e| {
        AgentError::Failed(format!("cannot connect to Postgres to switch WAL: {e}"))
    })?;
    let row = client
        .query_one(
            "SELECT s::text, pg_walfile_name(s) FROM pg_switch_wal() AS s",
            &[],
        )
        .await
        .map_err(|e| AgentError::Failed(format!("pg_switch_wal failed: {e}")))?;
    Ok(Json(WalSwitchResponse {
        lsn: row.get(0),
        segment: row.get(1),
    }))
}

/// Archive one WAL file; answers once it is stored and verified.
#[utoipa::path(post, path = "/v1/wal/push", tag = "archive", security(("bearer" = [])),
    request_body = WalPushRequest,
    responses((status = 200, body = WalPushResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "on the pod-IP listener: WAL push is served on the loopback listener only", body = ErrorBody),
        (status = 409, description = "archiving not configured, or the archive holds different content under this name", body = ErrorBody),
        (status = 500, body = ErrorBody)))]
pub async fn push(
    State(h): State<Handle>,
    OptionalJson(req): OptionalJson<Option<WalPushRequest>>,
) -> Result<Json<WalPushResponse>, AgentError> {
    let req = req.ok_or_else(|| {
        AgentError::BadRequest("body {\"path\": \"pg_wal/<file>\"} is required".into())
    })?;
    let archiver = h
        .ctx
        .archiver
        .as_ref()
        .ok_or_else(|| AgentError::Conflict {
            state: h.state(),
            message: "WAL archiving is not configured: no [backup] store".into(),
        })?;
    let name = wal_name_from_path(&req.path, &h.ctx.cfg.data_dir)?;
    match archiver.push(&name).await {
        Ok(r) => Ok(Json(r)),
        Err(PushError::InvalidName(m)) => Err(AgentError::BadRequest(m)),
        Err(PushError::Conflict(m)) => Err(AgentError::Conflict {
            state: h.state(),
            message: m,
        }),
        Err(PushError::Failed(m)) => Err(AgentError::Failed(m)),
    }
}

/// Make one WAL file available in the spool for restore_command.
#[utoipa::path(post, path = "/v1/wal/fetch", tag = "archive", security(("bearer" = [])),
    request_body = WalFetchRequest,
    responses((status = 200, body = WalFetchResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "not in the archive (normal at the end of recovery); on the pod-IP listener, always: WAL fetch is served on the loopback listener only", body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 500, body = ErrorBody)))]
pub async fn fetch(
    State(h): State<Handle>,
    OptionalJson(req): OptionalJson<Option<WalFetchRequest>>,
) -> Result<Json<WalFetchResponse>, AgentError> {
    let req = req.ok_or_else(|| {
        AgentError::BadRequest("body {\"name\": \"<WAL file name>\"} is required".into())
    })?;
    let fetcher = h.ctx.fetcher.as_ref().ok_or_else(|| AgentError::Conflict {
        state: h.state(),
        message: "WAL fetching is not configured: no [backup] store".into(),
    })?;
    if let Some(delay) = test_fetch_delay() {
        tokio::time::sleep(delay).await;
    }
    match fetcher.fetch(&req.name).await {
        Ok(r) => Ok(Json(r)),
        Err(FetchError::InvalidName(m)) => Err(AgentError::BadRequest(m)),
        Err(FetchError::NotFound(name)) => Err(AgentError::NotFound(format!(
            "{name} is not in the archive"
        ))),
        Err(FetchError::Failed(m)) => Err(AgentError::Failed(m)),
    }
}

/// Test-only slow-down: milliseconds each WAL fetch waits before it is served, so a test can
/// observe a restore's replay (`Recovering`). Documented in docs/restore.md.
pub const FETCH_DELAY_ENV: &str = "PGPILOT_TEST_WAL_FETCH_DELAY_MS";

/// Read once: the fetch route is on recovery's hot path.
fn test_fetch_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var(FETCH_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(std::time::Duration::from_millis)
    })
}

/// `pg_wal/<name>` (relative to the data dir) or an absolute path into the data dir's pg_wal.
fn wal_name_from_path(path: &str, data_dir: &Path) -> Result<String, AgentError> {
    let p = Path::new(path);
    let rel = if p.is_absolute() {
        p.strip_prefix(data_dir).unwrap_or(p)
    } else {
        p
    };
    let mut parts = rel.components();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(dir), Some(file), None) if dir.as_os_str() == "pg_wal" => {
            Ok(file.as_os_str().to_string_lossy().into_owned())
        }
        _ => Err(AgentError::BadRequest(format!(
            "{path:?} is not a file directly under pg_wal/ of the data dir"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::wal_name_from_path;
    use std::path::Path;

    #[test]
    fn accepts_only_files_in_pg_wal() {
        let d = Path::new("/data/pg");
        assert_eq!(
            wal_name_from_path("pg_wal/000000010000000000000001", d).unwrap(),
            "000000010000000000000001"
        );
        assert_eq!(
            wal_name_from_path("/data/pg/pg_wal/00000002.history", d).unwrap(),
            "00000002.history"
        );
        for bad in [
            "base/1/1259",
            "pg_wal/../global/pg_control",
            "/etc/passwd",
            "pg_wal",
            "pg_wal/a/b",
        ] {
            assert!(wal_name_from_path(bad, d).is_err(), "{bad}");
        }
    }
}
