//! pgpilot-operator: turns `PostgresCluster` resources into per-shard workloads
//! (shared/DESIGN.md, "Operator"; docs/operator.md). It is thin: Postgres itself is the
//! agents' business; the operator builds the pods they run in and reports what they say.
//!
//! - [`objects`]: what a cluster becomes (pure functions, unit-tested);
//! - [`controller`]: the reconciler that applies them and writes the status;
//! - [`backup`]: `PostgresBackup`, on-demand base backups through the shards' primary agents;
//! - [`crds`]: the CRD manifests generated from the types in `pgpilot_common::crd`;
//! - [`leader`]: leader election among the operator's replicas (one Lease, one acts);
//! - [`tls`]: the cluster's CA, the agents' certificate and its renewal, the operator's client TLS.

pub mod backup;
pub mod controller;
pub mod crds;
pub mod leader;
pub mod metrics;
pub mod objects;
pub mod rollout;
pub mod tls;
