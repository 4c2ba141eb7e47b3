//! Merging documents into live objects: the structural merge that server-side apply performs
//! (maps field by field, list-maps by key keeping the live order of items the apply does not
//! name, sets by value, everything else replaced) and Kubernetes' strategic merge patch for the
//! built-in types (lists merged by their patch merge key, `$patch`, `$retainKeys`,
//! `$deleteFromPrimitiveList`, `$setElementOrder` directives).

use serde_json::{Map, Value};

use crate::fieldset::{key_element, value_element};
use crate::resources::{ListKind, ResourceType};

/// Structural merge of an applied configuration into a live object (server-side apply).
pub fn apply_merge(rt: &ResourceType, live: &Value, applied: &Value) -> Value {
    Merger {
        rt,
        names: Vec::new(),
    }
    .merge(live, applied)
}

struct Merger<'a> {
    rt: &'a ResourceType,
    names: Vec<String>,
}

impl Merger<'_> {
    fn merge(&mut self, live: &Value, applied: &Value) -> Value {
        match (live, applied) {
            (Value::Object(l), Value::Object(a)) if !self.rt.map_is_atomic(&self.names) => {
                let mut out = l.clone();
                for (k, av) in a {
                    self.names.push(k.clone());
                    let merged = match l.get(k) {
                        Some(lv) => self.merge(lv, av),
                        None => av.clone(),
                    };
                    self.names.pop();
                    out.insert(k.clone(), merged);
                }
                Value::Object(out)
            }
            (Value::Array(l), Value::Array(a)) => match self.rt.list_kind(&self.names) {
                ListKind::Map(keys) => Value::Array(self.merge_list_map(l, a, &keys)),
                ListKind::Set => {
                    let mut out = l.clone();
                    out.extend(a.iter().filter(|v| !l.contains(v)).cloned());
                    Value::Array(out)
                }
                ListKind::Atomic => applied.clone(),
            },
            _ => applied.clone(),
        }
    }

    /// structured-merge-diff's ordering: applied items in applied order, live-only items kept
    /// where they were relative to them.
    fn merge_list_map(&mut self, live: &[Value], applied: &[Value], keys: &[String]) -> Vec<Value> {
        let lk: Vec<String> = live.iter().map(|i| key_element(i, keys)).collect();
        let ak: Vec<String> = applied.iter().map(|i| key_element(i, keys)).collect();
        let mut out = Vec::with_capacity(live.len().max(applied.len()));
        let mut done = std::collections::BTreeSet::new();
        let (mut li, mut ai) = (0, 0);
        while li < live.len() || ai < applied.len() {
            if li < live.len() {
                let k = &lk[li];
                if done.contains(k) {
                    li += 1;
                    continue;
                }
                if !ak.contains(k) {
                    out.push(live[li].clone());
                    li += 1;
                    continue;
                }
                if ai < applied.len() && ak[ai] == *k {
                    out.push(self.merge(&live[li], &applied[ai]));
                    done.insert(k.clone());
                    li += 1;
                    ai += 1;
                    continue;
                }
            }
            if ai < applied.len() {
                let k = &ak[ai];
                let merged = match lk.iter().position(|x| x == k) {
                    Some(p) => self.merge(&live[p], &applied[ai]),
                    None => applied[ai].clone(),
                };
                out.push(merged);
                done.insert(k.clone());
                ai += 1;
            } else {
                li += 1;
            }
        }
        out
    }
}

/// RFC 6902 JSON patch as kube-apiserver applies it (evanphx/json-patch): a `test` that a
/// missing path equals `null` passes. kube-runtime's `finalizer` helper relies on this when it
/// adds the first finalizer. The patch is all or nothing: on error `doc` may be half patched,
/// and the caller throws it away.
pub fn json_patch(
    doc: &mut Value,
    patch: &json_patch::Patch,
) -> Result<(), json_patch::PatchError> {
    for op in &patch.0 {
        if let json_patch::PatchOperation::Test(t) = op
            && t.value.is_null()
            && t.path.resolve(doc).is_err()
        {
            continue;
        }
        json_patch::patch(doc, std::slice::from_ref(op))?;
    }
    Ok(())
}

/// Why a strategic merge patch was refused.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("strategic merge patch: {0}")]
    Invalid(String),
}

/// Applies a strategic merge patch to `orig`.
pub fn strategic_merge(
    rt: &ResourceType,
    orig: &Value,
    patch: &Value,
) -> Result<Value, PatchError> {
    let out = Smp {
        rt,
        names: Vec::new(),
    }
    .object(orig, patch)?;
    Ok(out.unwrap_or(Value::Object(Map::new())))
}

struct Smp<'a> {
    rt: &'a ResourceType,
    names: Vec<String>,
}

const DELETE_PRIMITIVE: &str = "$deleteFromPrimitiveList/";
const SET_ORDER: &str = "$setElementOrder/";

impl Smp<'_> {
    /// Merges a patch map into a value; `None` means the map asked to be deleted.
    fn object(&mut self, orig: &Value, patch: &Value) -> Result<Option<Value>, PatchError> {
        let Some(p) = patch.as_object() else {
            return Ok(Some(patch.clone()));
        };
        match p.get("$patch").and_then(Value::as_str) {
            Some("delete") => return Ok(None),
            Some("replace") => {
                let mut r = p.clone();
                r.remove("$patch");
                return Ok(Some(Value::Object(r)));
            }
            Some("merge") | None => {}
            Some(other) => {
                return Err(PatchError::Invalid(format!(
                    "unknown $patch directive {other:?}"
                )));
            }
        }
        let mut out = orig.as_object().cloned().unwrap_or_default();
        for (k, pv) in p {
            if k == "$patch" || k == "$retainKeys" || k.starts_with(SET_ORDER) {
                continue;
            }
            if let Some(field) = k.strip_prefix(DELETE_PRIMITIVE) {
                let drop = pv.as_array().cloned().unwrap_or_default();
                if let Some(Value::Array(list)) = out.get_mut(field) {
                    list.retain(|v| !drop.contains(v));
                }
                continue;
            }
            if pv.is_null() {
                out.remove(k);
                continue;
            }
            self.names.push(k.clone());
            let merged = match (out.get(k), pv) {
                (Some(ov), Value::Object(_)) if ov.is_object() => self.object(ov, pv)?,
                (None, Value::Object(_)) => self.object(&Value::Null, pv)?,
                (ov, Value::Array(items)) => Some(self.list(ov, items)?),
                _ => Some(pv.clone()),
            };
            self.names.pop();
            match merged {
                Some(v) => {
                    out.insert(k.clone(), v);
                }
                None => {
                    out.remove(k);
                }
            }
        }
        if let Some(keep) = p.get("$retainKeys").and_then(Value::as_array) {
            out.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
        }
        Ok(Some(Value::Object(out)))
    }

    fn list(&mut self, orig: Option<&Value>, patch: &[Value]) -> Result<Value, PatchError> {
        let orig: Vec<Value> = orig.and_then(Value::as_array).cloned().unwrap_or_default();
        let replace = patch
            .iter()
            .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
        let items = patch
            .iter()
            .filter(|i| i.get("$patch").and_then(Value::as_str) != Some("replace"));
        if replace {
            return Ok(Value::Array(items.cloned().collect()));
        }
        match self.rt.list_kind(&self.names) {
            ListKind::Map(keys) => {
                // The patch merge key is the first list-map key (name, containerPort, port, ...).
                let key = keys.first().cloned().unwrap_or_default();
                let mut out = orig;
                for item in items {
                    let id = item.get(&key).cloned().ok_or_else(|| {
                        PatchError::Invalid(format!(
                            "map in list {} has no merge key {key:?}",
                            self.names.join(".")
                        ))
                    })?;
                    let pos = out.iter().position(|o| o.get(&key) == Some(&id));
                    let merged = match pos {
                        Some(p) => self.object(&out[p], item)?,
                        None => self.object(&Value::Null, item)?,
                    };
                    match (pos, merged) {
                        (Some(p), Some(v)) => out[p] = v,
                        (Some(p), None) => {
                            out.remove(p);
                        }
                        (None, Some(v)) => out.push(v),
                        (None, None) => {}
                    }
                }
                Ok(Value::Array(out))
            }
            ListKind::Set => {
                let mut out = orig;
                let seen: Vec<String> = out.iter().map(value_element).collect();
                out.extend(items.filter(|v| !seen.contains(&value_element(v))).cloned());
                Ok(Value::Array(out))
            }
            ListKind::Atomic => Ok(Value::Array(items.cloned().collect())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::builtins;
    use serde_json::json;

    fn rt(kind: &str) -> ResourceType {
        builtins().into_iter().find(|r| r.kind == kind).unwrap()
    }

    #[test]
    fn smp_merges_containers_env_ports_volumes_by_key() {
        let pod = rt("Pod");
        let orig = json!({"spec": {
            "containers": [{"name": "pg", "image": "pg:15", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                            "ports": [{"containerPort": 5432, "protocol": "TCP"}]},
                           {"name": "side", "image": "s:1"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "tolerations": [{"key": "a"}]}});
        let patch = json!({"spec": {
            "containers": [{"name": "pg", "image": "pg:16", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}],
                            "ports": [{"containerPort": 8008}]},
                           {"name": "side", "$patch": "delete"}],
            "volumes": [{"name": "wal", "emptyDir": {}}],
            "tolerations": [{"key": "b"}]}});
        let out = strategic_merge(&pod, &orig, &patch).unwrap();
        assert_eq!(
            out,
            json!({"spec": {
            "containers": [{"name": "pg", "image": "pg:16",
                "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}],
                "ports": [{"containerPort": 5432, "protocol": "TCP"}, {"containerPort": 8008}]}],
            "volumes": [{"name": "data", "emptyDir": {}}, {"name": "wal", "emptyDir": {}}],
            "tolerations": [{"key": "b"}]}})
        );
    }

    #[test]
    fn smp_directives() {
        let pod = rt("Pod");
        let orig = json!({"metadata": {"finalizers": ["a", "b"], "labels": {"x": "1", "y": "2"}},
            "spec": {"containers": [{"name": "c", "image": "i"}]}});
        let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "finalizers": ["c"], "labels": {"x": null}},
            "spec": {"$setElementOrder/containers": [{"name": "d"}], "containers": [{"name": "d", "image": "j"}, {"$patch": "replace"}]}});
        let out = strategic_merge(&pod, &orig, &patch).unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"finalizers": ["b", "c"], "labels": {"y": "2"}},
            "spec": {"containers": [{"name": "d", "image": "j"}]}})
        );
        let replaced = strategic_merge(
            &pod,
            &orig,
            &json!({"metadata": {"$patch": "replace", "name": "n"}}),
        )
        .unwrap();
        assert_eq!(replaced["metadata"], json!({"name": "n"}));
    }

    #[test]
    fn json_patch_null_test_on_missing_path_passes_like_kube_apiserver() {
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}]))
        .unwrap();
        let mut doc = json!({"metadata": {}});
        assert!(
            json_patch::patch(&mut doc.clone(), &patch).is_err(),
            "plain RFC 6902 refuses"
        );
        json_patch(&mut doc, &patch).unwrap();
        assert_eq!(doc, json!({"metadata": {"finalizers": ["f"]}}));
        let wrong: json_patch::Patch = serde_json::from_value(
            json!([{"op": "test", "path": "/metadata/finalizers", "value": ["x"]}]),
        )
        .unwrap();
        assert!(json_patch(&mut doc, &wrong).is_err());
    }

    #[test]
    fn apply_merge_keeps_live_only_items_in_place() {
        let pod = rt("Pod");
        let live = json!({"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}, {"name": "c", "image": "3"}]}});
        let applied = json!({"spec": {"containers": [{"name": "c", "image": "4"}, {"name": "d", "image": "5"}]}});
        let out = apply_merge(&pod, &live, &applied);
        let names: Vec<&str> = out["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        assert_eq!(out["spec"]["containers"][2]["image"], "4");
    }
}
