//! Faults under load: berthd killed with -9 at each failpoint while four clients churn
//! pods and containers, then restarted: the records, the kernel's objects and the
//! files agree, exit codes are kept, and nothing is left once the pods are gone.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

const WORKERS: usize = 4;

/// Each crash point, reached a few operations into the churn.
const FAILPOINTS: &[&str] = &[
    "sandbox-before-record@3",
    "container-before-record@3",
    "sandbox-stop-after-network@2",
    "container-remove-before-record@2",
    "sandbox-remove-before-record@2",
];

/// What the churn left on purpose: containers that exited with a known code, kept
/// (with their pods) across the crashes.
type Kept = Arc<Mutex<Vec<(String, i32)>>>;

/// One worker: pod, container that exits with a chosen code, then (two rounds in
/// three) removal of both; until a call fails (berthd died).
async fn churn(
    mut c: CriClient,
    round: Arc<AtomicUsize>,
    image: String,
    logs: PathBuf,
    kept: Kept,
) {
    loop {
        let n = round.fetch_add(1, Ordering::SeqCst);
        let code = (n % 50 + 1) as i32;
        let cfg = container_pod("fault", &format!("f-{n}"), &logs);
        let step = async {
            let pod = run_pod(&mut c, cfg.clone()).await?;
            let script = format!("exit {code}");
            let ctr =
                create_and_start(&mut c, &pod, &cfg, container_config("app", &image, &script))
                    .await?;
            loop {
                let (st, _) = ctr_status(&mut c, &ctr).await?;
                if st.state == cri::ContainerState::ContainerExited as i32 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if n % 3 == 0 {
                kept.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((ctr, code));
                return Ok(());
            }
            c.runtime
                .remove_container(cri::RemoveContainerRequest {
                    container_id: ctr.clone(),
                })
                .await?;
            stop_pod(&mut c, &pod).await?;
            remove_pod(&mut c, &pod).await
        };
        let done: Result<(), tonic::Status> = step.await;
        if done.is_err() {
            return;
        }
    }
}

/// berthd's shims (one per ready pod), by their sockets (a pod's infra process is a
/// fork of its shim, with the same command line).
fn shims_of(b: &Berthd) -> Result<BTreeSet<String>> {
    let dir = b.dir().display().to_string();
    let mut out = BTreeSet::new();
    for p in std::fs::read_dir("/proc")?.flatten() {
        let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("berth-shim") && cmd.contains(&dir) {
            let socket = cmd.split('\0').skip_while(|a| *a != "--socket").nth(1);
            out.insert(
                socket
                    .unwrap_or("?")
                    .rsplit('/')
                    .next()
                    .unwrap_or("?")
                    .to_string(),
            );
        }
    }
    Ok(out)
}

/// What must hold after any crash and restart: every network attachment belongs to a
/// listed pod and every ready pod has one; shims = ready pods; container dirs = listed
/// containers, runtime states only of listed ones and for each that runs; kept exits.
/// With `settled` (after kubelet's stops of NotReady pods): netns = veths = leases =
/// ready pods.
async fn check_invariants(b: &Berthd, c: &mut CriClient, kept: &Kept, settled: bool) -> Result<()> {
    let pods = list_pods(c).await?;
    let all: BTreeSet<String> = pods.iter().map(|p| p.id.clone()).collect();
    let ready: BTreeSet<String> = pods
        .iter()
        .filter(|p| p.state == cri::PodSandboxState::SandboxReady as i32)
        .map(|p| p.id.clone())
        .collect();
    let netns = entries(&b.state.join("netns"))?;
    let (veths, leases) = (bridge_ports(&b.bridge)?.len(), leases(&b.ipam_dir)?.len());
    let shim_list = shims_of(b)?;
    let shims = shim_list.len();
    let counts = format!(
        "{} pods, {} ready, {} netns, {veths} veths, {leases} leases, {shims} shims",
        all.len(),
        ready.len(),
        netns.len()
    );
    ensure!(
        shims == ready.len(),
        "{counts}: shims {shim_list:?}, ready pods {ready:?}"
    );
    ensure!(
        veths == leases && veths >= ready.len() && veths <= netns.len(),
        "{counts}"
    );
    ensure!(
        netns.len() >= ready.len() && netns.len() <= all.len(),
        "{counts}"
    );
    if settled {
        ensure!(
            netns.len() == ready.len() && veths == ready.len(),
            "{counts}"
        );
    }
    let ctrs = list_ctrs(c).await?;
    let ids: BTreeSet<String> = ctrs.iter().map(|c| c.id.clone()).collect();
    // An exited container whose removal a crash cut short has lost its files already;
    // kubelet's retry of the removal ends it.
    let dirs = entries(&b.root.join("containers"))?;
    ensure!(
        dirs.is_subset(&ids),
        "container dirs {dirs:?} of no container ({ids:?})"
    );
    let states = entries(&b.state.join("runtimes/runc"))?;
    ensure!(
        states.is_subset(&ids),
        "runtime states {states:?} of no container ({ids:?})"
    );
    for ctr in &ctrs {
        if ctr.state != cri::ContainerState::ContainerExited as i32 {
            ensure!(
                states.contains(&ctr.id) && dirs.contains(&ctr.id),
                "{} ({}) has no runtime state or no files",
                ctr.id,
                ctr.state
            );
        }
    }
    let kept = kept.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for (id, code) in kept {
        let (st, _) = ctr_status(c, &id).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerExited as i32
                && st.exit_code == code
                && st.reason == "Error",
            "kept container {id} should have exited {code}: {st:?}"
        );
    }
    println!(
        "invariants hold (settled: {settled}): {counts}, {} containers",
        ids.len()
    );
    Ok(())
}

/// Waits up to `secs` for berthd to die at its failpoint.
async fn died_within(b: &mut Berthd, secs: u64) -> bool {
    for _ in 0..secs * 20 {
        if b.exited() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// One crash: churn with the failpoint armed until berthd dies there, restart, check.
async fn crash_at(
    b: &mut Berthd,
    fp: &str,
    round: &Arc<AtomicUsize>,
    image: &str,
    kept: &Kept,
) -> Result<()> {
    b.set_env("BERTH_FAILPOINT", Some(fp));
    b.restart()?;
    let logs = b.dir().join("logs");
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let c = b.client().await?;
        let w = churn(
            c,
            round.clone(),
            image.to_string(),
            logs.clone(),
            kept.clone(),
        );
        workers.push(tokio::spawn(w));
    }
    let died = died_within(b, 60).await;
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(30), w).await;
    }
    ensure!(died, "berthd never reached {fp}: {}", b.log_tail());
    b.set_env("BERTH_FAILPOINT", None);
    b.restart()?;
    let mut c = b.client().await?;
    check_invariants(b, &mut c, kept, false).await?;
    // As kubelet does: stop the pods that are not ready (retrying what the crash cut off).
    for p in list_pods(&mut c).await? {
        if p.state != cri::PodSandboxState::SandboxReady as i32 {
            stop_pod(&mut c, &p.id).await?;
        }
    }
    check_invariants(b, &mut c, kept, true).await
}

/// berthd killed with -9 at each failpoint (mid-create of pods and containers, mid-stop
/// after CNI DEL, mid-removal of containers and pods) while four clients churn; after
/// each restart the invariants hold; at the end every pod goes and nothing is left.
pub fn kill9_at_failpoints_during_churn() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("fault"));
        let mut b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let round = Arc::new(AtomicUsize::new(0));
        let kept: Kept = Arc::default();
        for fp in FAILPOINTS {
            crash_at(&mut b, fp, &round, &w.busybox.reference, &kept)
                .await
                .with_context(|| format!("after a crash at {fp}"))?;
        }
        let mut c = b.client().await?;
        for p in list_pods(&mut c).await? {
            remove_pod(&mut c, &p.id).await?;
        }
        assert_no_pod_leftovers(&b, "fault")?;
        ensure!(bridge_ports(&b.bridge)?.is_empty(), "veths left");
        ensure!(leases(&b.ipam_dir)?.is_empty(), "leases left");
        ensure!(
            entries(&b.root.join("containers"))?.is_empty(),
            "container dirs left"
        );
        ensure!(
            entries(&b.state.join("runtimes/runc"))?.is_empty(),
            "runtime states left"
        );
        ensure!(mounts_under(b.dir())?.is_empty(), "mounts left");
        Ok(())
    })
}

/// berthd's open fds.
fn fds_of(b: &Berthd) -> Result<usize> {
    let pid = b.pid().context("berthd is not running")?;
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Cycles the soak runs: `BERTH_SOAK_CYCLES` for longer runs.
fn soak_cycles() -> usize {
    std::env::var("BERTH_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// One cycle as kubelet drives a short pod: pod, container, an exec, a stats read, stop,
/// removal.
async fn cycle(c: &mut CriClient, n: usize, image: &str, logs: &Path) -> Result<()> {
    let cfg = container_pod("soak", &format!("s-{n}"), logs);
    let pod = run_pod(c, cfg.clone()).await?;
    let ctr = create_and_start(
        c,
        &pod,
        &cfg,
        container_config("app", image, "exec sleep 3600"),
    )
    .await?;
    let (code, out, _) = exec_in(c, &ctr, &["/bin/sh", "-c", "echo ok"]).await?;
    ensure!(
        code == 0 && out == "ok\n",
        "cycle {n}: exec gave {code} {out:?}"
    );
    container_stats(c, &ctr).await?;
    stop_pod(c, &pod).await?;
    remove_pod(c, &pod).await?;
    Ok(())
}

/// 200 pod cycles (more with BERTH_SOAK_CYCLES): berthd's fds are flat and its RSS is
/// flat after the warm-up (figures every 50 cycles are printed), and nothing of any
/// kind is left: mounts, netns, veths, leases, cgroups, shims, files under root/state.
pub fn soak_cycles_leave_nothing() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("soak"));
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        println!("soak: fresh: RSS {} KiB", b.rss_kib().unwrap_or(0));
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let total = soak_cycles();
        let (rss0, fds0) = (b.rss_kib().unwrap_or(0), fds_of(&b)?);
        println!("soak: idle: RSS {rss0} KiB, {fds0} fds");
        let mut warm = None;
        for n in 1..=total {
            cycle(&mut c, n, &w.busybox.reference, &logs)
                .await
                .with_context(|| format!("cycle {n}"))?;
            if n % 50 == 0 || n == total {
                let (rss, fds) = (b.rss_kib().unwrap_or(0), fds_of(&b)?);
                println!("soak: after {n} cycles: RSS {rss} KiB, {fds} fds");
                let (rss_w, fds_w) = *warm.get_or_insert((rss, fds));
                ensure!(
                    fds <= fds_w + 2,
                    "fds grew from {fds_w} to {fds} by cycle {n}"
                );
                ensure!(
                    rss <= rss_w + 4096,
                    "RSS grew from {rss_w} KiB to {rss} KiB by cycle {n}"
                );
            }
        }
        ensure!(list_pods(&mut c).await?.is_empty() && list_ctrs(&mut c).await?.is_empty());
        assert_no_pod_leftovers(&b, "soak")?;
        ensure!(bridge_ports(&b.bridge)?.is_empty(), "veths left");
        ensure!(leases(&b.ipam_dir)?.is_empty(), "leases left");
        ensure!(mounts_under(b.dir())?.is_empty(), "mounts left");
        for dir in [
            b.root.join("containers"),
            b.state.join("containers"),
            b.state.join("runtimes/runc"),
        ] {
            ensure!(
                entries(&dir)?.is_empty(),
                "left in {}: {:?}",
                dir.display(),
                entries(&dir)?
            );
        }
        Ok(())
    })
}
