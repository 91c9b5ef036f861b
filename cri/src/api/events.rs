//! `Events.Subscribe`: the exchange's envelopes that pass the subscriber's filters. A
//! subscriber that falls behind is told how many it missed and goes on; one that does
//! not read only ever delays itself.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{filters, pb};
use crate::events::Envelope;
use crate::services::Services;

/// Envelopes a stream holds for a slow reader before its subscription lags.
const QUEUE: usize = 256;

pub(super) struct Events {
    pub svc: Arc<Services>,
}

fn envelope(env: &Envelope) -> pb::Envelope {
    pb::Envelope {
        timestamp: env.timestamp,
        namespace: env.namespace.to_string(),
        topic: env.topic.to_string(),
        sandbox_id: env.sandbox_id.clone(),
        event_json: serde_json::to_string(&env.event).unwrap_or_default(),
        lagged: 0,
    }
}

#[tonic::async_trait]
impl pb::events_server::Events for Events {
    type SubscribeStream = ReceiverStream<Result<pb::Envelope, Status>>;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let filter = filters("filters", &req.into_inner().filters)?;
        let mut events = self.svc.ctx.events.subscribe();
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    r = events.recv() => r,
                };
                let out = match next {
                    Ok(env) if filter.matches(&env) => envelope(&env),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => pb::Envelope {
                        lagged: n,
                        ..Default::default()
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(out)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
