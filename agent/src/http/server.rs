//! The router and the two listeners: loopback (wal-push, wal-fetch, the CLI inside the pod)
//! and the external address (the operator). Every route is declared here, with why it is or
//! is not authenticated.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ApiError;
use super::auth::require_token;
use super::routes::{backups, lifecycle, metrics, probes, restore, status, wal};
use crate::supervisor::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    // Open: the kubelet and load balancers call the probes and role checks without
    // credentials, Prometheus scrapes /metrics, and /v1/status is read-only and holds no
    // secret (paths and positions only).
    let open = Router::new()
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/startupz", get(probes::startupz))
        .route("/primary", get(probes::primary))
        .route("/replica", get(probes::replica))
        .route("/metrics", get(metrics::metrics))
        .route("/v1/status", get(status::status))
        // Backup listing and progress: read-only, ids, times, LSNs and sizes, no secret (the
        // store URL carries no credentials), like /v1/status. Starting one needs the token.
        .route("/v1/backups", get(backups::list))
        .route("/v1/backups/{id}", get(backups::get));
    // Bearer token: everything that changes the state of Postgres.
    let protected = Router::new()
        .route("/v1/restart", post(lifecycle::restart))
        .route("/v1/stop", post(lifecycle::stop))
        .route("/v1/start", post(lifecycle::start))
        .route("/v1/reload", post(lifecycle::reload))
        // Archiving: wal-push and wal-fetch carry the token from the agent's runtime file.
        .route("/v1/restore", post(restore::restore))
        .route("/v1/wal/push", post(wal::push))
        .route("/v1/wal/fetch", post(wal::fetch))
        .route("/v1/backups", post(backups::start))
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ));
    open.merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            record_metrics,
        ))
        .with_state(shared)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!("no route {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
}

/// Counts requests by route template (not raw path, to keep label cardinality bounded).
async fn record_metrics(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let m = &shared.metrics;
    m.api_requests
        .with_label_values(&[&route, &method, resp.status().as_str()])
        .inc();
    m.api_duration
        .with_label_values(&[&route])
        .observe(start.elapsed().as_secs_f64());
    resp
}

/// Serves the router on both listeners until `shutdown` is cancelled.
pub async fn serve(
    shared: Arc<Shared>,
    loopback: TcpListener,
    external: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(shared);
    let a = axum::serve(loopback, app.clone())
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let b = axum::serve(external, app).with_graceful_shutdown(shutdown.cancelled_owned());
    let (ra, rb) = tokio::join!(a.into_future(), b.into_future());
    ra.and(rb)
}
