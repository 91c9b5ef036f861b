//! The operator's commands over berthd's native API: info, pods, ps, images, rmi,
//! inspect, tasks and events. Tables for people, `-o json` for scripts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use berth_cri::api::pb;
use clap::{Subcommand, ValueEnum};
use tonic::transport::Channel;

/// How results are printed.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// `berthctl tasks ...`.
#[derive(Subcommand)]
pub enum TaskCmd {
    /// Every container's task as its shim sees it.
    List {
        /// containerd filters, e.g. `status==paused`.
        filters: Vec<String>,
    },
    /// The pids in a container.
    Pids { container: String },
    /// Freezes every process of a container.
    Pause { container: String },
    /// Thaws a paused container.
    Resume { container: String },
    /// CPU, memory and pid counts of a container.
    Metrics { container: String },
    /// Sends a signal to a container's init (or, with --all, every process).
    Kill {
        container: String,
        /// Signal number.
        #[arg(short, long, default_value_t = 15)]
        signal: u32,
        #[arg(short, long)]
        all: bool,
    },
}

/// The API socket: `--address`, else the config's `api_listen` (or `api.sock`
/// beside its `listen`).
pub fn api_socket(address: Option<PathBuf>, config: &Path) -> Result<PathBuf> {
    if let Some(a) = address {
        return Ok(a);
    }
    let missing_ok = config == Path::new(berth_cri::config::DEFAULT_CONFIG_PATH);
    let cfg = berth_cri::config::Config::load(config, missing_ok)
        .with_context(|| format!("reading {}", config.display()))?;
    Ok(cfg.api_socket())
}

/// A gRPC channel over a unix socket (the API's or the CRI's).
pub async fn connect(socket: &Path) -> Result<Channel> {
    let path = socket.to_path_buf();
    tonic::transport::Endpoint::try_from("http://[::1]:50051")?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .with_context(|| format!("connecting to berthd at {}", socket.display()))
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("   ").trim_end().to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n") + "\n"
}

/// `extra` added (AND) to each filter; an empty one becomes `extra` alone.
fn with_each(filters: Vec<String>, extra: &str) -> Vec<String> {
    if filters.is_empty() {
        return vec![extra.to_string()];
    }
    let add = |f: String| match f.trim().is_empty() {
        true => extra.to_string(),
        false => format!("{f},{extra}"),
    };
    filters.into_iter().map(add).collect()
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn short(id: &str) -> String {
    id.chars().take(13).collect()
}

/// "5s ago", "3m ago", ... from Unix nanoseconds.
fn ago(nanos: i64) -> String {
    if nanos <= 0 {
        return "-".into();
    }
    let now = berth_runtime::timefmt::now_unix_nanos();
    let s = (now - nanos).max(0) / 1_000_000_000;
    match s {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}

pub async fn info(ch: Channel, out: Output) -> Result<()> {
    let mut c = pb::introspection_client::IntrospectionClient::new(ch);
    let i = c.info(pb::Empty {}).await?.into_inner();
    if out == Output::Json {
        return print_json(&i);
    }
    let rows = [
        ("version", i.version),
        ("pid", i.pid.to_string()),
        ("CRI socket", i.cri_socket),
        ("API socket", i.api_socket),
        ("root", i.root),
        ("state", i.state),
        ("cgroup driver", i.cgroup_driver),
        ("cgroups", i.cgroup_mode),
        ("runtime handlers", i.runtime_handlers.join(", ")),
        ("namespaces", i.namespaces.join(", ")),
        ("streaming", i.streaming_url),
        ("event subscribers", i.event_subscribers.to_string()),
    ];
    for (k, v) in rows {
        println!("{k:<17}{v}");
    }
    Ok(())
}

/// A node self-test: one `PASS`/`FAIL` line per part; the exit code is 1 if any
/// failed (berthd not answering on its API socket is the first failure).
pub async fn check(socket: &Path, out: Output) -> Result<i32> {
    let results = match connect(socket).await {
        Ok(ch) => {
            let mut c = pb::introspection_client::IntrospectionClient::new(ch);
            let mut r = vec![pb::CheckResult {
                name: "api socket".into(),
                ok: true,
                detail: socket.display().to_string(),
            }];
            r.extend(c.check(pb::Empty {}).await?.into_inner().results);
            r
        }
        Err(e) => vec![pb::CheckResult {
            name: "api socket".into(),
            ok: false,
            detail: format!("{e:#}"),
        }],
    };
    let failed = results.iter().filter(|r| !r.ok).count();
    if out == Output::Json {
        print_json(&results)?;
    } else {
        let width = results.iter().map(|r| r.name.len()).max().unwrap_or(0);
        for r in &results {
            let verdict = if r.ok { "PASS" } else { "FAIL" };
            println!("{verdict}  {:<width$}  {}", r.name, r.detail);
        }
        match failed {
            0 => println!("all {} checks passed", results.len()),
            n => println!("{n} of {} checks failed", results.len()),
        }
    }
    Ok(i32::from(failed > 0))
}

pub async fn pods(ch: Channel, filters: Vec<String>, out: Output) -> Result<()> {
    let mut c = pb::sandboxes_client::SandboxesClient::new(ch);
    let list = c.list(pb::ListRequest { filters }).await?.into_inner();
    if out == Output::Json {
        return print_json(&list.sandboxes);
    }
    let rows = list
        .sandboxes
        .iter()
        .map(|s| {
            vec![
                short(&s.id),
                s.name.clone(),
                s.namespace.clone(),
                s.state.clone(),
                s.ips.first().cloned().unwrap_or_default(),
                ago(s.created_at),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["POD ID", "NAME", "NAMESPACE", "STATE", "IP", "CREATED"],
            rows
        )
    );
    Ok(())
}

pub async fn ps(ch: Channel, all: bool, mut filters: Vec<String>, out: Output) -> Result<()> {
    if !all {
        // Running (and paused) ones, added to every filter given.
        filters = with_each(filters, "state!=exited,state!=created");
    }
    let mut c = pb::containers_client::ContainersClient::new(ch);
    let list = c.list(pb::ListRequest { filters }).await?.into_inner();
    if out == Output::Json {
        return print_json(&list.containers);
    }
    let rows = list
        .containers
        .iter()
        .map(|k| {
            let state = match k.state.as_str() {
                "exited" => format!("exited ({})", k.exit_code),
                s => s.to_string(),
            };
            vec![
                short(&k.id),
                k.name.clone(),
                k.image.clone(),
                state,
                short(&k.sandbox_id),
                ago(k.created_at),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "CONTAINER ID",
                "NAME",
                "IMAGE",
                "STATE",
                "POD ID",
                "CREATED"
            ],
            rows
        )
    );
    Ok(())
}

pub async fn images(ch: Channel, filters: Vec<String>, out: Output) -> Result<()> {
    let mut c = pb::images_client::ImagesClient::new(ch);
    let list = c.list(pb::ListRequest { filters }).await?.into_inner();
    if out == Output::Json {
        return print_json(&list.images);
    }
    let rows = list
        .images
        .iter()
        .map(|i| {
            let id = i.id.trim_start_matches("sha256:");
            let name = i
                .names
                .first()
                .or(i.digests.first())
                .cloned()
                .unwrap_or_else(|| "<none>".into());
            vec![
                name,
                id.chars().take(12).collect(),
                format!("{:.1} MB", i.size as f64 / 1e6),
            ]
        })
        .collect();
    print!("{}", table(&["IMAGE", "ID", "SIZE"], rows));
    Ok(())
}

pub async fn rmi(ch: Channel, names: Vec<String>) -> Result<()> {
    let mut c = pb::images_client::ImagesClient::new(ch);
    for name in names {
        c.remove(pb::RemoveImageRequest { name: name.clone() })
            .await
            .with_context(|| format!("removing {name}"))?;
        println!("removed {name}");
    }
    Ok(())
}

pub async fn inspect(ch: Channel, id: String) -> Result<()> {
    let mut c = pb::containers_client::ContainersClient::new(ch);
    let k = c.get(pb::IdRequest { id }).await?.into_inner();
    print_json(&k)
}

pub async fn tasks(ch: Channel, cmd: TaskCmd, out: Output) -> Result<()> {
    let mut c = pb::tasks_client::TasksClient::new(ch);
    let id = |container: String| pb::IdRequest { id: container };
    match cmd {
        TaskCmd::List { filters } => {
            let list = c.list(pb::ListRequest { filters }).await?.into_inner();
            if out == Output::Json {
                return print_json(&list.tasks);
            }
            let rows = list
                .tasks
                .iter()
                .map(|t| {
                    vec![
                        short(&t.id),
                        t.pid.to_string(),
                        t.status.clone(),
                        short(&t.sandbox_id),
                    ]
                })
                .collect();
            print!("{}", table(&["TASK", "PID", "STATUS", "POD ID"], rows));
        }
        TaskCmd::Pids { container } => {
            let pids = c.pids(id(container)).await?.into_inner().pids;
            match out {
                Output::Json => print_json(&pids)?,
                Output::Table => pids.iter().for_each(|p| println!("{p}")),
            }
        }
        TaskCmd::Pause { container } => {
            c.pause(id(container.clone())).await?;
            println!("paused {container}");
        }
        TaskCmd::Resume { container } => {
            c.resume(id(container.clone())).await?;
            println!("resumed {container}");
        }
        TaskCmd::Metrics { container } => {
            let m = c.metrics(id(container)).await?.into_inner();
            if out == Output::Json {
                return print_json(&m);
            }
            println!("cpu          {:.3} s", m.cpu_usage_nanos as f64 / 1e9);
            println!(
                "memory       {:.1} MiB working set, {:.1} MiB used",
                mib(m.memory_working_set_bytes),
                mib(m.memory_usage_bytes)
            );
            if m.memory_limit_bytes > 0 {
                println!("limit        {:.1} MiB", mib(m.memory_limit_bytes));
            }
            println!("pids         {}", m.pids);
        }
        TaskCmd::Kill {
            container,
            signal,
            all,
        } => {
            c.kill(pb::KillRequest {
                id: container,
                signal,
                all,
            })
            .await?;
        }
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Follows events that pass the filters: one line each (time, namespace, topic,
/// payload JSON), or one JSON object per line with `-o json`. Ends quietly when
/// its output is closed (`berthctl events | head`).
pub async fn events(ch: Channel, filters: Vec<String>, out: Output) -> Result<()> {
    let mut c = pb::events_client::EventsClient::new(ch);
    let mut stream = c
        .subscribe(pb::SubscribeRequest { filters })
        .await?
        .into_inner();
    use std::io::Write as _;
    while let Some(env) = stream.message().await? {
        if env.lagged > 0 {
            eprintln!("berthctl: fell behind; {} events were missed", env.lagged);
            continue;
        }
        let line = match out {
            Output::Json => {
                let event: serde_json::Value =
                    serde_json::from_str(&env.event_json).unwrap_or_default();
                serde_json::json!({
                    "timestamp": env.timestamp,
                    "namespace": env.namespace,
                    "topic": env.topic,
                    "sandbox_id": env.sandbox_id,
                    "event": event,
                })
                .to_string()
            }
            Output::Table => {
                let t = berth_runtime::timefmt::rfc3339_nano(env.timestamp);
                format!("{t} {} {} {}", env.namespace, env.topic, env.event_json)
            }
        };
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{line}")
            .and_then(|_| stdout.flush())
            .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

/// Pulls an image with a progress bar per layer (plain lines when stdout is not a
/// terminal); prints the image id.
pub async fn pull(ch: Channel, name: String, user: Option<String>) -> Result<()> {
    let (username, password) = match user.as_deref().map(|u| u.split_once(':')) {
        Some(Some((u, p))) => (u.to_string(), p.to_string()),
        Some(None) => anyhow::bail!("--user takes USER:PASSWORD"),
        None => Default::default(),
    };
    let mut c = pb::images_client::ImagesClient::new(ch);
    let req = pb::PullRequest {
        name: name.clone(),
        username,
        password,
    };
    let mut stream = c.pull(req).await?.into_inner();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let bars = indicatif::MultiProgress::new();
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:.bold} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}",
    )?;
    let mut by_digest = std::collections::HashMap::new();
    while let Some(p) = stream.message().await? {
        for l in &p.layers {
            let bar = bars.add(indicatif::ProgressBar::new(l.size).with_style(style.clone()));
            let short = l
                .digest
                .trim_start_matches("sha256:")
                .chars()
                .take(12)
                .collect::<String>();
            bar.set_prefix(short);
            bar.set_message("waiting");
            by_digest.insert(l.digest.clone(), bar);
        }
        if !tty && matches!(p.status.as_str(), "done" | "present") {
            // No bars without a terminal: one line per layer.
            let what = if p.status == "done" {
                "pulled"
            } else {
                "already present"
            };
            println!("layer {}: {what}", p.digest);
        }
        if let Some(bar) = by_digest.get(&p.digest) {
            match p.status.as_str() {
                "downloading" => {
                    bar.set_position(p.done);
                    bar.set_message("downloading");
                }
                "done" => bar.finish_with_message("pulled"),
                "present" => bar.finish_with_message("already present"),
                _ => {}
            }
        }
        if !p.image_id.is_empty() {
            for bar in by_digest.values() {
                if !bar.is_finished() {
                    bar.finish();
                }
            }
            bars.clear()?;
            println!("{name}: {}", p.image_id);
        }
    }
    Ok(())
}

/// A table of running containers' CPU, memory and pids, refreshed every second (one
/// table with `--no-stream`); CPU % is over the last interval.
pub async fn stats(ch: Channel, filters: Vec<String>, once: bool, out: Output) -> Result<()> {
    use std::io::IsTerminal as _;
    let mut containers = pb::containers_client::ContainersClient::new(ch.clone());
    let mut tasks = pb::tasks_client::TasksClient::new(ch);
    let mut last: std::collections::HashMap<String, (u64, std::time::Instant)> = Default::default();
    let tty = std::io::stdout().is_terminal();
    let interval = if once {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(1)
    };
    for round in 0u64.. {
        let running = with_each(filters.clone(), "state==running");
        let list = containers
            .list(pb::ListRequest { filters: running })
            .await?
            .into_inner();
        let mut rows = Vec::new();
        let mut json = Vec::new();
        for k in &list.containers {
            let Ok(m) = tasks.metrics(pb::IdRequest { id: k.id.clone() }).await else {
                continue;
            };
            let m = m.into_inner();
            let now = std::time::Instant::now();
            let cpu = last.get(&k.id).map(|(prev, at)| {
                let secs = now.duration_since(*at).as_secs_f64().max(1e-3);
                m.cpu_usage_nanos.saturating_sub(*prev) as f64 / 1e9 / secs * 100.0
            });
            last.insert(k.id.clone(), (m.cpu_usage_nanos, now));
            let limit = match m.memory_limit_bytes {
                0 => "-".to_string(),
                l => format!("{:.1} MiB", mib(l)),
            };
            rows.push(vec![
                short(&k.id),
                k.name.clone(),
                cpu.map_or("-".into(), |c| format!("{c:.1}%")),
                format!("{:.1} MiB", mib(m.memory_working_set_bytes)),
                limit,
                m.pids.to_string(),
            ]);
            json.push(
                serde_json::json!({"id": k.id, "name": k.name, "cpu_percent": cpu, "metrics": m}),
            );
        }
        // The first round of a snapshot only primes the CPU counters.
        if !(once && round == 0) {
            match out {
                Output::Json => println!("{}", serde_json::Value::Array(json)),
                Output::Table => {
                    if tty && !once {
                        print!("\x1b[H\x1b[2J");
                    }
                    print!(
                        "{}",
                        table(
                            &["CONTAINER ID", "NAME", "CPU %", "MEM", "LIMIT", "PIDS"],
                            rows
                        )
                    );
                    if !tty && !once {
                        println!();
                    }
                }
            }
            if once {
                return Ok(());
            }
        }
        tokio::time::sleep(interval).await;
    }
    Ok(())
}
