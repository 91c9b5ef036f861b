//! `ImageService`: pull, look up, list, remove and measure images. Pulls stream each
//! layer from the registry through digest check and decompression straight into its
//! snapshot directory, several layers at once; nothing is held whole in memory.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt, stream};
use oci_client::manifest::OciDescriptor;
use tracing::{debug, info, warn};

use crate::config::ImageServiceConfig;
use crate::content::ContentStore;
use crate::digest::{Digest, chain_ids};
use crate::error::{ImageError, Result};
use crate::layer::{LayerJob, LayerSource, stream_error};
use crate::manifest::{
    ACCEPTED_MANIFEST_TYPES, Descriptor, Document, parse_config, parse_document, pick_platform,
};
use crate::reference::ImageRef;
use crate::registry::{
    ClientPool, Credentials, Endpoint, credentials_for, endpoints, map_error, reference_for,
};
use crate::snapshot::SnapshotStore;
use crate::store::{ImageRecord, LayerRecord, MetaStore, SnapshotRecord};
use crate::unpack::UnpackStats;

/// Largest manifest or config accepted (they are read into memory).
const MAX_SMALL_BLOB: u64 = 8 << 20;

/// Bytes and inodes used by the image filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsUsage {
    /// Bytes used by snapshots and content.
    pub used_bytes: u64,
    /// Inodes used by snapshots and content.
    pub inodes_used: u64,
}

/// What a garbage collection removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Blobs deleted.
    pub blobs: usize,
    /// Snapshots deleted.
    pub snapshots: usize,
}

/// The image service.
pub struct ImageService {
    cfg: ImageServiceConfig,
    content: ContentStore,
    snapshots: SnapshotStore,
    meta: MetaStore,
    pinned: BTreeSet<String>,
    /// Digests (blobs and chain ids) a running pull uses but no image record holds yet.
    leases: Mutex<HashMap<Digest, usize>>,
    pull_locks: KeyedLocks,
    layer_locks: KeyedLocks,
    /// Layer workers running at once, across all pulls (each holds a blocking thread).
    layer_slots: Arc<tokio::sync::Semaphore>,
    /// Held by GC while it decides what is dead, and by pulls while they take leases.
    gc_lock: Mutex<()>,
    clients: ClientPool,
}

/// At most this many layers stream at once over all pulls (berthd allows 64 blocking threads).
const MAX_LAYER_WORKERS: usize = 24;

/// One async mutex per key, created on demand and freed when unused.
#[derive(Default)]
struct KeyedLocks(Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    fn get(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, w| w.strong_count() > 0);
        if let Some(l) = m.get(key).and_then(Weak::upgrade) {
            return l;
        }
        let l = Arc::new(tokio::sync::Mutex::new(()));
        m.insert(key.to_string(), Arc::downgrade(&l));
        l
    }
}

/// Keeps digests out of garbage collection while held.
struct Lease<'a> {
    svc: &'a ImageService,
    keys: Vec<Digest>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut m = self.svc.leases.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            if let Some(c) = m.get_mut(k) {
                *c -= 1;
                if *c == 0 {
                    m.remove(k);
                }
            }
        }
    }
}

/// A manifest resolved on one endpoint.
struct Resolved {
    index: Option<(Digest, Vec<u8>)>,
    manifest_digest: Digest,
    manifest: Vec<u8>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// Everything a layer fetch needs from its pull.
struct FetchCtx {
    client: oci_client::Client,
    oref: oci_client::Reference,
    ep: Endpoint,
    creds: Credentials,
    image: String,
    progress: Option<ProgressSink>,
}

/// Where a pull is, for progress bars.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PullProgress {
    /// The manifest resolved: its layers (digest, compressed size), bottom first.
    Resolved { layers: Vec<(String, u64)> },
    /// Bytes of a layer's blob received so far.
    Downloading {
        digest: String,
        done: u64,
        total: u64,
    },
    /// A layer is stored and unpacked (`present`: it was there already).
    LayerDone { digest: String, present: bool },
}

/// Where progress goes. Nothing waits for it: an update that finds the channel full
/// is dropped (a pull never waits for a progress reader).
pub type ProgressSink = tokio::sync::mpsc::Sender<PullProgress>;

/// Downloading updates at most this often (in bytes received).
const PROGRESS_STEP: u64 = 256 << 10;

impl FetchCtx {
    async fn report(&self, p: PullProgress) {
        if let Some(tx) = &self.progress {
            let _ = tx.try_send(p);
        }
    }
}

impl ImageService {
    /// Opens the stores under `root` using the shared metadata database, then removes
    /// whatever an interrupted pull left behind.
    pub fn open(
        root: &Path,
        db: Arc<redb::Database>,
        cfg: ImageServiceConfig,
    ) -> Result<Arc<ImageService>> {
        let content = ContentStore::open(&root.join("content"))?;
        let snapshots = SnapshotStore::open(&root.join("snapshots"))?;
        let meta = MetaStore::open(db)?;
        let mut pinned = BTreeSet::new();
        for p in &cfg.image.pinned_images {
            pinned.insert(ImageRef::parse(p)?.canonical());
        }
        let svc = Arc::new(ImageService {
            clients: ClientPool::new(cfg.image.max_concurrent_downloads),
            cfg,
            content,
            snapshots,
            meta,
            pinned,
            leases: Mutex::new(HashMap::new()),
            pull_locks: KeyedLocks::default(),
            layer_locks: KeyedLocks::default(),
            layer_slots: Arc::new(tokio::sync::Semaphore::new(MAX_LAYER_WORKERS)),
            gc_lock: Mutex::new(()),
        });
        let st = svc.gc_inner(true)?;
        if st.blobs + st.snapshots > 0 {
            info!(
                blobs = st.blobs,
                snapshots = st.snapshots,
                "removed leftovers of interrupted pulls"
            );
        }
        Ok(svc)
    }

    /// The directory holding snapshots (reported as the image filesystem).
    pub fn snapshots_dir(&self) -> &Path {
        self.snapshots.dir()
    }

    /// Whether an image is pinned by config.
    pub fn is_pinned(&self, rec: &ImageRecord) -> bool {
        rec.repo_tags
            .iter()
            .chain(rec.repo_digests.iter())
            .any(|n| self.pinned.contains(n))
    }

    /// All images.
    pub fn list(&self) -> Vec<ImageRecord> {
        self.meta.images()
    }

    /// Finds an image by id (full or unique hex prefix), `name:tag` or `name@digest`.
    /// `Ok(None)` when there is no such image; what is neither an id nor a reference
    /// PullImage would take is an error, whichever call asks (one rule for all of them).
    pub fn resolve(&self, s: &str) -> Result<Option<ImageRecord>> {
        let bare_hex = s.strip_prefix("sha256:").unwrap_or(s);
        let is_hex = !bare_hex.is_empty()
            && bare_hex.len() <= 64
            && bare_hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if is_hex && bare_hex.len() == 64 {
            let id = Digest::parse(&format!("sha256:{bare_hex}"))?;
            if let Some(r) = self.meta.with_images(|m| m.get(&id).cloned()) {
                return Ok(Some(r));
            }
        }
        let by_name = match ImageRef::parse(s) {
            Ok(r) => {
                let canon = r.canonical();
                self.meta.with_images(|m| {
                    m.values()
                        .find(|i| i.repo_tags.contains(&canon) || i.repo_digests.contains(&canon))
                        .cloned()
                })
            }
            Err(e) if !is_hex => return Err(e),
            Err(_) => None,
        };
        if by_name.is_some() || !is_hex || bare_hex.len() < 6 {
            return Ok(by_name);
        }
        // A truncated id, as `crictl images` prints them: only if unique.
        Ok(self.meta.with_images(|m| {
            let mut it = m.values().filter(|i| i.id.hex().starts_with(bare_hex));
            match (it.next(), it.next()) {
                (Some(one), None) => Some(one.clone()),
                _ => None,
            }
        }))
    }

    /// The image config of a stored image.
    pub fn image_config(&self, rec: &ImageRecord) -> Result<oci_spec::image::ImageConfiguration> {
        let bytes = self.content.read(&rec.id)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::Store(format!("config {}: {e}", rec.id)))
    }

    /// The snapshot directories of an image's layers, bottom first; an error if any is missing.
    pub fn layer_paths(&self, rec: &ImageRecord) -> Result<Vec<std::path::PathBuf>> {
        rec.layers
            .iter()
            .map(|l| {
                self.meta
                    .snapshot(&l.chain_id)
                    .map(|s| self.snapshots.fs_path(s.n))
                    .ok_or_else(|| {
                        ImageError::NotFound(format!(
                            "image {}: layer {} is not unpacked",
                            rec.id, l.chain_id
                        ))
                    })
            })
            .collect()
    }

    /// Pulls an image; an image already present downloads no blob. `server_address`
    /// names the host the credentials belong to (CRI `AuthConfig.server_address`).
    pub async fn pull(
        self: &Arc<Self>,
        reference: &str,
        creds: Credentials,
        server_address: Option<&str>,
    ) -> Result<ImageRecord> {
        self.pull_with_progress(reference, creds, server_address, None)
            .await
    }

    /// `pull`, reporting each layer's progress to `progress`.
    pub async fn pull_with_progress(
        self: &Arc<Self>,
        reference: &str,
        creds: Credentials,
        server_address: Option<&str>,
        progress: Option<ProgressSink>,
    ) -> Result<ImageRecord> {
        let r = ImageRef::parse(reference)?;
        let canonical = r.canonical();
        let secs = self.cfg.image.pull_timeout_secs;
        let fut = self.pull_locked(r, creds, server_address, progress);
        if secs == 0 {
            return fut.await;
        }
        tokio::time::timeout(Duration::from_secs(secs), fut)
            .await
            .map_err(|_| ImageError::Timeout {
                reference: canonical,
                secs,
            })?
    }

    async fn pull_locked(
        self: &Arc<Self>,
        r: ImageRef,
        creds: Credentials,
        server_address: Option<&str>,
        progress: Option<ProgressSink>,
    ) -> Result<ImageRecord> {
        // Concurrent pulls of one reference run one after another: the first downloads,
        // the rest find every blob and snapshot present.
        let lock = self.pull_locks.get(&r.canonical());
        let _guard = lock.lock().await;
        let image = r.canonical();
        let mut best: Option<ImageError> = None;
        let keep = |best: &mut Option<ImageError>, e: ImageError| {
            // Keep the most telling error: a definite answer beats a connection failure.
            if best
                .as_ref()
                .is_none_or(|b| matches!(b, ImageError::Registry(_)))
            {
                *best = Some(e);
            }
        };
        for ep in endpoints(&self.cfg, &r) {
            let client = match self.clients.client_for(&ep) {
                Ok(c) => c,
                Err(e) => {
                    keep(&mut best, e);
                    continue;
                }
            };
            let oref = reference_for(&ep, &r);
            let ep_creds = match credentials_for(&creds, server_address, &ep, &r) {
                Credentials::IdentityToken(t) => {
                    match crate::token::exchange_identity_token(&ep, r.repository(), &t, &image)
                        .await
                    {
                        Ok(access) => Credentials::Bearer(access),
                        Err(e) => {
                            warn!(image, endpoint = ep.host, error = %e, "identity token exchange failed");
                            keep(&mut best, e);
                            continue;
                        }
                    }
                }
                other => other,
            };
            match resolve(&client, &oref, &r, &ep, &ep_creds).await {
                Ok(res) => {
                    debug!(image, endpoint = ep.host, "resolved");
                    let ctx = Arc::new(FetchCtx {
                        client,
                        oref,
                        ep,
                        creds: ep_creds,
                        image,
                        progress,
                    });
                    return self.fetch(&r, ctx, res).await;
                }
                Err(e) => {
                    warn!(image, endpoint = ep.host, error = %e, "resolve failed");
                    keep(&mut best, e);
                }
            }
        }
        Err(best
            .unwrap_or_else(|| ImageError::Registry(format!("no endpoint to pull {image} from"))))
    }

    async fn fetch(
        self: &Arc<Self>,
        r: &ImageRef,
        ctx: Arc<FetchCtx>,
        res: Resolved,
    ) -> Result<ImageRecord> {
        let config_bytes = self.small_blob(&ctx, &res.config).await?;
        let summary = parse_config(&config_bytes, &ctx.image)?;
        if summary.diff_ids.len() != res.layers.len() {
            return Err(ImageError::Unsupported(format!(
                "{}: manifest has {} layers but the config lists {} diff ids",
                ctx.image,
                res.layers.len(),
                summary.diff_ids.len()
            )));
        }
        let chains = chain_ids(&summary.diff_ids);
        let layers: Vec<LayerRecord> = res
            .layers
            .iter()
            .zip(summary.diff_ids.iter().zip(chains))
            .map(|(d, (diff, chain))| LayerRecord {
                digest: d.digest.clone(),
                size: d.size,
                media_type: d.media_type.clone(),
                diff_id: diff.clone(),
                chain_id: chain,
            })
            .collect();
        let mut keys: Vec<Digest> = vec![res.config.digest.clone(), res.manifest_digest.clone()];
        keys.extend(res.index.iter().map(|(d, _)| d.clone()));
        keys.extend(
            layers
                .iter()
                .flat_map(|l| [l.digest.clone(), l.chain_id.clone()]),
        );
        let lease = self.lease(keys);
        let sizes = layers
            .iter()
            .map(|l| (l.digest.to_string(), l.size))
            .collect();
        ctx.report(PullProgress::Resolved { layers: sizes }).await;

        let parallel = self.cfg.image.max_concurrent_downloads.max(1);
        let fetched = stream::iter(
            layers
                .iter()
                .cloned()
                .map(|l| self.ensure_layer(ctx.clone(), l)),
        )
        .buffer_unordered(parallel)
        .try_collect::<Vec<()>>()
        .await;
        if let Err(e) = fetched {
            self.forget_failed_pull(&layers, lease).await;
            return Err(e);
        }

        let svc = self.clone();
        let (r, res_index, manifest_digest, manifest, config_digest) = (
            r.clone(),
            res.index,
            res.manifest_digest,
            res.manifest,
            res.config.digest.clone(),
        );
        let user = summary.user;
        let config_size = config_bytes.len() as u64;
        blocking(move || {
            if let Some((d, bytes)) = &res_index {
                svc.content.put_if_absent(d, bytes)?;
            }
            svc.content.put_if_absent(&manifest_digest, &manifest)?;
            svc.content.put_if_absent(&config_digest, &config_bytes)?;
            let repo_digest =
                r.digested_name(res_index.as_ref().map_or(&manifest_digest, |(d, _)| d));
            let rec = ImageRecord {
                id: config_digest,
                repo_tags: r.tagged_name().into_iter().collect(),
                repo_digests: vec![repo_digest],
                manifest_digest,
                index_digest: res_index.map(|(d, _)| d),
                config_size,
                layers,
                user,
                created_unix_nanos: now_nanos(),
            };
            berth_failpoint::failpoint("pull-before-record");
            let stored = svc.meta.put_image(rec)?;
            info!(image = %r.canonical(), id = %stored.id, "pulled");
            Ok(stored)
        })
        .await
    }

    /// A failed pull keeps nothing (on a full disk, least of all): once every layer job
    /// of it has ended (each holds its layer's lock to its end), what no image and no
    /// other pull uses goes.
    async fn forget_failed_pull(self: &Arc<Self>, layers: &[LayerRecord], lease: Lease<'_>) {
        for l in layers {
            drop(self.layer_locks.get(l.chain_id.as_str()).lock_owned().await);
        }
        drop(lease);
        let svc = self.clone();
        match blocking(move || svc.gc()).await {
            Ok(st) => debug!(
                blobs = st.blobs,
                snapshots = st.snapshots,
                "removed what a failed pull left"
            ),
            Err(e) => warn!(error = %e, "removing what a failed pull left"),
        }
    }

    /// Makes sure one layer's blob and snapshot exist: the blob is downloaded (unless
    /// stored) into a blocking `LayerJob`, which owns the whole outcome, so that a
    /// dropped pull future (timeout, client gone, a sibling layer failed) never leaves
    /// a half-made snapshot or blob.
    async fn ensure_layer(self: &Arc<Self>, ctx: Arc<FetchCtx>, layer: LayerRecord) -> Result<()> {
        // The lock guard moves into the worker: if this future is dropped, the layer
        // stays locked until the worker has finished or cleaned up.
        let guard = self
            .layer_locks
            .get(layer.chain_id.as_str())
            .lock_owned()
            .await;
        let have_snapshot = self.meta.snapshot(&layer.chain_id).is_some();
        let have_blob = self.content.size(&layer.digest).is_some();
        if have_snapshot && have_blob {
            drop(guard);
            let digest = layer.digest.to_string();
            ctx.report(PullProgress::LayerDone {
                digest,
                present: true,
            })
            .await;
            return Ok(());
        }
        // Bound the blocking threads that pulls hold, whatever the number of pulls.
        let permit = self
            .layer_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ImageError::Store("layer worker pool closed".into()))?;
        let target = if have_snapshot {
            None
        } else {
            Some(self.new_snapshot_dir().await?)
        };
        // Few chunks in flight: hyper's chunks can reach hundreds of KiB each, and memory
        // per layer must stay small while several layers stream at once.
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
        let source = if have_blob {
            LayerSource::Stored(self.content.path(&layer.digest))
        } else {
            LayerSource::Download {
                rx,
                blob: self.content.writer(layer.digest.clone())?,
                declared: layer.size,
            }
        };
        let job = LayerJob {
            name: format!("{} ({})", layer.digest, ctx.image),
            diff_id: layer.diff_id.clone(),
            target: target.as_ref().map(|(_, dir)| dir.clone()),
            source,
        };
        let (svc, chain_id) = (self.clone(), layer.chain_id.clone());
        let worker = tokio::task::spawn_blocking(move || -> Result<()> {
            let (_guard, _permit) = (guard, permit);
            let unpacked = job.run();
            svc.settle_snapshot(&chain_id, target.map(|(n, _)| n), unpacked)
        });
        if !have_blob {
            if let Err(e) = feed_download(&ctx, &layer, &tx).await {
                let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                drop(tx);
                let _ = worker.await;
                return Err(e);
            }
        }
        drop(tx);
        worker
            .await
            .map_err(|e| ImageError::Store(format!("unpack worker failed: {e}")))??;
        berth_failpoint::failpoint("pull-layer-settled");
        let digest = layer.digest.to_string();
        ctx.report(PullProgress::LayerDone {
            digest,
            present: false,
        })
        .await;
        Ok(())
    }

    /// A numbered, empty snapshot dir for a layer to unpack into.
    async fn new_snapshot_dir(self: &Arc<Self>) -> Result<(u64, std::path::PathBuf)> {
        let svc = self.clone();
        blocking(move || {
            let n = svc.meta.next_snapshot_number()?;
            Ok((n, svc.snapshots.prepare(n)?))
        })
        .await
    }

    /// Records snapshot `n` once its layer is unpacked (unless another pull recorded the
    /// chain meanwhile), or removes it when the job failed.
    fn settle_snapshot(
        &self,
        chain_id: &Digest,
        n: Option<u64>,
        unpacked: Result<Option<UnpackStats>>,
    ) -> Result<()> {
        let (n, stats) = match (n, unpacked) {
            (Some(n), Ok(Some(stats))) => (n, stats),
            (_, Ok(_)) => return Ok(()),
            (n, Err(e)) => {
                if let Some(n) = n {
                    let _ = self.snapshots.remove(n);
                }
                return Err(e);
            }
        };
        let rec = SnapshotRecord {
            n,
            bytes: stats.bytes,
            inodes: stats.inodes,
        };
        match self.meta.put_snapshot_if_absent(chain_id, rec) {
            Ok(true) => Ok(()),
            // Someone recorded this chain meanwhile; ours is redundant.
            Ok(false) => self.snapshots.remove(n),
            Err(e) => {
                let _ = self.snapshots.remove(n);
                Err(e)
            }
        }
    }

    /// Fetches a manifest-sized blob (from the store if present), verified.
    async fn small_blob(&self, ctx: &FetchCtx, d: &Descriptor) -> Result<Vec<u8>> {
        if let Ok(b) = self.content.read(&d.digest) {
            return Ok(b);
        }
        if d.size > MAX_SMALL_BLOB {
            return Err(ImageError::Unsupported(format!(
                "{}: config {} is too large ({} bytes)",
                ctx.image, d.digest, d.size
            )));
        }
        let desc = OciDescriptor {
            media_type: d.media_type.clone(),
            digest: d.digest.to_string(),
            size: d.size as i64,
            ..Default::default()
        };
        let mut out = Vec::with_capacity(d.size as usize);
        let mut body = ctx
            .client
            .pull_blob_stream(&ctx.oref, &desc)
            .await
            .map_err(|e| map_error(e, &ctx.image, &ctx.ep, &ctx.creds))?;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| stream_error(e, &ctx.image))?;
            if out.len() as u64 + chunk.len() as u64 > d.size {
                return Err(ImageError::DigestMismatch(format!(
                    "{}: config blob {} is larger than its declared {} bytes",
                    ctx.image, d.digest, d.size
                )));
            }
            out.extend_from_slice(&chunk);
        }
        if Digest::of(&out) != d.digest {
            return Err(ImageError::DigestMismatch(format!(
                "{}: config blob does not match {}",
                ctx.image, d.digest
            )));
        }
        Ok(out)
    }

    fn lease(&self, keys: Vec<Digest>) -> Lease<'_> {
        // Under the GC lock: a collection either sees this lease or has finished deciding,
        // in which case whatever it removed is seen as absent and fetched again.
        let _gc = self.gc_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut m = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        for k in &keys {
            *m.entry(k.clone()).or_default() += 1;
        }
        Lease { svc: self, keys }
    }

    /// Removes an image (by any name or id) with all its names, then garbage-collects.
    /// Returns whether an image was found; absent is not an error.
    pub fn remove(&self, s: &str) -> Result<bool> {
        let Some(rec) = self.resolve(s)? else {
            return Ok(false);
        };
        self.meta.delete_image(&rec.id)?;
        let st = self.gc_inner(false)?;
        info!(id = %rec.id, blobs = st.blobs, snapshots = st.snapshots, "removed image");
        Ok(true)
    }

    /// Deletes blobs and snapshots no image references (and no pull holds).
    pub fn gc(&self) -> Result<GcStats> {
        self.gc_inner(false)
    }

    fn gc_inner(&self, startup: bool) -> Result<GcStats> {
        let mut st = GcStats::default();
        let mut trash: Vec<std::path::PathBuf> = Vec::new();
        {
            // Decide and detach under the lock (renames only); delete after releasing it.
            let _g = self.gc_lock.lock().unwrap_or_else(|p| p.into_inner());
            let leased: BTreeSet<Digest> = self
                .leases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect();
            let (blobs, chains) = self.meta.with_images(|m| {
                let blobs: BTreeSet<Digest> = m.values().flat_map(|i| i.blobs().cloned()).collect();
                let chains: BTreeSet<Digest> = m
                    .values()
                    .flat_map(|i| i.layers.iter().map(|l| l.chain_id.clone()))
                    .collect();
                (blobs, chains)
            });
            let dead: Vec<(Digest, SnapshotRecord)> = self
                .meta
                .snapshots()
                .into_iter()
                .filter(|(c, _)| !chains.contains(c) && !leased.contains(c))
                .collect();
            let dead_chains: Vec<Digest> = dead.iter().map(|(c, _)| c.clone()).collect();
            self.meta.delete_snapshots(&dead_chains)?;
            for (_, s) in &dead {
                trash.extend(self.snapshots.detach(s.n)?);
                st.snapshots += 1;
            }
            if startup {
                // Directories without a record were being unpacked when berthd stopped.
                let live: BTreeSet<u64> = self.meta.snapshots().iter().map(|(_, s)| s.n).collect();
                for n in self.snapshots.list()? {
                    if !live.contains(&n) {
                        trash.extend(self.snapshots.detach(n)?);
                        st.snapshots += 1;
                    }
                }
            }
            for d in self.content.list()? {
                if !blobs.contains(&d) && !leased.contains(&d) {
                    self.content.delete(&d)?;
                    st.blobs += 1;
                }
            }
        }
        for t in trash {
            std::fs::remove_dir_all(&t).map_err(|e| ImageError::io("removing", &t, e))?;
        }
        Ok(st)
    }

    /// Bytes and inodes used by snapshots and content.
    pub fn fs_usage(&self) -> FsUsage {
        let mut u = FsUsage::default();
        for (_, s) in self.meta.snapshots() {
            u.used_bytes += s.bytes;
            u.inodes_used += s.inodes + 2; // the snapshot's own two directories
        }
        let blobs: BTreeSet<Digest> = self
            .meta
            .with_images(|m| m.values().flat_map(|i| i.blobs().cloned()).collect());
        for d in blobs {
            if let Some(sz) = self.content.size(&d) {
                u.used_bytes += sz;
                u.inodes_used += 1;
            }
        }
        u
    }
}

/// Resolves `oref` on one endpoint to a platform manifest.
async fn resolve(
    client: &oci_client::Client,
    oref: &oci_client::Reference,
    r: &ImageRef,
    ep: &Endpoint,
    creds: &Credentials,
) -> Result<Resolved> {
    let image = r.canonical();
    let auth = creds.to_oci();
    let (bytes, digest) = client
        .pull_manifest_raw(oref, &auth, ACCEPTED_MANIFEST_TYPES)
        .await
        .map_err(|e| map_error(e, &image, ep, creds))?;
    let top = Digest::of(&bytes);
    if let Some(want) = r.digest() {
        if *want != top {
            return Err(ImageError::DigestMismatch(format!(
                "{image}: manifest has digest {top}, expected {want}"
            )));
        }
    } else if digest != top.as_str() && !digest.is_empty() {
        warn!(image, header = digest, computed = %top, "registry digest header differs; using the computed digest");
    }
    let (index, manifest_digest, manifest) = match parse_document(&bytes, &image)? {
        Document::Index(entries) => {
            let pick = pick_platform(&entries, &image)?;
            let child = oref.clone_with_digest(pick.digest.to_string());
            let (mb, _) = client
                .pull_manifest_raw(&child, &auth, ACCEPTED_MANIFEST_TYPES)
                .await
                .map_err(|e| map_error(e, &image, ep, creds))?;
            if Digest::of(&mb) != pick.digest {
                return Err(ImageError::DigestMismatch(format!(
                    "{image}: platform manifest does not match {}",
                    pick.digest
                )));
            }
            (
                Some((top, bytes.to_vec())),
                pick.digest.clone(),
                mb.to_vec(),
            )
        }
        Document::Manifest { .. } => (None, top, bytes.to_vec()),
    };
    match parse_document(&manifest, &image)? {
        Document::Manifest { config, layers } => Ok(Resolved {
            index,
            manifest_digest,
            manifest,
            config,
            layers,
        }),
        Document::Index(_) => Err(ImageError::Unsupported(format!(
            "{image}: an index inside an index is not supported"
        ))),
    }
}

/// Streams a layer's blob from the registry into the job's channel.
async fn feed_download(
    ctx: &FetchCtx,
    layer: &LayerRecord,
    tx: &tokio::sync::mpsc::Sender<io::Result<Bytes>>,
) -> Result<()> {
    let desc = OciDescriptor {
        media_type: layer.media_type.clone(),
        digest: layer.digest.to_string(),
        size: i64::try_from(layer.size).unwrap_or(i64::MAX),
        ..Default::default()
    };
    let mut blob = ctx
        .client
        .pull_blob_stream(&ctx.oref, &desc)
        .await
        .map_err(|e| map_error(e, &ctx.image, &ctx.ep, &ctx.creds))?;
    let (mut done, mut reported) = (0u64, 0u64);
    while let Some(chunk) = blob.next().await {
        let failed = chunk.is_err();
        done += chunk.as_ref().map_or(0, |c| c.len() as u64);
        if tx.send(chunk).await.is_err() || failed {
            break; // the worker stopped (its error wins) or the download failed
        }
        if let Some(p) = ctx
            .progress
            .as_ref()
            .filter(|_| done - reported >= PROGRESS_STEP)
        {
            reported = done;
            let digest = layer.digest.to_string();
            let _ = p.try_send(PullProgress::Downloading {
                digest,
                done,
                total: layer.size,
            });
        }
    }
    Ok(())
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Store(format!("blocking task failed: {e}")))?
}
