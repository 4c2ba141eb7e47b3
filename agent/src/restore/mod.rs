//! Point-in-time restore: choose the backup, check that the target can be reached, download and
//! verify the base backup, and write the recovery settings. [`run`] is the operation the
//! executor drives: it starts Postgres in recovery and follows it to promotion.
//!
//! Every refusal happens in [`plan`], before anything is stopped or deleted: no complete backup,
//! a target before the earliest backup or after the last archived WAL, a gap in the WAL chain
//! (named), a timeline without its history file, a wrong or missing encryption key.

pub mod cli;
pub mod run;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use futures::StreamExt;
use pgpilot_common::api::{RestorePhase, RestoreProgress, RestoreRequest, RestoreTarget};
use pgpilot_common::layout::Layout;
use pgpilot_common::manifest::BackupManifest;
use pgpilot_common::wal::Lsn;

use crate::archive::catalog::{self, Catalog};
use crate::config::Config;
use crate::postgres::OsUser;
use crate::store::{Caching, Durability, Store};
use crate::time::timestamp;

use crate::files::{RECOVERY_CONF, RECOVERY_SIGNAL, STANDBY_SIGNAL};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The request cannot be carried out; nothing was touched.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

impl From<RestoreError> for crate::error::AgentError {
    fn from(e: RestoreError) -> Self {
        match e {
            RestoreError::Refused(m) => crate::error::AgentError::Refused(m),
            RestoreError::Failed(m) => crate::error::AgentError::Failed(m),
        }
    }
}

fn refused(msg: impl Into<String>) -> RestoreError {
    RestoreError::Refused(msg.into())
}

/// What will be restored and where recovery stops.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub manifest: BackupManifest,
    pub target: RestoreTarget,
    /// The target as Postgres settings.
    pub settings: Vec<(String, String)>,
    /// In words, for humans.
    pub description: String,
}

/// Checks the request against the store and chooses the backup. Touches nothing.
pub async fn plan(
    store: &Store,
    layout: &Layout,
    req: &RestoreRequest,
) -> Result<RestorePlan, RestoreError> {
    let cat = catalog::load(store, layout)
        .await
        .map_err(|e| refused(format!("cannot read the backup catalog in {store}: {e}")))?;
    let complete: Vec<&BackupManifest> = cat.complete().map(|(_, m)| m).collect();
    if complete.is_empty() {
        let why = cat
            .backups
            .iter()
            .find_map(|b| b.manifest_error.clone())
            .map(|e| format!(" (a manifest could not be read: {e})"))
            .unwrap_or_default();
        return Err(refused(format!("no complete backup in {store}{why}")));
    }
    let earliest = complete[0];

    // The target, parsed.
    let time = match &req.target {
        RestoreTarget::Time { time } => Some(parse_time(time)?),
        _ => None,
    };
    let lsn = match &req.target {
        RestoreTarget::Lsn { lsn } => Some(Lsn::parse(lsn).ok_or_else(|| {
            refused(format!(
                "target LSN {lsn:?} is not a WAL position like 16/B374D848"
            ))
        })?),
        _ => None,
    };
    if let RestoreTarget::Xid { xid } = &req.target
        && xid.parse::<u64>().is_err()
    {
        return Err(refused(format!(
            "target XID {xid:?} is not a transaction id"
        )));
    }
    if let RestoreTarget::Name { name } = &req.target
        && (name.is_empty() || name.len() > 63)
    {
        return Err(refused("a restore point name has 1 to 63 characters"));
    }

    // The backup: the one asked for, or the newest that is consistent before the target.
    let stop_time = |m: &BackupManifest| parse_time(&m.stop_time).ok();
    let manifest: &BackupManifest = match &req.backup_id {
        Some(id) => {
            let Some(b) = cat.get(id) else {
                return Err(refused(format!("backup {id} does not exist in {store}")));
            };
            match &b.manifest {
                Some(m) => m,
                None => {
                    let why = b
                        .manifest_error
                        .clone()
                        .unwrap_or_else(|| "it has no manifest (incomplete or failed)".into());
                    return Err(refused(format!("backup {id} cannot be restored: {why}")));
                }
            }
        }
        None => {
            let candidates = complete.iter().rev().copied();
            let chosen = if let Some(t) = time {
                candidates
                    .clone()
                    .find(|m| stop_time(m).is_some_and(|s| s <= t))
            } else if let Some(l) = lsn {
                candidates
                    .clone()
                    .find(|m| m.stop_lsn().is_some_and(|s| s <= l))
            } else {
                complete.last().copied()
            };
            chosen.ok_or_else(|| {
                refused(format!(
                    "target {} is before the earliest backup: {} is consistent only from {} ({}); nothing can restore to an earlier point",
                    describe(&req.target),
                    earliest.id,
                    earliest.stop_time,
                    earliest.stop_lsn
                ))
            })?
        }
    };
    if let Some(t) = time
        && stop_time(manifest).is_some_and(|s| t < s)
    {
        return Err(refused(format!(
            "target time {} is before backup {} became consistent ({})",
            req_time(&req.target),
            manifest.id,
            manifest.stop_time
        )));
    }
    if let (Some(l), Some(s)) = (lsn, manifest.stop_lsn())
        && l < s
    {
        return Err(refused(format!(
            "target LSN {l} is before backup {} became consistent ({s})",
            manifest.id
        )));
    }

    // The WAL chain from the backup's first segment: no gap before the backup is consistent,
    // and it reaches the target.
    check_chain(&cat, manifest, &req.target, time, lsn)?;

    // The timeline asked for must have its history in the archive.
    let timeline = req.timeline.clone().unwrap_or_else(|| "latest".into());
    if timeline != "latest" && timeline != "current" {
        let tli: u32 = timeline.parse().map_err(|_| {
            refused(format!(
                "timeline {timeline:?} is not latest, current or a number"
            ))
        })?;
        let history = format!("{tli:08X}.history");
        if tli > 1 && tli != manifest.timeline && !cat.wal.iter().any(|w| w.name == history) {
            return Err(refused(format!(
                "timeline {tli} has no history file ({history}) in the archive"
            )));
        }
    }

    // Keys: the manifest was readable; make sure the first WAL segment is too (WAL may have been
    // written under another key).
    store
        .verify(&layout.wal_key(&manifest.wal_start))
        .await
        .map_err(|e| {
            refused(format!(
                "the backup's first WAL segment cannot be read: {e}"
            ))
        })?;

    let mut settings: Vec<(String, String)> = match &req.target {
        RestoreTarget::Latest => vec![],
        RestoreTarget::Immediate => vec![("recovery_target".into(), "immediate".into())],
        RestoreTarget::Time { .. } => {
            let t = time.expect("parsed above");
            vec![(
                "recovery_target_time".into(),
                t.strftime("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
            )]
        }
        RestoreTarget::Lsn { .. } => vec![(
            "recovery_target_lsn".into(),
            lsn.expect("parsed above").to_string(),
        )],
        RestoreTarget::Xid { xid } => vec![("recovery_target_xid".into(), xid.clone())],
        RestoreTarget::Name { name } => vec![("recovery_target_name".into(), name.clone())],
    };
    if !matches!(req.target, RestoreTarget::Latest | RestoreTarget::Immediate) {
        let inclusive = req.inclusive.unwrap_or(true);
        settings.push((
            "recovery_target_inclusive".into(),
            if inclusive { "on" } else { "off" }.into(),
        ));
    }
    settings.push(("recovery_target_timeline".into(), timeline));
    settings.push(("recovery_target_action".into(), "promote".into()));
    let description = format!("{} from backup {}", describe(&req.target), manifest.id);
    Ok(RestorePlan {
        manifest: manifest.clone(),
        target: req.target.clone(),
        settings,
        description,
    })
}

fn check_chain(
    cat: &Catalog,
    m: &BackupManifest,
    target: &RestoreTarget,
    time: Option<jiff::Timestamp>,
    lsn: Option<Lsn>,
) -> Result<(), RestoreError> {
    let seg = m.wal_segment_size;
    let (first, last) = m
        .wal_range()
        .ok_or_else(|| refused(format!("backup {} has an unreadable WAL range", m.id)))?;
    let chain = catalog::chain(&cat.wal, first, seg);
    let reached = chain.segments.last().map(|(s, _)| *s);
    if reached.is_none_or(|r| r.segno < last.segno) {
        return Err(refused(format!(
            "WAL gap: segment {} is missing from the archive; backup {} needs {} through {} to become consistent",
            chain.next_missing, m.id, m.wal_start, m.wal_end
        )));
    }
    let (end_seg, end_name) = chain.segments.last().cloned().expect("checked above");
    let end_lsn = end_seg.end_lsn(seg);
    let end_time = cat
        .wal
        .iter()
        .find(|w| w.name == end_name)
        .map(|w| w.last_modified);
    let gap_note = chain
        .gap
        .as_ref()
        .map(|g| format!("; segment {g} is missing, so later archived WAL cannot be replayed"))
        .unwrap_or_default();
    match target {
        RestoreTarget::Latest if chain.gap.is_some() => Err(refused(format!(
            "WAL gap: segment {} is missing from the archive after {end_name}; restoring to the latest point would silently stop there. Restore to a target before {end_lsn} instead",
            chain.gap.as_deref().unwrap_or_default()
        ))),
        RestoreTarget::Lsn { .. } if lsn.is_some_and(|l| l > end_lsn) => Err(refused(format!(
            "target LSN {} is after the latest recoverable point {end_lsn} (end of {end_name}){gap_note}",
            lsn.expect("checked")
        ))),
        RestoreTarget::Time { time: t }
            if end_time.is_some_and(|e| {
                time.is_some_and(|tt| jiff::Timestamp::try_from(e).is_ok_and(|e| tt > e))
            }) =>
        {
            Err(refused(format!(
                "target time {t} is after the latest recoverable point: the last archived WAL ({end_name}) was archived at {}{gap_note}",
                end_time.map(timestamp).unwrap_or_default()
            )))
        }
        _ => Ok(()),
    }
}

fn req_time(t: &RestoreTarget) -> String {
    match t {
        RestoreTarget::Time { time } => time.clone(),
        other => describe(other),
    }
}

/// The target in words.
pub fn describe(t: &RestoreTarget) -> String {
    match t {
        RestoreTarget::Latest => "the latest archived WAL".into(),
        RestoreTarget::Immediate => "the end of the backup (immediate)".into(),
        RestoreTarget::Time { time } => format!("time {time}"),
        RestoreTarget::Lsn { lsn } => format!("LSN {lsn}"),
        RestoreTarget::Xid { xid } => format!("XID {xid}"),
        RestoreTarget::Name { name } => format!("restore point {name:?}"),
    }
}

/// Parses RFC 3339 or Postgres' `YYYY-MM-DD HH:MM:SS[.ffffff]+TZ`; a time without an offset is
/// refused (it would silently mean the server's zone).
pub fn parse_time(s: &str) -> Result<jiff::Timestamp, RestoreError> {
    crate::time::parse_target_time(s).map_err(refused)
}

/// Shared, observable progress of a restore.
pub type Progress = Arc<Mutex<RestoreProgress>>;

pub fn new_progress(plan: &RestorePlan) -> Progress {
    Arc::new(Mutex::new(RestoreProgress {
        phase: RestorePhase::Downloading,
        backup_id: plan.manifest.id.clone(),
        target: plan.description.clone(),
        files_done: 0,
        files_total: plan.manifest.files.len() as u64,
        bytes_done: 0,
        bytes_total: plan.manifest.total_size,
        replayed_lsn: None,
        timeline: None,
        started_at: timestamp(SystemTime::now()),
        finished_at: None,
        download_seconds: None,
        replay_seconds: None,
        error: None,
    }))
}

/// Empties the data dir (after `force`), keeping the directory itself.
pub fn empty_data_dir(data_dir: &Path) -> Result<(), RestoreError> {
    let entries = match std::fs::read_dir(data_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(RestoreError::Failed(format!("{}: {e}", data_dir.display()))),
    };
    for e in entries.filter_map(|e| e.ok()) {
        let p = e.path();
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| {
            RestoreError::Failed(format!("cannot empty the data dir: {}: {e}", p.display()))
        })?;
    }
    Ok(())
}

/// Downloads every file of the backup into `data_dir`, in parallel, each verified (chunk tags,
/// length, SHA-256 against the manifest) before it is renamed into place.
pub async fn download(
    store: &Store,
    layout: &Layout,
    plan: &RestorePlan,
    data_dir: &Path,
    owner: Option<&OsUser>,
    concurrency: usize,
    progress: &Progress,
) -> Result<(), RestoreError> {
    let started = Instant::now();
    let m = &plan.manifest;
    let failed = |msg: String| RestoreError::Failed(msg);
    crate::postgres::bootstrap::prepare_dir(data_dir, 0o700, owner)
        .map_err(|e| failed(e.to_string()))?;
    let mut dirs: BTreeSet<PathBuf> = m
        .directories
        .iter()
        .map(|d| data_dir.join(&d.path))
        .collect();
    for f in &m.files {
        if let Some(parent) = data_dir.join(&f.path).parent() {
            dirs.insert(parent.to_path_buf());
        }
    }
    for dir in &dirs {
        let mode = m
            .directories
            .iter()
            .find(|d| data_dir.join(&d.path) == *dir)
            .map(|d| d.mode & 0o7777)
            .unwrap_or(0o700);
        crate::postgres::bootstrap::prepare_dir(dir, mode, owner)
            .map_err(|e| failed(e.to_string()))?;
    }
    // Largest first: a 1 GiB relation segment started last would run alone at the end (one
    // object's SHA-256 is sequential), while started first it overlaps every small file.
    let mut order: Vec<&pgpilot_common::manifest::ManifestFile> = m.files.iter().collect();
    order.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.path.cmp(&b.path)));
    let results = futures::stream::iter(order.into_iter().map(|f| async move {
        let key = layout.backup_file_key(&m.id, &f.path);
        let target = data_dir.join(&f.path);
        // Synced below: each file's writeback starts as soon as it is complete.
        let summary = store
            .get_to_file_with(&key, &target, Durability::Deferred, Caching::Direct)
            .await
            .map_err(|e| failed(format!("restoring {}: {e}", f.path)))?;
        if summary.digest_hex() != f.digest
            || summary.digest_kind.name() != f.digest_kind
            || summary.plaintext_len != f.size
        {
            return Err(failed(format!(
                "{}: content does not match the manifest (digest {} {} and {} bytes, manifest says {} {} and {} bytes)",
                store.object_name(&key),
                summary.digest_kind.name(),
                summary.digest_hex(),
                summary.plaintext_len,
                f.digest_kind,
                f.digest,
                f.size
            )));
        }
        let mode = if f.mode & 0o777 == 0 { 0o600 } else { f.mode & 0o7777 };
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).map_err(|e| failed(format!("{}: {e}", target.display())))?;
        if let Some(o) = owner {
            o.chown(&target).map_err(|e| failed(format!("{}: {e}", target.display())))?;
        }
        {
            let mut p = progress.lock().expect("progress lock");
            p.files_done += 1;
            p.bytes_done += f.size;
        }
        // Start this file's writeback now, while the next files are decoded, instead of
        // leaving gigabytes of dirty pages to the final flush. Awaited below, before syncfs.
        let path = target.clone();
        Ok(tokio::task::spawn_blocking(move || {
            std::fs::File::open(&path)?.sync_data().map_err(|e| {
                std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
            })
        }))
    }))
    .buffer_unordered(concurrency.max(1))
    .collect::<Vec<Result<_, RestoreError>>>()
    .await;
    for s in results.into_iter().collect::<Result<Vec<_>, _>>()? {
        s.await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(format!("syncing a restored file: {e}")))?;
    }
    // One flush of the file system for the directories and anything left, before Postgres
    // may rely on the restored files.
    let dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let f = std::fs::File::open(&dir)?;
        nix::unistd::syncfs(&f).map_err(std::io::Error::from)
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map_err(|e| {
        failed(format!(
            "syncing the restored data dir {}: {e}",
            data_dir.display()
        ))
    })?;
    progress.lock().expect("progress lock").download_seconds =
        Some(started.elapsed().as_secs_f64());
    Ok(())
}

/// Writes recovery.signal and the recovery target into the agent-owned include file.
pub fn write_recovery_config(
    cfg: &Config,
    plan: &RestorePlan,
    owner: Option<&OsUser>,
) -> Result<(), RestoreError> {
    let failed =
        |e: std::io::Error| RestoreError::Failed(format!("writing the recovery settings: {e}"));
    let mut text = format!(
        "# Written by pgpilot-agent for the restore of {}; removed after promotion.\n",
        plan.description
    );
    for (k, v) in &plan.settings {
        text.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
    }
    crate::postgres::conf::write_if_changed(&cfg.data_dir.join(RECOVERY_CONF), &text, owner)
        .map_err(failed)?;
    crate::postgres::conf::write_if_changed(&cfg.data_dir.join(RECOVERY_SIGNAL), "", owner)
        .map_err(failed)?;
    // A standby.signal in the backup would make this a standby instead of a restore.
    let _ = std::fs::remove_file(cfg.data_dir.join(STANDBY_SIGNAL));
    Ok(())
}

/// After promotion: the target settings must not apply to a later recovery.
pub fn clear_recovery_config(cfg: &Config) {
    let _ = std::fs::remove_file(cfg.data_dir.join(RECOVERY_CONF));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_times_with_zones_only() {
        let a = parse_time("2026-11-23T18:05:00Z").unwrap();
        assert_eq!(parse_time("2026-11-23 18:05:00+00").unwrap(), a);
        assert_eq!(parse_time("2026-11-23 19:05:00+01:00").unwrap(), a);
        assert!(parse_time("2026-11-23 18:05:00").is_err());
        assert!(parse_time("yesterday").is_err());
    }
}
