//! The operator's metrics (`/metrics`): reconciles, errors, their duration, the writes it makes
//! to the API server (zero in a steady state), and each cluster's phase.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    /// Creates, applies and status writes to the API server.
    pub writes: IntCounter,
    pub phase: IntGaugeVec,
    /// Per cluster: databases not as declared on some shard, as the agents report them.
    pub database_drift: IntGaugeVec,
}

/// The phases a cluster is reported in (one series each).
pub const PHASES: &[&str] = &["Progressing", "Ready", "Invalid"];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("pgpilot_operator_reconciles_total", "Reconciles by cluster"),
            &["cluster"],
        )
        .expect("static metric");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "pgpilot_operator_reconcile_errors_total",
                "Reconciles that failed (retried in 5 s), by cluster; alert on a rising rate",
            ),
            &["cluster"],
        )
        .expect("static metric");
        let reconcile_duration = Histogram::with_opts(HistogramOpts::new(
            "pgpilot_operator_reconcile_duration_seconds",
            "Duration of one reconcile",
        ))
        .expect("static metric");
        let writes = IntCounter::new(
            "pgpilot_operator_writes_total",
            "Writes to the API server (creates, applies, status updates); flat in a steady state",
        )
        .expect("static metric");
        let phase = IntGaugeVec::new(
            Opts::new(
                "pgpilot_operator_cluster_phase",
                "1 for each cluster's current phase (Progressing, Ready, Invalid)",
            ),
            &["cluster", "phase"],
        )
        .expect("static metric");
        let database_drift = IntGaugeVec::new(
            Opts::new(
                "pgpilot_operator_database_drift",
                "Databases of a cluster that are missing, failed or owned by another role on some shard (status.databases); alert when above 0 for long",
            ),
            &["cluster"],
        )
        .expect("static metric");
        for c in [
            Box::new(database_drift.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconciles.clone()),
            Box::new(reconcile_errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(writes.clone()),
            Box::new(phase.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            writes,
            phase,
            database_drift,
        }
    }

    pub fn set_phase(&self, cluster: &str, current: &str) {
        for p in PHASES {
            self.phase
                .with_label_values(&[cluster, p])
                .set(i64::from(*p == current));
        }
    }

    pub fn render(&self) -> String {
        let mut buf = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
