//! The WebSocket transport, as apimachinery's `wsstream` frames it: every message
//! is one channel byte and a payload (binary), or an ASCII digit and base64 (the
//! `base64.` protocols). Exec/attach channels: 0 stdin, 1 stdout, 2 stderr,
//! 3 error, 4 resize; `v5.channel.k8s.io` adds the half-close message `[255, ch]`.
//! Port-forward: channel 2i carries port i's data and 2i+1 its errors, each opened
//! by the port number as 2 little-endian bytes.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::limits::{Held, StreamLimits, chunks};
use crate::runtime::{Command, PortForwardRequest, SessionIo, StreamRuntime, TermSize};

/// Exec/attach subprotocols, in the order berth prefers when a client offers several
/// (the client's order decides, as in wsstream).
pub const REMOTE_COMMAND_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];
/// Port-forward subprotocols.
pub const PORT_FORWARD_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "portforward.k8s.io",
    "v2.portforward.k8s.io",
];

/// The v5 half-close channel.
const CLOSE_CHANNEL: u8 = 255;

/// Message framing of one protocol.
#[derive(Clone, Copy, Debug)]
pub struct Framing {
    /// Text frames: channel as an ASCII digit, payload base64.
    pub base64: bool,
}

impl Framing {
    /// The framing `protocol` uses.
    pub fn of(protocol: &str) -> Framing {
        Framing {
            base64: protocol.contains("base64"),
        }
    }

    /// One message on a channel (base64 framing: channels 0 to 79, one ASCII digit
    /// or character from '0'; callers keep to them).
    pub fn encode(self, ch: u8, data: &[u8]) -> Message {
        if self.base64 {
            debug_assert!(ch < 80, "base64 framing has channels 0 to 79");
            let mut s = String::with_capacity(1 + data.len() * 4 / 3 + 4);
            s.push((b'0' + ch) as char);
            s.push_str(&STANDARD.encode(data));
            Message::Text(s.into())
        } else {
            let mut v = Vec::with_capacity(1 + data.len());
            v.push(ch);
            v.extend_from_slice(data);
            Message::Binary(v.into())
        }
    }

    /// A received message as (channel, payload); `None` for empty or undecodable ones.
    pub fn decode(self, m: &Message) -> Option<(u8, Vec<u8>)> {
        match m {
            Message::Binary(b) if !b.is_empty() => Some((b[0], b[1..].to_vec())),
            Message::Text(t) if self.base64 && !t.is_empty() => {
                let b = t.as_bytes();
                let ch = b[0].checked_sub(b'0')?;
                Some((ch, STANDARD.decode(&b[1..]).ok()?))
            }
            _ => None,
        }
    }
}

/// The remote-command version of a WebSocket protocol (JSON status from v4).
fn version_of(protocol: &str) -> u8 {
    if protocol.starts_with("v5.") {
        5
    } else if protocol.starts_with("v4.") {
        4
    } else {
        1
    }
}

type Ws<T> = WebSocketStream<T>;

/// Sends everything queued on `rx`, then closes with 1000 (Normal).
async fn writer<T>(
    mut sink: futures_util::stream::SplitSink<Ws<T>, Message>,
    mut rx: mpsc::Receiver<Message>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(m) = rx.recv().await {
        if sink.send(m).await.is_err() {
            return;
        }
    }
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    let _ = sink.close().await;
}

/// Serves an exec or attach session over WebSocket.
pub async fn serve_command<T>(
    ws: Ws<T>,
    protocol: String,
    cmd: Command,
    runtime: Arc<dyn StreamRuntime>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let framing = Framing::of(&protocol);
    let version = version_of(&protocol);
    let (stdin, stdout, stderr, tty) = cmd.streams();
    let (sink, mut source) = ws.split();
    let (out_tx, out_rx) = mpsc::channel::<Message>(32);
    let write_task = tokio::spawn(writer(sink, out_rx));
    // "Connection established": one empty message on the lowest writable channel.
    let first = if stdout {
        1
    } else if stderr {
        2
    } else {
        3
    };
    let _ = out_tx.send(framing.encode(first, &[])).await;

    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (resize_tx, resize_rx) = mpsc::channel::<TermSize>(4);
    let (gone_tx, gone_rx) = oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut stdin_tx = stdin.then_some(stdin_tx);
        let mut resize_buf: Vec<u8> = Vec::new();
        while let Some(Ok(m)) = source.next().await {
            if m.is_close() {
                break;
            }
            let Some((ch, data)) = framing.decode(&m) else {
                continue;
            };
            match ch {
                0 => {
                    // In chunks: the queue's bound is then its length times CHUNK.
                    for chunk in chunks(Bytes::from(data)) {
                        let Some(tx) = &stdin_tx else { break };
                        if tx.send(chunk).await.is_err() {
                            stdin_tx = None;
                        }
                    }
                }
                4 => {
                    resize_buf.extend_from_slice(&data);
                    let mut it =
                        serde_json::Deserializer::from_slice(&resize_buf).into_iter::<TermSize>();
                    let mut used = 0;
                    while let Some(Ok(s)) = it.next() {
                        used = it.byte_offset();
                        let _ = resize_tx.send(s).await;
                    }
                    resize_buf.drain(..used);
                    if resize_buf.len() > 4096 {
                        resize_buf.clear();
                    }
                }
                CLOSE_CHANNEL if version >= 5 => {
                    // [255, ch]: the client finished writing channel ch.
                    if data.len() != 1 {
                        break;
                    }
                    if data[0] == 0 {
                        stdin_tx = None;
                    }
                }
                _ => {}
            }
        }
        let _ = gone_tx.send(());
    });

    let mut pumps = Vec::new();
    let mut output = |on: bool, ch: u8| {
        on.then(|| {
            let (tx, mut rx) = mpsc::channel::<Bytes>(16);
            let out = out_tx.clone();
            pumps.push(tokio::spawn(async move {
                while let Some(b) = rx.recv().await {
                    if out.send(framing.encode(ch, &b)).await.is_err() {
                        break;
                    }
                }
            }));
            tx
        })
    };
    let io = SessionIo {
        stdin: stdin.then_some(stdin_rx),
        stdout: output(stdout, 1),
        stderr: output(stderr, 2),
        resize: tty.then_some(resize_rx),
        gone: gone_rx,
    };
    let status = cmd.run(runtime.as_ref(), io, version).await;
    for p in pumps {
        let _ = p.await;
    }
    if let Some(msg) = status {
        let _ = out_tx.send(framing.encode(3, &msg)).await;
    }
    drop(out_tx);
    let _ = write_task.await;
    reader.abort();
}

/// Serves a port-forward session over WebSocket: every requested port at once.
pub async fn serve_port_forward<T>(
    ws: Ws<T>,
    protocol: String,
    req: PortForwardRequest,
    runtime: Arc<dyn StreamRuntime>,
    limits: StreamLimits,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let framing = Framing::of(&protocol);
    let (sink, mut source) = ws.split();
    let (out_tx, out_rx) = mpsc::channel::<Message>(32);
    let write_task = tokio::spawn(writer(sink, out_rx));
    // Two channels per port, as two streams each over SPDY; channel numbers are bytes.
    // Base64 framing names a channel by one ASCII character from '0': 80 channels.
    let channels = if framing.base64 { 80 } else { 256 };
    let most = (limits.max_port_forward_streams / 2).min(channels / 2);
    let refusal = if req.ports.is_empty() {
        Some("query parameter \"port\" is required".to_string())
    } else if req.ports.len() > most {
        Some(format!(
            "{} ports requested, at most {most} may be forwarded in one session",
            req.ports.len()
        ))
    } else {
        None
    };
    if let Some(msg) = refusal {
        let _ = out_tx.send(framing.encode(1, msg.as_bytes())).await;
        drop(out_tx);
        let _ = write_task.await;
        return;
    }
    let budget = limits.session_budget();
    for (i, p) in req.ports.iter().enumerate() {
        let le = p.to_le_bytes();
        let _ = out_tx.send(framing.encode(2 * i as u8, &le)).await;
        let _ = out_tx.send(framing.encode(2 * i as u8 + 1, &le)).await;
    }
    let mut inputs: Vec<Option<mpsc::Sender<Held>>> = Vec::new();
    let mut forwards = Vec::new();
    for (i, port) in req.ports.iter().copied().enumerate() {
        let (tx, mut rx) = mpsc::channel::<Held>(limits.stream_queue());
        inputs.push(Some(tx));
        let (rt, pod, out) = (runtime.clone(), req.pod_sandbox_id.clone(), out_tx.clone());
        forwards.push(tokio::spawn(async move {
            let (data_ch, err_ch) = (2 * i as u8, 2 * i as u8 + 1);
            let tcp = match rt.port_forward(pod.clone(), port).await {
                Ok(t) => t,
                Err(e) => {
                    let msg = format!("error forwarding port {port} to pod {pod}, uid : {e}");
                    let _ = out.send(framing.encode(err_ch, msg.as_bytes())).await;
                    return;
                }
            };
            let (mut rd, mut wr) = tcp.into_split();
            let up = tokio::spawn(async move {
                while let Some(b) = rx.recv().await {
                    if wr.write_all(&b.into_bytes()).await.is_err() {
                        break;
                    }
                }
                let _ = wr.shutdown().await;
            });
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out.send(framing.encode(data_ch, &buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }
            }
            up.abort();
        }));
    }
    let reader = tokio::spawn(async move {
        while let Some(Ok(m)) = source.next().await {
            if m.is_close() {
                break;
            }
            let Some((ch, data)) = framing.decode(&m) else {
                continue;
            };
            let i = (ch / 2) as usize;
            if ch % 2 != 0 {
                continue;
            }
            // Each chunk holds its share of the session's budget until written.
            for chunk in chunks(Bytes::from(data)) {
                let Some(Some(tx)) = inputs.get(i) else { break };
                let Some(held) = budget.hold(chunk).await else {
                    break;
                };
                if tx.send(held).await.is_err() {
                    inputs[i] = None;
                }
            }
        }
    });
    // When every port is done, the session closes (1000).
    for f in forwards {
        let _ = f.await;
    }
    drop(out_tx);
    let _ = write_task.await;
    reader.abort();
}
