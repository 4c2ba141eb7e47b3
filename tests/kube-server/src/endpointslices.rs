//! The EndpointSlice controller (opt-in, `StoreOptions::endpointslice_controller`): one
//! `discovery.k8s.io/v1` EndpointSlice per Service with a selector, named after the Service and
//! labelled `kubernetes.io/service-name`, listing the selected pods that have an IP with their
//! `ready`/`serving`/`terminating` conditions, as kube-controller-manager does. Owned by the
//! Service, so it goes with it. There is no core/v1 Endpoints object and no cluster DNS.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::selectors::LabelSelector;
use crate::ssa::Scope;
use crate::statefulset::is_ready;
use crate::store::{Change, State, meta_str};

/// One step toward every Service's EndpointSlice; true if something changed.
pub(crate) fn reconcile(state: &mut State, tx: &broadcast::Sender<Arc<Change>>) -> bool {
    let pods = state.objects_of("", "pods");
    let slices = state.objects_of("discovery.k8s.io", "endpointslices");
    for (k, svc) in state.objects_of("", "services") {
        let Some(selector) = svc.pointer("/spec/selector").and_then(Value::as_object) else {
            continue;
        };
        if selector.is_empty() || svc.pointer("/metadata/deletionTimestamp").is_some() {
            continue;
        }
        let selector = LabelSelector::parse(
            &selector
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(","),
        )
        .unwrap_or_default();
        let publish_unready = svc.pointer("/spec/publishNotReadyAddresses") == Some(&json!(true));
        let endpoints: Vec<Value> = pods
            .iter()
            .filter(|(pk, p)| pk.2 == k.2 && selector.matches_object(p))
            .filter(|(_, p)| {
                !matches!(
                    p.pointer("/status/phase").and_then(Value::as_str),
                    Some("Succeeded" | "Failed")
                )
            })
            .filter_map(|(_, p)| {
                let ip = p.pointer("/status/podIP").and_then(Value::as_str)?;
                let terminating = p.pointer("/metadata/deletionTimestamp").is_some();
                let serving = is_ready(p);
                let mut e = json!({
                    "addresses": [ip],
                    "conditions": {"ready": publish_unready || (serving && !terminating),
                        "serving": serving, "terminating": terminating},
                    "targetRef": {"kind": "Pod", "namespace": k.2, "name": meta_str(p, "name"),
                        "uid": meta_str(p, "uid")},
                });
                if let Some(node) = p.pointer("/spec/nodeName") {
                    e["nodeName"] = node.clone();
                }
                if let Some(h) = p.pointer("/spec/hostname") {
                    e["hostname"] = h.clone();
                }
                Some(e)
            })
            .collect();
        let ports: Vec<Value> = svc
            .pointer("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|p| {
                let port = p
                    .get("targetPort")
                    .filter(|t| t.is_i64())
                    .or_else(|| p.get("port"))
                    .cloned()
                    .unwrap_or(Value::Null);
                json!({"name": p.get("name").cloned().unwrap_or(json!("")), "port": port,
                    "protocol": p.get("protocol").cloned().unwrap_or(json!("TCP"))})
            })
            .collect();
        let name = &k.3;
        let existing = slices.iter().find(|(sk, _)| sk.2 == k.2 && &sk.3 == name);
        match existing {
            None => {
                let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": name, "labels": {
                        "kubernetes.io/service-name": name,
                        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                        "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                            "uid": meta_str(&svc, "uid"), "controller": true, "blockOwnerDeletion": true}]},
                    "addressType": "IPv4", "endpoints": endpoints, "ports": ports});
                if state
                    .controller_create("discovery.k8s.io", "endpointslices", &k.2, slice, tx)
                    .is_ok()
                {
                    return true;
                }
            }
            Some((_, current)) => {
                if current.get("endpoints") == Some(&json!(endpoints))
                    && current.get("ports") == Some(&json!(ports))
                {
                    continue;
                }
                let mut new = current.clone();
                new["endpoints"] = json!(endpoints);
                new["ports"] = json!(ports);
                if state
                    .controller_update(
                        "discovery.k8s.io",
                        "endpointslices",
                        current.clone(),
                        new,
                        Scope::Main,
                        tx,
                    )
                    .is_ok()
                {
                    return true;
                }
            }
        }
    }
    false
}
