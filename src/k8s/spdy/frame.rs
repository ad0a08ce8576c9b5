//! SPDY/3.1 frames: encoding and a bounded, incremental decoder.
//!
//! Layout (draft 3.1 §2.2): every frame starts with 8 bytes. A control frame has the high
//! bit set, a 15-bit version (3) and a 16-bit type; a data frame has the bit clear and a
//! 31-bit stream id. Then 8 bits of flags and a 24-bit length of what follows.
//! Integers are big-endian.
//!
//! Invariants:
//! - **Bounded memory.** The decoder reads the 8-byte header first and rejects a length
//!   over [`MAX_CONTROL_LEN`] (control frames; the spec's floor is 8192) before buffering
//!   the payload; DATA may use the whole 24-bit field, which is what spdystream, the
//!   kubelet's library, accepts. Header blocks are inflated to at most
//!   [`MAX_HEADER_BLOCK`] bytes and [`MAX_HEADER_PAIRS`] pairs, and every length inside a
//!   block is checked against the bytes that remain before anything is allocated.
//! - **Never panics on input.** All reads go through checked helpers; arbitrary bytes give
//!   `Ok(None)` (need more), a frame, or an error (property-tested below).
//! - **Shared compression state.** Header blocks are compressed with one context per
//!   direction (the sibling `zlib` module), so frames must be encoded in the order they are sent
//!   and decoded in the order they arrive, one [`Encoder`]/[`Decoder`] per connection.
//! - **Header names are lowercase and unique** on both sides: spdystream drops the whole
//!   session on an uppercase or duplicate name, so the encoder refuses to produce one, and
//!   the decoder treats one as a protocol error, as the spec says (§2.6.10).
//!
//! The simulator (tests/sim) compiles this file and the sibling `zlib` module too, for its kubelet
//! side; real `kubectl port-forward` against the simulator checks both ends against Go's
//! spdystream.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::zlib::{Deflater, Inflater, ZlibError};

/// The SPDY version in control frames.
pub const VERSION: u16 = 3;
/// FLAG_FIN: the sender's last frame on the stream.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL on SYN_STREAM: the receiver may not send.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// The largest stream id; a connection that needs more must be replaced.
pub const MAX_STREAM_ID: u32 = 0x7fff_ffff;
/// Largest control-frame payload accepted (header blocks are far smaller in practice).
pub const MAX_CONTROL_LEN: usize = 64 * 1024;
/// Largest DATA payload: the length field's maximum.
pub const MAX_DATA_LEN: usize = (1 << 24) - 1;
/// Largest header block after inflating.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Most name/value pairs in one header block.
pub const MAX_HEADER_PAIRS: usize = 64;

/// RST_STREAM status codes (§2.6.3).
pub mod rst {
    /// PROTOCOL_ERROR.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// INVALID_STREAM.
    pub const INVALID_STREAM: u32 = 2;
    /// REFUSED_STREAM.
    pub const REFUSED_STREAM: u32 = 3;
    /// CANCEL.
    pub const CANCEL: u32 = 5;
    /// INTERNAL_ERROR.
    pub const INTERNAL_ERROR: u32 = 6;
}

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// A header block: lowercase names, each once. Several values share one entry, NUL-joined.
pub type Headers = Vec<(String, String)>;

/// One SPDY/3.1 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream.
    SynStream {
        /// The new stream (odd from the client, even from the server).
        stream_id: u32,
        /// The stream it belongs to, or 0.
        associated_to: u32,
        /// 0 (highest) to 7.
        priority: u8,
        /// FIN, UNIDIRECTIONAL.
        flags: u8,
        /// Its headers.
        headers: Headers,
    },
    /// Accepts a stream the peer opened.
    SynReply {
        /// The stream.
        stream_id: u32,
        /// FIN.
        flags: u8,
        /// Its headers.
        headers: Headers,
    },
    /// Aborts a stream.
    RstStream {
        /// The stream.
        stream_id: u32,
        /// Why (see [`rst`]).
        status: u32,
    },
    /// Connection settings (ignored by Kubernetes' servers).
    Settings {
        /// CLEAR_SETTINGS.
        flags: u8,
        /// `(flags, id, value)` per entry.
        entries: Vec<(u8, u32, u32)>,
    },
    /// A ping, or the echo of one.
    Ping {
        /// Odd from the client, even from the server.
        id: u32,
    },
    /// The sender will open or accept no more streams.
    GoAway {
        /// The last stream the sender processed.
        last_good_stream_id: u32,
        /// 0 OK, 1 PROTOCOL_ERROR, 2 INTERNAL_ERROR.
        status: u32,
    },
    /// More headers on a stream.
    Headers {
        /// The stream.
        stream_id: u32,
        /// FIN.
        flags: u8,
        /// The headers.
        headers: Headers,
    },
    /// Flow-control credit (Kubernetes' servers neither send nor honour it).
    WindowUpdate {
        /// The stream, 0 for the connection.
        stream_id: u32,
        /// Bytes granted.
        delta: u32,
    },
    /// Stream payload.
    Data {
        /// The stream.
        stream_id: u32,
        /// FIN.
        flags: u8,
        /// The bytes.
        data: Bytes,
    },
    /// A control frame of a type this code does not know; its payload is skipped, as the
    /// spec asks (§2.2.1). Encoded with an empty payload.
    Unknown {
        /// The control frame type.
        kind: u16,
    },
}

/// A frame that cannot be decoded or encoded. Every decode error is fatal to the
/// connection: the header compression state can no longer be trusted.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length field exceeds what this side accepts.
    #[error("SPDY frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The frame's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A control frame of another SPDY version.
    #[error("SPDY version {0} control frame (only 3 is spoken)")]
    Version(u16),
    /// The frame breaks a rule of the spec.
    #[error("malformed SPDY frame: {0}")]
    Malformed(&'static str),
    /// The header block is invalid.
    #[error("malformed SPDY header block: {0}")]
    Headers(&'static str),
    /// Header (de)compression failed.
    #[error(transparent)]
    Zlib(#[from] ZlibError),
}

fn malformed(what: &'static str) -> FrameError {
    FrameError::Malformed(what)
}

/// Serialises frames for one connection (owns the sending compression context).
#[derive(Debug)]
pub struct Encoder {
    deflater: Deflater,
    scratch: Vec<u8>,
}

impl Encoder {
    /// A fresh encoder.
    pub fn new() -> Result<Self, FrameError> {
        Ok(Self {
            deflater: Deflater::new()?,
            scratch: Vec::new(),
        })
    }

    /// Appends `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() > MAX_DATA_LEN {
                    return Err(FrameError::TooLarge {
                        len: data.len(),
                        max: MAX_DATA_LEN,
                    });
                }
                out.put_u32(stream_id & MAX_STREAM_ID);
                put_flags_len(out, *flags, data.len());
                out.extend_from_slice(data);
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                let block = self.block(headers)?;
                control(out, SYN_STREAM, *flags, 10 + block.len());
                out.put_u32(stream_id & MAX_STREAM_ID);
                out.put_u32(associated_to & MAX_STREAM_ID);
                out.put_u8((priority & 7) << 5);
                out.put_u8(0); // slot, unused in 3.1
                out.extend_from_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.block(headers)?;
                control(out, SYN_REPLY, *flags, 4 + block.len());
                out.put_u32(stream_id & MAX_STREAM_ID);
                out.extend_from_slice(&block);
            }
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.block(headers)?;
                control(out, HEADERS, *flags, 4 + block.len());
                out.put_u32(stream_id & MAX_STREAM_ID);
                out.extend_from_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                control(out, RST_STREAM, 0, 8);
                out.put_u32(stream_id & MAX_STREAM_ID);
                out.put_u32(*status);
            }
            Frame::Settings { flags, entries } => {
                if entries.len() > (MAX_CONTROL_LEN - 4) / 8 {
                    return Err(malformed("too many settings"));
                }
                control(out, SETTINGS, *flags, 4 + 8 * entries.len());
                out.put_u32(u32::try_from(entries.len()).unwrap_or(u32::MAX));
                for (f, id, value) in entries {
                    out.put_u32((u32::from(*f) << 24) | (id & 0x00ff_ffff));
                    out.put_u32(*value);
                }
            }
            Frame::Ping { id } => {
                control(out, PING, 0, 4);
                out.put_u32(*id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                control(out, GOAWAY, 0, 8);
                out.put_u32(last_good_stream_id & MAX_STREAM_ID);
                out.put_u32(*status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                control(out, WINDOW_UPDATE, 0, 8);
                out.put_u32(stream_id & MAX_STREAM_ID);
                out.put_u32(delta & MAX_STREAM_ID);
            }
            Frame::Unknown { kind } => control(out, *kind, 0, 0),
        }
        Ok(())
    }

    /// The compressed header block.
    fn block(&mut self, headers: &Headers) -> Result<Vec<u8>, FrameError> {
        if headers.len() > MAX_HEADER_PAIRS {
            return Err(FrameError::Headers("too many headers"));
        }
        self.scratch.clear();
        let raw = &mut self.scratch;
        raw.put_u32(u32::try_from(headers.len()).unwrap_or(u32::MAX));
        for (i, (name, value)) in headers.iter().enumerate() {
            check_name(name)?;
            if headers[..i].iter().any(|(n, _)| n == name) {
                return Err(FrameError::Headers("duplicate header name"));
            }
            for part in [name, value] {
                let len = u32::try_from(part.len())
                    .map_err(|_| FrameError::Headers("header too long"))?;
                raw.put_u32(len);
                raw.extend_from_slice(part.as_bytes());
            }
        }
        if raw.len() > MAX_HEADER_BLOCK {
            return Err(FrameError::Headers("header block too large"));
        }
        let mut out = Vec::new();
        self.deflater.deflate(raw, &mut out)?;
        Ok(out)
    }
}

fn check_name(name: &str) -> Result<(), FrameError> {
    if name.is_empty() {
        return Err(FrameError::Headers("empty header name"));
    }
    if name
        .bytes()
        .any(|b| b.is_ascii_uppercase() || !b.is_ascii() || b == 0)
    {
        return Err(FrameError::Headers(
            "header names must be lowercase ASCII without NUL",
        ));
    }
    Ok(())
}

fn control(out: &mut BytesMut, kind: u16, flags: u8, len: usize) {
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    put_flags_len(out, flags, len);
}

fn put_flags_len(out: &mut BytesMut, flags: u8, len: usize) {
    let len = u32::try_from(len).unwrap_or(u32::MAX) & 0x00ff_ffff;
    out.put_u32((u32::from(flags) << 24) | len);
}

/// Parses frames for one connection (owns the receiving decompression context).
#[derive(Debug, Default)]
pub struct Decoder {
    inflater: Inflater,
}

impl Decoder {
    /// A fresh decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one frame off the front of `buf`: `Ok(None)` until it is complete.
    /// A length over the limits fails as soon as the 8-byte header is in.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some(head) = buf.get(..8) else {
            return Ok(None);
        };
        let word = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let flags = head[4];
        let len = usize::from(head[5]) << 16 | usize::from(head[6]) << 8 | usize::from(head[7]);
        let is_control = word & 0x8000_0000 != 0;
        let max = if is_control {
            MAX_CONTROL_LEN
        } else {
            MAX_DATA_LEN
        };
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        if buf.len() < 8 + len {
            buf.reserve(8 + len - buf.len());
            return Ok(None);
        }
        buf.advance(8);
        let mut payload = buf.split_to(len).freeze();
        if !is_control {
            let stream_id = word & MAX_STREAM_ID;
            if stream_id == 0 {
                return Err(malformed("DATA on stream 0"));
            }
            return Ok(Some(Frame::Data {
                stream_id,
                flags,
                data: payload,
            }));
        }
        let version = u16::try_from((word >> 16) & 0x7fff).unwrap_or(0);
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let kind = u16::try_from(word & 0xffff).unwrap_or(0);
        let p = &mut payload;
        let frame = match kind {
            SYN_STREAM => {
                let stream_id = stream(p)?;
                let associated_to = u32_at(p)? & MAX_STREAM_ID;
                let priority = u8_at(p)? >> 5;
                let _slot = u8_at(p)?;
                let headers = self.headers(p)?;
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    flags,
                    headers,
                }
            }
            SYN_REPLY => Frame::SynReply {
                stream_id: stream(p)?,
                flags,
                headers: self.headers(p)?,
            },
            HEADERS => Frame::Headers {
                stream_id: stream(p)?,
                flags,
                headers: self.headers(p)?,
            },
            RST_STREAM => {
                exact(p, 8)?;
                let stream_id = stream(p)?;
                let status = u32_at(p)?;
                if status == 0 {
                    return Err(malformed("RST_STREAM with status 0"));
                }
                Frame::RstStream { stream_id, status }
            }
            SETTINGS => {
                let n = usize::try_from(u32_at(p)?).unwrap_or(usize::MAX);
                if n.checked_mul(8) != Some(p.len()) {
                    return Err(malformed("SETTINGS count does not match its length"));
                }
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let w = u32_at(p)?;
                    let f = u8::try_from(w >> 24).unwrap_or(0);
                    entries.push((f, w & 0x00ff_ffff, u32_at(p)?));
                }
                Frame::Settings { flags, entries }
            }
            PING => {
                exact(p, 4)?;
                Frame::Ping { id: u32_at(p)? }
            }
            GOAWAY => {
                exact(p, 8)?;
                Frame::GoAway {
                    last_good_stream_id: u32_at(p)? & MAX_STREAM_ID,
                    status: u32_at(p)?,
                }
            }
            WINDOW_UPDATE => {
                exact(p, 8)?;
                Frame::WindowUpdate {
                    stream_id: u32_at(p)? & MAX_STREAM_ID,
                    delta: u32_at(p)? & MAX_STREAM_ID,
                }
            }
            kind => return Ok(Some(Frame::Unknown { kind })),
        };
        if !payload.is_empty() {
            return Err(malformed("trailing bytes in control frame"));
        }
        Ok(Some(frame))
    }

    /// Inflates and parses the rest of `p` as a header block.
    fn headers(&mut self, p: &mut Bytes) -> Result<Headers, FrameError> {
        let raw = self.inflater.inflate(p, MAX_HEADER_BLOCK)?;
        p.advance(p.len());
        parse_block(&raw)
    }
}

/// Parses an inflated header block.
fn parse_block(raw: &[u8]) -> Result<Headers, FrameError> {
    let mut r = raw;
    let n = usize::try_from(take_u32(&mut r)?).unwrap_or(usize::MAX);
    if n > MAX_HEADER_PAIRS {
        return Err(FrameError::Headers("too many headers"));
    }
    let mut headers: Headers = Vec::with_capacity(n);
    for _ in 0..n {
        let name = take_str(&mut r)?;
        check_name(&name)?;
        if headers.iter().any(|(n, _)| *n == name) {
            return Err(FrameError::Headers("duplicate header name"));
        }
        let value = take_str(&mut r)?;
        headers.push((name, value));
    }
    if !r.is_empty() {
        return Err(FrameError::Headers("trailing bytes"));
    }
    Ok(headers)
}

fn take_u32(r: &mut &[u8]) -> Result<u32, FrameError> {
    if r.len() < 4 {
        return Err(FrameError::Headers("truncated"));
    }
    Ok(r.get_u32())
}

fn take_str(r: &mut &[u8]) -> Result<String, FrameError> {
    let len = usize::try_from(take_u32(r)?).unwrap_or(usize::MAX);
    if len > r.len() {
        return Err(FrameError::Headers("length past the end of the block"));
    }
    let (s, rest) = r.split_at(len);
    *r = rest;
    String::from_utf8(s.to_vec()).map_err(|_| FrameError::Headers("not UTF-8"))
}

fn u32_at(p: &mut Bytes) -> Result<u32, FrameError> {
    if p.len() < 4 {
        return Err(malformed("truncated control frame"));
    }
    Ok(p.get_u32())
}

fn u8_at(p: &mut Bytes) -> Result<u8, FrameError> {
    if p.is_empty() {
        return Err(malformed("truncated control frame"));
    }
    Ok(p.get_u8())
}

fn stream(p: &mut Bytes) -> Result<u32, FrameError> {
    let id = u32_at(p)? & MAX_STREAM_ID;
    if id == 0 {
        return Err(malformed("stream id 0"));
    }
    Ok(id)
}

fn exact(p: &Bytes, len: usize) -> Result<(), FrameError> {
    if p.len() == len {
        Ok(())
    } else {
        Err(malformed("control frame of the wrong length"))
    }
}

/// The value of `name` in `headers` (names are lowercase on the wire).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(d: &mut Decoder, bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = d.decode(&mut buf)? {
            out.push(f);
        }
        assert!(buf.is_empty(), "{} bytes left", buf.len());
        Ok(out)
    }

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Hand-built frames, checked byte for byte against the layout in draft 3.1 §2.
    #[test]
    fn fixed_layouts() {
        let mut e = Encoder::new().unwrap();
        let mut out = BytesMut::new();
        e.encode(&Frame::Ping { id: 1 }, &mut out).unwrap();
        assert_eq!(&out[..], &[0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1]);
        out.clear();
        e.encode(
            &Frame::RstStream {
                stream_id: 3,
                status: rst::CANCEL,
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(
            &out[..],
            &[0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 3, 0, 0, 0, 5]
        );
        out.clear();
        e.encode(
            &Frame::Data {
                stream_id: 5,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hi"),
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(&out[..], &[0, 0, 0, 5, 1, 0, 0, 2, b'h', b'i']);
        out.clear();
        e.encode(
            &Frame::GoAway {
                last_good_stream_id: 7,
                status: 0,
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(
            &out[..],
            &[0x80, 3, 0, 7, 0, 0, 0, 8, 0, 0, 0, 7, 0, 0, 0, 0]
        );
    }

    /// A SYN_STREAM as kubectl sends it for an error stream: header, ids, priority, slot,
    /// then a block that starts with the dictionary's zlib header.
    #[test]
    fn syn_stream_layout() {
        let mut e = Encoder::new().unwrap();
        let mut out = BytesMut::new();
        let headers = h(&[
            ("streamtype", "error"),
            ("port", "2379"),
            ("requestid", "0"),
        ]);
        e.encode(
            &Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: headers.clone(),
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(&out[..4], &[0x80, 3, 0, 1]);
        let len = usize::from(out[5]) << 16 | usize::from(out[6]) << 8 | usize::from(out[7]);
        assert_eq!(len, out.len() - 8);
        assert_eq!(&out[8..18], &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&out[18..24], &[0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2]);
        // The raw block the peer inflates.
        let raw = Inflater::new().inflate(&out[18..], 1024).unwrap();
        let mut want = vec![0, 0, 0, 3];
        for (n, v) in &headers {
            want.extend_from_slice(&u32::try_from(n.len()).unwrap().to_be_bytes());
            want.extend_from_slice(n.as_bytes());
            want.extend_from_slice(&u32::try_from(v.len()).unwrap().to_be_bytes());
            want.extend_from_slice(v.as_bytes());
        }
        assert_eq!(raw, want);
        let frames = decode_all(&mut Decoder::new(), &out).unwrap();
        assert!(matches!(&frames[0], Frame::SynStream { headers: got, .. } if *got == headers));
    }

    #[test]
    fn empty_block_reply_and_split_delivery() {
        let mut e = Encoder::new().unwrap();
        let mut bytes = BytesMut::new();
        let frames = vec![
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: Vec::new(),
            },
            Frame::Data {
                stream_id: 1,
                flags: 0,
                data: Bytes::from_static(b"abc"),
            },
            Frame::SynReply {
                stream_id: 3,
                flags: FLAG_FIN,
                headers: Vec::new(),
            },
        ];
        for f in &frames {
            e.encode(f, &mut bytes).unwrap();
        }
        // One byte at a time: the decoder waits, then yields each frame whole.
        let mut d = Decoder::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in bytes.iter() {
            buf.put_u8(*b);
            while let Some(f) = d.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn limits_apply_before_buffering() {
        let mut d = Decoder::new();
        // A control frame claiming 1 MiB: refused from the header alone.
        let mut buf = BytesMut::from(&[0x80, 3, 0, 1, 0, 0x10, 0, 0][..]);
        assert!(matches!(
            d.decode(&mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        // DATA may be large; it waits for the bytes.
        let mut buf = BytesMut::from(&[0, 0, 0, 1, 0, 0x10, 0, 0][..]);
        assert!(d.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn rejects_bad_names_and_bad_frames() {
        let mut e = Encoder::new().unwrap();
        let mut out = BytesMut::new();
        for bad in [
            h(&[("Port", "1")]),
            h(&[("a", "1"), ("a", "2")]),
            h(&[("", "1")]),
        ] {
            let f = Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: bad,
            };
            assert!(e.encode(&f, &mut out).is_err());
        }
        let mut d = Decoder::new();
        for bad in [
            &[0x80, 3, 0, 6, 0, 0, 0, 3, 0, 0, 1][..], // PING of 3 bytes
            &[0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0][..], // RST status 0
            &[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1][..], // SPDY/2
            &[0, 0, 0, 0, 0, 0, 0, 0][..],             // DATA on stream 0
        ] {
            assert!(d.decode(&mut BytesMut::from(bad)).is_err(), "{bad:02x?}");
        }
        // Unknown control types are skipped with their payload.
        let mut buf = BytesMut::from(&[0x80, 3, 0, 10, 0, 0, 0, 2, 9, 9][..]);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Some(Frame::Unknown { kind: 10 })
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn uppercase_from_the_peer_is_a_protocol_error() {
        let mut raw = vec![0, 0, 0, 1, 0, 0, 0, 4];
        raw.extend_from_slice(b"Port");
        raw.extend_from_slice(&[0, 0, 0, 1, b'1']);
        assert!(parse_block(&raw).is_err());
        // Lengths past the end are caught before allocation.
        assert!(parse_block(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_block(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    /// What `kubectl port-forward` 1.32 sent the simulator for two forwarded connections,
    /// captured off the wire: for each, the error stream's SYN_STREAM, its immediate FIN,
    /// the data stream's SYN_STREAM, the request bytes, and (after the server's end) a
    /// RST_STREAM CANCEL on the data stream. The header blocks share one zlib stream, so
    /// this checks the decoder against Go's compressor frame after frame.
    #[rustfmt::skip]
    const KUBECTL_1_32: &[u8] = &[
    0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x3e, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0x25, 0x3a, 0x70, 0x3a, 0x2b, 0x29, 0x4a,
    0x4d, 0xcc, 0x85, 0x16, 0x25, 0xac, 0xa9, 0xa0, 0x80, 0x86, 0x14, 0xcb, 0x45, 0xe0, 0x1c, 0x60,
    0x64, 0x6c, 0x6e, 0xc9, 0xc0, 0xc0, 0xc0, 0x59, 0x04, 0x89, 0xc6, 0x4c, 0x50, 0xf2, 0x66, 0x34,
    0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00, 0x80, 0x03,
    0x00, 0x01, 0x00, 0x00, 0x00, 0x18, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xc2, 0xaa, 0x19, 0x54, 0x0e, 0x25, 0x12, 0xd6, 0x0b, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00,
    0x00, 0x03, 0x00, 0x00, 0x00, 0x37, 0x47, 0x45, 0x54, 0x20, 0x2f, 0x68, 0x65, 0x61, 0x6c, 0x74,
    0x68, 0x20, 0x48, 0x54, 0x54, 0x50, 0x2f, 0x31, 0x2e, 0x31, 0x0d, 0x0a, 0x48, 0x6f, 0x73, 0x74,
    0x3a, 0x20, 0x65, 0x74, 0x63, 0x64, 0x0d, 0x0a, 0x43, 0x6f, 0x6e, 0x6e, 0x65, 0x63, 0x74, 0x69,
    0x6f, 0x6e, 0x3a, 0x20, 0x63, 0x6c, 0x6f, 0x73, 0x65, 0x0d, 0x0a, 0x0d, 0x0a, 0x80, 0x03, 0x00,
    0x03, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x05, 0x80, 0x03, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xa2,
    0xc4, 0x62, 0x43, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x05, 0x01, 0x00, 0x00,
    0x00, 0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0xa2, 0xc0, 0x62, 0x43, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00,
    0x07, 0x00, 0x00, 0x00, 0x37, 0x47, 0x45, 0x54, 0x20, 0x2f, 0x68, 0x65, 0x61, 0x6c, 0x74, 0x68,
    0x20, 0x48, 0x54, 0x54, 0x50, 0x2f, 0x31, 0x2e, 0x31, 0x0d, 0x0a, 0x48, 0x6f, 0x73, 0x74, 0x3a,
    0x20, 0x65, 0x74, 0x63, 0x64, 0x0d, 0x0a, 0x43, 0x6f, 0x6e, 0x6e, 0x65, 0x63, 0x74, 0x69, 0x6f,
    0x6e, 0x3a, 0x20, 0x63, 0x6c, 0x6f, 0x73, 0x65, 0x0d, 0x0a, 0x0d, 0x0a,
    ];

    #[test]
    fn decodes_what_kubectl_sends() {
        let frames = decode_all(&mut Decoder::new(), KUBECTL_1_32).unwrap();
        let syn = |f: &Frame| match f {
            Frame::SynStream {
                stream_id, headers, ..
            } => Some((
                *stream_id,
                header(headers, "streamtype").unwrap().to_owned(),
                header(headers, "port").unwrap().to_owned(),
                header(headers, "requestid").unwrap().to_owned(),
            )),
            _ => None,
        };
        let syns: Vec<_> = frames.iter().filter_map(syn).collect();
        let owned = |id, t: &str, r: &str| (id, t.to_owned(), "2379".to_owned(), r.to_owned());
        assert_eq!(
            syns,
            vec![
                owned(1, "error", "0"),
                owned(3, "data", "0"),
                owned(5, "error", "1"),
                owned(7, "data", "1"),
            ]
        );
        // Go writes exactly three lowercase headers.
        assert!(
            matches!(&frames[0], Frame::SynStream { headers, flags: 0, priority: 0, .. } if headers.len() == 3)
        );
        assert_eq!(
            frames[1],
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::new()
            }
        );
        assert!(frames.contains(&Frame::RstStream {
            stream_id: 3,
            status: rst::CANCEL
        }));
        assert!(frames.iter().any(|f| matches!(f, Frame::Data { stream_id: 7, data, .. } if data.starts_with(b"GET /health"))));
    }

    fn arb_headers() -> impl Strategy<Value = Headers> {
        proptest::collection::btree_map("[a-z0-9-]{1,12}", "[ -~]{0,40}", 0..8)
            .prop_map(|m| m.into_iter().collect())
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let id = 1u32..=MAX_STREAM_ID;
        prop_oneof![
            (
                id.clone(),
                0u32..=MAX_STREAM_ID,
                0u8..8,
                0u8..4,
                arb_headers()
            )
                .prop_map(|(stream_id, associated_to, priority, flags, headers)| {
                    Frame::SynStream {
                        stream_id,
                        associated_to,
                        priority,
                        flags,
                        headers,
                    }
                }),
            (id.clone(), 0u8..2, arb_headers()).prop_map(|(stream_id, flags, headers)| {
                Frame::SynReply {
                    stream_id,
                    flags,
                    headers,
                }
            }),
            (id.clone(), 0u8..2, arb_headers()).prop_map(|(stream_id, flags, headers)| {
                Frame::Headers {
                    stream_id,
                    flags,
                    headers,
                }
            }),
            (id.clone(), 1u32..12)
                .prop_map(|(stream_id, status)| Frame::RstStream { stream_id, status }),
            (
                0u8..2,
                proptest::collection::vec((0u8..4, 0u32..0x0100_0000, any::<u32>()), 0..5)
            )
                .prop_map(|(flags, entries)| Frame::Settings { flags, entries }),
            any::<u32>().prop_map(|id| Frame::Ping { id }),
            (0u32..=MAX_STREAM_ID, 0u32..3).prop_map(|(last_good_stream_id, status)| {
                Frame::GoAway {
                    last_good_stream_id,
                    status,
                }
            }),
            (0u32..=MAX_STREAM_ID, 0u32..=MAX_STREAM_ID)
                .prop_map(|(stream_id, delta)| Frame::WindowUpdate { stream_id, delta }),
            (id, 0u8..2, proptest::collection::vec(any::<u8>(), 0..300)).prop_map(
                |(stream_id, flags, data)| Frame::Data {
                    stream_id,
                    flags,
                    data: data.into()
                }
            ),
        ]
    }

    proptest! {
        /// Any sequence of frames survives encode → decode through one pair of contexts.
        #[test]
        fn round_trip(frames in proptest::collection::vec(arb_frame(), 1..12)) {
            let mut e = Encoder::new().unwrap();
            let mut bytes = BytesMut::new();
            for f in &frames {
                e.encode(f, &mut bytes).unwrap();
            }
            let got = decode_all(&mut Decoder::new(), &bytes).unwrap();
            prop_assert_eq!(got, frames);
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = Decoder::new();
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = d.decode(&mut buf) {}
        }

        /// Valid frame headers with arbitrary payloads (including garbage header blocks)
        /// never panic either.
        #[test]
        fn arbitrary_control_payloads_never_panic(
            kind in 0u16..12,
            flags in any::<u8>(),
            payload in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut buf = BytesMut::new();
            control(&mut buf, kind, flags, payload.len());
            buf.extend_from_slice(&payload);
            let _ = Decoder::new().decode(&mut buf);
        }

        /// A valid compressed block followed by arbitrary mutations never panics.
        #[test]
        fn mutated_header_blocks_never_panic(
            headers in arb_headers(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        ) {
            let mut e = Encoder::new().unwrap();
            let mut bytes = BytesMut::new();
            e.encode(&Frame::SynReply { stream_id: 1, flags: 0, headers }, &mut bytes).unwrap();
            for (at, x) in flips {
                let i = at.index(bytes.len() - 8) + 8;
                bytes[i] ^= x;
            }
            let mut d = Decoder::new();
            let _ = d.decode(&mut bytes);
        }
    }
}
