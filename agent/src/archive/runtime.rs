//! The runtime file that `wal-push` and `wal-fetch` read. Postgres runs them (as its own OS
//! user) from archive_command and restore_command; the file tells them where the agent's
//! loopback API is, the token for it, and the store settings for the direct path used when the
//! agent cannot be reached. Written by the agent at start, mode 0600, owned by the Postgres user
//! — secrets never go on the archive_command line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ArchiveSection, Config};
use crate::postgres::OsUser;
use crate::store::StoreConfig;

#[derive(Clone, Serialize, Deserialize)]
pub struct ArchiveRuntime {
    /// Loopback API base URL.
    pub api_url: String,
    pub token: String,
    pub data_dir: PathBuf,
    pub store: StoreConfig,
    pub cluster: String,
    pub shard: String,
    pub archive: ArchiveSection,
    /// While a `[bootstrap]` restore replays another cluster's WAL: where `wal-fetch` reads
    /// (never `wal-push`, which always writes to this cluster's own archive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_from: Option<FetchSource>,
}

/// Another cluster's archive to fetch WAL from.
#[derive(Clone, Serialize, Deserialize)]
pub struct FetchSource {
    pub store: StoreConfig,
    pub cluster: String,
    pub shard: String,
}

impl std::fmt::Debug for ArchiveRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveRuntime")
            .field("api_url", &self.api_url)
            .field("token", &"<redacted>")
            .field("data_dir", &self.data_dir)
            .field(
                "store",
                &crate::store::config::redact_url(&self.store.store),
            )
            .finish_non_exhaustive()
    }
}

impl ArchiveRuntime {
    pub fn path(cfg: &Config) -> PathBuf {
        crate::files::archive_runtime(&cfg.state_dir)
    }

    /// Writes the runtime file for `cfg` (which must have a `[backup]` store).
    pub fn write(
        cfg: &Config,
        store: &StoreConfig,
        token: &str,
        owner: Option<&OsUser>,
        fetch_from: Option<FetchSource>,
    ) -> std::io::Result<PathBuf> {
        let rt = ArchiveRuntime {
            api_url: format!("http://{}", cfg.api_loopback_listen),
            token: token.to_string(),
            data_dir: cfg.data_dir.clone(),
            store: store.clone(),
            cluster: cfg.cluster.name.clone(),
            shard: cfg.cluster.shard.clone(),
            archive: cfg.archive.clone(),
            fetch_from,
        };
        let path = Self::path(cfg);
        rt.store_at(&path, owner)?;
        Ok(path)
    }

    /// After the API token rotated: the runtime file names the new current token, everything
    /// else unchanged (a `[bootstrap]` restore's source included). No file: nothing to do.
    pub fn rotate_token(cfg: &Config, token: &str, owner: Option<&OsUser>) -> anyhow::Result<()> {
        let path = Self::path(cfg);
        if !path.exists() {
            return Ok(());
        }
        let mut rt = Self::read(&path)?;
        rt.token = token.to_string();
        rt.store_at(&path, owner)
            .map_err(|e| anyhow::anyhow!("cannot rewrite the runtime file {}: {e}", path.display()))
    }

    fn store_at(&self, path: &Path, owner: Option<&OsUser>) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::files::write_private(path, &bytes, owner)
    }

    pub fn read(path: &Path) -> anyhow::Result<ArchiveRuntime> {
        let text = std::fs::read(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the agent's runtime file {}: {e}",
                path.display()
            )
        })?;
        serde_json::from_slice(&text)
            .map_err(|e| anyhow::anyhow!("runtime file {} is not valid: {e}", path.display()))
    }
}
