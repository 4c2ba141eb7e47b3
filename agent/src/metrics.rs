//! Prometheus metrics of the agent. Everything an operator would alert on: agent state,
//! Postgres up, crash restarts, API errors.

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use pgpilot_common::state::{AgentState, DrainState};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// 1 for the current state, 0 for the others.
    pub state: IntGaugeVec,
    pub postgres_up: IntGauge,
    /// Client connections by `pg_stat_activity.state` (active, idle, idle in transaction, ...).
    pub connections: IntGaugeVec,
    pub max_connections: IntGauge,
    pub crash_restarts: IntCounter,
    pub requested_restarts: IntCounter,
    pub api_requests: IntCounterVec,
    pub api_duration: HistogramVec,
    /// API errors by route and error kind (`conflict`, `refused`, `internal`, …).
    pub api_errors: IntCounterVec,
    /// Refused authentications by reason: `no_credential`, `malformed`, `wrong_token`,
    /// `rate_limited` (a peer over the limit of wrong tokens).
    pub api_auth_failures: IntCounterVec,
    /// API token reloads that changed the accepted tokens (a rotation step).
    pub api_token_reloads: IntCounter,
    /// TLS certificate reloads that changed the pod-IP listener's certificate, key or CA.
    pub tls_reloads: IntCounter,
    /// When the pod-IP listener's certificate expires (Unix seconds; 0 without TLS).
    pub tls_cert_expiry: IntGauge,
    pub archive: ArchiveMetrics,
    pub replication: ReplicationMetrics,
    pub catalog: CatalogMetrics,
}

/// The reasons of `pgpilot_api_auth_failures_total`, each exported from the start at 0.
pub const AUTH_FAILURE_REASONS: [&str; 5] = [
    "no_credential",
    "malformed",
    "wrong_token",
    "rate_limited",
    "bad_certificate",
];

/// Catalog sync (Kubernetes mode, the shard's primary): `pg_database` against
/// `spec.databases`.
#[derive(Clone)]
pub struct CatalogMetrics {
    pub adopted: IntCounter,
    pub created: IntCounter,
    pub dropped: IntCounter,
    /// This shard's databases that are not as declared (missing, failed, another owner).
    pub drift: IntGauge,
    pub failures: IntCounter,
}

impl CatalogMetrics {
    fn new(registry: &Registry) -> CatalogMetrics {
        let c = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("static metric");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let drift = IntGauge::new(
            "pgpilot_catalog_drift",
            "Databases of spec.databases not as declared on this shard (missing, failed to create or drop, another owner): alert when above 0 for long",
        )
        .expect("static metric");
        registry
            .register(Box::new(drift.clone()))
            .expect("metric registered once");
        CatalogMetrics {
            adopted: c(
                "pgpilot_catalog_adopted_total",
                "Databases created with SQL that this agent added to spec.databases",
            ),
            created: c(
                "pgpilot_catalog_created_total",
                "Databases of spec.databases this agent created on its shard",
            ),
            dropped: c(
                "pgpilot_catalog_dropped_total",
                "Databases this agent dropped because their entry says ensure: absent",
            ),
            drift,
            failures: c(
                "pgpilot_catalog_sync_failures_total",
                "Catalog sync rounds that failed (Postgres or the API server unreachable, a write refused); alert on a steady rate",
            ),
        }
    }
}

/// Replication: lag, streaming, slots, switchovers.
#[derive(Clone)]
pub struct ReplicationMetrics {
    /// 1 on a running primary, 0 otherwise.
    pub is_primary: IntGauge,
    /// Replica: 1 while the WAL receiver streams from the primary.
    pub streaming: IntGauge,
    pub lag_bytes: IntGauge,
    pub lag_seconds: Gauge,
    /// Primary: replicas streaming from it now.
    pub connected_replicas: IntGauge,
    pub slot_retained_bytes: IntGaugeVec,
    pub slots_dropped: IntCounter,
    pub switchovers: IntCounterVec,
    pub switchover_write_pause: Histogram,
    /// Kubernetes mode: 1 while this pod holds its shard's Lease as a running primary.
    pub lease_held: IntGauge,
    pub lease_renew_failures: IntCounter,
    /// Unix time of this agent's last leadership change (took, handed over, fenced).
    pub last_transition: Gauge,
    pub fences: IntCounter,
    pub failovers: IntCounter,
    /// The drain handshake: 1 for the current drain state.
    pub drain_state: IntGaugeVec,
    pub drains: IntCounterVec,
    pub drain_duration: Histogram,
}

impl ReplicationMetrics {
    fn new(registry: &Registry) -> ReplicationMetrics {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        }
        let g = |name: &str, help: &str| {
            reg(registry, IntGauge::new(name, help).expect("static metric"))
        };
        ReplicationMetrics {
            is_primary: g("pgpilot_replication_is_primary", "1 when this instance runs as the primary"),
            streaming: g(
                "pgpilot_replication_streaming",
                "Replica: 1 while it streams WAL from its primary (alert when 0 on a replica)",
            ),
            lag_bytes: g(
                "pgpilot_replication_lag_bytes",
                "Replica: bytes between the primary's WAL end and this replica's replay position",
            ),
            lag_seconds: reg(
                registry,
                Gauge::new(
                    "pgpilot_replication_lag_seconds",
                    "Replica: seconds since the last replayed commit, 0 when caught up",
                )
                .expect("static metric"),
            ),
            connected_replicas: g(
                "pgpilot_replication_connected_replicas",
                "Primary: replicas streaming from it",
            ),
            slot_retained_bytes: reg(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "pgpilot_replication_slot_retained_bytes",
                        "Primary: WAL bytes each managed slot keeps (alert before the disk fills)",
                    ),
                    &["slot"],
                )
                .expect("static metric"),
            ),
            slots_dropped: reg(
                registry,
                IntCounter::new(
                    "pgpilot_replication_slots_dropped_total",
                    "Slots of replicas gone longer than slot_grace_secs, dropped by the agent",
                )
                .expect("static metric"),
            ),
            switchovers: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "pgpilot_switchovers_total",
                        "Planned switchovers run by this agent, by outcome (succeeded, failed)",
                    ),
                    &["outcome"],
                )
                .expect("static metric"),
            ),
            switchover_write_pause: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "pgpilot_switchover_write_pause_seconds",
                        "From the stop of writes on the old primary to the promotion of the new one",
                    )
                    .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
                )
                .expect("static metric"),
            ),
            lease_held: g(
                "pgpilot_lease_held",
                "Kubernetes: 1 while this pod holds its shard's Lease as the running primary",
            ),
            lease_renew_failures: reg(
                registry,
                IntCounter::new(
                    "pgpilot_lease_renew_failures_total",
                    "Kubernetes: Lease renewals that failed (alert on a rising rate: the primary fences at the renew deadline)",
                )
                .expect("static metric"),
            ),
            last_transition: reg(
                registry,
                Gauge::new(
                    "pgpilot_leader_last_transition_timestamp_seconds",
                    "Kubernetes: when this agent last took, handed over or lost its shard's leadership",
                )
                .expect("static metric"),
            ),
            fences: reg(
                registry,
                IntCounter::new(
                    "pgpilot_fences_total",
                    "Kubernetes: times this primary fenced itself (stopped taking writes) because it could not keep its Lease",
                )
                .expect("static metric"),
            ),
            failovers: reg(
                registry,
                IntCounter::new(
                    "pgpilot_failovers_total",
                    "Kubernetes: expired Leases this replica took over (then promoted)",
                )
                .expect("static metric"),
            ),
            drain_state: {
                let v = reg(
                    registry,
                    IntGaugeVec::new(
                        Opts::new(
                            "pgpilot_drain_state",
                            "The drain handshake: 1 for the current state (Running, Draining, Drained); alert on Draining for longer than the drain timeout",
                        ),
                        &["state"],
                    )
                    .expect("static metric"),
                );
                for name in DrainState::NAMES {
                    v.with_label_values(&[name])
                        .set(i64::from(*name == DrainState::Running.name()));
                }
                v
            },
            drains: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "pgpilot_drains_total",
                        "Drains of this instance by outcome (finished, failed, cancelled); alert on failed",
                    ),
                    &["outcome"],
                )
                .expect("static metric"),
            ),
            drain_duration: reg(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "pgpilot_drain_duration_seconds",
                        "From the start of a drain to its end (finished, failed or cancelled)",
                    )
                    .buckets(vec![0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0]),
                )
                .expect("static metric"),
            ),
        }
    }

    pub fn set_drain_state(&self, current: DrainState) {
        for name in DrainState::NAMES {
            self.drain_state
                .with_label_values(&[name])
                .set(i64::from(*name == current.name()));
        }
    }
}

/// WAL archiving, fetching and base backups.
#[derive(Clone)]
pub struct ArchiveMetrics {
    pub archived: IntCounter,
    pub failures: IntCounter,
    /// Same name, different content: two clusters writing to one archive. Page on any.
    pub conflicts: IntCounter,
    pub duration: Histogram,
    pub bytes_read: IntCounter,
    pub bytes_stored: IntCounter,
    pub last_archived: Gauge,
    pub ready: IntGauge,
    pub prefetch_hits: IntCounter,
    pub prefetch_misses: IntCounter,
    pub fetched: IntCounter,
    pub backup_duration: Histogram,
    pub backup_last_success: Gauge,
    pub backup_failures: IntCounter,
    pub retention_deleted_backups: IntCounter,
    pub retention_deleted_wal: IntCounter,
    pub retention_failures: IntCounter,
}

impl ArchiveMetrics {
    fn new(registry: &Registry) -> ArchiveMetrics {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("static metric");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = Gauge::new(name, help).expect("static metric");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("static metric");
            registry
                .register(Box::new(h.clone()))
                .expect("metric registered once");
            h
        };
        let ready = IntGauge::new(
            "pgpilot_wal_ready_segments",
            "WAL files Postgres marked ready that are not archived yet",
        )
        .expect("static metric");
        registry
            .register(Box::new(ready.clone()))
            .expect("metric registered once");
        ArchiveMetrics {
            archived: counter(
                "pgpilot_wal_archived_total",
                "WAL files stored and verified in the backup store",
            ),
            failures: counter(
                "pgpilot_wal_archive_failures_total",
                "WAL uploads that failed",
            ),
            conflicts: counter(
                "pgpilot_wal_archive_conflicts_total",
                "WAL files refused because the store holds different content under the same name",
            ),
            duration: histogram(
                "pgpilot_wal_archive_duration_seconds",
                "Time to store and verify one WAL file",
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            ),
            bytes_read: counter(
                "pgpilot_wal_archive_read_bytes_total",
                "WAL bytes read for archiving",
            ),
            bytes_stored: counter(
                "pgpilot_wal_archive_stored_bytes_total",
                "Bytes written to the store for WAL",
            ),
            last_archived: gauge(
                "pgpilot_wal_last_archived_timestamp_seconds",
                "Unix time of the last WAL file archived (alert on its age)",
            ),
            ready,
            prefetch_hits: counter(
                "pgpilot_wal_prefetch_hits_total",
                "wal-fetch requests served from the prefetch spool",
            ),
            prefetch_misses: counter(
                "pgpilot_wal_prefetch_misses_total",
                "wal-fetch requests that had to wait for the store",
            ),
            fetched: counter(
                "pgpilot_wal_fetched_total",
                "WAL files restored for Postgres",
            ),
            backup_duration: histogram(
                "pgpilot_backup_duration_seconds",
                "Duration of successful base backups",
                vec![1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0],
            ),
            backup_last_success: gauge(
                "pgpilot_backup_last_success_timestamp_seconds",
                "Unix time of the last successful base backup (alert on its age)",
            ),
            backup_failures: counter("pgpilot_backup_failures_total", "Base backups that failed"),
            retention_deleted_backups: counter(
                "pgpilot_retention_deleted_backups_total",
                "Base backups deleted by the retention applied after each backup",
            ),
            retention_deleted_wal: counter(
                "pgpilot_retention_deleted_wal_total",
                "WAL files deleted by the retention applied after each backup",
            ),
            retention_failures: counter(
                "pgpilot_retention_failures_total",
                "Retention runs after a backup that failed (the store keeps growing: alert)",
            ),
        }
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let state = IntGaugeVec::new(
            Opts::new(
                "pgpilot_agent_state",
                "Current agent state (1 for the current one)",
            ),
            &["state"],
        )
        .expect("static metric");
        let postgres_up =
            IntGauge::new("pgpilot_postgres_up", "1 when Postgres accepts connections")
                .expect("static metric");
        let connections = IntGaugeVec::new(
            Opts::new(
                "pgpilot_postgres_connections",
                "Client connections by state (pg_stat_activity), sampled every few seconds",
            ),
            &["state"],
        )
        .expect("static metric");
        let max_connections = IntGauge::new(
            "pgpilot_postgres_max_connections",
            "Postgres max_connections; alert when connections approach it",
        )
        .expect("static metric");
        let crash_restarts = IntCounter::new(
            "pgpilot_postgres_crash_restarts_total",
            "Postgres restarts after an unexpected exit of the postmaster",
        )
        .expect("static metric");
        let requested_restarts = IntCounter::new(
            "pgpilot_postgres_requested_restarts_total",
            "Postgres restarts requested through the API",
        )
        .expect("static metric");
        let api_requests = IntCounterVec::new(
            Opts::new(
                "pgpilot_api_requests_total",
                "API requests by route, method and status code",
            ),
            &["route", "method", "code"],
        )
        .expect("static metric");
        let api_duration = HistogramVec::new(
            HistogramOpts::new(
                "pgpilot_api_request_duration_seconds",
                "API request duration by route",
            ),
            &["route"],
        )
        .expect("static metric");
        let api_errors = IntCounterVec::new(
            Opts::new(
                "pgpilot_api_errors_total",
                "API error answers by route and error kind (conflict, refused, internal, ...)",
            ),
            &["route", "kind"],
        )
        .expect("static metric");
        let api_auth_failures = IntCounterVec::new(
            Opts::new(
                "pgpilot_api_auth_failures_total",
                "Refused API authentications by reason (no_credential, malformed, wrong_token, rate_limited, bad_certificate)",
            ),
            &["reason"],
        )
        .expect("static metric");
        for reason in AUTH_FAILURE_REASONS {
            api_auth_failures.with_label_values(&[reason]).reset();
        }
        let api_token_reloads = IntCounter::new(
            "pgpilot_api_token_reloads_total",
            "Reloads of the API token file that changed the accepted tokens",
        )
        .expect("static metric");
        let tls_reloads = IntCounter::new(
            "pgpilot_tls_reloads_total",
            "Reloads of the pod-IP listener's TLS files that changed its certificate, key or CA",
        )
        .expect("static metric");
        let tls_cert_expiry = IntGauge::new(
            "pgpilot_tls_certificate_expiry_timestamp_seconds",
            "When the pod-IP listener's TLS certificate expires (Unix time; 0 without TLS)",
        )
        .expect("static metric");
        for c in [
            Box::new(api_auth_failures.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(api_token_reloads.clone()),
            Box::new(tls_reloads.clone()),
            Box::new(tls_cert_expiry.clone()),
            Box::new(state.clone()),
            Box::new(postgres_up.clone()),
            Box::new(connections.clone()),
            Box::new(max_connections.clone()),
            Box::new(crash_restarts.clone()),
            Box::new(requested_restarts.clone()),
            Box::new(api_requests.clone()),
            Box::new(api_duration.clone()),
            Box::new(api_errors.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        for name in AgentState::NAMES {
            state.with_label_values(&[name]).set(0);
        }
        let archive = ArchiveMetrics::new(&registry);
        let replication = ReplicationMetrics::new(&registry);
        let catalog = CatalogMetrics::new(&registry);
        Metrics {
            catalog,
            archive,
            replication,
            registry,
            state,
            postgres_up,
            connections,
            max_connections,
            crash_restarts,
            requested_restarts,
            api_requests,
            api_duration,
            api_errors,
            api_auth_failures,
            api_token_reloads,
            tls_reloads,
            tls_cert_expiry,
        }
    }

    pub fn set_state(&self, current: &AgentState) {
        for name in AgentState::NAMES {
            self.state
                .with_label_values(&[name])
                .set(i64::from(*name == current.name()));
        }
        self.postgres_up
            .set(i64::from(matches!(current, AgentState::Running { .. })));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics");
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
