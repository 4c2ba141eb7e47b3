//! A small program for pods on the test kubelet: serves HTTP on `$POD_IP:$PORT` (health,
//! a readiness switch, files under directories named by env vars, its env, and how its calls to
//! the API server fare), reads its own pod through kube-rs `Client::try_default()` in a loop,
//! and logs SIGTERM to `$MARKER_FILE` (exiting unless `$IGNORE_SIGTERM` is set).

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use k8s_openapi::api::core::v1::Pod;

#[derive(Default)]
struct App {
    unready: AtomicBool,
    api_ok: AtomicU64,
    api_errors: AtomicU64,
    last_error: std::sync::Mutex<String>,
}

fn mark(line: &str) {
    if let Some(path) = std::env::var_os("MARKER_FILE") {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line} {ms}");
        }
    }
}

fn dir_file(var: &str, name: &str) -> Result<std::path::PathBuf, StatusCode> {
    let dir = std::env::var_os(var).ok_or(StatusCode::NOT_FOUND)?;
    if name.contains('/') || name.starts_with('.') {
        return Err(StatusCode::BAD_REQUEST);
    }
    Ok(std::path::Path::new(&dir).join(name))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    // Its in-cluster kube client needs rustls' provider chosen (the workspace enables two).
    pgpilot_kube_testserver::install_crypto_provider();
    let ip = std::env::var("POD_IP")?;
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let app = Arc::new(App::default());
    mark(&format!("started pid={}", std::process::id()));
    println!("kubelet-test-app listening on {ip}:{port}");

    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(a): State<Arc<App>>| async move {
                if a.unready.load(Ordering::SeqCst) {
                    (StatusCode::SERVICE_UNAVAILABLE, "unready")
                } else {
                    (StatusCode::OK, "ready")
                }
            }),
        )
        .route(
            "/ready/{on}",
            post(
                |State(a): State<Arc<App>>, Path(on): Path<bool>| async move {
                    a.unready.store(!on, Ordering::SeqCst);
                    "ok"
                },
            ),
        )
        .route(
            "/env/{name}",
            get(|Path(name): Path<String>| async move {
                std::env::var(name).map_err(|_| StatusCode::NOT_FOUND)
            }),
        )
        .route(
            "/files/{var}/{name}",
            get(|Path((var, name)): Path<(String, String)>| async move {
                std::fs::read_to_string(dir_file(&var, &name)?).map_err(|_| StatusCode::NOT_FOUND)
            })
            .put(
                |Path((var, name)): Path<(String, String)>, body: String| async move {
                    let path = dir_file(&var, &name).map_err(|s| (s, String::new()))?;
                    std::fs::write(path, body)
                        .map(|_| "written")
                        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
                },
            ),
        )
        .route(
            "/dial/{addr}",
            get(|Path(addr): Path<String>| async move { dial(&addr).await }),
        )
        .route(
            "/api",
            get(|State(a): State<Arc<App>>| async move {
                let last = a.last_error.lock().map(|l| l.clone()).unwrap_or_default();
                axum::Json(serde_json::json!({
                    "ok": a.api_ok.load(Ordering::SeqCst),
                    "errors": a.api_errors.load(Ordering::SeqCst),
                    "lastError": last,
                }))
            }),
        )
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind(format!("{ip}:{port}")).await?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    tokio::spawn(api_loop(app));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        term.recv().await;
        mark("sigterm");
        println!("got SIGTERM");
        if std::env::var_os("IGNORE_SIGTERM").is_none() {
            return Ok(());
        }
    }
}

/// Connects to another pod (`ip:port`) and asks for its `/healthz`, within 2 s: how a test sees
/// whether this pod reaches its peers. 200 with the answer, or 502 with the error.
async fn dial(addr: &str) -> (StatusCode, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: peer\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(out)) if out.ends_with("ok") => (StatusCode::OK, "ok".into()),
        Ok(Ok(out)) => (StatusCode::BAD_GATEWAY, format!("unexpected answer: {out}")),
        Ok(Err(e)) => (StatusCode::BAD_GATEWAY, e.to_string()),
        Err(_) => (StatusCode::BAD_GATEWAY, "timed out".into()),
    }
}

/// Reads its own pod every 300 ms through the in-cluster client, each call bounded by 2 s.
async fn api_loop(app: Arc<App>) {
    let name = std::env::var("POD_NAME").unwrap_or_default();
    let client = loop {
        match kube::Client::try_default().await {
            Ok(c) => break c,
            Err(e) => {
                *app.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let pods: kube::Api<Pod> = kube::Api::default_namespaced(client);
    loop {
        let outcome = match tokio::time::timeout(Duration::from_secs(2), pods.get(&name)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out after 2s".to_string()),
        };
        match outcome {
            Ok(()) => {
                app.api_ok.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                app.api_errors.fetch_add(1, Ordering::SeqCst);
                eprintln!("API call failed: {e}");
                *app.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
