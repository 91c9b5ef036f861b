//! Tasks from birth to deletion: create (through the OCI runtime), the infra process
//! (forked here), exec processes, start, kill, update, and the one reaping loop that
//! records every exit before reporting it.

use std::io;
use std::path::{Path, PathBuf};

use berth_cgroups::OomWatch;
use berth_proto::shim as pb;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use prost::Message;

use super::oom::BundleSpec;
use super::task::{
    Capture, ContainerTask, Process, ProcessStdio, Task, TaskKind, shown, valid_task_id,
};
use super::{Code, Failure, Reply, Shim, failure};
use crate::console::ConsoleSocket;
use crate::criolog::{CriLogWriter, Stream};
use crate::exits::{ExitRecord, exit_status_of};
use crate::relay::Relay;
use crate::timefmt::now_unix_nanos;

fn internal(what: &str, e: impl std::fmt::Display) -> Failure {
    failure(Code::Internal, format!("{what}: {e}"))
}

fn empty() -> Vec<u8> {
    pb::Empty {}.encode_to_vec()
}

fn not_found(name: &str) -> Failure {
    failure(Code::NotFound, format!("task {name:?} not found"))
}

/// The pid a runtime wrote to `path`; the file is removed.
fn take_pid_file(path: &Path) -> Option<u32> {
    let pid = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let _ = std::fs::remove_file(path);
    pid
}

/// SIGKILL to a process the shim has not reaped (so its pid cannot have been reused).
fn kill_pid(pid: u32) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
}

/// The process's streams once its runtime has run: the pipes, or the pty it sent.
fn stdio_after(
    stdio: Option<ProcessStdio>,
    console: Option<ConsoleSocket>,
    stdin: bool,
) -> io::Result<ProcessStdio> {
    match (stdio, console) {
        (Some(s), _) => Ok(s),
        (None, Some(c)) => ProcessStdio::terminal(&c, stdin),
        (None, None) => Ok(ProcessStdio::default()),
    }
}

impl Shim {
    /// A new task's id must be valid (it names files) and free.
    fn check_new_task(&self, id: &str) -> Result<(), Failure> {
        if !valid_task_id(id) {
            return Err(failure(
                Code::InvalidArgument,
                format!("id {id:?}: must be 1-128 of [A-Za-z0-9_.-]"),
            ));
        }
        if self.tasks.0.contains_key(id) {
            return Err(failure(
                Code::AlreadyExists,
                format!("task {id} already exists"),
            ));
        }
        Ok(())
    }

    /// `<runtime> create`, with the container's stdio and (for a tty) its pty.
    pub(super) fn create(&mut self, r: pb::CreateRequest) -> Reply {
        self.check_new_task(&r.id)?;
        let log = if r.log_path.is_empty() {
            None
        } else {
            Some(
                CriLogWriter::open(Path::new(&r.log_path))
                    .map_err(|e| internal("opening log", e))?,
            )
        };
        let pid_file = self.state_dir.join(format!("{}.pid", r.id));
        let (stdio, io, console) = self.process_io(r.terminal, r.stdin)?;
        let bundle = Path::new(&r.bundle);
        let created = self.runc.create(
            &r.id,
            bundle,
            &pid_file,
            io,
            console.as_ref().map(|c| c.path()),
        );
        let pid = take_pid_file(&pid_file);
        let outcome = created
            .map_err(|e| failure(Code::Internal, e.to_string()))
            .and_then(|()| pid.ok_or(failure(Code::Internal, "the runtime wrote no pid file")))
            .and_then(|pid| {
                let stdio = stdio_after(stdio, console, r.stdin)
                    .map_err(|e| internal("receiving the container's pty", e))?;
                Ok((pid, stdio))
            });
        let (pid, stdio) = match outcome {
            Ok(v) => v,
            Err(e) => {
                // Leave nothing of a half-created container.
                let _ = self.runc.delete(&r.id, true);
                return Err(e);
            }
        };
        let _ = self.exits.remove(&r.id);
        let container = self.watched_container(&r.id, bundle);
        let mut init = Process::new(pid, pb::TaskStatus::Created);
        init.stdio = stdio;
        init.log = log;
        let task = Task {
            kind: TaskKind::Container(container),
            init,
        };
        self.tasks.0.insert(r.id, task);
        Ok(pb::PidResponse { pid }.encode_to_vec())
    }

    /// What the shim keeps of a new container: its cgroup with an OOM watch, and whether
    /// it shares a PID namespace (one read of the bundle's spec).
    fn watched_container(&self, id: &str, bundle: &Path) -> ContainerTask {
        let spec = BundleSpec::read(bundle).unwrap_or_default();
        let cgroup = self.container_cgroup(&spec);
        let oom = cgroup.as_ref().and_then(|cg| {
            OomWatch::arm(cg)
                .map_err(|e| eprintln!("berth-shim: no OOM watch for {id}: {e}"))
                .ok()
        });
        ContainerTask {
            kill_all_on_exit: spec.shares_pid_namespace(),
            oom_baseline: oom.as_ref().map_or(0, OomWatch::total),
            cgroup,
            oom,
            ..ContainerTask::default()
        }
    }

    /// Forks the pod's infra process.
    pub(super) fn start_infra(&mut self, r: pb::InfraRequest) -> Reply {
        self.check_new_task(&r.id)?;
        let netns = (!r.netns_path.is_empty()).then(|| PathBuf::from(&r.netns_path));
        let spec = crate::infra::InfraSpec {
            netns: netns.as_deref(),
            hostname: (!r.hostname.is_empty()).then_some(r.hostname.as_str()),
            host_ipc: r.host_ipc,
            host_pid: r.host_pid,
            cgroup_dirs: &r.cgroup_dirs,
            oom_score_adj: r.oom_score_adj,
            empty_root: &self.state_dir.join("infra-root"),
            sysctls: r.sysctls.into_iter().collect(),
        };
        let pid =
            crate::infra::start_infra(&spec).map_err(|e| failure(Code::Internal, e.to_string()))?;
        let _ = self.exits.remove(&r.id);
        let task = Task {
            kind: TaskKind::Infra,
            init: Process::new(pid, pb::TaskStatus::Running),
        };
        self.tasks.0.insert(r.id, task);
        Ok(pb::PidResponse { pid }.encode_to_vec())
    }

    /// The container an exec goes into: it must run, and the exec id must be free.
    fn check_new_exec(&self, id: &str, exec_id: &str) -> Result<(), Failure> {
        if !valid_task_id(exec_id) {
            return Err(failure(
                Code::InvalidArgument,
                format!("exec_id {exec_id:?}: must be 1-128 of [A-Za-z0-9_.-]"),
            ));
        }
        let t = self.tasks.0.get(id).ok_or_else(|| not_found(id))?;
        let Some(c) = t.container() else {
            return Err(failure(
                Code::FailedPrecondition,
                format!("task {id} is not a container"),
            ));
        };
        if t.init.status != pb::TaskStatus::Running || t.init.exit.is_some() {
            return Err(failure(
                Code::FailedPrecondition,
                format!("task {id} is not running"),
            ));
        }
        if c.execs.contains_key(exec_id) {
            return Err(failure(
                Code::AlreadyExists,
                format!("exec {exec_id} already exists"),
            ));
        }
        Ok(())
    }

    /// `<runtime> exec --detach` of a process in a running container.
    /// An exec process belongs to `conn` (berthd's): killed if it closes first.
    pub(super) fn exec(&mut self, conn: u64, r: pb::ExecRequest) -> Reply {
        self.check_new_exec(&r.id, &r.exec_id)?;
        let (pid, stdio, console) = self.run_exec(&r)?;
        let process = match self.exec_process(conn, &r, pid, stdio, console) {
            Ok(p) => p,
            Err(e) => {
                kill_pid(pid); // a process we cannot talk to is not left running
                return Err(e);
            }
        };
        if let Some(c) = self.tasks.0.get_mut(&r.id).and_then(Task::container_mut) {
            c.execs.insert(r.exec_id.clone(), process);
        }
        self.publish(pb::Event {
            event: Some(pb::event::Event::ExecStarted(pb::ExecStarted {
                id: r.id.clone(),
                exec_id: r.exec_id.clone(),
                pid,
            })),
        });
        // It may already have exited while runc ran: reap now so its exit is not missed.
        self.reap();
        Ok(pb::PidResponse { pid }.encode_to_vec())
    }

    /// Writes the process spec (its `terminal` agreeing with the request) and runs the
    /// runtime: the exec's pid, and the shim's ends of its streams.
    fn run_exec(
        &self,
        r: &pb::ExecRequest,
    ) -> Result<(u32, Option<ProcessStdio>, Option<ConsoleSocket>), Failure> {
        let base = self.state_dir.join(format!("exec-{}-{}", r.id, r.exec_id));
        let (process, pid_file) = (base.with_extension("json"), base.with_extension("pid"));
        let mut spec: ExecProcess = serde_json::from_slice(&r.process_json)
            .map_err(|e| failure(Code::InvalidArgument, format!("process_json: {e}")))?;
        spec.terminal = r.terminal;
        let json = serde_json::to_vec(&spec).map_err(|e| internal("encoding process", e))?;
        std::fs::write(&process, &json).map_err(|e| internal("writing process.json", e))?;
        let (stdio, io, console) = self.process_io(r.terminal, r.stdin)?;
        let result = self.runc.exec(
            &r.id,
            &process,
            &pid_file,
            io,
            console.as_ref().map(|c| c.path()),
        );
        let _ = std::fs::remove_file(&process);
        let pid = take_pid_file(&pid_file);
        if let Err(e) = result {
            // A runtime killed (or failing) after it started the process leaves it ours
            // and unrecorded: it goes too.
            if let Some(pid) = pid {
                kill_pid(pid);
            }
            return Err(failure(Code::Internal, e.to_string()));
        }
        let pid = pid.ok_or(failure(
            Code::Internal,
            "the runtime wrote no pid file for the exec",
        ))?;
        Ok((pid, stdio, console))
    }

    /// The exec's process entry: its streams, its capture (ExecSync) or its client's relay.
    fn exec_process(
        &self,
        conn: u64,
        r: &pb::ExecRequest,
        pid: u32,
        stdio: Option<ProcessStdio>,
        console: Option<ConsoleSocket>,
    ) -> Result<Process, Failure> {
        let stdio = stdio_after(stdio, console, r.stdin)
            .map_err(|e| internal("receiving the exec's pty", e))?;
        let streaming =
            !(r.stdin_fifo.is_empty() && r.stdout_fifo.is_empty() && r.stderr_fifo.is_empty());
        let mut p = Process::new(pid, pb::TaskStatus::Running);
        if streaming {
            let relay = Relay::open(&r.stdin_fifo, &r.stdout_fifo, &r.stderr_fifo, true)
                .map_err(|e| internal("opening the client's streams", e))?;
            p.relays.push(relay);
        }
        let limit = r.capture_limit as usize;
        p.capture = (limit > 0).then(|| Capture {
            stdout: Vec::new(),
            stderr: Vec::new(),
            limit,
            truncated: false,
        });
        p.stdio = stdio;
        p.owner = Some(conn);
        Ok(p)
    }

    /// Start, Delete, State, Pids, CloseIO, Pause, Resume, ReopenLog of a process that
    /// exists (Wait is answered by the dispatcher).
    pub(super) fn task_call(&mut self, method: pb::Method, id: &str, exec_id: &str) -> Reply {
        match method {
            pb::Method::Start => self.start(id),
            pb::Method::Delete => self.delete(id, exec_id),
            pb::Method::State => Ok(self.state_of(id, exec_id).encode_to_vec()),
            pb::Method::Pids => self.pids(id),
            pb::Method::CloseIo => {
                if let Some(p) = self.tasks.process_mut(id, exec_id) {
                    p.stdio.stdin = None;
                }
                Ok(empty())
            }
            pb::Method::Pause | pb::Method::Resume => self.pause(id, method == pb::Method::Pause),
            pb::Method::ReopenLog => {
                if let Some(l) = self.tasks.process_mut(id, "").and_then(|p| p.log.as_mut()) {
                    l.reopen().map_err(|e| internal("reopening log", e))?;
                }
                Ok(empty())
            }
            other => Err(failure(Code::Unimplemented, format!("{other:?}"))),
        }
    }

    fn start(&mut self, id: &str) -> Reply {
        if self.tasks.0[id].init.status != pb::TaskStatus::Created {
            return Err(failure(
                Code::FailedPrecondition,
                format!("task {id} is not in the created state"),
            ));
        }
        self.runc
            .start(id)
            .map_err(|e| failure(Code::Internal, e.to_string()))?;
        let p = &mut self.tasks.0.get_mut(id).ok_or_else(|| not_found(id))?.init;
        if p.exit.is_none() {
            p.status = pb::TaskStatus::Running;
        }
        Ok(pb::PidResponse { pid: p.pid }.encode_to_vec())
    }

    /// Forgets an exited process; a container's runtime state and exit record go too.
    fn delete(&mut self, id: &str, exec_id: &str) -> Reply {
        let name = shown(id, exec_id);
        let p = self
            .tasks
            .process(id, exec_id)
            .ok_or_else(|| not_found(&name))?;
        let Some(exit) = p.exit.clone() else {
            return Err(failure(
                Code::FailedPrecondition,
                format!("task {name} is still running; kill it first"),
            ));
        };
        if !exec_id.is_empty() {
            if let Some(c) = self.tasks.0.get_mut(id).and_then(Task::container_mut) {
                c.execs.remove(exec_id);
            }
        } else {
            // Only containers have runtime state; the infra process has none.
            if !self.tasks.0[id].is_infra() {
                match self.runc.delete(id, true) {
                    Err(e) if !e.is_not_found() => {
                        return Err(failure(Code::Internal, e.to_string()));
                    }
                    _ => {}
                }
                let _ = self.exits.remove(id);
            }
            self.tasks.0.remove(id);
        }
        Ok(pb::ExitStatus {
            exit_status: exit.exit_status,
            exited_at_unix_nanos: exit.exited_at_unix_nanos,
            oom_killed: exit.oom_killed,
            exec_error: exit.exec_error.unwrap_or_default(),
            ..Default::default()
        }
        .encode_to_vec())
    }

    fn pids(&self, id: &str) -> Reply {
        let t = &self.tasks.0[id];
        let pids = if t.init.exit.is_some() {
            vec![]
        } else if t.is_infra() {
            vec![t.init.pid]
        } else {
            self.runc
                .pids(id)
                .map_err(|e| failure(Code::Internal, e.to_string()))?
        };
        Ok(pb::PidsResponse { pids }.encode_to_vec())
    }

    fn pause(&mut self, id: &str, pause: bool) -> Reply {
        self.runc
            .pause(id, pause)
            .map_err(|e| failure(Code::Internal, e.to_string()))?;
        if let Some(p) = self.tasks.process_mut(id, "") {
            if p.exit.is_none() {
                p.status = if pause {
                    pb::TaskStatus::Paused
                } else {
                    pb::TaskStatus::Running
                };
            }
        }
        Ok(empty())
    }

    /// A process's state.
    pub(super) fn state_of(&self, id: &str, exec_id: &str) -> pb::StateResponse {
        let p = self.tasks.process(id, exec_id);
        let exit = p.and_then(|p| p.exit.as_ref());
        pb::StateResponse {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            pid: p.map_or(0, |p| p.pid),
            status: p.map_or(pb::TaskStatus::Unknown, |p| p.status) as i32,
            exit_status: exit.map_or(0, |e| e.exit_status),
            exited_at_unix_nanos: exit.map_or(0, |e| e.exited_at_unix_nanos),
            oom_killed: exit.is_some_and(|e| e.oom_killed),
            exec_error: exit.and_then(|e| e.exec_error.clone()).unwrap_or_default(),
        }
    }

    /// Signals a process: a container's through the runtime, the infra's and an exec's
    /// directly (the pid is an unreaped child of the shim, so it cannot be reused).
    pub(super) fn kill(&mut self, r: pb::KillRequest) -> Reply {
        let name = shown(&r.id, &r.exec_id);
        let t = self.tasks.0.get(&r.id).ok_or_else(|| not_found(&name))?;
        let p = t.process(&r.exec_id).ok_or_else(|| not_found(&name))?;
        if r.signal == 0 || r.signal > 64 {
            return Err(failure(
                Code::InvalidArgument,
                format!("signal {} is not a valid signal", r.signal),
            ));
        }
        let direct = t.is_infra() || !r.exec_id.is_empty();
        // Already gone: killing is done. (An infra or exec pid is reaped once exited and
        // may be reused, so it is never signalled again, `all` or not.)
        if p.exit.is_some() && (!r.all || direct) {
            return Ok(empty());
        }
        if direct {
            let sig = nix::sys::signal::Signal::try_from(r.signal as i32)
                .map_err(|e| failure(Code::InvalidArgument, format!("signal {}: {e}", r.signal)))?;
            return match nix::sys::signal::kill(Pid::from_raw(p.pid as i32), sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(empty()),
                Err(e) => Err(internal(&format!("signalling {name}"), e)),
            };
        }
        // `--all` signals the pids of the container's cgroup, which is needed only when
        // it shares a PID namespace (containerd's rule): with its own, killing its init
        // kills the namespace. runc finds the pids in the v1 devices cgroup, which can
        // be empty (a systemd in a container does not realise that controller), so a
        // SIGKILL to all also goes to the init process, whose exit ends the container.
        let all = r.all && t.container().is_some_and(|c| c.kill_all_on_exit);
        let init_pid = (all && r.signal == 9 && p.exit.is_none()).then_some(p.pid);
        match self.runc.kill(&r.id, r.signal, all) {
            Ok(()) => {
                if let Some(pid) = init_pid {
                    let sigkill = nix::sys::signal::Signal::SIGKILL;
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sigkill);
                }
                Ok(empty())
            }
            // The process may exit between our check and the runtime's.
            Err(_)
                if self
                    .tasks
                    .process(&r.id, "")
                    .is_some_and(|p| p.exit.is_some()) =>
            {
                Ok(empty())
            }
            Err(e) if e.is_process_gone() => Ok(empty()),
            Err(e) => Err(failure(Code::Internal, e.to_string())),
        }
    }

    /// `<runtime> update --resources` with the LinuxResources JSON given.
    pub(super) fn update(&mut self, r: pb::UpdateRequest) -> Reply {
        let t = self.tasks.0.get(&r.id).ok_or_else(|| not_found(&r.id))?;
        if t.is_infra() {
            return Err(failure(
                Code::FailedPrecondition,
                format!("task {} is the pod's infra process", r.id),
            ));
        }
        if t.init.exit.is_some() {
            return Err(failure(
                Code::FailedPrecondition,
                format!("task {} has exited", r.id),
            ));
        }
        if serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&r.resources_json)
            .is_err()
        {
            return Err(failure(
                Code::InvalidArgument,
                "resources_json: not a JSON object",
            ));
        }
        let file = self.state_dir.join(format!("update-{}.json", r.id));
        std::fs::write(&file, &r.resources_json).map_err(|e| internal("writing resources", e))?;
        let result = self.runc.update(&r.id, &file);
        let _ = std::fs::remove_file(&file);
        result
            .map(|()| empty())
            .map_err(|e| failure(Code::Internal, e.to_string()))
    }

    /// Reaps every exited child; exits are recorded, then reported.
    pub(super) fn reap(&mut self) {
        let exited = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG;
        loop {
            // Looked at before it is reaped: a zombie's name still says whether the
            // runtime's init ever became the container's process.
            let peeked = waitid(Id::All, exited | WaitPidFlag::WNOWAIT);
            let Some(pid) = peeked.ok().and_then(|st| st.pid()) else {
                return;
            };
            // Only a running container's init can be one (not runtime commands, execs
            // or the infra process), so only those are looked at.
            let never_ran =
                self.is_container_init(pid.as_raw() as u32) && still_the_runtime_init(pid);
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                // A timed-out runtime command's waiting thread took it: look again.
                Err(nix::errno::Errno::ECHILD) => continue,
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(st) => {
                    // Exited by itself, not killed: a runtime init that could not exec.
                    let exec_failed = never_ran && matches!(st, WaitStatus::Exited(..));
                    if let Some((pid, status)) = exit_status_of(st) {
                        self.on_exit(pid, status, exec_failed);
                    }
                }
            }
        }
    }

    /// Whether `pid` is the init process of a container that has not exited.
    fn is_container_init(&self, pid: u32) -> bool {
        self.tasks
            .0
            .values()
            .any(|t| !t.is_infra() && t.init.pid == pid && t.init.exit.is_none())
    }

    /// One process exited: the rest of a PID-sharing container killed, its output
    /// drained, the OOM verdict read, the exit recorded (containers: on disk,
    /// fsynced), then its waiters answered and the exit published.
    fn on_exit(&mut self, pid: u32, exit_status: u32, exec_failed: bool) {
        let Some((id, exec)) = self.tasks.find_pid(pid) else {
            return; // an orphan reparented to us, or a runtime helper
        };
        // Kill before draining: a surviving writer would keep the pipe from ever
        // running dry.
        if exec.is_empty() {
            self.kill_the_rest(&id);
        }
        // Whatever the process wrote before exiting belongs before its exit.
        self.drain_output(&id, &exec, Stream::Stdout, true);
        self.drain_output(&id, &exec, Stream::Stderr, true);
        let oom_killed = exec.is_empty() && self.init_oom_verdict(&id, exit_status == 137);
        let exec_error = match exec.is_empty() && exec_failed {
            true => self.tasks.process(&id, "").and_then(exec_error),
            false => None,
        };
        if let Some(e) = &exec_error {
            eprintln!("berth-shim: {id}: {e}");
        }
        let rec = ExitRecord {
            pid,
            exit_status,
            exited_at_unix_nanos: now_unix_nanos(),
            oom_killed,
            exec_error,
        };
        if exec.is_empty() {
            if let Err(e) = self.exits.record(&id, &rec) {
                eprintln!("berth-shim: recording exit of {id}: {e}");
            }
        }
        let Some(p) = self.tasks.process_mut(&id, &exec) else {
            return;
        };
        for r in &mut p.relays {
            r.finishing = true;
            r.close_flushed();
        }
        p.relays.retain(|r| !r.is_done());
        p.exit = Some(rec.clone());
        p.status = pb::TaskStatus::Stopped;
        p.stdio.stdin = None;
        p.stdio.console = None;
        // Once its output has ended, its log file must not stay open (kubelet may remove
        // it; on a full disk that frees the space). Survivors still writing keep it.
        p.close_log_if_done();
        let waiters = std::mem::take(&mut p.waiters);
        let payload = p.exit_payload(&rec);
        if p.abandoned {
            self.forget_exec(&id, &exec);
        }
        for (conn, req) in waiters {
            self.respond(conn, pb::Method::Wait as u16, req, Ok(payload.clone()));
        }
        self.publish(pb::Event {
            event: Some(pb::event::Event::Exit(pb::TaskExit {
                id,
                exec_id: exec,
                pid,
                exit_status,
                exited_at_unix_nanos: rec.exited_at_unix_nanos,
                oom_killed,
                exec_error: rec.exec_error.unwrap_or_default(),
            })),
        });
    }

    /// Connections that closed: their exec processes are killed (still running) or
    /// forgotten (exited), since no Wait can come for them.
    pub(super) fn abandon_execs(&mut self, closed: &[u64]) {
        let mut forget = Vec::new();
        for (id, t) in self.tasks.0.iter_mut() {
            let Some(c) = t.container_mut() else {
                continue;
            };
            for (exec_id, p) in c.execs.iter_mut() {
                if !p.owner.is_some_and(|o| closed.contains(&o)) {
                    continue;
                }
                p.owner = None;
                if p.exit.is_some() {
                    forget.push((id.clone(), exec_id.clone()));
                } else {
                    p.abandoned = true;
                    kill_pid(p.pid);
                }
            }
        }
        for (id, exec_id) in forget {
            self.forget_exec(&id, &exec_id);
        }
    }

    fn forget_exec(&mut self, id: &str, exec_id: &str) {
        if let Some(c) = self.tasks.0.get_mut(id).and_then(Task::container_mut) {
            c.execs.remove(exec_id);
        }
    }

    /// Whether a container's init died of an OOM kill: the counter, not only the watch
    /// (the kill and the exit may arrive in one poll). The watch is released.
    fn init_oom_verdict(&mut self, id: &str, killed: bool) -> bool {
        self.check_oom(id, killed);
        self.tasks
            .0
            .get_mut(id)
            .and_then(Task::container_mut)
            .is_some_and(|c| {
                c.oom = None; // nothing more to watch once init is gone
                c.oom_killed
            })
    }

    /// A task's init exited: the rest of a PID-sharing container is killed (a
    /// container with its own PID namespace lost the rest with its init).
    fn kill_the_rest(&mut self, id: &str) {
        let Some(t) = self.tasks.0.get(id) else {
            return;
        };
        if t.container().is_some_and(|c| c.kill_all_on_exit) {
            if let Err(e) = self.runc.kill(id, 9, true) {
                if !e.is_not_found() {
                    eprintln!("berth-shim: killing the rest of {id} after its init exited: {e}");
                }
            }
        }
    }
}

/// An exec's OCI process as berthd sends it: the shim sets `terminal` and passes the
/// rest through untouched.
#[derive(serde::Deserialize, serde::Serialize)]
struct ExecProcess {
    #[serde(default)]
    terminal: bool,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

/// Whether a zombie child is a runtime's init that never exec'd the container's
/// process: runc names its init `runc:[2:INIT]` until the exec replaces it.
fn still_the_runtime_init(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("runc:["))
}

/// Why a started container's init exited without running its process: the runtime's
/// init says why on the container's stderr (and exits 1 with runc 1.1, 255 with 1.2).
fn exec_error(p: &Process) -> Option<String> {
    if p.status != pb::TaskStatus::Running {
        return None;
    }
    let said = String::from_utf8_lossy(&p.early_errors);
    let line = said
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("the runtime's init ended before running the process");
    Some(format!(
        "exec failed: {}",
        line.chars().take(300).collect::<String>()
    ))
}
