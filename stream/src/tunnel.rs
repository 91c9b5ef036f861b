//! SPDY tunneled through WebSocket, as current client-go does port-forward (subprotocol
//! `SPDY/3.1+portforward.k8s.io`): the WebSocket carries a plain SPDY/3.1 byte stream.
//!
//! Framing as client-go's `TunnelingConnection` has it on both ends: each write is one
//! binary message; reads treat the messages as one byte stream (spdystream writes a
//! frame in several small writes, so message and frame boundaries never line up); a
//! text message is an error; close 1000 is EOF. Nothing else is added inside the tunnel.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// The prefix apimachinery puts before a SPDY protocol to tunnel it (`SPDY/3.1+`).
pub const TUNNELING_PREFIX: &str = "SPDY/3.1+";

/// The SPDY protocol a tunneling WebSocket subprotocol names: `SPDY/3.1+<p>.k8s.io`
/// gives `<p>.k8s.io` (apimachinery's `protocolSupportsWebsocketTunneling`).
pub fn tunneled_protocol(subprotocol: &str) -> Option<&str> {
    subprotocol
        .strip_prefix(TUNNELING_PREFIX)
        .filter(|p| p.ends_with(".k8s.io"))
}

/// A WebSocket seen as a byte stream.
pub struct Tunnel<S> {
    ws: S,
    /// The unread rest of the current message.
    pending: Bytes,
    eof: bool,
    /// Largest message a write makes (client-go's is whatever one `Write` holds).
    max_message: usize,
}

impl<S> Tunnel<S> {
    /// Wraps an upgraded WebSocket.
    pub fn new(ws: S) -> Tunnel<S> {
        Tunnel {
            ws,
            pending: Bytes::new(),
            eof: false,
            max_message: usize::MAX,
        }
    }

    /// Splits writes into messages of at most `n` bytes, as a peer may (tests use it to
    /// put message boundaries inside frames).
    pub fn with_max_message(mut self, n: usize) -> Tunnel<S> {
        self.max_message = n.max(1);
        self
    }
}

fn ws_err(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => io::Error::other(other),
    }
}

impl<S> AsyncRead for Tunnel<S>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None => self.eof = true,
                Some(Ok(Message::Binary(b))) => self.pending = b,
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.as_ref().map(|f| f.code);
                    if code.is_some_and(|c| c != CloseCode::Normal) {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            format!("websocket closed with {code:?}"),
                        )));
                    }
                    self.eof = true;
                }
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "invalid message type received",
                    )));
                }
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(ws_err(e))),
            }
        }
    }
}

impl<S> AsyncWrite for Tunnel<S>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_err)?;
        let n = buf.len().min(self.max_message);
        let msg = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
        Pin::new(&mut self.ws).start_send(msg).map_err(ws_err)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_err)
    }

    /// Close 1000 with no reason, as `TunnelingConnection.Close` sends.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_ready(cx)) {
            Ok(()) => {
                let close = Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                }));
                // Already closing (the peer's close came first) is fine.
                let _ = Pin::new(&mut self.ws).start_send(close);
            }
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {
                return Poll::Ready(Ok(()));
            }
            Err(e) => return Poll::Ready(Err(ws_err(e))),
        }
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_err(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 16);
        (
            WebSocketStream::from_raw_socket(a, Role::Client, None).await,
            WebSocketStream::from_raw_socket(b, Role::Server, None).await,
        )
    }

    #[test]
    fn tunneled_protocols_follow_apimachinery() {
        assert_eq!(
            tunneled_protocol("SPDY/3.1+portforward.k8s.io"),
            Some("portforward.k8s.io")
        );
        assert_eq!(
            tunneled_protocol("SPDY/3.1+v4.channel.k8s.io"),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(tunneled_protocol("portforward.k8s.io"), None);
        assert_eq!(tunneled_protocol("SPDY/3.1+portforward"), None);
        assert_eq!(tunneled_protocol("SPDY/3+portforward.k8s.io"), None);
    }

    #[tokio::test]
    async fn messages_read_as_one_byte_stream() {
        let (mut client, server) = pair().await;
        let mut t = Tunnel::new(server);
        for part in [&b"ab"[..], b"", b"cde", b"f"] {
            client.send(Message::binary(part.to_vec())).await.unwrap();
        }
        client.send(Message::Close(None)).await.unwrap();
        let mut all = Vec::new();
        t.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"abcdef");
    }

    #[tokio::test]
    async fn text_message_and_abnormal_close_are_errors() {
        let (mut client, server) = pair().await;
        let mut t = Tunnel::new(server);
        client.send(Message::text("x")).await.unwrap();
        let mut buf = [0u8; 4];
        let e = t.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        let (mut client, server) = pair().await;
        let mut t = Tunnel::new(server);
        let frame = CloseFrame {
            code: CloseCode::Error,
            reason: "boom".into(),
        };
        client.send(Message::Close(Some(frame))).await.unwrap();
        assert!(t.read(&mut buf).await.is_err());
    }

    #[tokio::test]
    async fn each_write_is_one_binary_message_and_shutdown_closes_1000() {
        let (client, mut server) = pair().await;
        let mut t = Tunnel::new(client).with_max_message(3);
        t.write_all(b"hello").await.unwrap();
        t.flush().await.unwrap();
        t.shutdown().await.unwrap();
        let mut got = Vec::new();
        while let Some(m) = server.next().await {
            got.push(m.unwrap());
        }
        assert_eq!(got[0], Message::binary(b"hel".to_vec()));
        assert_eq!(got[1], Message::binary(b"lo".to_vec()));
        assert!(matches!(&got[2], Message::Close(Some(f)) if f.code == CloseCode::Normal));
    }
}
