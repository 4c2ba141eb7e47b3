//! Postgres' own TLS, from the agent's certificate (`[tls]`, `postgres = true` by default):
//! Postgres serves TLS with the certificate the API serves, and pg_hba.conf takes TCP
//! connections over TLS only (`hostssl`). The agent's connections to a peer's Postgres (a
//! replica's WAL receiver, `pg_basebackup`, `pg_rewind` and its checkpoint request) verify the
//! peer against the CA and the shard's certificate name, whatever pod IP they dial
//! (`sslmode=verify-full` with `host=<name> hostaddr=<ip>`).
//!
//! Postgres refuses a key file that its group can read, and the mounted Secret is 0440, so the
//! agent keeps a copy for Postgres in `<state dir>/tls` (0600, Postgres' user), rewritten when
//! the mounted files change to a pair that goes together; a reload (SIGHUP) makes Postgres
//! take it for new connections.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::config::{Config, Tls};
use crate::postgres::OsUser;

pub const CERT_FILE: &str = "server.crt";
pub const KEY_FILE: &str = "server.key";
pub const CA_FILE: &str = "ca.crt";

/// `[tls]` when Postgres serves TLS.
pub fn enabled(cfg: &Config) -> Option<&Tls> {
    cfg.tls.as_ref().filter(|t| t.postgres)
}

/// Where Postgres' copy of the certificate, key and CA lives.
pub fn dir(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("tls")
}

/// The settings rendered into pgpilot.conf.
pub fn settings(cfg: &Config) -> Vec<(String, String)> {
    let Some(tls) = enabled(cfg) else {
        return Vec::new();
    };
    let d = dir(cfg);
    let path = |f: &str| d.join(f).display().to_string();
    let mut out = vec![
        ("ssl".to_string(), "on".to_string()),
        ("ssl_cert_file".into(), path(CERT_FILE)),
        ("ssl_key_file".into(), path(KEY_FILE)),
        ("ssl_min_protocol_version".into(), "TLSv1.2".into()),
    ];
    if tls.ca_file.is_some() {
        // Clients may authenticate with a certificate (`cert` in a user's own pg_hba rules).
        out.push(("ssl_ca_file".into(), path(CA_FILE)));
    }
    out
}

/// Copies the mounted certificate, key and CA for Postgres when they changed and the pair goes
/// together (otherwise the copy in place stays, and the error says why). Returns whether the
/// copy changed.
pub fn install(cfg: &Config, owner: Option<&OsUser>) -> Result<bool, String> {
    let Some(tls) = enabled(cfg) else {
        return Ok(false);
    };
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let cert = read(&tls.cert_file)?;
    let key = read(&tls.key_file)?;
    check_pair(tls, &cert, &key)?;
    let d = dir(cfg);
    crate::postgres::bootstrap::prepare_dir(&d, 0o700, owner)
        .map_err(|e| format!("{}: {e}", d.display()))?;
    let mut changed = false;
    let mut files = vec![(CERT_FILE, cert), (KEY_FILE, key)];
    if let Some(ca) = &tls.ca_file {
        files.push((CA_FILE, read(ca)?));
    }
    for (name, bytes) in files {
        let path = d.join(name);
        if std::fs::read(&path).is_ok_and(|old| old == bytes) {
            continue;
        }
        crate::files::write_private(&path, &bytes, owner)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        changed = true;
    }
    Ok(changed)
}

/// The certificate and key go together (Postgres would refuse to start otherwise).
fn check_pair(tls: &Tls, cert: &[u8], key: &[u8]) -> Result<(), String> {
    use pgpilot_common::tls as common_tls;
    let chain = common_tls::certs(cert, &tls.cert_file.display().to_string())?;
    let key = common_tls::private_key(key, &tls.key_file.display().to_string())?;
    rustls::ServerConfig::builder_with_provider(common_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map(|_| ())
        .map_err(|e| {
            format!(
                "{} and {} do not go together: {e}",
                tls.cert_file.display(),
                tls.key_file.display()
            )
        })
}

/// libpq connection parameters to reach a peer's Postgres at `host`: with TLS, verified
/// against the CA under the shard's certificate name (an IP is dialled as `hostaddr`).
pub fn peer_params(cfg: &Config, host: &str) -> Vec<(&'static str, String)> {
    let Some(tls) = enabled(cfg) else {
        return vec![("host", host.to_string())];
    };
    if tls.ca_file.is_none() {
        return vec![("host", host.to_string()), ("sslmode", "require".into())];
    }
    let root = dir(cfg).join(CA_FILE).display().to_string();
    match (host.parse::<IpAddr>(), tls.peer_name()) {
        (Ok(_), Ok(name)) => vec![
            ("host", name),
            ("hostaddr", host.to_string()),
            ("sslmode", "verify-full".into()),
            ("sslrootcert", root),
        ],
        // A host name that is not the certificate's: the chain is verified, not the name.
        _ => vec![
            ("host", host.to_string()),
            ("sslmode", "verify-ca".into()),
            ("sslrootcert", root),
        ],
    }
}

/// `peer_params` as a conninfo fragment (`key='value' …`).
pub fn peer_conninfo(cfg: &Config, host: &str) -> String {
    peer_params(cfg, host)
        .into_iter()
        .map(|(k, v)| format!("{k}={}", conninfo_quote(&v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes a conninfo value (`'…'`, backslash-escaped).
pub fn conninfo_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The TLS of a `tokio-postgres` connection to a peer's Postgres; `None` without TLS.
pub fn peer_connector(cfg: &Config) -> Result<Option<rustls::ClientConfig>, String> {
    let Some(tls) = enabled(cfg) else {
        return Ok(None);
    };
    let Some(ca_file) = &tls.ca_file else {
        return Err(
            "Postgres serves TLS but [tls] ca_file is not set: the peer cannot be verified".into(),
        );
    };
    let ca = std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
    pgpilot_common::tls::client_config(&ca, &tls.peer_name()?, None).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_values_are_quoted() {
        assert_eq!(conninfo_quote(r"a'b\c"), r"'a\'b\\c'");
    }
}
