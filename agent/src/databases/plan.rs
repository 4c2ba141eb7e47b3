//! What one shard's primary agent does about its catalog and the cluster resource, decided
//! from what it observes: a pure function, so every rule of docs/databases.md has a unit test.
//!
//! Memory lives in the resource, not in the agent, so a failover or a restart loses none of
//! it: `spec.databases` with its field managers (who declared an entry), and this shard's
//! items in `status.databases` (whether the database was ever here, which tells "never
//! created here" from "dropped here with SQL").

use std::collections::{BTreeMap, BTreeSet};

use pgpilot_common::crd::{DatabaseShardStatus, DatabaseSpec, DatabaseStatus, Ensure};

pub const PRESENT: &str = "Present";
pub const MISSING: &str = "Missing";
pub const FAILED: &str = "Failed";
pub const DECLARED: &str = "Declared";
pub const ADOPTED: &str = "AdoptedFromSQL";
pub const UNDECLARED: &str = "Undeclared";

/// An entry of `spec.databases` and who owns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub spec: DatabaseSpec,
    /// The field manager `pgpilot-agent` owns it (it adopted it).
    pub by_agent: bool,
    /// Any other field manager owns part of it (a user declared it).
    pub by_user: bool,
}

impl Entry {
    fn absent(&self) -> bool {
        self.spec.ensure == Some(Ensure::Absent)
    }

    fn origin(&self) -> &'static str {
        if self.by_user || !self.by_agent {
            DECLARED
        } else {
            ADOPTED
        }
    }
}

/// What the agent observed this round.
pub struct Observed<'a> {
    pub shard: &'a str,
    pub superuser: &'a str,
    /// This shard's databases (without the system ones): name → owner.
    pub local: &'a BTreeMap<String, String>,
    pub entries: &'a [Entry],
    pub status: &'a [DatabaseStatus],
}

impl Observed<'_> {
    fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.spec.name == name)
    }

    fn previous(&self, name: &str) -> Option<&DatabaseStatus> {
        self.status.iter().find(|d| d.name == name)
    }

    /// This shard's item for `name` in the status as last written.
    pub fn mine(&self, name: &str) -> Option<&DatabaseShardStatus> {
        self.previous(name)?
            .shards
            .iter()
            .find(|s| s.shard == self.shard)
    }

    fn declared_owner(&self, e: &Entry) -> String {
        e.spec
            .owner
            .clone()
            .unwrap_or_else(|| self.superuser.to_string())
    }
}

/// What to do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// New entries for `spec.databases`, field manager `pgpilot-agent`: (name, owner).
    pub adopt: Vec<DatabaseSpec>,
    /// The agent's entries a user now also declares: the agent lets go of them.
    pub release: Vec<String>,
    /// The entries the agent keeps (its apply set is these plus `adopt`).
    pub keep: Vec<DatabaseSpec>,
    /// Databases to create here: (name, owner, re-created after a drop in SQL).
    pub create: Vec<(String, String, bool)>,
    /// Databases to drop here (`ensure: absent`).
    pub drop: Vec<String>,
    /// The agent's own entries that were here and are gone (dropped with SQL): reported, not
    /// re-created.
    pub missing: Vec<String>,
}

impl Plan {
    /// The agent's `spec.databases` entries change.
    pub fn writes_spec(&self) -> bool {
        !self.adopt.is_empty() || !self.release.is_empty()
    }
}

pub fn plan(o: &Observed<'_>) -> Plan {
    let mut p = Plan::default();
    for e in o.entries {
        if e.by_agent && e.by_user {
            p.release.push(e.spec.name.clone());
        } else if e.by_agent {
            p.keep.push(DatabaseSpec {
                name: e.spec.name.clone(),
                owner: e.spec.owner.clone(),
                ensure: None,
            });
        }
        let here = o.local.contains_key(&e.spec.name);
        if e.absent() {
            if here {
                p.drop.push(e.spec.name.clone());
            }
            continue;
        }
        if here {
            continue;
        }
        let was_here = o
            .mine(&e.spec.name)
            .is_some_and(|m| m.state == PRESENT || m.state == MISSING);
        if e.by_user || !e.by_agent {
            p.create
                .push((e.spec.name.clone(), o.declared_owner(e), was_here));
        } else if !was_here {
            // Adopted on another shard, never here yet: converge.
            p.create
                .push((e.spec.name.clone(), o.declared_owner(e), false));
        } else if o.mine(&e.spec.name).is_some_and(|m| m.state == PRESENT) {
            p.missing.push(e.spec.name.clone());
        }
    }
    for (name, owner) in o.local {
        if o.entry(name).is_some() || o.previous(name).is_some() {
            // Declared, or known: a database whose entry a user removed stays undeclared.
            continue;
        }
        p.adopt.push(DatabaseSpec {
            name: name.clone(),
            owner: Some(owner.clone()),
            ensure: None,
        });
    }
    p
}

/// How the actions went: name → why it failed.
pub type Failures = BTreeMap<String, String>;

/// This shard's part of `status.databases` after the actions: every database with an item for
/// this shard, with the cluster-wide fields as this agent sees them.
pub fn report(o: &Observed<'_>, p: &Plan, failed: &Failures) -> Vec<DatabaseStatus> {
    let created: BTreeSet<&str> = p
        .create
        .iter()
        .filter(|(n, ..)| !failed.contains_key(n))
        .map(|(n, ..)| n.as_str())
        .collect();
    let dropped: BTreeSet<&str> = p
        .drop
        .iter()
        .filter(|n| !failed.contains_key(*n))
        .map(String::as_str)
        .collect();
    let adopted: BTreeMap<&str, &DatabaseSpec> =
        p.adopt.iter().map(|d| (d.name.as_str(), d)).collect();
    let mut names: BTreeSet<&str> = o.local.keys().map(String::as_str).collect();
    names.extend(o.entries.iter().map(|e| e.spec.name.as_str()));
    let mut out = Vec::new();
    for name in names {
        let entry = o.entry(name);
        let here_owner = if created.contains(name) {
            entry.map(|e| o.declared_owner(e))
        } else if dropped.contains(name) {
            None
        } else {
            o.local.get(name).cloned()
        };
        let item = match (&here_owner, failed.get(name)) {
            (_, Some(why)) => Some((FAILED, here_owner.clone(), Some(why.clone()))),
            (Some(owner), None) => Some((PRESENT, Some(owner.clone()), None)),
            (None, None) => match entry {
                Some(e) if !e.absent() => Some((MISSING, None, None)),
                _ => None,
            },
        };
        let Some((state, owner, message)) = item else {
            continue;
        };
        let (origin, declared) = match (entry, adopted.get(name)) {
            (Some(e), _) => (e.origin(), Some(o.declared_owner(e))),
            (None, Some(d)) => (ADOPTED, d.owner.clone()),
            (None, None) => (UNDECLARED, None),
        };
        out.push(DatabaseStatus {
            name: name.to_string(),
            origin: origin.into(),
            owner: declared,
            shards: vec![DatabaseShardStatus {
                shard: o.shard.to_string(),
                state: state.into(),
                owner,
                message,
            }],
        });
    }
    out
}

/// This shard's items as the status holds them now (to write only when they change).
pub fn mine_in(status: &[DatabaseStatus], shard: &str) -> Vec<DatabaseStatus> {
    status
        .iter()
        .filter_map(|d| {
            let item = d.shards.iter().find(|s| s.shard == shard)?;
            Some(DatabaseStatus {
                shards: vec![item.clone()],
                ..d.clone()
            })
        })
        .collect()
}

/// Databases whose item on this shard is not `Present` with the declared owner.
pub fn drift(report: &[DatabaseStatus]) -> usize {
    report
        .iter()
        .filter(|d| d.drifted().next().is_some())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, owner: Option<&str>, ensure: Option<Ensure>) -> DatabaseSpec {
        DatabaseSpec {
            name: name.into(),
            owner: owner.map(str::to_string),
            ensure,
        }
    }

    fn entry(name: &str, by_agent: bool, by_user: bool) -> Entry {
        Entry {
            spec: spec(name, Some("postgres"), None),
            by_agent,
            by_user,
        }
    }

    fn status(name: &str, origin: &str, shard: &str, state: &str) -> DatabaseStatus {
        DatabaseStatus {
            name: name.into(),
            origin: origin.into(),
            owner: Some("postgres".into()),
            shards: vec![DatabaseShardStatus {
                shard: shard.into(),
                state: state.into(),
                owner: Some("postgres".into()),
                message: None,
            }],
        }
    }

    fn local(names: &[&str]) -> BTreeMap<String, String> {
        names
            .iter()
            .map(|n| (n.to_string(), "postgres".to_string()))
            .collect()
    }

    fn run(
        l: &BTreeMap<String, String>,
        entries: &[Entry],
        st: &[DatabaseStatus],
    ) -> (Plan, Vec<DatabaseStatus>) {
        let o = Observed {
            shard: "shard-1",
            superuser: "postgres",
            local: l,
            entries,
            status: st,
        };
        let p = plan(&o);
        let r = report(&o, &p, &Failures::new());
        (p, r)
    }

    #[test]
    fn a_database_made_with_sql_is_adopted_with_its_owner() {
        let mut l = local(&["Sales Q4"]);
        l.insert("app".into(), "alice".into());
        let (p, r) = run(&l, &[], &[]);
        assert_eq!(
            p.adopt,
            vec![
                spec("Sales Q4", Some("postgres"), None),
                spec("app", Some("alice"), None)
            ]
        );
        assert!(p.writes_spec());
        assert!(p.create.is_empty() && p.drop.is_empty());
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].origin, ADOPTED);
        assert_eq!(r[1].owner.as_deref(), Some("alice"));
        assert_eq!(r[1].shards[0].state, PRESENT);
    }

    #[test]
    fn an_entry_adopted_elsewhere_is_created_here_once() {
        let e = [entry("Sales Q4", true, false)];
        let (p, r) = run(&local(&[]), &e, &[]);
        assert_eq!(
            p.create,
            vec![("Sales Q4".into(), "postgres".into(), false)]
        );
        assert_eq!(r[0].shards[0].state, PRESENT);
        assert_eq!(r[0].origin, ADOPTED);
        assert!(!p.writes_spec(), "nothing new to adopt: {p:?}");
        // It was here, then dropped with SQL: reported, never re-created (not a user's entry).
        let st = [status("Sales Q4", ADOPTED, "shard-1", PRESENT)];
        let (p, r) = run(&local(&[]), &e, &st);
        assert!(p.create.is_empty(), "{p:?}");
        assert_eq!(p.missing, vec!["Sales Q4".to_string()]);
        assert_eq!(r[0].shards[0].state, MISSING);
        // Still missing next round: no second report.
        let st = [status("Sales Q4", ADOPTED, "shard-1", MISSING)];
        let (p, r) = run(&local(&[]), &e, &st);
        assert!(p.create.is_empty() && p.missing.is_empty(), "{p:?}");
        assert_eq!(r[0].shards[0].state, MISSING);
    }

    #[test]
    fn a_users_entry_is_created_and_re_created_after_a_drop() {
        let e = [Entry {
            spec: spec("orders", Some("alice"), None),
            by_agent: false,
            by_user: true,
        }];
        let (p, _) = run(&local(&[]), &e, &[]);
        assert_eq!(p.create, vec![("orders".into(), "alice".into(), false)]);
        let st = [status("orders", DECLARED, "shard-1", PRESENT)];
        let (p, r) = run(&local(&[]), &e, &st);
        assert_eq!(p.create, vec![("orders".into(), "alice".into(), true)]);
        assert_eq!(r[0].origin, DECLARED);
        assert_eq!(r[0].owner.as_deref(), Some("alice"));
    }

    #[test]
    fn a_user_declaring_an_adopted_entry_takes_it_over() {
        let e = [entry("Sales Q4", true, true), entry("kept", true, false)];
        let (p, r) = run(&local(&["Sales Q4", "kept"]), &e, &[]);
        assert_eq!(p.release, vec!["Sales Q4".to_string()]);
        assert_eq!(p.keep, vec![spec("kept", Some("postgres"), None)]);
        assert!(p.writes_spec());
        assert_eq!(r[0].origin, DECLARED, "{r:?}");
        assert_eq!(r[1].origin, ADOPTED);
    }

    #[test]
    fn absent_drops_here_and_leaves_no_item() {
        let e = [Entry {
            spec: spec("old", None, Some(Ensure::Absent)),
            by_agent: false,
            by_user: true,
        }];
        let (p, r) = run(&local(&["old"]), &e, &[]);
        assert_eq!(p.drop, vec!["old".to_string()]);
        assert!(p.adopt.is_empty() && p.create.is_empty());
        assert!(r.is_empty(), "{r:?}");
        // Not here: nothing to do, nothing to report.
        let (p, r) = run(&local(&[]), &e, &[]);
        assert_eq!(p, Plan::default());
        assert!(r.is_empty());
    }

    #[test]
    fn a_database_whose_entry_a_user_removed_is_left_alone_and_not_adopted_again() {
        let st = [status("legacy", DECLARED, "shard-0", PRESENT)];
        let (p, r) = run(&local(&["legacy"]), &[], &st);
        assert!(p.adopt.is_empty(), "{p:?}");
        assert_eq!(r[0].origin, UNDECLARED);
        assert_eq!(r[0].shards[0].state, PRESENT);
        // Gone everywhere and undeclared: forgotten.
        let (_, r) = run(&local(&[]), &[], &st);
        assert!(r.is_empty());
    }

    #[test]
    fn a_failed_create_is_reported_and_tried_again() {
        let e = [Entry {
            spec: spec("needs_role", Some("nobody"), None),
            by_agent: false,
            by_user: true,
        }];
        let l = local(&[]);
        let o = Observed {
            shard: "shard-1",
            superuser: "postgres",
            local: &l,
            entries: &e,
            status: &[],
        };
        let p = plan(&o);
        let failed = Failures::from([("needs_role".to_string(), "no role".to_string())]);
        let r = report(&o, &p, &failed);
        assert_eq!(r[0].shards[0].state, FAILED);
        assert_eq!(r[0].shards[0].message.as_deref(), Some("no role"));
        assert_eq!(drift(&r), 1);
        let st = [status("needs_role", DECLARED, "shard-1", FAILED)];
        let p = plan(&Observed { status: &st, ..o });
        assert_eq!(p.create.len(), 1, "{p:?}");
    }

    #[test]
    fn another_owner_here_is_drift_and_left_as_it_is() {
        let e = [Entry {
            spec: spec("app", Some("alice"), None),
            by_agent: false,
            by_user: true,
        }];
        let (p, r) = run(&local(&["app"]), &e, &[]);
        assert_eq!(p, Plan::default());
        assert_eq!(r[0].shards[0].owner.as_deref(), Some("postgres"));
        assert_eq!(drift(&r), 1);
    }

    #[test]
    fn mine_in_keeps_only_this_shards_item() {
        let mut d = status("x", ADOPTED, "shard-0", PRESENT);
        d.shards
            .push(status("x", ADOPTED, "shard-1", MISSING).shards.remove(0));
        let m = mine_in(&[d], "shard-1");
        assert_eq!(m[0].shards.len(), 1);
        assert_eq!(m[0].shards[0].state, MISSING);
    }
}
