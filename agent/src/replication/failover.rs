//! Kubernetes mode's loop, once per renew interval (docs/kubernetes.md):
//!
//! - **Primary:** renew the Lease (guarded by its resourceVersion), publishing the WAL position
//!   in it. Past the renew deadline without a renewal, or when the Lease names someone else:
//!   fence, that is demote (fast shutdown, which ends every session and refuses new ones, then
//!   start as a standby following nobody). The deadline is shorter than the Lease duration, so
//!   the fence happens before any replica may count the Lease as expired.
//! - **Replica:** count the Lease as expired `lease_duration` after it last *changed*, by this
//!   agent's own clock (as client-go does: no trust in other clocks). Then take it only if it
//!   is healthy, within `maximum_lag_on_failover` of the last published WAL position, and no
//!   reachable replica has received more; the take is a guarded write, so of two racers one
//!   gets 409. Then promote. The others see the new holder and re-register with it.
//! - **Former primary** (fenced or restarted after losing the Lease): follow the holder, with
//!   pg_rewind where its WAL went past the fork.
//! - **Label** the pod `pgpilot.io/role=primary` only while it holds the Lease as a running
//!   primary, `replica` otherwise; the label goes first when fencing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgpilot_common::api::StatusResponse;
use pgpilot_common::state::{AgentState, Role};
use tokio_util::sync::CancellationToken;

use super::lease::{KubeLeadership, LeaseRecord, Write};
use crate::core::Handle;

/// How long a candidate waits for a peer's status. A peer that does not answer in time is
/// left out, so too short a bound lets a loaded peer with more WAL lose to one with less
/// (which then rewinds it).
const PEER_TIMEOUT: Duration = Duration::from_secs(3);

/// Which replica may take an expired Lease, given this one's WAL position and what the
/// reachable peers report. Pure, for the unit tests.
pub fn may_take_over(
    me: &str,
    my_lsn: u64,
    leader_lsn: Option<u64>,
    max_lag: Option<u64>,
    peers: &[(String, u64)],
) -> Result<(), String> {
    if let (Some(leader), Some(max)) = (leader_lsn, max_lag) {
        let lag = leader.saturating_sub(my_lsn);
        if lag > max {
            return Err(format!(
                "{lag} bytes behind the primary's last published WAL position, more than maximum_lag_on_failover ({max})"
            ));
        }
    }
    if let Some((name, lsn)) = peers
        .iter()
        .find(|(name, lsn)| *lsn > my_lsn || (*lsn == my_lsn && name.as_str() < me))
    {
        return Err(format!(
            "{name} has received more WAL ({}), or as much and comes first by name",
            super::format_lsn(*lsn)
        ));
    }
    Ok(())
}

/// What a replica has of the WAL: the furthest of received and replayed.
pub fn wal_position(receive: Option<&str>, replay: Option<&str>) -> Option<u64> {
    let r = receive.and_then(super::lsn);
    let p = replay.and_then(super::lsn);
    r.max(p)
}

fn peer_position(st: &StatusResponse) -> Option<u64> {
    if st.state.role() != Some(Role::Replica) {
        return None;
    }
    let r = st.replication.as_ref()?;
    wal_position(r.receive_lsn.as_deref(), r.replay_lsn.as_deref())
}

struct Loop {
    handle: Handle,
    lead: Arc<KubeLeadership>,
    /// When this primary last renewed (or took) the Lease.
    renewed: Option<Instant>,
    /// The Lease's resourceVersion as last seen, and when it was first seen (our clock).
    observed: Option<(String, Instant)>,
    labelled: Option<&'static str>,
    /// Whether the last step saw this instance running as the primary.
    was_primary: bool,
    last_follow: Option<Instant>,
    /// Synchronous mode: what this primary set up, `None` until it did.
    sync: Option<SyncState>,
}

/// Synchronous mode, on the primary.
#[derive(Clone)]
struct SyncState {
    /// The standby chosen to stay (`None`: asynchronous, nobody streams).
    standby: Option<String>,
    /// Every replica whose flush a commit waits for (`synchronous_standby_names`).
    waited: std::collections::BTreeSet<String>,
    /// The WAL position when `standby` was first waited on: once it has flushed past it, it
    /// holds every acknowledged commit and is named alone.
    since: u64,
}

/// `synchronous_standby_names` waiting for every one of `names` (a non-empty set).
pub fn standby_names(names: &std::collections::BTreeSet<String>) -> String {
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("\"{}\"", n.replace('"', "\"\"")))
        .collect();
    match quoted.as_slice() {
        [one] => one.clone(),
        all => format!("FIRST {} ({})", all.len(), all.join(", ")),
    }
}

/// Runs until `shutdown`. `renewed_at_start`: the Lease was taken or renewed just before the
/// executor started.
pub async fn run(
    handle: Handle,
    lead: Arc<KubeLeadership>,
    renewed_at_start: bool,
    shutdown: CancellationToken,
) {
    let mut l = Loop {
        handle,
        renewed: renewed_at_start.then(Instant::now),
        observed: None,
        labelled: None,
        was_primary: false,
        last_follow: None,
        sync: None,
        lead,
    };
    let mut tick = tokio::time::interval(l.lead.settings.renew_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // A primary also wakes at its renew deadline, not at the next tick after it.
        let deadline = l.renew_deadline(&l.handle.state());
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            _ = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        l.step().await;
    }
}

impl Loop {
    async fn step(&mut self) {
        let state = self.handle.state();
        // Becoming a running primary (after initdb, a start or a promotion, during which nobody
        // renewed): its first renewal is attempted whatever the time since the Lease was taken;
        // the strict deadline runs from a renewal made as a running primary.
        let primary_now = matches!(
            state,
            AgentState::Running {
                role: Role::Primary
            }
        );
        if primary_now && !self.was_primary {
            self.renewed = None;
        }
        self.was_primary = primary_now;
        // A primary must stop taking writes at its renew deadline, whatever the API server
        // does: a call that hangs (a blackholed connection waits out its own timeout, 2.5 s)
        // must not push the fence towards the Lease's expiry, when a replica may take over.
        let deadline = self.renew_deadline(&state);
        let read = match deadline {
            Some(at) => match tokio::time::timeout_at(at, self.lead.refresh()).await {
                Ok(read) => read,
                Err(_) => return self.fence(&self.deadline_passed()).await,
            },
            None => self.lead.refresh().await,
        };
        if let Ok(rec) = &read {
            let rv = rec.resource_version().unwrap_or("").to_string();
            if self.observed.as_ref().is_none_or(|(seen, _)| *seen != rv) {
                self.observed = Some((rv, Instant::now()));
            }
        }
        match state.role() {
            Some(Role::Primary) if matches!(state, AgentState::Running { .. }) => {
                self.as_primary(read).await
            }
            Some(Role::Replica) => {
                self.renewed = None;
                // Promotion resets synchronous_standby_names: set it up again as primary.
                self.sync = None;
                if let Ok(rec) = read {
                    self.as_replica(rec).await;
                }
            }
            _ => {}
        }
        self.label().await;
    }

    /// When this primary must have renewed its Lease by, or fence (`None` when it is not a
    /// running primary, or has not renewed yet: right after a promotion its first renewal is
    /// attempted whatever the time since the hand-over, as before).
    fn renew_deadline(&self, state: &AgentState) -> Option<tokio::time::Instant> {
        if !matches!(
            state,
            AgentState::Running {
                role: Role::Primary
            }
        ) {
            return None;
        }
        self.renewed_by()
    }

    /// The last renewal plus the renew deadline.
    fn renewed_by(&self) -> Option<tokio::time::Instant> {
        self.renewed
            .map(|t| tokio::time::Instant::from_std(t + self.lead.settings.renew_deadline))
    }

    fn deadline_passed(&self) -> String {
        format!(
            "the Lease {} could not be renewed for {}s (renew deadline)",
            self.lead.name,
            self.lead.settings.renew_deadline.as_secs()
        )
    }

    async fn as_primary(&mut self, read: anyhow::Result<LeaseRecord>) {
        let lead = self.lead.clone();
        let deadline = self.renewed_by();
        if self.renewed.is_none() {
            // Promoted by a switchover since the last tick: the hand-over was the last renewal,
            // so one failed read right after it is not a reason to fence.
            self.renewed = lead.held_since();
        }
        let metrics = &self.handle.ctx.metrics.replication;
        match read {
            Ok(rec)
                if rec.holder() == Some(lead.me())
                    || (rec.holder().is_none() && self.renewed.is_some()) =>
            {
                let lsn = self
                    .handle
                    .ctx
                    .monitor
                    .status()
                    .await
                    .ok()
                    .and_then(|s| s.current_lsn);
                let write = lead.write(&rec, Some(lead.me()), lsn.as_deref());
                let written = match deadline {
                    Some(at) => tokio::time::timeout_at(at, write)
                        .await
                        .unwrap_or_else(|_| {
                            Err(anyhow::anyhow!(
                                "the renewal did not answer before the deadline"
                            ))
                        }),
                    None => write.await,
                };
                match written {
                    Ok(Write::Done) => {
                        self.renewed = Some(Instant::now());
                        if lead.settings.synchronous {
                            self.manage_sync().await;
                        }
                    }
                    Ok(Write::Conflict) => {
                        return self
                            .fence("the Lease changed under this primary (409 on renewal)")
                            .await;
                    }
                    Err(e) => {
                        metrics.lease_renew_failures.inc();
                        tracing::warn!(lease = %lead.name, "cannot renew the Lease: {e}");
                    }
                }
            }
            Ok(rec) => {
                let why = format!(
                    "the Lease {} is held by {}, not this pod",
                    lead.name,
                    rec.holder().unwrap_or("nobody")
                );
                return self.fence(&why).await;
            }
            Err(e) => {
                metrics.lease_renew_failures.inc();
                tracing::warn!(lease = %lead.name, "cannot read the Lease: {e}");
            }
        }
        if self
            .renewed
            .is_none_or(|t| t.elapsed() >= lead.settings.renew_deadline)
        {
            self.fence(&self.deadline_passed()).await;
        }
    }

    /// Synchronous mode, on the primary right after a renewal (Patroni's synchronous_mode with
    /// one synchronous standby, docs/kubernetes.md). Two sets, kept in this order:
    ///
    /// - **named** (the Lease's `pgpilot.io/sync`): who may take over. Each holds every
    ///   acknowledged commit.
    /// - **waited on** (`synchronous_standby_names`, `FIRST n` of all of them): whose flush a
    ///   commit needs. Always a superset of the named, so once a named replica takes over and
    ///   stops streaming, the old primary cannot acknowledge anything, even resumed from a
    ///   freeze before its agent fences it; and what the winner acknowledged before promoting,
    ///   it replays when promoting.
    ///
    /// A new standby is waited on first, then named (alone) once it has flushed past the point
    /// where it was added; then the others are no longer waited on. Without any streaming
    /// replica, nobody is named first, then commits go asynchronous.
    async fn manage_sync(&mut self) {
        use std::collections::BTreeSet;
        let ctx = self.handle.ctx.clone();
        let lead = self.lead.clone();
        let Ok(client) = ctx.monitor.client().await else {
            return;
        };
        let Ok(replicas) = super::sql::replicas(&client).await else {
            return;
        };
        let streaming: Vec<&pgpilot_common::api::ReplicaView> =
            replicas.iter().filter(|r| r.state == "streaming").collect();
        let rec = lead.record();
        let named: BTreeSet<String> = rec
            .sync_set()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n != lead.me())
            .collect();
        // After a restart of the agent, what Postgres waits on is not known: set it again.
        let known = self.sync.clone();
        let current = known.as_ref().and_then(|s| s.standby.clone());
        let want = current
            .filter(|c| streaming.iter().any(|r| r.name == *c))
            .or_else(|| streaming.first().map(|r| r.name.clone()));
        let Some(want) = want else {
            // Nobody streams: forget the names, then stop waiting (asynchronous).
            if !named.is_empty()
                && !matches!(
                    lead.write_sync(&rec, &BTreeSet::new()).await,
                    Ok(Write::Done)
                )
            {
                return;
            }
            if known.as_ref().is_none_or(|s| !s.waited.is_empty()) {
                if let Err(why) = super::sql::set_synchronous_standby(&client, None).await {
                    tracing::warn!("cannot reset synchronous_standby_names: {why}");
                    return;
                }
                tracing::info!(standby = "none: asynchronous", "synchronous standby");
            }
            self.sync = Some(SyncState {
                standby: None,
                waited: BTreeSet::new(),
                since: 0,
            });
            return;
        };
        if known
            .as_ref()
            .is_none_or(|s| s.standby.as_ref() != Some(&want) || !s.waited.contains(&want))
        {
            // Wait on the new standby as well as on every named one.
            let mut all = named.clone();
            all.insert(want.clone());
            if let Err(why) =
                super::sql::set_synchronous_standby(&client, Some(&standby_names(&all))).await
            {
                tracing::warn!("cannot set synchronous_standby_names: {why}");
                return;
            }
            let since = ctx
                .monitor
                .status()
                .await
                .ok()
                .and_then(|s| s.current_lsn)
                .and_then(|l| super::lsn(&l))
                .unwrap_or(u64::MAX);
            tracing::info!(standby = %want, waited_on = %standby_names(&all), "synchronous standby");
            self.sync = Some(SyncState {
                standby: Some(want),
                waited: all,
                since,
            });
            return;
        }
        let state = known.expect("checked above");
        let caught_up = streaming.iter().any(|r| {
            r.name == want
                && r.flush_lsn
                    .as_deref()
                    .and_then(super::lsn)
                    .is_some_and(|f| f >= state.since)
        });
        if !caught_up {
            return;
        }
        let only: BTreeSet<String> = [want].into_iter().collect();
        if rec.sync_set().unwrap_or_default() != only
            && !matches!(lead.write_sync(&rec, &only).await, Ok(Write::Done))
        {
            return;
        }
        if state.waited != only {
            if let Err(why) =
                super::sql::set_synchronous_standby(&client, Some(&standby_names(&only))).await
            {
                tracing::warn!("cannot set synchronous_standby_names: {why}");
                return;
            }
            if let Some(s) = self.sync.as_mut() {
                s.waited = only;
            }
        }
    }

    /// Stops taking writes: a demote first, then the label. The demote must not wait for the
    /// API server: when the fence is for a Lease that could not be renewed, the label (an API
    /// call) would hang until its timeout while Postgres kept acknowledging writes towards the
    /// Lease's expiry.
    async fn fence(&mut self, why: &str) {
        let lead = self.lead.clone();
        let ctx = self.handle.ctx.clone();
        tracing::error!("fencing: {why}: stopping writes and restarting as a standby");
        lead.step_down();
        self.renewed = None;
        self.sync = None;
        ctx.metrics.replication.fences.inc();
        ctx.metrics.replication.lease_held.set(0);
        ctx.metrics
            .replication
            .last_transition
            .set(jiff::Timestamp::now().as_second() as f64);
        let demoted = self.handle.demote().await;
        self.label().await;
        match demoted {
            Ok(_) => {
                lead.event(
                    "Warning",
                    "Fenced",
                    &format!("stopped taking writes: {why}"),
                )
                .await
            }
            Err(e) => {
                tracing::error!("fencing: demote failed ({e}); stopping Postgres");
                let _ = self
                    .handle
                    .stop(pgpilot_common::api::ShutdownRequest {
                        mode: pgpilot_common::api::ShutdownMode::Immediate,
                        cancel_backup: true,
                    })
                    .await;
                lead.event(
                    "Warning",
                    "Fenced",
                    &format!("stopped Postgres: {why}; demote failed: {e}"),
                )
                .await;
            }
        }
    }

    async fn as_replica(&mut self, rec: LeaseRecord) {
        let lead = self.lead.clone();
        if rec.holder() == Some(lead.me()) {
            return;
        }
        let snap = self.handle.snapshot();
        // Follow the holder when this replica does not already: a former primary (rewound if
        // its WAL went past the fork), or a replica of a primary that lost the Lease, whose
        // stream to a hung primary may look alive until wal_receiver_timeout.
        let ctx = self.handle.ctx.clone();
        let expired = rec.holder().is_none()
            || self
                .observed
                .as_ref()
                .is_some_and(|(_, at)| at.elapsed() >= lead.settings.lease_duration);
        if !expired {
            // A live holder: an earlier refusal to take over no longer stands, also while this
            // replica is busy following it (a rewind, or a clone that takes minutes).
            self.lead.set_refusal(None);
        }
        let former_primary = super::load_primary_end(&ctx.cfg).is_some()
            && !snap.receiver.as_ref().is_some_and(|r| r.streaming);
        if let Some(url) = rec.holder().and_then(|h| lead.url_of(h))
            && (former_primary || snap.upstream.as_deref() != Some(url.as_str()))
            && self
                .last_follow
                .is_none_or(|t| t.elapsed() > Duration::from_secs(2))
        {
            self.last_follow = Some(Instant::now());
            let req = pgpilot_common::api::FollowRequest {
                primary: url.clone(),
            };
            match self.handle.follow(req).await {
                Ok(_) => {
                    tracing::info!(primary = %url, "rejoined as a replica of the Lease holder")
                }
                // Diverged and pg_rewind cannot bring it back (the WAL since the last common
                // checkpoint is gone, or it crashed): clone the holder again, as CloudNativePG
                // does. What it wrote past the fork was never on the new primary's timeline.
                Err(e) if e.to_string().contains(super::REINITIALIZE_HINT) => {
                    tracing::warn!(primary = %url, "cannot rewind onto the Lease holder ({e}); cloning it again");
                    lead.event(
                        "Warning",
                        "Reinitializing",
                        &format!("cannot rewind onto {url}: cloning it again"),
                    )
                    .await;
                    let req = pgpilot_common::api::ReinitializeRequest {
                        primary: Some(url.clone()),
                    };
                    if let Err(e) = self.handle.reinitialize(req).await {
                        tracing::error!(primary = %url, "reinitialize failed: {e}");
                    }
                }
                Err(e) => tracing::warn!(primary = %url, "cannot follow the Lease holder yet: {e}"),
            }
            return;
        }
        if self.handle.drain_record().state() != pgpilot_common::state::DrainState::Running {
            self.lead.set_refusal(None);
            return;
        }
        if !expired {
            self.lead.set_refusal(None);
            return;
        }
        // Synchronous mode: only the named replicas hold every acknowledged commit; they are
        // the only candidates and the only ones compared.
        let named = rec.sync_set().unwrap_or_default();
        if lead.settings.synchronous && !named.contains(&ctx.cfg.replication.name) {
            let named = named.into_iter().collect::<Vec<_>>().join(", ");
            return self.refuse(format!(
                "synchronous mode: only a replica the primary named as synchronous ({}) may take over",
                if named.is_empty() { "none" } else { &named }
            ));
        }
        let Some(mine) = snap
            .receiver
            .as_ref()
            .and_then(|r| wal_position(r.receive_lsn.as_deref(), r.replay_lsn.as_deref()))
        else {
            return self.refuse("its WAL position is not known yet".into());
        };
        let mut peers = Vec::new();
        for (name, url) in lead.peers() {
            if Some(name.as_str()) == rec.holder()
                || (lead.settings.synchronous && !named.contains(&name))
            {
                continue;
            }
            let client = super::switchover::peer(&ctx, &url);
            match tokio::time::timeout(PEER_TIMEOUT, client.status()).await {
                Ok(Ok(st)) => match peer_position(&st) {
                    Some(lsn) => peers.push((name, lsn)),
                    None => {
                        tracing::info!(peer = %name, state = %st.state, "peer is not a replica with a known WAL position: left out")
                    }
                },
                Ok(Err(e)) => tracing::info!(peer = %name, "peer left out: {e}"),
                Err(_) => {
                    tracing::info!(peer = %name, "peer left out: no answer within {PEER_TIMEOUT:?}")
                }
            }
        }
        if let Err(why) = may_take_over(
            lead.me(),
            mine,
            rec.leader_lsn(),
            lead.settings.maximum_lag_on_failover,
            &peers,
        ) {
            return self.refuse(why);
        }
        let old = rec.holder().unwrap_or("nobody").to_string();
        match lead.write(&rec, Some(lead.me()), None).await {
            Ok(Write::Done) => {}
            Ok(Write::Conflict) => {
                tracing::info!("another replica took the Lease first");
                return;
            }
            Err(e) => {
                tracing::warn!("cannot take the expired Lease: {e}");
                return;
            }
        }
        ctx.metrics.replication.failovers.inc();
        ctx.metrics
            .replication
            .last_transition
            .set(jiff::Timestamp::now().as_second() as f64);
        tracing::warn!(previous = %old, at = %super::format_lsn(mine), "took the expired Lease: promoting");
        lead.event(
            "Warning",
            "LeaseTaken",
            &format!(
                "the Lease of {old} expired; this replica had the most WAL ({}) and takes over",
                super::format_lsn(mine)
            ),
        )
        .await;
        self.renewed = Some(Instant::now());
        match self.handle.promote().await {
            Ok(_) => {
                lead.event("Normal", "Promoted", "promoted to primary after a failover")
                    .await
            }
            Err(e) => {
                tracing::error!("took the Lease but the promotion failed: {e}; releasing it");
                let _ = super::Leadership::set_leader(&*lead, None).await;
            }
        }
    }

    fn refuse(&mut self, why: String) {
        // Logged once per change; the current one is in /v1/status.
        if self.lead.refusal().as_deref() != Some(why.as_str()) {
            tracing::warn!("the Lease expired, but this replica does not take over: {why}");
            self.lead.set_refusal(Some(why));
        }
    }

    async fn label(&mut self) {
        let state = self.handle.state();
        let primary = state
            == AgentState::Running {
                role: Role::Primary,
            }
            && self.lead.holds();
        self.handle
            .ctx
            .metrics
            .replication
            .lease_held
            .set(i64::from(primary));
        let want = if primary { "primary" } else { "replica" };
        if self.labelled == Some(want) {
            return;
        }
        match self.lead.label_role(want).await {
            Ok(()) => self.labelled = Some(want),
            Err(e) => tracing::warn!(role = want, "cannot label this pod: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_waits_for_every_replica_that_may_take_over() {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        assert_eq!(standby_names(&set(&["db-1"])), "\"db-1\"");
        assert_eq!(
            standby_names(&set(&["db-2", "db-0"])),
            "FIRST 2 (\"db-0\", \"db-2\")"
        );
        assert_eq!(standby_names(&set(&["a\"b"])), "\"a\"\"b\"");
    }

    #[test]
    fn the_replica_with_the_most_wal_takes_over_and_ties_go_by_name() {
        let peers = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(n, l)| (n.to_string(), *l)).collect()
        };
        assert!(may_take_over("db-1", 100, None, None, &peers(&[("db-2", 90)])).is_ok());
        let e = may_take_over("db-1", 100, None, None, &peers(&[("db-2", 101)])).unwrap_err();
        assert!(e.contains("db-2"), "{e}");
        // A tie: exactly one of the two goes.
        assert!(may_take_over("db-1", 100, None, None, &peers(&[("db-2", 100)])).is_ok());
        assert!(may_take_over("db-2", 100, None, None, &peers(&[("db-1", 100)])).is_err());
        // No peer reachable: the lag bound alone decides.
        assert!(may_take_over("db-1", 100, Some(150), Some(64), &[]).is_ok());
        let e = may_take_over("db-1", 100, Some(200), Some(64), &[]).unwrap_err();
        assert!(e.contains("maximum_lag_on_failover"), "{e}");
        // Accepting any loss.
        assert!(may_take_over("db-1", 100, Some(1 << 40), None, &[]).is_ok());
    }

    #[test]
    fn the_position_is_the_furthest_of_received_and_replayed() {
        assert_eq!(wal_position(Some("0/10"), Some("0/8")), Some(16));
        assert_eq!(wal_position(None, Some("0/8")), Some(8));
        assert_eq!(wal_position(None, None), None);
    }
}
