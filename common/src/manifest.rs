//! The manifest of a base backup: `<cluster>/<shard>/backups/<id>/manifest.json`, written last,
//! so a backup exists only once its manifest does (DESIGN.md, durability rules). It lists every
//! file and directory of the backup with what restore and verify check (size and SHA-256 of the
//! plaintext, stored size), the WAL positions and range the backup needs, and enough about the
//! cluster (system identifier, version, segment size) to refuse restoring into the wrong place.

use serde::{Deserialize, Serialize};

use crate::wal::{Lsn, Segment, WalFile};

/// Version of the manifest format; bumped on incompatible changes. 2: files carry `digest`
/// and `digest_kind` (format 1 had `sha256`, which is read as `digest` of kind `sha256`).
pub const MANIFEST_FORMAT: u32 = 2;

/// `digest_kind` of a file stored in archive format version 1: SHA-256 of the plaintext.
pub const DIGEST_SHA256: &str = "sha256";
/// `digest_kind` of a file stored in archive format version 2: SHA-256 over the SHA-256 of each
/// chunk of the plaintext and its length (docs/archive-format.md).
pub const DIGEST_SHA256_CHUNKS: &str = "sha256-chunks";

fn digest_sha256() -> String {
    DIGEST_SHA256.to_owned()
}

/// A complete base backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    pub id: String,
    pub label: String,
    /// Always `completed`: a manifest is only written for a finished backup.
    pub status: String,
    /// RFC 3339 UTC, when `pg_backup_start` was called.
    pub start_time: String,
    /// RFC 3339 UTC, when `pg_backup_stop` returned.
    pub stop_time: String,
    /// Redo point of the backup's checkpoint (`START WAL LOCATION` in backup_label).
    pub start_lsn: String,
    /// Where replay must reach for the backup to be consistent (`pg_backup_stop`'s LSN).
    pub stop_lsn: String,
    /// Timeline the backup was taken on (`START TIMELINE`).
    pub timeline: u32,
    /// `server_version`, e.g. "17.6".
    pub postgres_version: String,
    pub postgres_major: u32,
    /// `pg_control_system().system_identifier`, as a string (it does not fit a JSON double).
    pub system_identifier: String,
    pub wal_segment_size: u64,
    /// First WAL segment restore needs: the one holding `start_lsn`.
    pub wal_start: String,
    /// Last WAL segment restore needs: the one holding the last byte before `stop_lsn`.
    pub wal_end: String,
    /// Directories to recreate, including empty ones (pg_wal, pg_replslot, ...).
    pub directories: Vec<ManifestDir>,
    /// Every file, including `backup_label` (and `tablespace_map` when non-empty).
    pub files: Vec<ManifestFile>,
    /// Sum of the files' plaintext sizes.
    pub total_size: u64,
    /// Sum of the files' stored (compressed, encrypted) sizes.
    pub total_stored_size: u64,
}

/// A directory of the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDir {
    /// Relative to the data dir, `/`-separated.
    pub path: String,
    /// Permission bits.
    pub mode: u32,
}

/// A file of the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Relative to the data dir, `/`-separated.
    pub path: String,
    /// Plaintext bytes stored (what was read; the file may have changed since, WAL replay
    /// repairs that).
    pub size: u64,
    /// Digest of those bytes, hex: the stored object's trailer digest, of kind `digest_kind`.
    #[serde(alias = "sha256")]
    pub digest: String,
    /// [`DIGEST_SHA256`] or [`DIGEST_SHA256_CHUNKS`]; absent (format 1) means `sha256`.
    #[serde(default = "digest_sha256")]
    pub digest_kind: String,
    /// Bytes of the object in the store.
    pub stored_size: u64,
    /// Permission bits.
    pub mode: u32,
}

impl BackupManifest {
    /// The first and last WAL segments the backup needs, parsed.
    pub fn wal_range(&self) -> Option<(Segment, Segment)> {
        let seg = |n: &str| match WalFile::parse(n, self.wal_segment_size)? {
            WalFile::Segment(s) => Some(s),
            _ => None,
        };
        Some((seg(&self.wal_start)?, seg(&self.wal_end)?))
    }

    pub fn start_lsn(&self) -> Option<Lsn> {
        Lsn::parse(&self.start_lsn)
    }

    pub fn stop_lsn(&self) -> Option<Lsn> {
        Lsn::parse(&self.stop_lsn)
    }
}

/// The WAL range a backup needs: from the segment holding `start` to the one holding the last
/// byte before `stop` (Postgres waits for that one to be archived in `pg_backup_stop`).
pub fn wal_range(timeline: u32, start: Lsn, stop: Lsn, seg_size: u64) -> (Segment, Segment) {
    let first = Segment::containing(timeline, start, seg_size);
    let last = Segment::containing(
        timeline,
        Lsn(stop.0.saturating_sub(1).max(start.0)),
        seg_size,
    );
    (first, last)
}

/// What a `backup_label` says about where the backup starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupLabel {
    pub start_lsn: Lsn,
    /// The segment name in `START WAL LOCATION: … (file …)`.
    pub start_file: String,
    pub timeline: u32,
}

impl BackupLabel {
    /// Parses the `START WAL LOCATION` and `START TIMELINE` lines.
    pub fn parse(text: &str) -> Option<BackupLabel> {
        let mut start = None;
        let mut timeline = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("START WAL LOCATION: ") {
                // "0/2000028 (file 000000010000000000000002)"
                let (lsn, file) = rest.split_once(" (file ")?;
                start = Some((Lsn::parse(lsn)?, file.trim_end_matches(')').to_string()));
            } else if let Some(rest) = line.strip_prefix("START TIMELINE: ") {
                timeline = rest.trim().parse().ok();
            }
        }
        let (start_lsn, start_file) = start?;
        Some(BackupLabel {
            start_lsn,
            timeline: timeline.or_else(|| u32::from_str_radix(start_file.get(..8)?, 16).ok())?,
            start_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::DEFAULT_SEGMENT_SIZE as SZ;

    #[test]
    fn parses_a_backup_label() {
        let text = "START WAL LOCATION: 0/5000028 (file 000000010000000000000005)\n\
            CHECKPOINT LOCATION: 0/5000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
            START TIME: 2026-11-23 18:15:00 UTC\nLABEL: x\nSTART TIMELINE: 1\n";
        let l = BackupLabel::parse(text).unwrap();
        assert_eq!(l.start_lsn, Lsn(0x5000028));
        assert_eq!(l.start_file, "000000010000000000000005");
        assert_eq!(l.timeline, 1);
        assert_eq!(BackupLabel::parse("LABEL: x\n"), None);
    }

    #[test]
    fn wal_range_ends_with_the_segment_before_a_boundary_stop() {
        let (a, b) = wal_range(1, Lsn(0x5000028), Lsn(0x7000000), SZ);
        assert_eq!(a.name(SZ), "000000010000000000000005");
        assert_eq!(b.name(SZ), "000000010000000000000006");
        let (_, b) = wal_range(1, Lsn(0x5000028), Lsn(0x5000100), SZ);
        assert_eq!(b.name(SZ), "000000010000000000000005");
    }
}
