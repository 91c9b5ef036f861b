//! The real berth-shim driving a stand-in runtime (`fixtures/fake-runtime`, runc's
//! command line over plain forked processes), so that the shim's own logic is tested
//! without root: the task table, exec nesting, exit records and the CRI log, errors
//! and their codes, stdin and CloseIO, events, Wait and kill_and_reap.

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_proto::shim as pb;
use berth_runtime::client::{ShimClient, ShimError, spawn_shim};
use berth_runtime::shim::ShimConfig;

struct Env {
    dir: tempfile::TempDir,
    cfg: ShimConfig,
    client: Option<ShimClient>,
}

impl Env {
    async fn start() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("berth-shim-fake-")
            .tempdir()
            .unwrap();
        let cfg = ShimConfig {
            socket: dir.path().join("shim.sock"),
            state_dir: dir.path().join("state"),
            runtime: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake-runtime"),
            runtime_root: dir.path().join("root"),
            runtime_args: vec![],
            runtime_timeout: berth_runtime::runc::DEFAULT_TIMEOUT,
        };
        spawn_shim(Path::new(env!("CARGO_BIN_EXE_berth-shim")), &cfg).unwrap();
        let client = ShimClient::connect(&cfg.socket).await.unwrap();
        Env {
            dir,
            cfg,
            client: Some(client),
        }
    }

    fn client(&self) -> &ShimClient {
        self.client.as_ref().unwrap()
    }

    /// A bundle whose process is `sh -c script`.
    fn bundle(&self, name: &str, script: &str) -> PathBuf {
        let b = self.dir.path().join(name);
        std::fs::create_dir_all(&b).unwrap();
        let spec = serde_json::json!({"process": {"args": ["/bin/sh", "-c", script]}});
        std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
        b
    }

    async fn create(&self, id: &str, script: &str, stdin: bool) -> u32 {
        let bundle = self.bundle(id, script);
        let req = pb::CreateRequest {
            id: id.into(),
            bundle: bundle.display().to_string(),
            stdin,
            log_path: self.log(id).display().to_string(),
            ..Default::default()
        };
        self.client().create(req).await.unwrap()
    }

    fn log(&self, id: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{id}.log"))
    }

    async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        script: &str,
        capture: u32,
    ) -> Result<u32, ShimError> {
        let process = serde_json::json!({"args": ["/bin/sh", "-c", script], "cwd": "/"});
        self.client()
            .exec(pb::ExecRequest {
                id: id.into(),
                exec_id: exec_id.into(),
                process_json: process.to_string().into_bytes(),
                capture_limit: capture,
                ..Default::default()
            })
            .await
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Every process the shim or the fake runtime left names no file, so kill the
        // shim by its socket's owner and the fake's processes by their recorded pids.
        for pidfile in walk(&self.cfg.runtime_root)
            .into_iter()
            .filter(|p| p.ends_with("pid"))
        {
            if let Ok(pid) = std::fs::read_to_string(&pidfile).map(|s| s.trim().parse::<i32>()) {
                if let Ok(pid) = pid {
                    // The fake's processes are a session each: the whole group.
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
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
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn code(r: Result<impl std::fmt::Debug, ShimError>) -> pb::ErrorCode {
    match r {
        Err(e) => e.code().unwrap_or_else(|| panic!("not a shim error: {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

fn log_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.splitn(2, ' ').nth(1).unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_runs_exits_and_is_recorded() {
    let env = Env::start().await;
    let c = env.client();
    let pid = env
        .create("c1", "echo out; echo err >&2; exit 3", false)
        .await;
    assert!(pid > 0);
    assert_eq!(
        c.state("c1").await.unwrap().status,
        pb::TaskStatus::Created as i32
    );
    c.start("c1").await.unwrap();
    let exit = c.wait("c1").await.unwrap();
    assert_eq!(exit.exit_status, 3);
    assert_eq!(
        c.state("c1").await.unwrap().status,
        pb::TaskStatus::Stopped as i32
    );
    // The output is in the CRI log before the exit is reported.
    let lines = log_lines(&env.log("c1"));
    assert!(lines.contains(&"stdout F out".to_string()), "{lines:?}");
    assert!(lines.contains(&"stderr F err".to_string()), "{lines:?}");
    // The exit is on disk (it survives the shim's client).
    assert!(env.cfg.state_dir.join("exits/c1.json").is_file());
    let deleted = c.delete("c1").await.unwrap();
    assert_eq!(deleted.exit_status, 3);
    assert!(!env.cfg.state_dir.join("exits/c1.json").exists());
    assert_eq!(code(c.state("c1").await), pb::ErrorCode::NotFound);
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execs_are_nested_under_their_container() {
    let env = Env::start().await;
    let c = env.client();
    c.subscribe().await.unwrap();
    let mut events = c.events();
    env.create("c1", "exec sleep 100", false).await;
    c.start("c1").await.unwrap();
    // ExecSync's capture, and its cap.
    env.exec("c1", "e1", "echo hi; echo there >&2; exit 2", 1024)
        .await
        .unwrap();
    let st = c.wait_exec("c1", "e1").await.unwrap();
    assert_eq!(
        (st.exit_status, &st.stdout[..], &st.stderr[..]),
        (2, &b"hi\n"[..], &b"there\n"[..])
    );
    assert!(!st.truncated);
    env.exec("c1", "e2", "echo 0123456789", 4).await.unwrap();
    let st = c.wait_exec("c1", "e2").await.unwrap();
    assert!(st.truncated && st.stdout == b"0123", "{st:?}");
    // The exec's exit event names it; the container's exit does not.
    let mut exits = Vec::new();
    while exits.len() < 2 {
        if let Ok(Ok(pb::Event {
            event: Some(pb::event::Event::Exit(e)),
        })) = tokio::time::timeout(Duration::from_secs(5), events.recv()).await
        {
            exits.push(e.exec_id);
        }
    }
    assert_eq!(exits, ["e1", "e2"]);
    // A reconnecting client sees the container, not its execs; execs share nothing on disk.
    let tasks = c.connect_info().await.unwrap().tasks;
    assert_eq!(
        tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ["c1"]
    );
    assert_eq!(
        code(env.exec("c1", "e1", "true", 0).await),
        pb::ErrorCode::AlreadyExists
    );
    c.delete_exec("c1", "e1").await.unwrap();
    env.exec("c1", "e1", "true", 0).await.unwrap();
    // Killing the container ends it with SIGKILL's status, reaped and deleted in one call.
    let exit = c.kill_and_reap("c1", Duration::from_secs(5)).await.unwrap();
    assert_eq!(exit.map(|e| e.exit_status), Some(137));
    assert_eq!(code(c.state("c1").await), pb::ErrorCode::NotFound);
    assert_eq!(
        c.kill_and_reap("c1", Duration::from_secs(1)).await.unwrap(),
        None
    );
    let exec_of_nothing = env.exec("c1", "e3", "true", 0).await;
    assert_eq!(code(exec_of_nothing), pb::ErrorCode::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_their_codes() {
    let env = Env::start().await;
    let c = env.client();
    env.create("c1", "exec sleep 100", false).await;
    let bad_id = pb::CreateRequest {
        id: "../x".into(),
        bundle: env.bundle("b", "true").display().to_string(),
        ..Default::default()
    };
    assert_eq!(code(c.create(bad_id).await), pb::ErrorCode::InvalidArgument);
    let again = pb::CreateRequest {
        id: "c1".into(),
        bundle: env.bundle("b", "true").display().to_string(),
        ..Default::default()
    };
    assert_eq!(code(c.create(again).await), pb::ErrorCode::AlreadyExists);
    // An exec into a container that was never started.
    assert_eq!(
        code(env.exec("c1", "e1", "true", 0).await),
        pb::ErrorCode::FailedPrecondition
    );
    c.start("c1").await.unwrap();
    assert_eq!(code(c.start("c1").await), pb::ErrorCode::FailedPrecondition);
    assert_eq!(
        code(c.delete("c1").await),
        pb::ErrorCode::FailedPrecondition
    );
    assert_eq!(
        code(c.kill("nope", 9, false).await),
        pb::ErrorCode::NotFound
    );
    assert_eq!(
        code(c.kill("c1", 0, false).await),
        pb::ErrorCode::InvalidArgument
    );
    assert_eq!(code(c.shutdown().await), pb::ErrorCode::FailedPrecondition);
    // The runtime's own error comes back as its message.
    let empty = env.bundle("empty", "true");
    std::fs::write(empty.join("config.json"), r#"{"process": {"args": []}}"#).unwrap();
    let req = pb::CreateRequest {
        id: "c2".into(),
        bundle: empty.display().to_string(),
        ..Default::default()
    };
    match c.create(req).await {
        Err(ShimError::Remote { code, message }) => {
            assert_eq!(code, pb::ErrorCode::Internal);
            assert!(
                message.contains("process.args must not be empty"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    c.kill_and_reap("c1", Duration::from_secs(5)).await.unwrap();
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_stays_open_until_close_io() {
    let env = Env::start().await;
    let c = env.client();
    env.create("c1", "cat; echo done", true).await;
    c.start("c1").await.unwrap();
    // cat waits for input: no exit yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.wait("c1"))
            .await
            .is_err()
    );
    c.close_io("c1").await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(5), c.wait("c1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.exit_status, 0);
    assert!(log_lines(&env.log("c1")).contains(&"stdout F done".to_string()));
    // Resources go to the runtime as given.
    env.create("c2", "exec sleep 100", false).await;
    c.start("c2").await.unwrap();
    c.update("c2", br#"{"memory": {"limit": 1048576}}"#.to_vec())
        .await
        .unwrap();
    let applied = std::fs::read_to_string(env.cfg.runtime_root.join("c2/resources.json")).unwrap();
    assert!(applied.contains("1048576"), "{applied}");
    let not_json = c.update("c2", b"[1]".to_vec()).await;
    assert_eq!(code(not_json), pb::ErrorCode::InvalidArgument);
    c.kill_and_reap("c2", Duration::from_secs(5)).await.unwrap();
    c.delete("c1").await.unwrap();
    c.shutdown().await.unwrap();
}

/// A container sharing the pod's PID namespace whose init exits while a child keeps
/// writing to its stdout: the shim kills the rest first, then drains what is left,
/// so the exit is reported (and the writer is gone) instead of the shim draining a
/// pipe that never empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_outlives_init_is_killed_before_the_drain() {
    let env = Env::start().await;
    let c = env.client();
    let pid = env.create("c1", "yes & sleep 0.3; exit 4", false).await;
    c.start("c1").await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), c.wait("c1"))
        .await
        .expect("the exit of an init whose child still writes is reported")
        .unwrap();
    assert_eq!(exit.exit_status, 4);
    let group = nix::unistd::Pid::from_raw(pid as i32);
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        nix::sys::signal::killpg(group, None).is_err()
    });
    assert!(gone, "the writer survived its container's init");
    // The shim still answers and the output before the exit reached the log.
    assert!(log_lines(&env.log("c1")).iter().any(|l| l == "stdout F y"));
    c.delete("c1").await.unwrap();
    c.shutdown().await.unwrap();
}
