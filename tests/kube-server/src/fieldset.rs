//! Field sets: the paths a field manager owns, in the `FieldsV1` wire format the real server
//! stores in `managedFields` (`f:<field>`, `k:{<list-map keys>}`, `v:<set value>`, `.` for an
//! item that is itself owned). Also what an object's fields are and which of them changed
//! between two versions of it — the inputs to ownership and conflict decisions.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::resources::{ListKind, ResourceType};

/// A set of paths: `members` are paths ending here, `children` go deeper. Mirrors
/// structured-merge-diff's `fieldpath.Set`, so the JSON form round-trips.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet {
    pub members: BTreeSet<String>,
    pub children: BTreeMap<String, FieldSet>,
}

/// A path as a list of encoded path elements (`f:spec`, `k:{"name":"a"}`, ...).
pub type Path = Vec<String>;

impl FieldSet {
    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.children.values().all(FieldSet::is_empty)
    }

    /// Whether `path` or anything below it is in the set.
    pub fn touches(&self, path: &[String]) -> bool {
        match path {
            [] => !self.is_empty(),
            [last] => {
                self.members.contains(last)
                    || self.children.get(last).is_some_and(|c| !c.is_empty())
            }
            [first, rest @ ..] => self.children.get(first).is_some_and(|c| c.touches(rest)),
        }
    }

    pub fn union(&mut self, other: &FieldSet) {
        self.members.extend(other.members.iter().cloned());
        for (k, c) in &other.children {
            self.children.entry(k.clone()).or_default().union(c);
        }
    }

    /// Removes every path of `other` (members only; a member removes nothing below it).
    pub fn subtract(&mut self, other: &FieldSet) {
        for m in &other.members {
            self.members.remove(m);
        }
        for (k, c) in &other.children {
            if let Some(mine) = self.children.get_mut(k) {
                mine.subtract(c);
            }
        }
        self.children.retain(|_, c| !c.is_empty());
    }

    pub fn intersection(&self, other: &FieldSet) -> FieldSet {
        let mut out = FieldSet {
            members: self.members.intersection(&other.members).cloned().collect(),
            children: BTreeMap::new(),
        };
        for (k, c) in &self.children {
            if let Some(o) = other.children.get(k) {
                let i = c.intersection(o);
                if !i.is_empty() {
                    out.children.insert(k.clone(), i);
                }
            }
        }
        out
    }

    /// Every member path, depth first.
    pub fn paths(&self) -> Vec<Path> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut Path, out: &mut Vec<Path>) {
        let mut keys: BTreeSet<&String> = self.members.iter().collect();
        keys.extend(self.children.keys());
        for k in keys {
            prefix.push(k.clone());
            if self.members.contains(k) {
                out.push(prefix.clone());
            }
            if let Some(c) = self.children.get(k) {
                c.collect(prefix, out);
            }
            prefix.pop();
        }
    }

    pub fn to_fields_v1(&self) -> Value {
        let mut m = Map::new();
        let mut keys: BTreeSet<&String> = self.members.iter().collect();
        keys.extend(self.children.keys());
        for k in keys {
            let mut inner = self
                .children
                .get(k)
                .map(|c| c.to_fields_v1())
                .unwrap_or_else(|| Value::Object(Map::new()));
            if self.members.contains(k) && self.children.get(k).is_some_and(|c| !c.is_empty()) {
                inner
                    .as_object_mut()
                    .expect("fields are objects")
                    .insert(".".into(), Value::Object(Map::new()));
            }
            m.insert(k.clone(), inner);
        }
        Value::Object(m)
    }

    pub fn from_fields_v1(v: &Value) -> FieldSet {
        let mut set = FieldSet::default();
        if let Some(m) = v.as_object() {
            for (k, inner) in m {
                if k == "." {
                    continue;
                }
                let child = FieldSet::from_fields_v1(inner);
                let empty = inner.as_object().is_none_or(Map::is_empty);
                if empty || inner.get(".").is_some() {
                    set.members.insert(k.clone());
                }
                if !child.is_empty() {
                    set.children.insert(k.clone(), child);
                }
            }
        }
        set
    }
}

pub fn field(name: &str) -> String {
    format!("f:{name}")
}

/// `k:{...}` for a list-map item: its key fields, sorted, as compact JSON.
pub fn key_element(item: &Value, keys: &[String]) -> String {
    let mut sorted: Vec<&String> = keys.iter().collect();
    sorted.sort();
    // A port's `protocol` key defaults to TCP, as the schema default makes it in Kubernetes, so
    // an applied port without it names the same item as the stored (defaulted) one.
    let tcp = Value::String("TCP".into());
    let parts: Vec<String> = sorted
        .iter()
        .filter_map(|k| {
            let v = item
                .get(k.as_str())
                .or((k.as_str() == "protocol").then_some(&tcp));
            v.map(|v| format!("{}:{}", Value::String((*k).clone()), v))
        })
        .collect();
    format!("k:{{{}}}", parts.join(","))
}

pub fn value_element(v: &Value) -> String {
    format!("v:{v}")
}

/// Renders a path the way conflict messages do: `.spec.ports[name="http"].port`.
pub fn display_path(path: &[String]) -> String {
    let mut s = String::new();
    for pe in path {
        if let Some(f) = pe.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = pe.strip_prefix("k:") {
            let keys: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let inner: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("[{}]", inner.join(",")));
        } else if let Some(v) = pe.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        } else {
            s.push_str(&format!("[{pe}]"));
        }
    }
    s
}

/// Object fields never owned by a manager: identity and server-set metadata.
const UNOWNED_METADATA: &[&str] = &[
    "name",
    "namespace",
    "generateName",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// A copy of `obj` without the fields that are never owned (apiVersion, kind, identity metadata).
pub fn strip_unowned(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
        if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
            for f in UNOWNED_METADATA {
                meta.remove(*f);
            }
            if meta.is_empty() {
                m.remove("metadata");
            }
        }
    }
    v
}

/// Walks values with their schema position (field names only, list items transparent).
pub struct Walker<'a> {
    pub rt: &'a ResourceType,
    names: Vec<String>,
}

impl<'a> Walker<'a> {
    pub fn new(rt: &'a ResourceType) -> Self {
        Self {
            rt,
            names: Vec::new(),
        }
    }

    fn list_kind(&self) -> ListKind {
        self.rt.list_kind(&self.names)
    }

    /// Whether `v` at the current position is a container whose parts are owned separately.
    fn granular(&self, v: &Value) -> bool {
        match v {
            Value::Object(m) => !m.is_empty() && !self.rt.map_is_atomic(&self.names),
            Value::Array(a) => !a.is_empty() && self.list_kind() != ListKind::Atomic,
            _ => false,
        }
    }

    /// The fields inside `v` (relative to it).
    pub fn fields(&mut self, v: &Value) -> FieldSet {
        let mut set = FieldSet::default();
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    self.names.push(k.clone());
                    self.add_child(&mut set, field(k), child);
                    self.names.pop();
                }
            }
            Value::Array(items) => match self.list_kind() {
                ListKind::Map(keys) => {
                    for item in items {
                        let pe = key_element(item, &keys);
                        set.members.insert(pe.clone());
                        let inner = self.fields(item);
                        if !inner.is_empty() {
                            set.children.insert(pe, inner);
                        }
                    }
                }
                ListKind::Set => {
                    for item in items {
                        set.members.insert(value_element(item));
                    }
                }
                ListKind::Atomic => {}
            },
            _ => {}
        }
        set
    }

    fn add_child(&mut self, set: &mut FieldSet, pe: String, child: &Value) {
        if self.granular(child) {
            let inner = self.fields(child);
            set.children.insert(pe, inner);
        } else {
            set.members.insert(pe);
        }
    }

    /// Fields that differ between `old` and `new` (added, removed or modified), relative to them.
    pub fn diff(&mut self, old: &Value, new: &Value) -> FieldSet {
        let mut set = FieldSet::default();
        match (old, new) {
            (Value::Object(a), Value::Object(b)) if !self.rt.map_is_atomic(&self.names) => {
                let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for k in keys {
                    self.names.push(k.clone());
                    self.diff_child(&mut set, field(k), a.get(k), b.get(k));
                    self.names.pop();
                }
            }
            (Value::Array(a), Value::Array(b)) => match self.list_kind() {
                ListKind::Map(keys) => {
                    let index = |items: &Vec<Value>| -> BTreeMap<String, Value> {
                        items
                            .iter()
                            .map(|i| (key_element(i, &keys), i.clone()))
                            .collect()
                    };
                    let (ia, ib) = (index(a), index(b));
                    let all: BTreeSet<&String> = ia.keys().chain(ib.keys()).collect();
                    for pe in all {
                        match (ia.get(pe), ib.get(pe)) {
                            (Some(x), Some(y)) => {
                                let inner = self.diff(x, y);
                                if !inner.is_empty() {
                                    set.children.insert(pe.clone(), inner);
                                }
                            }
                            (Some(x), None) | (None, Some(x)) => {
                                set.members.insert(pe.clone());
                                let inner = self.fields(x);
                                if !inner.is_empty() {
                                    set.children.insert(pe.clone(), inner);
                                }
                            }
                            (None, None) => {}
                        }
                    }
                }
                ListKind::Set => {
                    for x in a
                        .iter()
                        .filter(|x| !b.contains(x))
                        .chain(b.iter().filter(|y| !a.contains(y)))
                    {
                        set.members.insert(value_element(x));
                    }
                }
                ListKind::Atomic => {}
            },
            _ => {}
        }
        set
    }

    fn diff_child(&mut self, set: &mut FieldSet, pe: String, a: Option<&Value>, b: Option<&Value>) {
        match (a, b) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) if self.granular(x) && self.granular(y) && same_shape(x, y) => {
                let inner = self.diff(x, y);
                if !inner.is_empty() {
                    set.children.insert(pe, inner);
                }
            }
            (Some(x), Some(y)) => {
                // A replaced value: whatever the old one was made of and whatever the new one
                // is made of both changed (the field itself, when it is a leaf on either side).
                let mut inner = FieldSet::default();
                for v in [x, y] {
                    if self.granular(v) {
                        inner.union(&self.fields(v));
                    } else {
                        set.members.insert(pe.clone());
                    }
                }
                if !inner.is_empty() {
                    set.children.entry(pe).or_default().union(&inner);
                }
            }
            (Some(x), None) | (None, Some(x)) => self.add_child(set, pe, x),
            (None, None) => {}
        }
    }

    /// Removes the value at `path` (relative to `v`). Returns whether something was removed.
    pub fn remove(&mut self, v: &mut Value, path: &[String]) -> bool {
        let Some((pe, rest)) = path.split_first() else {
            return false;
        };
        if let Some(name) = pe.strip_prefix("f:") {
            let Some(m) = v.as_object_mut() else {
                return false;
            };
            if rest.is_empty() {
                return m.remove(name).is_some();
            }
            let Some(child) = m.get_mut(name) else {
                return false;
            };
            self.names.push(name.to_string());
            let r = self.remove(child, rest);
            self.names.pop();
            return r;
        }
        let Some(items) = v.as_array_mut() else {
            return false;
        };
        let pos = match self.list_kind() {
            ListKind::Map(keys) => items.iter().position(|i| key_element(i, &keys) == *pe),
            ListKind::Set => items.iter().position(|i| value_element(i) == *pe),
            ListKind::Atomic => None,
        };
        let Some(pos) = pos else { return false };
        if rest.is_empty() {
            items.remove(pos);
            true
        } else {
            self.remove(&mut items[pos], rest)
        }
    }
}

fn same_shape(a: &Value, b: &Value) -> bool {
    matches!(
        (a, b),
        (Value::Object(_), Value::Object(_)) | (Value::Array(_), Value::Array(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::builtins;
    use serde_json::json;

    fn pod() -> ResourceType {
        builtins().into_iter().find(|r| r.kind == "Pod").unwrap()
    }

    #[test]
    fn fields_of_pod_match_kubernetes_format() {
        let rt = pod();
        let obj = json!({"metadata": {"labels": {"a": "1"}, "finalizers": ["x"]},
            "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 80, "protocol": "TCP"}]}]}});
        let set = Walker::new(&rt).fields(&obj);
        assert_eq!(
            set.to_fields_v1(),
            json!({"f:metadata": {"f:finalizers": {"v:\"x\"": {}}, "f:labels": {"f:a": {}}},
                "f:spec": {"f:containers": {"k:{\"name\":\"c\"}": {".": {}, "f:image": {}, "f:name": {},
                    "f:ports": {"k:{\"containerPort\":80,\"protocol\":\"TCP\"}": {".": {}, "f:containerPort": {}, "f:protocol": {}}}}}}})
        );
        assert_eq!(FieldSet::from_fields_v1(&set.to_fields_v1()), set);
    }

    #[test]
    fn diff_finds_changed_leaves_and_items() {
        let rt = pod();
        let a = json!({"spec": {"containers": [{"name": "c", "image": "i"}, {"name": "d", "image": "j"}]}});
        let b = json!({"spec": {"containers": [{"name": "c", "image": "i2"}]}});
        let d = Walker::new(&rt).diff(&a, &b);
        let paths: Vec<String> = d.paths().iter().map(|p| display_path(p)).collect();
        assert_eq!(
            paths,
            vec![
                ".spec.containers[name=\"c\"].image",
                ".spec.containers[name=\"d\"]",
                ".spec.containers[name=\"d\"].image",
                ".spec.containers[name=\"d\"].name",
            ]
        );
    }

    #[test]
    fn diff_of_a_leaf_turned_map_covers_both() {
        let rt = pod();
        let d = Walker::new(&rt).diff(
            &json!({"spec": {"a": 1}}),
            &json!({"spec": {"a": {"b": 2}}}),
        );
        let paths: Vec<String> = d.paths().iter().map(|p| display_path(p)).collect();
        assert_eq!(paths, [".spec.a", ".spec.a.b"]);
    }

    #[test]
    fn set_operations() {
        let rt = pod();
        let mut a = Walker::new(&rt).fields(&json!({"spec": {"x": 1, "y": 2}}));
        let b = Walker::new(&rt).fields(&json!({"spec": {"y": 3, "z": 4}}));
        assert_eq!(
            a.intersection(&b).paths(),
            vec![vec!["f:spec".to_string(), "f:y".to_string()]]
        );
        a.subtract(&b);
        assert_eq!(
            a.paths(),
            vec![vec!["f:spec".to_string(), "f:x".to_string()]]
        );
        assert!(a.touches(&["f:spec".to_string()]));
    }
}
