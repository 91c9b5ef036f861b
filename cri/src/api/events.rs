//! `Events.Subscribe`: the exchange's envelopes that pass the subscriber's filters. A
//! subscriber that falls behind (its queue full, or the exchange's backlog passed) is
//! told how many it missed and goes on; nothing ever waits for it. Streams end when
//! berthd stops.

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
        let mut stopping = self.svc.ctx.shutdown.subscribe();
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(async move {
            // Events dropped because the reader was behind, reported once it reads.
            let mut missed = 0u64;
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    _ = stopping.wait_for(|s| *s) => return,
                    r = events.recv() => r,
                };
                let out = match next {
                    Ok(env) if filter.matches(&env) => envelope(&env),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        missed += n;
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if missed > 0 && tx.capacity() > 1 {
                    let lagged = pb::Envelope {
                        lagged: std::mem::take(&mut missed),
                        ..Default::default()
                    };
                    let _ = tx.try_send(Ok(lagged));
                }
                match tx.try_send(Ok(out)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => missed += 1,
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
