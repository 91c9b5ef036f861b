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
//!
//! By concern: `conn` (connections and framing), `dispatch` (requests to operations),
//! `task` (the task table: infra and containers, execs nested under them),
//! `lifecycle` (create, start, exec, kill, delete, reaping), `stdio` (process streams,
//! logs, streaming relays), `oom` (OOM watching), `poll` (the loop).

mod conn;
mod dispatch;
mod lifecycle;
mod oom;
mod poll;
mod stdio;
mod task;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use berth_cgroups::Hierarchy;
use berth_proto::shim::ErrorCode as Code;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::exits::ExitStore;
use crate::runc::Runc;

pub use task::valid_task_id;

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
    /// How long one runtime command may take before it is killed.
    pub runtime_timeout: std::time::Duration,
}

/// A request's answer: the encoded response, or why it failed.
type Reply = Result<Vec<u8>, Failure>;

/// A failed request: the code both ends match on, and a message for people.
type Failure = (Code, String);

fn failure(code: Code, message: impl Into<String>) -> Failure {
    (code, message.into())
}

/// The running shim.
pub struct Shim {
    runc: Runc,
    exits: ExitStore,
    state_dir: PathBuf,
    socket: PathBuf,
    listener: UnixListener,
    sigfd: SignalFd,
    tasks: task::Tasks,
    conns: HashMap<u64, conn::Conn>,
    next_conn: u64,
    shutdown: bool,
    /// Mounted cgroup hierarchies, for OOM watches (`None` if unreadable).
    cgroups: Option<Hierarchy>,
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
        )
        .with_timeout(cfg.runtime_timeout);
        Ok(Shim {
            runc,
            exits,
            state_dir: cfg.state_dir.clone(),
            socket: cfg.socket.clone(),
            listener,
            sigfd,
            tasks: task::Tasks::default(),
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
}
