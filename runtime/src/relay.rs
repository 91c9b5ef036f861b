//! A streaming client's view of a task's stdio, through FIFOs berthd made: the
//! shim copies the process's output into the client's stdout/stderr FIFOs and the
//! client's stdin FIFO into the process's input. All fds are non-blocking and
//! output is buffered per relay, so a slow client never blocks the shim's loop;
//! a client too far behind (over `MAX_PENDING`) loses that relay, not the pod.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// Output buffered for one client before it is dropped as too slow.
pub const MAX_PENDING: usize = 4 << 20;

/// One output FIFO and what is waiting to go into it.
pub struct RelayOut {
    fd: OwnedFd,
    pending: Vec<u8>,
}

/// One client's FIFOs.
pub struct Relay {
    /// stdout (for a tty: the terminal's output).
    pub out: Option<RelayOut>,
    /// stderr.
    pub err: Option<RelayOut>,
    /// Client input, read here and written to the process.
    pub input: Option<OwnedFd>,
    /// Input read but not yet written to the process.
    pub pending_in: Vec<u8>,
    /// Closing stdin at this client's input EOF (exec, or attach with stdin_once).
    pub close_stdin_at_eof: bool,
    /// The task ended: close the outputs once flushed.
    pub finishing: bool,
}

fn open(path: &str, flags: OFlag) -> io::Result<OwnedFd> {
    nix::fcntl::open(
        Path::new(path),
        flags | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("opening {path}: {e}")))
}

impl Relay {
    /// Opens the FIFOs berthd created (empty path = no such stream). berthd holds
    /// the other ends already, so none of these opens blocks or fails for want of
    /// a peer.
    pub fn open(
        stdin: &str,
        stdout: &str,
        stderr: &str,
        close_stdin_at_eof: bool,
    ) -> io::Result<Relay> {
        let out = |p: &str| -> io::Result<Option<RelayOut>> {
            if p.is_empty() {
                return Ok(None);
            }
            Ok(Some(RelayOut {
                fd: open(p, OFlag::O_WRONLY)?,
                pending: Vec::new(),
            }))
        };
        Ok(Relay {
            out: out(stdout)?,
            err: out(stderr)?,
            input: if stdin.is_empty() {
                None
            } else {
                Some(open(stdin, OFlag::O_RDONLY)?)
            },
            pending_in: Vec::new(),
            close_stdin_at_eof,
            finishing: false,
        })
    }

    /// Queues process output for this client and writes what the FIFO takes.
    pub fn push(slot: &mut Option<RelayOut>, data: &[u8]) {
        let Some(o) = slot.as_mut() else { return };
        o.pending.extend_from_slice(data);
        if o.pending.len() > MAX_PENDING {
            *slot = None; // too slow: this client loses the stream (it sees EOF)
            return;
        }
        Relay::flush(slot);
    }

    /// Writes pending output; a client that went away (EPIPE) loses the stream.
    pub fn flush(slot: &mut Option<RelayOut>) {
        let Some(o) = slot.as_mut() else { return };
        while !o.pending.is_empty() {
            match nix::unistd::write(&o.fd, &o.pending) {
                Ok(n) => {
                    o.pending.drain(..n);
                }
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => {
                    *slot = None;
                    return;
                }
            }
        }
    }

    /// The output fds that have something waiting (to poll for POLLOUT).
    pub fn waiting_outputs(&self) -> Vec<(BorrowedFd<'_>, bool)> {
        let mut v = Vec::new();
        if let Some(o) = self.out.as_ref().filter(|o| !o.pending.is_empty()) {
            v.push((o.fd.as_fd(), false));
        }
        if let Some(o) = self.err.as_ref().filter(|o| !o.pending.is_empty()) {
            v.push((o.fd.as_fd(), true));
        }
        v
    }

    /// After the task ended: outputs that are flushed are closed (EOF for the client).
    pub fn close_flushed(&mut self) {
        if !self.finishing {
            return;
        }
        for slot in [&mut self.out, &mut self.err] {
            if slot.as_ref().is_some_and(|o| o.pending.is_empty()) {
                *slot = None;
            }
        }
        self.input = None;
    }

    /// Nothing left to do for this relay.
    pub fn is_done(&self) -> bool {
        self.out.is_none() && self.err.is_none() && self.input.is_none()
    }
}
