//! What the server serves: the built-in resource types, custom resources made from CRDs, and
//! the per-type schema facts that merging needs (which lists are maps keyed by which fields,
//! which are sets). Built-ins use a small table of the list-map keys Kubernetes declares in its
//! Go types; custom resources read `x-kubernetes-list-type` / `x-kubernetes-list-map-keys` /
//! `x-kubernetes-map-type` from the CRD's `openAPIV3Schema`, as the real server does.

use serde_json::Value;

/// How a list merges, in server-side apply and strategic merge patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListKind {
    /// Replaced as a whole (the default for lists with no declaration).
    Atomic,
    /// Items are scalars, merged as a set.
    Set,
    /// Items are objects identified by these key fields.
    Map(Vec<String>),
}

/// Where a type's schema facts come from.
#[derive(Debug, Clone)]
pub enum Schema {
    /// A built-in type: `(dotted path of field names, list kind)`.
    Builtin(Vec<(String, ListKind)>),
    /// A custom resource: the version's `openAPIV3Schema`.
    OpenApi(Value),
}

#[derive(Debug, Clone)]
pub struct ResourceType {
    pub group: String,
    /// Versions served; the first is the preferred (storage) one.
    pub versions: Vec<String>,
    pub kind: String,
    pub list_kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub status_subresource: bool,
    /// Whether the type keeps `metadata.generation` (types with a spec do; ConfigMaps do not).
    pub generation: bool,
    /// `additionalPrinterColumns` of a CRD, used for `kubectl get` tables.
    pub printer_columns: Vec<Value>,
    pub schema: Schema,
    /// Whether strategic merge patch is accepted (built-ins only, as in Kubernetes).
    pub strategic_merge: bool,
    /// Whether a PUT may omit `metadata.resourceVersion` (true for most built-ins; custom
    /// resources and CRDs insist on it).
    pub unconditional_update: bool,
    /// The scale subresource, if the type has one.
    pub scale: Option<ScalePaths>,
}

/// Where a type keeps what its `/scale` subresource shows (dotted paths, as in a CRD's
/// `subresources.scale`).
#[derive(Debug, Clone)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: String,
    /// A string field holding the label selector; `None` for StatefulSets, whose selector is
    /// rendered from `spec.selector`.
    pub label_selector: Option<String>,
}

impl ResourceType {
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }

    /// `leases.coordination.k8s.io`, the form error messages use.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The list kind at `path` (field names only, list items transparent).
    pub fn list_kind(&self, path: &[String]) -> ListKind {
        if let Some(k) = metadata_list_kind(path) {
            return k;
        }
        match &self.schema {
            Schema::Builtin(table) => {
                let dotted = path.join(".");
                table
                    .iter()
                    .find(|(p, _)| *p == dotted)
                    .map(|(_, k)| k.clone())
                    .unwrap_or(ListKind::Atomic)
            }
            Schema::OpenApi(schema) => openapi_node(schema, path)
                .map(openapi_list_kind)
                .unwrap_or(ListKind::Atomic),
        }
    }

    /// Whether the map at `path` is atomic (`x-kubernetes-map-type: atomic`), replaced whole.
    pub fn map_is_atomic(&self, path: &[String]) -> bool {
        match &self.schema {
            Schema::Builtin(_) => false,
            Schema::OpenApi(schema) => {
                openapi_node(schema, path)
                    .and_then(|n| n.get("x-kubernetes-map-type"))
                    .and_then(Value::as_str)
                    == Some("atomic")
            }
        }
    }
}

/// ObjectMeta's declared lists, common to every type.
fn metadata_list_kind(path: &[String]) -> Option<ListKind> {
    match path {
        [m, f] if m == "metadata" && f == "finalizers" => Some(ListKind::Set),
        [m, f] if m == "metadata" && f == "ownerReferences" => {
            Some(ListKind::Map(vec!["uid".into()]))
        }
        _ => None,
    }
}

fn openapi_node<'a>(schema: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut node = schema;
    for seg in path {
        // Lists are transparent in paths: step into `items` first.
        while node.get("type").and_then(Value::as_str) == Some("array") {
            node = node.get("items")?;
        }
        node = match node.get("properties").and_then(|p| p.get(seg)) {
            Some(n) => n,
            None => node.get("additionalProperties").filter(|a| a.is_object())?,
        };
    }
    Some(node)
}

fn openapi_list_kind(node: &Value) -> ListKind {
    match node.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => ListKind::Set,
        Some("map") => ListKind::Map(
            node.get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        _ => ListKind::Atomic,
    }
}

fn map(keys: &[&str]) -> ListKind {
    ListKind::Map(keys.iter().map(|k| k.to_string()).collect())
}

/// The list declarations of a PodSpec found at `prefix`.
fn pod_spec_lists(prefix: &str, out: &mut Vec<(String, ListKind)>) {
    let p = |s: &str| format!("{prefix}.{s}");
    for c in ["containers", "initContainers", "ephemeralContainers"] {
        out.push((p(c), map(&["name"])));
        out.push((p(&format!("{c}.env")), map(&["name"])));
        out.push((
            p(&format!("{c}.ports")),
            map(&["containerPort", "protocol"]),
        ));
        out.push((p(&format!("{c}.volumeMounts")), map(&["mountPath"])));
        out.push((p(&format!("{c}.volumeDevices")), map(&["devicePath"])));
        out.push((p(&format!("{c}.resizePolicy")), ListKind::Atomic));
    }
    out.push((p("volumes"), map(&["name"])));
    out.push((p("imagePullSecrets"), map(&["name"])));
    out.push((p("hostAliases"), map(&["ip"])));
    out.push((
        p("topologySpreadConstraints"),
        map(&["topologyKey", "whenUnsatisfiable"]),
    ));
    out.push((p("resourceClaims"), map(&["name"])));
    out.push((p("schedulingGates"), map(&["name"])));
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    status: bool,
    generation: bool,
}

const BUILTINS: &[Builtin] = &[
    Builtin {
        group: "",
        version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
        short: &["ns"],
        status: true,
        generation: false,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "Pod",
        plural: "pods",
        namespaced: true,
        short: &["po"],
        status: true,
        generation: true,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "Node",
        plural: "nodes",
        namespaced: false,
        short: &["no"],
        status: true,
        generation: false,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
        short: &["svc"],
        status: true,
        generation: false,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "ConfigMap",
        plural: "configmaps",
        namespaced: true,
        short: &["cm"],
        status: false,
        generation: false,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "Secret",
        plural: "secrets",
        namespaced: true,
        short: &[],
        status: false,
        generation: false,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "ServiceAccount",
        plural: "serviceaccounts",
        namespaced: true,
        short: &["sa"],
        status: false,
        generation: false,
    },
    // Stored and served so that operators can create their workloads' RBAC; not enforced
    // (docs/kube-test-server.md: the server authorizes every request).
    Builtin {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "Role",
        plural: "roles",
        namespaced: true,
        short: &[],
        status: false,
        generation: false,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "RoleBinding",
        plural: "rolebindings",
        namespaced: true,
        short: &[],
        status: false,
        generation: false,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "Event",
        plural: "events",
        namespaced: true,
        short: &["ev"],
        status: false,
        generation: false,
    },
    Builtin {
        group: "",
        version: "v1",
        kind: "PersistentVolumeClaim",
        plural: "persistentvolumeclaims",
        namespaced: true,
        short: &["pvc"],
        status: true,
        generation: false,
    },
    Builtin {
        group: "apps",
        version: "v1",
        kind: "StatefulSet",
        plural: "statefulsets",
        namespaced: true,
        short: &["sts"],
        status: true,
        generation: true,
    },
    Builtin {
        group: "apps",
        version: "v1",
        kind: "Deployment",
        plural: "deployments",
        namespaced: true,
        short: &["deploy"],
        status: true,
        generation: true,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "ClusterRole",
        plural: "clusterroles",
        namespaced: false,
        short: &[],
        status: false,
        generation: false,
    },
    Builtin {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        kind: "ClusterRoleBinding",
        plural: "clusterrolebindings",
        namespaced: false,
        short: &[],
        status: false,
        generation: false,
    },
    Builtin {
        group: "networking.k8s.io",
        version: "v1",
        kind: "NetworkPolicy",
        plural: "networkpolicies",
        namespaced: true,
        short: &["netpol"],
        status: false,
        generation: true,
    },
    Builtin {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
        short: &[],
        status: false,
        generation: false,
    },
    Builtin {
        group: "policy",
        version: "v1",
        kind: "PodDisruptionBudget",
        plural: "poddisruptionbudgets",
        namespaced: true,
        short: &["pdb"],
        status: true,
        generation: true,
    },
    Builtin {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        namespaced: true,
        short: &[],
        status: false,
        generation: false,
    },
    Builtin {
        group: "events.k8s.io",
        version: "v1",
        kind: "Event",
        plural: "events",
        namespaced: true,
        short: &["ev"],
        status: false,
        generation: false,
    },
    Builtin {
        group: "apiextensions.k8s.io",
        version: "v1",
        kind: "CustomResourceDefinition",
        plural: "customresourcedefinitions",
        namespaced: false,
        short: &["crd", "crds"],
        status: true,
        generation: true,
    },
];

fn builtin_lists(kind: &str) -> Vec<(String, ListKind)> {
    let mut out = Vec::new();
    match kind {
        "Pod" => {
            pod_spec_lists("spec", &mut out);
            out.push(("status.conditions".into(), map(&["type"])));
        }
        "StatefulSet" | "Deployment" => {
            pod_spec_lists("spec.template.spec", &mut out);
            out.push(("status.conditions".into(), map(&["type"])));
        }
        "Service" => {
            out.push(("spec.ports".into(), map(&["port", "protocol"])));
            out.push(("status.conditions".into(), map(&["type"])));
        }
        "PodDisruptionBudget" => out.push(("status.conditions".into(), map(&["type"]))),
        "Node" => out.push(("status.conditions".into(), map(&["type"]))),
        "PersistentVolumeClaim" => out.push(("status.conditions".into(), map(&["type"]))),
        "Namespace" => {
            out.push(("spec.finalizers".into(), ListKind::Set));
            out.push(("status.conditions".into(), map(&["type"])));
        }
        "CustomResourceDefinition" => out.push(("status.conditions".into(), map(&["type"]))),
        _ => {}
    }
    out
}

/// Every built-in type, in discovery order.
pub fn builtins() -> Vec<ResourceType> {
    BUILTINS
        .iter()
        .map(|b| ResourceType {
            group: b.group.into(),
            versions: vec![b.version.into()],
            kind: b.kind.into(),
            list_kind: format!("{}List", b.kind),
            plural: b.plural.into(),
            singular: b.kind.to_lowercase(),
            namespaced: b.namespaced,
            short_names: b.short.iter().map(|s| s.to_string()).collect(),
            // `kubectl get all` lists the types in category "all".
            categories: if matches!(b.kind, "Pod" | "Service" | "StatefulSet" | "Deployment") {
                vec!["all".into()]
            } else {
                Vec::new()
            },
            status_subresource: b.status,
            generation: b.generation,
            printer_columns: Vec::new(),
            schema: Schema::Builtin(builtin_lists(b.kind)),
            strategic_merge: true,
            unconditional_update: b.kind != "CustomResourceDefinition",
            scale: matches!(b.kind, "StatefulSet" | "Deployment").then(|| ScalePaths {
                spec_replicas: ".spec.replicas".into(),
                status_replicas: ".status.replicas".into(),
                label_selector: None,
            }),
        })
        .collect()
}

/// The served type a CRD object defines, or why it cannot be served.
pub fn from_crd(crd: &Value) -> Result<ResourceType, String> {
    let spec = crd.get("spec").ok_or("spec is required")?;
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(String::from);
    let names = spec.get("names").ok_or("spec.names is required")?;
    let group = s(spec.get("group")).ok_or("spec.group is required")?;
    let plural = s(names.get("plural")).ok_or("spec.names.plural is required")?;
    let kind = s(names.get("kind")).ok_or("spec.names.kind is required")?;
    let expected = format!("{plural}.{group}");
    let name = s(crd.pointer("/metadata/name")).unwrap_or_default();
    if name != expected {
        return Err(format!(
            "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
        ));
    }
    let scope = s(spec.get("scope")).unwrap_or_else(|| "Namespaced".into());
    let versions: Vec<&Value> = spec
        .get("versions")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter(|v| v.get("served").and_then(Value::as_bool).unwrap_or(true))
                .collect()
        })
        .unwrap_or_default();
    if versions.is_empty() {
        return Err("spec.versions: Required value: must have exactly one version marked as storage version".into());
    }
    // The storage version is preferred; its schema and subresources describe the stored object.
    let storage = versions
        .iter()
        .copied()
        .find(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        .unwrap_or(versions[0]);
    let mut version_names: Vec<String> = versions.iter().filter_map(|v| s(v.get("name"))).collect();
    let storage_name = s(storage.get("name")).unwrap_or_default();
    version_names.retain(|v| *v != storage_name);
    version_names.insert(0, storage_name);
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(ResourceType {
        group,
        versions: version_names,
        list_kind: s(names.get("listKind")).unwrap_or_else(|| format!("{kind}List")),
        singular: s(names.get("singular")).unwrap_or_else(|| kind.to_lowercase()),
        kind,
        plural,
        namespaced: scope == "Namespaced",
        short_names: strings(names.get("shortNames")),
        categories: strings(names.get("categories")),
        status_subresource: storage.pointer("/subresources/status").is_some(),
        generation: true,
        printer_columns: storage
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        schema: Schema::OpenApi(
            storage
                .pointer("/schema/openAPIV3Schema")
                .cloned()
                .unwrap_or(Value::Null),
        ),
        strategic_merge: false,
        unconditional_update: false,
        scale: storage.pointer("/subresources/scale").map(|sc| ScalePaths {
            spec_replicas: s(sc.get("specReplicasPath")).unwrap_or_else(|| ".spec.replicas".into()),
            status_replicas: s(sc.get("statusReplicasPath"))
                .unwrap_or_else(|| ".status.replicas".into()),
            label_selector: s(sc.get("labelSelectorPath")),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path(p: &str) -> Vec<String> {
        p.split('.').map(String::from).collect()
    }

    #[test]
    fn builtin_table_and_metadata() {
        let sts = builtins()
            .into_iter()
            .find(|r| r.kind == "StatefulSet")
            .unwrap();
        assert_eq!(
            sts.list_kind(&path("spec.template.spec.containers.env")),
            map(&["name"])
        );
        assert_eq!(sts.list_kind(&path("metadata.finalizers")), ListKind::Set);
        assert_eq!(
            sts.list_kind(&path("spec.volumeClaimTemplates")),
            ListKind::Atomic
        );
    }

    #[test]
    fn crd_schema_is_read() {
        let crd = json!({
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object", "properties": {
                        "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                                  "items": {"type": "object", "properties": {"tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}}}}},
                        "sel": {"type": "object", "x-kubernetes-map-type": "atomic"}}}}}}}]}
        });
        let rt = from_crd(&crd).unwrap();
        assert!(rt.status_subresource && rt.namespaced);
        assert_eq!(rt.list_kind(&path("spec.ports")), map(&["name"]));
        assert_eq!(rt.list_kind(&path("spec.ports.tags")), ListKind::Set);
        assert_eq!(rt.list_kind(&path("spec.other")), ListKind::Atomic);
        assert!(rt.map_is_atomic(&path("spec.sel")));
    }
}
