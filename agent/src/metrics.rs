//! Prometheus metrics of the agent. Everything an operator would alert on: agent state,
//! Postgres up, crash restarts, API errors.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use pgpilot_common::state::AgentState;

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// 1 for the current state, 0 for the others.
    pub state: IntGaugeVec,
    pub postgres_up: IntGauge,
    pub crash_restarts: IntCounter,
    pub requested_restarts: IntCounter,
    pub api_requests: IntCounterVec,
    pub api_duration: HistogramVec,
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
        for c in [
            Box::new(state.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(postgres_up.clone()),
            Box::new(crash_restarts.clone()),
            Box::new(requested_restarts.clone()),
            Box::new(api_requests.clone()),
            Box::new(api_duration.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        for name in AgentState::NAMES {
            state.with_label_values(&[name]).set(0);
        }
        Metrics {
            registry,
            state,
            postgres_up,
            crash_restarts,
            requested_restarts,
            api_requests,
            api_duration,
        }
    }

    pub fn set_state(&self, current: &AgentState) {
        for name in AgentState::NAMES {
            self.state
                .with_label_values(&[name])
                .set(i64::from(name == current.name()));
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
