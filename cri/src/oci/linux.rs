//! The container's `linux` section: namespaces, devices and their cgroup rules,
//! resources, sysctls, masked and read-only paths.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

use k8s_cri::v1 as cri;
use oci_spec::runtime::{
    Linux, LinuxCpu, LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType, LinuxHugepageLimit,
    LinuxMemory, LinuxNamespace, LinuxNamespaceType, LinuxResources, LinuxSeccomp,
};

use super::{SpecError, SpecInputs, err};

/// Paths hidden from unprivileged containers (containerd's defaults).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
    "/proc/scsi",
];

/// Paths read-only in unprivileged containers (containerd's defaults).
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn namespace(typ: LinuxNamespaceType, path: Option<PathBuf>) -> LinuxNamespace {
    let mut ns = LinuxNamespace::default();
    ns.set_typ(typ).set_path(path);
    ns
}

/// A new mount namespace; the pod's network, IPC and UTS (unless the host's); PID per
/// the container's option: the pod's, its own, or the host's.
fn namespaces(inp: &SpecInputs<'_>) -> Vec<LinuxNamespace> {
    let pod_ns = inp
        .pod
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    let own = inp
        .security()
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or(pod_ns.clone());
    let node = cri::NamespaceMode::Node as i32;
    let infra = |t: &str| Some(PathBuf::from(format!("/proc/{}/ns/{t}", inp.infra_pid)));
    let mut out = vec![namespace(LinuxNamespaceType::Mount, None)];
    if let Some(n) = inp.netns {
        out.push(namespace(
            LinuxNamespaceType::Network,
            Some(n.to_path_buf()),
        ));
    }
    if pod_ns.ipc != node {
        out.push(namespace(LinuxNamespaceType::Ipc, infra("ipc")));
    }
    if pod_ns.network != node {
        out.push(namespace(LinuxNamespaceType::Uts, infra("uts")));
    }
    match own.pid {
        p if p == node => {}
        p if p == cri::NamespaceMode::Pod as i32 => {
            out.push(namespace(LinuxNamespaceType::Pid, infra("pid")))
        }
        p if p == cri::NamespaceMode::Target as i32 => {
            let path = inp
                .pid_target
                .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/pid")));
            out.push(namespace(LinuxNamespaceType::Pid, path))
        }
        _ => out.push(namespace(LinuxNamespaceType::Pid, None)),
    }
    out
}

fn device_rule(
    allow: bool,
    typ: Option<LinuxDeviceType>,
    major_minor: Option<(i64, i64)>,
    access: &str,
) -> LinuxDeviceCgroup {
    let mut r = LinuxDeviceCgroup::default();
    r.set_allow(allow)
        .set_typ(typ)
        .set_major(major_minor.map(|m| m.0))
        .set_minor(major_minor.map(|m| m.1))
        .set_access(Some(access.to_string()));
    r
}

/// The CRI devices as OCI devices, each with its cgroup allow rule.
fn devices(
    c: &cri::ContainerConfig,
) -> Result<(Vec<LinuxDevice>, Vec<LinuxDeviceCgroup>), SpecError> {
    let (mut devs, mut rules) = (Vec::new(), Vec::new());
    for (i, d) in c.devices.iter().enumerate() {
        let field = format!("config.devices[{i}]");
        let meta = std::fs::metadata(&d.host_path).map_err(|e| {
            err(
                &format!("{field}.host_path"),
                format!("{}: {e}", d.host_path),
            )
        })?;
        let typ = if meta.file_type().is_char_device() {
            LinuxDeviceType::C
        } else if meta.file_type().is_block_device() {
            LinuxDeviceType::B
        } else {
            return Err(err(
                &format!("{field}.host_path"),
                format!("{} is not a device", d.host_path),
            ));
        };
        let major = nix::sys::stat::major(meta.rdev()) as i64;
        let minor = nix::sys::stat::minor(meta.rdev()) as i64;
        let perms = if d.permissions.is_empty() {
            "rwm"
        } else {
            d.permissions.as_str()
        };
        if !perms.chars().all(|ch| matches!(ch, 'r' | 'w' | 'm')) {
            return Err(err(
                &format!("{field}.permissions"),
                format!("{perms:?} is not a subset of \"rwm\""),
            ));
        }
        let mut dev = LinuxDevice::default();
        dev.set_path(PathBuf::from(&d.container_path))
            .set_typ(typ)
            .set_major(major)
            .set_minor(minor)
            .set_file_mode(Some(meta.mode() & 0o777))
            .set_uid(Some(0))
            .set_gid(Some(0));
        devs.push(dev);
        rules.push(device_rule(true, Some(typ), Some((major, minor)), perms));
    }
    Ok((devs, rules))
}

/// The OCI `linux.resources` (cpu, memory, hugepages, unified) for CRI resources; the
/// same object `runc update --resources` takes.
pub fn linux_resources(r: &cri::LinuxContainerResources) -> LinuxResources {
    let mut cpu = LinuxCpu::default();
    cpu.set_shares((r.cpu_shares > 0).then_some(r.cpu_shares as u64))
        .set_quota((r.cpu_quota != 0).then_some(r.cpu_quota))
        .set_period((r.cpu_period > 0).then_some(r.cpu_period as u64))
        .set_cpus((!r.cpuset_cpus.is_empty()).then(|| r.cpuset_cpus.clone()))
        .set_mems((!r.cpuset_mems.is_empty()).then(|| r.cpuset_mems.clone()));
    let mut memory = LinuxMemory::default();
    memory
        .set_limit((r.memory_limit_in_bytes > 0).then_some(r.memory_limit_in_bytes))
        .set_swap((r.memory_swap_limit_in_bytes > 0).then_some(r.memory_swap_limit_in_bytes));
    let hugepages: Vec<LinuxHugepageLimit> = r
        .hugepage_limits
        .iter()
        .map(|h| {
            let mut l = LinuxHugepageLimit::default();
            l.set_page_size(h.page_size.clone())
                .set_limit(h.limit as i64);
            l
        })
        .collect();
    let mut res = LinuxResources::default();
    res.set_devices(None)
        .set_cpu((cpu != LinuxCpu::default()).then_some(cpu))
        .set_memory((memory != LinuxMemory::default()).then_some(memory))
        .set_pids(None)
        .set_block_io(None)
        .set_hugepage_limits((!hugepages.is_empty()).then_some(hugepages))
        .set_network(None)
        .set_rdma(None)
        .set_unified((!r.unified.is_empty()).then(|| r.unified.clone()));
    res
}

/// Masked and read-only paths: the defaults or the config's, none when privileged.
fn hidden_paths(inp: &SpecInputs<'_>) -> (Option<Vec<String>>, Option<Vec<String>>) {
    if inp.privileged() {
        return (None, None);
    }
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (mut masked, mut ro) = (owned(MASKED_PATHS), owned(READONLY_PATHS));
    if let Some(s) = inp.security() {
        if !s.masked_paths.is_empty() {
            masked = s.masked_paths.clone();
        }
        if !s.readonly_paths.is_empty() {
            ro = s.readonly_paths.clone();
        }
    }
    (Some(masked), Some(ro))
}

/// The whole `linux` section.
pub(super) fn container_linux(
    inp: &SpecInputs<'_>,
    rootfs_propagation: &str,
    seccomp: Option<LinuxSeccomp>,
) -> Result<Linux, SpecError> {
    let cri_resources = inp
        .config
        .linux
        .as_ref()
        .and_then(|l| l.resources.clone())
        .unwrap_or_default();
    let mut resources = linux_resources(&cri_resources);
    let (mut devices, mut rules) = devices(inp.config)?;
    if inp.privileged() {
        // Every host device, and the device cgroup allows all (containerd's
        // WithHostDevices and WithAllDevicesAllowed); a CRI device wins over the
        // host's at the same path.
        let asked: Vec<PathBuf> = devices.iter().map(|d| d.path().clone()).collect();
        devices.extend(
            inp.host
                .devices
                .iter()
                .filter(|d| !asked.contains(d.path()))
                .cloned(),
        );
        rules = vec![device_rule(true, None, None, "rwm")];
    } else {
        rules.insert(0, device_rule(false, None, None, "rwm"));
    }
    resources.set_devices(Some(rules));
    let sysctl: HashMap<String, String> = inp
        .pod
        .linux
        .as_ref()
        .map(|l| l.sysctls.clone())
        .unwrap_or_default();
    let (masked, readonly) = hidden_paths(inp);
    let mut linux = Linux::default();
    linux
        .set_net_devices(None)
        .set_uid_mappings(None)
        .set_gid_mappings(None)
        .set_sysctl(Some(sysctl))
        .set_resources(Some(resources))
        .set_cgroups_path(Some(PathBuf::from(inp.cgroups_path)))
        .set_namespaces(Some(namespaces(inp)))
        .set_devices(Some(devices))
        .set_seccomp(seccomp)
        .set_rootfs_propagation(Some(rootfs_propagation.to_string()))
        .set_masked_paths(masked)
        .set_readonly_paths(readonly)
        .set_mount_label(None)
        .set_intel_rdt(None)
        .set_memory_policy(None)
        .set_personality(None)
        .set_time_offsets(None);
    Ok(linux)
}
