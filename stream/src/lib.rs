//! berth's CRI streaming server (what kubelet's `k8s.io/kubelet/pkg/cri/streaming`
//! is for containerd): the single-use request tokens behind the URLs that `Exec`,
//! `Attach` and `PortForward` return, the HTTP server that upgrades those URLs to
//! SPDY/3.1 (plain, or tunneled in WebSocket) or WebSocket, and the remote-command and
//! port-forward protocols on top; plus the
//! client side, for `berthctl`.

pub mod admission;
pub mod client;
pub mod limits;
pub mod portforward;
pub mod remotecommand;
pub mod runtime;
pub mod server;
pub mod spdy;
pub mod status;
pub mod tls;
pub mod tokens;
pub mod tunnel;
pub mod ws;

pub use runtime::{
    AttachRequest, Command, ExecOutcome, ExecRequest, PortForwardRequest, SessionIo, StreamRequest,
    StreamRuntime, TermSize,
};
pub use server::StreamServer;
