//! Pod cgroup directories: the `cgroup_parent` kubelet gives, as a path in every
//! mounted hierarchy (cgroup v1 controllers and the v2/unified mount). Creates, lists
//! and removes the pod's directories; reading them is `Hierarchy::cgroup`.

use std::io;
use std::path::{Path, PathBuf};

/// Mount points of cgroup hierarchies (v1 and v2), from /proc/self/mounts.
pub fn hierarchies() -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mounts")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect())
}

/// The relative cgroup path for a `cgroup_parent`: cgroupfs paths as given; systemd
/// slice names expanded (`a-b-c.slice` -> `a.slice/a-b.slice/a-b-c.slice`).
pub fn relative_path(cgroup_parent: &str, systemd: bool) -> Result<PathBuf, String> {
    let p = cgroup_parent.trim();
    if p.split('/').any(|c| c == "..") {
        return Err(format!("cgroup_parent {p:?} must not contain '..'"));
    }
    if !systemd {
        return Ok(PathBuf::from(p.trim_start_matches('/')));
    }
    let Some(stem) = p.strip_suffix(".slice") else {
        return Err(format!(
            "cgroup_parent {p:?} must be a systemd slice name (ending in .slice)"
        ));
    };
    // systemd's unit name alphabet and length (unit_name_is_valid).
    let unit_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.' | '\\');
    if stem.is_empty() || p.len() > 255 || !p.chars().all(unit_char) {
        return Err(format!(
            "cgroup_parent {p:?} is not a systemd slice name (letters, digits, ':', '-', '_', '.', '\\'; at most 255)"
        ));
    }
    let mut out = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            return Err(format!("cgroup_parent {p:?} has an empty slice component"));
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        out.push(format!("{prefix}.slice"));
    }
    Ok(out)
}

/// Held while pod cgroup trees are made or removed: a removal's rmdir of a parent
/// that is empty for a moment would otherwise pull it from under a creation that found
/// it existing and is about to make its child (ENOENT).
static TREE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Creates `rel` in every hierarchy; returns the directories that did not exist before
/// (the ones berth must remove later) and all of them (to join).
pub fn create(rel: &Path) -> io::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let _tree = TREE.lock().unwrap_or_else(|p| p.into_inner());
    let mut created = Vec::new();
    let mut all = Vec::new();
    for h in hierarchies()? {
        let mut cur = h.clone();
        for c in rel.components() {
            let parent = cur.clone();
            cur.push(c);
            // A parent found existing may have been trimmed since (see ensure_dir).
            let mut made = std::fs::create_dir(&cur);
            for _ in 0..8 {
                match &made {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        made = ensure_dir(&parent).and_then(|()| std::fs::create_dir(&cur));
                    }
                    _ => break,
                }
            }
            match made {
                Ok(()) => created.push(cur.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    remove_dirs(&created);
                    return Err(io::Error::new(
                        e.kind(),
                        format!("creating cgroup {}: {e}", cur.display()),
                    ));
                }
            }
            // Every level, not only new ones: a concurrent creator of a parent may not
            // have filled it yet when we found it existing.
            inherit_cpuset(&parent, &cur);
        }
        all.push(cur);
    }
    Ok((created, all))
}

/// Makes `dir` again if it is gone, with any missing parents (cpusets filled in), as
/// runc does before it joins: systemd on cgroup v1 trims empty cgroups in the
/// hierarchies of controllers it turns off (cpu, blkio: `cg_trim_v1_controllers`), so
/// a pod's fresh, still empty directory can vanish before its first process joins.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = dir;
    while !cur.exists() {
        missing.push(cur);
        cur = cur
            .parent()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup hierarchy"))?;
    }
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = d.parent() {
            inherit_cpuset(parent, d);
        }
    }
    Ok(())
}

/// A new v1 cpuset cgroup starts empty and takes no tasks until it has cpus and mems.
fn inherit_cpuset(parent: &Path, child: &Path) {
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let c = child.join(f);
        if c.exists() && std::fs::read_to_string(&c).is_ok_and(|v| v.trim().is_empty()) {
            if let Ok(v) = std::fs::read_to_string(parent.join(f)) {
                let _ = std::fs::write(&c, v.trim());
            }
        }
    }
}

/// Removes directories (deepest first); ones still in use are left.
pub fn remove(dirs: &[PathBuf]) {
    let _tree = TREE.lock().unwrap_or_else(|p| p.into_inner());
    remove_dirs(dirs)
}

fn remove_dirs(dirs: &[PathBuf]) {
    let mut v: Vec<&PathBuf> = dirs.iter().collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for d in v {
        let _ = std::fs::remove_dir(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_dir_makes_what_was_trimmed() {
        let tmp = tempfile::tempdir().unwrap();
        let leaf = tmp.path().join("scope/pod1");
        ensure_dir(&leaf).unwrap();
        assert!(leaf.is_dir());
        // Present already: nothing to do, no error.
        ensure_dir(&leaf).unwrap();
        std::fs::remove_dir(&leaf).unwrap();
        ensure_dir(&leaf).unwrap();
        assert!(leaf.is_dir());
    }

    #[test]
    fn systemd_names_expand() {
        assert_eq!(
            relative_path("kubepods-burstable-pod12.slice", true).unwrap(),
            PathBuf::from("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice")
        );
        assert_eq!(
            relative_path("/kubepods/besteffort/pod1", false).unwrap(),
            PathBuf::from("kubepods/besteffort/pod1")
        );
        assert!(relative_path("/a/../b", false).is_err());
        assert!(relative_path("kubepods", true).is_err());
        assert!(relative_path("a--b.slice", true).is_err());
        assert!(relative_path("a b.slice", true).is_err());
        assert!(relative_path("a/b.slice", true).is_err());
        assert!(relative_path(&format!("{}.slice", "a".repeat(250)), true).is_err());
    }
}
