//! Names on Kubernetes objects that the agent and the operator both read or write: pod labels
//! and the drain handshake's annotations (shared/DESIGN.md, docs/kubernetes.md, docs/drain.md).

/// The cluster a pod belongs to (`[cluster] name`).
pub const LABEL_CLUSTER: &str = "pgpilot.io/cluster";
/// The shard a pod belongs to (`[cluster] shard`).
pub const LABEL_SHARD: &str = "pgpilot.io/shard";
/// `primary` on the pod that holds its shard's Lease as the running primary, `replica` on the
/// others; the read-write Service selects `primary`.
pub const LABEL_ROLE: &str = "pgpilot.io/role";

/// The drain handshake on a pod: [`DRAIN_STARTED`] (asked) → [`DRAIN_ACKNOWLEDGED`] →
/// [`DRAIN_FINISHED`] (the pod may go), or [`DRAIN_FAILED`].
pub const ANNOTATION_DRAIN: &str = "pgpilot.io/drain";
/// The drain's progress or error, in words.
pub const ANNOTATION_DRAIN_MESSAGE: &str = "pgpilot.io/drain-message";
pub const DRAIN_STARTED: &str = "Started";
pub const DRAIN_ACKNOWLEDGED: &str = "Acknowledged";
pub const DRAIN_FINISHED: &str = "Finished";
/// Set by the agent when a drain fails; `Started` again retries.
pub const DRAIN_FAILED: &str = "Failed";

/// On a PostgresCluster: `<pod>` asks the operator for a planned switchover of that pod's
/// shard to it. Carried out once; the operator then removes the annotation and says how it
/// went in an Event (`Switchover`, or `SwitchoverRefused` with the reason).
pub const ANNOTATION_SWITCHOVER: &str = "pgpilot.io/switchover";
