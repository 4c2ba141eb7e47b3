//! The restore target on the command line, shared by `pgpilot-agent restore` and
//! `pgpilot-agent run --bootstrap-from-backup`; and the restore command's progress display.

use std::time::Duration;

use clap::Args;
use pgpilot_common::api::{RestorePhase, RestoreRequest, RestoreTarget};
use pgpilot_common::client::AgentClient;

/// Where recovery stops: at most one of the target flags; `--latest` when none is given.
#[derive(Debug, Clone, Default, Args)]
#[group(id = "target", multiple = false)]
pub struct RestoreTargetArgs {
    /// Replay to this time (RFC 3339 or `2026-11-23 18:05:00+00`; a zone is required).
    #[arg(long)]
    pub target_time: Option<String>,
    /// Replay to this WAL position (`16/B374D848`).
    #[arg(long)]
    pub target_lsn: Option<String>,
    /// Replay to this transaction id.
    #[arg(long)]
    pub target_xid: Option<String>,
    /// Replay to this restore point (`pg_create_restore_point`).
    #[arg(long)]
    pub target_name: Option<String>,
    /// Replay all archived WAL (the default).
    #[arg(long)]
    pub latest: bool,
    /// Stop as soon as the backup is consistent.
    #[arg(long)]
    pub immediate: bool,
}

/// Options of a restore besides the target.
#[derive(Debug, Clone, Default, Args)]
pub struct RestoreOptions {
    /// Restore this backup instead of the newest one that ends before the target.
    #[arg(long = "backup")]
    pub backup_id: Option<String>,
    /// Stop just before the target instead of just after it.
    #[arg(long)]
    pub exclusive: bool,
    /// `latest` (default), `current`, or a timeline number.
    #[arg(long)]
    pub target_timeline: Option<String>,
}

impl RestoreTargetArgs {
    pub fn target(&self) -> RestoreTarget {
        if let Some(time) = &self.target_time {
            RestoreTarget::Time { time: time.clone() }
        } else if let Some(lsn) = &self.target_lsn {
            RestoreTarget::Lsn { lsn: lsn.clone() }
        } else if let Some(xid) = &self.target_xid {
            RestoreTarget::Xid { xid: xid.clone() }
        } else if let Some(name) = &self.target_name {
            RestoreTarget::Name { name: name.clone() }
        } else if self.immediate {
            RestoreTarget::Immediate
        } else {
            RestoreTarget::Latest
        }
    }

    pub fn request(&self, opts: &RestoreOptions, force: bool) -> RestoreRequest {
        RestoreRequest {
            cancel_backup: false,
            target: self.target(),
            backup_id: opts.backup_id.clone(),
            inclusive: opts.exclusive.then_some(false),
            timeline: opts.target_timeline.clone(),
            force,
        }
    }
}

/// Sends the restore and follows it with a progress bar until Postgres promotes (Ok) or the
/// restore fails (Err with the agent's reason).
pub async fn run_restore(client: &AgentClient, req: &RestoreRequest) -> anyhow::Result<()> {
    let accepted = client.restore(req).await?;
    eprintln!("restoring to {}", accepted.target);
    let bar = crate::units::transfer_bar("download");
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(status) = client.status().await else {
            continue;
        };
        let Some(p) = status.restore else { continue };
        if p.started_at != accepted.started_at {
            continue;
        }
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        match p.phase {
            RestorePhase::Downloading => {}
            RestorePhase::Replaying => {
                bar.set_message("replay");
                bar.set_prefix(p.replayed_lsn.clone().unwrap_or_default());
                bar.tick();
            }
            RestorePhase::Completed => {
                bar.finish_and_clear();
                println!(
                    "restored to {}: promoted on timeline {} (download {:.1} s, replay {:.1} s)",
                    p.target,
                    p.timeline
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "?".into()),
                    p.download_seconds.unwrap_or_default(),
                    p.replay_seconds.unwrap_or_default()
                );
                return Ok(());
            }
            RestorePhase::Failed => {
                bar.abandon();
                anyhow::bail!("restore failed: {}", p.error.unwrap_or_default());
            }
        }
    }
}
