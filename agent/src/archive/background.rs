//! The background work of archiving: look-ahead uploads, prefetches, base backups and their
//! retries. One [`Background`] owns all of it, under the agent's shutdown token, so nothing
//! outlives the agent:
//!
//! - once the agent is *stopping* (SIGTERM), no new background work starts and store operations
//!   stop retrying ([`crate::store::Store::with_cancel`]): an upload Postgres still asks for
//!   during its shutdown gets one attempt, so archive_command answers at once when the store is
//!   down;
//! - once Postgres has stopped, [`Background::shutdown`] abandons what is still running (each
//!   task is dropped at its next poll, which also ends its codec workers) and waits a bounded
//!   time for them, logging what was abandoned. Nothing is lost by that: an upload cut off is
//!   retried by Postgres' next archive_command (the segment stays in pg_wal, marked ready), a
//!   prefetch is only a cache (the spool is cleared at start), and a backup without its manifest
//!   does not count.
//!
//! Every task runs to completion or abandonment in its own tracked Tokio task, never only inside
//! the future of a caller that may go away (an HTTP request): a shared upload left half-polled
//! would keep its blocking codec workers, and so the process, alive.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Owns the archive's background tasks. Cheap to clone; clones share the tasks.
#[derive(Clone, Debug, Default)]
pub struct Background {
    tracker: TaskTracker,
    stopping: CancellationToken,
    abandon: CancellationToken,
    abandoned: Arc<Mutex<Vec<String>>>,
}

impl Background {
    /// Background work that stops when `stopping` (the agent's shutdown token) is cancelled.
    pub fn new(stopping: CancellationToken) -> Background {
        Background {
            stopping,
            ..Background::default()
        }
    }

    /// Cancelled once the agent is stopping: start nothing new, retry nothing.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stopping
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Runs `fut` until it ends or the work is abandoned at shutdown (then `None`, and `what` is
    /// reported as abandoned).
    pub async fn guard<F: Future>(&self, what: String, fut: F) -> Option<F::Output> {
        let out = self.abandon.run_until_cancelled(fut).await;
        if out.is_none() {
            self.abandoned.lock().expect("abandoned lock").push(what);
        }
        out
    }

    /// Spawns `fut` as a tracked task that [`Background::shutdown`] waits for (and abandons).
    pub fn spawn<F>(&self, what: String, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let this = self.clone();
        self.drive(async move {
            this.guard(what, fut).await;
        });
    }

    /// Spawns a tracked task for a future that ends by itself when abandoned (it awaits a
    /// [`Background::guard`]ed one), so it is not reported twice.
    pub fn drive<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(fut);
    }

    /// After Postgres has stopped: abandons every task still running, waits up to `bound` for
    /// them to unwind, and logs what was abandoned. Returns the abandoned tasks' descriptions.
    pub async fn shutdown(&self, bound: Duration) -> Vec<String> {
        self.stopping.cancel();
        self.abandon.cancel();
        self.tracker.close();
        let unwound = tokio::time::timeout(bound, self.tracker.wait())
            .await
            .is_ok();
        let abandoned = std::mem::take(&mut *self.abandoned.lock().expect("abandoned lock"));
        if !abandoned.is_empty() {
            tracing::info!(
                count = abandoned.len(),
                tasks = %abandoned.join(", "),
                "abandoned background work at shutdown (uploads are retried by Postgres' next archive_command, prefetches are only a cache, a backup without its manifest does not count)"
            );
        }
        if !unwound {
            tracing::warn!(
                still_running = self.tracker.len(),
                "background tasks did not end within {bound:?} of shutdown; exiting without them"
            );
        }
        abandoned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_abandons_running_tasks_and_names_them() {
        let stopping = CancellationToken::new();
        let bg = Background::new(stopping.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        bg.spawn("upload of A".into(), async move {
            // Held until the task is dropped: the receiver sees the sender go away.
            let _tx = tx;
            std::future::pending::<()>().await
        });
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        bg.spawn("quick".into(), async move {
            let _ = done_tx.send(());
        });
        done_rx.await.unwrap();
        stopping.cancel();
        assert!(bg.is_stopping());
        let abandoned = bg.shutdown(Duration::from_secs(5)).await;
        assert_eq!(abandoned, vec!["upload of A".to_string()]);
        assert!(rx.await.is_err(), "the abandoned future was dropped");
        assert!(bg.tracker.is_empty());
    }
}
