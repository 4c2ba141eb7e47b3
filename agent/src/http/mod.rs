//! The agent's HTTP API (axum): routes, authentication, the one error body.

pub mod auth;
pub mod error;
pub mod extract;
pub mod openapi;
pub mod routes;
pub mod server;
