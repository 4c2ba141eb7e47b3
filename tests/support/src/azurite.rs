//! An Azure Blob server for tests: Azurite (npm, installed by scripts/install-test-deps.sh) with
//! its well-known development account, in memory. object_store cannot create containers, so
//! [`Azurite::create_container`] sends that one request itself, signed with Shared Key.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::net::{free_port, wait_for_listen};

/// Azurite's development account (public, documented by Microsoft).
pub const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's development account key (public, documented by Microsoft).
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const API_VERSION: &str = "2021-08-06";

/// A running azurite-blob on 127.0.0.1, killed on drop.
pub struct Azurite {
    child: Child,
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT` (blob URLs are `<endpoint>/<account>/<container>/<blob>`).
    pub endpoint: String,
}

impl Azurite {
    pub fn start() -> anyhow::Result<Azurite> {
        let bin = crate::tools::azurite_blob()?;
        let dir = tempfile::Builder::new()
            .prefix("pgpilot-azurite-")
            .tempdir()?;
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("azurite.log"))?;
        let child = Command::new(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args([
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--skipApiVersionCheck",
            ])
            // In-memory persistence refuses --location; run in the temp dir so that nothing
            // Azurite might write lands in the caller's working directory.
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut server = Azurite {
            child,
            dir,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        if let Err(e) = wait_for_listen(addr, Duration::from_secs(30)) {
            let log =
                std::fs::read_to_string(server.dir.path().join("azurite.log")).unwrap_or_default();
            let _ = server.child.kill();
            anyhow::bail!("azurite-blob did not start: {e}\n{log}");
        }
        Ok(server)
    }

    /// Creates a container (Put Container, Shared Key authorization).
    pub async fn create_container(&self, name: &str) -> anyhow::Result<()> {
        let date = jiff::Timestamp::now()
            .strftime("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        // Shared Key string-to-sign: verb, eleven standard headers (all empty here), the x-ms-
        // headers, then the canonicalized resource. Azurite's path-style URLs carry the account
        // in the path, so it appears twice.
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{API_VERSION}\n/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(&B64.decode(KEY)?)?;
        mac.update(to_sign.as_bytes());
        let signature = B64.encode(mac.finalize().into_bytes());
        let response = reqwest::Client::new()
            .put(format!(
                "{}/{ACCOUNT}/{name}?restype=container",
                self.endpoint
            ))
            .header("x-ms-date", &date)
            .header("x-ms-version", API_VERSION)
            .header("Content-Length", "0")
            .header("Authorization", format!("SharedKey {ACCOUNT}:{signature}"))
            .send()
            .await?;
        let status = response.status();
        anyhow::ensure!(
            status.is_success(),
            "create container {name}: {status}: {}",
            response.text().await.unwrap_or_default()
        );
        Ok(())
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
