//! The CRI socket: created safely, served by tonic, shut down gracefully.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::Config;
use crate::image_service::CriImageService;
use crate::runtime_service::CriRuntimeService;

/// Largest CRI message accepted or sent (kubelet uses 16 MiB).
const MAX_MESSAGE: usize = 16 << 20;
/// Streams one connection may have open: far above what kubelet (one connection, a
/// few hundred calls in flight at 110 pods) needs; a client that opens more has to wait.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// Largest header list a request may carry (gRPC metadata is a few hundred bytes).
pub const MAX_HEADER_LIST: u32 = 64 << 10;

/// The HTTP/2 server both sockets use, with grpc-go's server defaults where berth has
/// no reason to differ (a ping after 2 h idle, 20 s to answer it) and bounds it lacks.
pub fn http2_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(2 * 3600)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .http2_max_pending_accept_reset_streams(Some(20))
}

/// Errors while setting up the socket or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another process answers on the socket.
    #[error("{0} is in use by a running berthd (or another server); refusing to replace it")]
    InUse(String),
    /// Socket setup failed.
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serving CRI: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds a socket (CRI 0660, the API 0600): parent dirs created, a stale socket replaced, a live one refused.
///
/// The socket is bound in a fresh 0700 dir beside its final path, given its mode, then
/// renamed into place: at no moment can a local user connect to it with the umask's mode.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, ServeError> {
    let shown = path.display().to_string();
    let io = |context, source| ServeError::Io {
        context,
        path: shown.clone(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| io("creating the parent of", e))?;
    if std::fs::symlink_metadata(path).is_ok()
        && std::os::unix::net::UnixStream::connect(path).is_ok()
    {
        return Err(ServeError::InUse(shown));
    }
    let staging = parent.join(format!(".bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| io("creating a private dir beside", e))?;
    let bound = (|| {
        let staged = staging.join("s");
        let listener = UnixListener::bind(&staged).map_err(|e| io("binding", e))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io("chmod", e))?;
        // Replaces a stale socket atomically.
        std::fs::rename(&staged, path).map_err(|e| io("moving the socket to", e))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    bound
}

/// Serves CRI on `listener` until `shutdown` resolves, then lets in-flight calls finish.
pub async fn serve(
    listener: UnixListener,
    config: Config,
    images: Arc<berth_image::ImageService>,
    svc: Arc<crate::services::Services>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let containers = svc.containers.clone();
    let measure = crate::prometheus::MeasureCalls(svc.ctx.metrics.clone());
    let runtime = RuntimeServiceServer::new(CriRuntimeService::new(config, svc))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let image = ImageServiceServer::new(CriImageService::new(images, Some(containers)))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    http2_server()
        .trace_fn(|req| tracing::info_span!("cri", rpc = %req.uri().path().rsplit('/').next().unwrap_or("")))
        .layer(measure)
        .add_service(runtime)
        .add_service(image)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
