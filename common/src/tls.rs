//! TLS between the operator and the agents, and between agents (docs/security.md): PEM files
//! read into rustls types, the names and expiry of a certificate, and the client side, which
//! connects to a pod IP but verifies the certificate against the shard's fixed DNS name.
//!
//! Every rustls config here names its crypto provider (ring) explicitly: a workspace build
//! enables two providers, and rustls' process-wide default panics when it cannot choose.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The crypto provider of every TLS config pgpilot builds.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file's text, in order (leaf first for a chain). `what` names the
/// file in errors.
pub fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what}: not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: holds no PEM certificate"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1). The error never quotes the file.
pub fn private_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("{what}: no PEM private key in it ({})", error_kind(&e)))
}

/// A PEM error without the bytes it saw (a key file's content must never reach an error).
fn error_kind(e: &rustls::pki_types::pem::Error) -> &'static str {
    use rustls::pki_types::pem::Error;
    match e {
        Error::NoItemsFound => "no key block",
        Error::MissingSectionEnd { .. } => "a block without its END line",
        Error::IllegalSectionStart { .. } => "a malformed BEGIN line",
        Error::Base64Decode(_) => "invalid base64",
        _ => "unreadable",
    }
}

/// A trust store of the CA certificates in `pem`.
pub fn roots(pem: &[u8], what: &str) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in certs(pem, what)? {
        store
            .add(cert)
            .map_err(|e| format!("{what}: not a usable CA certificate: {e}"))?;
    }
    Ok(store)
}

/// What pgpilot reads from a certificate: its DNS names (subject alternative names, and the
/// common name when it has none) and the end of its validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub names: Vec<String>,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    pub not_before: i64,
}

pub fn cert_info(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(n) = name {
                names.push((*n).to_string());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(str::to_string)),
        );
    }
    Ok(CertInfo {
        names,
        not_after: cert.validity().not_after.timestamp(),
        not_before: cert.validity().not_before.timestamp(),
    })
}

/// A client's TLS: the CA that signs the agents' certificates, the DNS name their certificate
/// carries (verified whatever address is dialled: agents are reached by pod IP), and the
/// client's own certificate and key when the agents ask for one.
pub fn client_config(
    ca_pem: &[u8],
    server_name: &str,
    identity: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig, String> {
    let roots = Arc::new(roots(ca_pem, "the CA file")?);
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("{server_name:?} is not a valid server name: {e}"))?;
    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| format!("the CA file: {e}"))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FixedName { inner, name }));
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_pem, key_pem)) => builder
            .with_client_auth_cert(
                certs(cert_pem, "the client certificate")?,
                private_key(key_pem, "the client key")?,
            )
            .map_err(|e| format!("the client certificate and key do not go together: {e}")),
    }
}

/// Verifies the server's chain against the CA and its name against a fixed one, not the
/// dialled address. Everything else is webpki's own verification.
#[derive(Debug)]
struct FixedName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Issuing certificates: the operator's per-cluster CA and the agents' and its own
/// certificates (ECDSA P-256), and the tests'.
#[cfg(feature = "issue")]
pub mod issue {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    /// A certificate and its private key, both PEM.
    #[derive(Clone, PartialEq, Eq)]
    pub struct Issued {
        pub cert_pem: String,
        pub key_pem: String,
    }

    impl std::fmt::Debug for Issued {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Issued")
                .field("cert_pem", &self.cert_pem)
                .field("key_pem", &"<redacted>")
                .finish()
        }
    }

    /// The validity window of a certificate.
    #[derive(Debug, Clone, Copy)]
    pub struct Validity {
        pub not_before: SystemTime,
        pub not_after: SystemTime,
    }

    impl Validity {
        /// From an hour ago (clock skew between nodes) for `lifetime`.
        pub fn starting_now(lifetime: Duration) -> Validity {
            let now = SystemTime::now();
            Validity {
                not_before: now - Duration::from_secs(3600),
                not_after: now + lifetime,
            }
        }
    }

    fn at(t: SystemTime) -> Result<time::OffsetDateTime, String> {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "a time before 1970".to_string())?
            .as_secs();
        time::OffsetDateTime::from_unix_timestamp(secs as i64).map_err(|e| e.to_string())
    }

    fn params(
        common_name: &str,
        names: &[String],
        v: Validity,
    ) -> Result<CertificateParams, String> {
        let mut p = CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.not_before = at(v.not_before)?;
        p.not_after = at(v.not_after)?;
        Ok(p)
    }

    /// A new self-signed CA named `common_name`.
    pub fn new_ca(common_name: &str, v: Validity) -> Result<Issued, String> {
        let mut p = params(common_name, &[], v)?;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = p.self_signed(&key).map_err(|e| e.to_string())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate for `names` (DNS SANs; the first is also the common name), for both
    /// server and client authentication, signed by `ca`.
    pub fn leaf(ca: &Issued, names: &[String], v: Validity) -> Result<Issued, String> {
        let first = names.first().ok_or("a certificate needs a name")?;
        let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| format!("the CA key: {e}"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
            .map_err(|e| format!("the CA certificate: {e}"))?;
        let mut p = params(first, names, v)?;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = p.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(all(test, feature = "issue"))]
mod tests {
    use super::issue::{Validity, leaf, new_ca};
    use super::*;
    use std::time::Duration;

    #[test]
    fn issued_certificates_carry_their_names_and_validity_and_chain_to_their_ca() {
        let v = Validity::starting_now(Duration::from_secs(86400));
        let ca = new_ca("pgpilot test CA", v).unwrap();
        let cert = leaf(&ca, &["db.example".into(), "other.example".into()], v).unwrap();
        let chain = certs(cert.cert_pem.as_bytes(), "leaf").unwrap();
        let info = cert_info(&chain[0]).unwrap();
        assert_eq!(info.names, ["db.example", "other.example"]);
        let expected = v
            .not_after
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert_eq!(info.not_after, expected);
        // The client side accepts it under its name, from the CA only, not under another name.
        assert!(client_config(ca.cert_pem.as_bytes(), "db.example", None).is_ok());
        assert!(private_key(cert.key_pem.as_bytes(), "key").is_ok());
        let e = private_key(cert.cert_pem.as_bytes(), "the key file").unwrap_err();
        assert!(e.starts_with("the key file: no PEM private key"), "{e}");
        assert!(!e.contains("BEGIN"), "{e}");
        let e = certs(b"junk", "c.pem").unwrap_err();
        assert_eq!(e, "c.pem: holds no PEM certificate");
    }
}

/// TLS for `tokio-postgres` connections to another instance's Postgres (a rewind's source),
/// with a [`client_config`]: the server is verified against the CA and the shard's fixed name,
/// whatever address is dialled.
#[cfg(feature = "postgres")]
pub mod postgres {
    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

    /// `tokio_postgres::Config::connect(MakeRustls::new(config))`.
    #[derive(Clone)]
    pub struct MakeRustls(Arc<rustls::ClientConfig>);

    impl MakeRustls {
        pub fn new(config: rustls::ClientConfig) -> Self {
            Self(Arc::new(config))
        }
    }

    impl<S> MakeTlsConnect<S> for MakeRustls
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        type Stream = Stream<S>;
        type TlsConnect = Connect;
        type Error = io::Error;

        fn make_tls_connect(&mut self, host: &str) -> io::Result<Connect> {
            // The name only routes SNI; the verifier checks the fixed name.
            let name = ServerName::try_from(host.to_string())
                .or_else(|_| ServerName::try_from("postgres"))
                .map_err(io::Error::other)?;
            Ok(Connect {
                config: self.0.clone(),
                name,
            })
        }
    }

    pub struct Connect {
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    }

    impl<S> TlsConnect<S> for Connect
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        type Stream = Stream<S>;
        type Error = io::Error;
        type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

        fn connect(self, stream: S) -> Self::Future {
            let connector = tokio_rustls::TlsConnector::from(self.config);
            Box::pin(async move { Ok(Stream(connector.connect(self.name, stream).await?)) })
        }
    }

    /// A session with `config`: over TLS with `tls`, plain without; the connection runs on a
    /// task of its own.
    pub async fn connect(
        config: &tokio_postgres::Config,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let client = match tls {
            Some(tls) => {
                let (client, conn) = config.connect(MakeRustls::new(tls)).await?;
                tokio::spawn(conn);
                client
            }
            None => {
                let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                client
            }
        };
        Ok(client)
    }

    /// A TLS stream to Postgres (no channel binding: SCRAM-SHA-256 over the verified channel).
    pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

    impl<S> tokio_postgres::tls::TlsStream for Stream<S>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        fn channel_binding(&self) -> ChannelBinding {
            ChannelBinding::none()
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }
}
