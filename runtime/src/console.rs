//! The pty of a `terminal` process: the OCI runtime creates it inside the container
//! and sends its master over a unix socket we listen on (`--console-socket`), as
//! runc and crun do for detached containers.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, getsockopt, recvmsg, sockopt};
use nix::unistd::Uid;

/// A listening console socket, 0600 in a 0700 dir of its own; only a peer with the
/// shim's own uid (the runtime runs as root, like the shim) is heard. The dir and
/// the socket are removed when dropped.
pub struct ConsoleSocket {
    listener: UnixListener,
    dir: PathBuf,
    path: PathBuf,
    owner: Uid,
}

impl ConsoleSocket {
    /// Listens at `dir/sock`, creating `dir` (replacing a stale one).
    pub fn bind(dir: &Path) -> io::Result<ConsoleSocket> {
        Self::bind_for(dir, Uid::effective())
    }

    /// As `bind`, hearing only peers running as `owner`.
    pub(crate) fn bind_for(dir: &Path, owner: Uid) -> io::Result<ConsoleSocket> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::DirBuilder::new().mode(0o700).create(dir)?;
        let path = dir.join("sock");
        // Nobody else can reach into the 0700 dir, so the socket's mode at bind time
        // (the umask's) is never exposed before the chmod.
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(ConsoleSocket {
            listener,
            dir: dir.to_path_buf(),
            path,
            owner,
        })
    }

    /// The socket's path, for `--console-socket`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next connection from a peer running as the owner; others are dropped.
    fn accept_owner(&self, deadline: Instant) -> io::Result<UnixStream> {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    let peer = getsockopt(&s, sockopt::PeerCredentials).map_err(io::Error::from)?;
                    if peer.uid() == self.owner.as_raw() {
                        return Ok(s);
                    }
                    eprintln!(
                        "berth-shim: console socket: dropped a connection from uid {} (pid {})",
                        peer.uid(),
                        peer.pid()
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the runtime sent no console (pty master) on the console socket",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes the pty master the runtime sent. The runtime has already exited when
    /// this is called, so its connection and message are queued: waiting is brief.
    pub fn receive_master(&self, timeout: Duration) -> io::Result<OwnedFd> {
        let deadline = Instant::now() + timeout;
        let stream = self.accept_owner(deadline)?;
        stream.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10)),
        ))?;
        // runc sends the pty's name as data and the master as SCM_RIGHTS.
        let mut name = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut name)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        stream.set_nonblocking(false)?;
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut master = None;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: the kernel just installed `fd` in this process for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                    if master.is_none() {
                        master = Some(owned);
                    }
                }
            }
        }
        master.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the console socket message carried no file descriptor",
            )
        })
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Sets a pty's window size (TIOCSWINSZ on the master).
pub fn resize(master: &OwnedFd, width: u16, height: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessage, sendmsg};
    use std::io::IoSlice;
    use std::os::unix::fs::MetadataExt;

    fn send_fd(path: &Path) -> UnixStream {
        let s = UnixStream::connect(path).unwrap();
        let fd = std::fs::File::open("/dev/null").unwrap();
        let fds = [fd.as_raw_fd()];
        sendmsg::<()>(
            s.as_raw_fd(),
            &[IoSlice::new(b"/dev/pts/x")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        s
    }

    #[test]
    fn private_and_heard_only_from_its_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c");
        let sock = ConsoleSocket::bind(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::metadata(sock.path()).unwrap().mode() & 0o777,
            0o600
        );
        let _peer = send_fd(sock.path());
        sock.receive_master(Duration::from_secs(2)).unwrap();
        drop(sock);
        assert!(!dir.exists(), "the dir outlived its socket");

        // A peer that is not the owner is dropped, and the wait ends without a fd.
        let other = Uid::from_raw(Uid::effective().as_raw() ^ 1);
        let sock = ConsoleSocket::bind_for(&dir, other).unwrap();
        let _peer = send_fd(sock.path());
        let e = sock.receive_master(Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    }
}
