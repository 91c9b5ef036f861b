//! The CRI -> OCI translation: a container's runtime spec (`config.json`), typed with
//! `oci-spec`, built from its CRI config, its pod's config and its image config with
//! Kubernetes' rules (those containerd's CRI plugin applies): command replaces
//! Entrypoint, args replace Cmd, env merged, working dir and user from the image unless
//! overridden, default capabilities, masked and read-only paths, the pod's namespaces,
//! hosts/resolv.conf/hostname and /dev/shm.
//!
//! `oci-spec`'s defaults are runc's example config (a hostname, mounts, rlimits, a
//! TERM env...): every struct here is built with every field set on purpose, and the
//! golden tests (`cri/tests/spec_golden.rs`) pin the JSON.

mod host;
mod linux;
mod mounts;
mod process;
mod seccomp;
mod security;
mod selinux;
mod user;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{Root, Spec};

pub use host::{
    HostFacts, HostMount, KERNEL_CAPABILITIES, capability_names_of, host_devices, parse_mountinfo,
};
pub use linux::linux_resources;
pub use process::{DEFAULT_CAPABILITIES, DEFAULT_PATH, exec_process, process_args, process_env};
pub use seccomp::{SeccompChoice, SeccompHost};
pub use security::{DEFAULT_APPARMOR_PROFILE, SecurityModules, check_userns};
pub use selinux::{
    SelinuxDefaults, SelinuxLabels, check_options as check_selinux, container_labels, pod_label,
    pod_level, pod_mount_label, relabel, relabel_allowed,
};
pub use user::{ProcessIds, process_ids};

/// The OCI runtime spec version berth writes.
pub const OCI_VERSION: &str = "1.0.2";

/// A container config that cannot become a spec; the message names the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The CRI field at fault.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

pub(crate) fn err(field: &str, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

/// Where the pod's shared files are.
pub struct SandboxFiles {
    /// The pod's hostname file.
    pub hostname: PathBuf,
    /// The pod's hosts file.
    pub hosts: PathBuf,
    /// The pod's resolv.conf.
    pub resolv_conf: PathBuf,
    /// The pod's /dev/shm, unless it uses the host IPC namespace.
    pub shm: Option<PathBuf>,
}

/// Everything a spec is built from.
pub struct SpecInputs<'a> {
    /// The container's id.
    pub id: &'a str,
    /// Its CRI config.
    pub config: &'a cri::ContainerConfig,
    /// Its pod's CRI config.
    pub pod: &'a cri::PodSandboxConfig,
    /// The image config.
    pub image: &'a ImageConfiguration,
    /// The mounted root filesystem (used to resolve user names).
    pub rootfs: &'a Path,
    /// The pod's files.
    pub files: &'a SandboxFiles,
    /// The pod's pinned netns, or None for host network.
    pub netns: Option<&'a Path>,
    /// The pod's infra pid, whose IPC/UTS/PID namespaces the container joins.
    pub infra_pid: u32,
    /// The pid of the running container whose PID namespace it joins (`TARGET`).
    pub pid_target: Option<u32>,
    /// The OCI `cgroupsPath`.
    pub cgroups_path: &'a str,
    /// Lowest oom_score_adj this host allows (berthd's own without CAP_SYS_RESOURCE).
    pub min_oom_score_adj: Option<i32>,
    /// Host directory for the image's declared volumes (`<dir>/<n>`).
    pub volumes_dir: &'a Path,
    /// This host: capabilities, seccomp, security modules, and (when the container
    /// needs them) its devices and mounts.
    pub host: &'a HostFacts,
    /// The pod's SELinux process label, on SELinux hosts.
    pub pod_selinux_label: Option<&'a str>,
}

impl SpecInputs<'_> {
    /// The container's security context, if it has one.
    fn security(&self) -> Option<&cri::LinuxContainerSecurityContext> {
        self.config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
    }

    fn privileged(&self) -> bool {
        self.security().is_some_and(|s| s.privileged)
    }

    fn readonly_rootfs(&self) -> bool {
        self.security().is_some_and(|s| s.readonly_rootfs)
    }

    fn pod_privileged(&self) -> bool {
        self.pod
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .is_some_and(|s| s.privileged)
    }
}

/// Whether a container needs the host's devices or mounts in its [`HostFacts`]:
/// privileged ones get every device; propagating bind mounts check their host mount.
pub fn needs_host_devices(config: &cri::ContainerConfig) -> bool {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .is_some_and(|s| s.privileged)
}

/// See [`needs_host_devices`].
pub fn needs_host_mounts(config: &cri::ContainerConfig) -> bool {
    let private = cri::MountPropagation::PropagationPrivate as i32;
    config.mounts.iter().any(|m| m.propagation != private)
}

/// Confinement the container asks for that this pod or host cannot give.
fn check_confinement(inp: &SpecInputs<'_>) -> Result<(), SpecError> {
    const SC: &str = "config.linux.security_context";
    if inp.privileged() && !inp.pod_privileged() {
        return Err(err(
            &format!("{SC}.privileged"),
            "no privileged container allowed in sandbox (the pod is not privileged)",
        ));
    }
    let sc = inp.security();
    check_userns(
        sc.and_then(|s| s.namespace_options.as_ref()),
        &format!("{SC}.namespace_options"),
    )
}

/// The image's declared volumes, sorted (their order numbers the volume dirs).
pub fn image_volumes(image: &ImageConfiguration) -> Vec<String> {
    let mut v = image
        .config()
        .as_ref()
        .and_then(|c| c.volumes().clone())
        .unwrap_or_default();
    v.sort();
    v.dedup();
    v
}

/// Builds the OCI runtime spec of a container.
pub fn build_spec(inp: &SpecInputs<'_>) -> Result<Spec, SpecError> {
    check_confinement(inp)?;
    let labels = selinux::container_labels(
        inp.security().and_then(|s| s.selinux_options.as_ref()),
        "config.linux.security_context.selinux_options",
        inp.host.modules.selinux.as_ref(),
        inp.pod_selinux_label,
    )?;
    let caps = process::capability_names(inp.security(), inp.host)?;
    let mut process = process::container_process(inp, &caps)?;
    process.set_selinux_label(labels.as_ref().map(|l| l.process.clone()));
    let (mounts, rootfs_propagation) = mounts::container_mounts(inp)?;
    let choice = seccomp::choose(inp.security())?;
    let seccomp = seccomp::linux_seccomp(&choice, inp.privileged(), &caps, &inp.host.seccomp)?;
    let mut linux = linux::container_linux(inp, rootfs_propagation, seccomp)?;
    linux.set_mount_label(labels.map(|l| l.mount));
    let mut root = Root::default();
    root.set_path(PathBuf::from("rootfs"))
        .set_readonly(Some(inp.readonly_rootfs()));
    let mut spec = Spec::default();
    spec.set_version(OCI_VERSION.into())
        .set_root(Some(root))
        .set_mounts(Some(mounts))
        .set_process(Some(process))
        .set_hostname(None)
        .set_domainname(None)
        .set_hooks(None)
        .set_annotations(Some(annotations(inp.config)))
        .set_linux(Some(linux))
        .set_solaris(None)
        .set_windows(None)
        .set_vm(None)
        .set_zos(None)
        .set_uid_mappings(None)
        .set_gid_mappings(None);
    Ok(spec)
}

/// The container's annotations plus the two CRI ones runtimes look for.
fn annotations(c: &cri::ContainerConfig) -> HashMap<String, String> {
    let mut a = c.annotations.clone();
    a.insert(
        "io.kubernetes.cri.container-type".into(),
        "container".into(),
    );
    a.insert(
        "io.kubernetes.cri.container-name".into(),
        c.metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
    );
    a
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A host for unit tests: this machine's shape (no CAP_SYS_RESOURCE, seccomp, no
    /// AppArmor or SELinux), nothing read from it.
    pub(crate) fn host_facts() -> HostFacts {
        HostFacts {
            capabilities: KERNEL_CAPABILITIES
                .iter()
                .filter(|c| **c != "CAP_SYS_RESOURCE")
                .map(|c| c.to_string())
                .collect(),
            seccomp: SeccompHost {
                supported: true,
                kernel: (6, 1),
                arch: "amd64".into(),
            },
            modules: SecurityModules::default(),
            devices: Vec::new(),
            mounts: Vec::new(),
        }
    }
}
