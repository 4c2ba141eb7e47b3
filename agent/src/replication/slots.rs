//! Slots and the registry of replicas on a primary.
//!
//! Each replica registers with its primary (`POST /v1/replicas`): the primary's agent creates
//! the replica's physical slot, so the primary keeps the WAL the replica still needs, and
//! records the replica's API URL (a switchover calls it). A slot that stays inactive longer
//! than `[replication] slot_grace_secs` is dropped, so a dead replica cannot fill the
//! primary's disk. On a replica, the slots left from a former life as primary are dropped at
//! once: nothing streams from a replica.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::sql::Slot;
use crate::config::Config;

/// The replicas that registered with this primary: instance name → API URL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub replicas: BTreeMap<String, String>,
}

impl Registry {
    fn path(cfg: &Config) -> PathBuf {
        cfg.state_dir.join("replicas.json")
    }

    pub fn load(cfg: &Config) -> Registry {
        std::fs::read_to_string(Self::path(cfg))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, cfg: &Config) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::files::write_durably(&Self::path(cfg), &text)
    }
}

/// Remembers since when each managed slot has been inactive and says which to drop.
#[derive(Debug, Default)]
pub struct SlotKeeper {
    inactive_since: HashMap<String, Instant>,
}

impl SlotKeeper {
    /// Given the slots now, the ones inactive for at least `grace` (as of `now`).
    pub fn expired(&mut self, slots: &[Slot], grace: Duration, now: Instant) -> Vec<String> {
        self.inactive_since
            .retain(|name, _| slots.iter().any(|s| &s.name == name && !s.active));
        let mut out = Vec::new();
        for s in slots.iter().filter(|s| !s.active) {
            let since = *self.inactive_since.entry(s.name.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= grace {
                out.push(s.name.clone());
            }
        }
        out
    }

    /// Seconds `slot` has been seen inactive.
    pub fn inactive_for(&self, slot: &str, now: Instant) -> Option<u64> {
        self.inactive_since
            .get(slot)
            .map(|t| now.saturating_duration_since(*t).as_secs())
    }

    pub fn forget(&mut self, slot: &str) {
        self.inactive_since.remove(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str, active: bool) -> Slot {
        Slot {
            name: name.into(),
            active,
            retained_bytes: Some(0),
        }
    }

    #[test]
    fn an_inactive_slot_expires_after_the_grace_and_activity_resets_it() {
        let mut k = SlotKeeper::default();
        let t0 = Instant::now();
        let grace = Duration::from_secs(60);
        let s = [slot("pgpilot_a", false), slot("pgpilot_b", true)];
        assert!(k.expired(&s, grace, t0).is_empty());
        assert!(
            k.expired(&s, grace, t0 + Duration::from_secs(59))
                .is_empty()
        );
        assert_eq!(
            k.expired(&s, grace, t0 + Duration::from_secs(60)),
            vec!["pgpilot_a"]
        );
        // Active again: the clock starts over.
        let active = [slot("pgpilot_a", true)];
        assert!(
            k.expired(&active, grace, t0 + Duration::from_secs(61))
                .is_empty()
        );
        assert!(
            k.expired(&s, grace, t0 + Duration::from_secs(62))
                .is_empty()
        );
        assert_eq!(
            k.inactive_for("pgpilot_a", t0 + Duration::from_secs(70)),
            Some(8)
        );
        // Zero grace (a replica's leftovers): at once.
        let mut k = SlotKeeper::default();
        assert_eq!(k.expired(&s, Duration::ZERO, t0), vec!["pgpilot_a"]);
    }
}
