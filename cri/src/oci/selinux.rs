//! SELinux labels as containerd gives them (go-selinux's `InitLabels`): a pod gets
//! the policy's container process label (`lxc_contexts`) with an MCS level of its
//! own, unless its options say otherwise; a container takes its options over the
//! pod's label; the mount label is the policy's container file label at the same
//! user and level. Volumes asking for `selinux_relabel` are relabelled to it. On a
//! host without SELinux, options are an error (closed by default: containerd with
//! `enable_selinux = false` would drop them).

use std::collections::HashSet;
use std::path::Path;

use k8s_cri::v1 as cri;

use super::{SpecError, err};

/// The policy's labels for containers (`/etc/selinux/<type>/contexts/lxc_contexts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelinuxDefaults {
    /// `process = "..."`: what container processes run as.
    pub process: String,
    /// `file = "..."`: what container files are labelled.
    pub file: String,
}

impl SelinuxDefaults {
    /// This host's, when SELinux is enabled.
    pub fn detect() -> Option<SelinuxDefaults> {
        if !Path::new("/sys/fs/selinux/enforce").exists() {
            return None;
        }
        let config = std::fs::read_to_string("/etc/selinux/config").unwrap_or_default();
        Some(Self::from_policy(&config, Path::new("/etc/selinux")))
    }

    /// The container labels of the policy `/etc/selinux/config` names (under `root`),
    /// or SELinux's stock ones where the policy has none.
    pub fn from_policy(config: &str, root: &Path) -> SelinuxDefaults {
        let policy = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("SELINUXTYPE="))
            .map(str::trim)
            .filter(|p| !p.is_empty() && !p.contains('/'))
            .unwrap_or("targeted");
        let lxc = std::fs::read_to_string(root.join(policy).join("contexts/lxc_contexts"))
            .unwrap_or_default();
        let value = |key: &str| {
            lxc.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        SelinuxDefaults {
            process: value("process").unwrap_or_else(|| "system_u:system_r:container_t:s0".into()),
            file: value("file").unwrap_or_else(|| "system_u:object_r:container_file_t:s0".into()),
        }
    }
}

/// A context's four parts (the level may hold colons).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Context {
    user: String,
    role: String,
    typ: String,
    level: String,
}

impl Context {
    fn parse(s: &str) -> Option<Context> {
        let mut it = s.splitn(4, ':');
        let c = Context {
            user: it.next()?.to_string(),
            role: it.next()?.to_string(),
            typ: it.next()?.to_string(),
            level: it.next().unwrap_or("s0").to_string(),
        };
        (!c.user.is_empty() && !c.role.is_empty() && !c.typ.is_empty()).then_some(c)
    }

    fn render(&self) -> String {
        format!("{}:{}:{}:{}", self.user, self.role, self.typ, self.level)
    }
}

/// A process's label and the label of what it mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelinuxLabels {
    /// `process.selinuxLabel`.
    pub process: String,
    /// `linux.mountLabel`, and what relabelled volumes get.
    pub mount: String,
}

/// Whether options ask for anything.
fn asked(o: Option<&cri::SeLinuxOption>) -> Option<&cri::SeLinuxOption> {
    o.filter(|o| {
        !(o.user.is_empty() && o.role.is_empty() && o.r#type.is_empty() && o.level.is_empty())
    })
}

/// containerd's level check: `s<N>[-s<N>][:c<N>[.c<N>][,c<N>[.c<N>]]...]`.
fn valid_level(level: &str) -> bool {
    let sens = |s: &str| {
        s.strip_prefix('s')
            .is_some_and(|n| n.len() == 1 && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let cat = |c: &str| {
        c.strip_prefix('c')
            .is_some_and(|n| (1..=4).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let (range, cats) = match level.split_once(':') {
        Some((r, c)) => (r, Some(c)),
        None => (level, None),
    };
    let range_ok = match range.split_once('-') {
        Some((lo, hi)) => sens(lo) && sens(hi),
        None => sens(range),
    };
    let cats_ok = cats.is_none_or(|c| {
        c.split(',').all(|part| match part.split_once('.') {
            Some((a, b)) => cat(a) && cat(b),
            None => cat(part),
        })
    });
    range_ok && cats_ok
}

/// Refuses options a host without SELinux cannot apply and levels in a bad format;
/// the options that ask for something.
pub fn check_options(
    options: Option<&cri::SeLinuxOption>,
    field: &str,
    host: Option<&SelinuxDefaults>,
) -> Result<Option<cri::SeLinuxOption>, SpecError> {
    let Some(o) = asked(options) else {
        return Ok(None);
    };
    if host.is_none() {
        return Err(err(
            field,
            "SELinux is not enabled on this host; remove the SELinux options",
        ));
    }
    if !o.level.is_empty() && !valid_level(&o.level) {
        return Err(err(
            &format!("{field}.level"),
            format!("the format of 'level' {:?} is not correct", o.level),
        ));
    }
    Ok(Some(o.clone()))
}

/// Applies options over a process context and its mount context (user and level
/// reach both, role and type only the process), as `InitLabels` does.
fn apply(mut p: Context, mut m: Context, o: Option<&cri::SeLinuxOption>) -> SelinuxLabels {
    if let Some(o) = o {
        if !o.user.is_empty() {
            p.user.clone_from(&o.user);
            m.user.clone_from(&o.user);
        }
        if !o.role.is_empty() {
            p.role.clone_from(&o.role);
        }
        if !o.r#type.is_empty() {
            p.typ.clone_from(&o.r#type);
        }
        if !o.level.is_empty() {
            p.level.clone_from(&o.level);
            m.level.clone_from(&o.level);
        }
    }
    SelinuxLabels {
        process: p.render(),
        mount: m.render(),
    }
}

fn defaults(host: &SelinuxDefaults) -> (Context, Context) {
    let fallback = |s: &str| {
        Context::parse(s).unwrap_or(Context {
            user: "system_u".into(),
            role: "system_r".into(),
            typ: "container_t".into(),
            level: "s0".into(),
        })
    };
    (fallback(&host.process), fallback(&host.file))
}

/// An MCS level for a new pod: `s0:cA,cB`, picked from its id and unused by `used`.
pub fn pod_level(id: &str, used: &HashSet<String>) -> String {
    let mut seed = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    loop {
        let a = seed % 1024;
        let b = (seed / 1024) % 1024;
        let level = format!("s0:c{},c{}", a.min(b), a.max(b));
        if a != b && !used.contains(&level) {
            return level;
        }
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    }
}

/// A pod's process label: the policy's, at its own MCS `level`, under its (checked)
/// options.
pub fn pod_label(
    options: Option<&cri::SeLinuxOption>,
    host: &SelinuxDefaults,
    level: String,
) -> String {
    let (mut p, mut m) = defaults(host);
    p.level.clone_from(&level);
    m.level = level;
    apply(p, m, options).process
}

/// A container's labels (None without SELinux): its options over its pod's label.
pub fn container_labels(
    options: Option<&cri::SeLinuxOption>,
    field: &str,
    host: Option<&SelinuxDefaults>,
    pod_label: Option<&str>,
) -> Result<Option<SelinuxLabels>, SpecError> {
    let o = check_options(options, field, host)?;
    let Some(host) = host else {
        return Ok(None);
    };
    let (mut p, mut m) = defaults(host);
    if let Some(pod) = pod_label.and_then(Context::parse) {
        m.user.clone_from(&pod.user);
        m.level.clone_from(&pod.level);
        p = pod;
    }
    Ok(Some(apply(p, m, o.as_ref())))
}

/// The label of a pod's files (its shm, hosts, hostname, resolv.conf): the policy's
/// file label at the pod's user and level.
pub fn pod_mount_label(pod_label: &str, host: &SelinuxDefaults) -> String {
    let (_, mut m) = defaults(host);
    if let Some(pod) = Context::parse(pod_label) {
        m.user = pod.user;
        m.level = pod.level;
    }
    m.render()
}

/// Paths never relabelled (go-selinux's list): relabelling them would break the host.
const NEVER_RELABEL: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/etc/passwd",
    "/etc/pki",
    "/etc/shadow",
    "/home",
    "/lib",
    "/lib64",
    "/media",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/var",
    "/var/lib",
    "/var/log",
];

/// Whether `path` may be relabelled.
pub fn relabel_allowed(path: &Path) -> bool {
    let p = path.to_string_lossy();
    let p = p.trim_end_matches('/');
    !NEVER_RELABEL.contains(&if p.is_empty() { "/" } else { p })
}

/// Sets `label` on `path` and everything below it, as `label.Relabel` does for a
/// volume, walking by file descriptor: every entry is opened relative to its
/// directory's fd without following symlinks, and labelled through that fd, so a
/// container swapping a directory for a symlink cannot make berthd label host files;
/// the walk stays on `path`'s filesystem. A filesystem without xattr support
/// (ENOTSUP) is left as it is, as containerd does.
pub fn relabel(path: &Path, label: &str) -> std::io::Result<()> {
    use nix::fcntl::{OFlag, openat};
    use nix::sys::stat::{Mode, SFlag, fstat};
    use std::os::fd::AsRawFd;
    let is_dir = |mode| SFlag::from_bits_truncate(mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let top = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let top_stat = fstat(&top)?;
    match set_label(&top, label) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        other => other?,
    }
    if !is_dir(top_stat.st_mode) {
        return Ok(());
    }
    // The same directory again through its fd, never through the path.
    let magic = format!("/proc/self/fd/{}", top.as_raw_fd());
    let root = nix::fcntl::open(
        magic.as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // Depth first, one open directory per level (a wide tree cannot exhaust fds).
    let mut stack = vec![Level::open(root)?];
    while let Some(level) = stack.last_mut() {
        let Some(name) = level.names.get(level.next).cloned() else {
            stack.pop();
            continue;
        };
        level.next += 1;
        let fd = openat(
            &level.fd,
            name.as_c_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let st = fstat(&fd)?;
        if st.st_dev != top_stat.st_dev {
            continue;
        }
        set_label(&fd, label)?;
        if is_dir(st.st_mode) {
            let sub = openat(&level.fd, name.as_c_str(), dir_flags, Mode::empty())?;
            stack.push(Level::open(sub)?);
        }
    }
    Ok(())
}

/// One directory of a relabelling walk: its fd, its entries, the next to visit.
struct Level {
    fd: std::os::fd::OwnedFd,
    names: Vec<std::ffi::CString>,
    next: usize,
}

impl Level {
    fn open(fd: std::os::fd::OwnedFd) -> std::io::Result<Level> {
        let mut listing = nix::dir::Dir::from_fd(fd.try_clone()?)?;
        let names = listing
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
            .collect();
        Ok(Level { fd, names, next: 0 })
    }
}

/// Labels what `fd` (opened with O_PATH) refers to, through its /proc magic link, which
/// names the open file itself and is never resolved again by path.
fn set_label(fd: &std::os::fd::OwnedFd, label: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let proc = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let name = c"security.selinux";
    // SAFETY: both strings are NUL-terminated and outlive the call; the value is
    // `label.len()` bytes read from `label`.
    let rc = unsafe {
        libc::setxattr(
            proc.as_ptr(),
            name.as_ptr(),
            label.as_ptr().cast(),
            label.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> SelinuxDefaults {
        SelinuxDefaults {
            process: "system_u:system_r:container_t:s0".into(),
            file: "system_u:object_r:container_file_t:s0".into(),
        }
    }

    fn opts(user: &str, role: &str, typ: &str, level: &str) -> cri::SeLinuxOption {
        cri::SeLinuxOption {
            user: user.into(),
            role: role.into(),
            r#type: typ.into(),
            level: level.into(),
        }
    }

    #[test]
    fn the_policy_names_the_container_labels() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("mls/contexts");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(
            ctx.join("lxc_contexts"),
            "process = \"u:r:svirt_lxc_net_t:s0\"\nfile = \"u:object_r:svirt_sandbox_file_t:s0\"\n",
        )
        .unwrap();
        let d = SelinuxDefaults::from_policy("SELINUX=enforcing\nSELINUXTYPE=mls\n", dir.path());
        assert_eq!(d.process, "u:r:svirt_lxc_net_t:s0");
        assert_eq!(d.file, "u:object_r:svirt_sandbox_file_t:s0");
        assert_eq!(SelinuxDefaults::from_policy("", dir.path()), host());
    }

    #[test]
    fn pods_get_their_own_level_and_containers_inherit_it() {
        let h = host();
        let used = HashSet::new();
        let level = pod_level("abc", &used);
        assert!(valid_level(&level) && level.starts_with("s0:c"), "{level}");
        assert_ne!(pod_level("abc", &HashSet::from([level.clone()])), level);
        let pod = pod_label(None, &h, level.clone());
        assert_eq!(pod, format!("system_u:system_r:container_t:{level}"));
        let c = container_labels(None, "f", Some(&h), Some(&pod))
            .unwrap()
            .unwrap();
        assert_eq!(c.process, pod);
        assert_eq!(
            c.mount,
            format!("system_u:object_r:container_file_t:{level}")
        );
        // Options win; user and level reach the mount label too.
        let o = opts("user_u", "", "spc_t", "s0:c1,c2");
        let c = container_labels(Some(&o), "f", Some(&h), Some(&pod))
            .unwrap()
            .unwrap();
        assert_eq!(c.process, "user_u:system_r:spc_t:s0:c1,c2");
        assert_eq!(c.mount, "user_u:object_r:container_file_t:s0:c1,c2");
        let p = pod_label(Some(&opts("", "", "", "s0:c5,c6")), &h, level.clone());
        assert_eq!(p, "system_u:system_r:container_t:s0:c5,c6");
    }

    #[test]
    fn bad_levels_and_hosts_without_selinux_are_refused() {
        for good in [
            "s0",
            "s0-s0",
            "s0:c1",
            "s0:c1,c2",
            "s0-s1:c0.c1023",
            "s0:c1.c3,c7",
        ] {
            assert!(valid_level(good), "{good}");
        }
        for bad in [
            "",
            "s",
            "s10",
            "s0:",
            "s0:c",
            "s0:c12345",
            "x0",
            "s0:c1;rm",
            "s0-",
        ] {
            assert!(!valid_level(bad), "{bad}");
        }
        let e = container_labels(Some(&opts("", "", "", "s0:bad")), "f", Some(&host()), None)
            .unwrap_err();
        assert_eq!(e.field, "f.level");
        let e = container_labels(Some(&opts("u", "", "", "")), "f", None, None).unwrap_err();
        assert!(e.to_string().contains("SELinux is not enabled"), "{e}");
        assert_eq!(container_labels(None, "f", None, None).unwrap(), None);
        assert_eq!(
            container_labels(Some(&cri::SeLinuxOption::default()), "f", None, None).unwrap(),
            None
        );
    }

    fn label_of(p: &Path) -> Option<String> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        // SAFETY: NUL-terminated strings; the buffer's length is passed.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                c"security.selinux".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n >= 0).then(|| String::from_utf8_lossy(&buf[..n as usize]).into_owned())
    }

    /// Needs root (security.* xattrs); the kernel stores them without SELinux too.
    #[test]
    fn relabel_labels_the_tree_and_never_follows_symlinks() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (security.* xattrs)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let vol = tmp.path().join("vol");
        let outside = tmp.path().join("host-secret");
        std::fs::create_dir_all(vol.join("a/b")).unwrap();
        std::fs::write(vol.join("a/b/f"), "x").unwrap();
        std::fs::write(&outside, "secret").unwrap();
        std::os::unix::fs::symlink(&outside, vol.join("a/link")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), vol.join("dirlink")).unwrap();
        let label = "system_u:object_r:container_file_t:s0:c1,c2";
        match relabel(&vol, label) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                eprintln!("skipped: no security xattrs on this filesystem");
                return;
            }
            Err(e) => panic!("{e}"),
        }
        if label_of(&vol).is_none() {
            eprintln!("skipped: the filesystem ignored security.selinux");
            return;
        }
        for p in ["", "a", "a/b", "a/b/f"] {
            assert_eq!(label_of(&vol.join(p)).as_deref(), Some(label), "{p}");
        }
        assert_eq!(
            label_of(&outside),
            None,
            "a symlink's target was relabelled"
        );
        assert_eq!(label_of(tmp.path()), None, "a linked dir was relabelled");
    }

    #[test]
    fn system_paths_are_never_relabelled() {
        for p in ["/", "/etc", "/usr/", "/var/lib", "/home"] {
            assert!(!relabel_allowed(Path::new(p)), "{p}");
        }
        assert!(relabel_allowed(Path::new(
            "/var/lib/kubelet/pods/x/volumes/v"
        )));
    }
}
