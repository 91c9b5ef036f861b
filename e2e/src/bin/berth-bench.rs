//! berth-bench: measures a CRI runtime through its socket, so berth and containerd
//! can be compared side by side. `push` puts the benchmark images into a registry;
//! `run` measures one runtime; `compare` prints the ratios of two `run` results.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use berth_e2e::berthd::CriClient;
use berth_e2e::calls;
use berth_e2e::testimages::{Compression, ImageBuilder, LayerBuilder, large_layers};
use clap::{Parser, Subcommand};
use k8s_cri::v1 as cri;
use serde::{Deserialize, Serialize};

#[path = "berth-bench/node.rs"]
mod node;

#[derive(Parser)]
#[command(about = "Benchmark a CRI runtime (berth, containerd, ...) through its socket")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the benchmark images from generated data and push them (idempotent).
    Push {
        /// Registry host:port (plain http, loopback).
        #[arg(long, default_value = "127.0.0.1:5000")]
        registry: String,
    },
    /// Measure one runtime.
    Run {
        #[command(flatten)]
        target: Target,
        /// Daemon pid whose RSS is sampled during the pull (berthd or containerd).
        #[arg(long)]
        daemon_pid: Option<u32>,
        /// Cold pulls of the large image.
        #[arg(long, default_value_t = 3)]
        pull_runs: usize,
        /// Iterations of the status/list latency loops.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// `../shared/tools/pullfloor.py`: run it after each pull, the same image and
        /// registry, and report the pull against that floor.
        #[arg(long)]
        pull_floor: Option<PathBuf>,
    },
    /// Print ratios of two `run --json` results (first / second).
    Compare { first: PathBuf, second: PathBuf },
    /// Measure pod and container lifecycle latency, concurrency and memory.
    Pods {
        #[command(flatten)]
        target: Target,
        /// Daemon pid for RSS figures.
        #[arg(long)]
        daemon_pid: Option<u32>,
        /// Lifecycle iterations.
        #[arg(long, default_value_t = 50)]
        iterations: usize,
        /// Pods held at once for the memory figures.
        #[arg(long, default_value_t = 50)]
        hold: usize,
        /// Also time bare `runc create`+`start` / `delete -f` of the same image (the floor).
        #[arg(long)]
        runc_floor: bool,
    },
    /// Print ratios of two `pods --json` results (first / second).
    ComparePods { first: PathBuf, second: PathBuf },
    /// A node at kubelet's scale: pods started 10-way and all at once, the steady
    /// state (RSS, idle CPU, List* latency), teardown, drift over create/remove cycles.
    Node {
        #[command(flatten)]
        target: Target,
        /// Daemon pid for RSS and CPU figures.
        #[arg(long)]
        daemon_pid: Option<u32>,
        /// Pods (kubelet's default maximum is 110).
        #[arg(long, default_value_t = 110)]
        pods: usize,
        /// Seconds the pods sit idle while CPU is measured.
        #[arg(long, default_value_t = 60)]
        idle_seconds: u64,
        /// Whole pod lifecycles for the drift figures.
        #[arg(long, default_value_t = 200)]
        cycles: usize,
    },
    /// Print ratios of two `node --json` results (first / second).
    CompareNode { first: PathBuf, second: PathBuf },
    /// Measure ListContainerStats / ListPodSandboxStats with `pods` running pods.
    Stats {
        #[command(flatten)]
        target: Target,
        /// Pods (one running container each) present while measuring.
        #[arg(long, default_value_t = 50)]
        pods: usize,
        /// Calls of each RPC.
        #[arg(long, default_value_t = 100)]
        iterations: usize,
    },
    /// Print ratios of two `stats --json` results (first / second).
    CompareStats { first: PathBuf, second: PathBuf },
    /// Measure ExecSync and a streaming exec round trip (CRI Exec + SPDY session).
    Exec {
        #[command(flatten)]
        target: Target,
        /// Calls of each.
        #[arg(long, default_value_t = 100)]
        iterations: usize,
    },
    /// Print ratios of two `exec --json` results (first / second).
    CompareExec { first: PathBuf, second: PathBuf },
    /// Stop and remove every pod in the `bench` namespace (after an interrupted run).
    Clean {
        /// CRI endpoint.
        #[arg(long)]
        endpoint: String,
    },
}

/// The runtime a measurement is of, and where its result goes.
#[derive(clap::Args)]
struct Target {
    /// CRI endpoint, e.g. unix:///run/berth/berth.sock.
    #[arg(long)]
    endpoint: String,
    /// Registry host:port holding the images of `push`.
    #[arg(long, default_value = "127.0.0.1:5000")]
    registry: String,
    /// Name for this runtime in the output.
    #[arg(long)]
    label: String,
    /// Write the result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Prints a result and writes it as JSON where asked.
fn report<R: Serialize>(r: &R, print: impl Fn(&R), json: &Option<PathBuf>) -> Result<()> {
    print(r);
    if let Some(p) = json {
        std::fs::write(p, serde_json::to_vec_pretty(r)?)?;
    }
    Ok(())
}

/// Two `--json` results, to compare.
fn read_pair<R: serde::de::DeserializeOwned>(first: &PathBuf, second: &PathBuf) -> Result<(R, R)> {
    let read = |p: &PathBuf| -> Result<R> { Ok(serde_json::from_slice(&std::fs::read(p)?)?) };
    Ok((read(first)?, read(second)?))
}

const LARGE_REPO: &str = "berth-bench/large";
const LARGE_BYTES: u64 = 200 << 20;
const LARGE_LAYERS: usize = 6;
const SMALL_IMAGES: usize = 50;

fn large_image() -> ImageBuilder {
    large_layers(LARGE_BYTES, LARGE_LAYERS, 42)
        .into_iter()
        .fold(ImageBuilder::new(), |i, l| i.layer(l, Compression::Gzip))
}

const BUSYBOX_REPO: &str = "berth-bench/busybox";

fn busybox_image() -> ImageBuilder {
    let l = LayerBuilder::new()
        .dir("bin", 0o755, 0, 0)
        .add_host_file("bin/busybox", "/bin/busybox", 0o755)
        .symlink("bin/sh", "busybox")
        .symlink("bin/sleep", "busybox");
    ImageBuilder::new()
        .layer(l, Compression::Gzip)
        .cmd(&["/bin/sh"])
}

fn small_image(i: usize) -> ImageBuilder {
    let l = LayerBuilder::new().file(&format!("small-{i}"), format!("image {i}\n"), 0o644, 0, 0);
    ImageBuilder::new().layer(l, Compression::Gzip)
}

fn small_ref(registry: &str, i: usize) -> String {
    format!("{registry}/berth-bench/small-{i:02}:1")
}

/// Latency summary in milliseconds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default)]
struct Latency {
    p50: f64,
    p90: f64,
    p99: f64,
    n: usize,
}

fn latency(mut samples: Vec<Duration>) -> Latency {
    samples.sort();
    let pick = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e3
    };
    Latency {
        p50: pick(0.5),
        p90: pick(0.9),
        p99: pick(0.99),
        n: samples.len(),
    }
}

/// One runtime's figures.
#[derive(Serialize, Deserialize, Debug, Default)]
struct Report {
    label: String,
    endpoint: String,
    image_bytes: u64,
    image_layers: usize,
    pull_seconds: Vec<f64>,
    pull_median_seconds: f64,
    pull_mb_per_s: f64,
    /// `pullfloor.py`'s median MB/s in the same run (`--pull-floor`).
    #[serde(default)]
    floor_mb_per_s: Option<f64>,
    #[serde(default)]
    floor_runs_mb_per_s: Vec<f64>,
    daemon_peak_rss_mib_during_pull: Option<f64>,
    image_status: Latency,
    list_images: Latency,
    images_listed: usize,
}

async fn push(registry: &str) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let big = large_image().push(registry, LARGE_REPO, "1", None).await?;
    println!(
        "pushed {} ({} MB compressed, {} layers)",
        big.reference,
        big.compressed_size / 1_000_000,
        big.layer_digests.len()
    );
    for i in 0..SMALL_IMAGES {
        small_image(i)
            .push(registry, &format!("berth-bench/small-{i:02}"), "1", None)
            .await?;
    }
    println!("pushed {SMALL_IMAGES} small images");
    let bb = busybox_image()
        .push(registry, BUSYBOX_REPO, "1", None)
        .await?;
    println!("pushed {}", bb.reference);
    Ok(())
}

/// `/proc/<pid>/<file>`, empty when the process is gone.
fn proc_file(pid: u32, file: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default()
}

/// The number after `key` (e.g. `VmRSS:`) on its line of a /proc file.
fn number_after(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn rss_kib(pid: u32) -> Option<u64> {
    number_after(&proc_file(pid, "status"), "VmRSS:")
}

async fn pull(c: &mut CriClient, image: &str) -> Result<String> {
    calls::pull(c, image)
        .await
        .with_context(|| format!("pulling {image}"))
}

async fn remove(c: &mut CriClient, image: &str) -> Result<()> {
    calls::remove_image(c, image)
        .await
        .with_context(|| format!("removing {image}"))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    endpoint: &str,
    registry: &str,
    label: &str,
    daemon_pid: Option<u32>,
    pull_runs: usize,
    iterations: usize,
    floor: Option<&Path>,
) -> Result<Report> {
    let mut c = CriClient::connect(endpoint).await?;
    let large = format!("{registry}/{LARGE_REPO}:1");
    let built = large_image().build()?;
    let image_bytes: u64 = built
        .layers
        .iter()
        .map(|l| l.data.len() as u64)
        .sum::<u64>()
        + built.config.len() as u64;
    drop(built);
    let pulls = cold_pulls(
        &mut c,
        &large,
        image_bytes,
        label,
        daemon_pid,
        pull_runs,
        floor,
    )
    .await?;
    let median = median_of(&pulls.times);

    for i in 0..SMALL_IMAGES {
        pull(&mut c, &small_ref(registry, i)).await?;
    }
    let mut st = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let req = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: small_ref(registry, i % SMALL_IMAGES),
                ..Default::default()
            }),
            verbose: false,
        };
        let t = Instant::now();
        let r = c.image.image_status(req).await?.into_inner();
        st.push(t.elapsed());
        if r.image.is_none() {
            bail!(
                "ImageStatus found no image for {}",
                small_ref(registry, i % SMALL_IMAGES)
            );
        }
    }
    let mut li = Vec::with_capacity(iterations);
    let mut listed = 0;
    for _ in 0..iterations {
        let t = Instant::now();
        let r = c
            .image
            .list_images(cri::ListImagesRequest { filter: None })
            .await?
            .into_inner();
        li.push(t.elapsed());
        listed = r.images.len();
    }
    for i in 0..SMALL_IMAGES {
        remove(&mut c, &small_ref(registry, i)).await?;
    }
    Ok(Report {
        label: label.into(),
        endpoint: endpoint.into(),
        image_bytes,
        image_layers: LARGE_LAYERS,
        pull_mb_per_s: image_bytes as f64 / 1e6 / median,
        floor_mb_per_s: (!pulls.floor_mb_per_s.is_empty())
            .then(|| median_of(&pulls.floor_mb_per_s)),
        floor_runs_mb_per_s: pulls.floor_mb_per_s,
        pull_seconds: pulls.times,
        pull_median_seconds: median,
        daemon_peak_rss_mib_during_pull: pulls.peak_rss_kib.map(|k| k as f64 / 1024.0),
        image_status: latency(st),
        list_images: latency(li),
        images_listed: listed,
    })
}

/// What the cold pulls of the large image measured.
struct ColdPulls {
    times: Vec<f64>,
    peak_rss_kib: Option<u64>,
    /// `pullfloor.py`'s MB/s, one run after each pull.
    floor_mb_per_s: Vec<f64>,
}

fn median_of(v: &[f64]) -> f64 {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 0 => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        n => sorted[n / 2],
    }
}

/// Removes and pulls the large image `runs` times, sampling the daemon's RSS; with a
/// floor script, runs it after each pull so both see the same machine.
async fn cold_pulls(
    c: &mut CriClient,
    large: &str,
    image_bytes: u64,
    label: &str,
    daemon_pid: Option<u32>,
    runs: usize,
    floor: Option<&Path>,
) -> Result<ColdPulls> {
    let mut out = ColdPulls {
        times: Vec::new(),
        peak_rss_kib: None,
        floor_mb_per_s: Vec::new(),
    };
    for run in 0..runs.max(1) {
        remove(c, large).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sampler = daemon_pid.map(RssSampler::start);
        let t = Instant::now();
        pull(c, large).await?;
        let secs = t.elapsed().as_secs_f64();
        if let Some(s) = sampler {
            let m = s.stop();
            out.peak_rss_kib = Some(out.peak_rss_kib.unwrap_or(0).max(m));
        }
        eprintln!(
            "[{label}] cold pull {}: {secs:.2}s ({:.0} MB/s)",
            run + 1,
            image_bytes as f64 / 1e6 / secs
        );
        out.times.push(secs);
        if let Some(script) = floor {
            let mbs = pull_floor(script, large).await?;
            eprintln!("[{label}] pullfloor {}: {mbs:.0} MB/s", run + 1);
            out.floor_mb_per_s.push(mbs);
        }
    }
    Ok(out)
}

/// Samples a process's peak RSS every 5 ms on a thread until stopped.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0;
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(5));
            }
            max
        });
        RssSampler { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// Runs `pullfloor.py REPO TAG REGISTRY` (../shared/tools) on `image` and reads its MB/s.
async fn pull_floor(script: &Path, image: &str) -> Result<f64> {
    let (registry, rest) = image.split_once('/').context("image without registry")?;
    let (repo, tag) = rest.rsplit_once(':').context("image without tag")?;
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args([repo, tag, registry])
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}{}",
            script.display(),
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{} printed no MB/s: {text}", script.display()))
}

fn print_report(r: &Report) {
    println!("runtime {} ({})", r.label, r.endpoint);
    println!(
        "  {:<38} {:>10.1} MB in {} layers",
        "large image (compressed)",
        r.image_bytes as f64 / 1e6,
        r.image_layers
    );
    println!(
        "  {:<38} {:>10.2} s  ({:.0} MB/s)",
        "cold pull+unpack, median", r.pull_median_seconds, r.pull_mb_per_s
    );
    if let Some(f) = r.floor_mb_per_s {
        println!(
            "  {:<38} {:>10.0} MB/s (pull at {:.2}x the floor)",
            "pullfloor.py, median",
            f,
            r.pull_mb_per_s / f
        );
    }
    if let Some(m) = r.daemon_peak_rss_mib_during_pull {
        println!("  {:<38} {:>10.1} MiB", "daemon peak RSS during pull", m);
    }
    for (name, l) in [
        ("ImageStatus", r.image_status),
        ("ListImages", r.list_images),
    ] {
        println!(
            "  {:<38} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  (n={})",
            name, l.p50, l.p90, l.p99, l.n
        );
    }
    println!("  {:<38} {:>10}", "images listed", r.images_listed);
}

fn compare(a: &Report, b: &Report) {
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "metric", a.label, b.label, "ratio"
    );
    let row = |name: &str, x: f64, y: f64, unit: &str| {
        println!(
            "{:<34} {:>9.3} {unit:<2} {:>9.3} {unit:<2} {:>7.2}x",
            name,
            x,
            y,
            x / y
        );
    };
    row(
        "pull+unpack MB/s (higher better)",
        a.pull_mb_per_s,
        b.pull_mb_per_s,
        "",
    );
    for r in [a, b] {
        if let Some(f) = r.floor_mb_per_s {
            println!(
                "{:<34} {:.1} MB/s against pullfloor.py's {f:.1} MB/s: {:.2}x",
                format!("{} pull", r.label),
                r.pull_mb_per_s,
                r.pull_mb_per_s / f
            );
        }
    }
    if let (Some(x), Some(y)) = (
        a.daemon_peak_rss_mib_during_pull,
        b.daemon_peak_rss_mib_during_pull,
    ) {
        row("daemon peak RSS in pull (MiB)", x, y, "");
    }
    row(
        "ImageStatus p50 (ms)",
        a.image_status.p50,
        b.image_status.p50,
        "",
    );
    row(
        "ImageStatus p99 (ms)",
        a.image_status.p99,
        b.image_status.p99,
        "",
    );
    row(
        "ListImages p50 (ms)",
        a.list_images.p50,
        b.list_images.p50,
        "",
    );
    row(
        "ListImages p99 (ms)",
        a.list_images.p99,
        b.list_images.p99,
        "",
    );
}

/// Pod and container figures of one runtime.
#[derive(Serialize, Deserialize, Debug, Default)]
struct PodReport {
    label: String,
    run_pod_sandbox: Latency,
    create_container: Latency,
    start_container: Latency,
    create_start: Latency,
    stop_remove_container: Latency,
    stop_remove_pod: Latency,
    pod_lifecycle: Latency,
    concurrent_20_pods_seconds: f64,
    daemon_rss_idle_mib: Option<f64>,
    daemon_rss_with_pods_mib: Option<f64>,
    pods_held: usize,
    per_pod_rss_mib: f64,
    per_pod_pss_mib: f64,
    runc_create_start_floor: Option<Latency>,
    runc_delete_floor: Option<Latency>,
}

/// RSS and PSS in MiB (zeros when the process is gone).
fn smaps(pid: u32) -> (f64, f64) {
    let t = proc_file(pid, "smaps_rollup");
    let mib = |k: &str| number_after(&t, k).unwrap_or(0) as f64 / 1024.0;
    (mib("Rss:"), mib("Pss:"))
}

fn ppid(pid: u32) -> Option<u32> {
    number_after(&proc_file(pid, "status"), "PPid:").and_then(|p| u32::try_from(p).ok())
}

/// Rows of first/second ratios under a header; names padded to `width`.
struct RatioTable {
    width: usize,
}

impl RatioTable {
    fn new(width: usize, title: &str, first: &str, second: &str) -> Self {
        println!("{title:<width$} {first:>12} {second:>12} {:>8}", "ratio");
        RatioTable { width }
    }

    fn row(&self, name: &str, x: f64, y: f64) {
        let w = self.width;
        println!("{name:<w$} {x:>12.2} {y:>12.2} {:>7.2}x", x / y);
    }
}

fn pod_config(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ctr_config(image: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "c".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec!["/bin/sleep".into(), "3600".into()],
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Pod `name` in a cgroup of its own under `parent`, as kubelet gives one per pod.
fn pod_in_cgroup(name: &str, parent: &str) -> cri::PodSandboxConfig {
    let mut cfg = pod_config(name);
    if let Some(l) = cfg.linux.as_mut() {
        l.cgroup_parent = format!("/{parent}/pod-{name}");
    }
    cfg
}

async fn run_pod(c: &mut CriClient, cfg: &cri::PodSandboxConfig) -> Result<String> {
    Ok(calls::run_pod(c, cfg.clone()).await?)
}

/// Creates and starts the sleeping bench container in `pod`; returns its id.
async fn start_sleeper(
    c: &mut CriClient,
    pod: &str,
    cfg: &cri::PodSandboxConfig,
    image: &str,
) -> Result<String> {
    Ok(calls::create_and_start(c, pod, cfg, ctr_config(image)).await?)
}

async fn remove_pod(c: &mut CriClient, id: &str) -> Result<()> {
    calls::stop_pod(c, id).await?;
    calls::remove_pod(c, id).await?;
    Ok(())
}

/// Exec latency.
#[derive(Serialize, Deserialize, Debug, Default)]
struct ExecReport {
    label: String,
    exec_sync: Latency,
    streaming_exec: Latency,
}

async fn exec_bench(
    endpoint: &str,
    registry: &str,
    label: &str,
    iterations: usize,
) -> Result<ExecReport> {
    let mut c = CriClient::connect(endpoint).await?;
    let image = format!("{registry}/{BUSYBOX_REPO}:1");
    pull(&mut c, &image).await?;
    let cfg = pod_config("exec-bench");
    let pod = run_pod(&mut c, &cfg).await?;
    let result = async {
        let ctr = start_sleeper(&mut c, &pod, &cfg, &image).await?;
        let (mut sync_l, mut stream_l) = (Vec::new(), Vec::new());
        for i in 0..iterations + 3 {
            let t = Instant::now();
            let r = c
                .runtime
                .exec_sync(cri::ExecSyncRequest {
                    container_id: ctr.clone(),
                    cmd: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
                    timeout: 10,
                })
                .await?
                .into_inner();
            let d = t.elapsed();
            anyhow::ensure!(
                r.exit_code == 0 && r.stdout == b"hi\n",
                "ExecSync answered {r:?}"
            );
            if i >= 3 {
                sync_l.push(d);
            }
        }
        for i in 0..iterations + 3 {
            let t = Instant::now();
            let url = c
                .runtime
                .exec(cri::ExecRequest {
                    container_id: ctr.clone(),
                    cmd: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
                    tty: false,
                    stdin: false,
                    stdout: true,
                    stderr: false,
                })
                .await?
                .into_inner()
                .url;
            let (mut out_r, out_w) = tokio::io::duplex(1 << 16);
            let code = berth_stream::client::run_command(
                &url,
                berth_stream::client::CommandIo {
                    stdin: None::<tokio::io::Empty>,
                    stdout: Some(out_w),
                    stderr: None::<tokio::io::Sink>,
                    tty: false,
                    resize: None,
                },
            )
            .await?;
            let d = t.elapsed();
            let mut out = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut out_r, &mut out).await?;
            anyhow::ensure!(
                code == 0 && out == "hi\n",
                "streaming exec gave {code} {out:?}"
            );
            if i >= 3 {
                stream_l.push(d);
            }
        }
        Ok::<_, anyhow::Error>((sync_l, stream_l))
    }
    .await;
    remove_pod(&mut c, &pod).await?;
    let (sync_l, stream_l) = result?;
    Ok(ExecReport {
        label: label.into(),
        exec_sync: latency(sync_l),
        streaming_exec: latency(stream_l),
    })
}

fn print_exec(r: &ExecReport) {
    println!("runtime {}", r.label);
    for (name, l) in [
        ("ExecSync", r.exec_sync),
        ("streaming exec round trip", r.streaming_exec),
    ] {
        println!(
            "  {name:<26} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms (n={})",
            l.p50, l.p90, l.p99, l.n
        );
    }
}

/// Stats latency with many pods.
#[derive(Serialize, Deserialize, Debug, Default)]
struct StatsReport {
    label: String,
    pods: usize,
    /// Entries the last call returned (checks both runtimes answer about the same set).
    containers_listed: usize,
    pods_listed: usize,
    list_container_stats: Latency,
    list_pod_sandbox_stats: Latency,
}

/// The cgroup parent the stats bench gives its pods, as kubelet gives one per pod.
const STATS_CGROUP: &str = "berth-bench-stats";

/// Removes the bench's cgroup parents in every hierarchy (deepest first; empty ones only).
fn remove_stats_cgroups() {
    calls::remove_cgroup_tree(STATS_CGROUP);
}

async fn stats_bench(
    endpoint: &str,
    registry: &str,
    label: &str,
    pods: usize,
    iterations: usize,
) -> Result<StatsReport> {
    let mut c = CriClient::connect(endpoint).await?;
    let image = format!("{registry}/{BUSYBOX_REPO}:1");
    pull(&mut c, &image).await?;
    let mut held = Vec::new();
    for i in 0..pods {
        let cfg = pod_in_cgroup(&format!("stats-{i}"), STATS_CGROUP);
        let pod = run_pod(&mut c, &cfg).await?;
        held.push(pod.clone());
        start_sleeper(&mut c, &pod, &cfg, &image).await?;
    }
    let (mut ctr_l, mut pod_l) = (Vec::new(), Vec::new());
    let (mut containers_listed, mut pods_listed) = (0, 0);
    for i in 0..iterations + 3 {
        let t = Instant::now();
        let r = c
            .runtime
            .list_container_stats(cri::ListContainerStatsRequest::default())
            .await?
            .into_inner();
        let dc = t.elapsed();
        let t = Instant::now();
        let p = c
            .runtime
            .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest::default())
            .await?
            .into_inner();
        let dp = t.elapsed();
        if i >= 3 {
            // The first calls warm caches on both sides.
            ctr_l.push(dc);
            pod_l.push(dp);
        }
        containers_listed = r.stats.len();
        pods_listed = p.stats.len();
    }
    for pod in &held {
        remove_pod(&mut c, pod).await?;
    }
    remove_stats_cgroups();
    Ok(StatsReport {
        label: label.into(),
        pods,
        containers_listed,
        pods_listed,
        list_container_stats: latency(ctr_l),
        list_pod_sandbox_stats: latency(pod_l),
    })
}

fn print_stats(r: &StatsReport) {
    println!(
        "runtime {} ({} pods; last lists had {} containers, {} pods)",
        r.label, r.pods, r.containers_listed, r.pods_listed
    );
    for (name, l) in [
        ("ListContainerStats", r.list_container_stats),
        ("ListPodSandboxStats", r.list_pod_sandbox_stats),
    ] {
        println!(
            "  {name:<24} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms (n={})",
            l.p50, l.p90, l.p99, l.n
        );
    }
}

fn compare_stats(a: &StatsReport, b: &StatsReport) {
    println!(
        "metric (p50)                    {:>10} {:>12}    ratio",
        a.label, b.label
    );
    for (name, x, y) in [
        (
            "ListContainerStats ms",
            a.list_container_stats.p50,
            b.list_container_stats.p50,
        ),
        (
            "ListPodSandboxStats ms",
            a.list_pod_sandbox_stats.p50,
            b.list_pod_sandbox_stats.p50,
        ),
    ] {
        println!("{name:<30} {x:>10.2} {y:>12.2}    {:.2}x", x / y);
    }
}

/// Removes the pods a run left behind; only the `bench` namespace, so other pods stay.
async fn clean(endpoint: &str) -> Result<()> {
    let mut c = CriClient::connect(endpoint).await?;
    let pods = c
        .runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    let mut n = 0;
    for p in pods {
        if p.metadata.as_ref().is_some_and(|m| m.namespace == "bench") {
            remove_pod(&mut c, &p.id).await?;
            n += 1;
        }
    }
    remove_stats_cgroups();
    println!("removed {n} bench pods");
    Ok(())
}

async fn infra_pid(c: &mut CriClient, id: &str) -> Result<u32> {
    let r = c
        .runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        })
        .await?
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(r.info.get("info").map(String::as_str).unwrap_or("{}"))?;
    info["pid"]
        .as_u64()
        .map(|p| p as u32)
        .context("verbose status has no pid")
}

async fn pods_bench(
    endpoint: &str,
    registry: &str,
    label: &str,
    daemon_pid: Option<u32>,
    iterations: usize,
    hold: usize,
    floor: bool,
) -> Result<PodReport> {
    let mut c = CriClient::connect(endpoint).await?;
    let image = format!("{registry}/{BUSYBOX_REPO}:1");
    pull(&mut c, &image).await?;
    let rss_idle = daemon_pid.and_then(rss_kib).map(|k| k as f64 / 1024.0);
    let (mut run_l, mut create_l, mut start_l, mut cs_l, mut stoprm_l, mut podrm_l, mut life_l) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for i in 0..iterations {
        let cfg = pod_config(&format!("bench-{i}"));
        let t0 = Instant::now();
        let pod = run_pod(&mut c, &cfg).await?;
        run_l.push(t0.elapsed());
        let t = Instant::now();
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ctr_config(&image)),
            sandbox_config: Some(cfg.clone()),
        };
        let ctr = c
            .runtime
            .create_container(req)
            .await?
            .into_inner()
            .container_id;
        create_l.push(t.elapsed());
        let t2 = Instant::now();
        c.runtime
            .start_container(cri::StartContainerRequest {
                container_id: ctr.clone(),
            })
            .await?;
        start_l.push(t2.elapsed());
        cs_l.push(t.elapsed());
        let t = Instant::now();
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
        stoprm_l.push(t.elapsed());
        let t = Instant::now();
        remove_pod(&mut c, &pod).await?;
        podrm_l.push(t.elapsed());
        life_l.push(t0.elapsed());
    }
    // 20 pods started at once.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut cc = c.clone();
        tasks.push(tokio::spawn(async move {
            run_pod(&mut cc, &pod_config(&format!("conc-{i}"))).await
        }));
    }
    let mut conc = Vec::new();
    for t in tasks {
        conc.push(t.await??);
    }
    let concurrent = t.elapsed().as_secs_f64();
    for id in &conc {
        remove_pod(&mut c, id).await?;
    }
    // Memory with `hold` pods, one sleeping container each.
    let mut held = Vec::new();
    for i in 0..hold {
        let cfg = pod_config(&format!("hold-{i}"));
        let pod = run_pod(&mut c, &cfg).await?;
        start_sleeper(&mut c, &pod, &cfg, &image).await?;
        held.push(pod);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_pods = daemon_pid.and_then(rss_kib).map(|k| k as f64 / 1024.0);
    let (mut rss, mut pss) = (0.0, 0.0);
    for pod in &held {
        let infra = infra_pid(&mut c, pod).await?;
        let shim = ppid(infra).context("infra has no parent")?;
        for p in [infra, shim] {
            let (r, s) = smaps(p);
            rss += r;
            pss += s;
        }
    }
    for pod in &held {
        remove_pod(&mut c, pod).await?;
    }
    let (floor_cs, floor_del) = if floor {
        runc_floor(iterations)?
    } else {
        (None, None)
    };
    Ok(PodReport {
        label: label.into(),
        run_pod_sandbox: latency(run_l),
        create_container: latency(create_l),
        start_container: latency(start_l),
        create_start: latency(cs_l),
        stop_remove_container: latency(stoprm_l),
        stop_remove_pod: latency(podrm_l),
        pod_lifecycle: latency(life_l),
        concurrent_20_pods_seconds: concurrent,
        daemon_rss_idle_mib: rss_idle,
        daemon_rss_with_pods_mib: rss_pods,
        pods_held: hold,
        per_pod_rss_mib: if hold > 0 { rss / hold as f64 } else { 0.0 },
        per_pod_pss_mib: if hold > 0 { pss / hold as f64 } else { 0.0 },
        runc_create_start_floor: floor_cs,
        runc_delete_floor: floor_del,
    })
}

/// `runc create`+`start` and `runc delete -f` of a busybox bundle, timed directly.
fn runc_floor(n: usize) -> Result<(Option<Latency>, Option<Latency>)> {
    let dir = tempfile::Builder::new()
        .prefix("berth-bench-runc-")
        .tempdir()?;
    let b = dir.path().join("bundle");
    std::fs::create_dir_all(b.join("rootfs/bin"))?;
    for d in ["proc", "dev", "sys"] {
        std::fs::create_dir_all(b.join("rootfs").join(d))?;
    }
    std::fs::copy("/bin/busybox", b.join("rootfs/bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", b.join("rootfs/bin/sleep"))?;
    let run = |args: &[&str]| -> Result<()> {
        let st = std::process::Command::new("runc")
            .arg("--root")
            .arg(dir.path().join("root"))
            .args(args)
            .current_dir(&b)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        if !st.success() {
            bail!("runc {args:?} failed: {st}");
        }
        Ok(())
    };
    run(&["spec"])?;
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("config.json"))?)?;
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["/bin/sleep", "3600"]);
    std::fs::write(b.join("config.json"), serde_json::to_vec(&spec)?)?;
    let (mut cs, mut del) = (vec![], vec![]);
    for i in 0..n {
        let id = format!("berth-bench-floor-{i}");
        let t = Instant::now();
        run(&["create", "--bundle", ".", &id])?;
        run(&["start", &id])?;
        cs.push(t.elapsed());
        let t = Instant::now();
        run(&["delete", "-f", &id])?;
        del.push(t.elapsed());
    }
    Ok((Some(latency(cs)), Some(latency(del))))
}

fn print_pods(r: &PodReport) {
    println!("runtime {}", r.label);
    for (n, l) in [
        ("RunPodSandbox", r.run_pod_sandbox),
        ("CreateContainer", r.create_container),
        ("StartContainer", r.start_container),
        ("Create+Start", r.create_start),
        ("Stop+Remove container", r.stop_remove_container),
        ("Stop+Remove pod", r.stop_remove_pod),
        ("whole pod lifecycle", r.pod_lifecycle),
    ] {
        println!(
            "  {n:<26} p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms (n={})",
            l.p50, l.p90, l.p99, l.n
        );
    }
    if let (Some(f), Some(d)) = (r.runc_create_start_floor, r.runc_delete_floor) {
        println!(
            "  {:<26} p50 {:>8.2} ms   (delete -f p50 {:.2} ms)",
            "runc create+start floor", f.p50, d.p50
        );
    }
    println!(
        "  {:<26} {:>8.2} s",
        "20 pods concurrently", r.concurrent_20_pods_seconds
    );
    println!(
        "  {:<26} idle {:?} MiB, with {} pods {:?} MiB",
        "daemon RSS", r.daemon_rss_idle_mib, r.pods_held, r.daemon_rss_with_pods_mib
    );
    println!(
        "  {:<26} RSS {:.2} MiB, PSS {:.2} MiB",
        "per pod (shim + infra)", r.per_pod_rss_mib, r.per_pod_pss_mib
    );
}

fn compare_pods(a: &PodReport, b: &PodReport) {
    let table = RatioTable::new(30, "metric (p50 unless said)", &a.label, &b.label);
    let row = |name: &str, x: f64, y: f64| table.row(name, x, y);
    row(
        "RunPodSandbox ms",
        a.run_pod_sandbox.p50,
        b.run_pod_sandbox.p50,
    );
    row(
        "CreateContainer ms",
        a.create_container.p50,
        b.create_container.p50,
    );
    row(
        "StartContainer ms",
        a.start_container.p50,
        b.start_container.p50,
    );
    row("Create+Start ms", a.create_start.p50, b.create_start.p50);
    row(
        "Stop+Remove container ms",
        a.stop_remove_container.p50,
        b.stop_remove_container.p50,
    );
    row(
        "whole pod lifecycle ms",
        a.pod_lifecycle.p50,
        b.pod_lifecycle.p50,
    );
    row(
        "20 concurrent pods s",
        a.concurrent_20_pods_seconds,
        b.concurrent_20_pods_seconds,
    );
    if let (Some(x), Some(y)) = (a.daemon_rss_idle_mib, b.daemon_rss_idle_mib) {
        row("daemon RSS idle MiB", x, y);
    }
    if let (Some(x), Some(y)) = (a.daemon_rss_with_pods_mib, b.daemon_rss_with_pods_mib) {
        row("daemon RSS with pods MiB", x, y);
    }
    row("per-pod RSS MiB", a.per_pod_rss_mib, b.per_pod_rss_mib);
    row("per-pod PSS MiB", a.per_pod_pss_mib, b.per_pod_pss_mib);
    if let Some(f) = a.runc_create_start_floor.or(b.runc_create_start_floor) {
        println!(
            "{:<30} {:>12.2} {:>12.2}   (create+start / runc floor {:.2} ms)",
            "Create+Start vs floor",
            a.create_start.p50 / f.p50,
            b.create_start.p50 / f.p50,
            f.p50
        );
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Push { registry } => rt.block_on(push(&registry)),
        Cmd::Run {
            target: t,
            daemon_pid,
            pull_runs,
            iterations,
            pull_floor,
        } => {
            let r = rt.block_on(run(
                &t.endpoint,
                &t.registry,
                &t.label,
                daemon_pid,
                pull_runs,
                iterations,
                pull_floor.as_deref(),
            ))?;
            report(&r, print_report, &t.json)
        }
        Cmd::Pods {
            target: t,
            daemon_pid,
            iterations,
            hold,
            runc_floor,
        } => {
            let r = rt.block_on(pods_bench(
                &t.endpoint,
                &t.registry,
                &t.label,
                daemon_pid,
                iterations,
                hold,
                runc_floor,
            ))?;
            report(&r, print_pods, &t.json)
        }
        Cmd::Node {
            target: t,
            daemon_pid,
            pods,
            idle_seconds,
            cycles,
        } => {
            let plan = node::NodePlan {
                endpoint: &t.endpoint,
                registry: &t.registry,
                label: &t.label,
                daemon_pid,
                pods,
                idle_seconds,
                cycles,
            };
            let r = rt.block_on(node::node_bench(&plan))?;
            report(&r, node::print_node, &t.json)
        }
        Cmd::CompareNode { first, second } => {
            let (a, b) = read_pair(&first, &second)?;
            node::compare_node(&a, &b);
            Ok(())
        }
        Cmd::Clean { endpoint } => rt.block_on(clean(&endpoint)),
        Cmd::Exec {
            target: t,
            iterations,
        } => {
            let r = rt.block_on(exec_bench(&t.endpoint, &t.registry, &t.label, iterations))?;
            report(&r, print_exec, &t.json)
        }
        Cmd::CompareExec { first, second } => {
            let (a, b): (ExecReport, ExecReport) = read_pair(&first, &second)?;
            println!(
                "metric (p50)                    {:>10} {:>12}    ratio",
                a.label, b.label
            );
            for (name, x, y) in [
                ("ExecSync ms", a.exec_sync.p50, b.exec_sync.p50),
                (
                    "streaming exec ms",
                    a.streaming_exec.p50,
                    b.streaming_exec.p50,
                ),
            ] {
                println!("{name:<30} {x:>10.2} {y:>12.2}    {:.2}x", x / y);
            }
            Ok(())
        }
        Cmd::Stats {
            target: t,
            pods,
            iterations,
        } => {
            let r = rt.block_on(stats_bench(
                &t.endpoint,
                &t.registry,
                &t.label,
                pods,
                iterations,
            ))?;
            report(&r, print_stats, &t.json)
        }
        Cmd::CompareStats { first, second } => {
            let (a, b) = read_pair(&first, &second)?;
            compare_stats(&a, &b);
            Ok(())
        }
        Cmd::ComparePods { first, second } => {
            let (a, b) = read_pair(&first, &second)?;
            compare_pods(&a, &b);
            Ok(())
        }
        Cmd::Compare { first, second } => {
            let (a, b) = read_pair(&first, &second)?;
            compare(&a, &b);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_from_proc_files() {
        let status = "Name:\tberthd\nPPid:\t1\nVmRSS:\t   26780 kB\nRssAnon:\t   10568 kB\n";
        assert_eq!(number_after(status, "VmRSS:"), Some(26780));
        assert_eq!(number_after(status, "RssAnon:"), Some(10568));
        assert_eq!(number_after(status, "PPid:"), Some(1));
        assert_eq!(number_after(status, "VmSwap:"), None);
        let rollup = "55d7-7ffd ---p 00000000 00:00 0 [rollup]\nRss: 2480 kB\nPss: 204 kB\nPss_Anon: 88 kB\n";
        assert_eq!(number_after(rollup, "Pss:"), Some(204));
        // The live process: this test's own status.
        let me = std::process::id();
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert_eq!(ppid(me), Some(std::os::unix::process::parent_id()));
        assert!(smaps(me).0 > 0.0);
    }
}
