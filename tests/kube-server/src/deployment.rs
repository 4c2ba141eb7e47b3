//! An optional stand-in for the Deployment controller (`StoreOptions::deployment_controller`),
//! so that a chart's Deployment (the operator's) runs on the test kubelet. Pods are named
//! `<deployment>-<hash>-<random>` (generateName) from the template, labelled
//! `pod-template-hash`, and owned by the Deployment itself: there are no ReplicaSet objects, the
//! hash label plays their part (docs/kube-test-server.md). Scale up and down; `RollingUpdate`
//! (the default) creates the new template's pods first and removes one outdated pod each time a
//! new one is ready; `Recreate` removes every outdated pod before creating new ones. The status
//! carries what `kubectl rollout status` reads.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::statefulset::{is_ready, owned_pods, pod_of, template_hash};
use crate::store::{Change, Key, State};

/// One step toward the desired pods of every Deployment; true if something changed.
pub(crate) fn reconcile(state: &mut State, tx: &broadcast::Sender<Arc<Change>>) -> bool {
    let deployments = state.objects_of("apps", "deployments");
    let pods = state.objects_of("", "pods");
    for (k, d) in deployments {
        if d.pointer("/metadata/deletionTimestamp").is_some() {
            continue;
        }
        let (ns, name) = (k.2.clone(), k.3.clone());
        let replicas = d
            .pointer("/spec/replicas")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        let template = d.pointer("/spec/template").cloned().unwrap_or(json!({}));
        let hash = template_hash(&template);
        let recreate = d.pointer("/spec/strategy/type").and_then(Value::as_str) == Some("Recreate");
        let uid = d
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let mut live = owned_pods(&pods, &ns, &uid);
        live.retain(|(_, p)| p.pointer("/metadata/deletionTimestamp").is_none());
        let current = |p: &Value| {
            p.pointer("/metadata/labels/pod-template-hash")
                .and_then(Value::as_str)
                == Some(hash.as_str())
        };
        type Pods<'a> = Vec<&'a (Key, Value)>;
        let (new, old): (Pods<'_>, Pods<'_>) = live.iter().copied().partition(|(_, p)| current(p));
        // Failed pods (restartPolicy Never) are replaced, as the ReplicaSet does.
        if let Some((pk, _)) = new
            .iter()
            .find(|(_, p)| p.pointer("/status/phase").and_then(Value::as_str) == Some("Failed"))
        {
            state.controller_delete(pk, tx);
            return true;
        }
        // Scale down: the newest pods of the current template go first (not-ready ones first).
        if new.len() as u64 > replicas
            && let Some((pk, _)) = new.iter().min_by_key(|(pk, p)| (is_ready(p), pk.3.clone()))
        {
            state.controller_delete(pk, tx);
            return true;
        }
        if recreate && let Some((pk, _)) = old.first() {
            state.controller_delete(pk, tx);
            return true;
        }
        if (new.len() as u64) < replicas {
            let pod = pod_from_template(&template, &name, &uid, &hash);
            if state.controller_create("", "pods", &ns, pod, tx).is_ok() {
                return true;
            }
        }
        // RollingUpdate: an outdated pod goes once enough new ones are ready to keep the count.
        let new_ready = new.iter().filter(|(_, p)| is_ready(p)).count();
        let old_ready = old.iter().filter(|(_, p)| is_ready(p)).count();
        if let Some((pk, _)) = old.iter().find(|(_, p)| !is_ready(p)).or_else(|| {
            old.first()
                .filter(|_| new_ready + old_ready > replicas as usize)
        }) {
            state.controller_delete(pk, tx);
            return true;
        }
        let ready = new_ready + old_ready;
        let complete = old.is_empty() && new.len() as u64 == replicas && new_ready == new.len();
        // maxUnavailable's default, 25 % rounded down.
        let available = ready as u64 >= replicas - replicas / 4;
        let generation = d
            .pointer("/metadata/generation")
            .cloned()
            .unwrap_or(json!(1));
        let condition = |t: &str, ok: bool, reason: &str| json!({"type": t, "status": if ok { "True" } else { "False" }, "reason": reason});
        let status = json!({
            "observedGeneration": generation,
            "replicas": live.len(),
            "updatedReplicas": new.len(),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": (replicas as usize).saturating_sub(ready),
            "conditions": [
                condition("Available", available,
                    if available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" }),
                condition("Progressing", true,
                    if complete { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" }),
            ],
        });
        if state.set_status("apps", "deployments", &d, status, tx) {
            return true;
        }
    }
    false
}

/// A pod of the template, with the hash label and the Deployment as its controller.
fn pod_from_template(template: &Value, name: &str, uid: &str, hash: &str) -> Value {
    let mut pod = pod_of(template, "Deployment", name, uid);
    let meta = pod["metadata"].as_object_mut().expect("metadata object");
    meta.remove("name");
    meta.insert("generateName".into(), json!(format!("{name}-{hash}-")));
    let labels = meta.entry("labels").or_insert(json!({}));
    labels["pod-template-hash"] = json!(hash);
    pod
}
