//! berth's CRI streaming server (what kubelet's `k8s.io/kubelet/pkg/cri/streaming`
//! is for containerd): the single-use request tokens behind the URLs that `Exec`,
//! `Attach` and `PortForward` return, the HTTP server that upgrades those URLs to
//! SPDY/3.1, and the remote-command and port-forward protocols on top; plus the
//! client side, for `berthctl`.

pub mod spdy;
pub mod tokens;
