//! The shim server: one per pod, single-threaded, driven by `poll` over its socket,
//! a SIGCHLD signalfd, client connections and the containers' output pipes.
//!
//! It is the child subreaper of every container it creates, so all exits come to
//! its one `waitpid` loop; runtime commands run synchronously between polls, so they
//! never race with that loop. Each exit is written to disk before it is reported.
//!
//! It also watches each container's memory cgroup for OOM kills (an fd in the same
//! poll), publishes `TaskOom`, and marks the exit `oom_killed`; since the shim
//! outlives berthd restarts, so do the watches.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use berth_cgroups::{Cgroup, Hierarchy, OomWatch, oom_kill_count};
use berth_proto::frame::{Frame, FrameBuffer, Kind};
use berth_proto::shim as pb;
use berth_proto::shim::ErrorCode as Code;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use prost::Message;

use crate::console::ConsoleSocket;
use crate::criolog::{CriLogWriter, Stream};
use crate::exits::{ExitRecord, ExitStore, exit_status_of};
use crate::relay::Relay;
use crate::runc::{ProcessIo, Runc};
use crate::timefmt::now_unix_nanos;

/// How the shim is set up.
#[derive(Clone, Debug)]
pub struct ShimConfig {
    /// Socket to serve on.
    pub socket: PathBuf,
    /// Directory for exit records, pid files and the runtime's log.
    pub state_dir: PathBuf,
    /// OCI runtime binary.
    pub runtime: PathBuf,
    /// The runtime's state root.
    pub runtime_root: PathBuf,
    /// Extra global arguments for the runtime.
    pub runtime_args: Vec<String>,
}

type Reply = Result<Vec<u8>, (Code, String)>;

/// Output kept for an exec process (ExecSync), up to a limit per stream.
struct Capture {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    limit: usize,
    truncated: bool,
}

struct Task {
    pid: u32,
    /// An exec process (keyed `id/exec_id`): no exit record on disk.
    exec: bool,
    capture: Option<Capture>,
    /// The pod's infra process (signalled directly; not an OCI runtime container).
    infra: bool,
    /// A container without its own PID namespace: when its init exits, the rest of its
    /// processes are killed (nothing else would end them), as containerd's shim does.
    kill_all_on_exit: bool,
    status: pb::TaskStatus,
    log: Option<CriLogWriter>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// Where input goes: a pipe, or (tty) the pty master; `None` once closed.
    stdin: Option<OwnedFd>,
    /// The pty master of a terminal process (for resize).
    console: Option<OwnedFd>,
    exit: Option<ExitRecord>,
    waiters: Vec<(u64, u32)>,
    /// The container's cgroup (containers only), for its OOM-kill counter.
    cgroup: Option<Cgroup>,
    /// The armed OOM watch while the container runs.
    oom: Option<OomWatch>,
    /// OOM kills counted before the container started (normally 0).
    oom_baseline: u64,
    /// An OOM kill was seen (and published).
    oom_killed: bool,
    /// Streaming clients (exec sessions, attachers).
    relays: Vec<Relay>,
}

impl Task {
    fn new(pid: u32, infra: bool, status: pb::TaskStatus) -> Task {
        Task {
            pid,
            exec: false,
            capture: None,
            infra,
            kill_all_on_exit: false,
            status,
            log: None,
            stdout: None,
            stderr: None,
            stdin: None,
            console: None,
            exit: None,
            waiters: Vec::new(),
            cgroup: None,
            oom: None,
            oom_baseline: 0,
            oom_killed: false,
            relays: Vec::new(),
        }
    }
}

struct Conn {
    stream: UnixStream,
    inbuf: FrameBuffer,
    out: Vec<u8>,
    subscribed: bool,
    closed: bool,
}

/// The running shim.
pub struct Shim {
    runc: Runc,
    exits: ExitStore,
    state_dir: PathBuf,
    socket: PathBuf,
    listener: UnixListener,
    sigfd: SignalFd,
    tasks: BTreeMap<String, Task>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    shutdown: bool,
    /// Mounted cgroup hierarchies, for OOM watches (`None` if unreadable).
    cgroups: Option<Hierarchy>,
}

/// The task table key: the container id, or `id/exec_id` for an exec process.
fn task_key(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        id.to_string()
    } else {
        format!("{id}/{exec_id}")
    }
}

/// A Wait answer: the exit, plus captured output for exec processes.
fn exit_payload(t: &Task, e: ExitRecord) -> Vec<u8> {
    let (stdout, stderr, truncated) = match &t.capture {
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
    }
    .encode_to_vec()
}

/// A task id the shim accepts: it names files in the state dir.
pub fn valid_task_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

impl Shim {
    /// Binds the socket and prepares state; SIGCHLD must not be blocked by a caller thread
    /// other than this one (the shim is single-threaded).
    pub fn bind(cfg: &ShimConfig) -> io::Result<Shim> {
        std::fs::create_dir_all(&cfg.state_dir)?;
        let exits = ExitStore::open(&cfg.state_dir.join("exits"))?;
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        mask.thread_block().map_err(io::Error::from)?;
        let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(io::Error::from)?;
        if let Some(dir) = cfg.socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&cfg.socket);
        let listener = UnixListener::bind(&cfg.socket)?;
        std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let runc = Runc::new(
            &cfg.runtime,
            &cfg.runtime_root,
            &cfg.state_dir.join("runtime.log"),
            cfg.runtime_args.clone(),
        );
        Ok(Shim {
            runc,
            exits,
            state_dir: cfg.state_dir.clone(),
            socket: cfg.socket.clone(),
            listener,
            sigfd,
            tasks: BTreeMap::new(),
            conns: HashMap::new(),
            next_conn: 1,
            shutdown: false,
            cgroups: Hierarchy::detect()
                .map_err(|e| eprintln!("berth-shim: no OOM watching: {e}"))
                .ok(),
        })
    }

    /// Serves until a `Shutdown` call succeeds.
    pub fn run(mut self) -> io::Result<()> {
        // Children that exited before the loop started still need reaping.
        self.reap();
        while !self.shutdown || self.conns.values().any(|c| !c.out.is_empty()) {
            self.poll_once()?;
        }
        Ok(())
    }

    fn poll_once(&mut self) -> io::Result<()> {
        // Which fd each poll slot watches.
        enum Slot {
            Listener,
            Signal,
            Conn(u64),
            Pipe(String, Stream),
            Oom(String),
            RelayIn(String, usize),
            RelayOut(String, usize, bool),
            StdinOut(String),
        }
        let mut slots = Vec::new();
        let mut fds: Vec<PollFd<'_>> = Vec::new();
        fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
        slots.push(Slot::Listener);
        fds.push(PollFd::new(self.sigfd.as_fd(), PollFlags::POLLIN));
        slots.push(Slot::Signal);
        for (id, c) in &self.conns {
            let mut fl = PollFlags::POLLIN;
            if !c.out.is_empty() {
                fl |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(c.stream.as_fd(), fl));
            slots.push(Slot::Conn(*id));
        }
        for (id, t) in &self.tasks {
            for (fd, s) in [(&t.stdout, Stream::Stdout), (&t.stderr, Stream::Stderr)] {
                if let Some(fd) = fd {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    slots.push(Slot::Pipe(id.clone(), s));
                }
            }
            if let Some(w) = &t.oom {
                fds.push(PollFd::new(w.fd(), PollFlags::POLLIN));
                slots.push(Slot::Oom(id.clone()));
            }
            let mut input_waiting = false;
            for (i, r) in t.relays.iter().enumerate() {
                // Read more input only when the last of it reached the process.
                match &r.input {
                    Some(fd) if r.pending_in.is_empty() => {
                        fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                        slots.push(Slot::RelayIn(id.clone(), i));
                    }
                    _ => {}
                }
                input_waiting |= !r.pending_in.is_empty();
                for (fd, err) in r.waiting_outputs() {
                    fds.push(PollFd::new(fd, PollFlags::POLLOUT));
                    slots.push(Slot::RelayOut(id.clone(), i, err));
                }
            }
            if let (true, Some(fd)) = (input_waiting, &t.stdin) {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLOUT));
                slots.push(Slot::StdinOut(id.clone()));
            }
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<(usize, PollFlags)> = fds
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.revents().filter(|r| !r.is_empty()).map(|r| (i, r)))
            .collect();
        drop(fds);
        for (i, rev) in ready {
            match &slots[i] {
                Slot::Listener => self.accept(),
                Slot::Signal => {
                    while let Ok(Some(_)) = self.sigfd.read_signal() {}
                    self.reap();
                }
                Slot::Conn(id) => {
                    if rev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                        self.read_conn(*id);
                    }
                    if rev.contains(PollFlags::POLLOUT) {
                        self.flush_conn(*id);
                    }
                }
                Slot::Pipe(id, s) => self.drain_pipe(id, *s, false),
                Slot::Oom(id) => self.check_oom(id),
                Slot::RelayIn(id, i) => self.relay_input(id, *i),
                Slot::RelayOut(id, i, err) => self.relay_flush(id, *i, *err),
                Slot::StdinOut(id) => self.feed_stdin(id),
            }
        }
        self.conns.retain(|_, c| !(c.closed && c.out.is_empty()));
        Ok(())
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.next_conn;
            self.next_conn += 1;
            self.conns.insert(
                id,
                Conn {
                    stream,
                    inbuf: FrameBuffer::default(),
                    out: Vec::new(),
                    subscribed: false,
                    closed: false,
                },
            );
        }
    }

    fn read_conn(&mut self, id: u64) {
        let mut frames = Vec::new();
        if let Some(c) = self.conns.get_mut(&id) {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.closed = true;
                        break;
                    }
                    Ok(n) => c.inbuf.extend(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        c.closed = true;
                        break;
                    }
                }
            }
            loop {
                match c.inbuf.next_frame() {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(_) => {
                        c.closed = true; // a client that breaks framing is dropped
                        break;
                    }
                }
            }
        }
        for f in frames {
            if f.kind == Kind::Request {
                if let Some(reply) = self.handle(id, &f) {
                    self.respond(id, f.method, f.id, reply);
                }
            }
        }
    }

    fn flush_conn(&mut self, id: u64) {
        if let Some(c) = self.conns.get_mut(&id) {
            while !c.out.is_empty() {
                match c.stream.write(&c.out) {
                    Ok(0) => {
                        c.closed = true;
                        c.out.clear();
                    }
                    Ok(n) => {
                        c.out.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        c.closed = true;
                        c.out.clear();
                    }
                }
            }
        }
    }

    fn send(&mut self, conn: u64, frame: Frame) {
        if let (Some(c), Ok(bytes)) = (self.conns.get_mut(&conn), frame.encode()) {
            c.out.extend_from_slice(&bytes);
        }
        self.flush_conn(conn);
    }

    fn respond(&mut self, conn: u64, method: u16, id: u32, reply: Reply) {
        let frame = match reply {
            Ok(payload) => Frame {
                kind: Kind::Response,
                method,
                id,
                payload,
            },
            Err((code, message)) => Frame {
                kind: Kind::Error,
                method,
                id,
                payload: pb::Error {
                    code: code as i32,
                    message,
                }
                .encode_to_vec(),
            },
        };
        self.send(conn, frame);
    }

    fn publish(&mut self, ev: pb::Event) {
        let payload = ev.encode_to_vec();
        let subs: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.subscribed)
            .map(|(k, _)| *k)
            .collect();
        for s in subs {
            self.send(
                s,
                Frame {
                    kind: Kind::Event,
                    method: 0,
                    id: 0,
                    payload: payload.clone(),
                },
            );
        }
    }

    /// Reads what a container wrote into its log; at EOF closes the pipe.
    fn drain_pipe(&mut self, id: &str, s: Stream, until_eof_or_empty: bool) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        let slot = match s {
            Stream::Stdout => &mut t.stdout,
            Stream::Stderr => &mut t.stderr,
        };
        let Some(fd) = slot.as_ref() else { return };
        let mut buf = [0u8; 64 * 1024];
        loop {
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) => {
                    *slot = None;
                    if let Some(l) = t.log.as_mut() {
                        let _ = l.close_stream(s);
                    }
                    return;
                }
                Ok(n) => {
                    if let Some(c) = t.capture.as_mut() {
                        let out = match s {
                            Stream::Stdout => &mut c.stdout,
                            Stream::Stderr => &mut c.stderr,
                        };
                        let room = c.limit.saturating_sub(out.len());
                        out.extend_from_slice(&buf[..n.min(room)]);
                        c.truncated |= n > room;
                    } else if let Some(l) = t.log.as_mut() {
                        let _ = l.write(s, &buf[..n]);
                    }
                    for r in &mut t.relays {
                        let slot = match s {
                            Stream::Stdout => &mut r.out,
                            Stream::Stderr => &mut r.err,
                        };
                        Relay::push(slot, &buf[..n]);
                    }
                    if !until_eof_or_empty {
                        return; // one read per poll round keeps other work moving
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(nix::errno::Errno::EINTR) => {}
                // A pty master reads EIO once every slave side is closed: the end.
                Err(_) => {
                    *slot = None;
                    if let Some(l) = t.log.as_mut() {
                        let _ = l.close_stream(s);
                    }
                    return;
                }
            }
        }
    }

    /// Reaps every exited child; container exits are recorded, then reported.
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(st) => {
                    if let Some((pid, status)) = exit_status_of(st) {
                        self.on_exit(pid, status);
                    }
                }
            }
        }
    }

    fn on_exit(&mut self, pid: u32, exit_status: u32) {
        let Some(id) = self
            .tasks
            .iter()
            .find(|(_, t)| t.pid == pid && t.exit.is_none())
            .map(|(k, _)| k.clone())
        else {
            return; // an orphan reparented to us, or a runtime helper
        };
        // Whatever the process wrote before exiting belongs before its exit.
        self.drain_pipe(&id, Stream::Stdout, true);
        self.drain_pipe(&id, Stream::Stderr, true);
        // The counter, not only the watch: the kill and the exit may arrive in one poll.
        self.check_oom(&id);
        let oom_killed = self.tasks.get_mut(&id).is_some_and(|t| {
            t.oom = None; // released: nothing more to watch once init is gone
            t.oom_killed
        });
        let rec = ExitRecord {
            pid,
            exit_status,
            exited_at_unix_nanos: now_unix_nanos(),
            oom_killed,
        };
        let is_exec = self.tasks.get(&id).is_some_and(|t| t.exec);
        if self.tasks.get(&id).is_some_and(|t| t.kill_all_on_exit) {
            if let Err(e) = self.runc.kill(&id, 9, true) {
                if !e.is_not_found() {
                    eprintln!("berth-shim: killing the rest of {id} after its init exited: {e}");
                }
            }
        }
        if !is_exec {
            if let Err(e) = self.exits.record(&id, &rec) {
                eprintln!("berth-shim: recording exit of {id}: {e}");
            }
        }
        let waiters = match self.tasks.get_mut(&id) {
            Some(t) => {
                for r in &mut t.relays {
                    r.finishing = true;
                    r.close_flushed();
                }
                t.relays.retain(|r| !r.is_done());
                t.exit = Some(rec);
                t.status = pb::TaskStatus::Stopped;
                t.stdin = None;
                t.console = None;
                std::mem::take(&mut t.waiters)
            }
            None => Vec::new(),
        };
        let payload = self
            .tasks
            .get(&id)
            .map(|t| exit_payload(t, rec))
            .unwrap_or_default();
        for (conn, req) in waiters {
            self.respond(conn, pb::Method::Wait as u16, req, Ok(payload.clone()));
        }
        let (id, exec_id) = match id.split_once('/') {
            Some((i, e)) => (i.to_string(), e.to_string()),
            None => (id, String::new()),
        };
        self.publish(pb::Event {
            event: Some(pb::event::Event::Exit(pb::TaskExit {
                id,
                exec_id,
                pid,
                exit_status,
                exited_at_unix_nanos: rec.exited_at_unix_nanos,
                oom_killed,
            })),
        });
    }

    fn state_of(&self, id: &str, t: &Task) -> pb::StateResponse {
        pb::StateResponse {
            id: id.to_string(),
            exec_id: String::new(),
            pid: t.pid,
            status: t.status as i32,
            exit_status: t.exit.map_or(0, |e| e.exit_status),
            exited_at_unix_nanos: t.exit.map_or(0, |e| e.exited_at_unix_nanos),
            oom_killed: t.exit.is_some_and(|e| e.oom_killed),
        }
    }

    /// Handles one request; `None` defers the answer (Wait on a running task).
    fn handle(&mut self, conn: u64, f: &Frame) -> Option<Reply> {
        let method = pb::Method::try_from(i32::from(f.method)).unwrap_or(pb::Method::Unspecified);
        let bad = |e: prost::DecodeError| (Code::InvalidArgument, format!("decoding request: {e}"));
        Some(match method {
            pb::Method::Connect => {
                let tasks = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| !t.exec)
                    .map(|(k, t)| self.state_of(k, t))
                    .collect();
                Ok(pb::ConnectResponse {
                    shim_pid: std::process::id(),
                    tasks,
                }
                .encode_to_vec())
            }
            pb::Method::Subscribe => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.subscribed = true;
                }
                Ok(pb::Empty {}.encode_to_vec())
            }
            pb::Method::Create => match pb::CreateRequest::decode(&f.payload[..]) {
                Ok(r) => self.create(r),
                Err(e) => Err(bad(e)),
            },
            pb::Method::Start
            | pb::Method::Delete
            | pb::Method::State
            | pb::Method::Wait
            | pb::Method::Pids
            | pb::Method::CloseIo
            | pb::Method::Pause
            | pb::Method::Resume
            | pb::Method::ReopenLog => {
                let r = match pb::TaskRef::decode(&f.payload[..]) {
                    Ok(r) => r,
                    Err(e) => return Some(Err(bad(e))),
                };
                let key = task_key(&r.id, &r.exec_id);
                if !r.exec_id.is_empty()
                    && !matches!(
                        method,
                        pb::Method::Wait
                            | pb::Method::Delete
                            | pb::Method::State
                            | pb::Method::CloseIo
                    )
                {
                    return Some(Err((
                        Code::Unimplemented,
                        format!("{method:?} of an exec process is not supported"),
                    )));
                }
                if !self.tasks.contains_key(&key) {
                    return Some(Err((Code::NotFound, format!("task {key:?} not found"))));
                }
                if method == pb::Method::Wait {
                    let t = self.tasks.get_mut(&key)?;
                    return match t.exit {
                        Some(e) => Some(Ok(exit_payload(t, e))),
                        None => {
                            t.waiters.push((conn, f.id));
                            None
                        }
                    };
                }
                self.task_call(method, &key)
            }
            pb::Method::Attach => match pb::AttachRequest::decode(&f.payload[..]) {
                Ok(r) => self.attach(r),
                Err(e) => Err(bad(e)),
            },
            pb::Method::Exec => match pb::ExecRequest::decode(&f.payload[..]) {
                Ok(r) => self.exec(r),
                Err(e) => Err(bad(e)),
            },
            pb::Method::StartInfra => match pb::InfraRequest::decode(&f.payload[..]) {
                Ok(r) => self.start_infra(r),
                Err(e) => Err(bad(e)),
            },
            pb::Method::Kill => match pb::KillRequest::decode(&f.payload[..]) {
                Ok(r) => self.kill(r),
                Err(e) => Err(bad(e)),
            },
            pb::Method::ResizePty => match pb::ResizePtyRequest::decode(&f.payload[..]) {
                Ok(r) => self.resize_pty(r),
                Err(e) => Err(bad(e)),
            },
            pb::Method::Update => match pb::UpdateRequest::decode(&f.payload[..]) {
                Ok(r) => self.update(r),
                Err(e) => Err(bad(e)),
            },
            pb::Method::Shutdown => {
                if self.tasks.values().any(|t| t.exit.is_none()) {
                    Err((Code::FailedPrecondition, "tasks are still running".into()))
                } else {
                    self.shutdown = true;
                    Ok(pb::Empty {}.encode_to_vec())
                }
            }
            other => Err((
                Code::Unimplemented,
                format!("{other:?} is not implemented by this shim yet"),
            )),
        })
    }

    /// A new task's id must be valid (it names files) and free.
    fn check_new_task(&self, id: &str) -> Result<(), (Code, String)> {
        if !valid_task_id(id) {
            return Err((
                Code::InvalidArgument,
                format!("id {id:?}: must be 1-128 of [A-Za-z0-9_.-]"),
            ));
        }
        if self.tasks.contains_key(id) {
            return Err((Code::AlreadyExists, format!("task {id} already exists")));
        }
        Ok(())
    }

    fn create(&mut self, r: pb::CreateRequest) -> Reply {
        self.check_new_task(&r.id)?;
        let internal = |what: &str, e: io::Error| (Code::Internal, format!("{what}: {e}"));
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
        let created = self.runc.create(
            &r.id,
            Path::new(&r.bundle),
            &pid_file,
            io,
            console.as_ref().map(|c| c.path()),
        );
        let pid = take_pid_file(&pid_file);
        let outcome = created
            .map_err(|e| (Code::Internal, e.to_string()))
            .and_then(|()| pid.ok_or((Code::Internal, "the runtime wrote no pid file".into())))
            .and_then(|pid| {
                let stdio = match (stdio, console) {
                    (Some(s), _) => s,
                    (None, Some(c)) => ProcessStdio::terminal(&c, r.stdin)
                        .map_err(|e| internal("receiving the container's pty", e))?,
                    (None, None) => ProcessStdio::default(),
                };
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
        // One read of the bundle's spec for everything the shim needs from it.
        let spec: serde_json::Value = std::fs::read(Path::new(&r.bundle).join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let cgroup = self.container_cgroup(&spec);
        let oom = cgroup.as_ref().and_then(|cg| {
            OomWatch::arm(cg)
                .map_err(|e| eprintln!("berth-shim: no OOM watch for {}: {e}", r.id))
                .ok()
        });
        let task = Task {
            kill_all_on_exit: shares_pid_namespace(&spec),
            oom_baseline: oom.as_ref().map_or(0, OomWatch::total),
            cgroup,
            oom,
            log,
            stdout: stdio.stdout,
            stderr: stdio.stderr,
            stdin: stdio.stdin,
            console: stdio.console,
            ..Task::new(pid, false, pb::TaskStatus::Created)
        };
        self.tasks.insert(r.id, task);
        Ok(pb::PidResponse { pid }.encode_to_vec())
    }

    /// A new process's streams: pipes (the shim's ends, the process's ends), or for a
    /// terminal the console socket its runtime will send the pty to.
    fn process_io(
        &self,
        terminal: bool,
        stdin: bool,
    ) -> Result<(Option<ProcessStdio>, ProcessIo, Option<ConsoleSocket>), (Code, String)> {
        let internal = |what: &str, e: io::Error| (Code::Internal, format!("{what}: {e}"));
        if terminal {
            let console = self
                .console_socket()
                .map_err(|e| internal("console socket", e))?;
            return Ok((None, ProcessIo::none(), Some(console)));
        }
        let (stdio, io) = ProcessStdio::pipes(stdin).map_err(|e| internal("pipe", e))?;
        Ok((Some(stdio), io, None))
    }

    /// The console socket for the next terminal process. Commands run one at a time,
    /// so one path serves; it sits beside the shim's socket, whose path is kept short
    /// (socket paths are limited to 108 bytes).
    fn console_socket(&self) -> io::Result<ConsoleSocket> {
        let mut path = self.socket.clone().into_os_string();
        path.push(".console");
        ConsoleSocket::bind(Path::new(&path))
    }

    /// Attaches a streaming client to a running container.
    fn attach(&mut self, r: pb::AttachRequest) -> Reply {
        let t = self
            .tasks
            .get_mut(&r.id)
            .ok_or_else(|| (Code::NotFound, format!("task {:?} not found", r.id)))?;
        if t.infra || t.exec {
            return Err((
                Code::FailedPrecondition,
                format!("task {} cannot be attached to", r.id),
            ));
        }
        if t.exit.is_some() {
            return Err((
                Code::FailedPrecondition,
                format!("task {} has exited", r.id),
            ));
        }
        // Input only reaches a container that was created with stdin open.
        let stdin = if t.stdin.is_some() {
            r.stdin_fifo.as_str()
        } else {
            ""
        };
        let relay = Relay::open(stdin, &r.stdout_fifo, &r.stderr_fifo, r.stdin_once)
            .map_err(|e| (Code::Internal, format!("opening the client's streams: {e}")))?;
        t.relays.push(relay);
        Ok(pb::Empty {}.encode_to_vec())
    }

    /// A client's input is readable: take it, then hand it to the process.
    fn relay_input(&mut self, id: &str, i: usize) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        let Some(r) = t.relays.get_mut(i) else { return };
        let Some(fd) = r.input.as_ref() else { return };
        let mut buf = [0u8; 32 * 1024];
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => {
                // The client's stdin ended.
                r.input = None;
                if r.close_stdin_at_eof && r.pending_in.is_empty() {
                    t.stdin = None;
                }
            }
            Ok(n) => r.pending_in.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => r.input = None,
        }
        self.feed_stdin(id);
        if let Some(t) = self.tasks.get_mut(id) {
            t.relays
                .retain(|r| !r.is_done() || !r.pending_in.is_empty());
        }
    }

    /// Writes clients' pending input into the process's stdin (non-blocking).
    fn feed_stdin(&mut self, id: &str) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        let mut close = false;
        for r in &mut t.relays {
            let Some(fd) = t.stdin.as_ref() else {
                r.pending_in.clear();
                continue;
            };
            while !r.pending_in.is_empty() {
                match nix::unistd::write(fd, &r.pending_in) {
                    Ok(n) => {
                        r.pending_in.drain(..n);
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(_) => {
                        r.pending_in.clear();
                    }
                }
            }
            close |= r.pending_in.is_empty() && r.input.is_none() && r.close_stdin_at_eof;
        }
        if close {
            t.stdin = None;
        }
    }

    /// A client's output FIFO has room again.
    fn relay_flush(&mut self, id: &str, i: usize, err: bool) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        let Some(r) = t.relays.get_mut(i) else { return };
        Relay::flush(if err { &mut r.err } else { &mut r.out });
        r.close_flushed();
        t.relays
            .retain(|r| !r.is_done() || !r.pending_in.is_empty());
    }

    /// The cgroup named by a spec's `linux.cgroupsPath`.
    fn container_cgroup(&self, spec: &serde_json::Value) -> Option<Cgroup> {
        let h = self.cgroups.as_ref()?;
        let path = spec["linux"]["cgroupsPath"].as_str()?;
        berth_cgroups::relative_path_of(path)
            .map(|rel| h.cgroup(&rel))
            .map_err(|e| eprintln!("berth-shim: {e}"))
            .ok()
    }

    /// Counts new OOM kills of a task's cgroup; the first one is published.
    fn check_oom(&mut self, id: &str) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        if t.exit.is_some() {
            return;
        }
        if let Some(w) = t.oom.as_mut() {
            w.check(); // drains the fd, or poll would spin
            if w.is_gone() {
                t.oom = None;
            }
        }
        if t.oom_killed {
            return;
        }
        let total = t.cgroup.as_ref().and_then(oom_kill_count).unwrap_or(0);
        if total <= t.oom_baseline {
            return;
        }
        t.oom_killed = true;
        eprintln!("berth-shim: the kernel OOM-killed a process of {id}");
        self.publish(pb::Event {
            event: Some(pb::event::Event::Oom(pb::TaskOom { id: id.to_string() })),
        });
    }

    fn resize_pty(&mut self, r: pb::ResizePtyRequest) -> Reply {
        let key = task_key(&r.id, &r.exec_id);
        let t = self
            .tasks
            .get(&key)
            .ok_or_else(|| (Code::NotFound, format!("task {key:?} not found")))?;
        let (Ok(w), Ok(h)) = (u16::try_from(r.width), u16::try_from(r.height)) else {
            return Err((
                Code::InvalidArgument,
                format!("size {}x{}: at most 65535 each", r.width, r.height),
            ));
        };
        match &t.console {
            Some(master) => crate::console::resize(master, w, h)
                .map(|()| pb::Empty {}.encode_to_vec())
                .map_err(|e| (Code::Internal, format!("resizing the pty: {e}"))),
            None if t.exit.is_some() => {
                Err((Code::FailedPrecondition, format!("task {key} has exited")))
            }
            None => Err((
                Code::FailedPrecondition,
                format!("task {key} has no terminal"),
            )),
        }
    }

    fn update(&mut self, r: pb::UpdateRequest) -> Reply {
        let t = self
            .tasks
            .get(&r.id)
            .ok_or_else(|| (Code::NotFound, format!("task {:?} not found", r.id)))?;
        if t.infra {
            return Err((
                Code::FailedPrecondition,
                format!("task {} is the pod's infra process", r.id),
            ));
        }
        if t.exit.is_some() {
            return Err((
                Code::FailedPrecondition,
                format!("task {} has exited", r.id),
            ));
        }
        if serde_json::from_slice::<serde_json::Value>(&r.resources_json)
            .map_or(true, |v| !v.is_object())
        {
            return Err((
                Code::InvalidArgument,
                "resources_json: not a JSON object".into(),
            ));
        }
        let file = self.state_dir.join(format!("update-{}.json", r.id));
        std::fs::write(&file, &r.resources_json)
            .map_err(|e| (Code::Internal, format!("writing resources: {e}")))?;
        let result = self.runc.update(&r.id, &file);
        let _ = std::fs::remove_file(&file);
        result
            .map(|()| pb::Empty {}.encode_to_vec())
            .map_err(|e| (Code::Internal, e.to_string()))
    }

    fn start_infra(&mut self, r: pb::InfraRequest) -> Reply {
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
        let pid = crate::infra::start_infra(&spec).map_err(|e| (Code::Internal, e.to_string()))?;
        let _ = self.exits.remove(&r.id);
        self.tasks
            .insert(r.id, Task::new(pid, true, pb::TaskStatus::Running));
        Ok(pb::PidResponse { pid }.encode_to_vec())
    }

    fn exec(&mut self, r: pb::ExecRequest) -> Reply {
        if !valid_task_id(&r.exec_id) {
            return Err((
                Code::InvalidArgument,
                format!("exec_id {:?}: must be 1-128 of [A-Za-z0-9_.-]", r.exec_id),
            ));
        }
        match self.tasks.get(&r.id) {
            Some(t) if t.status == pb::TaskStatus::Running && t.exit.is_none() => {}
            Some(_) => {
                return Err((
                    Code::FailedPrecondition,
                    format!("task {} is not running", r.id),
                ));
            }
            None => return Err((Code::NotFound, format!("task {:?} not found", r.id))),
        }
        let key = task_key(&r.id, &r.exec_id);
        if self.tasks.contains_key(&key) {
            return Err((
                Code::AlreadyExists,
                format!("exec {} already exists", r.exec_id),
            ));
        }
        let internal = |what: &str, e: io::Error| (Code::Internal, format!("{what}: {e}"));
        let process = self
            .state_dir
            .join(format!("exec-{}-{}.json", r.id, r.exec_id));
        let pid_file = self
            .state_dir
            .join(format!("exec-{}-{}.pid", r.id, r.exec_id));
        // The process's own `terminal` decides on a pty; make it agree with the request.
        let mut process_spec: serde_json::Value = serde_json::from_slice(&r.process_json)
            .map_err(|e| (Code::InvalidArgument, format!("process_json: {e}")))?;
        if !process_spec.is_object() {
            return Err((Code::InvalidArgument, "process_json: not an object".into()));
        }
        process_spec["terminal"] = r.terminal.into();
        let process_json = serde_json::to_vec(&process_spec)
            .map_err(|e| (Code::Internal, format!("encoding process: {e}")))?;
        std::fs::write(&process, &process_json).map_err(|e| internal("writing process.json", e))?;
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
        result.map_err(|e| (Code::Internal, e.to_string()))?;
        let pid = pid.ok_or((
            Code::Internal,
            "the runtime wrote no pid file for the exec".to_string(),
        ))?;
        let stdio = match (stdio, console) {
            (Some(s), _) => s,
            (None, Some(c)) => match ProcessStdio::terminal(&c, r.stdin) {
                Ok(s) => s,
                Err(e) => {
                    // A process we cannot talk to is not left running.
                    let _ = nix::sys::signal::kill(
                        Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    return Err(internal("receiving the exec's pty", e));
                }
            },
            (None, None) => ProcessStdio::default(),
        };
        let limit = r.capture_limit as usize;
        let relays =
            if r.stdin_fifo.is_empty() && r.stdout_fifo.is_empty() && r.stderr_fifo.is_empty() {
                Vec::new()
            } else {
                match Relay::open(&r.stdin_fifo, &r.stdout_fifo, &r.stderr_fifo, true) {
                    Ok(rel) => vec![rel],
                    Err(e) => {
                        let _ = nix::sys::signal::kill(
                            Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        return Err(internal("opening the client's streams", e));
                    }
                }
            };
        let task = Task {
            exec: true,
            relays,
            capture: (limit > 0).then(|| Capture {
                stdout: Vec::new(),
                stderr: Vec::new(),
                limit,
                truncated: false,
            }),
            stdout: stdio.stdout,
            stderr: stdio.stderr,
            stdin: stdio.stdin,
            console: stdio.console,
            ..Task::new(pid, false, pb::TaskStatus::Running)
        };
        self.tasks.insert(key, task);
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

    fn task_call(&mut self, method: pb::Method, id: &str) -> Reply {
        let runtime_err = |e: crate::runc::RuncError| (Code::Internal, e.to_string());
        match method {
            pb::Method::Start => {
                let t = &self.tasks[id];
                if t.status != pb::TaskStatus::Created {
                    return Err((
                        Code::FailedPrecondition,
                        format!("task {id} is not in the created state"),
                    ));
                }
                self.runc.start(id).map_err(runtime_err)?;
                let pid = {
                    let t = self
                        .tasks
                        .get_mut(id)
                        .ok_or((Code::NotFound, id.to_string()))?;
                    if t.exit.is_none() {
                        t.status = pb::TaskStatus::Running;
                    }
                    t.pid
                };
                Ok(pb::PidResponse { pid }.encode_to_vec())
            }
            pb::Method::Delete => {
                let t = &self.tasks[id];
                let Some(exit) = t.exit else {
                    return Err((
                        Code::FailedPrecondition,
                        format!("task {id} is still running; kill it first"),
                    ));
                };
                // Only containers have runtime state; infra and exec processes do not.
                if !t.infra && !t.exec {
                    if let Err(e) = self.runc.delete(id, true) {
                        if !e.is_not_found() {
                            return Err(runtime_err(e));
                        }
                    }
                    let _ = self.exits.remove(id);
                }
                self.tasks.remove(id);
                Ok(pb::ExitStatus {
                    exit_status: exit.exit_status,
                    exited_at_unix_nanos: exit.exited_at_unix_nanos,
                    oom_killed: exit.oom_killed,
                    ..Default::default()
                }
                .encode_to_vec())
            }
            pb::Method::State => Ok(self.state_of(id, &self.tasks[id]).encode_to_vec()),
            pb::Method::Pids => {
                if self.tasks[id].exit.is_some() {
                    return Ok(pb::PidsResponse { pids: vec![] }.encode_to_vec());
                }
                if self.tasks[id].infra {
                    return Ok(pb::PidsResponse {
                        pids: vec![self.tasks[id].pid],
                    }
                    .encode_to_vec());
                }
                let pids = self.runc.pids(id).map_err(runtime_err)?;
                Ok(pb::PidsResponse { pids }.encode_to_vec())
            }
            pb::Method::CloseIo => {
                if let Some(t) = self.tasks.get_mut(id) {
                    t.stdin = None;
                }
                Ok(pb::Empty {}.encode_to_vec())
            }
            pb::Method::Pause | pb::Method::Resume => {
                let pause = method == pb::Method::Pause;
                self.runc.pause(id, pause).map_err(runtime_err)?;
                if let Some(t) = self.tasks.get_mut(id) {
                    if t.exit.is_none() {
                        t.status = if pause {
                            pb::TaskStatus::Paused
                        } else {
                            pb::TaskStatus::Running
                        };
                    }
                }
                Ok(pb::Empty {}.encode_to_vec())
            }
            pb::Method::ReopenLog => {
                if let Some(l) = self.tasks.get_mut(id).and_then(|t| t.log.as_mut()) {
                    l.reopen()
                        .map_err(|e| (Code::Internal, format!("reopening log: {e}")))?;
                }
                Ok(pb::Empty {}.encode_to_vec())
            }
            other => Err((Code::Unimplemented, format!("{other:?}"))),
        }
    }

    fn kill(&mut self, r: pb::KillRequest) -> Reply {
        let key = task_key(&r.id, &r.exec_id);
        let Some(t) = self.tasks.get(&key) else {
            return Err((Code::NotFound, format!("task {key:?} not found")));
        };
        if r.signal == 0 || r.signal > 64 {
            return Err((
                Code::InvalidArgument,
                format!("signal {} is not a valid signal", r.signal),
            ));
        }
        // Already gone: killing is done. (An infra or exec pid is reaped once exited and
        // may be reused, so it is never signalled again, `all` or not.)
        if t.exit.is_some() && (!r.all || t.infra || t.exec) {
            return Ok(pb::Empty {}.encode_to_vec());
        }
        if t.infra || t.exec {
            let sig = nix::sys::signal::Signal::try_from(r.signal as i32)
                .map_err(|e| (Code::InvalidArgument, format!("signal {}: {e}", r.signal)))?;
            // The pid is ours (a child we have not reaped), so it cannot have been reused.
            return match nix::sys::signal::kill(Pid::from_raw(t.pid as i32), sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(pb::Empty {}.encode_to_vec()),
                Err(e) => Err((Code::Internal, format!("signalling infra process: {e}"))),
            };
        }
        match self.runc.kill(&r.id, r.signal, r.all) {
            Ok(()) => Ok(pb::Empty {}.encode_to_vec()),
            // The process may exit between our check and the runtime's.
            Err(_) if self.tasks.get(&r.id).is_some_and(|t| t.exit.is_some()) => {
                Ok(pb::Empty {}.encode_to_vec())
            }
            Err(e) if e.is_process_gone() => Ok(pb::Empty {}.encode_to_vec()),
            Err(e) => Err((Code::Internal, e.to_string())),
        }
    }
}

/// The shim's ends of a process's standard streams.
#[derive(Default)]
struct ProcessStdio {
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    stdin: Option<OwnedFd>,
    console: Option<OwnedFd>,
}

impl ProcessStdio {
    /// Pipes for stdout and stderr (read ends non-blocking), and stdin when asked; also
    /// returns the ends the process gets.
    fn pipes(stdin: bool) -> io::Result<(ProcessStdio, ProcessIo)> {
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from);
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        for fd in [&out_r, &err_r] {
            set_nonblocking(fd)?;
        }
        // stdin stays open (the write end kept here) until closed for attach.
        let (keep, child) = match stdin {
            true => {
                let (rd, wr) = pipe()?;
                // Clients' input is fed from the poll loop: never block it.
                set_nonblocking(&wr)?;
                (Some(wr), Some(rd))
            }
            false => (None, None),
        };
        Ok((
            ProcessStdio {
                stdout: Some(out_r),
                stderr: Some(err_r),
                stdin: keep,
                console: None,
            },
            ProcessIo {
                stdin: child,
                stdout: Some(out_w),
                stderr: Some(err_w),
            },
        ))
    }

    /// A terminal process: its pty master carries output (as stdout) and input.
    fn terminal(socket: &ConsoleSocket, stdin: bool) -> io::Result<ProcessStdio> {
        let master = socket.receive_master(std::time::Duration::from_secs(10))?;
        set_nonblocking(&master)?;
        Ok(ProcessStdio {
            stdout: Some(master.try_clone()?),
            stderr: None,
            stdin: if stdin {
                Some(master.try_clone()?)
            } else {
                None
            },
            console: Some(master),
        })
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let fl = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let fl = nix::fcntl::OFlag::from_bits_retain(fl) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(fl)).map_err(io::Error::from)?;
    Ok(())
}

/// Whether a bundle's container has no PID namespace of its own (the host's, or a
/// pod's shared one): then its init's exit does not end its other processes.
fn shares_pid_namespace(spec: &serde_json::Value) -> bool {
    if spec.is_null() {
        return false; // unreadable spec: assume the usual own namespace
    }
    let own = spec["linux"]["namespaces"].as_array().is_some_and(|nss| {
        nss.iter()
            .any(|ns| ns["type"] == "pid" && ns["path"].as_str().is_none_or(str::is_empty))
    });
    !own
}

/// The pid a runtime wrote to `path`; the file is removed.
fn take_pid_file(path: &Path) -> Option<u32> {
    let pid = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let _ = std::fs::remove_file(path);
    pid
}
