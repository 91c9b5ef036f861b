//! The OCI runtime CLI (runc, or a compatible one such as crun): one method per
//! command. Errors carry the runtime's own message, read from its JSON log.
//!
//! Commands run synchronously; inside the shim this is safe because the shim is
//! single-threaded and reaps other children only between commands. Each command is
//! bounded: one that hangs is killed with its process group (the runtime and whatever
//! it started) after the runtime's timeout, so a wedged runtime cannot wedge the shim.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde::Deserialize;

/// A failed runtime command.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    /// The binary could not be run at all.
    #[error("running {binary}: {source}")]
    Spawn { binary: String, source: io::Error },
    /// The command ran and failed; `message` is the runtime's own error.
    #[error("{binary} {command} {id}: {message}")]
    Failed {
        binary: String,
        command: &'static str,
        id: String,
        message: String,
    },
    /// The command did not finish in time; it was killed with its process group.
    #[error("{binary} {command} {id}: no answer within {secs}s; killed")]
    Timeout {
        binary: String,
        command: &'static str,
        id: String,
        secs: u64,
    },
    /// The runtime's output could not be understood.
    #[error("{binary} {command} {id}: unexpected output: {detail}")]
    Output {
        binary: String,
        command: &'static str,
        id: String,
        detail: String,
    },
}

impl RuncError {
    /// Whether the runtime said the container does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RuncError::Failed { message, .. } if message.contains("does not exist") || message.contains("not found"))
    }

    /// Whether the runtime said the process to signal has already exited.
    pub fn is_process_gone(&self) -> bool {
        matches!(self, RuncError::Failed { message, .. } if message.contains("not running") || message.contains("process already finished"))
    }
}

/// Standard streams handed to the container's process (no terminal).
pub struct ProcessIo {
    /// stdin, or /dev/null.
    pub stdin: Option<OwnedFd>,
    /// stdout, or /dev/null.
    pub stdout: Option<OwnedFd>,
    /// stderr, or /dev/null.
    pub stderr: Option<OwnedFd>,
}

impl ProcessIo {
    /// No streams: /dev/null for all three (or a pty the runtime makes).
    pub fn none() -> ProcessIo {
        ProcessIo {
            stdin: None,
            stdout: None,
            stderr: None,
        }
    }
}

/// `runc state` output (the fields berth uses).
#[derive(Debug, Deserialize)]
pub struct RuncState {
    /// Container id.
    pub id: String,
    /// Init process pid.
    pub pid: u32,
    /// created, running, paused, stopped.
    pub status: String,
}

/// One OCI runtime binary with its state root.
#[derive(Clone, Debug)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
    log: PathBuf,
    extra_args: Vec<String>,
    timeout: Duration,
}

/// How long a runtime command may take unless the handler says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits for `child`; after `timeout`, SIGKILLs its process group (it leads one) and
/// returns `None`. A thread waits so that the pipes are drained meanwhile.
fn wait_bounded(child: Child, timeout: Duration) -> io::Result<Option<Output>> {
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    let child = std::sync::Arc::new(std::sync::Mutex::new(Some(child)));
    let theirs = child.clone();
    let spawned = std::thread::Builder::new()
        .name("runtime-wait".into())
        .spawn(move || {
            let c = theirs.lock().ok().and_then(|mut c| c.take());
            if let Some(c) = c {
                let _ = tx.send(c.wait_with_output());
            }
        });
    if spawned.is_err() {
        // No thread to spare: wait unbounded rather than not at all.
        let c = child.lock().ok().and_then(|mut c| c.take());
        return match c {
            Some(c) => c.wait_with_output().map(Some),
            None => Ok(None),
        };
    }
    match rx.recv_timeout(timeout) {
        Ok(out) => out.map(Some),
        Err(_) => {
            // Not reaped yet (the waiter has not answered), so the group is still ours.
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            // A process in uninterruptible sleep outlives SIGKILL: give up on it rather
            // than wedge the shim (the reaping loop collects it when it dies).
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(out)) if out.status.success() => Ok(Some(out)),
                _ => Ok(None),
            }
        }
    }
}

impl Runc {
    /// A runtime `binary` keeping container state under `root`, logging to `log`.
    pub fn new(binary: &Path, root: &Path, log: &Path, extra_args: Vec<String>) -> Runc {
        Runc {
            binary: binary.to_path_buf(),
            root: root.to_path_buf(),
            log: log.to_path_buf(),
            extra_args,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same runtime with another bound on each command.
    pub fn with_timeout(mut self, timeout: Duration) -> Runc {
        self.timeout = timeout;
        self
    }

    /// Runs `cmd` as the leader of its own process group, bounded by the timeout.
    fn output(
        &self,
        mut cmd: Command,
        command: &'static str,
        id: &str,
    ) -> Result<Output, RuncError> {
        let child = cmd
            .process_group(0)
            .spawn()
            .map_err(|source| RuncError::Spawn {
                binary: self.name(),
                source,
            })?;
        let out = wait_bounded(child, self.timeout).map_err(|source| RuncError::Spawn {
            binary: self.name(),
            source,
        })?;
        out.ok_or_else(|| RuncError::Timeout {
            binary: self.name(),
            command,
            id: id.to_string(),
            secs: self.timeout.as_secs(),
        })
    }

    fn base(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&self.log)
            .arg("--log-format")
            .arg("json");
        c.args(&self.extra_args);
        c
    }

    fn name(&self) -> String {
        self.binary.display().to_string()
    }

    /// Runs a command with its output captured; maps failure to the runtime's message.
    fn run(&self, mut cmd: Command, command: &'static str, id: &str) -> Result<Vec<u8>, RuncError> {
        let log_len = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = self.output(cmd, command, id)?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let mut message = last_log_error(&self.log, log_len);
        if message.is_empty() {
            message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        }
        if message.is_empty() {
            message = format!("exited with {}", out.status);
        }
        Err(RuncError::Failed {
            binary: self.name(),
            command,
            id: id.to_string(),
            message,
        })
    }

    /// `create`: sets up the container with its init process stopped before exec. With
    /// a console socket the process gets a pty whose master is sent there.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        io: ProcessIo,
        console_socket: Option<&Path>,
    ) -> Result<(), RuncError> {
        let mut c = self.base();
        c.arg("create")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(pid_file);
        if let Some(sock) = console_socket {
            c.arg("--console-socket").arg(sock);
        }
        c.arg(id);
        self.run_with_io(c, io, "create", id)
    }

    /// `exec --detach`: runs `process.json` in the container now; its pid goes to `pid_file`.
    /// The process's own `terminal` decides on a pty (runc ignores `--tty` with `--process`).
    pub fn exec(
        &self,
        id: &str,
        process: &Path,
        pid_file: &Path,
        io: ProcessIo,
        console_socket: Option<&Path>,
    ) -> Result<(), RuncError> {
        let mut c = self.base();
        c.arg("exec")
            .arg("--detach")
            .arg("--process")
            .arg(process)
            .arg("--pid-file")
            .arg(pid_file);
        if let Some(sock) = console_socket {
            c.arg("--console-socket").arg(sock);
        }
        c.arg(id);
        self.run_with_io(c, io, "exec", id)
    }

    /// Runs a command whose stdio is the process's own (so `output()`, which would
    /// replace it, cannot be used); failures carry the runtime's logged message.
    fn run_with_io(
        &self,
        mut c: Command,
        io: ProcessIo,
        command: &'static str,
        id: &str,
    ) -> Result<(), RuncError> {
        c.stdin(io.stdin.map_or_else(Stdio::null, Stdio::from));
        c.stdout(io.stdout.map_or_else(Stdio::null, Stdio::from));
        c.stderr(io.stderr.map_or_else(Stdio::null, Stdio::from));
        let log_len = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let status = self.output(c, command, id)?.status;
        if status.success() {
            return Ok(());
        }
        let mut message = last_log_error(&self.log, log_len);
        if message.is_empty() {
            message = format!("exited with {status}");
        }
        Err(RuncError::Failed {
            binary: self.name(),
            command,
            id: id.to_string(),
            message,
        })
    }

    /// `start`: lets the created init process exec.
    pub fn start(&self, id: &str) -> Result<(), RuncError> {
        let mut c = self.base();
        c.arg("start").arg(id);
        self.run(c, "start", id).map(|_| ())
    }

    /// `kill`: signals the init process, or every process with `all`.
    pub fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), RuncError> {
        let mut c = self.base();
        c.arg("kill");
        if all {
            c.arg("--all");
        }
        c.arg(id).arg(signal.to_string());
        self.run(c, "kill", id).map(|_| ())
    }

    /// `delete`: removes the container's runtime state (`force` kills it first).
    pub fn delete(&self, id: &str, force: bool) -> Result<(), RuncError> {
        let mut c = self.base();
        c.arg("delete");
        if force {
            c.arg("--force");
        }
        c.arg(id);
        self.run(c, "delete", id).map(|_| ())
    }

    /// `state`.
    pub fn state(&self, id: &str) -> Result<RuncState, RuncError> {
        let mut c = self.base();
        c.arg("state").arg(id);
        let out = self.run(c, "state", id)?;
        serde_json::from_slice(&out).map_err(|e| RuncError::Output {
            binary: self.name(),
            command: "state",
            id: id.to_string(),
            detail: e.to_string(),
        })
    }

    /// `ps --format json`: the container's pids.
    pub fn pids(&self, id: &str) -> Result<Vec<u32>, RuncError> {
        let mut c = self.base();
        c.arg("ps").arg("--format").arg("json").arg(id);
        let out = self.run(c, "ps", id)?;
        serde_json::from_slice(&out).map_err(|e| RuncError::Output {
            binary: self.name(),
            command: "ps",
            id: id.to_string(),
            detail: e.to_string(),
        })
    }

    /// `update --resources`: applies LinuxResources (JSON in `resources`) to a running container.
    pub fn update(&self, id: &str, resources: &Path) -> Result<(), RuncError> {
        let mut c = self.base();
        c.arg("update").arg("--resources").arg(resources).arg(id);
        self.run(c, "update", id).map(|_| ())
    }

    /// `pause` / `resume`.
    pub fn pause(&self, id: &str, pause: bool) -> Result<(), RuncError> {
        let mut c = self.base();
        let command = if pause { "pause" } else { "resume" };
        c.arg(command).arg(id);
        self.run(c, command, id).map(|_| ())
    }
}

#[derive(Deserialize)]
struct LogLine {
    #[serde(default)]
    level: String,
    #[serde(default)]
    msg: String,
}

/// The error messages runc logged after `from` bytes of its log, joined.
fn last_log_error(log: &Path, from: u64) -> String {
    let Ok(text) = fs::read(log) else {
        return String::new();
    };
    let tail = text.get(from as usize..).unwrap_or(&[]);
    let msgs: Vec<String> = String::from_utf8_lossy(tail)
        .lines()
        .filter_map(|l| serde_json::from_str::<LogLine>(l).ok())
        .filter(|l| l.level == "error" || l.level == "fatal")
        .map(|l| l.msg)
        .collect();
    msgs.join("; ")
}
