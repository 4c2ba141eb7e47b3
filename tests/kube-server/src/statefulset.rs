//! An optional stand-in for the StatefulSet controller (`StoreOptions::statefulset_controller`),
//! so an operator test sees its pods appear: pods `<set>-<ordinal>` from the template with the
//! labels the real controller adds, PVCs from `volumeClaimTemplates`, scale up and down, and the
//! two update strategies — `OnDelete` (a pod picks up a new template only when deleted) and
//! `RollingUpdate` (outdated pods replaced highest ordinal first, only while all are ready),
//! with `OrderedReady` (one pod at a time, each waiting for the previous to be Ready) or
//! `Parallel` management. There is no kubelet: pods stay `Pending` until the test marks them
//! ready through their status subresource (see `KubeTestServer::set_pod_ready`).

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::store::{Change, Key, State};

/// A short stable hash of a pod template (FNV-1a, 10 hex digits), as the controllers label
/// their pods with.
pub(crate) fn template_hash(template: &Value) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in template.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:x}", h & 0xff_ffff_ffff)
}

/// Like `controller-revision-hash`: the set's name and the template's hash.
fn revision(name: &str, template: &Value) -> String {
    format!("{name}-{}", template_hash(template))
}

/// One step toward the desired pods of every StatefulSet; true if something changed.
pub(crate) fn reconcile(state: &mut State, tx: &broadcast::Sender<Arc<Change>>) -> bool {
    let sets = state.objects_of("apps", "statefulsets");
    let pods = state.objects_of("", "pods");
    for (k, sts) in sets {
        if sts.pointer("/metadata/deletionTimestamp").is_some() {
            continue;
        }
        let (ns, name) = (k.2.clone(), k.3.clone());
        let replicas = sts
            .pointer("/spec/replicas")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        let template = sts.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let rev = revision(&name, &template);
        let on_delete = sts
            .pointer("/spec/updateStrategy/type")
            .and_then(Value::as_str)
            == Some("OnDelete");
        let uid = sts
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let owned = owned_pods(&pods, &ns, &uid);
        let ordinal = |pod_name: &str| {
            pod_name
                .strip_prefix(&format!("{name}-"))
                .and_then(|o| o.parse::<u64>().ok())
        };

        // Scale down from the highest ordinal.
        if let Some((pk, _)) = owned
            .iter()
            .filter(|(pk, p)| {
                ordinal(&pk.3).is_none_or(|o| o >= replicas)
                    && p.pointer("/metadata/deletionTimestamp").is_none()
            })
            .max_by_key(|(pk, _)| ordinal(&pk.3))
        {
            state.controller_delete(pk, tx);
            return true;
        }
        let live: Vec<&(Key, Value)> = owned
            .iter()
            .copied()
            .filter(|(_, p)| p.pointer("/metadata/deletionTimestamp").is_none())
            .collect();
        // OrderedReady (the default) creates pod N+1 only once pod N is Running and Ready.
        let ordered = sts
            .pointer("/spec/podManagementPolicy")
            .and_then(Value::as_str)
            != Some("Parallel");
        let mut waiting = false;
        for i in 0..replicas {
            let pod_name = format!("{name}-{i}");
            if let Some((_, p)) = live.iter().find(|(pk, _)| pk.3 == pod_name) {
                if ordered && !is_ready(p) {
                    waiting = true;
                    break;
                }
                continue;
            }
            if owned.iter().any(|(pk, _)| pk.3 == pod_name) {
                // Still terminating (held by a finalizer): wait for it to go.
                waiting = true;
                break;
            }
            create_claims(state, &sts, &template, &ns, &pod_name, tx);
            let pod = pod_from_template(&sts, &template, &name, &uid, &rev, i);
            if state.controller_create("", "pods", &ns, pod, tx).is_ok() {
                return true;
            }
        }
        let revision_of = |p: &Value| {
            p.pointer("/metadata/labels/controller-revision-hash")
                .and_then(Value::as_str)
                .map(String::from)
        };
        // RollingUpdate: with every pod there and ready, replace the highest outdated one.
        let all_ready = live.len() as u64 == replicas && live.iter().all(|(_, p)| is_ready(p));
        if !on_delete
            && !waiting
            && all_ready
            && let Some((pk, _)) = live
                .iter()
                .filter(|(_, p)| revision_of(p).as_deref() != Some(rev.as_str()))
                .max_by_key(|(pk, _)| ordinal(&pk.3))
        {
            state.controller_delete(pk, tx);
            return true;
        }
        let count = |f: &dyn Fn(&Value) -> bool| live.iter().filter(|(_, p)| f(p)).count();
        let updated = count(&|p| revision_of(p).as_deref() == Some(rev.as_str()));
        let current_revision = if updated as u64 == replicas && live.len() as u64 == replicas {
            rev.clone()
        } else {
            sts.pointer("/status/currentRevision")
                .and_then(Value::as_str)
                .map(String::from)
                .unwrap_or_else(|| rev.clone())
        };
        let ready = count(&is_ready);
        let status = json!({
            "observedGeneration": sts.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
            "replicas": live.len(),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "updatedReplicas": updated,
            "currentReplicas": count(&|p| revision_of(p).as_deref() == Some(current_revision.as_str())),
            "currentRevision": current_revision,
            "updateRevision": rev,
            "collisionCount": 0,
        });
        if state.set_status("apps", "statefulsets", &sts, status, tx) {
            return true;
        }
    }
    false
}

/// The pods in `ns` whose owner references name `uid` (terminating ones too).
pub(crate) fn owned_pods<'a>(
    pods: &'a [(Key, Value)],
    ns: &str,
    uid: &str,
) -> Vec<&'a (Key, Value)> {
    pods.iter()
        .filter(|(pk, p)| {
            pk.2 == ns
                && p.pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|rs| {
                        rs.iter()
                            .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid))
                    })
        })
        .collect()
}

/// A pod made of a workload's template, with the workload (`kind` `name`, `uid`) as its
/// controller; the caller names it and adds its controller's labels.
pub(crate) fn pod_of(template: &Value, kind: &str, name: &str, uid: &str) -> Value {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": template.get("metadata").cloned().unwrap_or(json!({})),
        "spec": template.get("spec").cloned().unwrap_or(json!({}))});
    pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind,
        "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
    pod
}

/// Running with a `Ready=True` condition: what the real controller waits for (set by the
/// kubelet on a cluster; by the test, through the pod's status subresource, here).
pub(crate) fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.get("type").and_then(Value::as_str) == Some("Ready")
                    && c.get("status").and_then(Value::as_str) == Some("True")
            })
        })
}

/// The PVCs of one pod, `<template>-<pod>`, unless they exist (they outlive their pods).
fn create_claims(
    state: &mut State,
    sts: &Value,
    template: &Value,
    ns: &str,
    pod_name: &str,
    tx: &broadcast::Sender<Arc<Change>>,
) {
    for claim in sts
        .pointer("/spec/volumeClaimTemplates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let claim_name = format!(
            "{}-{pod_name}",
            claim
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("data")
        );
        if state
            .objects_of("", "persistentvolumeclaims")
            .iter()
            .any(|(ck, _)| ck.2 == ns && ck.3 == claim_name)
        {
            continue;
        }
        let labels = template
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or(json!({}));
        let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim_name, "labels": labels},
            "spec": claim.get("spec").cloned().unwrap_or(json!({}))});
        // A claim that cannot be made is left out; the real controller would retry.
        let _ = state.controller_create("", "persistentvolumeclaims", ns, pvc, tx);
    }
}

/// Pod `<set>-<ordinal>` from the template, with the labels and owner the real controller sets.
fn pod_from_template(
    sts: &Value,
    template: &Value,
    name: &str,
    uid: &str,
    rev: &str,
    i: u64,
) -> Value {
    let pod_name = format!("{name}-{i}");
    let mut pod = pod_of(template, "StatefulSet", name, uid);
    let meta = pod["metadata"].as_object_mut().expect("metadata object");
    meta.insert("name".into(), json!(pod_name));
    let labels = meta.entry("labels").or_insert(json!({}));
    labels["controller-revision-hash"] = json!(rev);
    labels["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
    labels["apps.kubernetes.io/pod-index"] = json!(i.to_string());
    // Each claim template becomes a volume of that name bound to the pod's own claim.
    for claim in sts
        .pointer("/spec/volumeClaimTemplates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let vol_name = claim
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("data");
        let volume = json!({"name": vol_name,
            "persistentVolumeClaim": {"claimName": format!("{vol_name}-{pod_name}")}});
        let spec = pod["spec"].as_object_mut().expect("spec object");
        let vols = spec.entry("volumes").or_insert(json!([]));
        if let Some(vols) = vols.as_array_mut() {
            vols.retain(|v| v.get("name").and_then(Value::as_str) != Some(vol_name));
            vols.push(volume);
        }
    }
    pod["spec"]["hostname"] = json!(pod_name);
    if let Some(svc) = sts.pointer("/spec/serviceName") {
        pod["spec"]["subdomain"] = svc.clone();
    }
    pod
}
