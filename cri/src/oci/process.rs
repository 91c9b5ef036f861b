//! The container's process: argv, env, working dir, user and groups, capabilities.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{Capability, LinuxCapabilities, Process, User};

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

/// Every capability, for privileged containers and "ALL".
const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
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

/// Reads a small file of the image (`etc/passwd`, `etc/group`) without following
/// symlinks anywhere on the way, and only if it is a regular file under 1 MiB: an image
/// must not make berthd read host files, devices or FIFOs.
fn read_image_file(rootfs: &Path, rel: &str) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut cur = rootfs.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        cur.push(part);
        let meta = std::fs::symlink_metadata(&cur).ok()?;
        let last = i + 1 == parts.len();
        if meta.file_type().is_symlink()
            || (last && (!meta.is_file() || meta.len() > 1 << 20))
            || (!last && !meta.is_dir())
        {
            return None;
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&cur)
        .ok()?;
    let mut text = String::new();
    f.by_ref().take(1 << 20).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Looks a name up in a passwd- or group-style file of the rootfs: (id, primary gid).
fn lookup(rootfs: &Path, file: &str, name: &str) -> Option<(u32, u32)> {
    let text = read_image_file(rootfs, file)?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == name)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().unwrap_or(0))))?
    })
}

/// The primary gid of a uid in the image's /etc/passwd (0 when it is not there).
fn primary_gid(rootfs: &Path, uid: u32) -> u32 {
    read_image_file(rootfs, "etc/passwd")
        .and_then(|t| {
            t.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[2] == uid.to_string()).then(|| f[3].parse().ok())?
            })
        })
        .unwrap_or(0)
}

/// A user name or number of the image: (uid, its primary gid).
fn resolve_user(rootfs: &Path, name: &str, field: &str) -> Result<(u32, u32), SpecError> {
    if let Ok(uid) = name.parse::<u32>() {
        return Ok((
            uid,
            lookup(rootfs, "etc/passwd", name).map_or(0, |(_, g)| g),
        ));
    }
    lookup(rootfs, "etc/passwd", name).ok_or_else(|| {
        err(
            field,
            format!("user {name:?} is not in the image's /etc/passwd"),
        )
    })
}

/// The uid, gid and additional gids the process runs as.
pub fn process_user(
    config: &cri::ContainerConfig,
    image: &ImageConfiguration,
    rootfs: &Path,
) -> Result<(u32, u32, Vec<u32>), SpecError> {
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    let image_user = image_text(image, |c| c.user().clone());
    let (user_part, group_part) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user.as_str(), None),
    };
    let (mut uid, mut gid) = if let Some(u) = sc.and_then(|s| s.run_as_user.as_ref()) {
        let uid = u32::try_from(u.value)
            .map_err(|_| err("config.linux.security_context.run_as_user", "out of range"))?;
        (uid, primary_gid(rootfs, uid))
    } else if let Some(name) = sc
        .map(|s| s.run_as_username.as_str())
        .filter(|n| !n.is_empty())
    {
        resolve_user(
            rootfs,
            name,
            "config.linux.security_context.run_as_username",
        )?
    } else if !user_part.is_empty() {
        resolve_user(rootfs, user_part, "image config User")?
    } else {
        (0, 0)
    };
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup(rootfs, "etc/group", g)
                .map(|(id, _)| id)
                .ok_or_else(|| {
                    err(
                        "image config User",
                        format!("group {g:?} is not in the image's /etc/group"),
                    )
                })?,
        };
    }
    if let Some(g) = sc.and_then(|s| s.run_as_group.as_ref()) {
        gid = u32::try_from(g.value)
            .map_err(|_| err("config.linux.security_context.run_as_group", "out of range"))?;
    }
    uid = uid.min(0x7fff_ffff);
    let additional = sc
        .map(|s| {
            s.supplemental_groups
                .iter()
                .filter_map(|g| u32::try_from(*g).ok())
                .collect()
        })
        .unwrap_or_default();
    Ok((uid, gid, additional))
}

/// The capability names the process gets: defaults (or all when privileged), then
/// the config's adds and drops.
fn capability_names(
    sc: Option<&cri::LinuxContainerSecurityContext>,
) -> Result<Vec<String>, SpecError> {
    let all = || ALL_CAPABILITIES.iter().map(|s| s.to_string()).collect();
    let mut caps: Vec<String> = if sc.is_some_and(|s| s.privileged) {
        all()
    } else {
        DEFAULT_CAPABILITIES.iter().map(|s| s.to_string()).collect()
    };
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
    for a in c.add_capabilities.iter().map(|a| norm(a)) {
        if a == "ALL" {
            caps = all();
        } else if !ALL_CAPABILITIES.contains(&a.as_str()) {
            return Err(err(
                "config.linux.security_context.capabilities.add_capabilities",
                format!("unknown capability {a}"),
            ));
        } else if !caps.contains(&a) {
            caps.push(a);
        }
    }
    for d in c.drop_capabilities.iter().map(|d| norm(d)) {
        if d == "ALL" {
            caps.clear();
        } else {
            caps.retain(|x| *x != d);
        }
    }
    Ok(caps)
}

/// The bounding, effective and permitted sets (no inheritable or ambient ones).
fn capabilities(
    sc: Option<&cri::LinuxContainerSecurityContext>,
) -> Result<LinuxCapabilities, SpecError> {
    let set: HashSet<Capability> = capability_names(sc)?
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

/// The container's process.
pub(super) fn container_process(inp: &SpecInputs<'_>) -> Result<Process, SpecError> {
    let c = inp.config;
    let sc = inp.security();
    let args = process_args(c, inp.image)?;
    let env = process_env(c, inp.image);
    let cwd = working_dir(inp)?;
    let (uid, gid, additional_gids) = process_user(c, inp.image, inp.rootfs)?;
    let mut user = User::default();
    user.set_uid(uid)
        .set_gid(gid)
        .set_umask(None)
        .set_additional_gids(Some(additional_gids))
        .set_username(None);
    let mut p = Process::default();
    p.set_terminal(Some(c.tty))
        .set_console_size(None)
        .set_user(user)
        .set_args(Some(args))
        .set_command_line(None)
        .set_env(Some(env))
        .set_cwd(PathBuf::from(cwd))
        .set_capabilities(Some(capabilities(sc)?))
        .set_rlimits(None)
        .set_no_new_privileges(Some(sc.is_some_and(|s| s.no_new_privs)))
        .set_apparmor_profile(None)
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
    fn users_resolve_from_the_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\nweb:x:1000:1001::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let c = cfg(&["x"], &[]);
        let user = |u: &str| process_user(&c, &image(serde_json::json!({"User": u})), dir.path());
        assert_eq!(user("web").unwrap(), (1000, 1001, vec![]));
        assert_eq!(user("web:staff").unwrap(), (1000, 50, vec![]));
        assert_eq!(user("42:43").unwrap(), (42, 43, vec![]));
        assert!(user("nobody").is_err());
        let mut c2 = cfg(&["x"], &[]);
        c2.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 7 }),
                supplemental_groups: vec![9],
                ..Default::default()
            }),
            ..Default::default()
        });
        let web = image(serde_json::json!({"User": "web"}));
        assert_eq!(
            process_user(&c2, &web, dir.path()).unwrap(),
            (7, 0, vec![9])
        );
    }

    #[test]
    fn capabilities_add_and_drop() {
        let sc = cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["NET_ADMIN".into()],
                drop_capabilities: vec!["CAP_KILL".into(), "mknod".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let caps = capability_names(Some(&sc)).unwrap();
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(
            !caps.contains(&"CAP_KILL".to_string()) && !caps.contains(&"CAP_MKNOD".to_string())
        );
        let bad = cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["FLY".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(capabilities(Some(&bad)).is_err());
        // Every name berth knows is one oci-spec knows.
        assert!(
            capabilities(Some(&cri::LinuxContainerSecurityContext {
                privileged: true,
                ..Default::default()
            }))
            .is_ok()
        );
    }
}
