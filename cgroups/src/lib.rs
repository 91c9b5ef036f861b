//! cgroup v1 and v2 for berth: which hierarchies are mounted (legacy, hybrid or
//! unified), where a container's or pod's cgroup lives in each, its CPU, memory and
//! process statistics, and OOM-kill watching.
//!
//! Hand-written over the cgroup files rather than over `cgroups-rs`: that crate
//! hard-codes the v2 root at `/sys/fs/cgroup` (so it cannot read a hybrid host's
//! `unified` mount or a test mount), pulls nix 0.25 and thiserror 1 beside our
//! majors (0.4+ adds zbus), and watches OOM with a thread per cgroup. The formats
//! read here are the kernel's stable flat-keyed files.

pub mod cpuset;
pub mod hierarchy;
pub mod oom;
pub mod pod;
pub mod stats;

pub use hierarchy::{Cgroup, Hierarchy, Mode, relative_path_of};
pub use oom::{OomWatch, oom_kill_count};
pub use stats::{CgroupStats, CpuStats, MemoryStats};

use std::path::PathBuf;

/// Why a cgroup could not be read or watched.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The cgroup exists in no mounted hierarchy.
    #[error("cgroup {0} does not exist")]
    NotFound(String),
    /// A path or value that is not acceptable.
    #[error("{0}")]
    Invalid(String),
}

impl CgroupError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> CgroupError {
        CgroupError::Io {
            path: path.into(),
            source,
        }
    }
}
