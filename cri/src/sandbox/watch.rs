//! One watcher per pod shim: the infra's exit or the shim's death makes the pod
//! NotReady; containers' exits go to the container service; lagged events resync from
//! the shim's task list.

use berth_proto::shim as pb;
use berth_runtime::client::ShimClient;
use tokio::sync::broadcast::error::RecvError;
use tracing::warn;

use super::SandboxService;
use crate::container::Exit;
use crate::events::Event;
use crate::records::SandboxState;

impl SandboxService {
    /// Follows a pod's shim until it goes away.
    pub(super) async fn watch(&self, id: &str, client: ShimClient) {
        if client.subscribe().await.is_err() {
            return;
        }
        let (me, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            let mut events = client.events();
            loop {
                // Events first: the shim's last ones (the infra's exit of a normal
                // stop) are queued before its connection closes.
                tokio::select! {
                    biased;
                    ev = events.recv() => match ev {
                        Ok(ev) => me.on_event(&id, ev),
                        Err(RecvError::Lagged(n)) => {
                            warn!(sandbox = %id, missed = n, "shim events lagged; resyncing");
                            me.resync(&id, &client).await;
                        }
                        Err(RecvError::Closed) => return,
                    },
                    _ = client.closed() => {
                        me.on_shim_gone(&id).await;
                        return;
                    }
                }
            }
        });
    }

    fn on_event(&self, pod: &str, ev: pb::Event) {
        match ev.event {
            // An exec process's exit is its caller's business, not the container's.
            Some(pb::event::Event::Exit(e)) if e.exec_id.is_empty() => {
                let st = pb::ExitStatus {
                    exit_status: e.exit_status,
                    exited_at_unix_nanos: e.exited_at_unix_nanos,
                    oom_killed: e.oom_killed,
                    exec_error: e.exec_error,
                    ..Default::default()
                };
                self.on_task_exit(pod, &e.id, &st);
            }
            Some(pb::event::Event::Oom(o)) => {
                warn!(sandbox = %pod, container = %o.id, "the kernel OOM-killed a process of the container");
                self.ctx.metrics.oom_killed();
                let oom = Event::TaskOom {
                    container_id: o.id.clone(),
                };
                self.ctx.events.publish(pod, oom);
            }
            _ => {}
        }
    }

    /// The infra process ends the pod; any other task is a container.
    fn on_task_exit(&self, pod: &str, task: &str, st: &pb::ExitStatus) {
        if task == pod {
            let why = format!("the infra process exited with {}", st.exit_status);
            self.mark_not_ready(pod, &why);
        } else {
            self.containers.record_exit(task, Exit::reported(st));
        }
    }

    /// Events were dropped: read every task's state instead.
    async fn resync(&self, pod: &str, client: &ShimClient) {
        let Ok(info) = client.connect_info().await else {
            return;
        };
        let stopped = pb::TaskStatus::Stopped as i32;
        for t in info.tasks.iter().filter(|t| t.status == stopped) {
            let st = pb::ExitStatus {
                exit_status: t.exit_status,
                exited_at_unix_nanos: t.exited_at_unix_nanos,
                oom_killed: t.oom_killed,
                exec_error: t.exec_error.clone(),
                ..Default::default()
            };
            self.on_task_exit(pod, &t.id, &st);
        }
    }

    /// The shim's connection dropped: the pod is NotReady, and unless it was being
    /// stopped, its orphaned containers are killed.
    async fn on_shim_gone(&self, pod: &str) {
        let shutting_down = self
            .ctx
            .records
            .sandbox(pod)
            .is_some_and(|r| r.state != SandboxState::Ready);
        self.mark_not_ready(pod, "the pod's shim died");
        if !shutting_down {
            self.ctx.metrics.shim_died();
            self.containers.reap_orphans(pod).await;
        }
    }
}
