//! A SPDY/3 session over an upgraded connection, behaving as spdystream does: the
//! peer's streams are accepted with an empty SYN_REPLY or refused with RST CANCEL,
//! its pings are echoed, SETTINGS and WINDOW_UPDATE are ignored (spdystream has no
//! flow control; TCP is the back-pressure), half-close is an empty DATA with FIN,
//! and closing resets what is still open, then sends GOAWAY.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, oneshot};

use super::SpdyError;
use super::frame::{
    FLAG_FIN, Frame, RST_CANCEL, RST_FRAME_TOO_LARGE, RST_PROTOCOL_ERROR, RST_REFUSED_STREAM,
};
use super::headers::{HeaderCodec, Headers};
use crate::limits::{Budget, Held, StreamLimits, chunks};

/// How long `open` waits for the peer's SYN_REPLY (client-go's value).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest DATA frame berth writes (larger writes are split).
const CHUNK: usize = crate::limits::CHUNK;

struct Entry {
    /// Where received data goes; `None` once the peer sent FIN or the stream was reset.
    data: Option<mpsc::Sender<Held>>,
    /// berth sent FIN.
    local_fin: bool,
}

struct Shared {
    out: mpsc::Sender<Frame>,
    streams: Mutex<HashMap<u32, Entry>>,
    replies: Mutex<HashMap<u32, oneshot::Sender<()>>>,
    next_id: AtomicU32,
    /// Highest stream id the peer opened (for GOAWAY).
    last_peer: AtomicU32,
    closed: AtomicBool,
    closed_notify: Notify,
    going_away: AtomicBool,
    /// Held from id allocation until the SYN_STREAM is queued: ids must reach the
    /// peer in increasing order (spdystream's `nextIdLock`).
    open_lock: tokio::sync::Mutex<()>,
    limits: StreamLimits,
    /// What received data may hold, all streams together.
    budget: Budget,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Entry>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_closed(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Readers see EOF: drop every sender.
        self.lock().clear();
        self.replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.closed_notify.notify_waiters();
    }

    async fn send(&self, f: Frame) -> Result<(), SpdyError> {
        self.out.send(f).await.map_err(|_| SpdyError::Closed)
    }
}

/// A stream the peer opened, not yet accepted.
pub struct Incoming {
    /// Its id.
    pub id: u32,
    /// Its headers.
    pub headers: Headers,
    rx: mpsc::Receiver<Held>,
    conn: Arc<Shared>,
}

impl Incoming {
    /// Sends the SYN_REPLY; the stream is usable once it is queued.
    pub async fn accept(self) -> Result<Stream, SpdyError> {
        self.conn
            .send(Frame::SynReply {
                id: self.id,
                flags: 0,
                headers: Headers::default(),
            })
            .await?;
        Ok(Stream {
            id: self.id,
            headers: self.headers,
            rx: StreamReader(self.rx),
            writer: StreamWriter {
                id: self.id,
                conn: self.conn,
            },
        })
    }

    /// Refuses it with RST_STREAM CANCEL (what apimachinery does to a rejected stream).
    pub async fn reject(self) {
        self.reset_with(RST_CANCEL).await
    }

    /// Refuses it with REFUSED_STREAM: the session holds as many streams as allowed.
    pub async fn refuse(self) {
        self.reset_with(RST_REFUSED_STREAM).await
    }

    async fn reset_with(self, status: u32) {
        self.conn.lock().remove(&self.id);
        let _ = self
            .conn
            .send(Frame::RstStream {
                id: self.id,
                status,
            })
            .await;
    }
}

/// The read side of a stream.
pub struct StreamReader(mpsc::Receiver<Held>);

impl StreamReader {
    /// The next chunk the peer sent (at most 32 KiB); `None` at FIN, reset or
    /// connection end. Taking it frees its share of the session's budget.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.0.recv().await.map(Held::into_bytes)
    }
}

/// One open stream: read what the peer sends, write through its `StreamWriter`.
pub struct Stream {
    id: u32,
    headers: Headers,
    rx: StreamReader,
    writer: StreamWriter,
}

impl Stream {
    /// Its id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The headers it was opened with.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The next chunk the peer sent; `None` at FIN, reset or connection end.
    pub async fn read(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    /// A handle to write to it (cloneable; usable while another task reads).
    pub fn writer(&self) -> StreamWriter {
        self.writer.clone()
    }

    /// Only the write side: what the peer sends on it is dropped as it arrives, so
    /// it never holds the session's budget.
    pub fn into_writer(self) -> StreamWriter {
        self.writer
    }

    /// Splits into the read side and the write side.
    pub fn split(self) -> (StreamReader, StreamWriter) {
        (self.rx, self.writer)
    }
}

/// The sending half of a stream.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    conn: Arc<Shared>,
}

impl StreamWriter {
    /// Its stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends data (as DATA frames of at most 32 KiB).
    pub async fn write(&self, data: &[u8]) -> Result<(), SpdyError> {
        {
            let g = self.conn.lock();
            match g.get(&self.id) {
                Some(e) if !e.local_fin => {}
                Some(_) => return Err(SpdyError::StreamClosed),
                None if self.conn.closed.load(Ordering::SeqCst) => return Err(SpdyError::Closed),
                None => return Err(SpdyError::StreamClosed),
            }
        }
        for c in data.chunks(CHUNK) {
            self.conn
                .send(Frame::Data {
                    id: self.id,
                    flags: 0,
                    data: Bytes::copy_from_slice(c),
                })
                .await?;
        }
        Ok(())
    }

    /// Half-closes: an empty DATA frame with FIN (once).
    pub async fn close(&self) -> Result<(), SpdyError> {
        let send = {
            let mut g = self.conn.lock();
            match g.get_mut(&self.id) {
                Some(e) if !e.local_fin => {
                    e.local_fin = true;
                    let both = e.data.is_none();
                    if both {
                        g.remove(&self.id);
                    }
                    true
                }
                _ => false,
            }
        };
        if send {
            self.conn
                .send(Frame::Data {
                    id: self.id,
                    flags: FLAG_FIN,
                    data: Bytes::new(),
                })
                .await?;
        }
        Ok(())
    }

    /// Aborts the stream with RST CANCEL, unless berth already sent FIN.
    pub async fn reset(&self) {
        let send = match self.conn.lock().remove(&self.id) {
            Some(e) => !e.local_fin,
            None => false,
        };
        if send {
            let _ = self
                .conn
                .send(Frame::RstStream {
                    id: self.id,
                    status: RST_CANCEL,
                })
                .await;
        }
    }
}

/// A SPDY session.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl Connection {
    /// Serves the server side: streams the peer opens arrive on the receiver.
    pub fn server<T>(
        io: T,
        idle: Duration,
        limits: StreamLimits,
    ) -> (Connection, mpsc::Receiver<Incoming>)
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(16);
        (Connection::start(io, true, Some(tx), idle, limits), rx)
    }

    /// Runs the client side (berthctl): open streams with `open`.
    pub fn client<T>(io: T) -> Connection
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let limits = StreamLimits::default();
        Connection::start(io, false, None, Duration::ZERO, limits)
    }

    fn start<T>(
        io: T,
        server: bool,
        incoming: Option<mpsc::Sender<Incoming>>,
        idle: Duration,
        limits: StreamLimits,
    ) -> Connection
    where
        T: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::channel(64);
        let shared = Arc::new(Shared {
            out: out_tx,
            streams: Mutex::new(HashMap::new()),
            replies: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(if server { 2 } else { 1 }),
            last_peer: AtomicU32::new(0),
            closed: AtomicBool::new(false),
            closed_notify: Notify::new(),
            going_away: AtomicBool::new(false),
            open_lock: tokio::sync::Mutex::new(()),
            limits,
            budget: limits.session_budget(),
        });
        let (r, w) = tokio::io::split(io);
        tokio::spawn(write_loop(w, out_rx, shared.clone()));
        tokio::spawn(read_loop(r, shared.clone(), incoming, server, idle));
        Connection { shared }
    }

    /// Opens a stream and waits for the peer's SYN_REPLY.
    pub async fn open(&self, headers: Headers) -> Result<Stream, SpdyError> {
        let order = self.shared.open_lock.lock().await;
        let id = self.shared.next_id.fetch_add(2, Ordering::SeqCst);
        let (data_tx, data_rx) = mpsc::channel(self.shared.limits.stream_queue());
        let (reply_tx, reply_rx) = oneshot::channel();
        self.shared.lock().insert(
            id,
            Entry {
                data: Some(data_tx),
                local_fin: false,
            },
        );
        self.shared
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, reply_tx);
        self.shared
            .send(Frame::SynStream {
                id,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: headers.clone(),
            })
            .await?;
        drop(order);
        match tokio::time::timeout(REPLY_TIMEOUT, reply_rx).await {
            Ok(Ok(())) => Ok(Stream {
                id,
                headers,
                rx: StreamReader(data_rx),
                writer: StreamWriter {
                    id,
                    conn: self.shared.clone(),
                },
            }),
            Ok(Err(_)) => Err(SpdyError::Refused),
            Err(_) => Err(SpdyError::Protocol("no SYN_REPLY within 30s".into())),
        }
    }

    /// Sends a PING (clients keep the session alive with these).
    pub async fn ping(&self, id: u32) -> Result<(), SpdyError> {
        self.shared.send(Frame::Ping(id)).await
    }

    /// Ends the session: RST CANCEL for every stream berth has not finished, GOAWAY,
    /// then the socket is shut down once the queue is written.
    pub async fn close(&self) {
        if self.shared.going_away.swap(true, Ordering::SeqCst) {
            return;
        }
        let open: Vec<u32> = self
            .shared
            .lock()
            .iter()
            .filter(|(_, e)| !e.local_fin)
            .map(|(id, _)| *id)
            .collect();
        for id in open {
            let _ = self
                .shared
                .send(Frame::RstStream {
                    id,
                    status: RST_CANCEL,
                })
                .await;
        }
        let _ = self
            .shared
            .send(Frame::GoAway {
                last_good: self.shared.last_peer.load(Ordering::SeqCst),
                status: 0,
            })
            .await;
        self.shared.lock().clear();
    }

    /// Resolves when the session has ended (either side).
    pub async fn closed(&self) {
        loop {
            let n = self.shared.closed_notify.notified();
            if self.shared.closed.load(Ordering::SeqCst) {
                return;
            }
            n.await;
        }
    }

    /// Bytes received and not yet taken by the streams' readers.
    pub fn buffered_bytes(&self) -> usize {
        let budget = self.shared.limits.session_buffer_bytes;
        budget.saturating_sub(self.shared.budget.available())
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Frame>,
    shared: Arc<Shared>,
) {
    let mut codec = HeaderCodec::new();
    let mut buf = BytesMut::with_capacity(CHUNK + 64);
    while let Some(f) = rx.recv().await {
        let goaway = matches!(f, Frame::GoAway { .. });
        buf.clear();
        if f.encode(&mut codec, &mut buf).is_err() {
            break;
        }
        // Batch what is already queued into one write.
        while buf.len() < CHUNK {
            match rx.try_recv() {
                Ok(next) => {
                    let g = matches!(next, Frame::GoAway { .. });
                    if next.encode(&mut codec, &mut buf).is_err() || g {
                        let _ = w.write_all(&buf).await;
                        let _ = w.shutdown().await;
                        shared.mark_closed();
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
            break;
        }
        if goaway {
            break;
        }
    }
    let _ = w.shutdown().await;
    shared.mark_closed();
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    shared: Arc<Shared>,
    incoming: Option<mpsc::Sender<Incoming>>,
    server: bool,
    idle: Duration,
) {
    let mut codec = HeaderCodec::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut reader = FrameHandler {
        shared: shared.clone(),
        incoming,
        server,
        // The next stream id the peer may use (ids must increase).
        min_peer_id: if server { 1 } else { 2 },
    };
    'outer: loop {
        loop {
            // A DATA frame over the limit is never buffered: its stream is reset
            // (FRAME_TOO_LARGE) and the session ends, so that the stream's reader sees
            // the session go rather than a clean end of its input.
            if let Some((id, len)) = Frame::oversized_data(&buf, shared.limits.stream_buffer_bytes)
            {
                tracing::debug!(id, len, "spdy: a frame over the limit ends the session");
                let rst = Frame::RstStream {
                    id,
                    status: RST_FRAME_TOO_LARGE,
                };
                let _ = shared.send(rst).await;
                break 'outer;
            }
            let frame = match Frame::decode(&mut buf, &mut codec) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "spdy: ending the session");
                    break 'outer;
                }
            };
            if reader.handle(frame).await.is_break() {
                break 'outer;
            }
        }
        let read = if idle.is_zero() {
            r.read_buf(&mut buf).await
        } else {
            match tokio::time::timeout(idle, r.read_buf(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break,
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    shared.mark_closed();
    // Let the writer finish too.
    let _ = shared.out.try_send(Frame::GoAway {
        last_good: shared.last_peer.load(Ordering::SeqCst),
        status: 0,
    });
}

/// What the read loop does with each frame the peer sends.
struct FrameHandler {
    shared: Arc<Shared>,
    incoming: Option<mpsc::Sender<Incoming>>,
    server: bool,
    min_peer_id: u32,
}

impl FrameHandler {
    /// Handles one frame; `Break` ends the session.
    async fn handle(&mut self, frame: Frame) -> std::ops::ControlFlow<()> {
        use std::ops::ControlFlow::{Break, Continue};
        match frame {
            Frame::SynStream {
                id, flags, headers, ..
            } => return self.syn_stream(id, flags, headers).await,
            Frame::SynReply { id, flags, .. } => {
                if let Some(tx) = self
                    .shared
                    .replies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id)
                {
                    let _ = tx.send(());
                }
                self.fin_if(id, flags);
            }
            Frame::Data { id, flags, data } => {
                let tx = self.shared.lock().get(&id).and_then(|e| e.data.clone());
                if let Some(tx) = tx {
                    // Awaiting here is the back-pressure: a slow reader, or a session
                    // holding its whole budget, slows the peer.
                    for chunk in chunks(data) {
                        let Some(held) = self.shared.budget.hold(chunk).await else {
                            break;
                        };
                        if tx.send(held).await.is_err() {
                            break;
                        }
                    }
                }
                self.fin_if(id, flags);
            }
            Frame::RstStream { id, .. } => {
                self.shared.lock().remove(&id);
                self.shared
                    .replies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            }
            Frame::Ping(id) => {
                // Echo the peer's pings (theirs have the other parity).
                let ours = if self.server { 0 } else { 1 };
                if id & 1 != ours {
                    let _ = self.shared.send(Frame::Ping(id)).await;
                }
            }
            Frame::GoAway { .. } => return Break(()),
            Frame::Headers { id, flags } => self.fin_if(id, flags),
            Frame::Ignored(_) => {}
        }
        Continue(())
    }

    fn fin_if(&self, id: u32, flags: u8) {
        if flags & FLAG_FIN != 0 {
            remote_fin(&self.shared, id);
        }
    }

    /// A stream the peer opens: refused if its id does not increase, else offered to
    /// the session's owner (a client session refuses every one).
    async fn syn_stream(
        &mut self,
        id: u32,
        flags: u8,
        headers: Headers,
    ) -> std::ops::ControlFlow<()> {
        use std::ops::ControlFlow::{Break, Continue};
        if id < self.min_peer_id || id == 0 {
            let rst = Frame::RstStream {
                id: id.max(1),
                status: RST_PROTOCOL_ERROR,
            };
            let _ = self.shared.send(rst).await;
            return Continue(());
        }
        self.min_peer_id = id + 2;
        if self.shared.going_away.load(Ordering::SeqCst) {
            return Continue(());
        }
        self.shared.last_peer.store(id, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel(self.shared.limits.stream_queue());
        let entry = Entry {
            data: (flags & FLAG_FIN == 0).then_some(tx),
            local_fin: false,
        };
        self.shared.lock().insert(id, entry);
        let inc = Incoming {
            id,
            headers,
            rx,
            conn: self.shared.clone(),
        };
        match &self.incoming {
            Some(q) => {
                if q.send(inc).await.is_err() {
                    return Break(());
                }
            }
            None => inc.reject().await,
        }
        Continue(())
    }
}

/// The peer finished its half: readers see EOF; a stream done both ways is dropped.
fn remote_fin(shared: &Shared, id: u32) {
    let mut g = shared.lock();
    if let Some(e) = g.get_mut(&id) {
        e.data = None;
        if e.local_fin {
            g.remove(&id);
        }
    }
}
