//! The CLI side of the long replication steps: `reinitialize` follows the clone's progress from
//! `/v1/status` while the request runs.

use std::time::Duration;

use pgpilot_common::api::{ReinitializeRequest, ReparentResponse};
use pgpilot_common::client::AgentClient;
use pgpilot_common::state::{OperationKind, Outcome};

/// Sends `POST /v1/reinitialize` and shows the clone's progress until it answers.
pub async fn reinitialize(
    client: &AgentClient,
    req: &ReinitializeRequest,
) -> anyhow::Result<ReparentResponse> {
    let bar = crate::units::transfer_bar("stopping");
    let call = client.reinitialize(req);
    tokio::pin!(call);
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let result = loop {
        tokio::select! {
            r = &mut call => break r,
            _ = tick.tick() => {
                let Ok(status) = client.status().await else { continue };
                if let Some(op) = status.operation
                    && op.kind == OperationKind::Clone
                    && op.outcome == Outcome::Running
                {
                    bar.set_message(op.step.clone());
                    bar.set_length(op.progress.bytes_total);
                    bar.set_position(op.progress.bytes_done);
                }
            }
        }
    };
    match result {
        Ok(r) => {
            bar.finish_and_clear();
            Ok(r)
        }
        Err(e) => {
            bar.abandon();
            Err(e.into())
        }
    }
}
