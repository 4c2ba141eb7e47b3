//! What kube-apiserver and kube-controller-manager do for pods once a kubelet runs them: the
//! `binding` subresource (a scheduler's write of `spec.nodeName`), graceful deletion of a pod
//! bound to a node (marked with `deletionTimestamp` and `deletionGracePeriodSeconds`; its
//! kubelet stops the processes and removes the object with grace 0), the `eviction`
//! subresource honouring PodDisruptionBudgets (429 when a budget does not allow it), and the
//! disruption controller's PDB status (opt-in, `StoreOptions::disruption_controller`), and
//! `pods/<name>/log` proxied to the node's kubelet (`status.daemonEndpoints.kubeletEndpoint`),
//! as kube-apiserver does for `kubectl logs`.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::error::{ApiError, ApiResult};
use crate::selectors::LabelSelector;
use crate::statefulset::is_ready;
use crate::store::{Change, EventType, Key, Propagation, State, Store, meta_mut, meta_str};

/// `terminationGracePeriodSeconds` when the pod spec does not say.
const DEFAULT_GRACE: i64 = 30;

fn pod_key(ns: &str, name: &str) -> Key {
    (String::new(), "pods".into(), ns.into(), name.into())
}

fn deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some()
}

impl Store {
    /// `POST pods/{name}/binding`: assigns the pod to a node, once.
    pub fn bind_pod(&self, ns: &str, name: &str, node: &str, dry_run: bool) -> ApiResult<()> {
        if node.is_empty() {
            return Err(ApiError::invalid(
                "Binding",
                name,
                "target.name: Required value",
            ));
        }
        self.write(dry_run, false, |s, tx| {
            let k = pod_key(ns, name);
            let mut pod = s
                .objects
                .get(&k)
                .cloned()
                .ok_or_else(|| ApiError::not_found("pods", name))?;
            if let Some(current) = pod.pointer("/spec/nodeName").and_then(Value::as_str) {
                return Err(ApiError::conflict(
                    "pods/binding",
                    name,
                    &format!("pod {name} is already assigned to node \"{current}\""),
                ));
            }
            if deleting(&pod) {
                return Err(ApiError::conflict(
                    "pods/binding",
                    name,
                    "pod is being deleted",
                ));
            }
            pod["spec"]["nodeName"] = json!(node);
            let now = crate::store::now();
            let status = pod
                .get_mut("status")
                .and_then(Value::as_object_mut)
                .ok_or_else(|| ApiError::internal("pod without status"))?;
            status.insert(
                "conditions".into(),
                json!([{"type": "PodScheduled", "status": "True", "lastTransitionTime": now}]),
            );
            s.commit(&k, Some(pod), EventType::Modified, tx);
            Ok(())
        })
    }

    /// `POST pods/{name}/eviction`: a delete that a PodDisruptionBudget may refuse (429).
    pub fn evict_pod(
        &self,
        ns: &str,
        name: &str,
        grace: Option<i64>,
        dry_run: bool,
    ) -> ApiResult<()> {
        self.write(dry_run, false, |s, tx| {
            let k = pod_key(ns, name);
            let pod = s
                .objects
                .get(&k)
                .cloned()
                .ok_or_else(|| ApiError::not_found("pods", name))?;
            // A pod already terminating or finished disrupts nothing more (as in Kubernetes).
            let finished = matches!(
                pod.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            );
            if !deleting(&pod) && !finished {
                let budgets: Vec<(String, Budget)> = s
                    .objects_of("policy", "poddisruptionbudgets")
                    .into_iter()
                    .filter(|(bk, b)| bk.2 == ns && !deleting(b))
                    .filter_map(|(bk, b)| Some((bk.3, Budget::evaluate(s, &b)?)))
                    .filter(|(_, b)| b.selector.matches_object(&pod))
                    .collect();
                match budgets.as_slice() {
                    [] => {}
                    [(budget_name, b)] => {
                        // A healthy pod needs a disruption to spare; an unhealthy one may go
                        // while the budget is met (unhealthyPodEvictionPolicy IfHealthyBudget).
                        let refused = if is_ready(&pod) {
                            b.allowed() < 1
                        } else {
                            b.healthy < b.desired
                        };
                        if refused {
                            return Err(ApiError::too_many_requests(
                                "Cannot evict pod as it would violate the pod's disruption budget.",
                                json!([{"reason": "DisruptionBudget", "message": format!(
                                    "The disruption budget {budget_name} needs {} healthy pods and has {} currently",
                                    b.desired, b.healthy)}]),
                            ));
                        }
                    }
                    _ => {
                        return Err(ApiError::internal(
                            "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
                        ));
                    }
                }
            }
            s.delete_graceful(&k, None, grace, tx);
            Ok(())
        })
    }
}

/// What a PodDisruptionBudget allows now, computed as the disruption controller does from the
/// pods it selects (the expected count is the number of selected pods, not their controller's
/// scale).
struct Budget {
    selector: LabelSelector,
    expected: i64,
    healthy: i64,
    desired: i64,
}

impl Budget {
    fn evaluate(s: &State, pdb: &Value) -> Option<Self> {
        let ns = meta_str(pdb, "namespace");
        let selector = LabelSelector::parse(&crate::scale::selector_string(
            pdb.pointer("/spec/selector"),
        ))
        .ok()?;
        // By reference: one budget per shard must not copy every pod of the store.
        let pods: Vec<&Value> = s
            .objects
            .iter()
            .filter(|(k, p)| {
                k.0.is_empty()
                    && k.1 == "pods"
                    && k.2 == ns
                    && !deleting(p)
                    && selector.matches_object(p)
            })
            .map(|(_, p)| p)
            .collect();
        let expected = pods.len() as i64;
        let healthy = pods.iter().filter(|p| is_ready(p)).count() as i64;
        // Percentages round up, as intstr.GetScaledValueFromIntOrPercent(…, true) does.
        let scaled = |v: &Value| -> i64 {
            match v {
                Value::String(p) => {
                    let pct: i64 = p.trim_end_matches('%').parse().unwrap_or(0);
                    (pct * expected + 99) / 100
                }
                other => other.as_i64().unwrap_or(0),
            }
        };
        let desired = if let Some(min) = pdb.pointer("/spec/minAvailable") {
            scaled(min)
        } else if let Some(max) = pdb.pointer("/spec/maxUnavailable") {
            (expected - scaled(max)).max(0)
        } else {
            0
        };
        Some(Self {
            selector,
            expected,
            healthy,
            desired,
        })
    }

    fn allowed(&self) -> i64 {
        (self.healthy - self.desired).max(0)
    }
}

/// The disruption controller: every PodDisruptionBudget's status; true if one changed.
pub(crate) fn reconcile_budgets(state: &mut State, tx: &broadcast::Sender<Arc<Change>>) -> bool {
    for (_, pdb) in state.objects_of("policy", "poddisruptionbudgets") {
        if deleting(&pdb) {
            continue;
        }
        let Some(b) = Budget::evaluate(state, &pdb) else {
            continue;
        };
        let mut status = json!({
            "observedGeneration": pdb.pointer("/metadata/generation").cloned().unwrap_or(json!(1)),
            "disruptionsAllowed": b.allowed(),
            "currentHealthy": b.healthy,
            "desiredHealthy": b.desired,
            "expectedPods": b.expected,
        });
        let allowed = b.allowed() > 0;
        let old_condition = pdb
            .pointer("/status/conditions/0")
            .filter(|c| c.get("status") == Some(&json!(if allowed { "True" } else { "False" })))
            .cloned();
        status["conditions"] = json!([old_condition.unwrap_or_else(|| json!({
            "type": "DisruptionAllowed",
            "status": if allowed { "True" } else { "False" },
            "reason": if allowed { "SufficientPods" } else { "InsufficientPods" },
            "message": "",
            "observedGeneration": status["observedGeneration"],
            "lastTransitionTime": crate::store::now(),
        }))]);
        if state.set_status("policy", "poddisruptionbudgets", &pdb, status, tx) {
            return true;
        }
    }
    false
}

impl State {
    /// A delete that gives a pod bound to a node its grace period: the pod is marked
    /// (`deletionTimestamp` = now + grace, `deletionGracePeriodSeconds` = grace) and stays until
    /// its kubelet, having stopped the containers, deletes it again with grace 0. A shorter
    /// grace on a second delete shortens the wait, as in Kubernetes. Every other object, and a
    /// pod not bound or already finished, is deleted as [`State::delete_inner`] does.
    pub(crate) fn delete_graceful(
        &mut self,
        k: &Key,
        propagation: Option<Propagation>,
        grace: Option<i64>,
        tx: &broadcast::Sender<Arc<Change>>,
    ) -> (Value, bool) {
        let Some(obj) = self.objects.get(k).cloned() else {
            return (Value::Null, true);
        };
        let bound = obj.pointer("/spec/nodeName").is_some();
        let finished = matches!(
            obj.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        if !(k.0.is_empty() && k.1 == "pods" && bound && !finished) {
            return self.delete_inner(k, propagation, tx);
        }
        let grace = grace
            .or_else(|| {
                obj.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(DEFAULT_GRACE)
            .max(0);
        if grace == 0 {
            return self.delete_inner(k, propagation, tx);
        }
        let current = obj
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64);
        if current.is_some_and(|c| c <= grace) {
            return (obj, false);
        }
        let mut new = obj;
        let at = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_secs(grace))
            .unwrap_or_else(|_| jiff::Timestamp::now())
            .round(jiff::Unit::Second)
            .unwrap_or_else(|_| jiff::Timestamp::now());
        let m = meta_mut(&mut new);
        m.insert("deletionTimestamp".into(), json!(at.to_string()));
        m.insert("deletionGracePeriodSeconds".into(), json!(grace));
        if current.is_none()
            && let Some(g) = m.get("generation").and_then(Value::as_i64)
        {
            m.insert("generation".into(), json!(g + 1));
        }
        (self.commit(k, Some(new), EventType::Modified, tx), false)
    }
}

/// `GET pods/<name>/log`: the container's log from the kubelet of the pod's node, at
/// `http://<InternalIP>:<kubeletEndpoint>/containerLogs/<ns>/<pod>/<container>`.
pub(crate) async fn log(
    store: &Store,
    ns: &str,
    name: &str,
    q: &std::collections::HashMap<String, String>,
) -> ApiResult<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (pod, node) = {
        let s = store.lock();
        let pod = s
            .objects
            .get(&pod_key(ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found("pods", name))?;
        let node_name = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let node = s
            .objects
            .get(&(String::new(), "nodes".into(), String::new(), node_name))
            .cloned();
        (pod, node)
    };
    let containers: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    let container = match (q.get("container"), containers.as_slice()) {
        (Some(c), _) => c.clone(),
        (None, [one]) => one.to_string(),
        (None, all) => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                all.join(" ")
            )));
        }
    };
    let endpoint = node.as_ref().and_then(|n| {
        let port = n
            .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
            .and_then(Value::as_u64)?;
        let ip = n
            .pointer("/status/addresses")
            .and_then(Value::as_array)?
            .iter()
            .find(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))?
            .get("address")?
            .as_str()?
            .to_string();
        Some(format!("{ip}:{port}"))
    });
    let Some(endpoint) = endpoint else {
        return Err(ApiError::bad_request(format!(
            "pod {name} is not running on a node with a kubelet"
        )));
    };
    let fail = |e: std::io::Error| ApiError::internal(format!("reading logs from {endpoint}: {e}"));
    let mut conn = tokio::net::TcpStream::connect(&endpoint)
        .await
        .map_err(fail)?;
    let req = format!(
        "GET /containerLogs/{ns}/{name}/{container} HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.map_err(fail)?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.map_err(fail)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(ApiError::bad_request(format!(
            "container {container:?} in pod {name:?} has no logs: {}",
            head.lines().next().unwrap_or_default()
        )));
    }
    Ok(body.to_string())
}
