//! The two listeners and their routers: loopback (wal-push, wal-fetch, the CLI inside the pod)
//! and the external address (the operator, load balancers). Every route is declared here, with
//! why it is or is not authenticated and which listener serves it.

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::auth::require_token;
use super::routes::{
    backups, drain, lifecycle, metrics, probes, replication, restore, status, wal,
};
use super::tls::Peer;
use crate::core::Handle;
use crate::error::AgentError;

/// Routes both listeners serve.
fn common() -> (Router<Handle>, Router<Handle>) {
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
        .route("/v1/backups/{id}", get(backups::get))
        // Where a drain stands: read-only, no secret.
        .route("/v1/drain", get(drain::get));
    // Bearer token: everything that changes the state of Postgres (the operator on the pod
    // IP, the CLI on loopback).
    let protected = Router::new()
        .route("/v1/restart", post(lifecycle::restart))
        .route("/v1/stop", post(lifecycle::stop))
        .route("/v1/start", post(lifecycle::start))
        .route("/v1/reload", post(lifecycle::reload))
        .route("/v1/restore", post(restore::restore))
        .route("/v1/backups", post(backups::start))
        // A replica taking a base backup asks its primary to close the current segment.
        .route("/v1/wal/switch", post(wal::switch))
        // Peers call these with the shard's shared token.
        .route("/v1/replicas", post(replication::register))
        .route("/v1/switchover", post(replication::switchover))
        .route("/v1/promote", post(replication::promote))
        .route("/v1/demote", post(replication::demote))
        .route("/v1/follow", post(replication::follow))
        .route("/v1/reinitialize", post(replication::reinitialize))
        // The preStop hook (loopback), the operator or a person.
        .route("/v1/drain", post(drain::start).delete(drain::cancel));
    (open, protected)
}

/// The external listener (pod IP): what the operator and load balancers call. Pod-internal
/// routes (WAL push and fetch) are not served here.
pub fn external_router(h: Handle) -> Router {
    let (open, protected) = common();
    let certificates = h.ctx.cfg.tls.as_ref().and_then(|t| {
        t.ca_file.is_some().then(|| {
            std::sync::Arc::new(super::auth::Certificates {
                names: t.accepted_client_names(),
                accept_token: t.accept_token,
            })
        })
    });
    finish(h, open, protected, Some(Default::default()), certificates)
}

/// The loopback listener: everything the external one serves, plus the pod-only routes that
/// `wal-push` (archive_command) and `wal-fetch` (restore_command) call from inside the pod.
pub fn loopback_router(h: Handle) -> Router {
    let (open, protected) = common();
    // Bearer token from the agent's runtime file, which only the Postgres user can read.
    let protected = protected
        .route("/v1/wal/push", post(wal::push))
        .route("/v1/wal/fetch", post(wal::fetch));
    finish(h, open, protected, None, None)
}

fn finish(
    h: Handle,
    open: Router<Handle>,
    protected: Router<Handle>,
    limiter: Option<std::sync::Arc<super::auth::Limiter>>,
    certificates: Option<std::sync::Arc<super::auth::Certificates>>,
) -> Router {
    let auth = super::auth::Auth {
        h: h.clone(),
        limiter,
        certificates,
    };
    let protected = protected.route_layer(middleware::from_fn_with_state(auth, require_token));
    open.merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are small JSON documents: a larger one is refused (413) before it is read,
        // whether the route reads a body or not, and a chunked one once it passes the limit.
        .layer(DefaultBodyLimit::max(super::MAX_BODY_BYTES))
        .layer(middleware::from_fn(limit_body))
        .layer(middleware::from_fn_with_state(h.clone(), record_metrics))
        .with_state(h)
}

/// Refuses a request whose Content-Length is over [`super::MAX_BODY_BYTES`].
async fn limit_body(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > super::MAX_BODY_BYTES) {
        return super::extract::too_large().into_response();
    }
    next.run(req).await
}

async fn not_found(req: Request) -> AgentError {
    AgentError::NotFound(format!("no route {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> AgentError {
    AgentError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
}

/// Counts requests by route template (not raw path, to keep label cardinality bounded).
async fn record_metrics(State(h): State<Handle>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let m = &h.ctx.metrics;
    m.api_requests
        .with_label_values(&[&route, &method, resp.status().as_str()])
        .inc();
    m.api_duration
        .with_label_values(&[&route])
        .observe(start.elapsed().as_secs_f64());
    if let Some(kind) = resp.extensions().get::<super::error::ErrorKind>() {
        m.api_errors.with_label_values(&[&route, kind.0]).inc();
    }
    resp
}

/// Serves the router on both listeners until `shutdown` is cancelled; the external one over
/// HTTPS when `tls` is given.
pub async fn serve(
    h: Handle,
    loopback: TcpListener,
    external: TcpListener,
    tls: Option<std::sync::Arc<super::tls::ServerTls>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // With the peer (address, client certificate): the external listener limits wrong tokens
    // per peer and accepts certificates.
    let a = axum::serve(
        loopback,
        loopback_router(h.clone()).into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let external_service = external_router(h).into_make_service_with_connect_info::<Peer>();
    let b = async {
        match tls {
            Some(tls) => {
                let listener = tls.listen(external, shutdown.clone());
                axum::serve(listener, external_service)
                    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                    .await
            }
            None => {
                axum::serve(external, external_service)
                    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                    .await
            }
        }
    };
    let (ra, rb) = tokio::join!(a.into_future(), b);
    ra.and(rb)
}
