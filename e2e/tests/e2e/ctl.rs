//! berthctl over berth's native API, as an operator runs it: events with
//! containerd's filters, pause and resume, check, pull, logs, stats, completions and
//! the man page.

use super::*;

/// `berthctl` with `b`'s config (it finds the API socket there).
fn berthctl_cmd(b: &Berthd) -> Result<Command> {
    let mut c = Command::new(berth_e2e::berthd::built_binary("berthctl")?);
    c.arg("--config").arg(&b.config);
    Ok(c)
}

/// Runs a berthctl command to its end; its stdout, or an error with its stderr.
fn berthctl_ok(b: &Berthd, args: &[&str]) -> Result<String> {
    let out = berthctl_cmd(b)?.args(args).output()?;
    ensure!(
        out.status.success(),
        "berthctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// berthd's open event subscriptions, from `berthctl info`.
pub(super) fn subscribers(b: &Berthd) -> Result<u64> {
    let info: serde_json::Value = serde_json::from_str(&berthctl_ok(b, &["-o", "json", "info"])?)?;
    info["event_subscribers"]
        .as_u64()
        .context("event_subscribers")
}

/// A background `berthctl -o json events FILTERS…` and the lines it printed so far.
struct Follower {
    _child: ChildGuard,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Starts a follower, subscribed before this returns.
fn follow_events(b: &Berthd, filters: &[&str]) -> Result<Follower> {
    let before = subscribers(b)?;
    let mut child = berthctl_cmd(b)?
        .args(["-o", "json", "events"])
        .args(filters)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(|l| l.ok())
        {
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(l);
        }
    });
    let follower = Follower {
        _child: ChildGuard(child),
        lines,
    };
    for _ in 0..200 {
        if subscribers(b)? > before {
            return Ok(follower);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("berthctl events never subscribed")
}

impl Follower {
    /// The events printed once there are `n` (or after 10 s, whatever there is).
    fn events(&self, n: usize) -> Result<Vec<serde_json::Value>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if lines.len() >= n || std::time::Instant::now() > deadline {
                return lines.iter().map(|l| Ok(serde_json::from_str(l)?)).collect();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Lines in a container's CRI log.
fn log_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

pub fn berthctl_events_filters_and_pause() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("ctl-events"));
        let mut b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let everything = follow_events(&b, &[])?;
        let tasks_here = follow_events(&b, &["topic~=/tasks/.+,namespace==k8s.io"])?;
        let elsewhere = follow_events(&b, &["topic~=/tasks/.+,namespace==moby"])?;
        let bad = berthctl_cmd(&b)?.args(["events", "topic=~x"]).output()?;
        let err = String::from_utf8_lossy(&bad.stderr);
        ensure!(
            !bad.status.success() && err.contains("byte 5"),
            "bad filter: {err}"
        );

        let logs = b.dir().join("logs");
        let cfg = container_pod("ctl-events", "ce-1", &logs);
        let pod = run_pod(&mut c, cfg.clone()).await?;
        let ticker = container_config(
            "tick",
            &w.busybox.reference,
            "while true; do echo tick; sleep 0.05; done",
        );
        let ctr = create_and_start(&mut c, &pod, &cfg, ticker).await?;
        let log = logs.join("tick/0.log");
        pause_freezes_and_resume_thaws(&b, &ctr, &log).await?;
        let ps = berthctl_ok(&b, &["ps"])?;
        ensure!(ps.contains(&ctr[..13]) && ps.contains("running"), "{ps}");
        let pods = berthctl_ok(&b, &["pods", "namespace==e2e"])?;
        ensure!(pods.contains(&pod[..13]), "{pods}");
        stop_pod(&mut c, &pod).await?;
        remove_pod(&mut c, &pod).await?;

        let want = [
            "/sandboxes/create",
            "/sandboxes/start",
            "/containers/create",
            "/tasks/create",
            "/tasks/start",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exit",
            "/sandboxes/stop",
            "/tasks/delete",
            "/containers/delete",
            "/sandboxes/delete",
        ];
        let all: Vec<String> = everything
            .events(want.len())?
            .iter()
            .map(|e| e["topic"].as_str().unwrap_or("").to_string())
            .collect();
        ensure!(
            all == want,
            "berthctl events printed {all:?}, want {want:?}"
        );
        let want_tasks: Vec<&str> = want
            .iter()
            .copied()
            .filter(|t| t.starts_with("/tasks/"))
            .collect();
        let tasks: Vec<serde_json::Value> = tasks_here.events(want_tasks.len())?;
        let task_topics: Vec<&str> = tasks.iter().filter_map(|e| e["topic"].as_str()).collect();
        ensure!(task_topics == want_tasks, "filtered: {task_topics:?}");
        let exit = tasks
            .iter()
            .find(|e| e["topic"] == "/tasks/exit")
            .context("exit")?;
        ensure!(
            exit["event"]["container_id"] == ctr.as_str()
                && exit["event"]["exit_status"] == 137
                && exit["event"]["pid"].as_u64().is_some_and(|p| p > 0)
                && exit["namespace"] == "k8s.io",
            "{exit}"
        );
        // The other followers have printed everything; give this one as long.
        std::thread::sleep(Duration::from_millis(300));
        ensure!(
            elsewhere.events(0)?.is_empty(),
            "namespace==moby matched something"
        );
        assert_no_pod_leftovers(&b, "ctl-events")?;
        // berthd stops promptly on SIGTERM with event streams open.
        let _open = follow_events(&b, &[])?;
        let _cri_stream = super::events::subscribe(&mut c).await?;
        let started = std::time::Instant::now();
        let st = b.terminate()?;
        ensure!(
            st.success() && started.elapsed() < Duration::from_secs(10),
            "SIGTERM with open streams: {st} after {:?}",
            started.elapsed()
        );
        Ok(())
    })
}

/// `berthctl tasks pause` stops a ticking container's log; `resume` starts it again;
/// `ps` and `tasks list` show it paused meanwhile.
async fn pause_freezes_and_resume_thaws(b: &Berthd, ctr: &str, log: &Path) -> Result<()> {
    for _ in 0..100 {
        if log_lines(log) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(log_lines(log) >= 3, "the ticker never ticked");
    berthctl_ok(b, &["tasks", "pause", ctr])?;
    let state: serde_json::Value =
        serde_json::from_str(&berthctl_ok(b, &["-o", "json", "inspect", ctr])?)?;
    ensure!(state["state"] == "paused", "{state}");
    let listed = berthctl_ok(b, &["tasks", "list", "status==paused"])?;
    ensure!(listed.contains(&ctr[..13]), "{listed}");
    // What was in flight through the shim before the freeze lands first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let frozen = log_lines(log);
    tokio::time::sleep(Duration::from_millis(600)).await;
    ensure!(log_lines(log) == frozen, "the log grew while paused");
    berthctl_ok(b, &["tasks", "resume", ctr])?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    ensure!(
        log_lines(log) > frozen + 2,
        "the log did not grow after resume"
    );
    let pids = berthctl_ok(b, &["tasks", "pids", ctr])?;
    ensure!(pids.lines().count() >= 1, "{pids}");
    Ok(())
}

/// berthctl's output and exit code, without failing on a non-zero one.
fn berthctl_run(b: &Berthd, args: &[&str]) -> Result<(i32, String)> {
    let out = berthctl_cmd(b)?.args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok((out.status.code().unwrap_or(-1), text))
}

pub fn berthctl_check_pull_logs_and_stats() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("ctl-ops"));
        let b = Berthd::start("")?;
        // check: every line passes on this node.
        let (code, text) = berthctl_run(&b, &["check"])?;
        ensure!(
            code == 0 && !text.contains("FAIL"),
            "berthctl check:\n{text}"
        );
        for part in [
            "api socket",
            "runtime runc",
            "shim",
            "cgroup memory",
            "cgroup freezer",
            "cni",
            "cri socket",
            "free space root",
        ] {
            ensure!(
                text.lines()
                    .any(|l| l.starts_with("PASS") && l.contains(part)),
                "no PASS line for {part}:\n{text}"
            );
        }
        // pull: a line per layer, then the id; the image is listed.
        let pulled = berthctl_ok(&b, &["pull", &w.busybox.reference])?;
        let layers = pulled
            .lines()
            .filter(|l| l.starts_with("layer sha256:") && l.ends_with("pulled"))
            .count();
        ensure!(layers >= 1, "{pulled}");
        ensure!(
            pulled.contains(&format!("{}: sha256:", w.busybox.reference)),
            "{pulled}"
        );
        let again = berthctl_ok(&b, &["pull", &w.busybox.reference])?;
        ensure!(
            again
                .lines()
                .filter(|l| l.ends_with("already present"))
                .count()
                == layers,
            "{again}"
        );
        let images = berthctl_ok(&b, &["images"])?;
        ensure!(images.contains(&w.busybox.reference), "{images}");
        logs_and_stats(&b).await?;
        // Completions and the man page come from the same definitions.
        let bash = berthctl_ok(&b, &["completion", "bash"])?;
        ensure!(
            bash.contains("complete") && bash.contains("berthctl"),
            "{bash}"
        );
        let man = berthctl_ok(&b, &["man"])?;
        ensure!(
            man.contains(".TH berthctl") && man.contains("events"),
            "man page"
        );
        check_fails_without_cni_plugins()
    })
}

/// logs (all, --tail, -f until exit) and a stats snapshot of a running container.
async fn logs_and_stats(b: &Berthd) -> Result<()> {
    let w = world();
    let mut c = b.client().await?;
    let logs = b.dir().join("logs");
    let cfg = container_pod("ctl-ops", "co-1", &logs);
    let pod = run_pod(&mut c, cfg.clone()).await?;
    let script = "for i in 1 2 3 4 5; do echo line $i; done; sleep 1; echo last";
    let counter = create_and_start(
        &mut c,
        &pod,
        &cfg,
        container_config("count", &w.busybox.reference, script),
    )
    .await?;
    let followed = berthctl_ok(b, &["logs", "-f", &counter])?;
    let want = "line 1\nline 2\nline 3\nline 4\nline 5\nlast\n";
    ensure!(followed == want, "logs -f printed {followed:?}");
    ensure!(
        berthctl_ok(b, &["logs", "--tail", "2", &counter])? == "line 5\nlast\n",
        "--tail 2"
    );
    let stamped = berthctl_ok(b, &["logs", "-t", &counter])?;
    ensure!(
        stamped
            .lines()
            .all(|l| l.starts_with("20") && l.contains("Z ")),
        "{stamped}"
    );
    let sleeper = create_and_start(
        &mut c,
        &pod,
        &cfg,
        container_config("sleeper", &w.busybox.reference, "exec sleep 3600"),
    )
    .await?;
    let stats = berthctl_ok(b, &["stats", "--no-stream"])?;
    let row = stats
        .lines()
        .find(|l| l.starts_with(&sleeper[..13]))
        .with_context(|| format!("no row for the sleeper:\n{stats}"))?;
    ensure!(
        row.contains("sleeper") && row.contains("MiB") && row.contains('%'),
        "{row}"
    );
    ensure!(
        !stats.contains(&counter[..13]),
        "an exited container in stats:\n{stats}"
    );
    remove_pod(&mut c, &pod).await?;
    assert_no_pod_leftovers(b, "ctl-ops")
}

/// A berthd whose CNI plugin directory is empty: check fails, on the cni line.
fn check_fails_without_cni_plugins() -> Result<()> {
    let mut b = Berthd::prepare("", None)?;
    let empty = b.dir().join("no-plugins");
    std::fs::create_dir_all(&empty)?;
    let mut config = std::fs::read_to_string(&b.config)?;
    // The [cni] table is the config's last.
    config.push_str(&format!("bin_dirs = [{:?}]\n", empty));
    std::fs::write(&b.config, config)?;
    b.spawn()?;
    let (code, text) = berthctl_run(&b, &["check"])?;
    ensure!(code == 1, "check passed without plugins:\n{text}");
    let cni = text
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains("cni"))
        .with_context(|| text.clone())?;
    ensure!(
        cni.contains("not found in") && cni.contains("no-plugins"),
        "{cni}"
    );
    ensure!(
        text.lines()
            .any(|l| l.starts_with("PASS") && l.contains("runtime runc")),
        "{text}"
    );
    Ok(())
}
