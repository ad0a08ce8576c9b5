//! Repairs the `:authority` that some etcd clients send, before hyper's HTTP/2 server sees it.
//!
//! etcdctl 3.4's `--cluster` commands dial each member URL with its scheme and send
//! `:authority: http://127.0.0.1:4002`; clientv3 3.5.0 sends `#initially=[…]`
//! (etcd-io/etcd#13192). etcd's grpc-go ignores `:authority`, but the `h2` crate rejects a
//! malformed one with `RST_STREAM(PROTOCOL_ERROR)` (`h2` `server.rs`, "malformed authority"),
//! which made `etcdctl endpoint status --cluster` fail through a hyper-based proxy
//! (`docs/etcd-protocols.md` §1.7).
//!
//! This wrapper sits between the client socket and hyper on HTTP/2 connections and decodes
//! the connection's first header block (HEADERS + CONTINUATION). A gRPC client sends one
//! `:authority` per connection, so the first block decides:
//!
//! * valid (almost every client): the original bytes go on, and so does the rest of the
//!   connection, untouched — hyper decodes the client's HPACK itself, with its own limits.
//!   Decoding only the first block keeps the per-request cost at zero.
//! * malformed: this and every later block is HPACK-decoded with the client's table, repaired
//!   (`http://host:port/…` → `host:port`; anything else unparseable is dropped — `:authority`
//!   is optional and the proxy sets its own upstream) and re-encoded with our own encoder for
//!   hyper, whose HPACK table then only ever holds what our encoder put there.
//!
//! ## Bounds
//!
//! Everything here runs before the client has authenticated, so every block we decode is held
//! to the limits hyper's HTTP/2 server applies itself: frames of at most [`MAX_FRAME`] bytes
//! (the SETTINGS_MAX_FRAME_SIZE hyper advertises), blocks of at most [`MAX_BLOCK`] encoded
//! bytes in at most [`MAX_CONTINUATIONS`] CONTINUATION frames, a decoded header list of at
//! most [`MAX_HEADER_LIST`] (RFC 7541 §4.1 sizes: name + value + 32 per field, counted while
//! decoding, so a block that expands — one literal referenced thousands of times — is
//! stopped without allocating its expansion), and a dynamic table of at most the 4096 bytes
//! HPACK starts with. The buffers therefore never hold more than one frame and one block.
//!
//! A connection that breaks a bound, or sends a block that does not decode, is *refused*: hyper
//! is handed a frame header declaring a length above its SETTINGS_MAX_FRAME_SIZE, on which
//! `h2` answers GOAWAY(FRAME_SIZE_ERROR) and closes the connection, and the client's further
//! bytes are never read. The client gets a protocol error from the same code that enforces
//! HTTP/2 for every other connection, and no state of ours outlives it.
//!
//! HPACK is `loona-hpack`; the HTTP/2 frame walking (RFC 9113 §4.1, §6.2, §6.10) is ours: a
//! 9-byte header, flags END_HEADERS 0x4, PADDED 0x8, PRIORITY 0x20.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame a client may send: HTTP/2's initial SETTINGS_MAX_FRAME_SIZE, which
/// hyper's server keeps. Frames we emit stay within it too.
pub const MAX_FRAME: usize = 16_384;
/// The largest decoded header list (hyper's SETTINGS_MAX_HEADER_LIST_SIZE).
pub const MAX_HEADER_LIST: usize = 16 * 1024;
/// The largest encoded header block we collect: h2 bounds what it buffers of one block by the
/// header list limit too, and a client's first request is a few hundred bytes.
pub const MAX_BLOCK: usize = MAX_HEADER_LIST;
/// CONTINUATION frames one block may use (empty ones included: they cost a frame each).
pub const MAX_CONTINUATIONS: usize = 16;
/// The HPACK dynamic table size the client may use: the initial SETTINGS_HEADER_TABLE_SIZE,
/// which hyper's server does not raise.
const MAX_TABLE: usize = 4096;
/// Read size before the first header block: a client's preface, SETTINGS and first request
/// fit, and every idle connection holds this much.
const READ_CHUNK: usize = 4096;

/// Why a connection was refused (logged at debug level; the client sees GOAWAY).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The HPACK block did not decode.
    #[error("malformed HTTP/2 header block: {0}")]
    Hpack(String),
    /// A frame other than CONTINUATION interrupted a header block.
    #[error("HTTP/2 header block interrupted by a frame of type {0}")]
    Interrupted(u8),
    /// A frame longer than [`MAX_FRAME`].
    #[error("HTTP/2 frame of {0} bytes (at most {MAX_FRAME})")]
    FrameTooLarge(usize),
    /// A header block beyond [`MAX_BLOCK`] bytes or [`MAX_CONTINUATIONS`] frames.
    #[error("HTTP/2 header block too large")]
    BlockTooLarge,
    /// A decoded header list beyond [`MAX_HEADER_LIST`].
    #[error("HTTP/2 header list decodes to more than {MAX_HEADER_LIST} bytes")]
    HeaderListTooLarge,
    /// Padding or priority longer than the frame.
    #[error("malformed padding in an HTTP/2 HEADERS frame")]
    BadPadding,
}

enum Mode {
    /// Waiting for enough bytes to tell HTTP/2 from HTTP/1.
    Detect,
    /// HTTP/1, or HTTP/2 once the first block was fine: bytes pass through.
    Passthrough,
    /// HTTP/2 frames.
    Frames,
    /// The connection broke a bound: hyper gets the refusal, then end of input.
    Refused,
}

/// A header block being collected: the frames as received, stream id, flags of the HEADERS
/// frame, priority bytes, the block, and the CONTINUATION frames seen.
struct Pending {
    raw: Vec<u8>,
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    continuations: usize,
}

/// The sans-IO core: client bytes in, what hyper should read out.
pub struct Repair {
    mode: Mode,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// The first header block had a malformed `:authority`: re-encode every block.
    repairing: bool,
}

impl Default for Repair {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE);
        Self {
            mode: Mode::Detect,
            pending: None,
            decoder,
            encoder: loona_hpack::Encoder::new(),
            repairing: false,
        }
    }
}

impl Repair {
    /// Whether every further byte passes through untouched.
    pub fn passthrough(&self) -> bool {
        matches!(self.mode, Mode::Passthrough)
    }

    /// Whether the connection was refused: `output` ends with the refusal, and no more client
    /// bytes should be read.
    pub fn refused(&self) -> bool {
        matches!(self.mode, Mode::Refused)
    }

    /// How many more bytes `input` needs before anything more can be decided (at least 1).
    fn wanted(&self, input: &BytesMut) -> usize {
        if matches!(self.mode, Mode::Frames) && input.len() >= FRAME_HEADER {
            let len = frame_len(input);
            if len <= MAX_FRAME {
                return (FRAME_HEADER + len).saturating_sub(input.len()).max(1);
            }
        }
        1
    }

    /// Moves whatever can be decided from `input` to `output`. Never fails: a connection that
    /// breaks a bound gets the refusal in `output` (see the module docs).
    pub fn process(&mut self, input: &mut BytesMut, output: &mut BytesMut) {
        if let Err(e) = self.step(input, output) {
            tracing::debug!(error = %e, "refusing the HTTP/2 connection");
            input.clear();
            self.pending = None;
            // A frame header declaring the largest length HTTP/2 can express, on stream 0:
            // h2 rejects it before reading a payload byte.
            output.put_slice(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0]);
            self.mode = Mode::Refused;
        }
    }

    fn step(&mut self, input: &mut BytesMut, output: &mut BytesMut) -> Result<(), Error> {
        loop {
            match self.mode {
                Mode::Detect => {
                    let n = input.len().min(PREFACE.len());
                    if input[..n] != PREFACE[..n] {
                        self.mode = Mode::Passthrough;
                    } else if n == PREFACE.len() {
                        output.extend_from_slice(&input.split_to(n));
                        self.mode = Mode::Frames;
                    } else {
                        return Ok(());
                    }
                }
                Mode::Passthrough => {
                    output.extend_from_slice(&input.split());
                    return Ok(());
                }
                Mode::Frames => {
                    if !self.frame(input, output)? {
                        return Ok(());
                    }
                }
                Mode::Refused => {
                    input.clear();
                    return Ok(());
                }
            }
        }
    }

    /// Handles one whole frame from `input`; false when there is none yet.
    fn frame(&mut self, input: &mut BytesMut, output: &mut BytesMut) -> Result<bool, Error> {
        if input.len() < FRAME_HEADER {
            return Ok(false);
        }
        let len = frame_len(input);
        if len > MAX_FRAME {
            return Err(Error::FrameTooLarge(len));
        }
        if input.len() < FRAME_HEADER + len {
            return Ok(false);
        }
        let (kind, flags) = (input[3], input[4]);
        let stream = u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & 0x7fff_ffff;
        let frame = input.split_to(FRAME_HEADER + len);
        match (kind, self.pending.as_mut()) {
            (CONTINUATION, Some(p)) => {
                p.continuations += 1;
                if p.continuations > MAX_CONTINUATIONS || p.block.len() + len > MAX_BLOCK {
                    return Err(Error::BlockTooLarge);
                }
                p.block.extend_from_slice(&frame[FRAME_HEADER..]);
                p.raw.extend_from_slice(&frame);
            }
            (_, Some(_)) => return Err(Error::Interrupted(kind)),
            (HEADERS, None) => {
                let (priority, block) = headers_payload(flags, &frame[FRAME_HEADER..])?;
                self.pending = Some(Pending {
                    raw: frame.to_vec(),
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    block: block.to_vec(),
                    continuations: 0,
                });
            }
            (_, None) => {
                output.extend_from_slice(&frame);
                return Ok(true);
            }
        }
        if flags & END_HEADERS != 0 {
            self.finish_block(output)?;
        }
        Ok(true)
    }

    /// Decodes, repairs and re-encodes the pending header block into HEADERS + CONTINUATIONs.
    fn finish_block(&mut self, output: &mut BytesMut) -> Result<(), Error> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let mut headers = decode_bounded(&mut self.decoder, &p.block)?;
        if !self.repairing {
            if authority_ok(&headers) {
                // The usual case: hand hyper the client's own bytes from here on.
                output.extend_from_slice(&p.raw);
                self.mode = Mode::Passthrough;
                return Ok(());
            }
            self.repairing = true;
        }
        repair(&mut headers);
        let block = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        write_block(output, &p, &block);
        Ok(())
    }
}

/// The length a frame header at the start of `b` (at least 9 bytes) declares.
fn frame_len(b: &[u8]) -> usize {
    usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2])
}

/// A HEADERS payload without its padding: the priority bytes, if flagged, and the block.
fn headers_payload(flags: u8, mut payload: &[u8]) -> Result<(Option<[u8; 5]>, &[u8]), Error> {
    if flags & PADDED != 0 {
        let pad = usize::from(*payload.first().ok_or(Error::BadPadding)?);
        let end = payload.len().checked_sub(pad).ok_or(Error::BadPadding)?;
        payload = payload.get(1..end).ok_or(Error::BadPadding)?;
    }
    if flags & PRIORITY == 0 {
        return Ok((None, payload));
    }
    let (p, rest) = payload.split_first_chunk::<5>().ok_or(Error::BadPadding)?;
    Ok((Some(*p), rest))
}

/// A decoded header field: name and value.
type Field = (Vec<u8>, Vec<u8>);

/// Decodes `block`, counting the decoded size as it goes and keeping nothing past
/// [`MAX_HEADER_LIST`].
fn decode_bounded(
    decoder: &mut loona_hpack::Decoder<'static>,
    block: &[u8],
) -> Result<Vec<Field>, Error> {
    let mut size = 0usize;
    let mut headers = Vec::new();
    decoder
        .decode_with_cb(block, |n, v| {
            size = size.saturating_add(n.len() + v.len() + 32);
            if size <= MAX_HEADER_LIST {
                headers.push((n.into_owned(), v.into_owned()));
            }
        })
        .map_err(|e| Error::Hpack(format!("{e:?}")))?;
    if size > MAX_HEADER_LIST {
        return Err(Error::HeaderListTooLarge);
    }
    Ok(headers)
}

/// Writes `block` as the HEADERS frame of `p` and as many CONTINUATIONs as it needs.
fn write_block(output: &mut BytesMut, p: &Pending, block: &[u8]) {
    let mut rest = block;
    let mut first = true;
    loop {
        let prefix = if first && p.priority.is_some() { 5 } else { 0 };
        let take = rest.len().min(MAX_FRAME - prefix);
        let (chunk, tail) = rest.split_at(take);
        let last = tail.is_empty();
        let (kind, mut flags) = if first {
            (HEADERS, 0)
        } else {
            (CONTINUATION, 0)
        };
        if first && p.end_stream {
            flags |= END_STREAM;
        }
        if first && p.priority.is_some() {
            flags |= PRIORITY;
        }
        if last {
            flags |= END_HEADERS;
        }
        let len = prefix + chunk.len();
        output.put_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        output.put_u32(p.stream);
        if let (true, Some(pri)) = (first && prefix > 0, p.priority) {
            output.put_slice(&pri);
        }
        output.put_slice(chunk);
        rest = tail;
        first = false;
        if last {
            return;
        }
    }
}

/// Whether the block's `:authority`, if any, is one hyper accepts.
fn authority_ok(headers: &[(Vec<u8>, Vec<u8>)]) -> bool {
    headers
        .iter()
        .find(|(n, _)| n == b":authority")
        .is_none_or(|(_, v)| http::uri::Authority::try_from(v.as_slice()).is_ok())
}

/// Repairs or drops a malformed `:authority`.
fn repair(headers: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    let Some(i) = headers.iter().position(|(n, _)| n == b":authority") else {
        return;
    };
    if http::uri::Authority::try_from(headers[i].1.as_slice()).is_ok() {
        return;
    }
    let fixed = std::str::from_utf8(&headers[i].1)
        .ok()
        .and_then(|v| v.split_once("://").map(|(_, rest)| rest))
        .and_then(|rest| rest.split(['/', '?', '#']).next())
        .filter(|a| http::uri::Authority::try_from(*a).is_ok())
        .map(|a| a.as_bytes().to_vec());
    tracing::debug!(authority = %String::from_utf8_lossy(&headers[i].1), repaired = fixed.is_some(), "malformed :authority from client");
    match fixed {
        Some(a) => headers[i].1 = a,
        None => {
            headers.remove(i);
        }
    }
}

/// A client connection whose HTTP/2 header blocks are repaired on the way in.
pub struct RepairAuthority<S> {
    inner: S,
    core: Repair,
    input: BytesMut,
    output: BytesMut,
    eof: bool,
}

impl<S> RepairAuthority<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            core: Repair::default(),
            input: BytesMut::new(),
            output: BytesMut::new(),
            eof: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RepairAuthority<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.core.passthrough() && this.output.is_empty() && !this.eof {
            // Decided and drained: the rest of the connection goes straight to hyper's buffer,
            // and our buffers are given back.
            if this.input.capacity() > 0 || this.output.capacity() > 0 {
                this.input = BytesMut::new();
                this.output = BytesMut::new();
            }
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof || this.core.refused() {
                return Poll::Ready(Ok(()));
            }
            // Read at most what completes the frame being collected, in small steps: a
            // client that announces a large frame and sends it slowly holds no more than it
            // sent.
            let want = this.core.wanted(&this.input).clamp(1024, READ_CHUNK);
            if this.input.capacity() - this.input.len() < want {
                this.input.reserve(want);
            }
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.input
            ))?;
            if n == 0 {
                this.eof = true;
                // A truncated frame: hand hyper what there is; it reports the error.
                let rest = this.input.split();
                this.output.extend_from_slice(&rest);
                continue;
            }
            this.core.process(&mut this.input, &mut this.output);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RepairAuthority<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Runs `input` through the wrapper and returns what hyper would read.
    async fn through(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(&input).await?;
        drop(client);
        let mut out = Vec::new();
        RepairAuthority::new(server).read_to_end(&mut out).await?;
        Ok(out)
    }

    /// Splits hyper's view back into frames: (type, flags, stream, payload).
    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while b.len() >= FRAME_HEADER {
            let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            v.push((
                b[3],
                b[4],
                stream,
                b[FRAME_HEADER..FRAME_HEADER + len].to_vec(),
            ));
            b = &b[FRAME_HEADER + len..];
        }
        v
    }

    fn request(authority: &str) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/etcdserverpb.Maintenance/Status".to_vec()),
            (b":authority", authority.as_bytes().to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
            (b"te", b"trailers".to_vec()),
        ]
    }

    fn encode(
        enc: &mut loona_hpack::Encoder<'static>,
        headers: &[(&'static [u8], Vec<u8>)],
    ) -> Vec<u8> {
        enc.encode(headers.iter().map(|(n, v)| (*n, v.as_slice())))
    }

    #[tokio::test]
    async fn repairs_the_authority_etcdctl_cluster_sends_and_keeps_other_frames() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &encode(&mut enc, &request("http://127.0.0.1:4002")),
        ));
        input.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0])); // DATA
                                                                   // The same client encoder now refers to its dynamic table for the second request.
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            3,
            &encode(&mut enc, &request("http://127.0.0.1:4002")),
        ));
        // clientv3 3.5.0's authority cannot be repaired: it is dropped.
        input.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            5,
            &encode(&mut enc, &request("#initially=[http://x:1]")),
        ));

        let out = through(input).await.unwrap();
        assert!(out.starts_with(PREFACE));
        let fs = frames(&out[PREFACE.len()..]);
        assert_eq!(fs.len(), 5);
        assert_eq!((fs[0].0, fs[0].3.len()), (0x4, 0));
        assert_eq!(
            fs[2],
            (0x0, END_STREAM, 1, vec![0, 0, 0, 0, 0]),
            "DATA passes byte for byte"
        );
        let mut dec = loona_hpack::Decoder::new();
        for (i, want) in [
            (1, Some("127.0.0.1:4002")),
            (3, Some("127.0.0.1:4002")),
            (4, None),
        ] {
            let (kind, flags, _, block) = &fs[i];
            assert_eq!(*kind, HEADERS);
            assert_ne!(flags & END_HEADERS, 0);
            let headers = dec.decode(block).unwrap();
            let authority = headers
                .iter()
                .find(|(n, _)| n == b":authority")
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
            assert_eq!(authority.as_deref(), want, "frame {i}");
            assert!(headers
                .iter()
                .any(|(n, v)| n == b":path" && v == b"/etcdserverpb.Maintenance/Status"));
        }
        assert_ne!(fs[4].1 & END_STREAM, 0, "END_STREAM kept");
    }

    #[tokio::test]
    async fn continuation_padding_and_priority_are_handled() {
        let mut enc = loona_hpack::Encoder::new();
        let block = encode(&mut enc, &request("http://127.0.0.1:4001"));
        let (a, b) = block.split_at(block.len() / 2);
        let mut headers = vec![3u8]; // pad length
        headers.extend_from_slice(&[0, 0, 0, 0, 16]); // priority: dependency 0, weight 16
        headers.extend_from_slice(a);
        headers.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &headers));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        let fs = frames(&through(input).await.unwrap()[PREFACE.len()..]);
        assert_eq!(fs.len(), 1);
        let (kind, flags, stream, payload) = &fs[0];
        assert_eq!((*kind, *stream), (HEADERS, 1));
        assert_eq!(*flags, PRIORITY | END_HEADERS);
        assert_eq!(&payload[..5], &[0, 0, 0, 0, 16]);
        let decoded = loona_hpack::Decoder::new().decode(&payload[5..]).unwrap();
        assert!(decoded
            .iter()
            .any(|(n, v)| n == b":authority" && v == b"127.0.0.1:4001"));
    }

    #[tokio::test]
    async fn a_valid_first_block_passes_the_connection_through_byte_for_byte() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &encode(&mut enc, &request("127.0.0.1:4001")),
        ));
        input.extend(frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            3,
            &encode(&mut enc, &request("127.0.0.1:4001")),
        ));
        assert_eq!(through(input.clone()).await.unwrap(), input);
    }

    #[tokio::test]
    async fn http1_passes_through_untouched() {
        let req = b"GET /v2/keys/a HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(through(req.clone()).await.unwrap(), req);
    }

    /// What hyper reads when a connection is refused: the frame header h2 rejects, then EOF.
    const REFUSAL: [u8; 9] = [0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0];

    fn refused(out: &[u8]) -> bool {
        out.ends_with(&REFUSAL)
    }

    #[tokio::test]
    async fn malformed_header_blocks_refuse_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0x7f],
        )); // index overflow
        assert!(refused(&through(input).await.unwrap()));

        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"data"));
        let out = through(input).await.unwrap();
        assert!(refused(&out));
        assert!(
            !out.windows(4).any(|w| w == b"data"),
            "nothing after the refusal"
        );
    }

    /// One literal added to the dynamic table, then referenced `refs` times: a few bytes each
    /// on the wire, the whole literal each once decoded.
    fn expanding_block(literal: usize, refs: usize) -> Vec<u8> {
        let mut enc = loona_hpack::Encoder::new();
        let value = vec![b'a'; literal];
        let mut block = enc.encode([(&b"x-bomb"[..], &value[..])]);
        // Indexed field 62: the first dynamic table entry.
        block.extend(std::iter::repeat_n(0xbe, refs));
        block
    }

    #[tokio::test]
    async fn a_block_that_expands_past_the_header_list_limit_is_refused_without_expanding() {
        // 4 KiB literal (within the 4096-byte table) referenced 3,000 times: ~12 MiB decoded
        // from ~7 KiB on the wire.
        let block = expanding_block(4000, 3000);
        assert!(block.len() < MAX_BLOCK);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let out = through(input).await.unwrap();
        assert!(refused(&out));
        assert!(
            out.len() < 64,
            "nothing decoded is handed on: {} bytes",
            out.len()
        );

        // Just under the limit passes.
        let mut input = PREFACE.to_vec();
        let ok = expanding_block(100, (MAX_HEADER_LIST - 600) / (100 + 6 + 32));
        let mut enc = loona_hpack::Encoder::new();
        let mut full = encode(&mut enc, &request("127.0.0.1:4001"));
        full.extend(&ok);
        input.extend(frame(HEADERS, END_HEADERS, 1, &full));
        assert!(!refused(&through(input).await.unwrap()));
    }

    #[tokio::test]
    async fn frames_larger_than_hyper_accepts_are_refused_at_their_header() {
        // A header announcing 16 MiB, 1 KiB of it, and the connection left open: refused at
        // once, without waiting for the rest or for the client to close.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0xff, 0xff, 0xff, HEADERS, 0, 0, 0, 0, 1]);
        input.extend(vec![0u8; 1024]);
        client.write_all(&input).await.unwrap();
        let mut out = Vec::new();
        let mut repair = RepairAuthority::new(server);
        let read = repair.read_to_end(&mut out);
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("refused without waiting for the client")
            .unwrap();
        assert_eq!(out, [PREFACE, &REFUSAL[..]].concat());
        drop(client);
    }

    #[tokio::test]
    async fn continuation_floods_and_oversized_blocks_are_refused() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..=MAX_CONTINUATIONS {
            input.extend(frame(CONTINUATION, 0, 1, &[]));
        }
        assert!(refused(&through(input).await.unwrap()));

        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &vec![0x82; MAX_FRAME]));
        input.extend(frame(CONTINUATION, 0, 1, &[0x82]));
        assert!(refused(&through(input).await.unwrap()));
    }

    #[tokio::test]
    async fn a_table_size_above_the_initial_setting_is_refused() {
        let mut input = PREFACE.to_vec();
        // Dynamic table size update to 8192 (0x3f then varint 8161).
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x3f, 0x82]));
        assert!(refused(&through(input).await.unwrap()));
    }
}
