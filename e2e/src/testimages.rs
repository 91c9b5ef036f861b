//! OCI and Docker images built from local material (in-memory tars) and pushed with oci-client.
//!
//! Everything is deterministic: fixed mtimes, a fixed `created` time, sorted JSON keys and
//! seeded pseudo-random content, so the same builder always yields the same digests.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use anyhow::{Context, Result, anyhow};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub use tar::EntryType;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI uncompressed layer media type.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip layer media type.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer media type.
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker uncompressed layer media type.
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Docker gzip layer media type.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker zstd layer media type (as used by containerd/moby).
pub const DOCKER_LAYER_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";

/// mtime of every tar entry (2023-11-14T22:13:20Z), fixed so digests are reproducible.
pub const ENTRY_MTIME: u64 = 1_700_000_000;
/// `created` of every config and history entry; the same instant as [`ENTRY_MTIME`].
pub const CREATED: &str = "2023-11-14T22:13:20Z";

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

// ---------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------

/// Builds one uncompressed layer tar from a list of entries, written in the order added.
///
/// Names are written verbatim (no normalisation, no `..` checks); names or link targets
/// longer than 100 bytes go into PAX `path`/`linkpath` records. Directory names get a
/// trailing `/`. Every entry has mtime [`ENTRY_MTIME`].
#[derive(Clone, Debug, Default)]
pub struct LayerBuilder {
    entries: Vec<Entry>,
}

#[derive(Clone, Debug)]
struct Entry {
    name: Vec<u8>,
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Clone, Debug)]
enum Kind {
    Dir,
    File(Content),
    Symlink(Vec<u8>),
    Hardlink(Vec<u8>),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
    Raw {
        ty: EntryType,
        link: Vec<u8>,
        data: Vec<u8>,
    },
    /// Bytes written into the archive as they are (whole 512-byte blocks).
    Verbatim(Vec<u8>),
}

#[derive(Clone, Debug)]
enum Content {
    Bytes(Vec<u8>),
    Host(PathBuf),
    Generated { size: u64, seed: u64 },
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries added so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entries were added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn push(mut self, name: &[u8], kind: Kind, mode: u32, uid: u32, gid: u32) -> Self {
        self.entries.push(Entry {
            name: name.to_vec(),
            kind,
            mode,
            uid,
            gid,
            xattrs: Vec::new(),
        });
        self
    }

    /// A directory.
    pub fn dir(self, path: &str, mode: u32, uid: u32, gid: u32) -> Self {
        self.push(path.as_bytes(), Kind::Dir, mode, uid, gid)
    }

    /// A regular file with the given contents.
    pub fn file(self, path: &str, data: impl Into<Vec<u8>>, mode: u32, uid: u32, gid: u32) -> Self {
        let content = Content::Bytes(data.into());
        self.push(path.as_bytes(), Kind::File(content), mode, uid, gid)
    }

    /// A regular file carrying extended attributes, e.g. `&[("user.berth", b"1")]`
    /// (written as PAX `SCHILY.xattr.<name>` records).
    pub fn file_with_xattrs(
        self,
        path: &str,
        data: impl Into<Vec<u8>>,
        mode: u32,
        uid: u32,
        gid: u32,
        xattrs: &[(&str, &[u8])],
    ) -> Self {
        let mut this = self.file(path, data, mode, uid, gid);
        if let Some(e) = this.entries.last_mut() {
            e.xattrs = xattrs
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.to_vec()))
                .collect();
        }
        this
    }

    /// A regular file copied from the host when the tar is written (e.g. `/bin/busybox`), owned by root.
    pub fn add_host_file(
        self,
        path_in_image: &str,
        host_path: impl AsRef<Path>,
        mode: u32,
    ) -> Self {
        let content = Content::Host(host_path.as_ref().to_path_buf());
        self.push(path_in_image.as_bytes(), Kind::File(content), mode, 0, 0)
    }

    /// A root-owned regular file of `size` deterministic bytes derived from `seed`:
    /// mostly pseudo-random with compressible text runs (see [`large_layers`]).
    pub fn generated_file(self, path: &str, size: u64, seed: u64, mode: u32) -> Self {
        let content = Content::Generated { size, seed };
        self.push(path.as_bytes(), Kind::File(content), mode, 0, 0)
    }

    /// A root-owned symlink `path -> target`.
    pub fn symlink(self, path: &str, target: &str) -> Self {
        let kind = Kind::Symlink(target.as_bytes().to_vec());
        self.push(path.as_bytes(), kind, 0o777, 0, 0)
    }

    /// A root-owned hardlink `path` to the earlier entry `target` (a path inside the layer).
    pub fn hardlink(self, path: &str, target: &str) -> Self {
        let kind = Kind::Hardlink(target.as_bytes().to_vec());
        self.push(path.as_bytes(), kind, 0o644, 0, 0)
    }

    /// A root-owned character device.
    pub fn char_device(self, path: &str, major: u32, minor: u32, mode: u32) -> Self {
        self.push(path.as_bytes(), Kind::CharDevice(major, minor), mode, 0, 0)
    }

    /// A root-owned block device.
    pub fn block_device(self, path: &str, major: u32, minor: u32, mode: u32) -> Self {
        self.push(path.as_bytes(), Kind::BlockDevice(major, minor), mode, 0, 0)
    }

    /// A root-owned FIFO.
    pub fn fifo(self, path: &str, mode: u32) -> Self {
        self.push(path.as_bytes(), Kind::Fifo, mode, 0, 0)
    }

    /// A whiteout deleting `path` from lower layers: `whiteout("data/a")` adds empty file `data/.wh.a`.
    pub fn whiteout(self, path: &str) -> Self {
        let path = path.trim_end_matches('/');
        let name = match path.rsplit_once('/') {
            Some((parent, base)) => format!("{parent}/.wh.{base}"),
            None => format!(".wh.{path}"),
        };
        self.file(&name, Vec::new(), 0o644, 0, 0)
    }

    /// An opaque marker hiding lower-layer contents of `dir`: `opaque("opq")` adds `opq/.wh..wh..opq`.
    pub fn opaque(self, dir: &str) -> Self {
        let dir = dir.trim_end_matches('/');
        let name = if dir.is_empty() {
            ".wh..wh..opq".to_string()
        } else {
            format!("{dir}/.wh..wh..opq")
        };
        self.file(&name, Vec::new(), 0o644, 0, 0)
    }

    /// An entry whose name and link bytes go straight into the header, bypassing all path
    /// checks, for malicious layers (`../x`, `/etc/x`, links escaping the rootfs, ...).
    pub fn raw_entry(
        self,
        name: impl AsRef<[u8]>,
        ty: EntryType,
        link: impl AsRef<[u8]>,
        data: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Self {
        let kind = Kind::Raw {
            ty,
            link: link.as_ref().to_vec(),
            data: data.into(),
        };
        self.push(name.as_ref(), kind, mode, 0, 0)
    }

    /// Tar blocks written as they are, for archives no honest writer makes (lying sizes,
    /// huge extension headers). Padded to whole 512-byte blocks.
    pub fn verbatim_blocks(self, mut bytes: Vec<u8>) -> Self {
        bytes.resize(bytes.len().div_ceil(512) * 512, 0);
        self.push(b"", Kind::Verbatim(bytes), 0, 0, 0)
    }

    /// The layer as an uncompressed tar.
    pub fn to_tar(&self) -> Result<Vec<u8>> {
        self.write_tar(Vec::new())
    }

    /// Streams the layer as an uncompressed tar into `w` and returns `w`.
    pub fn write_tar<W: Write>(&self, w: W) -> Result<W> {
        let mut builder = tar::Builder::new(w);
        for entry in &self.entries {
            append_entry(&mut builder, entry)
                .with_context(|| format!("tar entry {}", String::from_utf8_lossy(&entry.name)))?;
        }
        Ok(builder.into_inner()?)
    }
}

fn append_entry<W: Write>(builder: &mut tar::Builder<W>, e: &Entry) -> Result<()> {
    if let Kind::Verbatim(bytes) = &e.kind {
        builder.get_mut().write_all(bytes)?;
        return Ok(());
    }
    let mut name = e.name.clone();
    let (ty, link, data): (EntryType, &[u8], Box<dyn Read + '_>) = match &e.kind {
        Kind::Dir => {
            if !name.ends_with(b"/") {
                name.push(b'/');
            }
            (EntryType::Directory, b"", Box::new(io::empty()))
        }
        Kind::File(content) => (EntryType::Regular, b"", content_reader(content)?),
        Kind::Symlink(target) => (EntryType::Symlink, target, Box::new(io::empty())),
        Kind::Hardlink(target) => (EntryType::Link, target, Box::new(io::empty())),
        Kind::CharDevice(..) => (EntryType::Char, b"", Box::new(io::empty())),
        Kind::BlockDevice(..) => (EntryType::Block, b"", Box::new(io::empty())),
        Kind::Fifo => (EntryType::Fifo, b"", Box::new(io::empty())),
        Kind::Raw { ty, link, data } => (*ty, link, Box::new(data.as_slice())),
        Kind::Verbatim(_) => return Ok(()),
    };
    let size = match &e.kind {
        Kind::File(content) => content_size(content)?,
        Kind::Raw { data, .. } => data.len() as u64,
        _ => 0,
    };

    let mut header = tar::Header::new_ustar();
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let old = header.as_old_mut();
    if name.len() > old.name.len() {
        pax.push(("path".to_string(), name.clone()));
    }
    let n = name.len().min(old.name.len());
    old.name[..n].copy_from_slice(&name[..n]);
    if link.len() > old.linkname.len() {
        pax.push(("linkpath".to_string(), link.to_vec()));
    }
    let n = link.len().min(old.linkname.len());
    old.linkname[..n].copy_from_slice(&link[..n]);
    for (key, value) in &e.xattrs {
        pax.push((format!("SCHILY.xattr.{key}"), value.clone()));
    }

    header.set_entry_type(ty);
    header.set_mode(e.mode);
    header.set_uid(e.uid.into());
    header.set_gid(e.gid.into());
    header.set_mtime(ENTRY_MTIME);
    header.set_size(size);
    if let Kind::CharDevice(major, minor) | Kind::BlockDevice(major, minor) = e.kind {
        header.set_device_major(major)?;
        header.set_device_minor(minor)?;
    }
    header.set_cksum();

    if !pax.is_empty() {
        builder.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    builder.append(&header, data)?;
    Ok(())
}

fn content_size(content: &Content) -> Result<u64> {
    Ok(match content {
        Content::Bytes(b) => b.len() as u64,
        Content::Host(p) => std::fs::metadata(p)
            .with_context(|| format!("stat {}", p.display()))?
            .len(),
        Content::Generated { size, .. } => *size,
    })
}

fn content_reader(content: &Content) -> Result<Box<dyn Read + '_>> {
    Ok(match content {
        Content::Bytes(b) => Box::new(b.as_slice()),
        // `take` guards against the host file growing after we sized the header.
        Content::Host(p) => Box::new(
            File::open(p)
                .with_context(|| format!("open {}", p.display()))?
                .take(content_size(content)?),
        ),
        Content::Generated { size, seed } => Box::new(Generated::new(*size, *seed)),
    })
}

/// Deterministic content: per 128 KiB block, 96 KiB pseudo-random then 32 KiB of text lines.
///
/// Uses its own xorshift-style generator (not `rand`'s SmallRng) because the bytes
/// must never change across crate versions: they determine the image digests.
struct Generated {
    state: u64,
    remaining: u64,
    block: Vec<u8>,
    pos: usize,
    line: u64,
}

const GEN_BLOCK: usize = 128 * 1024;
const GEN_RANDOM: usize = 96 * 1024;

impl Generated {
    fn new(size: u64, seed: u64) -> Self {
        Self {
            state: splitmix64(seed),
            remaining: size,
            block: Vec::with_capacity(GEN_BLOCK),
            pos: 0,
            line: 0,
        }
    }

    fn refill(&mut self) {
        self.block.clear();
        self.pos = 0;
        while self.block.len() < GEN_RANDOM {
            // xorshift64*: fast and good enough that gzip cannot shrink it.
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d);
            self.block.extend_from_slice(&v.to_le_bytes());
        }
        while self.block.len() < GEN_BLOCK {
            let text = format!("berth filler line {:010}\n", self.line);
            self.line += 1;
            let room = GEN_BLOCK - self.block.len();
            self.block
                .extend_from_slice(&text.as_bytes()[..text.len().min(room)]);
        }
    }
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        if self.pos == self.block.len() {
            self.refill();
        }
        let avail = (self.block.len() - self.pos) as u64;
        let n = avail.min(self.remaining).min(buf.len() as u64) as usize;
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    // xorshift must not start from 0.
    (z ^ (z >> 31)) | 1
}

/// Layers for a big throughput image: about `total_bytes` of gzip-compressed data split
/// evenly over `layers` layers, several files each, deterministic for a given `seed`.
///
/// File contents are 75% pseudo-random (incompressible) and 25% text (compresses ~3x),
/// so decompression does real work on both kinds of deflate blocks.
pub fn large_layers(total_bytes: u64, layers: usize, seed: u64) -> Vec<LayerBuilder> {
    const MAX_FILE: u64 = 8 * 1024 * 1024;
    if layers == 0 {
        return Vec::new();
    }
    let per_layer = total_bytes / layers as u64;
    // A 128 KiB block compresses to ~106 KiB with Compression::fast (measured).
    let raw = per_layer * 128 / 106;
    let files = raw.div_ceil(MAX_FILE).max(3);
    (0..layers)
        .map(|l| {
            let dir = format!("bench/l{l:03}");
            let mut layer = LayerBuilder::new()
                .dir("bench", 0o755, 0, 0)
                .dir(&dir, 0o755, 0, 0)
                .file(
                    &format!("{dir}/README"),
                    format!("berth large test layer {l} of {layers}, seed {seed}\n"),
                    0o644,
                    0,
                    0,
                );
            for f in 0..files {
                // The last file takes the rounding remainder so the layer hits `raw` exactly.
                let size = if f + 1 == files {
                    raw - raw / files * (files - 1)
                } else {
                    raw / files
                };
                let file_seed = splitmix64(seed ^ splitmix64(((l as u64) << 32) | f));
                layer = layer.generated_file(&format!("{dir}/f{f:03}.bin"), size, file_seed, 0o644);
            }
            layer
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// gzip (flate2 level "fast").
    Gzip,
    /// zstd (level 3).
    Zstd,
    /// Plain tar.
    None,
}

impl Compression {
    /// The layer media type for this compression in the given manifest flavour.
    pub fn media_type(self, flavour: MediaTypes) -> &'static str {
        match (flavour, self) {
            (MediaTypes::Oci, Compression::Gzip) => OCI_LAYER_GZIP,
            (MediaTypes::Oci, Compression::Zstd) => OCI_LAYER_ZSTD,
            (MediaTypes::Oci, Compression::None) => OCI_LAYER_TAR,
            (MediaTypes::Docker, Compression::Gzip) => DOCKER_LAYER_GZIP,
            (MediaTypes::Docker, Compression::Zstd) => DOCKER_LAYER_ZSTD,
            (MediaTypes::Docker, Compression::None) => DOCKER_LAYER_TAR,
        }
    }
}

/// Manifest flavour: OCI image manifest or Docker schema 2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MediaTypes {
    /// `application/vnd.oci.image.manifest.v1+json` with an OCI config.
    #[default]
    Oci,
    /// `application/vnd.docker.distribution.manifest.v2+json` with a Docker config.
    Docker,
}

impl MediaTypes {
    /// The manifest media type.
    pub fn manifest(self) -> &'static str {
        match self {
            MediaTypes::Oci => OCI_MANIFEST,
            MediaTypes::Docker => DOCKER_MANIFEST,
        }
    }

    /// The config blob media type.
    pub fn config(self) -> &'static str {
        match self {
            MediaTypes::Oci => OCI_CONFIG,
            MediaTypes::Docker => DOCKER_CONFIG,
        }
    }
}

/// An image platform, as in an index entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// e.g. `v8` for arm64.
    pub variant: Option<String>,
}

impl Platform {
    /// A platform from os, architecture and optional variant.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Self {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        }
    }

    fn to_json(&self) -> Value {
        let mut v = json!({"os": self.os, "architecture": self.architecture});
        if let Some(variant) = &self.variant {
            v["variant"] = json!(variant);
        }
        v
    }
}

#[derive(Clone, Debug)]
struct LayerSpec {
    layer: LayerBuilder,
    compression: Compression,
    media_type: Option<String>,
}

#[derive(Clone, Debug)]
struct HistoryItem {
    created_by: String,
    empty_layer: bool,
}

/// Describes an image: layers, runtime config, platform and manifest flavour.
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    layers: Vec<LayerSpec>,
    history: Vec<HistoryItem>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Vec<String>,
    working_dir: Option<String>,
    stop_signal: Option<String>,
    volumes: BTreeSet<String>,
    labels: BTreeMap<String, String>,
    exposed_ports: BTreeSet<String>,
    platform: Platform,
    media_types: MediaTypes,
    annotations: BTreeMap<String, String>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageBuilder {
    /// An image with no layers, empty config, linux/amd64, OCI media types.
    pub fn new() -> Self {
        Self {
            layers: Vec::new(),
            history: Vec::new(),
            user: None,
            entrypoint: None,
            cmd: None,
            env: Vec::new(),
            working_dir: None,
            stop_signal: None,
            volumes: BTreeSet::new(),
            labels: BTreeMap::new(),
            exposed_ports: BTreeSet::new(),
            platform: Platform::new("linux", "amd64", None),
            media_types: MediaTypes::Oci,
            annotations: BTreeMap::new(),
        }
    }

    /// Appends a layer (bottom first) with the flavour's media type for `compression`.
    pub fn layer(mut self, layer: LayerBuilder, compression: Compression) -> Self {
        let n = self.layers.len();
        self.layers.push(LayerSpec {
            layer,
            compression,
            media_type: None,
        });
        self.history.push(HistoryItem {
            created_by: format!("berth-e2e layer {n}"),
            empty_layer: false,
        });
        self
    }

    /// Appends a layer advertised with an arbitrary media type (e.g. an unsupported one).
    pub fn layer_with_media_type(
        self,
        layer: LayerBuilder,
        compression: Compression,
        media_type: &str,
    ) -> Self {
        let mut this = self.layer(layer, compression);
        if let Some(spec) = this.layers.last_mut() {
            spec.media_type = Some(media_type.to_string());
        }
        this
    }

    /// Appends a history entry with `empty_layer: true` (like a Dockerfile `ENV` step).
    pub fn history_step(mut self, created_by: &str) -> Self {
        self.history.push(HistoryItem {
            created_by: created_by.to_string(),
            empty_layer: true,
        });
        self
    }

    /// Sets `config.User`.
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }

    /// Sets `config.Entrypoint`.
    pub fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = Some(args.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Sets `config.Cmd`.
    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = Some(args.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Appends `KEY=VALUE` to `config.Env`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push(format!("{key}={value}"));
        self
    }

    /// Sets `config.WorkingDir`.
    pub fn working_dir(mut self, dir: &str) -> Self {
        self.working_dir = Some(dir.to_string());
        self
    }

    /// Sets `config.StopSignal`, e.g. `SIGINT`.
    pub fn stop_signal(mut self, signal: &str) -> Self {
        self.stop_signal = Some(signal.to_string());
        self
    }

    /// Adds a path to `config.Volumes`.
    pub fn volume(mut self, path: &str) -> Self {
        self.volumes.insert(path.to_string());
        self
    }

    /// Sets a `config.Labels` entry.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// Adds a `config.ExposedPorts` entry, e.g. `8080/tcp`.
    pub fn exposed_port(mut self, port: &str) -> Self {
        self.exposed_ports.insert(port.to_string());
        self
    }

    /// Sets the config's `os`, `architecture` and `variant`.
    pub fn platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    /// Sets the config's `architecture` (default `amd64`).
    pub fn architecture(mut self, arch: &str) -> Self {
        self.platform.architecture = arch.to_string();
        self
    }

    /// Sets the config's `os` (default `linux`).
    pub fn os(mut self, os: &str) -> Self {
        self.platform.os = os.to_string();
        self
    }

    /// Chooses OCI or Docker media types for manifest, config and layers.
    pub fn media_types(mut self, media_types: MediaTypes) -> Self {
        self.media_types = media_types;
        self
    }

    /// Adds a manifest annotation (OCI flavour only; Docker manifests have none).
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }

    /// Writes and compresses all layers (in parallel) and computes config and manifest.
    pub fn build(&self) -> Result<BuiltImage> {
        let layers = self.build_layers()?;
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
        let config_json = self.config_json(&diff_ids);
        let config = serde_json::to_vec(&config_json)?;
        let config_digest = sha256_digest(&config);

        let mut manifest_json = json!({
            "schemaVersion": 2,
            "mediaType": self.media_types.manifest(),
            "config": {
                "mediaType": self.media_types.config(),
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layers
                .iter()
                .map(|l| json!({"mediaType": l.media_type, "digest": l.digest, "size": l.data.len()}))
                .collect::<Vec<_>>(),
        });
        if self.media_types == MediaTypes::Oci && !self.annotations.is_empty() {
            manifest_json["annotations"] = json!(self.annotations);
        }
        let manifest = serde_json::to_vec(&manifest_json)?;
        Ok(BuiltImage {
            manifest_digest: sha256_digest(&manifest),
            manifest_media_type: self.media_types.manifest().to_string(),
            manifest,
            manifest_json,
            config_digest,
            config,
            config_json,
            platform: self.platform.clone(),
            layers,
        })
    }

    fn build_layers(&self) -> Result<Vec<BuiltLayer>> {
        let workers = thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(self.layers.len());
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<Result<BuiltLayer>>>> =
            Mutex::new((0..self.layers.len()).map(|_| None).collect());
        thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(spec) = self.layers.get(i) else {
                            break;
                        };
                        let built = build_layer(spec, self.media_types)
                            .with_context(|| format!("building layer {i}"));
                        if let Ok(mut r) = results.lock() {
                            r[i] = Some(built);
                        }
                    }
                });
            }
        });
        results
            .into_inner()
            .map_err(|_| anyhow!("layer builder thread panicked"))?
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.unwrap_or_else(|| Err(anyhow!("layer {i} was not built"))))
            .collect()
    }

    fn config_json(&self, diff_ids: &[String]) -> Value {
        // Docker encodes sets (ports, volumes) as objects with empty values.
        let set = |items: &BTreeSet<String>| -> Value {
            Value::Object(items.iter().map(|p| (p.clone(), json!({}))).collect())
        };
        let mut cfg = serde_json::Map::new();
        if let Some(user) = &self.user {
            cfg.insert("User".into(), json!(user));
        }
        if !self.exposed_ports.is_empty() {
            cfg.insert("ExposedPorts".into(), set(&self.exposed_ports));
        }
        if !self.env.is_empty() {
            cfg.insert("Env".into(), json!(self.env));
        }
        if let Some(ep) = &self.entrypoint {
            cfg.insert("Entrypoint".into(), json!(ep));
        }
        if let Some(cmd) = &self.cmd {
            cfg.insert("Cmd".into(), json!(cmd));
        }
        if !self.volumes.is_empty() {
            cfg.insert("Volumes".into(), set(&self.volumes));
        }
        if let Some(wd) = &self.working_dir {
            cfg.insert("WorkingDir".into(), json!(wd));
        }
        if !self.labels.is_empty() {
            cfg.insert("Labels".into(), json!(self.labels));
        }
        if let Some(sig) = &self.stop_signal {
            cfg.insert("StopSignal".into(), json!(sig));
        }
        let history: Vec<Value> = self
            .history
            .iter()
            .map(|h| {
                let mut item = json!({"created": CREATED, "created_by": h.created_by});
                if h.empty_layer {
                    item["empty_layer"] = json!(true);
                }
                item
            })
            .collect();
        let mut config = json!({
            "created": CREATED,
            "architecture": self.platform.architecture,
            "os": self.platform.os,
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        if let Some(variant) = &self.platform.variant {
            config["variant"] = json!(variant);
        }
        config
    }

    /// Builds the image and pushes it as `registry/repo:tag`.
    pub async fn push(
        &self,
        registry: &str,
        repo: &str,
        tag: &str,
        auth: Option<(&str, &str)>,
    ) -> Result<PushedImage> {
        self.build()?.push(registry, repo, tag, auth).await
    }

    /// [`ImageBuilder::push`] on a private current-thread runtime; must not be called from async code.
    pub fn push_blocking(
        &self,
        registry: &str,
        repo: &str,
        tag: &str,
        auth: Option<(&str, &str)>,
    ) -> Result<PushedImage> {
        block_on(self.push(registry, repo, tag, auth))
    }
}

/// One built layer blob.
#[derive(Clone, Debug)]
pub struct BuiltLayer {
    /// Media type written in the manifest.
    pub media_type: String,
    /// Digest of the (compressed) blob.
    pub digest: String,
    /// Digest of the uncompressed tar.
    pub diff_id: String,
    /// Size of the uncompressed tar.
    pub uncompressed_size: u64,
    /// The blob bytes.
    pub data: Vec<u8>,
}

fn build_layer(spec: &LayerSpec, flavour: MediaTypes) -> Result<BuiltLayer> {
    let (data, diff_id, uncompressed_size) = match spec.compression {
        Compression::None => {
            let tar = spec.layer.to_tar()?;
            let len = tar.len() as u64;
            (tar, None, len)
        }
        Compression::Gzip => {
            let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let (diff_id, len, enc) = spec.layer.write_tar(HashingWriter::new(enc))?.finish();
            (enc.finish()?, Some(diff_id), len)
        }
        Compression::Zstd => {
            let enc = zstd::Encoder::new(Vec::new(), 3)?;
            let (diff_id, len, enc) = spec.layer.write_tar(HashingWriter::new(enc))?.finish();
            (enc.finish()?, Some(diff_id), len)
        }
    };
    let digest = sha256_digest(&data);
    Ok(BuiltLayer {
        media_type: spec
            .media_type
            .clone()
            .unwrap_or_else(|| spec.compression.media_type(flavour).to_string()),
        // An uncompressed blob is its own diff.
        diff_id: diff_id.unwrap_or_else(|| digest.clone()),
        digest,
        uncompressed_size,
        data,
    })
}

/// Hashes and counts everything written through it, so the uncompressed tar is never held in memory.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    fn finish(self) -> (String, u64, W) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (digest, self.len, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A fully built image: exact manifest/config bytes, digests and layer blobs.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    /// Exact manifest bytes pushed to the registry.
    pub manifest: Vec<u8>,
    /// The manifest parsed back, for assertions.
    pub manifest_json: Value,
    /// The manifest's media type.
    pub manifest_media_type: String,
    /// sha256 of `manifest`.
    pub manifest_digest: String,
    /// Exact config blob bytes.
    pub config: Vec<u8>,
    /// The config parsed back, for assertions.
    pub config_json: Value,
    /// sha256 of `config`: the image id.
    pub config_digest: String,
    /// The platform written in the config.
    pub platform: Platform,
    /// Layer blobs, bottom first.
    pub layers: Vec<BuiltLayer>,
}

/// What was pushed for one image.
#[derive(Clone, Debug)]
pub struct PushedImage {
    /// `127.0.0.1:PORT/repo:tag`, or `127.0.0.1:PORT/repo@sha256:...` for index members.
    pub reference: String,
    /// Digest of the manifest.
    pub manifest_digest: String,
    /// Media type of the manifest.
    pub manifest_media_type: String,
    /// Size of the manifest in bytes.
    pub manifest_size: u64,
    /// Digest of the config blob, i.e. the image id.
    pub config_digest: String,
    /// Layer blob digests, bottom first.
    pub layer_digests: Vec<String>,
    /// Layer blob sizes, bottom first.
    pub layer_sizes: Vec<u64>,
    /// Uncompressed layer digests, bottom first.
    pub diff_ids: Vec<String>,
    /// Sum of the layer blob sizes.
    pub compressed_size: u64,
    /// Sum of the uncompressed layer tar sizes.
    pub uncompressed_size: u64,
    /// The image config.
    pub config_json: Value,
}

/// What was pushed for a multi-platform index.
#[derive(Clone, Debug)]
pub struct PushedIndex {
    /// `127.0.0.1:PORT/repo:tag`.
    pub reference: String,
    /// Digest of the index.
    pub index_digest: String,
    /// The index document.
    pub index_json: Value,
    /// Each platform and its image (pushed by digest), in the order given.
    pub images: Vec<(Platform, PushedImage)>,
}

impl PushedIndex {
    /// The image pushed for `os`/`architecture` (first match, any variant).
    pub fn image_for(&self, os: &str, architecture: &str) -> Option<&PushedImage> {
        self.images
            .iter()
            .find(|(p, _)| p.os == os && p.architecture == architecture)
            .map(|(_, img)| img)
    }
}

impl BuiltImage {
    /// Pushes blobs (skipping ones already present) and the manifest as `registry/repo:tag`.
    pub async fn push(
        &self,
        registry: &str,
        repo: &str,
        tag: &str,
        auth: Option<(&str, &str)>,
    ) -> Result<PushedImage> {
        let reference =
            Reference::with_tag(registry.to_string(), repo.to_string(), tag.to_string());
        let client = connect(&reference, auth).await?;
        self.upload(&client, &reference).await?;
        Ok(self.pushed(format!("{registry}/{repo}:{tag}")))
    }

    /// [`BuiltImage::push`] on a private current-thread runtime; must not be called from async code.
    pub fn push_blocking(
        &self,
        registry: &str,
        repo: &str,
        tag: &str,
        auth: Option<(&str, &str)>,
    ) -> Result<PushedImage> {
        block_on(self.push(registry, repo, tag, auth))
    }

    async fn upload(&self, client: &Client, reference: &Reference) -> Result<()> {
        for layer in &self.layers {
            push_blob(client, reference, &layer.data, &layer.digest).await?;
        }
        push_blob(client, reference, &self.config, &self.config_digest).await?;
        client
            .push_manifest_raw(
                reference,
                self.manifest.clone(),
                self.manifest_media_type
                    .parse()
                    .context("manifest media type as header")?,
            )
            .await
            .with_context(|| format!("pushing manifest to {reference}"))?;
        Ok(())
    }

    fn pushed(&self, reference: String) -> PushedImage {
        PushedImage {
            reference,
            manifest_digest: self.manifest_digest.clone(),
            manifest_media_type: self.manifest_media_type.clone(),
            manifest_size: self.manifest.len() as u64,
            config_digest: self.config_digest.clone(),
            layer_digests: self.layers.iter().map(|l| l.digest.clone()).collect(),
            layer_sizes: self.layers.iter().map(|l| l.data.len() as u64).collect(),
            diff_ids: self.layers.iter().map(|l| l.diff_id.clone()).collect(),
            compressed_size: self.layers.iter().map(|l| l.data.len() as u64).sum(),
            uncompressed_size: self.layers.iter().map(|l| l.uncompressed_size).sum(),
            config_json: self.config_json.clone(),
        }
    }
}

/// Pushes a multi-platform OCI index as `registry/repo:tag`.
///
/// Each image is rebuilt with its config's os/architecture/variant set to the given
/// platform (so one builder can serve several platforms with distinct digests), pushed
/// by digest, then the index is pushed by tag.
pub async fn push_index(
    registry: &str,
    repo: &str,
    tag: &str,
    images: &[(&ImageBuilder, Platform)],
    auth: Option<(&str, &str)>,
) -> Result<PushedIndex> {
    let tag_ref = Reference::with_tag(registry.to_string(), repo.to_string(), tag.to_string());
    let client = connect(&tag_ref, auth).await?;
    let mut pushed = Vec::new();
    let mut entries = Vec::new();
    for (builder, platform) in images {
        let built = (*builder).clone().platform(platform.clone()).build()?;
        let by_digest = Reference::with_digest(
            registry.to_string(),
            repo.to_string(),
            built.manifest_digest.clone(),
        );
        built.upload(&client, &by_digest).await?;
        entries.push(json!({
            "mediaType": built.manifest_media_type,
            "digest": built.manifest_digest,
            "size": built.manifest.len(),
            "platform": platform.to_json(),
        }));
        let reference = format!("{registry}/{repo}@{}", built.manifest_digest);
        pushed.push((platform.clone(), built.pushed(reference)));
    }
    let index_json = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
    });
    let index = serde_json::to_vec(&index_json)?;
    client
        .push_manifest_raw(
            &tag_ref,
            index.clone(),
            OCI_INDEX.parse().context("index media type")?,
        )
        .await
        .with_context(|| format!("pushing index to {tag_ref}"))?;
    Ok(PushedIndex {
        reference: format!("{registry}/{repo}:{tag}"),
        index_digest: sha256_digest(&index),
        index_json,
        images: pushed,
    })
}

/// [`push_index`] on a private current-thread runtime; must not be called from async code.
pub fn push_index_blocking(
    registry: &str,
    repo: &str,
    tag: &str,
    images: &[(&ImageBuilder, Platform)],
    auth: Option<(&str, &str)>,
) -> Result<PushedIndex> {
    block_on(push_index(registry, repo, tag, images, auth))
}

fn block_on<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("creating tokio runtime")?
        .block_on(fut)
}

/// A plain-HTTP client authenticated (if `auth` is given) for pushing to `reference`'s registry.
async fn connect(reference: &Reference, auth: Option<(&str, &str)>) -> Result<Client> {
    // oci-client is built without a rustls provider; a second install attempt just fails harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        // One PUT per blob instead of 4 MiB PATCH chunks; distribution supports both.
        use_monolithic_push: true,
        ..Default::default()
    });
    let auth = match auth {
        Some((user, pass)) => RegistryAuth::Basic(user.to_string(), pass.to_string()),
        None => RegistryAuth::Anonymous,
    };
    client
        .auth(reference, &auth, RegistryOperation::Push)
        .await
        .with_context(|| format!("authenticating to {}", reference.resolve_registry()))?;
    Ok(client)
}

async fn push_blob(
    client: &Client,
    reference: &Reference,
    data: &[u8],
    digest: &str,
) -> Result<()> {
    // Re-pushing a large image to the same repo would otherwise upload it all again.
    if client
        .blob_exists(reference, digest)
        .await
        .with_context(|| format!("checking blob {digest}"))?
    {
        return Ok(());
    }
    client
        .push_blob(reference, data.to_vec(), digest)
        .await
        .with_context(|| format!("pushing blob {digest} to {reference}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .expect("gunzip");
        out
    }

    fn entries(tar: &[u8]) -> Vec<(Vec<u8>, EntryType)> {
        let mut ar = tar::Archive::new(tar);
        ar.entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                (e.path_bytes().into_owned(), e.header().entry_type())
            })
            .collect()
    }

    fn sample_layer() -> LayerBuilder {
        LayerBuilder::new()
            .dir("etc", 0o755, 0, 0)
            .file("etc/hostname", "berth\n", 0o644, 0, 0)
            .file_with_xattrs("etc/x", "x", 0o600, 1000, 1000, &[("user.berth", b"1")])
            .symlink("etc/link", "hostname")
            .hardlink("etc/hard", "etc/hostname")
            .char_device("dev-null", 1, 3, 0o666)
            .fifo("fifo", 0o600)
    }

    #[test]
    fn digests_and_diff_ids_are_right() {
        let img = ImageBuilder::new()
            .layer(sample_layer(), Compression::Gzip)
            .layer(LayerBuilder::new().whiteout("etc/x"), Compression::Zstd)
            .layer(LayerBuilder::new().opaque("etc"), Compression::None)
            .entrypoint(&["/bin/sh"])
            .env("PATH", "/bin")
            .build()
            .expect("build");
        assert_eq!(img.layers.len(), 3);
        let tars = [
            gunzip(&img.layers[0].data),
            zstd::decode_all(img.layers[1].data.as_slice()).expect("unzstd"),
            img.layers[2].data.clone(),
        ];
        for (layer, tar) in img.layers.iter().zip(&tars) {
            assert_eq!(layer.digest, sha256_digest(&layer.data));
            assert_eq!(layer.diff_id, sha256_digest(tar));
            assert_eq!(layer.uncompressed_size, tar.len() as u64);
        }
        assert_eq!(tars[0], sample_layer().to_tar().expect("tar"));
        assert_eq!(img.layers[2].digest, img.layers[2].diff_id);

        assert_eq!(img.config_digest, sha256_digest(&img.config));
        assert_eq!(img.manifest_digest, sha256_digest(&img.manifest));
        let config: Value = serde_json::from_slice(&img.config).expect("config json");
        let diff_ids: Vec<&str> = img.layers.iter().map(|l| l.diff_id.as_str()).collect();
        assert_eq!(config["rootfs"]["diff_ids"], json!(diff_ids));
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(config["history"].as_array().map(Vec::len), Some(3));
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        assert_eq!(config["config"]["Entrypoint"], json!(["/bin/sh"]));
        assert_eq!(config["config"]["Env"], json!(["PATH=/bin"]));

        let manifest: Value = serde_json::from_slice(&img.manifest).expect("manifest json");
        assert_eq!(manifest["config"]["digest"], json!(img.config_digest));
        assert_eq!(manifest["config"]["size"], json!(img.config.len()));
        for (i, layer) in img.layers.iter().enumerate() {
            assert_eq!(manifest["layers"][i]["digest"], json!(layer.digest));
            assert_eq!(manifest["layers"][i]["size"], json!(layer.data.len()));
        }
        let again = ImageBuilder::new()
            .layer(sample_layer(), Compression::Gzip)
            .layer(LayerBuilder::new().whiteout("etc/x"), Compression::Zstd)
            .layer(LayerBuilder::new().opaque("etc"), Compression::None)
            .entrypoint(&["/bin/sh"])
            .env("PATH", "/bin")
            .build()
            .expect("build");
        assert_eq!(again.manifest_digest, img.manifest_digest, "deterministic");
    }

    #[test]
    fn entry_kinds_xattrs_and_long_names() {
        let long = format!("{}/file", "d".repeat(150));
        let tar = sample_layer()
            .file(&long, "long", 0o644, 0, 0)
            .symlink("l", &"t".repeat(200))
            .to_tar()
            .expect("tar");
        let got = entries(&tar);
        let want: Vec<(Vec<u8>, EntryType)> = vec![
            (b"etc/".to_vec(), EntryType::Directory),
            (b"etc/hostname".to_vec(), EntryType::Regular),
            (b"etc/x".to_vec(), EntryType::Regular),
            (b"etc/link".to_vec(), EntryType::Symlink),
            (b"etc/hard".to_vec(), EntryType::Link),
            (b"dev-null".to_vec(), EntryType::Char),
            (b"fifo".to_vec(), EntryType::Fifo),
            (long.clone().into_bytes(), EntryType::Regular),
            (b"l".to_vec(), EntryType::Symlink),
        ];
        assert_eq!(got, want);

        let mut ar = tar::Archive::new(tar.as_slice());
        for e in ar.entries().expect("entries") {
            let mut e = e.expect("entry");
            let path = e.path_bytes().into_owned();
            match path.as_slice() {
                b"etc/x" => {
                    assert_eq!(e.header().uid().expect("uid"), 1000);
                    assert_eq!(e.header().mode().expect("mode"), 0o600);
                    let pax: Vec<(String, Vec<u8>)> = e
                        .pax_extensions()
                        .expect("pax")
                        .expect("has pax")
                        .map(|x| {
                            let x = x.expect("pax record");
                            (x.key().expect("key").to_string(), x.value_bytes().to_vec())
                        })
                        .collect();
                    assert_eq!(
                        pax,
                        vec![("SCHILY.xattr.user.berth".to_string(), b"1".to_vec())]
                    );
                }
                b"etc/hard" => {
                    assert_eq!(e.link_name_bytes().as_deref(), Some(&b"etc/hostname"[..]));
                }
                b"dev-null" => {
                    assert_eq!(e.header().device_major().expect("major"), Some(1));
                    assert_eq!(e.header().device_minor().expect("minor"), Some(3));
                }
                b"l" => {
                    assert_eq!(
                        e.link_name_bytes().as_deref(),
                        Some("t".repeat(200).as_bytes())
                    );
                }
                _ => {}
            }
            assert_eq!(e.header().mtime().expect("mtime"), ENTRY_MTIME);
        }
    }

    #[test]
    fn whiteout_and_opaque_names() {
        let tar = LayerBuilder::new()
            .whiteout("data/a")
            .whiteout("top")
            .opaque("opq")
            .opaque("nested/dir/")
            .to_tar()
            .expect("tar");
        let names: Vec<Vec<u8>> = entries(&tar).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            vec![
                b"data/.wh.a".to_vec(),
                b".wh.top".to_vec(),
                b"opq/.wh..wh..opq".to_vec(),
                b"nested/dir/.wh..wh..opq".to_vec(),
            ]
        );
    }

    #[test]
    fn raw_entry_writes_name_verbatim() {
        let tar = LayerBuilder::new()
            .raw_entry(b"../x", EntryType::Regular, b"", "evil", 0o644)
            .raw_entry(
                "/etc/evil",
                EntryType::Symlink,
                "../../../../etc/passwd",
                "",
                0o777,
            )
            .to_tar()
            .expect("tar");
        // First header's name field, byte for byte.
        assert_eq!(&tar[..5], b"../x\0");
        assert_eq!(&tar[512..516], b"evil");
        let second = &tar[1024..1536];
        assert_eq!(&second[..10], b"/etc/evil\0");
        assert_eq!(&second[157..180], b"../../../../etc/passwd\0");
        let got = entries(&tar);
        assert_eq!(got[0], (b"../x".to_vec(), EntryType::Regular));
        assert_eq!(got[1], (b"/etc/evil".to_vec(), EntryType::Symlink));
    }

    #[test]
    fn docker_vs_oci_media_types() {
        let layer = || LayerBuilder::new().file("a", "a", 0o644, 0, 0);
        let oci = ImageBuilder::new()
            .layer(layer(), Compression::Gzip)
            .layer(layer(), Compression::Zstd)
            .layer(layer(), Compression::None)
            .build()
            .expect("oci");
        let docker = ImageBuilder::new()
            .media_types(MediaTypes::Docker)
            .layer(layer(), Compression::Gzip)
            .build()
            .expect("docker");
        let m = &oci.manifest_json;
        assert_eq!(m["mediaType"], OCI_MANIFEST);
        assert_eq!(m["config"]["mediaType"], OCI_CONFIG);
        assert_eq!(m["layers"][0]["mediaType"], OCI_LAYER_GZIP);
        assert_eq!(m["layers"][1]["mediaType"], OCI_LAYER_ZSTD);
        assert_eq!(m["layers"][2]["mediaType"], OCI_LAYER_TAR);
        assert_eq!(oci.manifest_media_type, OCI_MANIFEST);
        let d = &docker.manifest_json;
        assert_eq!(d["mediaType"], DOCKER_MANIFEST);
        assert_eq!(d["config"]["mediaType"], DOCKER_CONFIG);
        assert_eq!(d["layers"][0]["mediaType"], DOCKER_LAYER_GZIP);
        assert_eq!(docker.manifest_media_type, DOCKER_MANIFEST);
        assert_eq!(d["schemaVersion"], 2);
        // Same layer bytes either way; only the advertised types differ.
        assert_eq!(oci.layers[0].digest, docker.layers[0].digest);

        let custom = ImageBuilder::new()
            .layer_with_media_type(layer(), Compression::None, "application/x-bogus")
            .build()
            .expect("custom");
        assert_eq!(
            custom.manifest_json["layers"][0]["mediaType"],
            "application/x-bogus"
        );
    }

    #[test]
    fn config_fields_and_history() {
        let img = ImageBuilder::new()
            .layer(LayerBuilder::new(), Compression::Gzip)
            .history_step("ENV A=1")
            .layer(LayerBuilder::new().dir("x", 0o755, 0, 0), Compression::Gzip)
            .user("1000:1000")
            .cmd(&["sleep", "inf"])
            .working_dir("/work")
            .stop_signal("SIGINT")
            .volume("/data")
            .label("a", "b")
            .exposed_port("8080/tcp")
            .platform(Platform::new("linux", "arm64", Some("v8")))
            .build()
            .expect("build");
        let c = &img.config_json;
        assert_eq!(c["architecture"], "arm64");
        assert_eq!(c["variant"], "v8");
        assert_eq!(c["config"]["User"], "1000:1000");
        assert_eq!(c["config"]["Cmd"], json!(["sleep", "inf"]));
        assert_eq!(c["config"]["WorkingDir"], "/work");
        assert_eq!(c["config"]["StopSignal"], "SIGINT");
        assert_eq!(c["config"]["Volumes"], json!({"/data": {}}));
        assert_eq!(c["config"]["Labels"], json!({"a": "b"}));
        assert_eq!(c["config"]["ExposedPorts"], json!({"8080/tcp": {}}));
        let history = c["history"].as_array().expect("history");
        assert_eq!(history.len(), 3);
        assert_eq!(history[1]["empty_layer"], true);
        let non_empty = history.iter().filter(|h| h["empty_layer"] != true).count();
        assert_eq!(
            non_empty,
            c["rootfs"]["diff_ids"].as_array().map_or(0, Vec::len)
        );
    }

    #[test]
    fn large_layers_size_and_determinism() {
        let target = 6 * 1024 * 1024;
        let build = |seed| {
            large_layers(target, 2, seed)
                .into_iter()
                .fold(ImageBuilder::new(), |img, l| {
                    img.layer(l, Compression::Gzip)
                })
                .build()
                .expect("build")
        };
        let a = build(7);
        let total: u64 = a.layers.iter().map(|l| l.data.len() as u64).sum();
        let ratio = total as f64 / target as f64;
        assert!(
            (0.9..1.1).contains(&ratio),
            "compressed {total} vs target {target}"
        );
        let uncompressed: u64 = a.layers.iter().map(|l| l.uncompressed_size).sum();
        assert!(uncompressed > total, "some content must be compressible");
        assert_eq!(build(7).manifest_digest, a.manifest_digest);
        assert_ne!(build(8).layers[0].digest, a.layers[0].digest);
        assert_ne!(a.layers[0].digest, a.layers[1].digest);
        let tar = gunzip(&a.layers[0].data);
        let files = entries(&tar)
            .iter()
            .filter(|(_, t)| *t == EntryType::Regular)
            .count();
        assert!(files >= 3, "several files per layer, got {files}");
    }

    /// Sends one HTTP/1.1 request (basic auth `user:pass` if asked) and returns the status.
    fn raw_request(addr: &str, method: &str, path: &str, auth: bool) -> Result<u16> {
        use std::net::TcpStream;
        let mut s = TcpStream::connect(addr)?;
        // base64("user:pass")
        let authz = if auth {
            "Authorization: Basic dXNlcjpwYXNz\r\n"
        } else {
            ""
        };
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{authz}Connection: close\r\n\r\n"
        )?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)?;
        let head = String::from_utf8_lossy(&resp);
        let code = head.split_whitespace().nth(1).context("status")?;
        Ok(code.parse()?)
    }

    /// Needs `docker-registry`; run with `cargo test -p berth-e2e --lib -- --ignored`.
    #[test]
    #[ignore]
    fn push_to_test_registry() -> Result<()> {
        use crate::registry::TestRegistry;
        let dir = tempfile::tempdir()?;
        for auth in [None, Some(("user", "pass"))] {
            let reg = TestRegistry::start(&dir.path().join(format!("{}", auth.is_some())), auth)?;
            let image = ImageBuilder::new()
                .layer(sample_layer(), Compression::Gzip)
                .layer(LayerBuilder::new().whiteout("etc/x"), Compression::Zstd)
                .cmd(&["/bin/true"]);
            let pushed = image.push_blocking(reg.addr(), "berth/test", "v1", auth)?;
            assert_eq!(pushed.reference, format!("{}/berth/test:v1", reg.addr()));
            for digest in &pushed.layer_digests {
                let on_disk = std::fs::read(reg.blob_data_path(digest))?;
                assert_eq!(&sha256_digest(&on_disk), digest);
                assert_eq!(reg.blob_get_count(digest)?, 0);
            }
            // Only 2xx GETs count: not HEADs, not 401 challenges.
            let blob = &pushed.layer_digests[0];
            let path = format!("/v2/berth/test/blobs/{blob}");
            assert_eq!(raw_request(reg.addr(), "HEAD", &path, auth.is_some())?, 200);
            assert_eq!(raw_request(reg.addr(), "GET", &path, auth.is_some())?, 200);
            if auth.is_some() {
                assert_eq!(raw_request(reg.addr(), "GET", &path, false)?, 401);
            }
            assert_eq!(reg.blob_get_count(blob)?, 1);
            // Re-pushing skips existing blobs and yields the same manifest digest.
            let again = image.push_blocking(reg.addr(), "berth/test", "v2", auth)?;
            assert_eq!(again.manifest_digest, pushed.manifest_digest);

            let index = push_index_blocking(
                reg.addr(),
                "berth/multi",
                "latest",
                &[
                    (&image, Platform::new("linux", "amd64", None)),
                    (&image, Platform::new("linux", "arm64", Some("v8"))),
                ],
                auth,
            )?;
            let amd = index.image_for("linux", "amd64").context("amd64")?;
            let arm = index.image_for("linux", "arm64").context("arm64")?;
            assert_ne!(amd.manifest_digest, arm.manifest_digest);
            assert!(reg.blob_data_path(&index.index_digest).exists());
        }
        Ok(())
    }
}
