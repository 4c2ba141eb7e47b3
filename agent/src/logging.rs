//! Logging setup: human format on a terminal, JSON with `PGPILOT_LOG_FORMAT=json`. Postgres'
//! own lines arrive as events with target `postgres` and field `source = "postgres"`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Filter from `PGPILOT_LOG` (e.g. `debug`,
/// `pgpilot_agent=debug,postgres=warn`), default `info`.
pub fn init() {
    let filter = EnvFilter::try_from_env("PGPILOT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("PGPILOT_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
