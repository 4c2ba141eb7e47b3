//! `GET /metrics`: Prometheus text format.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::core::Handle;

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "status", responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(State(h): State<Handle>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        h.ctx.metrics.render(),
    )
}
