//! berthd's event exchange, as containerd's `events/exchange`: every change to a
//! task, container, sandbox or image is published as an envelope (timestamp,
//! namespace, topic, typed event) on a broadcast channel. Publishing never blocks; a
//! subscriber that falls behind is told how many it missed (and resynchronises from
//! the records). Subscribers select with containerd's filter language (`filter`).

pub mod filter;

use std::collections::BTreeMap;

use berth_runtime::timefmt::now_unix_nanos;
use serde::Serialize;
use tokio::sync::broadcast;

pub use filter::{Fields, Filter, FilterError};

/// The namespace of everything berth runs (the CRI namespace, as containerd's CRI
/// plugin names it).
pub const NAMESPACE: &str = "k8s.io";

/// How many events a subscriber may fall behind before it is told it lagged.
const BACKLOG: usize = 4096;

/// What happened, with containerd's topic and field names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Event {
    /// `/tasks/create`: the runtime created a container's process (not started).
    TaskCreate {
        container_id: String,
        bundle: String,
        pid: u32,
    },
    /// `/tasks/start`.
    TaskStart { container_id: String, pid: u32 },
    /// `/tasks/exit`: a container's init process exited.
    TaskExit {
        container_id: String,
        id: String,
        pid: u32,
        exit_status: u32,
        exited_at: i64,
    },
    /// `/tasks/delete`: the runtime's container is gone.
    TaskDelete {
        container_id: String,
        id: String,
        pid: u32,
        exit_status: u32,
        exited_at: i64,
    },
    /// `/tasks/oom`: the kernel OOM-killed a process of the container.
    TaskOom { container_id: String },
    /// `/tasks/exec-added`.
    TaskExecAdded {
        container_id: String,
        exec_id: String,
    },
    /// `/tasks/exec-started`.
    TaskExecStarted {
        container_id: String,
        exec_id: String,
        pid: u32,
    },
    /// `/tasks/paused`.
    TaskPaused { container_id: String },
    /// `/tasks/resumed`.
    TaskResumed { container_id: String },
    /// `/containers/create`.
    ContainerCreate {
        id: String,
        image: String,
        runtime: String,
        labels: BTreeMap<String, String>,
    },
    /// `/containers/update` (resources).
    ContainerUpdate {
        id: String,
        image: String,
        labels: BTreeMap<String, String>,
    },
    /// `/containers/delete`.
    ContainerDelete { id: String },
    /// `/sandboxes/create`.
    SandboxCreate { sandbox_id: String },
    /// `/sandboxes/start`: its infra process runs.
    SandboxStart { sandbox_id: String, pid: u32 },
    /// `/sandboxes/stop`.
    SandboxStop { sandbox_id: String },
    /// `/sandboxes/delete`.
    SandboxDelete { sandbox_id: String },
    /// `/images/create`: a name now points at a pulled image.
    ImageCreate {
        name: String,
        labels: BTreeMap<String, String>,
    },
    /// `/images/update`: a name moved to another image.
    ImageUpdate {
        name: String,
        labels: BTreeMap<String, String>,
    },
    /// `/images/delete`.
    ImageDelete { name: String },
}

impl Event {
    /// The topic, e.g. `/tasks/exit`.
    pub fn topic(&self) -> &'static str {
        match self {
            Event::TaskCreate { .. } => "/tasks/create",
            Event::TaskStart { .. } => "/tasks/start",
            Event::TaskExit { .. } => "/tasks/exit",
            Event::TaskDelete { .. } => "/tasks/delete",
            Event::TaskOom { .. } => "/tasks/oom",
            Event::TaskExecAdded { .. } => "/tasks/exec-added",
            Event::TaskExecStarted { .. } => "/tasks/exec-started",
            Event::TaskPaused { .. } => "/tasks/paused",
            Event::TaskResumed { .. } => "/tasks/resumed",
            Event::ContainerCreate { .. } => "/containers/create",
            Event::ContainerUpdate { .. } => "/containers/update",
            Event::ContainerDelete { .. } => "/containers/delete",
            Event::SandboxCreate { .. } => "/sandboxes/create",
            Event::SandboxStart { .. } => "/sandboxes/start",
            Event::SandboxStop { .. } => "/sandboxes/stop",
            Event::SandboxDelete { .. } => "/sandboxes/delete",
            Event::ImageCreate { .. } => "/images/create",
            Event::ImageUpdate { .. } => "/images/update",
            Event::ImageDelete { .. } => "/images/delete",
        }
    }
}

/// One published event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Envelope {
    /// Unix nanoseconds.
    pub timestamp: i64,
    /// Always `k8s.io`.
    pub namespace: &'static str,
    /// `event.topic()`.
    pub topic: &'static str,
    /// The pod a task, container or sandbox event is about ("" for images); berth's
    /// own field, for subscribers that follow one pod.
    pub sandbox_id: String,
    /// The payload.
    pub event: Event,
}

impl Fields for Envelope {
    /// `topic`, `namespace`, `sandbox_id` and `event.<field>` (`event.labels.<key>`).
    fn field(&self, path: &[String]) -> Option<String> {
        match path.first().map(String::as_str)? {
            "topic" if path.len() == 1 => Some(self.topic.to_string()),
            "namespace" if path.len() == 1 => Some(self.namespace.to_string()),
            "sandbox_id" if path.len() == 1 && !self.sandbox_id.is_empty() => {
                Some(self.sandbox_id.clone())
            }
            "event" => {
                let mut v = serde_json::to_value(&self.event).ok()?;
                for key in &path[1..] {
                    v = v.get_mut(key)?.take();
                }
                match v {
                    serde_json::Value::String(s) => Some(s),
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    serde_json::Value::Bool(b) => Some(b.to_string()),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// The exchange.
pub struct Exchange {
    tx: broadcast::Sender<Envelope>,
}

impl Default for Exchange {
    fn default() -> Exchange {
        Exchange {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Exchange {
    /// Publishes to whoever is subscribed (nobody is fine); never blocks.
    pub fn publish(&self, sandbox_id: &str, event: Event) {
        let _ = self.tx.send(Envelope {
            timestamp: now_unix_nanos(),
            namespace: NAMESPACE,
            topic: event.topic(),
            sandbox_id: sandbox_id.to_string(),
            event,
        });
    }

    /// How many subscriptions are open.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// A new subscription, from now on. `recv` answers `Lagged(n)` when the
    /// subscriber fell more than the backlog behind.
    pub fn subscribe(&self) -> broadcast::Receiver<Envelope> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(id: &str) -> Event {
        Event::TaskExit {
            container_id: id.into(),
            id: id.into(),
            pid: 42,
            exit_status: 137,
            exited_at: 7,
        }
    }

    #[test]
    fn subscribers_get_envelopes_in_order_from_when_they_subscribed() {
        let ex = Exchange::default();
        ex.publish("p", exit("lost"));
        let mut rx = ex.subscribe();
        ex.publish(
            "p1",
            Event::TaskOom {
                container_id: "c1".into(),
            },
        );
        ex.publish("p1", exit("c1"));
        let a = rx.try_recv().unwrap();
        assert_eq!(
            (a.topic, a.namespace, a.sandbox_id.as_str()),
            ("/tasks/oom", "k8s.io", "p1")
        );
        assert!(a.timestamp > 0);
        assert_eq!(rx.try_recv().unwrap().topic, "/tasks/exit");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_subscriber_that_falls_behind_is_told_and_publishers_go_on() {
        let ex = Exchange::default();
        let mut rx = ex.subscribe();
        for i in 0..BACKLOG + 10 {
            ex.publish("p", exit(&i.to_string()));
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(10))
        ));
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn filters_read_the_envelope_and_the_payload() {
        let ex = Exchange::default();
        let mut rx = ex.subscribe();
        ex.publish("p1", exit("c1"));
        let env = rx.try_recv().unwrap();
        let path = |s: &str| -> Vec<String> { s.split('.').map(str::to_string).collect() };
        assert_eq!(env.field(&path("event.pid")).as_deref(), Some("42"));
        assert_eq!(
            env.field(&path("event.container_id")).as_deref(),
            Some("c1")
        );
        assert_eq!(env.field(&path("event.nope")), None);
        assert_eq!(env.field(&path("topic.x")), None);
        let f = Filter::parse_all(&["topic~=/tasks/.+,namespace==k8s.io,event.exit_status==137"])
            .unwrap();
        assert!(f.matches(&env));
        let labelled = Envelope {
            event: Event::ImageCreate {
                name: "busybox:1".into(),
                labels: [("a.b".to_string(), "c".to_string())].into(),
            },
            topic: "/images/create",
            ..env
        };
        let f = Filter::parse_all(&["event.labels.\"a.b\"==c"]).unwrap();
        assert!(f.matches(&labelled));
    }
}
