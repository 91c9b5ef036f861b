//! The HTTP side: `/exec/<token>`, `/attach/<token>`, `/portforward/<token>` (GET or
//! POST), protocol negotiation with `X-Stream-Protocol-Version`, and the upgrade to
//! SPDY/3.1, as apimachinery's `httpstream` does it.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming as Body;
use hyper::header::{CONNECTION, HeaderValue, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::runtime::{StreamRequest, StreamRuntime};
use crate::spdy::Connection;
use crate::status::{PORT_FORWARD_PROTOCOL, REMOTE_COMMAND_PROTOCOLS};
use crate::tokens::{RequestCache, TokenError};

use crate::admission::{Admission, Slot, Ticket};
use crate::limits::{IDLE_TIMEOUT, MAX_HEADER_BYTES, StreamLimits};

/// The streaming server: hands out URLs and serves them.
pub struct StreamServer {
    cache: RequestCache<StreamRequest>,
    base_url: String,
    runtime: Arc<dyn StreamRuntime>,
    limits: StreamLimits,
}

/// Accept errors (out of fds, out of memory) back off from 5 ms doubling to 1 s,
/// as Go's http server does, instead of spinning.
struct AcceptBackoff(Option<std::time::Duration>);

impl AcceptBackoff {
    async fn failed(&mut self, e: &std::io::Error) {
        let d = self
            .0
            .map_or(std::time::Duration::from_millis(5), |d| d * 2)
            .min(std::time::Duration::from_secs(1));
        tracing::warn!(error = %e, retry_in = ?d, "streaming: accept failed");
        self.0 = Some(d);
        tokio::time::sleep(d).await;
    }
}

type Reply = Response<Full<Bytes>>;

fn text(status: StatusCode, body: &str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    // One request per connection (stream URLs are single use): a refused client
    // cannot keep a place with an idle keep-alive connection.
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

/// `101 Switching Protocols` to `upgrade`, with extra headers.
fn switching(upgrade: &'static str, extra: &[(&'static str, String)]) -> Reply {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    r.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static(upgrade));
    for (k, v) in extra {
        if let Ok(v) = HeaderValue::from_str(v) {
            r.headers_mut().insert(*k, v);
        }
    }
    r
}

/// The SPDY protocol a `SPDY/3.1+<protocol>` WebSocket offer tunnels, if the server
/// speaks it for this request.
fn tunneled_spdy<'a>(offer: &'a str, spdy: &[&str]) -> Option<&'a str> {
    crate::tunnel::tunneled_protocol(offer).filter(|p| spdy.contains(p))
}

fn header_has(req: &Request<Body>, name: hyper::header::HeaderName, needle: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains(needle))
}

impl StreamServer {
    /// Binds `addr` (port 0 = any free port) and serves in the background, over TLS
    /// when a config is given (then URLs are `https://`).
    pub async fn start(
        addr: SocketAddr,
        runtime: Arc<dyn StreamRuntime>,
        tls: Option<Arc<rustls::ServerConfig>>,
        limits: StreamLimits,
    ) -> std::io::Result<Arc<StreamServer>> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = Arc::new(StreamServer {
            cache: RequestCache::default(),
            base_url: format!("{scheme}://{local}"),
            runtime,
            limits,
        });
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(server.clone().accept_loop(listener, acceptor));
        Ok(server)
    }

    /// Accepts connections under `Admission`'s rules: at most `max_connections`, a new
    /// one taking the place of the oldest that has not sent its request, and closed at
    /// once when every place is being served.
    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
    ) {
        let admission = Arc::new(Admission::new(self.limits.max_connections));
        let mut backoff = AcceptBackoff(None);
        let mut refused = 0u64;
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            };
            backoff.0 = None;
            let Some(ticket) = admission.admit().await else {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(
                        max_connections = self.limits.max_connections,
                        refused,
                        "streaming: every connection place is in use, closing new connections"
                    );
                }
                drop(tcp);
                continue;
            };
            // Interactive traffic: small frames must not wait for Nagle.
            let _ = tcp.set_nodelay(true);
            tokio::spawn(
                self.clone()
                    .serve_tcp(tcp, acceptor.clone(), ticket, admission.clone()),
            );
        }
    }

    /// One admitted connection: its TLS handshake if any, then HTTP, unless it is
    /// evicted while it still has not sent its request.
    async fn serve_tcp(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
        ticket: Ticket,
        admission: Arc<Admission>,
    ) {
        let Ticket { slot, id, evicted } = ticket;
        // The handshake and the request's headers must all arrive by then.
        let deadline = tokio::time::Instant::now() + self.limits.header_timeout;
        let started = {
            let admission = admission.clone();
            move || admission.started(id)
        };
        let serve = async move {
            // (peek, not readable(): tokio reports a new socket readable until a read
            // says otherwise.)
            match tokio::time::timeout_at(deadline, tcp.peek(&mut [0u8; 1])).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return,
                Err(_) => return tracing::debug!("streaming: a connection sent nothing"),
            }
            // TLS's and hyper's state (several KiB, and hyper's 16 KiB of buffers)
            // only for a client that has sent something.
            Box::pin(self.serve_sent(tcp, acceptor, slot, started, deadline)).await
        };
        tokio::select! {
            _ = serve => {}
            _ = crate::admission::evicted(evicted) => {
                tracing::debug!("streaming: closed an idle connection to admit a new one");
            }
        }
        admission.started(id);
    }

    /// A connection that has sent its first bytes: TLS if configured, then HTTP.
    async fn serve_sent(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
        slot: Slot,
        started: impl Fn() + Send + Sync + 'static,
        deadline: tokio::time::Instant,
    ) {
        let Some(a) = acceptor else {
            return self.serve_io(tcp, slot, started, deadline).await;
        };
        match tokio::time::timeout_at(deadline, a.accept(tcp)).await {
            Ok(Ok(t)) => self.serve_io(t, slot, started, deadline).await,
            Ok(Err(e)) => tracing::debug!(error = %e, "streaming: TLS handshake failed"),
            Err(_) => tracing::debug!("streaming: TLS handshake timed out"),
        }
    }

    /// HTTP/1.1 with upgrades, one request per connection (stream URLs are single
    /// use); the client must send its headers within `header_timeout` and in at most
    /// `MAX_HEADER_BYTES`.
    async fn serve_io<I>(
        self: Arc<Self>,
        io: I,
        slot: Slot,
        started: impl Fn() + Send + Sync + 'static,
        deadline: tokio::time::Instant,
    ) where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let header_timeout = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(std::time::Duration::from_millis(1));
        let svc = hyper::service::service_fn(move |req| {
            started();
            let s = self.clone();
            let slot = slot.clone();
            async move { Ok::<_, std::convert::Infallible>(s.handle(req, slot)) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_HEADER_BYTES)
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades()
            .await;
    }

    /// `http(s)://<addr>` of this server.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Stores a request and returns its URL (`<base>/exec/<token>` and so on).
    pub fn url_for(&self, req: StreamRequest) -> Result<String, TokenError> {
        let path = match &req {
            StreamRequest::Exec(_) => "exec",
            StreamRequest::Attach(_) => "attach",
            StreamRequest::PortForward(_) => "portforward",
        };
        let token = self.cache.insert(req)?;
        Ok(format!("{}/{path}/{token}", self.base_url))
    }

    fn handle(self: &Arc<Self>, mut req: Request<Body>, slot: Slot) -> Reply {
        let not_found = || text(StatusCode::NOT_FOUND, "404 page not found\n");
        if req.method() != hyper::Method::GET && req.method() != hyper::Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        let path = req.uri().path().to_string();
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (Some(kind), Some(token)) = (parts.next(), parts.next()) else {
            return not_found();
        };
        if token.contains('/') {
            return not_found();
        }
        // Consumed even when the kind does not match, as kubelet does.
        let Some(stream_req) = self.cache.consume(token) else {
            return not_found();
        };
        match (&stream_req, kind) {
            (StreamRequest::Exec(_), "exec")
            | (StreamRequest::Attach(_), "attach")
            | (StreamRequest::PortForward(_), "portforward") => {}
            _ => return not_found(),
        }
        if header_has(&req, UPGRADE, "websocket") && header_has(&req, CONNECTION, "upgrade") {
            return self.upgrade_websocket(req, stream_req, slot);
        }
        let server_protocols = Self::spdy_protocols(&stream_req);
        let client: Vec<String> = req
            .headers()
            .get_all("x-stream-protocol-version")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if client.is_empty() {
            return text(
                StatusCode::BAD_REQUEST,
                "unable to upgrade: X-Stream-Protocol-Version is required\n",
            );
        }
        let Some(chosen) = client
            .iter()
            .find(|c| server_protocols.contains(&c.as_str()))
            .cloned()
        else {
            let mut r = text(
                StatusCode::FORBIDDEN,
                &format!(
                    "unable to upgrade: unable to negotiate protocol: client supports [{}], server accepts [{}]\n",
                    client.join(" "),
                    server_protocols.join(" ")
                ),
            );
            for p in server_protocols {
                r.headers_mut().append(
                    "x-accepted-stream-protocol-versions",
                    HeaderValue::from_static(p),
                );
            }
            return r;
        };
        if !header_has(&req, CONNECTION, "upgrade") || !header_has(&req, UPGRADE, "spdy/3.1") {
            return text(
                StatusCode::BAD_REQUEST,
                "unable to upgrade: missing upgrade headers in request (want Connection: Upgrade, Upgrade: SPDY/3.1)\n",
            );
        }
        let upgrade = hyper::upgrade::on(&mut req);
        let me = self.clone();
        let proto = chosen.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(upgraded) = upgrade.await else {
                return;
            };
            me.serve_spdy(TokioIo::new(upgraded), proto, stream_req)
                .await
        });
        switching("SPDY/3.1", &[("x-stream-protocol-version", chosen)])
    }

    /// The SPDY protocols this request may use (what `X-Stream-Protocol-Version` or a
    /// tunneling WebSocket subprotocol may name).
    fn spdy_protocols(req: &StreamRequest) -> &'static [&'static str] {
        match req {
            StreamRequest::PortForward(_) => &[PORT_FORWARD_PROTOCOL],
            _ => REMOTE_COMMAND_PROTOCOLS,
        }
    }

    /// A SPDY/3.1 session on `io` (an upgraded connection, or a WebSocket tunnel).
    async fn serve_spdy<I>(&self, io: I, protocol: String, stream_req: StreamRequest)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let (conn, incoming) = Connection::server(io, IDLE_TIMEOUT, self.limits);
        let rt = self.runtime.clone();
        match stream_req.into_command() {
            Ok(cmd) => crate::remotecommand::serve(conn, incoming, &protocol, cmd, rt).await,
            Err(pf) => crate::portforward::serve(conn, incoming, pf, rt, self.limits).await,
        }
    }

    /// The WebSocket handshake (RFC 6455) with `wsstream`'s subprotocol choice: the
    /// client's first offer the server knows; none offered means binary framing.
    fn upgrade_websocket(
        self: &Arc<Self>,
        mut req: Request<Body>,
        stream_req: StreamRequest,
        slot: Slot,
    ) -> Reply {
        use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
        if req.method() != hyper::Method::GET {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "websocket upgrades use GET\n",
            );
        }
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
            return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
        };
        if req
            .headers()
            .get("sec-websocket-version")
            .and_then(|v| v.to_str().ok())
            != Some("13")
        {
            let mut r = text(
                StatusCode::BAD_REQUEST,
                "unsupported Sec-WebSocket-Version\n",
            );
            r.headers_mut()
                .insert("sec-websocket-version", HeaderValue::from_static("13"));
            return r;
        }
        let server: &[&str] = match stream_req {
            StreamRequest::PortForward(_) => crate::ws::PORT_FORWARD_PROTOCOLS,
            _ => crate::ws::REMOTE_COMMAND_PROTOCOLS,
        };
        let offered: Vec<String> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        // The client's first offer the server knows: a wsstream channel protocol, or a
        // SPDY protocol tunneled as `SPDY/3.1+<protocol>` (client-go's port-forward).
        let spdy = Self::spdy_protocols(&stream_req);
        let tunneled = |o| tunneled_spdy(o, spdy);
        let chosen = if offered.is_empty() {
            String::new()
        } else {
            match offered
                .iter()
                .find(|o| server.contains(&o.as_str()) || tunneled(o).is_some())
            {
                Some(c) => c.clone(),
                None => return text(StatusCode::FORBIDDEN, ""),
            }
        };
        let tunnel = tunneled(&chosen).map(str::to_string);
        let upgrade = hyper::upgrade::on(&mut req);
        let me = self.clone();
        let proto = chosen.clone();
        let limits = self.limits;
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(upgraded) = upgrade.await else {
                return;
            };
            // No message or frame over the stream buffer: tungstenite would otherwise
            // assemble up to 64 MiB per message.
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .max_message_size(Some(limits.stream_buffer_bytes))
                .max_frame_size(Some(limits.stream_buffer_bytes));
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                Some(config),
            )
            .await;
            if let Some(spdy_protocol) = tunnel {
                let io = crate::tunnel::Tunnel::new(ws);
                return me.serve_spdy(io, spdy_protocol, stream_req).await;
            }
            let rt = me.runtime.clone();
            match stream_req.into_command() {
                Ok(cmd) => crate::ws::serve_command(ws, proto, cmd, rt).await,
                Err(pf) => crate::ws::serve_port_forward(ws, proto, pf, rt, limits).await,
            }
        });
        let mut extra = vec![("sec-websocket-accept", derive_accept_key(key.as_bytes()))];
        if !chosen.is_empty() {
            extra.push(("sec-websocket-protocol", chosen));
        }
        switching("websocket", &extra)
    }
}
