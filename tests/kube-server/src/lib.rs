//! A Kubernetes API server for tests: in-memory, over HTTP on 127.0.0.1, faithful enough that
//! kube-rs clients, kube-runtime watchers and kubectl run against it unmodified. Test support
//! only; never a dependency of a shipped binary. See docs/kube-test-server.md.
#![forbid(unsafe_code)]

mod auth;
mod controllers;
mod deployment;
mod discovery;
mod endpointslices;
mod error;
mod fieldset;
mod fixtures;
mod handlers;
mod merge;
mod pods;
mod protobuf;
mod resources;
mod scale;
mod selectors;
mod server;
mod ssa;
mod statefulset;
mod store;
mod validation;
mod watch;

pub use auth::{AuditKey, SA_PREFIX};
pub use fixtures::TestNamespace;
pub use server::{
    KubeTestServer, ServerOptions, install_crypto_provider, kubectl_args, service_account_token,
    test_client,
};
pub use store::StoreOptions;
