//! Retention: which backups and WAL to delete. [`plan`] is pure (catalog and policy in, the
//! deletions out) and table-tested; [`apply`] only carries a plan out.
//!
//! Rules: keep the last N complete backups and/or those that stopped within a time window (both
//! given: the union). Delete every other complete backup, incomplete ones older than the oldest
//! kept backup (newer ones may be running), and WAL segments strictly before the first segment
//! the oldest kept backup needs — compared by position only, whatever the timeline, so a
//! segment at or after that position is never deleted; `.history` files are never deleted
//! (restores across timelines need them). If no complete backup would remain, nothing is
//! deleted at all.

use std::time::Duration;

use pgpilot_common::wal::WalFile;

use super::catalog::Catalog;
use crate::store::{Store, StoreError};

/// What to keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: Option<usize>,
    pub keep_within: Option<Duration>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RetentionError {
    #[error("give --keep-last N and/or --keep-within DURATION: without a policy nothing is pruned")]
    NoPolicy,
    #[error("--keep-last must be at least 1")]
    KeepNone,
    #[error("no complete backup would remain with this policy ({0}); nothing deleted")]
    NothingKept(String),
    #[error("backup {id}: {problem}")]
    BadManifest { id: String, problem: String },
}

/// A backup to delete, with every object key under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doomed {
    pub id: String,
    pub complete: bool,
    /// Manifest first: once it is gone the backup no longer counts as complete, so an
    /// interrupted deletion never leaves a "complete" backup with missing files.
    pub keys: Vec<String>,
    pub stored_size: u64,
}

/// The deletions a policy implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Complete backups kept, oldest first.
    pub keep: Vec<String>,
    pub delete_backups: Vec<Doomed>,
    /// The first segment the oldest kept backup needs: WAL before it goes.
    pub wal_cutoff: Option<String>,
    /// WAL objects to delete: (file name, key, stored size).
    pub delete_wal: Vec<(String, String, u64)>,
}

pub use crate::units::parse_duration;

/// Decides what goes. `now` is passed in so the decision is a pure function.
pub fn plan(cat: &Catalog, policy: Policy, now: jiff::Timestamp) -> Result<Plan, RetentionError> {
    if policy.keep_last.is_none() && policy.keep_within.is_none() {
        return Err(RetentionError::NoPolicy);
    }
    if policy.keep_last == Some(0) {
        return Err(RetentionError::KeepNone);
    }
    let complete: Vec<_> = cat.complete().collect();
    let mut keep = Vec::new();
    for (i, (b, m)) in complete.iter().enumerate() {
        let by_count = policy.keep_last.is_some_and(|n| complete.len() - i <= n);
        let by_time = match policy.keep_within {
            Some(within) => {
                let stop: jiff::Timestamp =
                    m.stop_time
                        .parse()
                        .map_err(|e| RetentionError::BadManifest {
                            id: b.id.clone(),
                            problem: format!("stop_time {:?}: {e}", m.stop_time),
                        })?;
                now.duration_since(stop).unsigned_abs() <= within || stop > now
            }
            None => false,
        };
        if by_count || by_time {
            keep.push((*b, *m));
        }
    }
    let Some((oldest, oldest_m)) = keep.first().copied() else {
        return Err(RetentionError::NothingKept(format!(
            "{} complete backup(s) in the store, none within the policy",
            complete.len()
        )));
    };
    let keep_ids: Vec<String> = keep.iter().map(|(b, _)| b.id.clone()).collect();
    let delete_backups = cat
        .backups
        .iter()
        .filter(|b| {
            if b.is_complete() {
                !keep_ids.contains(&b.id)
            } else {
                b.id < oldest.id
            }
        })
        .map(|b| {
            let mut keys: Vec<String> = b.objects.iter().map(|o| o.key.clone()).collect();
            // The manifest first (see Doomed::keys).
            keys.sort_by_key(|k| (!k.contains("/manifest.json"), k.clone()));
            Doomed {
                id: b.id.clone(),
                complete: b.is_complete(),
                keys,
                stored_size: b.stored_size(),
            }
        })
        .collect();
    let seg = oldest_m.wal_segment_size;
    let (first, _) = oldest_m
        .wal_range()
        .ok_or_else(|| RetentionError::BadManifest {
            id: oldest.id.clone(),
            problem: format!(
                "WAL range {}..{} does not parse",
                oldest_m.wal_start, oldest_m.wal_end
            ),
        })?;
    let delete_wal = cat
        .wal
        .iter()
        .filter(|w| match WalFile::parse(&w.name, seg) {
            // History files stay: timeline switches need them, and they are tiny.
            Some(WalFile::History { .. }) | None => false,
            Some(f) => f.segment().is_some_and(|s| s.segno < first.segno),
        })
        .map(|w| (w.name.clone(), w.key.clone(), w.size))
        .collect();
    Ok(Plan {
        keep: keep_ids,
        delete_backups,
        wal_cutoff: Some(first.name(seg)),
        delete_wal,
    })
}

/// Carries out a plan: backups first (manifest first in each), then WAL.
pub async fn apply(store: &Store, plan: &Plan) -> Result<(), StoreError> {
    for b in &plan.delete_backups {
        for key in &b.keys {
            store.delete(key).await?;
        }
        tracing::info!(backup = %b.id, objects = b.keys.len(), "retention: backup deleted");
    }
    for (_, key, _) in &plan.delete_wal {
        store.delete(key).await?;
    }
    if !plan.delete_wal.is_empty() {
        tracing::info!(
            segments = plan.delete_wal.len(),
            before = plan.wal_cutoff.as_deref().unwrap_or("-"),
            "retention: WAL deleted"
        );
    }
    Ok(())
}

/// The plan as the CLI prints it.
pub fn render(plan: &Plan, dry_run: bool) -> String {
    use std::fmt::Write as _;
    let verb = if dry_run { "would delete" } else { "deleting" };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "keeping {} backup(s): {}",
        plan.keep.len(),
        plan.keep.join(", ")
    );
    for b in &plan.delete_backups {
        let _ = writeln!(
            out,
            "{verb} backup {} ({}, {} objects, {})",
            b.id,
            if b.complete { "complete" } else { "incomplete" },
            b.keys.len(),
            crate::units::human(b.stored_size)
        );
    }
    let wal_bytes: u64 = plan.delete_wal.iter().map(|(_, _, s)| s).sum();
    let _ = writeln!(
        out,
        "{verb} {} WAL file(s) before {} ({})",
        plan.delete_wal.len(),
        plan.wal_cutoff.as_deref().unwrap_or("-"),
        crate::units::human(wal_bytes)
    );
    for (name, _, _) in &plan.delete_wal {
        let _ = writeln!(out, "  {name}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::catalog::tests::{backup, manifest, wal};

    fn cat() -> Catalog {
        Catalog {
            backups: vec![
                backup("20251231T000000Z", None),
                backup(
                    "20260101T000000Z",
                    Some(manifest(
                        "20260101T000000Z",
                        "000000010000000000000002",
                        "000000010000000000000002",
                        "2026-01-01T00:00:00Z",
                    )),
                ),
                backup(
                    "20260105T000000Z",
                    Some(manifest(
                        "20260105T000000Z",
                        "000000010000000000000005",
                        "000000010000000000000006",
                        "2026-01-05T00:00:00Z",
                    )),
                ),
                backup(
                    "20260109T000000Z",
                    Some(manifest(
                        "20260109T000000Z",
                        "000000010000000000000009",
                        "000000010000000000000009",
                        "2026-01-09T00:00:00Z",
                    )),
                ),
                backup("20260110T000000Z", None),
            ],
            wal: wal(&[
                "000000010000000000000001",
                "000000010000000000000002",
                "000000010000000000000003",
                "000000010000000000000004",
                "000000010000000000000004.partial",
                "00000002.history",
                "000000020000000000000004",
                "000000010000000000000005",
                "000000010000000000000006",
                "000000010000000000000009",
            ]),
        }
    }

    fn now() -> jiff::Timestamp {
        "2026-01-10T00:00:00Z".parse().unwrap()
    }

    fn ids(p: &Plan) -> Vec<&str> {
        p.delete_backups.iter().map(|b| b.id.as_str()).collect()
    }

    fn wal_names(p: &Plan) -> Vec<&str> {
        p.delete_wal.iter().map(|(n, _, _)| n.as_str()).collect()
    }

    #[test]
    fn keep_last_deletes_older_backups_and_only_wal_before_the_oldest_kept() {
        let p = plan(
            &cat(),
            Policy {
                keep_last: Some(2),
                keep_within: None,
            },
            now(),
        )
        .unwrap();
        assert_eq!(p.keep, ["20260105T000000Z", "20260109T000000Z"]);
        // The incomplete one after the newest backup may be running: kept.
        assert_eq!(ids(&p), ["20251231T000000Z", "20260101T000000Z"]);
        assert_eq!(p.wal_cutoff.as_deref(), Some("000000010000000000000005"));
        assert_eq!(
            wal_names(&p),
            [
                "000000010000000000000001",
                "000000010000000000000002",
                "000000010000000000000003",
                "000000010000000000000004",
                "000000010000000000000004.partial",
                "000000020000000000000004",
            ]
        );
    }

    #[test]
    fn policies_combine_as_a_union() {
        let within = |d| Policy {
            keep_last: Some(1),
            keep_within: Some(parse_duration(d).unwrap()),
        };
        let p = plan(&cat(), within("6d"), now()).unwrap();
        assert_eq!(p.keep, ["20260105T000000Z", "20260109T000000Z"]);
        let p = plan(&cat(), within("1d"), now()).unwrap();
        assert_eq!(p.keep, ["20260109T000000Z"]);
        let p = plan(
            &cat(),
            Policy {
                keep_last: None,
                keep_within: Some(parse_duration("30d").unwrap()),
            },
            now(),
        )
        .unwrap();
        assert_eq!(p.keep.len(), 3);
        assert_eq!(ids(&p), ["20251231T000000Z"]);
        assert_eq!(wal_names(&p), ["000000010000000000000001"]);
    }

    #[test]
    fn never_deletes_when_no_backup_would_remain() {
        let only_time = Policy {
            keep_last: None,
            keep_within: Some(Duration::from_secs(3600)),
        };
        assert!(matches!(
            plan(&cat(), only_time, now()),
            Err(RetentionError::NothingKept(_))
        ));
        let mut none = cat();
        none.backups.retain(|b| !b.is_complete());
        assert!(matches!(
            plan(
                &none,
                Policy {
                    keep_last: Some(3),
                    keep_within: None
                },
                now()
            ),
            Err(RetentionError::NothingKept(_))
        ));
        assert_eq!(
            plan(&cat(), Policy::default(), now()),
            Err(RetentionError::NoPolicy)
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(1_209_600)
        );
        assert!(parse_duration("7 days").is_err());
        assert!(parse_duration("d").is_err());
    }
}
