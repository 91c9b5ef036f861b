//! What a container's spec depends on besides its request: this host. berthd detects
//! it (capabilities, seccomp and the security modules once at start; devices and mounts
//! when a container needs them); the golden tests give it by hand.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxDevice, LinuxDeviceType};

use super::seccomp::SeccompHost;
use super::security::SecurityModules;

/// Capability names in the kernel's numbering (`linux/capability.h`): bit n of a
/// capability mask is entry n.
pub const KERNEL_CAPABILITIES: &[&str] = &[
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

/// The facts of this host a spec needs.
#[derive(Clone, Debug)]
pub struct HostFacts {
    /// The capabilities berthd holds (its effective set): the most any container gets,
    /// and what privileged containers and `ALL` get (as containerd does).
    pub capabilities: Vec<String>,
    /// Whether and how this host filters syscalls.
    pub seccomp: SeccompHost,
    /// AppArmor and SELinux, where the host has them.
    pub modules: SecurityModules,
    /// The host's devices (privileged containers get them all); empty unless needed.
    pub devices: Vec<LinuxDevice>,
    /// The host's mounts (for bind-mount propagation); empty unless needed.
    pub mounts: Vec<HostMount>,
}

impl HostFacts {
    /// What berthd learns once at start.
    pub fn detect() -> HostFacts {
        HostFacts {
            capabilities: current_capabilities(),
            seccomp: SeccompHost::detect(),
            modules: SecurityModules::detect(),
            devices: Vec::new(),
            mounts: Vec::new(),
        }
    }
}

/// The names of the capabilities set in a kernel capability mask.
pub fn capability_names_of(mask: u64) -> Vec<String> {
    KERNEL_CAPABILITIES
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1 << bit) != 0)
        .map(|(_, n)| n.to_string())
        .collect()
}

/// berthd's effective capabilities, from `/proc/self/status` (`CapEff`).
fn current_capabilities() -> Vec<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    capability_names_of(mask)
}

/// Every device node under `dev`, as containerd's `HostDevices` lists them: `pts`,
/// `shm`, `fd`, `mqueue`, `.lxc`, `.lxd-mounts` and `.udev` and `console` left out,
/// symlinks and anything that is not a character or block device skipped.
pub fn host_devices(dev: &Path) -> Vec<LinuxDevice> {
    let mut out = Vec::new();
    walk_devices(dev, Path::new("/dev"), &mut out);
    out
}

fn walk_devices(dir: &Path, container_dir: &Path, out: &mut Vec<LinuxDevice>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            let skipped = ["pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"];
            if !skipped.iter().any(|s| name == *s) {
                walk_devices(&e.path(), &container_dir.join(&name), out);
            }
            continue;
        }
        if name == "console" {
            continue;
        }
        let typ = if ft.is_char_device() {
            LinuxDeviceType::C
        } else if ft.is_block_device() {
            LinuxDeviceType::B
        } else {
            continue;
        };
        let mut d = LinuxDevice::default();
        d.set_path(container_dir.join(&name))
            .set_typ(typ)
            .set_major(nix::sys::stat::major(meta.rdev()) as i64)
            .set_minor(nix::sys::stat::minor(meta.rdev()) as i64)
            .set_file_mode(Some(meta.mode() & 0o777))
            .set_uid(Some(meta.uid()))
            .set_gid(Some(meta.gid()));
        out.push(d);
    }
}

/// One mount of the host, as far as propagation goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostMount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// In a shared peer group (`shared:N`).
    pub shared: bool,
    /// A slave of a peer group (`master:N`).
    pub slave: bool,
}

/// The mounts of a `mountinfo` text (proc(5)).
pub fn parse_mountinfo(text: &str) -> Vec<HostMount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let optional = fields.get(6..sep)?;
            Some(HostMount {
                mount_point: PathBuf::from(unescape_octal(fields.get(4)?)),
                shared: optional.iter().any(|f| f.starts_with("shared:")),
                slave: optional.iter().any(|f| f.starts_with("master:")),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount a path is on: the last-mounted of those with the longest mount point
/// that is the path or a parent of it (containerd's `mount.Lookup`).
pub fn mount_of<'a>(mounts: &'a [HostMount], path: &Path) -> Option<&'a HostMount> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .fold(None, |best: Option<&HostMount>, m| match best {
            Some(b) if b.mount_point.as_os_str().len() > m.mount_point.as_os_str().len() => Some(b),
            _ => Some(m),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_masks_read_in_kernel_order() {
        assert_eq!(capability_names_of(0b1), ["CAP_CHOWN"]);
        assert_eq!(
            capability_names_of(1 << 21 | 1 << 40),
            ["CAP_SYS_ADMIN", "CAP_CHECKPOINT_RESTORE"]
        );
        // This host lacks CAP_SYS_RESOURCE (bit 24) in its bounding set.
        let full = capability_names_of((1u64 << 41) - 1);
        assert_eq!(full.len(), 41);
        let without = capability_names_of(((1u64 << 41) - 1) & !(1 << 24));
        assert!(!without.contains(&"CAP_SYS_RESOURCE".to_string()));
        // Every name is one oci-spec (and so the runtime spec) knows.
        for n in KERNEL_CAPABILITIES {
            let v = serde_json::Value::String(n.to_string());
            assert!(
                serde_json::from_value::<oci_spec::runtime::Capability>(v).is_ok(),
                "{n}"
            );
        }
    }

    #[test]
    fn mountinfo_propagation_and_lookup() {
        let text = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /mnt/a\\040b rw master:7 - tmpfs tmpfs rw
31 22 0:41 / /mnt rw - tmpfs tmpfs rw
32 31 0:42 / /mnt/sh rw shared:9 master:3 - tmpfs tmpfs rw
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].mount_point, PathBuf::from("/mnt/a b"));
        let at = |p: &str| mount_of(&m, Path::new(p)).map(|m| m.mount_point.clone());
        assert_eq!(at("/var/lib"), Some(PathBuf::from("/")));
        assert_eq!(at("/mnt/x"), Some(PathBuf::from("/mnt")));
        assert_eq!(
            at("/mnt/shared"),
            Some(PathBuf::from("/mnt")),
            "not a path parent"
        );
        assert_eq!(at("/mnt/sh/d"), Some(PathBuf::from("/mnt/sh")));
        let sh = mount_of(&m, Path::new("/mnt/sh")).unwrap();
        assert!(sh.shared && sh.slave);
        assert!(!mount_of(&m, Path::new("/mnt/x")).unwrap().shared);
        assert!(mount_of(&m, Path::new("/mnt/a b/c")).unwrap().slave);
    }

    #[test]
    fn host_devices_skip_what_containerd_skips() {
        // Without root no device node can be made: only the skipping is checked here;
        // the e2e suite checks real devices in a privileged container.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pts")).unwrap();
        std::fs::write(dir.path().join("regular"), "").unwrap();
        std::os::unix::fs::symlink("/dev/null", dir.path().join("link")).unwrap();
        assert!(host_devices(dir.path()).is_empty());
    }
}
