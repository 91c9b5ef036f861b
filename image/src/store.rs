//! Image and snapshot metadata in redb (`meta.redb`), mirrored in memory so that
//! `ImageStatus`/`ListImages` never touch the disk. Every change is one write
//! transaction.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{ImageError, Result};

const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("image_counters");
const NEXT_SNAPSHOT: &str = "next_snapshot";

/// One layer of an image as pulled.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    /// Digest of the (compressed) blob.
    pub digest: Digest,
    /// Blob size in bytes.
    pub size: u64,
    /// Media type from the manifest.
    pub media_type: String,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    /// Chain id of the stack up to and including this layer.
    pub chain_id: Digest,
}

/// An image: one config digest (its id) with every name that points at it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// The image id: the config blob's digest.
    pub id: Digest,
    /// `registry/repo:tag` names.
    pub repo_tags: Vec<String>,
    /// `registry/repo@digest` names (manifest or index digest).
    pub repo_digests: Vec<String>,
    /// The platform manifest's digest.
    pub manifest_digest: Digest,
    /// The index the manifest was picked from, if any.
    pub index_digest: Option<Digest>,
    /// Size of the config blob.
    pub config_size: u64,
    /// Layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// The config's `User` field.
    pub user: String,
    /// When this image was first stored (Unix nanoseconds).
    pub created_unix_nanos: i64,
}

impl ImageRecord {
    /// Size as CRI reports it: the blobs (config + compressed layers).
    pub fn size(&self) -> u64 {
        self.layers
            .iter()
            .fold(self.config_size, |acc, l| acc.saturating_add(l.size))
    }

    /// Every blob this image keeps alive.
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        [&self.id, &self.manifest_digest]
            .into_iter()
            .chain(self.index_digest.iter())
            .chain(self.layers.iter().map(|l| &l.digest))
    }
}

/// A complete unpacked layer stack level.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Directory number under `snapshots/`.
    pub n: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Inodes.
    pub inodes: u64,
}

/// redb-backed metadata with an in-memory mirror.
pub struct MetaStore {
    db: Arc<Database>,
    images: RwLock<BTreeMap<Digest, ImageRecord>>,
    snapshots: RwLock<BTreeMap<Digest, SnapshotRecord>>,
}

impl MetaStore {
    /// Loads every record from the database (creating the tables).
    pub fn open(db: Arc<Database>) -> Result<MetaStore> {
        let tx = db.begin_write()?;
        {
            tx.open_table(IMAGES)?;
            tx.open_table(SNAPSHOTS)?;
            tx.open_table(COUNTERS)?;
        }
        tx.commit()?;
        let mut images = BTreeMap::new();
        let mut snapshots = BTreeMap::new();
        let rx = db.begin_read()?;
        for row in rx.open_table(IMAGES)?.iter()? {
            let (_, v) = row?;
            let rec: ImageRecord = serde_json::from_slice(v.value())?;
            images.insert(rec.id.clone(), rec);
        }
        for row in rx.open_table(SNAPSHOTS)?.iter()? {
            let (k, v) = row?;
            let chain = Digest::parse(k.value())?;
            snapshots.insert(chain, serde_json::from_slice(v.value())?);
        }
        Ok(MetaStore {
            db,
            images: RwLock::new(images),
            snapshots: RwLock::new(snapshots),
        })
    }

    /// All images.
    pub fn images(&self) -> Vec<ImageRecord> {
        self.images
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Runs `f` over the images without cloning them.
    pub fn with_images<T>(&self, f: impl FnOnce(&BTreeMap<Digest, ImageRecord>) -> T) -> T {
        match self.images.read() {
            Ok(m) => f(&m),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// The snapshot record for a chain id.
    pub fn snapshot(&self, chain: &Digest) -> Option<SnapshotRecord> {
        self.snapshots
            .read()
            .ok()
            .and_then(|m| m.get(chain).copied())
    }

    /// All snapshot records.
    pub fn snapshots(&self) -> Vec<(Digest, SnapshotRecord)> {
        self.snapshots
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    /// Allocates a fresh snapshot directory number.
    pub fn next_snapshot_number(&self) -> Result<u64> {
        let tx = self.db.begin_write()?;
        let n = {
            let mut t = tx.open_table(COUNTERS)?;
            let n = t.get(NEXT_SNAPSHOT)?.map(|v| v.value()).unwrap_or(1);
            t.insert(NEXT_SNAPSHOT, n + 1)?;
            n
        };
        tx.commit()?;
        Ok(n)
    }

    /// Records a completely unpacked snapshot unless the chain already has one;
    /// returns whether `rec` was stored.
    pub fn put_snapshot_if_absent(&self, chain: &Digest, rec: SnapshotRecord) -> Result<bool> {
        let mut snaps = self.snapshots.write().map_err(poison)?;
        if snaps.contains_key(chain) {
            return Ok(false);
        }
        let tx = self.db.begin_write()?;
        tx.open_table(SNAPSHOTS)?
            .insert(chain.as_str(), serde_json::to_vec(&rec)?.as_slice())?;
        tx.commit()?;
        snaps.insert(chain.clone(), rec);
        Ok(true)
    }

    /// Stores `image`, merging names with an existing record of the same id and
    /// moving each of its tags away from any other image — in one transaction.
    pub fn put_image(&self, image: ImageRecord) -> Result<ImageRecord> {
        let mut images = self.images.write().map_err(poison)?;
        let mut merged = match images.get(&image.id) {
            Some(old) => {
                let mut m = old.clone();
                for t in &image.repo_tags {
                    if !m.repo_tags.contains(t) {
                        m.repo_tags.push(t.clone());
                    }
                }
                for d in &image.repo_digests {
                    if !m.repo_digests.contains(d) {
                        m.repo_digests.push(d.clone());
                    }
                }
                m
            }
            None => image.clone(),
        };
        merged.repo_tags.sort();
        merged.repo_digests.sort();
        let mut changed = vec![merged.clone()];
        for other in images.values() {
            if other.id != image.id && other.repo_tags.iter().any(|t| image.repo_tags.contains(t)) {
                let mut o = other.clone();
                o.repo_tags.retain(|t| !image.repo_tags.contains(t));
                changed.push(o);
            }
        }
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(IMAGES)?;
            for rec in &changed {
                t.insert(rec.id.as_str(), serde_json::to_vec(rec)?.as_slice())?;
            }
        }
        tx.commit()?;
        for rec in changed {
            images.insert(rec.id.clone(), rec);
        }
        Ok(merged)
    }

    /// Deletes an image record; returns it if it existed.
    pub fn delete_image(&self, id: &Digest) -> Result<Option<ImageRecord>> {
        let mut images = self.images.write().map_err(poison)?;
        if !images.contains_key(id) {
            return Ok(None);
        }
        let tx = self.db.begin_write()?;
        tx.open_table(IMAGES)?.remove(id.as_str())?;
        tx.commit()?;
        Ok(images.remove(id))
    }

    /// Deletes snapshot records (their directories are removed by the caller).
    pub fn delete_snapshots(&self, chains: &[Digest]) -> Result<()> {
        if chains.is_empty() {
            return Ok(());
        }
        let mut snaps = self.snapshots.write().map_err(poison)?;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(SNAPSHOTS)?;
            for c in chains {
                t.remove(c.as_str())?;
            }
        }
        tx.commit()?;
        for c in chains {
            snaps.remove(c);
        }
        Ok(())
    }
}

fn poison<T>(_: T) -> ImageError {
    ImageError::Store("metadata lock poisoned by an earlier panic".into())
}
