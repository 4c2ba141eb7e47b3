//! A kubelet for the test API server (`pgpilot-kube-testserver`): it binds pending pods to its
//! fake nodes and runs them as real local processes, each pod on its own loopback IP, with
//! volumes, env, probes, restarts, graceful termination, events and logs, plus faults a test
//! can inject. It talks to the API server over HTTP with kube-rs and watches pods, as a real
//! kubelet does. Test support only, never in a shipped binary. See docs/kubelet.md.
// One block may be unsafe: the read-only root and user applied between fork and exec (pod.rs).
#![deny(unsafe_code)]

mod images;
mod isolation;
mod kubelet;
mod net;
mod peers;
mod pod;
mod probe;
pub mod wait;

pub use images::ImageTable;
pub use kubelet::{Kubelet, KubeletOptions, server_options, service_ips, start_cluster};
pub use net::{ApiFault, take_pid_lock};
pub use peers::PeerFault;
