//! The files every container of a pod sees: hostname, hosts and resolv.conf.

use std::path::Path;

use k8s_cri::v1 as cri;

use super::validate::PodSpec;
use crate::error::{CriError, Result};

/// The hosts file of a pod with its own network namespace.
const POD_HOSTS: &[u8] = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n";

/// resolv.conf from the pod's DNS config, else the node's.
fn resolv_conf(config: &cri::PodSandboxConfig) -> Vec<u8> {
    let Some(dns) = config
        .dns_config
        .as_ref()
        .filter(|d| !(d.servers.is_empty() && d.searches.is_empty() && d.options.is_empty()))
    else {
        return std::fs::read("/etc/resolv.conf").unwrap_or_default();
    };
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

/// Writes hostname, hosts (the node's for a host-network pod) and resolv.conf into `dir`.
pub(super) fn write_pod_files(
    dir: &Path,
    spec: &PodSpec,
    config: &cri::PodSandboxConfig,
) -> Result<()> {
    let hosts = if spec.host_net {
        std::fs::read("/etc/hosts").unwrap_or_default()
    } else {
        POD_HOSTS.to_vec()
    };
    for (name, content) in [
        ("hostname", format!("{}\n", spec.hostname).into_bytes()),
        ("hosts", hosts),
        ("resolv.conf", resolv_conf(config)),
    ] {
        std::fs::write(dir.join(name), content)
            .map_err(|e| CriError::internal(&format!("writing {name}"), e))?;
    }
    Ok(())
}
