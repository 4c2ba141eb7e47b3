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

/// A recovery target time: RFC 3339 or Postgres' `YYYY-MM-DD HH:MM:SS[.ffffff]+TZ`; a time
/// without an offset is refused (it would silently mean the server's zone).
pub fn parse_target_time(s: &str) -> Result<jiff::Timestamp, String> {
    let t = s.trim();
    let normalized = if t.len() > 3 && (t.ends_with("+00") || t.ends_with("-00")) {
        format!("{t}:00")
    } else {
        t.to_string()
    };
    normalized.replacen(' ', "T", 1).parse::<jiff::Timestamp>().map_err(|e| {
        format!(
            "target time {s:?} is not a time with a zone, like 2026-11-23T18:05:00Z or 2026-11-23 18:05:00+00 ({e})"
        )
    })
}
