//! The mounted cgroup hierarchies and where one cgroup lives in each of them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use crate::CgroupError;

/// How cgroups are mounted on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// cgroup v1 controllers only.
    Legacy,
    /// cgroup v1 controllers plus a cgroup2 mount (usually `/sys/fs/cgroup/unified`).
    Hybrid,
    /// cgroup2 only.
    Unified,
}

/// The mounted hierarchies: each v1 controller's mount, and the cgroup2 mount with
/// the controllers it has (those not bound to a v1 hierarchy).
#[derive(Clone, Debug, Default)]
pub struct Hierarchy {
    v1: BTreeMap<String, PathBuf>,
    v2: Option<PathBuf>,
    v2_controllers: BTreeSet<String>,
}

impl Hierarchy {
    /// Reads this process's mount table.
    pub fn detect() -> Result<Hierarchy, CgroupError> {
        let path = "/proc/self/mountinfo";
        let text = std::fs::read_to_string(path).map_err(|e| CgroupError::io(path, e))?;
        Ok(Hierarchy::from_mountinfo(&text))
    }

    /// Parses a mountinfo table; the first mount of each controller wins.
    pub fn from_mountinfo(text: &str) -> Hierarchy {
        let mut h = Hierarchy::default();
        for line in text.lines() {
            // "id parent maj:min root mountpoint opts [optional...] - fstype source superopts"
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mountpoint) = pre.split(' ').nth(4) else {
                continue;
            };
            let mountpoint = PathBuf::from(unescape(mountpoint));
            let mut post = post.split(' ');
            match (post.next(), post.nth(1)) {
                (Some("cgroup2"), _) if h.v2.is_none() => h.v2 = Some(mountpoint),
                (Some("cgroup"), Some(opts)) => {
                    for o in opts.split(',') {
                        let name = o.strip_prefix("name=").unwrap_or(o);
                        if matches!(name, "rw" | "ro") || name.contains('=') {
                            continue;
                        }
                        h.v1.entry(name.to_string())
                            .or_insert_with(|| mountpoint.clone());
                    }
                }
                _ => {}
            }
        }
        if let Some(v2) = &h.v2 {
            h.v2_controllers = read_controllers(v2);
        }
        h
    }

    /// A cgroup2-only hierarchy at `mount` (a test mount, or a non-standard root).
    pub fn unified_at(mount: &Path) -> Hierarchy {
        Hierarchy {
            v1: BTreeMap::new(),
            v2: Some(mount.to_path_buf()),
            v2_controllers: read_controllers(mount),
        }
    }

    /// Legacy, hybrid or unified.
    pub fn mode(&self) -> Mode {
        match (self.v1.is_empty(), self.v2.is_some()) {
            (false, true) => Mode::Hybrid,
            (false, false) => Mode::Legacy,
            (true, _) => Mode::Unified,
        }
    }

    /// The cgroup at `rel` (relative to each hierarchy's root) in every hierarchy.
    pub fn cgroup(&self, rel: &Path) -> Cgroup {
        Cgroup {
            rel: rel.to_path_buf(),
            v1: self
                .v1
                .iter()
                .map(|(c, m)| (c.clone(), m.join(rel)))
                .collect(),
            v2: self.v2.as_ref().map(|m| m.join(rel)),
            v2_controllers: self.v2_controllers.clone(),
        }
    }
}

/// `cgroup.controllers` of a cgroup2 directory.
fn read_controllers(dir: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(dir.join("cgroup.controllers"))
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The relative cgroup path of an OCI `linux.cgroupsPath`: a cgroupfs path, or
/// runc's systemd form `slice:prefix:name` (`<slice path>/<prefix>-<name>.scope`).
pub fn relative_path_of(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let rel = match cgroups_path.split(':').collect::<Vec<_>>()[..] {
        [path] => PathBuf::from(path.trim_start_matches('/')),
        [slice, prefix, name] => {
            if prefix.contains('/') || name.contains('/') || name.is_empty() {
                return Err(CgroupError::Invalid(format!(
                    "cgroupsPath {cgroups_path:?}: scope prefix and name must be plain names"
                )));
            }
            let mut p = if slice.is_empty() {
                PathBuf::new()
            } else {
                crate::pod::relative_path(slice, true).map_err(CgroupError::Invalid)?
            };
            p.push(if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            });
            p
        }
        _ => {
            return Err(CgroupError::Invalid(format!(
                "cgroupsPath {cgroups_path:?} is neither a path nor slice:prefix:name"
            )));
        }
    };
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(CgroupError::Invalid(format!(
            "cgroupsPath {cgroups_path:?} must not contain '..' or '.'"
        )));
    }
    Ok(rel)
}

/// One cgroup's directory in each mounted hierarchy (whether or not it exists yet).
#[derive(Clone, Debug)]
pub struct Cgroup {
    rel: PathBuf,
    v1: BTreeMap<String, PathBuf>,
    v2: Option<PathBuf>,
    v2_controllers: BTreeSet<String>,
}

impl Cgroup {
    /// The path relative to the hierarchy roots.
    pub fn relative(&self) -> &Path {
        &self.rel
    }

    /// The directory holding `controller`'s files: its v1 hierarchy if it has one,
    /// else the cgroup2 directory when the controller is available there.
    pub fn dir(&self, controller: &str) -> Option<&Path> {
        if let Some(d) = self.v1.get(controller) {
            return Some(d);
        }
        match &self.v2 {
            Some(d) if self.v2_controllers.contains(controller) => Some(d),
            _ => None,
        }
    }

    /// Whether `controller` is served by cgroup2 here.
    pub fn is_v2(&self, controller: &str) -> bool {
        !self.v1.contains_key(controller) && self.v2_controllers.contains(controller)
    }

    /// The cgroup2 directory, if cgroup2 is mounted.
    pub fn v2_dir(&self) -> Option<&Path> {
        self.v2.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw shared:11 - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/my\\040dir rw - cgroup cgroup rw,pids
";

    #[test]
    fn hybrid_mountinfo() {
        let h = Hierarchy::from_mountinfo(HYBRID);
        assert_eq!(h.mode(), Mode::Hybrid);
        let cg = h.cgroup(Path::new("kubepods/pod1/abc"));
        assert_eq!(
            cg.dir("cpuacct").unwrap(),
            Path::new("/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/abc")
        );
        assert_eq!(
            cg.dir("memory").unwrap(),
            Path::new("/sys/fs/cgroup/memory/kubepods/pod1/abc")
        );
        assert_eq!(
            cg.dir("pids").unwrap(),
            Path::new("/sys/fs/cgroup/my dir/kubepods/pod1/abc")
        );
        assert_eq!(
            cg.dir("systemd").unwrap(),
            Path::new("/sys/fs/cgroup/systemd/kubepods/pod1/abc")
        );
        assert!(!cg.is_v2("memory"));
        assert_eq!(
            cg.v2_dir().unwrap(),
            Path::new("/sys/fs/cgroup/unified/kubepods/pod1/abc")
        );
    }

    #[test]
    fn unified_and_legacy_modes() {
        let u = Hierarchy::from_mountinfo(
            "25 1 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        assert_eq!(u.mode(), Mode::Unified);
        let l = Hierarchy::from_mountinfo(
            "34 30 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        );
        assert_eq!(l.mode(), Mode::Legacy);
        assert!(l.cgroup(Path::new("a")).dir("cpu").is_none());
    }

    #[test]
    fn oci_paths() {
        assert_eq!(
            relative_path_of("/kubepods/besteffort/pod1/abc").unwrap(),
            PathBuf::from("kubepods/besteffort/pod1/abc")
        );
        assert_eq!(
            relative_path_of("kubepods-besteffort-pod1.slice:berth:abc").unwrap(),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/berth-abc.scope"
            )
        );
        assert!(relative_path_of("/a/../b").is_err());
        assert!(relative_path_of("a:b").is_err());
        assert!(relative_path_of("x.slice:p:../n").is_err());
    }
}
