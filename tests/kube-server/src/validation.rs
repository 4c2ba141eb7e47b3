//! What the API server does to a custom resource against its CRD's structural schema before
//! storing it: prune unknown fields (unless `x-kubernetes-preserve-unknown-fields`), drop
//! nulls that are not `nullable`, apply `default`s, and reject wrong types, missing `required`
//! fields and values outside an `enum` — so a test cannot pass here with an object a real
//! cluster would store differently or refuse. (CEL rules, formats and patterns are not checked.)

use serde_json::{Map, Value};

/// Prunes, defaults and validates `obj` (a whole custom resource) in place.
pub fn admit(schema: &Value, obj: &mut Value) -> Result<(), Vec<String>> {
    if !schema.is_object() {
        return Ok(());
    }
    let mut errors = Vec::new();
    let Some(root) = obj.as_object_mut() else {
        return Err(vec!["body must be an object".into()]);
    };
    let props = schema.get("properties").and_then(Value::as_object);
    let preserve = preserves(schema);
    let keys: Vec<String> = root.keys().cloned().collect();
    for k in keys {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(&k)) {
            Some(sub) => {
                let mut v = root.remove(&k).expect("key listed");
                if walk(sub, &mut v, &k, &mut errors) {
                    root.insert(k, v);
                }
            }
            None if !preserve => {
                root.remove(&k);
            }
            None => {}
        }
    }
    if let Some(p) = props {
        apply_defaults(p, root, "", &mut errors);
    }
    required(schema, root, "", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn preserves(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
}

fn join(path: &str, k: &str) -> String {
    if path.is_empty() {
        k.to_string()
    } else {
        format!("{path}.{k}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks and prunes `v` at `path`; false if the field should be dropped (a pruned null).
fn walk(schema: &Value, v: &mut Value, path: &str, errors: &mut Vec<String>) -> bool {
    if v.is_null() {
        return schema.get("nullable").and_then(Value::as_bool) == Some(true);
    }
    let int_or_string = schema
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        == Some(true);
    if let Some(want) = schema.get("type").and_then(Value::as_str) {
        let got = type_name(v);
        let ok = got == want
            || (want == "number" && got == "integer")
            || (int_or_string && matches!(got, "integer" | "string"));
        if !ok {
            errors.push(format!(
                "{path}: Invalid value: \"{got}\": {path} in body must be of type {want}: \"{got}\""
            ));
            return true;
        }
    } else if int_or_string && !matches!(type_name(v), "integer" | "string") {
        errors.push(format!(
            "{path}: Invalid value: {v}: {path} in body must be of type integer or string"
        ));
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        errors.push(format!(
            "{path}: Unsupported value: {v}: supported values: {}",
            list.join(", ")
        ));
    }
    match v {
        Value::Object(m) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|a| a.is_object());
            let preserve =
                preserves(schema) || schema.get("additionalProperties") == Some(&Value::Bool(true));
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                let sub = props.and_then(|p| p.get(&k)).or(extra);
                match sub {
                    Some(sub) => {
                        let mut child = m.remove(&k).expect("key listed");
                        if walk(sub, &mut child, &join(path, &k), errors) {
                            m.insert(k, child);
                        }
                    }
                    None if !preserve
                        && (props.is_some() || extra.is_none())
                        && !is_embedded(schema) =>
                    {
                        m.remove(&k);
                    }
                    None => {}
                }
            }
            if let Some(p) = props {
                apply_defaults(p, m, path, errors);
            }
            required(schema, m, path, errors);
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                let mut kept = Vec::with_capacity(items.len());
                for (i, mut item) in std::mem::take(items).into_iter().enumerate() {
                    if walk(item_schema, &mut item, &format!("{path}[{i}]"), errors) {
                        kept.push(item);
                    }
                }
                *items = kept;
            }
        }
        _ => {}
    }
    true
}

fn is_embedded(schema: &Value) -> bool {
    schema
        .get("x-kubernetes-embedded-resource")
        .and_then(Value::as_bool)
        == Some(true)
}

fn apply_defaults(
    props: &Map<String, Value>,
    m: &mut Map<String, Value>,
    path: &str,
    errors: &mut Vec<String>,
) {
    for (k, sub) in props {
        if m.contains_key(k) {
            continue;
        }
        if let Some(d) = sub.get("default") {
            let mut d = d.clone();
            if walk(sub, &mut d, &join(path, k), errors) {
                m.insert(k.clone(), d);
            }
        }
    }
}

fn required(schema: &Value, m: &Map<String, Value>, path: &str, errors: &mut Vec<String>) {
    for r in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if !m.contains_key(r) {
            errors.push(format!("{}: Required value", join(path, r)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "required": ["size"], "properties": {
                "size": {"type": "integer"},
                "mode": {"type": "string", "enum": ["a", "b"], "default": "a"},
                "opt": {"type": "string", "nullable": true},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "port": {"x-kubernetes-int-or-string": true}}},
            "status": {"type": "object", "properties": {"phase": {"type": "string"}}}}})
    }

    #[test]
    fn prunes_and_defaults() {
        let mut o = json!({"apiVersion": "x/v1", "kind": "W", "metadata": {"name": "w", "anything": 1}, "junk": 1,
            "spec": {"size": 1, "unknown": true, "opt": null, "free": {"x": {"y": 1}}, "labels": {"a": "b"}, "port": "http"}});
        admit(&schema(), &mut o).unwrap();
        assert_eq!(
            o,
            json!({"apiVersion": "x/v1", "kind": "W", "metadata": {"name": "w", "anything": 1},
            "spec": {"size": 1, "mode": "a", "opt": null, "free": {"x": {"y": 1}}, "labels": {"a": "b"}, "port": "http"}})
        );
    }

    #[test]
    fn rejects_wrong_types_missing_required_and_enum() {
        let mut o = json!({"spec": {"size": "big", "mode": "c", "labels": {"a": 1}}});
        let errs = admit(&schema(), &mut o).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.starts_with("spec.size: Invalid value: \"string\"")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("spec.mode: Unsupported value")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("spec.labels.a: Invalid value")),
            "{errs:?}"
        );
        let errs = admit(&schema(), &mut json!({"spec": {}})).unwrap_err();
        assert_eq!(errs, ["spec.size: Required value"]);
    }
}
