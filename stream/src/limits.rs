//! The limits of a streaming session, as kubelet's streaming server sets them.

use std::time::Duration;

/// kubelet's idle timeout for a streaming session.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 3600);
/// How long the client has to open its streams.
pub const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
