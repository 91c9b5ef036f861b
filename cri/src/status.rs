//! The one place library errors become gRPC statuses.

use berth_image::ImageError;
use tonic::{Code, Status};

/// Maps an image service error to the gRPC status a CRI client expects.
pub fn from_image_error(e: ImageError) -> Status {
    let code = match &e {
        ImageError::InvalidReference { .. } | ImageError::UnsafeLayerEntry { .. } => {
            Code::InvalidArgument
        }
        ImageError::NotFound(_) => Code::NotFound,
        ImageError::Unauthenticated(_) => Code::Unauthenticated,
        ImageError::PermissionDenied(_) => Code::PermissionDenied,
        ImageError::DigestMismatch(_) => Code::DataLoss,
        ImageError::Unsupported(_) => Code::FailedPrecondition,
        ImageError::Registry(_) => Code::Unavailable,
        ImageError::Timeout { .. } => Code::DeadlineExceeded,
        ImageError::Io { .. } | ImageError::Store(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// An `InvalidArgument` naming the offending request field.
pub fn invalid_field(field: &str, why: &str) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}
