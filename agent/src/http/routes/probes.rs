//! Kubernetes probes and load-balancer role checks. They answer 200 or 503 with a small JSON
//! body, never anything slower than a one-second connection check.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use pgpilot_common::api::ErrorBody;
use pgpilot_common::state::{AgentState, Role};
use serde_json::{Value, json};

use crate::http::ApiError;
use crate::postgres::sql;
use crate::supervisor::Shared;

/// Liveness: the agent's process answers. Postgres being down is not a reason to kill the pod
/// (the agent restarts Postgres itself), so this does not look at Postgres.
#[utoipa::path(get, path = "/healthz", tag = "probes", responses((status = 200, body = Object)))]
pub async fn healthz(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"status": "ok", "state": shared.state()}))
}

/// Readiness: Postgres runs and accepts connections now.
#[utoipa::path(get, path = "/readyz", tag = "probes", responses((status = 200, body = Object), (status = 503, body = ErrorBody)))]
pub async fn readyz(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let state = shared.state();
    if !matches!(state, AgentState::Running { .. }) {
        return Err(ApiError::Unavailable {
            message: format!("not ready: agent state is {state}"),
            state: Some(state),
        });
    }
    let pw = shared.superuser_password.expose();
    match tokio::time::timeout(
        Duration::from_secs(1),
        sql::connect(&shared.cfg, pw, Duration::from_secs(1)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(Json(json!({"status": "ready", "state": state}))),
        Ok(Err(e)) => Err(ApiError::Unavailable {
            message: format!("not ready: cannot connect: {e}"),
            state: Some(state),
        }),
        Err(_) => Err(ApiError::Unavailable {
            message: "not ready: connection check timed out".into(),
            state: Some(state),
        }),
    }
}

/// Startup: Postgres has accepted connections at least once since the agent started (crash
/// recovery or a restore may take long; the startup probe gives it that time).
#[utoipa::path(get, path = "/startupz", tag = "probes", responses((status = 200, body = Object), (status = 503, body = ErrorBody)))]
pub async fn startupz(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    if shared.ever_running.load(Ordering::Relaxed) {
        Ok(Json(json!({"status": "started"})))
    } else {
        let state = shared.state();
        Err(ApiError::Unavailable {
            message: format!("not started yet: agent state is {state}"),
            state: Some(state),
        })
    }
}

fn role_check(shared: &Shared, want: Role) -> Result<Json<Value>, ApiError> {
    let state = shared.state();
    if state.role() == Some(want) {
        Ok(Json(json!({"role": want})))
    } else {
        Err(ApiError::Unavailable {
            message: format!("not a running {want:?}: agent state is {state}"),
            state: Some(state),
        })
    }
}

/// 200 when this instance is a running primary (for Services and load balancers).
#[utoipa::path(get, path = "/primary", tag = "probes", responses((status = 200, body = Object), (status = 503, body = ErrorBody)))]
pub async fn primary(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    role_check(&shared, Role::Primary)
}

/// 200 when this instance is a running replica.
#[utoipa::path(get, path = "/replica", tag = "probes", responses((status = 200, body = Object), (status = 503, body = ErrorBody)))]
pub async fn replica(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    role_check(&shared, Role::Replica)
}
