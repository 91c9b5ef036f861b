//! The CRI container log format: `<RFC3339Nano> <stdout|stderr> <P|F> <text>\n`.
//! Lines longer than the buffer limit are split into `P` (partial) records; the last
//! piece of a line is `F` (full).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::timefmt::{now_unix_nanos, rfc3339_nano};

/// Longest record body before a line is split (kubelet's reader copes with any size;
/// containerd uses 16 KiB).
pub const MAX_RECORD: usize = 16 * 1024;

/// Which output a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// The process's standard output.
    Stdout,
    /// The process's standard error.
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Writes one container's CRI log file, buffering partial lines per stream.
pub struct CriLogWriter {
    path: PathBuf,
    file: File,
    pending: [Vec<u8>; 2],
    /// Writes fail (a full disk): output is dropped, said once, until one succeeds.
    dropping: bool,
}

impl CriLogWriter {
    /// Opens (appending, creating) the log file.
    pub fn open(path: &Path) -> io::Result<CriLogWriter> {
        let file = open_append(path)?;
        Ok(CriLogWriter {
            path: path.to_path_buf(),
            file,
            pending: [Vec::new(), Vec::new()],
            dropping: false,
        })
    }

    /// Reopens the file at the same path (after kubelet rotated it).
    pub fn reopen(&mut self) -> io::Result<()> {
        self.file = open_append(&self.path)?;
        Ok(())
    }

    /// Takes output bytes of one stream; writes every complete line and splits long ones.
    pub fn write(&mut self, stream: Stream, mut data: &[u8]) -> io::Result<()> {
        let idx = stream as usize;
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.pending[idx].extend_from_slice(&data[..nl]);
                    data = &data[nl + 1..];
                    self.emit_line(stream)?;
                }
                None => {
                    self.pending[idx].extend_from_slice(data);
                    data = &[];
                }
            }
            while self.pending[idx].len() >= MAX_RECORD {
                let rest = self.pending[idx].split_off(MAX_RECORD);
                let chunk = std::mem::replace(&mut self.pending[idx], rest);
                self.record(stream, 'P', &chunk)?;
            }
        }
        Ok(())
    }

    /// The stream ended: a trailing unterminated line is written as a full record.
    pub fn close_stream(&mut self, stream: Stream) -> io::Result<()> {
        if !self.pending[stream as usize].is_empty() {
            self.emit_line(stream)?;
        }
        Ok(())
    }

    fn emit_line(&mut self, stream: Stream) -> io::Result<()> {
        let line = std::mem::take(&mut self.pending[stream as usize]);
        self.record(stream, 'F', &line)
    }

    fn record(&mut self, stream: Stream, tag: char, body: &[u8]) -> io::Result<()> {
        let mut rec = Vec::with_capacity(body.len() + 48);
        rec.extend_from_slice(rfc3339_nano(now_unix_nanos()).as_bytes());
        rec.push(b' ');
        rec.extend_from_slice(stream.name().as_bytes());
        rec.push(b' ');
        rec.push(tag as u8);
        rec.push(b' ');
        rec.extend_from_slice(body);
        rec.push(b'\n');
        let written = self.write_record(&rec);
        self.note(&written);
        written
    }

    /// Writes a whole record or none of it: what a failed write (ENOSPC) put in the
    /// file is cut off again, so that the log never holds half a record.
    fn write_record(&mut self, rec: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < rec.len() {
            match self.file.write(&rec[done..]) {
                Ok(0) => return Err(self.cut(done, io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.cut(done, e)),
            }
        }
        Ok(())
    }

    fn cut(&mut self, written: usize, e: io::Error) -> io::Error {
        if written > 0 {
            if let Ok(m) = self.file.metadata() {
                let _ = self.file.set_len(m.len().saturating_sub(written as u64));
            }
        }
        e
    }

    /// Says once (on the shim's stderr, its log) that output is being dropped, and
    /// when it is written again.
    fn note(&mut self, written: &io::Result<()>) {
        // Never eprintln!: the shim's own log may sit on the same full disk.
        match written {
            Err(e) if !self.dropping => {
                self.dropping = true;
                let _ = writeln!(
                    io::stderr(),
                    "berth-shim: writing the CRI log {}: {e}; output is dropped until it can be written",
                    self.path.display()
                );
            }
            Ok(()) if self.dropping => {
                self.dropping = false;
                let _ = writeln!(
                    io::stderr(),
                    "berth-shim: the CRI log {} is written again",
                    self.path.display()
                );
            }
            _ => {}
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // 0640 as containerd creates them: a log can hold what a Secret put in the environment.
    std::os::unix::fs::OpenOptionsExt::mode(OpenOptions::new().create(true).append(true), 0o640)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(path: &Path) -> Vec<(String, String, String)> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let mut it = l.splitn(4, ' ');
                let ts = it.next().unwrap();
                assert!(ts.ends_with('Z') && ts.len() == 30, "{ts}");
                (
                    it.next().unwrap().into(),
                    it.next().unwrap().into(),
                    it.next().unwrap_or("").into(),
                )
            })
            .collect()
    }

    #[test]
    fn splits_lines_and_streams() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c/0.log");
        let mut w = CriLogWriter::open(&p).unwrap();
        w.write(Stream::Stdout, b"hello\nwor").unwrap();
        w.write(Stream::Stderr, b"oops\n").unwrap();
        w.write(Stream::Stdout, b"ld\n\n").unwrap();
        w.write(Stream::Stdout, b"tail").unwrap();
        w.close_stream(Stream::Stdout).unwrap();
        let r = records(&p);
        let want = [
            ("stdout", "F", "hello"),
            ("stderr", "F", "oops"),
            ("stdout", "F", "world"),
            ("stdout", "F", ""),
            ("stdout", "F", "tail"),
        ];
        assert_eq!(r.len(), want.len(), "{r:?}");
        for (got, want) in r.iter().zip(want) {
            assert_eq!((got.0.as_str(), got.1.as_str(), got.2.as_str()), want);
        }
    }

    #[test]
    fn long_lines_become_partials_and_reopen_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("0.log");
        let mut w = CriLogWriter::open(&p).unwrap();
        let long = vec![b'x'; MAX_RECORD * 2 + 10];
        w.write(Stream::Stdout, &long).unwrap();
        w.write(Stream::Stdout, b"\n").unwrap();
        let r = records(&p);
        let tags: Vec<&str> = r.iter().map(|x| x.1.as_str()).collect();
        assert_eq!(tags, ["P", "P", "F"]);
        assert_eq!(r.iter().map(|x| x.2.len()).sum::<usize>(), long.len());
        std::fs::rename(&p, dir.path().join("0.log.1")).unwrap();
        w.reopen().unwrap();
        w.write(Stream::Stdout, b"after\n").unwrap();
        assert_eq!(records(&p)[0].2, "after");
    }
}
