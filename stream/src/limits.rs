//! The limits of the streaming server and its sessions: kubelet's timeouts, plus the
//! bounds that keep a client from making berthd hold more than it should (connections,
//! buffered bytes, port-forward streams).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// kubelet's idle timeout for a streaming session.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 3600);
/// How long the client has to open its streams.
pub const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// The most header bytes a request may carry (hyper's read buffer).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The size of the chunks received data is queued in: a queue's bound in bytes is
/// its length times this.
pub const CHUNK: usize = 32 * 1024;

/// What the operator lets the streaming server hold (`[stream]` in berthd's config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    /// Connections served at once (sessions included); more are closed at accept.
    pub max_connections: usize,
    /// Bytes one session buffers from its client, all streams together.
    pub session_buffer_bytes: usize,
    /// Bytes one stream buffers; also the largest SPDY DATA frame and WebSocket
    /// message accepted.
    pub stream_buffer_bytes: usize,
    /// Port-forward streams open at once in one session (a forwarded connection
    /// takes two over SPDY: data and error).
    pub max_port_forward_streams: usize,
    /// How long a connection may take to send a request's headers (and, with TLS,
    /// its handshake).
    pub header_timeout: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_connections: 256,
            session_buffer_bytes: 4 << 20,
            stream_buffer_bytes: 1 << 20,
            max_port_forward_streams: 256,
            header_timeout: Duration::from_secs(10),
        }
    }
}

impl StreamLimits {
    /// The length of a stream's queue of `CHUNK`-sized chunks.
    pub fn stream_queue(&self) -> usize {
        (self.stream_buffer_bytes / CHUNK).max(1)
    }

    /// A new session's byte budget.
    pub fn session_budget(&self) -> Budget {
        Budget(Arc::new(Semaphore::new(
            self.session_buffer_bytes
                .clamp(CHUNK, Semaphore::MAX_PERMITS),
        )))
    }
}

/// The bytes a session may hold: each queued chunk holds its share until it is
/// consumed or dropped.
#[derive(Clone, Debug)]
pub struct Budget(Arc<Semaphore>);

impl Budget {
    /// Waits until `data` fits (at most `CHUNK` bytes, which always fits eventually).
    pub async fn hold(&self, data: Bytes) -> Option<Held> {
        let n = u32::try_from(data.len().min(CHUNK)).unwrap_or(CHUNK as u32);
        let permit = self.0.clone().acquire_many_owned(n).await.ok()?;
        Some(Held {
            data,
            _permit: permit,
        })
    }

    /// Bytes free now.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }
}

/// A chunk counted against its session's budget until dropped.
#[derive(Debug)]
pub struct Held {
    data: Bytes,
    _permit: OwnedSemaphorePermit,
}

impl Held {
    /// The bytes (the budget is freed).
    pub fn into_bytes(self) -> Bytes {
        self.data
    }
}

/// `data` cut into chunks of at most `CHUNK` bytes (no copy).
pub fn chunks(mut data: Bytes) -> impl Iterator<Item = Bytes> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        let n = data.len().min(CHUNK);
        Some(data.split_to(n))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_budget_holds_until_chunks_are_dropped() {
        let limits = StreamLimits {
            session_buffer_bytes: 2 * CHUNK,
            ..Default::default()
        };
        let b = limits.session_budget();
        let data = Bytes::from(vec![7u8; 3 * CHUNK + 5]);
        let parts: Vec<Bytes> = chunks(data).collect();
        assert_eq!(
            parts.iter().map(Bytes::len).collect::<Vec<_>>(),
            [CHUNK, CHUNK, CHUNK, 5]
        );
        let one = b.hold(parts[0].clone()).await.unwrap();
        let _two = b.hold(parts[1].clone()).await.unwrap();
        assert_eq!(b.available(), 0);
        let third = tokio::time::timeout(Duration::from_millis(50), b.hold(parts[2].clone()));
        assert!(
            third.await.is_err(),
            "a full budget must make the reader wait"
        );
        assert_eq!(one.into_bytes().len(), CHUNK);
        assert_eq!(b.available(), CHUNK);
        let _three = b.hold(parts[2].clone()).await.unwrap();
    }
}
