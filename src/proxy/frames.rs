//! gRPC Length-Prefixed-Messages over a stream of DATA chunks: chunk boundaries have no
//! relation to message boundaries (grpc `doc/PROTOCOL-HTTP2.md`), so bytes are buffered until
//! a whole message is there.

use bytes::{Buf, Bytes, BytesMut};

use crate::grpc::{Prefix, PREFIX};
/// The largest message accepted from etcd: its watch responses are not split unless the
/// client asks for fragments, so this is generous.
pub const MAX_FROM_ETCD: usize = 64 << 20;
/// The largest message accepted from a client: etcd's own cap on a received message
/// (`--max-request-bytes`, 1.5 MiB by default, + 512 KiB of gRPC overhead).
pub const MAX_FROM_CLIENT: usize = 2 << 20;

/// A stream that is not a sequence of uncompressed gRPC messages.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Compressed messages cannot be inspected (etcd and clientv3 never compress).
    #[error("compressed gRPC message on a watch stream")]
    Compressed,
    /// A message over the deframer's limit, in grpc-go's words (what etcd answers too).
    #[error("grpc: received message larger than max ({0} vs. {1})")]
    TooLarge(usize, usize),
}

/// Reassembles messages from chunks.
pub struct Deframer {
    buf: BytesMut,
    limit: usize,
}

impl Deframer {
    /// Reassembles messages of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            limit,
        }
    }

    /// Adds a chunk. Once a message's prefix is in, room for the whole message is reserved at
    /// once: a large message (a watch catching up) is then copied once, not once per doubling
    /// of the buffer.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
        if let Some(len) = self.pending_len() {
            if len <= self.limit {
                self.buf
                    .reserve((PREFIX + len).saturating_sub(self.buf.len()));
            }
        }
    }

    /// The length of the message at the front, once its prefix is in.
    fn pending_len(&self) -> Option<usize> {
        Prefix::parse(&self.buf).map(|p| p.len)
    }

    /// The next whole message's payload, if one is buffered.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, Error> {
        let Some(mut framed) = self.next_framed()? else {
            return Ok(None);
        };
        framed.advance(PREFIX);
        Ok(Some(framed))
    }

    /// The next whole message with its prefix, as it came: what passes through unchanged is
    /// not copied again.
    pub fn next_framed(&mut self) -> Result<Option<Bytes>, Error> {
        let Some(Prefix { compressed, len }) = Prefix::parse(&self.buf) else {
            return Ok(None);
        };
        if compressed {
            return Err(Error::Compressed);
        }
        if len > self.limit {
            return Err(Error::TooLarge(len, self.limit));
        }
        if self.buf.len() < PREFIX + len {
            return Ok(None);
        }
        Ok(Some(self.buf.split_to(PREFIX + len).freeze()))
    }
}

/// The payload of a message returned by [`Deframer::next_framed`].
pub fn payload(framed: &[u8]) -> &[u8] {
    &framed[PREFIX..]
}

/// One message with its prefix.
pub fn frame(msg: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(PREFIX + msg.len());
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(msg);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_across_chunks_are_reassembled() {
        let mut stream = frame(b"hello").to_vec();
        stream.extend_from_slice(&frame(b""));
        stream.extend_from_slice(&frame(b"world"));
        let mut d = Deframer::new(MAX_FROM_ETCD);
        let mut got = Vec::new();
        for chunk in stream.chunks(3) {
            d.push(chunk);
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(
            got,
            [
                Bytes::from_static(b"hello"),
                Bytes::new(),
                Bytes::from_static(b"world")
            ]
        );
    }

    #[test]
    fn a_framed_message_comes_back_as_it_arrived() {
        let big = vec![7u8; 100_000];
        let stream = frame(&big);
        let mut d = Deframer::new(MAX_FROM_ETCD);
        let mut got = None;
        for chunk in stream.chunks(16 * 1024) {
            d.push(chunk);
            if let Some(m) = d.next_framed().unwrap() {
                got = Some(m);
            }
        }
        let got = got.expect("one message");
        assert_eq!(got, stream);
        assert_eq!(payload(&got), &big[..]);
        assert_eq!(d.next_framed(), Ok(None));
    }

    #[test]
    fn compressed_and_huge_messages_are_refused() {
        let mut d = Deframer::new(MAX_FROM_ETCD);
        d.push(&[1, 0, 0, 0, 1, 7]);
        assert_eq!(d.next_message(), Err(Error::Compressed));
        let mut d = Deframer::new(MAX_FROM_ETCD);
        d.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next_message(),
            Err(Error::TooLarge(_, MAX_FROM_ETCD))
        ));
        let mut d = Deframer::new(MAX_FROM_CLIENT);
        d.push(&[0, 0, 0x20, 0, 1]);
        assert_eq!(
            d.next_message().unwrap_err().to_string(),
            "grpc: received message larger than max (2097153 vs. 2097152)"
        );
    }
}
