//! An S3 server for tests: s3s-fs (installed by scripts/install-test-deps.sh), which checks
//! SigV4 signatures and enforces conditional puts (`If-None-Match: *` → 412). It stores each
//! bucket as a directory under its root, so creating a bucket is a `mkdir`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::net::{free_port, wait_for_listen};

/// A running s3s-fs on 127.0.0.1, killed on drop.
pub struct S3Server {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
}

impl S3Server {
    /// Starts s3s-fs with fresh credentials and an empty data dir.
    pub fn start() -> anyhow::Result<S3Server> {
        let bin = crate::tools::s3s_fs()?;
        let dir = tempfile::Builder::new().prefix("pgpilot-s3-").tempdir()?;
        std::fs::create_dir(dir.path().join("data"))?;
        let port = free_port();
        let access_key = format!("AK{:016X}", rand_u64());
        let secret_key = format!("SK{:032x}", rand_u64() as u128 * 0x9e37_79b9_7f4a_7c15);
        let child = spawn(&bin, dir.path(), port, &access_key, &secret_key)?;
        let mut server = S3Server {
            child,
            dir,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key,
            secret_key,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        if let Err(e) = wait_for_listen(addr, Duration::from_secs(20)) {
            let log =
                std::fs::read_to_string(self.dir.path().join("s3s-fs.log")).unwrap_or_default();
            let _ = self.child.kill();
            anyhow::bail!("s3s-fs did not start: {e}\n{log}");
        }
        Ok(())
    }

    /// Stops the server (an outage); [`S3Server::restart`] brings it back with the same data.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same data and credentials.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let bin = crate::tools::s3s_fs()?;
        self.child = spawn(
            &bin,
            self.dir.path(),
            self.port,
            &self.access_key,
            &self.secret_key,
        )?;
        self.wait_ready()
    }

    /// Creates a bucket (a directory of the server's root).
    pub fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.data_dir().join(name))?;
        Ok(())
    }

    /// Where s3s-fs keeps its buckets.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Writes the access key and secret key to files (mode 0600) and returns their paths, for
    /// configs that read credentials from files.
    pub fn credential_files(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        use std::os::unix::fs::OpenOptionsExt;
        let write = |name: &str, content: &str| -> anyhow::Result<PathBuf> {
            let path = self.dir.path().join(name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            std::io::Write::write_all(&mut f, content.as_bytes())?;
            Ok(path)
        };
        Ok((
            write("access-key", &self.access_key)?,
            write("secret-key", &format!("{}\n", self.secret_key))?,
        ))
    }

    /// The server's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(
    bin: &Path,
    dir: &Path,
    port: u16,
    access_key: &str,
    secret_key: &str,
) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("s3s-fs.log"))?;
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", access_key, "--secret-key", secret_key])
        .arg(dir.join("data"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(child)
}

pub(crate) fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is randomly seeded per process; good enough for unique test credentials.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}
