//! Layer unpacking into a snapshot directory: OCI whiteouts become overlayfs
//! whiteouts, and no entry may write outside the directory.

use std::ffi::CString;
use std::fs;
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::unistd::{Gid, Uid, fchownat};

use crate::error::{ImageError, Result};
use crate::tarmodel::{Marks, TarGuard, check_entry};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// What an unpacked layer takes on disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Bytes of regular file content.
    pub bytes: u64,
    /// Entries created.
    pub inodes: u64,
}

/// A decompressed layer stream, its tar structure followed as it passes (`tarmodel`).
pub struct TarStream<'a> {
    reader: Box<dyn Read + 'a>,
    marks: Marks,
}

impl TarStream<'_> {
    /// Where the guard saw each entry's data, for the unpacker to check.
    pub fn marks(&self) -> Marks {
        self.marks.clone()
    }
}

impl Read for TarStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

/// Wraps a layer stream in the decompressor its first bytes call for (gzip, zstd or plain
/// tar), then in the tar guard.
pub fn decompress<'a, R: Read + 'a>(mut reader: R) -> io::Result<TarStream<'a>> {
    // A single read may return fewer bytes than the magic numbers; read until 4 or EOF.
    let mut head = [0u8; 4];
    let mut n = 0;
    while n < head.len() {
        match reader.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let head = &head[..n];
    let buf = BufReader::with_capacity(256 * 1024, io::Cursor::new(head.to_vec()).chain(reader));
    let marks = Marks::default();
    let reader: Box<dyn Read + 'a> = if head.starts_with(&[0x1f, 0x8b]) {
        let gz = flate2::bufread::MultiGzDecoder::new(buf);
        Box::new(TarGuard::new(gz, marks.clone()))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let zs = zstd::stream::read::Decoder::with_buffer(buf)?;
        Box::new(TarGuard::new(zs, marks.clone()))
    } else {
        Box::new(TarGuard::new(buf, marks.clone()))
    };
    Ok(TarStream { reader, marks })
}

/// Unpacks the (uncompressed) tar stream `reader` into `dest`. `layer` names the
/// layer in errors. The stream is read to its end so that a hashing reader below
/// sees every byte.
pub fn unpack_layer<R: Read>(
    reader: R,
    marks: &Marks,
    dest: &Path,
    layer: &str,
) -> Result<UnpackStats> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let mut stats = UnpackStats::default();
    let tar_err = |e: io::Error| tar_error(layer, e);
    let result = (|| {
        for entry in archive.entries().map_err(tar_err)? {
            let mut entry = entry.map_err(tar_err)?;
            check_entry(marks, entry.raw_file_position(), entry.size())
                .map_err(|why| ImageError::Unsupported(format!("layer {layer}: {why}")))?;
            unpack_entry(&mut entry, dest, layer, &mut stats)?;
        }
        // Drain the padding after the end-of-archive marker so hashes cover the whole stream.
        io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(tar_err)?;
        Ok(stats)
    })();
    // The guard's refusal is the cause, whatever entry the tar crate was on.
    match (result, marks.borrow().refused.clone()) {
        (Err(_), Some(why)) => Err(ImageError::Unsupported(format!("layer {layer}: {why}"))),
        (r, _) => r,
    }
}

fn tar_error(layer: &str, e: io::Error) -> ImageError {
    ImageError::Unsupported(format!("layer {layer}: reading tar: {e}"))
}

/// Where one entry goes in the snapshot, and how its errors name it.
struct Placed<'a> {
    dest: &'a Path,
    layer: &'a str,
    /// The entry's name as the archive has it.
    shown: String,
    /// Its clean relative path.
    rel: PathBuf,
    /// `dest/rel`.
    path: PathBuf,
}

impl Placed<'_> {
    fn refuse(&self, reason: &str) -> ImageError {
        ImageError::UnsafeLayerEntry {
            layer: self.layer.to_string(),
            entry: self.shown.clone(),
            reason: reason.to_string(),
        }
    }

    fn io(&self, context: &'static str, e: io::Error) -> ImageError {
        ImageError::io(context, &self.path, e)
    }

    fn name(&self) -> &[u8] {
        self.rel
            .file_name()
            .map(|n| n.as_bytes())
            .unwrap_or_default()
    }

    fn parent(&self) -> PathBuf {
        self.dest.join(self.rel.parent().unwrap_or(Path::new("")))
    }

    fn make_parents(&self) -> Result<()> {
        mkdir_parents(self.dest, &self.rel).map_err(|e| self.io("creating parents of", e))
    }
}

/// One entry: an opaque marker, a whiteout, or a file system object.
fn unpack_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dest: &Path,
    layer: &str,
    stats: &mut UnpackStats,
) -> Result<()> {
    let raw = entry.path_bytes().into_owned();
    let mut placed = Placed {
        dest,
        layer,
        shown: String::from_utf8_lossy(&raw).into_owned(),
        rel: PathBuf::new(),
        path: PathBuf::new(),
    };
    placed.rel = match relative_path(&raw).map_err(|r| placed.refuse(r))? {
        Some(rel) => rel,
        None => return Ok(()), // the archive root "./"
    };
    placed.path = dest.join(&placed.rel);
    check_parents(dest, &placed.rel).map_err(|r| placed.refuse(&r))?;
    let name = placed.name().to_vec();
    if name == OPAQUE_MARKER.as_bytes() {
        placed.make_parents()?;
        set_xattr(&placed.parent(), "trusted.overlay.opaque", b"y")
            .map_err(|e| placed.io("marking opaque", e))?;
    } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        if hidden.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return Ok(()); // aufs metadata (.wh..wh.plnk, .wh..wh.aufs): nothing to create
        }
        whiteout(&placed, hidden, entry)?;
    } else if !unpack_object(&placed, entry, stats)? {
        return Ok(());
    }
    stats.inodes += 1;
    Ok(())
}

/// An OCI whiteout as overlayfs has it: a 0/0 character device in place of the name.
fn whiteout<R: Read>(placed: &Placed<'_>, hidden: &[u8], entry: &tar::Entry<'_, R>) -> Result<()> {
    if hidden.is_empty() || hidden == b"." || hidden == b".." {
        return Err(placed.refuse("whiteout of an invalid name"));
    }
    placed.make_parents()?;
    let target = placed.parent().join(std::ffi::OsStr::from_bytes(hidden));
    remove_existing(&target).map_err(|e| ImageError::io("replacing", &target, e))?;
    mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
        .map_err(|e| ImageError::io("creating whiteout", &target, e.into()))?;
    chown(&target, entry).map_err(|e| ImageError::io("chown", &target, e))
}

/// A directory, file, link or node; false for entries that carry no file (PAX and GNU
/// extension headers are folded into entries by the tar crate; global headers and
/// unknown types are skipped).
fn unpack_object<R: Read>(
    placed: &Placed<'_>,
    entry: &mut tar::Entry<'_, R>,
    stats: &mut UnpackStats,
) -> Result<bool> {
    placed.make_parents()?;
    let path = &placed.path;
    let kind = entry.header().entry_type();
    match kind {
        tar::EntryType::Directory => {
            if fs::symlink_metadata(path).is_ok_and(|m| !m.is_dir()) {
                remove_existing(path).map_err(|e| placed.io("replacing", e))?;
            }
            entry
                .unpack(path)
                .map_err(|e| placed.io("unpacking directory", e))?;
        }
        tar::EntryType::Regular
        | tar::EntryType::Continuous
        | tar::EntryType::GNUSparse
        | tar::EntryType::Symlink => {
            remove_existing(path).map_err(|e| placed.io("replacing", e))?;
            entry.unpack(path).map_err(|e| placed.io("unpacking", e))?;
            if kind != tar::EntryType::Symlink {
                stats.bytes += entry.size();
            }
        }
        tar::EntryType::Link => hard_link(placed, entry)?,
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            special_node(placed, entry, kind)?
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// A hard link, only to a non-directory inside the snapshot.
fn hard_link<R: Read>(placed: &Placed<'_>, entry: &tar::Entry<'_, R>) -> Result<()> {
    let target_raw = entry
        .link_name_bytes()
        .map(|b| b.into_owned())
        .ok_or_else(|| placed.refuse("hard link without a target"))?;
    let target_rel = relative_path(&target_raw)
        .map_err(|r| placed.refuse(&format!("hard link target: {r}")))?
        .ok_or_else(|| placed.refuse("hard link to the layer root"))?;
    check_parents(placed.dest, &target_rel)
        .map_err(|r| placed.refuse(&format!("hard link target: {r}")))?;
    let target = placed.dest.join(&target_rel);
    if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
        return Err(placed.refuse("hard link to a directory"));
    }
    remove_existing(&placed.path).map_err(|e| placed.io("replacing", e))?;
    fs::hard_link(&target, &placed.path).map_err(|e| placed.io("hard-linking", e))
}

/// A character or block device or a FIFO, with the layer's owner and mode.
fn special_node<R: Read>(
    placed: &Placed<'_>,
    entry: &tar::Entry<'_, R>,
    kind: tar::EntryType,
) -> Result<()> {
    let path = &placed.path;
    let h = entry.header();
    let (sflag, dev) = match kind {
        tar::EntryType::Char => (SFlag::S_IFCHR, device(h)?),
        tar::EntryType::Block => (SFlag::S_IFBLK, device(h)?),
        _ => (SFlag::S_IFIFO, 0),
    };
    let mode = h.mode().map_err(|e| tar_error(placed.layer, e))? & 0o7777;
    remove_existing(path).map_err(|e| placed.io("replacing", e))?;
    mknod(path, sflag, Mode::from_bits_truncate(mode), dev)
        .map_err(|e| placed.io("creating device node", e.into()))?;
    chown(path, entry).map_err(|e| placed.io("chown", e))?;
    // mknod applies the umask; the layer's mode wins.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| placed.io("chmod", e))
}

/// The entry path as plain relative components. `Ok(None)` is the archive root;
/// absolute paths and `..` are refused.
fn relative_path(raw: &[u8]) -> std::result::Result<Option<PathBuf>, &'static str> {
    if raw.contains(&0) {
        return Err("path contains a NUL byte");
    }
    let p = Path::new(std::ffi::OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
            Component::ParentDir => return Err("path contains '..'"),
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Refuses a path whose existing parent components are symlinks (or not directories):
/// writing through them could land outside the snapshot.
fn check_parents(dest: &Path, rel: &Path) -> std::result::Result<(), String> {
    let mut cur = dest.to_path_buf();
    let parents: Vec<_> = rel
        .parent()
        .map(|p| p.components().collect())
        .unwrap_or_default();
    for c in parents {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "parent {:?} is a symbolic link",
                    cur.strip_prefix(dest).unwrap_or(&cur)
                ));
            }
            Ok(m) if !m.is_dir() => {
                return Err(format!(
                    "parent {:?} is not a directory",
                    cur.strip_prefix(dest).unwrap_or(&cur)
                ));
            }
            Ok(_) => {}
            Err(_) => return Ok(()), // created below as a plain directory
        }
    }
    Ok(())
}

/// Creates missing parent directories of `rel` (mode 0755, as containerd does for implied dirs).
fn mkdir_parents(dest: &Path, rel: &Path) -> io::Result<()> {
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    let mut cur = dest.to_path_buf();
    for c in parent.components() {
        cur.push(c);
        match fs::create_dir(&cur) {
            Ok(()) => fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes whatever is at `path` (a later entry replaces an earlier one); never follows symlinks.
fn remove_existing(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn chown<R: Read>(path: &Path, entry: &tar::Entry<'_, R>) -> io::Result<()> {
    let h = entry.header();
    let uid = h.uid().map_err(io::Error::other)?;
    let gid = h.gid().map_err(io::Error::other)?;
    let (uid, gid) = (
        u32::try_from(uid).map_err(io::Error::other)?,
        u32::try_from(gid).map_err(io::Error::other)?,
    );
    fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)
}

fn device(h: &tar::Header) -> Result<u64> {
    let bad = |e: io::Error| ImageError::Unsupported(format!("device numbers: {e}"));
    let major = h.device_major().map_err(bad)?.unwrap_or(0);
    let minor = h.device_minor().map_err(bad)?.unwrap_or(0);
    Ok(makedev(major.into(), minor.into()))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let n = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: both strings are NUL-terminated and live across the call; value is a valid slice.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes and inodes under a tree, for a snapshot found on disk without a record.
pub fn tree_usage(root: &Path) -> io::Result<UnpackStats> {
    let mut stats = UnpackStats::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in fs::read_dir(&dir)? {
            let ent = ent?;
            let m = ent.metadata()?;
            stats.inodes += 1;
            if m.is_dir() {
                stack.push(ent.path());
            } else if m.is_file() {
                stats.bytes += m.size();
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unpacking keeps owners and makes device nodes: root only. Without it the test
    /// says so and passes over the rest.
    fn unpack_tar(data: &[u8], dest: &Path, layer: &str) -> Result<UnpackStats> {
        let stream = decompress(data).unwrap();
        let marks = stream.marks();
        unpack_layer(stream, &marks, dest, layer)
    }

    fn skip_unless_root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return false;
        }
        eprintln!("skipped: needs root (chown, mknod)");
        true
    }

    fn raw_tar(entries: &[(&[u8], tar::EntryType, &[u8], Option<&[u8]>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, data, link) in entries {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            if let Some(l) = link {
                h.as_old_mut().linkname[..l.len()].copy_from_slice(l);
            }
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    #[test]
    fn converts_whiteouts_and_opaque_dirs() {
        if skip_unless_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tar = raw_tar(&[
            (b"data/", tar::EntryType::Directory, b"", None),
            (b"data/.wh.gone", tar::EntryType::Regular, b"", None),
            (b"opq/.wh..wh..opq", tar::EntryType::Regular, b"", None),
            (b"opq/new", tar::EntryType::Regular, b"hi", None),
            (b"opq/hard", tar::EntryType::Link, b"", Some(b"opq/new")),
        ]);
        let stats = unpack_tar(&tar, dir.path(), "test").unwrap();
        let wh = fs::symlink_metadata(dir.path().join("data/gone")).unwrap();
        assert_eq!(wh.mode() & libc::S_IFMT, libc::S_IFCHR);
        assert_eq!(wh.rdev(), 0);
        assert_eq!(fs::read(dir.path().join("opq/hard")).unwrap(), b"hi");
        assert_eq!(stats.bytes, 2);
        // trusted.* xattrs need CAP_SYS_ADMIN; only check when we have it.
        if nix::unistd::geteuid().is_root() {
            let mut buf = [0u8; 4];
            let p = CString::new(dir.path().join("opq").as_os_str().as_bytes()).unwrap();
            let n = CString::new("trusted.overlay.opaque").unwrap();
            let rc = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), 4) };
            assert_eq!(rc, 1);
            assert_eq!(&buf[..1], b"y");
        }
    }

    #[test]
    fn refuses_escapes_by_name() {
        if skip_unless_root() {
            return;
        }
        for (tar, needle) in [
            (
                raw_tar(&[(b"../../escape", tar::EntryType::Regular, b"x", None)]),
                "'..'",
            ),
            (
                raw_tar(&[(b"/etc/escape", tar::EntryType::Regular, b"x", None)]),
                "absolute",
            ),
            (
                raw_tar(&[
                    (b"link", tar::EntryType::Symlink, b"", Some(b"/tmp")),
                    (b"link/escape", tar::EntryType::Regular, b"x", None),
                ]),
                "symbolic link",
            ),
            (
                raw_tar(&[(b"h", tar::EntryType::Link, b"", Some(b"../../etc/passwd"))]),
                "hard link target",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("fs");
            fs::create_dir(&dest).unwrap();
            let err = unpack_tar(&tar, &dest, "evil").unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, ImageError::UnsafeLayerEntry { .. }), "{msg}");
            assert!(msg.contains(needle), "{msg}");
            assert!(!dir.path().join("escape").exists());
        }
    }

    #[test]
    fn huge_pax_headers_are_refused_without_reading_them() {
        let mut h = tar::Header::new_ustar();
        h.set_path("PaxHeaders/x").unwrap();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(64 << 20);
        h.set_mode(0o644);
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.extend(std::iter::repeat_n(b'a', 2 << 20)); // the rest would follow
        let dir = tempfile::tempdir().unwrap();
        let err = unpack_tar(&t, dir.path(), "bomb").unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
    }

    #[test]
    fn guard_follows_real_archives() {
        if skip_unless_root() {
            return;
        }
        let mut b = tar::Builder::new(Vec::new());
        let long = format!("{}/file", "d".repeat(150));
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let stats = unpack_tar(&data, dir.path(), "long").unwrap();
        assert_eq!(stats.bytes, 3);
        assert_eq!(fs::read(dir.path().join(&long)).unwrap(), b"abc");
    }

    #[test]
    fn decompress_sniffs_formats() {
        use std::io::Write;
        let plain = raw_tar(&[(b"f", tar::EntryType::Regular, b"abc", None)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&plain[..], 1).unwrap();
        for blob in [plain.clone(), gz, zs] {
            let mut out = Vec::new();
            decompress(&blob[..])
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out, plain);
        }
    }
}
