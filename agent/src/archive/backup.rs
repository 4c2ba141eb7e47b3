//! Online, non-exclusive base backups of the running primary into the backup store.
//!
//! One dedicated session calls `pg_backup_start` (PG15+; `pg_start_backup` on 14) and stays
//! open for the whole backup: Postgres aborts a non-exclusive backup when its session ends, so
//! an agent killed midway leaves nothing half-registered in Postgres. The data dir is walked
//! (skipping what pg_basebackup skips, see [`walk`]), files are uploaded in parallel, each to
//! its own object through the archive format; files change while they are read (WAL replay
//! repairs that, which is why the backup needs the WAL from its start to its stop LSN) and may
//! vanish (skipped). `pg_backup_stop` returns backup_label (and tablespace_map), stored as
//! files of the backup; the agent then waits until every WAL segment the backup needs is in the
//! store (not Postgres' once-a-second wait on archive_status). The manifest is written last,
//! create-only: a backup exists only once its manifest does.
//!
//! [`begin`] starts a run the executor admitted (one at a time: admission refuses a second);
//! [`BackupRuns`] keeps the runs' progress for the API.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use pgpilot_common::api::{BackupPhase, BackupProgress, BackupRequest, BackupState, LastBackup};
use pgpilot_common::archive::{ArchiveSummary, FileChunks, hex};
use pgpilot_common::layout::Layout;
use pgpilot_common::manifest::{
    BackupLabel, BackupManifest, MANIFEST_FORMAT, ManifestDir, ManifestFile, wal_range,
};
use pgpilot_common::wal::{Lsn, Segment};

use super::push::WalArchiver;
use crate::config::Config;
use crate::error::AgentError;
use crate::files::SPOOL_DIR;
use crate::metrics::ArchiveMetrics;
use crate::postgres::sql;
use crate::secrets::Secret;
use crate::store::{PutMode, Store, StoreError};
use crate::time::{timestamp, unix_now};
use tokio_util::sync::CancellationToken;

/// Test-only slow-down: milliseconds to sleep after each uploaded file, so a test can kill the
/// agent in the middle of a backup of a small database. Documented in docs/backups.md.
pub const FILE_DELAY_ENV: &str = "PGPILOT_TEST_BACKUP_FILE_DELAY_MS";

/// How long `pg_backup_stop` may wait for the backup's last WAL segment to be archived.
const STOP_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Finished runs kept in memory for `GET /v1/backups/{id}`.
const KEEP_RUNS: usize = 50;

/// Why a backup could not be started or did not complete. Every variant names what it was
/// working on.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cancelled on request (the backup session ended, so Postgres aborted the backup)")]
    Cancelled,
    #[error("{what}: {source}")]
    Postgres {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "tablespaces are not supported by pgpilot base backups yet, and {dir} holds {entries:?}: move those tables to pg_default"
    )]
    Tablespaces { dir: String, entries: Vec<String> },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    WalNotArchived(String),
}

impl From<BackupError> for AgentError {
    fn from(e: BackupError) -> Self {
        match e {
            BackupError::Invalid(m) => AgentError::BadRequest(m),
            other => AgentError::Failed(other.to_string()),
        }
    }
}

fn pg(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> BackupError {
    let what = what.into();
    move |source| BackupError::Postgres { what, source }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.display().to_string(),
        source,
    }
}

// ----- runs -----

/// This agent's backup runs: the one in progress and the recent ones, for the API.
#[derive(Default, Clone)]
pub struct BackupRuns {
    state: Arc<Mutex<RunsState>>,
}

#[derive(Default)]
struct RunsState {
    runs: BTreeMap<String, Arc<Run>>,
    last: Option<LastBackup>,
    /// The store was asked once for the newest backup (for `/v1/status` after a restart).
    last_loaded: bool,
}

impl BackupRuns {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunsState> {
        self.state.lock().expect("backup runs lock")
    }

    /// A run of this agent, by id.
    pub fn get(&self, id: &str) -> Option<BackupProgress> {
        self.lock().runs.get(id).map(|r| r.snapshot())
    }

    /// Every run of this agent, by id.
    pub fn all(&self) -> BTreeMap<String, BackupProgress> {
        self.lock()
            .runs
            .iter()
            .map(|(id, r)| (id.clone(), r.snapshot()))
            .collect()
    }

    /// Records `backup` as the newest completed one if it is newer than what is known.
    pub fn note_completed(&self, backup: LastBackup) {
        let mut st = self.lock();
        st.last_loaded = true;
        if st.last.as_ref().is_none_or(|l| l.id < backup.id) {
            st.last = Some(backup);
        }
    }
}

/// One backup run with its progress. Counters are atomics: upload tasks bump them per read.
pub struct Run {
    pub id: String,
    label: String,
    started: SystemTime,
    bytes_done: AtomicU64,
    files_done: AtomicU64,
    stored_bytes: AtomicU64,
    detail: Mutex<RunDetail>,
}

struct RunDetail {
    state: BackupState,
    phase: BackupPhase,
    reason: Option<String>,
    finished: Option<SystemTime>,
    bytes_total: u64,
    files_total: u64,
    start_lsn: Option<String>,
    stop_lsn: Option<String>,
}

impl Run {
    fn new(id: String, label: String) -> Run {
        Run {
            id,
            label,
            started: SystemTime::now(),
            bytes_done: AtomicU64::new(0),
            files_done: AtomicU64::new(0),
            stored_bytes: AtomicU64::new(0),
            detail: Mutex::new(RunDetail {
                state: BackupState::Running,
                phase: BackupPhase::Starting,
                reason: None,
                finished: None,
                bytes_total: 0,
                files_total: 0,
                start_lsn: None,
                stop_lsn: None,
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut RunDetail)) {
        f(&mut self.detail.lock().expect("run lock"));
    }

    pub fn snapshot(&self) -> BackupProgress {
        let d = self.detail.lock().expect("run lock");
        BackupProgress {
            id: self.id.clone(),
            label: Some(self.label.clone()),
            state: d.state,
            phase: d.phase,
            reason: d.reason.clone(),
            started_at: Some(timestamp(self.started)),
            finished_at: d.finished.map(timestamp),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: d.bytes_total.max(self.bytes_done.load(Ordering::Relaxed)),
            files_done: self.files_done.load(Ordering::Relaxed),
            files_total: d.files_total,
            stored_bytes: self.stored_bytes.load(Ordering::Relaxed),
            start_lsn: d.start_lsn.clone(),
            stop_lsn: d.stop_lsn.clone(),
        }
    }
}

/// The newest completed backup for `/v1/status`. After an agent restart the first call starts
/// a background look into the store (status must stay fast) and later calls see its answer.
pub fn last_backup(runs: &BackupRuns, archiver: Option<&WalArchiver>) -> Option<LastBackup> {
    let archiver = archiver?;
    let mut st = runs.lock();
    if !st.last_loaded {
        st.last_loaded = true;
        let (store, layout) = (archiver.store().clone(), archiver.layout().clone());
        let runs = runs.clone();
        archiver
            .background()
            .spawn("look-up of the newest backup".into(), async move {
                match super::catalog::newest_completed(&store, &layout).await {
                    Ok(Some(last)) => runs.note_completed(last),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("cannot look up the newest backup for status: {e}"),
                }
            });
    }
    st.last.clone()
}

/// What a backup needs, handed over by the executor (the backup knows nothing of the agent's
/// state: the executor admitted it).
pub struct BackupDeps {
    pub cfg: Config,
    pub superuser_password: Secret,
    pub store: Store,
    pub layout: Layout,
    pub metrics: ArchiveMetrics,
    pub runs: BackupRuns,
    /// On a replica: its primary's agent, asked to close the current WAL segment once the
    /// backup stops (the primary archives the WAL a standby backup needs).
    pub primary: Option<pgpilot_common::client::AgentClient>,
}

/// A backup started in the background: its progress record and its task.
pub struct Started {
    pub run: Arc<Run>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts a base backup in the background and returns at once. The executor owns the task:
/// `cancel` ends it (its session closes, so Postgres aborts the backup; it leaves no manifest).
pub async fn begin(
    deps: BackupDeps,
    req: BackupRequest,
    cancel: CancellationToken,
) -> Result<Started, BackupError> {
    if let Some(label) = &req.label
        && (label.len() > 200 || label.contains(['\n', '\r', '\0']))
    {
        return Err(BackupError::Invalid(
            "label must be one line of at most 200 bytes".into(),
        ));
    }
    let id = new_backup_id(&deps.store, &deps.layout, &deps.runs).await?;
    let label = req.label.unwrap_or_else(|| format!("pgpilot {id}"));
    let run = Arc::new(Run::new(id.clone(), label));
    {
        let mut st = deps.runs.lock();
        st.runs.insert(id.clone(), run.clone());
        while st.runs.len() > KEEP_RUNS {
            st.runs.pop_first();
        }
    }
    tracing::info!(backup = %id, store = %deps.store, "base backup started");
    let task_run = run.clone();
    let task = tokio::spawn(async move {
        let run = task_run;
        let _finish = Finish { run: run.clone() };
        let began = Instant::now();
        let result = tokio::select! {
            r = take(&deps, &run) => r,
            _ = cancel.cancelled() => Err(BackupError::Cancelled),
        };
        let m = &deps.metrics;
        match result {
            Ok(manifest) => {
                let secs = began.elapsed().as_secs_f64();
                m.backup_duration.observe(secs);
                m.backup_last_success.set(unix_now());
                tracing::info!(
                    backup = %run.id,
                    files = manifest.files.len(),
                    bytes = manifest.total_size,
                    stored = manifest.total_stored_size,
                    seconds = format!("{secs:.1}"),
                    mb_per_s = format!("{:.1}", manifest.total_size as f64 / 1e6 / secs.max(1e-3)),
                    start_lsn = %manifest.start_lsn,
                    stop_lsn = %manifest.stop_lsn,
                    "base backup completed"
                );
                // Before the run shows as completed, so a client that waits for it sees the
                // store as retention left it (the manifest is already durable).
                if let Some(r) = deps.cfg.backup.as_ref().and_then(|b| b.retention.as_ref()) {
                    apply_retention(&deps, r).await;
                }
                run.update(|d| {
                    d.state = BackupState::Completed;
                    d.phase = BackupPhase::Done;
                    d.finished = Some(SystemTime::now());
                });
                deps.runs.note_completed(LastBackup {
                    id: run.id.clone(),
                    time: manifest.stop_time.clone(),
                });
            }
            Err(e) => {
                m.backup_failures.inc();
                // Logged here, where the failure ends; the API shows the same reason.
                tracing::error!(backup = %run.id, "base backup failed: {e}");
                run.update(|d| {
                    d.state = BackupState::Failed;
                    d.reason = Some(e.to_string());
                    d.finished = Some(SystemTime::now());
                });
            }
        }
    });
    Ok(Started { run, task })
}

/// The retention of `[backup.retention]`, after a successful backup. A failure is logged and
/// counted; the backup stays completed, and the next backup tries again.
async fn apply_retention(deps: &BackupDeps, settings: &crate::store::config::RetentionSettings) {
    use super::retention;
    let m = &deps.metrics;
    let result = async {
        let (keep_last, keep_within) = settings.rules()?;
        let cat = super::catalog::load(&deps.store, &deps.layout)
            .await
            .map_err(|e| e.to_string())?;
        let plan = retention::plan(
            &cat,
            retention::Policy {
                keep_last,
                keep_within,
            },
            jiff::Timestamp::now(),
        )
        .map_err(|e| e.to_string())?;
        retention::apply(&deps.store, &plan)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(plan)
    }
    .await;
    match result {
        Ok(plan) => {
            m.retention_deleted_backups
                .inc_by(plan.delete_backups.len() as u64);
            m.retention_deleted_wal.inc_by(plan.delete_wal.len() as u64);
            tracing::info!(
                kept = plan.keep.len(),
                deleted_backups = plan.delete_backups.len(),
                deleted_wal = plan.delete_wal.len(),
                "retention applied after the backup"
            );
        }
        Err(e) => {
            m.retention_failures.inc();
            tracing::error!(
                "retention after the backup failed (nothing more is deleted until the next backup): {e}"
            );
        }
    }
}

/// Ends a run however its task ends (a panic included): the next backup must not get 409
/// forever, and the run must not show as running forever.
struct Finish {
    run: Arc<Run>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.run.update(|d| {
            if d.state == BackupState::Running {
                d.state = BackupState::Failed;
                d.reason = Some("the backup task ended unexpectedly (see the agent log)".into());
                d.finished = Some(SystemTime::now());
            }
        });
    }
}

/// A sortable UTC timestamp, `20261123T181500Z`, with `-1`, `-2`, ... when taken.
async fn new_backup_id(
    store: &Store,
    layout: &Layout,
    runs: &BackupRuns,
) -> Result<String, BackupError> {
    let base = jiff::Timestamp::now()
        .strftime("%Y%m%dT%H%M%SZ")
        .to_string();
    for n in 0..100 {
        let id = if n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        if runs.lock().runs.contains_key(&id) {
            continue;
        }
        if store.list(&layout.backup_prefix(&id)).await?.is_empty() {
            return Ok(id);
        }
    }
    Err(BackupError::Invalid(format!(
        "no free backup id after {base}-99"
    )))
}

// ----- taking a backup -----

/// What the server said about itself at the start.
struct ServerFacts {
    version: String,
    version_num: i32,
    system_identifier: String,
    wal_segment_size: u64,
}

/// Takes the backup and writes its manifest. The session (and with it Postgres' backup state)
/// ends when this returns, however it returns.
async fn take(deps: &BackupDeps, run: &Run) -> Result<BackupManifest, BackupError> {
    let (store, layout) = (&deps.store, &deps.layout);
    let data_dir = deps.cfg.data_dir.clone();
    check_no_tablespaces(&data_dir)?;
    let client = sql::connect(
        &deps.cfg,
        deps.superuser_password.expose(),
        Duration::from_secs(10),
    )
    .await
    .map_err(pg("connecting to Postgres for the backup session"))?;
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int, \
             (SELECT system_identifier FROM pg_control_system())::text, \
             (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), \
             pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(pg("reading server facts"))?;
    let facts = ServerFacts {
        version: row.get(0),
        version_num: row.get(1),
        system_identifier: row.get(2),
        wal_segment_size: row.get::<_, i64>(3) as u64,
    };
    // Never into another database system's archive (archive/identity.rs).
    super::identity::check(store, layout, &facts.system_identifier)
        .await
        .map_err(|e| BackupError::Invalid(e.to_string()))?;
    // A standby backup: Postgres marks its backup_label `BACKUP FROM: standby`, and recovery
    // from it ends at the minRecoveryPoint of the copied pg_control, so pg_control is copied
    // after every other file (as pg_basebackup does).
    let standby: bool = row.get(4);

    let start_sql = if facts.version_num >= 150000 {
        "SELECT pg_backup_start($1, fast => true)::text"
    } else {
        "SELECT pg_start_backup($1, true, false)::text"
    };
    let t_start = Instant::now();
    let start_lsn: String = client
        .query_one(start_sql, &[&run.label])
        .await
        .map_err(pg(format!("starting backup {} (pg_backup_start)", run.id)))?
        .get(0);
    let start_time = SystemTime::now();
    let t_copy = Instant::now();
    run.update(|d| {
        d.start_lsn = Some(start_lsn.clone());
        d.phase = BackupPhase::Copying;
    });

    let walk_dir = data_dir.clone();
    let walked = tokio::task::spawn_blocking(move || walk(&walk_dir))
        .await
        .map_err(|e| BackupError::Invalid(format!("data dir walk task: {e}")))??;
    run.update(|d| {
        d.bytes_total = walked.files.iter().map(|f| f.size).sum();
        d.files_total = walked.files.len() as u64 + 1;
    });
    let delay = std::env::var(FILE_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let concurrency = store.upload_concurrency().max(1);
    let (last, rest): (Vec<WalkedFile>, Vec<WalkedFile>) = walked
        .files
        .into_iter()
        .partition(|f| standby && f.rel == "global/pg_control");
    let upload = |f: WalkedFile| async move {
        let key = layout.backup_file_key(&run.id, &f.rel);
        let summary = upload_file(store, &key, &f.path, run).await?;
        run.files_done.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        Ok::<_, BackupError>(summary.map(|s| manifest_file(f.rel, &s, f.mode)))
    };
    let mut files: Vec<ManifestFile> = futures::stream::iter(rest)
        .map(upload)
        .buffer_unordered(concurrency)
        .try_filter_map(|f| async move { Ok(f) })
        .try_collect()
        .await?;
    for f in last {
        files.extend(upload(f).await?);
    }

    let copy_secs = t_copy.elapsed().as_secs_f64();
    run.update(|d| d.phase = BackupPhase::Stopping);
    let t_stop = Instant::now();
    // Postgres' own wait (wait_for_archive => true) polls once a second, a fixed second on every
    // backup; and it only sees archive_status. So stop without it (the WAL switch still
    // happens) and wait for the needed segments in the store itself, which is what a restore
    // will read.
    let stop_sql = if facts.version_num >= 150000 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(wait_for_archive => false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
    };
    let row = client
        .query_one(stop_sql, &[])
        .await
        .map_err(pg(format!("stopping backup {} (pg_backup_stop)", run.id)))?;
    let stop_lsn_text: String = row.get(0);
    let labelfile: String = row.get(1);
    let spcmap: Option<String> = row.get(2);
    run.update(|d| d.stop_lsn = Some(stop_lsn_text.clone()));
    let label = BackupLabel::parse(&labelfile).ok_or_else(|| {
        BackupError::Invalid(format!(
            "backup {}: cannot parse the backup_label Postgres returned",
            run.id
        ))
    })?;
    let stop_lsn = Lsn::parse(&stop_lsn_text).ok_or_else(|| {
        BackupError::Invalid(format!(
            "backup {}: stop LSN {stop_lsn_text:?} does not parse",
            run.id
        ))
    })?;
    if standby {
        // The WAL up to the stop point is the primary's to archive: ask it to close the current
        // segment now rather than wait for archive_timeout.
        match &deps.primary {
            Some(primary) => match primary.switch_wal().await {
                Ok(s) => {
                    tracing::info!(backup = %run.id, segment = %s.segment, "the primary closed its WAL segment for this standby backup")
                }
                Err(e) => {
                    tracing::warn!(backup = %run.id, "the primary could not switch WAL ({e}); waiting for archive_timeout")
                }
            },
            None => {
                tracing::warn!(backup = %run.id, "standby backup without a known primary: waiting for archive_timeout to close the WAL segment")
            }
        }
    }
    let seg = facts.wal_segment_size;
    let (first, last) = wal_range(label.timeline, label.start_lsn, stop_lsn, seg);
    wait_archived(store, layout, &run.id, first, last, seg).await?;
    let stop_time = SystemTime::now();
    run.update(|d| d.phase = BackupPhase::Finishing);
    // Where the time went: a slow stop means slow WAL archiving, a slow copy the store or codec.
    tracing::info!(
        backup = %run.id,
        checkpoint_secs = format!("{:.2}", t_copy.duration_since(t_start).as_secs_f64()),
        copy_secs = format!("{copy_secs:.2}"),
        stop_secs = format!("{:.2}", t_stop.elapsed().as_secs_f64()),
        "base backup phases"
    );

    let mut extra = vec![("backup_label", labelfile)];
    if let Some(map) = spcmap.filter(|m| !m.is_empty()) {
        extra.push(("tablespace_map", map));
    }
    for (name, text) in extra {
        let key = layout.backup_file_key(&run.id, name);
        let len = text.len() as u64;
        let s = store
            .put_bytes(&key, Bytes::from(text), PutMode::CreateOnly)
            .await?;
        run.bytes_done.fetch_add(len, Ordering::Relaxed);
        run.stored_bytes.fetch_add(s.stored_len, Ordering::Relaxed);
        run.files_done.fetch_add(1, Ordering::Relaxed);
        files.push(manifest_file(name.to_string(), &s, 0o600));
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));

    let manifest = BackupManifest {
        format: MANIFEST_FORMAT,
        id: run.id.clone(),
        label: run.label.clone(),
        status: "completed".into(),
        start_time: timestamp(start_time),
        stop_time: timestamp(stop_time),
        start_lsn: label.start_lsn.to_string(),
        stop_lsn: stop_lsn.to_string(),
        timeline: label.timeline,
        postgres_version: facts.version,
        postgres_major: (facts.version_num / 10000) as u32,
        system_identifier: facts.system_identifier,
        wal_segment_size: seg,
        wal_start: first.name(seg),
        wal_end: last.name(seg),
        directories: walked.dirs,
        total_size: files.iter().map(|f| f.size).sum(),
        total_stored_size: files.iter().map(|f| f.stored_size).sum(),
        files,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| BackupError::Invalid(format!("manifest of {}: {e}", run.id)))?;
    store
        .put_bytes(
            &layout.manifest_key(&run.id),
            Bytes::from(json),
            PutMode::CreateOnly,
        )
        .await?;
    Ok(manifest)
}

/// Waits until every WAL segment from `first` through `last` is in the store (the archiver
/// stores a segment only once verified). Polls quickly: the last segment was just switched and
/// is usually archived within milliseconds.
async fn wait_archived(
    store: &Store,
    layout: &Layout,
    id: &str,
    first: Segment,
    last: Segment,
    seg_size: u64,
) -> Result<(), BackupError> {
    let deadline = Instant::now() + STOP_TIMEOUT;
    let mut next = first;
    while next <= last {
        if store
            .head(&layout.wal_key(&next.name(seg_size)))
            .await?
            .is_some()
        {
            next = next.next();
            continue;
        }
        if Instant::now() > deadline {
            return Err(BackupError::WalNotArchived(format!(
                "backup {id}: WAL segment {} (needed: {} through {}) was not archived within {} s; check WAL archiving (/v1/status, archive failures)",
                next.name(seg_size),
                first.name(seg_size),
                last.name(seg_size),
                STOP_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn manifest_file(path: String, s: &ArchiveSummary, mode: u32) -> ManifestFile {
    ManifestFile {
        path,
        size: s.plaintext_len,
        digest: hex(&s.digest),
        digest_kind: s.digest_kind.name().to_owned(),
        stored_size: s.stored_len,
        mode,
    }
}

/// Uploads one data-dir file; `None` when it vanished before it could be opened (a dropped
/// table: fine, WAL replay knows). Progress counts bytes as they are read; a failed attempt
/// takes its bytes back before the retry.
async fn upload_file(
    store: &Store,
    key: &str,
    path: &Path,
    run: &Run,
) -> Result<Option<ArchiveSummary>, BackupError> {
    let result = store
        .retried("backup put", |attempt| async move {
            let file = match std::fs::File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(source) => {
                    return Err(StoreError::LocalIo {
                        path: path.display().to_string(),
                        source,
                    });
                }
            };
            let mut reader = FileChunks::counting(file, &run.bytes_done);
            match store.put(key, &mut reader, PutMode::CreateOnly).await {
                Ok(s) => Ok(Some(s)),
                // A retry after an attempt that did commit: what is stored is a valid copy.
                Err(StoreError::AlreadyExists { .. }) if attempt > 1 => {
                    run.bytes_done
                        .fetch_sub(reader.counted(), Ordering::Relaxed);
                    let s = store.verify(key).await?;
                    run.bytes_done.fetch_add(s.plaintext_len, Ordering::Relaxed);
                    Ok(Some(s))
                }
                Err(e) => {
                    run.bytes_done
                        .fetch_sub(reader.counted(), Ordering::Relaxed);
                    Err(e)
                }
            }
        })
        .await?;
    if let Some(s) = &result {
        run.stored_bytes.fetch_add(s.stored_len, Ordering::Relaxed);
    }
    Ok(result)
}

// ----- the data dir walk -----

/// A regular file to back up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkedFile {
    /// Relative to the data dir, `/`-separated.
    pub rel: String,
    pub path: PathBuf,
    pub size: u64,
    pub mode: u32,
}

/// The result of walking the data dir: directories (kept even when empty or skipped, so restore
/// recreates them) and files, largest first (so the big ones start early and the parallel
/// uploads end together).
#[derive(Debug, Default)]
pub struct Walked {
    pub dirs: Vec<ManifestDir>,
    pub files: Vec<WalkedFile>,
}

/// Top-level directories whose contents are not backed up, as pg_basebackup: Postgres
/// recreates or does not need them (WAL comes from the archive; slots, shared memory, notify,
/// serializable and snapshot state, temporary statistics and subtrans are reset on start).
const SKIP_CONTENTS: &[&str] = &[
    "pg_wal",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// Top-level files not backed up: the running server's own, and backup files a restore must
/// not find (the backup brings its own backup_label).
const SKIP_TOP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "tablespace_map.old",
    "backup_manifest",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
];

/// Whether `rel` (a path relative to the data dir) is skipped entirely (not even listed).
pub fn skipped(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    let top = !rel.contains('/');
    if top && (rel == SPOOL_DIR || SKIP_TOP_FILES.contains(&rel)) {
        return true;
    }
    if name == "pg_internal.init" || name.starts_with("pgsql_tmp") {
        return true;
    }
    // Temporary relations (`t<backend>_<relfilenode>[.<segment>|_<fork>]` in base/<db>/):
    // they die with their session.
    if rel.starts_with("base/")
        && let Some(rest) = name.strip_prefix('t')
        && let Some((backend, _)) = rest.split_once('_')
        && !backend.is_empty()
        && backend.bytes().all(|b| b.is_ascii_digit())
    {
        return true;
    }
    false
}

/// Walks the data dir. Entries vanishing during the walk are skipped; tablespaces are refused.
pub fn walk(data_dir: &Path) -> Result<Walked, BackupError> {
    let mut out = Walked::default();
    let mut stack = vec![(data_dir.to_path_buf(), String::new())];
    while let Some((dir, rel_dir)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel_dir.is_empty() => continue,
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&dir)(e)),
            };
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(BackupError::Invalid(format!(
                    "{}: file name is not UTF-8",
                    entry.path().display()
                )));
            };
            let rel = if rel_dir.is_empty() {
                name.to_string()
            } else {
                format!("{rel_dir}/{name}")
            };
            if skipped(&rel) {
                continue;
            }
            let path = entry.path();
            // Follow symlinks (pg_wal may be one); a vanished entry is skipped.
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.dirs.push(ManifestDir {
                    path: rel.clone(),
                    mode,
                });
                if rel == "pg_wal" {
                    out.dirs.push(ManifestDir {
                        path: "pg_wal/archive_status".into(),
                        mode,
                    });
                } else if rel == "pg_tblspc" {
                    check_no_tablespaces(data_dir)?;
                } else if !SKIP_CONTENTS.contains(&rel.as_str()) {
                    stack.push((path, rel));
                }
            } else if meta.is_file() {
                out.files.push(WalkedFile {
                    rel,
                    path,
                    size: meta.len(),
                    mode,
                });
            }
            // Sockets, FIFOs and devices have no place in a data dir; nothing to copy.
        }
    }
    out.dirs.sort_by(|a, b| a.path.cmp(&b.path));
    out.files
        .sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.rel.cmp(&b.rel)));
    Ok(out)
}

/// Refuses a data dir with tablespaces: their files live outside it, behind pg_tblspc
/// symlinks, and are not backed up yet.
fn check_no_tablespaces(data_dir: &Path) -> Result<(), BackupError> {
    let dir = data_dir.join("pg_tblspc");
    let entries: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    if entries.is_empty() {
        Ok(())
    } else {
        Err(BackupError::Tablespaces {
            dir: dir.display().to_string(),
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_what_pg_basebackup_skips() {
        for rel in [
            "postmaster.pid",
            "postmaster.opts",
            "backup_label.old",
            "pgpilot_spool",
            "global/pg_internal.init",
            "base/16384/pg_internal.init",
            "base/pgsql_tmp",
            "base/16384/t3_16390",
            "base/16384/t12_16390_fsm",
        ] {
            assert!(skipped(rel), "{rel}");
        }
        for rel in [
            "PG_VERSION",
            "base/16384/16390",
            "base/16384/16390_fsm",
            "global/pg_control",
            "pgpilot.conf",
            "base/16384/pgpilot_spool",
            "pg_wal",
        ] {
            assert!(!skipped(rel), "{rel}");
        }
    }

    #[test]
    fn walk_keeps_skipped_dirs_empty_and_refuses_tablespaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for dir in [
            "base/1",
            "global",
            "pg_wal/archive_status",
            "pg_stat_tmp",
            "pg_tblspc",
            "pgpilot_spool",
        ] {
            std::fs::create_dir_all(p.join(dir)).unwrap();
        }
        std::fs::write(p.join("PG_VERSION"), "17\n").unwrap();
        std::fs::write(p.join("base/1/1259"), vec![0u8; 8192]).unwrap();
        std::fs::write(p.join("pg_wal/000000010000000000000001"), b"x").unwrap();
        std::fs::write(p.join("pg_stat_tmp/global.stat"), b"x").unwrap();
        std::fs::write(p.join("pgpilot_spool/x"), b"x").unwrap();
        std::fs::write(p.join("postmaster.pid"), b"1").unwrap();
        let w = walk(p).unwrap();
        let files: Vec<&str> = w.files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(files, ["base/1/1259", "PG_VERSION"]);
        let dirs: Vec<&str> = w.dirs.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            dirs,
            [
                "base",
                "base/1",
                "global",
                "pg_stat_tmp",
                "pg_tblspc",
                "pg_wal",
                "pg_wal/archive_status"
            ]
        );
        std::os::unix::fs::symlink("/tmp", p.join("pg_tblspc/16500")).unwrap();
        let e = walk(p).unwrap_err().to_string();
        assert!(e.contains("tablespaces") && e.contains("16500"), "{e}");
    }
}
