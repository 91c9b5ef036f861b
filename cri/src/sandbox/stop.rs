//! StopPodSandbox and RemovePodSandbox: idempotent, and they work after a crash or with
//! the pod's shim gone.

use std::path::PathBuf;
use std::time::Duration;

use tracing::{info, warn};

use super::SandboxService;
use crate::error::{CriError, Result};
use crate::records::{SandboxRecord, SandboxState};

/// How long a stop waits for the infra process after SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Whether a pid is a live (not zombie) process.
fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .map(|st| st != "Z")
        })
        .unwrap_or(false)
}

impl SandboxService {
    /// StopPodSandbox: stops every container and the infra process, frees the netns and
    /// /dev/shm. Idempotent; an unknown id is not an error.
    pub async fn stop(&self, id: &str) -> Result<()> {
        let Some(rec) = self.ctx.resolve_sandbox(id, "pod_sandbox_id")? else {
            return Ok(());
        };
        let lock = self.ctx.pod_locks.of(&rec.id);
        let _g = lock.lock().await;
        self.stop_locked(&rec).await
    }

    async fn stop_locked(&self, rec: &SandboxRecord) -> Result<()> {
        self.containers.stop_all_of(&rec.id).await?;
        self.stop_infra(rec).await;
        // CNI DEL while the netns still exists; an error keeps the netns and the attachment
        // for kubelet's retry of the stop.
        self.ctx
            .net
            .teardown(&self.ctx.paths.cni_cache(&rec.id))
            .await
            .map_err(|e| CriError::internal("tearing down the pod network", e))?;
        crate::failpoint::failpoint("sandbox-stop-after-network");
        let (shm, ns) = (self.ctx.paths.shm(&rec.id), rec.netns.clone());
        tokio::task::spawn_blocking(move || release_namespaces(&shm, ns.as_deref())).await??;
        // Under the record lock, as the watcher's NotReady: one `/sandboxes/stop`
        // per stop, from whichever saw the pod Ready.
        let _g = self.ctx.record_guard();
        if let Some(mut cur) = self.ctx.records.sandbox(&rec.id) {
            let was_ready = cur.state == SandboxState::Ready;
            if was_ready || cur.infra_pid != 0 {
                cur.state = SandboxState::NotReady;
                cur.infra_pid = 0;
                self.ctx.records.put_sandbox(&cur)?;
            }
            if was_ready {
                let stop = crate::events::Event::SandboxStop {
                    sandbox_id: rec.id.clone(),
                };
                self.ctx.events.publish(&rec.id, stop);
            }
        }
        info!(sandbox = %rec.id, "sandbox stopped");
        Ok(())
    }

    /// The infra process through the shim (then the shim shuts down); with the shim
    /// dead, the reparented infra process by pid, if its root shows it is still ours.
    async fn stop_infra(&self, rec: &SandboxRecord) {
        if let Some(c) = self.ctx.shims.get(&rec.id).await {
            if let Err(e) = c.kill_and_reap(&rec.id, STOP_WAIT).await {
                warn!(sandbox = %rec.id, error = %e, "stopping infra");
            }
            let _ = c.shutdown().await;
            self.ctx.shims.remove(&rec.id).await;
            return;
        }
        if rec.infra_pid == 0 {
            return;
        }
        let root = std::fs::read_link(format!("/proc/{}/root", rec.infra_pid)).ok();
        if root != Some(self.ctx.paths.shim_dir(&rec.id).join("infra-root")) {
            return;
        }
        let pid = rec.infra_pid;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        // Stop returns once the process is gone (or a zombie awaiting its new parent).
        let deadline = tokio::time::Instant::now() + STOP_WAIT;
        while process_running(pid) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// RemovePodSandbox: stops if needed, then frees every directory and cgroup and the
    /// record. Idempotent; an unknown id is not an error.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let Some(rec) = self.ctx.resolve_sandbox(id, "pod_sandbox_id")? else {
            return Ok(());
        };
        let lock = self.ctx.pod_locks.of(&rec.id);
        let _g = lock.lock().await;
        // A removal that held the lock before this one may have finished it.
        let Some(rec) = self.ctx.records.sandbox(&rec.id) else {
            return Ok(());
        };
        self.stop_locked(&rec).await?;
        self.containers.remove_all_of(&rec.id).await?;
        // Held until the record is gone, so that a concurrent removal of the slice's
        // other pod sees this one gone (and stops the slice) or waits for it.
        let _create = match &rec.systemd_slice {
            Some(slice) => {
                let g = self.ctx.create_lock.lock().await;
                crate::podscope::release(&self.ctx, &rec.id, slice).await?;
                Some(g)
            }
            None => None,
        };
        let paths = &self.ctx.paths;
        let dirs = [paths.sandbox_root(&rec.id), paths.sandbox_state(&rec.id)];
        let cgroups: Vec<PathBuf> = rec.cgroup_dirs.iter().map(PathBuf::from).collect();
        let socket = paths.shim_socket(&rec.id);
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(&socket);
            berth_runtime::podcgroup::remove(&cgroups);
            for d in dirs {
                match std::fs::remove_dir_all(&d) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(CriError::internal(&format!("removing {}", d.display()), e));
                    }
                    _ => {}
                }
            }
            Ok(())
        })
        .await??;
        crate::failpoint::failpoint("sandbox-remove-before-record");
        self.ctx.records.delete_sandbox(&rec.id)?;
        self.ctx.pod_locks.forget(&rec.id);
        info!(sandbox = %rec.id, "sandbox removed");
        let delete = crate::events::Event::SandboxDelete {
            sandbox_id: rec.id.clone(),
        };
        self.ctx.events.publish(&rec.id, delete);
        self.ctx.heap.after_burst();
        Ok(())
    }
}

/// Unmounts /dev/shm and unpins the netns (both may already be gone).
fn release_namespaces(shm: &std::path::Path, ns: Option<&std::path::Path>) -> Result<()> {
    match nix::mount::umount2(shm, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(CriError::internal("unmounting /dev/shm", e)),
    }
    if let Some(ns) = ns {
        berth_runtime::netns::remove_pinned(ns)
            .map_err(|e| CriError::internal("removing network namespace", e))?;
    }
    Ok(())
}
