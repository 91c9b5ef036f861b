//! berthd as `berth.service` (the shipped unit) under a real systemd booted in its
//! own namespaces (`berth_e2e::systemd`), with the systemd cgroup driver: readiness,
//! the journal, the watchdog, pods and containers in scopes under slices (limits,
//! stats, updates, an OOM kill, nothing left after removal), the startup sweep of
//! stray scopes and slices, and pods that live through `systemctl restart` and
//! `stop` + `start`.

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

/// The cgroup dir of `cg` (a unit's `ControlGroup`) in each of the host's hierarchies
/// that has it: the namespace's `/sys/fs/cgroup` binds the host's.
fn host_cgroup_dirs(cg: &str) -> Result<Vec<PathBuf>> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2"))
                .then(|| Path::new(f[1]).join(cg.trim_start_matches('/')))
        })
        .filter(|d| d.is_dir())
        .collect())
}

/// The memory limit the kernel enforces on `cg` (v1 `memory.limit_in_bytes` or v2
/// `memory.max`).
fn memory_limit(cg: &str) -> Result<u64> {
    for d in host_cgroup_dirs(cg)? {
        for f in ["memory.limit_in_bytes", "memory.max"] {
            if let Ok(v) = std::fs::read_to_string(d.join(f)) {
                return Ok(v.trim().parse()?);
            }
        }
    }
    bail!("no memory controller file for {cg}")
}

/// Whether systemd runs `unit` now.
fn active(node: &SystemdNode, unit: &str) -> Result<bool> {
    Ok(node.property(unit, "ActiveState")? == "active")
}

/// A pod in `slice`.
fn pod_in_slice(uid: &str, slice: &str, logs: &Path) -> cri::PodSandboxConfig {
    let mut cfg = container_pod("systemd", uid, logs);
    if let Some(l) = cfg.linux.as_mut() {
        l.cgroup_parent = slice.to_string();
    }
    cfg
}

/// berthd's start under systemd: READY only once it serves, the watchdog pinged, the
/// log in the journal with levels and berth's fields, the driver reported.
async fn start_service(node: &SystemdNode, b: &Berthd) -> Result<String> {
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
    let first_ping = ping(node)?;
    std::thread::sleep(Duration::from_millis(3500));
    ensure!(ping(node)? > first_ping, "no watchdog ping after READY");
    ensure!(
        node.property("berth.service", "MainPID")? == first_pid,
        "the watchdog killed berthd"
    );
    let entries = journal(node)?;
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
    let rc = c
        .runtime
        .runtime_config(cri::RuntimeConfigRequest {})
        .await?
        .into_inner();
    ensure!(rc.linux.context("linux")?.cgroup_driver == cri::CgroupDriver::Systemd as i32);
    Ok(first_pid)
}

/// berthd's last `n` journal entries as lines: the message, then berth's fields.
fn journal_tail(node: &SystemdNode, n: usize) -> Result<String> {
    let entries = journal(node)?;
    let mut out = String::new();
    for e in entries.iter().rev().take(n).rev() {
        let Some(fields) = e.as_object() else {
            continue;
        };
        out.push_str(fields.get("MESSAGE").and_then(|m| m.as_str()).unwrap_or(""));
        for (k, v) in fields {
            let ours = !k.starts_with('_') && !k.starts_with("SYSLOG") && k != "MESSAGE";
            if ours && k.chars().all(|c| c.is_ascii_uppercase() || c == '_') && k != "PRIORITY" {
                out.push_str(&format!(" {}={}", k.to_lowercase(), v));
            }
        }
        out.push('\n');
    }
    Ok(out)
}

pub fn berth_runs_as_a_systemd_service() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        std::fs::create_dir_all(BASE)?;
        let b = Berthd::prepare("cgroup_driver = \"systemd\"", Some(Path::new(BASE)))?;
        let node = SystemdNode::boot(b.dir(), &[("berth.service", unit_for(&b)?)])?;
        let steps = async {
            let first_pid = start_service(&node, &b).await?;
            let mut c = b.client().await?;
            pull(&mut c, &w.busybox.reference).await?;
            systemd_driver_places_pods(&node, &b, &mut c).await?;
            pods_live_through_restarts(&node, &b, &first_pid).await
        };
        // A failure (or a hang) shows what berthd logged.
        let outcome = tokio::time::timeout(Duration::from_secs(300), steps)
            .await
            .unwrap_or_else(|_| Err(anyhow!("no end within 300 s")));
        if let Err(e) = outcome {
            let mut seen = journal_tail(&node, 150)?;
            for cmd in [
                &["systemctl", "list-jobs", "--no-pager"][..],
                &[
                    "systemctl",
                    "list-units",
                    "--all",
                    "--no-pager",
                    "berth*",
                    "berthe2e*",
                ],
                &["ps", "-eo", "pid,ppid,stat,args"],
            ] {
                let out = node.run(cmd)?;
                seen.push_str(&format!(
                    "$ {}\n{}",
                    cmd.join(" "),
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
            bail!("{e:#}\n{seen}");
        }
        assert_no_pod_leftovers(&b, "systemd")?;
        node.systemctl(&["stop", "berth.service"])?;
        drop(node);
        drop(b);
        let _ = std::fs::remove_dir(BASE); // if no other test uses it
        Ok(())
    })
}

/// The systemd driver: the infra process in `berth-<pod>.scope` under a kubelet-style
/// slice that did not exist, a container in its own scope with its memory limit,
/// stats, an update and an OOM kill through those cgroups, then after removal no
/// scope, no slice berth started and no cgroup.
async fn systemd_driver_places_pods(
    node: &SystemdNode,
    b: &Berthd,
    c: &mut CriClient,
) -> Result<()> {
    let w = world();
    let slice = "berthe2e-besteffort-poddrv.slice";
    let chain = ["berthe2e.slice", "berthe2e-besteffort.slice", slice];
    for s in chain {
        ensure!(!active(node, s)?, "{s} is active before the test");
    }
    let logs = b.dir().join("logs");
    // Under this driver a cgroupfs path is not a parent.
    let mut bad = pod_in_slice("bad", "/kubepods/pod1", &logs);
    bad.metadata.as_mut().context("metadata")?.name = "bad".into();
    let r = run_pod(c, bad).await;
    expect_code(r, Code::InvalidArgument, "config.linux.cgroup_parent")?;

    let cfg = pod_in_slice("drv", slice, &logs);
    let pod = run_pod(c, cfg.clone()).await?;
    let scope = format!("berth-{pod}.scope");
    ensure!(active(node, &scope)? && node.property(&scope, "Slice")? == slice);
    let cg = node.property(&scope, "ControlGroup")?;
    ensure!(
        cg == format!("/berthe2e.slice/berthe2e-besteffort.slice/{slice}/{scope}"),
        "{cg}"
    );
    let procs: Vec<String> = host_cgroup_dirs(&cg)?
        .iter()
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .collect();
    ensure!(
        procs.iter().any(|p| p.trim().lines().count() == 1),
        "the infra process is not alone in its scope: {procs:?}"
    );

    let trigger = b.dir().join("trigger");
    std::fs::create_dir_all(&trigger)?;
    let img = &w.busybox.reference;
    let limited = |name: &str, mib: u32, hold: bool| {
        with_memory_limit(
            with_trigger(
                container_config(name, img, &alloc_script(name, mib, hold)),
                &trigger,
            ),
            32 << 20,
        )
    };
    let grow = create_and_start(c, &pod, &cfg, limited("grow", 48, true)).await?;
    let grow_scope = format!("berth-{grow}.scope");
    ensure!(active(node, &grow_scope)? && node.property(&grow_scope, "Slice")? == slice);
    let grow_cg = node.property(&grow_scope, "ControlGroup")?;
    ensure!(memory_limit(&grow_cg)? == 32 << 20, "limit of {grow_cg}");
    // An update reaches the scope's cgroup; what did not fit now does.
    c.runtime
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: grow.clone(),
            linux: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 128 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    ensure!(
        memory_limit(&grow_cg)? == 128 << 20,
        "updated limit of {grow_cg}"
    );
    std::fs::write(trigger.join("grow"), "")?;
    let mut used = 0;
    for _ in 0..200 {
        used = working_set(c, &grow).await?;
        if used >= 40 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        used >= 40 << 20,
        "48 MiB never allocated under 128 MiB: {used}"
    );
    stats_through_scopes(c, &pod, &grow).await?;
    // Over its limit: OOMKilled, seen through the scope's cgroup.
    let hog = create_and_start(c, &pod, &cfg, limited("hog", 64, false)).await?;
    std::fs::write(trigger.join("hog"), "")?;
    let st = wait_exited(c, &hog).await?;
    if st.exit_code != 137 || st.reason != "OOMKilled" {
        // The shim's log says which way its OOM watch went.
        let shim_log = b.state.join("sandboxes").join(&pod).join("shim/shim.log");
        bail!(
            "{} {:?}: {}\nshim log:\n{}",
            st.exit_code,
            st.reason,
            st.message,
            std::fs::read_to_string(shim_log).unwrap_or_default()
        );
    }
    remove_pod(c, &pod).await?;
    for unit in [scope, grow_scope, format!("berth-{hog}.scope")] {
        ensure!(
            node.property(&unit, "ActiveState")? == "inactive",
            "{unit} after removal"
        );
    }
    for s in chain {
        ensure!(!active(node, s)?, "{s} berth started is still active");
    }
    let left = host_cgroup_dirs("/berthe2e.slice")?;
    ensure!(left.is_empty(), "cgroups left: {left:?}");
    Ok(())
}

/// A container's memory working set, from its stats.
async fn working_set(c: &mut CriClient, id: &str) -> Result<u64> {
    let s = container_stats(c, id).await?;
    Ok(val(&s.memory.context("memory")?.working_set_bytes))
}

/// Container and pod stats read from the scopes' and the slice's cgroups, with the
/// container holding 48 MiB under its 128 MiB limit.
async fn stats_through_scopes(c: &mut CriClient, pod: &str, ctr: &str) -> Result<()> {
    let s = container_stats(c, ctr).await?;
    let m = s.memory.as_ref().context("memory")?;
    ensure!(val(&m.available_bytes) <= (128 - 40) << 20, "{m:?}");
    ensure!(val(&s.cpu.context("cpu")?.usage_core_nano_seconds) > 0);
    let pods = c
        .runtime
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
            filter: Some(cri::PodSandboxStatsFilter {
                id: pod.into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .stats;
    let linux = pods
        .first()
        .and_then(|p| p.linux.as_ref())
        .context("pod stats")?;
    let mem = linux.memory.as_ref().context("pod memory")?;
    ensure!(
        val(&mem.working_set_bytes) >= 40 << 20,
        "pod memory {mem:?}"
    );
    Ok(())
}

/// A scope and a slice as a crash leaves them: a `berth-<id>.scope` of no record
/// with a process, and a slice marked as berth's that no pod needs.
fn leave_strays(node: &SystemdNode, b: &Berthd) -> Result<(String, &'static str)> {
    let scope = format!("berth-{}.scope", "e2e0".repeat(16));
    let run = format!(
        "systemd-run --scope --unit={scope} --slice=berthe2e-stray.slice sleep 3600 \
         </dev/null >/dev/null 2>&1 &"
    );
    node.run(&["sh", "-c", &run])?;
    let mark = b.state.join("slices/berthe2e-stray.slice");
    std::fs::write(&mark, "")?;
    for _ in 0..100 {
        if active(node, &scope)? {
            return Ok((scope, "berthe2e-stray.slice"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the stray scope {scope} did not start")
}

/// Five pods with a container each, in one slice berth starts: through `restart`,
/// then `stop` + `start`, their processes and scopes live on; a stray scope and
/// slice are swept at the restart; the slice goes with the last pod.
async fn pods_live_through_restarts(node: &SystemdNode, b: &Berthd, first_pid: &str) -> Result<()> {
    let w = world();
    let mut c = b.client().await?;
    let logs = b.dir().join("logs");
    let slice = "berthe2e-restart.slice";
    let (mut pods, mut ctrs) = (Vec::new(), Vec::new());
    for i in 0..5 {
        let cfg = pod_in_slice(&format!("sd-{i}"), slice, &logs);
        let pod = run_pod(&mut c, cfg.clone()).await?;
        let sleeper = container_config("app", &w.busybox.reference, "exec sleep 3600");
        let ctr = create_and_start(&mut c, &pod, &cfg, sleeper).await?;
        pods.push(pod);
        ctrs.push(ctr);
    }
    let before = running_containers(&mut c, &ctrs).await?;
    let journal_pod = journal(node)?
        .into_iter()
        .any(|e| e["SANDBOX"].as_str() == Some(pods[0].as_str()));
    ensure!(journal_pod, "no journal entry carries SANDBOX={}", pods[0]);
    let (stray_scope, stray_slice) = leave_strays(node, b)?;

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
            ensure!(
                active(node, &format!("berth-{pod}.scope"))?,
                "scope of {pod} after {how:?}"
            );
        }
        if how == ["restart"] {
            ensure!(
                !active(node, &stray_scope)?,
                "stray {stray_scope} not swept"
            );
            ensure!(!active(node, stray_slice)?, "stray {stray_slice} not swept");
        }
    }
    let mut c = b.client().await?;
    for (i, pod) in pods.iter().enumerate() {
        remove_pod(&mut c, pod).await?;
        let last = i == pods.len() - 1;
        ensure!(
            active(node, slice)? != last,
            "{slice} after removing pod {i}"
        );
    }
    let left = host_cgroup_dirs("/berthe2e.slice")?;
    ensure!(left.is_empty(), "cgroups left: {left:?}");
    Ok(())
}
