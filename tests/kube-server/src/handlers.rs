//! HTTP routing and verbs. Kubernetes paths are not a fixed route table (custom resources come
//! and go, and `/api/v1/namespaces/{ns}/pods` shares a prefix with `/api/v1/namespaces/{name}`),
//! so one handler parses the path, resolves the type against the store's current types, and
//! maps method + path + query + content type onto a store operation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::discovery;
use crate::error::{ApiError, ApiResult};
use crate::resources::ResourceType;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::ssa::Scope;
use crate::store::{DeleteOptions, Edit, PatchBody, Propagation, Selection, Store, WriteOptions};
use crate::watch::WatchRequest;

#[derive(Clone)]
pub struct App {
    pub store: Arc<Store>,
    /// `host:port`, for `serverAddressByClientCIDRs`.
    pub address: String,
    pub bookmark_interval: Duration,
    pub audit: Arc<crate::auth::Audit>,
}

/// A resolved request path below a group/version.
struct Target {
    rt: Arc<ResourceType>,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn ok(v: Value) -> Response {
    axum::Json(v).into_response()
}

pub async fn dispatch(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == Method::GET
        && let ["api", "v1", "namespaces", ns, "pods", name, "log"] = uri
            .path()
            .trim_matches('/')
            .split('/')
            .collect::<Vec<_>>()
            .as_slice()
    {
        let req = crate::auth::Request {
            verb: "get",
            group: "",
            resource: "pods",
            subresource: "log",
            namespace: ns,
            name,
        };
        if let Err(e) = crate::auth::authorize(&app.store, &app.audit, &headers, &req) {
            return e.into_response();
        }
        return match crate::pods::log(&app.store, ns, name, &q).await {
            Ok(text) => ([(header::CONTENT_TYPE, "text/plain")], text).into_response(),
            Err(e) => e.into_response(),
        };
    }
    match route(&app, &method, &uri, &q, &headers, &body) {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn route(
    app: &App,
    method: &Method,
    uri: &Uri,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<Response> {
    let path = uri.path();
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let types = app.store.types();
    let get_only = |v: Option<Value>| -> ApiResult<Response> {
        if method != Method::GET {
            return Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({path})"
            )));
        }
        v.map(ok).ok_or_else(|| ApiError::path_not_found(path))
    };
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if method == Method::GET
        && accept.contains("as=APIGroupDiscoveryList")
        && matches!(segs.as_slice(), ["api"] | ["apis"])
    {
        let doc = discovery::aggregated(&types, segs == ["api"]);
        return Ok((
            [(header::CONTENT_TYPE, discovery::AGGREGATED)],
            axum::Json(doc),
        )
            .into_response());
    }
    match segs.as_slice() {
        ["version"] => get_only(Some(discovery::version())),
        ["api"] => get_only(Some(discovery::core_versions(&app.address))),
        ["apis"] => get_only(Some(discovery::group_list(&types))),
        ["api", "v1"] => get_only(discovery::resource_list(&types, "", "v1")),
        ["apis", g] => get_only(discovery::group(&types, g)),
        ["apis", g, v] => get_only(discovery::resource_list(&types, g, v)),
        // Without definitions kubectl has nothing to validate against and leaves validation
        // to the server. Old kubectl (Debian's 1.20) only reads the protobuf form; an empty
        // message is a valid empty document.
        ["openapi", "v2"] if method == Method::GET => {
            if accept.contains("protobuf") {
                let pb = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";
                return Ok(([(header::CONTENT_TYPE, pb)], Bytes::new()).into_response());
            }
            Ok(ok(
                json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": {}}),
            ))
        }
        ["openapi", "v3"] => get_only(Some(discovery::openapi_index(&types))),
        ["openapi", "v3", gv @ ..] => {
            get_only(discovery::openapi_group_version(&types, &gv.join("/")))
        }
        ["api", "v1", rest @ ..] => resource(app, method, q, headers, body, "", "v1", rest, path),
        ["apis", g, v, rest @ ..] => resource(app, method, q, headers, body, g, v, rest, path),
        _ => Err(ApiError::path_not_found(path)),
    }
}

fn resolve(app: &App, group: &str, version: &str, rest: &[&str], path: &str) -> ApiResult<Target> {
    let find = |plural: &str| {
        app.store
            .resolve(group, version, plural)
            .ok_or_else(|| ApiError::path_not_found(path))
    };
    let t = |rt, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>| Target {
        rt,
        version: version.to_string(),
        namespace: namespace.map(String::from),
        name: name.map(String::from),
        subresource: sub.map(String::from),
    };
    // `namespaces/{ns}/{plural}...` when `{plural}` is a namespaced type; otherwise the
    // namespace object itself and its subresources.
    if let ["namespaces", ns, plural, tail @ ..] = rest
        && let Some(rt) = app
            .store
            .resolve(group, version, plural)
            .filter(|r| r.namespaced)
    {
        return match tail {
            [] => Ok(t(rt, Some(ns), None, None)),
            [name] => Ok(t(rt, Some(ns), Some(name), None)),
            [name, sub] => Ok(t(rt, Some(ns), Some(name), Some(sub))),
            _ => Err(ApiError::path_not_found(path)),
        };
    }
    match rest {
        [plural] => Ok(t(find(plural)?, None, None, None)),
        [plural, name] => {
            let rt = find(plural)?;
            if rt.namespaced {
                return Err(ApiError::path_not_found(path));
            }
            Ok(t(rt, None, Some(name), None))
        }
        [plural, name, sub] => {
            let rt = find(plural)?;
            if rt.namespaced {
                return Err(ApiError::path_not_found(path));
            }
            Ok(t(rt, None, Some(name), Some(sub)))
        }
        _ => Err(ApiError::path_not_found(path)),
    }
}

fn selection(q: &HashMap<String, String>, namespace: Option<String>) -> ApiResult<Selection> {
    let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    Ok(Selection {
        namespace,
        labels,
        fields,
    })
}

fn parse_body(body: &Bytes, yaml: bool) -> ApiResult<Value> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request(format!("body is not UTF-8: {e}")))?;
    match serde_json::from_str::<Value>(text) {
        Ok(v) => Ok(v),
        Err(e) if !yaml => Err(ApiError::bad_request(format!("error decoding body: {e}"))),
        Err(_) => serde_saphyr::from_str::<Value>(text)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}"))),
    }
}

/// The field manager of a non-apply write: `?fieldManager`, else the User-Agent's product, as
/// the real server derives it.
fn manager(q: &HashMap<String, String>, headers: &HeaderMap) -> String {
    if let Some(m) = q.get("fieldManager").filter(|m| !m.is_empty()) {
        return m.clone();
    }
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

fn is_true(q: &HashMap<String, String>, k: &str) -> bool {
    q.get(k).is_some_and(|v| v == "true" || v == "1")
}

fn with_version(rt: &ResourceType, version: &str, mut obj: Value) -> Value {
    if obj.is_object() {
        obj["apiVersion"] = json!(rt.api_version(version));
    }
    obj
}

/// `as=PartialObjectMetadata[List]`: kube-rs' metadata-only get/list/watch/patch.
fn wants_metadata(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
}

/// An object reduced to `meta.k8s.io/v1 PartialObjectMetadata`.
pub fn partial(obj: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": obj.get("metadata").cloned().unwrap_or(json!({}))})
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

#[allow(clippy::too_many_arguments)]
fn resource(
    app: &App,
    method: &Method,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
    group: &str,
    version: &str,
    rest: &[&str],
    path: &str,
) -> ApiResult<Response> {
    let t = resolve(app, group, version, rest, path)?;
    let rt = t.rt.clone();
    crate::auth::authorize(
        &app.store,
        &app.audit,
        headers,
        &crate::auth::Request {
            verb: crate::auth::verb(method, t.name.is_some(), is_true(q, "watch")),
            group: &rt.group,
            resource: &rt.plural,
            subresource: t.subresource.as_deref().unwrap_or_default(),
            namespace: t.namespace.as_deref().unwrap_or_default(),
            name: t.name.as_deref().unwrap_or_default(),
        },
    )?;
    // A server-side apply (or a PUT) of an object that does not exist creates it, and the real
    // server then checks the `create` verb as well.
    let applies = headers
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .is_some_and(|c| c.contains("apply-patch"));
    if let (Some(name), None) = (t.name.as_deref(), t.subresource.as_deref())
        && ((*method == Method::PATCH && applies) || *method == Method::PUT)
        && app
            .store
            .get(&rt, t.namespace.as_deref().unwrap_or_default(), name)
            .is_err()
    {
        crate::auth::authorize(
            &app.store,
            &app.audit,
            headers,
            &crate::auth::Request {
                verb: "create",
                group: &rt.group,
                resource: &rt.plural,
                subresource: "",
                namespace: t.namespace.as_deref().unwrap_or_default(),
                name: "",
            },
        )?;
    }
    let store = &app.store;
    let ns = t.namespace.clone().unwrap_or_default();
    // JSON (and YAML for apply) bodies, plus the protobuf kubectl's imperative commands send
    // for a few core types; anything else is refused like by a server that lacks the codec.
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or_default();
    let decoded;
    let body = if !body.is_empty() && content_type.contains("protobuf") {
        let v = crate::protobuf::decode(body).map_err(|e| match e {
            crate::protobuf::ProtoError::Unsupported(_) => {
                ApiError::unsupported_media_type(content_type)
            }
            other => ApiError::bad_request(other.to_string()),
        })?;
        decoded = Bytes::from(v.to_string());
        &decoded
    } else if !body.is_empty() && content_type.contains("cbor") {
        return Err(ApiError::unsupported_media_type(content_type));
    } else {
        body
    };
    let dry_run = q.get("dryRun").is_some_and(|v| v == "All");
    let strict = q.get("fieldValidation").is_some_and(|v| v == "Strict");
    if t.subresource.as_deref() == Some("scale")
        && let (Some(paths), Some(name)) = (rt.scale.as_ref(), t.name.as_deref())
    {
        return scale(
            store, &rt, paths, &ns, name, method, q, headers, body, dry_run,
        );
    }
    if rt.group.is_empty()
        && rt.plural == "pods"
        && let (Some(name), Some(sub @ ("binding" | "eviction"))) =
            (t.name.as_deref(), t.subresource.as_deref())
    {
        if *method != Method::POST {
            return Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({path})"
            )));
        }
        let b = parse_body(body, true)?;
        if sub == "binding" {
            let node = b
                .pointer("/target/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            store.bind_pod(&ns, name, node, dry_run)?;
        } else {
            let grace = b
                .pointer("/deleteOptions/gracePeriodSeconds")
                .and_then(Value::as_i64);
            store.evict_pod(&ns, name, grace, dry_run)?;
        }
        return Ok((
            StatusCode::CREATED,
            axum::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Success", "code": 201})),
        )
            .into_response());
    }
    let scope = match t.subresource.as_deref() {
        None => Scope::Main,
        Some("status") if rt.status_subresource => Scope::Status,
        // Namespace finalization is what kubectl-less clients use to force removal.
        Some("finalize") if rt.kind == "Namespace" => Scope::Main,
        Some(_) => return Err(ApiError::path_not_found(path)),
    };
    let metadata_only = wants_metadata(headers);
    let v = |obj: Value| {
        let obj = with_version(&rt, &t.version, obj);
        if metadata_only && obj.get("kind").and_then(Value::as_str) != Some("Status") {
            partial(&obj)
        } else {
            obj
        }
    };
    let Some(name) = t.name.clone() else {
        // Collection.
        let sel = selection(q, t.namespace.clone())?;
        return match *method {
            Method::GET if is_true(q, "watch") => {
                let from = q
                    .get("resourceVersion")
                    .filter(|r| !r.is_empty())
                    .map(|r| {
                        r.parse::<u64>().map_err(|_| {
                            ApiError::bad_request(format!("invalid resource version: {r}"))
                        })
                    })
                    .transpose()?;
                let timeout = q
                    .get("timeoutSeconds")
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(1800);
                Ok(WatchRequest {
                    rt: rt.clone(),
                    version: t.version.clone(),
                    selection: sel,
                    from,
                    bookmarks: is_true(q, "allowWatchBookmarks"),
                    send_initial_events: is_true(q, "sendInitialEvents"),
                    timeout: Duration::from_secs(timeout),
                    bookmark_interval: app.bookmark_interval,
                    metadata_only,
                }
                .respond(store.clone()))
            }
            Method::GET => {
                let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok());
                let (items, rv, next) =
                    store.list(&rt, &sel, limit, q.get("continue").map(String::as_str))?;
                let items: Vec<Value> = items.into_iter().map(v).collect();
                if wants_table(headers) {
                    let mut table = discovery::table(&rt, &items, &rv.to_string());
                    if let Some(c) = next {
                        table["metadata"]["continue"] = json!(c);
                    }
                    return Ok(ok(table));
                }
                let mut meta = json!({"resourceVersion": rv.to_string()});
                if let Some(c) = next {
                    meta["continue"] = json!(c);
                }
                if metadata_only {
                    return Ok(ok(
                        json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1",
                        "metadata": meta, "items": items}),
                    ));
                }
                Ok(ok(
                    json!({"kind": rt.list_kind, "apiVersion": rt.api_version(&t.version), "metadata": meta, "items": items}),
                ))
            }
            Method::POST => {
                let obj = parse_body(body, true)?;
                let mgr = manager(q, headers);
                let opts = WriteOptions {
                    scope: Scope::Main,
                    manager: &mgr,
                    dry_run,
                    strict,
                };
                let out = store.create(&rt, &ns, obj, &opts)?;
                Ok((StatusCode::CREATED, axum::Json(v(out))).into_response())
            }
            Method::DELETE => {
                let opts = delete_options(q, body)?;
                let items: Vec<Value> = store
                    .delete_collection(&rt, &sel, &opts, dry_run)?
                    .into_iter()
                    .map(v)
                    .collect();
                Ok(ok(
                    json!({"kind": rt.list_kind, "apiVersion": rt.api_version(&t.version), "metadata": {"resourceVersion": store.current_rv().to_string()}, "items": items}),
                ))
            }
            _ => Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({path})"
            ))),
        };
    };
    match *method {
        Method::GET => {
            let obj = v(store.get(&rt, &ns, &name)?);
            if wants_table(headers) {
                let rv = obj
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                return Ok(ok(discovery::table(&rt, &[obj], &rv)));
            }
            Ok(ok(obj))
        }
        Method::PUT => {
            let obj = parse_body(body, true)?;
            let mgr = manager(q, headers);
            let opts = WriteOptions {
                scope,
                manager: &mgr,
                dry_run,
                strict,
            };
            Ok(ok(v(store.update(&rt, &ns, &name, obj, &opts)?)))
        }
        Method::PATCH => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .unwrap_or_default();
            let ct = ct.split(';').next().unwrap_or_default().trim();
            let patch = match ct {
                "application/json-patch+json" => {
                    PatchBody::Edit(Edit::Json(serde_json::from_slice(body).map_err(|e| {
                        ApiError::bad_request(format!("invalid JSON patch: {e}"))
                    })?))
                }
                "application/merge-patch+json" => {
                    PatchBody::Edit(Edit::Merge(parse_body(body, false)?))
                }
                "application/strategic-merge-patch+json" => {
                    PatchBody::Edit(Edit::Strategic(parse_body(body, false)?))
                }
                "application/apply-patch+yaml" => {
                    if q.get("fieldManager").is_none_or(|m| m.is_empty()) {
                        return Err(ApiError::bad_request(
                            "PATCH, application/apply-patch+yaml: fieldManager is required for apply requests",
                        ));
                    }
                    PatchBody::Apply {
                        config: parse_body(body, true)?,
                        force: is_true(q, "force"),
                    }
                }
                other => return Err(ApiError::unsupported_media_type(other)),
            };
            let applying = matches!(patch, PatchBody::Apply { .. });
            let before = store.get(&rt, &ns, &name).is_ok();
            let out = v(store.patch(
                &rt,
                &ns,
                &name,
                patch,
                &WriteOptions {
                    scope,
                    manager: &manager(q, headers),
                    dry_run,
                    strict,
                },
            )?);
            // Apply that creates answers 201, as the real server does.
            let code = if applying && !before {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((code, axum::Json(out)).into_response())
        }
        Method::DELETE => {
            let opts = delete_options(q, body)?;
            let (obj, gone) = store.delete(&rt, &ns, &name, &opts, dry_run)?;
            // Like kube-apiserver's ReturnDeletedObject: pods answer with the deleted object,
            // most other types with a Success Status.
            if gone && rt.group.is_empty() && rt.plural == "pods" {
                return Ok(ok(v(obj)));
            }
            if gone {
                let uid = obj.pointer("/metadata/uid").cloned().unwrap_or(Value::Null);
                return Ok(ok(
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": name, "group": rt.group, "kind": rt.plural, "uid": uid}}),
                ));
            }
            Ok(ok(v(obj)))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({path})"
        ))),
    }
}

fn delete_options(q: &HashMap<String, String>, body: &Bytes) -> ApiResult<DeleteOptions> {
    let b: Value = if body.is_empty() {
        json!({})
    } else {
        parse_body(body, false)?
    };
    let policy = b
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .map(String::from)
        .or_else(|| q.get("propagationPolicy").cloned());
    let propagation = match policy.as_deref() {
        None => None,
        Some("Background") => Some(Propagation::Background),
        Some("Foreground") => Some(Propagation::Foreground),
        Some("Orphan") => Some(Propagation::Orphan),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown propagationPolicy {other:?}"
            )));
        }
    };
    let s = |p: &str| b.pointer(p).and_then(Value::as_str).map(String::from);
    let grace_period = match b.get("gracePeriodSeconds") {
        Some(g) => g.as_i64(),
        None => q.get("gracePeriodSeconds").and_then(|g| g.parse().ok()),
    };
    Ok(DeleteOptions {
        propagation,
        uid: s("/preconditions/uid"),
        resource_version: s("/preconditions/resourceVersion"),
        grace_period,
    })
}

/// GET, PUT and PATCH on `/scale`: the Scale view of the object, and writes of its replicas.
#[allow(clippy::too_many_arguments)]
fn scale(
    store: &Store,
    rt: &ResourceType,
    paths: &crate::resources::ScalePaths,
    ns: &str,
    name: &str,
    method: &Method,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
    dry_run: bool,
) -> ApiResult<Response> {
    let current = store.get(rt, ns, name)?;
    let desired = match *method {
        Method::GET => return Ok(ok(crate::scale::view(paths, &current))),
        Method::PUT => parse_body(body, true)?,
        Method::PATCH => {
            let mut view = crate::scale::view(paths, &current);
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|c| c.to_str().ok())
                .unwrap_or_default();
            match ct.split(';').next().unwrap_or_default().trim() {
                "application/json-patch+json" => {
                    let p: json_patch::Patch = serde_json::from_slice(body)
                        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                    crate::merge::json_patch(&mut view, &p)
                        .map_err(|e| ApiError::invalid("Scale", name, e.to_string()))?;
                }
                // A Scale has no lists, so strategic merge is a merge patch here.
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    json_patch::merge(&mut view, &parse_body(body, false)?);
                }
                other => return Err(ApiError::unsupported_media_type(other)),
            }
            view
        }
        _ => {
            return Err(ApiError::method_not_allowed(
                "the server does not allow this method on the scale subresource",
            ));
        }
    };
    let updated = crate::scale::apply(paths, &current, &desired)?;
    let mgr = manager(q, headers);
    let opts = WriteOptions {
        scope: Scope::Main,
        manager: &mgr,
        dry_run,
        strict: false,
    };
    let out = store.update(rt, ns, name, updated, &opts)?;
    Ok(ok(crate::scale::view(paths, &out)))
}
