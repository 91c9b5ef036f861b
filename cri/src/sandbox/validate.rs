//! RunPodSandbox's request checks, and what they yield: a `PodSpec`.

use std::path::{Path, PathBuf};

use berth_runtime::podcgroup;
use k8s_cri::v1 as cri;

use crate::config::{CgroupDriver, Config};
use crate::error::{CriError, Result};
use crate::oci::{SecurityModules, check_selinux, check_userns};

/// Validated parts of a RunPodSandbox request.
pub(super) struct PodSpec {
    /// `name_namespace_uid_attempt`, unique among pods.
    pub key: String,
    pub handler: String,
    pub host_net: bool,
    pub host_pid: bool,
    pub host_ipc: bool,
    pub hostname: String,
    pub sysctls: Vec<(String, String)>,
    /// The pod cgroup under each hierarchy's root, which berth makes (cgroupfs driver,
    /// when the pod has a `cgroup_parent`).
    pub cgroup_rel: Option<PathBuf>,
    /// The slice of the pod's scopes (systemd driver).
    pub systemd_slice: Option<String>,
    /// SELinux options that ask for something (only on SELinux hosts).
    pub selinux: Option<cri::SeLinuxOption>,
    /// The pod's SELinux process label, once it has an id (SELinux hosts).
    pub selinux_label: Option<String>,
}

/// A sysctl a pod may set: only namespaced ones (runc's rule).
fn namespaced_sysctl(key: &str, host_net: bool, host_ipc: bool) -> std::result::Result<(), String> {
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

/// The metadata, which must name the pod fully.
fn metadata(config: &cri::PodSandboxConfig) -> Result<&cri::PodSandboxMetadata> {
    let meta = config
        .metadata
        .as_ref()
        .ok_or_else(|| CriError::invalid("config.metadata", "is required"))?;
    for (field, v) in [
        ("name", &meta.name),
        ("namespace", &meta.namespace),
        ("uid", &meta.uid),
    ] {
        if v.is_empty() {
            return Err(CriError::invalid(
                &format!("config.metadata.{field}"),
                "must not be empty",
            ));
        }
    }
    Ok(meta)
}

/// The handler the pod runs with, which must be configured.
fn handler(cfg: &Config, requested: &str) -> Result<String> {
    let handler = if requested.is_empty() {
        cfg.default_runtime.clone()
    } else {
        requested.to_string()
    };
    if !cfg.runtimes.contains_key(&handler) {
        let known: Vec<&str> = cfg.runtimes.keys().map(String::as_str).collect();
        return Err(CriError::invalid(
            "runtime_handler",
            format!(
                "unknown handler {handler:?} (configured: {})",
                known.join(", ")
            ),
        ));
    }
    Ok(handler)
}

/// The pod's sysctls, each namespaced and safe to write.
fn sysctls(
    linux: &cri::LinuxPodSandboxConfig,
    host_net: bool,
    host_ipc: bool,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (k, v) in &linux.sysctls {
        let field = format!("config.linux.sysctls[{k:?}]");
        namespaced_sysctl(k, host_net, host_ipc).map_err(|why| CriError::invalid(&field, why))?;
        if k.contains('/') || k.contains("..") || v.contains('\n') {
            return Err(CriError::invalid(&field, "invalid key or value"));
        }
        out.push((k.clone(), v.clone()));
    }
    Ok(out)
}

/// Confinement the pod asks for that berth cannot give: an error, not a weaker pod.
/// The SELinux options that ask for something.
fn check_pod_confinement(
    linux: &cri::LinuxPodSandboxConfig,
    modules: &SecurityModules,
) -> Result<Option<cri::SeLinuxOption>> {
    let sc = linux.security_context.as_ref();
    let field = "config.linux.security_context";
    check_userns(
        sc.and_then(|s| s.namespace_options.as_ref()),
        &format!("{field}.namespace_options"),
    )?;
    Ok(check_selinux(
        sc.and_then(|s| s.selinux_options.as_ref()),
        &format!("{field}.selinux_options"),
        modules.selinux.as_ref(),
    )?)
}

/// Checks a RunPodSandbox request.
pub(super) fn pod_spec(
    cfg: &Config,
    modules: &SecurityModules,
    req: &cri::RunPodSandboxRequest,
) -> Result<PodSpec> {
    let config = req
        .config
        .as_ref()
        .ok_or_else(|| CriError::invalid("config", "is required"))?;
    crate::limits::pod_config(config)?;
    let meta = metadata(config)?;
    let handler = handler(cfg, &req.runtime_handler)?;
    let linux = config.linux.clone().unwrap_or_default();
    let selinux = check_pod_confinement(&linux, modules)?;
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
        return Err(CriError::invalid(
            "config.hostname",
            format!("{hostname:?} is not a valid host name"),
        ));
    }
    if !config.log_directory.is_empty() && !Path::new(&config.log_directory).is_absolute() {
        return Err(CriError::invalid(
            "config.log_directory",
            "must be an absolute path",
        ));
    }
    let sysctls = sysctls(&linux, host_net, host_ipc)?;
    let systemd = cfg.cgroup_driver == CgroupDriver::Systemd;
    let cgroup_rel = if linux.cgroup_parent.is_empty() {
        None
    } else {
        Some(
            podcgroup::relative_path(&linux.cgroup_parent, systemd)
                .map_err(|why| CriError::invalid("config.linux.cgroup_parent", why))?,
        )
    };
    // Under systemd, systemd makes the slice's cgroups when a scope starts in it.
    let cgroup_rel = cgroup_rel.filter(|_| !systemd);
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
        systemd_slice: crate::podscope::pod_slice(cfg, &linux.cgroup_parent),
        selinux,
        selinux_label: None,
    })
}
