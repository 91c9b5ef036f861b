//! The shim wire framing: each frame is a 12-byte header and a protobuf payload.
//!
//! ```text
//! u32 payload length (big endian) | u8 kind | u8 reserved | u16 method | u32 request id | payload
//! ```
//! Requests carry a method and an id chosen by the client; the response echoes the
//! id. Events (kind 4) are pushed to connections that subscribed. One frame is at most
//! 16 MiB.

use std::io::{self, Read, Write};

/// Largest payload accepted.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Header size in bytes.
pub const HEADER_LEN: usize = 12;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A call from the client.
    Request = 1,
    /// A successful answer; payload is the method's response message.
    Response = 2,
    /// A failed answer; payload is `shim::Error`.
    Error = 3,
    /// A pushed `shim::Event`.
    Event = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Request),
            2 => Some(Kind::Response),
            3 => Some(Kind::Error),
            4 => Some(Kind::Event),
            _ => None,
        }
    }
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// `shim::Method` number (requests; echoed in responses).
    pub method: u16,
    /// Request id (echoed in responses; 0 for events).
    pub id: u32,
    /// Encoded protobuf message.
    pub payload: Vec<u8>,
}

/// A malformed frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Payload over `MAX_PAYLOAD`.
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
}

impl Frame {
    /// Encodes header and payload into one buffer.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        if self.payload.len() > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(self.payload.len()));
        }
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.push(self.kind as u8);
        out.push(0);
        out.extend_from_slice(&self.method.to_be_bytes());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    /// Parses a header: (payload length, kind, method, id).
    pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(usize, Kind, u16, u32), FrameError> {
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        let kind = Kind::from_u8(h[4]).ok_or(FrameError::BadKind(h[4]))?;
        Ok((
            len,
            kind,
            u16::from_be_bytes([h[6], h[7]]),
            u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
        ))
    }

    /// Reads one frame from a blocking reader; `Ok(None)` at a clean EOF.
    pub fn read_from(r: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut h = [0u8; HEADER_LEN];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let (len, kind, method, id) =
            Frame::parse_header(&h).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        Ok(Some(Frame {
            kind,
            method,
            id,
            payload,
        }))
    }

    /// Writes one frame to a blocking writer.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        let buf = self
            .encode()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        w.write_all(&buf)
    }
}

/// Accumulates bytes from a non-blocking stream and yields whole frames.
#[derive(Default)]
pub struct FrameBuffer {
    buf: Vec<u8>,
}

impl FrameBuffer {
    /// Adds bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&self.buf[..HEADER_LEN]);
        let (len, kind, method, id) = Frame::parse_header(&h)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(Frame {
            kind,
            method,
            id,
            payload,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_splits() {
        let f = Frame {
            kind: Kind::Request,
            method: 3,
            id: 77,
            payload: b"abc".to_vec(),
        };
        let bytes = f.encode().unwrap();
        assert_eq!(&bytes[..HEADER_LEN], &[0, 0, 0, 3, 1, 0, 0, 3, 0, 0, 0, 77]);
        assert_eq!(Frame::read_from(&mut &bytes[..]).unwrap(), Some(f.clone()));
        let mut fb = FrameBuffer::default();
        fb.extend(&bytes[..5]);
        assert!(fb.next_frame().unwrap().is_none());
        fb.extend(&bytes[5..]);
        fb.extend(&bytes);
        assert_eq!(fb.next_frame().unwrap(), Some(f.clone()));
        assert_eq!(fb.next_frame().unwrap(), Some(f));
        assert!(fb.next_frame().unwrap().is_none());
    }

    #[test]
    fn refuses_oversized_and_unknown() {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_be_bytes());
        h[4] = 1;
        assert!(matches!(
            Frame::parse_header(&h),
            Err(FrameError::TooLarge(_))
        ));
        h[..4].copy_from_slice(&[0, 0, 0, 0]);
        h[4] = 9;
        assert!(matches!(
            Frame::parse_header(&h),
            Err(FrameError::BadKind(9))
        ));
    }
}
