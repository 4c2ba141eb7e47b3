//! WAL fetching for recovery (restore_command). Postgres asks for one file at a time and
//! replays it before asking for the next, so a fetch that waits on the store stalls replay.
//! The fetcher downloads the requested file and the next `prefetch` segments into a spool dir
//! in the data dir (verified, fsynced, renamed into place), so the next requests are served
//! from local disk. `wal-fetch` then moves the spool file into the path Postgres gave.
//!
//! A file the archive does not hold is [`FetchError::NotFound`] (never retried); a damaged one
//! is refused naming the object, and nothing of it stays in the spool. Downloads run in tasks
//! of the archive's [`Background`]: no prefetch starts and nothing retries once the agent is
//! stopping, and what is still running when Postgres has stopped is abandoned (the spool is
//! only a cache, cleared at start).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use pgpilot_common::api::WalFetchResponse;
use pgpilot_common::layout::Layout;
use pgpilot_common::wal::{DEFAULT_SEGMENT_SIZE, Lsn, Segment, WalFile, parse_history};

use super::background::Background;
use crate::metrics::ArchiveMetrics;
use crate::postgres::OsUser;
use crate::store::{Caching, Durability, Store, StoreError};

/// Prefetch downloads in flight at once.
const PREFETCH_PARALLEL: usize = 2;

/// Spool directory name inside the data dir (excluded from base backups).
pub use crate::files::SPOOL_DIR;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    InvalidName(String),
    /// The archive does not hold the file: normal at the end of recovery.
    #[error("{0} is not in the archive")]
    NotFound(String),
    #[error("{0}")]
    Failed(String),
}

type FetchFuture = Shared<BoxFuture<'static, Result<(), FetchError>>>;

pub struct WalFetcher {
    /// Where WAL comes from: this cluster's archive, or another's during a `[bootstrap]`
    /// restore ([`WalFetcher::redirect`]).
    source: std::sync::RwLock<(Store, Layout)>,
    background_stopping: tokio_util::sync::CancellationToken,
    spool: PathBuf,
    prefetch: usize,
    owner: Option<OsUser>,
    seg_size: AtomicU64,
    metrics: ArchiveMetrics,
    in_flight: Mutex<HashMap<String, FetchFuture>>,
    background: Background,
    /// Prefetches run two at a time, in order (the semaphore is fair), so the next segment is
    /// ready first; the segment Postgres is waiting for does not queue behind them.
    prefetch_permits: Arc<tokio::sync::Semaphore>,
    /// Timeline history files read from the archive: present ones for good (they never
    /// change), absent ones for a few seconds.
    histories: Mutex<HashMap<u32, CachedHistory>>,
}

/// A timeline's history as read from the archive (`None`: absent), and when.
type CachedHistory = (Option<Vec<(u32, Lsn)>>, std::time::Instant);

/// How long "this timeline has no history file in the archive" is believed.
const ABSENT_HISTORY_TTL: std::time::Duration = std::time::Duration::from_secs(5);

impl WalFetcher {
    pub fn new(
        store: Store,
        layout: Layout,
        data_dir: &Path,
        prefetch: usize,
        owner: Option<OsUser>,
        metrics: ArchiveMetrics,
        background: Background,
    ) -> Arc<WalFetcher> {
        Arc::new(WalFetcher {
            source: std::sync::RwLock::new((
                store.with_cancel(background.stopping().clone()),
                layout,
            )),
            background_stopping: background.stopping().clone(),
            spool: data_dir.join(SPOOL_DIR),
            prefetch,
            owner,
            seg_size: AtomicU64::new(DEFAULT_SEGMENT_SIZE),
            metrics,
            in_flight: Mutex::new(HashMap::new()),
            background,
            prefetch_permits: Arc::new(tokio::sync::Semaphore::new(PREFETCH_PARALLEL)),
            histories: Mutex::new(HashMap::new()),
        })
    }

    /// The archive WAL is read from, now.
    fn source(&self) -> (Store, Layout) {
        self.source.read().expect("fetch source lock").clone()
    }

    /// Reads WAL from another archive from now on (a `[bootstrap]` restore, and back to this
    /// cluster's own once it is done). Cached histories are forgotten.
    pub fn redirect(&self, store: Store, layout: Layout) {
        *self.source.write().expect("fetch source lock") =
            (store.with_cancel(self.background_stopping.clone()), layout);
        self.histories.lock().expect("history lock").clear();
    }

    /// The history of `timeline` in the archive, if it has one (cached).
    async fn history(&self, timeline: u32) -> Result<Option<Vec<(u32, Lsn)>>, FetchError> {
        if let Some((h, at)) = self.histories.lock().expect("history lock").get(&timeline)
            && (h.is_some() || at.elapsed() < ABSENT_HISTORY_TTL)
        {
            return Ok(h.clone());
        }
        let name = format!("{timeline:08X}.history");
        let (store, layout) = self.source();
        let h = match store.get_bytes(&layout.wal_key(&name)).await {
            Ok((bytes, _)) => Some(parse_history(&String::from_utf8_lossy(&bytes))),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(FetchError::Failed(format!("reading {name}: {e}"))),
        };
        self.histories
            .lock()
            .expect("history lock")
            .insert(timeline, (h.clone(), std::time::Instant::now()));
        Ok(h)
    }

    /// A segment of timeline T inside which a standby was promoted (a later timeline's history
    /// says T ended there, and the promoted instance archived its copy as `.partial`) is never
    /// served whole: a whole copy can only come from the old primary, and holds writes after
    /// the promotion point that the new timeline does not have (a former primary's, after two
    /// writers or an asynchronous failover). Refusing it makes recovery take the segment from
    /// the new timeline (archive or streaming) instead of replaying them. A timeline forked by
    /// a point-in-time restore leaves no `.partial`: its parent's segments stay served.
    async fn forked_inside(&self, seg: Segment) -> Result<Option<String>, FetchError> {
        let seg_size = self.seg_size.load(Ordering::Relaxed);
        let mut later = seg.timeline + 1;
        while let Some(history) = self.history(later).await? {
            if let Some((_, at)) = history.iter().find(|(tl, _)| *tl == seg.timeline)
                && Segment::containing(seg.timeline, *at, seg_size) == seg
                && at.0 % seg_size != 0
                && self.promoted_inside(seg).await?
            {
                return Ok(Some(format!(
                    "timeline {} ended at {at} inside this segment, where timeline {later} was \
                     promoted (.partial archived): a whole copy holds the old primary's WAL after that",
                    seg.timeline
                )));
            }
            later += 1;
        }
        Ok(None)
    }

    /// The WAL segment size, once known (it decides which name comes next).
    pub fn set_segment_size(&self, size: u64) {
        self.seg_size.store(size, Ordering::Relaxed);
    }

    /// Clears the spool: files left from an earlier recovery must not be served to a new one.
    pub fn reset_spool(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.spool) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    fn ensure_spool(&self) -> Result<(), FetchError> {
        if self.spool.is_dir() {
            return Ok(());
        }
        crate::postgres::bootstrap::prepare_dir(&self.spool, 0o700, self.owner.as_ref()).map_err(
            |e| {
                FetchError::Failed(format!(
                    "cannot create the spool {}: {e}",
                    self.spool.display()
                ))
            },
        )
    }

    /// Makes `name` available in the spool and returns where; starts prefetching what follows.
    pub async fn fetch(self: &Arc<Self>, name: &str) -> Result<WalFetchResponse, FetchError> {
        let seg_size = self.seg_size.load(Ordering::Relaxed);
        let Some(file) = WalFile::parse(name, 1 << 20) else {
            return Err(FetchError::InvalidName(format!(
                "{name:?} is not a WAL file name"
            )));
        };
        self.ensure_spool()?;
        let path = self.spool.join(name);
        let (fut, prefetched) = {
            let mut in_flight = self.in_flight.lock().expect("fetch lock");
            if path.exists() {
                (None, true)
            } else if let Some(f) = in_flight.get(name) {
                (Some(f.clone()), true)
            } else {
                (Some(self.start_locked(&mut in_flight, name, false)), false)
            }
        };
        if prefetched {
            self.metrics.prefetch_hits.inc();
        } else {
            self.metrics.prefetch_misses.inc();
        }
        // Prefetch only follows segments; the name is parsed again with the real size. Nothing
        // new starts once the agent is stopping.
        if !self.background.is_stopping()
            && let Some(seg) = WalFile::parse(name, seg_size).and_then(|f| match f {
                WalFile::Segment(s) => Some(s),
                _ => None,
            })
        {
            self.prune_before(seg.name(seg_size).as_str());
            let mut next = seg;
            let mut in_flight = self.in_flight.lock().expect("fetch lock");
            for _ in 0..self.prefetch {
                next = next.next();
                let n = next.name(seg_size);
                if !self.spool.join(&n).exists() && !in_flight.contains_key(&n) {
                    // Driven by its own task; nobody waits for it here.
                    drop(self.start_locked(&mut in_flight, &n, true));
                }
            }
        }
        let _ = file;
        if let Some(fut) = fut {
            fut.await?;
        }
        self.metrics.fetched.inc();
        Ok(WalFetchResponse {
            name: name.to_string(),
            spool_path: path.display().to_string(),
            prefetched,
        })
    }

    fn start_locked(
        self: &Arc<Self>,
        in_flight: &mut HashMap<String, FetchFuture>,
        name: &str,
        queued: bool,
    ) -> FetchFuture {
        let this = self.clone();
        let owned = name.to_string();
        let what = if queued { "prefetch" } else { "fetch" };
        let fut = async move {
            let download = async {
                let _permit = if queued {
                    this.prefetch_permits.clone().acquire_owned().await.ok()
                } else {
                    None
                };
                this.download(&owned).await
            };
            let result = this
                .background
                .guard(format!("{what} of {owned}"), download)
                .await
                .unwrap_or_else(|| {
                    Err(FetchError::Failed(format!(
                        "{what} of {owned} abandoned: the agent is stopping"
                    )))
                });
            this.in_flight.lock().expect("fetch lock").remove(&owned);
            result
        }
        .boxed()
        .shared();
        in_flight.insert(name.to_string(), fut.clone());
        // Driven to its end by a task of its own (see `WalArchiver::start_locked`).
        self.background.drive(fut.clone().map(|_| ()));
        fut
    }

    /// The archive holds `<segment>.partial`: a standby was promoted inside it.
    async fn promoted_inside(&self, seg: Segment) -> Result<bool, FetchError> {
        let name = format!(
            "{}.partial",
            seg.name(self.seg_size.load(Ordering::Relaxed))
        );
        let (store, layout) = self.source();
        match store.head(&layout.wal_key(&name)).await {
            Ok(found) => Ok(found.is_some()),
            Err(e) => Err(FetchError::Failed(format!("looking for {name}: {e}"))),
        }
    }

    async fn download(&self, name: &str) -> Result<(), FetchError> {
        let seg_size = self.seg_size.load(Ordering::Relaxed);
        if let Some(WalFile::Segment(seg)) = WalFile::parse(name, seg_size)
            && let Some(why) = self.forked_inside(seg).await?
        {
            tracing::warn!(wal = name, "not served from the archive: {why}");
            return Err(FetchError::NotFound(name.to_string()));
        }
        // The final name must only ever appear for a file Postgres can read: download under a
        // temporary name (verified, fsynced), hand it to the Postgres user, then rename.
        let target = self.spool.join(name);
        let partial = self.spool.join(format!("{name}.download"));
        let failed = |e: std::io::Error| FetchError::Failed(format!("{}: {e}", partial.display()));
        let (store, layout) = self.source();
        // No fsync: a spooled file lost in a crash is fetched again.
        match store
            .get_to_file_with(
                &layout.wal_key(name),
                &partial,
                Durability::Deferred,
                Caching::Cached,
            )
            .await
        {
            Ok(_) => {
                let data_dir = self.spool.parent().unwrap_or(Path::new("."));
                if let Err(why) = check_restored_segment(data_dir, name, &partial) {
                    let _ = std::fs::remove_file(&partial);
                    let key = layout.wal_key(name);
                    tracing::error!(wal = name, "refusing {key}: {why}");
                    return Err(FetchError::Failed(format!("{key}: {why}")));
                }
                std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600))
                    .map_err(failed)?;
                if let Some(owner) = &self.owner {
                    owner.chown(&partial).map_err(failed)?;
                }
                std::fs::rename(&partial, &target).map_err(failed)?;
                Ok(())
            }
            Err(StoreError::NotFound { .. }) => Err(FetchError::NotFound(name.to_string())),
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                tracing::warn!(wal = name, "fetching from the archive failed: {e}");
                Err(FetchError::Failed(e.to_string()))
            }
        }
    }

    /// Removes spooled segments before `name`: Postgres will not ask for them again.
    fn prune_before(&self, name: &str) {
        let Ok(rd) = std::fs::read_dir(&self.spool) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.len() == 24 && n.as_str() < name && n.get(..8) == name.get(..8) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The direct path of `wal-fetch` when the agent cannot be reached: download straight into
/// `dest` (temp file, verify, fsync, rename).
pub async fn fetch_direct(
    store: &Store,
    layout: &Layout,
    name: &str,
    dest: &Path,
) -> Result<(), FetchError> {
    if WalFile::parse(name, 1 << 20).is_none() {
        return Err(FetchError::InvalidName(format!(
            "{name:?} is not a WAL file name"
        )));
    }
    let key = layout.wal_key(name);
    match store.get_to_file(&key, dest).await {
        // restore_command runs in the data dir.
        Ok(_) => check_restored_segment(Path::new("."), name, dest).map_err(|why| {
            let _ = std::fs::remove_file(dest);
            FetchError::Failed(format!("{key}: {why}"))
        }),
        Err(StoreError::NotFound { .. }) => Err(FetchError::NotFound(name.to_string())),
        Err(e) => Err(FetchError::Failed(e.to_string())),
    }
}

/// Checks that the file restored as WAL file `name` at `path` is that segment of this data
/// dir's database system (`global/pg_control`; unchecked when it cannot be read), so that a
/// swapped or foreign object is an error rather than an early end of recovery
/// ([`pgpilot_common::wal::check_segment`]).
fn check_restored_segment(data_dir: &Path, name: &str, path: &Path) -> Result<(), String> {
    use pgpilot_common::wal::{SegmentHeader, check_segment};
    use std::io::Read;
    let mut first = Vec::with_capacity(SegmentHeader::LEN);
    std::fs::File::open(path)
        .and_then(|f| f.take(SegmentHeader::LEN as u64).read_to_end(&mut first))
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    let sysid = super::identity::local_system_identifier(data_dir).ok();
    check_segment(name, &first, sysid)
}
