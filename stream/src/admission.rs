//! Which connections the streaming server serves: at most `max_connections` at once.
//! When all places are taken, a new connection takes the place of the oldest one
//! that has not yet sent its request (a client that opens connections and sends
//! nothing cannot lock others out); when every place is a live session, the new
//! connection is closed at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// How long a new connection waits for the place of the connection it evicted.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// A connection's place, held by the connection and the session it upgrades to.
pub type Slot = Arc<OwnedSemaphorePermit>;

/// The places and the connections still waiting for their request, oldest first.
pub struct Admission {
    slots: Arc<Semaphore>,
    pending: Mutex<(u64, VecDeque<(u64, oneshot::Sender<()>)>)>,
}

/// An admitted connection: its place, and word if it is evicted before its request.
pub struct Ticket {
    /// Its place.
    pub slot: Slot,
    /// Its key among the pending connections.
    pub id: u64,
    /// Resolves if the connection is evicted; never once its request started.
    pub evicted: oneshot::Receiver<()>,
}

impl Admission {
    /// Room for `max` connections.
    pub fn new(max: usize) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(max)),
            pending: Mutex::new((0, VecDeque::new())),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, (u64, VecDeque<(u64, oneshot::Sender<()>)>)> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection, evicting the oldest one still without a request
    /// if need be; `None` when every place is a connection that is being served.
    pub async fn admit(&self) -> Option<Ticket> {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !self.evict_oldest() {
                    return None;
                }
                let wait = self.slots.clone().acquire_owned();
                tokio::time::timeout(EVICTION_WAIT, wait).await.ok()?.ok()?
            }
        };
        let (tx, rx) = oneshot::channel();
        let mut g = self.pending();
        let id = g.0;
        g.0 += 1;
        g.1.push_back((id, tx));
        Some(Ticket {
            slot: Arc::new(permit),
            id,
            evicted: rx,
        })
    }

    /// Tells the oldest pending connection to go; false if there is none.
    fn evict_oldest(&self) -> bool {
        let mut g = self.pending();
        while let Some((_, tx)) = g.1.pop_front() {
            if tx.send(()).is_ok() {
                return true;
            }
        }
        false
    }

    /// Connection `id` sent its request (or ended): it can no longer be evicted.
    pub fn started(&self, id: u64) {
        let mut g = self.pending();
        if let Some(i) = g.1.iter().position(|(k, _)| *k == id) {
            g.1.remove(i);
        }
    }
}

/// What `Ticket::evicted` means for a connection: resolves only on eviction.
pub async fn evicted(rx: oneshot::Receiver<()>) {
    if rx.await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_pending_connection_makes_room() {
        let a = Arc::new(Admission::new(2));
        let first = a.admit().await.unwrap();
        let second = a.admit().await.unwrap();
        // The second sent its request: only the first can be evicted.
        a.started(second.id);
        let admitting = {
            let a = a.clone();
            tokio::spawn(async move { a.admit().await })
        };
        let Ticket {
            slot, evicted: ev, ..
        } = first;
        tokio::time::timeout(Duration::from_secs(1), evicted(ev))
            .await
            .expect("the oldest pending connection is told to go");
        drop(slot);
        let third = admitting
            .await
            .unwrap()
            .expect("admitted in the evicted one's place");
        // Both places are now connections being served: no one else gets in.
        a.started(third.id);
        assert!(
            a.admit().await.is_none(),
            "admitted over the cap with no one to evict"
        );
        drop(third);
        assert!(a.admit().await.is_some(), "a freed place is reused");
    }
}
