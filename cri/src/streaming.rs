//! berthd's side of the streaming server: the CRI `Exec`, `Attach` and
//! `PortForward` calls (validated, then a single-use URL), and the runtime the
//! server drives: exec and attach through the pod's shim with FIFOs for the
//! client's stdio, port-forward by connecting inside the pod's network namespace.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use berth_proto::shim as pb;
use berth_stream::runtime::BoxFuture;
use berth_stream::{
    AttachRequest, ExecOutcome, ExecRequest, PortForwardRequest, SessionIo, StreamRequest,
    StreamRuntime, StreamServer,
};
use bytes::Bytes;
use k8s_cri::v1 as cri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tracing::{info, warn};

use crate::container::ContainerService;
use crate::context::new_id;
use crate::error::{CriError, Result};
use crate::records::SandboxState;

/// How long output may still drain after the process exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn invalid(msg: &str) -> CriError {
    CriError::Invalid(msg.to_string())
}

/// The CRI Exec, Attach and PortForward calls: checked, then a single-use URL on the
/// streaming server.
pub struct StreamingService {
    containers: ContainerService,
    server: OnceLock<Arc<StreamServer>>,
}

impl StreamingService {
    /// URLs for the containers of `containers`; the server is set once it listens.
    pub fn new(containers: ContainerService) -> StreamingService {
        StreamingService {
            containers,
            server: OnceLock::new(),
        }
    }

    /// The runtime the streaming server drives.
    pub fn runtime(&self) -> Arc<BerthStreams> {
        Arc::new(BerthStreams {
            containers: self.containers.clone(),
        })
    }

    /// The server the URLs point at (set once).
    pub fn set_server(&self, server: Arc<StreamServer>) {
        let _ = self.server.set(server);
    }

    /// The streaming server's base URL, once it listens.
    pub fn base_url(&self) -> Option<String> {
        self.server.get().map(|s| s.base_url().to_string())
    }

    fn stream_url(&self, req: StreamRequest) -> Result<String> {
        let server = self
            .server
            .get()
            .ok_or_else(|| CriError::Unavailable("the streaming server is not running".into()))?;
        server
            .url_for(req)
            .map_err(|e| CriError::ResourceExhausted(e.to_string()))
    }

    /// CRI Exec: a URL for an exec session.
    pub fn exec_url(&self, r: cri::ExecRequest) -> Result<String> {
        if r.container_id.is_empty() {
            return Err(invalid("missing required container_id"));
        }
        if r.tty && r.stderr {
            return Err(invalid("tty and stderr cannot both be true"));
        }
        if !r.stdin && !r.stdout && !r.stderr {
            return Err(invalid("one of stdin, stdout, or stderr must be set"));
        }
        if r.cmd.is_empty() {
            return Err(invalid("cmd: must not be empty"));
        }
        crate::limits::argv("cmd", &r.cmd)?;
        let rec = self.containers.running(&r.container_id)?;
        self.stream_url(StreamRequest::Exec(ExecRequest {
            container_id: rec.id,
            cmd: r.cmd,
            tty: r.tty,
            stdin: r.stdin,
            stdout: r.stdout,
            stderr: r.stderr,
        }))
    }

    /// CRI Attach: a URL for an attach session.
    pub fn attach_url(&self, r: cri::AttachRequest) -> Result<String> {
        if r.container_id.is_empty() {
            return Err(invalid("missing required container_id"));
        }
        if r.tty && r.stderr {
            return Err(invalid("tty and stderr cannot both be true"));
        }
        if !r.stdin && !r.stdout && !r.stderr {
            return Err(invalid("one of stdin, stdout, and stderr must be set"));
        }
        let rec = self.containers.running(&r.container_id)?;
        self.stream_url(StreamRequest::Attach(AttachRequest {
            container_id: rec.id,
            tty: r.tty,
            stdin: r.stdin,
            stdout: r.stdout,
            stderr: r.stderr,
        }))
    }

    /// CRI PortForward: a URL for a port-forward session into a ready pod.
    pub fn port_forward_url(&self, r: cri::PortForwardRequest) -> Result<String> {
        if r.pod_sandbox_id.is_empty() {
            return Err(invalid("missing required pod_sandbox_id"));
        }
        let pod = self
            .containers
            .context()
            .sandbox(&r.pod_sandbox_id, "pod_sandbox_id")?;
        if pod.state != SandboxState::Ready {
            return Err(CriError::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                pod.id
            )));
        }
        let mut ports = Vec::new();
        for (i, p) in r.port.iter().enumerate() {
            match u16::try_from(*p) {
                Ok(p) if p > 0 => ports.push(p),
                _ => return Err(invalid(&format!("port[{i}]: {p} is not a port"))),
            }
        }
        self.stream_url(StreamRequest::PortForward(PortForwardRequest {
            pod_sandbox_id: pod.id,
            ports,
        }))
    }
}

/// A client's FIFOs in the pod's shim state dir; removed on drop.
struct Fifos {
    dir: PathBuf,
    paths: Vec<PathBuf>,
}

impl Fifos {
    fn make(
        dir: &Path,
        key: &str,
        which: &[(&str, bool)],
    ) -> std::io::Result<(Fifos, Vec<String>)> {
        std::fs::create_dir_all(dir)?;
        let mut f = Fifos {
            dir: dir.to_path_buf(),
            paths: Vec::new(),
        };
        let mut names = Vec::new();
        for (suffix, on) in which {
            if !on {
                names.push(String::new());
                continue;
            }
            let p = dir.join(format!("{key}.{suffix}"));
            let _ = std::fs::remove_file(&p);
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(std::io::Error::from)?;
            names.push(p.display().to_string());
            f.paths.push(p);
        }
        Ok((f, names))
    }
}

impl Drop for Fifos {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// berthd's ends of the FIFOs, opened before the shim opens its own.
struct ClientEnds {
    stdin: Option<pipe::Sender>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
}

fn open_ends(names: &[String]) -> std::io::Result<ClientEnds> {
    let rx = |p: &String| -> std::io::Result<Option<pipe::Receiver>> {
        if p.is_empty() {
            return Ok(None);
        }
        pipe::OpenOptions::new().open_receiver(p).map(Some)
    };
    Ok(ClientEnds {
        // Read-write so the open needs no reader yet; dropping it is the EOF.
        stdin: if names[0].is_empty() {
            None
        } else {
            Some(
                pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(&names[0])?,
            )
        },
        stdout: rx(&names[1])?,
        stderr: rx(&names[2])?,
    })
}

/// Copies the session's stdin into the FIFO and the FIFOs into the session's outputs.
fn pump(ends: ClientEnds, io: &mut SessionIo) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let (Some(mut w), Some(mut input)) = (ends.stdin, io.stdin.take()) {
        tasks.push(tokio::spawn(async move {
            while let Some(b) = input.recv().await {
                if w.write_all(&b).await.is_err() {
                    break;
                }
            }
            // Dropping our end is the process's EOF.
        }));
    }
    for (rx, tx) in [
        (ends.stdout, io.stdout.take()),
        (ends.stderr, io.stderr.take()),
    ] {
        if let (Some(mut rx), Some(tx)) = (rx, tx) {
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    match rx.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }));
        }
    }
    tasks
}

/// The runtime behind berthd's streaming server.
pub struct BerthStreams {
    containers: ContainerService,
}

async fn exec(containers: ContainerService, req: ExecRequest, mut io: SessionIo) -> ExecOutcome {
    let rec = match containers.running(&req.container_id) {
        Ok(r) => r,
        Err(e) => return ExecOutcome::Failed(e.to_string()),
    };
    let ctx = containers.context().clone();
    let Some(shim) = ctx.shims.get(&rec.sandbox_id).await else {
        return ExecOutcome::Failed("the pod's shim is gone".into());
    };
    let process_json = match containers.exec_process_json(&rec.id, &req.cmd, req.tty) {
        Ok(p) => p,
        Err(e) => return ExecOutcome::Failed(e.to_string()),
    };
    let exec_id = ContainerService::new_exec_id();
    let dir = ctx.paths.shim_dir(&rec.sandbox_id).join("io");
    let made = Fifos::make(
        &dir,
        &exec_id,
        &[
            ("in", req.stdin),
            ("out", req.stdout),
            ("err", req.stderr && !req.tty),
        ],
    );
    let (fifos, names) = match made {
        Ok(v) => v,
        Err(e) => return ExecOutcome::Failed(format!("making the session's FIFOs: {e}")),
    };
    let ends = match open_ends(&names) {
        Ok(e) => e,
        Err(e) => return ExecOutcome::Failed(format!("opening the session's FIFOs: {e}")),
    };
    let started = shim
        .exec(pb::ExecRequest {
            id: rec.id.clone(),
            exec_id: exec_id.clone(),
            process_json,
            terminal: req.tty,
            stdin: req.stdin,
            stdin_fifo: names[0].clone(),
            stdout_fifo: names[1].clone(),
            stderr_fifo: names[2].clone(),
            ..Default::default()
        })
        .await;
    match started {
        Ok(pid) => containers.publish_exec(&rec, &exec_id, pid),
        Err(e) => return ExecOutcome::Failed(e.to_string()),
    }
    info!(container = %rec.id, exec = %exec_id, tty = req.tty, "exec session started");
    let copies = pump(ends, &mut io);
    if let Some(mut sizes) = io.resize.take() {
        let (shim, id, eid) = (shim.clone(), rec.id.clone(), exec_id.clone());
        tokio::spawn(async move {
            while let Some(s) = sizes.recv().await {
                let _ = shim
                    .resize_pty(&id, &eid, s.width.into(), s.height.into())
                    .await;
            }
        });
    }
    let waited = tokio::select! {
        r = shim.wait_exec(&rec.id, &exec_id) => Some(r),
        _ = &mut io.gone => None,
    };
    let result = match waited {
        Some(r) => r,
        None => {
            // The client went away: the process does not outlive its session.
            warn!(container = %rec.id, exec = %exec_id, "exec client went away; killing the process");
            let _ = shim.kill_exec(&rec.id, &exec_id, 9).await;
            shim.wait_exec(&rec.id, &exec_id).await
        }
    };
    for c in copies {
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, c).await;
    }
    let _ = shim.delete_exec(&rec.id, &exec_id).await;
    drop(fifos);
    match result {
        Ok(st) => ExecOutcome::Exited(st.exit_status as i32),
        Err(e) => ExecOutcome::Failed(e.to_string()),
    }
}

async fn attach(
    containers: ContainerService,
    req: AttachRequest,
    mut io: SessionIo,
) -> std::result::Result<(), String> {
    let rec = containers
        .running(&req.container_id)
        .map_err(|e| e.to_string())?;
    let ctx = containers.context().clone();
    let shim = ctx
        .shims
        .get(&rec.sandbox_id)
        .await
        .ok_or("the pod's shim is gone")?;
    let config = &rec.config;
    let key = format!("attach-{}", &new_id()[..12]);
    let dir = ctx.paths.shim_dir(&rec.sandbox_id).join("io");
    let (fifos, names) = Fifos::make(
        &dir,
        &key,
        &[
            ("in", req.stdin && config.stdin),
            ("out", req.stdout),
            ("err", req.stderr && !config.tty),
        ],
    )
    .map_err(|e| format!("making the session's FIFOs: {e}"))?;
    let ends = open_ends(&names).map_err(|e| format!("opening the session's FIFOs: {e}"))?;
    shim.attach(pb::AttachRequest {
        id: rec.id.clone(),
        stdin_fifo: names[0].clone(),
        stdout_fifo: names[1].clone(),
        stderr_fifo: names[2].clone(),
        stdin_once: config.stdin_once,
    })
    .await
    .map_err(|e| e.to_string())?;
    let copies = pump(ends, &mut io);
    if let Some(mut sizes) = io.resize.take() {
        let (shim, id) = (shim.clone(), rec.id.clone());
        tokio::spawn(async move {
            while let Some(s) = sizes.recv().await {
                let _ = shim
                    .resize_pty(&id, "", s.width.into(), s.height.into())
                    .await;
            }
        });
    }
    // Until the container ends (the shim closes our outputs) or the client leaves.
    let outputs_done = async {
        for c in copies {
            let _ = c.await;
        }
    };
    tokio::select! {
        _ = outputs_done => {}
        _ = &mut io.gone => {}
    }
    drop(fifos);
    Ok(())
}

/// Connects to 127.0.0.1:`port` inside the pod's network namespace: a short-lived
/// thread enters the namespace (never a shared worker), opens the socket there,
/// and the socket keeps that namespace after the thread ends.
async fn port_forward(
    containers: ContainerService,
    pod: String,
    port: u16,
) -> std::result::Result<tokio::net::TcpStream, String> {
    let rec = containers
        .context()
        .records
        .sandbox(&pod)
        .ok_or_else(|| format!("pod sandbox {pod} not found"))?;
    let netns = rec.netns.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("berth-portfwd".into())
        .spawn(move || {
            let r = (|| -> std::result::Result<std::net::TcpStream, String> {
                if let Some(ns) = &netns {
                    let f = std::fs::File::open(ns)
                        .map_err(|e| format!("opening {}: {e}", ns.display()))?;
                    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| format!("entering the pod's network namespace: {e}"))?;
                }
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .map_err(|e| format!("dial tcp4 127.0.0.1:{port}: {e}"))
            })();
            let _ = tx.send(r);
        })
        .map_err(|e| e.to_string())?;
    let s = rx
        .await
        .map_err(|_| "the connecting thread died".to_string())??;
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    tokio::net::TcpStream::from_std(s).map_err(|e| e.to_string())
}

impl StreamRuntime for BerthStreams {
    fn exec(&self, req: ExecRequest, io: SessionIo) -> BoxFuture<ExecOutcome> {
        Box::pin(exec(self.containers.clone(), req, io))
    }

    fn attach(
        &self,
        req: AttachRequest,
        io: SessionIo,
    ) -> BoxFuture<std::result::Result<(), String>> {
        Box::pin(attach(self.containers.clone(), req, io))
    }

    fn port_forward(
        &self,
        pod: String,
        port: u16,
    ) -> BoxFuture<std::result::Result<tokio::net::TcpStream, String>> {
        Box::pin(port_forward(self.containers.clone(), pod, port))
    }
}
