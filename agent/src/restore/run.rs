//! A restore as one operation the executor drives: [`download_and_prepare`] runs in a task
//! while the agent is `Restoring`; the executor then starts Postgres in recovery
//! (`Recovering`), follows its replay and calls [`mark_completed`] once it has promoted, or
//! [`mark_failed`] when it cannot get there.

use std::time::Instant;

use pgpilot_common::api::RestorePhase;
use pgpilot_common::layout::Layout;

use super::{Progress, RestoreError, RestorePlan};
use crate::config::Config;
use crate::postgres::OsUser;
use crate::store::Store;

/// Empties the data dir when `force` (on a blocking thread: unlinking gigabytes blocks),
/// downloads and verifies every file, and writes the recovery settings.
pub async fn download_and_prepare(
    cfg: &Config,
    store: &Store,
    layout: &Layout,
    plan: &RestorePlan,
    owner: Option<&OsUser>,
    force: bool,
    progress: &Progress,
) -> Result<(), RestoreError> {
    if force {
        let dir = cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || super::empty_data_dir(&dir))
            .await
            .map_err(|e| RestoreError::Failed(e.to_string()))??;
    }
    let concurrency = store.upload_concurrency() * 2;
    super::download(
        store,
        layout,
        plan,
        &cfg.data_dir,
        owner,
        concurrency,
        progress,
    )
    .await?;
    super::write_recovery_config(cfg, plan, owner)
}

pub fn mark_failed(progress: &Progress, reason: &str) {
    let mut p = progress.lock().expect("progress lock");
    p.phase = RestorePhase::Failed;
    p.error = Some(reason.to_string());
    p.finished_at = Some(crate::time::now());
}

/// Postgres left recovery at the target: remove the target settings (they must not apply to a
/// later recovery) and record the result.
pub fn mark_completed(
    cfg: &Config,
    progress: &Progress,
    timeline: Option<u32>,
    postgres_started: Option<Instant>,
) {
    super::clear_recovery_config(cfg);
    let mut p = progress.lock().expect("progress lock");
    p.phase = RestorePhase::Completed;
    p.timeline = timeline;
    p.replay_seconds = postgres_started.map(|t| t.elapsed().as_secs_f64());
    p.finished_at = Some(crate::time::now());
    tracing::info!(backup = %p.backup_id, ?timeline, "restore complete: promoted at {}", p.target);
}
