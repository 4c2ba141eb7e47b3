//! `GET /v1/status`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use pgpilot_common::api::StatusResponse;
use pgpilot_common::state::AgentState;

use crate::postgres::sql;
use crate::supervisor::Shared;

/// The agent's state and what Postgres reports (role, timeline, LSNs, version).
#[utoipa::path(get, path = "/v1/status", tag = "status", responses((status = 200, body = StatusResponse)))]
pub async fn status(State(shared): State<Arc<Shared>>) -> Json<StatusResponse> {
    let state = shared.state();
    let info = shared.info();
    let cfg = &shared.cfg;
    let mut resp = StatusResponse {
        role: state.role(),
        state: state.clone(),
        timeline: None,
        current_lsn: None,
        flushed_lsn: None,
        postgres_version: None,
        postgres_major: shared.bins.major,
        data_dir: cfg.data_dir.display().to_string(),
        postgres_port: cfg.postgres_port,
        agent_uptime_seconds: shared.started_at.elapsed().as_secs(),
        postgres_uptime_seconds: info.running_since.map(|t| t.elapsed().as_secs()),
        postmaster_pid: info.postmaster_pid,
        crash_restarts: info.crash_restarts,
        requested_restarts: info.requested_restarts,
        last_failure: info.last_failure,
        archive: shared.archiver.as_ref().map(|a| a.status()),
        restore: shared.restore_progress(),
        last_backup: crate::archive::backup::last_backup(&shared),
    };
    if matches!(state, AgentState::Running { .. }) {
        let query = async {
            let client = sql::connect(
                cfg,
                shared.superuser_password.expose(),
                Duration::from_secs(2),
            )
            .await?;
            sql::status(&client).await
        };
        match tokio::time::timeout(Duration::from_secs(3), query).await {
            Ok(Ok(pg)) => {
                resp.postgres_version = Some(pg.server_version);
                resp.current_lsn = pg.current_lsn;
                resp.flushed_lsn = pg.flushed_lsn;
                resp.timeline = pg.timeline;
            }
            Ok(Err(e)) => tracing::warn!("status: cannot query Postgres: {e}"),
            Err(_) => tracing::warn!("status: Postgres did not answer within 3 s"),
        }
    }
    Json(resp)
}
