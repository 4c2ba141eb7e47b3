//! The agent's RBAC: the rules of the Role the operator gives each cluster's agents
//! (operator/src/objects.rs), and the rules the tests grant agents they start without the
//! operator. Exactly what the agent calls, no more (docs/security.md, "Least privilege: RBAC";
//! operator/tests/operator.rs compares these rules with the calls the agents make):
//!
//! - `leases`: its shard's leader Lease, read (`get`), taken (`create`) and renewed or handed
//!   over (`update`, a replace with the read resourceVersion as precondition);
//! - `pods`: its own pod read at start (`get`) and its role label written (`patch`); the drain
//!   watches its own pod (`list`, `watch`) for the drain annotation;
//! - `events`: Events about its pod and its PostgresCluster (`create`, core group);
//! - `postgresclusters`: the catalog sync reads its cluster (`get`) and applies its entries of
//!   `spec.databases` (`patch`, server-side apply), and writes each database's state per shard
//!   to `postgresclusters/status` (`patch`).

use serde_json::{Value, json};

/// The rules of the agents' Role, as `rbac.authorization.k8s.io/v1` PolicyRules.
pub fn agent_role_rules() -> Value {
    json!([
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "verbs": ["get", "create", "update"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": ["pgpilot.io"], "resources": ["postgresclusters"], "verbs": ["get", "patch"]},
        {"apiGroups": ["pgpilot.io"], "resources": ["postgresclusters/status"], "verbs": ["patch"]},
    ])
}
