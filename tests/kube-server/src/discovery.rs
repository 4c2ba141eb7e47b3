//! Discovery documents (`/api`, `/apis`, `/apis/<group>`, `/api/v1`, `/apis/<group>/<version>`,
//! `/version`) in the legacy (unaggregated) format, which kube-rs and kubectl both understand,
//! and the `Table` rendering kubectl asks for with `as=Table`.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::resources::ResourceType;

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

pub fn version() -> Value {
    json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-pgpilot-testserver", "gitCommit": "", "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64"})
}

pub fn core_versions(server: &str) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}]})
}

/// Group name → versions, preferred first, in first-seen order of `types`.
fn groups(types: &[Arc<ResourceType>]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for t in types.iter().filter(|t| !t.group.is_empty()) {
        let entry = match out.iter_mut().position(|(g, _)| *g == t.group) {
            Some(i) => &mut out[i],
            None => {
                out.push((t.group.clone(), Vec::new()));
                out.last_mut().expect("just pushed")
            }
        };
        for v in &t.versions {
            if !entry.1.contains(v) {
                entry.1.push(v.clone());
            }
        }
    }
    out
}

fn group_doc(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({"name": name, "versions": vs, "preferredVersion": vs[0]})
}

pub fn group_list(types: &[Arc<ResourceType>]) -> Value {
    let gs: Vec<Value> = groups(types)
        .iter()
        .map(|(g, vs)| group_doc(g, vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": gs})
}

pub fn group(types: &[Arc<ResourceType>], name: &str) -> Option<Value> {
    groups(types)
        .iter()
        .find(|(g, _)| g == name)
        .map(|(g, vs)| {
            let mut d = group_doc(g, vs);
            d["kind"] = json!("APIGroup");
            d["apiVersion"] = json!("v1");
            d
        })
}

pub fn resource_list(types: &[Arc<ResourceType>], group: &str, version: &str) -> Option<Value> {
    let served: Vec<&Arc<ResourceType>> = types
        .iter()
        .filter(|t| t.group == group && t.versions.iter().any(|v| v == version))
        .collect();
    if served.is_empty() {
        return None;
    }
    let mut resources = Vec::new();
    for t in served {
        resources.push(json!({"name": t.plural, "singularName": t.singular, "namespaced": t.namespaced, "kind": t.kind,
            "verbs": VERBS, "shortNames": t.short_names, "categories": t.categories}));
        if t.status_subresource {
            resources.push(json!({"name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced,
                "kind": t.kind, "verbs": ["get", "patch", "update"]}));
        }
        if t.scale.is_some() {
            resources.push(json!({"name": format!("{}/scale", t.plural), "singularName": "", "namespaced": t.namespaced,
                "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"]}));
        }
        for (sub, group, version, kind, verbs) in pod_subresources(t) {
            resources.push(json!({"name": format!("{}/{sub}", t.plural), "singularName": "", "namespaced": true,
                "group": group, "version": version, "kind": kind, "verbs": verbs}));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

/// The pod subresources a kubelet and `kubectl drain`/`logs` use: `(name, group, version,
/// kind, verbs)`.
fn pod_subresources(
    t: &ResourceType,
) -> Vec<(
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Vec<&'static str>,
)> {
    if !(t.group.is_empty() && t.plural == "pods") {
        return Vec::new();
    }
    vec![
        ("binding", "", "v1", "Binding", vec!["create"]),
        ("eviction", "policy", "v1", "Eviction", vec!["create"]),
        ("log", "", "v1", "Pod", vec!["get"]),
    ]
}

/// The media type of aggregated discovery (`apidiscovery.k8s.io/v2`).
pub const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Aggregated discovery: every group (or, for `/api`, the core group), every version and its
/// resources in one `APIGroupDiscoveryList` — what kube-rs' `Discovery::run_aggregated` and
/// kubectl ask for first.
pub fn aggregated(types: &[Arc<ResourceType>], core: bool) -> Value {
    let mut names: Vec<String> = if core {
        vec![String::new()]
    } else {
        groups(types).into_iter().map(|(g, _)| g).collect()
    };
    names.dedup();
    let items: Vec<Value> = names
        .iter()
        .map(|g| {
            let versions: Vec<String> = if g.is_empty() {
                vec!["v1".into()]
            } else {
                groups(types).into_iter().find(|(n, _)| n == g).map(|(_, v)| v).unwrap_or_default()
            };
            let vs: Vec<Value> = versions
                .iter()
                .map(|v| {
                    let resources: Vec<Value> = types
                        .iter()
                        .filter(|t| t.group == *g && t.versions.contains(v))
                        .map(|t| {
                            let kind = json!({"group": t.group, "version": v, "kind": t.kind});
                            let mut r = json!({"resource": t.plural, "responseKind": kind,
                                "scope": if t.namespaced { "Namespaced" } else { "Cluster" },
                                "singularResource": t.singular, "verbs": VERBS,
                                "shortNames": t.short_names, "categories": t.categories});
                            let mut subs = Vec::new();
                            if t.status_subresource {
                                subs.push(json!({"subresource": "status", "responseKind": kind,
                                    "verbs": ["get", "patch", "update"]}));
                            }
                            if t.scale.is_some() {
                                subs.push(json!({"subresource": "scale",
                                    "responseKind": {"group": "autoscaling", "version": "v1", "kind": "Scale"},
                                    "verbs": ["get", "patch", "update"]}));
                            }
                            for (sub, group, version, kind, verbs) in pod_subresources(t) {
                                subs.push(json!({"subresource": sub,
                                    "responseKind": {"group": group, "version": version, "kind": kind},
                                    "verbs": verbs}));
                            }
                            if !subs.is_empty() {
                                r["subresources"] = json!(subs);
                            }
                            r
                        })
                        .collect();
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": g}, "versions": vs})
        })
        .collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items})
}

fn human_age(ts: &str) -> String {
    let Ok(t) = ts.parse::<jiff::Timestamp>() else {
        return "<unknown>".into();
    };
    let secs = (jiff::Timestamp::now().as_second() - t.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Evaluates the JSONPath forms printer columns use: `.a.b`, `.a[0].b`, `.a[*].b` and
/// `.a[?(@.k=="v")].b`. Every match, in order.
fn json_path<'a>(obj: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut nodes = vec![obj];
    let mut rest = path.trim_start_matches('.');
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (field, tail) = rest.split_at(end);
        if !field.is_empty() {
            nodes = nodes.into_iter().filter_map(|n| n.get(field)).collect();
        }
        rest = tail;
        if let Some(t) = rest.strip_prefix('[') {
            let Some(close) = t.find(']') else {
                return Vec::new();
            };
            let selector = &t[..close];
            rest = &t[close + 1..];
            let lists = nodes;
            let items = || {
                lists
                    .iter()
                    .filter_map(|l| l.as_array())
                    .flat_map(|a| a.iter())
            };
            nodes = if selector == "*" {
                items().collect()
            } else if let Ok(i) = selector.parse::<usize>() {
                lists.iter().filter_map(|l| l.get(i)).collect()
            } else if let Some(cond) = selector
                .strip_prefix("?(@.")
                .and_then(|c| c.strip_suffix(')'))
                && let Some((key, want)) = cond.split_once("==")
            {
                let want = want.trim().trim_matches(['"', '\'']);
                items()
                    .filter(|i| {
                        json_path(i, key.trim())
                            .first()
                            .is_some_and(|v| v.as_str().map_or(v.to_string(), String::from) == want)
                    })
                    .collect()
            } else {
                return Vec::new();
            };
        }
        rest = rest.trim_start_matches('.');
    }
    nodes
}

/// A printer column's cell: nothing, the one value, or every value joined with commas.
fn cell(values: Vec<&Value>) -> Value {
    match values.as_slice() {
        [] => Value::Null,
        [one] => (*one).clone(),
        many => json!(
            many.iter()
                .map(|v| v.as_str().map_or(v.to_string(), String::from))
                .collect::<Vec<_>>()
                .join(",")
        ),
    }
}

/// The columns `kubectl get` shows for a few built-in kinds (after Name, before Age), as the
/// real server's printers compute them; priority 1 columns appear with `-o wide`.
fn builtin_columns(kind: &str) -> &'static [(&'static str, i32)] {
    match kind {
        "Pod" => &[
            ("Ready", 0),
            ("Status", 0),
            ("Restarts", 0),
            ("IP", 1),
            ("Node", 1),
        ],
        "StatefulSet" => &[("Ready", 0)],
        "Deployment" => &[("Ready", 0), ("Up-to-date", 0), ("Available", 0)],
        "Service" => &[("Type", 0), ("Cluster-IP", 0), ("Port(s)", 0)],
        _ => &[],
    }
}

fn builtin_cells(kind: &str, o: &Value) -> Vec<Value> {
    let n = |p: &str| o.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let list = |p: &str| {
        o.pointer(p)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    match kind {
        "Pod" => {
            let statuses = list("/status/containerStatuses");
            let ready = statuses
                .iter()
                .filter(|c| c.get("ready") == Some(&json!(true)))
                .count();
            let restarts: u64 = statuses
                .iter()
                .filter_map(|c| c.get("restartCount").and_then(Value::as_u64))
                .sum();
            let status = if o.pointer("/metadata/deletionTimestamp").is_some() {
                "Terminating".to_string()
            } else {
                o.pointer("/status/phase")
                    .and_then(Value::as_str)
                    .unwrap_or("Pending")
                    .to_string()
            };
            let s = |p: &str| o.pointer(p).cloned().unwrap_or(json!("<none>"));
            vec![
                json!(format!("{ready}/{}", list("/spec/containers").len())),
                json!(status),
                json!(restarts),
                s("/status/podIP"),
                s("/spec/nodeName"),
            ]
        }
        "StatefulSet" => vec![json!(format!(
            "{}/{}",
            n("/status/readyReplicas"),
            o.pointer("/spec/replicas")
                .and_then(Value::as_u64)
                .unwrap_or(1)
        ))],
        "Deployment" => vec![
            json!(format!(
                "{}/{}",
                n("/status/readyReplicas"),
                o.pointer("/spec/replicas")
                    .and_then(Value::as_u64)
                    .unwrap_or(1)
            )),
            json!(n("/status/updatedReplicas")),
            json!(n("/status/availableReplicas")),
        ],
        "Service" => {
            let ports: Vec<String> = list("/spec/ports")
                .iter()
                .map(|p| {
                    format!(
                        "{}/{}",
                        p.get("port").and_then(Value::as_u64).unwrap_or(0),
                        p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                    )
                })
                .collect();
            vec![
                o.pointer("/spec/type")
                    .cloned()
                    .unwrap_or(json!("ClusterIP")),
                o.pointer("/spec/clusterIP")
                    .cloned()
                    .unwrap_or(json!("<none>")),
                json!(if ports.is_empty() {
                    "<none>".to_string()
                } else {
                    ports.join(",")
                }),
            ]
        }
        _ => Vec::new(),
    }
}

/// A `meta.k8s.io/v1 Table` of `items`: Name, then the CRD's printer columns (or, for a
/// built-in, its printer's columns and Age).
pub fn table(rt: &ResourceType, items: &[Value], resource_version: &str) -> Value {
    let mut columns = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
    ];
    let builtin = if rt.printer_columns.is_empty() {
        builtin_columns(&rt.kind)
    } else {
        &[]
    };
    for (name, priority) in builtin {
        columns.push(json!({"name": name, "type": "string", "format": "", "description": "", "priority": priority}));
    }
    let printer: Vec<&Value> = rt.printer_columns.iter().collect();
    if printer.is_empty() {
        columns.push(json!({"name": "Age", "type": "date", "format": "", "description": "CreationTimestamp", "priority": 0}));
    }
    for c in &printer {
        columns.push(json!({"name": c.get("name"), "type": c.get("type").cloned().unwrap_or(json!("string")),
            "format": c.get("format").cloned().unwrap_or(json!("")), "description": c.get("description").cloned().unwrap_or(json!("")),
            "priority": c.get("priority").cloned().unwrap_or(json!(0))}));
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut cells = vec![o.pointer("/metadata/name").cloned().unwrap_or(Value::Null)];
            if !builtin.is_empty() {
                cells.extend(builtin_cells(&rt.kind, o));
            }
            if printer.is_empty() {
                cells.push(json!(human_age(o.pointer("/metadata/creationTimestamp").and_then(Value::as_str).unwrap_or_default())));
            }
            for c in &printer {
                let path = c.get("jsonPath").and_then(Value::as_str).unwrap_or_default();
                let v = cell(json_path(o, path));
                let cell = match (c.get("type").and_then(Value::as_str), &v) {
                    (Some("date"), Value::String(s)) => json!(human_age(s)),
                    _ => v,
                };
                cells.push(cell);
            }
            let meta = o.get("metadata").cloned().unwrap_or(json!({}));
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": columns, "rows": rows})
}

/// `/openapi/v3`: the index of group-version documents.
pub fn openapi_index(types: &[Arc<ResourceType>]) -> Value {
    let mut paths = serde_json::Map::new();
    for t in types {
        for v in &t.versions {
            let gv = gv_path(&t.group, v);
            paths.insert(
                gv.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{gv}")}),
            );
        }
    }
    json!({"paths": paths})
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3/<gv>`: a minimal document. It carries what kubectl looks for — each type's
/// PATCH operation with its group-version-kind and the `fieldValidation` query parameter, so
/// kubectl leaves validation to the server — and each type's schema (a CRD's own, or an open
/// object for built-ins).
pub fn openapi_group_version(types: &[Arc<ResourceType>], gv: &str) -> Option<Value> {
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for t in types {
        for v in t.versions.iter().filter(|v| gv_path(&t.group, v) == gv) {
            let gvk = json!({"group": t.group, "version": v, "kind": t.kind});
            let item = if t.namespaced {
                format!("/{gv}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
            } else {
                format!("/{gv}/{}/{{name}}", t.plural)
            };
            let params: Vec<Value> = ["fieldValidation", "fieldManager", "dryRun", "force"]
                .iter()
                .map(|p| json!({"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": true}}))
                .collect();
            let schema_name = format!(
                "{}.{}.{}",
                if t.group.is_empty() { "core" } else { &t.group },
                v,
                t.kind
            );
            let op = |verb: &str| {
                json!({"operationId": format!("{verb}{}", t.kind), "parameters": params, "x-kubernetes-group-version-kind": gvk,
                    "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema_name}")}}}}}})
            };
            paths.insert(item, json!({"get": op("read"), "put": op("replace"), "patch": op("patch"), "delete": op("delete")}));
            let mut schema = match &t.schema {
                crate::resources::Schema::OpenApi(s) if s.is_object() => s.clone(),
                _ => json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
            };
            schema["x-kubernetes-group-version-kind"] = json!([gvk]);
            schemas.insert(schema_name, schema);
        }
    }
    if paths.is_empty() {
        return None;
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths, "components": {"schemas": schemas}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_path_forms() {
        let o = json!({"spec": {"a": [{"b": 1}], "c": "x"}});
        assert_eq!(json_path(&o, ".spec.c"), [&json!("x")]);
        assert_eq!(json_path(&o, ".spec.a[0].b"), [&json!(1)]);
        assert!(json_path(&o, ".spec.missing").is_empty());
        let st = json!({"status": {"conditions": [{"type": "Ready", "status": "True"},
            {"type": "Degraded", "status": "False"}], "shards": [{"primary": "p0"}, {}, {"primary": "p2"}]}});
        assert_eq!(
            cell(json_path(
                &st,
                r#".status.conditions[?(@.type=="Ready")].status"#
            )),
            json!("True")
        );
        assert_eq!(
            cell(json_path(&st, ".status.shards[*].primary")),
            json!("p0,p2")
        );
        assert_eq!(
            cell(json_path(&st, ".status.shards[1].primary")),
            Value::Null
        );
    }
}
