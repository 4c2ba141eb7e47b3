//! A backup store for agents under test: a file:// directory or a bucket on s3s-fs, the
//! `[backup]` TOML that points agents at it, and the same store opened as the agent opens it, so
//! a test can look at what the agent wrote.

use std::path::{Path, PathBuf};

use pgpilot_agent::store::{Store, StoreConfig};
use pgpilot_common::layout::Layout;

use crate::s3::S3Server;

/// The agent's cluster name and shard when its config has no `[cluster]` table.
pub const DEFAULT_CLUSTER: &str = "local";
pub const DEFAULT_SHARD: &str = "0";

/// The layout of an agent that sets no `[cluster]` table.
pub fn default_layout() -> Layout {
    layout(DEFAULT_CLUSTER, DEFAULT_SHARD)
}

/// The object-store layout of one shard.
pub fn layout(cluster: &str, shard: &str) -> Layout {
    Layout::new(cluster, shard).expect("valid cluster and shard names")
}

/// Opens the store of a `[backup]` table (TOML) the way the agent does.
pub fn open(backup_toml: &str) -> anyhow::Result<Store> {
    #[derive(serde::Deserialize)]
    struct File {
        backup: StoreConfig,
    }
    let file: File = toml::from_str(backup_toml)?;
    Ok(Store::open(&file.backup)?)
}

enum Backend {
    File(tempfile::TempDir),
    S3(S3Server),
}

/// Where agents under test archive: created empty, removed (or its server stopped) on drop.
pub struct BackupStore {
    backend: Backend,
    url: String,
    /// More `[backup]` keys (codec, keys, thresholds) written after the location.
    keys: String,
}

impl BackupStore {
    /// A file:// store in a fresh temp dir (zstd).
    pub fn file() -> anyhow::Result<BackupStore> {
        Self::file_with_compression("zstd")
    }

    /// A file:// store in a fresh temp dir with `compression` (`none`, `zstd`, `lz4`, `gzip`).
    pub fn file_with_compression(compression: &str) -> anyhow::Result<BackupStore> {
        let dir = tempfile::tempdir()?;
        let url = format!("file://{}", dir.path().display());
        Ok(BackupStore {
            backend: Backend::File(dir),
            url,
            keys: format!("compression = \"{compression}\"\n"),
        })
    }

    /// A fresh s3s-fs with one bucket, `archive`; agents write under `s3://archive/pg`, with
    /// credentials read from files and a short request timeout.
    pub fn s3() -> anyhow::Result<BackupStore> {
        let server = S3Server::start()?;
        server.create_bucket("archive")?;
        let (ak, sk) = server.credential_files()?;
        let keys = format!(
            "endpoint = \"{}\"\npath_style = true\nregion = \"us-east-1\"\n\
             access_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\nrequest_timeout_secs = 10\n",
            server.endpoint,
            ak.display(),
            sk.display()
        );
        Ok(BackupStore {
            backend: Backend::S3(server),
            url: "s3://archive/pg".into(),
            keys,
        })
    }

    /// Adds `[backup]` keys (TOML lines, e.g. `encryption_key_files = [...]`).
    pub fn with_keys(mut self, keys: &str) -> BackupStore {
        self.keys.push_str(keys);
        if !keys.ends_with('\n') {
            self.keys.push('\n');
        }
        self
    }

    /// The `[backup]` table for an agent's config, with quick retries so outages show fast. It
    /// ends inside `[backup.retry]`: anything appended must open its own table.
    pub fn toml(&self) -> String {
        self.toml_with("")
    }

    /// [`BackupStore::toml`] with more `[backup]` keys for one agent (e.g. another key file).
    pub fn toml_with(&self, keys: &str) -> String {
        let sep = if keys.is_empty() || keys.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        format!(
            "[backup]\nstore = \"{}\"\n{}{keys}{sep}[backup.retry]\nmax_attempts = 2\ninitial_backoff_ms = 50\n",
            self.url, self.keys
        )
    }

    /// The store URL (`file:///…` or `s3://archive/pg`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The store, opened as the agent opens it.
    pub fn open(&self) -> Store {
        open(&self.toml()).expect("open the test store")
    }

    /// Where a file:// store keeps its objects: `root().join(key)` is one object's file.
    pub fn root(&self) -> &Path {
        match &self.backend {
            Backend::File(dir) => dir.path(),
            Backend::S3(_) => panic!("root() is for file:// stores; this one is {}", self.url),
        }
    }

    /// The S3 server behind an s3 store (to stop it for an outage, or read its files).
    pub fn s3_server(&mut self) -> &mut S3Server {
        match &mut self.backend {
            Backend::S3(server) => server,
            Backend::File(_) => panic!("{} is not on an S3 server", self.url),
        }
    }

    /// Every object key under `prefix`, sorted.
    pub async fn keys_under(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .open()
            .list(prefix)
            .await
            .expect("list the test store")
            .into_iter()
            .map(|o| o.key)
            .collect();
        keys.sort();
        keys
    }
}

/// Every file below `dir` (recursively), as full paths; nothing when `dir` does not exist.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}
