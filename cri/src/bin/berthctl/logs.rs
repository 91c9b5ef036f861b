//! `berthctl logs`: a container's CRI log file (`<RFC 3339 time> <stream> <P|F>
//! <text>`, partial lines joined), as crictl reads it on the node; `-f` follows it
//! through rotation until the container has exited and the file is drained.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
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

/// One parsed line: time, stream, whether it ends a line, text.
fn parse(line: &str) -> Option<(&str, &str, bool, &str)> {
    let mut parts = line.splitn(4, ' ');
    let time = parts.next()?;
    let stream = parts.next()?;
    let tag = parts.next()?;
    let text = parts.next().unwrap_or("");
    let full = tag.split(':').next()? == "F";
    Some((time, stream, full, text))
}

/// Prints complete lines; a partial line waits for its rest.
struct Printer {
    timestamps: bool,
    pending: String,
}

impl Printer {
    fn line(&mut self, raw: &str, out: &mut impl Write) -> Result<()> {
        let Some((time, _stream, full, text)) = parse(raw) else {
            return Ok(());
        };
        if self.pending.is_empty() && self.timestamps {
            self.pending.push_str(time);
            self.pending.push(' ');
        }
        self.pending.push_str(text);
        if full {
            writeln!(out, "{}", self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }
}

pub async fn logs(ch: Channel, container: String, opts: LogOptions) -> Result<()> {
    let mut c = pb::containers_client::ContainersClient::new(ch);
    let k = c
        .get(pb::IdRequest {
            id: container.clone(),
        })
        .await?
        .into_inner();
    anyhow::ensure!(!k.log_path.is_empty(), "container {} has no log file", k.id);
    let path = Path::new(&k.log_path);
    let mut printer = Printer {
        timestamps: opts.timestamps,
        pending: String::new(),
    };
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // Line by line (a log can be large); with --tail only the last lines are kept.
    let mut kept = std::collections::VecDeque::new();
    let mut offset = 0u64;
    let mut raw = Vec::new();
    while reader.read_until(b'\n', &mut raw)? > 0 {
        if raw.last() != Some(&b'\n') {
            break; // a line still being written: -f picks it up
        }
        offset += raw.len() as u64;
        let line = String::from_utf8_lossy(&raw[..raw.len() - 1]).into_owned();
        raw.clear();
        match opts.tail {
            Some(n) => {
                kept.push_back(line);
                if kept.len() > n {
                    kept.pop_front();
                }
            }
            None => printer.line(&line, &mut out)?,
        }
    }
    for line in kept {
        printer.line(&line, &mut out)?;
    }
    out.flush()?;
    drop(out);
    if opts.follow {
        follow(&mut c, &k.id, path, offset, &mut printer).await?;
    }
    Ok(())
}

/// Reads what is appended (a rotated file is read from its start) until the container
/// has exited and nothing more comes.
async fn follow(
    c: &mut pb::containers_client::ContainersClient<Channel>,
    id: &str,
    path: &Path,
    mut offset: u64,
    printer: &mut Printer,
) -> Result<()> {
    let mut inode = std::fs::metadata(path).map(|m| m.ino()).unwrap_or(0);
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let meta = std::fs::metadata(path).ok();
        if let Some(m) = &meta {
            if m.ino() != inode || m.len() < offset {
                (inode, offset) = (m.ino(), 0);
            }
        }
        let grew = meta.as_ref().is_some_and(|m| m.len() > offset);
        if grew {
            let mut f = std::fs::File::open(path)?;
            f.seek(SeekFrom::Start(offset))?;
            offset += f.take(1 << 20).read_to_end(&mut partial)? as u64;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            while let Some(end) = partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = partial.drain(..=end).collect();
                printer.line(&String::from_utf8_lossy(&line[..end]), &mut out)?;
            }
            out.flush()?;
            continue;
        }
        let k = c
            .get(pb::IdRequest { id: id.to_string() })
            .await?
            .into_inner();
        if k.state == "exited" {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_lines_join_and_timestamps_lead() {
        let mut p = Printer {
            timestamps: false,
            pending: String::new(),
        };
        let mut out = Vec::new();
        for l in [
            "2026-12-01T00:00:00.000000001Z stdout P hel",
            "2026-12-01T00:00:00.000000002Z stdout F lo",
            "2026-12-01T00:00:00.000000003Z stderr F ",
            "garbage",
        ] {
            p.line(l, &mut out).unwrap();
        }
        assert_eq!(String::from_utf8(out).unwrap(), "hello\n\n");
        let mut p = Printer {
            timestamps: true,
            pending: String::new(),
        };
        let mut out = Vec::new();
        p.line("T1 stdout F x y", &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "T1 x y\n");
    }
}
