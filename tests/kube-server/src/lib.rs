//! A Kubernetes API server for tests: in-memory, over HTTP on 127.0.0.1, faithful enough that
//! kube-rs clients, kube-runtime watchers and kubectl run against it unmodified. Test support
//! only; never a dependency of a shipped binary. See docs/kube-test-server.md.
#![forbid(unsafe_code)]

pub mod controllers;
pub mod discovery;
pub mod error;
pub mod fieldset;
pub mod fixtures;
pub mod handlers;
pub mod merge;
pub mod protobuf;
pub mod resources;
pub mod scale;
pub mod selectors;
pub mod server;
pub mod ssa;
pub mod statefulset;
pub mod store;
pub mod validation;
pub mod watch;

pub use fixtures::TestNamespace;
pub use server::{KubeTestServer, ServerOptions, kubectl_args, test_client};
pub use store::StoreOptions;
