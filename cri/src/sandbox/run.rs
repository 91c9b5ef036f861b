//! RunPodSandbox as a chain of steps, each undone if a later one fails: dirs and
//! files, then /dev/shm, the pinned netns and the pod cgroup, then CNI and the shim
//! with its infra process side by side, then the record (last, so that a crash before
//! it leaves only what the startup sweep frees).

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_network::{PodNetwork, PortMapping};
use berth_proto::shim as pb;
use berth_runtime::client::ShimClient;
use berth_runtime::shim::ShimConfig;
use berth_runtime::timefmt::now_unix_nanos;
use berth_runtime::{netns, podcgroup};
use k8s_cri::v1 as cri;
use tracing::{info, warn};

use super::SandboxService;
use super::files::write_pod_files;
use super::validate::{PodSpec, pod_spec};
use crate::config::CgroupDriver;
use crate::context::new_id;
use crate::error::{CriError, Result};
use crate::events::Event;
use crate::oom_score::clamp_oom_score_adj;
use crate::records::{SandboxRecord, SandboxState};
use crate::undo::Undo;

/// The infra process's oom_score_adj (kubelet's pause value), clamped where the host forbids it.
const INFRA_OOM_SCORE_ADJ: i32 = -998;
/// How long an undo waits for the infra process after SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// What the namespace step made.
struct Isolation {
    /// Pod cgroup dirs berth created (removed with the pod).
    created: Vec<PathBuf>,
    /// Pod cgroup dirs the infra process joins.
    join: Vec<PathBuf>,
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

impl SandboxService {
    /// RunPodSandbox. The work runs in its own task: if the caller goes away (deadline,
    /// reset), the pod is still finished or undone, never left half-built.
    pub async fn run(&self, req: cri::RunPodSandboxRequest) -> Result<String> {
        let me = self.clone();
        tokio::spawn(async move { me.run_detached(req).await }).await?
    }

    async fn run_detached(&self, req: cri::RunPodSandboxRequest) -> Result<String> {
        let mut spec = pod_spec(&self.ctx.cfg, &self.ctx.host.modules, &req)?;
        let config = req.config.unwrap_or_default();
        let _create = self.ctx.create_lock.lock().await;
        if let Some(holder) = self.ctx.records.sandbox_by_key(&spec.key) {
            return Err(CriError::AlreadyExists(format!(
                "pod sandbox name {:?} is already reserved for sandbox {}",
                spec.key, holder.id
            )));
        }
        let id = new_id();
        spec.selinux_label = self.selinux_label(&id, &spec);
        let mut undo = Undo::default();
        match self.build(&id, &spec, config, &mut undo).await {
            Ok(()) => {
                undo.commit();
                Ok(id)
            }
            Err(e) => {
                warn!(sandbox = id, error = %e, "RunPodSandbox failed; undoing");
                undo.run().await;
                Err(e)
            }
        }
    }

    /// The pod's SELinux process label on an SELinux host: the policy's container
    /// label under the pod's options, at an MCS level no other pod has (the create
    /// lock is held, so no pod is being made meanwhile).
    fn selinux_label(&self, id: &str, spec: &PodSpec) -> Option<String> {
        let host = self.ctx.host.modules.selinux.as_ref()?;
        let used: std::collections::HashSet<String> = self
            .ctx
            .records
            .sandboxes()
            .iter()
            .filter_map(|p| p.selinux_label.as_deref())
            .filter_map(|l| l.splitn(4, ':').nth(3).map(str::to_string))
            .collect();
        Some(crate::oci::pod_label(
            spec.selinux.as_ref(),
            host,
            crate::oci::pod_level(id, &used),
        ))
    }

    /// The steps after the checks.
    async fn build(
        &self,
        id: &str,
        spec: &PodSpec,
        config: cri::PodSandboxConfig,
        undo: &mut Undo,
    ) -> Result<()> {
        self.make_dirs(id, spec, &config, undo)?;
        let isolation = self.isolate(id, spec, undo).await?;
        self.undo_scope(id, spec, undo);
        self.undo_network_and_shim(id, undo);
        // CNI ADD (in the pinned netns) and the shim with its infra process need only
        // the netns, so they are set up side by side.
        let podnet = (!spec.host_net).then(|| pod_network(id, &self.ctx.paths.netns(id), &config));
        let cache = self.ctx.paths.cni_cache(id);
        let net = async {
            match &podnet {
                Some(p) => self.ctx.net.setup(p, &cache).await.map_err(CriError::from),
                None => Ok(Vec::new()),
            }
        };
        let infra = self.start_shim_and_infra(id, spec, &isolation.join);
        let (ips, started) = tokio::join!(net, infra);
        let (client, pid) = started?;
        let ips = ips?;
        if let Some(slice) = &spec.systemd_slice {
            crate::podscope::place_infra(&self.ctx, id, slice, pid).await?;
        }
        crate::failpoint::failpoint("sandbox-before-record");
        let rec = SandboxRecord {
            id: id.to_string(),
            key: spec.key.clone(),
            state: SandboxState::Ready,
            reason: String::new(),
            created_at: now_unix_nanos(),
            runtime_handler: spec.handler.clone(),
            netns: (!spec.host_net).then(|| self.ctx.paths.netns(id)),
            infra_pid: pid,
            cgroup_dirs: isolation
                .created
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            config,
            ips: ips.iter().map(|ip| ip.to_string()).collect(),
            selinux_label: spec.selinux_label.clone(),
            systemd_slice: spec.systemd_slice.clone(),
        };
        self.ctx.records.put_sandbox(&rec)?;
        // Before the watcher, which publishes `/sandboxes/stop` if the infra exits.
        let events = &self.ctx.events;
        let sandbox_id = id.to_string();
        events.publish(
            id,
            Event::SandboxCreate {
                sandbox_id: sandbox_id.clone(),
            },
        );
        events.publish(id, Event::SandboxStart { sandbox_id, pid });
        self.watch(id, client.clone()).await;
        self.ctx.shims.insert(id, client).await;
        info!(sandbox = id, key = %spec.key, infra_pid = pid, "sandbox ready");
        Ok(())
    }

    /// The pod's dirs and the files its containers see.
    fn make_dirs(
        &self,
        id: &str,
        spec: &PodSpec,
        config: &cri::PodSandboxConfig,
        undo: &mut Undo,
    ) -> Result<()> {
        let paths = &self.ctx.paths;
        for d in [paths.sandbox_root(id), paths.sandbox_state(id)] {
            std::fs::create_dir_all(&d)
                .map_err(|e| CriError::internal(&format!("creating {}", d.display()), e))?;
            undo.push(move || {
                let _ = std::fs::remove_dir_all(&d);
            });
        }
        write_pod_files(&paths.sandbox_root(id), spec, config)?;
        // On SELinux hosts the files the containers bind get the pod's file label.
        if let Some(label) = self.pod_mount_label(spec) {
            for f in ["hostname", "hosts", "resolv.conf"] {
                let path = paths.sandbox_root(id).join(f);
                crate::oci::relabel(&path, &label)
                    .map_err(|e| CriError::internal(&format!("labelling {}", path.display()), e))?;
            }
        }
        Ok(())
    }

    /// The label of the pod's files and shm, on SELinux hosts.
    fn pod_mount_label(&self, spec: &PodSpec) -> Option<String> {
        let host = self.ctx.host.modules.selinux.as_ref()?;
        Some(crate::oci::pod_mount_label(
            spec.selinux_label.as_deref()?,
            host,
        ))
    }

    /// /dev/shm, the pinned netns and the pod cgroup, on a blocking thread; the list of
    /// created cgroups is written at once, so that a crash cannot leak them.
    async fn isolate(&self, id: &str, spec: &PodSpec, undo: &mut Undo) -> Result<Isolation> {
        let paths = &self.ctx.paths;
        let (shm, ns_path) = (paths.shm(id), paths.netns(id));
        let created_list = paths.created_cgroups(id);
        let (host_ipc, host_net, cgroup_rel) =
            (spec.host_ipc, spec.host_net, spec.cgroup_rel.clone());
        let shm_label = self.pod_mount_label(spec);
        let (s, n) = (shm.clone(), ns_path.clone());
        let undo_partial = move || {
            let _ = nix::mount::umount2(&s, nix::mount::MntFlags::MNT_DETACH);
            let _ = netns::remove_pinned(&n);
        };
        let made = tokio::task::spawn_blocking(move || {
            let steps = || -> Result<Isolation> {
                if !host_ipc {
                    mount_shm(&shm, shm_label.as_deref())?;
                }
                if !host_net {
                    netns::create_pinned(&ns_path)
                        .map_err(|e| CriError::internal("creating network namespace", e))?;
                }
                match cgroup_rel {
                    Some(rel) => create_cgroups(&rel, &created_list),
                    None => Ok(Isolation {
                        created: Vec::new(),
                        join: Vec::new(),
                    }),
                }
            };
            steps().inspect_err(|_| undo_partial())
        })
        .await??;
        let (shm, ns_path, created) = (paths.shm(id), paths.netns(id), made.created.clone());
        undo.push(move || {
            let _ = nix::mount::umount2(&shm, nix::mount::MntFlags::MNT_DETACH);
            let _ = netns::remove_pinned(&ns_path);
            podcgroup::remove(&created);
        });
        Ok(made)
    }

    /// What undoes the infra's systemd scope (systemd driver): pushed before the shim's
    /// undo so that it runs after the infra process is gone; the create lock is held.
    fn undo_scope(&self, id: &str, spec: &PodSpec, undo: &mut Undo) {
        let Some(slice) = spec.systemd_slice.clone() else {
            return;
        };
        let (ctx, id) = (self.ctx.clone(), id.to_string());
        undo.push_async(async move {
            if let Err(e) = crate::podscope::release(&ctx, &id, &slice).await {
                warn!(sandbox = %id, error = %e, "undoing the pod's systemd scope");
            }
        });
    }

    /// What undoes the network and shim steps, pushed before they start (they run side
    /// by side): CNI DEL from the cache (a no-op without an attachment), then the shim,
    /// whatever state it reached (its infra killed, the shim shut down, its socket gone).
    fn undo_network_and_shim(&self, id: &str, undo: &mut Undo) {
        let (net, cache) = (self.ctx.net.clone(), self.ctx.paths.cni_cache(id));
        let sandbox = id.to_string();
        undo.push_async(async move {
            if let Err(e) = net.teardown(&cache).await {
                warn!(sandbox = %sandbox, error = %e, "undoing the pod network");
            }
        });
        let (socket, sandbox) = (self.ctx.paths.shim_socket(id), id.to_string());
        undo.push_async(async move {
            if let Ok(c) = ShimClient::connect(&socket).await {
                let _ = c.kill_and_reap(&sandbox, STOP_WAIT).await;
                let _ = c.shutdown().await;
            }
            let _ = std::fs::remove_file(&socket);
        });
    }

    /// Starts the pod's shim, then the infra process inside it.
    async fn start_shim_and_infra(
        &self,
        id: &str,
        spec: &PodSpec,
        join_cgroups: &[PathBuf],
    ) -> Result<(ShimClient, u32)> {
        let ctx = &self.ctx;
        let handler = ctx
            .cfg
            .runtimes
            .get(&spec.handler)
            .cloned()
            .unwrap_or_default();
        // runc and crun take the driver as a global flag, on every command.
        let mut runtime_args = handler.args.clone();
        if ctx.cfg.cgroup_driver == CgroupDriver::Systemd {
            runtime_args.insert(0, "--systemd-cgroup".to_string());
        }
        let client = ctx
            .shims
            .spawn(ShimConfig {
                socket: ctx.paths.shim_socket(id),
                state_dir: ctx.paths.shim_dir(id),
                runtime: handler.path.clone(),
                runtime_root: ctx.cfg.runtime_root(&spec.handler),
                runtime_args,
                runtime_timeout: std::time::Duration::from_secs(handler.timeout_secs),
            })
            .await
            .map_err(|e| CriError::shim("starting the pod's shim", e))?;
        let infra = pb::InfraRequest {
            id: id.to_string(),
            netns_path: if spec.host_net {
                String::new()
            } else {
                ctx.paths.netns(id).display().to_string()
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
            .map_err(|e| CriError::shim("starting the infra process", e))?;
        Ok((client, pid))
    }
}

/// The pod's /dev/shm: a tmpfs, nosuid, nodev, noexec; labelled on SELinux hosts.
fn mount_shm(shm: &Path, label: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(shm).map_err(|e| CriError::internal("creating shm dir", e))?;
    let mut opts = "mode=1777,size=65536k".to_string();
    if let Some(l) = label {
        opts.push_str(&format!(",context=\"{l}\""));
    }
    nix::mount::mount(
        Some("shm"),
        shm,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some(opts.as_str()),
    )
    .map_err(|e| CriError::internal("mounting /dev/shm", e))
}

/// The pod cgroup in every hierarchy; what was created is listed in `list` at once.
fn create_cgroups(rel: &Path, list: &Path) -> Result<Isolation> {
    let (created, join) =
        podcgroup::create(rel).map_err(|e| CriError::internal("creating pod cgroup", e))?;
    let encoded =
        serde_json::to_vec(&created).map_err(|e| CriError::internal("encoding cgroup list", e))?;
    if let Err(e) = std::fs::write(list, encoded) {
        podcgroup::remove(&created);
        return Err(CriError::internal("recording created cgroups", e));
    }
    Ok(Isolation { created, join })
}
