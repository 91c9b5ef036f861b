//! berthd as `berth.service` (the shipped unit) under a real systemd booted in its
//! own namespaces (`berth_e2e::systemd`): readiness, the journal, the watchdog, and
//! pods that live through `systemctl restart` and `stop` + `start`.

use berth_e2e::systemd::SystemdNode;

use super::*;

/// Where the systemd tests keep their berthd: on disk, since the namespace has its
/// own `/tmp` and `/run`.
const BASE: &str = "/var/lib/berth-e2e";

/// The shipped unit, running this build's berthd with `b`'s config. berthd and the
/// shim are copied beside the config: the build may live under `/tmp`, which the
/// namespace hides.
fn unit_for(b: &Berthd) -> Result<String> {
    let unit = include_str!("../../../deploy/berth.service");
    let bin = b.dir().join("bin");
    std::fs::create_dir_all(&bin)?;
    for (name, from) in [
        ("berthd", berth_e2e::berthd::berthd_binary()?),
        ("berth-shim", berth_e2e::berthd::built_binary("berth-shim")?),
    ] {
        std::fs::copy(&from, bin.join(name))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    let exec = format!(
        "ExecStart={} --config {}",
        bin.join("berthd").display(),
        b.config.display()
    );
    let ours = unit.replace("ExecStart=/usr/local/bin/berthd", &exec);
    ensure!(
        ours != unit,
        "deploy/berth.service has no ExecStart=/usr/local/bin/berthd"
    );
    // A short watchdog, so that the test sees berthd's pings (not only the reset
    // systemd does at READY).
    let fast = ours.replace("WatchdogSec=60", "WatchdogSec=2");
    ensure!(fast != ours, "deploy/berth.service has no WatchdogSec=60");
    Ok(fast)
}

/// Each container's (pid, started_at), by id.
async fn running_containers(c: &mut CriClient, ids: &[String]) -> Result<Vec<(u64, i64)>> {
    let mut out = Vec::new();
    for id in ids {
        let (st, info) = ctr_status(c, id).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "container {id} is {:?}",
            st.state
        );
        out.push((info["pid"].as_u64().unwrap_or_default(), st.started_at));
    }
    Ok(out)
}

/// The journal's entries for berth.service, as JSON objects.
fn journal(node: &SystemdNode) -> Result<Vec<serde_json::Value>> {
    let out = node.run(&[
        "journalctl",
        "-u",
        "berth.service",
        "-o",
        "json",
        "--no-pager",
    ])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

pub fn berth_runs_as_a_systemd_service() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        std::fs::create_dir_all(BASE)?;
        let b = Berthd::prepare("", Some(Path::new(BASE)))?;
        let node = SystemdNode::boot(b.dir(), &[("berth.service", unit_for(&b)?)])?;
        // Type=notify: start returns once berthd said READY=1, which it says only
        // with its socket listening.
        if let Err(e) = node.systemctl(&["start", "berth.service"]) {
            let log = node.run(&[
                "journalctl",
                "-u",
                "berth.service",
                "-n",
                "40",
                "--no-pager",
            ])?;
            bail!("{e}\n{}", String::from_utf8_lossy(&log.stdout));
        }
        ensure!(node.property("berth.service", "ActiveState")? == "active");
        ensure!(node.property("berth.service", "StatusText")? == "serving CRI v1");
        let mut c = b.client().await.context("connecting right after READY")?;
        let first_pid = node.property("berth.service", "MainPID")?;
        // The watchdog is pinged (every second with WatchdogSec=2), and berthd lives.
        let ping = |n: &SystemdNode| -> Result<u64> {
            Ok(n.property("berth.service", "WatchdogTimestampMonotonic")?
                .parse()?)
        };
        let first_ping = ping(&node)?;
        std::thread::sleep(Duration::from_millis(3500));
        ensure!(ping(&node)? > first_ping, "no watchdog ping after READY");
        ensure!(
            node.property("berth.service", "MainPID")? == first_pid,
            "the watchdog killed berthd"
        );
        // The log is in the journal, with levels and berth's fields.
        let entries = journal(&node)?;
        let serving = entries
            .iter()
            .find(|e| {
                e["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.contains("berthd serving CRI v1"))
            })
            .with_context(|| format!("no serving line in the journal: {entries:?}"))?;
        ensure!(
            serving["PRIORITY"] == "6" && serving["SYSLOG_IDENTIFIER"] == "berthd",
            "{serving}"
        );

        // Five pods with a container each.
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let (mut pods, mut ctrs) = (Vec::new(), Vec::new());
        for i in 0..5 {
            let cfg = container_pod("systemd", &format!("sd-{i}"), &logs);
            let pod = run_pod(&mut c, cfg.clone()).await?;
            let sleeper = container_config("app", &w.busybox.reference, "exec sleep 3600");
            let ctr = create_and_start(&mut c, &pod, &cfg, sleeper).await?;
            pods.push(pod);
            ctrs.push(ctr);
        }
        let before = running_containers(&mut c, &ctrs).await?;
        let journal_pod = journal(&node)?
            .into_iter()
            .any(|e| e["SANDBOX"].as_str() == Some(pods[0].as_str()));
        ensure!(journal_pod, "no journal entry carries SANDBOX={}", pods[0]);

        // restart, then stop + start: the pods and their processes live on.
        for how in [&["restart"][..], &["stop"], &["start"]] {
            let mut args = how.to_vec();
            args.push("berth.service");
            node.systemctl(&args)?;
            if how == ["stop"] {
                ensure!(node.property("berth.service", "ActiveState")? == "inactive");
                // (pids as the namespace sees them)
                for (pid, _) in &before {
                    let alive = node.run(&["kill", "-0", &pid.to_string()])?;
                    ensure!(
                        alive.status.success(),
                        "container process {pid} died with berthd"
                    );
                }
                continue;
            }
            ensure!(node.property("berth.service", "StatusText")? == "serving CRI v1");
            ensure!(node.property("berth.service", "MainPID")? != first_pid);
            let mut c = b.client().await?;
            ensure!(
                running_containers(&mut c, &ctrs).await? == before,
                "containers changed across {how:?}"
            );
            for pod in &pods {
                let (st, _) = pod_status(&mut c, pod).await?;
                ensure!(
                    st.state == cri::PodSandboxState::SandboxReady as i32,
                    "pod {pod} after {how:?}"
                );
            }
        }
        let mut c = b.client().await?;
        for pod in &pods {
            remove_pod(&mut c, pod).await?;
        }
        assert_no_pod_leftovers(&b, "systemd")?;
        node.systemctl(&["stop", "berth.service"])?;
        drop(node);
        drop(b);
        let _ = std::fs::remove_dir(BASE); // if no other test uses it
        Ok(())
    })
}
