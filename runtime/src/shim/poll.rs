//! The loop: one `poll` over the listener, the SIGCHLD signalfd, the connections, the
//! processes' output, OOM watches and streaming relays.

use std::io;
use std::os::fd::AsFd;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::Shim;
use crate::criolog::Stream;

/// What one poll slot watches.
enum Slot {
    Listener,
    Signal,
    Conn(u64),
    /// A process's output: (task, exec, stream).
    Output(String, String, Stream),
    Oom(String),
    RelayIn(String, String, usize),
    RelayOut(String, String, usize, bool),
    StdinOut(String, String),
}

impl Shim {
    pub(super) fn poll_once(&mut self) -> io::Result<()> {
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
        for (id, t) in &self.tasks.0 {
            if let Some(w) = t.container().and_then(|c| c.oom.as_ref()) {
                fds.push(PollFd::new(w.fd(), PollFlags::POLLIN));
                slots.push(Slot::Oom(id.clone()));
            }
        }
        for (id, exec, p) in self.tasks.processes() {
            let (id, exec) = (id.to_string(), exec.to_string());
            for (fd, s) in [
                (&p.stdio.stdout, Stream::Stdout),
                (&p.stdio.stderr, Stream::Stderr),
            ] {
                if let Some(fd) = fd {
                    fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                    slots.push(Slot::Output(id.clone(), exec.clone(), s));
                }
            }
            let mut input_waiting = false;
            for (i, r) in p.relays.iter().enumerate() {
                // Read more input only when the last of it reached the process.
                match &r.input {
                    Some(fd) if r.pending_in.is_empty() => {
                        fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                        slots.push(Slot::RelayIn(id.clone(), exec.clone(), i));
                    }
                    _ => {}
                }
                input_waiting |= !r.pending_in.is_empty();
                for (fd, err) in r.waiting_outputs() {
                    fds.push(PollFd::new(fd, PollFlags::POLLOUT));
                    slots.push(Slot::RelayOut(id.clone(), exec.clone(), i, err));
                }
            }
            if let (true, Some(fd)) = (input_waiting, &p.stdio.stdin) {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLOUT));
                slots.push(Slot::StdinOut(id.clone(), exec.clone()));
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
            self.serve_slot(&slots[i], rev);
        }
        let closed: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.closed && c.out.is_empty())
            .map(|(id, _)| *id)
            .collect();
        if !closed.is_empty() {
            self.conns.retain(|id, _| !closed.contains(id));
            self.abandon_execs(&closed);
        }
        Ok(())
    }

    fn serve_slot(&mut self, slot: &Slot, rev: PollFlags) {
        match slot {
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
            Slot::Output(id, exec, s) => self.drain_output(id, exec, *s, false),
            Slot::Oom(id) => self.check_oom(id, false),
            Slot::RelayIn(id, exec, i) => self.relay_input(id, exec, *i),
            Slot::RelayOut(id, exec, i, err) => self.relay_flush(id, exec, *i, *err),
            Slot::StdinOut(id, exec) => self.feed_stdin(id, exec),
        }
    }
}
