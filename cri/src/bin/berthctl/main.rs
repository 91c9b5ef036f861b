//! berthctl: a command-line client of berthd. The operator's commands (`info`,
//! `pods`, `ps`, `images`, `rmi`, `inspect`, `tasks`, `events`) use berthd's native
//! API socket (`ops`); `exec`, `attach` and `port-forward` ask the CRI socket for a
//! streaming URL and then speak SPDY/3.1 (or WebSocket) to it, as kubectl does
//! through kubelet.

mod logs;
mod ops;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use berth_stream::TermSize;
use berth_stream::client::{self, ClientError, CommandIo};
use clap::{Parser, Subcommand, ValueEnum};
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::io::AsyncRead;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "berthctl", about = "berth's command-line client", version)]
struct Cli {
    /// berthd's config, for where its sockets are.
    #[arg(long, default_value = berth_cri::config::DEFAULT_CONFIG_PATH, env = "BERTH_CONFIG")]
    config: PathBuf,
    /// berthd's API socket (default: from the config).
    #[arg(long, env = "BERTH_ADDRESS")]
    address: Option<PathBuf>,
    /// berthd's CRI socket, for exec, attach and port-forward (default: from the config).
    #[arg(long, env = "BERTH_SOCKET")]
    socket: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "table", global = true)]
    output: ops::Output,
    /// PEM CA certificate(s) to verify a TLS streaming server (`[stream] tls_cert`).
    #[arg(long, env = "BERTH_STREAM_CA")]
    stream_ca: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    Spdy,
    Websocket,
}

#[derive(Subcommand)]
enum Cmd {
    /// What berthd is and how it is set up.
    Info,
    /// A node self-test: runtimes, shim, cgroups, CNI config and plugins, sockets,
    /// free space; exits 1 if anything fails.
    Check,
    /// Lists pod sandboxes.
    Pods {
        /// containerd filters, e.g. `namespace==default` `labels.app==web`.
        filters: Vec<String>,
    },
    /// Lists running containers (all with -a).
    Ps {
        #[arg(short, long)]
        all: bool,
        /// containerd filters, e.g. `image~=busybox`.
        filters: Vec<String>,
    },
    /// Lists images.
    Images {
        /// containerd filters, e.g. `name~=^docker.io/`.
        filters: Vec<String>,
    },
    /// Removes images.
    Rmi {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// A container's record as JSON.
    Inspect { container: String },
    /// Tasks: list, pids, pause, resume, metrics, kill.
    #[command(subcommand)]
    Tasks(ops::TaskCmd),
    /// Pulls an image, with a progress bar per layer.
    Pull {
        image: String,
        /// Registry credentials, USER:PASSWORD.
        #[arg(long)]
        user: Option<String>,
    },
    /// A container's log (as kubelet writes it: the CRI log file).
    Logs {
        container: String,
        /// Keep printing what is written until the container exits.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
        /// Prefix each line with its time.
        #[arg(short, long)]
        timestamps: bool,
    },
    /// A live table of running containers' CPU, memory and pids.
    Stats {
        /// One table, then exit.
        #[arg(long)]
        no_stream: bool,
        /// containerd filters over containers, e.g. `labels.app==web`.
        filters: Vec<String>,
    },
    /// Prints a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
    /// Prints berthctl's man page (roff), made from the same definitions as --help.
    Man,
    /// Follows events: time, namespace, topic and payload, one per line.
    Events {
        /// containerd filters, e.g. `topic~=/tasks/.+,namespace==k8s.io`; several = any.
        filters: Vec<String>,
    },
    /// Runs a command in a running container.
    Exec {
        /// Pass stdin to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Allocate a terminal.
        #[arg(short, long)]
        tty: bool,
        /// Stream transport.
        #[arg(long, value_enum, default_value = "spdy")]
        transport: Transport,
        /// Container id (or a unique prefix).
        container: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Attaches to a running container's stdio.
    Attach {
        /// Pass stdin to the container.
        #[arg(short, long)]
        interactive: bool,
        /// The container has a terminal.
        #[arg(short, long)]
        tty: bool,
        /// Stream transport.
        #[arg(long, value_enum, default_value = "spdy")]
        transport: Transport,
        /// Container id (or a unique prefix).
        container: String,
    },
    /// Forwards local ports to ports on a pod's loopback.
    PortForward {
        /// Stream transport.
        #[arg(long, value_enum, default_value = "spdy")]
        transport: Transport,
        /// Pod sandbox id (or a unique prefix).
        pod: String,
        /// LOCAL:REMOTE pairs (LOCAL 0 = any free port).
        #[arg(required = true)]
        ports: Vec<String>,
    },
}

impl Cmd {
    fn name(&self) -> &'static str {
        match self {
            Cmd::Exec { .. } => "exec",
            Cmd::Attach { .. } => "attach",
            Cmd::PortForward { .. } => "port-forward",
            _ => "this",
        }
    }
}

async fn runtime(socket: &PathBuf) -> Result<RuntimeServiceClient<Channel>> {
    Ok(RuntimeServiceClient::new(ops::connect(socket).await?))
}

/// Puts the terminal in raw mode while the session runs (restored on drop).
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter(on: bool) -> RawMode {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        if !on || !nix::unistd::isatty(&stdin).unwrap_or(false) {
            return RawMode(None);
        }
        let Ok(old) = termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = old.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw);
        RawMode(Some(old))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                old,
            );
        }
    }
}

/// The local terminal's size now and at every SIGWINCH.
fn terminal_sizes() -> Option<tokio::sync::mpsc::Receiver<TermSize>> {
    fn size() -> Option<TermSize> {
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ fills a winsize we own.
        let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
        (r == 0 && ws.ws_col > 0).then_some(TermSize {
            width: ws.ws_col,
            height: ws.ws_row,
        })
    }
    let first = size()?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let _ = tx.send(first).await;
        let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        else {
            return;
        };
        while winch.recv().await.is_some() {
            if let Some(s) = size() {
                if tx.send(s).await.is_err() {
                    return;
                }
            }
        }
    });
    Some(rx)
}

async fn run_session(url: &str, interactive: bool, tty: bool, transport: Transport) -> Result<i32> {
    let _raw = RawMode::enter(tty);
    let stdin: Option<Box<dyn AsyncRead + Unpin + Send>> =
        interactive.then(|| Box::new(tokio::io::stdin()) as Box<dyn AsyncRead + Unpin + Send>);
    let io = CommandIo {
        stdin,
        stdout: Some(tokio::io::stdout()),
        stderr: (!tty).then(tokio::io::stderr),
        tty,
        resize: if tty { terminal_sizes() } else { None },
    };
    let r = match transport {
        Transport::Spdy => client::run_command(url, io).await,
        Transport::Websocket => client::run_command_ws(url, io).await,
    };
    match r {
        Ok(code) => Ok(code),
        Err(ClientError::Remote(m)) => bail!("{m}"),
        Err(e) => Err(e.into()),
    }
}

async fn port_forward(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    specs: &[String],
    transport: Transport,
) -> Result<()> {
    let mut pairs = Vec::new();
    for s in specs {
        let (l, r) = s.split_once(':').unwrap_or((s.as_str(), s.as_str()));
        let local: u16 = l.parse().with_context(|| format!("local port in {s:?}"))?;
        let remote: u16 = r.parse().with_context(|| format!("remote port in {s:?}"))?;
        if remote == 0 {
            bail!("remote port in {s:?} must be > 0");
        }
        pairs.push((local, remote));
    }
    if transport == Transport::Websocket {
        return port_forward_ws(rt, pod, &pairs).await;
    }
    let url = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: pairs.iter().map(|p| p.1 as i32).collect(),
        })
        .await?
        .into_inner()
        .url;
    let conn = client::connect_port_forward(&url).await?;
    let mut request_id = 0u32;
    let mut rx = listen(&pairs).await?;
    loop {
        tokio::select! {
            got = rx.recv() => {
                let Some((sock, remote)) = got else { break };
                let c = conn.clone();
                let id = request_id;
                request_id += 1;
                tokio::spawn(async move {
                    if let Err(e) = client::forward_one(&c, id, remote, sock).await {
                        eprintln!("an error occurred forwarding {remote}: {e}");
                        // As kubectl: a failed forward ends the session.
                        c.close().await;
                    }
                });
            }
            _ = conn.closed() => bail!("lost connection to pod"),
        }
    }
    Ok(())
}

/// Listens on 127.0.0.1 for each LOCAL:REMOTE pair (printing where, as kubectl
/// does); accepted connections arrive with the remote port they are for.
async fn listen(
    pairs: &[(u16, u16)],
) -> Result<tokio::sync::mpsc::Receiver<(tokio::net::TcpStream, u16)>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for &(local, remote) in pairs {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", local))
            .await
            .with_context(|| format!("listening on 127.0.0.1:{local}"))?;
        println!("Forwarding from {} -> {remote}", l.local_addr()?);
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = l.accept().await {
                if tx.send((sock, remote)).await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}

/// Over WebSocket a session carries its ports once, so each local connection gets
/// its own PortForward URL and session.
async fn port_forward_ws(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pairs: &[(u16, u16)],
) -> Result<()> {
    let mut rx = listen(pairs).await?;
    while let Some((sock, remote)) = rx.recv().await {
        let url = rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.into(),
                port: vec![remote as i32],
            })
            .await?
            .into_inner()
            .url;
        tokio::spawn(async move {
            if let Err(e) = client::forward_one_ws(&url, sock).await {
                eprintln!("an error occurred forwarding {remote}: {e}");
            }
        });
    }
    Ok(())
}

async fn run() -> Result<i32> {
    let cli = Cli::parse();
    if let Some(ca) = &cli.stream_ca {
        berth_stream::tls::trust_ca(ca)?;
    }
    let api = || async { ops::connect(&ops::api_socket(cli.address.clone(), &cli.config)?).await };
    let out = cli.output;
    match cli.cmd {
        Cmd::Info => return ops::info(api().await?, out).await.map(|_| 0),
        Cmd::Pull { image, user } => return ops::pull(api().await?, image, user).await.map(|_| 0),
        Cmd::Logs {
            container,
            follow,
            tail,
            timestamps,
        } => {
            let opts = logs::LogOptions {
                follow,
                tail,
                timestamps,
            };
            return logs::logs(api().await?, container, opts).await.map(|_| 0);
        }
        Cmd::Stats { no_stream, filters } => {
            return ops::stats(api().await?, filters, no_stream, out)
                .await
                .map(|_| 0);
        }
        Cmd::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "berthctl", &mut std::io::stdout());
            return Ok(0);
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            return Ok(0);
        }
        Cmd::Check => {
            return ops::check(&ops::api_socket(cli.address.clone(), &cli.config)?, out).await;
        }
        Cmd::Pods { filters } => return ops::pods(api().await?, filters, out).await.map(|_| 0),
        Cmd::Ps { all, filters } => {
            return ops::ps(api().await?, all, filters, out).await.map(|_| 0);
        }
        Cmd::Images { filters } => return ops::images(api().await?, filters, out).await.map(|_| 0),
        Cmd::Rmi { names } => return ops::rmi(api().await?, names).await.map(|_| 0),
        Cmd::Inspect { container } => {
            return ops::inspect(api().await?, container).await.map(|_| 0);
        }
        Cmd::Tasks(t) => return ops::tasks(api().await?, t, out).await.map(|_| 0),
        Cmd::Events { filters } => return ops::events(api().await?, filters, out).await.map(|_| 0),
        streaming => run_streaming(&cli.config, cli.socket.clone(), streaming).await,
    }
}

/// exec, attach and port-forward, over the CRI socket.
async fn run_streaming(config: &std::path::Path, socket: Option<PathBuf>, cmd: Cmd) -> Result<i32> {
    let socket = match socket {
        Some(s) => s,
        None => {
            let missing_ok = config == std::path::Path::new(berth_cri::config::DEFAULT_CONFIG_PATH);
            berth_cri::config::Config::load(config, missing_ok)?.listen
        }
    };
    let mut rt = runtime(&socket).await?;
    match cmd {
        Cmd::Exec {
            interactive,
            tty,
            transport,
            container,
            cmd,
        } => {
            let url = rt
                .exec(cri::ExecRequest {
                    container_id: container,
                    cmd,
                    tty,
                    stdin: interactive,
                    stdout: true,
                    stderr: !tty,
                })
                .await?
                .into_inner()
                .url;
            run_session(&url, interactive, tty, transport).await
        }
        Cmd::Attach {
            interactive,
            tty,
            transport,
            container,
        } => {
            let url = rt
                .attach(cri::AttachRequest {
                    container_id: container,
                    stdin: interactive,
                    tty,
                    stdout: true,
                    stderr: !tty,
                })
                .await?
                .into_inner()
                .url;
            run_session(&url, interactive, tty, transport).await
        }
        Cmd::PortForward {
            transport,
            pod,
            ports,
        } => {
            port_forward(&mut rt, &pod, &ports, transport).await?;
            Ok(0)
        }
        other => bail!("{} is not a streaming command", other.name()),
    }
}

fn main() {
    // A closed pipe (`berthctl ps | head`) ends berthctl quietly, as it does other
    // Unix tools, instead of failing a print.
    // SAFETY: restores the default action of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berthctl: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(run()) {
        Ok(c) => c,
        // The reader went away (`berthctl man | head`): nothing more to say.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            0
        }
        Err(e) => {
            eprintln!("berthctl: {e:#}");
            1
        }
    };
    rt.shutdown_timeout(Duration::from_millis(100));
    std::process::exit(code);
}
