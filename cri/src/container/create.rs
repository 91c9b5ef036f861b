//! CreateContainer as a chain of steps, each undone if a later one fails: check the
//! request, reserve the name, mount the rootfs, write the bundle, create the task,
//! write the record (last, so that a crash before it leaves only what the startup sweep
//! frees).

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_image::ImageRecord;
use berth_proto::shim as pb;
use berth_runtime::client::ShimClient;
use berth_runtime::timefmt::now_unix_nanos;
use k8s_cri::v1 as cri;
use oci_spec::image::ImageConfiguration;
use tracing::info;

use super::{ContainerService, signal_number};
use crate::context::new_id;
use crate::error::{CriError, Result};
use crate::events::Event;
use crate::oci::{
    HostFacts, ProcessIds, SandboxFiles, SpecInputs, build_spec, host_devices, image_volumes,
    needs_host_devices, needs_host_mounts, parse_mountinfo,
};
use crate::oom_score::clamp_oom_score_adj;
use crate::records::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};
use crate::undo::Undo;

/// Everything the steps of one creation share.
struct Plan {
    id: String,
    key: String,
    config: cri::ContainerConfig,
    pod: SandboxRecord,
    image_name: String,
    image: ImageRecord,
    image_config: ImageConfiguration,
    layers: Vec<PathBuf>,
    cgroups_path: String,
    /// SELinux mount label (SELinux hosts): the rootfs is mounted with it.
    mount_label: Option<String>,
    /// The pid of the container whose PID namespace it shares (`TARGET`), and that
    /// namespace's (device, inode) (checked on the new container: the pid could be reused).
    pid_target: Option<(u32, (u64, u64))>,
}

impl ContainerService {
    /// CreateContainer, in its own task so that a caller going away cannot leave a
    /// half-created container behind.
    pub async fn create(&self, req: cri::CreateContainerRequest) -> Result<String> {
        let me = self.clone();
        tokio::spawn(async move { me.create_detached(req).await }).await?
    }

    async fn create_detached(&self, req: cri::CreateContainerRequest) -> Result<String> {
        let (config, image_name) = checked_config(&req, &self.ctx.cgroups)?;
        let pod = self.ready_pod(&req.pod_sandbox_id)?;
        self.check_handler_features(&config, &pod.runtime_handler)?;
        let image = self.ctx.images.resolve(&image_name)?.ok_or_else(|| {
            CriError::NotFound(format!("image {image_name:?} not found; pull it first"))
        })?;
        let lock = self.ctx.pod_locks.of(&pod.id);
        let _g = lock.lock().await;
        let plan = self.plan(config, pod, image_name, image)?;
        let mut undo = Undo::default();
        match self.build(&plan, &mut undo).await {
            Ok(()) => {
                undo.commit();
                info!(container = %plan.id, sandbox = %plan.pod.id, "container created");
                self.publish_created(&plan);
                Ok(plan.id)
            }
            Err(e) => {
                undo.run().await;
                Err(e)
            }
        }
    }

    /// `/containers/create`, then `/tasks/create` (the runtime made its process).
    fn publish_created(&self, plan: &Plan) {
        let Some(rec) = self.ctx.records.container(&plan.id) else {
            return;
        };
        let events = &self.ctx.events;
        events.publish(
            &plan.pod.id,
            Event::ContainerCreate {
                id: plan.id.clone(),
                image: plan.image_name.clone(),
                runtime: plan.pod.runtime_handler.clone(),
                labels: plan.config.labels.clone().into_iter().collect(),
            },
        );
        events.publish(
            &plan.pod.id,
            Event::TaskCreate {
                container_id: plan.id.clone(),
                bundle: self.ctx.paths.bundle_dir(&plan.id).display().to_string(),
                pid: rec.pid,
            },
        );
    }

    /// The steps after the checks.
    async fn build(&self, plan: &Plan, undo: &mut Undo) -> Result<()> {
        self.mount_rootfs(plan, undo).await?;
        let (user, mount_label) = self.write_bundle(plan)?;
        if let Some(label) = mount_label {
            relabel_volumes(&plan.config, label).await?;
        }
        let shim = self.ctx.shims.get(&plan.pod.id).await.ok_or_else(|| {
            CriError::FailedPrecondition(format!("the shim of pod {} is gone", plan.pod.id))
        })?;
        let pid = self.create_task(plan, &shim, undo).await?;
        if let Some((target, ino)) = plan.pid_target {
            if pid_namespace(pid) != Some(ino) {
                return Err(CriError::FailedPrecondition(format!(
                    "the target container (pid {target}) exited while container {} was created",
                    plan.id
                )));
            }
        }
        crate::failpoint::failpoint("container-before-record");
        self.ctx
            .records
            .put_container(&self.record(plan, pid, user))?;
        Ok(())
    }

    /// The pod, which must be ready.
    fn ready_pod(&self, id: &str) -> Result<SandboxRecord> {
        let pod = self.ctx.sandbox(id, "pod_sandbox_id")?;
        if pod.state != SandboxState::Ready {
            return Err(CriError::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                pod.id
            )));
        }
        Ok(pod)
    }

    /// Refuses what the pod's runtime handler cannot apply (closed by default: never a
    /// silently weaker container).
    fn check_handler_features(&self, config: &cri::ContainerConfig, handler: &str) -> Result<()> {
        let features = self.ctx.handlers.get(handler);
        for (i, m) in config.mounts.iter().enumerate() {
            if m.recursive_read_only && !features.recursive_read_only_mounts {
                return Err(CriError::invalid(
                    &format!("config.mounts[{i}].recursive_read_only"),
                    format!(
                        "runtime handler {handler:?} does not support recursive read-only mounts (it needs the \"rro\" mount option and Linux 5.12)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The pid of the container a `TARGET` PID namespace names: it must be a running
    /// container of the same pod (containerd's rule), never silently a private one.
    fn pid_target(
        &self,
        config: &cri::ContainerConfig,
        pod: &SandboxRecord,
    ) -> Result<Option<(u32, (u64, u64))>> {
        let field = "config.linux.security_context.namespace_options";
        let Some(ns) = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
        else {
            return Ok(None);
        };
        let target = cri::NamespaceMode::Target as i32;
        for (name, mode) in [("network", ns.network), ("ipc", ns.ipc)] {
            if mode == target {
                return Err(CriError::invalid(
                    &format!("{field}.{name}"),
                    "TARGET is only supported for the PID namespace",
                ));
            }
        }
        if ns.pid != target {
            return Ok(None);
        }
        let field = format!("{field}.target_id");
        if ns.target_id.is_empty() {
            return Err(CriError::invalid(&field, "is required when pid is TARGET"));
        }
        let shown = crate::error::shown(&ns.target_id);
        let t = self
            .ctx
            .records
            .container(&ns.target_id)
            .filter(|t| t.sandbox_id == pod.id)
            .ok_or_else(|| {
                CriError::invalid(&field, format!("no container {shown} in pod {}", pod.id))
            })?;
        let not_running = || {
            CriError::FailedPrecondition(format!(
                "{field}: target container {} is not running",
                t.id
            ))
        };
        if t.state != ContainerState::Running || t.pid == 0 {
            return Err(not_running());
        }
        let ino = pid_namespace(t.pid).ok_or_else(not_running)?;
        Ok(Some((t.pid, ino)))
    }

    /// Reserves the name in the pod and gathers what the steps need.
    fn plan(
        &self,
        config: cri::ContainerConfig,
        pod: SandboxRecord,
        image_name: String,
        image: ImageRecord,
    ) -> Result<Plan> {
        let meta = config.metadata.clone().unwrap_or_default();
        let key = format!("{}_{}", meta.name, meta.attempt);
        let holder = self
            .ctx
            .containers_of(&pod.id)
            .into_iter()
            .find(|c| c.key == key);
        if let Some(holder) = holder {
            return Err(CriError::AlreadyExists(format!(
                "container name {key:?} is already in use by container {}",
                holder.id
            )));
        }
        let mount_label = crate::oci::container_labels(
            config
                .linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref())
                .and_then(|s| s.selinux_options.as_ref()),
            "config.linux.security_context.selinux_options",
            self.ctx.host.modules.selinux.as_ref(),
            pod.selinux_label.as_deref(),
        )?
        .map(|l| l.mount);
        let pid_target = self.pid_target(&config, &pod)?;
        let id = new_id();
        Ok(Plan {
            pid_target,
            cgroups_path: self.cgroups_path(&pod, &id),
            image_config: self.ctx.images.image_config(&image)?,
            layers: self.ctx.images.layer_paths(&image)?,
            id,
            key,
            config,
            pod,
            image_name,
            image,
            mount_label,
        })
    }

    /// The writable layer and volume dirs, the missing host paths of mounts (as dirs,
    /// which kubelet expects), and the overlay rootfs.
    async fn mount_rootfs(&self, plan: &Plan, undo: &mut Undo) -> Result<()> {
        let (cdir, bundle) = (
            self.ctx.paths.container_dir(&plan.id),
            self.ctx.paths.bundle_dir(&plan.id),
        );
        let rootfs = bundle.join("rootfs");
        {
            let (cdir, bundle, rootfs) = (cdir.clone(), bundle.clone(), rootfs.clone());
            undo.push(move || {
                let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_dir_all(&cdir);
                let _ = std::fs::remove_dir_all(&bundle);
            });
        }
        let host_dirs: Vec<PathBuf> = plan
            .config
            .mounts
            .iter()
            .map(|m| PathBuf::from(&m.host_path))
            .filter(|p| p.is_absolute())
            .collect();
        let volumes = image_volumes(&plan.image_config).len();
        let lower: Vec<PathBuf> = plan.layers.iter().rev().cloned().collect();
        let label = plan.mount_label.clone();
        tokio::task::spawn_blocking(move || {
            make_dirs(&cdir, &rootfs, volumes, &host_dirs)?;
            mount_overlay(&lower, &cdir, &rootfs, label.as_deref())
        })
        .await?
    }

    /// `config.json` (0600: it holds env values from Secrets); the identity its
    /// process runs as, and its SELinux mount label on SELinux hosts.
    fn write_bundle(&self, plan: &Plan) -> Result<(ProcessIds, Option<String>)> {
        let ctx = &self.ctx;
        let paths = &ctx.paths;
        let host_ipc = plan
            .pod
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .is_some_and(|n| n.ipc == cri::NamespaceMode::Node as i32);
        let files = SandboxFiles {
            hostname: paths.sandbox_root(&plan.pod.id).join("hostname"),
            hosts: paths.sandbox_root(&plan.pod.id).join("hosts"),
            resolv_conf: paths.sandbox_root(&plan.pod.id).join("resolv.conf"),
            shm: (!host_ipc).then(|| paths.shm(&plan.pod.id)),
        };
        let min_oom = {
            let clamped = clamp_oom_score_adj(-1000);
            (clamped > -1000).then_some(clamped)
        };
        let bundle = paths.bundle_dir(&plan.id);
        let host = self.host_facts(&plan.config);
        let spec = build_spec(&SpecInputs {
            id: &plan.id,
            config: &plan.config,
            pod: &plan.pod.config,
            image: &plan.image_config,
            rootfs: &bundle.join("rootfs"),
            files: &files,
            netns: plan.pod.netns.as_deref(),
            infra_pid: plan.pod.infra_pid,
            pid_target: plan.pid_target.map(|(pid, _)| pid),
            cgroups_path: &plan.cgroups_path,
            min_oom_score_adj: min_oom,
            volumes_dir: &paths.container_dir(&plan.id).join("volumes"),
            host: &host,
            pod_selinux_label: plan.pod.selinux_label.as_deref(),
        })?;
        let bytes =
            serde_json::to_vec_pretty(&spec).map_err(|e| CriError::internal("encoding spec", e))?;
        crate::layout::write_private(&bundle.join("config.json"), &bytes)
            .map_err(|e| CriError::internal("writing config.json", e))?;
        let user = spec
            .process()
            .as_ref()
            .map(|p| p.user().clone())
            .unwrap_or_default();
        let ids = ProcessIds {
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
        };
        let mount_label = spec.linux().as_ref().and_then(|l| l.mount_label().clone());
        Ok((ids, mount_label))
    }

    /// This host as the container's spec needs it: what berthd learnt at start, plus
    /// the host's devices for a privileged container and its mounts for propagating
    /// bind mounts, read now (they change).
    fn host_facts(&self, config: &cri::ContainerConfig) -> HostFacts {
        let mut host = self.ctx.host.clone();
        if needs_host_devices(config) {
            host.devices = host_devices(Path::new("/dev"));
        }
        if needs_host_mounts(config) {
            let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            host.mounts = parse_mountinfo(&text);
        }
        host
    }

    /// The shim runs `<runtime> create`; a later failure kills and deletes the task.
    async fn create_task(&self, plan: &Plan, shim: &ShimClient, undo: &mut Undo) -> Result<u32> {
        // Armed before the call: a create the shim finishes after berthd gave up on it
        // (a timeout) is killed and deleted too; an absent task is fine.
        let (undo_shim, id) = (shim.clone(), plan.id.clone());
        undo.push_async(async move {
            let _ = undo_shim.kill_and_reap(&id, Duration::from_secs(5)).await;
        });
        let pid = shim
            .create(pb::CreateRequest {
                id: plan.id.clone(),
                bundle: self.ctx.paths.bundle_dir(&plan.id).display().to_string(),
                terminal: plan.config.tty,
                stdin: plan.config.stdin,
                stdin_once: plan.config.stdin_once,
                log_path: log_path(&plan.pod.config, &plan.config),
            })
            .await
            .map_err(|e| CriError::shim("creating container", e))?;
        Ok(pid)
    }

    fn record(&self, plan: &Plan, pid: u32, user: ProcessIds) -> ContainerRecord {
        let stop_signal = plan
            .image_config
            .config()
            .as_ref()
            .and_then(|c| c.stop_signal().clone())
            .and_then(|s| signal_number(&s))
            .unwrap_or(15);
        ContainerRecord {
            id: plan.id.clone(),
            sandbox_id: plan.pod.id.clone(),
            key: plan.key.clone(),
            state: ContainerState::Created,
            created_at: now_unix_nanos(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            image: plan.image_name.clone(),
            image_id: plan.image.id.to_string(),
            image_ref: plan
                .image
                .repo_digests
                .first()
                .cloned()
                .unwrap_or_else(|| plan.image.id.to_string()),
            log_path: log_path(&plan.pod.config, &plan.config),
            pid,
            stop_signal,
            config: plan.config.clone(),
            cgroups_path: plan.cgroups_path.clone(),
            user: Some(user),
        }
    }
}

/// A process's PID namespace, as (device, inode).
fn pid_namespace(pid: u32) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The request's config and image name, checked before anything is made.
fn checked_config(
    req: &cri::CreateContainerRequest,
    cgroups: &berth_cgroups::Hierarchy,
) -> Result<(cri::ContainerConfig, String)> {
    let config = req
        .config
        .clone()
        .ok_or_else(|| CriError::invalid("config", "is required"))?;
    crate::limits::container_config(&config)?;
    let meta = config
        .metadata
        .as_ref()
        .ok_or_else(|| CriError::invalid("config.metadata", "is required"))?;
    if meta.name.is_empty() {
        return Err(CriError::invalid(
            "config.metadata.name",
            "must not be empty",
        ));
    }
    if let Some(r) = config.linux.as_ref().and_then(|l| l.resources.as_ref()) {
        super::validate_resources(r, "config.linux.resources", cgroups)?;
    }
    if !config.log_path.is_empty() {
        let p = Path::new(&config.log_path);
        if p.is_absolute()
            || p.components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(CriError::invalid(
                "config.log_path",
                "must be a relative path without '..'",
            ));
        }
    }
    let image = config
        .image
        .as_ref()
        .map(|i| i.image.clone())
        .unwrap_or_default();
    if image.is_empty() {
        return Err(CriError::invalid(
            "config.image.image",
            "an image is required",
        ));
    }
    Ok((config, image))
}

/// The CRI log file: the pod's log directory joined with the container's log path.
fn log_path(pod: &cri::PodSandboxConfig, config: &cri::ContainerConfig) -> String {
    if pod.log_directory.is_empty() || config.log_path.is_empty() {
        return String::new();
    }
    Path::new(&pod.log_directory)
        .join(&config.log_path)
        .display()
        .to_string()
}

/// Volumes that ask for `selinux_relabel` get the container's mount label, as
/// containerd relabels them (never a system directory such as `/` or `/usr`).
async fn relabel_volumes(config: &cri::ContainerConfig, label: String) -> Result<()> {
    let wanted: Vec<(usize, PathBuf)> = config
        .mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| m.selinux_relabel)
        .map(|(i, m)| (i, PathBuf::from(&m.host_path)))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || {
        for (i, path) in wanted {
            let field = format!("config.mounts[{i}].selinux_relabel");
            let real = path.canonicalize().unwrap_or(path);
            if !crate::oci::relabel_allowed(&real) {
                return Err(CriError::invalid(
                    &field,
                    format!("relabeling content in {} is not allowed", real.display()),
                ));
            }
            crate::oci::relabel(&real, &label).map_err(|e| {
                CriError::invalid(&field, format!("relabeling {}: {e}", real.display()))
            })?;
        }
        Ok(())
    })
    .await?
}

fn make_dirs(cdir: &Path, rootfs: &Path, volumes: usize, host_dirs: &[PathBuf]) -> Result<()> {
    for d in [cdir.join("upper"), cdir.join("work"), rootfs.to_path_buf()] {
        std::fs::create_dir_all(&d)
            .map_err(|e| CriError::internal(&format!("creating {}", d.display()), e))?;
    }
    for i in 0..volumes {
        let v = cdir.join("volumes").join(i.to_string());
        std::fs::create_dir_all(&v).map_err(|e| CriError::internal("creating volume dir", e))?;
    }
    for h in host_dirs {
        if std::fs::symlink_metadata(h).is_err() {
            std::fs::create_dir_all(h).map_err(|e| {
                CriError::internal(&format!("creating host path {}", h.display()), e)
            })?;
        }
    }
    Ok(())
}

/// The image's snapshots (top first) under the container's writable layer; on
/// SELinux hosts every file in it carries the container's mount label (`context=`),
/// as CRI-O mounts it.
fn mount_overlay(lower: &[PathBuf], cdir: &Path, rootfs: &Path, label: Option<&str>) -> Result<()> {
    let lower: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
    let mut opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        cdir.join("upper").display(),
        cdir.join("work").display()
    );
    if let Some(l) = label {
        opts.push_str(&format!(",context=\"{l}\""));
    }
    nix::mount::mount(
        Some("overlay"),
        rootfs,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| CriError::internal("mounting the container rootfs", e))
}
