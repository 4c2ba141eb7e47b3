//! `pgpilot-agent drain`: what the preStop hook runs. It starts (or joins) the drain and, with
//! `--wait`, follows it until it ends or `--timeout` runs out. Exit codes (docs/drain.md):
//! 0 drained; 1 the agent could not be asked (unreachable, refused, bad token);
//! 2 the drain failed or was cancelled (the instance is a normal member again; the message says
//! why); 3 `--timeout` ran out while it still drains (it goes on in the agent).

use std::time::{Duration, Instant};

use pgpilot_common::api::{DrainRequest, DrainStatus};
use pgpilot_common::client::AgentClient;
use pgpilot_common::state::DrainState;

/// How the command ended, when not drained: the exit code and what to print.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Unfinished {
    pub code: u8,
    pub message: String,
}

/// Starts or joins the drain; with `wait`, follows it with a spinner until it ends or
/// `timeout` runs out.
pub async fn drain(
    client: &AgentClient,
    req: &DrainRequest,
    wait: bool,
    timeout: Option<Duration>,
) -> anyhow::Result<DrainStatus> {
    let mut st = client.drain(req).await?;
    if !wait {
        return Ok(st);
    }
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    loop {
        bar.set_message(format!(
            "{}: {}",
            st.step.as_deref().unwrap_or("draining"),
            st.message
        ));
        match st.state {
            DrainState::Drained => {
                bar.finish_and_clear();
                return Ok(st);
            }
            DrainState::Running => {
                bar.abandon();
                return Err(Unfinished {
                    code: 2,
                    message: format!(
                        "the drain {}: {}",
                        st.step.as_deref().unwrap_or("ended"),
                        st.message
                    ),
                }
                .into());
            }
            DrainState::Draining => {}
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            bar.abandon();
            return Err(Unfinished {
                code: 3,
                message: format!(
                    "still draining after {} s ({}); the drain goes on in the agent",
                    started.elapsed().as_secs(),
                    st.message
                ),
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        // A transient error (the agent busy stopping Postgres) is retried until the timeout.
        if let Ok(next) = client.drain_status().await {
            st = next;
        }
    }
}
