//! Least privilege, checked: every (verb, resource) the chart grants the operator and the
//! agents' Role grants the agents is listed in [`GRANTS`] with the test that uses it (or why it
//! is granted without a test using it). Three checks close the loop:
//!
//! 1. the test API server enforces RBAC for the operator's ServiceAccount (the chart's rules)
//!    and the agents' (their Role), and every test ends with no request refused: nothing used
//!    is missing from the Roles;
//! 2. [`check_table`] (no cluster): the table lists exactly the grants of the chart and of the
//!    agents' Role, and the operator holds every permission of the agents' Role (Kubernetes lets
//!    only such a subject create that Role);
//! 3. [`check_used`] at the end of each test (operator.rs, and chart.rs with the chart's own
//!    operator pods): every grant the table assigns to that test was used in it. So across the
//!    suite, nothing granted goes unused.
#![allow(dead_code)] // chart.rs shares the support module

use std::collections::{BTreeMap, BTreeSet};

use pgpilot_kube_testserver::{AuditKey, KubeTestServer, SA_PREFIX};
use serde_json::Value;

/// Whose permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Who {
    /// The chart's operator ServiceAccount: its (Cluster)Role and leader-election Role.
    Operator,
    /// A cluster's agents (`<cluster>-agent`): the Role the operator creates.
    Agent,
}

/// Why a grant exists.
#[derive(Debug, Clone, Copy)]
pub enum Use {
    /// Used in this test of operator/tests/operator.rs (checked there).
    Test(&'static str),
    /// Granted without a test using it, for this reason.
    Untested(&'static str),
}

const CLUSTER: &str = "a_sharded_cluster_becomes_ready_serves_each_shard_and_scales";
const CATALOG: &str = "databases_made_with_sql_are_adopted_and_every_shard_converges";
const ROLLOUT: &str = "rollouts_go_shard_by_shard_behind_gates_and_halt_on_a_bad_revision";
const LEADER: &str = "two_operator_replicas_never_both_act_and_a_killed_leader_is_replaced";
const BACKUP: &str = "postgres_backups_retention_schedule_and_a_cluster_restored_from_them";
/// operator/tests/chart.rs: the chart's own operator pods and docs/user-guide.md.
const GUIDE: &str = "the_chart_installs_the_operator_and_the_guide_works";

/// For the operator: the permissions it holds only because the agents' Role has them.
const ESCALATION: &str = "held so that the operator may create the agents' Role (Kubernetes \
     lets only a subject that holds a Role's permissions create it)";

use Use::{Test, Untested};
use Who::{Agent, Operator};

/// Every grant: (who, verb, resource as `plural[.group][/subresource]`, use).
pub const GRANTS: &[(Who, &str, &str, Use)] = &[
    // The agents' Role (pgpilot_common::rbac).
    (Agent, "get", "leases.coordination.k8s.io", Test(CLUSTER)),
    (Agent, "create", "leases.coordination.k8s.io", Test(CLUSTER)),
    (Agent, "update", "leases.coordination.k8s.io", Test(CLUSTER)),
    (Agent, "get", "pods", Test(CLUSTER)),
    (Agent, "patch", "pods", Test(CLUSTER)),
    (Agent, "list", "pods", Test(CLUSTER)),
    (Agent, "watch", "pods", Test(CLUSTER)),
    (Agent, "create", "events", Test(CATALOG)),
    (Agent, "get", "postgresclusters.pgpilot.io", Test(CATALOG)),
    (Agent, "patch", "postgresclusters.pgpilot.io", Test(CATALOG)),
    (
        Agent,
        "patch",
        "postgresclusters.pgpilot.io/status",
        Test(CATALOG),
    ),
    // The chart's operator (Cluster)Role and leader-election Role.
    (Operator, "get", "postgresclusters.pgpilot.io", Test(BACKUP)),
    (
        Operator,
        "list",
        "postgresclusters.pgpilot.io",
        Test(CLUSTER),
    ),
    (
        Operator,
        "watch",
        "postgresclusters.pgpilot.io",
        Test(CLUSTER),
    ),
    (
        Operator,
        "patch",
        "postgresclusters.pgpilot.io",
        Test(GUIDE),
    ),
    (
        Operator,
        "patch",
        "postgresclusters.pgpilot.io/status",
        Test(CLUSTER),
    ),
    (
        Operator,
        "update",
        "postgresclusters.pgpilot.io/finalizers",
        Untested(
            "owner references with blockOwnerDeletion need it where the \
             OwnerReferencesPermissionEnforcement admission plugin runs (OpenShift); the test \
             server, like a default cluster, does not run it",
        ),
    ),
    (
        Operator,
        "list",
        "postgresbackups.pgpilot.io",
        Test(CLUSTER),
    ),
    (
        Operator,
        "watch",
        "postgresbackups.pgpilot.io",
        Test(CLUSTER),
    ),
    (
        Operator,
        "create",
        "postgresbackups.pgpilot.io",
        Test(BACKUP),
    ),
    (
        Operator,
        "patch",
        "postgresbackups.pgpilot.io/status",
        Test(BACKUP),
    ),
    (Operator, "get", "statefulsets.apps", Test(CLUSTER)),
    (Operator, "list", "statefulsets.apps", Test(CLUSTER)),
    (Operator, "watch", "statefulsets.apps", Test(CLUSTER)),
    (Operator, "create", "statefulsets.apps", Test(CLUSTER)),
    (Operator, "patch", "statefulsets.apps", Test(CLUSTER)),
    (Operator, "get", "services", Test(CLUSTER)),
    (Operator, "list", "services", Test(CLUSTER)),
    (Operator, "watch", "services", Test(CLUSTER)),
    (Operator, "create", "services", Test(CLUSTER)),
    (Operator, "patch", "services", Test(CLUSTER)),
    (Operator, "get", "configmaps", Test(CLUSTER)),
    (Operator, "list", "configmaps", Test(CLUSTER)),
    (Operator, "watch", "configmaps", Test(CLUSTER)),
    (Operator, "create", "configmaps", Test(CLUSTER)),
    (Operator, "patch", "configmaps", Test(CLUSTER)),
    (Operator, "get", "serviceaccounts", Test(CLUSTER)),
    (Operator, "create", "serviceaccounts", Test(CLUSTER)),
    (Operator, "patch", "serviceaccounts", Test(CLUSTER)),
    (Operator, "get", "secrets", Test(CLUSTER)),
    (Operator, "create", "secrets", Test(CLUSTER)),
    (Operator, "update", "secrets", Test(CLUSTER)),
    (Operator, "get", "pods", Test(BACKUP)),
    (Operator, "list", "pods", Test(CLUSTER)),
    (Operator, "watch", "pods", Test(CLUSTER)),
    (Operator, "patch", "pods", Test(ROLLOUT)),
    (Operator, "delete", "pods", Test(ROLLOUT)),
    (
        Operator,
        "get",
        "poddisruptionbudgets.policy",
        Test(CLUSTER),
    ),
    (
        Operator,
        "create",
        "poddisruptionbudgets.policy",
        Test(CLUSTER),
    ),
    (
        Operator,
        "patch",
        "poddisruptionbudgets.policy",
        Test(CLUSTER),
    ),
    (
        Operator,
        "get",
        "roles.rbac.authorization.k8s.io",
        Test(CLUSTER),
    ),
    (
        Operator,
        "create",
        "roles.rbac.authorization.k8s.io",
        Test(CLUSTER),
    ),
    (
        Operator,
        "patch",
        "roles.rbac.authorization.k8s.io",
        Test(CLUSTER),
    ),
    (
        Operator,
        "get",
        "rolebindings.rbac.authorization.k8s.io",
        Test(CLUSTER),
    ),
    (
        Operator,
        "create",
        "rolebindings.rbac.authorization.k8s.io",
        Test(CLUSTER),
    ),
    (
        Operator,
        "patch",
        "rolebindings.rbac.authorization.k8s.io",
        Test(CLUSTER),
    ),
    // Leader election (its own Role); the agents' Role has the same three.
    (Operator, "get", "leases.coordination.k8s.io", Test(LEADER)),
    (
        Operator,
        "create",
        "leases.coordination.k8s.io",
        Test(LEADER),
    ),
    (
        Operator,
        "update",
        "leases.coordination.k8s.io",
        Test(LEADER),
    ),
    (Operator, "create", "events.events.k8s.io", Test(CLUSTER)),
    (Operator, "patch", "events.events.k8s.io", Test(CLUSTER)),
    (Operator, "create", "events", Untested(ESCALATION)),
];

/// `plural[.group][/subresource]`.
pub fn resource_name(group: &str, resource: &str, subresource: &str) -> String {
    let mut r = resource.to_string();
    if !group.is_empty() {
        r = format!("{r}.{group}");
    }
    if !subresource.is_empty() {
        r = format!("{r}/{subresource}");
    }
    r
}

/// Every (verb, resource) a list of PolicyRules grants (no wildcards: the table is explicit).
pub fn granted(rules: &Value) -> BTreeSet<(String, String)> {
    let strings = |r: &Value, f: &str| -> Vec<String> {
        r.get(f)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect()
    };
    let mut out = BTreeSet::new();
    for rule in rules.as_array().into_iter().flatten() {
        for g in strings(rule, "apiGroups") {
            for res in strings(rule, "resources") {
                let (plural, sub) = res.split_once('/').unwrap_or((&res, ""));
                for v in strings(rule, "verbs") {
                    assert!(
                        g != "*" && res != "*" && v != "*",
                        "a wildcard in {rule}: grant each verb and resource by name"
                    );
                    out.insert((v, resource_name(&g, plural, sub)));
                }
            }
        }
    }
    out
}

/// Whose request an audit line is: the operator's ServiceAccount, an agent's, or neither.
fn who(key: &AuditKey, operator_sa: &str) -> Option<Who> {
    let (_, name) = key.user.strip_prefix(SA_PREFIX)?.split_once(':')?;
    if name == operator_sa {
        Some(Operator)
    } else if name.ends_with("-agent") {
        Some(Agent)
    } else {
        None
    }
}

/// What each identity used on this server, as (who, verb, resource).
pub fn used(server: &KubeTestServer, operator_sa: &str) -> BTreeSet<(Who, String, String)> {
    let audit: BTreeMap<AuditKey, u64> = server.audit();
    audit
        .keys()
        .filter(|k| k.allowed)
        .filter_map(|k| {
            let w = who(k, operator_sa)?;
            Some((
                w,
                k.verb.clone(),
                resource_name(&k.group, &k.resource, &k.subresource),
            ))
        })
        .collect()
}

/// The table against the Roles: the same (who, verb, resource) set both ways, each entry once,
/// and the operator holding every permission of the agents' Role.
pub fn check_table(operator_rules: &[&Value], agent_rules: &Value) {
    let mut want: BTreeSet<(Who, String, String)> = BTreeSet::new();
    for rules in operator_rules {
        for (v, r) in granted(rules) {
            want.insert((Operator, v, r));
        }
    }
    let agent = granted(agent_rules);
    for (v, r) in &agent {
        want.insert((Agent, v.clone(), r.clone()));
    }
    let mut problems = Vec::new();
    let mut listed = BTreeSet::new();
    for (w, v, r, _) in GRANTS {
        if !listed.insert((*w, v.to_string(), r.to_string())) {
            problems.push(format!("{w:?} {v} {r} is listed twice"));
        }
    }
    for (w, v, r) in want.difference(&listed) {
        problems.push(format!(
            "{w:?} is granted {v} {r}, which GRANTS does not list: name the test that uses it, or remove it from the Role"
        ));
    }
    for (w, v, r) in listed.difference(&want) {
        problems.push(format!(
            "GRANTS lists {v} {r} for {w:?}, which its Role does not grant"
        ));
    }
    for (v, r) in &agent {
        if !want.contains(&(Operator, v.clone(), r.clone())) {
            problems.push(format!(
                "the operator lacks {v} {r}, which the agents' Role grants: it could not create that Role"
            ));
        }
    }
    assert!(problems.is_empty(), "RBAC table:\n{}", problems.join("\n"));
}

/// Every grant [`GRANTS`] assigns to `test` was used on `server`.
pub fn check_used(server: &KubeTestServer, operator_sa: &str, test: &str) {
    let used = used(server, operator_sa);
    let missing: Vec<String> = GRANTS
        .iter()
        .filter(|(_, _, _, u)| matches!(u, Test(t) if *t == test))
        .filter(|(w, v, r, _)| !used.contains(&(*w, v.to_string(), r.to_string())))
        .map(|(w, v, r, _)| format!("{w:?} {v} {r}"))
        .collect();
    let all: Vec<String> = used
        .iter()
        .map(|(w, v, r)| format!("{w:?} {v} {r}"))
        .collect();
    assert!(
        missing.is_empty(),
        "granted for {test}, which never used them (remove them from the Role, or name the test that uses them):\n{}\n\nused here:\n{}",
        missing.join("\n"),
        all.join("\n")
    );
}
