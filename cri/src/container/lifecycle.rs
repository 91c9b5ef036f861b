//! Start, stop, remove, and the exits the shims report (or berth infers).

use std::time::Duration;

use berth_proto::shim as pb;
use berth_runtime::client::ShimClient;
use berth_runtime::timefmt::now_unix_nanos;
use tracing::{info, warn};

use super::{ContainerService, exit_reason, shim_exit_reason};
use crate::error::{CriError, Result};
use crate::events::Event;
use crate::records::{ContainerRecord, ContainerState};

/// How long a stop waits for a container's exit after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(15);
/// How long the task of a failed start may take to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(10);

/// An exit as berth records it.
pub struct Exit<'a> {
    /// The exit status (128 + signal for a signalled process).
    pub code: i32,
    /// When (Unix nanoseconds; 0 = now).
    pub at: i64,
    /// A reason other than the code's (`OOMKilled`, `ShimDied`, `Unknown`).
    pub reason: Option<&'a str>,
    /// Detail for the reason.
    pub message: &'a str,
}

impl Exit<'_> {
    /// The exit a shim reported.
    pub fn reported(st: &pb::ExitStatus) -> Exit<'_> {
        Exit {
            code: st.exit_status as i32,
            at: st.exited_at_unix_nanos,
            reason: shim_exit_reason(st.oom_killed, &st.exec_error),
            message: &st.exec_error,
        }
    }
}

impl ContainerService {
    /// Records an exit the shim reported (or berth inferred); the first one wins.
    pub fn record_exit(&self, id: &str, exit: Exit<'_>) {
        let _g = self.ctx.record_guard();
        self.record_exit_locked(id, exit, false);
    }

    /// `record_exit` under the record lock; `overwrite` replaces an exit already
    /// recorded (a failed start's own verdict over the exit its killed init reported).
    fn record_exit_locked(&self, id: &str, exit: Exit<'_>, overwrite: bool) {
        let ctx = &self.ctx;
        let Some(mut rec) = ctx.records.container(id) else {
            return;
        };
        if rec.state == ContainerState::Exited && !overwrite {
            return;
        }
        let published = rec.state == ContainerState::Exited;
        // An exit before StartContainer recorded the start: the process did start.
        let unstarted = ctx
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        rec.state = ContainerState::Exited;
        rec.exit_code = exit.code;
        rec.finished_at = if exit.at > 0 {
            exit.at
        } else {
            now_unix_nanos()
        };
        rec.reason = exit.reason.unwrap_or(exit_reason(exit.code)).to_string();
        rec.message = exit.message.to_string();
        let pid = std::mem::take(&mut rec.pid);
        if let Err(e) = ctx.records.put_container(&rec) {
            warn!(container = id, error = %e, "recording exit");
        }
        info!(container = id, code = exit.code, reason = %rec.reason, "container exited");
        if published {
            return; // its exit event is out already
        }
        if unstarted {
            let start = Event::TaskStart {
                container_id: id.to_string(),
                pid,
            };
            ctx.events.publish(&rec.sandbox_id, start);
        }
        ctx.events.publish(
            &rec.sandbox_id,
            Event::TaskExit {
                container_id: id.to_string(),
                id: id.to_string(),
                pid,
                exit_status: exit.code as u32,
                exited_at: rec.finished_at,
            },
        );
    }

    /// A pod's shim died: its containers run on, orphaned. Kill them through the runtime
    /// CLI directly (`delete --force`, as containerd does) and report them exited (137).
    pub async fn reap_orphans(&self, sandbox: &str) {
        let Some(pod) = self.ctx.records.sandbox(sandbox) else {
            return;
        };
        let handler = self
            .ctx
            .cfg
            .runtimes
            .get(&pod.runtime_handler)
            .cloned()
            .unwrap_or_default();
        let root = self.ctx.cfg.runtime_root(&pod.runtime_handler);
        let log = self.ctx.paths.shim_dir(sandbox).join("runtime.log");
        let runc = berth_runtime::runc::Runc::new(&handler.path, &root, &log, handler.args.clone())
            .with_timeout(std::time::Duration::from_secs(handler.timeout_secs));
        // Exited ones too: the shim that would have deleted them at their removal is
        // gone, and their runtime state holds their cgroups. (Those whose state is
        // gone were deleted by an earlier call.)
        for c in self.ctx.containers_of(sandbox) {
            if root.join(&c.id).exists() {
                let (r, id) = (runc.clone(), c.id.clone());
                let killed = tokio::task::spawn_blocking(move || r.delete(&id, true)).await;
                if let Ok(Err(e)) = killed {
                    if !e.is_not_found() {
                        warn!(container = %c.id, error = %e, "killing a container of a dead shim");
                    }
                }
            }
            if c.state != ContainerState::Exited {
                let message = "the pod's shim died; berth killed the container";
                self.record_exit(&c.id, died(Some("ShimDied"), message));
            }
        }
    }

    /// After a restart: containers that exited while berthd was down get their real exit
    /// from the shim; those whose shim is gone are marked exited (137).
    pub async fn recover(&self) {
        for rec in self.ctx.records.containers() {
            if rec.state == ContainerState::Exited {
                continue;
            }
            let Some(shim) = self.ctx.shims.get(&rec.sandbox_id).await else {
                self.record_exit(&rec.id, died(Some("Unknown"), "the pod's shim died"));
                continue;
            };
            match shim.state(&rec.id).await {
                Ok(st) if st.status == pb::TaskStatus::Stopped as i32 => {
                    let exit = Exit {
                        code: st.exit_status as i32,
                        at: st.exited_at_unix_nanos,
                        reason: shim_exit_reason(st.oom_killed, &st.exec_error),
                        message: &st.exec_error,
                    };
                    self.record_exit(&rec.id, exit)
                }
                Ok(_) => {}
                Err(e) => {
                    let message = format!("the shim lost the task: {e}");
                    self.record_exit(&rec.id, died(Some("Unknown"), &message))
                }
            }
        }
    }

    /// StartContainer.
    pub async fn start(&self, id: &str) -> Result<()> {
        let mut rec = self.ctx.container(id, "container_id")?;
        if rec.state != ContainerState::Created {
            return Err(CriError::FailedPrecondition(format!(
                "container {} is not in the created state",
                rec.id
            )));
        }
        let shim = self.shim_of(&rec).await?;
        // Taken before the start: a fast process may exit (and be recorded) before it returns.
        let started_at = now_unix_nanos();
        let _starting = Starting::mark(&self.ctx, &rec.id);
        let started = shim.start(&rec.id).await;
        if let Err(e) = started {
            return Err(self.start_failed(&rec, &shim, e).await);
        }
        // Serialised with exit events: a fast exit must not be overwritten by Running.
        let _g = self.ctx.record_guard();
        Starting::clear(&self.ctx, &rec.id);
        rec.started_at = started_at;
        if let Some(cur) = self.ctx.records.container(&rec.id) {
            if cur.state == ContainerState::Exited {
                // It already ran to completion: keep the exit, add the start time.
                let mut done = cur;
                done.started_at = started_at.min(done.finished_at);
                return Ok(self.ctx.records.put_container(&done)?);
            }
        }
        rec.state = ContainerState::Running;
        self.ctx.records.put_container(&rec)?;
        // Under the record lock, so that a fast exit is published after it.
        self.ctx.events.publish(
            &rec.sandbox_id,
            Event::TaskStart {
                container_id: rec.id.clone(),
                pid: rec.pid,
            },
        );
        Ok(())
    }

    /// A start that failed leaves an exited container (128, `StartError`, the runtime's
    /// error as its message) and no task, as containerd does: kubelet sees why.
    async fn start_failed(
        &self,
        rec: &ContainerRecord,
        shim: &ShimClient,
        e: berth_runtime::client::ShimError,
    ) -> CriError {
        let err = CriError::shim("starting container", e);
        let message = crate::status::cut(err.to_string(), 4096);
        let exit = Exit {
            code: 128,
            at: 0,
            reason: Some("StartError"),
            message: &message,
        };
        {
            // Under the record lock, over an exit the dying init may have reported.
            let _g = self.ctx.record_guard();
            Starting::clear(&self.ctx, &rec.id);
            self.record_exit_locked(&rec.id, exit, true);
        }
        if let Err(e) = shim.kill_and_reap(&rec.id, REAP_WAIT).await {
            warn!(container = %rec.id, error = %e, "deleting the task of a failed start");
        }
        err
    }

    /// StopContainer: the image's stop signal, SIGKILL after `timeout` seconds (0 = at once).
    pub async fn stop(&self, id: &str, timeout: i64) -> Result<()> {
        // Idempotent, as StopPodSandbox: kubelet retries stops after restarts and
        // races with removal, and an unknown id is already stopped.
        let Some(rec) = self.ctx.resolve_container(id, "container_id")? else {
            return Ok(());
        };
        self.stop_record(&rec, timeout).await
    }

    /// Stops one container and records its exit.
    pub async fn stop_record(&self, rec: &ContainerRecord, timeout: i64) -> Result<()> {
        if rec.state == ContainerState::Exited {
            return Ok(());
        }
        let Some(shim) = self.ctx.shims.get(&rec.sandbox_id).await else {
            self.reap_orphans(&rec.sandbox_id).await;
            return Ok(());
        };
        if timeout > 0 && rec.state == ContainerState::Running {
            let _ = shim.kill(&rec.id, rec.stop_signal, false).await;
            let grace = Duration::from_secs(timeout as u64);
            if let Ok(Ok(st)) = tokio::time::timeout(grace, shim.wait(&rec.id)).await {
                self.record_exit(&rec.id, Exit::reported(&st));
                return Ok(());
            }
        }
        let killed = match shim.kill(&rec.id, 9, true).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        };
        let exit = match killed {
            Ok(()) => match tokio::time::timeout(KILL_WAIT, shim.wait(&rec.id)).await {
                Ok(r) => r,
                // A process the kernel cannot kill (D state) must not wedge the call;
                // kubelet retries the stop.
                Err(_) => {
                    return Err(CriError::DeadlineExceeded(format!(
                        "container {} did not exit within {}s of SIGKILL",
                        rec.id,
                        KILL_WAIT.as_secs()
                    )));
                }
            },
            Err(e) => Err(e),
        };
        match exit {
            Ok(st) => self.record_exit(&rec.id, Exit::reported(&st)),
            Err(e) if e.is_not_found() => self.record_exit(
                &rec.id,
                died(Some("Unknown"), "the shim no longer knows the task"),
            ),
            Err(e) => return Err(CriError::shim(format!("stopping container {}", rec.id), e)),
        }
        Ok(())
    }

    /// RemoveContainer: kills a running container, then frees everything. Idempotent; an
    /// unknown id is not an error.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let Some(rec) = self.ctx.resolve_container(id, "container_id")? else {
            return Ok(());
        };
        self.remove_record(&rec).await?;
        self.ctx.heap.after_burst();
        Ok(())
    }

    /// Removes one container: its task, files and record.
    pub async fn remove_record(&self, rec: &ContainerRecord) -> Result<()> {
        self.stop_record(rec, 0).await?;
        if let Some(shim) = self.ctx.shims.get(&rec.sandbox_id).await {
            match shim.delete(&rec.id).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(CriError::shim(format!("deleting task {}", rec.id), e)),
            }
        }
        self.release_fs(&rec.id).await;
        crate::failpoint::failpoint("container-remove-before-record");
        let _g = self.ctx.record_guard();
        // A concurrent removal (a retry, or the pod's) may have been first: its events
        // are out already. The current record has the exit the stop recorded.
        let Some(rec) = self.ctx.records.container(&rec.id) else {
            return Ok(());
        };
        self.ctx.records.delete_container(&rec.id)?;
        info!(container = %rec.id, "container removed");
        let events = &self.ctx.events;
        events.publish(
            &rec.sandbox_id,
            Event::TaskDelete {
                container_id: rec.id.clone(),
                id: rec.id.clone(),
                pid: 0,
                exit_status: u32::try_from(rec.exit_code).unwrap_or_default(),
                exited_at: rec.finished_at,
            },
        );
        events.publish(
            &rec.sandbox_id,
            Event::ContainerDelete { id: rec.id.clone() },
        );
        Ok(())
    }

    /// Stops every container of a pod at once (as kubelet expects of a pod stop) and
    /// deletes their tasks, so that the shim can go.
    pub async fn stop_all_of(&self, sandbox: &str) -> Result<()> {
        for c in self.ctx.containers_of(sandbox) {
            self.stop_record(&c, 0).await?;
            if let Some(shim) = self.ctx.shims.get(sandbox).await {
                let _ = shim.delete(&c.id).await;
            }
        }
        Ok(())
    }

    /// Removes every container of a pod.
    pub async fn remove_all_of(&self, sandbox: &str) -> Result<()> {
        for c in self.ctx.containers_of(sandbox) {
            self.remove_record(&c).await?;
        }
        Ok(())
    }

    /// Unmounts and removes a container's rootfs, writable layer and bundle.
    pub async fn release_fs(&self, id: &str) {
        let (cdir, bundle) = (
            self.ctx.paths.container_dir(id),
            self.ctx.paths.bundle_dir(id),
        );
        let _ = tokio::task::spawn_blocking(move || {
            let _ = nix::mount::umount2(&bundle.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir_all(&bundle);
            let _ = std::fs::remove_dir_all(&cdir);
        })
        .await;
    }
}

/// A container inside StartContainer; unmarked when the call ends, however it ends
/// (a caller that goes away drops the future).
struct Starting {
    ctx: std::sync::Arc<crate::context::Context>,
    id: String,
}

impl Starting {
    fn mark(ctx: &std::sync::Arc<crate::context::Context>, id: &str) -> Starting {
        let mut set = ctx.starting.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(id.to_string());
        Starting {
            ctx: ctx.clone(),
            id: id.to_string(),
        }
    }

    fn clear(ctx: &crate::context::Context, id: &str) {
        ctx.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        Starting::clear(&self.ctx, &self.id);
    }
}

/// A container berth gives up on: 137, with why.
fn died<'a>(reason: Option<&'a str>, message: &'a str) -> Exit<'a> {
    Exit {
        code: 137,
        at: 0,
        reason,
        message,
    }
}
