//! The drain handshake's record (docs/drain.md): where this instance's drain stands. Shared by
//! the executor (admission reads its state), the drain task (`crate::drain`, which moves it on)
//! and the API.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgpilot_common::api::{DrainRequest, DrainStatus};
use pgpilot_common::state::{AgentState, DrainState};
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::error::AgentError;

/// How a drain ended.
#[derive(Debug)]
pub enum End {
    Finished(String),
    Failed(String),
    Cancelled(String),
}

/// The drain of this instance, shared by the executor (admission reads its state), the drain
/// task (which moves it on) and the API.
#[derive(Clone, Default)]
pub struct DrainRecord(Arc<Mutex<Inner>>);

#[derive(Default)]
struct Inner {
    status: DrainStatus,
    cancel: CancellationToken,
    started: Option<Instant>,
    /// Postgres is being stopped: too late to cancel.
    committed: bool,
}

impl DrainRecord {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().expect("drain lock")
    }

    /// Changes the status's details (the new primary, the last WAL archived).
    pub fn update(&self, f: impl FnOnce(&mut DrainStatus)) {
        f(&mut self.lock().status)
    }

    pub fn view(&self) -> DrainStatus {
        self.lock().status.clone()
    }

    pub fn state(&self) -> DrainState {
        self.lock().status.state
    }

    /// Begins a drain, or joins the one under way (or finished): the status, and the token of
    /// a drain that has just begun (whose task the caller starts).
    pub(crate) fn begin(
        &self,
        req: &DrainRequest,
        by: &str,
        default_timeout: Duration,
        ctx: &Context,
    ) -> (DrainStatus, Option<CancellationToken>) {
        let mut g = self.lock();
        if g.status.state != DrainState::Running {
            return (g.status.clone(), None);
        }
        let timeout = req
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(default_timeout);
        g.cancel = CancellationToken::new();
        g.started = Some(Instant::now());
        g.committed = false;
        g.status = DrainStatus {
            state: DrainState::Draining,
            step: Some("acknowledged".into()),
            message: "drain accepted: this instance no longer takes leadership or new work".into(),
            requested_by: Some(by.to_string()),
            force: req.force,
            timeout_secs: timeout.as_secs(),
            started_at: Some(crate::time::now()),
            ..Default::default()
        };
        ctx.metrics
            .replication
            .set_drain_state(DrainState::Draining);
        tracing::warn!(
            by,
            force = req.force,
            timeout_secs = timeout.as_secs(),
            "drain: started"
        );
        (g.status.clone(), Some(g.cancel.clone()))
    }

    pub fn progress(&self, step: &str, message: impl Into<String>) -> bool {
        let message = message.into();
        let mut g = self.lock();
        let changed = g.status.step.as_deref() != Some(step) || g.status.message != message;
        if changed {
            tracing::info!(step, "drain: {message}");
        }
        g.status.step = Some(step.to_string());
        g.status.message = message;
        changed
    }

    pub fn deadline(&self) -> Instant {
        let g = self.lock();
        g.started.unwrap_or_else(Instant::now) + Duration::from_secs(g.status.timeout_secs)
    }

    /// From here on the drain stops Postgres: it can no longer be cancelled.
    pub fn commit(&self) -> Result<(), End> {
        let mut g = self.lock();
        if g.cancel.is_cancelled() || g.status.state != DrainState::Draining {
            return Err(End::Cancelled("cancelled".into()));
        }
        g.committed = true;
        Ok(())
    }

    pub fn end(&self, end: &End, ctx: &Context) -> DrainStatus {
        let mut g = self.lock();
        let (state, step, outcome, message) = match end {
            End::Finished(m) => (DrainState::Drained, "finished", "finished", m),
            End::Failed(m) => (DrainState::Running, "failed", "failed", m),
            End::Cancelled(m) => (DrainState::Running, "cancelled", "cancelled", m),
        };
        g.status.state = state;
        g.status.step = Some(step.into());
        g.status.message = message.clone();
        g.status.finished_at = Some(crate::time::now());
        g.status.error = matches!(end, End::Failed(_)).then(|| message.clone());
        let m = &ctx.metrics.replication;
        m.set_drain_state(state);
        m.drains.with_label_values(&[outcome]).inc();
        if let Some(t) = g.started {
            m.drain_duration.observe(t.elapsed().as_secs_f64());
        }
        match end {
            End::Finished(_) => tracing::warn!("drain: finished: {message}"),
            _ => tracing::warn!(outcome, "drain: {message}"),
        }
        g.status.clone()
    }

    /// `DELETE /v1/drain`: the instance becomes a normal member again.
    pub(crate) fn cancel(
        &self,
        ctx: &Context,
        agent: &AgentState,
        why: &str,
    ) -> Result<DrainStatus, AgentError> {
        {
            let g = self.lock();
            let refuse = |m: &str| Err(AgentError::conflict(agent, m));
            match g.status.state {
                DrainState::Running => return refuse("no drain is in progress"),
                DrainState::Drained => {
                    return refuse(
                        "the drain has finished: Postgres is stopped and stays stopped until the agent restarts",
                    );
                }
                DrainState::Draining if g.committed => {
                    return refuse(
                        "the drain is stopping Postgres and can no longer be cancelled; wait for it to finish",
                    );
                }
                DrainState::Draining => g.cancel.cancel(),
            }
        }
        Ok(self.end(&End::Cancelled(why.to_string()), ctx))
    }
}
