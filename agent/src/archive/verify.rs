//! `pgpilot-agent verify [backup-id]`: re-reads a backup and the WAL chain it needs. Every file
//! is read back in full through the archive format (every chunk authenticated or checksummed,
//! SHA-256 of the plaintext) and compared with the manifest; then every WAL segment from the
//! backup's first needed segment through its last is read back the same way, and the extent of
//! the contiguous chain beyond is reported. Any gap is named by segment, any bad object by its
//! name in the store.

use futures::StreamExt;
use pgpilot_common::archive::hex;
use pgpilot_common::layout::Layout;
use pgpilot_common::manifest::BackupManifest;
use pgpilot_common::wal::{SegmentHeader, check_segment};

use super::catalog::{self, chain};
use crate::store::{Store, StoreError};

/// Why verification could not even start.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no completed backup in {0}")]
    NoBackup(String),
    #[error("backup {id} not found in {store}")]
    NotFound { id: String, store: String },
    #[error("backup {id} has no usable manifest {key} ({reason}): it is not a complete backup")]
    Incomplete {
        id: String,
        key: String,
        reason: String,
    },
}

/// The result of checking one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// File path in the backup, or WAL file name.
    pub name: String,
    /// The object, as the store names it.
    pub object: String,
    pub size: u64,
    /// `None` when it checked out.
    pub problem: Option<String>,
}

/// What verify found.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub backup: String,
    pub wal_start: String,
    pub wal_end: String,
    pub files: Vec<Checked>,
    pub wal: Vec<Checked>,
    /// The first needed segment that is not archived.
    pub missing_wal: Option<String>,
    /// Contiguous segments archived after the last needed one, and the last of them.
    pub beyond: (usize, Option<String>),
    /// A hole after the needed range (later WAL exists beyond it).
    pub gap_beyond: Option<String>,
}

impl VerifyReport {
    /// Every problem, one line each, in the order found.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .files
            .iter()
            .chain(&self.wal)
            .filter_map(|c| c.problem.as_ref().map(|p| format!("{}: {p}", c.object)))
            .collect();
        if let Some(m) = &self.missing_wal {
            out.push(format!(
                "WAL segment {m} is missing from the archive; backup {} needs {} through {}",
                self.backup, self.wal_start, self.wal_end
            ));
        }
        out
    }

    pub fn ok(&self) -> bool {
        self.problems().is_empty()
    }
}

/// Verifies backup `id`, or the newest complete backup.
pub async fn verify(
    store: &Store,
    layout: &Layout,
    id: Option<&str>,
) -> Result<VerifyReport, VerifyError> {
    let backups = catalog::load_backups(store, layout, id).await?;
    let b = match id {
        Some(id) => {
            backups
                .into_iter()
                .find(|b| b.id == id)
                .ok_or_else(|| VerifyError::NotFound {
                    id: id.into(),
                    store: store.to_string(),
                })?
        }
        None => backups
            .into_iter()
            .rev()
            .find(|b| b.is_complete())
            .ok_or_else(|| VerifyError::NoBackup(store.to_string()))?,
    };
    let Some(m) = b.manifest else {
        return Err(VerifyError::Incomplete {
            key: store.object_name(&layout.manifest_key(&b.id)),
            id: b.id,
            reason: b
                .manifest_error
                .unwrap_or_else(|| "the run did not finish".into()),
        });
    };
    let files = verify_files(store, layout, &m).await;
    let (wal, missing_wal, beyond, gap_beyond) = verify_wal(store, layout, &m).await?;
    Ok(VerifyReport {
        backup: m.id.clone(),
        wal_start: m.wal_start.clone(),
        wal_end: m.wal_end.clone(),
        files,
        wal,
        missing_wal,
        beyond,
        gap_beyond,
    })
}

async fn verify_files(store: &Store, layout: &Layout, m: &BackupManifest) -> Vec<Checked> {
    futures::stream::iter(&m.files)
        .map(|f| async move {
            let key = layout.backup_file_key(&m.id, &f.path);
            let object = store.object_name(&key);
            let problem = match store.verify(&key).await {
                Ok(s) if s.plaintext_len != f.size => Some(format!(
                    "size {} but the manifest says {}",
                    s.plaintext_len, f.size
                )),
                Ok(s) if s.digest_kind.name() != f.digest_kind || hex(&s.digest) != f.digest => {
                    Some(format!(
                        "digest {} {} but the manifest says {} {}",
                        s.digest_kind.name(),
                        hex(&s.digest),
                        f.digest_kind,
                        f.digest
                    ))
                }
                Ok(_) => None,
                Err(e) => Some(strip_object(&e.to_string(), &object)),
            };
            Checked {
                name: f.path.clone(),
                object,
                size: f.size,
                problem,
            }
        })
        .buffered(store.upload_concurrency().max(1))
        .collect()
        .await
}

/// Store errors already start with the object name; the report puts it first itself.
fn strip_object(msg: &str, object: &str) -> String {
    msg.strip_prefix(object)
        .map(|r| r.trim_start_matches(':').trim().to_string())
        .unwrap_or_else(|| msg.to_string())
}

type WalOutcome = (
    Vec<Checked>,
    Option<String>,
    (usize, Option<String>),
    Option<String>,
);

async fn verify_wal(
    store: &Store,
    layout: &Layout,
    m: &BackupManifest,
) -> Result<WalOutcome, VerifyError> {
    let seg = m.wal_segment_size;
    let wal = catalog::list_wal(store, layout).await?;
    let Some((first, last)) = m.wal_range() else {
        return Ok((
            Vec::new(),
            Some(format!(
                "{}..{} (unparseable range in the manifest)",
                m.wal_start, m.wal_end
            )),
            (0, None),
            None,
        ));
    };
    let c = chain(&wal, first, seg);
    let needed: Vec<&(pgpilot_common::wal::Segment, String)> = c
        .segments
        .iter()
        .take_while(|(s, _)| s.segno <= last.segno)
        .collect();
    let reached = needed.last().is_some_and(|(s, _)| s.segno >= last.segno);
    let missing = (!reached).then(|| c.next_missing.clone());
    let mut names: Vec<String> = needed.iter().map(|(_, n)| n.clone()).collect();
    // Replaying on a timeline after the first needs its history file.
    if m.timeline > 1 {
        names.insert(0, format!("{:08X}.history", m.timeline));
    }
    let sysid: Option<u64> = m.system_identifier.parse().ok();
    let checked = futures::stream::iter(names)
        .map(|name| async move {
            let key = layout.wal_key(&name);
            let object = store.object_name(&key);
            // Intact as an object, and (in the same read) this segment of this database
            // system? A swapped or foreign segment reads as the end of WAL to Postgres.
            let (size, problem) = match store.verify_head(&key, SegmentHeader::LEN).await {
                Ok((s, head)) => (s.plaintext_len, check_segment(&name, &head, sysid).err()),
                Err(e) => (0, Some(strip_object(&e.to_string(), &object))),
            };
            Checked {
                name,
                object,
                size,
                problem,
            }
        })
        .buffered(store.upload_concurrency().max(1))
        .collect()
        .await;
    let beyond: Vec<&String> = c
        .segments
        .iter()
        .filter(|(s, _)| s.segno > last.segno)
        .map(|(_, n)| n)
        .collect();
    let gap = if reached { c.gap.clone() } else { None };
    Ok((
        checked,
        missing,
        (beyond.len(), beyond.last().map(|n| n.to_string())),
        gap,
    ))
}

/// The report as the CLI prints it: one line per object, then a summary.
pub fn render(r: &VerifyReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "backup {}: {} files", r.backup, r.files.len());
    for c in &r.files {
        match &c.problem {
            None => {
                let _ = writeln!(out, "  ok    {} ({})", c.name, crate::units::human(c.size));
            }
            Some(p) => {
                let _ = writeln!(out, "  FAIL  {}: {} ({p})", c.name, c.object);
            }
        }
    }
    let _ = writeln!(out, "WAL {} .. {}:", r.wal_start, r.wal_end);
    for c in &r.wal {
        match &c.problem {
            None => {
                let _ = writeln!(out, "  ok    {}", c.name);
            }
            Some(p) => {
                let _ = writeln!(out, "  FAIL  {}: {} ({p})", c.name, c.object);
            }
        }
    }
    if let Some(m) = &r.missing_wal {
        let _ = writeln!(out, "  MISSING {m}");
    }
    match &r.beyond {
        (0, _) => {
            let _ = writeln!(out, "contiguous WAL beyond the backup: none");
        }
        (n, Some(last)) => {
            let _ = writeln!(
                out,
                "contiguous WAL beyond the backup: {n} segments, through {last} (not re-read)"
            );
        }
        (_, None) => {}
    }
    if let Some(g) = &r.gap_beyond {
        let _ = writeln!(out, "WAL gap after that: {g} is missing");
    }
    let problems = r.problems();
    if problems.is_empty() {
        let _ = writeln!(
            out,
            "OK: {} files and {} WAL files verified",
            r.files.len(),
            r.wal.len()
        );
    } else {
        let _ = writeln!(out, "FAILED: {} problem(s):", problems.len());
        for p in problems {
            let _ = writeln!(out, "  {p}");
        }
    }
    out
}
