//! Request and response bodies of the agent's HTTP API (`/v1/...`). The server (agent) and its
//! callers (CLI, operator) share these types, so a field cannot drift between them.

use serde::{Deserialize, Serialize};

use crate::state::{AgentState, DrainState, Operation, Role};

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
    /// The long operation in flight (a backup, a restore), or else the last one since the agent
    /// started: kind, id, step, outcome and progress, in the same shape for every kind.
    #[serde(default)]
    pub operation: Option<Operation>,
    /// The current or last restore's own record (LSNs, timings), if any since the agent started.
    #[serde(default)]
    pub restore: Option<RestoreProgress>,
    /// The newest completed base backup known to the agent; absent when none (or no store).
    #[serde(default)]
    pub last_backup: Option<LastBackup>,
    /// Role in the shard, LSNs, lag, and on a primary its replicas and slots.
    #[serde(default)]
    pub replication: Option<ReplicationStatus>,
    /// The drain handshake: `Running` unless this instance is leaving or has left.
    #[serde(default)]
    pub drain: DrainStatus,
    /// Kubernetes mode: parameters changed in the config (the cluster's spec) that Postgres
    /// applies only after a restart (`pg_settings.pending_restart`).
    #[serde(default)]
    pub pending_restart: Vec<String>,
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
    /// Cancel a base backup in flight instead of being refused (409 naming it). The backup
    /// ends as failed and leaves no manifest.
    #[serde(default)]
    pub cancel_backup: bool,
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

/// Response of `POST /v1/wal/switch`: the primary closed its current WAL segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WalSwitchResponse {
    /// Where the switch record ends (`pg_switch_wal()`).
    pub lsn: String,
    /// The segment it closed (`pg_walfile_name`): it and every one before it are archived next.
    pub segment: String,
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
    /// Digest of the WAL file as stored (hex): the stored object's trailer digest, of kind
    /// `digest_kind`.
    pub digest: String,
    /// `sha256-chunks` (archive format 2: SHA-256 over the SHA-256 of each chunk and the
    /// length) or `sha256` (an object stored in format 1: SHA-256 of the whole file).
    pub digest_kind: String,
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

/// `POST /v1/backups` (all fields optional; an empty body is fine).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupRequest {
    /// Free text recorded in backup_label and the manifest (default: `pgpilot <id>`).
    #[serde(default)]
    pub label: Option<String>,
}

/// Where a backup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackupState {
    /// Taken by this agent right now.
    Running,
    /// The manifest is written: the backup exists.
    Completed,
    /// A run of this agent that ended in an error; it left no manifest.
    Failed,
    /// Objects without a manifest that this agent did not see fail (an agent killed midway,
    /// or another agent's run): not a backup.
    Incomplete,
}

/// Steps of a base backup, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackupPhase {
    /// `pg_backup_start`: waiting for the checkpoint.
    Starting,
    /// Reading and uploading the data dir.
    Copying,
    /// `pg_backup_stop`: waiting for the last WAL segment to be archived.
    Stopping,
    /// Writing backup_label and the manifest.
    Finishing,
    Done,
}

/// `GET /v1/backups/{id}` and the answer to `POST /v1/backups`: one backup and its progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupProgress {
    pub id: String,
    pub label: Option<String>,
    pub state: BackupState,
    pub phase: BackupPhase,
    /// Why it failed (failed and incomplete backups).
    pub reason: Option<String>,
    /// RFC 3339.
    pub started_at: Option<String>,
    /// RFC 3339.
    pub finished_at: Option<String>,
    pub bytes_done: u64,
    /// Known once the data dir has been walked.
    pub bytes_total: u64,
    pub files_done: u64,
    pub files_total: u64,
    /// Bytes written to the store so far.
    pub stored_bytes: u64,
    pub start_lsn: Option<String>,
    pub stop_lsn: Option<String>,
}

/// A backup as listed by `GET /v1/backups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupInfo {
    pub id: String,
    pub state: BackupState,
    pub label: Option<String>,
    /// RFC 3339; for backups without a manifest, the oldest object's time.
    pub start_time: Option<String>,
    /// RFC 3339; for backups without a manifest, the newest object's time.
    pub stop_time: Option<String>,
    pub start_lsn: Option<String>,
    pub stop_lsn: Option<String>,
    pub timeline: Option<u32>,
    /// First and last WAL segments a restore of this backup needs.
    pub wal_start: Option<String>,
    pub wal_end: Option<String>,
    /// Plaintext bytes (from the manifest; unknown without one).
    pub size: Option<u64>,
    /// Bytes in the store (all its objects, manifest included).
    pub stored_size: u64,
    pub files: u64,
    pub postgres_version: Option<String>,
    pub reason: Option<String>,
}

/// What can be restored, given the backups and the archived WAL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecoveryWindow {
    /// The oldest completed backup: the window starts where it ends.
    pub earliest_backup: String,
    /// Its stop LSN: the earliest point a restore can reach.
    pub earliest_lsn: String,
    /// RFC 3339, its stop time.
    pub earliest_time: String,
    /// End of the contiguous archived WAL chain from that backup's first segment: the end LSN
    /// of the last segment before the first gap. Absent when not even the first is archived.
    pub latest_lsn: Option<String>,
    /// The last segment of that chain.
    pub latest_segment: Option<String>,
    /// RFC 3339, when that segment was archived (an upper bound of its last commit).
    pub latest_archived_at: Option<String>,
    /// The first segment missing from the chain (where it stops), if the archive holds later
    /// segments than the chain's end.
    pub first_gap: Option<String>,
    /// False when the chain does not even reach the backup's last needed segment: the backup
    /// cannot be restored until that WAL is archived.
    pub consistent: bool,
}

/// `GET /v1/backups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupList {
    /// Oldest first.
    pub backups: Vec<BackupInfo>,
    /// Absent when there is no completed backup.
    pub window: Option<RecoveryWindow>,
}

/// The newest completed backup, in `/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LastBackup {
    pub id: String,
    /// RFC 3339, when it finished.
    pub time: String,
}

/// Where a restore stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RestoreTarget {
    /// Replay all archived WAL.
    Latest,
    /// Stop as soon as the backup is consistent.
    Immediate,
    /// A point in time: RFC 3339 (`2026-11-23T18:05:00Z`) or Postgres style
    /// (`2026-11-23 18:05:00+00`).
    Time { time: String },
    /// A WAL position, `16/B374D848`.
    Lsn { lsn: String },
    /// A transaction id.
    Xid { xid: String },
    /// A restore point created with `pg_create_restore_point`.
    Name { name: String },
}

/// `POST /v1/restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub target: RestoreTarget,
    /// Restore this backup instead of choosing the newest one that ends before the target.
    #[serde(default)]
    pub backup_id: Option<String>,
    /// Stop just after the target (true, default) or just before it.
    #[serde(default)]
    pub inclusive: Option<bool>,
    /// `latest` (default), `current`, or a timeline number.
    #[serde(default)]
    pub timeline: Option<String>,
    /// Replace a data dir that holds a cluster (it is deleted). Without it, only an empty data
    /// dir is restored into.
    #[serde(default)]
    pub force: bool,
    /// Cancel a base backup in flight instead of being refused (409 naming it).
    #[serde(default)]
    pub cancel_backup: bool,
}

/// The answer to `POST /v1/restore`: accepted, running in the background.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RestoreAccepted {
    pub backup_id: String,
    /// Identifies this restore's progress in `/v1/status` (`restore.started_at`).
    pub started_at: String,
    /// What recovery will stop at, in words.
    pub target: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RestorePhase {
    /// Downloading and verifying the base backup's files.
    Downloading,
    /// Postgres replays archived WAL towards the target.
    Replaying,
    /// Promoted at the target: Running(Primary) on a new timeline.
    Completed,
    Failed,
}

/// Progress of the current or last restore, in `/v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RestoreProgress {
    pub phase: RestorePhase,
    pub backup_id: String,
    pub target: String,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Last replayed WAL position while replaying.
    pub replayed_lsn: Option<String>,
    /// Timeline after promotion.
    pub timeline: Option<u32>,
    /// RFC 3339.
    pub started_at: String,
    pub finished_at: Option<String>,
    /// Seconds spent downloading the base backup.
    pub download_seconds: Option<f64>,
    /// Seconds from Postgres start to promotion.
    pub replay_seconds: Option<f64>,
    /// Why it failed, in words.
    pub error: Option<String>,
}

/// Replication, as `/v1/status` reports it (`replication`): this instance's place in its shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicationStatus {
    /// This instance's name (`[replication] name`): its `application_name` and slot name on
    /// the primary.
    pub name: String,
    /// The agent API URL of the primary this instance follows; absent on a primary.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Replica: the WAL receiver streams from the primary right now.
    #[serde(default)]
    pub streaming: bool,
    /// Replica: last WAL position received and flushed to disk (`pg_last_wal_receive_lsn`).
    #[serde(default)]
    pub receive_lsn: Option<String>,
    /// Replica: last WAL position replayed (`pg_last_wal_replay_lsn`).
    #[serde(default)]
    pub replay_lsn: Option<String>,
    /// Replica: bytes between the primary's WAL end (as last reported by it) and what this
    /// replica replayed.
    #[serde(default)]
    pub lag_bytes: Option<u64>,
    /// Replica: seconds since the last replayed transaction's commit, 0 when everything
    /// received is replayed.
    #[serde(default)]
    pub lag_seconds: Option<f64>,
    /// Primary: its replicas as `pg_stat_replication` shows them.
    #[serde(default)]
    pub replicas: Vec<ReplicaView>,
    /// Primary: the replication slots the agent manages, with the WAL each retains.
    #[serde(default)]
    pub slots: Vec<SlotView>,
    /// Kubernetes mode, a replica: why it does not take the shard's expired Lease (lag beyond
    /// `maximum_lag_on_failover`, a peer with more WAL, synchronous mode naming another).
    /// Absent while the Lease is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_refusal: Option<String>,
}

/// One replica as its primary sees it (`pg_stat_replication`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplicaView {
    /// `application_name`: the replica's instance name.
    pub name: String,
    /// `startup`, `catchup`, `streaming`, `backup`, `stopping`.
    pub state: String,
    pub client_addr: Option<String>,
    pub sent_lsn: Option<String>,
    pub flush_lsn: Option<String>,
    pub replay_lsn: Option<String>,
    /// Bytes between the primary's current WAL position and the replica's replay position.
    pub lag_bytes: Option<u64>,
    /// The replica's agent API URL, when it registered with this primary.
    #[serde(default)]
    pub api_url: Option<String>,
}

/// A physical replication slot managed by the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlotView {
    pub name: String,
    pub active: bool,
    /// WAL bytes the slot keeps on the primary (current position minus `restart_lsn`).
    pub retained_bytes: Option<u64>,
}

/// `POST /v1/replicas`: a replica registers with its primary, which creates its slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterReplicaRequest {
    /// The replica's instance name.
    pub name: String,
    /// The replica's agent API URL (the primary calls it during a switchover).
    pub api_url: String,
}

/// Answer to `POST /v1/replicas`: where and how to stream from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisterReplicaResponse {
    /// The primary's instance name.
    pub primary: String,
    /// The physical slot the replica streams through.
    pub slot: String,
    /// Host and port of the primary's Postgres.
    pub postgres_host: String,
    pub postgres_port: u16,
    /// The primary's database system identifier: a replica of another cluster cannot follow it.
    pub system_identifier: String,
    pub timeline: u32,
    /// The primary's timeline history (its `.history` file): where each earlier timeline
    /// ended. A follower on one of those timelines that wrote past its end has diverged.
    #[serde(default)]
    pub history: Vec<TimelineSwitch>,
}

/// One line of a timeline history file: `timeline` ended at `switchpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TimelineSwitch {
    pub timeline: u32,
    pub switchpoint: String,
}

/// `POST /v1/drain`: start (or join) the drain of this instance (all fields optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// When no replica can take over within the timeout, stop the only writer anyway (after
    /// archiving its WAL) instead of failing the drain.
    #[serde(default)]
    pub force: bool,
    /// How long the drain may wait for a replica to take over and for the archive, in seconds
    /// (1 to 86400); absent: `[replication] drain_timeout_secs`.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_secs: Option<u64>,
}

/// The longest drain timeout a request may ask for (a day).
pub const MAX_DRAIN_TIMEOUT_SECS: u64 = 86_400;

/// The drain handshake of this instance (`GET /v1/drain`, `/v1/status` `drain`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DrainStatus {
    pub state: DrainState,
    /// The step in progress or the last one: `acknowledged`, `archiving`, `switching over`,
    /// `stopping`, `finished`, `failed` or `cancelled`.
    #[serde(default)]
    pub step: Option<String>,
    /// Progress or the outcome, in words (also the pod's `pgpilot.io/drain-message`).
    #[serde(default)]
    pub message: String,
    /// Who asked: `api` or `annotation`.
    #[serde(default)]
    pub requested_by: Option<String>,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub timeout_secs: u64,
    /// RFC 3339.
    #[serde(default)]
    pub started_at: Option<String>,
    /// RFC 3339, once drained, failed or cancelled.
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Why the last drain failed (the instance is a normal member again).
    #[serde(default)]
    pub error: Option<String>,
    /// The instance that took over leadership, when this one was the primary.
    #[serde(default)]
    pub new_primary: Option<String>,
    /// The last WAL file archived before Postgres stopped (a `.partial` when the drain stopped
    /// the only writer).
    #[serde(default)]
    pub last_archived: Option<String>,
}

/// `POST /v1/switchover`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverRequest {
    /// The replica to promote (its instance name); absent: the healthy streaming replica with
    /// the highest received LSN.
    #[serde(default)]
    pub candidate: Option<String>,
}

/// A completed switchover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SwitchoverResponse {
    pub old_primary: String,
    pub new_primary: String,
    /// The new primary's agent API URL.
    pub new_primary_url: String,
    /// The old primary's shutdown checkpoint, which the candidate confirmed it received.
    pub checkpoint_lsn: String,
    /// The new primary's timeline.
    pub timeline: Option<u32>,
    /// Replicas re-pointed to the new primary (the old primary included).
    pub followers: Vec<String>,
    /// Replicas that could not be re-pointed, with why (they keep trying through their
    /// `restore_command` and can be re-pointed with `POST /v1/follow`).
    #[serde(default)]
    pub not_followed: Vec<String>,
    /// From the stop of writes to the new primary accepting them.
    pub write_pause_ms: u64,
    pub duration_ms: u64,
}

/// `POST /v1/follow`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FollowRequest {
    /// The agent API URL of the primary to follow.
    pub primary: String,
}

/// `POST /v1/reinitialize` (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReinitializeRequest {
    /// The agent API URL of the primary to clone and follow; default: the one recorded.
    #[serde(default)]
    pub primary: Option<String>,
}

/// Answer to `POST /v1/promote`, `/v1/demote` and `/v1/follow`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReparentResponse {
    pub state: AgentState,
    /// The primary followed now, if any.
    pub upstream: Option<String>,
    /// Demote: the shutdown checkpoint written by the last run as primary.
    #[serde(default)]
    pub checkpoint_lsn: Option<String>,
    pub timeline: Option<u32>,
}
