//! Agent configuration: a TOML file, overridden by `PGPILOT_*` environment variables, overridden
//! by flags (clap gives flags precedence over env; the file fills what neither set). Validated
//! once at start with errors that say what to fix. Secrets are only ever paths to files.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::store::StoreConfig;

/// Flags of `pgpilot-agent run`. Every one also reads a `PGPILOT_*` variable and a key of the
/// same name (snake case) in the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML config file. Keys are the flag names in snake case.
    #[arg(long, env = "PGPILOT_CONFIG")]
    pub config: Option<PathBuf>,
    /// PostgreSQL data directory (created and initialised when empty or absent).
    #[arg(long, env = "PGPILOT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory for the agent's own files (lock, socket, generated secrets). Default: the data
    /// dir's parent.
    #[arg(long, env = "PGPILOT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// TCP port Postgres listens on.
    #[arg(long, env = "PGPILOT_POSTGRES_PORT")]
    pub postgres_port: Option<u16>,
    /// Postgres `listen_addresses`.
    #[arg(long, env = "PGPILOT_POSTGRES_LISTEN_ADDRESSES")]
    pub postgres_listen_addresses: Option<String>,
    /// Directory holding initdb and postgres. Default: `pg_config --bindir`, then the directory
    /// of `initdb` on PATH, then the newest /usr/lib/postgresql/*/bin.
    #[arg(long, env = "PGPILOT_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,
    /// OS user that runs Postgres when the agent runs as root (Postgres refuses root).
    #[arg(long, env = "PGPILOT_POSTGRES_USER")]
    pub postgres_user: Option<String>,
    /// External API listener (the pod IP in Kubernetes).
    #[arg(long, env = "PGPILOT_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// Loopback API listener, used by wal-push, wal-fetch and the CLI inside the pod.
    #[arg(long, env = "PGPILOT_API_LOOPBACK_LISTEN")]
    pub api_loopback_listen: Option<SocketAddr>,
    /// File holding the bearer token required by state-changing routes. Default:
    /// `<state_dir>/api-token`, generated when absent.
    #[arg(long, env = "PGPILOT_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// File holding the Postgres superuser's password. Default: `<state_dir>/superuser-password`,
    /// generated when absent.
    #[arg(long, env = "PGPILOT_SUPERUSER_PASSWORD_FILE")]
    pub superuser_password_file: Option<PathBuf>,
    /// File holding the replication role's password. Default:
    /// `<state_dir>/replication-password`, generated when absent.
    #[arg(long, env = "PGPILOT_REPLICATION_PASSWORD_FILE")]
    pub replication_password_file: Option<PathBuf>,
    /// Backup store URL (file:///path, s3://bucket/prefix, gs://…, az://…); overrides
    /// `[backup] store`. Enables WAL archiving and base backups.
    #[arg(long, env = "PGPILOT_BACKUP_STORE")]
    pub backup_store: Option<String>,
    /// Encryption key files of the backup store, comma-separated, each `path` or `id=path`
    /// (the first encrypts); override `[backup] encryption_key_files`.
    #[arg(
        long,
        env = "PGPILOT_BACKUP_ENCRYPTION_KEY_FILES",
        value_delimiter = ','
    )]
    pub backup_encryption_key_files: Vec<String>,
    /// Encryption key files of `[bootstrap.store]`, as `--backup-encryption-key-files`.
    #[arg(
        long,
        env = "PGPILOT_BOOTSTRAP_ENCRYPTION_KEY_FILES",
        value_delimiter = ','
    )]
    pub bootstrap_encryption_key_files: Vec<String>,
    /// Start as a restored copy: restore a base backup and archived WAL from the backup store
    /// into the (empty) data dir, to the target given by the --target-* flags, then promote.
    #[arg(long)]
    pub bootstrap_from_backup: bool,
    /// Agent API URL of the primary to follow (`[replication] primary`). With an empty data
    /// dir the agent clones it; absent, the agent is a primary.
    #[arg(long, env = "PGPILOT_REPLICATION_PRIMARY")]
    pub replication_primary: Option<String>,
    /// This instance's name in its shard (`[replication] name`): its `application_name` and
    /// replication slot. Default: `<host>_<postgres_port>`.
    #[arg(long, env = "PGPILOT_REPLICATION_NAME")]
    pub replication_name: Option<String>,
    /// Kubernetes mode (`[kubernetes] mode`): `auto` (on inside a pod), `on` or `off`.
    #[arg(long, env = "PGPILOT_KUBERNETES_MODE")]
    pub kubernetes_mode: Option<KubernetesMode>,
    /// PEM certificate (chain) of the pod-IP listener: with `--tls-key-file`, that listener
    /// serves HTTPS only (`[tls] cert_file`). Re-read when it changes.
    #[arg(long, env = "PGPILOT_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `--tls-cert-file` (`[tls] key_file`); refused when world-readable.
    #[arg(long, env = "PGPILOT_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates that sign client certificates and peers' certificates
    /// (`[tls] ca_file`): clients may then authenticate by certificate (mTLS).
    #[arg(long, env = "PGPILOT_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    #[command(flatten)]
    pub restore_target: crate::restore::cli::RestoreTargetArgs,
    #[command(flatten)]
    pub restore_options: crate::restore::cli::RestoreOptions,
}

/// The config file. Every key optional; flags and env win.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub postgres_port: Option<u16>,
    pub postgres_listen_addresses: Option<String>,
    pub pg_bin_dir: Option<PathBuf>,
    pub postgres_user: Option<String>,
    pub api_listen: Option<SocketAddr>,
    pub api_loopback_listen: Option<SocketAddr>,
    pub api_token_file: Option<PathBuf>,
    pub superuser_password_file: Option<PathBuf>,
    pub replication_password_file: Option<PathBuf>,
    #[serde(default)]
    pub postgres: PostgresSection,
    /// The backup store (docs/storage.md). Absent: no archiving, no backups.
    pub backup: Option<StoreConfig>,
    #[serde(default)]
    pub cluster: ClusterSection,
    #[serde(default)]
    pub archive: ArchiveSection,
    #[serde(default)]
    pub replication: ReplicationSection,
    #[serde(default)]
    pub kubernetes: KubernetesSection,
    /// A new shard's data restored from another cluster's archive (docs/restore.md).
    pub bootstrap: Option<BootstrapSection>,
    /// HTTPS and client certificates on the pod-IP listener (docs/security.md).
    #[serde(default)]
    pub tls: TlsSection,
}

/// `[tls]`: the pod-IP listener serves HTTPS with `cert_file`/`key_file`; with `ca_file` it
/// asks for client certificates, and one signed by that CA and named in `client_names`
/// authenticates a state-changing request without the bearer token. The loopback listener
/// stays plain HTTP. Files are re-read every 2 s when they change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// The DNS name peers' certificates carry, verified when this agent calls a peer by pod
    /// IP. Default: the first DNS name of this agent's own certificate.
    pub server_name: Option<String>,
    /// Client certificate names (DNS SAN, or CN without SANs) that authenticate. Default:
    /// `server_name` (the shard's peers).
    #[serde(default)]
    pub client_names: Vec<String>,
    /// Whether the bearer token still authenticates on the pod-IP listener. Default true;
    /// false needs `ca_file` (certificates only).
    pub accept_token: Option<bool>,
    /// Whether Postgres serves TLS with the same certificate, and takes TCP connections over
    /// TLS only (`hostssl` in pg_hba.conf). Default true.
    pub postgres: Option<bool>,
}

/// `[tls]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub client_names: Vec<String>,
    pub accept_token: bool,
    /// Postgres serves TLS with this certificate, TCP connections over TLS only.
    pub postgres: bool,
}

impl Tls {
    /// The name peers' certificates carry: `server_name`, else the first name of this agent's
    /// own certificate (the shard's agents share one).
    pub fn peer_name(&self) -> Result<String, String> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let what = self.cert_file.display().to_string();
        let pem = std::fs::read(&self.cert_file).map_err(|e| format!("{what}: {e}"))?;
        self.name_in(&pem)
    }

    /// `server_name`, else the first DNS name of the certificate `pem` (of `cert_file`).
    fn name_in(&self, pem: &[u8]) -> Result<String, String> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let what = self.cert_file.display().to_string();
        let chain = pgpilot_common::tls::certs(pem, &what)?;
        let info = pgpilot_common::tls::cert_info(&chain[0]).map_err(|e| format!("{what}: {e}"))?;
        info.names
            .into_iter()
            .next()
            .ok_or_else(|| format!("{what} has no DNS name: set [tls] server_name"))
    }

    /// The names of client certificates that authenticate: `client_names`, else the peers'.
    pub fn accepted_client_names(&self) -> Vec<String> {
        if !self.client_names.is_empty() {
            return self.client_names.clone();
        }
        self.peer_name().into_iter().collect()
    }

    /// The TLS of calls to peers: their certificate verified against `ca_file` and
    /// [`Tls::peer_name`], this agent's certificate presented as its client certificate. Read
    /// from the files at each call, so a rotation is picked up.
    pub fn peer_client(&self) -> Result<rustls::ClientConfig, String> {
        let Some(ca_file) = &self.ca_file else {
            return Err(
                "calling a peer over HTTPS needs [tls] ca_file, the CA that signs the peers' certificates"
                    .into(),
            );
        };
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let ca = read(ca_file)?;
        let cert = read(&self.cert_file)?;
        let key = read(&self.key_file)?;
        // The name from the certificate just read: the file is read once per call.
        pgpilot_common::tls::client_config(&ca, &self.name_in(&cert)?, Some((&cert, &key)))
    }
}

/// `[bootstrap]`: the first instance of a new shard (an empty data dir that leads its shard:
/// standalone always, in Kubernetes the pod that creates the Lease) restores a base backup and
/// WAL of another cluster, to `target_time` or the end of its archive, then promotes and
/// archives into its own `[backup]` store. Replicas clone it as usual.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapSection {
    /// The source cluster's name in the store (`<cluster>/<shard>/…`).
    pub cluster: String,
    /// The source shard; default: this instance's shard.
    pub shard: Option<String>,
    /// Recovery target time (RFC 3339); default: the end of the archived WAL.
    pub target_time: Option<String>,
    /// The source's store; default: `[backup]` (the same store, another cluster's prefix).
    pub store: Option<StoreConfig>,
}

/// Whether the agent runs in Kubernetes mode (docs/kubernetes.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KubernetesMode {
    /// On when the in-cluster environment is there (`KUBERNETES_SERVICE_HOST` and the pod's
    /// name), off otherwise.
    #[default]
    Auto,
    On,
    Off,
}

/// `[kubernetes]`: leadership through a Lease (docs/kubernetes.md). Defaults follow
/// client-go's leader election (15/10/2 s) scaled down so that an unplanned failover stays
/// under 10 s; Patroni's are ttl 30 s, loop_wait 10 s.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSection {
    pub mode: KubernetesMode,
    /// Default: `$POD_NAMESPACE`, then the service account's namespace file.
    pub namespace: Option<String>,
    /// Default: `$POD_NAME`, then `$HOSTNAME`.
    pub pod_name: Option<String>,
    /// How long a Lease stays valid after its last renewal, as its observers count it.
    pub lease_duration_secs: u64,
    /// How often the primary renews the Lease (and every agent looks at it).
    pub renew_interval_secs: u64,
    /// A primary that has not renewed for this long fences itself: it stops taking writes,
    /// well before observers may consider the Lease expired.
    pub renew_deadline_secs: u64,
    /// A replica further behind the primary's last published WAL position than this never
    /// takes over (Patroni's `maximum_lag_on_failover`); `None` accepts any loss.
    pub maximum_lag_on_failover: Option<u64>,
    /// Synchronous replication managed by the agent (as Patroni's `synchronous_mode`): a commit
    /// is acknowledged only once a streaming replica has it, and only those replicas may take
    /// over. Without any streaming replica the primary falls back to asynchronous commits.
    pub synchronous: bool,
    /// How often the primary's agent reads `pg_database` and syncs it with the cluster
    /// resource's `spec.databases` (docs/databases.md); 0 turns catalog sync off.
    pub catalog_interval_secs: u64,
}

impl Default for KubernetesSection {
    fn default() -> Self {
        KubernetesSection {
            mode: KubernetesMode::Auto,
            namespace: None,
            pod_name: None,
            lease_duration_secs: 8,
            renew_interval_secs: 1,
            renew_deadline_secs: 5,
            maximum_lag_on_failover: Some(1024 * 1024),
            synchronous: false,
            catalog_interval_secs: 5,
        }
    }
}

/// The validated Kubernetes settings, when the agent runs in Kubernetes mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubernetes {
    pub namespace: String,
    pub pod_name: String,
    pub lease_duration: std::time::Duration,
    pub renew_interval: std::time::Duration,
    pub renew_deadline: std::time::Duration,
    pub maximum_lag_on_failover: Option<u64>,
    pub synchronous: bool,
    /// `None`: catalog sync is off.
    pub catalog_interval: Option<std::time::Duration>,
}

/// Resolves `[kubernetes]` against the environment: `None` when not in Kubernetes mode.
pub fn kubernetes_settings(
    mode: KubernetesMode,
    file: KubernetesSection,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Kubernetes>, ConfigError> {
    let pod_name = file
        .pod_name
        .or_else(|| env("POD_NAME"))
        .or_else(|| env("HOSTNAME"))
        .filter(|s| !s.is_empty());
    let namespace = file
        .namespace
        .or_else(|| env("POD_NAMESPACE"))
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty());
    let in_cluster = env("KUBERNETES_SERVICE_HOST").is_some_and(|s| !s.is_empty());
    let on = match mode {
        KubernetesMode::Off => return Ok(None),
        KubernetesMode::On => true,
        KubernetesMode::Auto => in_cluster && pod_name.is_some() && namespace.is_some(),
    };
    if !on {
        return Ok(None);
    }
    let invalid = |key, message: &str| ConfigError::Invalid {
        key,
        message: message.into(),
    };
    let pod_name = pod_name.ok_or_else(|| {
        invalid(
            "kubernetes.pod_name",
            "unknown: set POD_NAME from the downward API (fieldRef metadata.name) or the key",
        )
    })?;
    let namespace = namespace.ok_or_else(|| {
        invalid(
            "kubernetes.namespace",
            "unknown: set POD_NAMESPACE from the downward API (fieldRef metadata.namespace) or the key",
        )
    })?;
    let secs = std::time::Duration::from_secs;
    if file.renew_interval_secs == 0 {
        return Err(invalid(
            "kubernetes.renew_interval_secs",
            "must be at least 1",
        ));
    }
    if !(file.renew_interval_secs < file.renew_deadline_secs
        && file.renew_deadline_secs < file.lease_duration_secs)
    {
        return Err(invalid(
            "kubernetes",
            &format!(
                "renew_interval_secs ({}) < renew_deadline_secs ({}) < lease_duration_secs ({}) must hold, \
                 so a primary fences itself before its Lease can expire",
                file.renew_interval_secs, file.renew_deadline_secs, file.lease_duration_secs
            ),
        ));
    }
    Ok(Some(Kubernetes {
        namespace,
        pod_name,
        lease_duration: secs(file.lease_duration_secs),
        renew_interval: secs(file.renew_interval_secs),
        renew_deadline: secs(file.renew_deadline_secs),
        maximum_lag_on_failover: file.maximum_lag_on_failover,
        synchronous: file.synchronous,
        catalog_interval: (file.catalog_interval_secs > 0)
            .then(|| secs(file.catalog_interval_secs)),
    }))
}

/// Where a replica's first copy comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneFrom {
    /// Streamed from the primary over the replication protocol (`pg_basebackup`).
    #[default]
    Primary,
    /// The store's newest base backup plus archived WAL, then streaming: no load on the
    /// primary.
    Backup,
}

/// `[replication]`: this instance's place in its shard (docs/replication.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSection {
    /// Instance name: `application_name` and slot name on the primary.
    pub name: Option<String>,
    /// Agent API URL of the primary to follow; absent on the primary.
    pub primary: Option<String>,
    pub clone_from: CloneFrom,
    /// This agent's API URL as its peers reach it. Default: `http://<api_listen>`.
    pub advertise_url: Option<String>,
    /// Host of this instance's Postgres as its peers reach it. Default: the host of
    /// `advertise_url`.
    pub advertise_host: Option<String>,
    /// An inactive slot of a replica is dropped after this many seconds, so a dead replica
    /// cannot fill the primary's disk.
    pub slot_grace_secs: u64,
    /// A replica is ready (`/readyz`) only while streaming with at most this lag, in bytes.
    pub max_lag_bytes: u64,
    /// How long a drain waits for a replica to take over and for the archive before it fails
    /// (or, with `force`, stops the only writer), in seconds.
    pub drain_timeout_secs: u64,
}

impl Default for ReplicationSection {
    fn default() -> Self {
        ReplicationSection {
            name: None,
            primary: None,
            clone_from: CloneFrom::Primary,
            advertise_url: None,
            advertise_host: None,
            slot_grace_secs: 1800,
            max_lag_bytes: 16 * 1024 * 1024,
            drain_timeout_secs: 300,
        }
    }
}

/// The validated `[replication]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub name: String,
    /// The primary named in the configuration (the agent's own record of whom it follows,
    /// kept in the state dir after a switchover, takes precedence).
    pub primary: Option<String>,
    pub clone_from: CloneFrom,
    pub advertise_url: String,
    pub advertise_host: String,
    pub slot_grace: std::time::Duration,
    pub max_lag_bytes: u64,
    pub drain_timeout: std::time::Duration,
}

/// `[cluster]`: names used in the object-store layout.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    pub name: String,
    pub shard: String,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            name: "local".into(),
            shard: "0".into(),
        }
    }
}

/// `[archive]`: how WAL is pushed and fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveSection {
    /// Segments uploaded at once: the one Postgres waits for plus the ready ones found ahead of it.
    /// Default: the store's `upload_concurrency`.
    pub push_concurrency: Option<usize>,
    /// Segments wal-fetch downloads ahead of the one Postgres asks for during recovery.
    pub prefetch: usize,
    /// How a pushed object is checked before wal-push reports success: `size` (the store reports
    /// the object with the exact size written; cheap) or `full` (read back, decrypt, decompress
    /// and compare the SHA-256; doubles the cost of a push).
    pub verify: VerifyMode,
    /// `archive_timeout` for Postgres, in seconds (0 = never force a segment switch).
    pub archive_timeout_secs: u64,
    /// The longest one `wal-push` or `wal-fetch` process runs, in seconds: past it, it gives up
    /// and exits 1 (Postgres keeps the WAL file and calls again), so a hung store never holds
    /// Postgres' archiver or recovery, or a shutdown waiting for them.
    pub command_timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    Size,
    Full,
}

impl Default for ArchiveSection {
    fn default() -> Self {
        ArchiveSection {
            push_concurrency: None,
            prefetch: 8,
            verify: VerifyMode::Size,
            archive_timeout_secs: 60,
            command_timeout_secs: 60,
        }
    }
}

/// `[postgres]` in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// Superuser name given to initdb.
    pub superuser: Option<String>,
    /// Replication role created at bootstrap.
    pub replication_user: Option<String>,
    /// Client networks allowed in pg_hba.conf besides loopback (CIDR).
    #[serde(default)]
    pub allow_networks: Vec<String>,
    /// User parameters rendered into pgpilot.conf; re-read on `POST /v1/reload`.
    #[serde(default)]
    pub parameters: BTreeMap<String, toml::Value>,
}

/// Where a secret comes from: a file the user named (must be readable) or a default path the
/// agent may create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFile {
    pub path: PathBuf,
    pub generate_if_missing: bool,
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub config_file: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub state_dir: PathBuf,
    pub postgres_port: u16,
    pub postgres_listen_addresses: String,
    pub pg_bin_dir: Option<PathBuf>,
    pub postgres_user: String,
    pub api_listen: SocketAddr,
    pub api_loopback_listen: SocketAddr,
    pub api_token: SecretFile,
    pub superuser_password: SecretFile,
    pub replication_password: SecretFile,
    pub superuser: String,
    pub replication_user: String,
    pub allow_networks: Vec<String>,
    pub parameters: BTreeMap<String, String>,
    pub backup: Option<StoreConfig>,
    pub cluster: ClusterSection,
    pub archive: ArchiveSection,
    pub replication: Replication,
    /// Kubernetes mode: leadership by Lease (`None`: standalone).
    pub kubernetes: Option<Kubernetes>,
    /// `[bootstrap]`, checked: the source store is set (its own or `[backup]`'s).
    pub bootstrap: Option<BootstrapSection>,
    /// HTTPS on the pod-IP listener (`None`: plain HTTP).
    pub tls: Option<Tls>,
    /// The binaries archive_command and restore_command run, set at start when a store is
    /// configured: this binary and the `pgpilot-wal` next to it, or copies the Postgres user
    /// can execute ([`crate::install`]). `None`: this binary.
    pub archive_exes: Option<ArchiveExes>,
}

/// The binaries archive_command and restore_command run as the Postgres user (found or
/// installed by [`crate::install::exes_for_postgres`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveExes {
    pub agent: PathBuf,
    /// `pgpilot-wal`, when it sits next to the agent binary; else the commands run the agent
    /// binary itself (same behaviour, ~1.5 ms more per WAL file).
    pub front: Option<PathBuf>,
}

/// A configuration error, saying what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {cause}")]
    ReadFile {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

pub const DEFAULT_DATA_DIR: &str = "./data/pg";
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:8008";
pub const DEFAULT_API_LOOPBACK_LISTEN: &str = "127.0.0.1:8009";

impl Config {
    /// Merges flags/env over the config file over defaults, and checks what can be checked
    /// without touching the system (that is `crate::preflight`'s job).
    pub fn load(args: &RunArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    fn merge(args: &RunArgs, file: FileConfig) -> Result<Config, ConfigError> {
        let base_dir = args
            .config
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        // Paths from the file are relative to the file; paths from flags to the cwd.
        let from_file = |p: Option<PathBuf>| p.map(|p| absolutize(&base_dir.join(p)));
        let from_flag = |p: &Option<PathBuf>| p.as_ref().map(|p| absolutize(p));

        let data_dir = from_flag(&args.data_dir)
            .or_else(|| from_file(file.data_dir))
            .unwrap_or_else(|| absolutize(Path::new(DEFAULT_DATA_DIR)));
        let state_dir = from_flag(&args.state_dir)
            .or_else(|| from_file(file.state_dir))
            .unwrap_or_else(|| {
                data_dir
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("/"))
            });
        let secret =
            |flag: &Option<PathBuf>, file_val: Option<PathBuf>, name: &str| match from_flag(flag)
                .or_else(|| from_file(file_val))
            {
                Some(path) => SecretFile {
                    path,
                    generate_if_missing: false,
                },
                None => SecretFile {
                    path: state_dir.join(name),
                    generate_if_missing: true,
                },
            };
        let api_token = secret(&args.api_token_file, file.api_token_file, "api-token");
        let superuser_password = secret(
            &args.superuser_password_file,
            file.superuser_password_file,
            "superuser-password",
        );
        let replication_password = secret(
            &args.replication_password_file,
            file.replication_password_file,
            "replication-password",
        );

        let postgres_port = args.postgres_port.or(file.postgres_port).unwrap_or(5432);
        if postgres_port == 0 {
            return Err(ConfigError::Invalid {
                key: "postgres_port",
                message: "must be a port number between 1 and 65535".into(),
            });
        }
        let api_listen = args
            .api_listen
            .or(file.api_listen)
            .unwrap_or_else(|| DEFAULT_API_LISTEN.parse().expect("static address"));
        let api_loopback_listen = args
            .api_loopback_listen
            .or(file.api_loopback_listen)
            .unwrap_or_else(|| DEFAULT_API_LOOPBACK_LISTEN.parse().expect("static address"));
        if !api_loopback_listen.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                key: "api_loopback_listen",
                message: format!("{api_loopback_listen} is not a loopback address"),
            });
        }
        if api_listen == api_loopback_listen {
            return Err(ConfigError::Invalid {
                key: "api_listen",
                message: format!(
                    "{api_listen} is also the loopback listener's address; give them different ports"
                ),
            });
        }

        let superuser = file.postgres.superuser.unwrap_or_else(|| "postgres".into());
        let replication_user = file
            .postgres
            .replication_user
            .unwrap_or_else(|| "replicator".into());
        for (key, name) in [
            ("postgres.superuser", &superuser),
            ("postgres.replication_user", &replication_user),
        ] {
            if !is_identifier(name) {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!(
                        "{name:?} must be a lower-case SQL identifier ([a-z_][a-z0-9_]*)"
                    ),
                });
            }
        }
        for net in &file.postgres.allow_networks {
            validate_cidr(net)?;
        }
        let mut parameters = BTreeMap::new();
        for (name, value) in file.postgres.parameters {
            parameters.insert(name.clone(), parameter_value(&name, &value)?);
        }
        validate_user_parameters(&parameters)?;

        let mut backup = file.backup;
        if let Some(url) = &args.backup_store {
            backup.get_or_insert_with(StoreConfig::default).store = url.clone();
        }
        if let Some(b) = &mut backup
            && !args.backup_encryption_key_files.is_empty()
        {
            b.encryption_key_files = args.backup_encryption_key_files.clone();
        }
        if let Some(b) = &mut backup {
            // A relative file:// store in the config file is relative to the file.
            if let Some(rel) = b
                .store
                .strip_prefix("file://")
                .filter(|p| !p.starts_with('/'))
            {
                let base = if args.backup_store.is_some() {
                    PathBuf::new()
                } else {
                    base_dir.clone()
                };
                b.store = format!("file://{}", absolutize(&base.join(rel)).display());
            }
            b.validate().map_err(|e| ConfigError::Invalid {
                key: "backup",
                message: e.to_string(),
            })?;
        }
        pgpilot_common::layout::Layout::new(&file.cluster.name, &file.cluster.shard).map_err(
            |message| ConfigError::Invalid {
                key: "cluster",
                message,
            },
        )?;
        let bootstrap = match file.bootstrap {
            Some(mut b) => {
                let invalid =
                    |key: &'static str, message: String| ConfigError::Invalid { key, message };
                let shard = b
                    .shard
                    .clone()
                    .unwrap_or_else(|| file.cluster.shard.clone());
                pgpilot_common::layout::Layout::new(&b.cluster, &shard)
                    .map_err(|m| invalid("bootstrap.cluster", m))?;
                if let Some(t) = &b.target_time {
                    crate::time::parse_target_time(t)
                        .map_err(|e| invalid("bootstrap.target_time", e))?;
                }
                let Some(own) = &backup else {
                    return Err(invalid(
                        "bootstrap",
                        "needs [backup]: the restored cluster archives there, and recovery fetches the source's WAL through it".into(),
                    ));
                };
                let mut store = b.store.take().unwrap_or_else(|| own.clone());
                if !args.bootstrap_encryption_key_files.is_empty() {
                    store.encryption_key_files = args.bootstrap_encryption_key_files.clone();
                }
                store
                    .validate()
                    .map_err(|e| invalid("bootstrap.store", e.to_string()))?;
                b.store = Some(store);
                Some(b)
            }
            None => None,
        };
        if file
            .archive
            .push_concurrency
            .is_some_and(|n| !(1..=64).contains(&n))
        {
            return Err(ConfigError::Invalid {
                key: "archive.push_concurrency",
                message: "expected 1..=64".into(),
            });
        }
        if file.archive.prefetch > 64 {
            return Err(ConfigError::Invalid {
                key: "archive.prefetch",
                message: "expected 0..=64".into(),
            });
        }

        let tls = tls_settings(TlsSection {
            cert_file: from_flag(&args.tls_cert_file).or_else(|| from_file(file.tls.cert_file)),
            key_file: from_flag(&args.tls_key_file).or_else(|| from_file(file.tls.key_file)),
            ca_file: from_flag(&args.tls_ca_file).or_else(|| from_file(file.tls.ca_file)),
            ..file.tls
        })?;
        let name_given = args.replication_name.is_some() || file.replication.name.is_some();
        let mut replication = replication_settings(
            args,
            file.replication,
            api_listen,
            postgres_port,
            tls.is_some(),
        )?;

        let kubernetes = kubernetes_settings(
            args.kubernetes_mode.unwrap_or(file.kubernetes.mode),
            file.kubernetes,
            |k| std::env::var(k).ok(),
        )?;
        // In Kubernetes mode an instance is its pod: the Lease holder, the failover candidates
        // and the synchronous standby are all named by pod name.
        if let Some(k) = &kubernetes
            && !name_given
            && is_instance_name(&k.pod_name)
        {
            replication.name = k.pod_name.clone();
        }

        Ok(Config {
            kubernetes,
            bootstrap,
            replication,
            backup,
            cluster: file.cluster,
            archive: file.archive,
            config_file: args.config.as_ref().map(|p| absolutize(p)),
            data_dir,
            state_dir,
            postgres_port,
            postgres_listen_addresses: args
                .postgres_listen_addresses
                .clone()
                .or(file.postgres_listen_addresses)
                .unwrap_or_else(|| "127.0.0.1".into()),
            pg_bin_dir: from_flag(&args.pg_bin_dir).or_else(|| from_file(file.pg_bin_dir)),
            postgres_user: args
                .postgres_user
                .clone()
                .or(file.postgres_user)
                .unwrap_or_else(|| "postgres".into()),
            api_listen,
            api_loopback_listen,
            api_token,
            superuser_password,
            replication_password,
            superuser,
            replication_user,
            allow_networks: file.postgres.allow_networks,
            parameters,
            tls,
            archive_exes: None,
        })
    }

    /// The scheme of this agent's pod-IP API, and so of its peers' in one shard.
    pub fn api_scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Re-reads only the user parameters from the config file (for `POST /v1/reload`).
    pub fn reread_parameters(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        let Some(path) = &self.config_file else {
            return Ok(self.parameters.clone());
        };
        let file = read_file_config(path)?;
        let mut parameters = BTreeMap::new();
        for (name, value) in file.postgres.parameters {
            parameters.insert(name.clone(), parameter_value(&name, &value)?);
        }
        validate_user_parameters(&parameters)?;
        Ok(parameters)
    }

    /// Unix socket directory of Postgres (kept out of the data dir so a restore can replace
    /// the data dir wholesale).
    pub fn socket_dir(&self) -> PathBuf {
        crate::files::socket_dir(&self.state_dir)
    }

    /// Lock file that keeps a second agent off this data dir.
    pub fn lock_file(&self) -> PathBuf {
        crate::files::lock_file(&self.state_dir, &self.data_dir)
    }
}

fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::ReadFile {
        path: path.to_path_buf(),
        cause,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn absolutize(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() < 64
}

/// An instance name (`[replication] name`, a replica's registration): 1-50 characters of
/// a-z, 0-9, `_` and `-`, so that `pgpilot_<name>` is a valid slot name.
pub fn is_instance_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 50
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn tls_settings(t: TlsSection) -> Result<Option<Tls>, ConfigError> {
    let invalid = |key: &'static str, message: &str| ConfigError::Invalid {
        key,
        message: message.into(),
    };
    let (cert_file, key_file) = match (t.cert_file, t.key_file) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => {
            if t.ca_file.is_some()
                || t.server_name.is_some()
                || !t.client_names.is_empty()
                || t.accept_token.is_some()
                || t.postgres.is_some()
            {
                return Err(invalid(
                    "tls",
                    "ca_file, server_name, client_names, accept_token and postgres need cert_file and key_file",
                ));
            }
            return Ok(None);
        }
        (Some(_), None) => {
            return Err(invalid(
                "tls.key_file",
                "cert_file is set: set key_file too",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "tls.cert_file",
                "key_file is set: set cert_file too",
            ));
        }
    };
    if t.ca_file.is_none() && (!t.client_names.is_empty() || t.accept_token == Some(false)) {
        return Err(invalid(
            "tls.ca_file",
            "client_names and accept_token = false check client certificates: set ca_file, the CA that signs them",
        ));
    }
    for name in t.server_name.iter().chain(&t.client_names) {
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid {
                key: "tls",
                message: format!("{name:?} is not a certificate name"),
            });
        }
    }
    Ok(Some(Tls {
        cert_file,
        key_file,
        ca_file: t.ca_file,
        server_name: t.server_name,
        client_names: t.client_names,
        accept_token: t.accept_token.unwrap_or(true),
        postgres: t.postgres.unwrap_or(true),
    }))
}

fn validate_cidr(net: &str) -> Result<(), ConfigError> {
    let invalid = || ConfigError::Invalid {
        key: "postgres.allow_networks",
        message: format!("{net:?} is not a CIDR such as 10.0.0.0/8 or fd00::/8"),
    };
    let (addr, bits) = net.split_once('/').ok_or_else(invalid)?;
    let addr: std::net::IpAddr = addr.parse().map_err(|_| invalid())?;
    let bits: u8 = bits.parse().map_err(|_| invalid())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if bits > max {
        return Err(invalid());
    }
    Ok(())
}

/// A TOML parameter value as Postgres expects it: strings as is, numbers and booleans printed.
fn parameter_value(name: &str, value: &toml::Value) -> Result<String, ConfigError> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(if *b { "on".into() } else { "off".into() }),
        other => Err(ConfigError::Invalid {
            key: "postgres.parameters",
            message: format!(
                "{name}: {} is not a string, number or boolean",
                other.type_str()
            ),
        }),
    }
}

/// Parameters the agent sets itself; a user value would break what the agent relies on.
const RESERVED: &[&str] = &[
    "port",
    "listen_addresses",
    "unix_socket_directories",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "external_pid_file",
    "logging_collector",
    "log_destination",
    "archive_mode",
    "archive_command",
    "archive_library",
    "restore_command",
    "primary_conninfo",
    "primary_slot_name",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
];

fn replication_settings(
    args: &RunArgs,
    file: ReplicationSection,
    api_listen: SocketAddr,
    postgres_port: u16,
    tls: bool,
) -> Result<Replication, ConfigError> {
    let name = match args.replication_name.clone().or(file.name) {
        Some(n) => n,
        None => {
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "node".into());
            let mut n: String = host
                .to_ascii_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            n.push_str(&format!("_{postgres_port}"));
            n
        }
    };
    if !is_instance_name(&name) {
        return Err(ConfigError::Invalid {
            key: "replication.name",
            message: format!(
                "{name:?} must be 1-50 characters of a-z, 0-9, '_' and '-' (it names the replication slot)"
            ),
        });
    }
    let check_url = |key: &'static str, url: &str| -> Result<String, ConfigError> {
        pgpilot_common::client::check_agent_url(url)
            .map_err(|message| ConfigError::Invalid { key, message })
    };
    let primary = match args.replication_primary.clone().or(file.primary) {
        Some(u) => Some(check_url("replication.primary", &u)?),
        None => None,
    };
    let advertise_url = match file.advertise_url {
        Some(u) => check_url("replication.advertise_url", &u)?,
        None => {
            if api_listen.ip().is_unspecified() {
                return Err(ConfigError::Invalid {
                    key: "replication.advertise_url",
                    message: format!(
                        "api_listen {api_listen} listens on every address: say which URL peers reach this agent at"
                    ),
                });
            }
            format!("{}://{api_listen}", if tls { "https" } else { "http" })
        }
    };
    let advertise_host = match file.advertise_host {
        Some(h) => h,
        None => {
            pgpilot_common::client::url_host(&advertise_url).unwrap_or_else(|| "127.0.0.1".into())
        }
    };
    let max_drain = pgpilot_common::api::MAX_DRAIN_TIMEOUT_SECS;
    if !(1..=max_drain).contains(&file.drain_timeout_secs) {
        return Err(ConfigError::Invalid {
            key: "replication.drain_timeout_secs",
            message: format!(
                "{} must be 1 to {max_drain} seconds",
                file.drain_timeout_secs
            ),
        });
    }
    if primary.as_deref() == Some(advertise_url.as_str()) {
        return Err(ConfigError::Invalid {
            key: "replication.primary",
            message: format!(
                "{advertise_url} is this agent's own URL: a primary does not follow itself"
            ),
        });
    }
    Ok(Replication {
        name,
        primary,
        clone_from: file.clone_from,
        advertise_url,
        advertise_host,
        slot_grace: std::time::Duration::from_secs(file.slot_grace_secs),
        max_lag_bytes: file.max_lag_bytes,
        drain_timeout: std::time::Duration::from_secs(file.drain_timeout_secs),
    })
}

/// Rejects parameter names Postgres would not accept and parameters the agent owns.
fn validate_user_parameters(params: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (name, value) in params {
        if !pgpilot_common::crd::is_parameter_name(name) {
            return Err(ConfigError::Invalid {
                key: "postgres.parameters",
                message: format!(
                    "{name:?} is not a valid parameter name (lower case, digits, _ and .)"
                ),
            });
        }
        if RESERVED.contains(&name.as_str()) {
            return Err(ConfigError::Invalid {
                key: "postgres.parameters",
                message: format!(
                    "{name} is managed by pgpilot-agent; set it through the agent's own options"
                ),
            });
        }
        if value.contains('\n') || value.contains('\0') {
            return Err(ConfigError::Invalid {
                key: "postgres.parameters",
                message: format!("{name}: value contains a line break or NUL"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> FileConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn kubernetes_mode_follows_the_pod_environment_and_names_what_is_missing() {
        fn env<'a>(
            vars: &'a [(&'static str, &'static str)],
        ) -> impl Fn(&str) -> Option<String> + 'a {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        }
        let pod = [
            ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
            ("POD_NAME", "db-0"),
            ("POD_NAMESPACE", "prod"),
        ];
        let section = KubernetesSection::default;
        // auto: on inside a pod, off elsewhere (a laptop has HOSTNAME but no API server).
        let k = kubernetes_settings(KubernetesMode::Auto, section(), env(&pod))
            .unwrap()
            .expect("on in a pod");
        assert_eq!(
            (k.pod_name.as_str(), k.namespace.as_str()),
            ("db-0", "prod")
        );
        assert_eq!(k.lease_duration, std::time::Duration::from_secs(8));
        assert!(!k.synchronous);
        let laptop = [("HOSTNAME", "laptop")];
        assert!(
            kubernetes_settings(KubernetesMode::Auto, section(), env(&laptop))
                .unwrap()
                .is_none()
        );
        assert!(
            kubernetes_settings(KubernetesMode::Off, section(), env(&pod))
                .unwrap()
                .is_none()
        );
        // on, without a namespace: the error says where it comes from (unless the service
        // account's namespace file exists, as inside a real pod).
        if !Path::new("/var/run/secrets/kubernetes.io/serviceaccount/namespace").exists() {
            let e = kubernetes_settings(KubernetesMode::On, section(), env(&laptop))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("kubernetes.namespace") && e.contains("POD_NAMESPACE"),
                "{e}"
            );
        }
        // A fence that could come after the expiry is refused, naming the three keys.
        let s = file("[kubernetes]\nrenew_deadline_secs = 9\nlease_duration_secs = 8\n").kubernetes;
        let e = kubernetes_settings(KubernetesMode::On, s, env(&pod))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("renew_deadline_secs (9)") && e.contains("lease_duration_secs (8)"),
            "{e}"
        );
        let s = file("[kubernetes]\nrenew_interval_secs = 0\n").kubernetes;
        let e = kubernetes_settings(KubernetesMode::On, s, env(&pod))
            .unwrap_err()
            .to_string();
        assert!(e.contains("renew_interval_secs"), "{e}");
        // Unknown keys are refused by name.
        let e = toml::from_str::<FileConfig>("[kubernetes]\nlease_secs = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lease_secs"), "{e}");
    }

    #[test]
    fn tls_settings_come_whole_or_are_refused_naming_what_is_missing() {
        let msg = |toml: &str| match Config::merge(&RunArgs::default(), file(toml)) {
            Err(ConfigError::Invalid { key, message }) => format!("{key}: {message}"),
            other => panic!("expected an invalid setting, got {other:?}"),
        };
        assert!(msg("[tls]\ncert_file = \"/c\"").starts_with("tls.key_file: cert_file is set"));
        assert!(msg("[tls]\nca_file = \"/ca\"").starts_with("tls: ca_file, server_name"));
        assert!(
            msg("[tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\naccept_token = false")
                .starts_with("tls.ca_file: client_names and accept_token = false")
        );
        let cfg = Config::merge(&RunArgs::default(), FileConfig::default()).unwrap();
        assert_eq!((cfg.tls.is_none(), cfg.api_scheme()), (true, "http"));
        // Flags give the files; the file the names. Peers are then reached over HTTPS.
        let args = RunArgs {
            tls_cert_file: Some("/t/tls.crt".into()),
            tls_key_file: Some("/t/tls.key".into()),
            tls_ca_file: Some("/t/ca.crt".into()),
            ..RunArgs::default()
        };
        let cfg = Config::merge(&args, file("[tls]\nclient_names = [\"op\"]")).unwrap();
        let tls = cfg.tls.clone().unwrap();
        assert_eq!(tls.key_file, PathBuf::from("/t/tls.key"));
        assert_eq!(tls.client_names, ["op"]);
        assert!(tls.accept_token);
        assert_eq!(cfg.api_scheme(), "https");
        assert!(cfg.replication.advertise_url.starts_with("https://"));
    }

    #[test]
    fn flags_win_over_file_and_defaults_apply() {
        let args = RunArgs {
            postgres_port: Some(6000),
            ..Default::default()
        };
        let cfg =
            Config::merge(&args, file("postgres_port = 5000\ndata_dir = \"/srv/pg\"")).unwrap();
        assert_eq!(cfg.postgres_port, 6000);
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/pg"));
        assert_eq!(cfg.state_dir, PathBuf::from("/srv"));
        assert_eq!(cfg.api_token.path, PathBuf::from("/srv/api-token"));
        assert!(cfg.api_token.generate_if_missing);
        assert_eq!(cfg.api_listen.to_string(), DEFAULT_API_LISTEN);
    }

    #[test]
    fn named_secret_files_must_exist() {
        let args = RunArgs {
            api_token_file: Some("/etc/token".into()),
            ..Default::default()
        };
        let cfg = Config::merge(&args, FileConfig::default()).unwrap();
        assert_eq!(
            cfg.api_token,
            SecretFile {
                path: "/etc/token".into(),
                generate_if_missing: false
            }
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = toml::from_str::<FileConfig>("postgres_prot = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres_prot"), "{err}");
        let err = Config::merge(
            &RunArgs::default(),
            file("[postgres]\nallow_networks = [\"10.0.0.0/33\"]"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("allow_networks") && err.contains("10.0.0.0/33"),
            "{err}"
        );
        let args = RunArgs {
            api_loopback_listen: Some("10.1.1.1:80".parse().unwrap()),
            ..Default::default()
        };
        let err = Config::merge(&args, FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a loopback"), "{err}");
    }

    #[test]
    fn parameters_are_rendered_as_postgres_values() {
        let cfg = Config::merge(
            &RunArgs::default(),
            file("[postgres.parameters]\nwork_mem = \"8MB\"\nmax_connections = 50\njit = false"),
        )
        .unwrap();
        assert_eq!(cfg.parameters["work_mem"], "8MB");
        assert_eq!(cfg.parameters["max_connections"], "50");
        assert_eq!(cfg.parameters["jit"], "off");
    }
}
