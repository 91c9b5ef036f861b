//! Containers: CreateContainer mounts the image's snapshots as an overlay with a
//! private writable layer, writes the OCI bundle and has the pod's shim create the
//! task; exits arrive as shim events (or, after a restart, from the shim's task list).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_proto::shim as pb;
use berth_runtime::client::ShimError;
use berth_runtime::spec::{SandboxFiles, SpecInputs, build_spec};
use berth_runtime::store::{ContainerRecord, ContainerState, SandboxState};
use berth_runtime::timefmt::now_unix_nanos;
use k8s_cri::v1 as cri;
use tonic::Status;
use tracing::{info, warn};

use crate::pods::{PodManager, clamp_oom_score_adj, internal, new_id};
use crate::status::invalid_field;

/// Most output ExecSync keeps per stream; two of them fit a 16 MiB gRPC message.
const MAX_EXEC_OUTPUT: usize = 4 << 20;

/// Signal numbers by name, for an image's StopSignal.
fn signal_number(name: &str) -> Option<u32> {
    let n = name.trim().to_ascii_uppercase();
    if let Ok(v) = n.parse::<u32>() {
        return (1..=64).contains(&v).then_some(v);
    }
    let n = n.strip_prefix("SIG").unwrap_or(&n).to_string();
    nix::sys::signal::Signal::iterator()
        .find(|s| s.as_str().trim_start_matches("SIG") == n)
        .map(|s| s as i32 as u32)
}

/// The CRI reason for an exit code.
fn exit_reason(code: i32) -> &'static str {
    if code == 0 { "Completed" } else { "Error" }
}

/// The reason the shim's exit report implies: `OOMKilled` when the kernel OOM-killed
/// a process of the container (as containerd reports it, whatever the exit code).
pub(crate) fn shim_exit_reason(oom_killed: bool) -> Option<&'static str> {
    oom_killed.then_some("OOMKilled")
}

impl PodManager {
    /// The OCI `cgroupsPath` of a container: under the pod's `cgroup_parent` (as a
    /// systemd scope with that driver), or `/berth/<id>` when the pod has none.
    pub(crate) fn container_cgroups_path(&self, cgroup_parent: &str, id: &str) -> String {
        match (self.cfg.cgroup_driver, cgroup_parent.is_empty()) {
            (crate::config::CgroupDriver::Systemd, false) => {
                format!("{cgroup_parent}:berth:{id}")
            }
            (_, true) => format!("/berth/{id}"),
            (_, false) => format!("{}/{id}", cgroup_parent.trim_end_matches('/')),
        }
    }

    pub(crate) fn container_dir(&self, id: &str) -> PathBuf {
        self.cfg.root.join("containers").join(id)
    }
    pub(crate) fn bundle_dir(&self, id: &str) -> PathBuf {
        self.cfg.state.join("containers").join(id)
    }

    fn resolve_container(&self, id: &str, field: &str) -> Result<Option<ContainerRecord>, Status> {
        if id.is_empty() {
            return Err(invalid_field(field, "must not be empty"));
        }
        if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid_field(
                field,
                &format!("{id:?} is not a container id"),
            ));
        }
        self.store
            .resolve_container(id)
            .map_err(|e| invalid_field(field, &e))
    }

    pub(crate) fn must_container(&self, id: &str) -> Result<ContainerRecord, Status> {
        self.resolve_container(id, "container_id")?
            .ok_or_else(|| Status::not_found(format!("container {id:?} not found")))
    }

    /// Records an exit the shim reported (or berth inferred).
    pub(crate) fn on_container_exit(
        &self,
        id: &str,
        code: i32,
        at: i64,
        reason: Option<&str>,
        message: &str,
    ) {
        let _g = self.record_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut rec) = self.store.container(id) else {
            return;
        };
        if rec.state == ContainerState::Exited {
            return;
        }
        rec.state = ContainerState::Exited;
        rec.exit_code = code;
        rec.finished_at = if at > 0 { at } else { now_unix_nanos() };
        rec.reason = reason.unwrap_or(exit_reason(code)).to_string();
        rec.message = message.to_string();
        rec.pid = 0;
        if let Err(e) = self.store.put_container(&rec) {
            warn!(container = id, error = %e, "recording exit");
        }
        info!(container = id, code, reason = %rec.reason, "container exited");
        self.events
            .publish(crate::events::Topic::TaskExit, id, &rec.sandbox_id);
    }

    /// A pod's shim died: its containers run on, orphaned. Kill them through the runtime
    /// CLI directly (`delete --force`, as containerd does) and report them exited (137).
    pub(crate) async fn reap_orphaned_containers(&self, sandbox: &str) {
        let Some(pod) = self.store.sandbox(sandbox) else {
            return;
        };
        let handler = self
            .cfg
            .runtimes
            .get(&pod.runtime_handler)
            .cloned()
            .unwrap_or_default();
        let root = self.cfg.runtime_root(&pod.runtime_handler);
        let log = self.sandbox_state(sandbox).join("shim").join("runtime.log");
        let runc = berth_runtime::runc::Runc::new(&handler.path, &root, &log, handler.args.clone());
        for c in self.containers_of(sandbox) {
            if c.state == ContainerState::Exited {
                continue;
            }
            let (r, id) = (runc.clone(), c.id.clone());
            let killed = tokio::task::spawn_blocking(move || r.delete(&id, true)).await;
            if let Ok(Err(e)) = killed {
                if !e.is_not_found() {
                    warn!(container = %c.id, error = %e, "killing a container of a dead shim");
                }
            }
            self.on_container_exit(
                &c.id,
                137,
                0,
                Some("ShimDied"),
                "the pod's shim died; berth killed the container",
            );
        }
    }

    /// After a restart: containers that exited while berthd was down get their real exit
    /// from the shim; those whose shim is gone are marked exited (137).
    pub(crate) async fn recover_containers(&self) {
        for rec in self.store.containers() {
            if rec.state == ContainerState::Exited {
                continue;
            }
            match self.shim(&rec.sandbox_id).await {
                Some(c) => match c.state(&rec.id).await {
                    Ok(st) if st.status == pb::TaskStatus::Stopped as i32 => self
                        .on_container_exit(
                            &rec.id,
                            st.exit_status as i32,
                            st.exited_at_unix_nanos,
                            shim_exit_reason(st.oom_killed),
                            "",
                        ),
                    Ok(_) => {}
                    Err(e) => self.on_container_exit(
                        &rec.id,
                        137,
                        0,
                        Some("Unknown"),
                        &format!("the shim lost the task: {e}"),
                    ),
                },
                None => {
                    self.on_container_exit(&rec.id, 137, 0, Some("Unknown"), "the pod's shim died")
                }
            }
        }
    }

    /// Refuses what the pod's runtime handler cannot apply (closed by default: never a
    /// silently weaker container).
    fn check_handler_features(
        &self,
        config: &cri::ContainerConfig,
        handler: &str,
    ) -> Result<(), Status> {
        let features = self.handlers.get(handler);
        for (i, m) in config.mounts.iter().enumerate() {
            if m.recursive_read_only && !features.recursive_read_only_mounts {
                return Err(invalid_field(
                    &format!("config.mounts[{i}].recursive_read_only"),
                    &format!(
                        "runtime handler {handler:?} does not support recursive read-only mounts (it needs the \"rro\" mount option and Linux 5.12)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// CreateContainer, in its own task so that a caller going away cannot leave a
    /// half-created container behind.
    pub async fn create_container(
        self: &Arc<Self>,
        req: cri::CreateContainerRequest,
    ) -> Result<String, Status> {
        let me = self.clone();
        tokio::spawn(async move { me.create_container_detached(req).await })
            .await
            .map_err(|e| internal("CreateContainer task", e))?
    }

    async fn create_container_detached(
        self: &Arc<Self>,
        req: cri::CreateContainerRequest,
    ) -> Result<String, Status> {
        let config = req
            .config
            .clone()
            .ok_or_else(|| invalid_field("config", "is required"))?;
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| invalid_field("config.metadata", "is required"))?;
        if meta.name.is_empty() {
            return Err(invalid_field("config.metadata.name", "must not be empty"));
        }
        if let Some(r) = config.linux.as_ref().and_then(|l| l.resources.as_ref()) {
            crate::resources::validate(r, "config.linux.resources", &self.cgroups)?;
        }
        if !config.log_path.is_empty() {
            let p = Path::new(&config.log_path);
            if p.is_absolute()
                || p.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(invalid_field(
                    "config.log_path",
                    "must be a relative path without '..'",
                ));
            }
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.trim().to_string())
            .unwrap_or_default();
        if image_name.is_empty() {
            return Err(invalid_field("config.image.image", "an image is required"));
        }
        let pod = self
            .resolve(&req.pod_sandbox_id, "pod_sandbox_id")?
            .ok_or_else(|| {
                Status::not_found(format!("pod sandbox {:?} not found", req.pod_sandbox_id))
            })?;
        if pod.state != SandboxState::Ready {
            return Err(Status::failed_precondition(format!(
                "pod sandbox {} is not ready",
                pod.id
            )));
        }
        self.check_handler_features(&config, &pod.runtime_handler)?;
        let image = self
            .images
            .resolve(&image_name)
            .map_err(crate::status::from_image_error)?
            .ok_or_else(|| {
                Status::not_found(format!("image {image_name:?} not found; pull it first"))
            })?;
        let lock = self.lock_for(&pod.id);
        let _g = lock.lock().await;
        let key = format!("{}_{}", meta.name, meta.attempt);
        if let Some(holder) = self
            .store
            .containers()
            .into_iter()
            .find(|c| c.sandbox_id == pod.id && c.key == key)
        {
            return Err(Status::already_exists(format!(
                "container name {key:?} is already in use by container {}",
                holder.id
            )));
        }
        let id = new_id();
        let pod_config: cri::PodSandboxConfig =
            serde_json::from_value(pod.config.clone()).unwrap_or_default();
        let image_config = self
            .images
            .config_json(&image)
            .map_err(crate::status::from_image_error)?;
        let layers = self
            .images
            .layer_paths(&image)
            .map_err(crate::status::from_image_error)?;
        let (cdir, bundle) = (self.container_dir(&id), self.bundle_dir(&id));
        let rootfs = bundle.join("rootfs");

        // Filesystem: dirs, host paths kubelet expects to exist, the overlay rootfs.
        let host_dirs: Vec<PathBuf> = config
            .mounts
            .iter()
            .map(|m| PathBuf::from(&m.host_path))
            .filter(|p| p.is_absolute())
            .collect();
        let nvols = image_config["config"]["Volumes"]
            .as_object()
            .map_or(0, |v| v.len());
        let (cd, bd, rf) = (cdir.clone(), bundle.clone(), rootfs.clone());
        tokio::task::spawn_blocking(move || -> Result<(), Status> {
            let steps = || -> Result<(), Status> {
                for d in [cd.join("upper"), cd.join("work"), rf.clone()] {
                    std::fs::create_dir_all(&d)
                        .map_err(|e| internal(&format!("creating {}", d.display()), e))?;
                }
                for i in 0..nvols {
                    let v = cd.join("volumes").join(i.to_string());
                    std::fs::create_dir_all(&v).map_err(|e| internal("creating volume dir", e))?;
                }
                for h in &host_dirs {
                    if std::fs::symlink_metadata(h).is_err() {
                        std::fs::create_dir_all(h).map_err(|e| {
                            internal(&format!("creating host path {}", h.display()), e)
                        })?;
                    }
                }
                let lower: Vec<String> = layers
                    .iter()
                    .rev()
                    .map(|p| p.display().to_string())
                    .collect();
                let opts = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.join(":"),
                    cd.join("upper").display(),
                    cd.join("work").display()
                );
                nix::mount::mount(
                    Some("overlay"),
                    &rf,
                    Some("overlay"),
                    nix::mount::MsFlags::empty(),
                    Some(opts.as_str()),
                )
                .map_err(|e| internal("mounting the container rootfs", e))
            };
            steps().inspect_err(|_| {
                let _ = nix::mount::umount2(&rf, nix::mount::MntFlags::MNT_DETACH);
                let _ = std::fs::remove_dir_all(&cd);
                let _ = std::fs::remove_dir_all(&bd);
            })
        })
        .await
        .map_err(|e| internal("rootfs task", e))??;

        let result = async {
            let host_ipc = pod_config
                .linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref())
                .and_then(|s| s.namespace_options.as_ref())
                .is_some_and(|n| n.ipc == cri::NamespaceMode::Node as i32);
            let files = SandboxFiles {
                hostname: self.sandbox_root(&pod.id).join("hostname"),
                hosts: self.sandbox_root(&pod.id).join("hosts"),
                resolv_conf: self.sandbox_root(&pod.id).join("resolv.conf"),
                shm: (!host_ipc).then(|| self.shm_path(&pod.id)),
            };
            let cgroup_parent = pod_config
                .linux
                .as_ref()
                .map(|l| l.cgroup_parent.clone())
                .unwrap_or_default();
            let cgroups_path = self.container_cgroups_path(&cgroup_parent, &id);
            let min_oom = {
                let clamped = clamp_oom_score_adj(-1000);
                (clamped > -1000).then_some(clamped)
            };
            let spec = build_spec(&SpecInputs {
                id: &id,
                config: &config,
                pod: &pod_config,
                image_config: &image_config,
                rootfs: &rootfs,
                files: &files,
                netns: pod.netns.as_deref(),
                infra_pid: pod.infra_pid,
                cgroups_path: &cgroups_path,
                min_oom_score_adj: min_oom,
                volumes_dir: &cdir.join("volumes"),
            })
            .map_err(|e| invalid_field(&e.field, &e.message))?;
            let bytes =
                serde_json::to_vec_pretty(&spec).map_err(|e| internal("encoding spec", e))?;
            crate::layout::write_private(&bundle.join("config.json"), &bytes)
                .map_err(|e| internal("writing config.json", e))?;
            let log_path = if pod_config.log_directory.is_empty() || config.log_path.is_empty() {
                String::new()
            } else {
                Path::new(&pod_config.log_directory)
                    .join(&config.log_path)
                    .display()
                    .to_string()
            };
            let shim = self.shim(&pod.id).await.ok_or_else(|| {
                Status::failed_precondition(format!("the shim of pod {} is gone", pod.id))
            })?;
            let pid = shim
                .create(pb::CreateRequest {
                    id: id.clone(),
                    bundle: bundle.display().to_string(),
                    terminal: config.tty,
                    stdin: config.stdin,
                    stdin_once: config.stdin_once,
                    log_path: log_path.clone(),
                })
                .await
                .map_err(|e| match e {
                    ShimError::Remote {
                        code: berth_proto::shim::ErrorCode::InvalidArgument,
                        message,
                    } => Status::invalid_argument(message),
                    ShimError::Remote {
                        code: berth_proto::shim::ErrorCode::Unimplemented,
                        message,
                    } => Status::unimplemented(message),
                    other => Status::internal(format!("creating container: {other}")),
                })?;
            let stop_signal = image_config["config"]["StopSignal"]
                .as_str()
                .and_then(signal_number)
                .unwrap_or(15);
            let rec = ContainerRecord {
                id: id.clone(),
                sandbox_id: pod.id.clone(),
                key,
                state: ContainerState::Created,
                created_at: now_unix_nanos(),
                started_at: 0,
                finished_at: 0,
                exit_code: 0,
                reason: String::new(),
                message: String::new(),
                image: image_name.clone(),
                image_id: image.id.to_string(),
                image_ref: image
                    .repo_digests
                    .first()
                    .cloned()
                    .unwrap_or_else(|| image.id.to_string()),
                log_path,
                pid,
                stop_signal,
                config: serde_json::to_value(&config)
                    .map_err(|e| internal("encoding config", e))?,
                cgroups_path: cgroups_path.clone(),
            };
            crate::failpoint::failpoint("container-before-record");
            if let Err(e) = self.store.put_container(&rec) {
                let _ = shim.kill(&id, 9, false).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), shim.wait(&id)).await;
                let _ = shim.delete(&id).await;
                return Err(internal("recording container", e));
            }
            Ok::<(), Status>(())
        }
        .await;
        if let Err(e) = result {
            self.release_container_fs(&id).await;
            return Err(e);
        }
        info!(container = %id, sandbox = %pod.id, "container created");
        Ok(id)
    }

    /// Unmounts and removes a container's rootfs, writable layer and bundle.
    pub(crate) async fn release_container_fs(&self, id: &str) {
        let (cdir, bundle) = (self.container_dir(id), self.bundle_dir(id));
        let _ = tokio::task::spawn_blocking(move || {
            let _ = nix::mount::umount2(&bundle.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir_all(&bundle);
            let _ = std::fs::remove_dir_all(&cdir);
        })
        .await;
    }

    /// StartContainer.
    pub async fn start_container(&self, id: &str) -> Result<(), Status> {
        let mut rec = self.must_container(id)?;
        if rec.state != ContainerState::Created {
            return Err(Status::failed_precondition(format!(
                "container {} is not in the created state",
                rec.id
            )));
        }
        let shim = self
            .shim(&rec.sandbox_id)
            .await
            .ok_or_else(|| Status::failed_precondition("the pod's shim is gone"))?;
        // Taken before the start: a fast process may exit (and be recorded) before it returns.
        let started_at = now_unix_nanos();
        shim.start(&rec.id)
            .await
            .map_err(|e| Status::internal(format!("starting container: {e}")))?;
        rec.started_at = started_at;
        // Serialised with exit events: a fast exit must not be overwritten by Running.
        let _g = self.record_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cur) = self.store.container(&rec.id) {
            if cur.state == ContainerState::Exited {
                // It already ran to completion: keep the exit, add the start time.
                let mut done = cur;
                done.started_at = started_at.min(done.finished_at);
                return self
                    .store
                    .put_container(&done)
                    .map_err(|e| internal("recording start", e));
            }
        }
        rec.state = ContainerState::Running;
        self.store
            .put_container(&rec)
            .map_err(|e| internal("recording start", e))
    }

    /// StopContainer: the image's stop signal, SIGKILL after `timeout` seconds (0 = at once).
    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<(), Status> {
        let rec = self.must_container(id)?;
        self.stop_container_rec(&rec, timeout).await
    }

    pub(crate) async fn stop_container_rec(
        &self,
        rec: &ContainerRecord,
        timeout: i64,
    ) -> Result<(), Status> {
        if rec.state == ContainerState::Exited {
            return Ok(());
        }
        let Some(shim) = self.shim(&rec.sandbox_id).await else {
            self.reap_orphaned_containers(&rec.sandbox_id).await;
            return Ok(());
        };
        let exit = async {
            if timeout > 0 && rec.state == ContainerState::Running {
                let _ = shim.kill(&rec.id, rec.stop_signal, false).await;
                if let Ok(Ok(st)) =
                    tokio::time::timeout(Duration::from_secs(timeout as u64), shim.wait(&rec.id))
                        .await
                {
                    return Ok(st);
                }
            }
            shim.kill(&rec.id, 9, true).await.or_else(|e| match e {
                ShimError::Remote {
                    code: berth_proto::shim::ErrorCode::NotFound,
                    ..
                } => Ok(()),
                e => Err(e),
            })?;
            shim.wait(&rec.id).await
        }
        .await;
        match exit {
            Ok(st) => self.on_container_exit(
                &rec.id,
                st.exit_status as i32,
                st.exited_at_unix_nanos,
                shim_exit_reason(st.oom_killed),
                "",
            ),
            Err(ShimError::Remote {
                code: berth_proto::shim::ErrorCode::NotFound,
                ..
            }) => self.on_container_exit(
                &rec.id,
                137,
                0,
                Some("Unknown"),
                "the shim no longer knows the task",
            ),
            Err(e) => {
                return Err(Status::internal(format!(
                    "stopping container {}: {e}",
                    rec.id
                )));
            }
        }
        Ok(())
    }

    /// RemoveContainer: kills a running container, then frees everything. Idempotent.
    pub async fn remove_container(&self, id: &str) -> Result<(), Status> {
        let Some(rec) = self.resolve_container(id, "container_id")? else {
            return Ok(());
        };
        self.remove_container_rec(&rec).await
    }

    pub(crate) async fn remove_container_rec(&self, rec: &ContainerRecord) -> Result<(), Status> {
        self.stop_container_rec(rec, 0).await?;
        if let Some(shim) = self.shim(&rec.sandbox_id).await {
            match shim.delete(&rec.id).await {
                Ok(_)
                | Err(ShimError::Remote {
                    code: berth_proto::shim::ErrorCode::NotFound,
                    ..
                }) => {}
                Err(e) => return Err(Status::internal(format!("deleting task {}: {e}", rec.id))),
            }
        }
        self.release_container_fs(&rec.id).await;
        let _g = self.record_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.store
            .delete_container(&rec.id)
            .map_err(|e| internal("deleting record", e))?;
        info!(container = %rec.id, "container removed");
        Ok(())
    }

    fn cri_container_state(rec: &ContainerRecord) -> i32 {
        match rec.state {
            ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
            ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
            ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
        }
    }

    /// ContainerStatus.
    pub fn container_status(
        &self,
        id: &str,
        verbose: bool,
    ) -> Result<cri::ContainerStatusResponse, Status> {
        let rec = self.must_container(id)?;
        let config: cri::ContainerConfig =
            serde_json::from_value(rec.config.clone()).unwrap_or_default();
        let status = cri::ContainerStatus {
            id: rec.id.clone(),
            metadata: config.metadata.clone(),
            state: Self::cri_container_state(&rec),
            created_at: rec.created_at,
            started_at: rec.started_at,
            finished_at: rec.finished_at,
            exit_code: rec.exit_code,
            image: Some(cri::ImageSpec {
                image: rec.image.clone(),
                ..Default::default()
            }),
            image_ref: rec.image_ref.clone(),
            image_id: rec.image_id.clone(),
            reason: rec.reason.clone(),
            message: rec.message.clone(),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            mounts: config.mounts.clone(),
            log_path: rec.log_path.clone(),
            resources: config
                .linux
                .as_ref()
                .and_then(|l| l.resources.clone())
                .map(|r| cri::ContainerResources {
                    linux: Some(r),
                    ..Default::default()
                }),
            ..Default::default()
        };
        let mut info = HashMap::new();
        if verbose {
            let spec: serde_json::Value =
                std::fs::read(self.bundle_dir(&rec.id).join("config.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
            let v = serde_json::json!({"pid": rec.pid, "sandboxID": rec.sandbox_id, "runtimeSpec": spec, "config": rec.config});
            info.insert("info".to_string(), v.to_string());
        }
        Ok(cri::ContainerStatusResponse {
            status: Some(status),
            info,
        })
    }

    /// ListContainers with its filters.
    pub fn list_containers(&self, filter: Option<cri::ContainerFilter>) -> Vec<cri::Container> {
        let f = filter.unwrap_or_default();
        self.store
            .containers()
            .into_iter()
            .filter(|r| f.id.is_empty() || r.id.starts_with(&f.id))
            .filter(|r| f.pod_sandbox_id.is_empty() || r.sandbox_id.starts_with(&f.pod_sandbox_id))
            .filter(|r| {
                f.state
                    .as_ref()
                    .is_none_or(|s| s.state == Self::cri_container_state(r))
            })
            .filter_map(|r| {
                let config: cri::ContainerConfig =
                    serde_json::from_value(r.config.clone()).unwrap_or_default();
                f.label_selector
                    .iter()
                    .all(|(k, v)| config.labels.get(k) == Some(v))
                    .then(|| cri::Container {
                        id: r.id.clone(),
                        pod_sandbox_id: r.sandbox_id.clone(),
                        metadata: config.metadata.clone(),
                        image: Some(cri::ImageSpec {
                            image: r.image.clone(),
                            ..Default::default()
                        }),
                        image_ref: r.image_ref.clone(),
                        image_id: r.image_id.clone(),
                        state: Self::cri_container_state(&r),
                        created_at: r.created_at,
                        labels: config.labels.clone(),
                        annotations: config.annotations.clone(),
                    })
            })
            .collect()
    }

    /// ExecSync: runs `cmd` in the container with the container's user, env, cwd and
    /// capabilities; kills it when `timeout` seconds pass (0 = no limit).
    /// An exec's OCI process: the container's own (user, env, cwd, capabilities)
    /// with new args.
    pub(crate) fn exec_process_json(
        &self,
        id: &str,
        cmd: &[String],
        tty: bool,
    ) -> Result<Vec<u8>, Status> {
        let spec: serde_json::Value = std::fs::read(self.bundle_dir(id).join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                Status::internal(format!("container {id} has no readable runtime spec"))
            })?;
        let mut process = spec["process"].clone();
        process["args"] = serde_json::json!(cmd);
        process["terminal"] = tty.into();
        serde_json::to_vec(&process).map_err(|e| internal("encoding process", e))
    }

    pub async fn exec_sync(
        &self,
        req: cri::ExecSyncRequest,
    ) -> Result<cri::ExecSyncResponse, Status> {
        let rec = self.must_container(&req.container_id)?;
        if req.cmd.is_empty() {
            return Err(invalid_field("cmd", "must not be empty"));
        }
        if req.timeout < 0 {
            return Err(invalid_field("timeout", "must not be negative"));
        }
        if rec.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                rec.id
            )));
        }
        let process_json = self.exec_process_json(&rec.id, &req.cmd, false)?;
        let shim = self
            .shim(&rec.sandbox_id)
            .await
            .ok_or_else(|| Status::failed_precondition("the pod's shim is gone"))?;
        let exec_id = new_id()[..16].to_string();
        shim.exec(pb::ExecRequest {
            id: rec.id.clone(),
            exec_id: exec_id.clone(),
            process_json,
            capture_limit: MAX_EXEC_OUTPUT as u32,
            ..Default::default()
        })
        .await
        .map_err(|e| match e {
            ShimError::Remote {
                code: berth_proto::shim::ErrorCode::FailedPrecondition,
                message,
            } => Status::failed_precondition(message),
            other => Status::internal(format!("exec in {}: {other}", rec.id)),
        })?;
        let waited = if req.timeout > 0 {
            tokio::time::timeout(
                Duration::from_secs(req.timeout as u64),
                shim.wait_exec(&rec.id, &exec_id),
            )
            .await
            .ok()
        } else {
            Some(shim.wait_exec(&rec.id, &exec_id).await)
        };
        let result = match waited {
            Some(r) => r,
            None => {
                let _ = shim.kill_exec(&rec.id, &exec_id, 9).await;
                let _ = shim.wait_exec(&rec.id, &exec_id).await;
                let _ = shim.delete_exec(&rec.id, &exec_id).await;
                return Err(Status::deadline_exceeded(format!(
                    "command {:?} in container {} timed out after {}s and was killed",
                    req.cmd, rec.id, req.timeout
                )));
            }
        };
        let _ = shim.delete_exec(&rec.id, &exec_id).await;
        let st =
            result.map_err(|e| Status::internal(format!("waiting for exec in {}: {e}", rec.id)))?;
        if st.truncated {
            return Err(Status::resource_exhausted(format!(
                "command {:?} wrote more than {} MiB on stdout or stderr (ExecSync keeps at most that much)",
                req.cmd,
                MAX_EXEC_OUTPUT >> 20
            )));
        }
        Ok(cri::ExecSyncResponse {
            stdout: st.stdout,
            stderr: st.stderr,
            exit_code: st.exit_status as i32,
        })
    }

    /// ReopenContainerLog.
    pub async fn reopen_container_log(&self, id: &str) -> Result<(), Status> {
        let rec = self.must_container(id)?;
        if rec.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!(
                "container {} is not running",
                rec.id
            )));
        }
        let shim = self
            .shim(&rec.sandbox_id)
            .await
            .ok_or_else(|| Status::failed_precondition("the pod's shim is gone"))?;
        shim.reopen_log(&rec.id)
            .await
            .map_err(|e| Status::internal(format!("reopening log: {e}")))
    }

    /// A container made from this image (by image id), if any.
    pub fn container_using_image(&self, image_id: &str) -> Option<String> {
        self.store
            .containers()
            .into_iter()
            .find(|c| c.image_id == image_id)
            .map(|c| c.id)
    }

    /// The containers of a pod.
    pub(crate) fn containers_of(&self, sandbox: &str) -> Vec<ContainerRecord> {
        self.store
            .containers()
            .into_iter()
            .filter(|c| c.sandbox_id == sandbox)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_by_name_and_number() {
        assert_eq!(signal_number("SIGQUIT"), Some(3));
        assert_eq!(signal_number("term"), Some(15));
        assert_eq!(signal_number("9"), Some(9));
        assert_eq!(signal_number("SIGNOPE"), None);
        assert_eq!(signal_number("99"), None);
    }
}
