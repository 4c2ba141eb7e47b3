//! An optional stand-in for the StatefulSet controller (`StoreOptions::statefulset_controller`),
//! so an operator test sees its pods appear: pods `<set>-<ordinal>` from the template with the
//! labels the real controller adds, PVCs from `volumeClaimTemplates`, scale up and down, and the
//! two update strategies — `OnDelete` (a pod picks up a new template only when deleted) and
//! `RollingUpdate` (outdated pods replaced highest ordinal first). There is no kubelet, so pods
//! stay `Pending`; pods are created without waiting for readiness (as `Parallel` management).

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::ssa::Scope;
use crate::store::{Change, State};

/// A short stable hash of the pod template, like `controller-revision-hash`.
fn revision(name: &str, template: &Value) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in template.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{name}-{:x}", h & 0xff_ffff_ffff)
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
        let owned: Vec<_> = pods
            .iter()
            .filter(|(pk, p)| {
                pk.2 == ns
                    && p.pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .is_some_and(|rs| {
                            rs.iter()
                                .any(|r| r.get("uid").and_then(Value::as_str) == Some(&uid))
                        })
            })
            .collect();
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
        for i in 0..replicas {
            let pod_name = format!("{name}-{i}");
            if owned.iter().any(|(pk, _)| pk.3 == pod_name) {
                continue;
            }
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
                let mut pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": claim_name, "labels": template.pointer("/metadata/labels").cloned().unwrap_or(json!({}))},
                    "spec": claim.get("spec").cloned().unwrap_or(json!({}))});
                pvc["status"] = json!({"phase": "Pending"});
                // A PVC that cannot be made is left out; the pod is still created, as the real one would retry.
                let _ = state.controller_create("", "persistentvolumeclaims", &ns, pvc, tx);
            }
            let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": template.get("metadata").cloned().unwrap_or(json!({})),
                "spec": template.get("spec").cloned().unwrap_or(json!({}))});
            let meta = pod["metadata"].as_object_mut().expect("metadata object");
            meta.insert("name".into(), json!(pod_name));
            meta.insert("ownerReferences".into(), json!([{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]));
            let labels = meta.entry("labels").or_insert(json!({}));
            labels["controller-revision-hash"] = json!(rev);
            labels["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
            labels["apps.kubernetes.io/pod-index"] = json!(i.to_string());
            pod["spec"]["hostname"] = json!(pod_name);
            if let Some(svc) = sts.pointer("/spec/serviceName") {
                pod["spec"]["subdomain"] = svc.clone();
            }
            if state.controller_create("", "pods", &ns, pod, tx).is_ok() {
                return true;
            }
        }
        // RollingUpdate: replace one outdated pod, highest ordinal first.
        let outdated = |p: &Value| {
            p.pointer("/metadata/labels/controller-revision-hash")
                .and_then(Value::as_str)
                != Some(&rev)
        };
        if !on_delete
            && let Some((pk, _)) = owned
                .iter()
                .filter(|(_, p)| outdated(p) && p.pointer("/metadata/deletionTimestamp").is_none())
                .max_by_key(|(pk, _)| ordinal(&pk.3))
        {
            state.controller_delete(pk, tx);
            return true;
        }
        let current = owned
            .iter()
            .filter(|(_, p)| p.pointer("/metadata/deletionTimestamp").is_none())
            .count();
        let updated = owned.iter().filter(|(_, p)| !outdated(p)).count();
        let mut status = json!({
            "observedGeneration": sts.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
            "replicas": current, "updatedReplicas": updated, "currentReplicas": current - (current.min(owned.len()) - updated.min(current)),
            "readyReplicas": 0, "availableReplicas": 0, "updateRevision": rev,
            "currentRevision": sts.pointer("/status/currentRevision").cloned().unwrap_or(json!(rev)),
            "collisionCount": 0,
        });
        if updated == current {
            status["currentRevision"] = json!(rev);
            status["currentReplicas"] = json!(updated);
        }
        if sts.get("status") != Some(&status) {
            let mut new = sts.clone();
            new["status"] = status;
            if state
                .controller_update("apps", "statefulsets", sts.clone(), new, Scope::Status, tx)
                .is_ok()
            {
                return true;
            }
        }
    }
    false
}
