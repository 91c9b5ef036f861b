//! The one place errors become gRPC statuses.

use berth_image::ImageError;
use berth_network::NetError;
use berth_proto::shim::ErrorCode;
use berth_runtime::client::ShimError;
use tonic::{Code, Status};

use crate::error::CriError;

/// The longest status message sent: clients cap the trailers a message travels in
/// (grpc-go's default metadata limit is 16 KiB), and a cut message beats a lost one.
const MAX_MESSAGE_BYTES: usize = 4096;

/// `message`, cut at `MAX_MESSAGE_BYTES` (on a character boundary) with a note.
fn bounded(code: Code, message: String) -> Status {
    Status::new(code, cut(message, MAX_MESSAGE_BYTES))
}

/// `message`, cut at `max` bytes (on a character boundary) with a note.
pub fn cut(message: String, max: usize) -> String {
    if message.len() <= max {
        return message;
    }
    let mut at = max;
    while !message.is_char_boundary(at) {
        at -= 1;
    }
    format!("{}... ({} bytes cut)", &message[..at], message.len() - at)
}

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
        // A full disk is the node's resource, not a bug: kubelet's image GC acts on it.
        ImageError::Io { source, .. } if out_of_space(source) => Code::ResourceExhausted,
        // A layer that does not decompress or unpack (truncated, corrupt): bad data from
        // the registry, as a digest mismatch is.
        ImageError::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            Code::DataLoss
        }
        ImageError::Io { .. } | ImageError::Store(_) => Code::Internal,
    };
    bounded(code, e.to_string())
}

/// ENOSPC or EDQUOT.
fn out_of_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// A network error: a config that is not ready is the node's state, a bad request field
/// is the caller's, anything else a failure.
fn from_net_error(e: NetError) -> Status {
    match e {
        NetError::Conf(c) => {
            Status::failed_precondition(format!("the pod network is not ready: {c}"))
        }
        NetError::InvalidArgument { field, message } => {
            Status::invalid_argument(format!("{field}: {message}"))
        }
        other => Status::internal(format!("pod network: {other}")),
    }
}

/// A shim's answer keeps its code (a refused request stays the caller's fault); a lost
/// connection or a timeout is a failure.
fn from_shim_error(context: String, e: ShimError) -> Status {
    let message = match &e {
        ShimError::Remote { message, .. } => message.clone(),
        other => format!("{context}: {other}"),
    };
    match e.code() {
        Some(ErrorCode::InvalidArgument) => Status::invalid_argument(message),
        Some(ErrorCode::NotFound) => Status::not_found(message),
        Some(ErrorCode::AlreadyExists) => Status::already_exists(message),
        Some(ErrorCode::FailedPrecondition) => Status::failed_precondition(message),
        Some(ErrorCode::Unimplemented) => Status::unimplemented(message),
        _ => Status::internal(format!("{context}: {e}")),
    }
}

/// An `InvalidArgument` naming the offending request field.
pub fn invalid_field(field: &str, why: &str) -> Status {
    Status::from(CriError::invalid(field, why))
}

impl From<CriError> for Status {
    fn from(e: CriError) -> Status {
        let s = status_of(e);
        match s.message().len() > MAX_MESSAGE_BYTES {
            true => bounded(s.code(), s.message().to_string()),
            false => s,
        }
    }
}

fn status_of(e: CriError) -> Status {
    match e {
        CriError::InvalidField { .. } | CriError::Invalid(_) | CriError::Spec(_) => {
            Status::invalid_argument(e.to_string())
        }
        CriError::NotFound(m) => Status::not_found(m),
        CriError::AlreadyExists(m) => Status::already_exists(m),
        CriError::FailedPrecondition(m) => Status::failed_precondition(m),
        CriError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
        CriError::ResourceExhausted(m) => Status::resource_exhausted(m),
        CriError::Unavailable(m) => Status::unavailable(m),
        CriError::Unimplemented(m) => Status::unimplemented(m),
        CriError::Internal(m) => Status::internal(m),
        CriError::Store(e) => Status::internal(e.to_string()),
        CriError::Image(e) => from_image_error(e),
        CriError::Network(e) => from_net_error(e),
        CriError::Shim { context, source } => from_shim_error(context, source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_codes_keep_their_meaning() {
        let remote = |code| ShimError::Remote {
            code,
            message: "task x: boom".into(),
        };
        let s = Status::from(CriError::shim(
            "creating",
            remote(ErrorCode::InvalidArgument),
        ));
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "task x: boom")
        );
        let s = Status::from(CriError::shim("creating", remote(ErrorCode::Internal)));
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().starts_with("creating: "), "{}", s.message());
        let s = Status::from(CriError::shim("waiting", ShimError::Closed));
        assert_eq!(s.code(), Code::Internal);
    }

    #[test]
    fn messages_stay_small_and_ids_are_cut() {
        let huge = "ab".repeat(100_000);
        let s = Status::from(CriError::no_container(&huge));
        assert!(
            s.message().len() < 200 && s.message().contains("200000 bytes"),
            "{}",
            s.message()
        );
        let s = Status::from(CriError::Internal("é".repeat(10_000)));
        assert!(s.message().len() <= MAX_MESSAGE_BYTES + 40 && s.message().ends_with("bytes cut)"));
        assert_eq!(crate::error::shown("ab"), "\"ab\"");
    }

    #[test]
    fn field_errors_name_the_field() {
        let s = Status::from(CriError::invalid(
            "config.metadata.name",
            "must not be empty",
        ));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "config.metadata.name: must not be empty");
    }
}
