//! The agent's HTTP API (axum): routes, authentication, the one error body.

pub mod auth;
pub mod error;
pub mod extract;
pub mod openapi;
pub mod routes;
pub mod server;
pub mod tls;

/// The largest request body the API reads (its bodies are small JSON documents); larger ones
/// are answered 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
