//! The `[backup]` store configuration: one serde type that the agent's TOML embeds, validated
//! into a [`StoreLocation`] plus archive settings. Credentials are never part of this type: they
//! come from files named here or from the environment (docs/storage.md), so Debug and Display of
//! the config can never show a secret.

use std::fmt;
use std::path::PathBuf;

use pgpilot_common::archive::{self, Codec, Compression, KeyRing, KeySource, WriteOptions};
use serde::{Deserialize, Serialize};

/// Where and how backups are stored. Every field has a default except `store`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Store URL: `file:///abs/path`, `file://./relative`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix` or `az://container/prefix`.
    pub store: String,
    /// zstd | lz4 | gzip | none.
    pub compression: Compression,
    /// zstd level (1..=22, or negative for zstd's fast levels). Default 3.
    pub zstd_level: Option<i32>,
    /// Encryption key files, `path` or `id=path`: 32 raw bytes or 64 hex digits each. The first
    /// key encrypts new objects; all of them decrypt (rotation).
    pub encryption_key_files: Vec<String>,
    /// Encryption keys from environment variables, `VAR` or `id=VAR`; after the files.
    pub encryption_key_env: Vec<String>,
    /// Refuse to read unencrypted objects. Default: true when keys are configured.
    pub require_encryption: Option<bool>,
    /// Objects uploaded at the same time by callers that upload many (WAL, base backups), and
    /// multipart parts in flight per object.
    pub upload_concurrency: usize,
    /// Chunks compressed/encrypted at the same time per object. Default: number of CPUs.
    pub codec_threads: Option<usize>,
    /// Plaintext bytes per archive chunk (4 KiB ..= 16 MiB).
    pub chunk_size: usize,
    /// Objects whose stored size stays below this are sent in one PUT (atomic, and create-only
    /// where the backend supports it); larger ones by multipart upload. Also the memory bound.
    pub multipart_threshold: usize,
    /// Multipart part size (at least 5 MiB, S3's minimum).
    pub part_size: usize,
    /// Custom endpoint for S3-compatible stores (`http://127.0.0.1:9000`) or Azure.
    pub endpoint: Option<String>,
    /// S3 region. Default: `AWS_REGION`/`AWS_DEFAULT_REGION`, else us-east-1.
    pub region: Option<String>,
    /// S3 path-style requests (`endpoint/bucket/key`) instead of virtual-hosted style.
    /// Default: `AWS_VIRTUAL_HOSTED_STYLE_REQUEST` when set, else path style for a store with
    /// its own endpoint (`endpoint`, `AWS_ENDPOINT`) and virtual-hosted style for AWS.
    pub path_style: Option<bool>,
    /// Allow plain http endpoints. Default: true only when `endpoint` starts with `http://`.
    pub allow_http: Option<bool>,
    /// S3 access key id, read from this file.
    pub access_key_id_file: Option<PathBuf>,
    /// S3 secret access key, read from this file.
    pub secret_access_key_file: Option<PathBuf>,
    /// S3 session token, read from this file.
    pub session_token_file: Option<PathBuf>,
    /// GCS service account JSON file.
    pub gcs_service_account_file: Option<PathBuf>,
    /// GCS: send unsigned requests (public buckets and test servers only).
    pub gcs_anonymous: bool,
    /// Azure storage account name. Default: `AZURE_STORAGE_ACCOUNT_NAME`.
    pub azure_account: Option<String>,
    /// Azure storage account key, read from this file.
    pub azure_access_key_file: Option<PathBuf>,
    /// Azure: talk to an emulator (Azurite) with its well-known development account.
    pub azure_use_emulator: bool,
    /// Timeout of one HTTP request, in seconds.
    pub request_timeout_secs: u64,
    /// Retries of whole operations on transient errors.
    pub retry: RetrySettings,
    /// Also read the store client's environment variables under this prefix, over the plain
    /// ones: with `PGPILOT_BOOTSTRAP_`, `PGPILOT_BOOTSTRAP_AWS_ACCESS_KEY_ID` is this store's
    /// `AWS_ACCESS_KEY_ID` (a second store's credentials beside the first's, e.g. the source
    /// of a `[bootstrap]` restore given by `envFrom` with a prefix).
    pub credentials_env_prefix: Option<String>,
    /// Applied by the agent after each successful base backup (`[backup.retention]`); absent,
    /// nothing is deleted automatically (`pgpilot-agent retention` still works by hand).
    pub retention: Option<RetentionSettings>,
}

/// What the agent keeps after each successful base backup: the newest `keep_last` complete
/// backups and/or those that stopped within `keep_within` (`7d`, `12h`; both: the union), and
/// the WAL the oldest kept backup needs. Same rules as `pgpilot-agent retention`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    pub keep_last: Option<usize>,
    pub keep_within: Option<String>,
}

/// Retry policy for transient failures: exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Attempts in total, including the first (1 = no retry).
    pub max_attempts: u32,
    /// Backoff before the second attempt, in milliseconds; doubles each time.
    pub initial_backoff_ms: u64,
    /// Upper bound of one backoff, in milliseconds.
    pub max_backoff_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 5,
            initial_backoff_ms: 200,
            max_backoff_ms: 10_000,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            store: String::new(),
            compression: Compression::Zstd,
            zstd_level: None,
            encryption_key_files: Vec::new(),
            encryption_key_env: Vec::new(),
            require_encryption: None,
            upload_concurrency: 4,
            codec_threads: None,
            chunk_size: archive::DEFAULT_CHUNK_SIZE,
            // One 16 MiB WAL segment, stored uncompressed, still fits in one atomic PUT.
            multipart_threshold: 17 << 20,
            part_size: 8 << 20,
            endpoint: None,
            region: None,
            path_style: None,
            allow_http: None,
            access_key_id_file: None,
            secret_access_key_file: None,
            session_token_file: None,
            gcs_service_account_file: None,
            gcs_anonymous: false,
            azure_account: None,
            azure_access_key_file: None,
            azure_use_emulator: false,
            request_timeout_secs: 60,
            retry: RetrySettings::default(),
            retention: None,
            credentials_env_prefix: None,
        }
    }
}

impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}", redact_url(&self.store), self.compression)?;
        if !self.encryption_key_files.is_empty() || !self.encryption_key_env.is_empty() {
            write!(f, ", encrypted")?;
        }
        write!(f, ")")
    }
}

/// Like a derived Debug, except that the store URL is redacted: a URL with credentials is
/// refused by validation, but may be printed before it.
impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("store", &redact_url(&self.store))
            .field("compression", &self.compression)
            .field("zstd_level", &self.zstd_level)
            .field("encryption_key_files", &self.encryption_key_files)
            .field("encryption_key_env", &self.encryption_key_env)
            .field("require_encryption", &self.require_encryption)
            .field("upload_concurrency", &self.upload_concurrency)
            .field("codec_threads", &self.codec_threads)
            .field("chunk_size", &self.chunk_size)
            .field("multipart_threshold", &self.multipart_threshold)
            .field("part_size", &self.part_size)
            .field("endpoint", &self.endpoint.as_deref().map(redact_url))
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("allow_http", &self.allow_http)
            .field("access_key_id_file", &self.access_key_id_file)
            .field("secret_access_key_file", &self.secret_access_key_file)
            .field("session_token_file", &self.session_token_file)
            .field("gcs_service_account_file", &self.gcs_service_account_file)
            .field("gcs_anonymous", &self.gcs_anonymous)
            .field("azure_account", &self.azure_account)
            .field("azure_access_key_file", &self.azure_access_key_file)
            .field("azure_use_emulator", &self.azure_use_emulator)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("retry", &self.retry)
            .finish()
    }
}

/// A URL with any `user:password@` part replaced by `<redacted>@`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let out = match rest[..authority_end].rfind('@') {
        Some(at) => format!("<redacted>@{}", &rest[at + 1..]),
        None => rest.to_owned(),
    };
    match scheme {
        Some(s) => format!("{s}://{out}"),
        None => out,
    }
}

/// Which backend and where in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A directory (a mounted volume).
    File {
        root: PathBuf,
    },
    S3 {
        bucket: String,
        prefix: String,
    },
    Gcs {
        bucket: String,
        prefix: String,
    },
    Azure {
        container: String,
        prefix: String,
    },
}

impl StoreLocation {
    /// Parses a store URL.
    pub fn parse(url: &str) -> Result<StoreLocation, ConfigError> {
        let shown = redact_url(url);
        let bad = |why: &str| ConfigError::Invalid {
            field: "store",
            problem: format!("{shown:?}: {why}"),
        };
        if url.is_empty() {
            return Err(ConfigError::Missing {
                field: "store",
                hint: "set [backup] store, e.g. file:///var/lib/pgpilot/backups or s3://bucket/prefix",
            });
        }
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://…"))?;
        if scheme == "file" {
            // file:///abs, file://./rel, file://rel (the last two relative to the working dir).
            if rest.is_empty() {
                return Err(bad("no path"));
            }
            return Ok(StoreLocation::File {
                root: PathBuf::from(rest),
            });
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.contains('@') || bucket.contains(':') {
            return Err(bad(
                "credentials or ports do not belong in the store URL: use the *_file settings or the environment",
            ));
        }
        if bucket.is_empty() {
            return Err(bad("no bucket or container name"));
        }
        let prefix = prefix.trim_matches('/').to_owned();
        if prefix.split('/').any(|s| s == "." || s == "..") {
            return Err(bad("prefix must not contain . or .."));
        }
        let bucket = bucket.to_owned();
        match scheme {
            "s3" => Ok(StoreLocation::S3 { bucket, prefix }),
            "gs" => Ok(StoreLocation::Gcs { bucket, prefix }),
            "az" => Ok(StoreLocation::Azure {
                container: bucket,
                prefix,
            }),
            other => Err(bad(&format!(
                "unknown scheme {other:?} (expected file, s3, gs or az)"
            ))),
        }
    }
}

/// A configuration problem, saying which setting and what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("backup store: {field} is missing: {hint}")]
    Missing {
        field: &'static str,
        hint: &'static str,
    },
    #[error("backup store: {field} is invalid: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    #[error("backup store: {field} does not apply to {scheme} stores")]
    NotApplicable {
        field: &'static str,
        scheme: &'static str,
    },
    #[error("backup store: encryption keys: {0}")]
    Keys(String),
}

/// The archive settings derived from a config.
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    pub keys: KeyRing,
    pub write: WriteOptions,
    pub read: archive::ReadOptions,
}

impl StoreConfig {
    /// A config for `store` with every other setting at its default.
    pub fn new(store: impl Into<String>) -> StoreConfig {
        StoreConfig {
            store: store.into(),
            ..StoreConfig::default()
        }
    }

    /// Checks every setting that can be checked without the network, loads the keys.
    pub fn validate(&self) -> Result<(StoreLocation, ArchiveSettings), ConfigError> {
        let location = StoreLocation::parse(&self.store)?;
        let invalid =
            |field: &'static str, problem: String| ConfigError::Invalid { field, problem };
        if let Some(level) = self.zstd_level {
            if self.compression != Compression::Zstd {
                return Err(ConfigError::NotApplicable {
                    field: "zstd_level",
                    scheme: "non-zstd compression",
                });
            }
            if !(-7..=22).contains(&level) || level == 0 {
                return Err(invalid(
                    "zstd_level",
                    format!("{level}: expected 1..=22 or -7..=-1"),
                ));
            }
        }
        if !(archive::MIN_CHUNK_SIZE..=archive::MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(invalid(
                "chunk_size",
                format!(
                    "{}: expected {}..={}",
                    self.chunk_size,
                    archive::MIN_CHUNK_SIZE,
                    archive::MAX_CHUNK_SIZE
                ),
            ));
        }
        if !(1..=64).contains(&self.upload_concurrency) {
            return Err(invalid(
                "upload_concurrency",
                format!("{}: expected 1..=64", self.upload_concurrency),
            ));
        }
        if let Some(t) = self.codec_threads
            && !(1..=256).contains(&t)
        {
            return Err(invalid("codec_threads", format!("{t}: expected 1..=256")));
        }
        if self.part_size < (5 << 20) || self.part_size > (5 << 30) {
            return Err(invalid(
                "part_size",
                format!("{}: expected 5 MiB ..= 5 GiB", self.part_size),
            ));
        }
        if self.multipart_threshold < self.chunk_size {
            return Err(invalid(
                "multipart_threshold",
                "must be at least chunk_size".into(),
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(invalid("retry.max_attempts", "must be at least 1".into()));
        }
        if self.request_timeout_secs == 0 {
            return Err(invalid("request_timeout_secs", "must be at least 1".into()));
        }
        self.check_backend_fields(&location)?;

        let sources: Vec<KeySource> = self
            .encryption_key_files
            .iter()
            .map(|s| KeySource::file(s))
            .chain(self.encryption_key_env.iter().map(|s| KeySource::env(s)))
            .collect();
        let keys = KeyRing::load(&sources).map_err(|e| ConfigError::Keys(e.to_string()))?;
        let require_encryption = self.require_encryption.unwrap_or(!keys.is_empty());
        if require_encryption && keys.is_empty() {
            return Err(ConfigError::Missing {
                field: "encryption_key_files",
                hint: "require_encryption is set but no encryption key is configured",
            });
        }
        let threads = self
            .codec_threads
            .unwrap_or_else(archive::default_concurrency);
        let settings = ArchiveSettings {
            keys,
            write: WriteOptions {
                codec: Codec::from_compression(self.compression, self.zstd_level),
                chunk_size: self.chunk_size,
                concurrency: threads,
            },
            read: archive::ReadOptions {
                recompute_digests: false,
                require_encryption,
                concurrency: threads,
            },
        };
        if let Some(r) = &self.retention {
            r.rules().map_err(|problem| invalid("retention", problem))?;
        }
        Ok((location, settings))
    }

    fn check_backend_fields(&self, location: &StoreLocation) -> Result<(), ConfigError> {
        let scheme = match location {
            StoreLocation::File { .. } => "file",
            StoreLocation::S3 { .. } => "s3",
            StoreLocation::Gcs { .. } => "gs",
            StoreLocation::Azure { .. } => "az",
        };
        let na = |field: &'static str| Err(ConfigError::NotApplicable { field, scheme });
        let s3_only = [
            ("region", self.region.is_some()),
            ("path_style", self.path_style.is_some()),
            ("access_key_id_file", self.access_key_id_file.is_some()),
            (
                "secret_access_key_file",
                self.secret_access_key_file.is_some(),
            ),
            ("session_token_file", self.session_token_file.is_some()),
        ];
        let gcs_only = [
            (
                "gcs_service_account_file",
                self.gcs_service_account_file.is_some(),
            ),
            ("gcs_anonymous", self.gcs_anonymous),
        ];
        let az_only = [
            ("azure_account", self.azure_account.is_some()),
            (
                "azure_access_key_file",
                self.azure_access_key_file.is_some(),
            ),
            ("azure_use_emulator", self.azure_use_emulator),
        ];
        for (group, applies) in [
            (&s3_only[..], scheme == "s3"),
            (&gcs_only[..], scheme == "gs"),
            (&az_only[..], scheme == "az"),
        ] {
            if !applies && let Some((field, _)) = group.iter().find(|(_, set)| *set) {
                return na(field);
            }
        }
        if scheme == "file" && (self.endpoint.is_some() || self.allow_http.is_some()) {
            return na(if self.endpoint.is_some() {
                "endpoint"
            } else {
                "allow_http"
            });
        }
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(ConfigError::Invalid {
                field: "endpoint",
                problem: format!("{endpoint:?}: expected http(s)://host[:port]"),
            });
        }
        if self.access_key_id_file.is_some() != self.secret_access_key_file.is_some() {
            return Err(ConfigError::Missing {
                field: if self.access_key_id_file.is_some() {
                    "secret_access_key_file"
                } else {
                    "access_key_id_file"
                },
                hint: "S3 static credentials need both access_key_id_file and secret_access_key_file",
            });
        }
        for (field, path) in [
            ("access_key_id_file", &self.access_key_id_file),
            ("secret_access_key_file", &self.secret_access_key_file),
            ("session_token_file", &self.session_token_file),
            ("gcs_service_account_file", &self.gcs_service_account_file),
            ("azure_access_key_file", &self.azure_access_key_file),
        ] {
            if let Some(path) = path
                && let Err(e) = std::fs::metadata(path)
            {
                return Err(ConfigError::Invalid {
                    field,
                    problem: format!("cannot read {}: {e}", path.display()),
                });
            }
        }
        if scheme == "az"
            && !self.azure_use_emulator
            && self.azure_account.is_none()
            && std::env::var_os("AZURE_STORAGE_ACCOUNT_NAME").is_none()
        {
            return Err(ConfigError::Missing {
                field: "azure_account",
                hint: "set azure_account or AZURE_STORAGE_ACCOUNT_NAME (or azure_use_emulator for Azurite)",
            });
        }
        Ok(())
    }
}

impl RetentionSettings {
    /// The rules, checked: at least one, `keep_last` at least 1, a valid duration.
    pub fn rules(&self) -> Result<(Option<usize>, Option<std::time::Duration>), String> {
        let keep_within = self
            .keep_within
            .as_deref()
            .map(crate::units::parse_duration)
            .transpose()
            .map_err(|e| format!("keep_within {e}"))?;
        if self.keep_last.is_none() && keep_within.is_none() {
            return Err(
                "give keep_last and/or keep_within, or leave [backup.retention] out".into(),
            );
        }
        if self.keep_last == Some(0) {
            return Err("keep_last must be at least 1".into());
        }
        Ok((self.keep_last, keep_within))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_settings_are_checked_and_name_the_problem() {
        let with = |keep_last: Option<usize>, keep_within: Option<&str>| {
            let mut c = StoreConfig::new("file:///b");
            c.retention = Some(RetentionSettings {
                keep_last,
                keep_within: keep_within.map(str::to_string),
            });
            c.validate().map(|_| ()).map_err(|e| e.to_string())
        };
        assert!(with(Some(2), None).is_ok());
        assert!(with(None, Some("7d")).is_ok());
        for (last, within, words) in [
            (Some(0), None, "keep_last must be at least 1"),
            (None, None, "give keep_last and/or keep_within"),
            (None, Some("7 parsecs"), "keep_within"),
        ] {
            let e = with(last, within).unwrap_err();
            assert!(e.contains("retention") && e.contains(words), "{e}");
        }
    }

    #[test]
    fn urls_parse_into_locations() {
        assert_eq!(
            StoreLocation::parse("file:///var/b").unwrap(),
            StoreLocation::File {
                root: "/var/b".into()
            }
        );
        assert_eq!(
            StoreLocation::parse("file://./data/b").unwrap(),
            StoreLocation::File {
                root: "./data/b".into()
            }
        );
        assert_eq!(
            StoreLocation::parse("s3://bkt/a/b/").unwrap(),
            StoreLocation::S3 {
                bucket: "bkt".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            StoreLocation::parse("gs://bkt").unwrap(),
            StoreLocation::Gcs {
                bucket: "bkt".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            StoreLocation::parse("az://c/p").unwrap(),
            StoreLocation::Azure {
                container: "c".into(),
                prefix: "p".into()
            }
        );
        for bad in [
            "",
            "bucket",
            "ftp://x",
            "s3://",
            "s3://AK:SECRET@bkt/p",
            "s3://b/../x",
        ] {
            let err = StoreLocation::parse(bad).unwrap_err().to_string();
            assert!(!err.contains("SECRET"), "{err}");
        }
    }

    #[test]
    fn toml_embeds_and_validation_names_the_problem() {
        let cfg: StoreConfig = toml::from_str(
            "store = \"s3://b/p\"\ncompression = \"lz4\"\nendpoint = \"http://127.0.0.1:9000\"\npath_style = true\n",
        )
        .unwrap();
        assert_eq!(cfg.compression, Compression::Lz4);
        cfg.validate().unwrap();
        assert!(toml::from_str::<StoreConfig>("store = \"s3://b\"\nbogus = 1\n").is_err());

        let mut c = StoreConfig::new("s3://b/p");
        c.access_key_id_file = Some("/nonexistent/ak".into());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Missing {
                field: "secret_access_key_file",
                ..
            })
        ));
        let c = StoreConfig {
            zstd_level: Some(40),
            ..StoreConfig::new("file:///x")
        };
        assert!(c.validate().unwrap_err().to_string().contains("zstd_level"));
        let c = StoreConfig {
            path_style: Some(true),
            ..StoreConfig::new("gs://b")
        };
        assert_eq!(
            c.validate().unwrap_err(),
            ConfigError::NotApplicable {
                field: "path_style",
                scheme: "gs"
            }
        );
        let c = StoreConfig {
            encryption_key_files: vec!["/nonexistent/key".into()],
            ..StoreConfig::new("file:///x")
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/key")
        );
        let c = StoreConfig {
            require_encryption: Some(true),
            ..StoreConfig::new("file:///x")
        };
        assert!(matches!(c.validate(), Err(ConfigError::Missing { .. })));
        let c = StoreConfig::new("az://c/p");
        if std::env::var_os("AZURE_STORAGE_ACCOUNT_NAME").is_none() {
            assert!(matches!(
                c.validate(),
                Err(ConfigError::Missing {
                    field: "azure_account",
                    ..
                })
            ));
        }
    }
}
