//! The operator's metrics (`/metrics`): reconciles, errors, their duration, the writes it makes
//! to the API server (zero in a steady state), each cluster's phase, its shards' primaries and
//! ready instances, a halted rollout and the age of its last backup: what the chart's alerts
//! read (charts/pgpilot/files/alerts.yaml).

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// Labels of the per-shard gauges.
pub const SHARD_LABELS: &[&str] = &["namespace", "cluster", "shard"];

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
    /// Per shard: ready pods labelled primary (alert on 0: no writer; above 1 never happens).
    pub shard_primaries: IntGaugeVec,
    pub shard_ready_instances: IntGaugeVec,
    pub shard_instances: IntGaugeVec,
    /// Per cluster: 1 while its rollout is halted.
    pub rollout_halted: IntGaugeVec,
    /// Per cluster with a backup schedule: when its latest completed backup started (the
    /// cluster's creation until one completes), and the time between two scheduled runs.
    pub backup_last_success: IntGaugeVec,
    pub backup_interval: IntGaugeVec,
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
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric")
        };
        let shard_primaries = gauge(
            "pgpilot_operator_shard_primaries",
            "Ready pods labelled pgpilot.io/role=primary in a shard; alert when 0 (no writer)",
            SHARD_LABELS,
        );
        let shard_ready_instances = gauge(
            "pgpilot_operator_shard_ready_instances",
            "Ready pods of a shard",
            SHARD_LABELS,
        );
        let shard_instances = gauge(
            "pgpilot_operator_shard_instances",
            "Pods a shard should have (spec.instancesPerShard)",
            SHARD_LABELS,
        );
        let rollout_halted = gauge(
            "pgpilot_operator_rollout_halted",
            "1 while a cluster's rollout is halted (status.rollout.reason says why)",
            &["namespace", "cluster"],
        );
        let backup_last_success = gauge(
            "pgpilot_operator_backup_last_success_timestamp_seconds",
            "Start of the latest completed PostgresBackup of a cluster with a backup schedule (its creation time until one completes)",
            &["namespace", "cluster"],
        );
        let backup_interval = gauge(
            "pgpilot_operator_backup_interval_seconds",
            "Seconds between two runs of a cluster's spec.backup.schedule; alert when the last success is older than twice this",
            &["namespace", "cluster"],
        );
        for c in [
            Box::new(shard_primaries.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(shard_ready_instances.clone()),
            Box::new(shard_instances.clone()),
            Box::new(rollout_halted.clone()),
            Box::new(backup_last_success.clone()),
            Box::new(backup_interval.clone()),
            Box::new(database_drift.clone()),
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
            shard_primaries,
            shard_ready_instances,
            shard_instances,
            rollout_halted,
            backup_last_success,
            backup_interval,
        }
    }

    /// Records that a backup of `cluster` that started at `started` (Unix seconds) completed;
    /// the gauge only moves forward.
    pub fn backup_succeeded(&self, ns: &str, cluster: &str, started: i64) {
        let g = self.backup_last_success.with_label_values(&[ns, cluster]);
        if started > g.get() {
            g.set(started);
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
