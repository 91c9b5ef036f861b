//! berth's native API (`proto/api.proto`) for the operator's tools, on its own socket
//! (0600, `api_listen`, by default `api.sock` beside the CRI socket): introspection,
//! sandboxes, containers, tasks (pids, pause, resume, kill, metrics), images and
//! events with containerd's filters. A thin layer over the same services as CRI.

mod check;
mod events;
mod introspection;
mod objects;
mod tasks;

use std::future::Future;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::Config;
use crate::error::CriError;
use crate::events::{Filter, FilterError};
use crate::services::Services;

/// The generated messages, servers and clients.
pub mod pb {
    tonic::include_proto!("berth.api.v1");
}

/// Parses a request's filters; a bad one is `InvalidArgument` naming the field and
/// the position.
fn filters(field: &str, given: &[String]) -> Result<Filter, tonic::Status> {
    Filter::parse_all(given)
        .map_err(|e: FilterError| CriError::invalid(field, e.to_string()).into())
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    config: Config,
    svc: Arc<Services>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    use pb::containers_server::ContainersServer;
    use pb::events_server::EventsServer;
    use pb::images_server::ImagesServer;
    use pb::introspection_server::IntrospectionServer;
    use pb::sandboxes_server::SandboxesServer;
    use pb::tasks_server::TasksServer;
    let objects = objects::Objects { svc: svc.clone() };
    let measure = crate::prometheus::MeasureCalls(svc.ctx.metrics.clone());
    crate::server::http2_server()
        .trace_fn(|req| tracing::info_span!("api", rpc = %req.uri().path()))
        .layer(measure)
        .add_service(IntrospectionServer::new(introspection::Introspection {
            config,
            svc: svc.clone(),
        }))
        .add_service(SandboxesServer::new(objects.clone()))
        .add_service(ContainersServer::new(objects.clone()))
        .add_service(ImagesServer::new(objects))
        .add_service(TasksServer::new(tasks::Tasks { svc: svc.clone() }))
        .add_service(EventsServer::new(events::Events { svc }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}
