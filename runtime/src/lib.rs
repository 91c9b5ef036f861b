//! berth's task model: the per-pod shim (`berth-shim`) that drives the OCI runtime
//! CLI, owns container stdio, writes CRI logs and records exits; and `ShimClient`,
//! berthd's async side of the shim protocol.

pub mod client;
pub mod console;
pub mod criolog;
pub mod exits;
pub mod infra;
pub mod netns;
pub mod relay;
pub mod runc;
pub mod shim;
pub mod timefmt;

/// Pod cgroup directories (kept under this name for callers; lives in berth-cgroups).
pub use berth_cgroups::pod as podcgroup;
