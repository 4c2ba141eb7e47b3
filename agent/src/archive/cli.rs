//! What the `backup`, `backups`, `verify` and `retention` subcommands do and print. `backup`
//! and `backups` are clients of the agent's API; `verify` and `retention` work on the store
//! directly with the settings of the agent's runtime file (as `wal-push` does), so they also
//! work while the agent is down. main.rs only dispatches here.

use crate::units::human;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use pgpilot_common::api::{BackupList, BackupProgress, BackupRequest, BackupState};
use pgpilot_common::client::AgentClient;
use pgpilot_common::layout::Layout;

use super::runtime::ArchiveRuntime;
use crate::store::Store;

/// Opens the store and layout named by the agent's runtime file.
pub fn open_store(runtime: &Path) -> anyhow::Result<(Store, Layout)> {
    let rt = ArchiveRuntime::read(runtime)?;
    let store = Store::open(&rt.store)?;
    let layout = Layout::new(&rt.cluster, &rt.shard).map_err(anyhow::Error::msg)?;
    Ok((store, layout))
}

/// `pgpilot-agent backup`: starts a backup and, with `wait`, follows it with a progress bar
/// until it ends. Fails when the backup fails.
pub async fn backup(client: &AgentClient, label: Option<String>, wait: bool) -> anyhow::Result<()> {
    let started = client.start_backup(&BackupRequest { label }).await?;
    let id = started.id.clone();
    println!("backup {id} started");
    if !wait {
        println!("follow it with: pgpilot-agent backups, or GET /v1/backups/{id}");
        return Ok(());
    }
    let began = Instant::now();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix:>9} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        )
        .expect("static progress template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let last = loop {
        let p = client.backup(&id).await?;
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        bar.set_prefix(format!("{:?}", p.phase).to_lowercase());
        bar.set_message(format!("files {}/{}", p.files_done, p.files_total));
        if p.state != BackupState::Running {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish_and_clear();
    // The agent's own start and end times: the polling interval does not distort the speed.
    let took = match (&last.started_at, &last.finished_at) {
        (Some(a), Some(b)) => match (a.parse::<jiff::Timestamp>(), b.parse::<jiff::Timestamp>()) {
            (Ok(a), Ok(b)) => b.duration_since(a).unsigned_abs(),
            _ => began.elapsed(),
        },
        _ => began.elapsed(),
    };
    print!("{}", summary(&last, took));
    match last.state {
        BackupState::Completed => Ok(()),
        _ => anyhow::bail!(
            "backup {id} {}: {}",
            state_name(last.state),
            last.reason.as_deref().unwrap_or("no reason given")
        ),
    }
}

fn state_name(s: BackupState) -> &'static str {
    match s {
        BackupState::Running => "running",
        BackupState::Completed => "completed",
        BackupState::Failed => "failed",
        BackupState::Incomplete => "incomplete",
    }
}

fn summary(p: &BackupProgress, took: Duration) -> String {
    let secs = took.as_secs_f64().max(1e-3);
    let mut out = String::new();
    let _ = writeln!(out, "backup {}: {}", p.id, state_name(p.state));
    let _ = writeln!(
        out,
        "  files {}, {} read, {} stored, {:.1} s, {:.1} MB/s",
        p.files_done,
        human(p.bytes_done),
        human(p.stored_bytes),
        secs,
        p.bytes_done as f64 / 1e6 / secs
    );
    let _ = writeln!(
        out,
        "  WAL {} .. {}",
        p.start_lsn.as_deref().unwrap_or("-"),
        p.stop_lsn.as_deref().unwrap_or("-")
    );
    out
}

/// `pgpilot-agent backups`: the table, or the raw JSON.
pub async fn backups(client: &AgentClient, json: bool) -> anyhow::Result<()> {
    let list = client.backups().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", render_list(&list));
    }
    Ok(())
}

/// The backup table and the window.
pub fn render_list(list: &BackupList) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:<10} {:<20} {:<20} {:<12} {:<12} {:>10} {:>10}",
        "ID", "STATUS", "START", "STOP", "START LSN", "STOP LSN", "SIZE", "STORED"
    );
    let time = |t: &Option<String>| {
        t.as_deref()
            .map(|t| t.get(..19).unwrap_or(t).replace('T', " "))
            .unwrap_or_else(|| "-".into())
    };
    for b in &list.backups {
        let _ = writeln!(
            out,
            "{:<22} {:<10} {:<20} {:<20} {:<12} {:<12} {:>10} {:>10}",
            b.id,
            state_name(b.state),
            time(&b.start_time),
            time(&b.stop_time),
            b.start_lsn.as_deref().unwrap_or("-"),
            b.stop_lsn.as_deref().unwrap_or("-"),
            b.size.map(human).unwrap_or_else(|| "-".into()),
            human(b.stored_size)
        );
        if let Some(r) = &b.reason
            && b.state != BackupState::Completed
        {
            let _ = writeln!(out, "    {r}");
        }
    }
    if list.backups.is_empty() {
        let _ = writeln!(out, "(no backups)");
    }
    match &list.window {
        Some(w) => {
            let _ = writeln!(
                out,
                "\nrecoverable from {} ({}, backup {})",
                w.earliest_lsn, w.earliest_time, w.earliest_backup
            );
            let _ = writeln!(
                out,
                "            to   {} (end of {}{})",
                w.latest_lsn.as_deref().unwrap_or("-"),
                w.latest_segment.as_deref().unwrap_or("no archived segment"),
                w.latest_archived_at
                    .as_deref()
                    .map(|t| format!(", archived {t}"))
                    .unwrap_or_default()
            );
            if !w.consistent {
                let _ = writeln!(
                    out,
                    "  WARNING: the archived WAL does not reach the end of backup {}: not restorable yet",
                    w.earliest_backup
                );
            }
            if let Some(g) = &w.first_gap {
                let _ = writeln!(
                    out,
                    "  WAL gap: {g} is missing; later WAL cannot be replayed"
                );
            }
        }
        None => {
            let _ = writeln!(out, "\nno completed backup: nothing is recoverable");
        }
    }
    out
}

/// `pgpilot-agent verify [id]`: prints the report; fails (non-zero exit) on any problem.
pub async fn verify(runtime: &Path, id: Option<&str>) -> anyhow::Result<()> {
    let (store, layout) = open_store(runtime)?;
    let report = super::verify::verify(&store, &layout, id).await?;
    print!("{}", super::verify::render(&report));
    let problems = report.problems();
    match problems.first() {
        None => Ok(()),
        Some(first) => anyhow::bail!(
            "backup {} failed verification ({} problem(s)); first: {first}",
            report.backup,
            problems.len()
        ),
    }
}

/// `pgpilot-agent retention`: plans, prints, and (unless a dry run) deletes.
pub async fn retention(
    runtime: &Path,
    keep_last: Option<usize>,
    keep_within: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<()> {
    use super::retention::{Policy, apply, parse_duration, plan, render};
    let keep_within = keep_within
        .map(parse_duration)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--keep-within {e}"))?;
    let (store, layout) = open_store(runtime)?;
    let cat = super::catalog::load(&store, &layout).await?;
    let p = plan(
        &cat,
        Policy {
            keep_last,
            keep_within,
        },
        jiff::Timestamp::now(),
    )?;
    print!("{}", render(&p, dry_run));
    if dry_run {
        println!("dry run: nothing deleted");
    } else {
        apply(&store, &p).await?;
        println!("done");
    }
    Ok(())
}
