//! `berthctl logs`: a container's CRI log file (`<RFC 3339 time> <stream> <P|F>
//! <text>`, partial lines joined per stream), as crictl reads it on the node; `-f`
//! follows it through rotation until the container has exited and the file is
//! drained.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Read as _, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use berth_cri::api::pb;
use tonic::transport::Channel;

/// What to show.
pub struct LogOptions {
    pub follow: bool,
    pub tail: Option<usize>,
    pub timestamps: bool,
}

/// One parsed record: time, stream, whether it ends a line, text.
fn parse(line: &str) -> Option<(&str, &str, bool, &str)> {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next()?;
    let stream = parts.next()?;
    let tag = parts.next()?;
    let text = parts.next().unwrap_or("");
    let full = tag.split(':').next()? == "F";
    Some((time, stream, full, text))
}

/// Joins partial records into lines, each stream on its own.
struct Lines {
    timestamps: bool,
    pending: HashMap<String, String>,
}

impl Lines {
    /// The line this record completes, if it does.
    fn record(&mut self, raw: &str) -> Option<String> {
        let (time, stream, full, text) = parse(raw)?;
        let pending = self.pending.entry(stream.to_string()).or_default();
        if pending.is_empty() && self.timestamps {
            pending.push_str(time);
            pending.push(' ');
        }
        pending.push_str(text);
        full.then(|| std::mem::take(pending))
    }
}

/// Reads complete records from `reader` (a record still being written stays for the
/// next read); returns the bytes consumed.
fn read_records(
    reader: &mut impl BufRead,
    mut each: impl FnMut(&str) -> Result<()>,
) -> Result<u64> {
    let mut consumed = 0u64;
    let mut raw = Vec::new();
    loop {
        raw.clear();
        let n = reader.read_until(b'\n', &mut raw)?;
        if n == 0 || raw.last() != Some(&b'\n') {
            return Ok(consumed);
        }
        consumed += n as u64;
        each(&String::from_utf8_lossy(&raw[..n - 1]))?;
    }
}

pub async fn logs(ch: Channel, container: String, opts: LogOptions) -> Result<()> {
    let mut c = pb::containers_client::ContainersClient::new(ch);
    let k = c.get(pb::IdRequest { id: container }).await?.into_inner();
    anyhow::ensure!(!k.log_path.is_empty(), "container {} has no log file", k.id);
    let path = Path::new(&k.log_path);
    let mut lines = Lines {
        timestamps: opts.timestamps,
        pending: HashMap::new(),
    };
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    // Line by line (a log can be large); with --tail only the last lines are kept.
    let mut kept = VecDeque::new();
    let offset = read_records(&mut BufReader::new(&file), |r| {
        if let Some(line) = lines.record(r) {
            match opts.tail {
                Some(n) => {
                    kept.push_back(line);
                    if kept.len() > n {
                        kept.pop_front();
                    }
                }
                None => writeln!(out, "{line}")?,
            }
        }
        Ok(())
    })?;
    for line in kept {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    drop(out);
    if opts.follow {
        follow(&mut c, &k.id, path, Tail { file, offset }, &mut lines).await?;
    }
    Ok(())
}

/// The file being followed and how far its complete records were read.
struct Tail {
    file: File,
    offset: u64,
}

impl Tail {
    /// Prints the complete records written since the last pass (at most a few MiB,
    /// so that a fast writer cannot starve the exit check); a record still being
    /// written is read next time.
    fn print_new(&mut self, lines: &mut Lines) -> Result<u64> {
        use std::io::{Seek, SeekFrom};
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::new((&self.file).take(4 << 20));
        let mut out = std::io::stdout().lock();
        let read = read_records(&mut reader, |r| {
            if let Some(line) = lines.record(r) {
                writeln!(out, "{line}")?;
            }
            Ok(())
        })?;
        self.offset += read;
        out.flush()?;
        Ok(read)
    }

    /// Everything complete there is now.
    fn drain(&mut self, lines: &mut Lines) -> Result<()> {
        while self.print_new(lines)? > 0 {}
        Ok(())
    }
}

/// Prints what is appended until the container has exited and everything it wrote is
/// read. A rotated file is read to its end before the new one is opened.
async fn follow(
    c: &mut pb::containers_client::ContainersClient<Channel>,
    id: &str,
    path: &Path,
    mut tail: Tail,
    lines: &mut Lines,
) -> Result<()> {
    loop {
        // Asked before reading: what an exited container wrote is in the file by now.
        let exited = match c.get(pb::IdRequest { id: id.to_string() }).await {
            Ok(k) => k.into_inner().state == "exited",
            Err(s) if s.code() == tonic::Code::NotFound => true,
            Err(e) => return Err(e.into()),
        };
        tail.print_new(lines)?;
        let ino = tail.file.metadata()?.ino();
        if std::fs::metadata(path).is_ok_and(|m| m.ino() != ino) {
            // Rotated: the old file is complete (the shim writes to the new one now).
            tail.drain(lines)?;
            lines.pending.clear();
            tail = Tail {
                file: File::open(path)?,
                offset: 0,
            };
            continue;
        }
        if exited {
            return tail.drain(lines);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_records_join_per_stream_and_timestamps_lead() {
        let mut l = Lines {
            timestamps: false,
            pending: HashMap::new(),
        };
        let got: Vec<Option<String>> = [
            "2026-12-01T00:00:00.000000001Z stdout P hel",
            "2026-12-01T00:00:00.000000002Z stderr F oops",
            "2026-12-01T00:00:00.000000003Z stdout F lo",
            "garbage",
        ]
        .iter()
        .map(|r| l.record(r))
        .collect();
        assert_eq!(got, [None, Some("oops".into()), Some("hello".into()), None]);
        let mut l = Lines {
            timestamps: true,
            pending: HashMap::new(),
        };
        assert_eq!(l.record("T1 stdout F x y").as_deref(), Some("T1 x y"));
    }
}
