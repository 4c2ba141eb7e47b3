//! `PostgresBackup`: an on-demand base backup of one shard or of every shard of a cluster. The
//! operator asks one agent per shard (`POST /v1/backups`): a ready replica when the shard has
//! one (a ready replica streams within its lag bound), so the primary's disks and CPU are
//! spared, else the primary. It follows the run on that same pod (`GET /v1/backups/{id}`),
//! reporting per shard the pod, its role, the backup id, LSNs, size or error, and the phase of the whole: `Running`, then `Completed` when
//! every shard's backup completed, or `Failed` naming the shards that failed. A request that
//! cannot be served (no such cluster, no store, unknown shard) fails at once with why.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use pgpilot_common::api::{BackupRequest, BackupState};
use pgpilot_common::crd::{
    PostgresBackup, PostgresBackupStatus, PostgresCluster, ShardBackupStatus,
};

use crate::controller::{
    Ctx, Error, agent_at, agent_token, pod_ready, pod_role, publish, shard_pods,
};

/// Runs the PostgresBackup controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Ctx>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let api: Api<PostgresBackup> = ctx.watched();
    Controller::new(api, watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!("backup reconcile: {e}");
            }
        })
        .await;
}

fn error_policy(pb: Arc<PostgresBackup>, e: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(backup = %pb.name_any(), "backup reconcile failed, retrying in 5 s: {e}");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(pb: Arc<PostgresBackup>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let before = pb.status.clone().unwrap_or_default();
    if matches!(before.phase.as_deref(), Some("Completed" | "Failed")) {
        if before.phase.as_deref() == Some("Completed") {
            succeeded(&pb, &ctx);
        }
        return Ok(Action::await_change());
    }
    let ns = pb
        .namespace()
        .ok_or_else(|| Error::Other("a PostgresBackup is namespaced".into()))?;
    let api: Api<PostgresBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let name = pb.name_any();
    let mut st = before.clone();
    let target = match plan(&pb, &ns, &ctx).await? {
        Ok(t) => t,
        Err(why) => {
            st.phase = Some("Failed".into());
            st.error = Some(why.clone());
            write(&api, &name, &before, &st, &ctx).await?;
            publish(
                &ctx,
                &pb.object_ref(&()),
                EventType::Warning,
                "BackupFailed",
                &why,
            )
            .await;
            return Ok(Action::await_change());
        }
    };
    for shard in &target.shards {
        if !st.shards.iter().any(|s| s.shard == *shard) {
            st.shards.push(ShardBackupStatus {
                shard: shard.clone(),
                phase: "Pending".into(),
                ..Default::default()
            });
        }
    }
    for entry in st.shards.iter_mut() {
        if matches!(entry.phase.as_str(), "Completed" | "Failed") {
            continue;
        }
        let ip = match &entry.instance {
            // Started: follow it where it runs.
            Some(pod) => match pod_ip(pod, &ns, &ctx).await? {
                Some(ip) => ip,
                None => {
                    entry.phase = "Failed".into();
                    entry.error = Some(format!(
                        "instance {pod} went away during the backup (it is left incomplete in the store)"
                    ));
                    continue;
                }
            },
            None => match backup_instance(&target.cluster, &entry.shard, &ns, &ctx).await? {
                Some((pod, role, ip)) => {
                    entry.instance = Some(pod);
                    entry.role = Some(role);
                    ip
                }
                None => {
                    entry.error = Some("waiting for the shard to have a ready instance".into());
                    continue;
                }
            },
        };
        let agent = agent_at(&ip, Some(target.token.clone()), target.tls.clone());
        match &entry.backup_id {
            None => {
                let req = BackupRequest {
                    label: Some(format!("PostgresBackup {ns}/{name}")),
                };
                match agent.start_backup(&req).await {
                    Ok(p) => {
                        entry.backup_id = Some(p.id.clone());
                        entry.phase = "Running".into();
                        entry.error = None;
                        publish(
                            &ctx,
                            &pb.object_ref(&()),
                            EventType::Normal,
                            "BackupStarted",
                            &format!(
                                "{}: backup {} on {} ({})",
                                entry.shard,
                                p.id,
                                entry.instance.as_deref().unwrap_or("?"),
                                entry.role.as_deref().unwrap_or("?")
                            ),
                        )
                        .await;
                    }
                    // Busy (another backup, a switchover) or unreachable: choose again shortly.
                    Err(e) if e.status() == Some(409) || e.status().is_none() => {
                        entry.error = Some(e.to_string());
                        entry.instance = None;
                        entry.role = None;
                    }
                    Err(e) => {
                        entry.phase = "Failed".into();
                        entry.error = Some(e.to_string());
                    }
                }
            }
            Some(id) => match agent.backup(id).await {
                Ok(p) => match p.state {
                    BackupState::Running => {}
                    BackupState::Completed => {
                        entry.phase = "Completed".into();
                        entry.start_lsn = p.start_lsn;
                        entry.end_lsn = p.stop_lsn;
                        entry.size_bytes = Some(p.stored_bytes);
                        entry.error = None;
                    }
                    BackupState::Failed | BackupState::Incomplete => {
                        entry.phase = "Failed".into();
                        entry.error = Some(p.reason.unwrap_or_else(|| "the backup failed".into()));
                    }
                },
                // The agent restarted (its runs are in memory): the backup ended with it.
                Err(e) if e.status() == Some(404) => {
                    entry.phase = "Failed".into();
                    entry.error = Some(format!(
                        "backup {id} is unknown to {}: its agent restarted before the backup completed",
                        entry.instance.as_deref().unwrap_or("the instance")
                    ));
                }
                Err(e) => entry.error = Some(format!("cannot follow backup {id}: {e}")),
            },
        }
    }
    let done = st
        .shards
        .iter()
        .all(|s| matches!(s.phase.as_str(), "Completed" | "Failed"));
    let failed: Vec<String> = st
        .shards
        .iter()
        .filter(|s| s.phase == "Failed")
        .map(|s| format!("{}: {}", s.shard, s.error.as_deref().unwrap_or("failed")))
        .collect();
    st.phase = Some(match (done, failed.is_empty()) {
        (false, _) => "Running".into(),
        (true, true) => "Completed".into(),
        (true, false) => "Failed".into(),
    });
    if done && !failed.is_empty() {
        st.error = Some(failed.join("; "));
    }
    write(&api, &name, &before, &st, &ctx).await?;
    if done {
        if failed.is_empty() {
            succeeded(&pb, &ctx);
        }
        let (type_, reason, note) = if failed.is_empty() {
            (
                EventType::Normal,
                "BackupCompleted",
                format!("{} shard(s) backed up", st.shards.len()),
            )
        } else {
            (EventType::Warning, "BackupFailed", failed.join("; "))
        };
        publish(&ctx, &pb.object_ref(&()), type_, reason, &note).await;
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(Duration::from_secs(2)))
}

/// A completed backup moves its cluster's last-success gauge to when the backup was asked for
/// (the backup-age alert's input).
fn succeeded(pb: &PostgresBackup, ctx: &Ctx) {
    if let (Some(ns), Some(created)) = (pb.namespace(), pb.metadata.creation_timestamp.as_ref()) {
        ctx.metrics
            .backup_succeeded(&ns, &pb.spec.cluster, created.0.as_second());
    }
}

struct Target {
    cluster: String,
    shards: Vec<String>,
    token: String,
    /// The cluster's agents' TLS (`spec.tls`).
    tls: Option<rustls::ClientConfig>,
}

/// What the backup covers, or why it cannot be served.
async fn plan(pb: &PostgresBackup, ns: &str, ctx: &Ctx) -> Result<Result<Target, String>, Error> {
    let clusters: Api<PostgresCluster> = Api::namespaced(ctx.client.clone(), ns);
    let Some(pc) = clusters.get_opt(&pb.spec.cluster).await? else {
        return Ok(Err(format!(
            "spec.cluster: no PostgresCluster {:?} in namespace {ns}",
            pb.spec.cluster
        )));
    };
    if pc.spec.backup.is_none() {
        return Ok(Err(format!(
            "PostgresCluster {} has no spec.backup: there is no store to back up to",
            pb.spec.cluster
        )));
    }
    let all = pc.spec.shard_names();
    let shards = match &pb.spec.shard {
        Some(s) if all.contains(s) => vec![s.clone()],
        Some(s) => {
            return Ok(Err(format!(
                "spec.shard: {s:?} is not a shard of {} (it has {})",
                pb.spec.cluster,
                all.join(", ")
            )));
        }
        None => all,
    };
    let token = match agent_token(&pc, ns, ctx).await? {
        Ok(t) => t,
        Err(why) => return Ok(Err(why)),
    };
    let tls = crate::tls::client(&pc, ns, ctx).await?;
    Ok(Ok(Target {
        cluster: pb.spec.cluster.clone(),
        shards,
        token,
        tls,
    }))
}

/// The instance that takes the shard's backup: (pod, role, pod IP) of a ready replica (the
/// first by name), else of the ready primary.
async fn backup_instance(
    cluster: &str,
    shard: &str,
    ns: &str,
    ctx: &Ctx,
) -> Result<Option<(String, String, String)>, Error> {
    let mut list = shard_pods(ctx, ns, cluster, shard).await?;
    list.sort_by_key(|p| p.name_any());
    for role in ["replica", "primary"] {
        let found = list.iter().filter(|p| pod_ready(p)).find_map(|p| {
            (pod_role(p) == Some(role)).then_some(())?;
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            Some((p.name_any(), role.to_string(), ip))
        });
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// The IP of a pod by name; `None` when it no longer exists (or has no IP).
async fn pod_ip(pod: &str, ns: &str, ctx: &Ctx) -> Result<Option<String>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    Ok(pods.get_opt(pod).await?.and_then(|p| p.status?.pod_ip))
}

async fn write(
    api: &Api<PostgresBackup>,
    name: &str,
    before: &PostgresBackupStatus,
    after: &PostgresBackupStatus,
    ctx: &Ctx,
) -> Result<(), Error> {
    if before == after {
        return Ok(());
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"status": after})),
    )
    .await?;
    ctx.metrics.writes.inc();
    Ok(())
}
