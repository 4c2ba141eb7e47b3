//! A live operation record (a clone, a switchover): the [`Operation`] `/v1/status` reports,
//! updated in place by the code doing the work.

use std::sync::{Arc, Mutex, MutexGuard};

use pgpilot_common::state::{Operation, OperationKind, Outcome, Progress};

#[derive(Debug, Clone)]
pub struct LiveOp(Arc<Mutex<Operation>>);

impl LiveOp {
    /// A running operation, started now, at `step`.
    pub fn new(kind: OperationKind, id: &str, step: &str) -> LiveOp {
        LiveOp(Arc::new(Mutex::new(Operation {
            kind,
            id: id.to_string(),
            step: step.to_string(),
            outcome: Outcome::Running,
            started_at: crate::time::now(),
            finished_at: None,
            progress: Progress::default(),
            error: None,
        })))
    }

    /// The record, to read or change.
    pub fn lock(&self) -> MutexGuard<'_, Operation> {
        self.0.lock().expect("op lock")
    }

    pub fn set_step(&self, step: &str) {
        self.lock().step = step.to_string();
    }

    /// Marks it ended: succeeded, or failed with why.
    pub fn finish(&self, result: Result<(), String>) {
        let mut o = self.lock();
        o.finished_at = Some(crate::time::now());
        match result {
            Ok(()) => o.outcome = Outcome::Succeeded,
            Err(e) => {
                o.outcome = Outcome::Failed;
                o.error = Some(e);
            }
        }
    }
}
