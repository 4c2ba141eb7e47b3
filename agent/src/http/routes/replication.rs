//! `POST /v1/replicas`, `/v1/switchover`, `/v1/promote`, `/v1/demote`, `/v1/follow`: the
//! replica life cycle. Each goes through the agent's admission rules: a request that does not
//! fit the state gets 409 naming it, and nothing changes.

use axum::Json;
use axum::extract::State;
use pgpilot_common::api::{
    ErrorBody, FollowRequest, RegisterReplicaRequest, RegisterReplicaResponse, ReinitializeRequest,
    ReparentResponse, SwitchoverRequest, SwitchoverResponse,
};

use crate::core::Handle;
use crate::error::AgentError;
use crate::http::extract::{ApiJson, OptionalJson};

/// A replica registers with this primary: its physical slot is created (so the primary keeps
/// the WAL it needs) and its API URL recorded (a switchover calls it).
#[utoipa::path(post, path = "/v1/replicas", tag = "replication", security(("bearer" = [])),
    request_body = RegisterReplicaRequest,
    responses((status = 200, body = RegisterReplicaResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 409, description = "not a running primary", body = ErrorBody)))]
pub async fn register(
    State(h): State<Handle>,
    ApiJson(req): ApiJson<RegisterReplicaRequest>,
) -> Result<Json<RegisterReplicaResponse>, AgentError> {
    Ok(Json(h.register_replica(req).await?))
}

/// Planned switchover to the named replica, or to the healthy streaming replica with the
/// highest received LSN. Answers when it is done: the candidate is primary, this instance and
/// the other replicas follow it.
#[utoipa::path(post, path = "/v1/switchover", tag = "replication", security(("bearer" = [])),
    request_body(content = Option<SwitchoverRequest>, description = "optional; default: the best candidate"),
    responses((status = 200, body = SwitchoverResponse),
        (status = 400, description = "malformed body, or the candidate is this primary", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "unknown candidate", body = ErrorBody),
        (status = 409, description = "not a running primary, another operation or switchover in progress", body = ErrorBody),
        (status = 412, description = "the candidate is not streaming, lags, or does not answer", body = ErrorBody),
        (status = 500, description = "a step failed; the old primary was started again as primary (the message names the step)", body = ErrorBody)))]
pub async fn switchover(
    State(h): State<Handle>,
    OptionalJson(req): OptionalJson<SwitchoverRequest>,
) -> Result<Json<SwitchoverResponse>, AgentError> {
    Ok(Json(h.switchover(req).await?))
}

/// Promote this replica (low-level step of switchover and failover).
#[utoipa::path(post, path = "/v1/promote", tag = "replication", security(("bearer" = [])),
    responses((status = 200, body = ReparentResponse), (status = 401, body = ErrorBody),
        (status = 409, description = "not a running replica", body = ErrorBody)))]
pub async fn promote(State(h): State<Handle>) -> Result<Json<ReparentResponse>, AgentError> {
    Ok(Json(h.promote().await?))
}

/// Stop writes on this primary (fast shutdown) and start again as a standby that follows no
/// one until `POST /v1/follow`.
#[utoipa::path(post, path = "/v1/demote", tag = "replication", security(("bearer" = [])),
    responses((status = 200, body = ReparentResponse), (status = 401, body = ErrorBody),
        (status = 409, description = "not a running primary, or an operation in flight", body = ErrorBody)))]
pub async fn demote(State(h): State<Handle>) -> Result<Json<ReparentResponse>, AgentError> {
    Ok(Json(h.demote().await?))
}

/// Throw this replica's data dir away and clone its primary again (when it cannot follow:
/// diverged and not rewindable). Answers when the clone is done; progress in `/v1/status`.
#[utoipa::path(post, path = "/v1/reinitialize", tag = "replication", security(("bearer" = [])),
    request_body(content = Option<ReinitializeRequest>, description = "optional; default: the recorded primary"),
    responses((status = 200, body = ReparentResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, description = "the primary, or no primary recorded to clone from", body = ErrorBody),
        (status = 500, description = "the clone failed (the message says why)", body = ErrorBody)))]
pub async fn reinitialize(
    State(h): State<Handle>,
    OptionalJson(req): OptionalJson<ReinitializeRequest>,
) -> Result<Json<ReparentResponse>, AgentError> {
    Ok(Json(h.reinitialize(req).await?))
}

/// Stream from another primary (registering with it); applied by a reload, no restart.
#[utoipa::path(post, path = "/v1/follow", tag = "replication", security(("bearer" = [])),
    request_body = FollowRequest,
    responses((status = 200, body = ReparentResponse),
        (status = 400, description = "malformed body, or this agent's own URL", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 409, description = "a running primary (demote it first)", body = ErrorBody),
        (status = 422, description = "the target runs another database cluster", body = ErrorBody),
        (status = 500, description = "the target could not be reached", body = ErrorBody)))]
pub async fn follow(
    State(h): State<Handle>,
    ApiJson(req): ApiJson<FollowRequest>,
) -> Result<Json<ReparentResponse>, AgentError> {
    Ok(Json(h.follow(req).await?))
}
