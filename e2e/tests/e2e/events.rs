//! Events as kubelet's evented PLEG reads them: CRI `GetContainerEvents` over the
//! socket, with the pod's and containers' statuses in each event.

use super::*;

type EventStream = tonic::Streaming<cri::ContainerEventResponse>;

/// A `GetContainerEvents` stream, subscribed before it returns.
async fn subscribe(c: &mut CriClient) -> Result<EventStream> {
    Ok(c.runtime
        .get_container_events(cri::GetEventsRequest {})
        .await?
        .into_inner())
}

/// The next `n` events as (id, type), each checked against its statuses.
async fn next_events(
    s: &mut EventStream,
    n: usize,
) -> Result<Vec<(String, i32, cri::ContainerEventResponse)>> {
    let mut out = Vec::new();
    while out.len() < n {
        let ev = tokio::time::timeout(Duration::from_secs(20), s.message())
            .await
            .with_context(|| {
                format!(
                    "no event after {out:?}",
                    out = out
                        .iter()
                        .map(|e: &(String, i32, _)| (e.0.clone(), e.1))
                        .collect::<Vec<_>>()
                )
            })??
            .context("the stream ended")?;
        ensure!(ev.created_at > 0, "{ev:?}");
        out.push((ev.container_id.clone(), ev.container_event_type, ev));
    }
    Ok(out)
}

pub fn container_events_follow_a_pod_lifecycle() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("events"));
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        // Two streams at once; both see everything, in order.
        let mut first = subscribe(&mut c).await?;
        let mut second = subscribe(&mut c).await?;
        let logs = b.dir().join("logs");
        let cfg = container_pod("events", "ev-1", &logs);
        let pod = run_pod(&mut c, cfg.clone()).await?;
        let sleeper = container_config("app", &w.busybox.reference, "exec sleep 3600");
        let ctr = create_and_start(&mut c, &pod, &cfg, sleeper).await?;
        c.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: ctr.clone(),
                timeout: 0,
            })
            .await?;
        c.runtime
            .remove_container(cri::RemoveContainerRequest {
                container_id: ctr.clone(),
            })
            .await?;
        stop_pod(&mut c, &pod).await?;
        remove_pod(&mut c, &pod).await?;
        use cri::ContainerEventType as T;
        let want = [
            (&pod, T::ContainerCreatedEvent),
            (&pod, T::ContainerStartedEvent),
            (&ctr, T::ContainerCreatedEvent),
            (&ctr, T::ContainerStartedEvent),
            (&ctr, T::ContainerStoppedEvent),
            (&ctr, T::ContainerDeletedEvent),
            (&pod, T::ContainerStoppedEvent),
            (&pod, T::ContainerDeletedEvent),
        ];
        for s in [&mut first, &mut second] {
            let got = next_events(s, want.len()).await?;
            let seen: Vec<(String, i32)> = got.iter().map(|e| (e.0.clone(), e.1)).collect();
            let expected: Vec<(String, i32)> = want
                .iter()
                .map(|(id, t)| (id.to_string(), *t as i32))
                .collect();
            ensure!(seen == expected, "events {seen:?}, want {expected:?}");
            check_statuses(&got, &pod, &ctr)?;
        }
        assert_no_pod_leftovers(&b, "events")?;
        Ok(())
    })
}

/// What each event carries: the pod ready until it stops, the container running
/// after its start and exited after its stop, nothing of either once deleted.
fn check_statuses(
    got: &[(String, i32, cri::ContainerEventResponse)],
    pod: &str,
    ctr: &str,
) -> Result<()> {
    let ready = cri::PodSandboxState::SandboxReady as i32;
    let state_of = |ev: &cri::ContainerEventResponse| {
        ev.containers_statuses
            .iter()
            .find(|s| s.id == ctr)
            .map(|s| s.state)
    };
    let pod_state = |ev: &cri::ContainerEventResponse| {
        ev.pod_sandbox_status
            .as_ref()
            .map(|p| (p.id.clone(), p.state))
    };
    let (_, _, started) = &got[3];
    ensure!(
        pod_state(started) == Some((pod.to_string(), ready)),
        "{started:?}"
    );
    ensure!(
        state_of(started) == Some(cri::ContainerState::ContainerRunning as i32),
        "{started:?}"
    );
    let (_, _, stopped) = &got[4];
    ensure!(
        state_of(stopped) == Some(cri::ContainerState::ContainerExited as i32),
        "{stopped:?}"
    );
    let (_, _, deleted) = &got[5];
    ensure!(
        state_of(deleted).is_none(),
        "deleted container still listed: {deleted:?}"
    );
    let (_, _, pod_stopped) = &got[6];
    let not_ready = cri::PodSandboxState::SandboxNotready as i32;
    ensure!(
        pod_state(pod_stopped).map(|p| p.1) == Some(not_ready),
        "{pod_stopped:?}"
    );
    let (_, _, pod_deleted) = &got[7];
    ensure!(pod_deleted.pod_sandbox_status.is_none(), "{pod_deleted:?}");
    Ok(())
}

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
        let b = Berthd::start("")?;
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
        ensure!(
            elsewhere.events(0)?.is_empty(),
            "namespace==moby matched something"
        );
        assert_no_pod_leftovers(&b, "ctl-events")?;
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
