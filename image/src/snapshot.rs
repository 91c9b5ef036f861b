//! Overlay snapshots: one directory per unpacked layer, `snapshots/<n>/fs`, shared
//! by chain id across images. The numbered names keep overlay mount options short.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use crate::error::{ImageError, Result};

/// Name prefix of snapshot dirs being deleted.
const TRASH_PREFIX: &str = ".trash-";

/// The directories that hold unpacked layers.
#[derive(Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
}

impl SnapshotStore {
    /// Opens (creating) the store under `dir`; trash left by an interrupted removal is deleted.
    pub fn open(dir: &Path) -> Result<SnapshotStore> {
        // Private: unpacked layers keep setuid files and device nodes.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ImageError::io("creating", dir, e))?;
        let rd = fs::read_dir(dir).map_err(|e| ImageError::io("listing", dir, e))?;
        for ent in rd.flatten() {
            if ent.file_name().to_string_lossy().starts_with(TRASH_PREFIX) {
                let p = ent.path();
                fs::remove_dir_all(&p).map_err(|e| ImageError::io("removing", &p, e))?;
            }
        }
        Ok(SnapshotStore {
            dir: dir.to_path_buf(),
        })
    }

    /// Renames snapshot `n` out of the way (fast, atomic) and returns the path to delete.
    pub fn detach(&self, n: u64) -> Result<Option<PathBuf>> {
        let from = self.dir.join(n.to_string());
        let to = self.dir.join(format!("{TRASH_PREFIX}{n}"));
        match fs::rename(&from, &to) {
            Ok(()) => Ok(Some(to)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io("detaching", &from, e)),
        }
    }

    /// The store's directory (the image filesystem's mountpoint for CRI).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The tree of snapshot `n`: an overlay lowerdir.
    pub fn fs_path(&self, n: u64) -> PathBuf {
        self.dir.join(n.to_string()).join("fs")
    }

    /// Creates the empty tree for snapshot `n`, replacing any leftover.
    pub fn prepare(&self, n: u64) -> Result<PathBuf> {
        self.remove(n)?;
        let fs_dir = self.fs_path(n);
        fs::create_dir_all(&fs_dir).map_err(|e| ImageError::io("creating", &fs_dir, e))?;
        Ok(fs_dir)
    }

    /// Removes snapshot `n` entirely; absent is fine.
    pub fn remove(&self, n: u64) -> Result<()> {
        let d = self.dir.join(n.to_string());
        match fs::remove_dir_all(&d) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io("removing", &d, e)),
        }
    }

    /// Snapshot numbers present on disk, for garbage collection.
    pub fn list(&self) -> Result<Vec<u64>> {
        let rd = fs::read_dir(&self.dir).map_err(|e| ImageError::io("listing", &self.dir, e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| ImageError::io("listing", &self.dir, e))?;
            if let Some(n) = ent.file_name().to_str().and_then(|s| s.parse().ok()) {
                out.push(n);
            }
        }
        Ok(out)
    }
}
