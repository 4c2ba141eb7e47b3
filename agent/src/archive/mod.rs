//! WAL archiving and fetching (this file's siblings `push`, `fetch`, `runtime`), base backups,
//! listing, retention and verification, all through the backup [`crate::store`].

pub mod cmd;
pub mod fetch;
pub mod push;
pub mod runtime;
