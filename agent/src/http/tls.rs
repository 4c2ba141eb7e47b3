//! HTTPS on the pod-IP listener (`[tls]`, docs/security.md): the certificate and key from
//! files, client certificates verified against a CA file when one is set, and all three re-read
//! every [`RELOAD_INTERVAL`] when they change, without a restart. Handshakes run in their own
//! tasks, so a slow or silent client never holds up the others.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::DistinguishedName;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::Tls;
use crate::metrics::Metrics;
use pgpilot_common::tls as common_tls;

/// How often the files are checked for a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The bytes a config was built from: a change in any file rebuilds it.
#[derive(PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

/// The pod-IP listener's TLS: the config new handshakes use, rebuilt when the files change.
pub struct ServerTls {
    cfg: Tls,
    metrics: Metrics,
    current: RwLock<(Files, Arc<ServerConfig>)>,
}

impl ServerTls {
    /// Reads and checks the files; an error names the file and what is wrong with it.
    pub fn load(cfg: &Tls, metrics: &Metrics) -> Result<Arc<ServerTls>, String> {
        let files = read_files(cfg)?;
        let config = build(cfg, &files, metrics)?;
        Ok(Arc::new(ServerTls {
            cfg: cfg.clone(),
            metrics: metrics.clone(),
            current: RwLock::new((files, config)),
        }))
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.current.read().expect("tls config").1.clone()
    }

    /// Re-reads the files; `Ok(true)` when they changed and the new config is in use. On an
    /// error the config in use stays.
    pub fn reload(&self) -> Result<bool, String> {
        let files = read_files(&self.cfg)?;
        if self.current.read().expect("tls config").0 == files {
            return Ok(false);
        }
        let config = build(&self.cfg, &files, &self.metrics)?;
        *self.current.write().expect("tls config") = (files, config);
        self.metrics.tls_reloads.inc();
        Ok(true)
    }

    /// Reloads every [`RELOAD_INTERVAL`] until `shutdown`, calling `changed` after each new
    /// certificate in use; failures are logged once each.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken, mut changed: impl FnMut()) {
        let cert = self.cfg.cert_file.display().to_string();
        crate::reload_every(
            RELOAD_INTERVAL,
            shutdown,
            "cannot reload the TLS files (the certificate in use stays)",
            || self.reload(),
            || {
                tracing::info!(cert = %cert, "TLS certificate reloaded");
                changed()
            },
        )
        .await
    }

    /// Accepts TCP connections on `listener` and hands over those whose handshake succeeds.
    pub fn listen(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> TlsListener {
        let local = listener.local_addr();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, addr) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of descriptors and the like: wait, as axum's own loop does.
                            tracing::debug!("accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(peer = %addr, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { rx, local }
    }
}

fn read_files(cfg: &Tls) -> Result<Files, String> {
    let read = |path: &Path, what: &str| {
        std::fs::read(path)
            .map_err(|e| format!("cannot read the TLS {what} {}: {e}", path.display()))
    };
    pgpilot_common::secret_file::check_not_world_readable("the TLS key", &cfg.key_file)?;
    Ok(Files {
        cert: read(&cfg.cert_file, "certificate")?,
        key: read(&cfg.key_file, "key")?,
        ca: cfg
            .ca_file
            .as_deref()
            .map(|p| read(p, "CA file"))
            .transpose()?,
    })
}

fn build(cfg: &Tls, files: &Files, metrics: &Metrics) -> Result<Arc<ServerConfig>, String> {
    let cert_name = cfg.cert_file.display().to_string();
    let chain = common_tls::certs(&files.cert, &cert_name)?;
    let key = common_tls::private_key(&files.key, &cfg.key_file.display().to_string())?;
    let info = common_tls::cert_info(&chain[0]).map_err(|e| format!("{cert_name}: {e}"))?;
    let builder = ServerConfig::builder_with_provider(common_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match (&files.ca, &cfg.ca_file) {
        (Some(ca), Some(path)) => {
            let roots = common_tls::roots(ca, &path.display().to_string())?;
            // Optional at the handshake: the kubelet's probes and Prometheus present none and
            // reach only the open routes. A certificate that is presented must verify.
            let inner = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                common_tls::provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("{}: {e}", path.display()))?;
            builder.with_client_cert_verifier(Arc::new(Counted {
                inner,
                refused: metrics
                    .api_auth_failures
                    .with_label_values(&["bad_certificate"]),
            }))
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("{cert_name} and its key file do not go together: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    metrics.tls_cert_expiry.set(info.not_after);
    Ok(Arc::new(config))
}

/// webpki's client verification, with each refused certificate counted
/// (`pgpilot_api_auth_failures_total{reason="bad_certificate"}`) and logged.
struct Counted {
    inner: Arc<dyn ClientCertVerifier>,
    refused: prometheus::IntCounter,
}

impl std::fmt::Debug for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counted")
            .field("inner", &self.inner)
            .finish()
    }
}

impl ClientCertVerifier for Counted {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let r = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        if let Err(e) = &r {
            self.refused.inc();
            tracing::warn!("client certificate refused: {e}");
        }
        r
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Connections whose TLS handshake succeeded.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: std::io::Result<SocketAddr>,
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop ended (shutdown): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// Who is at the other end of a connection: its address and, over TLS, the names of the
/// client certificate it presented (verified against the CA during the handshake).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub cert_names: Option<Arc<Vec<String>>>,
}

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer {
            addr: *stream.remote_addr(),
            cert_names: None,
        }
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        let cert_names = stream
            .io()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| common_tls::cert_info(leaf).ok())
            .map(|info| Arc::new(info.names));
        Peer {
            addr: *stream.remote_addr(),
            cert_names,
        }
    }
}
