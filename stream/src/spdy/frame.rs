//! SPDY/3 frames as Kubernetes' spdystream writes and reads them (the HTTP upgrade
//! token says SPDY/3.1, the version field says 3). All integers big-endian.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::SpdyError;
use super::headers::{HeaderCodec, Headers};

/// Control frame types.
pub mod kind {
    /// Opens a stream.
    pub const SYN_STREAM: u16 = 1;
    /// Accepts a stream.
    pub const SYN_REPLY: u16 = 2;
    /// Aborts a stream.
    pub const RST_STREAM: u16 = 3;
    /// Session settings (ignored, as spdystream ignores them).
    pub const SETTINGS: u16 = 4;
    /// Liveness check; the peer's are echoed.
    pub const PING: u16 = 6;
    /// The session ends.
    pub const GOAWAY: u16 = 7;
    /// More headers for a stream.
    pub const HEADERS: u16 = 8;
    /// Flow control (ignored, as spdystream ignores it).
    pub const WINDOW_UPDATE: u16 = 9;
}

/// FIN: the sender's half of the stream is done.
pub const FLAG_FIN: u8 = 0x01;
/// SYN_STREAM UNIDIRECTIONAL: the receiver may not send.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// RST_STREAM PROTOCOL_ERROR.
pub const RST_PROTOCOL_ERROR: u32 = 1;
/// RST_STREAM REFUSED_STREAM: the receiver will not take more streams.
pub const RST_REFUSED_STREAM: u32 = 3;
/// RST_STREAM CANCEL (what `Reset()` sends).
pub const RST_CANCEL: u32 = 5;
/// RST_STREAM FRAME_TOO_LARGE: a DATA frame over the receiver's limit.
pub const RST_FRAME_TOO_LARGE: u32 = 11;
/// Largest DATA payload (24-bit length).
pub const MAX_DATA: usize = (1 << 24) - 1;
/// Largest control payload accepted. Kubernetes' header blocks are a few hundred
/// bytes; the protocol's 16 MiB would let one frame pin that much per session.
const MAX_CONTROL: usize = 256 * 1024;

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Opens stream `id` with headers.
    SynStream {
        /// Stream id (odd from clients).
        id: u32,
        /// Associated stream (0 for Kubernetes clients).
        associated: u32,
        /// 3-bit priority.
        priority: u8,
        /// FIN / UNIDIRECTIONAL.
        flags: u8,
        /// Its headers.
        headers: Headers,
    },
    /// Accepts stream `id`.
    SynReply {
        /// Stream id.
        id: u32,
        /// FIN.
        flags: u8,
        /// Reply headers (empty from kubelet).
        headers: Headers,
    },
    /// Aborts a stream.
    RstStream {
        /// Stream id.
        id: u32,
        /// Status code (1..=11).
        status: u32,
    },
    /// Ping with an id (clients use odd ids).
    Ping(u32),
    /// The peer is going away.
    GoAway {
        /// Highest stream id it processed.
        last_good: u32,
        /// 0 OK, 1 protocol error, 2 internal error.
        status: u32,
    },
    /// Extra headers for a stream (accepted and ignored).
    Headers {
        /// Stream id.
        id: u32,
        /// FIN.
        flags: u8,
    },
    /// A control frame berth does not act on (SETTINGS, WINDOW_UPDATE).
    Ignored(u16),
    /// Stream data.
    Data {
        /// Stream id.
        id: u32,
        /// FIN.
        flags: u8,
        /// Payload.
        data: Bytes,
    },
}

fn control_header(out: &mut BytesMut, kind: u16, flags: u8, len: usize) {
    out.put_u16(0x8000 | 3);
    out.put_u16(kind);
    out.put_u32(((flags as u32) << 24) | (len as u32 & 0x00ff_ffff));
}

impl Frame {
    /// Appends the frame's bytes; header blocks go through the connection's compressor.
    pub fn encode(&self, codec: &mut HeaderCodec, out: &mut BytesMut) -> Result<(), SpdyError> {
        match self {
            Frame::SynStream {
                id,
                associated,
                priority,
                flags,
                headers,
            } => {
                let block = codec.compress(headers)?;
                control_header(out, kind::SYN_STREAM, *flags, 10 + block.len());
                out.put_u32(id & 0x7fff_ffff);
                out.put_u32(associated & 0x7fff_ffff);
                out.put_u8((priority & 7) << 5);
                out.put_u8(0);
                out.put_slice(&block);
            }
            Frame::SynReply { id, flags, headers } => {
                let block = codec.compress(headers)?;
                control_header(out, kind::SYN_REPLY, *flags, 4 + block.len());
                out.put_u32(id & 0x7fff_ffff);
                out.put_slice(&block);
            }
            Frame::RstStream { id, status } => {
                control_header(out, kind::RST_STREAM, 0, 8);
                out.put_u32(id & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::Ping(id) => {
                control_header(out, kind::PING, 0, 4);
                out.put_u32(*id);
            }
            Frame::GoAway { last_good, status } => {
                control_header(out, kind::GOAWAY, 0, 8);
                out.put_u32(last_good & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::Headers { .. } | Frame::Ignored(_) => {
                return Err(SpdyError::Protocol("berth never sends this frame".into()));
            }
            Frame::Data { id, flags, data } => {
                if data.len() > MAX_DATA {
                    return Err(SpdyError::Protocol("DATA frame too large".into()));
                }
                out.put_u32(id & 0x7fff_ffff);
                out.put_u32(((*flags as u32) << 24) | data.len() as u32);
                out.put_slice(data);
            }
        }
        Ok(())
    }

    /// The stream id and length of the DATA frame at the front of `buf` if its
    /// payload exceeds `max` (so that it can be skipped, never buffered).
    pub fn oversized_data(buf: &[u8], max: usize) -> Option<(u32, usize)> {
        let head: [u8; 8] = buf.get(..8)?.try_into().ok()?;
        let w0 = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let len = (u32::from_be_bytes([head[4], head[5], head[6], head[7]]) & 0x00ff_ffff) as usize;
        (w0 & 0x8000_0000 == 0 && len > max).then_some((w0 & 0x7fff_ffff, len))
    }

    /// Takes one whole frame off the front of `buf`, or `None` if more bytes are needed.
    pub fn decode(buf: &mut BytesMut, codec: &mut HeaderCodec) -> Result<Option<Frame>, SpdyError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let w0 = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let w1 = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let flags = (w1 >> 24) as u8;
        let len = (w1 & 0x00ff_ffff) as usize;
        let control = w0 & 0x8000_0000 != 0;
        if control && len > MAX_CONTROL {
            return Err(SpdyError::Protocol(format!("control frame of {len} bytes")));
        }
        if buf.len() < 8 + len {
            buf.reserve(8 + len - buf.len());
            return Ok(None);
        }
        buf.advance(8);
        let mut p = buf.split_to(len).freeze();
        if !control {
            let id = w0 & 0x7fff_ffff;
            if id == 0 {
                return Err(SpdyError::Protocol("DATA on stream 0".into()));
            }
            return Ok(Some(Frame::Data { id, flags, data: p }));
        }
        let t = (w0 & 0xffff) as u16;
        let need = |p: &Bytes, n: usize, what: &str| {
            if p.len() < n {
                Err(SpdyError::Protocol(format!("{what} frame too short")))
            } else {
                Ok(())
            }
        };
        let f = match t {
            kind::SYN_STREAM => {
                need(&p, 10, "SYN_STREAM")?;
                let id = p.get_u32() & 0x7fff_ffff;
                let associated = p.get_u32() & 0x7fff_ffff;
                let priority = p.get_u8() >> 5;
                let _slot = p.get_u8();
                let headers = codec.decompress(&p)?;
                Frame::SynStream {
                    id,
                    associated,
                    priority,
                    flags,
                    headers,
                }
            }
            kind::SYN_REPLY => {
                need(&p, 4, "SYN_REPLY")?;
                let id = p.get_u32() & 0x7fff_ffff;
                let headers = codec.decompress(&p)?;
                Frame::SynReply { id, flags, headers }
            }
            kind::HEADERS => {
                need(&p, 4, "HEADERS")?;
                let id = p.get_u32() & 0x7fff_ffff;
                // Decompress anyway: the zlib context must stay in step.
                codec.decompress(&p)?;
                Frame::Headers { id, flags }
            }
            kind::RST_STREAM => {
                need(&p, 8, "RST_STREAM")?;
                let id = p.get_u32() & 0x7fff_ffff;
                let status = p.get_u32();
                if id == 0 || status == 0 {
                    return Err(SpdyError::Protocol("RST_STREAM with id or status 0".into()));
                }
                Frame::RstStream { id, status }
            }
            kind::PING => {
                need(&p, 4, "PING")?;
                Frame::Ping(p.get_u32())
            }
            kind::GOAWAY => {
                need(&p, 8, "GOAWAY")?;
                Frame::GoAway {
                    last_good: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                }
            }
            kind::SETTINGS | kind::WINDOW_UPDATE => Frame::Ignored(t),
            other => {
                return Err(SpdyError::Protocol(format!(
                    "unknown control frame type {other}"
                )));
            }
        };
        Ok(Some(f))
    }
}
