//! ExecSync, the OCI process of every exec, and ReopenContainerLog.

use std::time::Duration;

use berth_proto::shim as pb;
use k8s_cri::v1 as cri;
use oci_spec::runtime::Spec;

use super::ContainerService;
use crate::context::new_id;
use crate::error::{CriError, Result};
use crate::events::Event;
use crate::oci::exec_process;
use crate::records::ContainerRecord;

/// Most output ExecSync keeps per stream; two of them fit a 16 MiB gRPC message.
const MAX_EXEC_OUTPUT: usize = 4 << 20;

/// How long a killed exec may take to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(10);

/// An ExecSync process whose caller may leave before it ends: dropped armed, it kills
/// and reaps the process, so nothing keeps running for a caller that is gone.
struct AbandonedExec {
    shim: Option<berth_runtime::client::ShimClient>,
    id: String,
    exec_id: String,
}

impl Drop for AbandonedExec {
    fn drop(&mut self) {
        // Without a runtime (berthd ending) the shim kills it when berthd's connection closes.
        let (Some(shim), Ok(rt)) = (self.shim.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let (id, exec_id) = (
            std::mem::take(&mut self.id),
            std::mem::take(&mut self.exec_id),
        );
        tracing::warn!(container = %id, exec = %exec_id, "ExecSync caller went away; killing the process");
        rt.spawn(async move {
            let _ = shim.kill_and_reap_exec(&id, &exec_id, REAP_WAIT).await;
        });
    }
}

impl ContainerService {
    /// An exec's OCI process (JSON): the container's own process (user, env, cwd,
    /// capabilities) from its bundle, with new args.
    pub fn exec_process_json(&self, id: &str, cmd: &[String], tty: bool) -> Result<Vec<u8>> {
        let path = self.ctx.paths.bundle_dir(id).join("config.json");
        let unreadable = |e: &dyn std::fmt::Display| {
            CriError::internal(&format!("container {id} has no readable runtime spec"), e)
        };
        let bytes = std::fs::read(&path).map_err(|e| unreadable(&e))?;
        let spec: Spec = serde_json::from_slice(&bytes).map_err(|e| unreadable(&e))?;
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| unreadable(&"no process"))?;
        serde_json::to_vec(&exec_process(process, cmd, tty))
            .map_err(|e| CriError::internal("encoding process", e))
    }

    /// `/tasks/exec-added` and `/tasks/exec-started` (the shim does both at once).
    pub fn publish_exec(&self, rec: &ContainerRecord, exec_id: &str, pid: u32) {
        let (container_id, exec_id) = (rec.id.clone(), exec_id.to_string());
        let events = &self.ctx.events;
        let added = Event::TaskExecAdded {
            container_id: container_id.clone(),
            exec_id: exec_id.clone(),
        };
        events.publish(&rec.sandbox_id, added);
        let started = Event::TaskExecStarted {
            container_id,
            exec_id,
            pid,
        };
        events.publish(&rec.sandbox_id, started);
    }

    /// A new exec id (16 hex).
    pub fn new_exec_id() -> String {
        new_id()[..16].to_string()
    }

    /// ExecSync: runs `cmd` in the container with the container's user, env, cwd and
    /// capabilities; kills it when `timeout` seconds pass (0 = no limit).
    pub async fn exec_sync(&self, req: cri::ExecSyncRequest) -> Result<cri::ExecSyncResponse> {
        let rec = self.ctx.container(&req.container_id, "container_id")?;
        if req.cmd.is_empty() {
            return Err(CriError::invalid("cmd", "must not be empty"));
        }
        crate::limits::argv("cmd", &req.cmd)?;
        if req.timeout < 0 {
            return Err(CriError::invalid("timeout", "must not be negative"));
        }
        let rec = self.running(&rec.id)?;
        let process_json = self.exec_process_json(&rec.id, &req.cmd, false)?;
        let shim = self.shim_of(&rec).await?;
        let exec_id = Self::new_exec_id();
        // Dropped with this future when the caller goes away (disconnect, deadline),
        // armed before the exec starts: the shim answers the kill after the exec.
        let mut guard = AbandonedExec {
            shim: Some(shim.clone()),
            id: rec.id.clone(),
            exec_id: exec_id.clone(),
        };
        let started = shim
            .exec(pb::ExecRequest {
                id: rec.id.clone(),
                exec_id: exec_id.clone(),
                process_json,
                capture_limit: MAX_EXEC_OUTPUT as u32,
                ..Default::default()
            })
            .await;
        let pid = started.map_err(|e| {
            // The shim refused it: nothing started. (Lost or late answers keep the
            // guard: the shim may still start it.)
            if matches!(e, berth_runtime::client::ShimError::Remote { .. }) {
                guard.shim = None;
            }
            CriError::shim(format!("exec in {}", rec.id), e)
        })?;
        self.publish_exec(&rec, &exec_id, pid);
        let waited = if req.timeout > 0 {
            let limit = Duration::from_secs(req.timeout as u64);
            tokio::time::timeout(limit, shim.wait_exec(&rec.id, &exec_id))
                .await
                .ok()
        } else {
            Some(shim.wait_exec(&rec.id, &exec_id).await)
        };
        let Some(result) = waited else {
            let _ = shim.kill_and_reap_exec(&rec.id, &exec_id, REAP_WAIT).await;
            guard.shim = None;
            return Err(CriError::DeadlineExceeded(format!(
                "command {:?} in container {} timed out after {}s and was killed",
                req.cmd, rec.id, req.timeout
            )));
        };
        // Disarmed only once the shim has forgotten it: a caller leaving mid-cleanup
        // still gets the exec (and its captured output) freed.
        let _ = shim.delete_exec(&rec.id, &exec_id).await;
        guard.shim = None;
        let st =
            result.map_err(|e| CriError::shim(format!("waiting for exec in {}", rec.id), e))?;
        if st.truncated {
            return Err(CriError::ResourceExhausted(format!(
                "command {:?} wrote more than {} MiB on stdout or stderr (ExecSync keeps at most that much)",
                req.cmd,
                MAX_EXEC_OUTPUT >> 20
            )));
        }
        Ok(cri::ExecSyncResponse {
            stdout: st.stdout,
            stderr: st.stderr,
            exit_code: st.exit_status as i32,
        })
    }

    /// ReopenContainerLog.
    pub async fn reopen_log(&self, id: &str) -> Result<()> {
        let rec = self.running(id)?;
        let shim = self.shim_of(&rec).await?;
        shim.reopen_log(&rec.id)
            .await
            .map_err(|e| CriError::shim("reopening log", e))
    }
}
