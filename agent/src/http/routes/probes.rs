//! Kubernetes probes and load-balancer role checks. They answer 200 or 503 with a small JSON
//! body, never anything slower than a one-second connection check.

use std::time::Duration;

use axum::Json;
use axum::extract::{RawQuery, State};
use pgpilot_common::api::ErrorBody;
use pgpilot_common::state::Role;
use serde_json::{Value, json};

use crate::core::Handle;
use crate::error::AgentError;
use crate::postgres::sql;

/// Liveness: the agent's process answers. Postgres being down is not a reason to kill the pod
/// (the agent restarts Postgres itself), so this does not look at Postgres.
#[utoipa::path(get, path = "/healthz", tag = "probes", responses((status = 200, body = Object)))]
pub async fn healthz(State(h): State<Handle>) -> Json<Value> {
    Json(json!({"status": "ok", "state": h.state()}))
}

/// Readiness: Postgres runs (as primary or replica, or replaying a restore) and accepts
/// connections now; a replica only while it streams within `[replication] max_lag_bytes`, and
/// once it has registered with its primary in this life (so that the primary knows where its
/// agent answers now: a pod that came back at a new address is not a switchover candidate at
/// the old one).
#[utoipa::path(get, path = "/readyz", tag = "probes", responses((status = 200, body = Object), (status = 503, body = ErrorBody)))]
pub async fn readyz(State(h): State<Handle>) -> Result<Json<Value>, AgentError> {
    let state = h.state();
    if !state.accepts_connections() {
        return Err(AgentError::Unavailable {
            message: format!("not ready: agent state is {state}"),
            state: Some(state),
        });
    }
    if state.role() == Some(Role::Replica) {
        let bound = h.ctx.cfg.replication.max_lag_bytes;
        lag_within(&h, Some(bound), true).map_err(|why| AgentError::Unavailable {
            message: format!("not ready: {why}"),
            state: Some(state.clone()),
        })?;
        if h.snapshot().upstream.is_none() {
            return Err(AgentError::Unavailable {
                message: "not ready: the replica has not registered with its primary yet".into(),
                state: Some(state),
            });
        }
    }
    let pw = h.ctx.superuser_password.expose();
    match tokio::time::timeout(
        Duration::from_secs(1),
        sql::connect(&h.ctx.cfg, pw, Duration::from_secs(1)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(Json(json!({"status": "ready", "state": state}))),
        Ok(Err(e)) => Err(AgentError::Unavailable {
            message: format!("not ready: cannot connect: {e}"),
            state: Some(state),
        }),
        Err(_) => Err(AgentError::Unavailable {
            message: "not ready: connection check timed out".into(),
            state: Some(state),
        }),
    }
}

/// Startup: Postgres has accepted connections at least once since the agent started (crash
/// recovery or a restore may take long; the startup probe gives it that time).
#[utoipa::path(get, path = "/startupz", tag = "probes", responses((status = 200, body = Object), (status = 503, body = ErrorBody)))]
pub async fn startupz(State(h): State<Handle>) -> Result<Json<Value>, AgentError> {
    if h.snapshot().ever_running {
        Ok(Json(json!({"status": "started"})))
    } else {
        let state = h.state();
        Err(AgentError::Unavailable {
            message: format!("not started yet: agent state is {state}"),
            state: Some(state),
        })
    }
}

fn role_check(h: &Handle, want: Role) -> Result<Json<Value>, AgentError> {
    let state = h.state();
    if state.role() == Some(want) {
        Ok(Json(json!({"role": want})))
    } else {
        Err(AgentError::Unavailable {
            message: format!("not a running {want:?}: agent state is {state}"),
            state: Some(state),
        })
    }
}

/// 200 when this instance is a running primary (for Services and load balancers).
#[utoipa::path(get, path = "/primary", tag = "probes", responses((status = 200, body = Object), (status = 503, body = ErrorBody)))]
pub async fn primary(State(h): State<Handle>) -> Result<Json<Value>, AgentError> {
    role_check(&h, Role::Primary)
}

/// Query of `/replica` (documentation only: parsed by hand so a bad value gets the API's error
/// body).
#[derive(Debug, Default, utoipa::IntoParams)]
#[allow(dead_code, reason = "describes the query for the OpenAPI document")]
pub struct ReplicaQuery {
    /// Answer 200 only if the replica's lag is at most this many bytes.
    pub lag: Option<u64>,
}

/// 200 when this instance is a running replica (not while it replays a restore: that is
/// `Recovering`), and with `?lag=<bytes>` only while its lag is within that bound.
#[utoipa::path(get, path = "/replica", tag = "probes", params(ReplicaQuery), responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn replica(
    State(h): State<Handle>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, AgentError> {
    let mut lag = None;
    let query = query.unwrap_or_default();
    for (k, v) in query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
    {
        match k {
            "lag" => {
                lag = Some(v.parse::<u64>().map_err(|_| {
                    AgentError::BadRequest(format!("lag={v:?} is not a number of bytes"))
                })?)
            }
            other => {
                return Err(AgentError::BadRequest(format!(
                    "unknown query parameter {other:?} (only lag=<bytes>)"
                )));
            }
        }
    }
    let ok = role_check(&h, Role::Replica)?;
    if lag.is_some() {
        lag_within(&h, lag, false).map_err(|message| AgentError::Unavailable {
            message,
            state: Some(h.state()),
        })?;
    }
    Ok(ok)
}

/// Whether the replica's last seen lag is within `bound` (and it streams, if `streaming`).
fn lag_within(h: &Handle, bound: Option<u64>, streaming: bool) -> Result<(), String> {
    let snap = h.snapshot();
    let Some(r) = &snap.receiver else {
        return Err("the replica's WAL receiver has not been looked at yet".into());
    };
    if streaming && !r.streaming {
        return Err("the replica does not stream from its primary".into());
    }
    match (bound, r.lag_bytes) {
        (Some(b), Some(lag)) if lag > b => Err(format!("lag {lag} bytes is above {b}")),
        (Some(_), None) => Err("the replica's lag is not known".into()),
        _ => Ok(()),
    }
}
