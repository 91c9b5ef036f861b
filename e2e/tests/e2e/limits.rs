//! Reliability at the edges: execs end with their callers, requests are bounded and
//! checked up front, a failed start is explained, image references follow one rule.

use super::*;

fn endless_exec(id: &str, marker: &str) -> cri::ExecSyncRequest {
    cri::ExecSyncRequest {
        container_id: id.into(),
        cmd: vec!["busybox".into(), "sleep".into(), marker.into()],
        timeout: 0,
    }
}

/// ExecSync with no timeout (`timeout = 0`) runs only as long as someone waits for it:
/// a caller whose deadline passes, a caller that hangs up and a berthd killed with -9
/// each leave no process behind, and the container runs on.
pub fn exec_sync_ends_with_its_caller() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let mut b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("abandon", "c-ab", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let cfg = container_config("svc", &w.busybox.reference, "exec sleep 3600");
        let id = create_and_start(&mut c, &pod, &pod_cfg, cfg).await?;
        // Unique sleep lengths, so that the test finds exactly its own processes.
        let base = 4_000_000 + u64::from(std::process::id() % 100_000) * 10;
        let marker = |what: &str| {
            let n = match what {
                "deadline" => 1,
                "hangup" => 2,
                _ => 3,
            };
            (base + n).to_string()
        };

        // A deadline (grpc-timeout) that passes.
        let m = marker("deadline");
        let mut req = tonic::Request::new(endless_exec(&id, &m));
        // Long enough for a loaded machine to start it before the deadline passes.
        req.set_timeout(Duration::from_secs(15));
        let mut cc = c.clone();
        let call = tokio::spawn(async move { cc.runtime.exec_sync(req).await });
        wait_until("the exec runs", || process_with(&m)).await?;
        let answer = call.await?;
        ensure!(
            answer
                .as_ref()
                .is_err_and(|s| matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled)),
            "{answer:?}"
        );
        wait_until("the exec with a passed deadline is gone", || {
            !process_with(&m)
        })
        .await?;

        // A caller that hangs up (its own connection, dropped mid-call).
        let m = marker("hangup");
        let mut other = b.client().await?;
        let req = endless_exec(&id, &m);
        let call = tokio::spawn(async move { other.runtime.exec_sync(req).await });
        wait_until("the exec runs", || process_with(&m)).await?;
        call.abort();
        let _ = call.await;
        wait_until("the exec of a caller that hung up is gone", || {
            !process_with(&m)
        })
        .await?;

        // berthd killed: the shim ends what only berthd was waiting for.
        let m = marker("berthd");
        let mut cc = c.clone();
        let req = endless_exec(&id, &m);
        let call = tokio::spawn(async move { cc.runtime.exec_sync(req).await });
        wait_until("the exec runs", || process_with(&m)).await?;
        b.kill9()?;
        let _ = call.await;
        wait_until("the exec of a dead berthd is gone", || !process_with(&m)).await?;
        b.restart()?;
        let mut c = b.client().await?;
        let (st, _) = ctr_status(&mut c, &id).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerRunning as i32,
            "the container did not run on: {st:?}"
        );
        let (code, out, _) = exec_in(&mut c, &id, &["/bin/sh", "-c", "echo still-here"]).await?;
        ensure!(code == 0 && out == "still-here\n", "{code} {out:?}");
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "abandon")?;
        Ok(())
    })
}

fn expect_invalid<T: std::fmt::Debug>(r: Result<T, tonic::Status>, field: &str) -> Result<()> {
    let s = match r {
        Ok(v) => bail!("accepted, expected an error naming {field}: {v:?}"),
        Err(s) => s,
    };
    ensure!(
        s.code() == Code::InvalidArgument && s.message().contains(field),
        "expected InvalidArgument naming {field}, got {:?}: {}",
        s.code(),
        &s.message()[..s.message().len().min(300)]
    );
    ensure!(
        s.message().len() < 1024,
        "a {}-byte message",
        s.message().len()
    );
    Ok(())
}

/// RunPodSandbox's limits (names as Kubernetes bounds them, port mappings that are ports,
/// protocols and addresses): refused up front, nothing made.
async fn pod_limits(c: &mut CriClient, base: &cri::PodSandboxConfig) -> Result<()> {
    let with = |f: &dyn Fn(&mut cri::PodSandboxConfig)| {
        let mut p = base.clone();
        f(&mut p);
        p
    };
    for (cfg, field) in [
        (
            with(&|p| p.metadata.as_mut().unwrap().name = "p".repeat(254)),
            "config.metadata.name",
        ),
        (
            with(&|p| p.metadata.as_mut().unwrap().name = "p".repeat(1 << 20)),
            "config.metadata.name",
        ),
        (
            with(&|p| p.metadata.as_mut().unwrap().namespace = "n".repeat(64)),
            "config.metadata.namespace",
        ),
        (
            with(&|p| p.metadata.as_mut().unwrap().uid = "u".repeat(129)),
            "config.metadata.uid",
        ),
        (
            with(&|p| {
                p.annotations = (0..5000)
                    .map(|i| (format!("k{i}"), String::new()))
                    .collect()
            }),
            "config.annotations",
        ),
    ] {
        expect_invalid(run_pod(c, cfg).await, field)?;
    }
    let port = |f: &dyn Fn(&mut cri::PortMapping)| {
        let mut m = cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 80,
            host_port: 8080,
            host_ip: String::new(),
        };
        f(&mut m);
        with(&|p| p.port_mappings = vec![m.clone()])
    };
    for (cfg, field) in [
        (
            port(&|m| m.host_port = 70000),
            "config.port_mappings[0].host_port",
        ),
        (
            port(&|m| m.host_port = -1),
            "config.port_mappings[0].host_port",
        ),
        (
            port(&|m| m.container_port = 0),
            "config.port_mappings[0].container_port",
        ),
        (
            port(&|m| m.protocol = 99),
            "config.port_mappings[0].protocol",
        ),
        (
            port(&|m| m.host_ip = "999.1.1.1".into()),
            "config.port_mappings[0].host_ip",
        ),
    ] {
        expect_invalid(run_pod(c, cfg).await, field)?;
    }
    ensure!(list_pods(c).await?.is_empty(), "a refused pod was made");
    Ok(())
}

/// CreateContainer's limits: what exec would refuse, maps, a TARGET that is no
/// running container of the pod.
async fn container_limits(
    c: &mut CriClient,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    image: &str,
) -> Result<()> {
    let with = |f: &dyn Fn(&mut cri::ContainerConfig)| {
        let mut cfg = container_config("limited", image, "true");
        f(&mut cfg);
        cfg
    };
    let env = |n: usize| {
        (0..n)
            .map(|i| cri::KeyValue {
                key: format!("K{i}"),
                value: "v".repeat(100),
            })
            .collect::<Vec<_>>()
    };
    let target = |mode: &dyn Fn(&mut cri::NamespaceOption)| {
        with(&|cfg| {
            let mut ns = cri::NamespaceOption {
                pid: cri::NamespaceMode::Target as i32,
                target_id: "f".repeat(64),
                ..Default::default()
            };
            mode(&mut ns);
            cfg.linux = Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(ns),
                    ..Default::default()
                }),
                ..Default::default()
            });
        })
    };
    for (cfg, field) in [
        // 100,000 variables: an 11 MB request.
        (with(&|cfg| cfg.envs = env(100_000)), "config.envs"),
        (
            with(&|cfg| cfg.command.push("a".repeat(200 << 10))),
            "config.command[3]",
        ),
        (
            with(&|cfg| cfg.labels = (0..5000).map(|i| (i.to_string(), String::new())).collect()),
            "config.labels",
        ),
        (
            with(&|cfg| cfg.metadata.as_mut().unwrap().name = "c".repeat(300)),
            "config.metadata.name",
        ),
        (target(&|_| {}), "namespace_options.target_id"),
        (
            target(&|ns| ns.target_id.clear()),
            "namespace_options.target_id",
        ),
        (
            target(&|ns| ns.network = cri::NamespaceMode::Target as i32),
            "namespace_options.network",
        ),
    ] {
        expect_invalid(create_ctr(c, pod, pod_cfg, cfg).await, field)?;
    }
    ensure!(
        list_ctrs(c).await?.is_empty(),
        "a refused container was made"
    );
    Ok(())
}

/// Reference rules are one for all image calls: what PullImage refuses as a reference,
/// ImageStatus, RemoveImage and a ListImages filter refuse too, with a short message.
async fn reference_rules(c: &mut CriClient) -> Result<()> {
    let long = "a".repeat(100_000);
    for bad in [long.as_str(), " busybox", "Busybox:1", "busybox@sha256:abc"] {
        expect_invalid(pull(c, bad).await, "image reference")?;
        let st = c
            .image
            .image_status(cri::ImageStatusRequest {
                image: spec(bad),
                verbose: false,
            })
            .await;
        expect_invalid(st, "image reference")?;
        expect_invalid(remove(c, bad).await, "image reference")?;
        let listed = c
            .image
            .list_images(cri::ListImagesRequest {
                filter: Some(cri::ImageFilter { image: spec(bad) }),
            })
            .await;
        expect_invalid(listed, "image reference")?;
    }
    // A valid reference to an image that is not here: empty status, removal succeeds.
    let absent = "127.0.0.1:1/berth/absent:tag";
    ensure!(status(c, absent, false).await?.image.is_none());
    remove(c, absent).await?;
    Ok(())
}

/// Requests past berth's limits get InvalidArgument naming the field, fast and with a
/// short message; within them, a container with 65,000 variables runs; a TARGET PID
/// namespace is the target's; image references follow one rule.
pub fn requests_are_bounded_and_checked() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let b = Berthd::start("")?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("limits", "c-lim", &logs);
        pod_limits(&mut c, &pod_cfg).await?;
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        container_limits(&mut c, &pod, &pod_cfg, &w.busybox.reference).await?;
        // Up to the limit, a container gets every variable.
        let mut many = container_config("many", &w.busybox.reference, "env | wc -l");
        // Close to both limits: 65,000 variables in 1.8 MB.
        many.envs = (0..65_000)
            .map(|i| cri::KeyValue {
                key: format!("VAR_{i}"),
                value: "x".repeat(8),
            })
            .collect();
        let t = std::time::Instant::now();
        let id = create_and_start(&mut c, &pod, &pod_cfg, many).await?;
        println!("65,000 variables: created and started in {:?}", t.elapsed());
        let st = wait_exited(&mut c, &id).await?;
        ensure!(st.exit_code == 0, "{st:?}");
        let lines = log_lines(Path::new(&st.log_path))?;
        let count: usize = lines
            .first()
            .map(|l| l.2.trim().parse())
            .transpose()?
            .unwrap_or(0);
        ensure!(count >= 65_000, "the container saw {count} variables");
        // TARGET: the debug container is in the target's PID namespace, as its PID 1 shows.
        let own_pid = |cfg: &mut cri::ContainerConfig, ns: cri::NamespaceOption| {
            cfg.linux = Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(ns),
                    ..Default::default()
                }),
                ..Default::default()
            });
        };
        let mut app = container_config("app", &w.busybox.reference, "exec sleep 3600");
        own_pid(
            &mut app,
            cri::NamespaceOption {
                pid: cri::NamespaceMode::Container as i32,
                ..Default::default()
            },
        );
        let app = create_and_start(&mut c, &pod, &pod_cfg, app).await?;
        let mut debug = container_config("debug", &w.busybox.reference, "cat /proc/1/cmdline");
        own_pid(
            &mut debug,
            cri::NamespaceOption {
                pid: cri::NamespaceMode::Target as i32,
                target_id: app.clone(),
                ..Default::default()
            },
        );
        let debug = create_and_start(&mut c, &pod, &pod_cfg, debug).await?;
        let st = wait_exited(&mut c, &debug).await?;
        let out = std::fs::read_to_string(&st.log_path)?;
        ensure!(
            out.contains("sleep\u{0}3600"),
            "PID 1 of the debug container: {out:?}"
        );
        c.runtime
            .stop_container(cri::StopContainerRequest {
                container_id: app.clone(),
                timeout: 0,
            })
            .await?;
        let mut late = container_config("late", &w.busybox.reference, "true");
        own_pid(
            &mut late,
            cri::NamespaceOption {
                pid: cri::NamespaceMode::Target as i32,
                target_id: app.clone(),
                ..Default::default()
            },
        );
        expect_code(
            create_ctr(&mut c, &pod, &pod_cfg, late).await,
            Code::FailedPrecondition,
            "not running",
        )?;
        // ExecSync's argv is bounded as a container's.
        let big = cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["echo".into(), "b".repeat(200 << 10)],
            timeout: 1,
        };
        expect_invalid(c.runtime.exec_sync(big).await, "cmd[1]")?;
        reference_rules(&mut c).await?;
        // berthd served all of that without growing without bound.
        let rss = b.rss_kib().unwrap_or(0);
        println!("berthd RSS after the oversized requests: {rss} KiB");
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "limits")?;
        Ok(())
    })
}

/// A start the runtime refuses leaves an exited container that says why: 128,
/// `StartError` and the runtime's error, as containerd records it; its task is gone.
pub fn failed_start_is_explained() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let dir = tempfile::tempdir()?;
        let script = dir.path().join("refuses-start.sh");
        write_script(
            &script,
            "#!/bin/sh\nfor a; do [ \"$a\" = start ] && { echo 'stand-in runtime: start refused' >&2; exit 1; }; done\nexec runc \"$@\"\n",
        )?;
        let b = Berthd::start(&format!(
            "[runtimes.refuses]\npath = \"{}\"\n",
            script.display()
        ))?;
        let mut c = b.client().await?;
        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let pod_cfg = container_pod("startfail", "c-sf", &logs);
        let pod = run_pod_on(&mut c, &pod_cfg, "refuses").await?;
        let cfg = container_config("app", &w.busybox.reference, "exec sleep 3600");
        let id = create_ctr(&mut c, &pod, &pod_cfg, cfg).await?;
        let (_, info) = ctr_status(&mut c, &id).await?;
        let init = info["pid"]
            .as_u64()
            .context("no pid in the created container's info")?;
        ensure!(
            alive(init),
            "the created container's init {init} is not there"
        );
        let started = c.runtime.start_container(start(&id)).await;
        ensure!(started.is_err(), "the start was not refused");
        let (st, _) = ctr_status(&mut c, &id).await?;
        ensure!(
            st.state == cri::ContainerState::ContainerExited as i32
                && st.exit_code == 128
                && st.reason == "StartError"
                && st.message.contains("start refused"),
            "{st:?}"
        );
        ensure!(st.finished_at > 0, "{st:?}");
        wait_until("the refused container's init is gone", || !alive(init)).await?;
        remove_pod(&mut c, &pod).await?;
        // A start that succeeds but whose exec then fails (a script's interpreter is
        // missing: runc's own check at create only sees the script): the runtime's
        // init says why on stderr and exits (1 with runc 1.1). The status says so too, also after a
        // restart of berthd; a process that runs and fails keeps a plain `Error`.
        let app = dir.path().join("app.sh");
        write_script(&app, "#!/no/such/interpreter\nexit 0\n")?;
        let pod_cfg = container_pod("startfail", "c-ef", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let mut cfg = container_config("app", &w.busybox.reference, "");
        cfg.command = vec!["/app.sh".into()];
        cfg.mounts.push(cri::Mount {
            container_path: "/app.sh".into(),
            host_path: app.display().to_string(),
            readonly: true,
            ..Default::default()
        });
        let bad = create_and_start(&mut c, &pod, &pod_cfg, cfg).await?;
        let plain = create_and_start(
            &mut c,
            &pod,
            &pod_cfg,
            container_config("plain", &w.busybox.reference, "echo failing >&2; exit 1"),
        )
        .await?;
        let st = wait_exited(&mut c, &bad).await?;
        // runc 1.1's init exits 1 here, 1.2's 255.
        ensure!(
            (st.exit_code == 1 || st.exit_code == 255)
                && st.reason == "StartError"
                && st.message.starts_with("exec failed: ")
                && st.message.contains("no such file or directory"),
            "{st:?}"
        );
        let st = wait_exited(&mut c, &plain).await?;
        ensure!(
            st.exit_code == 1 && st.reason == "Error" && st.message.is_empty(),
            "{st:?}"
        );
        let mut b = b;
        b.kill9()?;
        b.restart()?;
        let mut c = b.client().await?;
        let (st, _) = ctr_status(&mut c, &bad).await?;
        ensure!(
            st.reason == "StartError" && st.message.starts_with("exec failed"),
            "after a restart: {st:?}"
        );
        remove_pod(&mut c, &pod).await?;
        assert_no_pod_leftovers(&b, "startfail")?;
        Ok(())
    })
}
