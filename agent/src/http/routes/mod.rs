//! One file per group of endpoints.

pub mod lifecycle;
pub mod metrics;
pub mod probes;
pub mod status;
pub mod wal;
