//! OOM kills: the kernel's per-cgroup counter, and a pollable watch that fires when
//! it grows (v1: an eventfd registered on `memory.oom_control`; v2: inotify on
//! `memory.events`). The counter decides; the notification only says "look now",
//! because v1 also signals the eventfd when the cgroup is removed.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::stats::parse_keyed;
use crate::{Cgroup, CgroupError};

/// OOM kills counted in the cgroup (v1 `memory.oom_control` `oom_kill`, kernel 4.13+;
/// v2 `memory.events` `oom_kill`); `None` when there is no memory cgroup.
pub fn oom_kill_count(cg: &Cgroup) -> Option<u64> {
    let dir = cg.dir("memory")?;
    let file = if cg.is_v2("memory") {
        "memory.events"
    } else {
        "memory.oom_control"
    };
    count_in(&dir.join(file))
}

fn count_in(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    parse_keyed(&text).get("oom_kill").copied()
}

enum Notifier {
    V1 {
        efd: EventFd,
        /// Kept open: the registration lives as long as this fd.
        _control: File,
    },
    V2(Inotify),
}

/// A watch on one cgroup's OOM kills, for a poll loop: poll `fd()` for input, then
/// call `check()`.
pub struct OomWatch {
    notifier: Notifier,
    counter: PathBuf,
    seen: u64,
    gone: bool,
    /// v1: notifications read while the counter did not move (an OOM the kernel had
    /// announced but not yet counted, or one of an ancestor's), and when the last came:
    /// only a recent one can be the announcement of a kill the removal hid.
    unexplained: u64,
    unexplained_at: Option<std::time::Instant>,
    /// Signals read since the cgroup was found gone.
    after_gone: u64,
    /// The cgroup went with one signal read whose meaning the next signal decides.
    undecided: bool,
}

impl OomWatch {
    /// Arms a watch on `cg`'s memory cgroup (which must exist).
    pub fn arm(cg: &Cgroup) -> Result<OomWatch, CgroupError> {
        let dir = cg.dir("memory").ok_or_else(|| {
            CgroupError::Invalid("no memory cgroup is mounted to watch for OOM".into())
        })?;
        if cg.is_v2("memory") {
            let events = dir.join("memory.events");
            let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
                .map_err(|e| CgroupError::io(&events, e.into()))?;
            ino.add_watch(&events, AddWatchFlags::IN_MODIFY)
                .map_err(|e| CgroupError::io(&events, e.into()))?;
            return Ok(OomWatch {
                seen: count_in(&events).unwrap_or(0),
                counter: events,
                notifier: Notifier::V2(ino),
                gone: false,
                unexplained: 0,
                unexplained_at: None,
                after_gone: 0,
                undecided: false,
            });
        }
        let control_path = dir.join("memory.oom_control");
        let control = File::open(&control_path).map_err(|e| CgroupError::io(&control_path, e))?;
        let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| CgroupError::io(&control_path, e.into()))?;
        let reg = dir.join("cgroup.event_control");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&reg)
            .and_then(|mut f| {
                f.write_all(
                    format!("{} {}", efd.as_fd().as_raw_fd(), control.as_raw_fd()).as_bytes(),
                )
            })
            .map_err(|e| CgroupError::io(&reg, e))?;
        Ok(OomWatch {
            seen: count_in(&control_path).unwrap_or(0),
            counter: control_path,
            notifier: Notifier::V1 {
                efd,
                _control: control,
            },
            gone: false,
            unexplained: 0,
            unexplained_at: None,
            after_gone: 0,
            undecided: false,
        })
    }

    /// The fd to poll for input.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.notifier {
            Notifier::V1 { efd, .. } => efd.as_fd(),
            Notifier::V2(ino) => ino.as_fd(),
        }
    }

    /// After the fd was readable: drains it and returns how many OOM kills happened
    /// since the last check. A removed cgroup makes the watch `gone`.
    pub fn check(&mut self) -> u64 {
        let mut signals = 0;
        match &self.notifier {
            Notifier::V1 { efd, .. } => {
                signals = efd.read().unwrap_or(0);
            }
            Notifier::V2(ino) => {
                while let Ok(evs) = ino.read_events() {
                    if evs.is_empty() {
                        break;
                    }
                    if evs
                        .iter()
                        .any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED))
                    {
                        self.gone = true;
                    }
                }
            }
        }
        match count_in(&self.counter) {
            Some(n) => {
                let new = n.saturating_sub(self.seen);
                self.seen = self.seen.max(n);
                if new > 0 {
                    self.unexplained = 0;
                } else if signals > 0 {
                    self.unexplained += signals;
                    self.unexplained_at = Some(std::time::Instant::now());
                }
                new
            }
            None => {
                self.gone = true;
                // v1 signals once per OOM announcement and once when the cgroup is
                // removed, the latter from a kernel work item after the rmdir. Signals
                // read while the counter still existed were announcements; a lone
                // signal read now may be either (see `settle`).
                let recent = self
                    .unexplained_at
                    .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(2));
                let pending = if recent { self.unexplained } else { 0 };
                self.after_gone += signals;
                self.undecided = pending == 0 && self.after_gone == 1;
                // A verdict either way ends the watch (`is_gone`), so none repeats.
                u64::from(pending >= 1 || self.after_gone >= 2)
            }
        }
    }

    /// After `check` found the cgroup gone with one signal that may be the removal's
    /// or an OOM's: waits up to 250 ms for another, which would be the removal's (and
    /// make the first an OOM's). For a process that died of SIGKILL only, since this
    /// blocks.
    pub fn settle(&mut self) -> u64 {
        let undecided = std::mem::take(&mut self.undecided);
        if undecided && self.removal_signal_follows() {
            self.after_gone += 1;
            return 1;
        }
        0
    }

    /// v1, once the cgroup is gone: whether a signal comes within 250 ms.
    fn removal_signal_follows(&self) -> bool {
        let Notifier::V1 { efd, .. } = &self.notifier else {
            return false;
        };
        let mut fds = [nix::poll::PollFd::new(
            efd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(250u16));
        matches!(ready, Ok(n) if n > 0) && efd.read().is_ok_and(|n| n > 0)
    }

    /// The OOM kills counted so far (including those before the watch was armed).
    pub fn total(&self) -> u64 {
        self.seen
    }

    /// The cgroup went away and its signals are understood; drop the watch. (An
    /// undecided one is kept: the next signal decides.)
    pub fn is_gone(&self) -> bool {
        self.gone && !self.undecided
    }
}
