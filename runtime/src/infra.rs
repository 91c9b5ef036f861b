//! The pod's infra process, forked by the shim (no exec, no image, no OCI runtime):
//! it enters the pod's namespaces, joins the pod cgroup, locks itself into an empty
//! read-only root without any capability, and reaps zombies until told to stop.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::unistd::{ForkResult, Pid, fork};

/// The uid and gid the infra process runs as.
const INFRA_ID: u32 = 65535;

/// What the infra process is asked to set up.
pub struct InfraSpec<'a> {
    /// Pinned netns to join, or None for the host's.
    pub netns: Option<&'a Path>,
    /// New UTS namespace with this hostname, or None for the host's.
    pub hostname: Option<&'a str>,
    /// Stay in the host IPC namespace.
    pub host_ipc: bool,
    /// Stay in the host PID namespace.
    pub host_pid: bool,
    /// cgroup directories to join.
    pub cgroup_dirs: &'a [String],
    /// oom_score_adj to set.
    pub oom_score_adj: i32,
    /// Empty directory used as its root.
    pub empty_root: &'a Path,
    /// Namespaced sysctls to set (validated by the caller).
    pub sysctls: Vec<(String, String)>,
}

/// Starts the infra process; returns its pid as seen by the caller. Must be called from
/// a single-threaded process (the shim), since it forks.
pub fn start_infra(spec: &InfraSpec<'_>) -> io::Result<u32> {
    std::fs::create_dir_all(spec.empty_root)?;
    std::fs::set_permissions(
        spec.empty_root,
        std::os::unix::fs::PermissionsExt::from_mode(0o555),
    )?;
    let netns = spec.netns.map(std::fs::File::open).transpose()?;
    let root =
        CString::new(spec.empty_root.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let cgroups: Vec<CString> = spec
        .cgroup_dirs
        .iter()
        .map(|d| CString::new(format!("{d}/cgroup.procs")).map_err(io::Error::other))
        .collect::<io::Result<_>>()?;
    let hostname = spec.hostname.map(|h| h.as_bytes().to_vec());
    let sysctls: Vec<(PathBuf, Vec<u8>)> = spec
        .sysctls
        .iter()
        .map(|(k, v)| {
            (
                Path::new("/proc/sys").join(k.replace('.', "/")),
                v.as_bytes().to_vec(),
            )
        })
        .collect();
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the caller is single-threaded, so the child may allocate; it sets itself
    // up and pauses, or exits.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(rd);
            let code = match setup_namespaces(spec, netns.as_ref()) {
                Ok(()) => match unsafe { fork() } {
                    Ok(ForkResult::Child) => {
                        // The pod's PID 1 (unless host PID): finish and pause.
                        let err = infra_main(
                            &wr,
                            hostname.as_deref(),
                            &cgroups,
                            &sysctls,
                            spec.oom_score_adj,
                            &root,
                        );
                        report(&wr, &format!("E{err}"));
                        unsafe { libc::_exit(1) }
                    }
                    Ok(ForkResult::Parent { child }) => {
                        report(&wr, &format!("P{}", child.as_raw()));
                        0
                    }
                    Err(e) => {
                        report(&wr, &format!("Efork: {e}"));
                        1
                    }
                },
                Err(e) => {
                    report(&wr, &format!("E{e}"));
                    1
                }
            };
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            let _ = nix::sys::wait::waitpid(child, None);
            let mut msg = String::new();
            std::fs::File::from(rd).read_to_string(&mut msg)?;
            // "P<pid>" from the middle process, then maybe "E<error>" from the infra itself.
            let mut pid = None;
            for part in msg.split('\0').filter(|p| !p.is_empty()) {
                match part.split_at(1) {
                    ("P", p) => pid = p.parse::<u32>().ok(),
                    ("E", e) => {
                        if let Some(p) = pid {
                            let _ = nix::sys::signal::kill(
                                Pid::from_raw(p as i32),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                        return Err(io::Error::other(format!("infra process: {e}")));
                    }
                    _ => {}
                }
            }
            pid.ok_or_else(|| io::Error::other("infra process did not start"))
        }
    }
}

fn report(w: &OwnedFd, msg: &str) {
    let mut f = std::mem::ManuallyDrop::new(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(w.as_raw_fd())
    });
    let _ = f.write_all(msg.as_bytes());
    let _ = f.write_all(b"\0");
}

fn setup_namespaces(spec: &InfraSpec<'_>, netns: Option<&std::fs::File>) -> io::Result<()> {
    if let Some(ns) = netns {
        nix::sched::setns(ns, CloneFlags::CLONE_NEWNET)?;
    }
    let mut flags = CloneFlags::empty();
    if spec.hostname.is_some() {
        flags |= CloneFlags::CLONE_NEWUTS;
    }
    if !spec.host_ipc {
        flags |= CloneFlags::CLONE_NEWIPC;
    }
    if !spec.host_pid {
        flags |= CloneFlags::CLONE_NEWPID;
    }
    nix::sched::unshare(flags)?;
    Ok(())
}

/// Runs in the infra process; returns only on a setup error.
fn infra_main(
    ready: &OwnedFd,
    hostname: Option<&[u8]>,
    cgroups: &[CString],
    sysctls: &[(PathBuf, Vec<u8>)],
    oom: i32,
    root: &CString,
) -> io::Error {
    let step = || -> io::Result<()> {
        // Shown as `berth-pause` by ps/top, not as a second shim.
        // SAFETY: PR_SET_NAME with a NUL-terminated 16-byte-or-shorter name.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, c"berth-pause".as_ptr(), 0, 0, 0);
        }
        // /proc/sys/net and the IPC sysctls show the namespaces of the writer: ours now.
        for (path, value) in sysctls {
            std::fs::write(path, value)
                .map_err(|e| io::Error::new(e.kind(), format!("sysctl {}: {e}", path.display())))?;
        }
        if let Some(h) = hostname {
            nix::unistd::sethostname(std::ffi::OsStr::from_bytes_compat(h))?;
        }
        for c in cgroups {
            join_cgroup(Path::new(std::ffi::OsStr::from_bytes_compat(c.as_bytes())))?;
        }
        // A negative value needs CAP_SYS_RESOURCE; the caller clamps it beforehand.
        std::fs::write("/proc/self/oom_score_adj", oom.to_string())?;
        // SAFETY: plain syscalls with valid NUL-terminated strings.
        unsafe {
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            for cap in 0..=63 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
            // Run as nobody (65535, as kubelet's pause image does): a container sharing
            // the PID namespace must not reach the host through /proc/1/root.
            let ids: [libc::gid_t; 0] = [];
            if libc::setgroups(0, ids.as_ptr()) != 0
                || libc::setresgid(INFRA_ID, INFRA_ID, INFRA_ID) != 0
                || libc::setresuid(INFRA_ID, INFRA_ID, INFRA_ID) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        drop_all_capabilities()?;
        // Not dumpable: /proc/<pid>/{root,mem,...} need CAP_SYS_PTRACE even for its uid.
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    if let Err(e) = step() {
        return e;
    }
    let _ = ready;
    // Hold none of the shim's descriptors (socket, pipes, signalfd). Closing the report
    // pipe's write end here is also how the shim learns that setup succeeded.
    // SAFETY: closes file descriptors only; nothing in this process uses them again.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            for fd in 0..4096 {
                libc::close(fd);
            }
        }
    }
    pause_and_reap()
}

/// Moves this process into the cgroup whose `cgroup.procs` is `procs`. A directory that
/// vanished since berthd made it (systemd trims empty v1 cgroups) is made again, and
/// the shim log says so (settings berthd wrote there are gone with it): a few times,
/// since nothing stops a trim between the mkdir and the write (which then fails with
/// ENODEV rather than ENOENT).
fn join_cgroup(procs: &Path) -> io::Result<()> {
    let vanished = |e: &io::Error| {
        e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
    };
    let mut joined = std::fs::write(procs, b"0");
    for _ in 0..8 {
        match (&joined, procs.parent()) {
            (Err(e), Some(dir)) if vanished(e) => {
                eprintln!(
                    "berth-shim: the pod cgroup {} vanished; made again",
                    dir.display()
                );
                joined =
                    berth_cgroups::pod::ensure_dir(dir).and_then(|()| std::fs::write(procs, b"0"));
            }
            _ => break,
        }
    }
    joined.map_err(|e| io::Error::new(e.kind(), format!("joining {}: {e}", procs.display())))
}

trait FromBytesCompat {
    fn from_bytes_compat(b: &[u8]) -> &Self;
}
impl FromBytesCompat for std::ffi::OsStr {
    fn from_bytes_compat(b: &[u8]) -> &Self {
        std::os::unix::ffi::OsStrExt::from_bytes(b)
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn drop_all_capabilities() -> io::Result<()> {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset with a v3 header and two zeroed data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits for signals forever: reaps children (zombies of a shared PID namespace) and
/// exits on SIGTERM/SIGINT. As PID 1 it would otherwise ignore those signals.
fn pause_and_reap() -> ! {
    let mut set = nix::sys::signal::SigSet::empty();
    for s in [
        nix::sys::signal::Signal::SIGCHLD,
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        set.add(s);
    }
    let _ = set.thread_block();
    loop {
        match set.wait() {
            Ok(nix::sys::signal::Signal::SIGCHLD) => {
                while let Ok(st) = nix::sys::wait::waitpid(
                    Pid::from_raw(-1),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                ) {
                    if st == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => unsafe { libc::_exit(0) },
            Err(_) => {}
        }
    }
}
