//! The in-memory object store: every object of every type under one lock, one global monotonic
//! resourceVersion, a bounded history of changes for watches to resume from (older than that is
//! 410 Gone), and the server-side behaviour that real controllers inside kube-apiserver and
//! kube-controller-manager provide and clients rely on: CRDs becoming served types, finalizers
//! holding deletions, namespace termination and owner-reference garbage collection.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::error::{ApiError, ApiResult};
use crate::resources::{ResourceType, builtins, from_crd};
use crate::selectors::{FieldSelector, LabelSelector};
use crate::ssa::{Apply, Scope, record_update};

/// `(group, plural, namespace, name)`; namespace is empty for cluster-scoped objects.
pub type Key = (String, String, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as kept in the history and sent to watchers.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub group: String,
    pub plural: String,
    pub kind: EventType,
    pub object: Value,
    /// The object before the change, so a selector-filtered watch can turn a change in or out of
    /// its selection into ADDED or DELETED, as the real watch cache does.
    pub old: Option<Value>,
}

/// What a list or watch selects.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selection {
    pub fn matches(&self, obj: &Value) -> bool {
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default();
        self.namespace.as_deref().is_none_or(|n| n == ns)
            && self.labels.matches_object(obj)
            && self.fields.matches(obj)
    }
}

/// How a delete treats dependents (DeleteOptions.propagationPolicy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

#[derive(Debug, Default, Clone)]
pub struct DeleteOptions {
    pub propagation: Option<Propagation>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    /// `gracePeriodSeconds`: for a pod bound to a node, how long its kubelet has to stop it.
    pub grace_period: Option<i64>,
}

/// What a patch request carries: a server-side apply, or an edit of the live object.
pub enum PatchBody {
    Apply { config: Value, force: bool },
    Edit(Edit),
}

/// The patches that edit the live object in place.
pub enum Edit {
    Json(json_patch::Patch),
    Merge(Value),
    Strategic(Value),
}

/// How an update or patch is made: which part of the object, by whom, and whether for real.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions<'a> {
    pub scope: Scope,
    pub manager: &'a str,
    pub dry_run: bool,
    /// `fieldValidation=Strict`: unknown fields of a custom resource are an error, not pruned.
    pub strict: bool,
}

/// A watch's start: the events to send first, the resourceVersion they bring the watcher to,
/// and the feed of later changes (subscribed under the lock, so nothing falls in between).
pub struct WatchStart {
    pub initial: Vec<Arc<Change>>,
    pub rv: u64,
    pub feed: broadcast::Receiver<Arc<Change>>,
}

/// Tunables for tests.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How many changes are kept for watches to resume from.
    pub history: usize,
    /// Whether the built-in StatefulSet controller creates pods (see `statefulset`).
    pub statefulset_controller: bool,
    /// Whether the built-in Deployment controller creates pods (see `deployment`).
    pub deployment_controller: bool,
    /// Whether Services get EndpointSlices from the pods they select (see `endpointslices`);
    /// useful with a kubelet that sets pod IPs and readiness.
    pub endpointslice_controller: bool,
    /// Whether PodDisruptionBudgets get their status kept (see `pods`); the eviction
    /// subresource honours them either way.
    pub disruption_controller: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            history: 10_000,
            statefulset_controller: false,
            deployment_controller: false,
            endpointslice_controller: false,
            disruption_controller: false,
        }
    }
}

pub struct Store {
    state: Mutex<State>,
    tx: broadcast::Sender<Arc<Change>>,
    /// Bumped to end every open watch (as an API server restart or a load balancer would).
    epoch: tokio::sync::watch::Sender<u64>,
    pub options: StoreOptions,
}

#[derive(Clone)]
pub(crate) struct State {
    pub rv: u64,
    pub(crate) types: Vec<Arc<ResourceType>>,
    pub(crate) objects: BTreeMap<Key, Value>,
    pub(crate) history: VecDeque<Arc<Change>>,
    /// Watches may resume from any resourceVersion >= floor.
    pub(crate) floor: u64,
    next_ip: u32,
    /// Set for the duration of one client write that asked for strict field validation.
    strict: bool,
    /// (group, plural) of the objects written since the controllers last settled: a
    /// controller runs only when something it reads changed (an Event or a status write of
    /// another kind costs no pass over every pod).
    pub(crate) dirty: std::collections::BTreeSet<(String, String)>,
}

pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .to_string()
}

fn uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub(crate) fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

/// What a generation counts changes of: everything but metadata, and but status when status
/// is a subresource.
fn spec_part(rt: &ResourceType, obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        for k in ["metadata", "apiVersion", "kind"] {
            m.remove(k);
        }
        if rt.status_subresource {
            m.remove("status");
        }
    }
    v
}

pub(crate) const FOREGROUND: &str = "foregroundDeletion";
pub(crate) const ORPHAN: &str = "orphan";

impl Store {
    pub fn new(options: StoreOptions) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let mut state = State {
            rv: 1,
            types: builtins().into_iter().map(Arc::new).collect(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            floor: 1,
            next_ip: 1,
            strict: false,
            dirty: Default::default(),
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let rt = state
                .find("", "namespaces")
                .expect("namespaces are built in");
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            state
                .create_inner(&rt, "", obj, "kube-apiserver", &tx)
                .expect("fresh store");
        }
        state.history.clear();
        state.floor = state.rv;
        Self {
            state: Mutex::new(state),
            tx,
            epoch: tokio::sync::watch::Sender::new(0),
            options,
        }
    }

    /// Ends every open watch stream; clients re-watch from their last resourceVersion.
    pub fn close_watches(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// A receiver that changes when [`Store::close_watches`] is called.
    pub fn watch_epoch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The served type for `(group, version, plural)`.
    pub fn resolve(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.lock()
            .types
            .iter()
            .find(|t| {
                t.group == group && t.plural == plural && t.versions.iter().any(|v| v == version)
            })
            .cloned()
    }

    pub fn types(&self) -> Vec<Arc<ResourceType>> {
        self.lock().types.clone()
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// Forgets the watch history, so any watch from an earlier resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        let mut s = self.lock();
        s.history.clear();
        s.floor = s.rv;
    }

    pub fn get(&self, rt: &ResourceType, ns: &str, name: &str) -> ApiResult<Value> {
        let s = self.lock();
        s.objects
            .get(&key(rt, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&rt.qualified(), name))
    }

    /// A page of objects, the list's resourceVersion and the continue token.
    pub fn list(
        &self,
        rt: &ResourceType,
        sel: &Selection,
        limit: Option<usize>,
        cont: Option<&str>,
    ) -> ApiResult<(Vec<Value>, u64, Option<String>)> {
        let s = self.lock();
        // The token carries the list's original resourceVersion (reported on every page, so a
        // watch started after the last page replays what changed meanwhile) and where to resume.
        let (list_rv, after) = match cont.filter(|c| !c.is_empty()) {
            Some(c) => {
                let (rv, after) = decode_continue(c)
                    .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
                if rv < s.floor {
                    return Err(ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                (rv, Some(after))
            }
            None => (s.rv, None),
        };
        let mut items = Vec::new();
        let mut next = None;
        for (k, obj) in s.objects.range(type_range(rt)) {
            // Compare as (namespace, name) pairs, the map's order ("a/x" sorts after "a-b/y").
            let past = after
                .as_ref()
                .and_then(|a| a.split_once('/'))
                .is_some_and(|(ns, name)| (k.2.as_str(), k.3.as_str()) <= (ns, name));
            if past || !sel.matches(obj) {
                continue;
            }
            if limit.is_some_and(|l| l > 0 && items.len() == l) {
                next = items.last().map(|o: &Value| {
                    encode_continue(
                        list_rv,
                        &format!("{}/{}", meta_str(o, "namespace"), meta_str(o, "name")),
                    )
                });
                break;
            }
            items.push(obj.clone());
        }
        Ok((items, list_rv, next))
    }

    /// Runs one write and what the built-in controllers do after it. With `dry_run` it runs on
    /// a copy that is thrown away, so validation, defaulting and conflicts are all real.
    pub(crate) fn write<R>(
        &self,
        dry_run: bool,
        strict: bool,
        f: impl FnOnce(&mut State, &broadcast::Sender<Arc<Change>>) -> ApiResult<R>,
    ) -> ApiResult<R> {
        let mut s = self.lock();
        if dry_run {
            let mut copy = s.clone();
            copy.strict = strict;
            let (tx, _) = broadcast::channel(1);
            return f(&mut copy, &tx);
        }
        s.strict = strict;
        let out = f(&mut s, &self.tx);
        s.strict = false;
        let out = out?;
        s.settle(&self.tx, &self.options);
        Ok(out)
    }

    pub fn create(
        &self,
        rt: &ResourceType,
        ns: &str,
        obj: Value,
        opts: &WriteOptions<'_>,
    ) -> ApiResult<Value> {
        self.write(opts.dry_run, opts.strict, |s, tx| {
            s.create_inner(rt, ns, obj, opts.manager, tx)
        })
    }

    pub fn update(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        obj: Value,
        opts: &WriteOptions<'_>,
    ) -> ApiResult<Value> {
        let WriteOptions {
            scope,
            manager,
            dry_run,
            strict,
        } = *opts;
        if meta_str(&obj, "name") != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&obj, "name")
            )));
        }
        if !rt.unconditional_update && meta_str(&obj, "resourceVersion").is_empty() {
            return Err(ApiError::invalid(
                &rt.kind,
                name,
                "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
            ));
        }
        self.write(dry_run, strict, |s, tx| {
            let current = s
                .objects
                .get(&key(rt, ns, name))
                .cloned()
                .ok_or_else(|| ApiError::not_found(&rt.qualified(), name))?;
            s.replace_inner(rt, current, obj, scope, Some(manager), tx)
        })
    }

    pub fn patch(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: PatchBody,
        opts: &WriteOptions<'_>,
    ) -> ApiResult<Value> {
        let WriteOptions {
            scope,
            manager,
            dry_run,
            strict,
        } = *opts;
        self.write(dry_run, strict, |s, tx| {
            s.patch_inner(rt, ns, name, body, scope, manager, tx)
        })
    }

    /// Deletes (or starts deleting, with finalizers) one object: `(object, true)` when it is
    /// gone, `(object with its deletionTimestamp, false)` while finalizers hold it.
    pub fn delete(
        &self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
        dry_run: bool,
    ) -> ApiResult<(Value, bool)> {
        self.write(dry_run, false, |s, tx| {
            let k = key(rt, ns, name);
            let cur = s.objects.get(&k).cloned().ok_or_else(|| ApiError::not_found(&rt.qualified(), name))?;
            if let Some(u) = &opts.uid
                && u != meta_str(&cur, "uid")
            {
                return Err(ApiError::conflict(&rt.qualified(), name, &format!("Precondition failed: UID in precondition: {u}, UID in object meta: {}", meta_str(&cur, "uid"))));
            }
            if let Some(rv) = &opts.resource_version
                && rv != meta_str(&cur, "resourceVersion")
            {
                return Err(ApiError::conflict(&rt.qualified(), name, &format!("Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}", meta_str(&cur, "resourceVersion"))));
            }
            Ok(s.delete_graceful(&k, opts.propagation, opts.grace_period, tx))
        })
    }

    pub fn delete_collection(
        &self,
        rt: &ResourceType,
        sel: &Selection,
        opts: &DeleteOptions,
        dry_run: bool,
    ) -> ApiResult<Vec<Value>> {
        self.write(dry_run, false, |s, tx| {
            let keys: Vec<Key> = s
                .objects
                .range(type_range(rt))
                .filter(|(_, o)| sel.matches(o))
                .map(|(k, _)| k.clone())
                .collect();
            Ok(keys
                .iter()
                .map(|k| {
                    s.delete_graceful(k, opts.propagation, opts.grace_period, tx)
                        .0
                })
                .collect())
        })
    }

    /// Starts a watch: the events to send first (synthetic ADDED for the current state, or the
    /// history after `from`), the resourceVersion they bring the watcher to, and the live feed.
    pub fn watch(
        &self,
        rt: &ResourceType,
        sel: &Selection,
        from: Option<u64>,
    ) -> ApiResult<WatchStart> {
        let s = self.lock();
        let rx = self.tx.subscribe();
        let initial = match from {
            None | Some(0) => s
                .objects
                .range(type_range(rt))
                .filter(|(_, o)| sel.matches(o))
                .map(|(k, o)| {
                    Arc::new(Change {
                        rv: o
                            .pointer("/metadata/resourceVersion")
                            .and_then(Value::as_str)
                            .and_then(|r| r.parse().ok())
                            .unwrap_or(s.rv),
                        group: k.0.clone(),
                        plural: k.1.clone(),
                        kind: EventType::Added,
                        object: o.clone(),
                        old: None,
                    })
                })
                .collect(),
            Some(rv) if rv < s.floor => {
                return Err(ApiError::gone(format!(
                    "too old resource version: {rv} ({})",
                    s.floor
                )));
            }
            Some(rv) => s
                .history
                .iter()
                .filter(|c| c.rv > rv && c.group == rt.group && c.plural == rt.plural)
                .cloned()
                .collect(),
        };
        Ok(WatchStart {
            initial,
            rv: s.rv,
            feed: rx,
        })
    }
}

fn key(rt: &ResourceType, ns: &str, name: &str) -> Key {
    let ns = if rt.namespaced { ns } else { "" };
    (
        rt.group.clone(),
        rt.plural.clone(),
        ns.to_string(),
        name.to_string(),
    )
}

fn type_range(rt: &ResourceType) -> std::ops::RangeInclusive<Key> {
    let lo = (
        rt.group.clone(),
        rt.plural.clone(),
        String::new(),
        String::new(),
    );
    let hi = (
        rt.group.clone(),
        rt.plural.clone(),
        "\u{10ffff}".to_string(),
        String::new(),
    );
    lo..=hi
}

fn encode_continue(rv: u64, after: &str) -> String {
    let raw = format!("{rv}:{after}");
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Option<(u64, String)> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let raw = String::from_utf8(bytes?).ok()?;
    let (rv, after) = raw.split_once(':')?;
    Some((rv.parse().ok()?, after.to_string()))
}

/// Admission as the real server's strategies do it: metadata validation for everything; for
/// built-ins the create-time requirements and update-time immutability (`old` is the live
/// object on updates); custom resources pruned, defaulted and validated against their schema.
fn admit(
    rt: &ResourceType,
    name: &str,
    obj: &mut Value,
    old: Option<&Value>,
    strict: bool,
) -> ApiResult<()> {
    use crate::validation as v;
    let qualified =
        if rt.group.is_empty() || matches!(rt.schema, crate::resources::Schema::Builtin(_)) {
            rt.kind.clone()
        } else {
            format!("{}.{}", rt.kind, rt.group)
        };
    if matches!(rt.schema, crate::resources::Schema::Builtin(_)) {
        v::default_builtin(&rt.kind, obj);
    }
    let mut errors = v::object_meta(&rt.kind, name, obj)
        .err()
        .unwrap_or_default();
    match (&rt.schema, old) {
        (crate::resources::Schema::OpenApi(schema), _) => {
            let before = strict.then(|| obj.clone());
            errors.extend(v::admit(schema, obj).err().unwrap_or_default());
            // Strict field validation refuses what pruning would drop, with the real message.
            let unknown = before
                .map(|b| v::pruned_fields(&b, obj))
                .unwrap_or_default();
            if !unknown.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {fields}",
                    kind = rt.kind,
                    version = rt.versions[0],
                    fields = unknown
                        .iter()
                        .map(|f| format!("unknown field \"{f}\""))
                        .collect::<Vec<_>>()
                        .join(", "),
                )));
            }
        }
        (_, None) => errors.extend(v::builtin_create(&rt.kind, obj).err().unwrap_or_default()),
        (_, Some(old)) => errors.extend(
            v::builtin_update(&rt.kind, old, obj)
                .err()
                .unwrap_or_default(),
        ),
    }
    match errors.as_slice() {
        [] => Ok(()),
        [one] => Err(ApiError::invalid(&qualified, name, one.clone())),
        many => Err(ApiError::invalid(
            &qualified,
            name,
            format!("[{}]", many.join(", ")),
        )),
    }
}

fn check_apply_identity(rt: &ResourceType, config: &Value, name: &str) -> ApiResult<()> {
    let kind = config
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let api_version = config
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if kind.is_empty() || api_version.is_empty() {
        return Err(ApiError::bad_request(
            "invalid object type: apiVersion and kind are required for server-side apply",
        ));
    }
    if kind != rt.kind || !rt.versions.iter().any(|v| rt.api_version(v) == api_version) {
        return Err(ApiError::bad_request(format!(
            "the body of the request was of type {api_version}, Kind={kind}, but the URL is for {}",
            rt.kind
        )));
    }
    let body_name = meta_str(config, "name");
    if !body_name.is_empty() && body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    Ok(())
}

impl State {
    pub(crate) fn find(&self, group: &str, plural: &str) -> Option<Arc<ResourceType>> {
        self.types
            .iter()
            .find(|t| t.group == group && t.plural == plural)
            .cloned()
    }

    /// Writes (or removes) one object under a new resourceVersion and publishes the change.
    pub(crate) fn commit(
        &mut self,
        k: &Key,
        obj: Option<Value>,
        kind: EventType,
        tx: &broadcast::Sender<Arc<Change>>,
    ) -> Value {
        self.rv += 1;
        self.dirty.insert((k.0.clone(), k.1.clone()));
        let old = self.objects.get(k).cloned();
        let mut object = obj.or_else(|| old.clone()).unwrap_or(Value::Null);
        meta_mut(&mut object).insert("resourceVersion".into(), json!(self.rv.to_string()));
        if kind == EventType::Deleted {
            self.objects.remove(k);
        } else {
            self.objects.insert(k.clone(), object.clone());
        }
        let change = Arc::new(Change {
            rv: self.rv,
            group: k.0.clone(),
            plural: k.1.clone(),
            kind,
            object: object.clone(),
            old,
        });
        self.history.push_back(change.clone());
        // No receivers is fine: nobody is watching.
        let _ = tx.send(change);
        self.after_commit(k, &object, kind);
        object
    }

    /// Keeps served types in step with CRDs.
    fn after_commit(&mut self, k: &Key, obj: &Value, kind: EventType) {
        if k.0 != "apiextensions.k8s.io" || k.1 != "customresourcedefinitions" {
            return;
        }
        let Some(group) = obj.pointer("/spec/group").and_then(Value::as_str) else {
            return;
        };
        let Some(plural) = obj.pointer("/spec/names/plural").and_then(Value::as_str) else {
            return;
        };
        self.types
            .retain(|t| !(t.group == group && t.plural == plural));
        if kind != EventType::Deleted
            && obj.pointer("/metadata/deletionTimestamp").is_none()
            && let Ok(rt) = from_crd(obj)
        {
            self.types.push(Arc::new(rt));
        }
    }

    fn namespace_state(&self, ns: &str) -> Option<bool> {
        self.objects
            .get(&(
                String::new(),
                "namespaces".into(),
                String::new(),
                ns.to_string(),
            ))
            .map(|o| o.pointer("/metadata/deletionTimestamp").is_some())
    }

    pub(crate) fn create_inner(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        mut obj: Value,
        manager: &str,
        tx: &broadcast::Sender<Arc<Change>>,
    ) -> ApiResult<Value> {
        let api_version = rt.api_version(&rt.versions[0]);
        if !meta_str(&obj, "resourceVersion").is_empty() {
            return Err(ApiError::internal(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        if let Some(kind) = obj.get("kind").and_then(Value::as_str)
            && !kind.is_empty()
            && kind != rt.kind
        {
            return Err(ApiError::bad_request(format!(
                "the body of the request was of kind {kind}, but the URL is for {}",
                rt.kind
            )));
        }
        obj["apiVersion"] = json!(api_version);
        obj["kind"] = json!(rt.kind);
        let m = meta_mut(&mut obj);
        m.remove("managedFields");
        if rt.status_subresource
            && let Some(o) = obj.as_object_mut()
        {
            o.remove("status");
        }
        let mut applied = obj.clone();
        let t = now();
        record_update(
            rt,
            None,
            &mut applied,
            manager,
            Scope::Main,
            &api_version,
            &t,
        );
        self.create_prepared(rt, ns, applied, tx)
    }

    /// Creates an object whose managedFields are already set.
    fn create_prepared(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        mut obj: Value,
        tx: &broadcast::Sender<Arc<Change>>,
    ) -> ApiResult<Value> {
        let body_ns = meta_str(&obj, "namespace").to_string();
        if rt.namespaced {
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            match self.namespace_state(ns) {
                None => return Err(ApiError::not_found("namespaces", ns)),
                Some(true) => {
                    return Err(ApiError::forbidden(format!(
                        "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        rt.qualified()
                    )));
                }
                Some(false) => {}
            }
        }
        let mut name = meta_str(&obj, "name").to_string();
        if name.is_empty() {
            let prefix = meta_str(&obj, "generateName").to_string();
            if prefix.is_empty() {
                return Err(ApiError::invalid(
                    &rt.kind,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
            let suffix: String = (0..5)
                .map(|_| (b"bcdfghjklmnpqrstvwxz2456789")[rand::random_range(0..27)] as char)
                .collect();
            name = format!("{prefix}{suffix}");
        }
        let k = key(rt, ns, &name);
        if self.objects.contains_key(&k) {
            return Err(ApiError::already_exists(&rt.qualified(), &name));
        }
        admit(rt, &name, &mut obj, None, self.strict)?;
        if rt.kind == "CustomResourceDefinition" {
            from_crd(&{
                let mut o = obj.clone();
                meta_mut(&mut o).insert("name".into(), json!(name));
                o
            })
            .map_err(|e| ApiError::invalid(&rt.kind, &name, e))?;
        }
        let generation = rt.generation;
        let m = meta_mut(&mut obj);
        m.insert("name".into(), json!(name));
        if rt.namespaced {
            m.insert("namespace".into(), json!(ns));
        } else {
            m.remove("namespace");
        }
        m.insert("uid".into(), json!(uid()));
        m.insert("creationTimestamp".into(), json!(now()));
        m.remove("deletionTimestamp");
        m.remove("deletionGracePeriodSeconds");
        if generation {
            m.insert("generation".into(), json!(1));
        } else {
            m.remove("generation");
        }
        self.defaults(rt, &mut obj);
        Ok(self.commit(&k, Some(obj), EventType::Added, tx))
    }

    #[allow(clippy::too_many_arguments)]
    fn patch_inner(
        &mut self,
        rt: &ResourceType,
        ns: &str,
        name: &str,
        body: PatchBody,
        scope: Scope,
        manager: &str,
        tx: &broadcast::Sender<Arc<Change>>,
    ) -> ApiResult<Value> {
        let s = self;
        let current = s.objects.get(&key(rt, ns, name)).cloned();
        let api_version = rt.api_version(&rt.versions[0]);
        let out = match body {
            PatchBody::Apply { config, force } => {
                check_apply_identity(rt, &config, name)?;
                // A resourceVersion in the configuration is a precondition.
                let want = meta_str(&config, "resourceVersion");
                if !want.is_empty()
                    && current
                        .as_ref()
                        .is_none_or(|c| meta_str(c, "resourceVersion") != want)
                {
                    return Err(ApiError::stale(&rt.qualified(), name));
                }
                let t = now();
                let apply = Apply {
                    rt,
                    manager,
                    force,
                    scope,
                    api_version: &api_version,
                    now: &t,
                };
                let mut merged = apply.run(current.as_ref(), &config)?;
                match current {
                    Some(cur) => s.replace_inner(rt, cur, merged, scope, None, tx)?,
                    None => {
                        if scope == Scope::Status {
                            return Err(ApiError::not_found(&rt.qualified(), name));
                        }
                        let m = meta_mut(&mut merged);
                        m.insert("name".into(), json!(name));
                        merged["apiVersion"] = json!(api_version);
                        merged["kind"] = json!(rt.kind);
                        s.create_prepared(rt, ns, merged, tx)?
                    }
                }
            }
            PatchBody::Edit(edit) => {
                let cur = current.ok_or_else(|| ApiError::not_found(&rt.qualified(), name))?;
                let mut new = cur.clone();
                // The patch applies to the live object, resourceVersion included (JSON patch
                // `test` ops on it work); it is a precondition only if the patch changes it.
                match edit {
                    Edit::Json(p) => crate::merge::json_patch(&mut new, &p)
                        .map_err(|e| ApiError::invalid(&rt.kind, name, e.to_string()))?,
                    Edit::Merge(p) => json_patch::merge(&mut new, &p),
                    Edit::Strategic(p) => {
                        if !rt.strategic_merge {
                            return Err(ApiError::unsupported_media_type(
                                "application/strategic-merge-patch+json",
                            ));
                        }
                        new = crate::merge::strategic_merge(rt, &new, &p)
                            .map_err(|e| ApiError::bad_request(e.to_string()))?;
                    }
                }
                s.replace_inner(rt, cur, new, scope, Some(manager), tx)?
            }
        };
        Ok(out)
    }

    /// Server-populated fields of the built-in types that clients look at.
    fn defaults(&mut self, rt: &ResourceType, obj: &mut Value) {
        match (rt.group.as_str(), rt.kind.as_str()) {
            ("", "Namespace") => {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
                obj["status"] = json!({"phase": "Active"});
                let name = meta_str(obj, "name").to_string();
                let labels = meta_mut(obj).entry("labels").or_insert_with(|| json!({}));
                labels["kubernetes.io/metadata.name"] = json!(name);
            }
            ("", "Pod") => {
                obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
            }
            ("", "Service") => {
                let spec = obj.get_mut("spec").and_then(Value::as_object_mut);
                if let Some(spec) = spec {
                    spec.entry("type").or_insert(json!("ClusterIP"));
                    if spec
                        .get("clusterIP")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                    {
                        let n = self.next_ip;
                        self.next_ip += 1;
                        let ip = format!("10.96.{}.{}", n / 250, n % 250 + 1);
                        spec.insert("clusterIP".into(), json!(ip));
                        spec.insert("clusterIPs".into(), json!([ip]));
                    }
                }
                obj["status"] = json!({"loadBalancer": {}});
            }
            ("apiextensions.k8s.io", _) => {
                let names = obj.pointer("/spec/names").cloned().unwrap_or(json!({}));
                obj["status"] = json!({
                    "acceptedNames": names,
                    "storedVersions": [obj.pointer("/spec/versions").and_then(Value::as_array).and_then(|vs| vs.iter().find(|v| v.get("storage") == Some(&json!(true)))).and_then(|v| v.get("name")).cloned().unwrap_or(json!("v1"))],
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now()},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now()}
                    ]
                });
            }
            _ => {}
        }
    }

    /// The update path shared by PUT, patches and apply. `manager: None` means the
    /// managedFields on `new` are already right (apply).
    pub(crate) fn replace_inner(
        &mut self,
        rt: &ResourceType,
        current: Value,
        mut new: Value,
        scope: Scope,
        manager: Option<&str>,
        tx: &broadcast::Sender<Arc<Change>>,
    ) -> ApiResult<Value> {
        let name = meta_str(&current, "name").to_string();
        let given_rv = meta_str(&new, "resourceVersion").to_string();
        if !given_rv.is_empty() && given_rv != meta_str(&current, "resourceVersion") {
            return Err(ApiError::stale(&rt.qualified(), &name));
        }
        let given_uid = meta_str(&new, "uid").to_string();
        if !given_uid.is_empty() && given_uid != meta_str(&current, "uid") {
            return Err(ApiError::conflict(
                &rt.qualified(),
                &name,
                &format!(
                    "Precondition failed: UID in precondition: {given_uid}, UID in object meta: {}",
                    meta_str(&current, "uid")
                ),
            ));
        }
        let api_version = rt.api_version(&rt.versions[0]);
        new = match scope {
            Scope::Status => {
                let mut merged = current.clone();
                match new.get("status") {
                    Some(st) => merged["status"] = st.clone(),
                    None => {
                        merged.as_object_mut().map(|o| o.remove("status"));
                    }
                }
                if manager.is_none() {
                    meta_mut(&mut merged).insert(
                        "managedFields".into(),
                        new.pointer("/metadata/managedFields")
                            .cloned()
                            .unwrap_or(json!([])),
                    );
                }
                merged
            }
            Scope::Main => {
                if rt.status_subresource {
                    match current.get("status") {
                        Some(st) => new["status"] = st.clone(),
                        None => {
                            new.as_object_mut().map(|o| o.remove("status"));
                        }
                    }
                }
                new
            }
        };
        new["apiVersion"] = json!(api_version);
        new["kind"] = json!(rt.kind);
        {
            let cm = current.get("metadata").cloned().unwrap_or(json!({}));
            let m = meta_mut(&mut new);
            for f in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
            ] {
                match cm.get(f) {
                    Some(v) => m.insert(f.into(), v.clone()),
                    None => m.remove(f),
                };
            }
        }
        if rt.kind == "CustomResourceDefinition" {
            from_crd(&new).map_err(|e| ApiError::invalid(&rt.kind, &name, e))?;
        }
        admit(rt, &name, &mut new, Some(&current), self.strict)?;
        let deleting = current.pointer("/metadata/deletionTimestamp").is_some();
        if deleting {
            let before = finalizers(&current);
            if let Some(added) = finalizers(&new).into_iter().find(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    &rt.kind,
                    &name,
                    format!(
                        "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers [\"{added}\"]"
                    ),
                ));
            }
        }
        if let Some(mgr) = manager {
            // managedFields written explicitly (kubectl's client-side to server-side apply
            // migration does this with a JSON patch) replace the live ones, as in Kubernetes.
            let live = current.pointer("/metadata/managedFields");
            let given = meta_mut(&mut new).remove("managedFields");
            let mut base = current.clone();
            if let Some(g) =
                given.filter(|g| g.as_array().is_some_and(|a| !a.is_empty()) && Some(g) != live)
            {
                meta_mut(&mut base).insert("managedFields".into(), g);
            }
            record_update(rt, Some(&base), &mut new, mgr, scope, &api_version, &now());
        }
        if new == current {
            return Ok(current);
        }
        if rt.generation && spec_part(rt, &new) != spec_part(rt, &current) {
            let g = current
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        let k = key(rt, meta_str(&current, "namespace"), &name);
        // A pod in its grace period stays until its kubelet deletes it (see `pods`).
        let graceful = current
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .is_some_and(|g| g > 0);
        if deleting && !graceful && finalizers(&new).is_empty() {
            return Ok(self.commit(&k, Some(new), EventType::Deleted, tx));
        }
        Ok(self.commit(&k, Some(new), EventType::Modified, tx))
    }

    /// Deletes now, or marks for deletion when finalizers (or dependents, for foreground) hold it.
    pub(crate) fn delete_inner(
        &mut self,
        k: &Key,
        propagation: Option<Propagation>,
        tx: &broadcast::Sender<Arc<Change>>,
    ) -> (Value, bool) {
        let Some(mut obj) = self.objects.get(k).cloned() else {
            return (Value::Null, true);
        };
        let mut fins = finalizers(&obj);
        let is_namespace = k.0.is_empty() && k.1 == "namespaces";
        let already = obj.pointer("/metadata/deletionTimestamp").is_some();
        match propagation {
            Some(Propagation::Foreground) if !already && !fins.iter().any(|f| f == FOREGROUND) => {
                fins.push(FOREGROUND.into())
            }
            Some(Propagation::Orphan) if !already && !fins.iter().any(|f| f == ORPHAN) => {
                fins.push(ORPHAN.into())
            }
            _ => {}
        }
        if fins.is_empty() && !is_namespace {
            let out = self.commit(k, None, EventType::Deleted, tx);
            return (out, true);
        }
        if already && fins == finalizers(&obj) {
            return (obj, false);
        }
        let m = meta_mut(&mut obj);
        m.insert("finalizers".into(), json!(fins));
        if !already {
            m.insert("deletionTimestamp".into(), json!(now()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            if let Some(g) = m.get("generation").and_then(Value::as_i64) {
                m.insert("generation".into(), json!(g + 1));
            }
        }
        if is_namespace {
            obj["status"] = json!({"phase": "Terminating"});
        }
        (self.commit(k, Some(obj), EventType::Modified, tx), false)
    }
}
