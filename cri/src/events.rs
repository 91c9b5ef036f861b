//! berthd's in-process event exchange (DESIGN "Events"): typed envelopes on a
//! broadcast channel. Published today: `/tasks/oom` and `/tasks/exit`; subscribers
//! (`berthctl events`, CRI `GetContainerEvents`) attach with `subscribe`.

use berth_runtime::timefmt::now_unix_nanos;
use tokio::sync::broadcast;

/// Event topics, named as containerd names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topic {
    /// The kernel OOM-killed a process of a container.
    TaskOom,
    /// A container's init process exited.
    TaskExit,
}

impl Topic {
    /// The topic string, e.g. `/tasks/oom`.
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::TaskOom => "/tasks/oom",
            Topic::TaskExit => "/tasks/exit",
        }
    }
}

/// One published event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// What happened.
    pub topic: Topic,
    /// Always `k8s.io` (the CRI namespace).
    pub namespace: &'static str,
    /// Unix nanoseconds.
    pub timestamp: i64,
    /// The container id.
    pub container_id: String,
    /// Its pod.
    pub sandbox_id: String,
}

/// The exchange: publishing never blocks; a slow subscriber lags and is told so.
pub struct Exchange {
    tx: broadcast::Sender<Envelope>,
}

impl Default for Exchange {
    fn default() -> Exchange {
        Exchange {
            tx: broadcast::channel(1024).0,
        }
    }
}

impl Exchange {
    /// Publishes to whoever is subscribed (nobody is fine).
    pub fn publish(&self, topic: Topic, container_id: &str, sandbox_id: &str) {
        let _ = self.tx.send(Envelope {
            topic,
            namespace: "k8s.io",
            timestamp: now_unix_nanos(),
            container_id: container_id.to_string(),
            sandbox_id: sandbox_id.to_string(),
        });
    }

    /// A new subscription, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Envelope> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_get_envelopes_in_order() {
        let ex = Exchange::default();
        ex.publish(Topic::TaskExit, "lost", "p"); // before anyone listens
        let mut rx = ex.subscribe();
        ex.publish(Topic::TaskOom, "c1", "p1");
        ex.publish(Topic::TaskExit, "c1", "p1");
        let a = rx.try_recv().unwrap();
        assert_eq!(
            (a.topic.as_str(), a.container_id.as_str()),
            ("/tasks/oom", "c1")
        );
        assert_eq!(a.namespace, "k8s.io");
        assert!(a.timestamp > 0);
        assert_eq!(rx.try_recv().unwrap().topic, Topic::TaskExit);
        assert!(rx.try_recv().is_err());
    }
}
