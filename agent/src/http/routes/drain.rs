//! `POST /v1/drain`, `GET /v1/drain`, `DELETE /v1/drain`: the drain handshake
//! (docs/drain.md). The preStop hook's `pgpilot-agent drain --wait` starts or joins a drain
//! here and follows it with `GET`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use pgpilot_common::api::{DrainRequest, DrainStatus, ErrorBody, MAX_DRAIN_TIMEOUT_SECS};
use pgpilot_common::state::DrainState;

use crate::core::Handle;
use crate::error::AgentError;
use crate::http::extract::OptionalJson;

/// Start the drain of this instance, or join the one under way: it stops competing for
/// leadership, a primary switches over to its best replica, WAL is archived to the stop point,
/// Postgres stops. Answers at once (202; 200 when already drained); follow it with `GET`.
#[utoipa::path(post, path = "/v1/drain", tag = "drain", security(("bearer" = [])),
    request_body(content = Option<DrainRequest>, description = "optional; default: no force, the configured timeout"),
    responses((status = 202, description = "draining (begun or joined)", body = DrainStatus),
        (status = 200, description = "already drained", body = DrainStatus),
        (status = 400, description = "malformed body", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 409, description = "a restore or clone is in progress, or Postgres is between states", body = ErrorBody)))]
pub async fn start(
    State(h): State<Handle>,
    OptionalJson(req): OptionalJson<DrainRequest>,
) -> Result<(StatusCode, Json<DrainStatus>), AgentError> {
    if let Some(t) = req.timeout_secs
        && !(1..=MAX_DRAIN_TIMEOUT_SECS).contains(&t)
    {
        return Err(AgentError::BadRequest(format!(
            "timeout_secs must be 1 to {MAX_DRAIN_TIMEOUT_SECS} seconds, not {t} (absent: [replication] drain_timeout_secs)"
        )));
    }
    let st = crate::drain::start(&h, req, "api").await?;
    let code = if st.state == DrainState::Drained {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((code, Json(st)))
}

/// Where the drain stands: `Running` (none, or the last one failed or was cancelled: see
/// `step` and `error`), `Draining` (with its step and message) or `Drained`.
#[utoipa::path(get, path = "/v1/drain", tag = "drain", responses((status = 200, body = DrainStatus)))]
pub async fn get(State(h): State<Handle>) -> Json<DrainStatus> {
    Json(h.drain_record().view())
}

/// Cancel a drain before it stops Postgres: the instance becomes a normal member again.
#[utoipa::path(delete, path = "/v1/drain", tag = "drain", security(("bearer" = [])),
    responses((status = 200, body = DrainStatus), (status = 401, body = ErrorBody),
        (status = 409, description = "no drain in progress, or it is already stopping Postgres or finished", body = ErrorBody)))]
pub async fn cancel(State(h): State<Handle>) -> Result<Json<DrainStatus>, AgentError> {
    Ok(Json(h.cancel_drain("cancelled through the API")?))
}
