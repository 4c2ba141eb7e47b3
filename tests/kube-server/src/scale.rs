//! The `/scale` subresource (`autoscaling/v1 Scale`) of StatefulSets and of custom resources
//! whose CRD declares one: read replicas and selector, write `spec.replicas` through it.
//! `kubectl scale` and autoscalers use it.

use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::resources::ScalePaths;

fn pointer(path: &str) -> String {
    path.replace('.', "/")
}

/// The `Scale` view of `obj`.
pub fn view(paths: &ScalePaths, obj: &Value) -> Value {
    let m = obj.get("metadata").cloned().unwrap_or(json!({}));
    let keep = [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ];
    let meta: serde_json::Map<String, Value> = keep
        .iter()
        .filter_map(|k| m.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    let replicas = |p: &str| obj.pointer(&pointer(p)).cloned().unwrap_or(json!(0));
    let selector = match &paths.label_selector {
        Some(p) => obj.pointer(&pointer(p)).cloned().unwrap_or(json!("")),
        None => json!(selector_string(obj.pointer("/spec/selector"))),
    };
    json!({"kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": meta,
        "spec": {"replicas": replicas(&paths.spec_replicas)},
        "status": {"replicas": replicas(&paths.status_replicas), "selector": selector}})
}

/// `metav1.LabelSelector` as the string form `Scale.status.selector` carries.
pub(crate) fn selector_string(sel: Option<&Value>) -> String {
    let Some(sel) = sel else { return String::new() };
    let mut parts: Vec<String> = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e.get("key").and_then(Value::as_str).unwrap_or_default();
        let values: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        parts.push(
            match e
                .get("operator")
                .and_then(Value::as_str)
                .unwrap_or_default()
            {
                "In" => format!("{key} in ({})", values.join(",")),
                "NotIn" => format!("{key} notin ({})", values.join(",")),
                "Exists" => key.to_string(),
                _ => format!("!{key}"),
            },
        );
    }
    parts.join(",")
}

/// The object with the replicas a written `Scale` asks for; the Scale's resourceVersion, if
/// any, becomes the update's precondition.
pub fn apply(paths: &ScalePaths, current: &Value, scale: &Value) -> ApiResult<Value> {
    let replicas = scale
        .pointer("/spec/replicas")
        .filter(|r| r.is_u64())
        .cloned()
        .ok_or_else(|| {
            ApiError::bad_request("Scale.spec.replicas must be a non-negative integer")
        })?;
    let mut obj = current.clone();
    let mut node = &mut obj;
    let segments: Vec<&str> = paths
        .spec_replicas
        .trim_start_matches('.')
        .split('.')
        .collect();
    for (i, seg) in segments.iter().enumerate() {
        if i + 1 == segments.len() {
            node[*seg] = replicas.clone();
            break;
        }
        if !node.get(*seg).is_some_and(Value::is_object) {
            node[*seg] = json!({});
        }
        node = &mut node[*seg];
    }
    match scale
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        Some(rv) if !rv.is_empty() => obj["metadata"]["resourceVersion"] = json!(rv),
        _ => {}
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_view_and_write() {
        let rt = crate::resources::builtins()
            .into_iter()
            .find(|r| r.kind == "StatefulSet")
            .unwrap();
        let paths = rt.scale.clone().unwrap();
        let sts = json!({"metadata": {"name": "db", "resourceVersion": "7", "labels": {"x": "y"}},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "db"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}},
            "status": {"replicas": 1}});
        let v = view(&paths, &sts);
        assert_eq!(v["spec"]["replicas"], 2);
        assert_eq!(
            v["status"],
            json!({"replicas": 1, "selector": "app=db,tier in (a,b)"})
        );
        assert!(v["metadata"].get("labels").is_none());
        let out = apply(&paths, &sts, &json!({"spec": {"replicas": 5}})).unwrap();
        assert_eq!(out["spec"]["replicas"], 5);
        assert!(apply(&paths, &sts, &json!({"spec": {"replicas": -1}})).is_err());
    }
}
