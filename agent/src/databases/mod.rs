//! Catalog to resource sync (docs/databases.md; shared/DESIGN.md, "Catalog to CR sync"). On
//! the shard's primary, once per `[kubernetes] catalog_interval_secs`:
//!
//! 1. Read `pg_database` (one small query on the monitoring connection) and the
//!    `PostgresCluster`. When neither changed since the last round that left nothing to do,
//!    stop there: a steady cluster costs one query and one GET per interval, and no write.
//! 2. Decide ([`plan::plan`], pure): adopt the databases made with SQL, create the declared
//!    ones missing here, drop the `ensure: absent` ones, let go of entries a user now declares.
//! 3. Act on Postgres, then write `spec.databases` with server-side apply as field manager
//!    `pgpilot-agent` (the agent's entries only, guarded by the resourceVersion it read, so
//!    two shards adopting at once cannot erase each other's entries), then this shard's items
//!    of `status.databases` (field manager `pgpilot-agent/<shard>`), then Events.
//!
//! Only a running primary that holds the shard's Lease writes, and it checks again before
//! each write: a replica, a fenced primary or a primary of a deleted cluster writes nothing.
//! Every round starts from what it reads, so a round that fails (Postgres or the API server
//! unreachable, a 409) loses nothing: the next one, after a backoff, does it again.
//!
//! Roles fit the same loop later: another catalog query, another list in the spec and the
//! status, the same plan rules.

pub mod plan;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use pgpilot_common::crd::{DatabaseStatus, PostgresCluster, SYSTEM_DATABASES};
use pgpilot_common::state::{AgentState, Role};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::core::Handle;
use crate::postgres::sql;
use crate::replication::lease::{KubeLeadership, timed};
use plan::{Entry, Failures, Observed, Plan};

/// The field manager of the agents' `spec.databases` entries.
pub const SPEC_MANAGER: &str = "pgpilot-agent";

/// The longest pause between two rounds after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The field manager of one shard's items in `status.databases`.
pub fn status_manager(shard: &str) -> String {
    format!("{SPEC_MANAGER}/{shard}")
}

/// Runs catalog sync until `shutdown`.
pub async fn run(
    handle: Handle,
    lead: Arc<KubeLeadership>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut sync = Sync {
        handle,
        lead,
        settled: None,
    };
    let mut failures = 0u32;
    loop {
        let delay = match failures {
            0 => interval,
            n => (interval * 2u32.pow(n.min(6))).min(MAX_BACKOFF.max(interval)),
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        match sync.round().await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!("catalog sync works again");
                }
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                sync.settled = None;
                sync.handle.ctx.metrics.catalog.failures.inc();
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(
                        failures,
                        "catalog sync: {e:#}; trying again after a backoff"
                    );
                }
            }
        }
    }
}

struct Sync {
    handle: Handle,
    lead: Arc<KubeLeadership>,
    /// What the last round read when it found nothing to do: the same again means the same
    /// answer.
    settled: Option<(BTreeMap<String, String>, String)>,
}

impl Sync {
    /// This agent may write: its Postgres is the running primary and it holds the Lease.
    fn leading(&self) -> bool {
        matches!(
            self.handle.state(),
            AgentState::Running {
                role: Role::Primary
            }
        ) && self.lead.holds()
    }

    fn still_leading(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.leading(),
            "no longer the shard's leading primary: this round writes nothing more"
        );
        Ok(())
    }

    fn cfg(&self) -> &crate::config::Config {
        &self.handle.ctx.cfg
    }

    fn api(&self) -> Api<PostgresCluster> {
        Api::namespaced(self.lead.client.clone(), &self.lead.settings.namespace)
    }

    async fn round(&mut self) -> anyhow::Result<()> {
        if !self.leading() {
            self.settled = None;
            return Ok(());
        }
        let local = self.catalog().await?;
        let name = self.cfg().cluster.name.clone();
        let Some(pc) = timed(self.api().get_opt(&name)).await? else {
            // The resource is gone (or never was): nothing to sync with.
            tracing::debug!(cluster = %name, "no PostgresCluster: catalog sync waits");
            return Ok(());
        };
        if pc.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let rv = pc.resource_version().unwrap_or_default();
        let seen = (local, rv);
        if self.settled.as_ref() == Some(&seen) {
            return Ok(());
        }
        let (local, rv) = seen;
        let entries = entries(&pc);
        let status: Vec<DatabaseStatus> = pc
            .status
            .as_ref()
            .map(|s| s.databases.clone())
            .unwrap_or_default();
        let shard = self.cfg().cluster.shard.clone();
        let o = Observed {
            shard: &shard,
            superuser: &self.cfg().superuser,
            local: &local,
            entries: &entries,
            status: &status,
        };
        let p = plan::plan(&o);
        let failed = self.act(&pc, &o, &p).await?;
        if p.writes_spec() {
            self.write_spec(&pc, &p, &rv).await?;
        }
        let report = plan::report(&o, &p, &failed);
        let metrics = &self.handle.ctx.metrics.catalog;
        metrics.drift.set(plan::drift(&report) as i64);
        let wrote_status = report != plan::mine_in(&status, &shard);
        if wrote_status {
            self.still_leading()?;
            let body = json!({
                "apiVersion": "pgpilot.io/v1alpha1",
                "kind": "PostgresCluster",
                "metadata": {"name": name},
                "status": if report.is_empty() { json!({}) } else { json!({"databases": report}) },
            });
            timed(self.api().patch_status(
                &name,
                &PatchParams::apply(&status_manager(&shard)).force(),
                &Patch::Apply(&body),
            ))
            .await
            .context("writing this shard's status.databases")?;
        }
        let idle = p.create.is_empty()
            && p.drop.is_empty()
            && !p.writes_spec()
            && failed.is_empty()
            && !wrote_status;
        self.settled = idle.then_some((local, rv));
        Ok(())
    }

    /// This shard's databases, without PostgreSQL's own and without any left invalid by an
    /// interrupted DROP DATABASE (`datconnlimit = -2`). A database being created is not
    /// there yet: its row is visible only once CREATE DATABASE commits.
    async fn catalog(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let client = self
            .handle
            .ctx
            .monitor
            .client()
            .await
            .context("connecting to Postgres")?;
        let rows = client
            .query(
                "SELECT datname, pg_get_userbyid(datdba) FROM pg_database \
                 WHERE datconnlimit <> -2 AND NOT (datname::text = ANY($1::text[]))",
                &[&SYSTEM_DATABASES],
            )
            .await
            .context("reading pg_database")?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Creates and drops what the plan says, each with its Event; returns what failed.
    async fn act(
        &self,
        pc: &PostgresCluster,
        o: &Observed<'_>,
        p: &Plan,
    ) -> anyhow::Result<Failures> {
        let mut failed = Failures::new();
        let shard = o.shard;
        let metrics = &self.handle.ctx.metrics.catalog;
        if p.create.is_empty() && p.drop.is_empty() && p.missing.is_empty() {
            return Ok(failed);
        }
        self.still_leading()?;
        let ctx = &self.handle.ctx;
        let client = sql::connect(
            &ctx.cfg,
            ctx.superuser_password.expose(),
            Duration::from_secs(5),
        )
        .await
        .context("connecting to Postgres")?;
        for name in &p.drop {
            self.still_leading()?;
            let q = format!(
                "DROP DATABASE {}",
                postgres_protocol::escape::escape_identifier(name)
            );
            match client.batch_execute(&q).await {
                Ok(()) => {
                    metrics.dropped.inc();
                    tracing::info!(database = %name, "dropped: its entry says ensure: absent");
                    self.event(pc, "Normal", "DatabaseDropped", &format!(
                        "database {name:?} dropped on {shard}: its spec.databases entry says ensure: absent"
                    ))
                    .await;
                }
                Err(e) => {
                    let why = format!("DROP DATABASE failed: {}", pg_message(&e));
                    self.failed_once(pc, o, name, "DatabaseNotDropped", &why)
                        .await;
                    failed.insert(name.clone(), why);
                }
            }
        }
        for (name, owner, again) in &p.create {
            self.still_leading()?;
            match create(&client, name, owner, shard).await {
                // Made meanwhile (a CREATE or an unfinished DROP with SQL raced this round's
                // read): what the spec asks for holds, and it counts as present.
                Ok(false) => {
                    tracing::debug!(database = %name, "already exists: nothing to create");
                }
                Ok(true) => {
                    metrics.created.inc();
                    tracing::info!(database = %name, owner = %owner, again, "created");
                    let (reason, note) = if *again {
                        (
                            "DatabaseRecreated",
                            format!(
                                "database {name:?} was dropped with SQL on {shard}; re-created (owner {owner:?}) because spec.databases declares it"
                            ),
                        )
                    } else {
                        (
                            "DatabaseCreated",
                            format!(
                                "database {name:?} created on {shard} (owner {owner:?}) from spec.databases"
                            ),
                        )
                    };
                    self.event(pc, "Normal", reason, &note).await;
                }
                Err(why) => {
                    self.failed_once(pc, o, name, "DatabaseNotCreated", &why)
                        .await;
                    failed.insert(name.clone(), why);
                }
            }
        }
        for name in &p.missing {
            tracing::warn!(database = %name, "dropped with SQL; its adopted entry stays, not re-created");
            self.event(pc, "Warning", "DatabaseMissing", &format!(
                "database {name:?} was dropped with SQL on {shard}: its entry in spec.databases (adopted by the agent) stays and it is not re-created; \
                 declare the entry to re-create it, or set ensure: absent to drop it everywhere"
            ))
            .await;
        }
        Ok(failed)
    }

    /// A Warning Event for a failure, once per distinct failure (not every round).
    async fn failed_once(
        &self,
        pc: &PostgresCluster,
        o: &Observed<'_>,
        name: &str,
        reason: &str,
        why: &str,
    ) {
        tracing::warn!(database = %name, "{why}");
        let before = o.mine(name).and_then(|s| s.message.as_deref());
        if before != Some(why) {
            self.event(
                pc,
                "Warning",
                reason,
                &format!("database {name:?} on {}: {why}", o.shard),
            )
            .await;
        }
    }

    /// Applies the agent's entries of `spec.databases`: those it keeps and the new ones.
    async fn write_spec(&self, pc: &PostgresCluster, p: &Plan, rv: &str) -> anyhow::Result<()> {
        self.still_leading()?;
        let mut set = p.keep.clone();
        set.extend(p.adopt.iter().cloned());
        let name = pc.name_any();
        let body = json!({
            "apiVersion": "pgpilot.io/v1alpha1",
            "kind": "PostgresCluster",
            // The resourceVersion read is a precondition: the apply fails (409) if another
            // shard's agent changed the resource since.
            "metadata": {"name": name, "resourceVersion": rv},
            "spec": if set.is_empty() { json!({}) } else { json!({"databases": set}) },
        });
        timed(self.api().patch(
            &name,
            &PatchParams::apply(SPEC_MANAGER),
            &Patch::Apply(&body),
        ))
        .await
        .context("applying the agent's entries of spec.databases")?;
        let shard = &self.cfg().cluster.shard;
        for d in &p.adopt {
            self.handle.ctx.metrics.catalog.adopted.inc();
            let owner = d.owner.as_deref().unwrap_or("");
            tracing::info!(database = %d.name, owner, "adopted into spec.databases");
            self.event(pc, "Normal", "DatabaseAdopted", &format!(
                "database {:?} (owner {owner:?}) was created with SQL on {shard}: added to spec.databases \
                 (field manager {SPEC_MANAGER}); every shard creates it",
                d.name
            ))
            .await;
        }
        for r in &p.release {
            tracing::info!(database = %r, "a user declares this entry now: the agent lets go of it");
        }
        Ok(())
    }

    async fn event(&self, pc: &PostgresCluster, type_: &str, reason: &str, note: &str) {
        let object = ObjectReference {
            kind: Some("PostgresCluster".into()),
            api_version: Some(PostgresCluster::api_version(&()).into_owned()),
            name: pc.metadata.name.clone(),
            namespace: pc.metadata.namespace.clone(),
            uid: pc.metadata.uid.clone(),
            ..Default::default()
        };
        self.lead.event_on(object, type_, reason, note).await;
    }
}

/// Creates `name` owned by `owner`, if the role exists (else nothing is created). `Ok(false)`:
/// it exists already.
async fn create(
    client: &tokio_postgres::Client,
    name: &str,
    owner: &str,
    shard: &str,
) -> Result<bool, String> {
    let role = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&owner])
        .await
        .map_err(|e| format!("cannot look up role {owner:?}: {}", pg_message(&e)))?;
    if role.is_none() {
        return Err(format!(
            "owner role {owner:?} does not exist on {shard}: create it there first (roles are not synced); nothing was created"
        ));
    }
    let q = format!(
        "CREATE DATABASE {} OWNER {}",
        postgres_protocol::escape::escape_identifier(name),
        postgres_protocol::escape::escape_identifier(owner)
    );
    match client.batch_execute(&q).await {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {
            Ok(false)
        }
        Err(e) => Err(format!("CREATE DATABASE failed: {}", pg_message(&e))),
    }
}

fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => e.to_string(),
    }
}

/// `spec.databases` with who owns each entry, from the resource's managedFields: the agent's
/// field manager, or any other (a user: `kubectl`, a GitOps tool, a client-side apply).
pub fn entries(pc: &PostgresCluster) -> Vec<Entry> {
    let mut owners: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for mf in pc.managed_fields() {
        if mf.subresource.as_deref().is_some_and(|s| !s.is_empty()) {
            continue;
        }
        let Some(items) = mf
            .fields_v1
            .as_ref()
            .and_then(|f| f.0.pointer("/f:spec/f:databases"))
            .and_then(Value::as_object)
        else {
            continue;
        };
        let agent = mf.manager.as_deref() == Some(SPEC_MANAGER);
        for key in items.keys() {
            let Some(name) = key
                .strip_prefix("k:")
                .and_then(|k| serde_json::from_str::<Value>(k).ok())
                .and_then(|k| k.get("name").and_then(Value::as_str).map(str::to_string))
            else {
                continue;
            };
            let o = owners.entry(name).or_default();
            if agent {
                o.0 = true;
            } else {
                o.1 = true;
            }
        }
    }
    pc.spec
        .databases
        .iter()
        .map(|d| {
            let (by_agent, by_user) = owners.get(&d.name).copied().unwrap_or_default();
            Entry {
                spec: d.clone(),
                by_agent,
                by_user,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_know_who_declared_them_from_managed_fields() {
        let pc: PostgresCluster = serde_json::from_value(json!({
            "apiVersion": "pgpilot.io/v1alpha1", "kind": "PostgresCluster",
            "metadata": {"name": "c", "managedFields": [
                {"manager": "pgpilot-agent", "operation": "Apply", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:spec": {"f:databases": {
                    "k:{\"name\":\"Sales Q4\"}": {".": {}, "f:name": {}, "f:owner": {}},
                    "k:{\"name\":\"o\\\"q\"}": {".": {}, "f:name": {}}}}}},
                {"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:spec": {"f:shards": {}, "f:databases": {
                    "k:{\"name\":\"Sales Q4\"}": {".": {}, "f:name": {}, "f:ensure": {}},
                    "k:{\"name\":\"app\"}": {".": {}, "f:name": {}}}}}},
                {"manager": "pgpilot-agent/shard-0", "operation": "Apply", "subresource": "status",
                 "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}
            ]},
            "spec": {"postgresVersion": 15, "shards": 1, "storage": {"size": "1Gi"},
                     "databases": [{"name": "Sales Q4"}, {"name": "o\"q"}, {"name": "app"}, {"name": "nobody"}]}
        }))
        .unwrap();
        let e = entries(&pc);
        let who: Vec<(bool, bool)> = e.iter().map(|e| (e.by_agent, e.by_user)).collect();
        assert_eq!(
            who,
            vec![(true, true), (true, false), (false, true), (false, false)]
        );
    }
}
