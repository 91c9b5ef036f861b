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

/// A channel to the API socket.
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
        .with_context(|| format!("connecting to berthd's API at {}", socket.display()))
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
        filters = match filters.is_empty() {
            true => vec!["state!=exited,state!=created".into()],
            false => filters
                .iter()
                .map(|f| format!("{f},state!=exited,state!=created"))
                .collect(),
        };
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
/// payload JSON), or one JSON object per line with `--format json`.
pub async fn events(ch: Channel, filters: Vec<String>, out: Output) -> Result<()> {
    let mut c = pb::events_client::EventsClient::new(ch);
    let mut stream = c
        .subscribe(pb::SubscribeRequest { filters })
        .await?
        .into_inner();
    while let Some(env) = stream.message().await? {
        if env.lagged > 0 {
            eprintln!("berthctl: fell behind; {} events were missed", env.lagged);
            continue;
        }
        match out {
            Output::Json => {
                let event: serde_json::Value =
                    serde_json::from_str(&env.event_json).unwrap_or_default();
                let line = serde_json::json!({
                    "timestamp": env.timestamp,
                    "namespace": env.namespace,
                    "topic": env.topic,
                    "sandbox_id": env.sandbox_id,
                    "event": event,
                });
                println!("{line}");
            }
            Output::Table => {
                let t = berth_runtime::timefmt::rfc3339_nano(env.timestamp);
                println!("{t} {} {} {}", env.namespace, env.topic, env.event_json);
            }
        }
    }
    Ok(())
}
