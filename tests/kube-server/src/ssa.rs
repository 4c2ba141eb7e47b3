//! Field ownership: `managedFields` bookkeeping for every write and server-side apply itself.
//! An update takes ownership of the fields it changed (taking them from other managers); an
//! apply owns exactly the fields in its configuration, removes fields it stopped applying that
//! nobody else owns, and conflicts when it would change a field another manager owns unless
//! forced — the contract of structured-merge-diff as documented for server-side apply.

use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::fieldset::{FieldSet, Walker, display_path, field, strip_unowned};
use crate::merge::apply_merge;
use crate::resources::ResourceType;

/// Which part of an object a request may write: the main resource or its status subresource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Main,
    Status,
}

impl Scope {
    pub fn subresource(self) -> &'static str {
        match self {
            Scope::Main => "",
            Scope::Status => "status",
        }
    }
}

/// One `managedFields` entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub manager: String,
    pub operation: String,
    pub subresource: String,
    pub api_version: String,
    pub time: String,
    pub set: FieldSet,
}

impl Entry {
    /// How conflict messages name this manager (kube-apiserver's `printManager`).
    fn display(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if !self.subresource.is_empty() {
            s.push_str(&format!(" with subresource {:?}", self.subresource));
        }
        if self.operation == "Update" {
            s.push_str(&format!(" using {} at {}", self.api_version, self.time));
        }
        s
    }

    fn same_owner(&self, manager: &str, operation: &str, subresource: &str) -> bool {
        self.manager == manager && self.operation == operation && self.subresource == subresource
    }
}

pub fn read_entries(obj: Option<&Value>) -> Vec<Entry> {
    let Some(list) = obj
        .and_then(|o| o.pointer("/metadata/managedFields"))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    let s = |e: &Value, k: &str| {
        e.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    list.iter()
        .map(|e| Entry {
            manager: s(e, "manager"),
            operation: s(e, "operation"),
            subresource: s(e, "subresource"),
            api_version: s(e, "apiVersion"),
            time: s(e, "time"),
            set: FieldSet::from_fields_v1(e.get("fieldsV1").unwrap_or(&Value::Null)),
        })
        .collect()
}

pub fn write_entries(obj: &mut Value, entries: Vec<Entry>) {
    let list: Vec<Value> = entries
        .into_iter()
        .filter(|e| !e.set.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager, "operation": e.operation, "apiVersion": e.api_version,
                "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": e.set.to_fields_v1(),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = Value::String(e.subresource);
            }
            v
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// The part of a field set a scope may touch: status for the status subresource, everything
/// else for the main resource when the type has a status subresource.
fn scoped(rt: &ResourceType, scope: Scope, mut set: FieldSet) -> FieldSet {
    let status = field("status");
    match scope {
        Scope::Status => FieldSet {
            members: set.members.into_iter().filter(|m| *m == status).collect(),
            children: set
                .children
                .into_iter()
                .filter(|(k, _)| *k == status)
                .collect(),
        },
        Scope::Main if rt.status_subresource => {
            set.members.remove(&status);
            set.children.remove(&status);
            set
        }
        Scope::Main => set,
    }
}

/// Records a non-apply write (create, update, patch) by `manager` in `new`'s managedFields.
pub fn record_update(
    rt: &ResourceType,
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    scope: Scope,
    api_version: &str,
    now: &str,
) {
    let mut entries = read_entries(old);
    let old_v = old
        .map(strip_unowned)
        .unwrap_or_else(|| Value::Object(Map::new()));
    let new_v = strip_unowned(new);
    let changed = scoped(rt, scope, Walker::new(rt).diff(&old_v, &new_v));
    if !changed.is_empty() {
        for e in &mut entries {
            e.set.subtract(&changed);
        }
        let mine = Walker::new(rt).fields(&new_v).intersection(&changed);
        let sub = scope.subresource();
        match entries
            .iter_mut()
            .find(|e| e.same_owner(manager, "Update", sub))
        {
            Some(e) => {
                e.set.union(&mine);
                e.time = now.to_string();
            }
            None => entries.push(Entry {
                manager: manager.to_string(),
                operation: "Update".into(),
                subresource: sub.into(),
                api_version: api_version.into(),
                time: now.into(),
                set: mine,
            }),
        }
    }
    write_entries(new, entries);
}

fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// A server-side apply request.
pub struct Apply<'a> {
    pub rt: &'a ResourceType,
    pub manager: &'a str,
    pub force: bool,
    pub scope: Scope,
    pub api_version: &'a str,
    pub now: &'a str,
}

impl Apply<'_> {
    /// Merges `config` into `live` (absent for a create). The result keeps `live`'s identity
    /// metadata; the caller fills in what the server owns (uid, resourceVersion, ...).
    pub fn run(&self, live: Option<&Value>, config: &Value) -> Result<Value, ApiError> {
        let rt = self.rt;
        let mut applied = strip_unowned(config);
        drop_nulls(&mut applied);
        if let Some(m) = applied.as_object_mut() {
            match self.scope {
                Scope::Status => m.retain(|k, _| k == "status"),
                Scope::Main if rt.status_subresource => {
                    m.remove("status");
                }
                Scope::Main => {}
            }
        }
        let live_v = live.cloned().unwrap_or_else(|| Value::Object(Map::new()));
        let applied_set = Walker::new(rt).fields(&applied);
        let mut merged = apply_merge(rt, &live_v, &applied);

        let mut entries = read_entries(live);
        let sub = self.scope.subresource();
        let mine = entries
            .iter()
            .position(|e| e.same_owner(self.manager, "Apply", sub));
        let previous = mine.map(|i| entries[i].set.clone()).unwrap_or_default();
        let mut others = FieldSet::default();
        for (i, e) in entries.iter().enumerate() {
            if Some(i) != mine {
                others.union(&e.set);
            }
        }

        // Fields this manager applied before and dropped now go, unless someone else owns them.
        let mut dropped = previous;
        dropped.subtract(&applied_set);
        let mut walker = Walker::new(rt);
        for path in dropped.paths() {
            if !others.touches(&path) {
                walker.remove(&mut merged, &path);
            }
        }

        let changed = Walker::new(rt).diff(&strip_unowned(&live_v), &strip_unowned(&merged));
        let contested = changed.intersection(&applied_set);
        let mut conflicts = Vec::new();
        let mut conflict_set = FieldSet::default();
        for (i, e) in entries.iter().enumerate() {
            if Some(i) == mine {
                continue;
            }
            let theirs = e.set.intersection(&contested);
            for path in theirs.paths() {
                conflicts.push((e.display(), display_path(&path)));
            }
            conflict_set.union(&theirs);
        }
        if !conflicts.is_empty()
            && !self.force
            && !self.upgrades_client_side_apply(live, &conflict_set)
        {
            return Err(ApiError::apply_conflicts(&conflicts));
        }
        for (i, e) in entries.iter_mut().enumerate() {
            if Some(i) != mine {
                e.set.subtract(&contested);
            }
        }
        match mine {
            // A no-op apply (same fields, nothing changed) keeps its entry as it was, timestamp
            // included, so it writes nothing and wakes no watcher, as in kube-apiserver.
            Some(i) if changed.is_empty() && entries[i].set == applied_set => {}
            Some(i) => {
                entries[i].set = applied_set;
                entries[i].time = self.now.to_string();
                entries[i].api_version = self.api_version.to_string();
            }
            None => entries.push(Entry {
                manager: self.manager.to_string(),
                operation: "Apply".into(),
                subresource: sub.into(),
                api_version: self.api_version.into(),
                time: self.now.into(),
                set: applied_set,
            }),
        }
        if merged.get("metadata").is_none() {
            merged["metadata"] = json!({});
        }
        write_entries(&mut merged, entries);
        // kube-apiserver's lastAppliedUpdater: kubectl's server-side apply keeps an existing
        // client-side apply annotation in step, so a later client-side apply still works.
        if self.manager == KUBECTL && merged.pointer(LAST_APPLIED_POINTER).is_some() {
            let mut last = config.clone();
            if let Some(a) = last
                .pointer_mut("/metadata/annotations")
                .and_then(Value::as_object_mut)
            {
                a.remove(LAST_APPLIED);
            }
            merged["metadata"]["annotations"][LAST_APPLIED] = Value::String(last.to_string());
        }
        Ok(merged)
    }

    /// kube-apiserver's lastAppliedManager: `kubectl apply --server-side` (field manager
    /// `kubectl`) on an object last applied client-side takes over, without conflicts, the
    /// fields recorded in the `last-applied-configuration` annotation.
    fn upgrades_client_side_apply(&self, live: Option<&Value>, conflicts: &FieldSet) -> bool {
        if self.manager != KUBECTL {
            return false;
        }
        let Some(last) = live
            .and_then(|l| l.pointer(LAST_APPLIED_POINTER))
            .and_then(Value::as_str)
        else {
            return false;
        };
        let Ok(last) = serde_json::from_str::<Value>(last) else {
            return false;
        };
        let allowed = Walker::new(self.rt).fields(&strip_unowned(&last));
        let mut rest = conflicts.clone();
        rest.subtract(&allowed);
        rest.is_empty()
    }
}

const KUBECTL: &str = "kubectl";
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
const LAST_APPLIED_POINTER: &str =
    "/metadata/annotations/kubectl.kubernetes.io~1last-applied-configuration";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::from_crd;

    fn widget() -> ResourceType {
        from_crd(&json!({
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced", "names": {"plural": "widgets", "kind": "Widget"},
                "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object", "properties": {
                        "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                                  "items": {"type": "object"}}}}}}}}]}
        }))
        .unwrap()
    }

    fn apply(
        rt: &ResourceType,
        live: Option<&Value>,
        cfg: Value,
        manager: &str,
        force: bool,
    ) -> Result<Value, ApiError> {
        Apply {
            rt,
            manager,
            force,
            scope: Scope::Main,
            api_version: "example.com/v1",
            now: "t",
        }
        .run(live, &cfg)
    }

    fn managers(obj: &Value) -> Vec<(String, String)> {
        read_entries(Some(obj))
            .into_iter()
            .flat_map(|e| {
                e.set
                    .paths()
                    .into_iter()
                    .map(move |p| (e.manager.clone(), display_path(&p)))
            })
            .collect()
    }

    #[test]
    fn two_managers_share_list_map_and_conflict_on_a_field() {
        let rt = widget();
        let a = apply(
            &rt,
            None,
            json!({"spec": {"size": 1, "ports": [{"name": "pg", "port": 5432}]}}),
            "a",
            false,
        )
        .unwrap();
        let b = apply(
            &rt,
            Some(&a),
            json!({"spec": {"ports": [{"name": "http", "port": 8008}]}}),
            "b",
            false,
        )
        .unwrap();
        assert_eq!(
            b["spec"]["ports"],
            json!([{"name": "pg", "port": 5432}, {"name": "http", "port": 8008}])
        );

        // Same value: shared ownership, no conflict.
        let shared = apply(&rt, Some(&b), json!({"spec": {"size": 1}}), "b", false).unwrap();
        assert!(managers(&shared).contains(&("a".into(), ".spec.size".into())));

        let err = apply(&rt, Some(&b), json!({"spec": {"size": 2}}), "b", false).unwrap_err();
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        assert!(
            err.message.contains("conflict with \"a\": .spec.size"),
            "{}",
            err.message
        );

        let forced = apply(&rt, Some(&b), json!({"spec": {"size": 2}}), "b", true).unwrap();
        assert_eq!(forced["spec"]["size"], 2);
        let owners = managers(&forced);
        assert!(owners.contains(&("b".into(), ".spec.size".into())));
        assert!(!owners.contains(&("a".into(), ".spec.size".into())));
    }

    #[test]
    fn reapplying_the_same_configuration_is_a_no_op() {
        let rt = widget();
        let cfg = json!({"spec": {"size": 1, "ports": [{"name": "pg", "port": 1}]}});
        let once = apply(&rt, None, cfg.clone(), "a", false).unwrap();
        let twice = Apply {
            rt: &rt,
            manager: "a",
            force: false,
            scope: Scope::Main,
            api_version: "example.com/v1",
            now: "later",
        }
        .run(Some(&once), &cfg)
        .unwrap();
        assert_eq!(once, twice);
    }

    #[test]
    fn dropping_a_field_removes_it_unless_owned_elsewhere() {
        let rt = widget();
        let a = apply(
            &rt,
            None,
            json!({"spec": {"size": 1, "mode": "x", "ports": [{"name": "pg", "port": 1}]}}),
            "a",
            false,
        )
        .unwrap();
        let a2 = apply(&rt, Some(&a), json!({"spec": {"size": 1}}), "a", false).unwrap();
        assert_eq!(a2["spec"], json!({"size": 1, "ports": []}));
        // An update by another manager makes it a co-owner of what it changed.
        let mut u = a.clone();
        u["spec"]["mode"] = json!("y");
        record_update(
            &rt,
            Some(&a),
            &mut u,
            "editor",
            Scope::Main,
            "example.com/v1",
            "t",
        );
        let a3 = apply(&rt, Some(&u), json!({"spec": {"size": 1}}), "a", false).unwrap();
        assert_eq!(a3["spec"]["mode"], "y");
    }

    #[test]
    fn ports_without_protocol_are_the_defaulted_tcp_item() {
        let pod = crate::resources::builtins()
            .into_iter()
            .find(|r| r.kind == "Pod")
            .unwrap();
        let live = json!({"spec": {"containers": [{"name": "c", "image": "i",
            "ports": [{"containerPort": 80, "protocol": "TCP"}]}]}});
        let run = |cfg: Value| {
            Apply {
                rt: &pod,
                manager: "m",
                force: false,
                scope: Scope::Main,
                api_version: "v1",
                now: "t",
            }
            .run(Some(&live), &cfg)
            .unwrap()
        };
        let out = run(
            json!({"spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80, "name": "http"}]}]}}),
        );
        assert_eq!(
            out["spec"]["containers"][0]["ports"],
            json!([{"containerPort": 80, "protocol": "TCP", "name": "http"}])
        );
    }

    #[test]
    fn status_is_out_of_scope_for_the_main_resource() {
        let rt = widget();
        let a = apply(
            &rt,
            None,
            json!({"spec": {"size": 1}, "status": {"ready": true}}),
            "a",
            false,
        )
        .unwrap();
        assert!(a.get("status").is_none());
        let s = Apply {
            rt: &rt,
            manager: "ctl",
            force: false,
            scope: Scope::Status,
            api_version: "v",
            now: "t",
        }
        .run(
            Some(&a),
            &json!({"spec": {"size": 9}, "status": {"ready": true}}),
        )
        .unwrap();
        assert_eq!(s["spec"]["size"], 1);
        assert_eq!(s["status"]["ready"], true);
        let entries = read_entries(Some(&s));
        assert!(
            entries
                .iter()
                .any(|e| e.manager == "ctl" && e.subresource == "status")
        );
    }
}
