//! `GET /v1/status`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use pgpilot_common::api::{ReplicationStatus, SlotView, StatusResponse};
use pgpilot_common::state::Role;

use crate::core::{Handle, Snapshot};
use crate::replication::sql as rsql;

/// The agent's state, its operation in flight (or last), and what Postgres reports (role,
/// timeline, LSNs, version).
#[utoipa::path(get, path = "/v1/status", tag = "status", responses((status = 200, body = StatusResponse)))]
pub async fn status(State(h): State<Handle>) -> Json<StatusResponse> {
    let snap = h.snapshot();
    let ctx = &h.ctx;
    let info = &snap.runtime;
    let mut resp = StatusResponse {
        role: snap.state.role(),
        state: snap.state.clone(),
        timeline: None,
        current_lsn: None,
        flushed_lsn: None,
        postgres_version: None,
        postgres_major: ctx.bins.major,
        data_dir: ctx.cfg.data_dir.display().to_string(),
        postgres_port: ctx.cfg.postgres_port,
        agent_uptime_seconds: ctx.started_at.elapsed().as_secs(),
        postgres_uptime_seconds: info.running_since.map(|t| t.elapsed().as_secs()),
        postmaster_pid: info.postmaster_pid,
        crash_restarts: info.crash_restarts,
        requested_restarts: info.requested_restarts,
        last_failure: info.last_failure.clone(),
        archive: ctx.archiver.as_ref().map(|a| a.status()),
        operation: snap.operation.as_ref().map(|o| o.view()),
        restore: snap.restore_progress(),
        last_backup: crate::archive::backup::last_backup(&ctx.backups, ctx.archiver.as_deref()),
        replication: None,
        drain: h.drain_record().view(),
        pending_restart: snap.pending_restart.clone(),
    };
    if snap.state.accepts_connections() {
        match tokio::time::timeout(Duration::from_secs(3), ctx.monitor.status()).await {
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
    resp.replication = Some(replication(&h, &snap).await);
    Json(resp)
}

/// This instance's place in its shard: on a replica its receiver (read now: a switchover
/// confirms the candidate's received LSN through here), on a primary its replicas and slots.
async fn replication(h: &Handle, snap: &Snapshot) -> ReplicationStatus {
    let ctx = &h.ctx;
    let leader = ctx.leadership.leader();
    let mut out = ReplicationStatus {
        name: ctx.cfg.replication.name.clone(),
        upstream: leader.filter(|_| !ctx.is_leader()),
        failover_refusal: ctx.kube.as_ref().and_then(|k| k.refusal()),
        ..ReplicationStatus::default()
    };
    let Some(role) = snap.state.role() else {
        return out;
    };
    let work = async {
        let client = ctx.monitor.client().await.map_err(|e| e.to_string())?;
        match role {
            Role::Replica => {
                let r = rsql::receiver(&client).await.map_err(|e| e.to_string())?;
                out.streaming = r.streaming;
                out.receive_lsn = r.receive_lsn;
                out.replay_lsn = r.replay_lsn;
                out.lag_bytes = r.lag_bytes;
                out.lag_seconds = r.lag_seconds;
            }
            Role::Primary => {
                out.replicas = rsql::replicas(&client).await.map_err(|e| e.to_string())?;
                for r in &mut out.replicas {
                    r.api_url = snap.registry.replicas.get(&r.name).cloned();
                }
            }
        }
        out.slots = rsql::slots(&client)
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .map(SlotView::from)
            .collect();
        Ok::<_, String>(())
    };
    match tokio::time::timeout(Duration::from_secs(3), work).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("status: cannot read replication: {e}"),
        Err(_) => tracing::warn!("status: replication views did not answer within 3 s"),
    }
    out
}
