//! Gated, shard-by-shard rollouts (docs/rollouts.md; shared/DESIGN.md, "Operator"): the
//! planner. A pure function from what the reconciler observed (each shard's pods with their
//! revision, role, readiness, lag, drain annotation; the last rollout status; the time) to the
//! next step and the rollout status to write. No I/O here: the reconciler applies the step.
//!
//! Order: the canary shards (`canaryShards`, the first ones by name), then the others, one
//! shard at a time. Inside a shard: replicas one at a time (drain handshake, delete, wait
//! Ready and caught up), then a switchover to an updated replica, then the old primary the
//! same way as a replica; then a soak with health checks; then the next shard. Manual mode
//! waits for `release` to name the revision before the canaries and again (`<revision>/all`)
//! after them. Any bad sign halts with the reason; a halted rollout stays halted until the
//! spec changes.

use std::time::Duration;

use pgpilot_common::crd::{RolloutMode, RolloutStatus};
use pgpilot_common::names::{DRAIN_FAILED, DRAIN_FINISHED};

pub const IDLE: &str = "Idle";
pub const PENDING: &str = "Pending";
pub const WAITING: &str = "WaitingForRelease";
pub const IN_PROGRESS: &str = "InProgress";
pub const HALTED: &str = "Halted";
pub const COMPLETE: &str = "Complete";

/// A replica of an old revision not Ready for this long is broken, not restarting (a former
/// primary rejoining after a switchover is unready for a few seconds).
pub const BROKEN_AFTER: Duration = Duration::from_secs(30);

/// How long the pods' role labels may take to follow the rollout's own switchover.
pub const SWITCHOVER_LABELS: Duration = Duration::from_secs(60);

/// A pod as the reconciler saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub name: String,
    /// `status.podIP`: where its agent answers.
    pub ip: Option<String>,
    /// `pgpilot.io/revision` of the pod.
    pub revision: Option<String>,
    pub ready: bool,
    /// Labelled `pgpilot.io/role=primary` by its agent.
    pub primary: bool,
    /// Being deleted.
    pub deleting: bool,
    /// Time since the pod was created.
    pub age: Duration,
    /// Time since it last became not Ready (zero when Ready).
    pub unready_for: Duration,
    /// A replica's lag behind its primary, as its agent reports it.
    pub lag_bytes: Option<u64>,
    /// Segments waiting to be archived, as its agent reports it (a primary's).
    pub archive_backlog: Option<usize>,
    /// A replica's WAL receiver streams from the primary, as its agent reports it.
    pub streaming: bool,
    /// `pgpilot.io/drain` and its message.
    pub drain: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShardView {
    pub name: String,
    pub pods: Vec<PodView>,
    /// `instancesPerShard`.
    pub instances: usize,
}

impl ShardView {
    fn primary(&self) -> Option<&PodView> {
        let mut p = self.pods.iter().filter(|p| p.primary && !p.deleting);
        match (p.next(), p.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    }

    fn updated(&self, target: &str) -> bool {
        self.pods.len() >= self.instances
            && self
                .pods
                .iter()
                .all(|p| p.revision.as_deref() == Some(target))
    }

    /// Why the shard is not healthy: every instance there, ready, not being deleted, one
    /// primary, replicas within the lag bound, archiving keeping up.
    fn unhealthy(&self, s: &Settings) -> Option<String> {
        if self.pods.len() < self.instances {
            return Some(format!(
                "{} has {} of {} pods",
                self.name,
                self.pods.len(),
                self.instances
            ));
        }
        if let Some(p) = self.pods.iter().find(|p| !p.ready || p.deleting) {
            return Some(format!("{}: pod {} is not ready", self.name, p.name));
        }
        let Some(primary) = self.primary() else {
            return Some(format!("{} has no single primary", self.name));
        };
        if let Some(p) = self
            .pods
            .iter()
            .find(|p| !p.primary && p.lag_bytes.is_none_or(|l| l > s.max_lag_bytes))
        {
            return Some(format!(
                "{}: replica {} lags {} (bound {} bytes)",
                self.name,
                p.name,
                p.lag_bytes
                    .map_or("unknown".to_string(), |l| format!("{l} bytes")),
                s.max_lag_bytes
            ));
        }
        if let Some(b) = primary
            .archive_backlog
            .filter(|b| *b > s.max_archive_backlog)
        {
            return Some(format!(
                "{}: {b} WAL segments wait to be archived on {} (bound {})",
                self.name, primary.name, s.max_archive_backlog
            ));
        }
        None
    }
}

/// The rollout settings, with their defaults (docs/rollouts.md).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub mode: RolloutMode,
    pub canaries: usize,
    pub release: Option<String>,
    pub soak: Duration,
    pub max_lag_bytes: u64,
    pub ready_timeout: Duration,
    pub max_archive_backlog: usize,
}

impl Settings {
    pub fn of(spec: Option<&pgpilot_common::crd::RolloutSpec>) -> Settings {
        Settings {
            mode: spec.and_then(|r| r.mode).unwrap_or(RolloutMode::Automatic),
            canaries: spec.and_then(|r| r.canary_shards).unwrap_or(1) as usize,
            release: spec.and_then(|r| r.release.clone()),
            soak: Duration::from_secs(spec.and_then(|r| r.soak_seconds).unwrap_or(30).into()),
            max_lag_bytes: spec
                .and_then(|r| r.max_replica_lag_bytes)
                .unwrap_or(16 << 20),
            ready_timeout: Duration::from_secs(
                spec.and_then(|r| r.ready_timeout_seconds)
                    .unwrap_or(600)
                    .into(),
            ),
            max_archive_backlog: 16,
        }
    }

    fn released(&self, target: &str, all: bool) -> bool {
        if self.mode == RolloutMode::Automatic {
            return true;
        }
        match self.release.as_deref() {
            Some(r) if r == format!("{target}/all") => true,
            Some(r) => !all && r == target,
            None => false,
        }
    }
}

/// What the reconciler observed.
pub struct Observed<'a> {
    /// The revision every pod should run.
    pub target: &'a str,
    pub generation: Option<i64>,
    pub settings: &'a Settings,
    pub shards: &'a [ShardView],
    pub last: Option<&'a RolloutStatus>,
    /// Now, RFC 3339 (for the soak).
    pub now: jiff::Timestamp,
}

/// The next step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Nothing,
    WaitForRelease,
    /// Wait for pods to be ready, caught up, or for a drain to finish.
    Wait(String),
    DrainPod {
        shard: String,
        pod: String,
    },
    DeletePod {
        shard: String,
        pod: String,
    },
    Switchover {
        shard: String,
        from: String,
        to: String,
    },
    Soak {
        shard: String,
        left: Duration,
    },
    Halt(String),
    Complete,
}

impl Step {
    /// The shard this step acts on (drains, deletes, switches over), if any.
    pub fn touches(&self) -> Option<&str> {
        match self {
            Step::DrainPod { shard, .. }
            | Step::DeletePod { shard, .. }
            | Step::Switchover { shard, .. } => Some(shard),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Step::Nothing => "nothing to do".into(),
            Step::WaitForRelease => "waiting for spec.rollout.release".into(),
            Step::Wait(w) => format!("waiting: {w}"),
            Step::DrainPod { pod, .. } => format!("drain pod {pod}"),
            Step::DeletePod { pod, .. } => format!("delete pod {pod}"),
            Step::Switchover { from, to, .. } => format!("switchover {from} → {to}"),
            Step::Soak { shard, left } => format!("soak {shard}, {} s left", left.as_secs()),
            Step::Halt(r) => format!("halted: {r}"),
            Step::Complete => "complete".into(),
        }
    }
}

fn shard_order(o: &Observed<'_>) -> (Vec<String>, Vec<String>) {
    let names: Vec<String> = o.shards.iter().map(|s| s.name.clone()).collect();
    let n = o.settings.canaries.min(names.len());
    (names[..n].to_vec(), names[n..].to_vec())
}

/// The next step and the rollout status that goes with it.
pub fn plan(o: &Observed<'_>) -> (Step, RolloutStatus) {
    let fresh = RolloutStatus {
        phase: PENDING.into(),
        target_revision: Some(o.target.to_string()),
        ..Default::default()
    };
    let mut st = match o.last {
        Some(l) if l.target_revision.as_deref() == Some(o.target) => l.clone(),
        // A new revision: a new rollout (a halted one included).
        _ => fresh,
    };
    st.step = None;
    if st.phase == HALTED {
        if st.halted_generation == o.generation {
            return (Step::Nothing, st);
        }
        // The spec changed: resume where it stopped.
        st.phase = IN_PROGRESS.into();
        st.reason = None;
        st.halted_generation = None;
        st.shard_primary = None;
        st.soak_started = None;
    }
    let outdated: Vec<&ShardView> = o.shards.iter().filter(|s| !s.updated(o.target)).collect();
    let started = st.current_shard.is_some() || !st.completed_shards.is_empty();
    if outdated.is_empty() && !started && st.phase != IN_PROGRESS {
        // Nothing was ever rolled for this revision: the pods were made at it.
        let phase = if o.last.is_some_and(|l| l.phase == COMPLETE) {
            COMPLETE
        } else {
            IDLE
        };
        st.phase = phase.into();
        return (Step::Nothing, st);
    }
    let (canaries, rest) = shard_order(o);
    let s = o.settings;
    let halt = |mut st: RolloutStatus, reason: String| {
        st.phase = HALTED.into();
        st.reason = Some(reason.clone());
        st.halted_generation = o.generation;
        st.step = Some(format!("halted: {reason}"));
        (Step::Halt(reason), st)
    };
    // The shard in progress, or the next one. Shards already at the target (made or
    // recreated at it) need nothing.
    let current = match &st.current_shard {
        Some(c) => c.clone(),
        None => {
            for n in canaries.iter().chain(rest.iter()) {
                let at_target = o
                    .shards
                    .iter()
                    .any(|sh| &sh.name == n && sh.updated(o.target));
                if at_target && !st.completed_shards.contains(n) {
                    st.completed_shards.push(n.clone());
                }
            }
            let next = canaries
                .iter()
                .chain(rest.iter())
                .find(|n| !st.completed_shards.contains(n));
            let Some(next) = next else {
                st.phase = COMPLETE.into();
                st.current_shard = None;
                st.step = Some("complete".into());
                return (Step::Complete, st);
            };
            // Gates.
            let canary = canaries.contains(next);
            if !s.released(o.target, !canary) {
                st.phase = WAITING.into();
                st.step = Some(if canary {
                    format!("waiting for spec.rollout.release: {}", o.target)
                } else {
                    format!(
                        "canaries done; waiting for spec.rollout.release: {}/all",
                        o.target
                    )
                });
                return (Step::WaitForRelease, st);
            }
            if canary {
                st.canaries_released = true;
            }
            // Never start a shard while another one is unhealthy (the shard itself may be:
            // a broken pod of an old revision is what a new rollout repairs).
            if let Some(why) = o
                .shards
                .iter()
                .filter(|sh| &sh.name != next)
                .find_map(|sh| sh.unhealthy(s))
            {
                st.phase = IN_PROGRESS.into();
                let w = format!("before {next}: {why}");
                st.step = Some(format!("waiting: {w}"));
                return (Step::Wait(w), st);
            }
            st.shard_primary = None;
            st.soak_started = None;
            next.clone()
        }
    };
    st.phase = IN_PROGRESS.into();
    st.current_shard = Some(current.clone());
    let Some(shard) = o.shards.iter().find(|sh| sh.name == current) else {
        return halt(st, format!("shard {current} is gone"));
    };
    let step = shard_step(shard, o, &mut st);
    if let Step::Halt(reason) = step {
        return halt(st, reason);
    }
    if step == Step::Complete {
        // This shard is done: the next one on the next reconcile.
        st.completed_shards.push(current);
        st.current_shard = None;
        st.shard_primary = None;
        st.switchover_from = None;
        st.switchover_at = None;
        st.soak_started = None;
        let all_done = canaries
            .iter()
            .chain(rest.iter())
            .all(|n| st.completed_shards.contains(n));
        if all_done {
            st.phase = COMPLETE.into();
            st.step = Some("complete".into());
            return (Step::Complete, st);
        }
        st.step = Some("next shard".into());
        return (Step::Nothing, st);
    }
    st.step = Some(step.describe());
    (step, st)
}

/// The next step inside the shard being rolled; `Complete` when it is updated and soaked.
fn shard_step(shard: &ShardView, o: &Observed<'_>, st: &mut RolloutStatus) -> Step {
    let s = o.settings;
    let target = o.target;
    // A failover the rollout did not make: the agents decide leadership, never fight them.
    let primary = shard.primary().map(|p| p.name.clone());
    if let (Some(expected), Some(now)) = (&st.shard_primary, &primary) {
        if expected == now {
            st.switchover_from = None;
            st.switchover_at = None;
        } else if st.switchover_from.as_ref() == Some(now) {
            // The rollout's own switchover: the role labels follow within seconds.
            let began = st
                .switchover_at
                .as_deref()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .unwrap_or(o.now);
            let waited = Duration::try_from(o.now.duration_since(began)).unwrap_or_default();
            if waited < SWITCHOVER_LABELS {
                return Step::Wait(format!(
                    "the role labels to follow the switchover from {now} to {expected}"
                ));
            }
            return Step::Halt(format!(
                "the switchover of {} from {now} to {expected} did not happen within {} s",
                shard.name,
                SWITCHOVER_LABELS.as_secs()
            ));
        } else {
            return Step::Halt(format!(
                "{}'s primary changed from {expected} to {now} during the rollout (a failover): \
                 the operator does not fight the agents; fix the cause, then change the spec to resume",
                shard.name
            ));
        }
    }
    if st.shard_primary.is_none() {
        st.shard_primary = primary.clone();
    }
    // A drain in flight or done.
    for p in &shard.pods {
        match p.drain.as_ref().map(|(v, m)| (v.as_str(), m)) {
            Some((DRAIN_FAILED, msg)) => {
                return Step::Halt(format!("the drain of pod {} failed: {msg}", p.name));
            }
            Some((DRAIN_FINISHED, _)) if !p.deleting => {
                return Step::DeletePod {
                    shard: shard.name.clone(),
                    pod: p.name.clone(),
                };
            }
            Some((v, _)) if !p.deleting => {
                return Step::Wait(format!("the drain of pod {} ({v})", p.name));
            }
            _ => {}
        }
    }
    // Pods coming back.
    if shard.pods.len() < shard.instances {
        return Step::Wait(format!(
            "{} of {} pods of {}",
            shard.pods.len(),
            shard.instances,
            shard.name
        ));
    }
    for p in &shard.pods {
        if p.deleting {
            return Step::Wait(format!("pod {} to go", p.name));
        }
        if !p.ready {
            let updated = p.revision.as_deref() == Some(target);
            if updated && p.age > s.ready_timeout {
                return Step::Halt(format!(
                    "pod {} is not Ready {} s after its update (ready timeout {} s)",
                    p.name,
                    p.age.as_secs(),
                    s.ready_timeout.as_secs()
                ));
            }
            // A replica of an old revision that does not run (a previous, halted rollout
            // left it broken): replacing it is the repair, once the primary is there. It
            // serves nothing, and its agent may not be able to take a drain, so it is
            // deleted at once (its preStop drain still archives what it can).
            if !updated
                && !p.primary
                && p.unready_for > BROKEN_AFTER
                && shard.primary().is_some_and(|pr| pr.ready)
            {
                return Step::DeletePod {
                    shard: shard.name.clone(),
                    pod: p.name.clone(),
                };
            }
            return Step::Wait(format!("pod {} to be ready", p.name));
        }
        if !p.primary && p.lag_bytes.is_none_or(|l| l > s.max_lag_bytes) {
            return Step::Wait(format!("replica {} to catch up", p.name));
        }
    }
    let Some(primary) = shard.primary() else {
        return Step::Wait(format!("{} to have one primary", shard.name));
    };
    // Replicas first, one at a time.
    if let Some(r) = shard
        .pods
        .iter()
        .find(|p| !p.primary && p.revision.as_deref() != Some(target))
    {
        return Step::DrainPod {
            shard: shard.name.clone(),
            pod: r.name.clone(),
        };
    }
    if primary.revision.as_deref() != Some(target) {
        // Hand over to the updated replica that lags least, then the old primary is a replica.
        // Only a streaming one: a replica still catching up from its restart would make the
        // switchover wait, with writes stopped, for its WAL receiver.
        let replicas: Vec<&PodView> = shard.pods.iter().filter(|p| !p.primary).collect();
        let candidate = replicas
            .iter()
            .filter(|p| p.streaming)
            .min_by_key(|p| (p.lag_bytes.unwrap_or(u64::MAX), p.name.clone()));
        if candidate.is_none() && !replicas.is_empty() {
            return Step::Wait(format!(
                "an updated replica of {} to stream from the primary",
                shard.name
            ));
        }
        return match candidate {
            Some(c) => {
                // Recorded before the switchover runs (the reconciler writes this status
                // first): whatever happens to the operator, the new primary is expected.
                st.shard_primary = Some(c.name.clone());
                st.switchover_from = Some(primary.name.clone());
                st.switchover_at = Some(o.now.to_string());
                Step::Switchover {
                    shard: shard.name.clone(),
                    from: primary.name.clone(),
                    to: c.name.clone(),
                }
            }
            // A single instance: nobody can take over, so the pod is deleted, and its
            // preStop drain, seeing every pod of the shard going, archives and stops the only
            // writer (docs/drain.md). The write gap is a restart's.
            None => Step::DeletePod {
                shard: shard.name.clone(),
                pod: primary.name.clone(),
            },
        };
    }
    // Updated: soak, healthy all along.
    if let Some(why) = shard.unhealthy(s) {
        return Step::Halt(format!("during the soak: {why}"));
    }
    let started = st
        .soak_started
        .as_deref()
        .and_then(|t| t.parse::<jiff::Timestamp>().ok());
    let Some(started) = started else {
        st.soak_started = Some(o.now.to_string());
        return Step::Soak {
            shard: shard.name.clone(),
            left: s.soak,
        };
    };
    let soaked = Duration::try_from(o.now.duration_since(started)).unwrap_or_default();
    if soaked < s.soak {
        return Step::Soak {
            shard: shard.name.clone(),
            left: s.soak - soaked,
        };
    }
    Step::Complete
}

#[cfg(test)]
mod tests;
