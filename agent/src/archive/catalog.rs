//! What the store holds: backups (complete = manifest present, or only objects) and archived
//! WAL, and from them the recoverability window. Reading is one listing of the backups prefix,
//! one of the WAL prefix and one small get per manifest; the window itself is computed by pure
//! functions ([`window`], [`chain`]) that retention and verify share.

use std::collections::BTreeMap;
use std::time::SystemTime;

use futures::{StreamExt, TryStreamExt};
use pgpilot_common::api::{
    BackupInfo, BackupList, BackupPhase, BackupProgress, BackupState, LastBackup, RecoveryWindow,
};
use pgpilot_common::layout::Layout;
use pgpilot_common::manifest::BackupManifest;
use pgpilot_common::wal::{Segment, WalFile};

use crate::store::{ObjectInfo, Store, StoreError};
use crate::time::timestamp;

/// One backup id in the store.
#[derive(Debug, Clone)]
pub struct StoredBackup {
    pub id: String,
    /// Present and readable: the backup is complete.
    pub manifest: Option<BackupManifest>,
    /// Why a present manifest could not be used (tampered, wrong key, not JSON).
    pub manifest_error: Option<String>,
    /// Every object under the backup's prefix (manifest included).
    pub objects: Vec<ObjectInfo>,
}

impl StoredBackup {
    pub fn stored_size(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }

    pub fn is_complete(&self) -> bool {
        self.manifest.is_some()
    }

    fn first_modified(&self) -> Option<SystemTime> {
        self.objects.iter().map(|o| o.last_modified).min()
    }

    fn last_modified(&self) -> Option<SystemTime> {
        self.objects.iter().map(|o| o.last_modified).max()
    }
}

/// An archived WAL file.
#[derive(Debug, Clone)]
pub struct WalObject {
    /// The WAL file name (`000000010000000000000003`, `00000002.history`, ...).
    pub name: String,
    pub key: String,
    pub size: u64,
    pub last_modified: SystemTime,
}

/// Backups (by id, oldest first) and WAL (by name).
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub backups: Vec<StoredBackup>,
    pub wal: Vec<WalObject>,
}

impl Catalog {
    pub fn complete(&self) -> impl Iterator<Item = (&StoredBackup, &BackupManifest)> {
        self.backups
            .iter()
            .filter_map(|b| b.manifest.as_ref().map(|m| (b, m)))
    }

    pub fn get(&self, id: &str) -> Option<&StoredBackup> {
        self.backups.iter().find(|b| b.id == id)
    }
}

/// Reads the catalog: one listing of the backups, one of the WAL, the manifests.
pub async fn load(store: &Store, layout: &Layout) -> Result<Catalog, StoreError> {
    let backups = load_backups(store, layout, None).await?;
    let wal = list_wal(store, layout).await?;
    Ok(Catalog { backups, wal })
}

/// Every archived WAL object, by name.
pub async fn list_wal(store: &Store, layout: &Layout) -> Result<Vec<WalObject>, StoreError> {
    let mut wal: Vec<WalObject> = store
        .list(&layout.wal_prefix())
        .await?
        .into_iter()
        .filter_map(|o| {
            Some(WalObject {
                name: layout.wal_name(&o.key)?.to_string(),
                key: o.key,
                size: o.size,
                last_modified: o.last_modified,
            })
        })
        .collect();
    wal.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(wal)
}

/// The backups under the backups prefix (or only `only`), with their manifests read.
pub async fn load_backups(
    store: &Store,
    layout: &Layout,
    only: Option<&str>,
) -> Result<Vec<StoredBackup>, StoreError> {
    let prefix = match only {
        Some(id) => layout.backup_prefix(id),
        None => layout.backups_prefix(),
    };
    let base = layout.backups_prefix();
    let mut by_id: BTreeMap<String, Vec<ObjectInfo>> = BTreeMap::new();
    for o in store.list(&prefix).await? {
        let Some((id, _)) = o.key.strip_prefix(&base).and_then(|r| r.split_once('/')) else {
            continue;
        };
        by_id.entry(id.to_string()).or_default().push(o);
    }
    futures::stream::iter(by_id)
        .map(|(id, objects)| async move {
            let key = layout.manifest_key(&id);
            let (manifest, manifest_error) = if objects.iter().any(|o| o.key == key) {
                match read_manifest(store, &key, &id).await {
                    Ok(m) => (Some(m), None),
                    Err(e) => (None, Some(e)),
                }
            } else {
                (None, None)
            };
            Ok::<_, StoreError>(StoredBackup {
                id,
                manifest,
                manifest_error,
                objects,
            })
        })
        .buffered(8)
        .try_collect()
        .await
}

/// Reads and checks a manifest. Errors are text: a bad manifest makes its backup unusable, not
/// the listing fail.
async fn read_manifest(store: &Store, key: &str, id: &str) -> Result<BackupManifest, String> {
    let (bytes, _) = store
        .get_bytes(key)
        .await
        .map_err(|e| format!("manifest unreadable: {e}"))?;
    let m: BackupManifest = serde_json::from_slice(&bytes)
        .map_err(|e| format!("manifest {} is not valid: {e}", store.object_name(key)))?;
    if m.id != id {
        return Err(format!(
            "manifest {} names backup {}, not {id}",
            store.object_name(key),
            m.id
        ));
    }
    Ok(m)
}

/// The newest complete backup, reading only its manifest.
pub async fn newest_completed(
    store: &Store,
    layout: &Layout,
) -> Result<Option<LastBackup>, StoreError> {
    let base = layout.backups_prefix();
    let mut ids: Vec<String> = store
        .list(&base)
        .await?
        .into_iter()
        .filter_map(|o| {
            let (id, rest) = o.key.strip_prefix(&base)?.split_once('/')?;
            (format!("{}{rest}", layout.backup_prefix(id)) == layout.manifest_key(id))
                .then(|| id.to_string())
        })
        .collect();
    ids.sort();
    for id in ids.iter().rev() {
        if let Ok(m) = read_manifest(store, &layout.manifest_key(id), id).await {
            return Ok(Some(LastBackup {
                id: m.id,
                time: m.stop_time,
            }));
        }
    }
    Ok(None)
}

// ----- pure: listing, chain, window -----

/// The contiguous WAL chain from a start segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The segments found, in order (names as archived).
    pub segments: Vec<(Segment, String)>,
    /// The first segment missing after them, when the archive holds a later segment (a hole,
    /// not just the archive's head).
    pub gap: Option<String>,
    /// The segment the walk stopped at (missing), whether or not later segments exist.
    pub next_missing: String,
}

/// Walks the archived segments from `start`, following timeline switches: where the current
/// timeline has no segment at a position but a higher one does (after a promotion the old
/// timeline ends in a `.partial` and the new one carries on), the walk moves to the highest.
pub fn chain(wal: &[WalObject], start: Segment, seg_size: u64) -> Chain {
    let mut at: BTreeMap<u64, BTreeMap<u32, &str>> = BTreeMap::new();
    for w in wal {
        if let Some(WalFile::Segment(s)) = WalFile::parse(&w.name, seg_size) {
            at.entry(s.segno)
                .or_default()
                .insert(s.timeline, w.name.as_str());
        }
    }
    let mut cur = start;
    let mut segments = Vec::new();
    loop {
        let found = at.get(&cur.segno).and_then(|tls| {
            tls.get(&cur.timeline)
                .map(|n| (cur.timeline, *n))
                .or_else(|| {
                    tls.range(cur.timeline + 1..)
                        .next_back()
                        .map(|(t, n)| (*t, *n))
                })
        });
        match found {
            Some((tl, name)) => {
                cur.timeline = tl;
                segments.push((cur, name.to_string()));
                cur = cur.next();
            }
            None => break,
        }
    }
    let later = at.range(cur.segno + 1..).next().is_some();
    let missing = cur.name(seg_size);
    Chain {
        segments,
        gap: later.then(|| missing.clone()),
        next_missing: missing,
    }
}

/// The recoverability window: from the oldest complete backup's stop to the end of the
/// contiguous WAL chain from its first segment.
pub fn window(cat: &Catalog) -> Option<RecoveryWindow> {
    let (_, m) = cat.complete().next()?;
    let seg = m.wal_segment_size;
    let (first, last) = m.wal_range()?;
    let c = chain(&cat.wal, first, seg);
    let end = c.segments.last();
    let latest_archived_at = end.and_then(|(_, name)| {
        cat.wal
            .iter()
            .find(|w| &w.name == name)
            .map(|w| timestamp(w.last_modified))
    });
    Some(RecoveryWindow {
        earliest_backup: m.id.clone(),
        earliest_lsn: m.stop_lsn.clone(),
        earliest_time: m.stop_time.clone(),
        latest_lsn: end.map(|(s, _)| s.end_lsn(seg).to_string()),
        latest_segment: end.map(|(_, n)| n.clone()),
        latest_archived_at,
        first_gap: c.gap,
        consistent: end.is_some_and(|(s, _)| s.segno >= last.segno),
    })
}

/// One stored backup as the API lists it; `run` is this agent's record of it, if any.
pub fn info(b: &StoredBackup, run: Option<&BackupProgress>) -> BackupInfo {
    let stored_size = b.stored_size();
    if let Some(m) = &b.manifest {
        return BackupInfo {
            id: b.id.clone(),
            state: BackupState::Completed,
            label: Some(m.label.clone()),
            start_time: Some(m.start_time.clone()),
            stop_time: Some(m.stop_time.clone()),
            start_lsn: Some(m.start_lsn.clone()),
            stop_lsn: Some(m.stop_lsn.clone()),
            timeline: Some(m.timeline),
            wal_start: Some(m.wal_start.clone()),
            wal_end: Some(m.wal_end.clone()),
            size: Some(m.total_size),
            stored_size,
            files: m.files.len() as u64,
            postgres_version: Some(m.postgres_version.clone()),
            reason: None,
        };
    }
    let (state, reason) = match run {
        Some(r) if r.state == BackupState::Running => (BackupState::Running, None),
        Some(r) if r.state == BackupState::Failed => (BackupState::Failed, r.reason.clone()),
        _ => (
            BackupState::Incomplete,
            Some(b.manifest_error.clone().unwrap_or_else(|| {
                "no manifest: the run did not finish (agent stopped or killed midway?)".into()
            })),
        ),
    };
    BackupInfo {
        id: b.id.clone(),
        state,
        label: run.and_then(|r| r.label.clone()),
        start_time: b.first_modified().map(timestamp),
        stop_time: b.last_modified().map(timestamp),
        start_lsn: run.and_then(|r| r.start_lsn.clone()),
        stop_lsn: None,
        timeline: None,
        wal_start: None,
        wal_end: None,
        size: None,
        stored_size,
        files: b
            .objects
            .iter()
            .filter(|o| o.key.contains("/data/"))
            .count() as u64,
        postgres_version: None,
        reason,
    }
}

/// `GET /v1/backups`: the store's backups merged with this agent's runs (a run that failed
/// before storing anything still shows), and the window.
pub fn list(cat: &Catalog, runs: &BTreeMap<String, BackupProgress>) -> BackupList {
    let mut backups: BTreeMap<String, BackupInfo> = cat
        .backups
        .iter()
        .map(|b| (b.id.clone(), info(b, runs.get(&b.id))))
        .collect();
    // Runs with nothing in the store: running (nothing uploaded yet) or failed early. A
    // completed run missing from the store was deleted (retention): not listed.
    for (id, r) in runs
        .iter()
        .filter(|(_, r)| r.state != BackupState::Completed)
    {
        backups.entry(id.clone()).or_insert_with(|| BackupInfo {
            id: id.clone(),
            state: r.state,
            label: r.label.clone(),
            start_time: r.started_at.clone(),
            stop_time: r.finished_at.clone(),
            start_lsn: r.start_lsn.clone(),
            stop_lsn: r.stop_lsn.clone(),
            timeline: None,
            wal_start: None,
            wal_end: None,
            size: None,
            stored_size: r.stored_bytes,
            files: r.files_done,
            postgres_version: None,
            reason: r.reason.clone(),
        });
    }
    BackupList {
        backups: backups.into_values().collect(),
        window: window(cat),
    }
}

/// `GET /v1/backups/{id}` for a backup this agent did not take (or no longer remembers).
pub fn progress_from_store(b: &StoredBackup) -> BackupProgress {
    let i = info(b, None);
    let (size, files) = match &b.manifest {
        Some(m) => (m.total_size, m.files.len() as u64),
        None => (0, i.files),
    };
    BackupProgress {
        id: i.id,
        label: i.label,
        state: i.state,
        phase: if b.manifest.is_some() {
            BackupPhase::Done
        } else {
            BackupPhase::Copying
        },
        reason: i.reason,
        started_at: i.start_time,
        finished_at: i.stop_time,
        bytes_done: size,
        bytes_total: size,
        files_done: files,
        files_total: files,
        stored_bytes: i.stored_size,
        start_lsn: i.start_lsn,
        stop_lsn: i.stop_lsn,
    }
}

/// Backup ids are what [`super::backup`] generates: a timestamp and maybe a suffix. Anything
/// else cannot name a backup (and must not reach the store as a key).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pgpilot_common::manifest::MANIFEST_FORMAT;
    use pgpilot_common::wal::DEFAULT_SEGMENT_SIZE as SZ;

    pub fn wal(names: &[&str]) -> Vec<WalObject> {
        names
            .iter()
            .map(|n| WalObject {
                name: n.to_string(),
                key: format!("c/0/wal/{n}.pgpilot"),
                size: 100,
                last_modified: SystemTime::UNIX_EPOCH,
            })
            .collect()
    }

    pub fn manifest(id: &str, start: &str, end: &str, stop_time: &str) -> BackupManifest {
        BackupManifest {
            format: MANIFEST_FORMAT,
            id: id.into(),
            label: "l".into(),
            status: "completed".into(),
            start_time: stop_time.into(),
            stop_time: stop_time.into(),
            start_lsn: "0/0".into(),
            stop_lsn: "0/0".into(),
            timeline: 1,
            postgres_version: "17.6".into(),
            postgres_major: 17,
            system_identifier: "1".into(),
            wal_segment_size: SZ,
            wal_start: start.into(),
            wal_end: end.into(),
            directories: vec![],
            files: vec![],
            total_size: 0,
            total_stored_size: 0,
        }
    }

    pub fn backup(id: &str, m: Option<BackupManifest>) -> StoredBackup {
        StoredBackup {
            id: id.into(),
            manifest: m,
            manifest_error: None,
            objects: vec![ObjectInfo {
                key: format!("c/0/backups/{id}/data/PG_VERSION.pgpilot"),
                size: 10,
                last_modified: SystemTime::UNIX_EPOCH,
            }],
        }
    }

    #[test]
    fn chain_stops_at_the_first_gap_and_follows_timelines() {
        let w = wal(&[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000004.partial",
            "00000002.history",
            "000000020000000000000004",
            "000000020000000000000005",
            "000000020000000000000007",
        ]);
        let start = Segment {
            timeline: 1,
            segno: 2,
        };
        let c = chain(&w, start, SZ);
        let names: Vec<&str> = c.segments.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "000000010000000000000002",
                "000000010000000000000003",
                "000000020000000000000004",
                "000000020000000000000005"
            ]
        );
        assert_eq!(c.gap.as_deref(), Some("000000020000000000000006"));
        let c = chain(&w[..2], start, SZ);
        assert_eq!(c.gap, None);
        assert_eq!(c.next_missing, "000000010000000000000004");
    }

    #[test]
    fn window_runs_from_the_oldest_backup_to_the_chain_end() {
        let cat = Catalog {
            backups: vec![
                backup("20260101T000000Z", None),
                backup(
                    "20260102T000000Z",
                    Some(manifest(
                        "20260102T000000Z",
                        "000000010000000000000002",
                        "000000010000000000000003",
                        "2026-01-02T00:00:00Z",
                    )),
                ),
            ],
            wal: wal(&[
                "000000010000000000000002",
                "000000010000000000000003",
                "000000010000000000000004",
            ]),
        };
        let w = window(&cat).unwrap();
        assert_eq!(w.earliest_backup, "20260102T000000Z");
        assert_eq!(
            w.latest_segment.as_deref(),
            Some("000000010000000000000004")
        );
        assert_eq!(w.latest_lsn.as_deref(), Some("0/5000000"));
        assert!(w.consistent);
        assert_eq!(w.first_gap, None);

        let mut short = cat.clone();
        short.wal.truncate(1);
        assert!(!window(&short).unwrap().consistent);
        short.wal.clear();
        let w = window(&short).unwrap();
        assert_eq!(w.latest_lsn, None);
        assert!(!w.consistent);

        let list = list(&cat, &BTreeMap::new());
        assert_eq!(list.backups[0].state, BackupState::Incomplete);
        assert_eq!(list.backups[1].state, BackupState::Completed);
        assert!(window(&Catalog::default()).is_none());
    }

    #[test]
    fn ids_are_checked_before_they_become_keys() {
        assert!(valid_id("20261123T181500Z"));
        assert!(valid_id("20261123T181500Z-1"));
        for bad in ["", "..", "a/b", "x y", "%2F"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
