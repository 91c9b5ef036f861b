//! The CRI layer's one error type. Services return `CriError`; `status.rs` is the only
//! place it becomes a gRPC status.

use berth_image::ImageError;
use berth_network::NetError;
use berth_runtime::client::ShimError;

use crate::oci::SpecError;
use crate::records::StoreError;

/// Why a CRI call failed.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    /// A request field is wrong; the message names it.
    #[error("{field}: {message}")]
    InvalidField { field: String, message: String },
    /// A request is wrong as a whole (kubelet's own texts, which name no field).
    #[error("{0}")]
    Invalid(String),
    /// The object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The object is in the wrong state for the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A timeout the request set ran out.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A service berthd needs is not there.
    #[error("{0}")]
    Unavailable(String),
    /// berth does not do that.
    #[error("{0}")]
    Unimplemented(String),
    /// Something on the node failed.
    #[error("{0}")]
    Internal(String),
    /// The image service failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Pod networking failed.
    #[error(transparent)]
    Network(#[from] NetError),
    /// A pod's shim answered with an error (its code decides the status).
    #[error("{context}: {source}")]
    Shim {
        context: String,
        #[source]
        source: ShimError,
    },
    /// The container config cannot become an OCI spec.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The records failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `Result` of the CRI services.
pub type Result<T, E = CriError> = std::result::Result<T, E>;

impl CriError {
    /// A wrong request field.
    pub fn invalid(field: &str, message: impl Into<String>) -> CriError {
        CriError::InvalidField {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// A node failure while doing `what`.
    pub fn internal(what: &str, e: impl std::fmt::Display) -> CriError {
        CriError::Internal(format!("{what}: {e}"))
    }

    /// A shim call that failed while doing `what`.
    pub fn shim(what: impl Into<String>, source: ShimError) -> CriError {
        CriError::Shim {
            context: what.into(),
            source,
        }
    }

    /// A pod sandbox that is not there.
    pub fn no_sandbox(id: &str) -> CriError {
        CriError::NotFound(format!("pod sandbox {} not found", shown(id)))
    }

    /// A container that is not there.
    pub fn no_container(id: &str) -> CriError {
        CriError::NotFound(format!("container {} not found", shown(id)))
    }
}

/// Input echoed in a message: quoted, and cut after 64 characters (with its length),
/// so that a huge id cannot make the status larger than clients accept.
pub fn shown(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        None => format!("{s:?}"),
        Some((at, _)) => format!("{:?}... ({} bytes)", &s[..at], s.len()),
    }
}

/// A blocking task that did not finish (it panicked or was cancelled).
impl From<tokio::task::JoinError> for CriError {
    fn from(e: tokio::task::JoinError) -> CriError {
        CriError::internal("background task", e)
    }
}
