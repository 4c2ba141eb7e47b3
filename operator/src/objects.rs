//! What a `PostgresCluster` becomes: pure functions from the resource (and the operator's
//! options) to the objects the reconciler applies. Per cluster: the agents' ServiceAccount,
//! Role and RoleBinding. Per shard: the agent's configuration (ConfigMap), a StatefulSet
//! (`updateStrategy: OnDelete`: the operator chooses which pod moves when), a headless Service,
//! a read-write Service on `pgpilot.io/role=primary`, a read-only one on replicas, and a
//! PodDisruptionBudget. Every object carries the cluster's labels, an owner reference to it,
//! and the hash of its desired content (`pgpilot.io/desired-hash`), by which the reconciler
//! skips objects that are already as desired (no write at all in a steady state).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use kube::{Resource, ResourceExt};
use pgpilot_common::crd::PostgresCluster;
use pgpilot_common::names::{LABEL_CLUSTER, LABEL_ROLE, LABEL_SHARD};
use serde_json::{Value, json};

/// The annotation holding the hash of an object's desired content.
pub const DESIRED_HASH: &str = "pgpilot.io/desired-hash";
/// Field manager of every apply.
pub const MANAGER: &str = "pgpilot-operator";
/// The pod template's revision label: a pod runs the current revision when it carries
/// [`revision`]'s value (docs/rollouts.md).
pub const LABEL_REVISION: &str = "pgpilot.io/revision";

/// Parameters PostgreSQL applies only at a restart (`pg_settings.context = 'postmaster'`):
/// a change of one of them is a new revision, rolled out shard by shard. The others reach
/// Postgres by a reload without any rollout.
pub const RESTART_PARAMETERS: &[&str] = &[
    "archive_mode",
    "autovacuum_max_workers",
    "autovacuum_worker_slots",
    "bonjour",
    "bonjour_name",
    "cluster_name",
    "config_file",
    "data_directory",
    "data_sync_retry",
    "dynamic_shared_memory_type",
    "event_source",
    "external_pid_file",
    "hba_file",
    "hot_standby",
    "huge_pages",
    "huge_page_size",
    "ident_file",
    "io_max_concurrency",
    "io_method",
    "io_workers",
    "jit_provider",
    "listen_addresses",
    "logging_collector",
    "max_connections",
    "max_files_per_process",
    "max_locks_per_transaction",
    "max_logical_replication_workers",
    "max_notify_queue_pages",
    "max_pred_locks_per_transaction",
    "max_prepared_transactions",
    "max_replication_slots",
    "max_wal_senders",
    "max_worker_processes",
    "min_dynamic_shared_memory",
    "old_snapshot_threshold",
    "port",
    "recovery_prefetch",
    "reserved_connections",
    "shared_buffers",
    "shared_memory_type",
    "shared_preload_libraries",
    "superuser_reserved_connections",
    "summarize_wal_slots",
    "track_activity_query_size",
    "track_commit_timestamp",
    "unix_socket_directories",
    "unix_socket_group",
    "unix_socket_permissions",
    "wal_buffers",
    "wal_decode_buffer_size",
    "wal_level",
    "wal_log_hints",
];
/// The agent's API port (external listener) and loopback listener port in the pod.
pub const API_PORT: u16 = 8008;
pub const LOOPBACK_PORT: u16 = 8009;

/// Settings of the operator that shape the workloads.
#[derive(Debug, Clone)]
pub struct Options {
    /// The agent image when the cluster names none.
    pub agent_image: String,
    /// Where a Postgres image keeps its binaries; `{major}` is replaced.
    pub pg_bin_dir: String,
    /// Networks allowed to connect to Postgres (pg_hba, password auth).
    pub allow_networks: Vec<String>,
    /// The drain's timeout in the pods; the grace period is this plus 30 s.
    pub drain_timeout_secs: u64,
    /// Watch and act in this namespace only; `None`: every namespace.
    pub watch_namespace: Option<String>,
    /// The life of the agents' certificate (`spec.tls.mode: operator`), renewed in its last
    /// third (at most 30 days before it ends).
    pub agent_cert_lifetime: std::time::Duration,
    /// The user id the Postgres images run Postgres as (999 in the Debian-based `postgres`
    /// images): the agents' pods run as it, never as root.
    pub postgres_uid: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            agent_image: format!("ghcr.io/pgpilot/agent:{}", env!("CARGO_PKG_VERSION")),
            pg_bin_dir: "/usr/lib/postgresql/{major}/bin".into(),
            allow_networks: vec!["0.0.0.0/0".into(), "::/0".into()],
            drain_timeout_secs: 300,
            watch_namespace: None,
            agent_cert_lifetime: std::time::Duration::from_secs(90 * 86400),
            postgres_uid: 999,
        }
    }
}

/// One object to apply: its kind (for the API) and its body.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub name: String,
    pub body: Value,
}

/// The names of a cluster's objects.
pub struct Names<'a> {
    pub cluster: &'a str,
}

impl Names<'_> {
    /// StatefulSet and headless Service of a shard: `<cluster>-<shard>`.
    pub fn shard(&self, shard: &str) -> String {
        format!("{}-{shard}", self.cluster)
    }
    pub fn rw(&self, shard: &str) -> String {
        format!("{}-{shard}-rw", self.cluster)
    }
    pub fn ro(&self, shard: &str) -> String {
        format!("{}-{shard}-ro", self.cluster)
    }
    pub fn config(&self, shard: &str) -> String {
        format!("{}-{shard}-config", self.cluster)
    }
    /// The agents' ServiceAccount, Role and RoleBinding.
    pub fn agent(&self) -> String {
        format!("{}-agent", self.cluster)
    }
    /// The generated Secret (superuser and replication passwords, API token).
    pub fn secret(&self) -> String {
        format!("{}-secrets", self.cluster)
    }
}

/// Labels of every object of the cluster, and of a shard's.
pub fn labels(cluster: &str, shard: Option<&str>) -> Value {
    let mut l = json!({
        "app.kubernetes.io/name": "pgpilot",
        "app.kubernetes.io/managed-by": MANAGER,
        LABEL_CLUSTER: cluster,
    });
    if let Some(s) = shard {
        l[LABEL_SHARD] = json!(s);
    }
    l
}

/// Where each credential is: (Secret name, key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRefs {
    pub superuser: (String, String),
    pub replication: (String, String),
    pub token: (String, String),
    /// The encryption keys' names, as the Secrets hold them ([`SecretRefs::of`] assumes the
    /// spec's: the encrypting one, or `key`).
    pub keys: KeyIds,
}

impl SecretRefs {
    pub fn of(pc: &PostgresCluster) -> SecretRefs {
        let n = Names {
            cluster: &pc.name_any(),
        };
        let generated = n.secret();
        let s = pc.spec.secrets.clone().unwrap_or_default();
        let pick = |given: Option<String>, key: &str, gen_key: &str| match given {
            Some(name) => (name, key.to_string()),
            None => (generated.clone(), gen_key.to_string()),
        };
        let backup = pc
            .spec
            .backup
            .as_ref()
            .filter(|b| b.encryption_key_secret.is_some());
        let bootstrap = pc
            .spec
            .from_backup()
            .filter(|fb| fb.encryption_key_secret.is_some());
        SecretRefs {
            superuser: pick(s.superuser, "password", "superuser-password"),
            replication: pick(s.replication, "password", "replication-password"),
            token: pick(s.api_token, "token", "token"),
            keys: KeyIds {
                backup: backup
                    .map(|b| vec![b.encryption_key_id.clone().unwrap_or(DEFAULT_KEY_ID.into())])
                    .unwrap_or_default(),
                bootstrap: bootstrap
                    .map(|_| vec![DEFAULT_KEY_ID.to_string()])
                    .unwrap_or_default(),
            },
        }
    }

    /// With the keys the Secrets really hold.
    pub fn with_keys(mut self, keys: KeyIds) -> SecretRefs {
        self.keys = keys;
        self
    }

    /// Whether any credential lives in the generated Secret.
    pub fn uses_generated(&self, generated: &str) -> bool {
        [&self.superuser, &self.replication, &self.token]
            .iter()
            .any(|(n, _)| n == generated)
    }
}

/// Every object of the cluster, in the order they are applied (what pods need first).
pub fn desired(pc: &PostgresCluster, opts: &Options, secrets: &SecretRefs) -> Vec<Desired> {
    let name = pc.name_any();
    let n = Names { cluster: &name };
    let owner = owner_reference(pc);
    let mut out = Vec::new();
    let mut push = |api_version: &'static str,
                    kind: &'static str,
                    obj_name: String,
                    shard: Option<&str>,
                    mut body: Value| {
        body["apiVersion"] = json!(api_version);
        body["kind"] = json!(kind);
        let meta = body
            .as_object_mut()
            .expect("an object")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        meta["name"] = json!(obj_name);
        meta["labels"] = labels(&name, shard);
        meta["ownerReferences"] = json!([owner]);
        let hash = content_hash(&body);
        body["metadata"]["annotations"] = json!({ DESIRED_HASH: hash });
        out.push(Desired {
            api_version,
            kind,
            name: obj_name,
            body,
        });
    };
    let agent = n.agent();
    push("v1", "ServiceAccount", agent.clone(), None, json!({}));
    push(
        "rbac.authorization.k8s.io/v1",
        "Role",
        agent.clone(),
        None,
        // Exactly what the agent calls (pgpilot_common::rbac; checked by operator/tests).
        json!({"rules": pgpilot_common::rbac::agent_role_rules()}),
    );
    push(
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        agent.clone(),
        None,
        json!({"roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": agent},
               "subjects": [{"kind": "ServiceAccount", "name": agent}]}),
    );
    // Once per cluster, not per shard: it renders shard-0's template.
    let rev = revision(pc, secrets, opts);
    for shard in pc.spec.shard_names() {
        let sel = json!({LABEL_CLUSTER: name, LABEL_SHARD: shard});
        push(
            "v1",
            "ConfigMap",
            n.config(&shard),
            Some(&shard),
            json!({"data": {"pgpilot.toml": agent_config(pc, &shard, opts)}}),
        );
        push(
            "v1",
            "Service",
            n.shard(&shard),
            Some(&shard),
            json!({"spec": {"clusterIP": "None", "publishNotReadyAddresses": true, "selector": sel,
                "ports": [{"name": "postgres", "port": 5432}, {"name": "agent", "port": API_PORT}]}}),
        );
        for (svc, role) in [(n.rw(&shard), "primary"), (n.ro(&shard), "replica")] {
            let mut role_sel = sel.clone();
            role_sel[LABEL_ROLE] = json!(role);
            push(
                "v1",
                "Service",
                svc,
                Some(&shard),
                json!({"spec": {"selector": role_sel,
                    "ports": [{"name": "postgres", "port": 5432, "targetPort": 5432}]}}),
            );
        }
        push(
            "policy/v1",
            "PodDisruptionBudget",
            n.shard(&shard),
            Some(&shard),
            json!({"spec": {"maxUnavailable": 1, "selector": {"matchLabels": sel}}}),
        );
        push(
            "apps/v1",
            "StatefulSet",
            n.shard(&shard),
            Some(&shard),
            statefulset(pc, &shard, secrets, opts, &rev),
        );
    }
    out
}

fn owner_reference(pc: &PostgresCluster) -> Value {
    json!({
        "apiVersion": PostgresCluster::api_version(&()),
        "kind": PostgresCluster::kind(&()),
        "name": pc.metadata.name,
        "uid": pc.metadata.uid,
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// The agent's pgpilot.toml for one shard.
pub fn agent_config(pc: &PostgresCluster, shard: &str, opts: &Options) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string");
    let mut out = format!(
        "[cluster]\nname = {}\nshard = {}\n\n[postgres]\nallow_networks = [{}]\n",
        q(&pc.name_any()),
        q(shard),
        opts.allow_networks
            .iter()
            .map(|n| q(n))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !pc.spec.parameters.is_empty() {
        out += "\n[postgres.parameters]\n";
        for (k, v) in &pc.spec.parameters {
            out += &format!("{k} = {}\n", q(v));
        }
    }
    out += &format!(
        "\n[replication]\ndrain_timeout_secs = {}\n",
        opts.drain_timeout_secs
    );
    if let Some(b) = &pc.spec.backup {
        out += &format!("\n[backup]\nstore = {}\n", q(&b.store));
        if let Some(c) = b.compression {
            let c = serde_json::to_value(c).expect("an enum");
            out += &format!("compression = {c}\n");
        }
        if let Some(r) = &b.retention
            && (r.keep_last.is_some() || r.keep_within.is_some())
        {
            out += "\n[backup.retention]\n";
            if let Some(n) = r.keep_last {
                out += &format!("keep_last = {n}\n");
            }
            if let Some(w) = &r.keep_within {
                out += &format!("keep_within = {}\n", q(w));
            }
        }
    }
    if let Some(fb) = pc.spec.from_backup() {
        // Only the shard's first instance (the pod that creates the Lease, on an empty volume)
        // restores; the others clone it.
        out += &format!("\n[bootstrap]\ncluster = {}\n", q(&fb.cluster));
        if let Some(t) = &fb.target_time {
            out += &format!("target_time = {}\n", q(t));
        }
        out += &format!("\n[bootstrap.store]\nstore = {}\n", q(&fb.store));
        if fb.credentials_secret.is_some() {
            out += &format!("credentials_env_prefix = {}\n", q(BOOTSTRAP_ENV_PREFIX));
        }
    }
    if crate::tls::agent_secret(pc).is_some() {
        let name = crate::tls::server_name(&pc.name_any(), &pc.namespace().unwrap_or_default());
        let mut clients = vec![name.clone()];
        if pc.spec.tls_mode() == pgpilot_common::crd::TlsMode::Operator {
            clients.push(crate::tls::OPERATOR_CLIENT_NAME.into());
        }
        // The files come through the environment (PGPILOT_TLS_*_FILE), as the other Secrets'.
        out += &format!(
            "\n[tls]\nserver_name = {}\nclient_names = [{}]\n",
            q(&name),
            clients.iter().map(|c| q(c)).collect::<Vec<_>>().join(", ")
        );
    }
    out += "\n[kubernetes]\nmode = \"on\"\n";
    out
}

/// Where the agents' certificate is mounted (`spec.tls`).
const TLS_DIR: &str = "/secrets/tls";

/// The volumes holding the encryption keys of the cluster's own store and of a `fromBackup`
/// source: the whole Secret, one file per key, at `/<volume>/<key>`.
const BACKUP_KEY: &str = "backup-key";
const BOOTSTRAP_KEY: &str = "bootstrap-key";

/// The key of an encryption-key Secret that encrypts when the spec names none.
pub const DEFAULT_KEY_ID: &str = "key";

/// The keys of the encryption-key Secrets, by name (read from the API server by the
/// reconciler): the cluster's own store's with the encrypting one first, and the `fromBackup`
/// source's. They reach the agent as `id=path` lists in its environment
/// (`PGPILOT_BACKUP_ENCRYPTION_KEY_FILES`, `PGPILOT_BOOTSTRAP_ENCRYPTION_KEY_FILES`), so a key
/// added to the Secret changes the pods' template and reaches them by a rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyIds {
    pub backup: Vec<String>,
    pub bootstrap: Vec<String>,
}

impl KeyIds {
    /// Orders a Secret's key names: `current` first, the others sorted.
    pub fn ordered(mut names: Vec<String>, current: &str) -> Vec<String> {
        names.sort();
        if let Some(i) = names.iter().position(|n| n == current) {
            let c = names.remove(i);
            names.insert(0, c);
        }
        names
    }
}

fn key_files(volume: &str, ids: &[String]) -> String {
    ids.iter()
        .map(|id| format!("{id}=/{volume}/{id}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The prefix of the `fromBackup` credentials Secret's keys in the agent's environment (beside
/// the cluster's own store credentials, unprefixed).
pub const BOOTSTRAP_ENV_PREFIX: &str = "PGPILOT_BOOTSTRAP_";

fn statefulset(
    pc: &PostgresCluster,
    shard: &str,
    secrets: &SecretRefs,
    opts: &Options,
    rev: &str,
) -> Value {
    let mut sts = statefulset_inner(pc, shard, secrets, opts);
    sts["spec"]["template"]["metadata"]["labels"][LABEL_REVISION] = json!(rev);
    sts
}

fn statefulset_inner(
    pc: &PostgresCluster,
    shard: &str,
    secrets: &SecretRefs,
    opts: &Options,
) -> Value {
    let name = pc.name_any();
    let n = Names { cluster: &name };
    let major = pc.spec.postgres_version;
    let agent_image = pc
        .spec
        .agent_image
        .clone()
        .unwrap_or_else(|| opts.agent_image.clone());
    let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
    let env = json!([
        {"name": "POD_NAME", "valueFrom": field("metadata.name")},
        {"name": "POD_NAMESPACE", "valueFrom": field("metadata.namespace")},
        {"name": "POD_IP", "valueFrom": field("status.podIP")},
        {"name": "PGPILOT_CONFIG", "value": "/config/pgpilot.toml"},
        {"name": "PGPILOT_DATA_DIR", "value": "/data/pg"},
        {"name": "PGPILOT_STATE_DIR", "value": "/data"},
        {"name": "PGPILOT_POSTGRES_PORT", "value": "5432"},
        {"name": "PGPILOT_POSTGRES_LISTEN_ADDRESSES", "value": "$(POD_IP)"},
        {"name": "PGPILOT_API_LISTEN", "value": format!("$(POD_IP):{API_PORT}")},
        {"name": "PGPILOT_API_LOOPBACK_LISTEN", "value": format!("$(POD_IP):{LOOPBACK_PORT}")},
        {"name": "PGPILOT_API_URL", "value": format!("http://$(POD_IP):{LOOPBACK_PORT}")},
        {"name": "PGPILOT_PG_BIN_DIR", "value": opts.pg_bin_dir.replace("{major}", &major.to_string())},
        {"name": "PGPILOT_API_TOKEN_FILE", "value": "/secrets/token/token"},
        {"name": "PGPILOT_SUPERUSER_PASSWORD_FILE", "value": "/secrets/superuser/password"},
        {"name": "PGPILOT_REPLICATION_PASSWORD_FILE", "value": "/secrets/replication/password"},
    ]);
    // Each credential mounted as a file under a fixed name, whichever Secret and key hold it.
    // Secret files are never readable by every user: the agent refuses those (docs/security.md).
    let secret_volume = |vol: &str, (secret, key): &(String, String), file: &str| json!({"name": vol, "secret": {"secretName": secret, "defaultMode": SECRET_FILE_MODE, "items": [{"key": key, "path": file}]}});
    let mut volumes = vec![
        json!({"name": "config", "configMap": {"name": n.config(shard)}}),
        json!({"name": "pgpilot-bin", "emptyDir": {}}),
        secret_volume("token", &secrets.token, "token"),
        secret_volume("superuser", &secrets.superuser, "password"),
        secret_volume("replication", &secrets.replication, "password"),
    ];
    let mut mounts = vec![
        json!({"name": "data", "mountPath": "/data"}),
        json!({"name": "config", "mountPath": "/config"}),
        json!({"name": "pgpilot-bin", "mountPath": "/pgpilot/bin"}),
        json!({"name": "token", "mountPath": "/secrets/token"}),
        json!({"name": "superuser", "mountPath": "/secrets/superuser"}),
        json!({"name": "replication", "mountPath": "/secrets/replication"}),
    ];
    // Each store's Secrets: credentials as environment (the source's under a prefix), the key
    // mounted where the agent config says.
    let mut env_from: Vec<Value> = Vec::new();
    let stores = [
        pc.spec.backup.as_ref().map(|b| {
            (
                None,
                &b.credentials_secret,
                &b.encryption_key_secret,
                BACKUP_KEY,
            )
        }),
        pc.spec.from_backup().map(|fb| {
            (
                Some(BOOTSTRAP_ENV_PREFIX),
                &fb.credentials_secret,
                &fb.encryption_key_secret,
                BOOTSTRAP_KEY,
            )
        }),
    ];
    let env = {
        let mut env = env;
        let list = env.as_array_mut().expect("env list");
        for (var, volume, ids) in [
            (
                "PGPILOT_BACKUP_ENCRYPTION_KEY_FILES",
                BACKUP_KEY,
                &secrets.keys.backup,
            ),
            (
                "PGPILOT_BOOTSTRAP_ENCRYPTION_KEY_FILES",
                BOOTSTRAP_KEY,
                &secrets.keys.bootstrap,
            ),
        ] {
            if !ids.is_empty() {
                list.push(json!({"name": var, "value": key_files(volume, ids)}));
            }
        }
        env
    };
    for (prefix, creds, key, volume) in stores.into_iter().flatten() {
        if let Some(creds) = creds {
            let mut from = json!({"secretRef": {"name": creds}});
            if let Some(p) = prefix {
                from["prefix"] = json!(p);
            }
            env_from.push(from);
        }
        if let Some(key) = key {
            volumes.push(json!({"name": volume, "secret": {"secretName": key, "defaultMode": SECRET_FILE_MODE}}));
            mounts.push(json!({"name": volume, "mountPath": format!("/{volume}")}));
        }
    }
    let tls = crate::tls::agent_secret(pc);
    let mut env = env;
    if let Some(secret) = &tls {
        volumes.push(json!({"name": "tls", "secret": {"secretName": secret, "defaultMode": SECRET_FILE_MODE}}));
        mounts.push(json!({"name": "tls", "mountPath": TLS_DIR}));
        let list = env.as_array_mut().expect("env list");
        for (var, file) in [
            ("PGPILOT_TLS_CERT_FILE", "tls.crt"),
            ("PGPILOT_TLS_KEY_FILE", "tls.key"),
            ("PGPILOT_TLS_CA_FILE", "ca.crt"),
        ] {
            list.push(json!({"name": var, "value": format!("{TLS_DIR}/{file}")}));
        }
    }
    // The kubelet's probes speak HTTPS without a client certificate (the open routes).
    let scheme = if tls.is_some() { "HTTPS" } else { "HTTP" };
    let mut container = json!({
        "name": "postgres",
        "image": pc.spec.image(),
        "command": ["/pgpilot/bin/pgpilot-agent", "run"],
        "env": env,
        "envFrom": env_from,
        "ports": [{"name": "postgres", "containerPort": 5432}, {"name": "agent", "containerPort": API_PORT}],
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": API_PORT, "scheme": scheme}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": API_PORT, "scheme": scheme}, "periodSeconds": 10, "failureThreshold": 6},
        "lifecycle": {"preStop": {"exec": {"command": [
            "/pgpilot/bin/pgpilot-agent", "drain", "--wait", "--timeout", opts.drain_timeout_secs.to_string()]}}},
        "securityContext": CONTAINER_SECURITY.clone(),
    });
    if let Some(r) = &pc.spec.resources {
        container["resources"] = serde_json::to_value(r).expect("resources");
    }
    let sel = json!({LABEL_CLUSTER: name, LABEL_SHARD: shard});
    let mut claim = json!({"metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": pc.spec.storage.size}}}});
    if let Some(class) = &pc.spec.storage.storage_class_name {
        claim["spec"]["storageClassName"] = json!(class);
    }
    let retain = if pc.spec.storage.delete_with_cluster {
        "Delete"
    } else {
        "Retain"
    };
    let template = json!({
        "metadata": {"labels": labels(&name, Some(shard))},
        "spec": {
            "serviceAccountName": n.agent(),
            "terminationGracePeriodSeconds": opts.drain_timeout_secs + 30,
            // Everything runs as the image's postgres user; the volumes (the claim, the Secrets
            // at 0440) belong to its group.
            "securityContext": {
                "runAsNonRoot": true,
                "runAsUser": opts.postgres_uid,
                "runAsGroup": opts.postgres_uid,
                "fsGroup": opts.postgres_uid,
                "fsGroupChangePolicy": "OnRootMismatch",
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "initContainers": [{
                "name": "install-agent",
                "image": agent_image,
                "command": ["pgpilot-agent", "install", "/pgpilot/bin"],
                "volumeMounts": [{"name": "pgpilot-bin", "mountPath": "/pgpilot/bin"}],
                "securityContext": CONTAINER_SECURITY.clone(),
            }],
            "containers": [container],
            "volumes": volumes,
        },
    });
    json!({"spec": {
        "replicas": pc.spec.instances_per_shard,
        "serviceName": n.shard(shard),
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "OnDelete"},
        "persistentVolumeClaimRetentionPolicy": {"whenDeleted": retain, "whenScaled": "Retain"},
        "selector": {"matchLabels": sel},
        "template": template,
        "volumeClaimTemplates": [claim],
    }})
}

/// Every container of the agents' pods: a read-only root filesystem (Postgres and the agent
/// write only to the claim at /data), no capabilities, no privilege escalation.
static CONTAINER_SECURITY: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| {
    json!({
        "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
    })
});

/// The mode of Secret volume files in the agents' pods (0440): never readable by every user,
/// which the agent refuses.
pub const SECRET_FILE_MODE: u32 = 0o440;

/// The cluster's revision: what every pod should run. A hash of the pod template of shard-0
/// (every shard's template differs only by names) and of the restart-only parameters, 10 hex
/// characters. A new image, agent image, resources, Secrets layout or operator version that
/// changes the template, or a restart-only parameter, is a new revision; a reloadable
/// parameter is not.
pub fn revision(pc: &PostgresCluster, secrets: &SecretRefs, opts: &Options) -> String {
    let mut probe = statefulset_template_without_revision(pc, secrets, opts);
    let restart: BTreeMap<&String, &String> = pc
        .spec
        .parameters
        .iter()
        .filter(|(k, _)| RESTART_PARAMETERS.contains(&k.as_str()))
        .collect();
    probe["restartParameters"] = json!(restart);
    use sha2::Digest;
    let digest = sha2::Sha256::digest(probe.to_string().as_bytes());
    digest[..5].iter().map(|b| format!("{b:02x}")).collect()
}

fn statefulset_template_without_revision(
    pc: &PostgresCluster,
    secrets: &SecretRefs,
    opts: &Options,
) -> Value {
    let mut sts = statefulset_inner(pc, "shard-0", secrets, opts);
    sts["spec"]["template"].take()
}

/// A stable hash of an object's desired content (its JSON, keys sorted by serde_json's map).
pub fn content_hash(v: &Value) -> String {
    let mut h = std::hash::DefaultHasher::new();
    v.to_string().hash(&mut h);
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> PostgresCluster {
        let mut pc: PostgresCluster = serde_json::from_value(json!({
            "apiVersion": "pgpilot.io/v1alpha1", "kind": "PostgresCluster",
            "metadata": {"name": "orders", "namespace": "db", "uid": "u-1"},
            "spec": {"postgresVersion": 17, "shards": 2, "instancesPerShard": 3,
                "storage": {"size": "1Gi"}, "parameters": {"max_connections": "300"},
                "backup": {"store": "s3://b/orders", "compression": "zstd",
                    "retention": {"keepLast": 3, "keepWithin": "7d"}}}
        }))
        .unwrap();
        pc.metadata.uid = Some("u-1".into());
        pc
    }

    #[test]
    fn two_shards_make_the_workloads_of_each() {
        let d = desired(&cluster(), &Options::default(), &SecretRefs::of(&cluster()));
        let names: Vec<String> = d.iter().map(|o| format!("{}/{}", o.kind, o.name)).collect();
        for want in [
            "ServiceAccount/orders-agent",
            "Role/orders-agent",
            "RoleBinding/orders-agent",
            "ConfigMap/orders-shard-0-config",
            "Service/orders-shard-0",
            "Service/orders-shard-0-rw",
            "Service/orders-shard-0-ro",
            "PodDisruptionBudget/orders-shard-0",
            "StatefulSet/orders-shard-0",
            "StatefulSet/orders-shard-1",
        ] {
            assert!(names.contains(&want.to_string()), "{want} in {names:?}");
        }
        let sts = d
            .iter()
            .find(|o| o.kind == "StatefulSet" && o.name == "orders-shard-1")
            .unwrap();
        let spec = &sts.body["spec"];
        assert_eq!(spec["replicas"], 3);
        assert_eq!(spec["updateStrategy"]["type"], "OnDelete");
        assert_eq!(spec["selector"]["matchLabels"][LABEL_SHARD], "shard-1");
        assert_eq!(sts.body["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert!(sts.body["metadata"]["annotations"][DESIRED_HASH].is_string());
        let rw = d.iter().find(|o| o.name == "orders-shard-0-rw").unwrap();
        assert_eq!(rw.body["spec"]["selector"][LABEL_ROLE], "primary");
    }

    #[test]
    fn the_agent_config_names_the_shard_and_carries_parameters_and_store() {
        let c = agent_config(&cluster(), "shard-1", &Options::default());
        for line in [
            "name = \"orders\"",
            "shard = \"shard-1\"",
            "max_connections = \"300\"",
            "store = \"s3://b/orders\"",
            "compression = \"zstd\"",
            "[backup.retention]\nkeep_last = 3\nkeep_within = \"7d\"",
            "mode = \"on\"",
        ] {
            assert!(c.contains(line), "{line} in\n{c}");
        }
    }

    #[test]
    fn from_backup_renders_the_source_with_its_own_key_and_prefixed_credentials() {
        let mut pc = cluster();
        pc.spec.bootstrap = Some(serde_json::from_value(json!({"fromBackup": {
            "store": "s3://old/archive", "cluster": "orders-old", "targetTime": "2026-12-05T10:00:00Z",
            "credentialsSecret": "old-s3", "encryptionKeySecret": "old-key"}})).unwrap());
        let c = agent_config(&pc, "shard-0", &Options::default());
        for line in [
            "[bootstrap]\ncluster = \"orders-old\"\ntarget_time = \"2026-12-05T10:00:00Z\"",
            "[bootstrap.store]\nstore = \"s3://old/archive\"\ncredentials_env_prefix = \"PGPILOT_BOOTSTRAP_\"",
        ] {
            assert!(c.contains(line), "{line} in\n{c}");
        }
        let d = desired(&pc, &Options::default(), &SecretRefs::of(&pc));
        let sts = d.iter().find(|o| o.kind == "StatefulSet").unwrap();
        let container = &sts.body["spec"]["template"]["spec"]["containers"][0];
        assert!(
            container["envFrom"].as_array().unwrap().contains(
                &json!({"prefix": BOOTSTRAP_ENV_PREFIX, "secretRef": {"name": "old-s3"}})
            ),
            "{container}"
        );
        assert!(
            container["volumeMounts"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "bootstrap-key", "mountPath": "/bootstrap-key"}))
        );
        assert!(
            container["env"].as_array().unwrap().contains(&json!({
                "name": "PGPILOT_BOOTSTRAP_ENCRYPTION_KEY_FILES", "value": "key=/bootstrap-key/key"}))
        );
    }

    #[test]
    fn every_key_of_the_secret_decrypts_and_the_named_one_encrypts() {
        let mut pc = cluster();
        pc.spec.backup = Some(
            serde_json::from_value(json!({"store": "s3://b/orders",
            "encryptionKeySecret": "orders-key", "encryptionKeyId": "2027"}))
            .unwrap(),
        );
        let one = SecretRefs::of(&pc);
        assert_eq!(
            one.keys.backup,
            ["2027"],
            "the spec's key until the Secret is read"
        );
        let keys = KeyIds {
            backup: KeyIds::ordered(vec!["key".into(), "2027".into(), "2025".into()], "2027"),
            bootstrap: Vec::new(),
        };
        let secrets = SecretRefs::of(&pc).with_keys(keys);
        let d = desired(&pc, &Options::default(), &secrets);
        let sts = d.iter().find(|o| o.kind == "StatefulSet").unwrap();
        let container = &sts.body["spec"]["template"]["spec"]["containers"][0];
        assert!(
            container["env"].as_array().unwrap().contains(&json!({
                "name": "PGPILOT_BACKUP_ENCRYPTION_KEY_FILES",
                "value": "2027=/backup-key/2027,2025=/backup-key/2025,key=/backup-key/key"})),
            "{container}"
        );
        // A key added to the Secret is a new revision: the pods get it by a rollout.
        assert_ne!(
            revision(&pc, &one, &Options::default()),
            revision(&pc, &secrets, &Options::default())
        );
        assert!(
            !agent_config(&pc, "shard-0", &Options::default()).contains("encryption_key_files")
        );
    }

    #[test]
    fn tls_by_default_a_secret_of_ones_own_or_none() {
        let container = |pc: &PostgresCluster| {
            let sts = statefulset(pc, "shard-0", &SecretRefs::of(pc), &Options::default(), "r");
            sts["spec"]["template"]["spec"]["containers"][0].clone()
        };
        let env_names = |c: &Value| -> Vec<String> {
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap().to_string())
                .collect()
        };
        // Default: the operator's Secret, HTTPS probes, the files in the environment, the
        // operator among the accepted client names.
        let mut pc = cluster();
        pc.metadata.namespace = Some("db".into());
        let c = container(&pc);
        assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
        assert!(env_names(&c).contains(&"PGPILOT_TLS_CERT_FILE".to_string()));
        let sts = statefulset(
            &pc,
            "shard-0",
            &SecretRefs::of(&pc),
            &Options::default(),
            "r",
        );
        let volumes = sts["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .clone();
        assert!(
            volumes
                .iter()
                .any(|v| v["secret"]["secretName"] == "orders-agent-tls"
                    && v["secret"]["defaultMode"] == SECRET_FILE_MODE)
        );
        let toml = agent_config(&pc, "shard-0", &Options::default());
        assert!(toml.contains("[tls]\nserver_name = \"orders.db.agents.pgpilot.internal\"\nclient_names = [\"orders.db.agents.pgpilot.internal\", \"pgpilot-operator\"]"), "{toml}");
        // A Secret of one's own (cert-manager): the token authenticates the operator.
        pc.spec.tls = Some(
            serde_json::from_value(json!({"mode": "secret", "secretName": "orders-cm"})).unwrap(),
        );
        let toml = agent_config(&pc, "shard-0", &Options::default());
        assert!(
            toml.contains("client_names = [\"orders.db.agents.pgpilot.internal\"]"),
            "{toml}"
        );
        let sts = statefulset(
            &pc,
            "shard-0",
            &SecretRefs::of(&pc),
            &Options::default(),
            "r",
        );
        assert!(sts.to_string().contains("\"secretName\":\"orders-cm\""));
        // Disabled: plain HTTP, no [tls], no TLS volume.
        pc.spec.tls = Some(serde_json::from_value(json!({"mode": "disabled"})).unwrap());
        let c = container(&pc);
        assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], "HTTP");
        assert!(!env_names(&c).contains(&"PGPILOT_TLS_CERT_FILE".to_string()));
        assert!(!agent_config(&pc, "shard-0", &Options::default()).contains("[tls]"));
        let mut bad = pc.spec.clone();
        bad.tls = Some(serde_json::from_value(json!({"mode": "secret"})).unwrap());
        assert!(
            bad.problems(None)
                .contains(&"spec.tls.mode secret needs spec.tls.secretName".to_string())
        );
    }

    #[test]
    fn the_hash_changes_with_the_content_only() {
        let a = desired(&cluster(), &Options::default(), &SecretRefs::of(&cluster()));
        let b = desired(&cluster(), &Options::default(), &SecretRefs::of(&cluster()));
        assert_eq!(a, b);
        let mut more = cluster();
        more.spec.instances_per_shard = 4;
        let c = desired(&more, &Options::default(), &SecretRefs::of(&more));
        let hash = |d: &[Desired], name: &str| {
            d.iter()
                .find(|o| o.kind == "StatefulSet" && o.name == name)
                .unwrap()
                .body["metadata"]["annotations"][DESIRED_HASH]
                .clone()
        };
        assert_ne!(hash(&a, "orders-shard-0"), hash(&c, "orders-shard-0"));
        let cm = |d: &[Desired]| {
            d.iter()
                .find(|o| o.kind == "ConfigMap")
                .unwrap()
                .body
                .clone()
        };
        assert_eq!(cm(&a), cm(&c));
    }
}
