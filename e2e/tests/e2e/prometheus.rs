//! The Prometheus endpoint, scraped by curl as a scraper would: every family is there
//! from the start, and the figures follow what the test does (calls, pods and
//! containers by state, a pull, an OOM kill, a shim killed under a ready pod).

use super::*;

/// `GET http://127.0.0.1:<port><path>` with curl: (HTTP status, body).
fn curl(port: u16, method: &str, path: &str) -> Result<(u16, String)> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            "--max-time",
            "10",
        ])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .context("running curl")?;
    ensure!(out.status.success(), "curl: {out:?}");
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text.rsplit_once('\n').context("no status from curl")?;
    Ok((code.trim().parse()?, body.to_string()))
}

/// The value of the sample `series` (name with its labels, as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn scrape(port: u16) -> Result<String> {
    let (code, body) = curl(port, "GET", "/metrics")?;
    ensure!(code == 200, "GET /metrics: {code} {body}");
    ensure!(body.ends_with("# EOF\n"), "not OpenMetrics text: {body}");
    Ok(body)
}

/// Waits until the scraped `series` has `want`; the last scrape otherwise.
async fn until_sample(port: u16, series: &str, want: f64) -> Result<String> {
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape(port)?;
        if sample(&text, series) == Some(want) {
            return Ok(text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{series} never reached {want}:\n{text}")
}

pub fn prometheus_endpoint_serves_metrics() -> Result<(), Failed> {
    run(|| async {
        let w = world();
        let _cg = CgroupParentGuard(Some("prom"));
        let port = free_port()?;
        let b = Berthd::start(&format!("[metrics]\naddress = \"127.0.0.1:{port}\"\n"))?;
        let mut c = b.client().await?;
        let fresh = scrape(port)?;
        for series in [
            "berth_pods{state=\"ready\"}",
            "berth_containers{state=\"running\"}",
            "berth_image_pull_bytes_total",
            "berth_image_pull_failures_total",
            "berth_shim_deaths_total",
            "berth_oom_kills_total",
        ] {
            ensure!(sample(&fresh, series) == Some(0.0), "{series} in\n{fresh}");
        }
        ensure!(curl(port, "GET", "/")?.0 == 404 && curl(port, "POST", "/metrics")?.0 == 405);

        pull(&mut c, &w.busybox.reference).await?;
        let logs = b.dir().join("logs");
        let trigger = b.dir().join("trigger");
        std::fs::create_dir_all(&trigger)?;
        let pod_cfg = container_pod("prom", "prom-1", &logs);
        let pod = run_pod(&mut c, pod_cfg.clone()).await?;
        let img = &w.busybox.reference;
        let app = container_config("app", img, "exec sleep 100000");
        create_and_start(&mut c, &pod, &pod_cfg, app).await?;
        let hog = with_memory_limit(
            with_trigger(
                container_config("hog", img, &alloc_script("hog", 64, false)),
                &trigger,
            ),
            32 << 20,
        );
        let hog = create_and_start(&mut c, &pod, &pod_cfg, hog).await?;
        std::fs::write(trigger.join("hog"), "")?;
        let st = wait_exited(&mut c, &hog).await?;
        ensure!(st.reason == "OOMKilled", "{st:?}");
        let unknown = c
            .runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: "0123456789ab".into(),
                verbose: false,
            })
            .await;
        ensure!(unknown.is_err(), "status of an unknown container");
        let text = until_sample(port, "berth_oom_kills_total", 1.0).await?;
        let layers: u64 = w.busybox.layer_sizes.iter().sum();
        for (series, want) in [
            (
                "berth_grpc_request_duration_seconds_count{service=\"runtime\",method=\"RunPodSandbox\"}",
                1.0,
            ),
            (
                "berth_grpc_request_duration_seconds_count{service=\"runtime\",method=\"CreateContainer\"}",
                2.0,
            ),
            (
                "berth_grpc_request_duration_seconds_count{service=\"image\",method=\"PullImage\"}",
                1.0,
            ),
            (
                "berth_grpc_requests_in_flight{service=\"runtime\",method=\"RunPodSandbox\"}",
                0.0,
            ),
            (
                "berth_grpc_requests_total{service=\"runtime\",method=\"RunPodSandbox\",code=\"OK\"}",
                1.0,
            ),
            (
                "berth_grpc_requests_total{service=\"runtime\",method=\"ContainerStatus\",code=\"NotFound\"}",
                1.0,
            ),
            ("berth_pods{state=\"ready\"}", 1.0),
            ("berth_containers{state=\"running\"}", 1.0),
            ("berth_containers{state=\"exited\"}", 1.0),
            ("berth_image_pull_duration_seconds_count", 1.0),
            ("berth_image_pull_bytes_total", layers as f64),
        ] {
            ensure!(
                sample(&text, series) == Some(want),
                "{series} is not {want} in\n{text}"
            );
        }

        // The pod's shim killed: the pod goes NotReady and the death is counted.
        let (_, info) = pod_status(&mut c, &pod).await?;
        let infra = info["pid"].as_u64().context("verbose pid")?;
        let stat = std::fs::read_to_string(format!("/proc/{infra}/stat"))?;
        let shim: i32 = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .context("infra's parent")?;
        let cmd = std::fs::read(format!("/proc/{shim}/cmdline"))?;
        ensure!(
            String::from_utf8_lossy(&cmd).contains("berth-shim"),
            "{shim} is no shim"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shim),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let text = until_sample(port, "berth_shim_deaths_total", 1.0).await?;
        ensure!(
            sample(&text, "berth_pods{state=\"notready\"}") == Some(1.0),
            "{text}"
        );

        remove_pod(&mut c, &pod).await?;
        let text = until_sample(port, "berth_pods{state=\"notready\"}", 0.0).await?;
        ensure!(
            sample(&text, "berth_containers{state=\"exited\"}") == Some(0.0),
            "{text}"
        );
        assert_no_pod_leftovers(&b, "prom")?;
        Ok(())
    })
}
