//! Probe and lifecycle-hook handlers as the kubelet runs them: `httpGet` (HTTP, or HTTPS
//! without verifying the certificate; success on 200–399), `tcpSocket` (a connection opens) and `exec` (exit 0, run as the container
//! runs), each within a timeout; and a probe's timing and thresholds from the pod spec.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::pod::ContainerRun;

/// A probe's handler, timing and thresholds, with Kubernetes' defaults.
#[derive(Debug, Clone)]
pub(crate) struct ProbeSpec {
    pub handler: Value,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl ProbeSpec {
    pub fn from(v: Option<&Value>) -> Option<Self> {
        let v = v?;
        let n = |k: &str, d: u64| v.get(k).and_then(Value::as_u64).unwrap_or(d);
        Some(Self {
            handler: v.clone(),
            initial_delay: Duration::from_secs(n("initialDelaySeconds", 0)),
            period: Duration::from_secs(n("periodSeconds", 10).max(1)),
            timeout: Duration::from_secs(n("timeoutSeconds", 1).max(1)),
            success_threshold: n("successThreshold", 1).max(1) as u32,
            failure_threshold: n("failureThreshold", 3).max(1) as u32,
        })
    }
}

/// A port given as a number or as the name of one of the container's ports.
fn port(v: Option<&Value>, container: &Value) -> Result<u16, String> {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| format!("invalid port {n}")),
        Some(Value::String(s)) => s.parse::<u16>().ok().map_or_else(
            || {
                container
                    .get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|p| p.get("name").and_then(Value::as_str) == Some(s))
                    .and_then(|p| p.get("containerPort").and_then(Value::as_u64))
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| format!("no container port named {s:?}"))
            },
            Ok,
        ),
        _ => Err("missing port".into()),
    }
}

/// Runs one handler (a probe or a lifecycle hook) against the pod at `ip`.
pub(crate) async fn run_handler(
    handler: &Value,
    ip: Ipv4Addr,
    run: &ContainerRun,
    timeout: Duration,
) -> Result<(), String> {
    let host = |h: &Value| {
        h.get("host")
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| ip.to_string())
    };
    let work = async {
        if let Some(h) = handler.get("httpGet") {
            let port = port(h.get("port"), &run.spec)?;
            let path = h.get("path").and_then(Value::as_str).unwrap_or("/");
            let https = h.get("scheme").and_then(Value::as_str) == Some("HTTPS");
            http_get(&host(h), port, path, https).await
        } else if let Some(t) = handler.get("tcpSocket") {
            let port = port(t.get("port"), &run.spec)?;
            TcpStream::connect((host(t).as_str(), port))
                .await
                .map(drop)
                .map_err(|e| format!("dial tcp {}:{port}: {e}", host(t)))
        } else if let Some(e) = handler.get("exec") {
            let argv: Vec<String> = e
                .get("command")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(String::from))
                .collect();
            let mut cmd = run.command(&argv, None)?;
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .process_group(0)
                .kill_on_drop(true);
            let child = cmd.spawn().map_err(|e| format!("exec {argv:?}: {e}"))?;
            // The whole process group goes when the handler times out, children included.
            let group = child.id().map(|p| KillGroup(p as i32));
            let out = tokio::time::timeout(timeout, child.wait_with_output())
                .await
                .map_err(|_| format!("command {argv:?} timed out after {timeout:?}"))?
                .map_err(|e| format!("exec {argv:?}: {e}"))?;
            drop(group);
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "command {argv:?} exited with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout).trim()
                ))
            }
        } else {
            Err("handler has no httpGet, tcpSocket or exec".into())
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {timeout:?}")))
}

/// `GET` over HTTP or, with `https`, over TLS without verifying the server's certificate (as
/// the kubelet's probes do).
async fn http_get(host: &str, port: u16, path: &str, https: bool) -> Result<(), String> {
    let url = format!(
        "{}://{host}:{port}{path}",
        if https { "https" } else { "http" }
    );
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("Get {url:?}: {e}"))?;
    if https {
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(NoVerify))
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| format!("Get {url:?}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("Get {url:?}: {e}"))?;
        return exchange(tls, &url, host, port, path).await;
    }
    exchange(tcp, &url, host, port, path).await
}

async fn exchange(
    mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    url: &str,
    host: &str,
    port: u16,
    path: &str,
) -> Result<(), String> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.32\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("Get {url:?}: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    // The status line is all that matters.
    while !buf.windows(2).any(|w| w == b"\r\n") {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("Get {url:?}: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("Get {url:?}: malformed HTTP response"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

/// The kubelet does not verify a probed server's certificate.
#[derive(Debug)]
struct NoVerify;

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Kills a process group when dropped (a handler that timed out or was cancelled).
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
