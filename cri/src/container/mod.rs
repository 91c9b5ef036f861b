//! Containers: CreateContainer mounts the image's snapshots as an overlay with a
//! private writable layer, writes the OCI bundle and has the pod's shim create the
//! task; exits arrive as shim events (or, after a restart, from the shim's task list).
//! This service knows nothing of pod sandboxes beyond their records.

mod create;
mod exec;
mod lifecycle;
mod resources;
mod status;

use std::sync::Arc;

use berth_runtime::client::ShimClient;

use crate::context::Context;
use crate::error::{CriError, Result};
use crate::records::{ContainerRecord, ContainerState, SandboxRecord};

pub use lifecycle::Exit;
pub use resources::validate as validate_resources;

/// The container half of the CRI RuntimeService.
#[derive(Clone)]
pub struct ContainerService {
    ctx: Arc<Context>,
}

impl ContainerService {
    /// Works over `ctx`.
    pub fn new(ctx: Arc<Context>) -> ContainerService {
        ContainerService { ctx }
    }

    /// The shared context.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The OCI `cgroupsPath` of a container: a scope `<slice>:berth:<id>` in the pod's
    /// slice when the pod was made with the systemd driver (whatever the driver is now:
    /// the pod's shim keeps its runtime flags), else under the pod's `cgroup_parent`, or
    /// `/berth/<id>` when the pod has none.
    pub fn cgroups_path(&self, pod: &SandboxRecord, id: &str) -> String {
        if let Some(slice) = &pod.systemd_slice {
            return format!("{slice}:berth:{id}");
        }
        let cgroup_parent = pod
            .config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.as_str())
            .unwrap_or_default();
        match cgroup_parent.is_empty() {
            true => format!("/berth/{id}"),
            false => format!("{}/{id}", cgroup_parent.trim_end_matches('/')),
        }
    }

    /// The shim of a container's pod, which must be there.
    async fn shim_of(&self, rec: &ContainerRecord) -> Result<ShimClient> {
        self.ctx.shims.get(&rec.sandbox_id).await.ok_or_else(|| {
            CriError::FailedPrecondition(format!("the shim of pod {} is gone", rec.sandbox_id))
        })
    }

    /// A container that must exist and run.
    pub fn running(&self, id: &str) -> Result<ContainerRecord> {
        let rec = self.ctx.container(id, "container_id")?;
        if rec.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is not running",
                rec.id
            )));
        }
        Ok(rec)
    }

    /// A container made from this image (by image id), if any.
    pub fn using_image(&self, image_id: &str) -> Option<String> {
        self.ctx
            .records
            .containers()
            .into_iter()
            .find(|c| c.image_id == image_id)
            .map(|c| c.id)
    }
}

/// Signal numbers by name, for an image's StopSignal.
fn signal_number(name: &str) -> Option<u32> {
    let n = name.trim().to_ascii_uppercase();
    if let Ok(v) = n.parse::<u32>() {
        return (1..=64).contains(&v).then_some(v);
    }
    let n = n.strip_prefix("SIG").unwrap_or(&n).to_string();
    nix::sys::signal::Signal::iterator()
        .find(|s| s.as_str().trim_start_matches("SIG") == n)
        .map(|s| s as i32 as u32)
}

/// The CRI reason for an exit code.
fn exit_reason(code: i32) -> &'static str {
    if code == 0 { "Completed" } else { "Error" }
}

/// The reason the shim's exit report implies: `OOMKilled` when the kernel OOM-killed
/// a process of the container (as containerd reports it, whatever the exit code);
/// `StartError` when the runtime's init could not exec the process after the start
/// (the exit code is the init's own).
pub fn shim_exit_reason(oom_killed: bool, exec_error: &str) -> Option<&'static str> {
    if oom_killed {
        Some("OOMKilled")
    } else if !exec_error.is_empty() {
        Some("StartError")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_by_name_and_number() {
        assert_eq!(signal_number("SIGQUIT"), Some(3));
        assert_eq!(signal_number("term"), Some(15));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("SIGNOPE"), None);
        assert_eq!(signal_number("99"), None);
    }
}
