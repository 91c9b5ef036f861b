//! Pod sandboxes: RunPodSandbox builds a pod step by step (dirs and files, /dev/shm,
//! pinned netns, pod cgroup, shim, infra process, record) and undoes the finished
//! steps if a later one fails. Stop and Remove are idempotent and work after a crash.
//! A pod's containers are the container service's business: this one asks it to stop
//! and remove them, and hands it the exits the pod's shim reports.

mod files;
mod recover;
mod run;
mod status;
mod stop;
mod validate;
mod watch;

use std::sync::Arc;

use tracing::{info, warn};

use crate::container::ContainerService;
use crate::context::Context;
use crate::records::SandboxState;

/// The pod half of the CRI RuntimeService.
#[derive(Clone)]
pub struct SandboxService {
    ctx: Arc<Context>,
    containers: ContainerService,
}

impl SandboxService {
    /// Works over `ctx`, with `containers` for the pods' containers.
    pub fn new(ctx: Arc<Context>, containers: ContainerService) -> SandboxService {
        SandboxService { ctx, containers }
    }

    /// Marks a ready pod NotReady, saying why.
    fn mark_not_ready(&self, id: &str, reason: &str) {
        let _g = self.ctx.record_guard();
        let Some(mut rec) = self.ctx.records.sandbox(id) else {
            return;
        };
        if rec.state != SandboxState::Ready {
            return;
        }
        rec.state = SandboxState::NotReady;
        rec.reason = reason.to_string();
        if let Err(e) = self.ctx.records.put_sandbox(&rec) {
            warn!(sandbox = id, error = %e, "recording NotReady");
        }
        info!(sandbox = id, reason, "sandbox not ready");
        let stop = crate::events::Event::SandboxStop {
            sandbox_id: id.to_string(),
        };
        self.ctx.events.publish(id, stop);
    }
}
