//! SPDY/3.1 as Kubernetes speaks it (moby/spdystream): frames, compressed header
//! blocks, and a session that accepts, opens, reads and writes streams.

pub mod conn;
pub mod frame;
pub mod headers;

pub use conn::{Connection, Incoming, Stream, StreamReader, StreamWriter};
pub use frame::Frame;
pub use headers::{HeaderCodec, Headers};

/// Why a SPDY operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    /// The peer broke the protocol (the session ends).
    #[error("spdy protocol error: {0}")]
    Protocol(String),
    /// The session is over.
    #[error("the spdy connection is closed")]
    Closed,
    /// This stream is finished or was reset.
    #[error("the spdy stream is closed")]
    StreamClosed,
    /// The peer refused the stream.
    #[error("the peer refused the stream")]
    Refused,
}

#[cfg(test)]
mod tests;
