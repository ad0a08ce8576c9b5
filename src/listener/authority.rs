//! Repairs the `:authority` that some etcd clients send, before hyper's HTTP/2 server sees it.
//!
//! etcdctl 3.4's `--cluster` commands dial each member URL with its scheme and send
//! `:authority: http://127.0.0.1:4002`; clientv3 3.5.0 sends `#initially=[…]`
//! (etcd-io/etcd#13192). etcd's grpc-go ignores `:authority`, but the `h2` crate rejects a
//! malformed one with `RST_STREAM(PROTOCOL_ERROR)` (`h2` `server.rs`, "malformed authority"),
//! which made `etcdctl endpoint status --cluster` fail through a hyper-based proxy.
//!
//! This wrapper sits between the client socket and hyper on HTTP/2 connections and decodes
//! the connection's first header block (HEADERS + CONTINUATION). A gRPC client sends one
//! `:authority` per connection, so the first block decides:
//!
//! * valid (almost every client): the original bytes go on, and so does the rest of the
//!   connection, untouched — hyper decodes the client's HPACK itself. This costs one decode
//!   per connection; decoding every block measured as ~20 % of the proxy's CPU under load.
//! * malformed: this and every later block is HPACK-decoded with the client's table, repaired
//!   (`http://host:port/…` → `host:port`; anything else unparseable is dropped — `:authority`
//!   is optional and the proxy sets its own upstream) and re-encoded with our own encoder for
//!   hyper, whose HPACK table then only ever holds what our encoder put there.
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
/// Frames we emit stay within the smallest SETTINGS_MAX_FRAME_SIZE a server may advertise.
const MAX_OUT_FRAME: usize = 16_384;
/// A header block larger than this, or decoding to a header list larger than this, is
/// refused (hyper's own header list limit is smaller).
const MAX_BLOCK: usize = 1 << 20;
/// Read size before the first header block: a client's preface, SETTINGS and first request
/// fit, and every idle connection holds this much.
const READ_CHUNK: usize = 4096;
/// The largest frame we buffer (SETTINGS_MAX_FRAME_SIZE can be at most 2^24 - 1).
const MAX_FRAME: usize = (1 << 24) - 1;

/// The client's bytes could not be repaired: the connection ends with this error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The HPACK block did not decode.
    #[error("malformed HTTP/2 header block: {0:?}")]
    Hpack(loona_hpack::decoder::DecoderError),
    /// A frame other than CONTINUATION interrupted a header block.
    #[error("HTTP/2 header block interrupted by a frame of type {0}")]
    Interrupted(u8),
    /// A header block or frame beyond our limits.
    #[error("HTTP/2 header block too large")]
    TooLarge,
    /// Padding longer than the frame.
    #[error("malformed padding in an HTTP/2 HEADERS frame")]
    BadPadding,
}

enum Mode {
    /// Waiting for enough bytes to tell HTTP/2 from HTTP/1.
    Detect,
    /// HTTP/1: bytes pass through.
    Passthrough,
    /// HTTP/2 frames.
    Frames,
}

/// A header block being collected: stream id, flags of the HEADERS frame, priority bytes, block,
/// and the frames as received.
struct Pending {
    raw: Vec<u8>,
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// A client connection whose HTTP/2 header blocks are repaired on the way in.
pub struct RepairAuthority<S> {
    inner: S,
    mode: Mode,
    input: BytesMut,
    output: BytesMut,
    pending: Option<Pending>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// The first header block had a malformed `:authority`: re-encode every block.
    repairing: bool,
    eof: bool,
}

impl<S> RepairAuthority<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(1 << 16);
        Self {
            inner,
            mode: Mode::Detect,
            input: BytesMut::new(),
            output: BytesMut::new(),
            pending: None,
            decoder,
            encoder: loona_hpack::Encoder::new(),
            repairing: false,
            eof: false,
        }
    }

    /// Moves whatever can be decided from `input` to `output`.
    fn process(&mut self) -> Result<(), Error> {
        loop {
            match self.mode {
                Mode::Detect => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.mode = Mode::Passthrough;
                    } else if n == PREFACE.len() {
                        self.output.extend_from_slice(&self.input.split_to(n));
                        self.mode = Mode::Frames;
                    } else {
                        return Ok(());
                    }
                }
                Mode::Passthrough => {
                    let all = self.input.split();
                    self.output.extend_from_slice(&all);
                    return Ok(());
                }
                Mode::Frames => {
                    self.frames()?;
                    if matches!(self.mode, Mode::Frames) {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn frames(&mut self) -> Result<(), Error> {
        while matches!(self.mode, Mode::Frames) && self.input.len() >= FRAME_HEADER {
            let len = usize::from(self.input[0]) << 16
                | usize::from(self.input[1]) << 8
                | usize::from(self.input[2]);
            if len > MAX_FRAME {
                return Err(Error::TooLarge);
            }
            if self.input.len() < FRAME_HEADER + len {
                self.input.reserve(FRAME_HEADER + len - self.input.len());
                return Ok(());
            }
            let kind = self.input[3];
            let flags = self.input[4];
            let stream =
                u32::from_be_bytes([self.input[5], self.input[6], self.input[7], self.input[8]])
                    & 0x7fff_ffff;
            if self.pending.is_some() && kind != CONTINUATION {
                return Err(Error::Interrupted(kind));
            }
            match kind {
                HEADERS => {
                    let frame = self.input.split_to(FRAME_HEADER + len);
                    let mut payload = &frame[FRAME_HEADER..];
                    if flags & PADDED != 0 {
                        let pad = usize::from(*payload.first().ok_or(Error::BadPadding)?);
                        payload = payload
                            .get(1..payload.len().checked_sub(pad).ok_or(Error::BadPadding)?)
                            .ok_or(Error::BadPadding)?;
                    }
                    let priority = if flags & PRIORITY != 0 {
                        let p: [u8; 5] = payload
                            .get(..5)
                            .and_then(|p| p.try_into().ok())
                            .ok_or(Error::BadPadding)?;
                        payload = &payload[5..];
                        Some(p)
                    } else {
                        None
                    };
                    self.pending = Some(Pending {
                        raw: frame.to_vec(),
                        stream,
                        end_stream: flags & END_STREAM != 0,
                        priority,
                        block: payload.to_vec(),
                    });
                    if flags & END_HEADERS != 0 {
                        self.finish_block()?;
                    }
                }
                CONTINUATION if self.pending.is_some() => {
                    let frame = self.input.split_to(FRAME_HEADER + len);
                    if let Some(p) = self.pending.as_mut() {
                        if p.block.len() + len > MAX_BLOCK {
                            return Err(Error::TooLarge);
                        }
                        p.block.extend_from_slice(&frame[FRAME_HEADER..]);
                        p.raw.extend_from_slice(&frame);
                    }
                    if flags & END_HEADERS != 0 {
                        self.finish_block()?;
                    }
                }
                _ => {
                    let frame = self.input.split_to(FRAME_HEADER + len);
                    self.output.extend_from_slice(&frame);
                }
            }
        }
        Ok(())
    }

    /// Decodes, repairs and re-encodes the pending header block into HEADERS + CONTINUATIONs.
    fn finish_block(&mut self) -> Result<(), Error> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        // Bounded by what the headers decode to, not by the block: one byte can name a table
        // entry of up to the table size, so a small block can decode to gigabytes.
        let mut headers = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&p.block, |name, value| {
                // RFC 9113 §6.5.2 counts each field as name + value + 32.
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_BLOCK {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(Error::Hpack)?;
        if size > MAX_BLOCK {
            return Err(Error::TooLarge);
        }
        if !self.repairing {
            if authority_ok(&headers) {
                // The usual case: hand hyper the client's own bytes from here on.
                self.output.extend_from_slice(&p.raw);
                self.mode = Mode::Passthrough;
                return Ok(());
            }
            self.repairing = true;
        }
        repair(&mut headers);
        let block = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut rest: &[u8] = &block;
        let mut first = true;
        loop {
            let prefix = if first && p.priority.is_some() { 5 } else { 0 };
            let take = rest.len().min(MAX_OUT_FRAME - prefix);
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
            self.output
                .put_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
            self.output.put_u32(p.stream);
            if let (true, Some(pri)) = (first && prefix > 0, p.priority) {
                self.output.put_slice(&pri);
            }
            self.output.put_slice(chunk);
            rest = tail;
            first = false;
            if last {
                return Ok(());
            }
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

impl<S: AsyncRead + Unpin> AsyncRead for RepairAuthority<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if matches!(this.mode, Mode::Passthrough) && this.output.is_empty() && !this.eof {
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
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if this.input.capacity() - this.input.len() < 1024 {
                // Small: an idle connection keeps this until its first request arrives.
                this.input.reserve(READ_CHUNK);
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
            this.process()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
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

    #[tokio::test]
    async fn a_block_that_decodes_huge_is_refused() {
        // One 4 KB header put in the HPACK table, then referenced by one byte each time:
        // 50 000 references decode to 200 MB. Only the decoded size can bound this.
        let mut block = vec![0x40, 0x01, b'x', 0x7f];
        let mut len = Vec::new();
        let value = 4000usize;
        let mut rest = value - 127;
        while rest >= 128 {
            len.push((rest % 128) as u8 | 0x80);
            rest /= 128;
        }
        len.push(rest as u8);
        block.extend_from_slice(&len);
        block.extend(std::iter::repeat_n(b'v', value));
        block.extend(std::iter::repeat_n(0xbe, 50_000)); // indexed: dynamic entry 62
        let mut input = PREFACE.to_vec();
        // The frame carries the malformed authority first, so the block is decoded.
        let mut enc = loona_hpack::Encoder::new();
        let mut first = encode(&mut enc, &request("http://127.0.0.1:4002"));
        first.extend_from_slice(&block);
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        match through(input).await {
            Ok(out) => panic!("passed, {} bytes", out.len()),
            Err(err) => {
                assert_eq!(err.kind(), io::ErrorKind::InvalidData);
                assert!(err.to_string().contains("too large"), "{err}");
            }
        }
    }

    #[tokio::test]
    async fn malformed_header_blocks_fail_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0x7f],
        )); // index overflow
        let err = through(input).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b"data"));
        assert!(through(input)
            .await
            .unwrap_err()
            .to_string()
            .contains("interrupted"));
    }
}
