//! The zlib contexts that compress SPDY/3 name/value header blocks.
//!
//! SPDY/3 (draft 3.1 §2.6.10.1) compresses the header block of every SYN_STREAM, SYN_REPLY
//! and HEADERS frame with zlib, using one deflate context per direction for the whole
//! connection, primed with a fixed dictionary, and ending each block with a sync flush.
//! Invariants this module keeps, and why:
//!
//! - **One context per direction, never reset.** The peer's inflater carries its window
//!   across frames; a block compressed with a fresh context would decode as garbage there.
//!   For the same reason every received block must be inflated, even on streams we ignore.
//! - **Sync flush after every block.** The peer must be able to decode a block without
//!   waiting for the next one; the flush makes each block end on a byte boundary
//!   (`00 00 ff ff`). The stream is never finished.
//! - **Bounded output.** A hostile or broken server could send a tiny block that inflates
//!   to gigabytes (a zlib bomb). [`Inflater::inflate`] never produces more than the limit
//!   it is given, and fails instead.
//!
//! The dictionary is only settable with a real zlib backend: flate2's default
//! `miniz_oxide` cannot (its `set_dictionary` is not compiled in), hence the `zlib-rs`
//! feature in Cargo.toml.

use std::sync::OnceLock;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Why a header block could not be compressed or inflated.
#[derive(Debug, thiserror::Error)]
pub enum ZlibError {
    /// zlib itself failed (corrupt input, wrong dictionary…).
    #[error("header compression failed: {0}")]
    Zlib(String),
    /// The block inflates past the limit.
    #[error("header block inflates to more than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The peer asked for a dictionary other than SPDY/3's.
    #[error("header block wants zlib dictionary {0:#010x}, not SPDY/3's")]
    WrongDictionary(u32),
    /// The peer finished its zlib stream, which SPDY never does.
    #[error("header compression stream ended")]
    Ended,
}

/// The words of the SPDY/3 header dictionary, each written as a 32-bit big-endian length
/// and its bytes (draft 3.1 §2.6.10.1).
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The raw text that ends the dictionary, after the length-prefixed words.
const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, ",
    "Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,application/xml,",
    "application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,deflate,sdch",
    "charset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// Adler-32 of the dictionary: the DICTID a SPDY/3 peer's first block names.
pub const DICTIONARY_ADLER32: u32 = 0xE3C6_A7C2;

/// The SPDY/3 zlib dictionary (1423 bytes).
pub fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        let mut d = Vec::with_capacity(1423);
        for w in DICTIONARY_WORDS {
            let len = u32::try_from(w.len()).unwrap_or(u32::MAX);
            d.extend_from_slice(&len.to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(DICTIONARY_TAIL.as_bytes());
        d
    })
}

/// The sending side's compressor: one per connection.
pub struct Deflater {
    z: Compress,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater").finish_non_exhaustive()
    }
}

impl Deflater {
    /// A compressor at Go's level (best), primed with the dictionary.
    pub fn new() -> Result<Self, ZlibError> {
        let mut z = Compress::new(Compression::best(), true);
        z.set_dictionary(dictionary())
            .map_err(|e| ZlibError::Zlib(e.to_string()))?;
        Ok(Self { z })
    }

    /// Appends `block`, compressed and sync-flushed, to `out`.
    pub fn deflate(&mut self, block: &[u8], out: &mut Vec<u8>) -> Result<(), ZlibError> {
        let start = self.z.total_in();
        loop {
            let consumed = usize::try_from(self.z.total_in() - start).unwrap_or(usize::MAX);
            let rest = block.get(consumed..).unwrap_or_default();
            out.reserve(rest.len() + 64);
            self.z
                .compress_vec(rest, out, FlushCompress::Sync)
                .map_err(|e| ZlibError::Zlib(e.to_string()))?;
            let consumed = usize::try_from(self.z.total_in() - start).unwrap_or(usize::MAX);
            // zlib's rule: the flush is complete once all input is in and the output
            // buffer was not filled.
            if consumed >= block.len() && out.len() < out.capacity() {
                return Ok(());
            }
        }
    }
}

/// The receiving side's inflater: one per connection.
pub struct Inflater {
    z: Decompress,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").finish_non_exhaustive()
    }
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Inflater {
    /// An inflater expecting a zlib header; the dictionary is supplied when asked for.
    pub fn new() -> Self {
        Self {
            z: Decompress::new(true),
        }
    }

    /// Inflates one compressed block, failing if it would exceed `limit` bytes.
    pub fn inflate(&mut self, block: &[u8], limit: usize) -> Result<Vec<u8>, ZlibError> {
        // One byte over the limit tells "exactly at the limit" from "more to come".
        let mut out = Vec::with_capacity(limit.saturating_add(1));
        let start = self.z.total_in();
        loop {
            let consumed = usize::try_from(self.z.total_in() - start).unwrap_or(usize::MAX);
            let rest = block.get(consumed..).unwrap_or_default();
            let produced = out.len();
            match self.z.decompress_vec(rest, &mut out, FlushDecompress::Sync) {
                Ok(Status::StreamEnd) => return Err(ZlibError::Ended),
                Ok(Status::Ok | Status::BufError) => {}
                Err(e) => match e.needs_dictionary() {
                    Some(DICTIONARY_ADLER32) => self
                        .z
                        .set_dictionary(dictionary())
                        .map(drop)
                        .map_err(|e| ZlibError::Zlib(e.to_string()))?,
                    Some(other) => return Err(ZlibError::WrongDictionary(other)),
                    None => return Err(ZlibError::Zlib(e.to_string())),
                },
            }
            if out.len() > limit {
                return Err(ZlibError::TooLarge { limit });
            }
            let now = usize::try_from(self.z.total_in() - start).unwrap_or(usize::MAX);
            if now >= block.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if now == consumed && out.len() == produced && now < block.len() {
                // No progress with input left: the stream is stuck (should not happen).
                return Err(ZlibError::Zlib("inflate made no progress".into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_spdy3s() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert!(d.starts_with(b"\0\0\0\x07options\0\0\0\x04head"));
        assert!(d.ends_with(b"enq=0."));
        // Adler-32, computed by hand so the test does not trust zlib.
        let (mut a, mut b) = (1u32, 0u32);
        for &x in d {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!((b << 16) | a, DICTIONARY_ADLER32);
    }

    #[test]
    fn first_block_names_the_dictionary() {
        let mut d = Deflater::new().unwrap();
        let mut out = Vec::new();
        d.deflate(b"\0\0\0\0", &mut out).unwrap();
        // CMF 0x78, FLG 0xf9 (FDICT, level 3 = best), DICTID.
        assert_eq!(&out[..6], &[0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2]);
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]), "{out:02x?}");
    }

    #[test]
    fn contexts_carry_across_blocks() {
        let mut d = Deflater::new().unwrap();
        let mut i = Inflater::new();
        let blocks: [&[u8]; 3] = [
            b"streamtype error port 2379",
            b"",
            b"streamtype data port 2379",
        ];
        for b in blocks {
            let mut out = Vec::new();
            d.deflate(b, &mut out).unwrap();
            assert_eq!(i.inflate(&out, 1024).unwrap(), b);
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let mut d = Deflater::new().unwrap();
        let mut out = Vec::new();
        d.deflate(&vec![b'a'; 1 << 20], &mut out).unwrap();
        assert!(out.len() < 8 * 1024, "{}", out.len());
        let err = Inflater::new().inflate(&out, 64 * 1024).unwrap_err();
        assert!(matches!(err, ZlibError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn exactly_the_limit_is_fine() {
        let mut d = Deflater::new().unwrap();
        let mut out = Vec::new();
        d.deflate(&[7u8; 4096], &mut out).unwrap();
        assert_eq!(Inflater::new().inflate(&out, 4096).unwrap().len(), 4096);
    }

    #[test]
    fn garbage_and_foreign_dictionaries_fail() {
        assert!(Inflater::new().inflate(b"\x00\x01\x02\x03", 100).is_err());
        // A zlib header with FDICT and some other DICTID.
        let err = Inflater::new()
            .inflate(&[0x78, 0xf9, 0, 0, 0, 1, 0, 0], 100)
            .unwrap_err();
        assert!(matches!(err, ZlibError::WrongDictionary(1)), "{err}");
    }
}
