//! berthd's side of the shim protocol: an async client that multiplexes calls over one
//! connection by request id and fans pushed events out to subscribers.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use berth_proto::frame::{Frame, HEADER_LEN, Kind};
use berth_proto::shim as pb;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

use crate::shim::ShimConfig;

/// A failed shim call.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The socket failed.
    #[error("shim connection: {0}")]
    Io(#[from] io::Error),
    /// The shim went away (killed, crashed or shut down).
    #[error("the shim closed the connection")]
    Closed,
    /// The shim answered with an error.
    #[error("{message}")]
    Remote {
        code: pb::ErrorCode,
        message: String,
    },
    /// The answer could not be decoded.
    #[error("shim answer: {0}")]
    Decode(String),
    /// The shim could not be started.
    #[error("starting shim: {0}")]
    Start(String),
    /// The shim did not answer in time (a runtime command hung, or the shim did).
    #[error("the shim did not answer {method:?} within {secs}s")]
    Timeout { method: pb::Method, secs: u64 },
}

impl ShimError {
    /// The shim's code for a remote error.
    pub fn code(&self) -> Option<pb::ErrorCode> {
        match self {
            ShimError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The task (or exec) is unknown to the shim.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(pb::ErrorCode::NotFound)
    }
}

/// How long a call other than `Wait` may take. Runtime commands normally take
/// milliseconds; a hung one (a stuck mount, a frozen cgroup) must not wedge berthd,
/// whose pod and container locks are held across calls.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

struct Inner {
    /// Whole frames, in call order, for the one writer task: a caller dropped at any
    /// point never leaves half a frame on the connection the whole pod shares.
    outbox: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<HashMap<u32, oneshot::Sender<Frame>>>,
    next_id: AtomicU32,
    events: broadcast::Sender<pb::Event>,
    closed: AtomicBool,
    closed_tx: tokio::sync::watch::Sender<bool>,
}

/// A connection to one shim.
#[derive(Clone)]
pub struct ShimClient {
    inner: Arc<Inner>,
}

impl Inner {
    /// The connection is gone: every caller waiting for an answer gets `Closed`.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.closed_tx.send_replace(true);
        // Dropping the senders wakes every caller.
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl ShimClient {
    /// Connects to a shim socket and starts reading its answers and events.
    pub async fn connect(socket: &Path) -> Result<ShimClient, ShimError> {
        let stream = UnixStream::connect(socket).await?;
        let (mut rd, mut wr) = stream.into_split();
        let (events, _) = broadcast::channel(256);
        let (outbox, mut frames) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let inner = Arc::new(Inner {
            outbox,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            events,
            closed: AtomicBool::new(false),
            closed_tx: tokio::sync::watch::channel(false).0,
        });
        // Weak: the task ends (closing the socket) once the last client goes, which
        // drops the outbox's sender.
        let writer = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(bytes) = frames.recv().await {
                if wr.write_all(&bytes).await.is_err() {
                    if let Some(inner) = writer.upgrade() {
                        inner.close();
                    }
                    break;
                }
            }
        });
        let reader = inner.clone();
        tokio::spawn(async move {
            loop {
                let mut h = [0u8; HEADER_LEN];
                if rd.read_exact(&mut h).await.is_err() {
                    break;
                }
                let Ok((len, kind, method, id)) = Frame::parse_header(&h) else {
                    break;
                };
                let mut payload = vec![0u8; len];
                if rd.read_exact(&mut payload).await.is_err() {
                    break;
                }
                let frame = Frame {
                    kind,
                    method,
                    id,
                    payload,
                };
                match kind {
                    Kind::Event => {
                        if let Ok(ev) = pb::Event::decode(&frame.payload[..]) {
                            let _ = reader.events.send(ev);
                        }
                    }
                    Kind::Response | Kind::Error => {
                        let tx = reader
                            .pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id);
                        if let Some(tx) = tx {
                            let _ = tx.send(frame);
                        }
                    }
                    Kind::Request => {}
                }
            }
            reader.close();
        });
        Ok(ShimClient { inner })
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Resolves once the connection is gone (the shim exited or was killed).
    pub async fn closed(&self) {
        let mut rx = self.inner.closed_tx.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Pushed events (after `subscribe`).
    pub fn events(&self) -> broadcast::Receiver<pb::Event> {
        self.inner.events.subscribe()
    }

    async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: pb::Method,
        req: &Req,
    ) -> Result<Resp, ShimError> {
        if self.is_closed() {
            return Err(ShimError::Closed);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let frame = Frame {
            kind: Kind::Request,
            method: method as u16,
            id,
            payload: req.encode_to_vec(),
        };
        let bytes = frame
            .encode()
            .map_err(|e| ShimError::Decode(e.to_string()))?;
        if self.inner.outbox.send(bytes).is_err() {
            self.inner
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(ShimError::Closed);
        }
        let answer = if method == pb::Method::Wait {
            rx.await.map_err(|_| ShimError::Closed)?
        } else {
            match tokio::time::timeout(CALL_TIMEOUT, rx).await {
                Ok(a) => a.map_err(|_| ShimError::Closed)?,
                Err(_) => {
                    self.inner
                        .pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                    return Err(ShimError::Timeout {
                        method,
                        secs: CALL_TIMEOUT.as_secs(),
                    });
                }
            }
        };
        match answer.kind {
            Kind::Response => {
                Resp::decode(&answer.payload[..]).map_err(|e| ShimError::Decode(e.to_string()))
            }
            _ => {
                let e = pb::Error::decode(&answer.payload[..])
                    .map_err(|e| ShimError::Decode(e.to_string()))?;
                Err(ShimError::Remote {
                    code: pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified),
                    message: e.message,
                })
            }
        }
    }

    /// The shim's pid and every task it holds.
    pub async fn connect_info(&self) -> Result<pb::ConnectResponse, ShimError> {
        self.call(pb::Method::Connect, &pb::Empty {}).await
    }

    /// Starts receiving events on this connection.
    pub async fn subscribe(&self) -> Result<(), ShimError> {
        self.call::<_, pb::Empty>(pb::Method::Subscribe, &pb::Empty {})
            .await
            .map(|_| ())
    }

    /// Creates a task from a bundle; returns its init pid.
    pub async fn create(&self, req: pb::CreateRequest) -> Result<u32, ShimError> {
        self.call::<_, pb::PidResponse>(pb::Method::Create, &req)
            .await
            .map(|r| r.pid)
    }

    fn task(id: &str) -> pb::TaskRef {
        pb::TaskRef {
            id: id.to_string(),
            exec_id: String::new(),
        }
    }

    /// Runs an exec process in a running task now; returns its pid.
    pub async fn exec(&self, req: pb::ExecRequest) -> Result<u32, ShimError> {
        self.call::<_, pb::PidResponse>(pb::Method::Exec, &req)
            .await
            .map(|r| r.pid)
    }

    /// Waits for an exec process; the answer carries its captured output.
    pub async fn wait_exec(&self, id: &str, exec_id: &str) -> Result<pb::ExitStatus, ShimError> {
        let r = pb::TaskRef {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
        };
        self.call(pb::Method::Wait, &r).await
    }

    /// Signals an exec process.
    pub async fn kill_exec(&self, id: &str, exec_id: &str, signal: u32) -> Result<(), ShimError> {
        let req = pb::KillRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all: false,
        };
        self.call::<_, pb::Empty>(pb::Method::Kill, &req)
            .await
            .map(|_| ())
    }

    /// Forgets an exited exec process.
    pub async fn delete_exec(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        let r = pb::TaskRef {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
        };
        self.call::<_, pb::ExitStatus>(pb::Method::Delete, &r)
            .await
            .map(|_| ())
    }

    /// Starts the pod's infra process; returns its pid.
    pub async fn start_infra(&self, req: pb::InfraRequest) -> Result<u32, ShimError> {
        self.call::<_, pb::PidResponse>(pb::Method::StartInfra, &req)
            .await
            .map(|r| r.pid)
    }

    /// Starts a created task.
    pub async fn start(&self, id: &str) -> Result<u32, ShimError> {
        self.call::<_, pb::PidResponse>(pb::Method::Start, &Self::task(id))
            .await
            .map(|r| r.pid)
    }

    /// Signals a task's init (or all its processes).
    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), ShimError> {
        let req = pb::KillRequest {
            id: id.to_string(),
            exec_id: String::new(),
            signal,
            all,
        };
        self.call::<_, pb::Empty>(pb::Method::Kill, &req)
            .await
            .map(|_| ())
    }

    /// Waits for a task to exit.
    pub async fn wait(&self, id: &str) -> Result<pb::ExitStatus, ShimError> {
        self.call(pb::Method::Wait, &Self::task(id)).await
    }

    /// Deletes an exited task; returns its exit.
    pub async fn delete(&self, id: &str) -> Result<pb::ExitStatus, ShimError> {
        self.call(pb::Method::Delete, &Self::task(id)).await
    }

    /// SIGKILL, wait (at most `wait`), delete: how every task berth gives up on ends.
    /// A task the shim no longer knows is fine; the exit, if one was seen, is returned.
    pub async fn kill_and_reap(
        &self,
        id: &str,
        wait: std::time::Duration,
    ) -> Result<Option<pb::ExitStatus>, ShimError> {
        self.reap(&Self::task(id), wait).await
    }

    /// `kill_and_reap` for an exec process.
    pub async fn kill_and_reap_exec(
        &self,
        id: &str,
        exec_id: &str,
        wait: std::time::Duration,
    ) -> Result<Option<pb::ExitStatus>, ShimError> {
        let r = pb::TaskRef {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
        };
        self.reap(&r, wait).await
    }

    async fn reap(
        &self,
        task: &pb::TaskRef,
        wait: std::time::Duration,
    ) -> Result<Option<pb::ExitStatus>, ShimError> {
        let kill = pb::KillRequest {
            id: task.id.clone(),
            exec_id: task.exec_id.clone(),
            signal: 9,
            all: task.exec_id.is_empty(),
        };
        match self.call::<_, pb::Empty>(pb::Method::Kill, &kill).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        }
        let waited = tokio::time::timeout(wait, self.call(pb::Method::Wait, task)).await;
        let exit = match waited {
            Ok(Ok(st)) => Some(st),
            Ok(Err(e)) if !e.is_not_found() => return Err(e),
            _ => None,
        };
        match self
            .call::<_, pb::ExitStatus>(pb::Method::Delete, task)
            .await
        {
            Ok(_) => Ok(exit),
            Err(e) if e.is_not_found() => Ok(exit),
            Err(e) => Err(e),
        }
    }

    /// A task's state.
    pub async fn state(&self, id: &str) -> Result<pb::StateResponse, ShimError> {
        self.call(pb::Method::State, &Self::task(id)).await
    }

    /// The pids in a task's container.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, ShimError> {
        self.call::<_, pb::PidsResponse>(pb::Method::Pids, &Self::task(id))
            .await
            .map(|r| r.pids)
    }

    /// Closes a task's stdin.
    pub async fn close_io(&self, id: &str) -> Result<(), ShimError> {
        self.call::<_, pb::Empty>(pb::Method::CloseIo, &Self::task(id))
            .await
            .map(|_| ())
    }

    /// Closes an exec process's stdin.
    pub async fn close_exec_io(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        let r = pb::TaskRef {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
        };
        self.call::<_, pb::Empty>(pb::Method::CloseIo, &r)
            .await
            .map(|_| ())
    }

    /// Sets the window size of a terminal task's (or exec's) pty.
    pub async fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), ShimError> {
        let r = pb::ResizePtyRequest {
            id: id.to_string(),
            exec_id: exec_id.to_string(),
            width,
            height,
        };
        self.call::<_, pb::Empty>(pb::Method::ResizePty, &r)
            .await
            .map(|_| ())
    }

    /// Applies OCI LinuxResources (as JSON) to a running task.
    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<(), ShimError> {
        let r = pb::UpdateRequest {
            id: id.to_string(),
            resources_json,
        };
        self.call::<_, pb::Empty>(pb::Method::Update, &r)
            .await
            .map(|_| ())
    }

    /// Attaches FIFOs to a running container's stdio (a streaming client).
    pub async fn attach(&self, req: pb::AttachRequest) -> Result<(), ShimError> {
        self.call::<_, pb::Empty>(pb::Method::Attach, &req)
            .await
            .map(|_| ())
    }

    /// Reopens a task's log file (after rotation).
    pub async fn reopen_log(&self, id: &str) -> Result<(), ShimError> {
        self.call::<_, pb::Empty>(pb::Method::ReopenLog, &Self::task(id))
            .await
            .map(|_| ())
    }

    /// Freezes or thaws a task.
    pub async fn pause(&self, id: &str, pause: bool) -> Result<(), ShimError> {
        let m = if pause {
            pb::Method::Pause
        } else {
            pb::Method::Resume
        };
        self.call::<_, pb::Empty>(m, &Self::task(id))
            .await
            .map(|_| ())
    }

    /// Asks the shim to exit (refused while tasks run).
    pub async fn shutdown(&self) -> Result<(), ShimError> {
        self.call::<_, pb::Empty>(pb::Method::Shutdown, &pb::Empty {})
            .await
            .map(|_| ())
    }
}

/// Starts a detached shim and returns once it serves on its socket. Its stderr goes
/// to `<state dir>/shim.log`, whose tail explains a failed start.
pub fn spawn_shim(binary: &Path, cfg: &ShimConfig) -> Result<(), ShimError> {
    std::fs::create_dir_all(&cfg.state_dir)?;
    let log_path = cfg.state_dir.join("shim.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut cmd = Command::new(binary);
    cmd.arg("--socket")
        .arg(&cfg.socket)
        .arg("--state-dir")
        .arg(&cfg.state_dir)
        .arg("--runtime")
        .arg(&cfg.runtime)
        .arg("--runtime-root")
        .arg(&cfg.runtime_root);
    for a in &cfg.runtime_args {
        cmd.arg("--runtime-arg").arg(a);
    }
    cmd.arg("--runtime-timeout")
        .arg(cfg.runtime_timeout.as_secs().to_string());
    // berthd's service-manager variables are berthd's own: with NOTIFY_SOCKET, runc
    // would relay the container's sd_notify to systemd (and fail on long paths); a
    // shim outlives berthd's service and must not be taken for it.
    for var in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    let status = cmd
        .status()
        .map_err(|e| ShimError::Start(format!("running {}: {e}", binary.display())))?;
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let tail = text.lines().last().unwrap_or("").to_string();
    Err(ShimError::Start(format!(
        "{} exited with {status}: {tail}",
        binary.display()
    )))
}
