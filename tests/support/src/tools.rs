//! Where the test tools installed by scripts/install-test-deps.sh live.

use std::path::{Path, PathBuf};

/// The tools directory: $PGPILOT_TOOLS_DIR, else /opt/pgpilot-tools as root, else
/// ~/.cache/pgpilot-tools (same rule as scripts/install-test-deps.sh).
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGPILOT_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/opt/pgpilot-tools")
    } else {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
        Path::new(&home).join(".cache/pgpilot-tools")
    }
}

/// Path of an installed tool, or an error telling how to install it.
pub fn tool(relative: &str) -> anyhow::Result<PathBuf> {
    let path = tools_dir().join(relative);
    if path.exists() {
        Ok(path)
    } else {
        anyhow::bail!(
            "test tool {} is missing: run scripts/install-test-deps.sh (make test does)",
            path.display()
        )
    }
}

/// s3s-fs, the S3 server used by tests.
pub fn s3s_fs() -> anyhow::Result<PathBuf> {
    tool("bin/s3s-fs")
}

/// azurite-blob, the Azure Blob emulator used by tests.
pub fn azurite_blob() -> anyhow::Result<PathBuf> {
    tool("npm/node_modules/.bin/azurite-blob")
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}
