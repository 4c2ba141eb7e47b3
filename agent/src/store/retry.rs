//! Retrying whole store operations on transient failures, with exponential backoff and full
//! jitter (AWS architecture blog, "Exponential Backoff And Jitter"): the wait before attempt
//! `n + 1` is uniform in `[0, min(max, initial × 2^(n-1))]`, which spreads retries of many agents
//! hitting the same failing store. Permanent failures return at once, and so does everything
//! once the caller's cancellation token is cancelled (the agent is stopping): the attempt in
//! progress finishes, no further attempt starts, and a backoff wait is cut short.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::config::RetrySettings;
use super::error::StoreError;

/// How many times and how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl From<RetrySettings> for RetryPolicy {
    fn from(s: RetrySettings) -> Self {
        RetryPolicy {
            max_attempts: s.max_attempts.max(1),
            initial_backoff: Duration::from_millis(s.initial_backoff_ms),
            max_backoff: Duration::from_millis(s.max_backoff_ms),
        }
    }
}

impl RetryPolicy {
    /// The upper bound of the wait after failed attempt `attempt` (1-based).
    pub fn backoff_cap(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// A jittered wait after failed attempt `attempt`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let cap = self.backoff_cap(attempt);
        let millis = cap.as_millis() as u64;
        Duration::from_millis(if millis == 0 {
            0
        } else {
            rand::rng().random_range(0..=millis)
        })
    }

    /// Runs `op` until it succeeds, fails permanently, attempts run out, or `cancel` is
    /// cancelled (then the last error is returned without another attempt).
    pub async fn run<T, F, Fut>(
        &self,
        what: &str,
        cancel: Option<&CancellationToken>,
        mut op: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 1;
        loop {
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && attempt < self.max_attempts => {
                    let stopping = || cancel.is_some_and(|c| c.is_cancelled());
                    if stopping() {
                        tracing::info!(operation = what, attempt, error = %e, "transient store failure, not retrying: the agent is stopping");
                        return Err(e);
                    }
                    let wait = self.backoff(attempt);
                    tracing::warn!(operation = what, attempt, error = %e, ?wait, "transient store failure, retrying");
                    match cancel {
                        Some(c) => {
                            if c.run_until_cancelled(tokio::time::sleep(wait))
                                .await
                                .is_none()
                            {
                                tracing::info!(
                                    operation = what,
                                    attempt,
                                    "retry abandoned: the agent is stopping"
                                );
                                return Err(e);
                            }
                        }
                        None => tokio::time::sleep(wait).await,
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn transient() -> StoreError {
        StoreError::Backend {
            object: "o".into(),
            operation: "put",
            transient: true,
            source: Box::new(std::io::Error::other("503")),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitters_within_it() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        assert_eq!(p.backoff_cap(1), Duration::from_millis(100));
        assert_eq!(p.backoff_cap(3), Duration::from_millis(400));
        assert_eq!(p.backoff_cap(10), Duration::from_secs(1));
        assert_eq!(p.backoff_cap(100), Duration::from_secs(1));
        for attempt in 1..6 {
            assert!(p.backoff(attempt) <= p.backoff_cap(attempt));
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_permanent_ones_are_not() {
        let p = RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        };
        let calls = AtomicU32::new(0);
        let r = p
            .run("t", None, |_| async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(transient())
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        calls.store(0, Ordering::SeqCst);
        let r: Result<(), _> = p
            .run("t", None, |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(transient())
            })
            .await;
        assert!(r.unwrap_err().is_transient());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "gives up after max_attempts"
        );

        calls.store(0, Ordering::SeqCst);
        let r: Result<(), _> = p
            .run("t", None, |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::NotFound { object: "o".into() })
            })
            .await;
        assert!(matches!(r, Err(StoreError::NotFound { .. })));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "permanent errors are not retried"
        );
    }

    #[tokio::test]
    async fn a_cancelled_token_stops_retrying_and_cuts_the_backoff_short() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_secs(3600),
            max_backoff: Duration::from_secs(3600),
        };
        let cancel = CancellationToken::new();
        let calls = AtomicU32::new(0);
        let run = p.run("t", Some(&cancel), |_| async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(transient())
        });
        let canceller = async {
            // The first attempt has failed and the (hour-long) backoff has begun.
            while calls.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
            cancel.cancel();
        };
        let (r, ()) = tokio::join!(run, canceller);
        assert!(r.unwrap_err().is_transient());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no attempt after cancel");

        // Already cancelled: the first attempt still runs, no second one.
        calls.store(0, Ordering::SeqCst);
        let r: Result<(), _> = p
            .run("t", Some(&cancel), |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(transient())
            })
            .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
