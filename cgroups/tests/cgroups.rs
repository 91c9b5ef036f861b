//! Reads and watches real cgroups: a cgroup2 mount made for the test (CPU, pids) and
//! the host's v1 memory hierarchy (an OOM kill); v2 memory files from a fixture tree.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use berth_cgroups::{Hierarchy, OomWatch, oom_kill_count};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

fn root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Starts `sh -c script` inside the cgroup dir(s) given (moves itself first).
fn spawn_in(dirs: &[&Path], script: &str) -> Child {
    let joins: String = dirs
        .iter()
        .map(|d| format!("echo $$ > {}/cgroup.procs; ", d.display()))
        .collect();
    Command::new("sh")
        .arg("-c")
        .arg(format!("{joins}{script}"))
        .spawn()
        .expect("spawn sh")
}

fn readable(fd: std::os::fd::BorrowedFd<'_>, within: Duration) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ms = within.as_millis().min(60_000) as u16;
    poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0) > 0
}

#[test]
fn v2_fixture_stats_and_oom_watch() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("cgroup.controllers"),
        "cpuset cpu memory pids\n",
    )
    .unwrap();
    let d = tmp.path().join("kubepods/pod1/c1");
    std::fs::create_dir_all(&d).unwrap();
    let w = |f: &str, s: &str| std::fs::write(d.join(f), s).unwrap();
    w("memory.current", "10485760\n");
    w("memory.max", "33554432\n");
    w(
        "memory.stat",
        "anon 6291456\nfile 4194304\nfile_mapped 1048576\nactive_file 1048576\ninactive_file 3145728\npgfault 1200\npgmajfault 3\n",
    );
    w("memory.events", "low 0\nhigh 0\nmax 4\noom 0\noom_kill 0\n");
    w("memory.swap.current", "0\n");
    w("memory.swap.max", "max\n");
    w(
        "cpu.stat",
        "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\nnr_periods 10\nnr_throttled 2\nthrottled_usec 300\n",
    );
    w("pids.current", "3\n");
    let h = Hierarchy::unified_at(tmp.path());
    let cg = h.cgroup(Path::new("kubepods/pod1/c1"));
    let st = cg.stats().unwrap();
    let cpu = st.cpu.unwrap();
    assert_eq!(
        (cpu.usage_ns, cpu.user_ns, cpu.system_ns),
        (2_500_000, 2_000_000, 500_000)
    );
    assert_eq!(
        (cpu.periods, cpu.throttled_periods, cpu.throttled_ns),
        (10, 2, 300_000)
    );
    let m = st.memory.unwrap();
    assert_eq!(m.usage, 10 << 20);
    assert_eq!(m.limit, Some(32 << 20));
    assert_eq!(m.working_set(), (10 << 20) - 3145728);
    assert_eq!((m.rss, m.cache, m.mapped_file), (6291456, 4194304, 1048576));
    assert_eq!((m.pgfault, m.pgmajfault, m.failcnt), (1200, 3, 4));
    assert_eq!((m.swap_usage, m.swap_limit), (Some(0), None));
    assert_eq!(st.pids, Some(3));
    assert_eq!(st.oom_kills, Some(0));
    // Unlimited memory reads as no limit.
    w("memory.max", "max\n");
    assert_eq!(cg.memory_stats().unwrap().unwrap().limit, None);

    // The watch: a write to memory.events that raises oom_kill fires and counts;
    // one that does not raise it fires but counts nothing.
    let mut watch = OomWatch::arm(&cg).unwrap();
    assert!(!readable(watch.fd(), Duration::from_millis(50)));
    w("memory.events", "low 0\nhigh 0\nmax 5\noom 0\noom_kill 0\n");
    assert!(readable(watch.fd(), Duration::from_secs(2)));
    assert_eq!(watch.check(), 0);
    w("memory.events", "low 0\nhigh 0\nmax 6\noom 1\noom_kill 1\n");
    assert!(readable(watch.fd(), Duration::from_secs(2)));
    assert_eq!(watch.check(), 1);
    assert_eq!(oom_kill_count(&cg), Some(1));
    // The cgroup goes away: the watch says so.
    std::fs::remove_dir_all(&d).unwrap();
    assert!(readable(watch.fd(), Duration::from_secs(2)));
    assert_eq!(watch.check(), 0);
    assert!(watch.is_gone());
    assert!(cg.stats().is_err());
}

/// A cgroup2 mount of our own: a busy process's CPU time and its task count show up.
#[test]
fn v2_mount_cpu_and_pids() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    nix::mount::mount(
        Some("cgroup2"),
        mnt.path(),
        Some("cgroup2"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount cgroup2");
    let rel = PathBuf::from(format!("berth-cgtest-{}", std::process::id()));
    let dir = mnt.path().join(&rel);
    std::fs::create_dir(&dir).unwrap();
    let cg = Hierarchy::unified_at(mnt.path()).cgroup(&rel);
    let mut child = spawn_in(&[&dir], "while :; do :; done");
    std::thread::sleep(Duration::from_millis(600));
    let st = cg.stats().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::mount::umount2(mnt.path(), nix::mount::MntFlags::MNT_DETACH);
    let cpu = st.cpu.expect("cpu.stat in a cgroup2 dir");
    assert!(
        cpu.usage_ns > 200_000_000,
        "busy loop used {} ns",
        cpu.usage_ns
    );
    assert_eq!(st.pids, Some(1));
    assert!(!dir.exists());
}

/// The host's v1 memory hierarchy: a process over its limit is OOM-killed, the watch
/// fires, and the counter shows it.
#[test]
fn v1_memory_oom_kill_is_seen() {
    let h = Hierarchy::detect().unwrap();
    let rel = PathBuf::from(format!("berth-cgtest-oom-{}", std::process::id()));
    let cg = h.cgroup(&rel);
    let Some(mem) = cg.dir("memory").filter(|_| root() && !cg.is_v2("memory")) else {
        eprintln!("skipped: needs root and a v1 memory hierarchy");
        return;
    };
    let mem = mem.to_path_buf();
    std::fs::create_dir(&mem).unwrap();
    std::fs::write(mem.join("memory.limit_in_bytes"), "16777216").unwrap();
    let _ = std::fs::write(mem.join("memory.memsw.limit_in_bytes"), "16777216");
    let mut watch = OomWatch::arm(&cg).unwrap();
    let mut child = spawn_in(&[&mem], "exec tail /dev/zero");
    let status = child.wait().unwrap();
    let fired = readable(watch.fd(), Duration::from_secs(10));
    let n = watch.check();
    let total = oom_kill_count(&cg);
    let st = cg.memory_stats().unwrap().unwrap();
    let _ = std::fs::remove_dir(&mem);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(9),
        "tail should be OOM-killed: {status:?}"
    );
    assert!(fired, "the eventfd fired");
    assert_eq!(n, 1);
    assert_eq!(total, Some(1));
    assert_eq!(st.limit, Some(16 << 20));
    assert!(
        st.max_usage > 12 << 20,
        "peak {} near the limit",
        st.max_usage
    );
}
