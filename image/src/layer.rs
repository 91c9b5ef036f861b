//! One layer's disk work, on a blocking thread: the bytes (a download, teed into the
//! content store, or the stored blob) are decompressed and unpacked into the layer's
//! snapshot dir through a diff-id hasher, verified and synced. The caller records the
//! snapshot, or removes it when the job failed.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::content::BlobWriter;
use crate::digest::Digest;
use crate::error::{ImageError, Result};
use crate::unpack::{UnpackStats, decompress, tree_usage, unpack_layer};

/// Where a layer's bytes come from.
pub(crate) enum LayerSource {
    /// The blob is already stored (only the snapshot is missing).
    Stored(PathBuf),
    /// A download's chunks, written into `blob` as they pass; at most `declared` bytes.
    Download {
        rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
        blob: BlobWriter,
        declared: u64,
    },
}

/// One layer to store and unpack.
pub(crate) struct LayerJob {
    /// `<digest> (<image>)`, for messages.
    pub name: String,
    /// What the uncompressed content must hash to.
    pub diff_id: Digest,
    /// The empty snapshot dir to unpack into; None when only the blob is missing.
    pub target: Option<PathBuf>,
    pub source: LayerSource,
}

impl LayerJob {
    /// Runs the pipeline to the end; `Some(stats)` when it unpacked into the target.
    pub fn run(self) -> Result<Option<UnpackStats>> {
        let LayerJob {
            name,
            diff_id,
            target,
            source,
        } = self;
        let outcome = match source {
            LayerSource::Stored(path) => {
                let mut file =
                    std::fs::File::open(&path).map_err(|e| ImageError::io("opening", &path, e))?;
                read_through(&mut file, target.as_deref(), &diff_id, &name)
            }
            LayerSource::Download { rx, blob, declared } => {
                let mut chan = ChannelReader::new(rx, Some(blob), declared);
                let outcome = read_through(&mut chan, target.as_deref(), &diff_id, &name);
                let outcome = download_failure_wins(&mut chan, outcome);
                // Kept only with a layer that unpacked: a blob that matches its digest
                // but does not inflate (or unpack) is no layer.
                match (outcome, chan.verified.take()) {
                    (Ok(stats), Some(blob)) => blob.commit().map(|()| stats),
                    (outcome, _) => outcome,
                }
            }
        }?;
        match (outcome, &target) {
            (stats, Some(dir)) => {
                let stats = match stats {
                    Some(s) => s,
                    None => tree_usage(dir).map_err(|e| ImageError::io("measuring", dir, e))?,
                };
                // The record must never point at files a power loss could still lose.
                sync_filesystem(dir).map_err(|e| ImageError::io("syncing", dir, e))?;
                Ok(Some(stats))
            }
            (_, None) => Ok(None),
        }
    }
}

/// Unpacks `src` into `target` (if any) and reads it to the end, so that the blob is
/// complete and fully hashed.
fn read_through(
    src: &mut dyn Read,
    target: Option<&Path>,
    diff_id: &Digest,
    name: &str,
) -> Result<Option<UnpackStats>> {
    let stats = match target {
        Some(dir) => {
            let dec = decompress(&mut *src).map_err(|e| stream_error(e, name))?;
            let marks = dec.marks();
            let mut hashing = HashingReader {
                inner: dec,
                hasher: Sha256::new(),
            };
            let stats = unpack_layer(&mut hashing, &marks, dir, name)?;
            let diff = Digest::from_hasher(hashing.hasher);
            if diff != *diff_id {
                return Err(ImageError::DigestMismatch(format!(
                    "layer {name}: uncompressed content has digest {diff}, the config says {diff_id}"
                )));
            }
            Some(stats)
        }
        None => None,
    };
    io::copy(src, &mut io::sink()).map_err(|e| stream_error(e, name))?;
    Ok(stats)
}

/// A failed download (network, size, digest) is the cause of whatever reading found.
/// A corrupt download usually breaks decompression before the digest can be checked:
/// then the rest is read (to verify only, never kept) to report the real cause.
fn download_failure_wins(
    chan: &mut ChannelReader,
    outcome: Result<Option<UnpackStats>>,
) -> Result<Option<UnpackStats>> {
    if let Some(e) = chan.failure.take() {
        return Err(e);
    }
    if matches!(
        outcome,
        Err(ImageError::Unsupported(_) | ImageError::Registry(_))
    ) {
        chan.keep = false;
        let _ = io::copy(chan, &mut io::sink());
        if let Some(e) = chan.failure.take() {
            return Err(e);
        }
    }
    outcome
}

/// Reads the chunks a download sends, writing each into the blob file as it passes.
/// It enforces the declared size and, at the end, the digest.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
    tee: Option<BlobWriter>,
    /// Commit the blob at the end (false: only verify it).
    keep: bool,
    declared: u64,
    received: u64,
    /// Why the download failed, as opposed to what reading its content found.
    failure: Option<ImageError>,
    /// The whole blob, digest checked, waiting for the layer's outcome to be kept.
    verified: Option<BlobWriter>,
}

impl ChannelReader {
    fn new(
        rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
        tee: Option<BlobWriter>,
        declared: u64,
    ) -> Self {
        ChannelReader {
            rx,
            cur: Bytes::new(),
            tee,
            keep: true,
            declared,
            received: 0,
            failure: None,
            verified: None,
        }
    }

    fn fail(&mut self, e: ImageError) -> io::Error {
        let err = io::Error::other(e.to_string());
        self.tee = None; // drops the temp blob
        self.failure.get_or_insert(e);
        err
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failure.is_some() {
            return Err(io::Error::other("download failed"));
        }
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => {
                    self.received += b.len() as u64;
                    if self.received > self.declared {
                        let what = self
                            .tee
                            .as_ref()
                            .map(|w| w.expected().to_string())
                            .unwrap_or_default();
                        return Err(self.fail(ImageError::DigestMismatch(format!(
                            "blob {what} is larger than the {} bytes its descriptor declares",
                            self.declared
                        ))));
                    }
                    if let Some(w) = self.tee.as_mut() {
                        if let Err(e) = io::Write::write_all(w, &b) {
                            let blob = w.expected().to_string();
                            return Err(self.fail(ImageError::io("writing the blob", blob, e)));
                        }
                    }
                    self.cur = b;
                }
                Some(Err(e)) => {
                    let msg = e.to_string();
                    let err = if msg.contains("digest") || msg.contains("Digest") {
                        ImageError::DigestMismatch(format!("download: {msg}"))
                    } else {
                        ImageError::Registry(format!("download interrupted: {msg}"))
                    };
                    return Err(self.fail(err));
                }
                None => {
                    // End of download: the blob must now hash to its digest.
                    if let Some(mut w) = self.tee.take() {
                        if let Err(e) = w.verify() {
                            return Err(self.fail(e));
                        }
                        if self.keep {
                            self.verified = Some(w);
                        }
                    }
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

/// Flushes the filesystem holding `path` (syncfs), so records written after it
/// never point at data a power loss could take back.
fn sync_filesystem(path: &Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    nix::unistd::syncfs(&f).map_err(io::Error::from)
}

/// Hashes what passes through (the uncompressed layer, for its diff id).
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// An I/O error from a layer stream, classified: digest failures stay digest failures.
pub(crate) fn stream_error(e: io::Error, layer: &str) -> ImageError {
    let msg = e.to_string();
    if msg.contains("digest") || msg.contains("Digest") {
        ImageError::DigestMismatch(format!("layer {layer}: {msg}"))
    } else {
        ImageError::Registry(format!("layer {layer}: {msg}"))
    }
}
