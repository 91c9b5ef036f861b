//! The container's mounts: the runtime's defaults, the pod's files, the image's
//! volumes, then the CRI mounts (which win over the pod's files and volumes).

use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use oci_spec::runtime::Mount;

use super::host::{HostFacts, mount_of};
use super::{SpecError, SpecInputs, err, image_volumes};

/// A mount with every field set.
fn mount(destination: &str, typ: &str, source: &Path, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(destination))
        .set_typ(Some(typ.to_string()))
        .set_source(Some(source.to_path_buf()))
        .set_options(Some(options.iter().map(|o| o.to_string()).collect()))
        .set_uid_mappings(None)
        .set_gid_mappings(None);
    m
}

/// /proc, /dev, /dev/pts, /dev/mqueue, /sys and /sys/fs/cgroup (read-write only when
/// privileged).
fn default_mounts(privileged: bool) -> Vec<Mount> {
    let sys = if privileged { "rw" } else { "ro" };
    vec![
        mount(
            "/proc",
            "proc",
            Path::new("proc"),
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/dev",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            Path::new("devpts"),
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            Path::new("mqueue"),
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            Path::new("sysfs"),
            &["nosuid", "noexec", "nodev", sys],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            Path::new("cgroup"),
            &["nosuid", "noexec", "nodev", "relatime", sys],
        ),
    ]
}

/// The pod's hostname, hosts, resolv.conf (read-only with a read-only rootfs) and
/// /dev/shm, unless a CRI mount covers them.
fn pod_file_mounts(inp: &SpecInputs<'_>, cri_dest: &[&str]) -> Vec<Mount> {
    let mode = if inp.readonly_rootfs() { "ro" } else { "rw" };
    let mut out = Vec::new();
    for (dest, src) in [
        ("/etc/hostname", &inp.files.hostname),
        ("/etc/hosts", &inp.files.hosts),
        ("/etc/resolv.conf", &inp.files.resolv_conf),
    ] {
        if !cri_dest.contains(&dest) {
            out.push(mount(dest, "bind", src, &["rbind", "rprivate", mode]));
        }
    }
    if let Some(shm) = &inp.files.shm {
        if !cri_dest.contains(&"/dev/shm") {
            out.push(mount("/dev/shm", "bind", shm, &["rbind", "rprivate", "rw"]));
        }
    }
    out
}

/// Image volumes not covered by a CRI mount, as empty directories (`volumes/<n>`).
fn volume_mounts(inp: &SpecInputs<'_>, cri_dest: &[&str]) -> Result<Vec<Mount>, SpecError> {
    let mut out = Vec::new();
    for (i, dest) in image_volumes(inp.image).iter().enumerate() {
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
        out.push(mount(dest, "bind", &src, &["rbind", "rprivate", "rw"]));
    }
    Ok(out)
}

/// One CRI mount's propagation option.
fn propagation(m: &cri::Mount, field: &str) -> Result<&'static str, SpecError> {
    match cri::MountPropagation::try_from(m.propagation) {
        Ok(cri::MountPropagation::PropagationPrivate) => Ok("rprivate"),
        Ok(cri::MountPropagation::PropagationHostToContainer) => Ok("rslave"),
        Ok(cri::MountPropagation::PropagationBidirectional) => Ok("rshared"),
        Err(_) => Err(err(
            &format!("{field}.propagation"),
            format!("unknown value {}", m.propagation),
        )),
    }
}

/// A propagating bind mount needs its host mount to propagate: `rshared` a shared one,
/// `rslave` a shared or slave one (containerd's `ensureShared` / `ensureSharedOrSlave`),
/// else events would silently not cross. The host path is taken with symlinks
/// resolved, as containerd does.
fn check_host_propagation(
    host_path: &str,
    prop: &str,
    field: &str,
    host: &HostFacts,
) -> Result<(), SpecError> {
    if prop == "rprivate" {
        return Ok(());
    }
    let path = std::fs::canonicalize(host_path).unwrap_or_else(|_| PathBuf::from(host_path));
    let on = mount_of(&host.mounts, &path);
    let ok = on.is_some_and(|m| m.shared || (prop == "rslave" && m.slave));
    if ok {
        return Ok(());
    }
    let what = if prop == "rshared" {
        "shared"
    } else {
        "shared or slave"
    };
    let mount_point = on.map_or_else(
        || "an unknown mount".into(),
        |m| m.mount_point.display().to_string(),
    );
    Err(err(
        &format!("{field}.propagation"),
        format!(
            "path {host_path:?} is mounted on {mount_point:?} but it is not a {what} mount \
             (make it one on the host, e.g. `mount --make-{} {mount_point}`)",
            if prop == "rshared" {
                "shared"
            } else {
                "rslave"
            }
        ),
    ))
}

/// One CRI bind mount, checked.
fn cri_mount(
    m: &cri::Mount,
    field: &str,
    host: &HostFacts,
) -> Result<(Mount, &'static str), SpecError> {
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
    let prop = propagation(m, field)?;
    let mut options = vec!["rbind", prop, if m.readonly { "ro" } else { "rw" }];
    if m.recursive_read_only {
        // The CRI contract (and containerd's check): rro only with ro and private.
        if !m.readonly {
            return Err(err(
                &format!("{field}.recursive_read_only"),
                "needs readonly to be true",
            ));
        }
        if prop != "rprivate" {
            return Err(err(
                &format!("{field}.recursive_read_only"),
                "needs private propagation",
            ));
        }
        options.push("rro");
    }
    // What the request alone makes wrong is reported before what the host lacks.
    check_host_propagation(&m.host_path, prop, field, host)?;
    let bind = mount(&m.container_path, "bind", Path::new(&m.host_path), &options);
    Ok((bind, prop))
}

/// Every mount, and the rootfs propagation the CRI mounts need: rslave for a
/// host-to-container mount, rshared for a bidirectional one.
pub(super) fn container_mounts(
    inp: &SpecInputs<'_>,
) -> Result<(Vec<Mount>, &'static str), SpecError> {
    let c = inp.config;
    let cri_dest: Vec<&str> = c.mounts.iter().map(|m| m.container_path.as_str()).collect();
    let mut mounts = default_mounts(inp.privileged());
    mounts.extend(pod_file_mounts(inp, &cri_dest));
    mounts.extend(volume_mounts(inp, &cri_dest)?);
    let mut rootfs_propagation = "rprivate";
    for (i, m) in c.mounts.iter().enumerate() {
        let (bind, prop) = cri_mount(m, &format!("config.mounts[{i}]"), inp.host)?;
        rootfs_propagation = match (rootfs_propagation, prop) {
            (_, "rshared") | ("rshared", _) => "rshared",
            (_, "rslave") | ("rslave", _) => "rslave",
            _ => "rprivate",
        };
        mounts.push(bind);
    }
    Ok((mounts, rootfs_propagation))
}
