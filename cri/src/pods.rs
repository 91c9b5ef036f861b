//! Pod sandboxes: RunPodSandbox builds a pod step by step (dirs and files, /dev/shm,
//! pinned netns, pod cgroup, shim, infra process, record) and undoes the finished
//! steps if a later one fails. Stop and Remove are idempotent and work after a crash.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_network::{CniManager, NetError, PodNetwork, PortMapping};
use berth_proto::shim as pb;
use berth_runtime::client::{ShimClient, spawn_shim};
use berth_runtime::shim::ShimConfig;
use berth_runtime::store::{RuntimeStore, SandboxRecord, SandboxState};
use berth_runtime::timefmt::now_unix_nanos;
use berth_runtime::{netns, podcgroup};
use k8s_cri::v1 as cri;
use tonic::Status;
use tracing::{info, warn};

use crate::config::{CgroupDriver, Config};
use crate::containers::shim_exit_reason;
use crate::events::{Exchange, Topic};
use crate::failpoint::failpoint;
use crate::stats::CpuSample;
use crate::status::invalid_field;
use crate::sweep::CREATED_CGROUPS_FILE;
use berth_cgroups::Hierarchy;

/// The infra process's oom_score_adj (kubelet's pause value), clamped where the host forbids it.
const INFRA_OOM_SCORE_ADJ: i32 = -998;
/// How long a stop waits for the infra process to exit after SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Runs and tracks every pod sandbox.
pub struct PodManager {
    pub(crate) cfg: Config,
    pub(crate) store: Arc<RuntimeStore>,
    pub(crate) images: Arc<berth_image::ImageService>,
    /// Pod networking (CNI).
    pub net: Arc<CniManager>,
    shim_binary: PathBuf,
    pub(crate) shims: tokio::sync::Mutex<HashMap<String, ShimClient>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    create_lock: tokio::sync::Mutex<()>,
    /// Serialises read-modify-write of container records (RPCs vs. exit events).
    pub(crate) record_lock: Mutex<()>,
    /// The event exchange (`/tasks/oom`, `/tasks/exit`).
    pub events: Exchange,
    /// Mounted cgroup hierarchies, read once at start.
    pub(crate) cgroups: Hierarchy,
    /// The previous CPU sample per container and pod, for usage_nano_cores.
    pub(crate) cpu_samples: Mutex<HashMap<String, CpuSample>>,
    /// The exec/attach/port-forward server, once started.
    pub stream: std::sync::OnceLock<Arc<berth_stream::StreamServer>>,
    /// What each runtime handler supports, asked at start.
    pub handlers: crate::handlers::RuntimeHandlers,
}

/// Validated parts of a RunPodSandbox request.
struct PodSpec {
    key: String,
    handler: String,
    host_net: bool,
    host_pid: bool,
    host_ipc: bool,
    hostname: String,
    sysctls: Vec<(String, String)>,
    cgroup_rel: Option<PathBuf>,
}

/// Steps to undo if RunPodSandbox fails part way, run in reverse.
#[derive(Default)]
struct Undo(Vec<Box<dyn FnOnce() + Send>>);

impl Undo {
    fn push(&mut self, f: impl FnOnce() + Send + 'static) {
        self.0.push(Box::new(f));
    }
    fn run(self) {
        for f in self.0.into_iter().rev() {
            f();
        }
    }
}

pub(crate) fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

/// Whether berthd may lower oom_score_adj (CAP_SYS_RESOURCE in its effective set).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// Clamps a wanted oom_score_adj to what this host allows, as containerd's
/// `restrict_oom_score_adj` does: without CAP_SYS_RESOURCE, never below berthd's own.
pub fn clamp_oom_score_adj(wanted: i32) -> i32 {
    if has_cap_sys_resource() {
        return wanted;
    }
    let own = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .unwrap_or(0);
    wanted.max(own)
}

/// A sysctl a pod may set: only namespaced ones (runc's rule).
fn namespaced_sysctl(key: &str, host_net: bool, host_ipc: bool) -> Result<(), String> {
    let ipc = matches!(
        key,
        "kernel.msgmax"
            | "kernel.msgmnb"
            | "kernel.msgmni"
            | "kernel.sem"
            | "kernel.shmall"
            | "kernel.shmmax"
            | "kernel.shmmni"
            | "kernel.shm_rmid_forced"
    ) || key.starts_with("fs.mqueue.");
    if ipc {
        return if host_ipc {
            Err("IPC sysctls need the pod's own IPC namespace".into())
        } else {
            Ok(())
        };
    }
    if key.starts_with("net.") {
        return if host_net {
            Err("net.* sysctls need the pod's own network namespace".into())
        } else {
            Ok(())
        };
    }
    Err("not a namespaced sysctl".into())
}

/// Whether a pid is a live (not zombie) process.
fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .map(|st| st != "Z")
        })
        .unwrap_or(false)
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn node_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Random 64-hex id.
pub(crate) fn new_id() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A network error as the CRI reports it.
pub(crate) fn net_status(e: NetError) -> Status {
    match e {
        NetError::Conf(c) => {
            Status::failed_precondition(format!("the pod network is not ready: {c}"))
        }
        NetError::InvalidArgument { field, message } => invalid_field(&field, &message),
        other => Status::internal(format!("pod network: {other}")),
    }
}

/// What CNI needs of a pod.
fn pod_network(id: &str, netns: &Path, config: &cri::PodSandboxConfig) -> PodNetwork {
    let meta = config.metadata.clone().unwrap_or_default();
    PodNetwork {
        id: id.to_string(),
        netns: netns.to_path_buf(),
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        port_mappings: config
            .port_mappings
            .iter()
            .map(|m| PortMapping {
                host_port: u16::try_from(m.host_port).unwrap_or(0),
                container_port: u16::try_from(m.container_port).unwrap_or(0),
                protocol: match cri::Protocol::try_from(m.protocol) {
                    Ok(cri::Protocol::Udp) => "udp",
                    Ok(cri::Protocol::Sctp) => "sctp",
                    _ => "tcp",
                }
                .to_string(),
                host_ip: m.host_ip.clone(),
            })
            .collect(),
        dns: config
            .dns_config
            .as_ref()
            .map(|d| (d.servers.clone(), d.searches.clone(), d.options.clone())),
        annotations: config.annotations.clone().into_iter().collect(),
    }
}

impl PodManager {
    /// Loads the sandboxes and reconnects to their shims; a shim that is gone leaves
    /// its sandbox NotReady (Stop and Remove still clean it up).
    pub async fn open(
        cfg: Config,
        store: Arc<RuntimeStore>,
        images: Arc<berth_image::ImageService>,
    ) -> Result<Arc<PodManager>, Status> {
        let shim_binary = if !cfg.shim.as_os_str().is_empty() {
            cfg.shim.clone()
        } else {
            let beside = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("berth-shim")));
            match beside {
                Some(p) if p.is_file() => p,
                _ => PathBuf::from("berth-shim"),
            }
        };
        let net = Arc::new(CniManager::new(cfg.cni_settings()));
        let handlers = crate::handlers::RuntimeHandlers::probe(&cfg).await;
        let pm = Arc::new(PodManager {
            handlers,
            net,
            cfg,
            store,
            images,
            shim_binary,
            shims: tokio::sync::Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
            record_lock: Mutex::new(()),
            events: Exchange::default(),
            cgroups: {
                let h = Hierarchy::detect().unwrap_or_default();
                info!(mode = ?h.mode(), "cgroup hierarchies");
                h
            },
            cpu_samples: Mutex::new(HashMap::new()),
            stream: std::sync::OnceLock::new(),
        });
        for rec in pm.store.sandboxes() {
            if rec.state != SandboxState::Ready {
                continue;
            }
            match ShimClient::connect(&pm.shim_socket(&rec.id)).await {
                Ok(client) => {
                    let info = client.connect_info().await.ok();
                    let infra = info
                        .as_ref()
                        .and_then(|i| i.tasks.iter().find(|t| t.id == rec.id).cloned());
                    match infra {
                        Some(t) if t.status == pb::TaskStatus::Running as i32 => {
                            pm.watch(&rec.id, client.clone()).await;
                            pm.shims.lock().await.insert(rec.id.clone(), client);
                            info!(sandbox = %rec.id, "reconnected to shim");
                        }
                        Some(t) => {
                            let why = format!(
                                "the infra process exited with {} while berthd was down",
                                t.exit_status
                            );
                            pm.mark_not_ready(&rec.id, &why);
                            // Its containers may still run: keep following their exits.
                            pm.watch(&rec.id, client.clone()).await;
                            pm.shims.lock().await.insert(rec.id.clone(), client);
                        }
                        None => {
                            pm.mark_not_ready(&rec.id, "the shim no longer knows the infra process")
                        }
                    }
                }
                Err(e) => {
                    warn!(sandbox = %rec.id, error = %e, "shim unreachable");
                    pm.mark_not_ready(&rec.id, "the pod's shim died");
                    pm.reap_orphaned_containers(&rec.id).await;
                }
            }
        }
        pm.recover_containers().await;
        pm.sweep_orphans().await;
        Ok(pm)
    }

    pub(crate) fn sandbox_root(&self, id: &str) -> PathBuf {
        self.cfg.root.join("sandboxes").join(id)
    }
    pub(crate) fn sandbox_state(&self, id: &str) -> PathBuf {
        self.cfg.state.join("sandboxes").join(id)
    }
    /// Short on purpose: a unix socket path must fit in 108 bytes (sun_path), so it is
    /// `<state>/s/<first 16 hex of the id>` rather than inside the sandbox dir.
    pub(crate) fn shim_socket(&self, id: &str) -> PathBuf {
        self.cfg.state.join("s").join(&id[..16.min(id.len())])
    }
    pub(crate) fn netns_path(&self, id: &str) -> PathBuf {
        self.cfg.state.join("netns").join(id)
    }
    /// The pod's CNI attachment cache: persistent (in `root`), so that DEL can release
    /// IPAM leases even after a reboot.
    pub(crate) fn cni_cache(&self, id: &str) -> PathBuf {
        self.sandbox_root(id).join("cni.json")
    }
    pub(crate) fn shm_path(&self, id: &str) -> PathBuf {
        self.sandbox_state(id).join("shm")
    }

    pub(crate) fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id.to_string()).or_default().clone()
    }

    fn mark_not_ready(&self, id: &str, reason: &str) {
        if let Some(mut rec) = self.store.sandbox(id) {
            if rec.state == SandboxState::Ready {
                rec.state = SandboxState::NotReady;
                rec.reason = reason.to_string();
                if let Err(e) = self.store.put_sandbox(&rec) {
                    warn!(sandbox = id, error = %e, "recording NotReady");
                }
                info!(sandbox = id, reason, "sandbox not ready");
            }
        }
    }

    /// Follows a shim: the infra's exit or the shim's death makes the sandbox NotReady.
    async fn watch(self: &Arc<Self>, id: &str, client: ShimClient) {
        if client.subscribe().await.is_err() {
            return;
        }
        let mut events = client.events();
        let me = Arc::downgrade(self);
        let id = id.to_string();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        // An exec process's exit is its caller's business, not the container's.
                        Ok(pb::Event { event: Some(pb::event::Event::Exit(e)) }) if e.exec_id.is_empty() => {
                            if let Some(pm) = me.upgrade() {
                                if e.id == id {
                                    pm.mark_not_ready(&id, &format!("the infra process exited with {}", e.exit_status));
                                } else {
                                    pm.on_container_exit(&e.id, e.exit_status as i32, e.exited_at_unix_nanos, shim_exit_reason(e.oom_killed), "");
                                }
                            }
                        }
                        // Events were dropped: read every task's state instead.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            warn!(sandbox = %id, missed = n, "shim events lagged; resyncing");
                            if let (Some(pm), Ok(info)) = (me.upgrade(), client.connect_info().await) {
                                for t in info.tasks.iter().filter(|t| t.status == pb::TaskStatus::Stopped as i32) {
                                    if t.id == id {
                                        pm.mark_not_ready(&id, &format!("the infra process exited with {}", t.exit_status));
                                    } else {
                                        pm.on_container_exit(&t.id, t.exit_status as i32, t.exited_at_unix_nanos, shim_exit_reason(t.oom_killed), "");
                                    }
                                }
                            }
                        }
                        Ok(pb::Event { event: Some(pb::event::Event::Oom(o)) }) => {
                            warn!(sandbox = %id, container = %o.id, "the kernel OOM-killed a process of the container");
                            if let Some(pm) = me.upgrade() {
                                pm.events.publish(Topic::TaskOom, &o.id, &id);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                    _ = client.closed() => {
                        if let Some(pm) = me.upgrade() {
                            let shutting_down = pm.store.sandbox(&id).is_some_and(|r| r.state != SandboxState::Ready);
                            pm.mark_not_ready(&id, "the pod's shim died");
                            if !shutting_down {
                                pm.reap_orphaned_containers(&id).await;
                            }
                        }
                        return;
                    }
                }
            }
        });
    }

    fn validate(&self, req: &cri::RunPodSandboxRequest) -> Result<PodSpec, Status> {
        let config = req
            .config
            .as_ref()
            .ok_or_else(|| invalid_field("config", "is required"))?;
        let meta = config
            .metadata
            .as_ref()
            .ok_or_else(|| invalid_field("config.metadata", "is required"))?;
        for (field, v) in [
            ("name", &meta.name),
            ("namespace", &meta.namespace),
            ("uid", &meta.uid),
        ] {
            if v.is_empty() {
                return Err(invalid_field(
                    &format!("config.metadata.{field}"),
                    "must not be empty",
                ));
            }
        }
        let handler = if req.runtime_handler.is_empty() {
            self.cfg.default_runtime.clone()
        } else {
            req.runtime_handler.clone()
        };
        if !self.cfg.runtimes.contains_key(&handler) {
            let known: Vec<&str> = self.cfg.runtimes.keys().map(String::as_str).collect();
            return Err(invalid_field(
                "runtime_handler",
                &format!(
                    "unknown handler {handler:?} (configured: {})",
                    known.join(", ")
                ),
            ));
        }
        let linux = config.linux.clone().unwrap_or_default();
        let ns = linux
            .security_context
            .as_ref()
            .and_then(|s| s.namespace_options.clone())
            .unwrap_or_default();
        let node = cri::NamespaceMode::Node as i32;
        let (host_net, host_pid, host_ipc) = (ns.network == node, ns.pid == node, ns.ipc == node);
        let hostname = if host_net {
            node_hostname()
        } else if config.hostname.is_empty() {
            meta.name.chars().take(63).collect()
        } else {
            config.hostname.clone()
        };
        if !host_net && !valid_hostname(&hostname) {
            return Err(invalid_field(
                "config.hostname",
                &format!("{hostname:?} is not a valid host name"),
            ));
        }
        if !config.log_directory.is_empty() && !Path::new(&config.log_directory).is_absolute() {
            return Err(invalid_field(
                "config.log_directory",
                "must be an absolute path",
            ));
        }
        let mut sysctls = Vec::new();
        for (k, v) in &linux.sysctls {
            namespaced_sysctl(k, host_net, host_ipc)
                .map_err(|why| invalid_field(&format!("config.linux.sysctls[{k:?}]"), &why))?;
            if k.contains('/') || k.contains("..") || v.contains('\n') {
                return Err(invalid_field(
                    &format!("config.linux.sysctls[{k:?}]"),
                    "invalid key or value",
                ));
            }
            sysctls.push((k.clone(), v.clone()));
        }
        let cgroup_rel = if linux.cgroup_parent.is_empty() {
            None
        } else {
            Some(
                podcgroup::relative_path(
                    &linux.cgroup_parent,
                    self.cfg.cgroup_driver == CgroupDriver::Systemd,
                )
                .map_err(|why| invalid_field("config.linux.cgroup_parent", &why))?,
            )
        };
        Ok(PodSpec {
            key: format!(
                "{}_{}_{}_{}",
                meta.name, meta.namespace, meta.uid, meta.attempt
            ),
            handler,
            host_net,
            host_pid,
            host_ipc,
            hostname,
            sysctls,
            cgroup_rel,
        })
    }

    /// RunPodSandbox. The work runs in its own task: if the caller goes away (deadline,
    /// reset), the pod is still finished or undone, never left half-built.
    pub async fn run(self: &Arc<Self>, req: cri::RunPodSandboxRequest) -> Result<String, Status> {
        let me = self.clone();
        tokio::spawn(async move { me.run_detached(req).await })
            .await
            .map_err(|e| internal("RunPodSandbox task", e))?
    }

    async fn run_detached(
        self: &Arc<Self>,
        req: cri::RunPodSandboxRequest,
    ) -> Result<String, Status> {
        let spec = self.validate(&req)?;
        let config = req.config.clone().unwrap_or_default();
        let _create = self.create_lock.lock().await;
        if let Some(holder) = self.store.sandbox_by_key(&spec.key) {
            return Err(Status::already_exists(format!(
                "pod sandbox name {:?} is already reserved for sandbox {}",
                spec.key, holder.id
            )));
        }
        let id = new_id();
        let mut undo = Undo::default();
        let mut shim = None;
        match self.build(&id, &spec, &config, &mut undo, &mut shim).await {
            Ok(()) => Ok(id),
            Err(e) => {
                warn!(sandbox = id, error = %e, "RunPodSandbox failed; undoing");
                if let Some(c) = shim {
                    // The infra process (if it started), then the shim itself.
                    if c.kill(&id, 9, false).await.is_ok() {
                        let _ = tokio::time::timeout(STOP_WAIT, c.wait(&id)).await;
                        let _ = c.delete(&id).await;
                    }
                    let _ = c.shutdown().await;
                }
                let _ = std::fs::remove_file(self.shim_socket(&id));
                // Before the netns goes: DEL needs it (and is a no-op without an attachment).
                if let Err(ne) = self.net.teardown(&self.cni_cache(&id)).await {
                    warn!(sandbox = id, error = %ne, "undoing the pod network");
                }
                tokio::task::spawn_blocking(move || undo.run()).await.ok();
                Err(e)
            }
        }
    }

    async fn build(
        self: &Arc<Self>,
        id: &str,
        spec: &PodSpec,
        config: &cri::PodSandboxConfig,
        undo: &mut Undo,
        shim_out: &mut Option<ShimClient>,
    ) -> Result<(), Status> {
        let (root_dir, state_dir) = (self.sandbox_root(id), self.sandbox_state(id));
        for d in [&root_dir, &state_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| internal(&format!("creating {}", d.display()), e))?;
            let d = d.clone();
            undo.push(move || {
                let _ = std::fs::remove_dir_all(&d);
            });
        }
        // The files every container of the pod will see.
        std::fs::write(root_dir.join("hostname"), format!("{}\n", spec.hostname))
            .map_err(|e| internal("writing hostname", e))?;
        let hosts = if spec.host_net {
            std::fs::read("/etc/hosts").unwrap_or_default()
        } else {
            b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n".to_vec()
        };
        std::fs::write(root_dir.join("hosts"), hosts).map_err(|e| internal("writing hosts", e))?;
        let resolv = match &config.dns_config {
            Some(dns)
                if !(dns.servers.is_empty()
                    && dns.searches.is_empty()
                    && dns.options.is_empty()) =>
            {
                let mut s = String::new();
                if !dns.searches.is_empty() {
                    s.push_str(&format!("search {}\n", dns.searches.join(" ")));
                }
                for n in &dns.servers {
                    s.push_str(&format!("nameserver {n}\n"));
                }
                if !dns.options.is_empty() {
                    s.push_str(&format!("options {}\n", dns.options.join(" ")));
                }
                s.into_bytes()
            }
            _ => std::fs::read("/etc/resolv.conf").unwrap_or_default(),
        };
        std::fs::write(root_dir.join("resolv.conf"), resolv)
            .map_err(|e| internal("writing resolv.conf", e))?;

        let (host_ipc, host_net) = (spec.host_ipc, spec.host_net);
        let (shm, ns_path) = (self.shm_path(id), self.netns_path(id));
        let cgroup_rel = spec.cgroup_rel.clone();
        let state_dir_c = state_dir.clone();
        // Mounts, namespaces and cgroups: blocking syscalls, off the async workers.
        let (created_cgroups, join_cgroups) =
            tokio::task::spawn_blocking(move || -> Result<_, Status> {
                let undo_partial = |shm: &Path, ns_path: &Path| {
                    let _ = nix::mount::umount2(shm, nix::mount::MntFlags::MNT_DETACH);
                    let _ = netns::remove_pinned(ns_path);
                };
                let steps = || -> Result<_, Status> {
                    if !host_ipc {
                        std::fs::create_dir_all(&shm)
                            .map_err(|e| internal("creating shm dir", e))?;
                        nix::mount::mount(
                            Some("shm"),
                            &shm,
                            Some("tmpfs"),
                            nix::mount::MsFlags::MS_NOSUID
                                | nix::mount::MsFlags::MS_NODEV
                                | nix::mount::MsFlags::MS_NOEXEC,
                            Some("mode=1777,size=65536k"),
                        )
                        .map_err(|e| internal("mounting /dev/shm", e))?;
                    }
                    if !host_net {
                        netns::create_pinned(&ns_path)
                            .map_err(|e| internal("creating network namespace", e))?;
                    }
                    match cgroup_rel {
                        Some(rel) => {
                            let made = podcgroup::create(&rel)
                                .map_err(|e| internal("creating pod cgroup", e))?;
                            // Before anything else: a crash from here on must not leak them.
                            let list = serde_json::to_vec(&made.0)
                                .map_err(|e| internal("encoding cgroup list", e))?;
                            if let Err(e) =
                                std::fs::write(state_dir_c.join(CREATED_CGROUPS_FILE), list)
                            {
                                podcgroup::remove(&made.0);
                                return Err(internal("recording created cgroups", e));
                            }
                            Ok(made)
                        }
                        None => Ok((Vec::new(), Vec::new())),
                    }
                };
                // A step that fails undoes the earlier steps of this task.
                steps().inspect_err(|_| undo_partial(&shm, &ns_path))
            })
            .await
            .map_err(|e| internal("setup task", e))??;
        {
            let (shm, ns_path, created) = (
                self.shm_path(id),
                self.netns_path(id),
                created_cgroups.clone(),
            );
            undo.push(move || {
                let _ = nix::mount::umount2(&shm, nix::mount::MntFlags::MNT_DETACH);
                let _ = netns::remove_pinned(&ns_path);
                podcgroup::remove(&created);
            });
        }

        // The network (CNI ADD in the pinned netns) and the shim with its infra process
        // need only the netns, so they are set up side by side.
        let podnet = (!spec.host_net).then(|| pod_network(id, &self.netns_path(id), config));
        let cache = self.cni_cache(id);
        let net = async {
            match &podnet {
                Some(p) => self.net.setup(p, &cache).await.map_err(net_status),
                None => Ok(Vec::new()),
            }
        };
        let infra = self.start_shim_and_infra(id, spec, &state_dir, &join_cgroups, shim_out);
        let (ips, pid) = tokio::join!(net, infra);
        let pid = pid?;
        let ips = ips?;
        let client = shim_out
            .clone()
            .ok_or_else(|| internal("starting the shim", "no connection"))?;
        failpoint("sandbox-before-record");
        let rec = SandboxRecord {
            id: id.to_string(),
            key: spec.key.clone(),
            state: SandboxState::Ready,
            reason: String::new(),
            created_at: now_unix_nanos(),
            runtime_handler: spec.handler.clone(),
            netns: (!spec.host_net).then(|| self.netns_path(id)),
            infra_pid: pid,
            cgroup_dirs: created_cgroups
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            config: serde_json::to_value(config).map_err(|e| internal("encoding config", e))?,
            ips: ips.iter().map(|ip| ip.to_string()).collect(),
        };
        self.store
            .put_sandbox(&rec)
            .map_err(|e| internal("recording sandbox", e))?;
        self.watch(id, client.clone()).await;
        self.shims.lock().await.insert(id.to_string(), client);
        info!(sandbox = id, key = %spec.key, infra_pid = pid, "sandbox ready");
        Ok(())
    }

    /// Starts the pod's shim, then the infra process inside it; returns the infra pid.
    async fn start_shim_and_infra(
        &self,
        id: &str,
        spec: &PodSpec,
        state_dir: &Path,
        join_cgroups: &[PathBuf],
        shim_out: &mut Option<ShimClient>,
    ) -> Result<u32, Status> {
        let handler = self
            .cfg
            .runtimes
            .get(&spec.handler)
            .cloned()
            .unwrap_or_default();
        let runtime_root = self.cfg.runtime_root(&spec.handler);
        let shim_cfg = ShimConfig {
            socket: self.shim_socket(id),
            state_dir: state_dir.join("shim"),
            runtime: handler.path.clone(),
            runtime_root,
            runtime_args: handler.args.clone(),
        };
        let binary = self.shim_binary.clone();
        tokio::task::spawn_blocking(move || spawn_shim(&binary, &shim_cfg))
            .await
            .map_err(|e| internal("shim task", e))?
            .map_err(|e| internal("starting the pod's shim", e))?;
        let client = match ShimClient::connect(&self.shim_socket(id)).await {
            Ok(c) => c,
            Err(e) => {
                // It serves nothing for us: stop it by asking, else leave it to Stop's sweep.
                return Err(internal("connecting to the shim", e));
            }
        };
        *shim_out = Some(client.clone());
        let infra = pb::InfraRequest {
            id: id.to_string(),
            netns_path: if spec.host_net {
                String::new()
            } else {
                self.netns_path(id).display().to_string()
            },
            hostname: if spec.host_net {
                String::new()
            } else {
                spec.hostname.clone()
            },
            host_ipc: spec.host_ipc,
            host_pid: spec.host_pid,
            cgroup_dirs: join_cgroups
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            oom_score_adj: clamp_oom_score_adj(INFRA_OOM_SCORE_ADJ),
            sysctls: spec.sysctls.iter().cloned().collect(),
        };
        let pid = client
            .start_infra(infra)
            .await
            .map_err(|e| internal("starting the infra process", e))?;
        Ok(pid)
    }

    pub(crate) fn resolve(&self, id: &str, field: &str) -> Result<Option<SandboxRecord>, Status> {
        if id.is_empty() {
            return Err(invalid_field(field, "must not be empty"));
        }
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid_field(field, &format!("{id:?} is not a sandbox id")));
        }
        self.store
            .resolve_sandbox(id)
            .map_err(|e| invalid_field(field, &e))
    }

    /// The shim client of a sandbox, reconnecting if needed; `None` if the shim is gone.
    pub(crate) async fn shim(&self, id: &str) -> Option<ShimClient> {
        let mut shims = self.shims.lock().await;
        if let Some(c) = shims.get(id) {
            if !c.is_closed() {
                return Some(c.clone());
            }
        }
        let c = ShimClient::connect(&self.shim_socket(id)).await.ok()?;
        shims.insert(id.to_string(), c.clone());
        Some(c)
    }

    /// StopPodSandbox: stops the infra process (and, later, every container), frees the
    /// netns and /dev/shm. Idempotent; an unknown id is not an error.
    pub async fn stop(&self, id: &str) -> Result<(), Status> {
        let Some(rec) = self.resolve(id, "pod_sandbox_id")? else {
            return Ok(());
        };
        let lock = self.lock_for(&rec.id);
        let _g = lock.lock().await;
        self.stop_locked(&rec).await
    }

    async fn stop_locked(&self, rec: &SandboxRecord) -> Result<(), Status> {
        // Containers first (killed at once, as kubelet expects of a pod stop), and their
        // tasks deleted so the shim can go.
        for c in self.containers_of(&rec.id) {
            self.stop_container_rec(&c, 0).await?;
            if let Some(shim) = self.shim(&rec.id).await {
                let _ = shim.delete(&c.id).await;
            }
        }
        if let Some(c) = self.shim(&rec.id).await {
            match c.kill(&rec.id, 9, false).await {
                Ok(()) => {
                    let _ = tokio::time::timeout(STOP_WAIT, c.wait(&rec.id)).await;
                    let _ = c.delete(&rec.id).await;
                }
                Err(berth_runtime::client::ShimError::Remote {
                    code: berth_proto::shim::ErrorCode::NotFound,
                    ..
                }) => {} // already deleted
                Err(e) => warn!(sandbox = %rec.id, error = %e, "stopping infra"),
            }
            let _ = c.shutdown().await;
            self.shims.lock().await.remove(&rec.id);
        } else if rec.infra_pid != 0 {
            // The shim died: the infra process was reparented; stop it if it is still ours.
            let root = std::fs::read_link(format!("/proc/{}/root", rec.infra_pid)).ok();
            if root == Some(self.sandbox_state(&rec.id).join("shim").join("infra-root")) {
                let pid = rec.infra_pid;
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                // Stop returns once the process is gone (or a zombie awaiting its new parent).
                let deadline = tokio::time::Instant::now() + STOP_WAIT;
                while process_running(pid) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        // CNI DEL while the netns still exists; an error keeps the netns and the attachment
        // for kubelet's retry of the stop.
        self.net
            .teardown(&self.cni_cache(&rec.id))
            .await
            .map_err(|e| Status::internal(format!("tearing down the pod network: {e}")))?;
        let (shm, ns) = (self.shm_path(&rec.id), rec.netns.clone());
        tokio::task::spawn_blocking(move || -> Result<(), Status> {
            match nix::mount::umount2(&shm, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => return Err(internal("unmounting /dev/shm", e)),
            }
            if let Some(ns) = ns {
                netns::remove_pinned(&ns).map_err(|e| internal("removing network namespace", e))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| internal("stop task", e))??;
        if let Some(mut cur) = self.store.sandbox(&rec.id) {
            if cur.state != SandboxState::NotReady || cur.infra_pid != 0 {
                cur.state = SandboxState::NotReady;
                cur.infra_pid = 0;
                self.store
                    .put_sandbox(&cur)
                    .map_err(|e| internal("recording stop", e))?;
            }
        }
        info!(sandbox = %rec.id, "sandbox stopped");
        Ok(())
    }

    /// RemovePodSandbox: stops if needed, then frees every directory and cgroup and the
    /// record. Idempotent; an unknown id is not an error.
    pub async fn remove(&self, id: &str) -> Result<(), Status> {
        let Some(rec) = self.resolve(id, "pod_sandbox_id")? else {
            return Ok(());
        };
        let lock = self.lock_for(&rec.id);
        let _g = lock.lock().await;
        self.stop_locked(&rec).await?;
        // Its containers go with it: rootfs unmounted, dirs and records removed.
        for c in self.containers_of(&rec.id) {
            self.remove_container_rec(&c).await?;
        }
        let (root_dir, state_dir) = (self.sandbox_root(&rec.id), self.sandbox_state(&rec.id));
        let cgroups: Vec<PathBuf> = rec.cgroup_dirs.iter().map(PathBuf::from).collect();
        let socket = self.shim_socket(&rec.id);
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(&socket);
            podcgroup::remove(&cgroups);
            for d in [root_dir, state_dir] {
                match std::fs::remove_dir_all(&d) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(internal(&format!("removing {}", d.display()), e));
                    }
                    _ => {}
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| internal("remove task", e))??;
        self.store
            .delete_sandbox(&rec.id)
            .map_err(|e| internal("deleting record", e))?;
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&rec.id);
        info!(sandbox = %rec.id, "sandbox removed");
        Ok(())
    }

    fn cri_state(rec: &SandboxRecord) -> i32 {
        match rec.state {
            SandboxState::Ready => cri::PodSandboxState::SandboxReady as i32,
            SandboxState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
        }
    }

    pub(crate) fn config_of(rec: &SandboxRecord) -> cri::PodSandboxConfig {
        serde_json::from_value(rec.config.clone()).unwrap_or_default()
    }

    /// PodSandboxStatus.
    pub fn status(&self, id: &str, verbose: bool) -> Result<cri::PodSandboxStatusResponse, Status> {
        let rec = self
            .resolve(id, "pod_sandbox_id")?
            .ok_or_else(|| Status::not_found(format!("pod sandbox {id:?} not found")))?;
        let config = Self::config_of(&rec);
        let ns = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        let status = cri::PodSandboxStatus {
            id: rec.id.clone(),
            metadata: config.metadata.clone(),
            state: Self::cri_state(&rec),
            created_at: rec.created_at,
            network: Some(cri::PodSandboxNetworkStatus {
                ip: rec.ips.first().cloned().unwrap_or_default(),
                additional_ips: rec
                    .ips
                    .iter()
                    .skip(1)
                    .map(|ip| cri::PodIp { ip: ip.clone() })
                    .collect(),
            }),
            linux: Some(cri::LinuxPodSandboxStatus {
                namespaces: Some(cri::Namespace { options: ns }),
            }),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            runtime_handler: rec.runtime_handler.clone(),
        };
        let mut info = HashMap::new();
        if verbose {
            let v = serde_json::json!({
                "pid": rec.infra_pid,
                "netns": rec.netns,
                "reason": rec.reason,
                "runtimeHandler": rec.runtime_handler,
                "config": rec.config,
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(cri::PodSandboxStatusResponse {
            status: Some(status),
            info,
            containers_statuses: vec![],
            timestamp: now_unix_nanos(),
        })
    }

    /// ListPodSandbox with its filters (id or id prefix, state, labels).
    pub fn list(&self, filter: Option<cri::PodSandboxFilter>) -> Vec<cri::PodSandbox> {
        let f = filter.unwrap_or_default();
        self.store
            .sandboxes()
            .into_iter()
            .filter(|r| f.id.is_empty() || r.id.starts_with(&f.id))
            .filter(|r| {
                f.state
                    .as_ref()
                    .is_none_or(|s| s.state == Self::cri_state(r))
            })
            .filter_map(|r| {
                let config = Self::config_of(&r);
                let labels_ok = f
                    .label_selector
                    .iter()
                    .all(|(k, v)| config.labels.get(k) == Some(v));
                labels_ok.then(|| cri::PodSandbox {
                    id: r.id.clone(),
                    metadata: config.metadata.clone(),
                    state: Self::cri_state(&r),
                    created_at: r.created_at,
                    labels: config.labels.clone(),
                    annotations: config.annotations.clone(),
                    runtime_handler: r.runtime_handler.clone(),
                })
            })
            .collect()
    }
}
