//! `CniManager`: attaches pods to the configured network and detaches them, per the
//! CNI spec's rules for config lists: plugins in order for ADD and CHECK (each gets
//! the previous result), in reverse for DEL (each gets the cached ADD result),
//! `runtimeConfig` only with the capabilities a plugin declares.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tracing::{debug, warn};

use crate::cache::Attachment;
use crate::conf::{CniConfList, ConfError, find_plugin, version_tuple};
use crate::exec::{Invocation, PluginError, run_plugin};
use crate::quantity::parse_bandwidth;
use crate::result::pod_ips;

/// The interface name inside the pod, as kubelet's runtimes use.
pub const POD_IFNAME: &str = "eth0";
/// Pod annotation listing static IPs for plugins with the `ips` capability.
pub const IPS_ANNOTATION: &str = "berth.dev/ips";
/// Kubernetes' bandwidth annotations (values are quantities in bits/s).
pub const INGRESS_ANNOTATION: &str = "kubernetes.io/ingress-bandwidth";
/// See [`INGRESS_ANNOTATION`].
pub const EGRESS_ANNOTATION: &str = "kubernetes.io/egress-bandwidth";

/// Where configs and plugins are, and how long a plugin may run.
#[derive(Clone, Debug)]
pub struct CniSettings {
    /// Config dir (the first file by name is used).
    pub conf_dir: PathBuf,
    /// Plugin dirs, searched in order.
    pub bin_dirs: Vec<PathBuf>,
    /// Per plugin call.
    pub timeout: Duration,
    /// Whether a pod's `berth.dev/ips` annotation may ask the plugins (those with the
    /// `ips` capability) for addresses. Off by default: a pod author must not choose
    /// its IPs on a shared network unless the operator says so.
    pub allow_ips_annotation: bool,
}

/// A hostPort mapping for the `portMappings` capability.
#[derive(Clone, Debug, PartialEq)]
pub struct PortMapping {
    /// Port on the node.
    pub host_port: u16,
    /// Port in the pod.
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// Node address to bind, or empty for all.
    pub host_ip: String,
}

/// What a pod brings to its network attachment.
#[derive(Clone, Debug, Default)]
pub struct PodNetwork {
    /// Sandbox id (`CNI_CONTAINERID`).
    pub id: String,
    /// Pinned network namespace.
    pub netns: PathBuf,
    /// Pod name, namespace and uid (`K8S_POD_*` args).
    pub name: String,
    /// See `name`.
    pub namespace: String,
    /// See `name`.
    pub uid: String,
    /// hostPort mappings.
    pub port_mappings: Vec<PortMapping>,
    /// DNS servers, searches, options for the `dns` capability.
    pub dns: Option<(Vec<String>, Vec<String>, Vec<String>)>,
    /// Pod annotations (bandwidth, static IPs).
    pub annotations: BTreeMap<String, String>,
}

/// A failed network operation.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No usable config, or a plugin binary is missing.
    #[error(transparent)]
    Conf(#[from] ConfError),
    /// A plugin failed; the message is the plugin's.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// A request value that cannot be passed to plugins.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    /// The attachment cache could not be read or written.
    #[error("CNI cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Attaches and detaches pods.
pub struct CniManager {
    settings: CniSettings,
    pod_cidrs: Mutex<Vec<String>>,
}

/// `K=V` values for CNI_ARGS cannot hold the separators.
fn arg_value(field: &str, v: &str) -> Result<String, NetError> {
    if v.contains([';', '=']) || v.chars().any(char::is_control) {
        return Err(NetError::InvalidArgument {
            field: field.into(),
            message: format!(
                "{v:?} cannot be passed to CNI plugins (contains ';', '=' or a control character)"
            ),
        });
    }
    Ok(v.to_string())
}

fn cache_err(path: &Path) -> impl FnOnce(std::io::Error) -> NetError + '_ {
    move |source| NetError::Cache {
        path: path.to_path_buf(),
        source,
    }
}

impl CniManager {
    /// A manager over `settings`; the config is read afresh on every use, so changes
    /// apply without a restart.
    pub fn new(settings: CniSettings) -> CniManager {
        CniManager {
            settings,
            pod_cidrs: Mutex::new(Vec::new()),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &CniSettings {
        &self.settings
    }

    /// Sets the node's pod CIDRs (from UpdateRuntimeConfig; comma-separated), passed to
    /// plugins with the `ipRanges` capability.
    pub fn set_pod_cidr(&self, cidrs: &str) -> Result<(), NetError> {
        let mut out = Vec::new();
        for c in cidrs.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let ok = c.split_once('/').is_some_and(|(ip, len)| {
                ip.parse::<IpAddr>().is_ok_and(|ip| {
                    len.parse::<u8>()
                        .is_ok_and(|l| l <= if ip.is_ipv4() { 32 } else { 128 })
                })
            });
            if !ok {
                return Err(NetError::InvalidArgument {
                    field: "runtime_config.network_config.pod_cidr".into(),
                    message: format!("{c:?} is not an address/prefix-length CIDR"),
                });
            }
            out.push(c.to_string());
        }
        *self.pod_cidrs.lock().unwrap_or_else(|p| p.into_inner()) = out;
        Ok(())
    }

    /// The current config list, with every plugin binary present.
    pub fn load(&self) -> Result<CniConfList, ConfError> {
        let c = CniConfList::load_dir(&self.settings.conf_dir)?;
        c.check_binaries(&self.settings.bin_dirs)?;
        Ok(c)
    }

    /// Whether the network is ready: a valid config whose plugins are present, and
    /// (for configs of CNI 1.1.0 and later) whose plugins all answer STATUS.
    pub async fn status(&self) -> Result<(), NetError> {
        let list = self.load()?;
        if version_tuple(&list.cni_version) >= (1, 1, 0) {
            let empty = json!({});
            for p in &list.plugins {
                let conf = plugin_conf(&list, p, &empty, None);
                self.invoke(&list, "STATUS", "", "", "", "", &conf).await?;
            }
        }
        Ok(())
    }

    fn path_var(&self) -> String {
        self.settings
            .bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    #[allow(clippy::too_many_arguments)]
    async fn invoke(
        &self,
        list: &CniConfList,
        command: &str,
        container_id: &str,
        netns: &str,
        ifname: &str,
        args: &str,
        conf: &Value,
    ) -> Result<Value, NetError> {
        let t = conf["type"].as_str().unwrap_or_default();
        let binary =
            find_plugin(t, &self.settings.bin_dirs).ok_or_else(|| ConfError::MissingPlugin {
                network: list.name.clone(),
                plugin: t.to_string(),
                dirs: self.path_var(),
            })?;
        debug!(plugin = t, command, container_id, "CNI call");
        let inv = Invocation {
            command,
            container_id,
            netns,
            ifname,
            args,
            path: &self.path_var(),
            config: conf,
        };
        Ok(run_plugin(&binary, &inv, self.settings.timeout).await?)
    }

    /// runtimeConfig values by capability.
    fn capability_args(&self, pod: &PodNetwork) -> Result<Value, NetError> {
        let mut caps = Map::new();
        let maps: Vec<Value> = pod
            .port_mappings
            .iter()
            .filter(|m| m.host_port > 0)
            .map(|m| {
                let mut v = json!({
                    "hostPort": m.host_port,
                    "containerPort": m.container_port,
                    "protocol": m.protocol,
                });
                if !m.host_ip.is_empty() {
                    v["hostIP"] = m.host_ip.clone().into();
                }
                v
            })
            .collect();
        if !maps.is_empty() {
            caps.insert("portMappings".into(), Value::Array(maps));
        }
        let mut bw = Map::new();
        for (key, rate, burst) in [
            (INGRESS_ANNOTATION, "ingressRate", "ingressBurst"),
            (EGRESS_ANNOTATION, "egressRate", "egressBurst"),
        ] {
            if let Some(v) = pod.annotations.get(key) {
                let r = parse_bandwidth(v).map_err(|message| NetError::InvalidArgument {
                    field: format!("config.annotations[{key:?}]"),
                    message,
                })?;
                bw.insert(rate.into(), r.into());
                // As containerd: no burst limit of its own.
                bw.insert(burst.into(), u64::from(u32::MAX).into());
            }
        }
        if !bw.is_empty() {
            caps.insert("bandwidth".into(), Value::Object(bw));
        }
        if let Some((servers, searches, options)) = &pod.dns {
            caps.insert(
                "dns".into(),
                json!({"servers": servers, "searches": searches, "options": options}),
            );
        }
        if let Some(ips) = pod.annotations.get(IPS_ANNOTATION) {
            if !self.settings.allow_ips_annotation {
                return Err(NetError::InvalidArgument {
                    field: format!("config.annotations[{IPS_ANNOTATION:?}]"),
                    message: "pods may not choose their IPs on this node \
                              (cni.allow_ips_annotation is false)"
                        .into(),
                });
            }
            let list: Vec<String> = ips
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            for ip in &list {
                if ip
                    .split('/')
                    .next()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                    .is_none()
                {
                    return Err(NetError::InvalidArgument {
                        field: format!("config.annotations[{IPS_ANNOTATION:?}]"),
                        message: format!("{ip:?} is not an IP address"),
                    });
                }
            }
            caps.insert("ips".into(), json!(list));
        }
        let cidrs = self
            .pod_cidrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !cidrs.is_empty() {
            let ranges: Vec<Value> = cidrs.iter().map(|c| json!([{"subnet": c}])).collect();
            caps.insert("ipRanges".into(), Value::Array(ranges));
        }
        Ok(Value::Object(caps))
    }

    /// ADD: attaches the pod. The attachment is cached before the first plugin runs, so
    /// a crash part way can still be undone with DEL; a failed ADD is undone at once.
    pub async fn setup(&self, pod: &PodNetwork, cache: &Path) -> Result<Vec<IpAddr>, NetError> {
        let list = self.load()?;
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            arg_value("config.metadata.namespace", &pod.namespace)?,
            arg_value("config.metadata.name", &pod.name)?,
            arg_value("pod_sandbox_id", &pod.id)?,
            arg_value("config.metadata.uid", &pod.uid)?,
        );
        let mut att = Attachment {
            conf_list: list.to_json(),
            container_id: pod.id.clone(),
            netns: pod.netns.display().to_string(),
            ifname: POD_IFNAME.into(),
            args,
            capability_args: self.capability_args(pod)?,
            result: None,
        };
        att.save(cache).map_err(cache_err(cache))?;
        let mut prev: Option<Value> = None;
        for p in &list.plugins {
            let conf = plugin_conf(&list, p, &att.capability_args, prev.as_ref());
            match self
                .invoke(
                    &list,
                    "ADD",
                    &att.container_id,
                    &att.netns,
                    &att.ifname,
                    &att.args,
                    &conf,
                )
                .await
            {
                Ok(r) => prev = Some(r).filter(|r| !r.is_null()).or(prev),
                Err(e) => {
                    att.result = prev;
                    if let Err(de) = self.del(&list, &att).await {
                        warn!(sandbox = %pod.id, error = %de, "undoing a failed CNI ADD");
                        return Err(e);
                    }
                    let _ = std::fs::remove_file(cache);
                    return Err(e);
                }
            }
        }
        att.result = prev;
        att.save(cache).map_err(cache_err(cache))?;
        Ok(att.result.as_ref().map(pod_ips).unwrap_or_default())
    }

    async fn del(&self, list: &CniConfList, att: &Attachment) -> Result<(), NetError> {
        let with_prev = version_tuple(&list.cni_version) >= (0, 4, 0);
        // A netns that is gone is not passed: plugins then only release what they hold
        // outside it (IPAM leases, host-side rules), as the spec allows.
        let netns = if Path::new(&att.netns).exists() {
            att.netns.as_str()
        } else {
            ""
        };
        for p in list.plugins.iter().rev() {
            let prev = if with_prev { att.result.as_ref() } else { None };
            let conf = plugin_conf(list, p, &att.capability_args, prev);
            self.invoke(
                list,
                "DEL",
                &att.container_id,
                netns,
                &att.ifname,
                &att.args,
                &conf,
            )
            .await?;
        }
        Ok(())
    }

    fn cached(cache: &Path) -> Result<Option<(CniConfList, Attachment)>, NetError> {
        let Some(att) = Attachment::load(cache).map_err(cache_err(cache))? else {
            return Ok(None);
        };
        let bytes = serde_json::to_vec(&att.conf_list).unwrap_or_default();
        let list = CniConfList::parse(&bytes, true, cache)?;
        Ok(Some((list, att)))
    }

    /// DEL with the cached config and result; idempotent (no cache, nothing to do). The
    /// cache is removed only once every plugin succeeded.
    pub async fn teardown(&self, cache: &Path) -> Result<(), NetError> {
        let Some((list, att)) = Self::cached(cache)? else {
            return Ok(());
        };
        self.del(&list, &att).await?;
        match std::fs::remove_file(cache) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(cache_err(cache)(e)),
            _ => Ok(()),
        }
    }

    /// CHECK (CNI 0.4.0 and later, unless the list disables it): the attachment is as
    /// ADD left it.
    pub async fn check(&self, cache: &Path) -> Result<(), NetError> {
        let Some((list, att)) = Self::cached(cache)? else {
            return Ok(());
        };
        if list.disable_check || version_tuple(&list.cni_version) < (0, 4, 0) {
            return Ok(());
        }
        for p in &list.plugins {
            let conf = plugin_conf(&list, p, &att.capability_args, att.result.as_ref());
            self.invoke(
                &list,
                "CHECK",
                &att.container_id,
                &att.netns,
                &att.ifname,
                &att.args,
                &conf,
            )
            .await?;
        }
        Ok(())
    }

    /// GC (CNI 1.1.0 and later, unless disabled): plugins free whatever belongs to no
    /// attachment in `valid` (`(container id, ifname)` pairs).
    pub async fn gc(&self, valid: &[(String, String)]) -> Result<(), NetError> {
        let list = self.load()?;
        if list.disable_gc || version_tuple(&list.cni_version) < (1, 1, 0) {
            return Ok(());
        }
        let attachments: Vec<Value> = valid
            .iter()
            .map(|(id, ifname)| json!({"containerID": id, "ifname": ifname}))
            .collect();
        for p in &list.plugins {
            let mut conf = plugin_conf(&list, p, &json!({}), None);
            conf["cni.dev/valid-attachments"] = Value::Array(attachments.clone());
            self.invoke(&list, "GC", "", "", "", "", &conf).await?;
        }
        Ok(())
    }
}

/// One plugin's config as the spec has the runtime build it from a list.
fn plugin_conf(list: &CniConfList, plugin: &Value, caps: &Value, prev: Option<&Value>) -> Value {
    let mut conf = plugin.clone();
    conf["name"] = list.name.clone().into();
    conf["cniVersion"] = list.cni_version.clone().into();
    let mut rc = Map::new();
    if let Some(declared) = plugin["capabilities"].as_object() {
        for (cap, on) in declared {
            if on.as_bool() == Some(true) {
                if let Some(v) = caps.get(cap) {
                    rc.insert(cap.clone(), v.clone());
                }
            }
        }
    }
    if !rc.is_empty() {
        conf["runtimeConfig"] = Value::Object(rc);
    }
    if let Some(p) = prev {
        conf["prevResult"] = p.clone();
    }
    conf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_conf_gets_only_declared_capabilities() {
        let list = CniConfList::parse(
            br#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true,"bandwidth":false}}]}"#,
            true,
            Path::new("x"),
        )
        .unwrap();
        let caps = json!({"portMappings":[{"hostPort":80}],"bandwidth":{"ingressRate":1},"dns":{}});
        let c0 = plugin_conf(&list, &list.plugins[0], &caps, None);
        assert!(c0.get("runtimeConfig").is_none());
        assert_eq!(
            (c0["name"].as_str(), c0["cniVersion"].as_str()),
            (Some("n"), Some("1.0.0"))
        );
        let prev = json!({"ips":[]});
        let c1 = plugin_conf(&list, &list.plugins[1], &caps, Some(&prev));
        assert_eq!(
            c1["runtimeConfig"],
            json!({"portMappings":[{"hostPort":80}]})
        );
        assert_eq!(c1["prevResult"], prev);
    }

    #[test]
    fn capability_args_from_the_pod() {
        let m = CniManager::new(CniSettings {
            conf_dir: "/nonexistent".into(),
            bin_dirs: vec![],
            timeout: Duration::from_secs(1),
            allow_ips_annotation: false,
        });
        m.set_pod_cidr("10.1.0.0/24, fd00::/64").unwrap();
        assert!(m.set_pod_cidr("10.1.0.0").is_err());
        let mut pod = PodNetwork {
            port_mappings: vec![
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_ip: String::new(),
                },
                PortMapping {
                    host_port: 0,
                    container_port: 81,
                    protocol: "tcp".into(),
                    host_ip: String::new(),
                },
            ],
            dns: Some((
                vec!["10.96.0.10".into()],
                vec!["svc".into()],
                vec!["ndots:5".into()],
            )),
            ..Default::default()
        };
        pod.annotations
            .insert(INGRESS_ANNOTATION.into(), "10M".into());
        let c = m.capability_args(&pod).unwrap();
        assert_eq!(
            c["portMappings"],
            json!([{"hostPort":8080,"containerPort":80,"protocol":"tcp"}])
        );
        assert_eq!(c["bandwidth"]["ingressRate"], 10_000_000);
        assert!(c["bandwidth"].get("egressRate").is_none());
        assert_eq!(c["dns"]["servers"], json!(["10.96.0.10"]));
        assert_eq!(
            c["ipRanges"],
            json!([[{"subnet":"10.1.0.0/24"}],[{"subnet":"fd00::/64"}]])
        );
        pod.annotations
            .insert(EGRESS_ANNOTATION.into(), "lots".into());
        let e = m.capability_args(&pod).unwrap_err().to_string();
        assert!(e.contains(EGRESS_ANNOTATION), "{e}");
    }

    #[test]
    fn the_ips_annotation_only_where_the_operator_allows_it() {
        let settings = |allow| CniSettings {
            conf_dir: "/nonexistent".into(),
            bin_dirs: vec![],
            timeout: Duration::from_secs(1),
            allow_ips_annotation: allow,
        };
        let mut pod = PodNetwork::default();
        pod.annotations
            .insert(IPS_ANNOTATION.into(), "10.1.0.9, fd00::9/64".into());
        let e = CniManager::new(settings(false))
            .capability_args(&pod)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(IPS_ANNOTATION) && e.contains("cni.allow_ips_annotation"),
            "{e}"
        );
        let allowed = CniManager::new(settings(true));
        let c = allowed.capability_args(&pod).unwrap();
        assert_eq!(c["ips"], json!(["10.1.0.9", "fd00::9/64"]));
        pod.annotations
            .insert(IPS_ANNOTATION.into(), "10.1.0".into());
        assert!(allowed.capability_args(&pod).is_err());
    }
}
