//! The client side (what client-go's SPDY executor and port-forwarder do), for
//! `berthctl exec/attach/port-forward` and the tests: upgrade a URL to SPDY/3.1,
//! open the streams in client-go's order, and read the exit status.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::runtime::TermSize;
use crate::spdy::{Connection, Headers, SpdyError};
use crate::status::{PORT_FORWARD_PROTOCOL, REMOTE_COMMAND_PROTOCOLS, version_of};

/// Why a client session failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not `http://host:port/...`.
    #[error("bad streaming URL {0:?}")]
    Url(String),
    /// Connecting or the HTTP exchange failed.
    #[error("{0}")]
    Http(String),
    /// The server refused the upgrade (status and body).
    #[error("unable to upgrade connection: {status}: {body}")]
    Upgrade {
        /// HTTP status.
        status: u16,
        /// Its body.
        body: String,
    },
    /// SPDY failed.
    #[error(transparent)]
    Spdy(#[from] SpdyError),
    /// The server's error stream said so (not an exit code).
    #[error("{0}")]
    Remote(String),
}

/// Any stream a session can run over (plain TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Connects to the host of an `http://` or `https://` URL; returns the stream, the
/// host and the path.
async fn dial(url: &str) -> Result<(Box<dyn Io>, String, String), ClientError> {
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(r), _) => (false, r),
        (_, Some(r)) => (true, r),
        _ => return Err(ClientError::Url(url.into())),
    };
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let tcp = TcpStream::connect(host)
        .await
        .map_err(|e| ClientError::Http(format!("connecting to {host}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    if !tls {
        return Ok((Box::new(tcp), host.to_string(), path.to_string()));
    }
    let cfg = crate::tls::client_config().ok_or_else(|| {
        ClientError::Http(format!(
            "{url}: an https streaming URL needs a trusted CA (--stream-ca)"
        ))
    })?;
    let name = host
        .rsplit_once(':')
        .map_or(host, |(h, _)| h)
        .trim_matches(|c| c == '[' || c == ']');
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|e| ClientError::Url(format!("{url}: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(cfg)
        .connect(server_name, tcp)
        .await
        .map_err(|e| ClientError::Http(format!("TLS to {host}: {e}")))?;
    Ok((Box::new(stream), host.to_string(), path.to_string()))
}

/// Sends what `input` yields on a stream, then half-closes it (FIN) at EOF.
fn send_until_eof<R: AsyncRead + Unpin + Send + 'static>(
    mut input: R,
    w: crate::spdy::StreamWriter,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match input.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if w.write(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = w.close().await;
    })
}

/// Collects everything the peer sends on a stream until its FIN or reset.
fn read_to_end(st: crate::spdy::Stream) -> tokio::task::JoinHandle<Vec<u8>> {
    let (mut rx, _) = st.split();
    tokio::spawn(async move {
        let mut v = Vec::new();
        while let Some(b) = rx.recv().await {
            v.extend_from_slice(&b);
        }
        v
    })
}

/// Upgrades `url` to SPDY offering `protocols`; returns the session and the
/// negotiated protocol.
pub async fn connect(url: &str, protocols: &[&str]) -> Result<(Connection, String), ClientError> {
    let (io, host, path) = dial(url).await?;
    let (host, path) = (host.as_str(), path.as_str());
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    let mut b = Request::post(if path.is_empty() { "/" } else { path })
        .header("host", host)
        .header("connection", "Upgrade")
        .header("upgrade", "SPDY/3.1");
    for p in protocols {
        b = b.header("x-stream-protocol-version", *p);
    }
    let req = b
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let mut resp = send
        .send_request(req)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        use http_body_util::BodyExt;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        return Err(ClientError::Upgrade {
            status,
            body: body.trim_end().to_string(),
        });
    }
    let proto = resp
        .headers()
        .get("x-stream-protocol-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let upgraded = hyper::upgrade::on(&mut resp)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let conn = Connection::client(TokioIo::new(upgraded));
    // client-go pings every 5 s.
    let c = conn.clone();
    tokio::spawn(async move {
        let mut id = 1u32;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            if c.is_closed() || c.ping(id).await.is_err() {
                return;
            }
            id = id.wrapping_add(2);
        }
    });
    Ok((conn, proto))
}

fn stream_type(t: &str) -> Headers {
    Headers::default().with("streamType", t)
}

/// Options of a remote command session.
pub struct CommandIo<I, O, E> {
    /// Local input, if any.
    pub stdin: Option<I>,
    /// Where stdout goes.
    pub stdout: Option<O>,
    /// Where stderr goes (never with a tty).
    pub stderr: Option<E>,
    /// A terminal session.
    pub tty: bool,
    /// Terminal sizes to send (tty only).
    pub resize: Option<mpsc::Receiver<TermSize>>,
}

/// Runs an exec or attach session at `url`; returns the remote exit code (0 on success).
pub async fn run_command<I, O, E>(url: &str, io: CommandIo<I, O, E>) -> Result<i32, ClientError>
where
    I: AsyncRead + Unpin + Send + 'static,
    O: AsyncWrite + Unpin + Send + 'static,
    E: AsyncWrite + Unpin + Send + 'static,
{
    let (conn, proto) = connect(url, REMOTE_COMMAND_PROTOCOLS).await?;
    let version = version_of(&proto);
    // client-go's order: error, stdin, stdout, stderr, resize.
    let error = conn.open(stream_type("error")).await?;
    let stdin = match io.stdin {
        Some(_) => Some(conn.open(stream_type("stdin")).await?),
        None => None,
    };
    let stdout = match io.stdout {
        Some(_) => Some(conn.open(stream_type("stdout")).await?),
        None => None,
    };
    let stderr = match (&io.stderr, io.tty) {
        (Some(_), false) => Some(conn.open(stream_type("stderr")).await?),
        _ => None,
    };
    let resize = if io.tty && version >= 3 {
        Some(conn.open(stream_type("resize")).await?)
    } else {
        None
    };
    let err_task = read_to_end(error);
    if let (Some(input), Some(st)) = (io.stdin, stdin) {
        send_until_eof(input, st.writer());
    }
    if let (Some(mut sizes), Some(st)) = (io.resize, resize) {
        let w = st.writer();
        tokio::spawn(async move {
            while let Some(s) = sizes.recv().await {
                let Ok(mut line) = serde_json::to_vec(&s) else {
                    continue;
                };
                line.push(b'\n');
                if w.write(&line).await.is_err() {
                    return;
                }
            }
        });
    }
    let copy_out = |st: Option<crate::spdy::Stream>,
                    out: Option<Box<dyn AsyncWrite + Unpin + Send>>| {
        tokio::spawn(async move {
            if let (Some(st), Some(mut out)) = (st, out) {
                let (mut rx, _) = st.split();
                while let Some(b) = rx.recv().await {
                    if out.write_all(&b).await.is_err() {
                        break;
                    }
                    let _ = out.flush().await;
                }
            }
        })
    };
    let o = copy_out(
        stdout,
        io.stdout
            .map(|o| Box::new(o) as Box<dyn AsyncWrite + Unpin + Send>),
    );
    let e = copy_out(
        stderr,
        io.stderr
            .map(|e| Box::new(e) as Box<dyn AsyncWrite + Unpin + Send>),
    );
    let _ = o.await;
    let _ = e.await;
    let msg = err_task.await.unwrap_or_default();
    conn.close().await;
    decode_status(version, &msg)
}

/// The exit code an error-stream message means (client-go's rules).
pub fn decode_status(version: u8, msg: &[u8]) -> Result<i32, ClientError> {
    if msg.is_empty() {
        return Ok(0);
    }
    if version < 4 {
        return Err(ClientError::Remote(format!(
            "error executing remote command: {}",
            String::from_utf8_lossy(msg)
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(msg)
        .map_err(|e| ClientError::Remote(format!("error stream protocol error: {e}")))?;
    match v["status"].as_str() {
        Some("Success") => Ok(0),
        Some("Failure") if v["reason"] == "NonZeroExitCode" => v["details"]["causes"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["reason"] == "ExitCode"))
            .and_then(|c| c["message"].as_str())
            .and_then(|m| m.parse::<u8>().ok())
            .map(i32::from)
            .ok_or_else(|| ClientError::Remote("error stream protocol error: no exit code".into())),
        Some("Failure") => Err(ClientError::Remote(
            v["message"].as_str().unwrap_or("unknown error").to_string(),
        )),
        _ => Err(ClientError::Remote(
            "error stream protocol error: unknown error".into(),
        )),
    }
}

/// Forwards one local connection to `port` in the pod (one data/error pair on the
/// session, client-go's order: error first, then data).
pub async fn forward_one(
    conn: &Connection,
    request_id: u32,
    port: u16,
    local: TcpStream,
) -> Result<(), ClientError> {
    let hdr = |t: &str| {
        Headers::default()
            .with("streamType", t)
            .with("port", &port.to_string())
            .with("requestID", &request_id.to_string())
    };
    let error = conn.open(hdr("error")).await?;
    let ew = error.writer();
    let _ = ew.close().await;
    let err_task = read_to_end(error);
    let data = conn.open(hdr("data")).await?;
    let (mut rx, w) = data.split();
    let (lr, mut lw) = local.into_split();
    let up = send_until_eof(lr, w.clone());
    while let Some(b) = rx.recv().await {
        if lw.write_all(&b).await.is_err() {
            break;
        }
    }
    let _ = lw.shutdown().await;
    w.reset().await;
    up.abort();
    let msg = err_task.await.unwrap_or_default();
    if msg.is_empty() {
        Ok(())
    } else {
        Err(ClientError::Remote(
            String::from_utf8_lossy(&msg).into_owned(),
        ))
    }
}

/// Upgrades a port-forward URL.
pub async fn connect_port_forward(url: &str) -> Result<Connection, ClientError> {
    let (conn, proto) = connect(url, &[PORT_FORWARD_PROTOCOL]).await?;
    if proto != PORT_FORWARD_PROTOCOL {
        return Err(ClientError::Remote(format!(
            "unable to negotiate protocol: got {proto:?}"
        )));
    }
    Ok(conn)
}

/// Opens a WebSocket to `url` offering `protocols`; returns it and the chosen one.
pub async fn ws_connect(
    url: &str,
    protocols: &[&str],
) -> Result<(tokio_tungstenite::WebSocketStream<Box<dyn Io>>, String), ClientError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (io, host, path) = dial(url).await?;
    // The stream is already (TLS-)connected; the scheme only shapes the request.
    let mut req = format!("ws://{host}{path}")
        .into_client_request()
        .map_err(|e| ClientError::Url(format!("{url}: {e}")))?;
    if let Ok(v) = protocols.join(", ").parse() {
        req.headers_mut().insert("sec-websocket-protocol", v);
    }
    let (ws, resp) = tokio_tungstenite::client_async(req, io)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => ClientError::Upgrade {
                status: r.status().as_u16(),
                body: String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned(),
            },
            e => ClientError::Http(e.to_string()),
        })?;
    let proto = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Ok((ws, proto))
}

/// Runs an exec or attach session over WebSocket (`v5.channel.k8s.io`, then v4);
/// stdin EOF is the v5 close message `[255, 0]`.
pub async fn run_command_ws<I, O, E>(url: &str, io: CommandIo<I, O, E>) -> Result<i32, ClientError>
where
    I: AsyncRead + Unpin + Send + 'static,
    O: AsyncWrite + Unpin + Send + 'static,
    E: AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (ws, proto) = ws_connect(url, &["v5.channel.k8s.io", "v4.channel.k8s.io"]).await?;
    let version = if proto.starts_with("v5.") {
        5
    } else if proto.starts_with("v4.") {
        4
    } else {
        1
    };
    let framing = crate::ws::Framing::of(&proto);
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(16);
    let send_task = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                return;
            }
        }
    });
    if let Some(mut input) = io.stdin {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(framing.encode(0, &buf[..n])).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if version >= 5 {
                let _ = tx.send(Message::Binary(vec![255u8, 0].into())).await;
            }
        });
    }
    if let (Some(mut sizes), true) = (io.resize, io.tty) {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(s) = sizes.recv().await {
                if let Ok(j) = serde_json::to_vec(&s) {
                    if tx.send(framing.encode(4, &j)).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    let (mut out, mut err) = (io.stdout, io.stderr);
    let mut status = Vec::new();
    while let Some(Ok(m)) = source.next().await {
        if m.is_close() {
            break;
        }
        let Some((ch, data)) = framing.decode(&m) else {
            continue;
        };
        match ch {
            1 => {
                if let Some(o) = out.as_mut() {
                    let _ = o.write_all(&data).await;
                    let _ = o.flush().await;
                }
            }
            2 => {
                if let Some(e) = err.as_mut() {
                    let _ = e.write_all(&data).await;
                    let _ = e.flush().await;
                }
            }
            3 => status.extend_from_slice(&data),
            _ => {}
        }
    }
    drop(tx);
    send_task.abort();
    if let Some(o) = out.as_mut() {
        let _ = o.shutdown().await;
    }
    decode_status(version, &status)
}

/// Forwards one local connection over its own WebSocket session (`url` came from a
/// PortForward call naming just `port`).
pub async fn forward_one_ws(url: &str, local: TcpStream) -> Result<(), ClientError> {
    use futures_util::{SinkExt, StreamExt};
    let (ws, proto) = ws_connect(url, &["v4.channel.k8s.io"]).await?;
    let framing = crate::ws::Framing::of(&proto);
    let (mut sink, mut source) = ws.split();
    let (mut lr, mut lw) = local.into_split();
    let up = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match lr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink.send(framing.encode(0, &buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
        // Keep the session until the pod side is done.
        std::future::pending::<()>().await;
    });
    // The first message on each channel is the port number.
    let (mut seen_data, mut seen_err) = (false, false);
    let mut error = Vec::new();
    while let Some(Ok(m)) = source.next().await {
        if m.is_close() {
            break;
        }
        let Some((ch, data)) = framing.decode(&m) else {
            continue;
        };
        match ch {
            0 if !seen_data => seen_data = true,
            0 => {
                if lw.write_all(&data).await.is_err() {
                    break;
                }
            }
            1 if !seen_err => seen_err = true,
            1 => error.extend_from_slice(&data),
            _ => {}
        }
    }
    let _ = lw.shutdown().await;
    up.abort();
    if error.is_empty() {
        Ok(())
    } else {
        Err(ClientError::Remote(
            String::from_utf8_lossy(&error).into_owned(),
        ))
    }
}
