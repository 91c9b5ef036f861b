//! Processes' standard streams: pipes or a pty, the CRI log or an ExecSync capture,
//! and the streaming clients' relays (input fed non-blocking, output buffered).

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use berth_proto::shim as pb;
use prost::Message;

use super::task::{Process, ProcessStdio, shown};
use super::{Code, Failure, Reply, Shim, failure};
use crate::console::ConsoleSocket;
use crate::criolog::Stream;
use crate::relay::Relay;
use crate::runc::ProcessIo;

/// The most a process's exit waits on draining one of its pipes: what a killed
/// container left in a pipe is far less (a pipe holds 64 KiB to 1 MiB).
const EXIT_DRAIN_LIMIT: usize = 4 << 20;

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
        let ours = ProcessStdio {
            stdout: Some(out_r),
            stderr: Some(err_r),
            stdin: keep,
            console: None,
        };
        let theirs = ProcessIo {
            stdin: child,
            stdout: Some(out_w),
            stderr: Some(err_w),
        };
        Ok((ours, theirs))
    }

    /// A terminal process: its pty master carries output (as stdout) and input.
    pub(super) fn terminal(socket: &ConsoleSocket, stdin: bool) -> io::Result<ProcessStdio> {
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

fn internal(what: &str, e: io::Error) -> Failure {
    failure(Code::Internal, format!("{what}: {e}"))
}

/// How much of a container's first stderr output is kept to explain a failed exec.
const EARLY_ERRORS: usize = 512;

/// Where one read of a process's output goes: the capture, else the log; and every
/// streaming client.
fn deliver(p: &mut Process, s: Stream, data: &[u8]) {
    if let Some(c) = p.capture.as_mut() {
        let out = match s {
            Stream::Stdout => &mut c.stdout,
            Stream::Stderr => &mut c.stderr,
        };
        let room = c.limit.saturating_sub(out.len());
        out.extend_from_slice(&data[..data.len().min(room)]);
        c.truncated |= data.len() > room;
    } else if let Some(l) = p.log.as_mut() {
        let _ = l.write(s, data);
        if (s == Stream::Stderr || p.stdio.console.is_some()) && p.early_errors.len() < EARLY_ERRORS
        {
            let room = EARLY_ERRORS - p.early_errors.len();
            p.early_errors
                .extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    for r in &mut p.relays {
        let slot = match s {
            Stream::Stdout => &mut r.out,
            Stream::Stderr => &mut r.err,
        };
        Relay::push(slot, data);
    }
}

impl Shim {
    /// A new process's streams: pipes (the shim's ends, the process's ends), or for a
    /// terminal the console socket its runtime will send the pty to.
    pub(super) fn process_io(
        &self,
        terminal: bool,
        stdin: bool,
    ) -> Result<(Option<ProcessStdio>, ProcessIo, Option<ConsoleSocket>), Failure> {
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
    /// so one path serves; its dir sits beside the shim's socket, whose path is kept
    /// short (socket paths are limited to 108 bytes).
    fn console_socket(&self) -> io::Result<ConsoleSocket> {
        let mut dir = self.socket.clone().into_os_string();
        dir.push(".c");
        ConsoleSocket::bind(Path::new(&dir))
    }

    /// Reads what a process wrote (once, or until EOF or nothing is left, at most
    /// `EXIT_DRAIN_LIMIT`, after which the poll loop reads on); at EOF closes the pipe.
    pub(super) fn drain_output(&mut self, id: &str, exec: &str, s: Stream, to_the_end: bool) {
        let Some(p) = self.tasks.process_mut(id, exec) else {
            return;
        };
        let mut buf = [0u8; 64 * 1024];
        let mut drained = 0;
        loop {
            if drained >= EXIT_DRAIN_LIMIT {
                return; // a writer that outlived the kill must not hold up the exit
            }
            let fd = match s {
                Stream::Stdout => p.stdio.stdout.as_ref(),
                Stream::Stderr => p.stdio.stderr.as_ref(),
            };
            let Some(fd) = fd else { return };
            match nix::unistd::read(fd, &mut buf) {
                Ok(n) if n > 0 => {
                    drained += n;
                    deliver(p, s, &buf[..n]);
                    if !to_the_end {
                        return; // one read per poll round keeps other work moving
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(nix::errno::Errno::EINTR) => {}
                // EOF; or a pty master's EIO once every slave side is closed: the end.
                _ => {
                    match s {
                        Stream::Stdout => p.stdio.stdout = None,
                        Stream::Stderr => p.stdio.stderr = None,
                    }
                    if let Some(l) = p.log.as_mut() {
                        let _ = l.close_stream(s);
                    }
                    p.close_log_if_done();
                    return;
                }
            }
        }
    }

    /// Attaches a streaming client to a running container.
    pub(super) fn attach(&mut self, r: pb::AttachRequest) -> Reply {
        let t = self
            .tasks
            .0
            .get_mut(&r.id)
            .ok_or_else(|| failure(Code::NotFound, format!("task {:?} not found", r.id)))?;
        if t.is_infra() {
            return Err(failure(
                Code::FailedPrecondition,
                format!("task {} cannot be attached to", r.id),
            ));
        }
        if t.init.exit.is_some() {
            return Err(failure(
                Code::FailedPrecondition,
                format!("task {} has exited", r.id),
            ));
        }
        // Input only reaches a container that was created with stdin open.
        let stdin = if t.init.stdio.stdin.is_some() {
            r.stdin_fifo.as_str()
        } else {
            ""
        };
        let relay = Relay::open(stdin, &r.stdout_fifo, &r.stderr_fifo, r.stdin_once)
            .map_err(|e| internal("opening the client's streams", e))?;
        t.init.relays.push(relay);
        Ok(pb::Empty {}.encode_to_vec())
    }

    /// A client's input is readable: take it, then hand it to the process.
    pub(super) fn relay_input(&mut self, id: &str, exec: &str, i: usize) {
        let Some(p) = self.tasks.process_mut(id, exec) else {
            return;
        };
        let Some(r) = p.relays.get_mut(i) else { return };
        let Some(fd) = r.input.as_ref() else { return };
        let mut buf = [0u8; 32 * 1024];
        match nix::unistd::read(fd, &mut buf) {
            Ok(0) => {
                // The client's stdin ended.
                r.input = None;
                if r.close_stdin_at_eof && r.pending_in.is_empty() {
                    p.stdio.stdin = None;
                }
            }
            Ok(n) => r.pending_in.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => r.input = None,
        }
        self.feed_stdin(id, exec);
        if let Some(p) = self.tasks.process_mut(id, exec) {
            p.relays
                .retain(|r| !r.is_done() || !r.pending_in.is_empty());
        }
    }

    /// Writes clients' pending input into the process's stdin (non-blocking).
    pub(super) fn feed_stdin(&mut self, id: &str, exec: &str) {
        let Some(p) = self.tasks.process_mut(id, exec) else {
            return;
        };
        let mut close = false;
        for r in &mut p.relays {
            let Some(fd) = p.stdio.stdin.as_ref() else {
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
                    Err(_) => r.pending_in.clear(),
                }
            }
            close |= r.pending_in.is_empty() && r.input.is_none() && r.close_stdin_at_eof;
        }
        if close {
            p.stdio.stdin = None;
        }
    }

    /// A client's output FIFO has room again.
    pub(super) fn relay_flush(&mut self, id: &str, exec: &str, i: usize, err: bool) {
        let Some(p) = self.tasks.process_mut(id, exec) else {
            return;
        };
        let Some(r) = p.relays.get_mut(i) else { return };
        Relay::flush(if err { &mut r.err } else { &mut r.out });
        r.close_flushed();
        p.relays
            .retain(|r| !r.is_done() || !r.pending_in.is_empty());
    }

    /// Changes the size of a process's pty.
    pub(super) fn resize_pty(&mut self, r: pb::ResizePtyRequest) -> Reply {
        let name = shown(&r.id, &r.exec_id);
        let p = self
            .tasks
            .process(&r.id, &r.exec_id)
            .ok_or_else(|| failure(Code::NotFound, format!("task {name:?} not found")))?;
        let (Ok(w), Ok(h)) = (u16::try_from(r.width), u16::try_from(r.height)) else {
            return Err(failure(
                Code::InvalidArgument,
                format!("size {}x{}: at most 65535 each", r.width, r.height),
            ));
        };
        match &p.stdio.console {
            Some(master) => crate::console::resize(master, w, h)
                .map(|()| pb::Empty {}.encode_to_vec())
                .map_err(|e| internal("resizing the pty", e)),
            None if p.exit.is_some() => Err(failure(
                Code::FailedPrecondition,
                format!("task {name} has exited"),
            )),
            None => Err(failure(
                Code::FailedPrecondition,
                format!("task {name} has no terminal"),
            )),
        }
    }
}
