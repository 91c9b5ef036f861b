//! `berth-bench node`: a node at kubelet's scale (110 pods by default): the pods, one
//! sleeping container each, started 10 at a time and then all at once; the steady
//! state with them (daemon RSS, CPU of the daemon and of every shim while idle, List*
//! latency); teardown (does the daemon's memory come back?); and the drift of a pod's
//! whole lifecycle over many create/remove cycles.

use std::sync::Arc;

use super::*;

/// What `node` measures of one runtime.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct NodeReport {
    pub label: String,
    pub pods: usize,
    /// Wall time to start every pod 10 at a time, and each pod's RunPodSandbox +
    /// CreateContainer + StartContainer.
    pub start_10way_seconds: f64,
    pub start_10way_per_pod: Latency,
    /// The same with every pod started at once; RunPodSandbox alone too.
    pub start_all_seconds: f64,
    pub start_all_per_pod: Latency,
    pub run_pod_sandbox_all: Latency,
    pub daemon_rss_idle_mib: Option<f64>,
    pub daemon_rss_with_pods_mib: Option<f64>,
    pub daemon_rss_after_teardown_mib: Option<f64>,
    /// The anonymous part of the same three (heap and stacks).
    #[serde(default)]
    pub daemon_anon_idle_mib: Option<f64>,
    #[serde(default)]
    pub daemon_anon_with_pods_mib: Option<f64>,
    #[serde(default)]
    pub daemon_anon_after_teardown_mib: Option<f64>,
    /// Wall time to stop and remove every pod 10 at a time, and each pod's
    /// StopPodSandbox + RemovePodSandbox.
    #[serde(default)]
    pub teardown_10way_seconds: f64,
    #[serde(default)]
    pub teardown_per_pod: Latency,
    /// Each pod's shim (the parent of its infra process) after the idle period: mean
    /// RSS and PSS, and the largest RSS.
    #[serde(default)]
    pub shim_rss_mib: f64,
    #[serde(default)]
    pub shim_pss_mib: f64,
    #[serde(default)]
    pub shim_rss_max_mib: f64,
    /// CPU while the pods sit idle, in % of one core.
    pub idle_seconds: u64,
    pub daemon_cpu_percent: Option<f64>,
    pub shims: usize,
    pub shims_cpu_percent: f64,
    pub list_pod_sandbox: Latency,
    pub list_containers: Latency,
    pub list_container_stats: Latency,
    pub list_pod_sandbox_stats: Latency,
    /// Whole pod lifecycles (pod, container, stop, removal) one after another: the
    /// first and the last 20.
    pub cycles: usize,
    pub cycle_first20: Latency,
    pub cycle_last20: Latency,
}

/// How the scenario runs.
pub struct NodePlan<'a> {
    pub endpoint: &'a str,
    pub registry: &'a str,
    pub label: &'a str,
    pub daemon_pid: Option<u32>,
    pub pods: usize,
    pub idle_seconds: u64,
    pub cycles: usize,
}

/// The cgroup parent under which each pod gets its own, as kubelet gives one per pod
/// (containerd's pod stats need one).
const NODE_CGROUP: &str = "berth-bench-node";

/// The bench's pod `name`, in its own cgroup parent.
fn node_pod(name: &str) -> cri::PodSandboxConfig {
    pod_in_cgroup(name, NODE_CGROUP)
}

pub async fn node_bench(plan: &NodePlan<'_>) -> Result<NodeReport> {
    let r = node_scenario(plan).await;
    calls::remove_cgroup_tree(NODE_CGROUP);
    r
}

async fn node_scenario(plan: &NodePlan<'_>) -> Result<NodeReport> {
    let mut c = CriClient::connect(plan.endpoint).await?;
    let image = format!("{}/{BUSYBOX_REPO}:1", plan.registry);
    pull(&mut c, &image).await?;
    let mem = || plan.daemon_pid.map(daemon_memory).unwrap_or_default();
    let mut r = NodeReport {
        label: plan.label.into(),
        pods: plan.pods,
        idle_seconds: plan.idle_seconds,
        cycles: plan.cycles,
        ..Default::default()
    };
    settle().await;
    (r.daemon_rss_idle_mib, r.daemon_anon_idle_mib) = mem();
    phase(plan, "start 10-way");
    let (wall, per_pod, _, pods) = start_wave(&c, &image, plan.pods, 10, "n10").await?;
    (r.start_10way_seconds, r.start_10way_per_pod) = (wall, per_pod);
    phase(plan, "teardown 10-way");
    (r.teardown_10way_seconds, r.teardown_per_pod) = remove_all(&c, &pods).await?;
    phase(plan, "start all at once");
    let (wall, per_pod, run_pod, pods) =
        start_wave(&c, &image, plan.pods, plan.pods, "nall").await?;
    (
        r.start_all_seconds,
        r.start_all_per_pod,
        r.run_pod_sandbox_all,
    ) = (wall, per_pod, run_pod);
    phase(plan, "steady state");
    settle().await;
    (r.daemon_rss_with_pods_mib, r.daemon_anon_with_pods_mib) = mem();
    idle_state(&mut c, plan, &pods, &mut r).await?;
    list_latencies(&mut c, &mut r).await?;
    phase(plan, "teardown");
    remove_all(&c, &pods).await?;
    settle().await;
    (
        r.daemon_rss_after_teardown_mib,
        r.daemon_anon_after_teardown_mib,
    ) = mem();
    phase(plan, "cycles");
    let lifecycles = cycles(&mut c, &image, plan.cycles).await?;
    let n = lifecycles.len().min(20);
    r.cycle_first20 = latency(lifecycles[..n].to_vec());
    r.cycle_last20 = latency(lifecycles[lifecycles.len() - n..].to_vec());
    Ok(r)
}

/// Waits out what a burst of work leaves for a while by design (tokio's idle blocking
/// threads live 10 s, Go's background scavenger works in seconds), so that memory
/// figures are of the daemon at rest.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(12)).await;
}

/// The daemon's RSS and its anonymous part (heap and stacks; the rest is its binary's
/// and libraries' pages, shared and reclaimable), in MiB.
fn daemon_memory(pid: u32) -> (Option<f64>, Option<f64>) {
    let status = proc_file(pid, "status");
    let mib = |key: &str| number_after(&status, key).map(|kib| kib as f64 / 1024.0);
    (mib("VmRSS:"), mib("RssAnon:"))
}

/// Marks a phase on stderr with CLOCK_MONOTONIC seconds, to slice a system-wide
/// profile taken beside the run (`perf record -k CLOCK_MONOTONIC`, `perf report --time`).
fn phase(plan: &NodePlan<'_>, name: &str) {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    let now = t.tv_sec as f64 + t.tv_nsec as f64 / 1e9;
    eprintln!("[{}] {name} at monotonic {now:.3}", plan.label);
}

/// Starts `n` pods with a sleeping container each, `width` at a time: the wall time,
/// each pod's start (pod + container), each RunPodSandbox, and the pods.
async fn start_wave(
    c: &CriClient,
    image: &str,
    n: usize,
    width: usize,
    prefix: &str,
) -> Result<(f64, Latency, Latency, Vec<String>)> {
    let gate = Arc::new(tokio::sync::Semaphore::new(width.max(1)));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (mut c, gate, image) = (c.clone(), gate.clone(), image.to_string());
        let cfg = node_pod(&format!("{prefix}-{i}"));
        tasks.push(tokio::spawn(async move {
            let _slot = gate.acquire_owned().await?;
            let t0 = Instant::now();
            let pod = run_pod(&mut c, &cfg).await?;
            let run = t0.elapsed();
            start_sleeper(&mut c, &pod, &cfg, &image).await?;
            anyhow::Ok((pod, run, t0.elapsed()))
        }));
    }
    let (mut pods, mut runs, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    for task in tasks {
        let (pod, run, all) = task.await??;
        pods.push(pod);
        runs.push(run);
        whole.push(all);
    }
    let wall = t.elapsed().as_secs_f64();
    Ok((wall, latency(whole), latency(runs), pods))
}

/// Stops and removes `pods`, 10 at a time (as kubelet's pod workers do, each on its
/// own): the wall time and each pod's stop + removal.
async fn remove_all(c: &CriClient, pods: &[String]) -> Result<(f64, Latency)> {
    let gate = Arc::new(tokio::sync::Semaphore::new(10));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for pod in pods {
        let (mut c, gate, pod) = (c.clone(), gate.clone(), pod.clone());
        tasks.push(tokio::spawn(async move {
            let _slot = gate.acquire_owned().await?;
            let t0 = Instant::now();
            remove_pod(&mut c, &pod).await?;
            anyhow::Ok(t0.elapsed())
        }));
    }
    let mut each = Vec::new();
    for task in tasks {
        each.push(task.await??);
    }
    Ok((t.elapsed().as_secs_f64(), latency(each)))
}

/// CPU ticks (user + system) a process has used.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = proc_file(pid, "stat");
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// With every pod sitting idle: the daemon's and the shims' CPU over `idle_seconds`,
/// then each shim's memory.
async fn idle_state(
    c: &mut CriClient,
    plan: &NodePlan<'_>,
    pods: &[String],
    r: &mut NodeReport,
) -> Result<()> {
    let mut shims = std::collections::BTreeSet::new();
    for pod in pods {
        let infra = infra_pid(c, pod).await?;
        shims.insert(ppid(infra).context("infra has no parent")?);
    }
    let total = |pids: &std::collections::BTreeSet<u32>| -> u64 {
        pids.iter().filter_map(|p| cpu_ticks(*p)).sum()
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let (d0, s0) = (plan.daemon_pid.and_then(cpu_ticks), total(&shims));
    tokio::time::sleep(Duration::from_secs(plan.idle_seconds)).await;
    let (d1, s1) = (plan.daemon_pid.and_then(cpu_ticks), total(&shims));
    let percent = |ticks: u64| ticks as f64 / hz / plan.idle_seconds.max(1) as f64 * 100.0;
    r.daemon_cpu_percent = d0.zip(d1).map(|(a, b)| percent(b.saturating_sub(a)));
    r.shims = shims.len();
    r.shims_cpu_percent = percent(s1.saturating_sub(s0));
    // A shim whose smaps could not be read (gone) reads as zeros: left out.
    let mem: Vec<(f64, f64)> = shims
        .iter()
        .map(|p| smaps(*p))
        .filter(|m| m.0 > 0.0)
        .collect();
    let n = mem.len().max(1) as f64;
    r.shim_rss_mib = mem.iter().map(|m| m.0).sum::<f64>() / n;
    r.shim_pss_mib = mem.iter().map(|m| m.1).sum::<f64>() / n;
    r.shim_rss_max_mib = mem.iter().map(|m| m.0).fold(0.0, f64::max);
    Ok(())
}

/// p50/p99 of the List calls kubelet makes every few seconds, 100 each.
async fn list_latencies(c: &mut CriClient, r: &mut NodeReport) -> Result<()> {
    let mut samples: [Vec<Duration>; 4] = Default::default();
    for _ in 0..100 {
        let t = Instant::now();
        c.runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest::default())
            .await?;
        samples[0].push(t.elapsed());
        let t = Instant::now();
        c.runtime
            .list_containers(cri::ListContainersRequest::default())
            .await?;
        samples[1].push(t.elapsed());
        let t = Instant::now();
        c.runtime
            .list_container_stats(cri::ListContainerStatsRequest::default())
            .await?;
        samples[2].push(t.elapsed());
        let t = Instant::now();
        c.runtime
            .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest::default())
            .await?;
        samples[3].push(t.elapsed());
    }
    let [pods, ctrs, ctr_stats, pod_stats] = samples;
    r.list_pod_sandbox = latency(pods);
    r.list_containers = latency(ctrs);
    r.list_container_stats = latency(ctr_stats);
    r.list_pod_sandbox_stats = latency(pod_stats);
    Ok(())
}

/// `n` whole pod lifecycles one after another, each timed.
async fn cycles(c: &mut CriClient, image: &str, n: usize) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let cfg = node_pod(&format!("cycle-{i}"));
        let t = Instant::now();
        let pod = run_pod(c, &cfg).await?;
        start_sleeper(c, &pod, &cfg, image).await?;
        remove_pod(c, &pod).await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

pub fn print_node(r: &NodeReport) {
    println!("runtime {} with {} pods", r.label, r.pods);
    let l = |name: &str, l: &Latency| {
        println!(
            "  {name:<34} p50 {:>8.2} ms  p99 {:>8.2} ms (n={})",
            l.p50, l.p99, l.n
        )
    };
    println!(
        "  {:<34} {:>8.2} s",
        "start 10-way (wall)", r.start_10way_seconds
    );
    l("  per pod, 10-way", &r.start_10way_per_pod);
    println!(
        "  {:<34} {:>8.2} s",
        "start all at once (wall)", r.start_all_seconds
    );
    l("  per pod, all at once", &r.start_all_per_pod);
    l("  RunPodSandbox, all at once", &r.run_pod_sandbox_all);
    println!(
        "  {:<34} {:>8.2} s",
        "teardown 10-way (wall)", r.teardown_10way_seconds
    );
    l("  per pod stop + remove", &r.teardown_per_pod);
    println!(
        "  {:<34} {:.2} MiB RSS (largest {:.2}), {:.2} MiB PSS",
        "each shim, mean", r.shim_rss_mib, r.shim_rss_max_mib, r.shim_pss_mib
    );
    println!(
        "  {:<34} idle {:?}, with pods {:?}, after teardown {:?} MiB",
        "daemon RSS",
        r.daemon_rss_idle_mib,
        r.daemon_rss_with_pods_mib,
        r.daemon_rss_after_teardown_mib
    );
    println!(
        "  {:<34} idle {:?}, with pods {:?}, after teardown {:?} MiB",
        "daemon anonymous RSS",
        r.daemon_anon_idle_mib,
        r.daemon_anon_with_pods_mib,
        r.daemon_anon_after_teardown_mib
    );
    println!(
        "  {:<34} daemon {:?} %, {} shims {:.2} % ({} s)",
        "CPU while idle", r.daemon_cpu_percent, r.shims, r.shims_cpu_percent, r.idle_seconds
    );
    l("ListPodSandbox", &r.list_pod_sandbox);
    l("ListContainers", &r.list_containers);
    l("ListContainerStats", &r.list_container_stats);
    l("ListPodSandboxStats", &r.list_pod_sandbox_stats);
    l("pod lifecycle, first 20 cycles", &r.cycle_first20);
    l("pod lifecycle, last 20 cycles", &r.cycle_last20);
}

pub fn compare_node(a: &NodeReport, b: &NodeReport) {
    let table = RatioTable::new(40, "metric", &a.label, &b.label);
    let row = |name: &str, x: f64, y: f64| table.row(name, x, y);
    row(
        "start 10-way wall s",
        a.start_10way_seconds,
        b.start_10way_seconds,
    );
    row(
        "  per pod p50 ms",
        a.start_10way_per_pod.p50,
        b.start_10way_per_pod.p50,
    );
    row(
        "  per pod p99 ms",
        a.start_10way_per_pod.p99,
        b.start_10way_per_pod.p99,
    );
    row("start all wall s", a.start_all_seconds, b.start_all_seconds);
    row(
        "  per pod p50 ms",
        a.start_all_per_pod.p50,
        b.start_all_per_pod.p50,
    );
    row(
        "  per pod p99 ms",
        a.start_all_per_pod.p99,
        b.start_all_per_pod.p99,
    );
    row(
        "  RunPodSandbox p50 ms",
        a.run_pod_sandbox_all.p50,
        b.run_pod_sandbox_all.p50,
    );
    row(
        "  RunPodSandbox p99 ms",
        a.run_pod_sandbox_all.p99,
        b.run_pod_sandbox_all.p99,
    );
    row(
        "teardown 10-way wall s",
        a.teardown_10way_seconds,
        b.teardown_10way_seconds,
    );
    row(
        "  per pod stop+remove p50 ms",
        a.teardown_per_pod.p50,
        b.teardown_per_pod.p50,
    );
    row(
        "  per pod stop+remove p99 ms",
        a.teardown_per_pod.p99,
        b.teardown_per_pod.p99,
    );
    row("shim RSS mean MiB", a.shim_rss_mib, b.shim_rss_mib);
    row(
        "shim RSS largest MiB",
        a.shim_rss_max_mib,
        b.shim_rss_max_mib,
    );
    row("shim PSS mean MiB", a.shim_pss_mib, b.shim_pss_mib);
    let mib = |v: Option<f64>| v.unwrap_or(f64::NAN);
    row(
        "daemon RSS idle MiB",
        mib(a.daemon_rss_idle_mib),
        mib(b.daemon_rss_idle_mib),
    );
    row(
        "daemon RSS with pods MiB",
        mib(a.daemon_rss_with_pods_mib),
        mib(b.daemon_rss_with_pods_mib),
    );
    row(
        "daemon RSS after teardown MiB",
        mib(a.daemon_rss_after_teardown_mib),
        mib(b.daemon_rss_after_teardown_mib),
    );
    row(
        "daemon anon RSS idle MiB",
        mib(a.daemon_anon_idle_mib),
        mib(b.daemon_anon_idle_mib),
    );
    row(
        "daemon anon RSS with pods MiB",
        mib(a.daemon_anon_with_pods_mib),
        mib(b.daemon_anon_with_pods_mib),
    );
    row(
        "daemon anon RSS after teardown MiB",
        mib(a.daemon_anon_after_teardown_mib),
        mib(b.daemon_anon_after_teardown_mib),
    );
    row(
        "daemon CPU idle %",
        mib(a.daemon_cpu_percent),
        mib(b.daemon_cpu_percent),
    );
    row("shims CPU idle %", a.shims_cpu_percent, b.shims_cpu_percent);
    for (name, x, y) in [
        ("ListPodSandbox", &a.list_pod_sandbox, &b.list_pod_sandbox),
        ("ListContainers", &a.list_containers, &b.list_containers),
        (
            "ListContainerStats",
            &a.list_container_stats,
            &b.list_container_stats,
        ),
        (
            "ListPodSandboxStats",
            &a.list_pod_sandbox_stats,
            &b.list_pod_sandbox_stats,
        ),
        ("lifecycle first 20", &a.cycle_first20, &b.cycle_first20),
        ("lifecycle last 20", &a.cycle_last20, &b.cycle_last20),
    ] {
        row(&format!("{name} p50 ms"), x.p50, y.p50);
        row(&format!("{name} p99 ms"), x.p99, y.p99);
    }
}
