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

/// Fields of `before` that pruning removed (nulls excepted), as `spec.a.b` paths: what
/// `fieldValidation=Strict` reports as unknown.
pub fn pruned_fields(before: &Value, after: &Value) -> Vec<String> {
    fn walk(before: &Value, after: &Value, path: &str, out: &mut Vec<String>) {
        match (before, after) {
            (Value::Object(b), Value::Object(a)) => {
                for (k, bv) in b {
                    match a.get(k) {
                        Some(av) => walk(bv, av, &join(path, k), out),
                        None if !bv.is_null() => out.push(join(path, k)),
                        None => {}
                    }
                }
            }
            (Value::Array(b), Value::Array(a)) if a.len() == b.len() => {
                for (i, (bv, av)) in b.iter().zip(a).enumerate() {
                    walk(bv, av, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(before, after, "", &mut out);
    out
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
    fn pruned_fields_are_reported() {
        let before =
            json!({"spec": {"size": 1, "bogus": true, "opt": null, "free": {"x": 1}}, "junk": 1});
        let mut after = before.clone();
        admit(&schema(), &mut after).unwrap();
        assert_eq!(pruned_fields(&before, &after), ["junk", "spec.bogus"]);
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

/// Validation every object gets: its name (RFC 1123 subdomain; a label for namespaces) and its
/// label keys and values, as `ValidateObjectMeta` checks them.
pub fn object_meta(kind: &str, name: &str, obj: &Value) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let ok = if kind == "Namespace" {
        is_dns_label(name)
    } else {
        is_dns_subdomain(name)
    };
    if !ok {
        let what = if kind == "Namespace" {
            "RFC 1123 label"
        } else {
            "RFC 1123 subdomain"
        };
        errors.push(format!(
            "metadata.name: Invalid value: {name:?}: a lowercase {what} must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        ));
    }
    for (k, v) in obj
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        if !is_qualified_name(k) {
            errors.push(format!("metadata.labels: Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.'"));
        }
        let v = v.as_str().unwrap_or("\u{0}");
        let valid_value = v.is_empty()
            || (v.len() <= 63
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric()));
        if !valid_value {
            errors.push(format!("metadata.labels: Invalid value: {v:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_qualified_name(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(is_dns_subdomain)
        && !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Create-time checks of the built-in types that tests are likely to trip over.
pub fn builtin_create(kind: &str, obj: &Value) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let containers = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let check_containers = |p: &str, field: &str, errors: &mut Vec<String>| {
        let cs = containers(p);
        if cs.is_empty() {
            errors.push(format!("{field}: Required value"));
        }
        for (i, c) in cs.iter().enumerate() {
            for f in ["name", "image"] {
                if c.get(f).and_then(Value::as_str).is_none_or(str::is_empty) {
                    errors.push(format!("{field}[{i}].{f}: Required value"));
                }
            }
        }
    };
    match kind {
        "Pod" => check_containers("/spec/containers", "spec.containers", &mut errors),
        "StatefulSet" | "Deployment" => {
            check_containers(
                "/spec/template/spec/containers",
                "spec.template.spec.containers",
                &mut errors,
            );
            if obj.pointer("/spec/selector").is_none() {
                errors.push("spec.selector: Required value".into());
            }
        }
        _ => {}
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Update-time immutability of the built-in types, as their strategies enforce it: a test
/// that changes what a real cluster would refuse fails here too.
pub fn builtin_update(kind: &str, old: &Value, new: &Value) -> Result<(), Vec<String>> {
    let spec = |v: &Value| v.get("spec").cloned().unwrap_or(Value::Null);
    let strip = |mut v: Value, keys: &[&str]| {
        if let Some(m) = v.as_object_mut() {
            for k in keys {
                m.remove(*k);
            }
        }
        v
    };
    let mut errors = Vec::new();
    match kind {
        "Pod" => {
            let mutable = |v: &Value| {
                let mut s = strip(
                    spec(v),
                    &[
                        "activeDeadlineSeconds",
                        "tolerations",
                        "terminationGracePeriodSeconds",
                    ],
                );
                for list in ["containers", "initContainers", "ephemeralContainers"] {
                    if let Some(cs) = s.get_mut(list).and_then(Value::as_array_mut) {
                        for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                            c.remove("image");
                        }
                    }
                }
                s
            };
            if mutable(old) != mutable(new) {
                errors.push("spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)".into());
            }
        }
        "StatefulSet" => {
            let fixed = |v: &Value| {
                strip(
                    spec(v),
                    &[
                        "replicas",
                        "ordinals",
                        "template",
                        "updateStrategy",
                        "persistentVolumeClaimRetentionPolicy",
                        "minReadySeconds",
                    ],
                )
            };
            if fixed(old) != fixed(new) {
                errors.push("spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden".into());
            }
        }
        "Deployment" if old.pointer("/spec/selector") != new.pointer("/spec/selector") => {
            errors.push("spec.selector: Invalid value: field is immutable".into());
        }
        "PersistentVolumeClaim" => {
            let fixed = |v: &Value| {
                let mut s = strip(spec(v), &["volumeAttributesClassName"]);
                if let Some(r) = s
                    .pointer_mut("/resources/requests")
                    .and_then(Value::as_object_mut)
                {
                    r.remove("storage");
                }
                s
            };
            if fixed(old) != fixed(new) {
                errors.push("spec: Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims".into());
            }
        }
        "Service" => {
            let ip = |v: &Value| v.pointer("/spec/clusterIP").cloned();
            if ip(new).is_some_and(|n| n != Value::String(String::new())) && ip(old) != ip(new) {
                errors.push("spec.clusterIPs[0]: Invalid value: field is immutable".into());
            }
        }
        "ConfigMap" | "Secret" if old.get("immutable") == Some(&Value::Bool(true)) => {
            let body = |v: &Value| {
                (
                    v.get("data").cloned(),
                    v.get("binaryData").cloned(),
                    v.get("stringData").cloned(),
                )
            };
            if body(old) != body(new) {
                errors.push("data: Forbidden: field is immutable when `immutable` is set".into());
            }
            if new.get("immutable") != Some(&Value::Bool(true)) {
                errors.push(
                    "immutable: Forbidden: field is immutable when `immutable` is set".into(),
                );
            }
        }
        _ => {}
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod builtin_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_and_labels() {
        let labels = |l: Value| json!({"metadata": {"labels": l}});
        assert!(
            object_meta(
                "ConfigMap",
                "a.b-c",
                &labels(json!({"app.kubernetes.io/name": "x_y", "e": ""}))
            )
            .is_ok()
        );
        assert!(object_meta("ConfigMap", "Upper", &json!({})).is_err());
        assert!(object_meta("Namespace", "a.b", &json!({})).is_err());
        assert!(object_meta("ConfigMap", "a", &labels(json!({"k": "-bad"}))).is_err());
        assert!(object_meta("ConfigMap", "a", &labels(json!({"bad key!": "v"}))).is_err());
    }

    #[test]
    fn secret_string_data_becomes_data() {
        let mut s = json!({"data": {"a": "eA=="}, "stringData": {"b": "hi", "a": "y"}});
        default_builtin("Secret", &mut s);
        assert_eq!(
            s,
            json!({"data": {"a": "eQ==", "b": "aGk="}, "type": "Opaque"})
        );
    }

    #[test]
    fn pod_and_statefulset_immutability() {
        let pod = json!({"spec": {"containers": [{"name": "c", "image": "a", "env": []}]}});
        let mut image = pod.clone();
        image["spec"]["containers"][0]["image"] = json!("b");
        assert!(builtin_update("Pod", &pod, &image).is_ok());
        let mut env = pod.clone();
        env["spec"]["containers"][0]["env"] = json!([{"name": "X"}]);
        assert!(builtin_update("Pod", &pod, &env).is_err());

        let sts = json!({"spec": {"replicas": 1, "serviceName": "s", "template": {}, "volumeClaimTemplates": []}});
        let mut scaled = sts.clone();
        scaled["spec"]["replicas"] = json!(3);
        assert!(builtin_update("StatefulSet", &sts, &scaled).is_ok());
        let mut claims = sts.clone();
        claims["spec"]["volumeClaimTemplates"] = json!([{"metadata": {"name": "d"}}]);
        assert!(builtin_update("StatefulSet", &sts, &claims).is_err());
        assert!(builtin_create("Pod", &json!({"spec": {"containers": []}})).is_err());
    }
}

/// Defaults of the built-in types that change how objects merge and compare: `protocol: TCP`
/// on container and service ports (part of their list-map keys), a Service port's
/// `targetPort`, and a Secret's write-only `stringData` folded into `data`.
pub fn default_builtin(kind: &str, obj: &mut Value) {
    if kind == "Secret" {
        secret_string_data(obj);
        return;
    }
    let mut ports: Vec<&mut Value> = Vec::new();
    let pod_spec = match kind {
        "Pod" => obj.get_mut("spec"),
        "StatefulSet" => obj.pointer_mut("/spec/template/spec"),
        "Service" => {
            for p in obj
                .pointer_mut("/spec/ports")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                if p.get("targetPort").is_none()
                    && let Some(port) = p.get("port").cloned()
                {
                    p["targetPort"] = port;
                }
                ports.push(p);
            }
            None
        }
        _ => None,
    };
    if let Some(spec) = pod_spec.and_then(Value::as_object_mut) {
        for (k, list) in spec.iter_mut() {
            if matches!(
                k.as_str(),
                "containers" | "initContainers" | "ephemeralContainers"
            ) {
                for c in list.as_array_mut().into_iter().flatten() {
                    ports.extend(
                        c.get_mut("ports")
                            .and_then(Value::as_array_mut)
                            .into_iter()
                            .flatten(),
                    );
                }
            }
        }
    }
    for p in ports {
        if let Some(m) = p.as_object_mut() {
            m.entry("protocol")
                .or_insert_with(|| Value::String("TCP".into()));
        }
    }
}

/// A Secret's `stringData` is write-only: the server base64-encodes it into `data` (winning
/// over the same key there) and never stores it. `type` defaults to `Opaque`.
fn secret_string_data(obj: &mut Value) {
    use base64::Engine as _;
    let Some(m) = obj.as_object_mut() else { return };
    if let Some(Value::Object(strings)) = m.remove("stringData") {
        let data = m.entry("data").or_insert_with(|| Value::Object(Map::new()));
        if let Some(data) = data.as_object_mut() {
            for (k, v) in strings {
                let text = v.as_str().unwrap_or_default().to_string();
                data.insert(
                    k,
                    Value::String(base64::engine::general_purpose::STANDARD.encode(text)),
                );
            }
        }
    }
    m.entry("type")
        .or_insert_with(|| Value::String("Opaque".into()));
}
