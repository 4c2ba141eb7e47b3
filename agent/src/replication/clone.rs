//! A replica's first copy of its primary: `pg_basebackup` over the replication protocol.
//!
//! Why `pg_basebackup` rather than the agent speaking `BASE_BACKUP` itself: it ships with every
//! major, follows each major's protocol changes (tablespaces, manifests, compression), streams
//! the WAL needed for consistency on a second connection (`-X stream`) and uses the replica's
//! own slot (`-S`), so the primary keeps that WAL from the first byte. Its `--progress` output
//! is parsed into the operation's progress. The agent's own archive format buys nothing here:
//! the copy never leaves the two machines.

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::live::LiveOp;
use super::{Upstream, pgpass_path};
use crate::context::Context;
use crate::postgres::{bootstrap, run_as};

#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("preparing the data dir: {0}")]
    Prepare(String),
    #[error("cannot run {tool}: {cause}")]
    Spawn { tool: String, cause: std::io::Error },
    #[error("restoring the newest backup: {0}")]
    Restore(String),
    #[error("pg_basebackup from {host}:{port} failed ({status}): {output}")]
    Failed {
        host: String,
        port: u16,
        status: String,
        output: String,
    },
}

/// Copies the primary into the (empty) data dir, updating `op`'s progress.
pub async fn clone_from_primary(
    ctx: &Context,
    upstream: &Upstream,
    op: &LiveOp,
) -> Result<(), CloneError> {
    let cfg = &ctx.cfg;
    let owner = ctx.owner.as_ref();
    bootstrap::prepare_dir(&cfg.data_dir, 0o700, owner)
        .map_err(|e| CloneError::Prepare(e.to_string()))?;
    let tool = ctx.bins.path("pg_basebackup");
    if !tool.exists() {
        return Err(CloneError::Prepare(format!(
            "{} does not exist: install the PostgreSQL {} client tools next to the server, \
             or clone from the store's newest backup with [replication] clone_from = \"backup\"",
            tool.display(),
            ctx.bins.major
        )));
    }
    let conninfo = format!(
        "{} port={} user={} application_name={}",
        crate::postgres::tls::peer_conninfo(cfg, &upstream.host),
        upstream.port,
        crate::postgres::tls::conninfo_quote(&cfg.replication_user),
        crate::postgres::tls::conninfo_quote(&cfg.replication.name)
    );
    let mut cmd = Command::new(&tool);
    cmd.arg("--pgdata")
        .arg(&cfg.data_dir)
        .arg("--dbname")
        .arg(&conninfo)
        .args([
            "--wal-method=stream",
            "--checkpoint=fast",
            "--progress",
            "--no-password",
        ])
        .arg("--slot")
        .arg(&upstream.slot)
        .env("PGPASSFILE", pgpass_path(cfg))
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    run_as(&mut cmd, owner);
    tracing::info!(primary = %upstream.url, host = %upstream.host, port = upstream.port, slot = %upstream.slot, "cloning the primary with pg_basebackup");
    let mut child = cmd.spawn().map_err(|cause| CloneError::Spawn {
        tool: tool.display().to_string(),
        cause,
    })?;
    let mut stderr = child.stderr.take().expect("piped stderr");
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stderr.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some((done, total)) = last_progress(&text) {
            let mut o = op.lock();
            o.progress.bytes_done = done;
            o.progress.bytes_total = total;
        }
        // Keep only the tail for the error message.
        if text.len() > 64 * 1024 {
            text.drain(..text.len() - 16 * 1024);
        }
    }
    let status = child.wait().await.map_err(|cause| CloneError::Spawn {
        tool: tool.display().to_string(),
        cause,
    })?;
    if !status.success() {
        let output: String = text
            .split(['\r', '\n'])
            .filter(|l| !l.trim().is_empty() && last_progress(l).is_none())
            .collect::<Vec<_>>()
            .join("; ");
        return Err(CloneError::Failed {
            host: upstream.host.clone(),
            port: upstream.port,
            status: status.to_string(),
            output,
        });
    }
    // The primary's own leftovers are not this instance's.
    let _ = std::fs::remove_dir_all(cfg.data_dir.join(crate::files::SPOOL_DIR));
    let _ = std::fs::remove_file(cfg.data_dir.join(crate::files::RECOVERY_CONF));
    let mut o = op.lock();
    o.progress.bytes_done = o.progress.bytes_total.max(o.progress.bytes_done);
    Ok(())
}

/// Restores the store's newest base backup into the (empty) data dir, without recovery
/// settings: the executor then starts it as a standby, which replays archived WAL through
/// `restore_command` until it can stream from its slot.
pub async fn clone_from_backup(ctx: &Context, op: &LiveOp) -> Result<(), CloneError> {
    let cfg = &ctx.cfg;
    let Some(archiver) = &ctx.archiver else {
        return Err(CloneError::Prepare(
            "[replication] clone_from = \"backup\" needs a backup store ([backup] store)".into(),
        ));
    };
    let req = pgpilot_common::api::RestoreRequest {
        target: pgpilot_common::api::RestoreTarget::Immediate,
        backup_id: None,
        inclusive: None,
        timeline: None,
        force: false,
        cancel_backup: false,
    };
    let plan = crate::restore::plan(archiver.store(), archiver.layout(), &req)
        .await
        .map_err(|e| CloneError::Prepare(format!("no backup to clone from: {e}")))?;
    tracing::info!(backup = %plan.manifest.id, "cloning from the store's newest backup");
    op.lock().id = format!("backup {}", plan.manifest.id);
    if let Some(f) = &ctx.fetcher {
        f.set_segment_size(plan.manifest.wal_segment_size);
        let _ = f.reset_spool();
    }
    let progress = crate::restore::new_progress(&plan);
    let concurrency = archiver.store().upload_concurrency() * 2;
    let download = crate::restore::download(
        archiver.store(),
        archiver.layout(),
        &plan,
        &cfg.data_dir,
        ctx.owner.as_ref(),
        concurrency,
        &progress,
    );
    tokio::pin!(download);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    let copy = |op: &LiveOp| {
        let p = progress.lock().expect("progress lock");
        let mut o = op.lock();
        o.progress.bytes_done = p.bytes_done;
        o.progress.bytes_total = p.bytes_total;
        o.progress.files_done = p.files_done;
        o.progress.files_total = p.files_total;
    };
    let result = loop {
        tokio::select! {
            r = &mut download => break r,
            _ = tick.tick() => copy(op),
        }
    };
    copy(op);
    result.map_err(|e| CloneError::Restore(e.to_string()))?;
    let _ = std::fs::remove_file(cfg.data_dir.join(crate::files::RECOVERY_SIGNAL));
    let _ = std::fs::remove_file(cfg.data_dir.join(crate::files::RECOVERY_CONF));
    Ok(())
}

/// The last `done/total kB` of pg_basebackup's `--progress` output, in bytes.
fn last_progress(text: &str) -> Option<(u64, u64)> {
    text.rsplit(['\r', '\n']).find_map(|line| {
        let kb = line.find(" kB")?;
        let head = line[..kb].trim();
        let (done, total) = head.rsplit(' ').next()?.split_once('/')?;
        Some((
            done.parse::<u64>().ok()? * 1024,
            total.parse::<u64>().ok()? * 1024,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::last_progress;

    #[test]
    fn parses_progress_lines() {
        let out = "waiting for checkpoint\r    0/30512 kB (0%), 0/1 tablespace\r12345/30512 kB (40%), 0/1 tablespace";
        assert_eq!(last_progress(out), Some((12345 * 1024, 30512 * 1024)));
        assert_eq!(last_progress("waiting for checkpoint"), None);
        let nl = "30512/30512 kB (100%), 1/1 tablespace\n";
        assert_eq!(last_progress(nl), Some((30512 * 1024, 30512 * 1024)));
    }
}
