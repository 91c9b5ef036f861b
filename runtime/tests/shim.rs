//! The real berth-shim driving the real runc with a busybox bundle (needs root,
//! runc and Debian's busybox-static). It covers exit codes, CRI logs, kill, events,
//! reconnecting after the client (berthd) goes away, errors that leave nothing behind,
//! and shutdown.

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_proto::shim as pb;
use berth_runtime::client::{ShimClient, ShimError, spawn_shim};
use berth_runtime::shim::ShimConfig;

struct Env {
    dir: tempfile::TempDir,
    cfg: ShimConfig,
}

/// The cgroup parent of this run's containers; runc removes only the leaves.
fn cgroup_parent() -> String {
    format!("/berth-shim-test-{}", std::process::id())
}

impl Drop for Env {
    fn drop(&mut self) {
        // A test that failed left its shim and containers: kill every process whose
        // command line names this test's dir (the shim), then the containers by their
        // runtime state, before the cgroups go.
        let needle = self.dir.path().display().to_string();
        for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            if pid as u32 != std::process::id() && String::from_utf8_lossy(&cmd).contains(&needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for id in self.runc_list().split_whitespace() {
            let _ = std::process::Command::new(&self.cfg.runtime)
                .arg("--root")
                .arg(&self.cfg.runtime_root)
                .args(["delete", "--force", id])
                .output();
        }
        // Remove this run's (empty) parent cgroup in every hierarchy, by its path.
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in rd.flatten() {
                let _ = std::fs::remove_dir(h.path().join(cgroup_parent().trim_start_matches('/')));
            }
        }
        let _ = std::fs::remove_dir(
            Path::new("/sys/fs/cgroup").join(cgroup_parent().trim_start_matches('/')),
        );
    }
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("berth-shim-test-")
            .tempdir()
            .unwrap();
        let cfg = ShimConfig {
            socket: dir.path().join("shim.sock"),
            state_dir: dir.path().join("state"),
            runtime: PathBuf::from(which("runc")),
            runtime_root: dir.path().join("runc-root"),
            runtime_args: vec![],
            runtime_timeout: berth_runtime::runc::DEFAULT_TIMEOUT,
        };
        Env { dir, cfg }
    }

    /// A bundle whose process runs `sh -c script`.
    fn bundle(&self, name: &str, script: &str) -> PathBuf {
        let b = self.dir.path().join(name);
        let rootfs = b.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        for d in ["proc", "dev", "sys", "tmp"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
        let out = std::process::Command::new(&self.cfg.runtime)
            .arg("spec")
            .current_dir(&b)
            .output()
            .unwrap();
        assert!(out.status.success(), "runc spec: {out:?}");
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = serde_json::json!(["/bin/sh", "-c", script]);
        spec["root"]["readonly"] = true.into();
        spec["linux"]["cgroupsPath"] = format!("{}/{name}", cgroup_parent()).into();
        std::fs::write(b.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        b
    }

    fn create_req(&self, id: &str, bundle: &Path, log: &Path) -> pb::CreateRequest {
        pb::CreateRequest {
            id: id.into(),
            bundle: bundle.display().to_string(),
            log_path: log.display().to_string(),
            ..Default::default()
        }
    }

    fn runc_list(&self) -> String {
        let out = std::process::Command::new(&self.cfg.runtime)
            .arg("--root")
            .arg(&self.cfg.runtime_root)
            .args(["list", "-q"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn which(bin: &str) -> String {
    for d in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"] {
        let p = Path::new(d).join(bin);
        if p.is_file() {
            return p.display().to_string();
        }
    }
    panic!("{bin} not found")
}

/// These tests drive the real runc: root only. Without it they say so and pass over
/// (the shim's logic without root is in `shim_fake.rs`).
fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("skipped: needs root (runc, mounts, cgroups)");
    true
}

fn shim_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_berth-shim"))
}

fn pid_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

fn log_records(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut it = l.splitn(4, ' ');
            let _ts = it.next();
            (
                it.next().unwrap_or("").to_string(),
                it.next().unwrap_or("").to_string(),
                it.next().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shim_runs_containers_with_runc() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    spawn_shim(shim_binary(), &env.cfg).unwrap();
    let client = ShimClient::connect(&env.cfg.socket).await.unwrap();
    let info = client.connect_info().await.unwrap();
    let shim_pid = info.shim_pid;
    assert!(info.tasks.is_empty());
    // The shim is detached: not our child, own session.
    let ppid = std::fs::read_to_string(format!("/proc/{shim_pid}/stat")).unwrap();
    let fields: Vec<&str> = ppid
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_ne!(
        fields[1].parse::<u32>().unwrap(),
        std::process::id(),
        "shim is still our child"
    );
    client.subscribe().await.unwrap();
    let mut events = client.events();

    // A container that writes to both streams and exits 3.
    let log = env.dir.path().join("logs/c1.log");
    let b1 = env.bundle(
        "b1",
        "echo hello; echo oops >&2; printf 'no newline'; exit 3",
    );
    let pid = client
        .create(env.create_req("c1", &b1, &log))
        .await
        .unwrap();
    assert!(pid > 0);
    assert_eq!(
        client.state("c1").await.unwrap().status,
        pb::TaskStatus::Created as i32
    );
    client.start("c1").await.unwrap();
    let exit = client.wait("c1").await.unwrap();
    assert_eq!(exit.exit_status, 3);
    assert!(exit.exited_at_unix_nanos > 0);
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    match ev.event {
        Some(pb::event::Event::Exit(e)) => {
            assert_eq!((e.id.as_str(), e.exit_status, e.pid), ("c1", 3, pid))
        }
        other => panic!("unexpected event {other:?}"),
    }
    let recs = log_records(&log);
    let want = [
        ("stdout", "F", "hello"),
        ("stderr", "F", "oops"),
        ("stdout", "F", "no newline"),
    ];
    for w in want {
        assert!(
            recs.iter()
                .any(|r| (r.0.as_str(), r.1.as_str(), r.2.as_str()) == w),
            "{w:?} missing in {recs:?}"
        );
    }
    let st = client.state("c1").await.unwrap();
    assert_eq!(
        (st.status, st.exit_status),
        (pb::TaskStatus::Stopped as i32, 3)
    );
    let del = client.delete("c1").await.unwrap();
    assert_eq!(del.exit_status, 3);
    assert!(matches!(
        client.state("c1").await,
        Err(ShimError::Remote {
            code: pb::ErrorCode::NotFound,
            ..
        })
    ));

    // A long-running container: kill, then its exit is 128 + 9.
    let b2 = env.bundle("b2", "exec sleep 1000");
    client
        .create(env.create_req("c2", &b2, &env.dir.path().join("logs/c2.log")))
        .await
        .unwrap();
    client.start("c2").await.unwrap();
    assert_eq!(client.pids("c2").await.unwrap().len(), 1);
    assert!(matches!(
        client.delete("c2").await,
        Err(ShimError::Remote {
            code: pb::ErrorCode::FailedPrecondition,
            ..
        })
    ));
    client.kill("c2", 9, false).await.unwrap();
    assert_eq!(client.wait("c2").await.unwrap().exit_status, 137);
    client.kill("c2", 15, false).await.unwrap(); // killing an exited task is not an error
    client.delete("c2").await.unwrap();

    // berthd goes away while a container runs and exits: the exit is kept for the next client.
    let b3 = env.bundle("b3", "sleep 0.3; exit 7");
    client
        .create(env.create_req("c3", &b3, &env.dir.path().join("logs/c3.log")))
        .await
        .unwrap();
    client.start("c3").await.unwrap();
    drop(events);
    drop(client);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let exit_file = env.cfg.state_dir.join("exits/c3.json");
    assert!(exit_file.is_file(), "exit not recorded on disk");
    let client = ShimClient::connect(&env.cfg.socket).await.unwrap();
    let info = client.connect_info().await.unwrap();
    assert_eq!(info.shim_pid, shim_pid);
    let c3 = info
        .tasks
        .iter()
        .find(|t| t.id == "c3")
        .expect("c3 listed after reconnect");
    assert_eq!(
        (c3.status, c3.exit_status),
        (pb::TaskStatus::Stopped as i32, 7)
    );
    assert_eq!(client.wait("c3").await.unwrap().exit_status, 7);
    client.delete("c3").await.unwrap();
    assert!(!exit_file.exists(), "exit record kept after delete");

    // A bad bundle: the runtime's message comes back and nothing is left behind.
    let bad = env.bundle("bad", "true");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bad.join("config.json")).unwrap()).unwrap();
    spec["process"]["args"] = serde_json::json!(["/no/such/binary"]);
    std::fs::write(bad.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    let err = client
        .create(env.create_req("bad", &bad, &env.dir.path().join("logs/bad.log")))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("/no/such/binary") || err.to_string().contains("no such file"),
        "{err}"
    );
    assert!(matches!(
        client.state("bad").await,
        Err(ShimError::Remote {
            code: pb::ErrorCode::NotFound,
            ..
        })
    ));
    assert_eq!(env.runc_list(), "", "runtime state left behind");
    // Bad ids are refused before they touch a path.
    let err = client
        .create(env.create_req("../x", &b1, &log))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ShimError::Remote {
                code: pb::ErrorCode::InvalidArgument,
                ..
            }
        ),
        "{err}"
    );

    // Shutdown: the shim exits.
    client.shutdown().await.unwrap();
    for _ in 0..100 {
        if !pid_alive(shim_pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!pid_alive(shim_pid), "shim still running after shutdown");
    assert!(client.state("c1").await.is_err());
}

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l[key.len()..].trim().to_string())
        .unwrap_or_default()
}

fn ns_inode(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shim_starts_a_locked_down_infra_process() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    let netns = env.dir.path().join("netns/pod1");
    berth_runtime::netns::create_pinned(&netns).unwrap();
    spawn_shim(shim_binary(), &env.cfg).unwrap();
    let client = ShimClient::connect(&env.cfg.socket).await.unwrap();
    let shim_pid = client.connect_info().await.unwrap().shim_pid;
    let req = pb::InfraRequest {
        id: "pod1".into(),
        netns_path: netns.display().to_string(),
        hostname: "pod-host".into(),
        ..Default::default()
    };
    let pid = client.start_infra(req).await.unwrap();
    // In the pinned netns, its own UTS, IPC and PID namespaces, as PID 1 there.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        ns_inode(&format!("/proc/{pid}/ns/net")),
        std::fs::metadata(&netns).unwrap().ino()
    );
    for ns in ["uts", "ipc", "pid"] {
        assert_ne!(
            ns_inode(&format!("/proc/{pid}/ns/{ns}")),
            ns_inode(&format!("/proc/self/ns/{ns}")),
            "{ns}"
        );
    }
    assert!(
        status_field(pid, "NSpid:").ends_with("\t1") || status_field(pid, "NSpid:").ends_with(" 1")
    );
    let out = std::process::Command::new("nsenter")
        .args(["--uts", "-t", &pid.to_string(), "hostname"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pod-host");
    // No capabilities, no way to regain them, an empty root, no inherited descriptors.
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd:"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert!(
        status_field(pid, "Uid:").starts_with("65535"),
        "{}",
        status_field(pid, "Uid:")
    );
    assert!(
        status_field(pid, "Gid:").starts_with("65535"),
        "{}",
        status_field(pid, "Gid:")
    );
    let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
    assert_eq!(root, env.cfg.state_dir.join("infra-root"));
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count(),
        0
    );
    // Its parent is the shim (subreaper), and it stops cleanly on SIGTERM.
    assert_eq!(status_field(pid, "PPid:"), shim_pid.to_string());
    assert_eq!(client.pids("pod1").await.unwrap(), vec![pid]);
    client.kill("pod1", 15, false).await.unwrap();
    assert_eq!(client.wait("pod1").await.unwrap().exit_status, 0);
    client.delete("pod1").await.unwrap();
    client.shutdown().await.unwrap();
    berth_runtime::netns::remove_pinned(&netns).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&netns.display().to_string()),
        "netns still mounted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_in_the_pods_pid_namespace_keeps_its_signal_dispositions() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    spawn_shim(shim_binary(), &env.cfg).unwrap();
    let client = ShimClient::connect(&env.cfg.socket).await.unwrap();
    let infra = client
        .start_infra(pb::InfraRequest {
            id: "pod".into(),
            hostname: "p".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let b = env.bundle("shared", "trap '' TERM; while true; do sleep 1; done");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
    for ns in spec["linux"]["namespaces"].as_array_mut().unwrap() {
        if ns["type"] == "pid" {
            ns["path"] = format!("/proc/{infra}/ns/pid").into();
        }
    }
    std::fs::write(b.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    let pid = client
        .create(env.create_req("c", &b, &env.dir.path().join("c.log")))
        .await
        .unwrap();
    client.start("c").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ign = status
        .lines()
        .find(|l| l.starts_with("SigIgn:"))
        .unwrap()
        .to_string();
    let ppid = status
        .lines()
        .find(|l| l.starts_with("PPid:"))
        .unwrap()
        .to_string();
    client.kill("c", 15, false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = client.state("c").await.unwrap();
    assert_eq!(
        st.status,
        pb::TaskStatus::Running as i32,
        "SIGTERM killed a process that ignores it ({ign}, {ppid}, exit {})",
        st.exit_status
    );
    client.kill("c", 9, false).await.unwrap();
    assert_eq!(client.wait("c").await.unwrap().exit_status, 137);
    client.delete("c").await.unwrap();
    client.kill("pod", 15, false).await.unwrap();
    client.wait("pod").await.unwrap();
    client.delete("pod").await.unwrap();
    client.shutdown().await.unwrap();
}

/// Waits until `f` holds, for up to 10 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shim_gives_terminals_keeps_stdin_open_and_updates_resources() {
    if skip_unless_root() {
        return;
    }
    let env = Env::new();
    spawn_shim(shim_binary(), &env.cfg).unwrap();
    let client = ShimClient::connect(&env.cfg.socket).await.unwrap();
    let shim_pid = client.connect_info().await.unwrap().shim_pid;

    // A tty container: output arrives through the pty (as stdout) and a resize reaches it.
    let log = env.dir.path().join("logs/tty.log");
    let b = env.bundle(
        "tty",
        "tty; until [ \"$(stty size)\" = '40 120' ]; do sleep 0.05; done; echo resized; exit 4",
    );
    let mut req = env.create_req("tty", &b, &log);
    req.terminal = true;
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
    spec["process"]["terminal"] = true.into();
    std::fs::write(b.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    client.create(req).await.unwrap();
    client.start("tty").await.unwrap();
    eventually("the tty line in the log", || {
        log_records(&log)
            .iter()
            .any(|r| r.2.starts_with("/dev/pts/"))
    })
    .await;
    client.resize_pty("tty", "", 120, 40).await.unwrap();
    assert_eq!(client.wait("tty").await.unwrap().exit_status, 4);
    let recs = log_records(&log);
    assert!(
        recs.iter()
            .any(|r| r.0 == "stdout" && r.1 == "F" && r.2.trim_end() == "resized"),
        "{recs:?}"
    );
    // Resizing a task without a terminal is refused, naming why.
    let err = client.resize_pty("tty", "", 80, 24).await.unwrap_err();
    assert!(
        matches!(
            err,
            ShimError::Remote {
                code: pb::ErrorCode::FailedPrecondition,
                ..
            }
        ),
        "{err}"
    );
    client.delete("tty").await.unwrap();

    // stdin: the container sees no EOF until its stdin is closed.
    let log = env.dir.path().join("logs/in.log");
    let b = env.bundle("in", "cat; echo got-eof");
    let mut req = env.create_req("in", &b, &log);
    req.stdin = true;
    client.create(req).await.unwrap();
    client.start("in").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        client.state("in").await.unwrap().status,
        pb::TaskStatus::Running as i32,
        "a container with stdin must not see EOF: {:?}",
        log_records(&log)
    );
    client.close_io("in").await.unwrap();
    assert_eq!(client.wait("in").await.unwrap().exit_status, 0);
    assert!(log_records(&log).iter().any(|r| r.2 == "got-eof"));
    client.delete("in").await.unwrap();

    // Without stdin the same container reads EOF at once.
    let b = env.bundle("noin", "cat; echo got-eof");
    client
        .create(env.create_req("noin", &b, &env.dir.path().join("logs/noin.log")))
        .await
        .unwrap();
    client.start("noin").await.unwrap();
    assert_eq!(client.wait("noin").await.unwrap().exit_status, 0);
    client.delete("noin").await.unwrap();

    // A running container: exec with a terminal, and a resource update through the runtime.
    let b = env.bundle("run", "exec sleep 1000");
    client
        .create(env.create_req("run", &b, &env.dir.path().join("logs/run.log")))
        .await
        .unwrap();
    client.start("run").await.unwrap();
    client.subscribe().await.unwrap();
    let mut events = client.events();
    let process = serde_json::json!({
        "args": ["/bin/sh", "-c", "tty; stty size"],
        "cwd": "/",
        "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0},
    });
    client
        .exec(pb::ExecRequest {
            id: "run".into(),
            exec_id: "e1".into(),
            process_json: serde_json::to_vec(&process).unwrap(),
            terminal: true,
            capture_limit: 4096,
            ..Default::default()
        })
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    match ev.event {
        Some(pb::event::Event::ExecStarted(e)) => {
            assert_eq!((e.id.as_str(), e.exec_id.as_str()), ("run", "e1"));
            assert!(e.pid > 0);
        }
        other => panic!("expected ExecStarted, got {other:?}"),
    }
    let out = client.wait_exec("run", "e1").await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("/dev/pts/"), "exec tty output: {text:?}");
    assert!(out.stderr.is_empty());
    client.delete_exec("run", "e1").await.unwrap();

    let limit_file = memory_limit_file(&format!("{}/run", cgroup_parent()));
    let resources = serde_json::json!({"memory": {"limit": 64 * 1024 * 1024}});
    client
        .update("run", serde_json::to_vec(&resources).unwrap())
        .await
        .unwrap();
    let limit = std::fs::read_to_string(&limit_file).unwrap();
    assert_eq!(
        limit.trim(),
        (64 * 1024 * 1024).to_string(),
        "{limit_file:?}"
    );
    let err = client.update("run", b"[1]".to_vec()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ShimError::Remote {
                code: pb::ErrorCode::InvalidArgument,
                ..
            }
        ),
        "{err}"
    );
    client.kill("run", 9, false).await.unwrap();
    client.wait("run").await.unwrap();
    let err = client
        .update("run", serde_json::to_vec(&resources).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ShimError::Remote {
                code: pb::ErrorCode::FailedPrecondition,
                ..
            }
        ),
        "{err}"
    );
    client.delete("run").await.unwrap();

    // A container without its own PID namespace: when its init exits, the rest of its
    // processes go too.
    let log = env.dir.path().join("logs/shared.log");
    let b = env.bundle("hostpid", "sleep 1000 & echo bg $!; exit 0");
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|ns| ns["type"] != "pid");
    std::fs::write(b.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    client
        .create(env.create_req("hostpid", &b, &log))
        .await
        .unwrap();
    client.start("hostpid").await.unwrap();
    assert_eq!(client.wait("hostpid").await.unwrap().exit_status, 0);
    let bg: u32 = log_records(&log)
        .iter()
        .find_map(|r| r.2.strip_prefix("bg ").and_then(|p| p.parse().ok()))
        .expect("background pid logged");
    eventually("the background process to be killed", || !pid_alive(bg)).await;
    client.delete("hostpid").await.unwrap();

    assert_eq!(env.runc_list(), "");
    assert!(!env.dir.path().join("shim.sock.c").exists());
    client.shutdown().await.unwrap();
    eventually("shim exit", || !pid_alive(shim_pid)).await;
}

/// The memory limit file of a cgroup path: cgroup v1's memory controller, else v2.
fn memory_limit_file(path: &str) -> PathBuf {
    let rel = path.trim_start_matches('/');
    let v1 = Path::new("/sys/fs/cgroup/memory").join(rel);
    if v1.is_dir() {
        return v1.join("memory.limit_in_bytes");
    }
    Path::new("/sys/fs/cgroup").join(rel).join("memory.max")
}
