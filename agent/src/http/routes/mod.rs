//! One file per group of endpoints.

pub mod backups;
pub mod drain;
pub mod lifecycle;
pub mod metrics;
pub mod probes;
pub mod replication;
pub mod restore;
pub mod status;
pub mod wal;
