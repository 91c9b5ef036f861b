//! CRI `GetContainerEvents`, what kubelet's evented PLEG reads: the exchange's
//! container and sandbox events as `CONTAINER_{CREATED,STARTED,STOPPED,DELETED}`
//! (a sandbox's with its own id, as containerd sends them), each carrying the pod's
//! status and its containers' statuses as they are when the event is sent.
//!
//! Each stream has its own subscription and a bounded queue (256): a client that
//! does not read never holds a publisher or the stream's task; when its queue is full
//! (or its subscription fell 4096 events behind) the stream ends with `ABORTED`
//! (kubelet then relists and subscribes again). Streams end when berthd stops.

use std::sync::Arc;

use k8s_cri::v1 as cri;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::events::{Envelope, Event};
use crate::services::Services;

/// Responses a stream holds for a slow client before its subscription lags.
const QUEUE: usize = 256;

/// The container (or sandbox) an event is about, and its CRI type.
pub fn cri_event(env: &Envelope) -> Option<(&str, cri::ContainerEventType)> {
    use cri::ContainerEventType as T;
    Some(match &env.event {
        Event::ContainerCreate { id, .. } => (id.as_str(), T::ContainerCreatedEvent),
        Event::TaskStart { container_id, .. } => (container_id.as_str(), T::ContainerStartedEvent),
        Event::TaskExit { container_id, .. } => (container_id.as_str(), T::ContainerStoppedEvent),
        Event::ContainerDelete { id } => (id.as_str(), T::ContainerDeletedEvent),
        Event::SandboxCreate { sandbox_id } => (sandbox_id.as_str(), T::ContainerCreatedEvent),
        Event::SandboxStart { sandbox_id, .. } => (sandbox_id.as_str(), T::ContainerStartedEvent),
        Event::SandboxStop { sandbox_id } => (sandbox_id.as_str(), T::ContainerStoppedEvent),
        Event::SandboxDelete { sandbox_id } => (sandbox_id.as_str(), T::ContainerDeletedEvent),
        _ => return None,
    })
}

/// The response for one event, with the statuses of its pod now.
fn response(svc: &Services, env: &Envelope) -> Option<cri::ContainerEventResponse> {
    let (id, kind) = cri_event(env)?;
    let pod = &env.sandbox_id;
    let pod_sandbox_status = svc.sandboxes.status(pod, false).ok().and_then(|r| r.status);
    let containers_statuses = svc
        .ctx
        .containers_of(pod)
        .iter()
        .filter_map(|c| svc.containers.status(&c.id, false).ok()?.status)
        .collect();
    Some(cri::ContainerEventResponse {
        container_id: id.to_string(),
        container_event_type: kind as i32,
        created_at: env.timestamp,
        pod_sandbox_status,
        containers_statuses,
    })
}

/// A new event stream, from now on.
pub fn stream(svc: Arc<Services>) -> ReceiverStream<Result<cri::ContainerEventResponse, Status>> {
    let mut events = svc.ctx.events.subscribe();
    let mut stopping = svc.ctx.shutdown.subscribe();
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        loop {
            let env = tokio::select! {
                _ = tx.closed() => return,
                _ = stopping.wait_for(|s| *s) => return,
                r = events.recv() => r,
            };
            let resp = match env {
                Ok(env) => match response(&svc, &env) {
                    Some(r) => r,
                    None => continue,
                },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = tx.try_send(Err(behind(n)));
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            // A client that does not read never holds this task (or a publisher): when
            // only the last slot is left, it gets the error in it and the stream ends.
            if tx.capacity() <= 1 {
                let _ = tx.try_send(Err(behind(QUEUE as u64)));
                return;
            }
            if tx.try_send(Ok(resp)).is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

fn behind(n: u64) -> Status {
    Status::aborted(format!(
        "the container event stream fell {n} events behind; list again and resubscribe"
    ))
}
