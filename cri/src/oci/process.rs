//! The container's process: argv, env, working dir, user and groups, capabilities.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use k8s_cri::v1 as cri;
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{Capability, LinuxCapabilities, Process, User};

use super::host::{HostFacts, KERNEL_CAPABILITIES};
use super::security::apparmor_profile;
use super::user::process_ids;
use super::{SpecError, SpecInputs, err};

/// Capabilities every container gets unless dropped (containerd's default set).
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// PATH for images that set none (containerd's default spec does the same).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A field of the image's `config` (empty when the image has none).
fn image_list(
    image: &ImageConfiguration,
    get: impl Fn(&oci_spec::image::Config) -> Option<Vec<String>>,
) -> Vec<String> {
    image.config().as_ref().and_then(get).unwrap_or_default()
}

fn image_text(
    image: &ImageConfiguration,
    get: impl Fn(&oci_spec::image::Config) -> Option<String>,
) -> String {
    image.config().as_ref().and_then(get).unwrap_or_default()
}

/// The argv Kubernetes runs: command replaces Entrypoint, args replace Cmd.
pub fn process_args(
    config: &cri::ContainerConfig,
    image: &ImageConfiguration,
) -> Result<Vec<String>, SpecError> {
    let entrypoint = image_list(image, |c| c.entrypoint().clone());
    let cmd = image_list(image, |c| c.cmd().clone());
    let argv: Vec<String> = if !config.command.is_empty() {
        config
            .command
            .iter()
            .chain(config.args.iter())
            .cloned()
            .collect()
    } else if !config.args.is_empty() {
        entrypoint
            .into_iter()
            .chain(config.args.iter().cloned())
            .collect()
    } else {
        entrypoint.into_iter().chain(cmd).collect()
    };
    if argv.is_empty() {
        return Err(err(
            "config.command",
            "no command given and the image has no Entrypoint or Cmd",
        ));
    }
    Ok(argv)
}

/// Image Env, then the config's envs (a later key wins), in order of first appearance;
/// the default PATH first when neither sets one.
pub fn process_env(config: &cri::ContainerConfig, image: &ImageConfiguration) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut vals: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |k: String, v: String| {
        if !vals.contains_key(&k) {
            order.push(k.clone());
        }
        vals.insert(k, v);
    };
    for e in image_list(image, |c| c.env().clone()) {
        let (k, v) = e.split_once('=').unwrap_or((&e, ""));
        put(k.to_string(), v.to_string());
    }
    for kv in &config.envs {
        put(kv.key.clone(), kv.value.clone());
    }
    if !vals.contains_key("PATH") {
        order.insert(0, "PATH".to_string());
        vals.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    }
    order
        .into_iter()
        .map(|k| format!("{k}={}", vals[&k]))
        .collect()
}

/// The capability names the process gets, in containerd's order: every capability
/// berthd holds when privileged (add/drop do not apply, as containerd's
/// `WithPrivileged`); else the defaults, then `ALL` in the adds (every one berthd
/// holds), then `ALL` in the drops (none), then the named adds, then the named drops
/// (so `drop: [ALL], add: [NET_BIND_SERVICE]` keeps that one). A capability berthd
/// does not hold cannot be given: asking for one is an error naming it, not a runc
/// failure at start.
pub(super) fn capability_names(
    sc: Option<&cri::LinuxContainerSecurityContext>,
    host: &HostFacts,
) -> Result<Vec<String>, SpecError> {
    let field = "config.linux.security_context.capabilities.add_capabilities";
    if sc.is_some_and(|s| s.privileged) {
        return Ok(host.capabilities.clone());
    }
    let mut caps: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect();
    let norm = |c: &str| {
        if c.eq_ignore_ascii_case("ALL") {
            "ALL".to_string()
        } else {
            format!("CAP_{}", c.to_ascii_uppercase().trim_start_matches("CAP_"))
        }
    };
    let Some(c) = sc.and_then(|s| s.capabilities.as_ref()) else {
        return Ok(caps);
    };
    let adds: Vec<String> = c.add_capabilities.iter().map(|a| norm(a)).collect();
    let drops: Vec<String> = c.drop_capabilities.iter().map(|d| norm(d)).collect();
    if adds.iter().any(|a| a == "ALL") {
        caps = host.capabilities.clone();
    }
    if drops.iter().any(|d| d == "ALL") {
        caps.clear();
    }
    for a in adds.into_iter().filter(|a| a != "ALL") {
        if !KERNEL_CAPABILITIES.contains(&a.as_str()) {
            return Err(err(field, format!("unknown capability {a}")));
        } else if !host.capabilities.contains(&a) {
            return Err(err(
                field,
                format!(
                    "{a} is not in berthd's own capability set on this host, so no container can have it"
                ),
            ));
        } else if !caps.contains(&a) {
            caps.push(a);
        }
    }
    for d in drops.iter().filter(|d| *d != "ALL") {
        caps.retain(|x| x != d);
    }
    Ok(caps)
}

/// The bounding, effective and permitted sets (no inheritable or ambient ones).
fn capabilities(names: &[String]) -> Result<LinuxCapabilities, SpecError> {
    let set: HashSet<Capability> = names
        .iter()
        .map(|n| {
            // oci-spec reads the names as the runtime spec writes them ("CAP_CHOWN").
            serde_json::from_value::<Capability>(serde_json::Value::String(n.clone())).map_err(
                |_| {
                    err(
                        "config.linux.security_context.capabilities",
                        format!("unknown capability {n}"),
                    )
                },
            )
        })
        .collect::<Result<_, _>>()?;
    let mut caps = LinuxCapabilities::default();
    caps.set_bounding(Some(set.clone()))
        .set_effective(Some(set.clone()))
        .set_permitted(Some(set))
        .set_inheritable(None)
        .set_ambient(None);
    Ok(caps)
}

/// The working directory: the config's, else the image's, else `/`.
fn working_dir(inp: &SpecInputs<'_>) -> Result<String, SpecError> {
    let cwd = if !inp.config.working_dir.is_empty() {
        inp.config.working_dir.clone()
    } else {
        Some(image_text(inp.image, |c| c.working_dir().clone()))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "/".into())
    };
    if !cwd.starts_with('/') {
        return Err(err(
            "config.working_dir",
            format!("{cwd:?} must be an absolute path"),
        ));
    }
    Ok(cwd)
}

/// The container's oom_score_adj, never below what the host allows.
fn oom_score_adj(inp: &SpecInputs<'_>) -> i32 {
    let wanted = inp
        .config
        .linux
        .as_ref()
        .and_then(|l| l.resources.as_ref())
        .map_or(0, |r| r.oom_score_adj as i32);
    match inp.min_oom_score_adj {
        Some(min) => wanted.max(min),
        None => wanted,
    }
}

/// The container's process, with these capabilities.
pub(super) fn container_process(
    inp: &SpecInputs<'_>,
    caps: &[String],
) -> Result<Process, SpecError> {
    let c = inp.config;
    let sc = inp.security();
    let args = process_args(c, inp.image)?;
    let env = process_env(c, inp.image);
    let cwd = working_dir(inp)?;
    let ids = process_ids(c, inp.image, inp.rootfs)?;
    let apparmor = apparmor_profile(sc, inp.privileged(), &inp.host.modules)?;
    let mut user = User::default();
    user.set_uid(ids.uid)
        .set_gid(ids.gid)
        .set_umask(None)
        .set_additional_gids(Some(ids.additional_gids))
        .set_username(None);
    let mut p = Process::default();
    p.set_terminal(Some(c.tty))
        .set_console_size(None)
        .set_user(user)
        .set_args(Some(args))
        .set_command_line(None)
        .set_env(Some(env))
        .set_cwd(PathBuf::from(cwd))
        .set_capabilities(Some(capabilities(caps)?))
        .set_rlimits(None)
        .set_no_new_privileges(Some(sc.is_some_and(|s| s.no_new_privs)))
        .set_apparmor_profile(apparmor)
        .set_oom_score_adj(Some(oom_score_adj(inp)))
        .set_selinux_label(None)
        .set_io_priority(None)
        .set_scheduler(None)
        .set_exec_cpu_affinity(None);
    Ok(p)
}

/// An exec's process: the container's own (user, env, cwd, capabilities) with new
/// args and terminal.
pub fn exec_process(container: &Process, cmd: &[String], tty: bool) -> Process {
    let mut p = container.clone();
    p.set_args(Some(cmd.to_vec())).set_terminal(Some(tty));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(config: serde_json::Value) -> ImageConfiguration {
        let mut doc = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        });
        doc["config"] = config;
        serde_json::from_value(doc).unwrap()
    }

    fn cfg(command: &[&str], args: &[&str]) -> cri::ContainerConfig {
        cri::ContainerConfig {
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn kubernetes_command_rules() {
        let image = image(serde_json::json!({"Entrypoint": ["/ep"], "Cmd": ["c1", "c2"]}));
        let args = |c: &[&str], a: &[&str]| process_args(&cfg(c, a), &image).unwrap();
        assert_eq!(args(&[], &[]), ["/ep", "c1", "c2"]);
        assert_eq!(args(&[], &["a"]), ["/ep", "a"]);
        assert_eq!(args(&["/cmd"], &[]), ["/cmd"]);
        assert_eq!(args(&["/cmd"], &["a"]), ["/cmd", "a"]);
        let e = process_args(&cfg(&[], &[]), &self::image(serde_json::json!({}))).unwrap_err();
        assert_eq!(e.field, "config.command");
    }

    #[test]
    fn env_is_merged_with_config_winning() {
        let img = image(serde_json::json!({"Env": ["PATH=/bin", "A=1"]}));
        let mut c = cfg(&["x"], &[]);
        c.envs = vec![
            cri::KeyValue {
                key: "A".into(),
                value: "2".into(),
            },
            cri::KeyValue {
                key: "B".into(),
                value: "3".into(),
            },
        ];
        assert_eq!(process_env(&c, &img), ["PATH=/bin", "A=2", "B=3"]);
        let bare = process_env(&c, &image(serde_json::json!({})));
        assert_eq!(bare[0], format!("PATH={DEFAULT_PATH}"));
    }

    #[test]
    fn capabilities_add_and_drop() {
        // A host like this one: every capability but CAP_SYS_RESOURCE.
        let host = HostFacts {
            capabilities: KERNEL_CAPABILITIES
                .iter()
                .filter(|c| **c != "CAP_SYS_RESOURCE")
                .map(|c| c.to_string())
                .collect(),
            ..super::super::tests::host_facts()
        };
        let sc =
            |add: &[&str], drop: &[&str], privileged: bool| cri::LinuxContainerSecurityContext {
                capabilities: Some(cri::Capability {
                    add_capabilities: add.iter().map(|s| s.to_string()).collect(),
                    drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                }),
                privileged,
                ..Default::default()
            };
        let caps = capability_names(
            Some(&sc(&["NET_ADMIN"], &["CAP_KILL", "mknod"], false)),
            &host,
        )
        .unwrap();
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(
            !caps.contains(&"CAP_KILL".to_string()) && !caps.contains(&"CAP_MKNOD".to_string())
        );
        assert!(capability_names(Some(&sc(&["FLY"], &[], false)), &host).is_err());
        let e = capability_names(Some(&sc(&["SYS_RESOURCE"], &[], false)), &host).unwrap_err();
        assert!(e.message.contains("CAP_SYS_RESOURCE"), "{e}");
        // ALL and privileged are what berthd holds.
        assert_eq!(
            capability_names(Some(&sc(&["ALL"], &[], false)), &host).unwrap(),
            host.capabilities
        );
        let privileged = capability_names(Some(&sc(&[], &[], true)), &host).unwrap();
        assert_eq!(privileged, host.capabilities);
        assert!(capabilities(&privileged).is_ok());
        // Privileged ignores add/drop (containerd's WithPrivileged).
        let still_all = capability_names(Some(&sc(&[], &["ALL"], true)), &host).unwrap();
        assert_eq!(still_all, host.capabilities);
        // ALL first, then the named ones, whatever the order in the lists.
        let one =
            capability_names(Some(&sc(&["NET_BIND_SERVICE"], &["ALL"], false)), &host).unwrap();
        assert_eq!(one, ["CAP_NET_BIND_SERVICE"]);
        let all_but = capability_names(Some(&sc(&["ALL"], &["CHOWN"], false)), &host).unwrap();
        assert_eq!(all_but.len(), host.capabilities.len() - 1);
        assert!(!all_but.contains(&"CAP_CHOWN".to_string()));
    }
}
