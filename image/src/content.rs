//! The content store: verified blobs under `content/blobs/sha256/<hex>`, written
//! through `content/ingest/` and renamed into place only once verified.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::error::{ImageError, Result};

/// Verified blobs addressed by digest.
#[derive(Debug)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
    next_ingest: AtomicU64,
}

impl ContentStore {
    /// Opens (creating) the store under `dir`; leftovers of interrupted writes are removed.
    pub fn open(dir: &Path) -> Result<ContentStore> {
        let blobs = dir.join("blobs").join("sha256");
        let ingest = dir.join("ingest");
        if ingest.exists() {
            fs::remove_dir_all(&ingest).map_err(|e| ImageError::io("removing", &ingest, e))?;
        }
        for d in [&blobs, &ingest] {
            // Private: berthd's root is passable, and nothing below it may be reachable.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| ImageError::io("creating", d, e))?;
        }
        Ok(ContentStore {
            blobs,
            ingest,
            next_ingest: AtomicU64::new(0),
        })
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.blobs.join(d.hex())
    }

    /// The size of a stored blob, or `None` when absent.
    pub fn size(&self, d: &Digest) -> Option<u64> {
        fs::metadata(self.path(d)).ok().map(|m| m.len())
    }

    /// Reads a whole (small) blob: manifests and configs.
    pub fn read(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.path(d);
        fs::read(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                ImageError::NotFound(format!("blob {d} is not in the content store"))
            }
            _ => ImageError::io("reading", &p, e),
        })
    }

    /// Stores bytes already in memory after checking their digest.
    pub fn put(&self, expected: &Digest, bytes: &[u8]) -> Result<()> {
        let mut w = self.writer(expected.clone())?;
        w.write_all(bytes)
            .map_err(|e| ImageError::io("writing", &w.tmp, e))?;
        w.commit()
    }

    /// Stores bytes unless the blob is already present.
    pub fn put_if_absent(&self, expected: &Digest, bytes: &[u8]) -> Result<()> {
        if self.size(expected).is_some() {
            Ok(())
        } else {
            self.put(expected, bytes)
        }
    }

    /// Starts writing a blob that must hash to `expected`.
    pub fn writer(&self, expected: Digest) -> Result<BlobWriter> {
        let n = self.next_ingest.fetch_add(1, Ordering::Relaxed);
        let tmp = self.ingest.join(format!("{}-{n}", expected.hex()));
        let file = File::create(&tmp).map_err(|e| ImageError::io("creating", &tmp, e))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            dest: self.path(&expected),
            expected,
            hasher: Sha256::new(),
            verified: false,
        })
    }

    /// Deletes a blob; absent is fine.
    pub fn delete(&self, d: &Digest) -> Result<()> {
        let p = self.path(d);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io("removing", &p, e)),
        }
    }

    /// Every blob on disk, for garbage collection.
    pub fn list(&self) -> Result<Vec<Digest>> {
        let rd =
            fs::read_dir(&self.blobs).map_err(|e| ImageError::io("listing", &self.blobs, e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| ImageError::io("listing", &self.blobs, e))?;
            let name = ent.file_name();
            // Anything that is not a digest is not ours to interpret; leave it.
            if let Some(d) = name
                .to_str()
                .and_then(|n| Digest::parse(&format!("sha256:{n}")).ok())
            {
                out.push(d);
            }
        }
        Ok(out)
    }
}

/// A blob being written: hashed as it goes, moved into the store only by `commit`.
/// Dropped without commit, it removes its temporary file.
pub struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    expected: Digest,
    hasher: Sha256,
    /// The digest was checked (the hasher is spent).
    verified: bool,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("blob writer already committed"))?;
        let n = f.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobWriter {
    /// The digest this blob must have.
    pub fn expected(&self) -> &Digest {
        &self.expected
    }

    /// Checks the digest of what was written, then discards it.
    pub fn verify_only(mut self) -> Result<()> {
        self.verify()
    }

    /// Checks the digest of what was written (once); `commit` may follow.
    pub fn verify(&mut self) -> Result<()> {
        if self.verified {
            return Ok(());
        }
        self.check()?;
        self.verified = true;
        Ok(())
    }

    fn check(&mut self) -> Result<()> {
        let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
        if actual != self.expected {
            return Err(ImageError::DigestMismatch(format!(
                "blob {} has digest {actual}: content does not match its digest",
                self.expected
            )));
        }
        Ok(())
    }

    /// Verifies the digest, syncs and renames the blob into place.
    pub fn commit(mut self) -> Result<()> {
        self.verify()?;
        // A blob that is renamed into place must be whole even after a host crash.
        let synced = match &self.file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        };
        synced.map_err(|e| ImageError::io("syncing", &self.tmp, e))?;
        fs::rename(&self.tmp, &self.dest)
            .map_err(|e| ImageError::io("renaming into place", &self.dest, e))?;
        self.file = None; // renamed: nothing left for Drop to remove
        // Make the rename itself durable.
        if let Some(dir) = self.dest.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| ImageError::io("syncing", dir, e))?;
        }
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_verifies_and_drop_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let good = Digest::of(b"hello");
        cs.put(&good, b"hello").unwrap();
        assert_eq!(cs.read(&good).unwrap(), b"hello");
        let err = cs.put(&Digest::of(b"other"), b"hello").unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch(_)));
        assert_eq!(cs.list().unwrap(), vec![good.clone()]);
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
        cs.delete(&good).unwrap();
        cs.delete(&good).unwrap();
        assert!(cs.size(&good).is_none());
    }
}
