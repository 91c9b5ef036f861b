//! The directories under `root` and `state`, and the modes that keep them private to root.
//!
//! Image layers keep their setuid binaries and device nodes, container rootfs overlays are
//! mounted as they must be for the container (suid, dev), and records and bundles hold env
//! values from Secrets. So, as containerd does since CVE-2021-41103 and CVE-2024-25621, the
//! two tops are 0711 (passable, not listable) and every subtree below them is 0700: no local
//! user can reach a file inside, whatever its own mode. The modes are enforced at every
//! start, so an install made by an older berth is tightened too.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of `root` and `state` themselves.
pub const TOP_MODE: u32 = 0o711;
/// Mode of every directory berth keeps under them.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of the records file and of bundles' `config.json`.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Subdirectories of `root`: blobs, unpacked layers, container upper dirs, pod files.
pub const ROOT_DIRS: &[&str] = &["content", "snapshots", "containers", "sandboxes"];
/// Subdirectories of `state`: shim sockets, pod state (shm, shim dirs), pinned netns,
/// bundles with their rootfs mounts, runtime state roots, marks of the systemd slices
/// berth started.
pub const STATE_DIRS: &[&str] = &[
    "s",
    "sandboxes",
    "netns",
    "containers",
    "runtimes",
    "slices",
];

/// The records file under `root`.
pub const RECORDS_FILE: &str = "meta.redb";

/// Where each pod's and container's files are, under `root` and `state`. Every id
/// passed in has been validated (hex) by the caller.
#[derive(Clone, Debug)]
pub struct Paths {
    root: PathBuf,
    state: PathBuf,
}

impl Paths {
    /// The layout under these two dirs.
    pub fn new(root: &Path, state: &Path) -> Paths {
        Paths {
            root: root.to_path_buf(),
            state: state.to_path_buf(),
        }
    }

    /// A pod's persistent files: hostname, hosts, resolv.conf, the CNI cache.
    pub fn sandbox_root(&self, id: &str) -> PathBuf {
        self.root.join("sandboxes").join(id)
    }

    /// A pod's runtime state: /dev/shm, the shim's dir.
    pub fn sandbox_state(&self, id: &str) -> PathBuf {
        self.state.join("sandboxes").join(id)
    }

    /// The list of pod cgroups RunPodSandbox created, written as soon as they exist so
    /// that the startup sweep can remove them without a record.
    pub fn created_cgroups(&self, id: &str) -> PathBuf {
        self.sandbox_state(id).join("created-cgroups.json")
    }

    /// Under the systemd driver, one empty file per slice berth started (its unit
    /// name), so that berth stops it once no pod needs it; lost with the slices at reboot.
    pub fn started_slices(&self) -> PathBuf {
        self.state.join("slices")
    }

    /// The pod's shim state dir (exit records, logs, pid files, console sockets, FIFOs).
    pub fn shim_dir(&self, id: &str) -> PathBuf {
        self.sandbox_state(id).join("shim")
    }

    /// Short on purpose: a unix socket path must fit in 108 bytes (sun_path), so it is
    /// `<state>/s/<first 16 hex of the id>` rather than inside the sandbox dir.
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        self.shim_sockets().join(&id[..16.min(id.len())])
    }

    /// The dir of every shim socket.
    pub fn shim_sockets(&self) -> PathBuf {
        self.state.join("s")
    }

    /// A pod's pinned network namespace.
    pub fn netns(&self, id: &str) -> PathBuf {
        self.state.join("netns").join(id)
    }

    /// The pod's CNI attachment cache: persistent (in `root`), so that DEL can release
    /// IPAM leases even after a reboot.
    pub fn cni_cache(&self, id: &str) -> PathBuf {
        self.sandbox_root(id).join("cni.json")
    }

    /// The pod's /dev/shm mount.
    pub fn shm(&self, id: &str) -> PathBuf {
        self.sandbox_state(id).join("shm")
    }

    /// A container's writable layer (`upper`, `work`) and volume dirs.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.root.join("containers").join(id)
    }

    /// The parent of every container dir (the writable layers' filesystem).
    pub fn containers_root(&self) -> PathBuf {
        self.root.join("containers")
    }

    /// A container's OCI bundle: `config.json` and the `rootfs` mount.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.state.join("containers").join(id)
    }

    /// Every container bundle's parent.
    pub fn bundles_root(&self) -> PathBuf {
        self.state.join("containers")
    }

    /// Every pod's persistent and runtime dirs' parents and the netns dir.
    pub fn sandbox_roots(&self) -> [PathBuf; 3] {
        [
            self.root.join("sandboxes"),
            self.state.join("sandboxes"),
            self.state.join("netns"),
        ]
    }
}

/// A directory or file that could not be made private.
#[derive(Debug, thiserror::Error)]
#[error("{context} {}: {source}", path.display())]
pub struct LayoutError {
    context: &'static str,
    path: PathBuf,
    source: io::Error,
}

fn at(context: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LayoutError {
    let path = path.to_path_buf();
    move |source| LayoutError {
        context,
        path,
        source,
    }
}

/// Creates `root` and `state` with their subdirectories and the records file, and brings
/// the modes of whatever already exists to the private ones.
pub fn prepare(root: &Path, state: &Path) -> Result<(), LayoutError> {
    for (top, subdirs) in [(root, ROOT_DIRS), (state, STATE_DIRS)] {
        ensure_dir(top, TOP_MODE)?;
        for d in subdirs {
            ensure_dir(&top.join(d), PRIVATE_DIR_MODE)?;
        }
    }
    ensure_private_file(&root.join(RECORDS_FILE))?;
    tighten_bundles(&state.join("containers"))
}

/// A directory with exactly `mode` (not subject to the umask), created if missing.
pub fn ensure_dir(path: &Path, mode: u32) -> Result<(), LayoutError> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(at("creating", path))?;
    let meta = std::fs::metadata(path).map_err(at("reading", path))?;
    set_mode(path, meta.mode(), mode)
}

/// A file only root can read, created empty if missing (never with a wider mode first).
pub fn ensure_private_file(path: &Path) -> Result<(), LayoutError> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)
        .map_err(at("opening", path))?;
    let meta = file.metadata().map_err(at("reading", path))?;
    if meta.mode() & 0o7777 != PRIVATE_FILE_MODE {
        file.set_permissions(Permissions::from_mode(PRIVATE_FILE_MODE))
            .map_err(at("chmod", path))?;
    }
    Ok(())
}

/// Writes a file only root can read (a bundle's `config.json`), replacing its content.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)?;
    file.write_all(bytes)
}

/// `config.json` of bundles written by an older berth: 0600.
fn tighten_bundles(dir: &Path) -> Result<(), LayoutError> {
    let entries = std::fs::read_dir(dir).map_err(at("listing", dir))?;
    for entry in entries.flatten() {
        let spec = entry.path().join("config.json");
        if let Ok(meta) = std::fs::symlink_metadata(&spec)
            && meta.is_file()
        {
            set_mode(&spec, meta.mode(), PRIVATE_FILE_MODE)?;
        }
    }
    Ok(())
}

fn set_mode(path: &Path, current: u32, mode: u32) -> Result<(), LayoutError> {
    if current & 0o7777 == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, Permissions::from_mode(mode)).map_err(at("chmod", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn fresh_layout_is_private() {
        let d = tempfile::tempdir().unwrap();
        let (root, state) = (d.path().join("root"), d.path().join("run/state"));
        prepare(&root, &state).unwrap();
        assert_eq!(mode(&root), 0o711);
        assert_eq!(mode(&state), 0o711);
        for s in ROOT_DIRS {
            assert_eq!(mode(&root.join(s)), 0o700, "{s}");
        }
        for s in STATE_DIRS {
            assert_eq!(mode(&state.join(s)), 0o700, "{s}");
        }
        assert_eq!(mode(&root.join(RECORDS_FILE)), 0o600);
    }

    #[test]
    fn existing_install_is_tightened() {
        let d = tempfile::tempdir().unwrap();
        let (root, state) = (d.path().join("root"), d.path().join("state"));
        for p in [root.join("snapshots/1/fs"), state.join("containers/abc")] {
            std::fs::create_dir_all(&p).unwrap();
        }
        for p in [
            &root,
            &root.join("snapshots"),
            &state,
            &state.join("containers"),
        ] {
            std::fs::set_permissions(p, Permissions::from_mode(0o755)).unwrap();
        }
        let spec = state.join("containers/abc/config.json");
        std::fs::write(&spec, "{}").unwrap();
        std::fs::write(root.join(RECORDS_FILE), "x").unwrap();
        for f in [&spec, &root.join(RECORDS_FILE)] {
            std::fs::set_permissions(f, Permissions::from_mode(0o644)).unwrap();
        }
        prepare(&root, &state).unwrap();
        assert_eq!(mode(&root), 0o711);
        assert_eq!(mode(&root.join("snapshots")), 0o700);
        assert_eq!(mode(&state.join("containers")), 0o700);
        assert_eq!(mode(&spec), 0o600);
        assert_eq!(mode(&root.join(RECORDS_FILE)), 0o600);
        // Content is left as it is: only the parents are closed.
        assert_eq!(mode(&root.join("snapshots/1/fs")), 0o755);
        assert_eq!(std::fs::read(root.join(RECORDS_FILE)).unwrap(), b"x");
    }

    #[test]
    fn a_file_where_a_dir_belongs_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("content"), "").unwrap();
        let e = prepare(&root, &d.path().join("state")).unwrap_err();
        assert!(e.to_string().contains("root/content"), "{e}");
    }
}
