//! The custom resources (shared/DESIGN.md, "Operator"): `PostgresCluster` and `PostgresBackup`,
//! group `pgpilot.io`, version `v1alpha1`. The CRDs are generated from these types
//! (`pgpilot-operator crds`, `make crds`) into `charts/pgpilot/crds/`; the doc comments become
//! the schema's descriptions. Rules a schema cannot carry on every API server (the test server
//! checks no `pattern`, minimum or CEL) are checked by the operator's admission
//! ([`PostgresClusterSpec::problems`]), which reports them as the `Ready=False, reason:
//! InvalidSpec` condition and builds nothing.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Databases every PostgreSQL has: never adopted, created or dropped through `spec.databases`.
pub const SYSTEM_DATABASES: &[&str] = &["postgres", "template0", "template1"];

/// PostgreSQL majors the agent runs (the server packages it is tested with).
pub const SUPPORTED_MAJORS: std::ops::RangeInclusive<u32> = 14..=18;

/// A sharded PostgreSQL cluster: `shards` independent shards, each one primary and
/// `instancesPerShard - 1` streaming replicas, each instance a pod whose Postgres is owned by
/// pgpilot-agent.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pgpilot.io",
    version = "v1alpha1",
    kind = "PostgresCluster",
    namespaced,
    status = "PostgresClusterStatus",
    shortname = "pgc",
    category = "pgpilot",
    printcolumn = r#"{"name":"Shards","type":"integer","jsonPath":".spec.shards"}"#,
    printcolumn = r#"{"name":"Instances","type":"integer","jsonPath":".spec.instancesPerShard"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Primaries","type":"string","jsonPath":".status.shards[*].primary"}"#,
    printcolumn = r#"{"name":"Rollout","type":"string","jsonPath":".status.rollout.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PostgresClusterSpec {
    /// PostgreSQL major version (14 to 18).
    pub postgres_version: u32,
    /// The Postgres container image; default `postgres:<postgresVersion>`. Any upstream image
    /// works: the agent is copied into the pod by an init container from `agentImage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The pgpilot-agent image; default `ghcr.io/pgpilot/agent:<operator version>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_image: Option<String>,
    /// Number of shards, named `shard-0` … `shard-<n-1>`. Shards cannot be removed.
    pub shards: u32,
    /// Instances per shard: one primary, the rest streaming replicas.
    #[serde(default = "default_instances")]
    #[schemars(range(min = 1))]
    pub instances_per_shard: u32,
    /// The data volume of every instance.
    pub storage: StorageSpec,
    /// Container resources of the Postgres container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// postgresql.conf parameters (values as strings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// Databases on every shard. Keyed by name: the agent adds the ones created with SQL
    /// (field manager `pgpilot-agent`), users own the ones they declare.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub databases: Vec<DatabaseSpec>,
    /// WAL archiving and base backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
    /// How a new cluster's data comes to be: `initdb` (default) or restored from a backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSpec>,
    /// How a new revision reaches the shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
    /// Existing Secrets to use instead of generated ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<SecretsSpec>,
    /// HTTPS and client certificates between the operator and the agents (docs/security.md).
    /// Default: the operator keeps a CA and the agents' certificate for the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Stop every action of the operator on this cluster (nothing is created, changed or
    /// deleted) until it is false again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

fn default_instances() -> u32 {
    2
}

/// The data volume of every instance.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each instance's volume, a Kubernetes quantity such as `50Gi`.
    pub size: String,
    /// The StorageClass; default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Delete the volumes when the cluster is deleted. Default false: volumes are kept (as
    /// CloudNativePG and StatefulSets do), and a cluster created again with the same name
    /// finds its data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delete_with_cluster: bool,
}

/// A database on every shard (docs/databases.md): created by each shard's primary agent where
/// it is missing, with this owner; never changed where it exists.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// The database's name, as written in SQL without quotes (any case, spaces or quotes).
    pub name: String,
    /// Owner role; default the superuser.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// `present` (default) or `absent`: only `absent` drops a database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensure: Option<Ensure>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Ensure {
    Present,
    Absent,
}

/// WAL archiving and base backups to an object store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Store URL: `s3://bucket/prefix`, `gs://…` or `az://…`.
    pub store: String,
    /// Secret whose keys are the store client's environment variables (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `GOOGLE_SERVICE_ACCOUNT_KEY`, `AZURE_STORAGE_ACCOUNT_KEY`, …;
    /// docs/storage.md), given to the agents as environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// `zstd` (default), `lz4`, `gzip` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// Secret holding the AES-256-GCM keys (32 bytes, or 64 hex characters, each): every key
    /// of the Secret decrypts, under its own name as key id; `encryptionKeyId` encrypts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_secret: Option<String>,
    /// The key of `encryptionKeySecret` that encrypts new objects (default `key`). To rotate,
    /// add a key to the Secret and name it here: objects written before stay readable with
    /// the keys kept beside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_id: Option<String>,
    /// Cron schedule of base backups of every shard (five fields, UTC, as a CronJob's), e.g.
    /// `0 3 * * *`: each run is a `PostgresBackup` named `<cluster>-<yyyymmddhhmm>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Lz4,
    Gzip,
    None,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// Keep this many newest base backups per shard (and the WAL they need). Applied by each
    /// shard's agent after every successful backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Also keep the backups that finished within this window (`7d`, `12h`, `2w`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<String>,
}

/// How a new cluster's data comes to be.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// Restore every shard from another cluster's store, to a point in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_backup: Option<FromBackupSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FromBackupSpec {
    /// The store the source cluster archives to.
    pub store: String,
    /// The source cluster's name in that store.
    pub cluster: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Secret holding the source's keys: every key of it decrypts, under its name as key id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_secret: Option<String>,
    /// Recovery target time (RFC 3339); default: the end of the archived WAL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_time: Option<String>,
}

/// How a new revision reaches the shards (canaries first, gates, halts).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RolloutMode>,
    /// Shards updated first, before the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_shards: Option<u32>,
    /// Manual mode, the gate: `<revision>` (as `status.rollout.targetRevision` shows it)
    /// releases the canary shards; `<revision>/all` releases the rest once they are done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
    /// How long an updated shard must stay healthy before the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak_seconds: Option<u32>,
    /// A replica lagging more than this counts as unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_replica_lag_bytes: Option<u64>,
    /// An updated pod not Ready this long after it was created halts the rollout (default
    /// 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_seconds: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutMode {
    Automatic,
    Manual,
}

/// TLS on the agents' API (port 8008).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// `operator` (default): the operator keeps a CA for the cluster (Secret `<cluster>-ca`)
    /// and the agents' certificate (Secret `<cluster>-agent-tls`), renewed 30 days before it
    /// ends, and presents a certificate of its own. `secret`: the agents use `secretName`
    /// (`tls.crt`, `tls.key`, `ca.crt`, as cert-manager writes them; the certificate must
    /// carry the DNS name `<cluster>.<namespace>.agents.pgpilot.internal`) and the operator
    /// authenticates with the API token. `disabled`: plain HTTP.
    #[serde(default)]
    pub mode: TlsMode,
    /// With `mode: secret`: the Secret holding the agents' certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Operator,
    Secret,
    Disabled,
}

/// Existing Secrets to use; each one absent is generated as `<cluster>-<what>`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretsSpec {
    /// Secret with `password`: the superuser's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superuser: Option<String>,
    /// Secret with `password`: the replication user's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<String>,
    /// Secret with `token`: the agents' API bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_token: Option<String>,
}

/// What the operator and the agents report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresClusterStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// What the agents see of `spec.databases` and of each shard's catalog.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub databases: Vec<DatabaseStatus>,
    /// `Ready`, `Progressing`, `Degraded`, `DatabasesInSync`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The time (RFC 3339) of the last scheduled backup run created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled_backup: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// `shard-<n>`.
    pub name: String,
    /// The pod labelled primary (it holds the shard's Lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    pub ready_instances: u32,
    pub instances: u32,
    /// The revision of the shard's pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// `Pending`, `Healthy` (every instance ready, one primary) or `Degraded`.
    pub phase: String,
    /// Parameters changed in the spec that the shard's Postgres applies only after a restart
    /// (reported by its agents); the restart itself is a rollout's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_restart: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// `Idle`, `Pending`, `WaitingForRelease`, `InProgress`, `Halted`, `Complete`.
    pub phase: String,
    /// The revision being rolled out (`pgpilot.io/revision` of the pod template): what
    /// `spec.rollout.release` names in Manual mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_revision: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completed_shards: Vec<String>,
    /// The shard being rolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_shard: Option<String>,
    /// What the rollout does or waits for now, in words (`drain pod orders-shard-0-1`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Why it halted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The current shard's primary as the rollout left it: another one means a failover
    /// happened, and the rollout halts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_primary: Option<String>,
    /// The rollout's own switchover in flight: the primary it moves away from, and when it
    /// began (RFC 3339). Until the pods' role labels follow, that primary is expected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover_from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover_at: Option<String>,
    /// When the current shard's soak began (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak_started: Option<String>,
    /// Manual mode: the canary shards were released for this revision.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canaries_released: bool,
    /// The spec generation a halt happened at: it resumes once the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted_generation: Option<i64>,
}

/// A database as the shards' primary agents see it (docs/databases.md). Written by the agents
/// with server-side apply on the status subresource, one field manager per shard
/// (`pgpilot-agent-<shard>`), each owning its own item of `shards`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseStatus {
    pub name: String,
    /// `Declared` (a user's entry in `spec.databases`), `AdoptedFromSQL` (the agent's entry:
    /// created with SQL, then adopted) or `Undeclared` (exists in SQL; a user removed its entry,
    /// so it is left alone and not adopted again).
    pub origin: String,
    /// The owner the entry declares (default: the superuser).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Each shard's view, written by that shard's primary agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["shard"]))]
    pub shards: Vec<DatabaseShardStatus>,
}

/// One shard's view of a database.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseShardStatus {
    /// `shard-<n>`.
    pub shard: String,
    /// `Present`, `Missing` (it was on this shard and is gone: dropped with SQL; re-created
    /// only when a user declares it) or `Failed` (could not be created or dropped: `message`).
    pub state: String,
    /// Its owner on this shard (never changed by pgpilot: a difference from the declared owner
    /// is drift, reported here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl DatabaseStatus {
    /// The shards' items not as declared: missing, failed, or present with another owner
    /// than the declared one (drift, as the agents' and the operator's gauges count it).
    pub fn drifted(&self) -> impl Iterator<Item = &DatabaseShardStatus> {
        self.shards
            .iter()
            .filter(|s| s.state != "Present" || (self.owner.is_some() && s.owner != self.owner))
    }

    /// The shards where it exists now.
    pub fn present_on(&self) -> impl Iterator<Item = &str> {
        self.shards
            .iter()
            .filter(|s| s.state == "Present")
            .map(|s| s.shard.as_str())
    }
}

/// A condition in the Kubernetes shape.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// An on-demand base backup of one shard or of all.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pgpilot.io",
    version = "v1alpha1",
    kind = "PostgresBackup",
    namespaced,
    status = "PostgresBackupStatus",
    shortname = "pgb",
    category = "pgpilot",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PostgresBackupSpec {
    /// The PostgresCluster (same namespace).
    pub cluster: String,
    /// One shard (`shard-<n>`); default every shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresBackupStatus {
    /// `Pending`, `Running`, `Completed`, `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardBackupStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardBackupStatus {
    pub shard: String,
    /// `Running`, `Completed`, `Failed`.
    pub phase: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// The pod that takes it: a ready replica when the shard has one, else the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// `primary` or `replica`: the instance's role when the backup started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PostgresClusterSpec {
    /// How the agents' API is secured (`spec.tls`, defaulted).
    pub fn tls_mode(&self) -> TlsMode {
        self.tls.as_ref().map(|t| t.mode).unwrap_or_default()
    }

    /// `bootstrap.fromBackup`, when given.
    pub fn from_backup(&self) -> Option<&FromBackupSpec> {
        self.bootstrap.as_ref()?.from_backup.as_ref()
    }

    /// What is wrong with this spec, one sentence each naming the field; empty when valid.
    /// `previous_shards`: the shard count already built (shards cannot be removed).
    pub fn problems(&self, previous_shards: Option<u32>) -> Vec<String> {
        let mut out = Vec::new();
        if !SUPPORTED_MAJORS.contains(&self.postgres_version) {
            out.push(format!(
                "spec.postgresVersion {} is not supported (use {} to {})",
                self.postgres_version,
                SUPPORTED_MAJORS.start(),
                SUPPORTED_MAJORS.end()
            ));
        }
        if self.shards == 0 {
            out.push("spec.shards must be at least 1".into());
        }
        if let Some(before) = previous_shards
            && self.shards < before
        {
            out.push(format!(
                "spec.shards cannot shrink ({before} → {}): a shard's data would be lost; delete the cluster instead",
                self.shards
            ));
        }
        if self.instances_per_shard == 0 {
            out.push("spec.instancesPerShard must be at least 1".into());
        }
        if let Some(t) = &self.tls {
            match (t.mode, &t.secret_name) {
                (TlsMode::Secret, None) => {
                    out.push("spec.tls.mode secret needs spec.tls.secretName".into())
                }
                (TlsMode::Operator | TlsMode::Disabled, Some(_)) => {
                    out.push("spec.tls.secretName is used only with spec.tls.mode secret".into())
                }
                _ => {}
            }
        }
        if let Err(e) = parse_quantity(&self.storage.size) {
            out.push(format!("spec.storage.size {:?}: {e}", self.storage.size));
        }
        if let Some(b) = &self.backup {
            if let Err(e) = check_store_url(&b.store) {
                out.push(format!("spec.backup.store {:?}: {e}", b.store));
            }
            if let Some(s) = &b.schedule
                && let Err(e) = crate::schedule::Schedule::parse(s)
            {
                out.push(format!("spec.backup.schedule {e}"));
            }
            if let Some(r) = &b.retention {
                if r.keep_last == Some(0) {
                    out.push("spec.backup.retention.keepLast: at least 1".into());
                }
                if let Some(w) = &r.keep_within
                    && let Err(e) = crate::schedule::parse_duration(w)
                {
                    out.push(format!("spec.backup.retention.keepWithin {e}"));
                }
            }
        }
        if let Some(fb) = self.from_backup() {
            if self.backup.is_none() {
                out.push(
                    "spec.bootstrap.fromBackup needs spec.backup: a restored cluster archives from its first moment, and fetches the source's WAL through its own store settings (the source's store will do: each cluster writes under its own name)"
                        .into(),
                );
            }
            if let Err(e) = check_store_url(&fb.store) {
                out.push(format!(
                    "spec.bootstrap.fromBackup.store {:?}: {e}",
                    fb.store
                ));
            }
            if fb.cluster.is_empty() || fb.cluster.contains('/') {
                out.push(format!(
                    "spec.bootstrap.fromBackup.cluster {:?}: the source cluster's name, without '/'",
                    fb.cluster
                ));
            }
            if let Some(t) = &fb.target_time
                && t.parse::<jiff::Timestamp>().is_err()
            {
                out.push(format!(
                    "spec.bootstrap.fromBackup.targetTime {t:?}: not an RFC 3339 time with a zone (2026-12-05T10:00:00Z)"
                ));
            }
        }
        for (i, d) in self.databases.iter().enumerate() {
            if d.name.is_empty() || d.name.len() > 63 || d.name.contains('\0') {
                out.push(format!(
                    "spec.databases[{i}].name {:?}: 1 to 63 bytes, no NUL",
                    d.name
                ));
            }
            if SYSTEM_DATABASES.contains(&d.name.as_str()) {
                out.push(format!(
                    "spec.databases[{i}].name {:?}: PostgreSQL's own database, not managed here",
                    d.name
                ));
            }
        }
        for name in self.parameters.keys() {
            if !is_parameter_name(name) {
                out.push(format!(
                    "spec.parameters: {name:?} is not a PostgreSQL parameter name"
                ));
            }
        }
        out
    }

    /// The Postgres image to run.
    pub fn image(&self) -> String {
        self.image
            .clone()
            .unwrap_or_else(|| format!("postgres:{}", self.postgres_version))
    }

    /// Shard names, `shard-0` … .
    pub fn shard_names(&self) -> Vec<String> {
        (0..self.shards).map(|i| format!("shard-{i}")).collect()
    }
}

/// A PostgreSQL parameter name as the agent accepts it: lower case letters, digits, `_` and
/// `.` (the agent's config and `spec.parameters` share this rule).
pub fn is_parameter_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
}

/// Bytes of a Kubernetes quantity (`50Gi`, `500M`, `1e9`), or why it is not one.
pub fn parse_quantity(q: &str) -> Result<u64, String> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| "not a quantity (a number with an optional suffix such as Gi)".to_string())?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        other => {
            return Err(format!(
                "unknown suffix {other:?} (use Ki, Mi, Gi, Ti or k, M, G, T)"
            ));
        }
    };
    let bytes = n * mult;
    if bytes < 1.0 {
        return Err("must be at least one byte".into());
    }
    Ok(bytes as u64)
}

/// A store URL a cluster's agents can use: `s3://`, `gs://` or `az://`, with a bucket. Not
/// `file://`: the pods mount no volume at its path and their root filesystem is read-only
/// (a standalone agent takes `file://`).
pub fn check_store_url(url: &str) -> Result<(), String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("not a URL (expected s3://bucket/prefix, gs://… or az://…)".into());
    };
    if scheme == "file" {
        return Err(
            "a file:// store is not supported in a cluster: its pods mount no volume at that \
             path and their root filesystem is read-only; use s3://, gs:// or az://"
                .into(),
        );
    }
    if !matches!(scheme, "s3" | "gs" | "az") {
        return Err(format!("unknown scheme {scheme:?} (use s3, gs or az)"));
    }
    if rest.trim_matches('/').is_empty() {
        return Err("names no bucket or path".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PostgresClusterSpec {
        serde_json::from_value(serde_json::json!({
            "postgresVersion": 17, "shards": 2, "storage": {"size": "1Gi"}
        }))
        .unwrap()
    }

    #[test]
    fn a_minimal_spec_is_valid_with_defaults() {
        let s = spec();
        assert_eq!(s.instances_per_shard, 2);
        assert_eq!(s.image(), "postgres:17");
        assert_eq!(s.shard_names(), ["shard-0", "shard-1"]);
        assert!(s.problems(None).is_empty(), "{:?}", s.problems(None));
    }

    #[test]
    fn a_restored_cluster_needs_a_store_of_its_own() {
        let mut s = spec();
        s.bootstrap = Some(
            serde_json::from_value(serde_json::json!({"fromBackup": {
                "store": "s3://b/orders", "cluster": "orders"}}))
            .unwrap(),
        );
        let p = s.problems(None).join("\n");
        assert!(
            p.contains("spec.bootstrap.fromBackup needs spec.backup"),
            "{p}"
        );
        s.backup =
            Some(serde_json::from_value(serde_json::json!({"store": "s3://b/orders"})).unwrap());
        assert!(s.problems(None).is_empty(), "{:?}", s.problems(None));
    }

    #[test]
    fn every_problem_names_its_field() {
        let mut s = spec();
        s.postgres_version = 9;
        s.storage.size = "lots".into();
        s.shards = 1;
        s.parameters.insert("Max Connections".into(), "1".into());
        s.backup = Some(BackupSpec {
            store: "ftp://x".into(),
            credentials_secret: None,
            compression: None,
            encryption_key_secret: None,
            encryption_key_id: None,
            schedule: Some("daily".into()),
            retention: Some(RetentionSpec {
                keep_last: Some(0),
                keep_within: Some("a fortnight".into()),
            }),
        });
        let p = s.problems(Some(2)).join("\n");
        for words in [
            "spec.postgresVersion 9",
            "spec.storage.size \"lots\"",
            "spec.shards cannot shrink (2 → 1)",
            "spec.backup.store \"ftp://x\": unknown scheme",
            "spec.backup.schedule \"daily\"",
            "spec.backup.retention.keepLast: at least 1",
            "spec.backup.retention.keepWithin \"a fortnight\"",
            "\"Max Connections\" is not a PostgreSQL parameter",
        ] {
            assert!(p.contains(words), "{words:?} missing in:\n{p}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_quantity("500M").unwrap(), 500_000_000);
        assert!(
            parse_quantity("1Gb")
                .unwrap_err()
                .contains("unknown suffix")
        );
        assert!(parse_quantity("").is_err());
    }

    #[test]
    fn the_crd_carries_the_list_map_and_the_status_subresource() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(PostgresCluster::crd()).unwrap();
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["subresources"]["status"], serde_json::json!({}));
        let db = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["databases"];
        assert_eq!(db["x-kubernetes-list-type"], "map");
        assert_eq!(
            db["x-kubernetes-list-map-keys"],
            serde_json::json!(["name"])
        );
        let desc = v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["postgresVersion"]["description"]
            .as_str()
            .unwrap();
        assert!(desc.contains("major version"), "{desc}");
    }
}
