//! The drain handshake (shared/DESIGN.md, "Drain handshake"; docs/drain.md): the agent, which
//! owns Postgres, decides when its pod may go.
//!
//! A drain starts from `POST /v1/drain` (the preStop hook's `pgpilot-agent drain --wait`, an
//! operator, a person) or, in Kubernetes, from the pod annotation `pgpilot.io/drain: Started`.
//! The agent acknowledges (it stops competing for leadership and refuses new work), then:
//!
//! 1. on a primary: switches to a new WAL segment and waits until the archive holds it, then
//!    switches over to the best replica (retrying while none is healthy, until the timeout);
//! 2. stops Postgres (fast shutdown: its archiver pushes what is complete);
//! 3. archives whatever WAL is left ready, and, when it stopped the only writer (`force`), the
//!    last segment as `.partial`;
//! 4. is `Drained` (`Finished`): the pod may be deleted, and it takes no WAL with it.
//!
//! A drain that cannot finish (no replica took over in time, the archive is failing) fails with
//! a message and leaves the instance a normal member: it never stops the only writer unless
//! asked to with `force`. `DELETE /v1/drain` cancels one before Postgres is stopped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpilot_common::api::{DrainRequest, DrainStatus, SwitchoverRequest};
use pgpilot_common::state::{AgentState, DrainState, Role};
use tokio_util::sync::CancellationToken;

pub mod cli;

use crate::context::Context;
use crate::core::Handle;
use crate::core::drain_record::{DrainRecord, End};
use crate::error::AgentError;

use pgpilot_common::names::{
    ANNOTATION_DRAIN as ANNOTATION, DRAIN_ACKNOWLEDGED as ACKNOWLEDGED, DRAIN_FAILED as FAILED,
    DRAIN_FINISHED as FINISHED, DRAIN_STARTED as STARTED,
};

/// How often a primary's drain asks for a switchover again while no replica can take over.
const RETRY: Duration = Duration::from_secs(1);

/// Begins the drain (or joins the one under way) and starts its task; answers at once.
pub async fn start(
    handle: &Handle,
    req: DrainRequest,
    by: &'static str,
) -> Result<DrainStatus, AgentError> {
    let (status, begun) = handle.begin_drain(req, by).await?;
    if let Some(token) = begun {
        tokio::spawn(run(handle.clone(), token));
    }
    Ok(status)
}

/// The drain task: carries the drain out to its end, reporting every step (Kubernetes: the pod
/// annotations and Events).
pub async fn run(handle: Handle, cancel: CancellationToken) {
    let ctx = handle.ctx.clone();
    let rec = handle.drain_record();
    report(&ctx, &rec).await;
    event(&ctx, "Normal", "DrainAcknowledged", &rec.view().message).await;
    let end = tokio::select! {
        end = steps(&handle, &rec) => end,
        // Cancelled (the API or the annotation's removal): `cancel` has ended the record.
        _ = cancel.cancelled() => End::Cancelled(String::new()),
    };
    if let End::Cancelled(_) = end {
        if rec.state() == DrainState::Draining {
            rec.end(&end, &ctx);
        }
        report(&ctx, &rec).await;
        event(
            &ctx,
            "Normal",
            "DrainCancelled",
            "the drain was cancelled: a normal member again",
        )
        .await;
        return;
    }
    // The Event before the end is visible: once the record says Drained, a preStop
    // `drain --wait` returns and the kubelet stops this process, before a later Event could be
    // posted (seen in the drain test under load).
    match &end {
        End::Finished(m) => event(&ctx, "Normal", "Drained", m).await,
        End::Failed(m) | End::Cancelled(m) => event(&ctx, "Warning", "DrainFailed", m).await,
    }
    rec.end(&end, &ctx);
    report(&ctx, &rec).await;
}

async fn steps(handle: &Handle, rec: &DrainRecord) -> End {
    let ctx = handle.ctx.clone();
    let view = rec.view();
    let timeout = view.timeout_secs;
    let deadline = rec.deadline();
    let mut took_over = None;
    let mut only_writer = false;
    let primary = AgentState::Running {
        role: Role::Primary,
    };
    if handle.state() == primary {
        if ctx.archiver.is_some() {
            rec.progress(
                "archiving",
                "switching to a new WAL segment and waiting until the archive holds it",
            );
            report(&ctx, rec).await;
            if let Err(why) = archive_current(&ctx, deadline).await {
                return End::Failed(format!("{why}; this instance stays the primary"));
            }
        }
        rec.progress("switching over", "asking the best replica to take over");
        report(&ctx, rec).await;
        loop {
            if handle.state().role() != Some(Role::Primary) {
                // Fenced, or switched over by someone else meanwhile.
                break;
            }
            match handle.switchover(SwitchoverRequest::default()).await {
                Ok(r) => {
                    took_over = Some(format!(
                        "{} took over (writes paused {} ms)",
                        r.new_primary, r.write_pause_ms
                    ));
                    rec.update(|s| s.new_primary = Some(r.new_primary));
                    break;
                }
                Err(e) if Instant::now() >= deadline => {
                    if view.force {
                        only_writer = true;
                        rec.progress(
                            "stopping",
                            format!("no replica took over within {timeout} s ({e}); force: stopping the only writer after archiving its WAL"),
                        );
                        break;
                    }
                    return End::Failed(format!(
                        "no replica took over within {timeout} s: {e}; this instance stays the primary and keeps running (drain with force to stop it anyway)"
                    ));
                }
                Err(e) if shard_going_away(&ctx).await => {
                    only_writer = true;
                    rec.progress(
                        "stopping",
                        format!("every pod of the shard is being deleted, so no replica can take over ({e}): stopping the only writer after archiving its WAL"),
                    );
                    break;
                }
                Err(e) => {
                    if rec.progress(
                        "switching over",
                        format!("waiting for a replica to take over: {e}"),
                    ) {
                        report(&ctx, rec).await;
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }
    if let Err(end) = rec.commit() {
        return end;
    }
    if !only_writer {
        rec.progress("stopping", "stopping Postgres (fast shutdown)");
    }
    report(&ctx, rec).await;
    if let Err(e) = handle.drain_stop().await {
        return End::Failed(format!("cannot stop Postgres: {e}"));
    }
    let mut archived = String::from("no backup store: nothing to archive");
    if ctx.archiver.is_some() {
        rec.progress("archiving", "archiving the WAL Postgres left ready");
        report(&ctx, rec).await;
        match archive_leftovers(&ctx, only_writer).await {
            Ok(Some(last)) => {
                archived = format!("WAL archived through {last}");
                rec.update(|s| s.last_archived = Some(last));
            }
            Ok(None) => archived = "no WAL was left to archive".into(),
            Err(why) => {
                return End::Failed(format!(
                    "Postgres is stopped, but its WAL could not be archived: {why}"
                ));
            }
        }
    }
    End::Finished(match (took_over, only_writer) {
        (Some(t), _) => format!("drained: {t}; {archived}; Postgres stopped"),
        (None, true) => format!(
            "drained with force: no replica took over, the only writer was stopped; {archived}"
        ),
        (None, false) => format!("drained: {archived}; Postgres stopped"),
    })
}

/// Kubernetes: this pod and all its shard's pods are being deleted (see
/// `KubeLeadership::shard_going_away`); false when unknown.
async fn shard_going_away(ctx: &Context) -> bool {
    match &ctx.kube {
        Some(kube) => kube.shard_going_away().await.unwrap_or_else(|e| {
            tracing::warn!("cannot list the shard's pods: {e}");
            false
        }),
        None => false,
    }
}

/// On the primary before it hands over: completes the current segment and waits until it and
/// every segment before it are archived, so what was committed before the drain is in the
/// archive under its own name.
async fn archive_current(ctx: &Context, deadline: Instant) -> Result<String, String> {
    let client = ctx
        .monitor
        .client()
        .await
        .map_err(|e| format!("cannot connect to Postgres to switch WAL: {e}"))?;
    let seg: String = client
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .map_err(|e| format!("pg_switch_wal failed: {e}"))?
        .get(0);
    let pg_wal = ctx.cfg.data_dir.join("pg_wal");
    loop {
        let pending: Vec<String> = crate::archive::push::ready_files(&pg_wal)
            .map_err(|e| format!("cannot list {}: {e}", pg_wal.display()))?
            .into_iter()
            .filter(|n| n.as_str() <= seg.as_str())
            .collect();
        if pending.is_empty() {
            return Ok(seg);
        }
        if Instant::now() >= deadline {
            let why = ctx
                .archiver
                .as_ref()
                .and_then(|a| a.status().last_failure)
                .unwrap_or_else(|| "no failure recorded".into());
            return Err(format!(
                "WAL is not archived in time: {} file(s) still waiting, the first {} (last archiving failure: {why})",
                pending.len(),
                pending[0]
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Once Postgres is stopped: archives every file it left ready (its archiver pushes what is
/// complete as it shuts down; this covers an archiver that gave up or a fenced primary), and,
/// when the drain stopped the only writer, its last segment as `<name>.partial` (no other
/// instance will archive it). The last name archived, if any.
async fn archive_leftovers(ctx: &Context, only_writer: bool) -> Result<Option<String>, String> {
    let Some(archiver) = &ctx.archiver else {
        return Ok(None);
    };
    let pg_wal = ctx.cfg.data_dir.join("pg_wal");
    let mut last = None;
    let ready = crate::archive::push::ready_files(&pg_wal)
        .map_err(|e| format!("cannot list {}: {e}", pg_wal.display()))?;
    for name in ready {
        archiver
            .push(&name)
            .await
            .map_err(|e| format!("archiving {name}: {e}"))?;
        // As Postgres' archiver does once a file is stored.
        let status = pg_wal.join("archive_status");
        let _ = std::fs::rename(
            status.join(format!("{name}.ready")),
            status.join(format!("{name}.done")),
        );
        last = Some(name);
    }
    if only_writer {
        let cd = crate::replication::controldata(&ctx.cfg.data_dir)?;
        let lsn = pgpilot_common::wal::Lsn::parse(&cd.checkpoint_lsn)
            .ok_or_else(|| format!("cannot read the checkpoint position {}", cd.checkpoint_lsn))?;
        let seg_size = segment_size(&pg_wal)?;
        let seg =
            pgpilot_common::wal::Segment::containing(cd.timeline, lsn, seg_size).name(seg_size);
        let partial = format!("{seg}.partial");
        archiver
            .push_as(&seg, &partial)
            .await
            .map_err(|e| format!("archiving {partial}: {e}"))?;
        last = Some(partial);
    }
    Ok(last)
}

/// The WAL segment size of this cluster: the size of any segment file in pg_wal.
fn segment_size(pg_wal: &std::path::Path) -> Result<u64, String> {
    let rd =
        std::fs::read_dir(pg_wal).map_err(|e| format!("cannot list {}: {e}", pg_wal.display()))?;
    rd.filter_map(Result::ok)
        .find(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit())
        })
        .and_then(|e| e.metadata().ok())
        .map(|m| m.len())
        .filter(|l| l.is_power_of_two())
        .ok_or_else(|| {
            format!(
                "no WAL segment in {} to size the last one by",
                pg_wal.display()
            )
        })
}

/// Kubernetes: the pod annotations say where the drain stands.
async fn report(ctx: &Context, rec: &DrainRecord) {
    let Some(kube) = &ctx.kube else { return };
    let st = rec.view();
    let value = match (st.state, st.step.as_deref()) {
        (DrainState::Draining, _) => Some(ACKNOWLEDGED),
        (DrainState::Drained, _) => Some(FINISHED),
        (DrainState::Running, Some("failed")) => Some(FAILED),
        (DrainState::Running, _) => None,
    };
    if let Err(e) = kube.annotate_drain(value, &st.message).await {
        tracing::warn!("cannot annotate the pod with the drain's progress: {e}");
    }
}

async fn event(ctx: &Context, type_: &str, reason: &str, message: &str) {
    if let Some(kube) = &ctx.kube {
        kube.event(type_, reason, message).await;
    }
}

/// What the annotation asks of the agent, given the value last seen.
#[derive(Debug, PartialEq, Eq)]
pub enum Ask {
    Nothing,
    Start,
    Cancel,
    /// An unknown value: say so in the message, do nothing.
    Unknown(String),
}

/// The annotation's meaning (pure, for the unit test): `Started` starts a drain; its removal
/// while one runs cancels it; the agent's own values are no request.
pub fn ask(previous: Option<&str>, now: Option<&str>, state: DrainState) -> Ask {
    match now {
        Some(STARTED) if state == DrainState::Running => Ask::Start,
        Some(STARTED | ACKNOWLEDGED | FINISHED | FAILED) => Ask::Nothing,
        Some(other) if previous != Some(other) => Ask::Unknown(other.to_string()),
        Some(_) => Ask::Nothing,
        None if previous.is_some() && state == DrainState::Draining => Ask::Cancel,
        None => Ask::Nothing,
    }
}

/// Kubernetes: watches this pod's annotations, so `kubectl annotate pod … pgpilot.io/drain=Started`
/// starts a drain within seconds, and removing it cancels one.
pub async fn watch_annotation(
    handle: Handle,
    kube: Arc<crate::replication::lease::KubeLeadership>,
    shutdown: CancellationToken,
) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let stream = watcher(
        kube.watched_pods(),
        watcher::Config::default().fields(&format!("metadata.name={}", kube.me())),
    )
    .default_backoff()
    .applied_objects();
    futures::pin_mut!(stream);
    let mut previous: Option<String> = None;
    loop {
        let pod = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = stream.next() => match next {
                Some(Ok(pod)) => pod,
                Some(Err(e)) => {
                    tracing::warn!("watching this pod's annotations: {e}");
                    continue;
                }
                None => return,
            },
        };
        let now = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION))
            .cloned();
        let state = handle.drain_record().state();
        match ask(previous.as_deref(), now.as_deref(), state) {
            Ask::Nothing => {}
            Ask::Start => {
                if let Err(e) = start(&handle, DrainRequest::default(), "annotation").await {
                    tracing::warn!("the annotation asks for a drain, refused: {e}");
                    if let Err(e) = kube
                        .annotate_drain(Some(FAILED), &format!("drain refused: {e}"))
                        .await
                    {
                        tracing::warn!("cannot annotate the pod: {e}");
                    }
                }
            }
            Ask::Cancel => {
                if let Err(e) = handle.cancel_drain("the pgpilot.io/drain annotation was removed") {
                    tracing::warn!("the annotation was removed, but the drain goes on: {e}");
                }
            }
            Ask::Unknown(v) => {
                let msg = format!(
                    "unknown value {v:?} of {ANNOTATION}: set {STARTED} to drain this pod (remove it to cancel); nothing done"
                );
                tracing::warn!("{msg}");
                if let Err(e) = kube.annotate_message(&msg).await {
                    tracing::warn!("cannot annotate the pod: {e}");
                }
            }
        }
        previous = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotation_starts_cancels_or_is_named_unknown() {
        use DrainState::*;
        assert_eq!(ask(None, Some("Started"), Running), Ask::Start);
        // A failed drain set Failed; Started again retries.
        assert_eq!(ask(Some("Failed"), Some("Started"), Running), Ask::Start);
        // The agent's own values, and Started while a drain runs, ask for nothing.
        assert_eq!(
            ask(Some("Started"), Some("Started"), Draining),
            Ask::Nothing
        );
        assert_eq!(
            ask(Some("Started"), Some("Acknowledged"), Draining),
            Ask::Nothing
        );
        assert_eq!(
            ask(Some("Acknowledged"), Some("Finished"), Drained),
            Ask::Nothing
        );
        // Removed while draining: cancel; absent from the start (an API drain): nothing.
        assert_eq!(ask(Some("Acknowledged"), None, Draining), Ask::Cancel);
        assert_eq!(ask(None, None, Draining), Ask::Nothing);
        assert_eq!(ask(Some("Finished"), None, Drained), Ask::Nothing);
        // A typo is named once.
        assert_eq!(
            ask(None, Some("Strated"), Running),
            Ask::Unknown("Strated".into())
        );
        assert_eq!(ask(Some("Strated"), Some("Strated"), Running), Ask::Nothing);
    }
}
