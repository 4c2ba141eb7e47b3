//! WAL archiving and fetching (this file's siblings `push`, `fetch`, `runtime`), base backups,
//! listing, retention and verification, all through the backup [`crate::store`]. Their
//! background work is owned by one [`background::Background`].

pub mod background;
pub mod backup;
pub mod catalog;
pub mod cli;
pub mod cmd;
pub mod fetch;
pub mod identity;
pub mod push;
pub mod retention;
pub mod runtime;
pub mod verify;
