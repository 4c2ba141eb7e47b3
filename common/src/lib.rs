//! pgpilot-common: the contract between pgpilot's parts. The agent's state machine, its API
//! request/response types and error body, and the typed HTTP client that the CLI and the
//! operator use. The agent (server) and the operator (client) both depend on this crate and
//! never on each other.
//!
//! The archive format's implementation (`archive`: codecs, encryption, hashing) sits behind
//! the `archive` feature, which the agent enables and the operator does not, so the contract
//! stays light for clients. The layout, manifest and WAL-name types are plain data and always
//! here.
#![forbid(unsafe_code)]
// A library the operator links: it reports through return values and `tracing`, never by
// printing to the caller's terminal.
#![warn(clippy::print_stdout, clippy::print_stderr)]

pub mod api;
pub mod archive_command;
pub mod client;
pub mod crd;
pub mod layout;
pub mod manifest;
pub mod names;
pub mod rbac;
pub mod schedule;
pub mod secret_file;
pub mod state;
pub mod tls;
pub mod wal;

#[cfg(feature = "archive")]
pub mod archive;
