//! The OCI runtime spec of a container, built from its CRI config, its pod's config
//! and its image config with Kubernetes' rules (the same containerd's CRI plugin
//! applies): command replaces Entrypoint, args replace Cmd, env merged, working dir
//! and user from the image unless overridden, default capabilities, masked and
//! read-only paths, the pod's namespaces, hosts/resolv.conf/hostname and /dev/shm.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use serde_json::{Value, json};

/// A container config that cannot become a spec; the message names the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The CRI field at fault.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

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
    /// The image config JSON (the whole document; `config` holds Entrypoint etc.).
    pub image_config: &'a Value,
    /// The mounted root filesystem (used to resolve user names).
    pub rootfs: &'a Path,
    /// The pod's files.
    pub files: &'a SandboxFiles,
    /// The pod's pinned netns, or None for host network.
    pub netns: Option<&'a Path>,
    /// The pod's infra pid, whose IPC/UTS/PID namespaces the container joins.
    pub infra_pid: u32,
    /// The OCI `cgroupsPath`.
    pub cgroups_path: &'a str,
    /// Lowest oom_score_adj this host allows (berthd's own without CAP_SYS_RESOURCE).
    pub min_oom_score_adj: Option<i32>,
    /// Host directory for the image's declared volumes (`<dir>/<n>`).
    pub volumes_dir: &'a Path,
}

/// The argv Kubernetes runs: command replaces Entrypoint, args replace Cmd.
pub fn process_args(
    config: &cri::ContainerConfig,
    image: &Value,
) -> Result<Vec<String>, SpecError> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let entrypoint = strings(&image["config"]["Entrypoint"]);
    let cmd = strings(&image["config"]["Cmd"]);
    let argv = if !config.command.is_empty() {
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
        entrypoint.into_iter().chain(cmd).collect::<Vec<_>>()
    };
    if argv.is_empty() {
        return Err(err(
            "config.command",
            "no command given and the image has no Entrypoint or Cmd",
        ));
    }
    Ok(argv)
}

/// PATH for images that set none (containerd's default spec does the same).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Image Env, then the config's envs (a later key wins), in order of first appearance;
/// the default PATH first when neither sets one.
pub fn process_env(config: &cri::ContainerConfig, image: &Value) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let mut vals: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |k: String, v: String| {
        if !vals.contains_key(&k) {
            order.push(k.clone());
        }
        vals.insert(k, v);
    };
    if let Some(a) = image["config"]["Env"].as_array() {
        for e in a.iter().filter_map(|x| x.as_str()) {
            let (k, v) = e.split_once('=').unwrap_or((e, ""));
            put(k.to_string(), v.to_string());
        }
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

/// The uid, gid and additional gids the process runs as.
pub fn process_user(
    config: &cri::ContainerConfig,
    image: &Value,
    rootfs: &Path,
) -> Result<(u32, u32, Vec<u32>), SpecError> {
    let sc = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref());
    let image_user = image["config"]["User"].as_str().unwrap_or("");
    let (user_part, group_part) = match image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (image_user, None),
    };
    let resolve_user = |name: &str, field: &str| -> Result<(u32, u32), SpecError> {
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
    };
    let (mut uid, mut gid) = if let Some(u) = sc.and_then(|s| s.run_as_user.as_ref()) {
        let uid = u32::try_from(u.value)
            .map_err(|_| err("config.linux.security_context.run_as_user", "out of range"))?;
        let gid = read_image_file(rootfs, "etc/passwd")
            .and_then(|t| {
                t.lines().find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() > 3 && f[2] == uid.to_string()).then(|| f[3].parse().ok())?
                })
            })
            .unwrap_or(0);
        (uid, gid)
    } else if let Some(name) = sc
        .map(|s| s.run_as_username.as_str())
        .filter(|n| !n.is_empty())
    {
        resolve_user(name, "config.linux.security_context.run_as_username")?
    } else if !user_part.is_empty() {
        resolve_user(user_part, "image config User")?
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
    if uid > 0x7fff_ffff {
        uid = 0x7fff_ffff;
    }
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

fn capabilities(sc: Option<&cri::LinuxContainerSecurityContext>) -> Result<Vec<String>, SpecError> {
    let privileged = sc.is_some_and(|s| s.privileged);
    let mut caps: Vec<String> = if privileged {
        ALL_CAPABILITIES.iter().map(|s| s.to_string()).collect()
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
    if let Some(c) = sc.and_then(|s| s.capabilities.as_ref()) {
        for a in &c.add_capabilities {
            let a = norm(a);
            if a == "ALL" {
                caps = ALL_CAPABILITIES.iter().map(|s| s.to_string()).collect();
            } else if !ALL_CAPABILITIES.contains(&a.as_str()) {
                return Err(err(
                    "config.linux.security_context.capabilities.add_capabilities",
                    format!("unknown capability {a}"),
                ));
            } else if !caps.contains(&a) {
                caps.push(a);
            }
        }
        for d in &c.drop_capabilities {
            let d = norm(d);
            if d == "ALL" {
                caps.clear();
            } else {
                caps.retain(|x| *x != d);
            }
        }
    }
    Ok(caps)
}

/// Builds the OCI runtime spec (`config.json`) as JSON.
pub fn build_spec(inp: &SpecInputs<'_>) -> Result<Value, SpecError> {
    let c = inp.config;
    let linux_cfg = c.linux.clone().unwrap_or_default();
    let sc = linux_cfg.security_context.as_ref();
    let privileged = sc.is_some_and(|s| s.privileged);
    let args = process_args(c, inp.image_config)?;
    let env = process_env(c, inp.image_config);
    let cwd = if !c.working_dir.is_empty() {
        c.working_dir.clone()
    } else {
        inp.image_config["config"]["WorkingDir"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("/")
            .to_string()
    };
    if !cwd.starts_with('/') {
        return Err(err(
            "config.working_dir",
            format!("{cwd:?} must be an absolute path"),
        ));
    }
    let (uid, gid, additional_gids) = process_user(c, inp.image_config, inp.rootfs)?;
    let caps = capabilities(sc)?;

    // Mounts: the defaults, then the pod's files, then the CRI mounts (which win).
    let mut mounts: Vec<Value> = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", if privileged { "rw" } else { "ro" }]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", if privileged { "rw" } else { "ro" }]}),
    ];
    let cri_dest: Vec<&str> = c.mounts.iter().map(|m| m.container_path.as_str()).collect();
    let ro_rootfs = sc.is_some_and(|s| s.readonly_rootfs);
    for (dest, src) in [
        ("/etc/hostname", &inp.files.hostname),
        ("/etc/hosts", &inp.files.hosts),
        ("/etc/resolv.conf", &inp.files.resolv_conf),
    ] {
        if !cri_dest.contains(&dest) {
            let mode = if ro_rootfs { "ro" } else { "rw" };
            mounts.push(json!({"destination": dest, "type": "bind", "source": src, "options": ["rbind", "rprivate", mode]}));
        }
    }
    if let Some(shm) = &inp.files.shm {
        if !cri_dest.contains(&"/dev/shm") {
            mounts.push(json!({"destination": "/dev/shm", "type": "bind", "source": shm, "options": ["rbind", "rprivate", "rw"]}));
        }
    }
    // Image volumes not covered by a CRI mount become empty directories.
    if let Some(vols) = inp.image_config["config"]["Volumes"].as_object() {
        for (i, dest) in vols.keys().enumerate() {
            if cri_dest
                .iter()
                .any(|d| d.trim_end_matches('/') == dest.trim_end_matches('/'))
            {
                continue;
            }
            if !dest.starts_with('/') || dest.split('/').any(|p| p == "..") {
                return Err(err(
                    "image config Volumes",
                    format!("{dest:?} is not a clean absolute path"),
                ));
            }
            let src = inp.volumes_dir.join(i.to_string());
            mounts.push(json!({"destination": dest, "type": "bind", "source": src, "options": ["rbind", "rprivate", "rw"]}));
        }
    }
    let mut rootfs_propagation = "rprivate";
    for (i, m) in c.mounts.iter().enumerate() {
        let field = format!("config.mounts[{i}]");
        if !m.container_path.starts_with('/') || m.container_path.split('/').any(|p| p == "..") {
            return Err(err(
                &format!("{field}.container_path"),
                format!("{:?} must be a clean absolute path", m.container_path),
            ));
        }
        if !m.host_path.starts_with('/') {
            return Err(err(
                &format!("{field}.host_path"),
                format!("{:?} must be an absolute path", m.host_path),
            ));
        }
        let propagation = match cri::MountPropagation::try_from(m.propagation) {
            Ok(cri::MountPropagation::PropagationPrivate) => "rprivate",
            Ok(cri::MountPropagation::PropagationHostToContainer) => {
                if rootfs_propagation == "rprivate" {
                    rootfs_propagation = "rslave";
                }
                "rslave"
            }
            Ok(cri::MountPropagation::PropagationBidirectional) => {
                rootfs_propagation = "rshared";
                "rshared"
            }
            Err(_) => {
                return Err(err(
                    &format!("{field}.propagation"),
                    format!("unknown value {}", m.propagation),
                ));
            }
        };
        let mut options = vec!["rbind", propagation, if m.readonly { "ro" } else { "rw" }];
        if m.recursive_read_only {
            // The CRI contract (and containerd's check): rro only with ro and private.
            if !m.readonly {
                return Err(err(
                    &format!("{field}.recursive_read_only"),
                    "needs readonly to be true".to_string(),
                ));
            }
            if propagation != "rprivate" {
                return Err(err(
                    &format!("{field}.recursive_read_only"),
                    "needs private propagation".to_string(),
                ));
            }
            options.push("rro");
        }
        mounts.push(json!({"destination": m.container_path, "type": "bind", "source": m.host_path, "options": options}));
    }

    // Namespaces: the pod's network, IPC and UTS; PID per the pod's option.
    let pod_ns = inp
        .pod
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default();
    let ns_opts = sc
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or(pod_ns.clone());
    let node = cri::NamespaceMode::Node as i32;
    let infra_ns = |t: &str| format!("/proc/{}/ns/{t}", inp.infra_pid);
    let mut namespaces = vec![json!({"type": "mount"})];
    if let Some(n) = inp.netns {
        namespaces.push(json!({"type": "network", "path": n}));
    }
    if pod_ns.ipc != node {
        namespaces.push(json!({"type": "ipc", "path": infra_ns("ipc")}));
    }
    if pod_ns.network != node {
        namespaces.push(json!({"type": "uts", "path": infra_ns("uts")}));
    }
    match ns_opts.pid {
        p if p == node => {}
        p if p == cri::NamespaceMode::Pod as i32 => {
            namespaces.push(json!({"type": "pid", "path": infra_ns("pid")}))
        }
        _ => namespaces.push(json!({"type": "pid"})),
    }

    // Resources.
    let r = linux_cfg.resources.clone().unwrap_or_default();
    let mut resources = resources_json(&r);
    resources["devices"] = json!([{"allow": false, "access": "rwm"}]);
    let mut devices = Vec::new();
    for (i, d) in c.devices.iter().enumerate() {
        let field = format!("config.devices[{i}]");
        let meta = std::fs::metadata(&d.host_path).map_err(|e| {
            err(
                &format!("{field}.host_path"),
                format!("{}: {e}", d.host_path),
            )
        })?;
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let kind = if meta.file_type().is_char_device() {
            "c"
        } else if meta.file_type().is_block_device() {
            "b"
        } else {
            return Err(err(
                &format!("{field}.host_path"),
                format!("{} is not a device", d.host_path),
            ));
        };
        let (major, minor) = (
            nix::sys::stat::major(meta.rdev()),
            nix::sys::stat::minor(meta.rdev()),
        );
        let perms = if d.permissions.is_empty() {
            "rwm".to_string()
        } else {
            d.permissions.clone()
        };
        if !perms.chars().all(|ch| matches!(ch, 'r' | 'w' | 'm')) {
            return Err(err(
                &format!("{field}.permissions"),
                format!("{perms:?} is not a subset of \"rwm\""),
            ));
        }
        devices.push(json!({"path": d.container_path, "type": kind, "major": major, "minor": minor, "fileMode": meta.mode() & 0o777, "uid": 0, "gid": 0}));
        if let Some(list) = resources["devices"].as_array_mut() {
            list.push(json!({"allow": true, "type": kind, "major": major, "minor": minor, "access": perms}));
        }
    }

    let mut oom = if r.oom_score_adj != 0 {
        r.oom_score_adj as i32
    } else {
        0
    };
    if let Some(min) = inp.min_oom_score_adj {
        oom = oom.max(min);
    }
    let sysctls: BTreeMap<String, String> = inp
        .pod
        .linux
        .as_ref()
        .map(|l| l.sysctls.clone().into_iter().collect())
        .unwrap_or_default();
    let mut annotations: BTreeMap<String, String> = c.annotations.clone().into_iter().collect();
    annotations.insert(
        "io.kubernetes.cri.container-type".into(),
        "container".into(),
    );
    annotations.insert(
        "io.kubernetes.cri.container-name".into(),
        c.metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default(),
    );
    let no_new_privs = sc.is_some_and(|s| s.no_new_privs);
    let mut linux = json!({
        "namespaces": namespaces,
        "resources": resources,
        "cgroupsPath": inp.cgroups_path,
        "rootfsPropagation": rootfs_propagation,
        "devices": devices,
        "sysctl": sysctls,
    });
    if !privileged {
        let mut masked: Vec<String> = MASKED_PATHS.iter().map(|s| s.to_string()).collect();
        let mut ro: Vec<String> = READONLY_PATHS.iter().map(|s| s.to_string()).collect();
        if let Some(s) = sc {
            if !s.masked_paths.is_empty() {
                masked = s.masked_paths.clone();
            }
            if !s.readonly_paths.is_empty() {
                ro = s.readonly_paths.clone();
            }
        }
        linux["maskedPaths"] = json!(masked);
        linux["readonlyPaths"] = json!(ro);
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": c.tty,
            "user": {"uid": uid, "gid": gid, "additionalGids": additional_gids},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": no_new_privs,
            "oomScoreAdj": oom,
        },
        "root": {"path": "rootfs", "readonly": ro_rootfs},
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    }))
}

/// The OCI `linux.resources` (cpu, memory, hugepages, unified) for CRI resources; the
/// same object `runc update --resources` takes.
pub fn resources_json(r: &cri::LinuxContainerResources) -> Value {
    let mut cpu = serde_json::Map::new();
    if r.cpu_shares > 0 {
        cpu.insert("shares".into(), json!(r.cpu_shares));
    }
    if r.cpu_quota != 0 {
        cpu.insert("quota".into(), json!(r.cpu_quota));
    }
    if r.cpu_period > 0 {
        cpu.insert("period".into(), json!(r.cpu_period));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    let mut memory = serde_json::Map::new();
    if r.memory_limit_in_bytes > 0 {
        memory.insert("limit".into(), json!(r.memory_limit_in_bytes));
    }
    if r.memory_swap_limit_in_bytes > 0 {
        memory.insert("swap".into(), json!(r.memory_swap_limit_in_bytes));
    }
    let hugepages: Vec<Value> = r
        .hugepage_limits
        .iter()
        .map(|h| json!({"pageSize": h.page_size, "limit": h.limit}))
        .collect();
    let mut resources = json!({});
    if !cpu.is_empty() {
        resources["cpu"] = Value::Object(cpu);
    }
    if !memory.is_empty() {
        resources["memory"] = Value::Object(memory);
    }
    if !hugepages.is_empty() {
        resources["hugepageLimits"] = Value::Array(hugepages);
    }
    if !r.unified.is_empty() {
        resources["unified"] = json!(r.unified);
    }
    resources
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(command: &[&str], args: &[&str]) -> cri::ContainerConfig {
        cri::ContainerConfig {
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn kubernetes_command_rules() {
        let image = json!({"config": {"Entrypoint": ["/ep"], "Cmd": ["c1", "c2"]}});
        assert_eq!(
            process_args(&cfg(&[], &[]), &image).unwrap(),
            ["/ep", "c1", "c2"]
        );
        assert_eq!(
            process_args(&cfg(&[], &["a"]), &image).unwrap(),
            ["/ep", "a"]
        );
        assert_eq!(
            process_args(&cfg(&["/cmd"], &[]), &image).unwrap(),
            ["/cmd"]
        );
        assert_eq!(
            process_args(&cfg(&["/cmd"], &["a"]), &image).unwrap(),
            ["/cmd", "a"]
        );
        let e = process_args(&cfg(&[], &[]), &json!({})).unwrap_err();
        assert_eq!(e.field, "config.command");
    }

    #[test]
    fn env_is_merged_with_config_winning() {
        let image = json!({"config": {"Env": ["PATH=/bin", "A=1"]}});
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
        assert_eq!(process_env(&c, &image), ["PATH=/bin", "A=2", "B=3"]);
        let bare = process_env(&c, &json!({}));
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
        assert_eq!(
            process_user(&c, &json!({"config": {"User": "web"}}), dir.path()).unwrap(),
            (1000, 1001, vec![])
        );
        assert_eq!(
            process_user(&c, &json!({"config": {"User": "web:staff"}}), dir.path()).unwrap(),
            (1000, 50, vec![])
        );
        assert_eq!(
            process_user(&c, &json!({"config": {"User": "42:43"}}), dir.path()).unwrap(),
            (42, 43, vec![])
        );
        assert!(process_user(&c, &json!({"config": {"User": "nobody"}}), dir.path()).is_err());
        let mut c2 = cfg(&["x"], &[]);
        c2.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                run_as_user: Some(cri::Int64Value { value: 7 }),
                supplemental_groups: vec![9],
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(
            process_user(&c2, &json!({"config": {"User": "web"}}), dir.path()).unwrap(),
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
        let caps = capabilities(Some(&sc)).unwrap();
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
    }
}
