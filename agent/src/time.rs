//! Time helpers every module shares: RFC 3339 timestamps for the API and Unix seconds for
//! metrics.

use std::time::SystemTime;

/// Seconds since the Unix epoch, for gauges such as "last success".
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// RFC 3339 UTC.
pub fn timestamp(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// RFC 3339 UTC of now.
pub fn now() -> String {
    timestamp(SystemTime::now())
}
