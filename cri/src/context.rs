//! The context every CRI service works over: config, paths, records, images, network,
//! shims, locks, cgroups, events and what the runtime handlers support.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_cgroups::Hierarchy;
use berth_network::CniManager;
use tracing::info;

use crate::config::Config;
use crate::error::{CriError, Result};
use crate::events::Exchange;
use crate::handlers::RuntimeHandlers;
use crate::layout::Paths;
use crate::oci::HostFacts;
use crate::records::{ContainerRecord, RecordStore, SandboxRecord};
use crate::shims::{ShimRegistry, shim_binary};
use crate::systemd::Systemd;

/// One async lock per pod, made on demand.
#[derive(Default)]
pub struct PodLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl PodLocks {
    /// The lock of a pod: its containers are created, stopped and removed under it.
    pub fn of(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id.to_string()).or_default().clone()
    }

    /// Forgets a removed pod's lock.
    pub fn forget(&self, id: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

/// What every service shares.
pub struct Context {
    /// berthd's config.
    pub cfg: Config,
    /// Where each pod's and container's files are.
    pub paths: Paths,
    /// Pod and container records.
    pub records: Arc<RecordStore>,
    /// The image service.
    pub images: Arc<berth_image::ImageService>,
    /// Pod networking (CNI).
    pub net: Arc<CniManager>,
    /// The pods' shims.
    pub shims: ShimRegistry,
    /// Per-pod locks.
    pub pod_locks: PodLocks,
    /// Serialises RunPodSandbox's name reservation.
    pub create_lock: tokio::sync::Mutex<()>,
    /// Serialises read-modify-write of container records (RPCs vs. exit events).
    pub record_lock: Mutex<()>,
    /// The event exchange.
    pub events: Exchange,
    /// The figures the Prometheus endpoint serves.
    pub metrics: Arc<crate::prometheus::Metrics>,
    /// Gives freed heap back once a burst of work (pulls, removals) is over.
    pub heap: Arc<crate::heap::HeapTrim>,
    /// Set once berthd is stopping: long-lived streams (events) end, so that the
    /// servers can drain.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// Containers inside StartContainer (their exit, if it comes first, publishes the
    /// start too); read and written under `record_lock`.
    pub starting: Mutex<std::collections::HashSet<String>>,
    /// Mounted cgroup hierarchies, read once at start.
    pub cgroups: Hierarchy,
    /// What each runtime handler supports.
    pub handlers: RuntimeHandlers,
    /// This host as container specs need it (capabilities, seccomp, AppArmor/SELinux).
    pub host: HostFacts,
    /// systemd's manager, under the systemd cgroup driver.
    pub systemd: Option<Arc<Systemd>>,
}

impl Context {
    /// The context of a starting berthd: hierarchies detected, handlers asked.
    pub async fn new(
        cfg: Config,
        records: Arc<RecordStore>,
        images: Arc<berth_image::ImageService>,
        systemd: Option<Arc<Systemd>>,
    ) -> Context {
        let paths = Paths::new(&cfg.root, &cfg.state);
        let cgroups = Hierarchy::detect().unwrap_or_default();
        info!(mode = ?cgroups.mode(), "cgroup hierarchies");
        let host = HostFacts::detect();
        info!(
            capabilities = host.capabilities.len(),
            seccomp = host.seccomp.supported,
            apparmor = host.modules.apparmor_profiles.is_some(),
            selinux = ?host.modules.selinux.as_ref().map(|s| &s.process),
            "host security facts"
        );
        Context {
            host,
            net: Arc::new(CniManager::new(cfg.cni_settings())),
            shims: ShimRegistry::new(shim_binary(&cfg.shim), paths.clone()),
            handlers: RuntimeHandlers::probe(&cfg).await,
            paths,
            records,
            images,
            pod_locks: PodLocks::default(),
            create_lock: tokio::sync::Mutex::new(()),
            record_lock: Mutex::new(()),
            events: Exchange::default(),
            metrics: Arc::default(),
            heap: Arc::default(),
            starting: Mutex::default(),
            shutdown: tokio::sync::watch::Sender::new(false),
            cgroups,
            cfg,
            systemd,
        }
    }

    /// Holds `record_lock`. Nothing under it can leave a record half-written, so a
    /// panic elsewhere that poisoned it leaves the records usable.
    pub fn record_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.record_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a Prometheus scrape gets: the figures, with pods and containers counted now.
    pub fn metrics_text(&self) -> String {
        use crate::records::{ContainerState as C, SandboxState};
        let pods = self.records.sandboxes();
        let ready = pods
            .iter()
            .filter(|p| p.state == SandboxState::Ready)
            .count();
        let ctrs = self.records.containers();
        let count = |s: C| ctrs.iter().filter(|c| c.state == s).count();
        self.metrics.encode(&crate::prometheus::StateCounts {
            pods: [("ready", ready), ("notready", pods.len() - ready)],
            containers: [
                ("created", count(C::Created)),
                ("running", count(C::Running)),
                ("exited", count(C::Exited)),
            ],
        })
    }

    /// A pod by full id or unique prefix; `Ok(None)` when there is none.
    pub fn resolve_sandbox(&self, id: &str, field: &str) -> Result<Option<SandboxRecord>> {
        check_id(id, field, "sandbox")?;
        self.records
            .resolve_sandbox(id)
            .map_err(|e| CriError::invalid(field, e))
    }

    /// A pod that must exist.
    pub fn sandbox(&self, id: &str, field: &str) -> Result<SandboxRecord> {
        self.resolve_sandbox(id, field)?
            .ok_or_else(|| CriError::no_sandbox(id))
    }

    /// A container by full id or unique prefix; `Ok(None)` when there is none.
    pub fn resolve_container(&self, id: &str, field: &str) -> Result<Option<ContainerRecord>> {
        check_id(id, field, "container")?;
        self.records
            .resolve_container(id)
            .map_err(|e| CriError::invalid(field, e))
    }

    /// A container that must exist.
    pub fn container(&self, id: &str, field: &str) -> Result<ContainerRecord> {
        self.resolve_container(id, field)?
            .ok_or_else(|| CriError::no_container(id))
    }

    /// The containers of a pod.
    pub fn containers_of(&self, sandbox: &str) -> Vec<ContainerRecord> {
        self.records
            .containers()
            .into_iter()
            .filter(|c| c.sandbox_id == sandbox)
            .collect()
    }
}

/// An id as a request gives it: non-empty hex (a full id or a prefix).
fn check_id(id: &str, field: &str, what: &str) -> Result<()> {
    if id.is_empty() {
        return Err(CriError::invalid(field, "must not be empty"));
    }
    if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CriError::invalid(
            field,
            format!("{} is not a {what} id", crate::error::shown(id)),
        ));
    }
    Ok(())
}

/// A random 64-hex id.
pub fn new_id() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
