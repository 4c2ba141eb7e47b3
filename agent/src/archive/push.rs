//! WAL archiving. Postgres calls archive_command once per file, serially, and deletes the file
//! once it returns 0; a false success is data loss. So a push answers success only after the
//! store holds the object (create-only, so nothing is ever overwritten) and it checked out
//! ([`VerifyMode`]); an object already there with the same content is success (retries are
//! normal), with different content a loud failure (two clusters writing into one archive).
//!
//! Speed comes from look-ahead: on every push, and on a timer, the archiver starts uploading the
//! other files Postgres has marked ready (`pg_wal/archive_status/*.ready`), up to
//! `push_concurrency` at a time, so when Postgres asks for them they are already stored and the
//! call returns at once.
//!
//! Every upload runs in a task of the archive's [`Background`]: once the agent is stopping no
//! look-ahead starts and no upload retries; once Postgres has stopped the rest is abandoned
//! (Postgres keeps the segments and asks again at the next start).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use pgpilot_common::api::{ArchiveStatus, WalPushResponse};
use pgpilot_common::layout::Layout;
use pgpilot_common::wal::WalFile;
use tokio::sync::Semaphore;

use super::background::Background;
use super::identity::{self, IdentityError};
use crate::config::VerifyMode;
use crate::metrics::ArchiveMetrics;
use crate::store::{PutMode, PutOutcome, Store, StoreError};
use crate::time::{timestamp, unix_now};

/// Why a push failed, cheap to clone (one upload may have several waiters).
#[derive(Debug, Clone, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    InvalidName(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Failed(String),
}

type PushFuture = Shared<BoxFuture<'static, Result<WalPushResponse, PushError>>>;

/// Uploads WAL files for one data dir. Cheap to share.
pub struct WalArchiver {
    store: Store,
    layout: Layout,
    pg_wal: PathBuf,
    verify: VerifyMode,
    permits: Arc<Semaphore>,
    concurrency: usize,
    metrics: ArchiveMetrics,
    background: Background,
    state: Mutex<ArchiverState>,
    /// Set once the archive is known to belong to this data dir's database system.
    owner_checked: tokio::sync::OnceCell<()>,
}

#[derive(Default)]
struct ArchiverState {
    in_flight: HashMap<String, PushFuture>,
    /// Files stored and verified that Postgres may not have asked for yet.
    done: HashMap<String, WalPushResponse>,
    /// Files whose push Postgres got its answer for, while their `.ready` file may still be
    /// there (Postgres renames it to `.done` only after archive_command returns): the look-ahead
    /// must not upload them again (which would find the object stored and read it back whole).
    answered: HashSet<String>,
    last_archived: Option<(String, SystemTime)>,
    last_failure: Option<String>,
    failures: u64,
    ready: usize,
}

impl WalArchiver {
    pub fn new(
        store: Store,
        layout: Layout,
        data_dir: &Path,
        concurrency: usize,
        verify: VerifyMode,
        metrics: ArchiveMetrics,
        background: Background,
    ) -> Arc<WalArchiver> {
        Arc::new(WalArchiver {
            // Retries stop once the agent is stopping: Postgres' last archive_command calls
            // during its shutdown get one attempt each, not a backoff schedule.
            store: store.with_cancel(background.stopping().clone()),
            layout,
            pg_wal: data_dir.join("pg_wal"),
            verify,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            concurrency: concurrency.max(1),
            metrics,
            background,
            state: Mutex::new(ArchiverState::default()),
            owner_checked: tokio::sync::OnceCell::new(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The owner of the archive's background work (backups run there too).
    pub fn background(&self) -> &Background {
        &self.background
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Archives `name` (a file in pg_wal) and returns once it is stored and verified. Also
    /// starts uploading the files ready after it.
    pub async fn push(self: &Arc<Self>, name: &str) -> Result<WalPushResponse, PushError> {
        if !is_wal_name(name) {
            return Err(PushError::InvalidName(format!(
                "{name:?} is not a WAL segment, history, partial or backup history file name"
            )));
        }
        let started = Instant::now();
        let fut = {
            let mut st = self.state.lock().expect("archiver lock");
            if let Some(done) = st.done.remove(name) {
                st.answered.insert(name.to_string());
                return Ok(WalPushResponse {
                    ahead: true,
                    ..done
                });
            }
            self.start_locked(&mut st, name)
        };
        self.look_ahead();
        let mut result = fut.await;
        if let Ok(r) = &mut result {
            r.waited_ms = started.elapsed().as_millis() as u64;
        }
        // Postgres has its answer; the entry is no longer needed.
        {
            let mut st = self.state.lock().expect("archiver lock");
            st.done.remove(name);
            if result.is_ok() {
                st.answered.insert(name.to_string());
            }
        }
        result
    }

    /// Starts uploading every ready file that is neither done nor in flight, in order. Nothing
    /// once the agent is stopping.
    pub fn look_ahead(self: &Arc<Self>) {
        if self.background.is_stopping() {
            return;
        }
        let ready = match ready_files(&self.pg_wal) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot list {}/archive_status: {e}", self.pg_wal.display());
                return;
            }
        };
        let mut st = self.state.lock().expect("archiver lock");
        st.ready = ready.len();
        self.metrics.ready.set(ready.len() as i64);
        let ready_set: HashSet<&String> = ready.iter().collect();
        // Entries Postgres no longer lists as ready were answered (or the file is gone).
        st.done.retain(|name, _| ready_set.contains(name));
        st.answered.retain(|name| ready_set.contains(name));
        // Keep the window full: up to twice the concurrency in flight (half of them waiting for
        // a permit), so a permit freed by one upload is taken by the next file at once.
        let window = self.window();
        for name in &ready {
            if st.in_flight.len() >= window {
                break;
            }
            if st.done.contains_key(name)
                || st.in_flight.contains_key(name)
                || st.answered.contains(name)
            {
                continue;
            }
            // Driven by its own task; nobody waits for it here.
            drop(self.start_locked(&mut st, name));
        }
    }

    /// Uploads kept in flight by the look-ahead.
    fn window(&self) -> usize {
        2 * self.concurrency
    }

    fn start_locked(self: &Arc<Self>, st: &mut ArchiverState, name: &str) -> PushFuture {
        if let Some(f) = st.in_flight.get(name) {
            return f.clone();
        }
        let this = self.clone();
        let owned = name.to_string();
        let fut = async move {
            let result = this
                .background
                .guard(format!("upload of {owned}"), this.upload(&owned))
                .await
                .unwrap_or_else(|| {
                    Err(PushError::Failed(format!(
                        "upload of {owned} abandoned: the agent is stopping; Postgres keeps the file and asks again"
                    )))
                });
            {
                let mut st = this.state.lock().expect("archiver lock");
                st.in_flight.remove(&owned);
                match &result {
                    Ok(r) => {
                        st.done.insert(owned.clone(), r.clone());
                        st.last_archived = Some((owned.clone(), SystemTime::now()));
                    }
                    Err(e) => {
                        st.failures += 1;
                        st.last_failure = Some(e.to_string());
                    }
                }
            }
            // A slot is free: refill the window without waiting for Postgres' next call, so a
            // backlog drains at the store's pace, not at archive_command's. Only after a success:
            // after a failure the next push or the timer retries, not a hot loop.
            if result.is_ok() {
                this.look_ahead();
            }
            result
        }
        .boxed()
        .shared();
        st.in_flight.insert(name.to_string(), fut.clone());
        // Driven to its end by a task of its own, whoever waits for it: a caller that goes away
        // (an HTTP request) must not leave it half-polled, holding its codec workers.
        self.background.drive(fut.clone().map(|_| ()));
        fut
    }

    /// Archives the file `file` of pg_wal under the WAL name `name` (a drain's last segment as
    /// `<segment>.partial`), with the same create-only put and check as every push.
    pub async fn push_as(&self, file: &str, name: &str) -> Result<WalPushResponse, PushError> {
        if !is_wal_name(name) || !is_wal_name(file) {
            return Err(PushError::InvalidName(format!(
                "{file:?} as {name:?}: not WAL file names"
            )));
        }
        self.upload_file(&self.pg_wal.join(file), name).await
    }

    async fn upload(&self, name: &str) -> Result<WalPushResponse, PushError> {
        self.upload_file(&self.pg_wal.join(name), name).await
    }

    async fn upload_file(&self, path: &Path, name: &str) -> Result<WalPushResponse, PushError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| PushError::Failed("archiver closed".into()))?;
        let started = Instant::now();
        let key = self.layout.wal_key(name);
        let m = &self.metrics;
        if let Err(e) = self.check_owner().await {
            m.failures.inc();
            if matches!(e, IdentityError::Foreign { .. }) {
                m.conflicts.inc();
                tracing::error!(wal = name, "{e}");
                return Err(PushError::Conflict(e.to_string()));
            }
            tracing::warn!(wal = name, "archiving failed: {e}");
            return Err(PushError::Failed(e.to_string()));
        }
        let outcome = self.store.put_file(&key, path, PutMode::CreateOnly).await;
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                m.failures.inc();
                if let StoreError::Conflict { stored, local, .. } = &e {
                    m.conflicts.inc();
                    tracing::error!(
                        wal = name, stored_digest = %stored, local_digest = %local,
                        "the archive already holds {name} with different content: is another cluster archiving into {}? Refusing to overwrite it",
                        self.store
                    );
                    return Err(PushError::Conflict(e.to_string()));
                }
                tracing::warn!(wal = name, "archiving failed: {e}");
                return Err(PushError::Failed(e.to_string()));
            }
        };
        let summary = outcome.summary().clone();
        let already = matches!(outcome, PutOutcome::AlreadyStored(_));
        if !already && let Err(e) = self.check(&key, &summary).await {
            m.failures.inc();
            tracing::error!(wal = name, "stored object failed verification: {e}");
            return Err(PushError::Failed(format!(
                "{name} was written but failed verification: {e}"
            )));
        }
        let elapsed = started.elapsed();
        m.archived.inc();
        m.duration.observe(elapsed.as_secs_f64());
        m.bytes_read.inc_by(summary.plaintext_len);
        if !already {
            m.bytes_stored.inc_by(summary.stored_len);
        }
        m.last_archived.set(unix_now());
        tracing::debug!(
            wal = name,
            ?elapsed,
            already,
            stored = summary.stored_len,
            "archived"
        );
        Ok(WalPushResponse {
            name: name.to_string(),
            already_stored: already,
            ahead: false,
            digest: summary.digest_hex(),
            digest_kind: summary.digest_kind.name().to_owned(),
            size: summary.plaintext_len,
            stored_size: summary.stored_len,
            upload_ms: elapsed.as_millis() as u64,
            waited_ms: 0,
        })
    }

    /// Checks once that the archive belongs to this data dir's database system (its
    /// `global/pg_control`), recording it in an archive that has no owner yet.
    async fn check_owner(&self) -> Result<(), IdentityError> {
        self.owner_checked
            .get_or_try_init(|| async {
                let data_dir = self.pg_wal.parent().unwrap_or(Path::new("."));
                let local = identity::local_system_identifier(data_dir).map_err(|e| {
                    IdentityError::Store {
                        key: data_dir.join("global/pg_control").display().to_string(),
                        cause: e.to_string(),
                    }
                })?;
                identity::check(&self.store, &self.layout, &local.to_string()).await
            })
            .await
            .map(|_| ())
    }

    /// The check a push must pass before Postgres may delete the file.
    async fn check(
        &self,
        key: &str,
        summary: &pgpilot_common::archive::ArchiveSummary,
    ) -> Result<(), String> {
        match self.verify {
            VerifyMode::Size => match self.store.head(key).await {
                Ok(Some(info)) if info.size == summary.stored_len => Ok(()),
                Ok(Some(info)) => Err(format!(
                    "store reports {} bytes, {} were written",
                    info.size, summary.stored_len
                )),
                Ok(None) => Err("the store does not list the object just written".into()),
                Err(e) => Err(e.to_string()),
            },
            VerifyMode::Full => {
                let back = self.store.verify(key).await.map_err(|e| e.to_string())?;
                if back.digest == summary.digest && back.plaintext_len == summary.plaintext_len {
                    Ok(())
                } else {
                    Err(format!(
                        "read back digest {} differs from written {}",
                        back.digest_hex(),
                        summary.digest_hex()
                    ))
                }
            }
        }
    }

    pub fn status(&self) -> ArchiveStatus {
        let st = self.state.lock().expect("archiver lock");
        ArchiveStatus {
            store: self.store.url().to_string(),
            last_archived: st.last_archived.as_ref().map(|(n, _)| n.clone()),
            last_archived_at: st.last_archived.as_ref().map(|(_, t)| timestamp(*t)),
            last_archived_age_seconds: st
                .last_archived
                .as_ref()
                .and_then(|(_, t)| t.elapsed().ok())
                .map(|d| d.as_secs()),
            failures: st.failures,
            last_failure: st.last_failure.clone(),
            ready: st.ready,
            in_flight: st.in_flight.len(),
        }
    }

    /// Keeps the look-ahead and the ready gauge moving while Postgres waits between retries
    /// (after three failures its archiver sleeps a minute). Ends when the agent is stopping.
    pub async fn run_background(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.background.stopping().cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => self.look_ahead(),
            }
        }
    }
}

/// Ready files in archive order: history files first (small, and restore needs them to follow
/// timelines), then the rest by name (timeline, then position).
pub fn ready_files(pg_wal: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = match std::fs::read_dir(pg_wal.join("archive_status")) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".ready")
                    .map(str::to_string)
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    names.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
    Ok(names)
}

/// Whether `name` is a WAL file name for any segment size (1 MiB, the smallest, allows the
/// most segment numbers per log id).
pub fn is_wal_name(name: &str) -> bool {
    WalFile::parse(name, 1 << 20).is_some()
}

/// The direct path of `wal-push` when the agent cannot be reached: the same create-only put and
/// the same check, without look-ahead.
pub async fn push_direct(
    store: Store,
    layout: Layout,
    data_dir: &Path,
    name: &str,
    verify: VerifyMode,
) -> Result<WalPushResponse, PushError> {
    let archiver = WalArchiver::new(
        store,
        layout,
        data_dir,
        1,
        verify,
        crate::metrics::Metrics::new().archive,
        Background::default(),
    );
    if !is_wal_name(name) {
        return Err(PushError::InvalidName(format!(
            "{name:?} is not a WAL file name"
        )));
    }
    archiver.upload(name).await
}
