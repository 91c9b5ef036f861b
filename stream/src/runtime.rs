//! What the streaming server asks of the container runtime, and the requests it
//! keeps behind tokens.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// A boxed future (the runtime trait is object-safe).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An exec the CRI `Exec` call validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRequest {
    /// Container id.
    pub container_id: String,
    /// argv.
    pub cmd: Vec<String>,
    /// Allocate a terminal.
    pub tty: bool,
    /// Streams the client gets.
    pub stdin: bool,
    /// Stream stdout.
    pub stdout: bool,
    /// Stream stderr (never with tty).
    pub stderr: bool,
}

/// An attach the CRI `Attach` call validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachRequest {
    /// Container id.
    pub container_id: String,
    /// The container has a terminal.
    pub tty: bool,
    /// Streams the client gets.
    pub stdin: bool,
    /// Stream stdout.
    pub stdout: bool,
    /// Stream stderr.
    pub stderr: bool,
}

/// A port-forward the CRI `PortForward` call validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortForwardRequest {
    /// The pod.
    pub pod_sandbox_id: String,
    /// Ports asked for (used by the WebSocket transport; SPDY names a port per stream).
    pub ports: Vec<u16>,
}

/// A request waiting behind a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamRequest {
    /// `/exec/<token>`.
    Exec(ExecRequest),
    /// `/attach/<token>`.
    Attach(AttachRequest),
    /// `/portforward/<token>`.
    PortForward(PortForwardRequest),
}

/// A terminal size from the client's resize stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct TermSize {
    /// Columns.
    #[serde(rename = "Width")]
    pub width: u16,
    /// Rows.
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The process's side of a session: channels the transport pumps.
pub struct SessionIo {
    /// Client input; `None` from `recv` is stdin EOF.
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    /// Output to the client; dropping it ends the stream.
    pub stdout: Option<mpsc::Sender<Bytes>>,
    /// Error output to the client.
    pub stderr: Option<mpsc::Sender<Bytes>>,
    /// Terminal size changes.
    pub resize: Option<mpsc::Receiver<TermSize>>,
    /// Fires when the client has gone away (the process should be stopped).
    pub gone: oneshot::Receiver<()>,
}

/// How an exec ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecOutcome {
    /// The process exited with this code.
    Exited(i32),
    /// It could not run or was lost; the message says why.
    Failed(String),
}

/// The container runtime behind the server.
pub trait StreamRuntime: Send + Sync + 'static {
    /// Runs the command; returns once it ended and its output was handed over.
    fn exec(&self, req: ExecRequest, io: SessionIo) -> BoxFuture<ExecOutcome>;
    /// Attaches to the container's streams until it exits or the client leaves.
    fn attach(&self, req: AttachRequest, io: SessionIo) -> BoxFuture<Result<(), String>>;
    /// A TCP connection to `port` on the pod's loopback.
    fn port_forward(
        &self,
        pod: String,
        port: u16,
    ) -> BoxFuture<Result<tokio::net::TcpStream, String>>;
}

/// An exec or an attach: the two remote commands, served alike by both transports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `/exec/<token>`.
    Exec(ExecRequest),
    /// `/attach/<token>`.
    Attach(AttachRequest),
}

impl StreamRequest {
    /// An exec or attach as a `Command`; a port-forward as it is.
    pub fn into_command(self) -> Result<Command, PortForwardRequest> {
        match self {
            StreamRequest::Exec(r) => Ok(Command::Exec(r)),
            StreamRequest::Attach(r) => Ok(Command::Attach(r)),
            StreamRequest::PortForward(r) => Err(r),
        }
    }
}

impl Command {
    /// The streams the client opens: stdin, stdout, stderr (never with a tty), tty.
    pub fn streams(&self) -> (bool, bool, bool, bool) {
        let (i, o, e, t) = match self {
            Command::Exec(r) => (r.stdin, r.stdout, r.stderr, r.tty),
            Command::Attach(r) => (r.stdin, r.stdout, r.stderr, r.tty),
        };
        (i, o, e && !t, t)
    }

    /// The container it runs in.
    pub fn container_id(&self) -> &str {
        match self {
            Command::Exec(r) => &r.container_id,
            Command::Attach(r) => &r.container_id,
        }
    }

    /// Runs it; returns what goes on the error stream for protocol `version`.
    pub async fn run(
        self,
        runtime: &dyn StreamRuntime,
        io: SessionIo,
        version: u8,
    ) -> Option<Vec<u8>> {
        use crate::status::error_stream_message;
        match self {
            Command::Exec(e) => {
                let cmd = e.cmd.clone();
                let outcome = match runtime.exec(e, io).await {
                    ExecOutcome::Exited(c) => Ok(c),
                    ExecOutcome::Failed(m) => Err(m),
                };
                error_stream_message(version, &cmd, &outcome, "executing command in container")
            }
            Command::Attach(a) => {
                let outcome = runtime.attach(a, io).await.map(|()| 0);
                error_stream_message(version, &[], &outcome, "attaching to container")
            }
        }
    }
}
