//! The task table: the pod's infra process and its containers, each container with its
//! exec processes nested under it. A process is what the shim started and reaps.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use berth_cgroups::{Cgroup, OomWatch};
use berth_proto::shim as pb;
use prost::Message;

use crate::criolog::CriLogWriter;
use crate::exits::ExitRecord;
use crate::relay::Relay;

/// Output kept for an exec process (ExecSync), up to a limit per stream.
pub(super) struct Capture {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub limit: usize,
    pub truncated: bool,
}

/// The shim's ends of a process's standard streams.
#[derive(Default)]
pub(super) struct ProcessStdio {
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// Where input goes: a pipe, or (tty) the pty master; `None` once closed.
    pub stdin: Option<OwnedFd>,
    /// The pty master of a terminal process (for resize).
    pub console: Option<OwnedFd>,
}

/// One process the shim started: a container's init, an exec, or the infra process.
pub(super) struct Process {
    pub pid: u32,
    pub status: pb::TaskStatus,
    pub stdio: ProcessStdio,
    /// The CRI log its output goes to (a container's init).
    pub log: Option<CriLogWriter>,
    /// Its output kept for the caller instead (ExecSync).
    pub capture: Option<Capture>,
    pub exit: Option<ExitRecord>,
    /// Wait calls to answer at exit: (connection, request id).
    pub waiters: Vec<(u64, u32)>,
    /// Streaming clients (exec sessions, attachers).
    pub relays: Vec<Relay>,
    /// The connection an exec process belongs to: when it closes before the process
    /// is deleted, nobody can wait for it or relay it, so it is killed and dropped.
    pub owner: Option<u64>,
    /// Killed for a closed owner: forgotten at its exit.
    pub abandoned: bool,
    /// The first bytes it wrote to stderr (a terminal's output): where a runtime's
    /// init that could not exec the process says why.
    pub early_errors: Vec<u8>,
}

impl Process {
    pub fn new(pid: u32, status: pb::TaskStatus) -> Process {
        Process {
            pid,
            status,
            stdio: ProcessStdio::default(),
            log: None,
            capture: None,
            exit: None,
            waiters: Vec::new(),
            relays: Vec::new(),
            owner: None,
            abandoned: false,
            early_errors: Vec::new(),
        }
    }

    /// An exited process whose streams have both ended lets go of its log file.
    pub fn close_log_if_done(&mut self) {
        if self.exit.is_some() && self.stdio.stdout.is_none() && self.stdio.stderr.is_none() {
            if let Some(mut log) = self.log.take() {
                let _ = log.close_stream(crate::criolog::Stream::Stdout);
                let _ = log.close_stream(crate::criolog::Stream::Stderr);
            }
        }
    }

    /// A Wait answer: the exit, plus captured output for exec processes.
    pub fn exit_payload(&self, e: &ExitRecord) -> Vec<u8> {
        let (stdout, stderr, truncated) = match &self.capture {
            Some(c) => (c.stdout.clone(), c.stderr.clone(), c.truncated),
            None => (Vec::new(), Vec::new(), false),
        };
        pb::ExitStatus {
            exit_status: e.exit_status,
            exited_at_unix_nanos: e.exited_at_unix_nanos,
            stdout,
            stderr,
            truncated,
            oom_killed: e.oom_killed,
            exec_error: e.exec_error.clone().unwrap_or_default(),
        }
        .encode_to_vec()
    }
}

/// What a container has beyond its init process.
#[derive(Default)]
pub(super) struct ContainerTask {
    /// Without its own PID namespace: when its init exits, the rest of its processes
    /// are killed (nothing else would end them), as containerd's shim does.
    pub kill_all_on_exit: bool,
    /// Its cgroup, for the OOM-kill counter.
    pub cgroup: Option<Cgroup>,
    /// The armed OOM watch while it runs.
    pub oom: Option<OomWatch>,
    /// OOM kills counted before it started (normally 0).
    pub oom_baseline: u64,
    /// An OOM kill was seen (and published).
    pub oom_killed: bool,
    /// Its exec processes by exec id.
    pub execs: BTreeMap<String, Process>,
}

/// What a task is.
pub(super) enum TaskKind {
    /// The pod's infra process: forked by the shim, signalled directly, no runtime state.
    Infra,
    /// An OCI runtime container.
    Container(ContainerTask),
}

/// One task: its kind and its init process.
pub(super) struct Task {
    pub kind: TaskKind,
    pub init: Process,
}

impl Task {
    /// The container part, if this is a container.
    pub fn container(&self) -> Option<&ContainerTask> {
        match &self.kind {
            TaskKind::Container(c) => Some(c),
            TaskKind::Infra => None,
        }
    }

    pub fn container_mut(&mut self) -> Option<&mut ContainerTask> {
        match &mut self.kind {
            TaskKind::Container(c) => Some(c),
            TaskKind::Infra => None,
        }
    }

    pub fn is_infra(&self) -> bool {
        matches!(self.kind, TaskKind::Infra)
    }

    /// Its init (`exec_id` empty) or one of its exec processes.
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            return Some(&self.init);
        }
        self.container()?.execs.get(exec_id)
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            return Some(&mut self.init);
        }
        self.container_mut()?.execs.get_mut(exec_id)
    }

    /// Whether any of its processes still runs.
    pub fn any_running(&self) -> bool {
        self.init.exit.is_none()
            || self
                .container()
                .is_some_and(|c| c.execs.values().any(|p| p.exit.is_none()))
    }
}

/// The shim's tasks by id.
#[derive(Default)]
pub(super) struct Tasks(pub BTreeMap<String, Task>);

impl Tasks {
    /// A process by task id and exec id (empty = the task's init).
    pub fn process(&self, id: &str, exec_id: &str) -> Option<&Process> {
        self.0.get(id)?.process(exec_id)
    }

    pub fn process_mut(&mut self, id: &str, exec_id: &str) -> Option<&mut Process> {
        self.0.get_mut(id)?.process_mut(exec_id)
    }

    /// The (task id, exec id) of the live process with this pid.
    pub fn find_pid(&self, pid: u32) -> Option<(String, String)> {
        for (id, t) in &self.0 {
            if t.init.pid == pid && t.init.exit.is_none() {
                return Some((id.clone(), String::new()));
            }
            if let Some(c) = t.container() {
                for (e, p) in &c.execs {
                    if p.pid == pid && p.exit.is_none() {
                        return Some((id.clone(), e.clone()));
                    }
                }
            }
        }
        None
    }

    /// Every process with its (task id, exec id), for the poll loop.
    pub fn processes(&self) -> impl Iterator<Item = (&str, &str, &Process)> {
        self.0.iter().flat_map(|(id, t)| {
            let execs = t
                .container()
                .into_iter()
                .flat_map(|c| c.execs.iter())
                .map(move |(e, p)| (id.as_str(), e.as_str(), p));
            std::iter::once((id.as_str(), "", &t.init)).chain(execs)
        })
    }
}

/// A task or exec id the shim accepts: it names files in the state dir.
pub fn valid_task_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `id` or `id/exec_id`, for messages.
pub(super) fn shown(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        id.to_string()
    } else {
        format!("{id}/{exec_id}")
    }
}
