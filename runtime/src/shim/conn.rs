//! Client connections: accepting, reading frames, answering and pushing events.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use berth_proto::frame::{Frame, FrameBuffer, Kind};
use berth_proto::shim as pb;
use prost::Message;

use super::{Reply, Shim};

/// One client connection (berthd, or a test).
pub(super) struct Conn {
    pub stream: UnixStream,
    inbuf: FrameBuffer,
    /// Encoded frames waiting for the socket to take them.
    pub out: Vec<u8>,
    /// Pushed events go to it.
    pub subscribed: bool,
    /// Read side done (or broken): dropped once `out` is flushed.
    pub closed: bool,
}

impl Shim {
    pub(super) fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.next_conn;
            self.next_conn += 1;
            self.conns.insert(
                id,
                Conn {
                    stream,
                    inbuf: FrameBuffer::default(),
                    out: Vec::new(),
                    subscribed: false,
                    closed: false,
                },
            );
        }
    }

    /// Reads what a connection sent and handles every whole request in it.
    pub(super) fn read_conn(&mut self, id: u64) {
        let frames = match self.conns.get_mut(&id) {
            Some(c) => c.read_frames(),
            None => return,
        };
        for f in frames {
            if f.kind == Kind::Request {
                if let Some(reply) = self.handle(id, &f) {
                    self.respond(id, f.method, f.id, reply);
                }
            }
        }
    }

    pub(super) fn flush_conn(&mut self, id: u64) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.flush();
        }
    }

    fn send(&mut self, conn: u64, frame: Frame) {
        if let (Some(c), Ok(bytes)) = (self.conns.get_mut(&conn), frame.encode()) {
            c.out.extend_from_slice(&bytes);
            c.flush();
        }
    }

    /// Answers request `id` of `method` on `conn`.
    pub(super) fn respond(&mut self, conn: u64, method: u16, id: u32, reply: Reply) {
        let (kind, payload) = match reply {
            Ok(payload) => (Kind::Response, payload),
            Err((code, message)) => {
                let e = pb::Error {
                    code: code as i32,
                    message,
                };
                (Kind::Error, e.encode_to_vec())
            }
        };
        self.send(
            conn,
            Frame {
                kind,
                method,
                id,
                payload,
            },
        );
    }

    /// Pushes an event to every subscribed connection.
    pub(super) fn publish(&mut self, ev: pb::Event) {
        let payload = ev.encode_to_vec();
        let subs: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.subscribed)
            .map(|(k, _)| *k)
            .collect();
        for s in subs {
            let frame = Frame {
                kind: Kind::Event,
                method: 0,
                id: 0,
                payload: payload.clone(),
            };
            self.send(s, frame);
        }
    }
}

impl Conn {
    /// Everything readable now, as whole frames; a client that breaks framing is dropped.
    fn read_frames(&mut self) -> Vec<Frame> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(n) => self.inbuf.extend(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    break;
                }
            }
        }
        let mut frames = Vec::new();
        loop {
            match self.inbuf.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(_) => {
                    self.closed = true;
                    break;
                }
            }
        }
        frames
    }

    /// Writes what the socket takes now.
    fn flush(&mut self) {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => {
                    self.closed = true;
                    self.out.clear();
                }
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    self.out.clear();
                }
            }
        }
    }
}
