//! Starting and stopping a server, the kube-rs client and kubeconfig pointing at it, and the
//! switch that hands tests a real cluster instead when `KUBECONFIG` is set.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinHandle;

use crate::handlers::{App, dispatch};
use crate::store::{Store, StoreOptions};

/// Options for [`KubeTestServer::start_with`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub store: StoreOptions,
    /// How often a watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            store: StoreOptions::default(),
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// A running in-memory API server on `127.0.0.1`. Stops when dropped.
pub struct KubeTestServer {
    addr: SocketAddr,
    store: Arc<Store>,
    audit: Arc<crate::auth::Audit>,
    task: JoinHandle<()>,
    /// Holds the kubeconfig file; removed with the server.
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl KubeTestServer {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(ServerOptions::default()).await
    }

    pub async fn start_with(options: ServerOptions) -> anyhow::Result<Self> {
        // Its callers build kube clients next; see install_crypto_provider.
        install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the test API server to 127.0.0.1")?;
        let addr = listener.local_addr()?;
        let store = Arc::new(Store::new(options.store));
        let audit = Arc::new(crate::auth::Audit::default());
        let app = App {
            store: store.clone(),
            address: addr.to_string(),
            bookmark_interval: options.bookmark_interval,
            audit: audit.clone(),
        };
        // kube-apiserver accepts request bodies up to 3 MiB (axum's default is 2 MiB; large
        // CRDs with embedded pod templates come close).
        let router = axum::Router::new()
            .fallback(dispatch)
            .layer(axum::extract::DefaultBodyLimit::max(3 * 1024 * 1024))
            .with_state(app);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!("test API server stopped: {e}");
            }
        });
        let dir = tempfile::tempdir().context("creating the kubeconfig directory")?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&format!("http://{addr}")))
            .context("writing the kubeconfig")?;
        Ok(Self {
            addr,
            store,
            audit,
            task,
            _dir: dir,
            kubeconfig,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube-rs client for this server, default namespace `default`.
    pub fn client(&self) -> kube::Client {
        install_crypto_provider();
        let url = self.url().parse().expect("a valid URL");
        let config = kube::Config::new(url);
        kube::Client::try_from(config).expect("a plain-HTTP kube client builds")
    }

    /// A kube-rs client that acts as service account `namespace`/`name`: its bearer token is
    /// [`service_account_token`], so RBAC in this server's store decides what it may do (see
    /// `auth.rs`), and the audit counts its requests under that user.
    pub fn client_as(&self, namespace: &str, name: &str) -> kube::Client {
        install_crypto_provider();
        let url = self.url().parse().expect("a valid URL");
        let mut config = kube::Config::new(url);
        config.default_namespace = namespace.to_string();
        let value = format!("Bearer {}", service_account_token(namespace, name))
            .parse()
            .expect("a valid header value");
        config
            .headers
            .push((axum::http::header::AUTHORIZATION, value));
        kube::Client::try_from(config).expect("a plain-HTTP kube client builds")
    }

    /// Every resource request so far, counted per (user, verb, group, resource, subresource,
    /// namespace, allowed). Callers without a service-account token count as `admin`.
    pub fn audit(&self) -> std::collections::BTreeMap<crate::auth::AuditKey, u64> {
        self.audit.snapshot()
    }

    /// The requests RBAC refused, one line each (user, verb, resource, namespace, count): a
    /// test that runs code as a service account asserts this is empty, since code may retry a
    /// 403 or only log it. Refusals in a namespace being deleted are left out: its Roles go
    /// with it while the code there may still run.
    pub fn denied(&self) -> Vec<String> {
        self.audit()
            .into_iter()
            .filter(|(k, _)| !k.allowed && !k.teardown)
            .map(|(k, n)| {
                let mut r = if k.group.is_empty() {
                    k.resource.clone()
                } else {
                    format!("{}.{}", k.resource, k.group)
                };
                if !k.subresource.is_empty() {
                    r = format!("{r}/{}", k.subresource);
                }
                format!("{} {} {r} in {:?} ({n}x)", k.user, k.verb, k.namespace)
            })
            .collect()
    }

    /// A kubeconfig file for kubectl (`kubectl --kubeconfig <path>` or `KUBECONFIG=<path>`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Forgets the watch history: every watch from an older resourceVersion gets 410 Gone.
    pub fn compact_history(&self) {
        self.store.compact();
    }

    /// Ends every open watch, so clients reconnect (combine with [`Self::compact_history`] to
    /// make them see 410 Gone and re-list).
    pub fn close_watches(&self) {
        self.store.close_watches();
    }

    /// Plays the kubelet for one pod: `Running` with `Ready`/`ContainersReady` conditions (or
    /// not ready), written through the status subresource as a kubelet would.
    pub async fn set_pod_ready(
        &self,
        namespace: &str,
        name: &str,
        ready: bool,
    ) -> anyhow::Result<()> {
        use k8s_openapi::api::core::v1::Pod;
        let status = if ready { "True" } else { "False" };
        let now = crate::store::now();
        let conditions: Vec<serde_json::Value> =
            ["Initialized", "ContainersReady", "Ready", "PodScheduled"]
                .iter()
                .map(|t| {
                    let s = if matches!(*t, "Initialized" | "PodScheduled") {
                        "True"
                    } else {
                        status
                    };
                    serde_json::json!({"type": t, "status": s, "lastTransitionTime": now})
                })
                .collect();
        let patch = serde_json::json!({"status": {"phase": "Running", "podIP": "10.244.0.10", "conditions": conditions}});
        kube::Api::<Pod>::namespaced(self.client(), namespace)
            .patch_status(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(patch),
            )
            .await
            .with_context(|| format!("marking pod {namespace}/{name} ready={ready}"))?;
        Ok(())
    }
}

impl Drop for KubeTestServer {
    fn drop(&mut self) {
        // Open watch streams run in their own tasks; end them with the server.
        self.store.close_watches();
        self.task.abort();
    }
}

/// The bearer token that stands for service account `namespace`/`name` on this server (the
/// test kubelet mounts it into the pods that run as that account).
pub fn service_account_token(namespace: &str, name: &str) -> String {
    format!("{}{namespace}:{name}", crate::auth::SA_PREFIX)
}

fn kubeconfig_yaml(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: pgpilot-test\n  cluster:\n    server: {url}\ncontexts:\n- name: pgpilot-test\n  context:\n    cluster: pgpilot-test\n    user: pgpilot-test\n    namespace: default\ncurrent-context: pgpilot-test\nusers:\n- name: pgpilot-test\n  user: {{}}\n"
    )
}

/// A client for the tests to use: the real cluster from `KUBECONFIG` when that is set (no
/// server started), otherwise a fresh [`KubeTestServer`], which the caller keeps alive.
/// kube-client builds TLS with rustls' process-wide default provider, which rustls cannot pick
/// when a build enables both ring and aws-lc-rs (as a workspace build does). Install ring,
/// present in every build; a provider already installed is left alone.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub async fn test_client() -> anyhow::Result<(kube::Client, Option<KubeTestServer>)> {
    install_crypto_provider();
    if std::env::var_os("KUBECONFIG").is_some_and(|k| !k.is_empty()) {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the cluster named by KUBECONFIG")?;
        return Ok((client, None));
    }
    let server = KubeTestServer::start().await?;
    Ok((server.client(), Some(server)))
}

/// Arguments that point kubectl at the same API server as [`test_client`]'s client:
/// `--kubeconfig <file>` for the test server, nothing for a real cluster (kubectl reads
/// `KUBECONFIG` itself, which may list several files).
pub fn kubectl_args(server: Option<&KubeTestServer>) -> Vec<std::ffi::OsString> {
    match server {
        Some(s) => vec!["--kubeconfig".into(), s.kubeconfig_path().into()],
        None => Vec::new(),
    }
}
