//! What kube-controller-manager and kube-apiserver's own controllers do after each write,
//! run synchronously until nothing changes: namespace termination, owner-reference garbage
//! collection (background, foreground and orphan), removal of a deleted CRD's objects, the
//! optional StatefulSet controller, and trimming the watch history.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::error::{ApiError, ApiResult};
use crate::ssa::Scope;
use crate::store::{
    Change, EventType, FOREGROUND, Key, ORPHAN, Propagation, State, StoreOptions, finalizers,
    meta_mut, meta_str,
};

impl State {
    /// Runs what kube-controller-manager would: namespace termination, garbage collection of
    /// dependents, foreground and orphan finalizers, the StatefulSet controller if enabled —
    /// until nothing changes. Then trims the history.
    pub(crate) fn settle(&mut self, tx: &broadcast::Sender<Arc<Change>>, opts: &StoreOptions) {
        for _ in 0..1000 {
            if !self.settle_once(tx, opts) {
                break;
            }
        }
        self.dirty.clear();
        while self.history.len() > opts.history {
            if let Some(c) = self.history.pop_front() {
                self.floor = c.rv;
            }
        }
    }

    fn settle_once(&mut self, tx: &broadcast::Sender<Arc<Change>>, opts: &StoreOptions) -> bool {
        let uids: BTreeMap<String, Key> = self
            .objects
            .iter()
            .map(|(k, o)| (meta_str(o, "uid").to_string(), k.clone()))
            .collect();
        let mut dependents: BTreeMap<String, Vec<Key>> = BTreeMap::new();
        for (k, o) in &self.objects {
            for r in o
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(u) = r.get("uid").and_then(Value::as_str) {
                    dependents.entry(u.to_string()).or_default().push(k.clone());
                }
            }
        }
        // Only objects being deleted or with owners can need anything here: the others are
        // not cloned (a write must not cost a deep copy of every object in the store).
        let keys: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o.pointer("/metadata/deletionTimestamp").is_some()
                    || o.pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .is_some_and(|r| !r.is_empty())
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            let Some(obj) = self.objects.get(&k) else {
                continue;
            };
            let deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
            if !deleting {
                // Background garbage collection: a dependent whose owners are all gone is
                // deleted.
                if obj
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| {
                        !refs.is_empty()
                            && refs.iter().all(|r| {
                                r.get("uid")
                                    .and_then(Value::as_str)
                                    .is_none_or(|u| !uids.contains_key(u))
                            })
                    })
                {
                    self.delete_graceful(&k, None, None, tx);
                    return true;
                }
                continue;
            }
            let obj = obj.clone();
            let fins = finalizers(&obj);
            let my_uid = meta_str(&obj, "uid").to_string();
            let deps = dependents.get(&my_uid).cloned().unwrap_or_default();

            // Namespace controller: empty the namespace, then drop its finalizer.
            if deleting && k.0.is_empty() && k.1 == "namespaces" {
                let inside: Vec<Key> = self
                    .objects
                    .keys()
                    .filter(|x| x.2 == k.3 && !x.2.is_empty())
                    .cloned()
                    .collect();
                let mut progressed = false;
                for x in &inside {
                    let o = &self.objects[x];
                    if o.pointer("/metadata/deletionTimestamp").is_none() {
                        self.delete_graceful(x, None, None, tx);
                        progressed = true;
                    }
                }
                if progressed {
                    return true;
                }
                if inside.is_empty() {
                    self.commit(&k, None, EventType::Deleted, tx);
                    return true;
                }
                continue;
            }
            // Orphan: release dependents, then the finalizer.
            if deleting && fins.iter().any(|f| f == ORPHAN) {
                for d in &deps {
                    if let Some(mut o) = self.objects.get(d).cloned() {
                        if let Some(refs) = o
                            .pointer_mut("/metadata/ownerReferences")
                            .and_then(Value::as_array_mut)
                        {
                            refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(&my_uid));
                        }
                        self.commit(d, Some(o), EventType::Modified, tx);
                    }
                }
                self.drop_finalizer(&k, obj, ORPHAN, tx);
                return true;
            }
            // Foreground: delete dependents first; the owner goes when none are left.
            if deleting && fins.iter().any(|f| f == FOREGROUND) {
                let mut progressed = false;
                for d in &deps {
                    if self
                        .objects
                        .get(d)
                        .is_some_and(|o| o.pointer("/metadata/deletionTimestamp").is_none())
                    {
                        self.delete_graceful(d, Some(Propagation::Foreground), None, tx);
                        progressed = true;
                    }
                }
                if progressed {
                    return true;
                }
                if deps.is_empty() {
                    self.drop_finalizer(&k, obj, FOREGROUND, tx);
                    return true;
                }
                continue;
            }
        }
        // A CRD's deletion takes its custom resources with it.
        let orphaned: Vec<Key> = self
            .objects
            .keys()
            .filter(|k| !self.types.iter().any(|t| t.group == k.0 && t.plural == k.1))
            .cloned()
            .collect();
        if !orphaned.is_empty() {
            for k in &orphaned {
                self.commit(k, None, EventType::Deleted, tx);
            }
            return true;
        }
        // Each controller only when an object of a kind it reads was written in this settle.
        let dirty = self.dirty.clone();
        let touched = |kinds: &[(&str, &str)]| {
            kinds
                .iter()
                .any(|(g, p)| dirty.contains(&(g.to_string(), p.to_string())))
        };
        if opts.statefulset_controller
            && touched(&[
                ("apps", "statefulsets"),
                ("", "pods"),
                ("", "persistentvolumeclaims"),
                ("", "namespaces"),
            ])
            && crate::statefulset::reconcile(self, tx)
        {
            return true;
        }
        if opts.deployment_controller
            && touched(&[("apps", "deployments"), ("", "pods"), ("", "namespaces")])
            && crate::deployment::reconcile(self, tx)
        {
            return true;
        }
        if opts.endpointslice_controller
            && touched(&[
                ("", "pods"),
                ("", "services"),
                ("discovery.k8s.io", "endpointslices"),
                ("", "namespaces"),
            ])
            && crate::endpointslices::reconcile(self, tx)
        {
            return true;
        }
        if opts.disruption_controller
            && touched(&[
                ("policy", "poddisruptionbudgets"),
                ("", "pods"),
                ("", "namespaces"),
            ])
            && crate::pods::reconcile_budgets(self, tx)
        {
            return true;
        }
        false
    }

    fn drop_finalizer(
        &mut self,
        k: &Key,
        mut obj: Value,
        finalizer: &str,
        tx: &broadcast::Sender<Arc<Change>>,
    ) {
        let rest: Vec<String> = finalizers(&obj)
            .into_iter()
            .filter(|f| f != finalizer)
            .collect();
        meta_mut(&mut obj).insert("finalizers".into(), json!(rest));
        let kind = if rest.is_empty() {
            EventType::Deleted
        } else {
            EventType::Modified
        };
        self.commit(k, Some(obj), kind, tx);
    }

    // Helpers for built-in controllers.
    pub(crate) fn objects_of(&self, group: &str, plural: &str) -> Vec<(Key, Value)> {
        self.objects
            .iter()
            .filter(|(k, _)| k.0 == group && k.1 == plural)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub(crate) fn controller_create(
        &mut self,
        group: &str,
        plural: &str,
        ns: &str,
        obj: Value,
        tx: &broadcast::Sender<Arc<Change>>,
    ) -> ApiResult<Value> {
        let rt = self
            .find(group, plural)
            .ok_or_else(|| ApiError::path_not_found(plural))?;
        self.create_inner(&rt, ns, obj, "kube-controller-manager", tx)
    }

    pub(crate) fn controller_delete(&mut self, k: &Key, tx: &broadcast::Sender<Arc<Change>>) {
        self.delete_graceful(k, None, None, tx);
    }

    /// Writes `status` into `obj`'s status subresource when it differs; true if written.
    pub(crate) fn set_status(
        &mut self,
        group: &str,
        plural: &str,
        obj: &Value,
        status: Value,
        tx: &broadcast::Sender<Arc<Change>>,
    ) -> bool {
        if obj.get("status") == Some(&status) {
            return false;
        }
        let mut new = obj.clone();
        new["status"] = status;
        self.controller_update(group, plural, obj.clone(), new, Scope::Status, tx)
            .is_ok()
    }

    pub(crate) fn controller_update(
        &mut self,
        group: &str,
        plural: &str,
        current: Value,
        new: Value,
        scope: Scope,
        tx: &broadcast::Sender<Arc<Change>>,
    ) -> ApiResult<Value> {
        let rt = self
            .find(group, plural)
            .ok_or_else(|| ApiError::path_not_found(plural))?;
        self.replace_inner(
            &rt,
            current,
            new,
            scope,
            Some("kube-controller-manager"),
            tx,
        )
    }
}
