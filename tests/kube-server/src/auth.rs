//! Who calls, what they may do, and what they did: service-account identities, RBAC as the real
//! authorizer evaluates it, and an audit of every resource request.
//!
//! A bearer token of the form `system:serviceaccount:<namespace>:<name>` (what the test kubelet
//! mounts into a pod, and what [`crate::KubeTestServer::client_as`] presents) *is* that
//! service account: its requests are allowed only when a Role/ClusterRole bound to it (through a
//! RoleBinding in the request's namespace or a ClusterRoleBinding, from this server's own
//! store) grants the verb on the resource, else 403 Forbidden in the `Status` form the real
//! server sends. Any other caller (no token, another token) is an administrator, as every test
//! client was before. Discovery and OpenAPI paths are open to everyone, as
//! `system:discovery` makes them on a real cluster. Not modelled: aggregated ClusterRoles,
//! privilege-escalation checks on Role writes, impersonation.

use std::collections::BTreeMap;
use std::sync::Mutex;

use axum::http::{HeaderMap, Method, header};
use serde_json::Value;

use crate::error::{ApiError, ApiResult};
use crate::store::{Selection, Store};

/// The user name a service account's token stands for.
pub const SA_PREFIX: &str = "system:serviceaccount:";

const RBAC: &str = "rbac.authorization.k8s.io";

/// One kind of request, as the audit counts it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuditKey {
    /// `system:serviceaccount:<ns>:<name>`, or `admin` for every other caller.
    pub user: String,
    /// get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// `""` for the core group.
    pub group: String,
    pub resource: String,
    /// `""` for none.
    pub subresource: String,
    /// `""` for a cluster-scoped request.
    pub namespace: String,
    /// Whether RBAC allowed it.
    pub allowed: bool,
    /// Refused while its namespace was being deleted or gone: that namespace's Roles and
    /// RoleBindings go with it, so code still running there is refused, as on a real cluster.
    pub teardown: bool,
}

/// The request attributes RBAC decides on.
pub struct Request<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

/// Every resource request so far, counted per [`AuditKey`].
#[derive(Default)]
pub struct Audit {
    entries: Mutex<BTreeMap<AuditKey, u64>>,
}

impl Audit {
    pub fn snapshot(&self) -> BTreeMap<AuditKey, u64> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn record(&self, key: AuditKey) {
        *self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
    }
}

/// The Kubernetes verb of a resource request.
pub fn verb(method: &Method, named: bool, watch: bool) -> &'static str {
    match *method {
        Method::GET | Method::HEAD if watch => "watch",
        Method::GET | Method::HEAD if named => "get",
        Method::GET | Method::HEAD => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "unknown",
    }
}

/// The service account a request's bearer token names, if any.
pub fn service_account(headers: &HeaderMap) -> Option<String> {
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = auth.strip_prefix("Bearer ")?.trim();
    let rest = token.strip_prefix(SA_PREFIX)?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then(|| token.to_string())
}

/// Records the request and, for a service account, refuses it unless RBAC allows it.
pub fn authorize(
    store: &Store,
    audit: &Audit,
    headers: &HeaderMap,
    req: &Request<'_>,
) -> ApiResult<()> {
    let user = service_account(headers);
    let allowed = user.as_deref().is_none_or(|u| allows(store, u, req));
    let teardown = !allowed && !req.namespace.is_empty() && namespace_ending(store, req.namespace);
    audit.record(AuditKey {
        user: user.clone().unwrap_or_else(|| "admin".into()),
        verb: req.verb.into(),
        group: req.group.into(),
        resource: req.resource.into(),
        subresource: req.subresource.into(),
        namespace: req.namespace.into(),
        allowed,
        teardown,
    });
    if allowed {
        return Ok(());
    }
    let user = user.unwrap_or_default();
    let mut resource = req.resource.to_string();
    if !req.group.is_empty() {
        resource = format!("{resource}.{}", req.group);
    }
    if !req.subresource.is_empty() {
        resource = format!("{resource}/{}", req.subresource);
    }
    let mut what = format!(
        "User \"{user}\" cannot {} resource \"{}\"",
        req.verb, resource
    );
    if !req.group.is_empty() {
        what += &format!(" in API group \"{}\"", req.group);
    }
    if req.namespace.is_empty() {
        what += " at the cluster scope";
    } else {
        what += &format!(" in the namespace \"{}\"", req.namespace);
    }
    let name = if req.name.is_empty() {
        String::new()
    } else {
        format!("{} \"{}\" is forbidden: ", req.resource, req.name)
    };
    let msg = if name.is_empty() {
        format!("{resource} is forbidden: {what}")
    } else {
        format!("{name}{what}")
    };
    Err(ApiError::forbidden(msg))
}

/// Whether namespace `ns` is being deleted, or gone.
fn namespace_ending(store: &Store, ns: &str) -> bool {
    let Some(rt) = store.resolve("", "v1", "namespaces") else {
        return false;
    };
    store
        .get(&rt, "", ns)
        .map(|n| n.pointer("/metadata/deletionTimestamp").is_some())
        .unwrap_or(true)
}

/// Whether some rule bound to `user` (a service account) grants `req`.
pub fn allows(store: &Store, user: &str, req: &Request<'_>) -> bool {
    let Some((sa_ns, sa_name)) = user.strip_prefix(SA_PREFIX).and_then(|r| r.split_once(':'))
    else {
        return false;
    };
    let objects = |plural: &str, ns: Option<&str>| -> Vec<Value> {
        let Some(rt) = store.resolve(RBAC, "v1", plural) else {
            return Vec::new();
        };
        let sel = Selection {
            namespace: ns.map(String::from),
            ..Selection::default()
        };
        store
            .list(&rt, &sel, None, None)
            .map(|(items, _, _)| items)
            .unwrap_or_default()
    };
    let role_rules = |kind: &str, name: &str, ns: &str| -> Vec<Value> {
        let (plural, ns) = match kind {
            "ClusterRole" => ("clusterroles", None),
            "Role" => ("roles", Some(ns)),
            _ => return Vec::new(),
        };
        objects(plural, ns)
            .into_iter()
            .find(|r| r.pointer("/metadata/name").and_then(Value::as_str) == Some(name))
            .and_then(|r| r.get("rules").and_then(Value::as_array).cloned())
            .unwrap_or_default()
    };
    let binds = |b: &Value, binding_ns: &str| {
        b.get("subjects")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|s| {
                let kind = s.get("kind").and_then(Value::as_str).unwrap_or_default();
                let name = s.get("name").and_then(Value::as_str).unwrap_or_default();
                match kind {
                    "ServiceAccount" => {
                        let ns = s
                            .get("namespace")
                            .and_then(Value::as_str)
                            .filter(|n| !n.is_empty())
                            .unwrap_or(binding_ns);
                        name == sa_name && ns == sa_ns
                    }
                    "User" => name == user,
                    "Group" => {
                        name == "system:serviceaccounts"
                            || name == format!("system:serviceaccounts:{sa_ns}")
                            || name == "system:authenticated"
                    }
                    _ => false,
                }
            })
    };
    let granted = |rules: &[Value]| rules.iter().any(|r| rule_allows(r, req));
    let role_ref = |b: &Value| {
        (
            b.pointer("/roleRef/kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            b.pointer("/roleRef/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        )
    };
    for b in objects("clusterrolebindings", None) {
        let (kind, name) = role_ref(&b);
        if kind == "ClusterRole" && binds(&b, "") && granted(&role_rules(&kind, &name, "")) {
            return true;
        }
    }
    if req.namespace.is_empty() {
        return false;
    }
    for b in objects("rolebindings", Some(req.namespace)) {
        let (kind, name) = role_ref(&b);
        if binds(&b, req.namespace) && granted(&role_rules(&kind, &name, req.namespace)) {
            return true;
        }
    }
    false
}

fn strings(rule: &Value, field: &str) -> Vec<String> {
    rule.get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect()
}

/// One PolicyRule against the request, with the real authorizer's wildcards: `*` in apiGroups,
/// verbs and resources, `*/sub` and `res/*` for subresources; resourceNames only for named
/// requests.
pub fn rule_allows(rule: &Value, req: &Request<'_>) -> bool {
    let has = |field: &str, want: &str| strings(rule, field).iter().any(|v| v == "*" || v == want);
    if !has("verbs", req.verb) || !has("apiGroups", req.group) {
        return false;
    }
    let resources = strings(rule, "resources");
    let resource_ok = resources.iter().any(|r| {
        if req.subresource.is_empty() {
            r == "*" || r == req.resource
        } else {
            r == "*"
                || *r == format!("{}/{}", req.resource, req.subresource)
                || *r == format!("*/{}", req.subresource)
                || *r == format!("{}/*", req.resource)
        }
    });
    if !resource_ok {
        return false;
    }
    let names = strings(rule, "resourceNames");
    names.is_empty() || (!req.name.is_empty() && names.iter().any(|n| n == req.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req<'a>(verb: &'a str, group: &'a str, resource: &'a str, sub: &'a str) -> Request<'a> {
        Request {
            verb,
            group,
            resource,
            subresource: sub,
            namespace: "ns",
            name: "x",
        }
    }

    #[test]
    fn rules_match_verbs_groups_subresources_names_and_wildcards() {
        let r = json!({"apiGroups": ["pgpilot.io"], "resources": ["postgresclusters", "postgresclusters/status"], "verbs": ["get", "patch"]});
        assert!(rule_allows(
            &r,
            &req("get", "pgpilot.io", "postgresclusters", "")
        ));
        assert!(rule_allows(
            &r,
            &req("patch", "pgpilot.io", "postgresclusters", "status")
        ));
        assert!(!rule_allows(
            &r,
            &req("update", "pgpilot.io", "postgresclusters", "status")
        ));
        assert!(!rule_allows(&r, &req("get", "", "postgresclusters", "")));
        assert!(!rule_allows(
            &r,
            &req("get", "pgpilot.io", "postgresbackups", "")
        ));
        let plain = json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["*"]});
        assert!(rule_allows(&plain, &req("delete", "", "pods", "")));
        assert!(!rule_allows(&plain, &req("create", "", "pods", "eviction")));
        let sub = json!({"apiGroups": ["*"], "resources": ["*/eviction"], "verbs": ["create"]});
        assert!(rule_allows(&sub, &req("create", "", "pods", "eviction")));
        let named = json!({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["x"], "verbs": ["get", "create"]});
        assert!(rule_allows(
            &named,
            &req("get", "coordination.k8s.io", "leases", "")
        ));
        let mut create = req("create", "coordination.k8s.io", "leases", "");
        create.name = "";
        assert!(!rule_allows(&named, &create));
    }

    #[test]
    fn only_service_account_tokens_are_service_accounts() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert_eq!(
            service_account(&h("Bearer system:serviceaccount:ns:db")).as_deref(),
            Some("system:serviceaccount:ns:db")
        );
        assert_eq!(service_account(&h("Bearer some-token")), None);
        assert_eq!(service_account(&h("Bearer system:serviceaccount:ns")), None);
        assert_eq!(service_account(&HeaderMap::new()), None);
    }
}
