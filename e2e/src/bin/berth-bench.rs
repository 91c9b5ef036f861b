//! berth-bench: measures a CRI runtime through its socket, so berth and containerd
//! can be compared side by side. `push` puts the benchmark images into a registry;
//! `run` measures one runtime; `compare` prints the ratios of two `run` results.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use berth_e2e::berthd::CriClient;
use berth_e2e::testimages::{Compression, ImageBuilder, LayerBuilder, large_layers};
use clap::{Parser, Subcommand};
use k8s_cri::v1 as cri;
use serde::{Deserialize, Serialize};

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
        /// CRI endpoint, e.g. unix:///run/berth/berth.sock.
        #[arg(long)]
        endpoint: String,
        /// Registry host:port holding the images of `push`.
        #[arg(long, default_value = "127.0.0.1:5000")]
        registry: String,
        /// Name for this runtime in the output.
        #[arg(long)]
        label: String,
        /// Daemon pid whose RSS is sampled during the pull (berthd or containerd).
        #[arg(long)]
        daemon_pid: Option<u32>,
        /// Cold pulls of the large image.
        #[arg(long, default_value_t = 3)]
        pull_runs: usize,
        /// Iterations of the status/list latency loops.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Print ratios of two `run --json` results (first / second).
    Compare { first: PathBuf, second: PathBuf },
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
    Ok(())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

async fn pull(c: &mut CriClient, image: &str) -> Result<String> {
    let req = cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(c.image
        .pull_image(req)
        .await
        .with_context(|| format!("pulling {image}"))?
        .into_inner()
        .image_ref)
}

async fn remove(c: &mut CriClient, image: &str) -> Result<()> {
    let req = cri::RemoveImageRequest {
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
    };
    c.image
        .remove_image(req)
        .await
        .with_context(|| format!("removing {image}"))?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run(
    endpoint: &str,
    registry: &str,
    label: &str,
    daemon_pid: Option<u32>,
    pull_runs: usize,
    iterations: usize,
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
    let mut times = Vec::new();
    let mut peak: Option<u64> = None;
    for run in 0..pull_runs.max(1) {
        remove(&mut c, &large).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sampler = daemon_pid.map(|pid| {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s2 = stop.clone();
            let h = std::thread::spawn(move || {
                let mut max = 0;
                while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                    max = max.max(rss_kib(pid).unwrap_or(0));
                    std::thread::sleep(Duration::from_millis(5));
                }
                max
            });
            (stop, h)
        });
        let t = Instant::now();
        pull(&mut c, &large).await?;
        let secs = t.elapsed().as_secs_f64();
        if let Some((stop, h)) = sampler {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let m = h.join().unwrap_or(0);
            peak = Some(peak.unwrap_or(0).max(m));
        }
        eprintln!(
            "[{label}] cold pull {}: {secs:.2}s ({:.0} MB/s)",
            run + 1,
            image_bytes as f64 / 1e6 / secs
        );
        times.push(secs);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];

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
        pull_seconds: times,
        pull_median_seconds: median,
        pull_mb_per_s: image_bytes as f64 / 1e6 / median,
        daemon_peak_rss_mib_during_pull: peak.map(|k| k as f64 / 1024.0),
        image_status: latency(st),
        list_images: latency(li),
        images_listed: listed,
    })
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Push { registry } => rt.block_on(push(&registry)),
        Cmd::Run {
            endpoint,
            registry,
            label,
            daemon_pid,
            pull_runs,
            iterations,
            json,
        } => {
            let r = rt.block_on(run(
                &endpoint, &registry, &label, daemon_pid, pull_runs, iterations,
            ))?;
            print_report(&r);
            if let Some(p) = json {
                std::fs::write(&p, serde_json::to_vec_pretty(&r)?)?;
            }
            Ok(())
        }
        Cmd::Compare { first, second } => {
            let a: Report = serde_json::from_slice(&std::fs::read(&first)?)?;
            let b: Report = serde_json::from_slice(&std::fs::read(&second)?)?;
            compare(&a, &b);
            Ok(())
        }
    }
}
