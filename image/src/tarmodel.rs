//! The tar structure of a layer stream, followed as its bytes pass, with the tar crate's
//! own size model: every entry's data is its header's size (the `tar::Header` parser)
//! unless a preceding PAX `x` record says `size=` (parsed with `tar::PaxExtensions`,
//! first record wins, as the tar crate does), for directories and links too; GNU sparse
//! extension blocks come before the data; the first zero block ends the archive.
//!
//! The tar crate reads PAX and GNU long-name/long-link bodies whole into memory, so
//! this guard refuses any such body over `MAX_META_ENTRY` before the crate sees it.
//! Because the guard and the crate could still disagree on a corner of the format, it
//! also records where every entry's data starts and how long it is (`Marks`); the
//! unpacker checks each entry it gets against them and refuses the layer on any
//! difference, so a lying archive is an error, never a different reading.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::rc::Rc;

/// Largest PAX or GNU long-name/long-link header body accepted (Go's archive/tar limit).
pub const MAX_META_ENTRY: u64 = 1 << 20;
const BLOCK: u64 = 512;

/// Where one entry's data is, as the guard read the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// Offset of the data (right after the entry's header block).
    pub data_pos: u64,
    /// Its size (a sparse entry's stored size).
    pub size: u64,
    /// A GNU sparse entry (the tar crate reports its expanded size instead).
    pub sparse: bool,
}

/// What the guard saw, shared with the unpacker: the entries in order, and why it
/// refused the stream, if it did (the tar crate may report that refusal as a failure
/// of whichever entry it was reading, so the unpacker asks here first).
#[derive(Debug, Default)]
pub struct Seen {
    /// The entries, oldest first; the unpacker pops them as it checks them.
    pub entries: VecDeque<Mark>,
    /// The guard's refusal.
    pub refused: Option<String>,
}

/// [`Seen`], shared between the guard and the unpacker.
pub type Marks = Rc<RefCell<Seen>>;

/// What the next bytes are.
#[derive(Debug)]
enum Expect {
    /// A header block.
    Header,
    /// GNU sparse extension blocks, then `then_data` bytes of data.
    SparseExt { then_data: u64 },
    /// Data blocks of an entry; the first `keep` bytes are a PAX `x` body to read.
    Data { blocks: u64, keep: u64 },
    /// Past the end-of-archive block: padding, not modelled.
    End,
}

/// Follows the tar stream of `inner` and refuses what the tar crate would read whole
/// when it is too large.
pub struct TarGuard<R> {
    inner: R,
    pos: u64,
    expect: Expect,
    /// The block being collected (a header or a sparse extension block).
    block: Vec<u8>,
    /// The body of the current PAX `x` entry.
    pax_body: Vec<u8>,
    /// The current data is a PAX `x` body.
    in_pax: bool,
    /// `size=` of the last PAX `x` entry, for the next entry.
    pax_size: Option<u64>,
    /// A PAX `x` body was seen and not yet used by an entry.
    pax_pending: bool,
    marks: Marks,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl<R: Read> TarGuard<R> {
    /// Guards `inner`; what it sees goes to `marks`.
    pub fn new(inner: R, marks: Marks) -> Self {
        TarGuard {
            inner,
            pos: 0,
            expect: Expect::Header,
            block: Vec::with_capacity(BLOCK as usize),
            pax_body: Vec::new(),
            in_pax: false,
            pax_size: None,
            pax_pending: false,
            marks,
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match &mut self.expect {
                Expect::End => return Ok(()),
                Expect::Data { blocks, keep } => {
                    let in_block = (BLOCK - self.pos % BLOCK) as usize;
                    let k = in_block.min(bytes.len());
                    let kept = (*keep).min(k as u64) as usize;
                    self.pax_body.extend_from_slice(&bytes[..kept]);
                    *keep -= kept as u64;
                    bytes = &bytes[k..];
                    self.pos += k as u64;
                    if self.pos % BLOCK == 0 {
                        *blocks -= 1;
                        if *blocks == 0 {
                            self.data_done();
                        }
                    }
                }
                Expect::Header | Expect::SparseExt { .. } => {
                    let k = (BLOCK as usize - self.block.len()).min(bytes.len());
                    self.block.extend_from_slice(&bytes[..k]);
                    bytes = &bytes[k..];
                    self.pos += k as u64;
                    if self.block.len() == BLOCK as usize {
                        let block = std::mem::take(&mut self.block);
                        self.on_block(&block)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// An entry's data ended: a PAX body is read for its `size=` record.
    fn data_done(&mut self) {
        if std::mem::take(&mut self.in_pax) {
            self.pax_size = pax_size(&self.pax_body);
            self.pax_body.clear();
        }
        self.expect = Expect::Header;
    }

    fn on_block(&mut self, block: &[u8]) -> io::Result<()> {
        match self.expect {
            Expect::SparseExt { then_data } => {
                // The extension block's own "isextended" flag is its byte 504.
                if block[504] == 0 {
                    self.start_data(then_data, false);
                }
                Ok(())
            }
            _ => self.on_header(block),
        }
    }

    fn start_data(&mut self, size: u64, pax: bool) {
        let blocks = size.div_ceil(BLOCK);
        self.in_pax = pax;
        self.expect = Expect::Data {
            blocks,
            keep: if pax { size } else { 0 },
        };
        if blocks == 0 {
            self.data_done();
        }
    }

    fn on_header(&mut self, block: &[u8]) -> io::Result<()> {
        if block.iter().all(|&b| b == 0) {
            self.expect = Expect::End; // the tar crate stops at the first zero block
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(block);
        let own_size = header
            .entry_size()
            .map_err(|e| invalid(format!("tar header: {e}")))?;
        let kind = block[156];
        let extension = matches!(kind, b'x' | b'g' | b'L' | b'K');
        if extension && own_size > MAX_META_ENTRY {
            return Err(invalid(format!(
                "tar metadata entry of type '{}' is {own_size} bytes (limit {MAX_META_ENTRY})",
                kind as char
            )));
        }
        if matches!(kind, b'x' | b'L' | b'K') {
            // Folded into the next entry by the tar crate; a PAX body is kept to read.
            if kind == b'x' {
                self.pax_pending = true;
            }
            self.start_data(own_size, kind == b'x');
            return Ok(());
        }
        // A real entry: a pending PAX size applies unless it is a global header.
        let pax = std::mem::take(&mut self.pax_size);
        let size = match (std::mem::take(&mut self.pax_pending), kind) {
            (true, k) if k != b'g' => pax.unwrap_or(own_size),
            _ => own_size,
        };
        let sparse = kind == b'S';
        self.marks.borrow_mut().entries.push_back(Mark {
            data_pos: self.pos,
            size,
            sparse,
        });
        if sparse && block[482] != 0 {
            self.expect = Expect::SparseExt { then_data: size };
        } else {
            self.start_data(size, false);
        }
        Ok(())
    }
}

/// The `size` record of a PAX body, as the tar crate reads it: the first `size`
/// record, and nothing when a record before it is malformed or it is not a number.
fn pax_size(body: &[u8]) -> Option<u64> {
    for ext in tar::PaxExtensions::new(body) {
        let ext = ext.ok()?;
        if ext.key() != Ok("size") {
            continue;
        }
        return ext.value().ok()?.parse::<u64>().ok();
    }
    None
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(why) = &self.marks.borrow().refused {
            return Err(invalid(why.clone()));
        }
        let n = self.inner.read(buf)?;
        if let Err(e) = self.observe(&buf[..n]) {
            self.marks.borrow_mut().refused = Some(e.to_string());
            return Err(e);
        }
        Ok(n)
    }
}

/// Checks an entry the tar crate yielded against the guard's reading of the stream.
pub fn check_entry(marks: &Marks, data_pos: u64, size: u64) -> Result<(), String> {
    let mark = marks.borrow_mut().entries.pop_front();
    match mark {
        Some(m) if m.data_pos == data_pos && (m.sparse || m.size == size) => Ok(()),
        Some(m) => Err(format!(
            "the archive reads two ways: entry data at {data_pos} ({size} bytes), where its structure says {} ({} bytes)",
            m.data_pos, m.size
        )),
        None => Err(format!(
            "the archive reads two ways: an entry at {data_pos} that its structure does not have"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: tar::EntryType, path: &str, size: u64) -> Vec<u8> {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h.as_bytes().to_vec()
    }

    fn pax(records: &str) -> Vec<u8> {
        let mut t = header(
            tar::EntryType::XHeader,
            "PaxHeaders/x",
            records.len() as u64,
        );
        let mut body = records.as_bytes().to_vec();
        body.resize(body.len().div_ceil(512) * 512, 0);
        t.extend(body);
        t
    }

    fn record(key: &str, value: &str) -> String {
        // "LEN key=value\n", LEN counting itself.
        let rest = format!(" {key}={value}\n");
        let mut len = rest.len() + 1;
        while format!("{len}{rest}").len() != len {
            len += 1;
        }
        format!("{len}{rest}")
    }

    /// The guard's marks and the tar crate's entries (data position, size) for `data`.
    fn both_readings(data: &[u8]) -> (io::Result<Vec<Mark>>, Vec<(u64, u64)>) {
        let marks = Marks::default();
        let mut g = TarGuard::new(data, marks.clone());
        let guarded = io::copy(&mut g, &mut io::sink())
            .map(|_| marks.borrow().entries.iter().copied().collect());
        let mut crate_view = Vec::new();
        let mut a = tar::Archive::new(data);
        if let Ok(entries) = a.entries() {
            for e in entries.map_while(|e| e.ok()) {
                crate_view.push((e.raw_file_position(), e.size()));
            }
        }
        (guarded, crate_view)
    }

    #[test]
    fn a_lying_pax_size_and_a_huge_long_name_are_refused() {
        // PAX size=0, a file header claiming 2^40 bytes, then a 1 GiB GNU long name:
        // the tar crate reads the long name whole; the guard must see it first.
        let mut t = pax(&record("size", "0"));
        t.extend(header(tar::EntryType::Regular, "f", 1 << 40));
        let mut gnu = tar::Header::new_gnu();
        gnu.set_path("././@LongLink").unwrap();
        gnu.set_entry_type(tar::EntryType::GNULongName);
        gnu.set_size(1 << 30);
        gnu.set_cksum();
        t.extend(gnu.as_bytes());
        t.extend(vec![b'a'; 4096]);
        let marks = Marks::default();
        let err = io::copy(&mut TarGuard::new(&t[..], marks.clone()), &mut io::sink()).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
        assert_eq!(marks.borrow().refused, Some(err.to_string()));
    }

    #[test]
    fn the_guard_reads_sizes_as_the_tar_crate_does() {
        let mut t = pax(&format!("{}{}", record("path", "p"), record("size", "3")));
        t.extend(header(tar::EntryType::Regular, "f", 0));
        t.extend(b"abc");
        t.resize(t.len().div_ceil(512) * 512, 0);
        // A directory whose size field is not 0: the crate skips that much data.
        t.extend(header(tar::EntryType::Directory, "d/", 600));
        t.extend(vec![0u8; 1024]);
        // A global header is an entry of its own and takes no PAX size.
        t.extend(pax(&record("size", "9")));
        let mut g = header(tar::EntryType::XGlobalHeader, "g", 2);
        g.extend(b"x\n");
        g.resize(1024, 0);
        t.extend(g);
        t.extend(header(tar::EntryType::Regular, "h", 1));
        t.extend(b"z");
        t.resize(t.len().div_ceil(512) * 512, 0);
        t.extend(vec![0u8; 1024]);
        let (guarded, crate_view) = both_readings(&t);
        let guarded: Vec<(u64, u64)> = guarded
            .unwrap()
            .iter()
            .map(|m| (m.data_pos, m.size))
            .collect();
        assert_eq!(guarded, crate_view);
        assert_eq!(crate_view.len(), 4, "{crate_view:?}");
        assert_eq!(crate_view[0].1, 3);
    }

    #[test]
    fn real_archives_read_the_same_both_ways() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, format!("{}/long", "d".repeat(150)), &b"abc"[..])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        b.append_data(&mut h, "dir/", &[][..]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "dir/link", "../target").unwrap();
        let data = b.into_inner().unwrap();
        let (guarded, crate_view) = both_readings(&data);
        let guarded: Vec<(u64, u64)> = guarded
            .unwrap()
            .iter()
            .map(|m| (m.data_pos, m.size))
            .collect();
        assert_eq!(guarded, crate_view);
        assert_eq!(crate_view.len(), 3);
    }

    #[test]
    fn a_disagreement_is_an_error() {
        let marks = Marks::default();
        marks.borrow_mut().entries.push_back(Mark {
            data_pos: 512,
            size: 3,
            sparse: false,
        });
        assert!(check_entry(&marks, 512, 3).is_ok());
        marks.borrow_mut().entries.push_back(Mark {
            data_pos: 2048,
            size: 0,
            sparse: false,
        });
        assert!(
            check_entry(&marks, 1536, 0)
                .unwrap_err()
                .contains("two ways")
        );
        assert!(check_entry(&marks, 4096, 1).is_err());
    }
}
