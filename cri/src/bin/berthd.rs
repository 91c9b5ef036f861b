//! berthd: the berth CRI daemon.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use berth_cri::config::{Config, DEFAULT_CONFIG_PATH, LogFormat};
use clap::Parser;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// berthd serves the Kubernetes CRI v1 API on a unix socket.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Config file (TOML). A missing default file means built-in defaults.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Persistent state directory (overrides `root`).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Runtime state directory (overrides `state`).
    #[arg(long)]
    state: Option<PathBuf>,
    /// CRI socket path (overrides `listen`).
    #[arg(long)]
    listen: Option<PathBuf>,
    /// Log filter, e.g. `info` or `berth_image=debug` (overrides `log_level` and RUST_LOG).
    #[arg(long)]
    log_level: Option<String>,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> anyhow::Result<()> {
    // glibc gives each thread that frees memory its own arena; pull threads would each
    // keep megabytes. Two arenas cost nothing measurable in throughput. A fixed mmap
    // threshold: glibc would otherwise raise it (up to 32 MiB) after a pull frees its
    // buffers, and later large buffers would fragment the heap instead of going back
    // to the kernel when freed.
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
    let args = Args::parse();
    let missing_ok = args.config == std::path::Path::new(DEFAULT_CONFIG_PATH);
    let mut config = Config::load(&args.config, missing_ok)?;
    if let Some(r) = args.root {
        config.root = r;
    }
    if let Some(s) = args.state {
        config.state = s;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(l) = args.log_level {
        config.log_level = l;
    }
    config.validate(&args.config)?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() && config.log_level == Config::default().log_level => {
            berth_cri::config::log_filter(&v)?
        }
        _ => berth_cri::config::log_filter(&config.log_level)?,
    };
    init_logging(filter, config.log_format);
    if !args.config.exists() {
        warn!(path = %args.config.display(), "config file not found; using defaults");
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()?
        .block_on(run(config))
}

/// The log: to the journal (levels as priorities, fields as journal fields) when
/// stderr is systemd's journal stream or `log_format = "journal"`; otherwise on
/// stderr, with colour only on a terminal.
fn init_logging(filter: EnvFilter, format: LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let journal =
        format == LogFormat::Journal || (format == LogFormat::Text && stderr_is_journal());
    if journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(
                        layer
                            .with_syslog_identifier("berthd".into())
                            // `journalctl SANDBOX=<id>` rather than F_SANDBOX
                            .with_field_prefix(None)
                            .with_priority_mappings(journal_priorities()),
                    )
                    .init();
                return;
            }
            // No journal to write to: stderr still reaches whoever started berthd.
            Err(e) => eprintln!("berthd: the journal is not reachable ({e}); logging to stderr"),
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        _ => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// syslog's meaning of each level (tracing-journald's default makes INFO a notice).
fn journal_priorities() -> tracing_journald::PriorityMappings {
    use tracing_journald::Priority;
    tracing_journald::PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}

/// Whether stderr is the stream systemd connected to the journal (`JOURNAL_STREAM`
/// names its device and inode, as sd_journal_stream_fd documents).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd as _;
    let Ok(want) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    want == format!("{}:{}", st.st_dev, st.st_ino)
}

async fn run(config: Config) -> anyhow::Result<()> {
    // First, so that a driver that cannot work stops berthd before it touches anything.
    let systemd = match config.cgroup_driver {
        berth_cri::config::CgroupDriver::Systemd => {
            Some(Arc::new(berth_cri::systemd::Systemd::connect().await?))
        }
        berth_cri::config::CgroupDriver::Cgroupfs => None,
    };
    berth_cri::layout::prepare(&config.root, &config.state)?;
    let db_path = config.root.join(berth_cri::layout::RECORDS_FILE);
    let db = Arc::new(
        redb::Builder::new()
            // The metadata is small; redb's default cache would let it grow far beyond.
            .set_cache_size(4 << 20)
            .create(&db_path)
            .with_context(|| format!("opening metadata store {}", db_path.display()))?,
    );
    let images = {
        let (root, cfg, db) = (config.root.clone(), config.image_service(), db.clone());
        tokio::task::spawn_blocking(move || berth_image::ImageService::open(&root, db, cfg))
            .await??
    };
    let records = Arc::new(berth_cri::records::RecordStore::open(db)?);
    let svc =
        berth_cri::services::Services::open(config.clone(), records, images.clone(), systemd).await;
    let listener = berth_cri::server::bind(&config.listen, 0o660)?;
    let api_socket = config.api_socket();
    let api_listener = berth_cri::server::bind(&api_socket, 0o600)?;
    let metrics_listener = match config.metrics.socket_addr().map_err(anyhow::Error::msg)? {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding metrics.address {addr}"))?,
        ),
        None => None,
    };
    let stream_addr = std::net::SocketAddr::new(
        config.stream.address.parse().context("stream.address")?,
        config.stream.port,
    );
    let stream_tls = if config.stream.tls_cert.as_os_str().is_empty() {
        None
    } else {
        Some(
            berth_stream::tls::server_config(&config.stream.tls_cert, &config.stream.tls_key)
                .context("stream.tls_cert / stream.tls_key")?,
        )
    };
    let streams = berth_stream::StreamServer::start(
        stream_addr,
        svc.streaming.runtime(),
        stream_tls,
        config.stream.limits(),
    )
    .await
    .with_context(|| format!("binding the streaming server on {stream_addr}"))?;
    info!(url = %streams.base_url(), "streaming server listening");
    svc.streaming.set_server(streams);
    info!(socket = %config.listen.display(), root = %config.root.display(), "berthd serving CRI v1");
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => info!("SIGTERM: finishing in-flight calls"),
                    _ = int.recv() => info!("SIGINT: finishing in-flight calls"),
                }
                berth_cri::notify::stopping();
            }
            _ => std::future::pending::<()>().await,
        }
    };
    let listen = config.listen.clone();
    // The socket is bound and listening: connections queue until serve accepts them.
    berth_cri::notify::ready("serving CRI v1");
    let _watchdog = berth_cri::notify::spawn_watchdog();
    // One signal ends both servers, and the event streams that would keep them open.
    let ctx = svc.ctx.clone();
    let shutdown = async move {
        shutdown.await;
        ctx.shutdown.send_replace(true);
    };
    let shutdown = futures_util::FutureExt::shared(Box::pin(shutdown));
    let api = berth_cri::api::serve(api_listener, config.clone(), svc.clone(), shutdown.clone());
    let metrics = {
        let (ctx, shutdown) = (svc.ctx.clone(), shutdown.clone());
        async move {
            if let Some(l) = metrics_listener {
                berth_cri::prometheus::serve(l, move || ctx.metrics_text(), shutdown).await;
            }
        }
    };
    let cri = berth_cri::server::serve(listener, config, images, svc, shutdown);
    let (cri, api, ()) = tokio::join!(cri, api, metrics);
    let _ = std::fs::remove_file(&listen);
    let _ = std::fs::remove_file(&api_socket);
    cri?;
    api.context("serving the berth API")?;
    info!("berthd stopped");
    Ok(())
}
