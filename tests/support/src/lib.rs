//! Test fixtures shared by every integration test: real PostgreSQL, real object-store servers,
//! a Kubernetes API server. Each fixture binds 127.0.0.1 on a free port, lives in a temp dir and
//! cleans up on drop. Test support only: never a dependency of a shipped binary.

pub mod agent;
pub mod azurite;
pub mod chaos;
pub mod cluster;
pub mod data;
pub mod gcs;
pub mod net;
pub mod postgres;
pub mod s3;
pub mod store;
pub mod tools;
pub mod wal;

/// The Kubernetes API server for tests (tests/kube-server): `kube::KubeTestServer`,
/// `kube::test_client()` (a real cluster when KUBECONFIG is set). See docs/kube-test-server.md.
pub use pgpilot_kube_testserver as kube;

/// The kubelet that runs the API server's pods as local processes (tests/kubelet):
/// `kubelet::Kubelet`, `kubelet::server_options()`. See docs/kubelet.md.
pub use pgpilot_test_kubelet as kubelet;

/// Writes a file that holds a secret (a token, a password, a key, credentials) as a careful
/// administrator does: mode 0600, never readable by every user (the agent refuses that). As
/// root, where Postgres runs as `postgres` and `wal-push`'s direct path reads the store's key
/// and credential files as that user: owned by root, group `postgres`, mode 0640
/// (docs/archiving.md, "Running as root"). Replaces the file if it exists.
pub fn write_secret(path: &std::path::Path, content: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let group = nix::unistd::geteuid()
        .is_root()
        .then(|| nix::unistd::Group::from_name("postgres").ok().flatten())
        .flatten();
    match group {
        Some(g) => {
            std::os::unix::fs::chown(path, None, Some(g.gid.as_raw()))?;
            f.set_permissions(std::fs::Permissions::from_mode(0o640))?;
        }
        None => f.set_permissions(std::fs::Permissions::from_mode(0o600))?,
    }
    f.write_all(content.as_ref())
}
