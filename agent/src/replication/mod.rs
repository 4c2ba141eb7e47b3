//! Replication: who leads the shard, how this instance follows it, and the switchover.
//!
//! - [`Leadership`] is the one place that answers "who is the primary of my shard". Standalone,
//!   [`StaticLeadership`] keeps it in the state dir (from `[replication] primary`, then moved
//!   by switchover, promote and follow); the Kubernetes Lease implements the same trait.
//! - [`Upstream`] is how a replica reaches its primary: registered through the primary's API,
//!   which creates the replica's slot ([`slots`]).
//! - [`clone`] makes a replica's data dir from its primary (`pg_basebackup`).
//! - [`switchover`] chooses the candidate and carries out a planned switchover.

pub mod cli;
pub mod clone;
pub mod failover;
pub mod lease;
pub mod live;
pub mod slots;
pub mod sql;
pub mod switchover;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use pgpilot_common::api::TimelineSwitch;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::postgres::OsUser;

/// How a replica reaches its primary, as the primary's agent answered its registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    /// The primary's agent API URL.
    pub url: String,
    /// The primary's instance name.
    pub name: String,
    pub host: String,
    pub port: u16,
    /// This replica's slot on the primary.
    pub slot: String,
    pub system_identifier: String,
    /// The primary's timeline when it answered, and its history.
    #[serde(default)]
    pub timeline: u32,
    #[serde(default)]
    pub history: Vec<TimelineSwitch>,
}

/// The primary of this instance's shard, as far as this instance knows.
pub trait Leadership: Send + Sync {
    /// The agent API URL of the shard's primary; `None` while unknown (a demoted instance
    /// that was given no primary to follow).
    fn leader(&self) -> Option<String>;
    /// Records the shard's primary (switchover, promote, demote, follow). In Kubernetes mode
    /// this moves or releases the Lease, and refuses what the Lease contradicts.
    fn set_leader<'a>(
        &'a self,
        url: Option<&'a str>,
    ) -> futures::future::BoxFuture<'a, Result<(), String>>;
    /// Before this instance promotes itself: why it may not (Kubernetes: another pod holds
    /// the Lease). Standalone, the API caller decides.
    fn may_promote(&self) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    /// After a failed switchover: leadership, handed to the candidate at `from`, comes back
    /// to this instance (`me`) only if the candidate has not used it.
    fn reclaim<'a>(
        &'a self,
        me: &'a str,
        from: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        let _ = from;
        self.set_leader(Some(me))
    }
    /// Where the agent of the shard's instance `name` answers now, when the platform says
    /// (Kubernetes: its pod's IP), rather than where it last registered from.
    fn peer_url(&self, name: &str) -> Option<String> {
        let _ = name;
        None
    }
}

/// Standalone leadership: the configured primary (or this instance when none is configured),
/// then whatever switchover, promote, demote and follow recorded in `<state_dir>/leader`, which
/// wins over the configuration once written.
pub struct StaticLeadership {
    path: PathBuf,
    current: Mutex<Option<String>>,
}

impl StaticLeadership {
    pub fn load(cfg: &Config) -> StaticLeadership {
        let path = cfg.state_dir.join("leader");
        let configured = cfg
            .replication
            .primary
            .clone()
            .unwrap_or_else(|| cfg.replication.advertise_url.clone());
        let current = match std::fs::read_to_string(&path) {
            Ok(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
            Err(_) => Some(configured),
        };
        StaticLeadership {
            path,
            current: Mutex::new(current),
        }
    }
}

impl Leadership for StaticLeadership {
    fn leader(&self) -> Option<String> {
        self.current.lock().expect("leader lock").clone()
    }

    fn set_leader<'a>(
        &'a self,
        url: Option<&'a str>,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        let text = format!("{}\n", url.unwrap_or(""));
        let result = crate::files::write_durably(&self.path, text.as_bytes())
            .map(|()| *self.current.lock().expect("leader lock") = url.map(String::from))
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()));
        Box::pin(std::future::ready(result))
    }
}

/// The slot name of a replica: `pgpilot_<name>` (slot names allow a-z, 0-9 and `_`).
pub fn slot_name(instance: &str) -> String {
    format!("pgpilot_{}", instance.replace('-', "_"))
}

/// The libpq password file the replication connections use (`primary_conninfo passfile=`,
/// `pg_basebackup`, `pg_rewind`), owned by the Postgres user, 0600: no password in any
/// configuration file or command line.
pub fn pgpass_path(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("pgpass")
}

/// Writes the password file for the replication role and the superuser.
pub fn write_pgpass(
    path: &Path,
    entries: &[(&str, &str)],
    owner: Option<&OsUser>,
) -> std::io::Result<()> {
    let esc = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
    let mut text = String::new();
    for (user, password) in entries {
        text.push_str(&format!("*:*:*:{}:{}\n", esc(user), esc(password)));
    }
    crate::files::write_private(path, text.as_bytes(), owner)
}

/// `primary_conninfo` for `upstream`. The password comes from the passfile.
pub fn primary_conninfo(cfg: &Config, upstream: &Upstream) -> String {
    let q = |s: &str| crate::postgres::tls::conninfo_quote(s);
    format!(
        "{} port={} user={} passfile={} application_name={} connect_timeout=2 keepalives_idle=5 keepalives_interval=2 keepalives_count=3",
        crate::postgres::tls::peer_conninfo(cfg, &upstream.host),
        upstream.port,
        q(&cfg.replication_user),
        q(&pgpass_path(cfg).display().to_string()),
        q(&cfg.replication.name),
    )
}

/// The standby settings rendered into pgpilot.conf while this instance follows a primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyConf {
    pub conninfo: Option<String>,
    pub slot: Option<String>,
}

impl StandbyConf {
    pub fn settings(&self) -> Vec<(String, String)> {
        // Following a primary: along its timeline switches. Following nobody (demoted): stay
        // on this timeline, whatever newer timelines the archive holds (a diverged instance
        // would otherwise fail to start, looping on a timeline it cannot join).
        let timeline = if self.conninfo.is_some() {
            "latest"
        } else {
            "current"
        };
        let mut out = vec![("recovery_target_timeline".into(), timeline.into())];
        if let Some(c) = &self.conninfo {
            out.push(("primary_conninfo".into(), c.clone()));
        }
        if let Some(s) = &self.slot {
            out.push(("primary_slot_name".into(), s.clone()));
        }
        out
    }
}

/// `upstream.json` in the state dir: the last registration, for a restart while the primary is
/// unreachable.
pub fn upstream_path(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("upstream.json")
}

pub fn load_upstream(cfg: &Config) -> Option<Upstream> {
    let text = std::fs::read_to_string(upstream_path(cfg)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn save_upstream(cfg: &Config, upstream: &Upstream) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(upstream).map_err(std::io::Error::other)?;
    crate::files::write_durably(&upstream_path(cfg), &text)
}

/// What `global/pg_control` says of a stopped cluster: the fields the agent needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    /// `DBState`: 1 shut down (a primary), 2 shut down in recovery (a standby), 6 in
    /// production, …
    pub state: u32,
    /// The latest checkpoint (for a clean shutdown: the shutdown checkpoint), `X/Y`.
    pub checkpoint_lsn: String,
    pub timeline: u32,
}

impl ControlData {
    /// Cleanly shut down as a primary.
    pub fn shut_down_as_primary(&self) -> bool {
        self.state == 1
    }
}

/// Reads the fields of `ControlFileData` the agent needs from `global/pg_control`. Their
/// offsets have been the same since PostgreSQL 11 (system identifier, versions, state, time,
/// checkpoint, then the checkpoint copy with its timeline); read directly because the server
/// packages of some majors ship without `pg_controldata`.
pub fn controldata(data_dir: &Path) -> Result<ControlData, String> {
    let path = data_dir.join("global/pg_control");
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_control(&bytes).ok_or_else(|| format!("{} is too short to be pg_control", path.display()))
}

fn parse_control(b: &[u8]) -> Option<ControlData> {
    let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let ckpt = u64_at(32)?;
    Some(ControlData {
        state: u32_at(16)?,
        checkpoint_lsn: format!("{:X}/{:X}", ckpt >> 32, ckpt & 0xffff_ffff),
        timeline: u32_at(48)?,
    })
}

/// Parses a timeline history file (`parentTLI<TAB>switchpoint<TAB>reason` lines).
pub fn parse_history(text: &str) -> Vec<TimelineSwitch> {
    pgpilot_common::wal::parse_history(text)
        .into_iter()
        .map(|(timeline, at)| TimelineSwitch {
            timeline,
            switchpoint: at.to_string(),
        })
        .collect()
}

/// The history of `timeline` as this instance's `pg_wal` holds it (empty on timeline 1).
pub fn read_history(data_dir: &Path, timeline: u32) -> Vec<TimelineSwitch> {
    if timeline <= 1 {
        return Vec::new();
    }
    std::fs::read_to_string(data_dir.join(format!("pg_wal/{timeline:08X}.history")))
        .map(|t| parse_history(&t))
        .unwrap_or_default()
}

/// Whether an instance whose WAL reaches `own_end` on `own_timeline` has diverged from a
/// primary on `primary_timeline` with `history`: it wrote past the point where the primary's
/// history left its timeline, or it is on a timeline the primary never had. `Some(why)` if so.
///
/// `own_last_record` is where this instance's last WAL record starts (its shutdown or last
/// checkpoint, from pg_control): its WAL goes past that, so it diverged when that record
/// starts at or after the switch point (a primary fenced before its replicas received its
/// shutdown checkpoint has exactly that record past the fork).
pub fn divergence(
    own_timeline: u32,
    own_last_record: u64,
    primary_timeline: u32,
    history: &[TimelineSwitch],
) -> Option<String> {
    match switch_leaving(own_timeline, primary_timeline, history) {
        Err(why) => Some(why),
        Ok(Some(h)) if own_last_record >= lsn(&h.switchpoint).unwrap_or(u64::MAX) => Some(format!(
            "this instance's WAL reaches past {} on timeline {own_timeline}, beyond {} where the primary's timeline {primary_timeline} left it",
            format_lsn(own_last_record),
            h.switchpoint
        )),
        Ok(_) => None,
    }
}

/// Where the history of the primary's `primary_timeline` left `own_timeline`: the switch an
/// instance's WAL on `own_timeline` is compared with. `Ok(None)` when there is nothing to
/// compare (the primary's own timeline, or an older one of a primary without history);
/// `Err(why)` when the primary's history never had `own_timeline`.
pub fn switch_leaving(
    own_timeline: u32,
    primary_timeline: u32,
    history: &[TimelineSwitch],
) -> Result<Option<&TimelineSwitch>, String> {
    if own_timeline == primary_timeline {
        return Ok(None);
    }
    match history.iter().find(|h| h.timeline == own_timeline) {
        Some(h) => Ok(Some(h)),
        None if own_timeline < primary_timeline && history.is_empty() => Ok(None),
        None => Err(format!(
            "this instance is on timeline {own_timeline}, which is not in the history of the primary's timeline {primary_timeline}"
        )),
    }
}

/// Where this instance's own WAL ended when it last stopped being a primary: the one thing
/// that can make it diverge from a later primary. Written when Postgres stops (or dies) as a
/// primary, removed once it streams from a primary (which Postgres refuses after a
/// divergence), so an instance that only ever followed is never taken for a diverged one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryEnd {
    pub timeline: u32,
    pub lsn: String,
    /// Shut down cleanly: `lsn` is the end of its WAL. Otherwise (it died) its WAL may go
    /// further than `lsn`, the last checkpoint.
    pub clean: bool,
}

fn primary_end_path(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("primary-end.json")
}

pub fn save_primary_end(cfg: &Config, end: &PrimaryEnd) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(end).map_err(std::io::Error::other)?;
    crate::files::write_durably(&primary_end_path(cfg), &text)
}

pub fn load_primary_end(cfg: &Config) -> Option<PrimaryEnd> {
    let text = std::fs::read_to_string(primary_end_path(cfg)).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn clear_primary_end(cfg: &Config) {
    let _ = std::fs::remove_file(primary_end_path(cfg));
}

/// Words in every refusal to rewind that only a new clone can resolve (the failover loop
/// recognises them and reinitializes).
pub const REINITIALIZE_HINT: &str = "clones the primary again";

/// Formats a byte position as `X/Y`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses `X/Y` into a byte position.
pub fn lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_valid() {
        assert_eq!(slot_name("db-1"), "pgpilot_db_1");
    }

    #[test]
    fn control_fields_parse() {
        let mut b = vec![0u8; 64];
        b[16..20].copy_from_slice(&1u32.to_le_bytes());
        b[32..40].copy_from_slice(&0x1_0300_0028u64.to_le_bytes());
        b[48..52].copy_from_slice(&2u32.to_le_bytes());
        let c = parse_control(&b).unwrap();
        assert!(c.shut_down_as_primary());
        assert_eq!(c.checkpoint_lsn, "1/3000028");
        assert_eq!(c.timeline, 2);
        assert_eq!(parse_control(&b[..40]), None);
    }

    #[test]
    fn divergence_is_writing_past_the_fork() {
        let h = parse_history("1\t0/5000000\tno recovery target specified\n");
        assert_eq!(h.len(), 1);
        assert_eq!(divergence(1, 0x4FFF000, 2, &h), None);
        // A last record starting at the switch point is already past it (a fenced primary's
        // shutdown checkpoint that no replica received).
        assert!(divergence(1, 0x5000000, 2, &h).is_some());
        assert!(
            divergence(1, 0x5000100, 2, &h)
                .unwrap()
                .contains("beyond 0/5000000")
        );
        assert_eq!(divergence(2, 0x9000000, 2, &h), None);
        assert!(
            divergence(3, 0, 2, &h)
                .unwrap()
                .contains("not in the history")
        );
    }

    #[test]
    fn lsns_parse() {
        assert_eq!(lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(lsn("1/0"), Some(1 << 32));
        assert_eq!(lsn("nope"), None);
    }

    #[test]
    fn pgpass_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pgpass");
        write_pgpass(&p, &[("replicator", "a:b\\c")], None).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "*:*:*:replicator:a\\:b\\\\c\n"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
