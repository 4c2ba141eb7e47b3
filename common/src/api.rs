//! Request and response bodies of the agent's HTTP API (`/v1/...`). The server (agent) and its
//! callers (CLI, operator) share these types, so a field cannot drift between them.

use serde::{Deserialize, Serialize};

use crate::state::{AgentState, Role};

/// The one error body every route returns on failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable kind: `bad_request`, `unauthorized`, `not_found`,
    /// `method_not_allowed`, `conflict`, `internal`, `unavailable`.
    pub error: String,
    /// What went wrong, for a human.
    pub message: String,
    /// The agent's state when the request was refused because of it (409).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AgentState>,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusResponse {
    pub state: AgentState,
    pub role: Option<Role>,
    /// Timeline of the WAL currently written (primary) or replayed (replica).
    pub timeline: Option<u32>,
    /// Primary: insert position (`pg_current_wal_insert_lsn`); replica: last received.
    pub current_lsn: Option<String>,
    /// Primary: flushed position (`pg_current_wal_flush_lsn`); replica: last replayed.
    pub flushed_lsn: Option<String>,
    /// `server_version` as Postgres reports it, e.g. "17.6".
    pub postgres_version: Option<String>,
    /// Major version of the binaries the agent runs.
    pub postgres_major: u32,
    pub data_dir: String,
    pub postgres_port: u16,
    /// Seconds since the agent started.
    pub agent_uptime_seconds: u64,
    /// Seconds since Postgres last started accepting connections, if it runs.
    pub postgres_uptime_seconds: Option<u64>,
    pub postmaster_pid: Option<u32>,
    /// Restarts after a crash since the agent started (not counting requested restarts).
    pub crash_restarts: u64,
    /// Restarts requested through the API.
    pub requested_restarts: u64,
    /// Why the last start or run ended badly, if it did.
    pub last_failure: Option<String>,
    /// WAL archiving health; absent when no backup store is configured.
    #[serde(default)]
    pub archive: Option<ArchiveStatus>,
}

/// How to shut Postgres down (`pg_ctl -m`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownMode {
    /// Wait for sessions to end (SIGTERM).
    Smart,
    /// Disconnect sessions, checkpoint, stop (SIGINT). The default.
    #[default]
    Fast,
    /// Stop at once; crash recovery on the next start (SIGQUIT).
    Immediate,
}

/// Body of `POST /v1/restart` and `POST /v1/stop` (all fields optional; an empty body is fine).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    #[serde(default)]
    pub mode: ShutdownMode,
}

/// Response of the lifecycle routes (`/v1/restart`, `/v1/stop`, `/v1/start`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LifecycleResponse {
    /// The state after the action completed.
    pub state: AgentState,
    pub postmaster_pid: Option<u32>,
}

/// Response of `POST /v1/reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReloadResponse {
    /// Parameters whose rendered value changed in pgpilot.conf.
    pub changed: Vec<String>,
    /// Parameters that Postgres says need a restart to take effect (`pg_settings.pending_restart`).
    pub pending_restart: Vec<String>,
}

/// `POST /v1/wal/push`: archive one WAL file (what `wal-push %p` sends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WalPushRequest {
    /// The file as Postgres names it in `%p`: `pg_wal/<name>`, relative to the data dir (an
    /// absolute path inside the data dir's pg_wal is accepted too).
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WalPushResponse {
    pub name: String,
    /// The store already held identical content (a retried push).
    pub already_stored: bool,
    /// It had been uploaded ahead of the request (look-ahead).
    pub ahead: bool,
    /// SHA-256 of the WAL file.
    pub sha256: String,
    pub size: u64,
    pub stored_size: u64,
    pub upload_ms: u64,
    /// How long this request waited.
    pub waited_ms: u64,
}

/// `POST /v1/wal/fetch`: make one WAL file available for restore_command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WalFetchRequest {
    /// `%f`: the WAL file name.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WalFetchResponse {
    pub name: String,
    /// Where the verified file waits in the spool; the caller moves it into place.
    pub spool_path: String,
    /// Served from prefetch (already downloaded or downloading when asked).
    pub prefetched: bool,
}

/// Archiving health in `/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArchiveStatus {
    /// Store URL (no credentials).
    pub store: String,
    pub last_archived: Option<String>,
    /// RFC 3339.
    pub last_archived_at: Option<String>,
    pub last_archived_age_seconds: Option<u64>,
    /// Failed uploads since the agent started.
    pub failures: u64,
    pub last_failure: Option<String>,
    /// Files Postgres marked ready and has not seen archived yet.
    pub ready: usize,
    pub in_flight: usize,
}
