//! SPDY/3 name/value header blocks: u32 count, then u32-length-prefixed lowercase
//! names and values (several values joined by NUL), zlib-compressed with the SPDY/3
//! dictionary in one stream per direction for the whole connection, each block
//! ending in a sync flush.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::SpdyError;

/// The SPDY/3 header compression dictionary (1423 bytes, Adler-32 0xe3c6a7c2).
pub const DICTIONARY: &[u8] = include_bytes!("dictionary.bin");

/// Limits spdystream applies: at most 1000 headers, 1 MiB per name or value.
const MAX_HEADERS: usize = 1000;
const MAX_FIELD: usize = 1 << 20;
/// A decompressed block larger than this is refused.
const MAX_BLOCK: usize = 4 << 20;

/// Header pairs; names are lowercase on the wire and matched case-insensitively.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Adds a pair (the name is lowercased, as spdystream writes it).
    pub fn with(mut self, name: &str, value: &str) -> Headers {
        self.0.push((name.to_ascii_lowercase(), value.to_string()));
        self
    }
}

/// The connection's compressor and decompressor.
pub struct HeaderCodec {
    comp: Compress,
    decomp: Decompress,
}

impl Default for HeaderCodec {
    fn default() -> HeaderCodec {
        HeaderCodec::new()
    }
}

impl HeaderCodec {
    /// A fresh pair of zlib streams with the dictionary.
    pub fn new() -> HeaderCodec {
        let mut comp = Compress::new(Compression::best(), true);
        // Right after init, so the zlib header carries FDICT and the dictionary id.
        let _ = comp.set_dictionary(DICTIONARY);
        HeaderCodec {
            comp,
            decomp: Decompress::new(true),
        }
    }

    /// Encodes and compresses a block (sync-flushed, so it is complete on its own).
    pub fn compress(&mut self, h: &Headers) -> Result<Vec<u8>, SpdyError> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(h.0.len() as u32).to_be_bytes());
        for (k, v) in &h.0 {
            let k = k.to_ascii_lowercase();
            raw.extend_from_slice(&(k.len() as u32).to_be_bytes());
            raw.extend_from_slice(k.as_bytes());
            raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
            raw.extend_from_slice(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() * 2 + 128);
        let start = self.comp.total_in();
        loop {
            let consumed = (self.comp.total_in() - start) as usize;
            self.comp
                .compress_vec(&raw[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Protocol(format!("compressing headers: {e}")))?;
            let consumed = (self.comp.total_in() - start) as usize;
            // zlib finished the flush when it left output room unused.
            if consumed == raw.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity());
        }
        Ok(out)
    }

    /// Decompresses and parses one block (all of `input` must belong to it).
    pub fn decompress(&mut self, input: &[u8]) -> Result<Headers, SpdyError> {
        let mut out: Vec<u8> = Vec::with_capacity(input.len() * 4 + 256);
        let start = self.decomp.total_in();
        for _ in 0..64 {
            let consumed = (self.decomp.total_in() - start) as usize;
            let produced = out.len();
            match self
                .decomp
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            {
                Ok(Status::StreamEnd) => {
                    return Err(SpdyError::Protocol("header stream ended".into()));
                }
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.decomp
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| SpdyError::Protocol(format!("header dictionary: {e}")))?;
                    continue;
                }
                Err(e) => {
                    return Err(SpdyError::Protocol(format!("decompressing headers: {e}")));
                }
            }
            if out.len() > MAX_BLOCK {
                return Err(SpdyError::Protocol("header block too large".into()));
            }
            let consumed = (self.decomp.total_in() - start) as usize;
            if consumed == input.len() && out.len() < out.capacity() {
                return parse_block(&out);
            }
            if consumed == input.len() && out.len() == produced {
                return parse_block(&out);
            }
            out.reserve(out.capacity());
        }
        Err(SpdyError::Protocol(
            "header block does not decompress".into(),
        ))
    }
}

fn parse_block(b: &[u8]) -> Result<Headers, SpdyError> {
    let bad = |w: &str| SpdyError::Protocol(format!("header block: {w}"));
    let mut pos = 0usize;
    let u32_at = |pos: &mut usize| -> Result<usize, SpdyError> {
        let s = b.get(*pos..*pos + 4).ok_or_else(|| bad("truncated"))?;
        *pos += 4;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
    };
    let n = u32_at(&mut pos)?;
    if n > MAX_HEADERS {
        return Err(bad("too many headers"));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let kl = u32_at(&mut pos)?;
        if kl == 0 || kl > MAX_FIELD {
            return Err(bad("bad name length"));
        }
        let k = b.get(pos..pos + kl).ok_or_else(|| bad("truncated name"))?;
        pos += kl;
        let vl = u32_at(&mut pos)?;
        if vl > MAX_FIELD {
            return Err(bad("value too long"));
        }
        let v = b.get(pos..pos + vl).ok_or_else(|| bad("truncated value"))?;
        pos += vl;
        let k = String::from_utf8_lossy(k).into_owned();
        for one in String::from_utf8_lossy(v).split('\0') {
            out.push((k.clone(), one.to_string()));
        }
    }
    if pos != b.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(Headers(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adler32(d: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &x in d {
            a = (a + x as u32) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    #[test]
    fn dictionary_is_the_spdy3_one() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert_eq!(adler32(DICTIONARY), 0xe3c6_a7c2);
        assert!(DICTIONARY.starts_with(b"\0\0\0\x07options"));
        assert!(DICTIONARY.ends_with(b"enq=0."));
    }

    #[test]
    fn first_block_carries_the_dictionary_id_and_ends_in_a_sync_flush() {
        let mut c = HeaderCodec::new();
        let b = c.compress(&Headers::default()).unwrap();
        assert_eq!(&b[..6], &[0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2]);
        assert_eq!(&b[b.len() - 4..], &[0x00, 0x00, 0xff, 0xff]);
        // The second block continues the same stream: no zlib header again.
        let b2 = c
            .compress(&Headers::default().with("streamType", "error"))
            .unwrap();
        assert_ne!(&b2[..2], &[0x78, 0xf9]);
        assert_eq!(&b2[b2.len() - 4..], &[0x00, 0x00, 0xff, 0xff]);
    }

    #[test]
    fn blocks_round_trip_across_one_connection() {
        let (mut tx, mut rx) = (HeaderCodec::new(), HeaderCodec::new());
        for i in 0..20 {
            let h = Headers::default()
                .with("streamType", "data")
                .with("port", &format!("{}", 8000 + i))
                .with("requestID", &i.to_string());
            let wire = tx.compress(&h).unwrap();
            let got = rx.decompress(&wire).unwrap();
            assert_eq!(got.get("STREAMTYPE"), Some("data"));
            assert_eq!(got.get("port"), Some(format!("{}", 8000 + i).as_str()));
            assert_eq!(got.0[0].0, "streamtype", "names travel lowercase");
        }
    }

    #[test]
    fn hand_built_uncompressed_block_parses() {
        // zlib stream with FDICT, built by compressing a raw block with stock zlib
        // semantics: here via a fresh Compress with the dictionary, but parsing the
        // raw bytes directly checks the layout against the spec.
        let raw = [
            0, 0, 0, 2, // two pairs
            0, 0, 0, 10, b's', b't', b'r', b'e', b'a', b'm', b't', b'y', b'p', b'e', //
            0, 0, 0, 5, b'e', b'r', b'r', b'o', b'r', //
            0, 0, 0, 1, b'x', 0, 0, 0, 3, b'a', 0, b'b',
        ];
        let h = parse_block(&raw).unwrap();
        assert_eq!(
            h.0,
            vec![
                ("streamtype".to_string(), "error".to_string()),
                ("x".to_string(), "a".to_string()),
                ("x".to_string(), "b".to_string())
            ]
        );
        assert!(parse_block(&raw[..raw.len() - 1]).is_err());
        assert!(parse_block(&[0, 0, 0x10, 0]).is_err());
    }
}
