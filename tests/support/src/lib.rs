//! Test fixtures shared by every integration test: real PostgreSQL, real object-store servers,
//! a Kubernetes API server. Each fixture binds 127.0.0.1 on a free port, lives in a temp dir and
//! cleans up on drop. Test support only: never a dependency of a shipped binary.

pub mod agent;
pub mod azurite;
pub mod chaos;
pub mod cluster;
pub mod data;
pub mod gcs;
pub mod net;
pub mod postgres;
pub mod s3;
pub mod store;
pub mod tools;
pub mod wal;

/// The Kubernetes API server for tests (tests/kube-server): `kube::KubeTestServer`,
/// `kube::test_client()` (a real cluster when KUBECONFIG is set). See docs/kube-test-server.md.
pub use pgpilot_kube_testserver as kube;

/// The kubelet that runs the API server's pods as local processes (tests/kubelet):
/// `kubelet::Kubelet`, `kubelet::server_options()`. See docs/kubelet.md.
pub use pgpilot_test_kubelet as kubelet;
