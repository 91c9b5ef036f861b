//! Faults under load: berthd killed with -9 at each failpoint while four clients churn
//! pods and containers and a fifth pulls and removes an image, then restarted: the
//! records, the kernel's objects and the files agree, exit codes are kept, an image is
//! there whole or not at all, and nothing is left once the pods are gone.

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
    "pull-layer-settled@2",
    "pull-before-record@2",
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

/// The image worker: pulls a three-layer image, pulls it again (present: nothing to
/// fetch), removes it; until a call fails.
async fn image_churn(mut c: CriClient, image: String) {
    for n in 0.. {
        if pull(&mut c, &image).await.is_err() {
            return;
        }
        if n % 2 == 1
            && berth_e2e::calls::remove_image(&mut c, &image)
                .await
                .is_err()
        {
            return;
        }
    }
}

/// What the content store holds: with only the churn's base image, and with the
/// pulled image too.
struct StoreLevels {
    base_blobs: BTreeSet<String>,
    base_snapshots: usize,
    image_blobs: BTreeSet<String>,
    image_layers: usize,
}

impl StoreLevels {
    /// Measured by pulling and removing the churned image once.
    async fn measure(b: &Berthd, c: &mut CriClient, image: &PushedImage) -> Result<StoreLevels> {
        let (base_blobs, base_snapshots) = (blobs_on_disk(b)?, snapshots_on_disk(b)?.len());
        pull(c, &image.reference).await?;
        let with = blobs_on_disk(b)?;
        let image_layers = snapshots_on_disk(b)?.len() - base_snapshots;
        berth_e2e::calls::remove_image(c, &image.reference).await?;
        ensure!(blobs_on_disk(b)? == base_blobs, "removal left blobs");
        Ok(StoreLevels {
            image_blobs: with.difference(&base_blobs).cloned().collect(),
            base_blobs,
            base_snapshots,
            image_layers,
        })
    }

    /// After a crash: the image is listed with all of its blobs and layers, or it is
    /// not and none of them is left (nor anything half-written).
    async fn check(&self, b: &Berthd, c: &mut CriClient, image: &PushedImage) -> Result<()> {
        let listed = list(c).await?.iter().any(|i| i.id == image.config_digest);
        let (blobs, snapshots) = (blobs_on_disk(b)?, snapshots_on_disk(b)?.len());
        let (want_blobs, want_snapshots) = match listed {
            true => (
                self.base_blobs.union(&self.image_blobs).cloned().collect(),
                self.base_snapshots + self.image_layers,
            ),
            false => (self.base_blobs.clone(), self.base_snapshots),
        };
        ensure!(
            blobs == want_blobs && snapshots == want_snapshots,
            "image listed: {listed}; {} blobs (want {}), {snapshots} snapshots (want {want_snapshots})",
            blobs.len(),
            want_blobs.len()
        );
        let ingest = entries(&b.root.join("content/ingest"))?;
        ensure!(ingest.is_empty(), "ingest leftovers: {ingest:?}");
        println!("image invariants hold: listed {listed}, {snapshots} snapshots");
        Ok(())
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
    // A crash between a stop's kill of the infra process and its shim's shutdown
    // leaves a NotReady pod with its shim; kubelet's stop ends it.
    ensure!(
        shims >= ready.len() && shims <= all.len(),
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
            netns.len() == ready.len() && veths == ready.len() && shims == ready.len(),
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
    store: &StoreLevels,
) -> Result<()> {
    let churned = &world().concurrent;
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
    let c = b.client().await?;
    workers.push(tokio::spawn(image_churn(c, churned.reference.clone())));
    let died = died_within(b, 60).await;
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(30), w).await;
    }
    ensure!(died, "berthd never reached {fp}: {}", b.log_tail());
    b.set_env("BERTH_FAILPOINT", None);
    b.restart()?;
    let mut c = b.client().await?;
    check_invariants(b, &mut c, kept, false).await?;
    store.check(b, &mut c, churned).await?;
    // As kubelet does: stop the pods that are not ready (retrying what the crash cut off).
    for p in list_pods(&mut c).await? {
        if p.state != cri::PodSandboxState::SandboxReady as i32 {
            stop_pod(&mut c, &p.id).await?;
        }
    }
    check_invariants(b, &mut c, kept, true).await
}

/// berthd killed with -9 at each failpoint (mid-create of pods and containers, mid-stop
/// after CNI DEL, mid-removal of containers and pods, mid-pull after a layer and before
/// the image record) while four clients churn pods and a fifth pulls and removes an
/// image; after each restart the invariants hold; at the end every pod goes and
/// nothing is left.
pub fn kill9_at_failpoints_during_churn() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("fault"));
        let mut b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let round = Arc::new(AtomicUsize::new(0));
        let kept: Kept = Arc::default();
        let store = StoreLevels::measure(&b, &mut c, &w.concurrent).await?;
        for fp in FAILPOINTS {
            crash_at(&mut b, fp, &round, &w.busybox.reference, &kept, &store)
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
        let rules = nat_rules_of(&b)?;
        ensure!(rules.is_empty(), "NAT rules left: {rules:?}");
        ensure!(
            entries(&b.state.join("runtimes/runc"))?.is_empty(),
            "runtime states left"
        );
        ensure!(mounts_under(b.dir())?.is_empty(), "mounts left");
        Ok(())
    })
}

/// NAT rules that name this berthd's pod subnet (the bridge plugin's masquerading,
/// portmap's DNAT): none once its pods are gone.
fn nat_rules_of(b: &Berthd) -> Result<Vec<String>> {
    let prefix = b
        .subnet
        .rsplitn(2, '.')
        .nth(1)
        .unwrap_or(&b.subnet)
        .to_string()
        + ".";
    let out = Command::new("iptables")
        .args(["-w", "-t", "nat", "-S"])
        .output()?;
    ensure!(out.status.success(), "iptables -S failed: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&prefix))
        .map(String::from)
        .collect())
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
        let rules = nat_rules_of(&b)?;
        ensure!(rules.is_empty(), "NAT rules left: {rules:?}");
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

/// A CNI plugin that hangs on ADD and a runtime that hangs on `create` (stand-in
/// scripts that start a helper and wait on it): each call fails after its timeout with
/// an error that says so, the hung processes and their helpers are killed, nothing of
/// the pod or container is left, and the pod's shim and berthd serve on.
pub fn hung_cni_plugin_and_runtime_time_out() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("hang"));
        let tools = tempfile::tempdir()?;
        // Unique, bounded sleeps: a regression leaves nothing for long.
        let plugin_marker = format!("2{:03}.25", std::process::id() % 1000);
        write_script(
            &tools.path().join("hangplugin"),
            &format!(
                "#!/bin/sh\ncase \"$CNI_COMMAND\" in\n  ADD) sleep {plugin_marker} & wait ;;\n  VERSION) echo '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.4.0\",\"1.0.0\"]}}' ;;\nesac\nexit 0\n"
            ),
        )?;
        let runtime_marker = format!("2{:03}.75", std::process::id() % 1000);
        let runtime = tools.path().join("hangs-create");
        write_script(
            &runtime,
            &format!(
                "#!/bin/sh\nfor a; do [ \"$a\" = create ] && {{ sleep {runtime_marker} & wait; }}; done\nexec runc \"$@\"\n"
            ),
        )?;
        let mut b = Berthd::prepare(
            &format!(
                "[runtimes.hangs]\npath = {:?}\ntimeout_secs = 2\n",
                runtime.display()
            ),
            None,
        )?;
        let cfg = std::fs::read_to_string(&b.config)?.replace(
            "[cni]\n",
            &format!(
                "[cni]\nbin_dirs = [{:?}, \"/usr/lib/cni\", \"/opt/cni/bin\"]\nplugin_timeout_secs = 2\n",
                tools.path().display()
            ),
        );
        std::fs::write(&b.config, cfg)?;
        let hang_conf = b.cni_dir.join("00-hang.conflist");
        std::fs::write(
            &hang_conf,
            r#"{"cniVersion": "1.0.0", "name": "hang", "plugins": [{"type": "hangplugin"}]}"#,
        )?;
        b.spawn()?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");

        // The plugin hangs: RunPodSandbox fails after the plugin timeout.
        let t = std::time::Instant::now();
        let r = run_pod(&mut c, container_pod("hang", "h-net", &logs)).await;
        let e = r.expect_err("a pod whose CNI ADD hangs was made");
        ensure!(
            e.message().contains("hangplugin") && e.message().contains("within 2s"),
            "{e:?}"
        );
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "took {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        ensure!(
            !process_with(&plugin_marker),
            "the hung plugin's helper still runs"
        );
        ensure!(
            list_pods(&mut c).await?.is_empty(),
            "the failed pod is listed"
        );
        assert_no_pod_leftovers(&b, "hang")?;

        // The runtime hangs on create: CreateContainer fails after its timeout.
        std::fs::remove_file(&hang_conf)?;
        let pod_cfg = container_pod("hang", "h-rt", &logs);
        let pod = run_pod_on(&mut c, &pod_cfg, "hangs").await?;
        let t = std::time::Instant::now();
        let cfg = container_config("app", &w.busybox.reference, "exec sleep 3600");
        let e = create_ctr(&mut c, &pod, &pod_cfg, cfg)
            .await
            .expect_err("a container whose runtime hangs was made");
        ensure!(e.message().contains("no answer within 2s"), "{e:?}");
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "took {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        ensure!(
            !process_with(&runtime_marker),
            "the hung runtime's helper still runs"
        );
        ensure!(
            list_ctrs(&mut c).await?.is_empty(),
            "the failed container is listed"
        );
        // The shim was not wedged: the pod is ready and goes at once.
        ensure!(
            pod_status(&mut c, &pod).await?.0.state == cri::PodSandboxState::SandboxReady as i32
        );
        let t = std::time::Instant::now();
        remove_pod(&mut c, &pod).await?;
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "removal took {:?}",
            t.elapsed()
        );
        assert_no_pod_leftovers(&b, "hang")?;
        ensure!(
            entries(&b.root.join("containers"))?.is_empty(),
            "container dirs left"
        );
        Ok(())
    })
}

/// The pod's shim: the parent of its infra process.
async fn shim_pid(c: &mut CriClient, pod: &str) -> Result<i32> {
    let infra = pod_status(c, pod).await?.1["pid"]
        .as_u64()
        .context("infra pid")?;
    std::fs::read_to_string(format!("/proc/{infra}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .context("PPid")
}

/// A shim killed with -9 while an ExecSync, an exec session and an attach run and the
/// log is being reopened: every one of them ends with an error within seconds (none
/// hangs), the container is reported `137 ShimDied`, the execs' processes are gone,
/// and berthd serves on and cleans up.
pub fn shim_death_mid_exec_attach_and_reopen() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("shimmid"));
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("shimmid", "sm-1", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let ticker = "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.05; done";
        let id = create_and_start(
            &mut c,
            &pod,
            &pod_cfg,
            container_config("ticker", &w.busybox.reference, ticker),
        )
        .await?;
        let marker = format!("3{:05}", std::process::id() % 100_000);
        let (sync_marker, session_marker) = (format!("{marker}1"), format!("{marker}2"));

        let mut cc = c.clone();
        let sync = cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["busybox".into(), "sleep".into(), sync_marker.clone()],
            timeout: 0,
        };
        let exec_sync = tokio::spawn(async move { cc.runtime.exec_sync(sync).await });
        let url = c
            .runtime
            .exec(cri::ExecRequest {
                container_id: id.clone(),
                cmd: vec!["busybox".into(), "sleep".into(), session_marker.clone()],
                stdout: true,
                ..Default::default()
            })
            .await?
            .into_inner()
            .url;
        let session = tokio::spawn(async move {
            let none: Option<&[u8]> = None;
            berth_stream::client::run_command(
                &url,
                berth_stream::client::CommandIo {
                    stdin: none,
                    stdout: Some(tokio::io::sink()),
                    stderr: None::<tokio::io::Sink>,
                    tty: false,
                    resize: None,
                },
            )
            .await
        });
        let mut attach = ChildGuard(
            Command::new(berth_e2e::berthd::built_binary("berthctl")?)
                .arg("--socket")
                .arg(&b.socket)
                .args(["attach", &id])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()?,
        );
        let mut attached = attach.0.stdout.take().context("attach stdout")?;
        let first = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::task::spawn_blocking(move || {
                let mut buf = [0u8; 64];
                std::io::Read::read(&mut attached, &mut buf).map(|n| (n, attached))
            }),
        )
        .await
        .context("berthctl attach printed nothing in 20 s")???;
        ensure!(first.0 > 0, "attach printed nothing");
        let mut rc = c.clone();
        let (log, cid) = (logs.join("ticker/0.log"), id.clone());
        let reopen = tokio::spawn(async move {
            for n in 0.. {
                let _ = std::fs::rename(&log, log.with_extension(format!("{n}")));
                let r = rc
                    .runtime
                    .reopen_container_log(cri::ReopenContainerLogRequest {
                        container_id: cid.clone(),
                    })
                    .await;
                if let Err(e) = r {
                    return e;
                }
            }
            unreachable!()
        });
        wait_until("the ExecSync runs", || process_with(&sync_marker)).await?;
        wait_until("the exec session runs", || process_with(&session_marker)).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let shim = shim_pid(&mut c, &pod).await?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shim),
            nix::sys::signal::Signal::SIGKILL,
        )?;

        let bound = Duration::from_secs(10);
        let r = tokio::time::timeout(bound, exec_sync)
            .await
            .context("ExecSync hung")??;
        ensure!(
            r.is_err(),
            "ExecSync succeeded across its shim's death: {r:?}"
        );
        let r = tokio::time::timeout(bound, session)
            .await
            .context("exec session hung")??;
        ensure!(!matches!(r, Ok(0)), "the exec session ended well: {r:?}");
        let e = tokio::time::timeout(bound, reopen)
            .await
            .context("ReopenContainerLog hung")??;
        ensure!(
            matches!(
                e.code(),
                Code::FailedPrecondition | Code::Unavailable | Code::Internal | Code::NotFound
            ),
            "{e:?}"
        );
        let waited = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = attach.0.try_wait() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        })
        .await?;
        ensure!(waited, "berthctl attach did not end after the shim died");
        let st = super::wait_exited(&mut c, &id).await?;
        ensure!(st.exit_code == 137 && st.reason == "ShimDied", "{st:?}");
        ensure!(
            !process_with(&sync_marker) && !process_with(&session_marker),
            "exec processes outlived their shim"
        );
        // berthd serves on: a new pod runs.
        let again = run_pod(&mut c, container_pod("shimmid", "sm-2", &logs)).await?;
        remove_pod(&mut c, &again).await?;
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "shimmid")?;
        Ok(())
    })
}

/// How a hostile registry serves a layer.
#[derive(Clone, Copy, PartialEq)]
enum LayerServing {
    /// All of it.
    Whole,
    /// Half of the promised length, then the connection closes.
    DropHalfway,
}

/// A one-image registry on 127.0.0.1 that serves `manifest`, `config` and `layer` (by
/// digest), the layer as `serving` says. Returns its address.
fn hostile_registry(
    manifest: Vec<u8>,
    config: (String, Vec<u8>),
    layer: (String, Vec<u8>),
    serving: LayerServing,
) -> Result<String> {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let blobs = Arc::new([config, layer.clone()]);
    let manifest = Arc::new(manifest);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (blobs, manifest, layer_digest) =
                (blobs.clone(), manifest.clone(), layer.0.clone());
            std::thread::spawn(move || {
                let Some(first) = super::request_line(&stream) else {
                    return;
                };
                let mut out = stream;
                let head = |ty: &str, len: usize| {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {ty}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                    )
                };
                let (ty, body): (&str, &[u8]) = if first.contains("/manifests/") {
                    ("application/vnd.oci.image.manifest.v1+json", &manifest)
                } else if let Some((_, b)) = blobs.iter().find(|(d, _)| first.contains(d.as_str()))
                {
                    ("application/octet-stream", b)
                } else {
                    ("application/json", b"{}")
                };
                let _ = out.write_all(head(ty, body.len()).as_bytes());
                let cut = serving == LayerServing::DropHalfway && first.contains(&layer_digest);
                let sent = if cut { &body[..body.len() / 2] } else { body };
                let _ = out.write_all(sent);
                // Dropping the stream closes the connection, short of the promised length when cut.
            });
        }
    });
    Ok(addr)
}

/// An image of one gzip layer whose blob is `blob` (a real gzip of `tar`, or not):
/// its manifest, config and layer, with digests of what is served.
fn hostile_image(
    tar: &[u8],
    blob: Vec<u8>,
) -> Result<(Vec<u8>, (String, Vec<u8>), (String, Vec<u8>))> {
    use berth_e2e::testimages::sha256_digest;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(tar)]},
        "config": {"Cmd": ["/bin/sh"]},
    }))?;
    let (config_digest, layer_digest) = (sha256_digest(&config), sha256_digest(&blob));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": blob.len()}],
    }))?;
    Ok((manifest, (config_digest, config), (layer_digest, blob)))
}

/// A registry that drops the connection halfway through a layer, and one that serves
/// a truncated gzip (with the digest of the truncated bytes, so only inflating finds
/// it): each pull fails with an error that says what happened, nothing of the image is
/// kept (no record, snapshot, layer blob or ingest file), and berthd pulls on.
pub fn hostile_registry_pulls_leave_nothing() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let tar = LayerBuilder::new()
            .dir("data", 0o755, 0, 0)
            .generated_file("data/blob", 4 << 20, 7, 0o644)
            .to_tar()?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar)?;
        let gz = gz.finish()?;
        let cases = [
            (
                "dropped",
                hostile_image(&tar, gz.clone())?,
                LayerServing::DropHalfway,
                Code::Unavailable,
            ),
            (
                "truncated",
                hostile_image(&tar, gz[..gz.len() / 2].to_vec())?,
                LayerServing::Whole,
                Code::DataLoss,
            ),
        ];
        for (name, (manifest, config, layer), serving, code) in cases {
            let layer_digest = layer.0.clone();
            let registry = hostile_registry(manifest, config, layer, serving)?;
            let reference = format!("{registry}/evil/{name}:1");
            let err = pull(&mut c, &reference)
                .await
                .expect_err("a broken layer was accepted");
            println!("{name}: {:?}: {}", err.code(), err.message());
            ensure!(err.code() == code, "{name}: expected {code:?}: {err:?}");
            ensure!(
                err.message().len() < 4096 && !err.message().is_empty(),
                "{name}: {err:?}"
            );
            ensure!(
                status(&mut c, &reference, false).await?.image.is_none(),
                "{name}: recorded"
            );
            ensure!(
                !blobs_on_disk(&b)?.contains(hex(&layer_digest)),
                "{name}: layer blob kept"
            );
            ensure!(snapshots_on_disk(&b)?.is_empty(), "{name}: snapshot left");
            ensure!(
                entries(&b.root.join("content/ingest"))?.is_empty(),
                "{name}: ingest left"
            );
        }
        pull(&mut c, &w.busybox.reference).await?;
        Ok(())
    })
}

/// Pods start while something trims every empty cgroup below the test's scope, as
/// systemd on cgroup v1 trims the hierarchies of controllers it turns off (cpu, blkio):
/// a pod's fresh cgroup vanishes before its infra process joins it (the trimmer counts
/// how often), and is made again. Each infra ends up in its pod's cgroup in every
/// hierarchy; once the trimming stops, removal leaves nothing.
pub fn pods_start_while_empty_cgroups_are_trimmed() -> Result<(), Failed> {
    run(|| async {
        let _cg = CgroupParentGuard(Some("trim"));
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        let scope = cgroup_scope("trim");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let trimmer = {
            let (stop, scope) = (stop.clone(), scope.clone());
            std::thread::spawn(move || {
                let mut pod_dirs_trimmed = 0;
                while !stop.load(Ordering::Relaxed) {
                    pod_dirs_trimmed += berth_e2e::calls::remove_cgroup_tree(&scope);
                    std::thread::sleep(Duration::from_micros(200));
                }
                pod_dirs_trimmed
            })
        };
        let mut pods = Vec::new();
        let started = async {
            for n in 0..20 {
                let uid = format!("t-{n}");
                let pod = run_pod(&mut c, pod_config_in("trim", &uid, "trim"))
                    .await
                    .with_context(|| format!("pod {n}"))?;
                pods.push(pod.clone());
                let (_, info) = pod_status(&mut c, &pod).await?;
                let pid = info["pid"].as_u64().context("verbose pid")?;
                let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
                let want = format!("{scope}/pod{uid}");
                // Every hierarchy line (`id:controllers:path`) names the pod's cgroup.
                let outside: Vec<&str> = cgroups.lines().filter(|l| !l.ends_with(&want)).collect();
                ensure!(
                    outside.is_empty(),
                    "pod {n}: infra outside {want}: {outside:?}"
                );
            }
            anyhow::Ok(())
        }
        .await;
        stop.store(true, Ordering::Relaxed);
        let trimmed = trimmer.join().map_err(|_| anyhow!("trimmer panicked"))?;
        started?;
        println!("20 pods started; {trimmed} of their fresh cgroup dirs were trimmed first");
        ensure!(
            trimmed > 0,
            "no pod cgroup was trimmed: the test tested nothing"
        );
        for pod in &pods {
            stop_pod(&mut c, pod).await?;
            remove_pod(&mut c, pod).await?;
        }
        ensure!(list_pods(&mut c).await?.is_empty());
        assert_no_pod_leftovers(&b, "trim")?;
        Ok(())
    })
}
