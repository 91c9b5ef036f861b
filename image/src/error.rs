//! The image crate's error type; the CRI edge maps each kind to one gRPC code.

use std::path::PathBuf;

/// Everything that can go wrong in the image service.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A reference that is not a valid image name.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// The registry (or the local store) has no such image, tag or blob.
    #[error("{0}")]
    NotFound(String),
    /// The registry wants credentials, or refused the ones given.
    #[error("{0}")]
    Unauthenticated(String),
    /// The registry knows the caller but denies access.
    #[error("{0}")]
    PermissionDenied(String),
    /// A downloaded blob does not hash to its descriptor's digest.
    #[error("{0}")]
    DigestMismatch(String),
    /// A layer entry that would escape its snapshot or is otherwise unsafe.
    #[error("layer {layer}: refusing entry {entry:?}: {reason}")]
    UnsafeLayerEntry {
        layer: String,
        entry: String,
        reason: String,
    },
    /// The registry answered something berth cannot use (bad manifest, media type, platform).
    #[error("{0}")]
    Unsupported(String),
    /// Talking to the registry failed (connection, TLS, HTTP status).
    #[error("{0}")]
    Registry(String),
    /// The pull took longer than the configured timeout.
    #[error("pull of {reference} timed out after {secs}s")]
    Timeout { reference: String, secs: u64 },
    /// Local I/O failed on a path.
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The metadata database failed.
    #[error("image metadata store: {0}")]
    Store(String),
}

impl ImageError {
    /// An I/O error annotated with what was being done to which path.
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ImageError::Io {
            context,
            path: path.into(),
            source: with_causes(source),
        }
    }
}

/// The tar crate's errors say what failed ("failed to unpack `f`") and keep why in
/// their source: the message a user sees carries both.
fn with_causes(e: std::io::Error) -> std::io::Error {
    use std::error::Error;
    let mut text = e.to_string();
    let mut cause = e.source();
    if cause.is_none() {
        return e;
    }
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    std::io::Error::new(e.kind(), text)
}

macro_rules! store_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for ImageError {
            fn from(e: $t) -> Self {
                ImageError::Store(e.to_string())
            }
        }
    )*};
}
store_error_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

/// Result alias for the image crate.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;
