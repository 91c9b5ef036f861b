//! `Tasks`: the shims' view of each container's process; pids, pause and resume
//! (the runtime's cgroup freezer, v1 or v2), kill, and metrics from its cgroup.

use std::sync::Arc;

use berth_proto::shim as shimpb;
use tonic::{Request, Response, Status};

use super::{filters, objects, pb};
use crate::error::CriError;
use crate::events::{Event, Fields};
use crate::records::{ContainerRecord, ContainerState};
use crate::services::Services;

pub(super) struct Tasks {
    pub svc: Arc<Services>,
}

impl Fields for pb::Task {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "id" => Some(self.id.clone()),
            [f] if f == "sandbox_id" => Some(self.sandbox_id.clone()),
            [f] if f == "status" => Some(self.status.clone()),
            [f] if f == "pid" => Some(self.pid.to_string()),
            _ => None,
        }
    }
}

fn status_name(status: i32) -> &'static str {
    match shimpb::TaskStatus::try_from(status) {
        Ok(shimpb::TaskStatus::Created) => "created",
        Ok(shimpb::TaskStatus::Running) => "running",
        Ok(shimpb::TaskStatus::Stopped) => "stopped",
        Ok(shimpb::TaskStatus::Paused) => "paused",
        _ => "unknown",
    }
}

impl Tasks {
    /// A running container and its pod's shim.
    async fn running(
        &self,
        id: &str,
    ) -> Result<(ContainerRecord, berth_runtime::client::ShimClient), Status> {
        let rec = self.svc.ctx.container(id, "id")?;
        if rec.state != ContainerState::Running {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is not running",
                rec.id
            ))
            .into());
        }
        let shim = self
            .svc
            .ctx
            .shims
            .get(&rec.sandbox_id)
            .await
            .ok_or_else(|| {
                CriError::FailedPrecondition(format!("the shim of pod {} is gone", rec.sandbox_id))
            })?;
        Ok((rec, shim))
    }

    /// Pause or resume, and its event.
    async fn freeze(&self, id: &str, pause: bool) -> Result<Response<pb::Empty>, Status> {
        let (rec, shim) = self.running(id).await?;
        let what = if pause { "pausing" } else { "resuming" };
        shim.pause(&rec.id, pause)
            .await
            .map_err(|e| CriError::shim(format!("{what} {}", rec.id), e))?;
        let container_id = rec.id.clone();
        let event = match pause {
            true => Event::TaskPaused { container_id },
            false => Event::TaskResumed { container_id },
        };
        self.svc.ctx.events.publish(&rec.sandbox_id, event);
        tracing::info!(container = %rec.id, paused = pause, "task {}", if pause { "paused" } else { "resumed" });
        Ok(Response::new(pb::Empty {}))
    }
}

#[tonic::async_trait]
impl pb::tasks_server::Tasks for Tasks {
    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let filter = filters("filters", &req.into_inner().filters)?;
        let states = objects::shim_states(&self.svc).await;
        let tasks = self
            .svc
            .ctx
            .records
            .containers()
            .iter()
            .map(|rec| match states.get(&rec.id) {
                Some(s) => pb::Task {
                    id: rec.id.clone(),
                    sandbox_id: rec.sandbox_id.clone(),
                    pid: s.pid,
                    status: status_name(s.status).to_string(),
                    exit_status: s.exit_status,
                    exited_at: s.exited_at_unix_nanos,
                },
                // The shim no longer has it (deleted, or its shim is gone).
                None => pb::Task {
                    id: rec.id.clone(),
                    sandbox_id: rec.sandbox_id.clone(),
                    pid: 0,
                    status: "stopped".to_string(),
                    exit_status: u32::try_from(rec.exit_code).unwrap_or_default(),
                    exited_at: rec.finished_at,
                },
            })
            .filter(|t| filter.matches(t))
            .collect();
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }

    async fn pids(
        &self,
        req: Request<pb::IdRequest>,
    ) -> Result<Response<pb::PidsResponse>, Status> {
        let (rec, shim) = self.running(&req.into_inner().id).await?;
        let pids = shim
            .pids(&rec.id)
            .await
            .map_err(|e| CriError::shim(format!("listing the pids of {}", rec.id), e))?;
        Ok(Response::new(pb::PidsResponse { pids }))
    }

    async fn pause(&self, req: Request<pb::IdRequest>) -> Result<Response<pb::Empty>, Status> {
        self.freeze(&req.into_inner().id, true).await
    }

    async fn resume(&self, req: Request<pb::IdRequest>) -> Result<Response<pb::Empty>, Status> {
        self.freeze(&req.into_inner().id, false).await
    }

    async fn kill(&self, req: Request<pb::KillRequest>) -> Result<Response<pb::Empty>, Status> {
        let req = req.into_inner();
        if req.signal == 0 || req.signal > 64 {
            return Err(CriError::invalid(
                "signal",
                format!("{} is not a signal (1-64)", req.signal),
            )
            .into());
        }
        let (rec, shim) = self.running(&req.id).await?;
        shim.kill(&rec.id, req.signal, req.all)
            .await
            .map_err(|e| CriError::shim(format!("signalling {}", rec.id), e))?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn metrics(
        &self,
        req: Request<pb::IdRequest>,
    ) -> Result<Response<pb::MetricsResponse>, Status> {
        let id = req.into_inner().id;
        let rec = self.svc.ctx.container(&id, "id")?;
        let pids = match self.running(&rec.id).await {
            Ok((rec, shim)) => shim.pids(&rec.id).await.map_or(0, |p| p.len() as u64),
            Err(_) => 0,
        };
        let svc = self.svc.clone();
        let stats = tokio::task::spawn_blocking(move || svc.stats.container_stats(&rec.id))
            .await
            .map_err(CriError::from)??;
        let val = |v: &Option<k8s_cri::v1::UInt64Value>| v.as_ref().map_or(0, |v| v.value);
        let cpu = stats.cpu.unwrap_or_default();
        let mem = stats.memory.unwrap_or_default();
        let limit = val(&mem.available_bytes) + val(&mem.working_set_bytes);
        Ok(Response::new(pb::MetricsResponse {
            timestamp: cpu.timestamp.max(mem.timestamp),
            cpu_usage_nanos: val(&cpu.usage_core_nano_seconds),
            memory_working_set_bytes: val(&mem.working_set_bytes),
            memory_usage_bytes: val(&mem.usage_bytes),
            memory_limit_bytes: if val(&mem.available_bytes) == 0 {
                0
            } else {
                limit
            },
            pids,
        }))
    }
}
