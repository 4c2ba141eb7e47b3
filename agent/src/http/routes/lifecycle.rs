//! `POST /v1/stop`, `/v1/start`, `/v1/restart`, `/v1/reload`. Each waits until the action is
//! done (they take seconds, bounded by the shutdown grace) and answers with the new state; a
//! request that does not fit the current state gets 409 naming it.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use pgpilot_common::api::{LifecycleResponse, ReloadResponse, ShutdownRequest};

use crate::http::ApiError;
use crate::http::extract::OptionalJson;
use crate::supervisor::{Request, Shared};

pub async fn stop(
    State(shared): State<Arc<Shared>>,
    OptionalJson(body): OptionalJson<ShutdownRequest>,
) -> Result<Json<LifecycleResponse>, ApiError> {
    Ok(Json(
        shared
            .request(|reply| Request::Stop {
                mode: body.mode,
                reply,
            })
            .await?,
    ))
}

pub async fn start(State(shared): State<Arc<Shared>>) -> Result<Json<LifecycleResponse>, ApiError> {
    Ok(Json(
        shared.request(|reply| Request::Start { reply }).await?,
    ))
}

pub async fn restart(
    State(shared): State<Arc<Shared>>,
    OptionalJson(body): OptionalJson<ShutdownRequest>,
) -> Result<Json<LifecycleResponse>, ApiError> {
    Ok(Json(
        shared
            .request(|reply| Request::Restart {
                mode: body.mode,
                reply,
            })
            .await?,
    ))
}

pub async fn reload(State(shared): State<Arc<Shared>>) -> Result<Json<ReloadResponse>, ApiError> {
    Ok(Json(
        shared.request(|reply| Request::Reload { reply }).await?,
    ))
}
