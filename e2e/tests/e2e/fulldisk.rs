//! A full disk: under berth's root during a pull, and under the pods' log directory
//! while containers write. Errors say so, nothing half-made is kept, containers are
//! never blocked by their log, and berthd serves on.

use super::*;

/// Mounts a tmpfs of `size` at `dir` (made if missing); the Berthd's drop unmounts it.
fn small_fs(dir: &Path, size: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let ok = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0711"),
            "tmpfs",
        ])
        .arg(dir)
        .status()?
        .success();
    ensure!(ok, "mounting a {size} tmpfs at {}", dir.display());
    Ok(())
}

fn unmount(dir: &Path) {
    let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
}

/// berth's root on a 40 MiB filesystem: a 120 MB pull fails with ResourceExhausted
/// naming the full disk, leaves no blob, snapshot, ingest file or record, and the next
/// (small) pull and a container work.
pub fn full_disk_during_a_pull() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let mut b = Berthd::prepare("", None)?;
        small_fs(&b.root, "40m")?;
        let root = b.root.clone();
        let result = async {
            b.spawn()?;
            let mut c = b.client().await?;
            let err = pull(&mut c, &w.large.reference)
                .await
                .expect_err("120 MB fit in 40 MiB");
            println!("full disk: {:?}: {}", err.code(), err.message());
            ensure!(
                err.code() == Code::ResourceExhausted
                    && err.message().contains("No space left on device"),
                "{err:?}"
            );
            ensure!(list(&mut c).await?.is_empty(), "an image was recorded");
            ensure!(
                snapshots_on_disk(&b)?.is_empty(),
                "snapshots left: {:?}",
                snapshots_on_disk(&b)?
            );
            ensure!(
                entries(&b.root.join("content/ingest"))?.is_empty(),
                "ingest left"
            );
            for l in &w.large.layer_digests {
                ensure!(!blobs_on_disk(&b)?.contains(hex(l)), "layer blob {l} kept");
            }
            // The space came back: a small image pulls and runs.
            pull(&mut c, &w.busybox.reference).await?;
            let logs = b.dir().join("logs");
            let pod_cfg = container_pod("fulldisk", "fd-1", &logs);
            let pod = run_pod(&mut c, pod_cfg.clone()).await?;
            let id = create_and_start(
                &mut c,
                &pod,
                &pod_cfg,
                container_config("app", &w.busybox.reference, "echo fine"),
            )
            .await?;
            let st = wait_exited(&mut c, &id).await?;
            ensure!(st.exit_code == 0, "{st:?}");
            remove_pod(&mut c, &pod).await?;
            super::assert_no_pod_leftovers_but(&b, "fulldisk", Some(&b.root))
        }
        .await;
        let _ = b.terminate();
        unmount(&root);
        result
    })
}

/// Every line of a CRI log parses (`<RFC 3339> <stream> <F|P> <text>`): a write cut
/// short by a full disk leaves no half record.
fn cri_log_is_whole(path: &Path) -> Result<usize> {
    let text = std::fs::read(path)?;
    let mut n = 0;
    for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let line = String::from_utf8_lossy(line);
        let mut it = line.splitn(4, ' ');
        let (ts, stream, tag) = (it.next(), it.next(), it.next());
        ensure!(
            ts.is_some_and(|t| t.len() >= 20 && t.contains('T'))
                && matches!(stream, Some("stdout" | "stderr"))
                && matches!(tag, Some("F" | "P")),
            "a broken record in {}: {line:?}",
            path.display()
        );
        n += 1;
    }
    Ok(n)
}

/// The pods' log directory on a 1 MiB filesystem: a container writing 3 MB is never
/// blocked (it exits 0 on time), the log holds only whole records, the shim says why
/// output was dropped, and once space is freed a running container's output is
/// written again.
pub fn full_disk_during_log_writes() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let logs = b.dir().join("logs");
        small_fs(&logs, "1m")?;
        let result = async {
            let mut c = b.client().await?;
            pull(&mut c, &w.busybox.reference).await?;
            let pod_cfg = container_pod("fulllog", "fl-1", &logs);
            let pod = run_pod(&mut c, pod_cfg.clone()).await?;
            let pad = "x".repeat(1000);
            let flood = format!(
                "i=0; while [ $i -lt 3000 ]; do echo \"line $i {pad}\"; i=$((i+1)); done; echo done"
            );
            let t = std::time::Instant::now();
            let flooder = create_and_start(
                &mut c,
                &pod,
                &pod_cfg,
                container_config("flood", &w.busybox.reference, &flood),
            )
            .await?;
            let st = wait_exited(&mut c, &flooder).await?;
            ensure!(st.exit_code == 0, "{st:?}");
            println!("3 MB into a 1 MiB log dir: exited after {:?}", t.elapsed());
            let flood_log = PathBuf::from(&st.log_path);
            let lines = cri_log_is_whole(&flood_log)?;
            ensure!(
                lines > 0 && lines < 3001,
                "{lines} records of 3001 fit in 1 MiB?"
            );
            let ticker = "while true; do echo tick; sleep 0.1; done";
            let ticking = create_and_start(
                &mut c,
                &pod,
                &pod_cfg,
                container_config("ticker", &w.busybox.reference, ticker),
            )
            .await?;
            let (tick_st, _) = ctr_status(&mut c, &ticking).await?;
            let tick_log = PathBuf::from(&tick_st.log_path);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let shim_log = std::fs::read_to_string(
                b.state.join("sandboxes").join(&pod).join("shim/shim.log"),
            )?;
            ensure!(
                shim_log.contains("No space left on device"),
                "the shim did not say why output was dropped: {shim_log:?}"
            );
            // Space comes back: the ticker's output is written again.
            std::fs::remove_file(&flood_log)?;
            let before = std::fs::metadata(&tick_log).map(|m| m.len()).unwrap_or(0);
            let mut grew = false;
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if std::fs::metadata(&tick_log).map(|m| m.len()).unwrap_or(0) > before {
                    grew = true;
                    break;
                }
            }
            ensure!(grew, "the ticker's log did not grow once space was freed");
            cri_log_is_whole(&tick_log)?;
            ensure!(
                pod_status(&mut c, &pod).await?.0.state
                    == cri::PodSandboxState::SandboxReady as i32
            );
            remove_pod(&mut c, &pod).await?;
            super::assert_no_pod_leftovers_but(&b, "fulllog", Some(&logs))
        }
        .await;
        unmount(&logs);
        result
    })
}
