//! Request limits: sizes and counts no real pod reaches, checked before anything is
//! made. A broken or hostile client gets `InvalidArgument` naming the field, instead of
//! work (and memory) in proportion to its request, or a failure deep in CNI or runc.
//!
//! The limits are Kubernetes' own where it has one, the kernel's where exec would fail
//! anyway, and otherwise far above what kubelet sends. README "Request limits" lists them.

use std::collections::HashMap;
use std::net::IpAddr;

use k8s_cri::v1 as cri;

use crate::error::{CriError, Result};

/// A pod's name: a DNS subdomain in Kubernetes.
pub const MAX_POD_NAME: usize = 253;
/// A namespace: a DNS label in Kubernetes.
pub const MAX_NAMESPACE: usize = 63;
/// A pod's uid (Kubernetes sends a 36-character UUID).
pub const MAX_UID: usize = 128;
/// A container's name (a DNS label in Kubernetes; conformance suites use longer ones).
pub const MAX_CONTAINER_NAME: usize = 253;
/// Entries in a labels or annotations map.
pub const MAX_MAP_ENTRIES: usize = 4096;
/// Bytes of keys and values in a labels map.
pub const MAX_LABEL_BYTES: usize = 256 << 10;
/// Bytes of keys and values in an annotations map: Kubernetes' 256 KiB for the user's,
/// and as much again for what kubelet adds.
pub const MAX_ANNOTATION_BYTES: usize = 512 << 10;
/// One argument or `KEY=value` with its NUL: the kernel's MAX_ARG_STRLEN (exec fails
/// above it).
pub const MAX_ARG_BYTES: usize = 128 << 10;
/// Entries in command + args, and in envs: above Kubernetes' tested 5000 Services per
/// namespace with service links (7 variables each). runc's setup of a process grows
/// with the square of its variables (65,000 took 13.7 s under load), so a bound keeps
/// that finite.
pub const MAX_ARGV: usize = 65536;
pub const MAX_ENVS: usize = 65536;
/// Bytes of command, args and env together, counted as the kernel counts them (each
/// string with its NUL and its pointer): ARG_MAX under the usual 8 MiB stack limit
/// (exec fails above it with "argument list too long").
pub const MAX_EXEC_BYTES: usize = 2 << 20;
/// What one argument or variable costs exec beyond its bytes: its NUL and pointer.
const EXEC_OVERHEAD: usize = 1 + 8;
/// Mounts, devices and CDI devices of a container.
pub const MAX_MOUNTS: usize = 1024;
pub const MAX_DEVICES: usize = 1024;
/// A path (PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// A pod's port mappings, sysctls and DNS entries.
pub const MAX_PORT_MAPPINGS: usize = 1024;
pub const MAX_SYSCTLS: usize = 1024;
pub const MAX_DNS_ENTRIES: usize = 64;
/// Other short strings: capability names, mount options, seccomp/AppArmor profiles.
pub const MAX_SHORT_LIST: usize = 256;
pub const MAX_SHORT_TEXT: usize = 4096;
/// Supplemental groups (the kernel's NGROUPS_MAX).
pub const MAX_GROUPS: usize = 65536;

/// `value` is at most `max` bytes.
pub fn text(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(CriError::invalid(
            field,
            format!("is {} bytes long; at most {max} are allowed", value.len()),
        ));
    }
    Ok(())
}

/// `n` entries are at most `max`.
pub fn count(field: &str, n: usize, max: usize) -> Result<()> {
    if n > max {
        return Err(CriError::invalid(
            field,
            format!("has {n} entries; at most {max} are allowed"),
        ));
    }
    Ok(())
}

/// A labels or annotations map: entries and total bytes.
fn map(field: &str, m: &HashMap<String, String>, max_bytes: usize) -> Result<()> {
    count(field, m.len(), MAX_MAP_ENTRIES)?;
    let bytes: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > max_bytes {
        return Err(CriError::invalid(
            field,
            format!("holds {bytes} bytes of keys and values; at most {max_bytes} are allowed"),
        ));
    }
    Ok(())
}

/// Each string in a list, and the list's length.
fn list(field: &str, items: &[String], max_items: usize, max_each: usize) -> Result<()> {
    count(field, items.len(), max_items)?;
    for (i, s) in items.iter().enumerate() {
        text(&format!("{field}[{i}]"), s, max_each)?;
    }
    Ok(())
}

/// What exec would refuse: each argument and `KEY=value` with its NUL at most
/// MAX_ARG_BYTES, all of them together at most MAX_EXEC_BYTES.
pub fn argv(field: &str, args: &[String]) -> Result<()> {
    list(field, args, MAX_ARGV, MAX_ARG_BYTES - 1)?;
    let total: usize = args.iter().map(|a| a.len() + EXEC_OVERHEAD).sum();
    exec_bytes(field, total)
}

fn exec_bytes(field: &str, total: usize) -> Result<()> {
    if total > MAX_EXEC_BYTES {
        return Err(CriError::invalid(
            field,
            format!(
                "command, arguments and environment take {total} bytes; exec takes at most {MAX_EXEC_BYTES}"
            ),
        ));
    }
    Ok(())
}

/// RunPodSandbox's config.
pub fn pod_config(c: &cri::PodSandboxConfig) -> Result<()> {
    if let Some(m) = &c.metadata {
        text("config.metadata.name", &m.name, MAX_POD_NAME)?;
        text("config.metadata.namespace", &m.namespace, MAX_NAMESPACE)?;
        text("config.metadata.uid", &m.uid, MAX_UID)?;
    }
    text("config.hostname", &c.hostname, MAX_POD_NAME)?;
    text("config.log_directory", &c.log_directory, MAX_PATH)?;
    map("config.labels", &c.labels, MAX_LABEL_BYTES)?;
    map("config.annotations", &c.annotations, MAX_ANNOTATION_BYTES)?;
    if let Some(d) = &c.dns_config {
        list(
            "config.dns_config.servers",
            &d.servers,
            MAX_DNS_ENTRIES,
            256,
        )?;
        list(
            "config.dns_config.searches",
            &d.searches,
            MAX_DNS_ENTRIES,
            256,
        )?;
        list(
            "config.dns_config.options",
            &d.options,
            MAX_DNS_ENTRIES,
            256,
        )?;
    }
    port_mappings(&c.port_mappings)?;
    if let Some(l) = &c.linux {
        text("config.linux.cgroup_parent", &l.cgroup_parent, MAX_PATH)?;
        count("config.linux.sysctls", l.sysctls.len(), MAX_SYSCTLS)?;
        for (k, v) in &l.sysctls {
            text("config.linux.sysctls", k, MAX_SHORT_TEXT)?;
            text(&format!("config.linux.sysctls[{k:?}]"), v, MAX_SHORT_TEXT)?;
        }
        if let Some(sc) = &l.security_context {
            let field = "config.linux.security_context";
            count(
                &format!("{field}.supplemental_groups"),
                sc.supplemental_groups.len(),
                MAX_GROUPS,
            )?;
            profile(&format!("{field}.seccomp"), sc.seccomp.as_ref())?;
        }
    }
    Ok(())
}

/// Port mappings: ports in range (a host port of 0 publishes nothing), a protocol CRI
/// defines, a host IP that is an address.
pub fn port_mappings(maps: &[cri::PortMapping]) -> Result<()> {
    count("config.port_mappings", maps.len(), MAX_PORT_MAPPINGS)?;
    for (i, m) in maps.iter().enumerate() {
        let field = |f: &str| format!("config.port_mappings[{i}].{f}");
        if !(1..=65535).contains(&m.container_port) {
            return Err(CriError::invalid(
                &field("container_port"),
                format!("{} is not a port (1 to 65535)", m.container_port),
            ));
        }
        if !(0..=65535).contains(&m.host_port) {
            return Err(CriError::invalid(
                &field("host_port"),
                format!("{} is not a port (1 to 65535, or 0 for none)", m.host_port),
            ));
        }
        if cri::Protocol::try_from(m.protocol).is_err() {
            return Err(CriError::invalid(
                &field("protocol"),
                format!("{} is not TCP (0), UDP (1) or SCTP (2)", m.protocol),
            ));
        }
        if !m.host_ip.is_empty() && m.host_ip.parse::<IpAddr>().is_err() {
            return Err(CriError::invalid(
                &field("host_ip"),
                format!("{} is not an IP address", crate::error::shown(&m.host_ip)),
            ));
        }
    }
    Ok(())
}

fn profile(field: &str, p: Option<&cri::SecurityProfile>) -> Result<()> {
    match p {
        Some(p) => text(
            &format!("{field}.localhost_ref"),
            &p.localhost_ref,
            MAX_PATH,
        ),
        None => Ok(()),
    }
}

/// CreateContainer's config.
pub fn container_config(c: &cri::ContainerConfig) -> Result<()> {
    if let Some(m) = &c.metadata {
        text("config.metadata.name", &m.name, MAX_CONTAINER_NAME)?;
    }
    if let Some(i) = &c.image {
        text("config.image.image", &i.image, MAX_SHORT_TEXT)?;
    }
    list("config.command", &c.command, MAX_ARGV, MAX_ARG_BYTES - 1)?;
    list("config.args", &c.args, MAX_ARGV, MAX_ARG_BYTES - 1)?;
    count(
        "config.command and config.args",
        c.command.len() + c.args.len(),
        MAX_ARGV,
    )?;
    envs(c)?;
    text("config.working_dir", &c.working_dir, MAX_PATH)?;
    text("config.log_path", &c.log_path, MAX_PATH)?;
    map("config.labels", &c.labels, MAX_LABEL_BYTES)?;
    map("config.annotations", &c.annotations, MAX_ANNOTATION_BYTES)?;
    mounts(&c.mounts)?;
    count("config.devices", c.devices.len(), MAX_DEVICES)?;
    for (i, d) in c.devices.iter().enumerate() {
        text(
            &format!("config.devices[{i}].host_path"),
            &d.host_path,
            MAX_PATH,
        )?;
        text(
            &format!("config.devices[{i}].container_path"),
            &d.container_path,
            MAX_PATH,
        )?;
        text(
            &format!("config.devices[{i}].permissions"),
            &d.permissions,
            3,
        )?;
    }
    count("config.cdi_devices", c.cdi_devices.len(), MAX_DEVICES)?;
    for (i, d) in c.cdi_devices.iter().enumerate() {
        text(
            &format!("config.cdi_devices[{i}].name"),
            &d.name,
            MAX_SHORT_TEXT,
        )?;
    }
    if let Some(sc) = c.linux.as_ref().and_then(|l| l.security_context.as_ref()) {
        container_security(sc)?;
    }
    Ok(())
}

/// Env entries: each `KEY=value` and all of them with the argv within exec's limits.
fn envs(c: &cri::ContainerConfig) -> Result<()> {
    count("config.envs", c.envs.len(), MAX_ENVS)?;
    let mut total: usize = c
        .command
        .iter()
        .chain(&c.args)
        .map(|a| a.len() + EXEC_OVERHEAD)
        .sum();
    for (i, kv) in c.envs.iter().enumerate() {
        let bytes = kv.key.len() + 1 + kv.value.len();
        if bytes + 1 > MAX_ARG_BYTES {
            return Err(CriError::invalid(
                &format!("config.envs[{i}]"),
                format!(
                    "{}=... is {bytes} bytes long; exec takes at most {MAX_ARG_BYTES}",
                    crate::error::shown(&kv.key)
                ),
            ));
        }
        total += bytes + EXEC_OVERHEAD;
    }
    exec_bytes("config.envs", total)
}

fn mounts(mounts: &[cri::Mount]) -> Result<()> {
    count("config.mounts", mounts.len(), MAX_MOUNTS)?;
    for (i, m) in mounts.iter().enumerate() {
        text(
            &format!("config.mounts[{i}].host_path"),
            &m.host_path,
            MAX_PATH,
        )?;
        text(
            &format!("config.mounts[{i}].container_path"),
            &m.container_path,
            MAX_PATH,
        )?;
        if let Some(img) = &m.image {
            text(
                &format!("config.mounts[{i}].image.image"),
                &img.image,
                MAX_SHORT_TEXT,
            )?;
        }
    }
    Ok(())
}

// The deprecated profile fields still come from older kubelets.
#[allow(deprecated)]
fn container_security(sc: &cri::LinuxContainerSecurityContext) -> Result<()> {
    let field = "config.linux.security_context";
    if let Some(caps) = &sc.capabilities {
        for (name, l) in [
            ("add_capabilities", &caps.add_capabilities),
            ("drop_capabilities", &caps.drop_capabilities),
            ("add_ambient_capabilities", &caps.add_ambient_capabilities),
        ] {
            list(
                &format!("{field}.capabilities.{name}"),
                l,
                MAX_SHORT_LIST,
                64,
            )?;
        }
    }
    count(
        &format!("{field}.supplemental_groups"),
        sc.supplemental_groups.len(),
        MAX_GROUPS,
    )?;
    list(
        &format!("{field}.masked_paths"),
        &sc.masked_paths,
        MAX_MOUNTS,
        MAX_PATH,
    )?;
    list(
        &format!("{field}.readonly_paths"),
        &sc.readonly_paths,
        MAX_MOUNTS,
        MAX_PATH,
    )?;
    text(
        &format!("{field}.run_as_username"),
        &sc.run_as_username,
        256,
    )?;
    profile(&format!("{field}.seccomp"), sc.seccomp.as_ref())?;
    profile(&format!("{field}.apparmor"), sc.apparmor.as_ref())?;
    text(
        &format!("{field}.apparmor_profile"),
        &sc.apparmor_profile,
        MAX_PATH,
    )?;
    text(
        &format!("{field}.seccomp_profile_path"),
        &sc.seccomp_profile_path,
        MAX_PATH,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                namespace: "ns".into(),
                uid: "u".into(),
                attempt: 0,
            }),
            ..Default::default()
        }
    }

    fn message(r: Result<()>) -> String {
        r.expect_err("refused").to_string()
    }

    #[test]
    fn names_are_bounded_as_kubernetes_bounds_them() {
        assert!(pod_config(&pod(&"a".repeat(253))).is_ok());
        let m = message(pod_config(&pod(&"a".repeat(254))));
        assert!(
            m.contains("config.metadata.name") && m.contains("254 bytes"),
            "{m}"
        );
        let mut p = pod("x");
        p.metadata.as_mut().unwrap().namespace = "n".repeat(64);
        assert!(message(pod_config(&p)).contains("config.metadata.namespace"));
    }

    #[test]
    fn port_mappings_must_be_ports_protocols_and_addresses() {
        let ok = cri::PortMapping {
            protocol: 1,
            container_port: 80,
            host_port: 0,
            host_ip: "::1".into(),
        };
        assert!(port_mappings(std::slice::from_ref(&ok)).is_ok());
        for (bad, field) in [
            (
                cri::PortMapping {
                    host_port: 70000,
                    ..ok.clone()
                },
                "[0].host_port",
            ),
            (
                cri::PortMapping {
                    host_port: -1,
                    ..ok.clone()
                },
                "[0].host_port",
            ),
            (
                cri::PortMapping {
                    container_port: 0,
                    ..ok.clone()
                },
                "[0].container_port",
            ),
            (
                cri::PortMapping {
                    protocol: 99,
                    ..ok.clone()
                },
                "[0].protocol",
            ),
            (
                cri::PortMapping {
                    host_ip: "999.1.1.1".into(),
                    ..ok.clone()
                },
                "[0].host_ip",
            ),
        ] {
            let m = message(port_mappings(&[bad]));
            assert!(m.contains(field), "{m}");
        }
    }

    #[test]
    fn env_within_what_exec_takes() {
        let env = |n: usize, len: usize| cri::ContainerConfig {
            envs: (0..n)
                .map(|i| cri::KeyValue {
                    key: format!("K{i}"),
                    value: "v".repeat(len),
                })
                .collect(),
            ..Default::default()
        };
        assert!(container_config(&env(10_000, 100)).is_ok());
        assert!(message(container_config(&env(MAX_ENVS + 1, 1))).contains("config.envs"));
        assert!(message(container_config(&env(1, MAX_ARG_BYTES))).contains("config.envs[0]"));
        // "K0=" and the value with its NUL: exactly MAX_ARG_STRLEN is what exec takes.
        assert!(container_config(&env(1, MAX_ARG_BYTES - 4)).is_ok());
        assert!(container_config(&env(1, MAX_ARG_BYTES - 3)).is_err());
        let m = message(container_config(&env(10_000, 300)));
        assert!(m.contains("exec takes at most"), "{m}");
    }

    #[test]
    fn maps_are_bounded_in_entries_and_bytes() {
        let mut c = cri::ContainerConfig::default();
        c.labels = (0..=MAX_MAP_ENTRIES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(message(container_config(&c)).contains("config.labels"));
        c.labels.clear();
        c.annotations
            .insert("a".into(), "x".repeat(MAX_ANNOTATION_BYTES));
        assert!(message(container_config(&c)).contains("config.annotations"));
    }
}
