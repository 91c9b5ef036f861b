//! Security e2e tests: what a local user or a container can and cannot reach.

use std::os::unix::process::CommandExt as _;

use super::*;

/// The overflow uid/gid: an unprivileged local user.
const NOBODY: u32 = 65534;

/// Every setuid regular file below `dir`, without following symlinks or leaving mounts
/// other than the ones below (the walk runs as root).
fn setuid_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        if meta.is_dir() {
            setuid_files(&e.path(), out);
        } else if meta.is_file() && meta.mode() & 0o4000 != 0 {
            out.push(e.path());
        }
    }
}

/// Runs `argv` as the unprivileged local user; Ok(output) or the spawn error.
fn as_nobody(argv: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new(argv[0])
        .args(&argv[1..])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
}

fn mode_of(p: &Path) -> Result<u32> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("stat {}", p.display()))?
        .mode()
        & 0o7777)
}

fn expect_private_layout(b: &Berthd, bundle: &Path) -> Result<()> {
    for (p, want) in [
        (b.root.clone(), 0o711),
        (b.state.clone(), 0o711),
        (b.root.join("meta.redb"), 0o600),
        (bundle.join("config.json"), 0o600),
    ] {
        let m = mode_of(&p)?;
        ensure!(m == want, "{} has mode {m:o}, want {want:o}", p.display());
    }
    for (top, subs) in [
        (
            &b.root,
            &["content", "snapshots", "containers", "sandboxes"][..],
        ),
        (
            &b.state,
            &["s", "sandboxes", "netns", "containers", "runtimes"][..],
        ),
    ] {
        for s in subs {
            let m = mode_of(&top.join(s))?;
            ensure!(m == 0o700, "{}/{s} has mode {m:o}, want 700", top.display());
        }
    }
    Ok(())
}

/// What a local user can do against a berthd whose dirs sit in a world-readable parent.
fn expect_nobody_locked_out(b: &Berthd, bundle: &Path) -> Result<()> {
    for dir in [&b.root, &b.state] {
        let out = as_nobody(&["/bin/ls", &dir.display().to_string()])?;
        ensure!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
            "nobody listed {}: {out:?}",
            dir.display()
        );
    }
    for f in [b.root.join("meta.redb"), bundle.join("config.json")] {
        let out = as_nobody(&["/bin/cat", &f.display().to_string()])?;
        ensure!(
            !out.status.success() && out.stdout.is_empty(),
            "nobody read {}: {out:?}",
            f.display()
        );
    }
    // Every setuid file berth keeps (image layer, container rootfs mount, upper dir).
    let mut found = Vec::new();
    setuid_files(&b.root, &mut found);
    setuid_files(&b.state, &mut found);
    let places = ["/snapshots/", "/rootfs/", "/upper/"];
    for p in places {
        ensure!(
            found.iter().any(|f| f.display().to_string().contains(p)),
            "no setuid file found under a {p} dir: {found:?}"
        );
    }
    for f in &found {
        match as_nobody(&[&f.display().to_string(), "-c", "true"]) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {}
            other => bail!("nobody could execute {}: {other:?}", f.display()),
        }
    }
    Ok(())
}

/// root and state are 0711 with 0700 subtrees and 0600 records and bundles, so a local
/// user can neither list them, read a bundle, nor run a setuid file from an image layer
/// or a container's rootfs; an install with wider modes is tightened at the next start.
pub fn state_is_private_to_root() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let mut b = Berthd::start("")?;
        let image = ImageBuilder::new()
            .layer(
                base_layer().add_host_file("bin/suid-sh", "/bin/busybox", 0o4755),
                Compression::Gzip,
            )
            .push(w.reg.addr(), "test/setuid", "1", None)
            .await?;
        let mut c = b.client().await?;
        pull(&mut c, &image.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("private", "sec-1", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        // The container adds a setuid file of its own, which lands in its upper dir.
        let script =
            "busybox cp /bin/busybox /upper-suid && busybox chmod 4755 /upper-suid && sleep 300";
        let cfg = container_config("holder", &image.reference, script);
        let id = create_ctr(&mut c, &pod, &pod_cfg, cfg).await?;
        c.runtime.start_container(start(&id)).await?;
        let upper = b.root.join("containers").join(&id).join("upper/upper-suid");
        for _ in 0..200 {
            if upper.exists() && mode_of(&upper)? & 0o4000 != 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let bundle = b.state.join("containers").join(&id);
        expect_nobody_locked_out(&b, &bundle)?;
        expect_private_layout(&b, &bundle)?;

        // An install made with wider modes is tightened at the next start.
        b.kill9()?;
        for d in [
            &b.root,
            &b.state,
            &b.root.join("snapshots"),
            &b.state.join("containers"),
        ] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        for f in [b.root.join("meta.redb"), bundle.join("config.json")] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644))?;
        }
        b.restart()?;
        let mut c = b.client().await?;
        expect_nobody_locked_out(&b, &bundle)?;
        expect_private_layout(&b, &bundle)?;
        let (st, _) = ctr_status(&mut c, &id).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "the container did not survive the restart: {st:?}"
        );
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "private")?;
        Ok(())
    })
}

/// A registry that answers every manifest request with an endless JSON body (chunked,
/// no length), as a hostile registry could; `/v2/` says hello. Returns its address.
fn endless_manifest_registry() -> Result<String> {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Some(first) = super::request_line(&stream) else {
                    return;
                };
                let mut out = stream;
                // Each answer closes its connection, and says so: a client must not
                // reuse it.
                if !first.contains("/manifests/") {
                    let _ = out.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                    );
                    return;
                }
                let _ = out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nTransfer-Encoding: chunked\r\n\r\n");
                let chunk = [b' '; 64 * 1024];
                let framed = [
                    format!("{:x}\r\n", chunk.len()).into_bytes(),
                    chunk.to_vec(),
                    b"\r\n".to_vec(),
                ]
                .concat();
                // Up to 1 GiB, until berthd hangs up.
                for _ in 0..(1 << 30) / chunk.len() {
                    if out.write_all(&framed).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// A layer whose PAX record says size=0 before a file header claiming 2^40 bytes, then a
/// 1 GiB GNU long-name entry (which the tar crate would read whole), and a 1 GiB
/// manifest: both refused with a clear error while berthd stays small.
pub fn hostile_layers_and_manifests_are_refused() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut blocks = Vec::new();
        let pax_record = "10 size=0\n"; // "LEN key=value\n", LEN counting itself
        let mut h = tar::Header::new_ustar();
        h.set_path("PaxHeaders/f").map_err(|e| anyhow!("{e}"))?;
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(pax_record.len() as u64);
        h.set_cksum();
        blocks.extend(h.as_bytes());
        let mut body = pax_record.as_bytes().to_vec();
        body.resize(512, 0);
        blocks.extend(body);
        let mut f = tar::Header::new_ustar();
        f.set_path("f").map_err(|e| anyhow!("{e}"))?;
        f.set_mode(0o644);
        f.set_uid(0);
        f.set_gid(0);
        f.set_mtime(0);
        f.set_size(1 << 40);
        f.set_cksum();
        blocks.extend(f.as_bytes());
        let mut long = tar::Header::new_gnu();
        long.set_path("././@LongLink").map_err(|e| anyhow!("{e}"))?;
        long.set_entry_type(tar::EntryType::GNULongName);
        long.set_size(1 << 30);
        long.set_cksum();
        blocks.extend(long.as_bytes());
        blocks.extend(vec![b'a'; 128 << 20]); // the tar crate would hold all of it
        let image = ImageBuilder::new()
            .layer(
                LayerBuilder::new().verbatim_blocks(blocks),
                Compression::Gzip,
            )
            .push(w.reg.addr(), "test/pax-bomb", "1", None)
            .await?;
        let mut c = b.client().await?;
        let err = pull(&mut c, &image.reference)
            .await
            .expect_err("a hostile layer must be refused");
        ensure!(
            err.message().contains("limit"),
            "{:?}: {}",
            err.code(),
            err.message()
        );
        let registry = endless_manifest_registry()?;
        let err = pull(&mut c, &format!("{registry}/evil/endless:1"))
            .await
            .expect_err("a 1 GiB manifest must be refused");
        ensure!(
            err.message().contains("too large"),
            "{:?}: {}",
            err.code(),
            err.message()
        );
        // Nothing half-pulled, and berthd's peak memory stayed small.
        ensure!(snapshots_on_disk(&b)?.is_empty(), "a snapshot was left");
        let peak = b.peak_rss_kib().context("berthd's VmHWM")?;
        ensure!(peak < 64 << 10, "berthd's peak RSS was {} MiB", peak >> 10);
        c.runtime.version(cri::VersionRequest::default()).await?;
        Ok(())
    })
}

/// Lets this process hold as many fds as its hard limit allows.
fn raise_fd_limit() -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the one struct passed.
    let ok = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
        }
    };
    ensure!(
        ok,
        "raising RLIMIT_NOFILE: {}",
        std::io::Error::last_os_error()
    );
    ensure!(
        lim.rlim_cur > 12_000,
        "the fd limit {} is below 12000",
        lim.rlim_cur
    );
    Ok(())
}

/// An exec URL for `script` in `ctr`, with stdin.
async fn exec_url(c: &mut CriClient, ctr: &str, script: &str) -> Result<String> {
    Ok(c.runtime
        .exec(cri::ExecRequest {
            container_id: ctr.into(),
            cmd: vec!["/bin/sh".into(), "-c".into(), script.into()],
            tty: false,
            stdin: true,
            stdout: true,
            stderr: true,
        })
        .await?
        .into_inner()
        .url)
}

/// Runs an exec session at `url` with `stdin`; its exit code and stdout.
async fn exec_session<I>(url: &str, stdin: I) -> Result<(i32, Vec<u8>)>
where
    I: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    let (mut out_r, out_w) = tokio::io::duplex(1 << 16);
    let reading = tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut out_r, &mut out).await;
        out
    });
    let code = berth_stream::client::run_command(
        url,
        berth_stream::client::CommandIo {
            stdin: Some(stdin),
            stdout: Some(out_w),
            stderr: Some(tokio::io::sink()),
            tty: false,
            resize: None,
        },
    )
    .await?;
    Ok((code, reading.await?))
}

/// A streaming client opening 10 000 connections (half of them sending a request's
/// first header lines and stopping), then pushing 1 GiB of stdin through one
/// session and as much as it can into a process that never reads: berthd stays
/// under 64 MiB and a session opened before, and one opened after, both work.
pub fn streaming_floods_leave_berthd_small() -> Result<(), Failed> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("flood", "fl-1", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let sleeper = container_config("app", &w.busybox.reference, "exec sleep 3600");
        let ctr = create_and_start(&mut c, &pod, &pod_cfg, sleeper).await?;

        // Session A: an interactive cat, checked before, during and after.
        let url = exec_url(&mut c, &ctr, "exec busybox cat").await?;
        let (mut to_cat, cat_in) = tokio::io::duplex(1 << 16);
        let (out_r, out_w) = tokio::io::duplex(1 << 16);
        let session_a = tokio::spawn(async move {
            berth_stream::client::run_command(
                &url,
                berth_stream::client::CommandIo {
                    stdin: Some(cat_in),
                    stdout: Some(out_w),
                    stderr: Some(tokio::io::sink()),
                    tty: false,
                    resize: None,
                },
            )
            .await
        });
        let mut from_cat = tokio::io::BufReader::new(out_r);
        let mut echo = async |line: &str| -> Result<()> {
            to_cat.write_all(format!("{line}\n").as_bytes()).await?;
            let mut got = String::new();
            tokio::time::timeout(Duration::from_secs(30), from_cat.read_line(&mut got)).await??;
            ensure!(
                got == format!("{line}\n"),
                "session A echoed {got:?} for {line:?}"
            );
            Ok(())
        };
        echo("before").await.context("session A before")?;

        let before = b.rss_kib().context("berthd's VmRSS")?;
        // 10 000 connections, held open.
        raise_fd_limit()?;
        let base = c
            .runtime
            .exec(cri::ExecRequest {
                container_id: ctr.clone(),
                cmd: vec!["true".into()],
                stdout: true,
                ..Default::default()
            })
            .await
            .context("an exec URL")?
            .into_inner()
            .url;
        let addr = base
            .strip_prefix("http://")
            .and_then(|r| r.split('/').next())
            .context("streaming address")?
            .to_string();
        let flood = tokio::task::spawn_blocking(move || -> Result<Vec<std::net::TcpStream>> {
            let mut held = Vec::with_capacity(10_000);
            for i in 0..10_000 {
                let mut s = std::net::TcpStream::connect(&addr)?;
                if i % 2 == 0 {
                    let _ =
                        std::io::Write::write_all(&mut s, b"GET /exec/x HTTP/1.1\r\nHost: a\r\n");
                }
                held.push(s);
            }
            Ok(held)
        })
        .await?
        .context("the flood")?;
        echo("during the flood")
            .await
            .context("session A during the flood")?;
        let during = b.rss_kib().context("berthd's VmRSS")?;

        // 1 GiB of stdin through a session whose process reads it all.
        let url = exec_url(&mut c, &ctr, "busybox wc -c")
            .await
            .context("an exec URL during the flood")?;
        let t0 = std::time::Instant::now();
        let (code, out) = exec_session(&url, tokio::io::repeat(b'z').take(1 << 30))
            .await
            .context("1 GiB of stdin")?;
        let took = t0.elapsed();
        ensure!(
            code == 0 && String::from_utf8_lossy(&out).trim() == (1u64 << 30).to_string(),
            "1 GiB through stdin: {code} {:?}",
            String::from_utf8_lossy(&out)
        );
        eprintln!("1 GiB of stdin in {took:?}; berthd RSS {during} KiB during the flood");
        // And into a process that never reads: the client is held back, not buffered.
        let url = exec_url(&mut c, &ctr, "exec sleep 3600").await?;
        let stuck = tokio::time::timeout(
            Duration::from_secs(3),
            exec_session(&url, tokio::io::repeat(b'z').take(1 << 30)),
        )
        .await;
        ensure!(
            stuck.is_err(),
            "a process that reads nothing took 1 GiB: {stuck:?}"
        );
        let burst = b.rss_kib().context("berthd's VmRSS")?;
        echo("after the burst")
            .await
            .context("session A after the burst")?;
        drop(flood);

        // A new session works, and the old one still does.
        let url = exec_url(&mut c, &ctr, "busybox tr a-z A-Z").await?;
        let (code, out) = exec_session(&url, &b"fresh\n"[..])
            .await
            .context("a new session after the flood")?;
        ensure!(
            code == 0 && out == b"FRESH\n",
            "a new session: {code} {out:?}"
        );
        echo("at the end").await.context("session A at the end")?;
        drop(to_cat);
        let code = tokio::time::timeout(Duration::from_secs(10), session_a).await???;
        ensure!(code == 0, "session A ended with {code}");
        let peak = b.peak_rss_kib().context("berthd's VmHWM")?;
        eprintln!(
            "berthd RSS: {before} KiB before, {during} KiB in the flood, {burst} KiB after the bursts, peak {peak} KiB"
        );
        ensure!(peak < 64 << 10, "berthd's peak RSS was {} MiB", peak >> 10);
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "flood")?;
        Ok(())
    })
}
