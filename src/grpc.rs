//! gRPC wire facts shared by every module that speaks it: status codes, and the 5-byte prefix
//! of a Length-Prefixed-Message (grpc `doc/PROTOCOL-HTTP2.md`: 1 compressed-flag byte, then a
//! 4-byte big-endian length).
//!
//! A leaf: it depends on nothing in the crate, so auth, proxy and router can all use it.

/// The status codes the proxy sends or looks at (grpc `doc/statuscodes.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// `OK`.
    Ok = 0,
    /// `INVALID_ARGUMENT`: etcd's answer to a bad request, a failed login, an oversized one.
    InvalidArgument = 3,
    /// `RESOURCE_EXHAUSTED`: a message over the receiver's size limit.
    ResourceExhausted = 8,
    /// `UNIMPLEMENTED`: no such API (gRPC to an etcd 2.x member).
    Unimplemented = 12,
    /// `INTERNAL`: a response the proxy cannot handle.
    Internal = 13,
    /// `UNAVAILABLE`: try again, elsewhere or later; clients fail over on it.
    Unavailable = 14,
    /// `UNAUTHENTICATED`: etcd's answer to an invalid token.
    Unauthenticated = 16,
}

impl Code {
    /// The `grpc-status` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "0",
            Code::InvalidArgument => "3",
            Code::ResourceExhausted => "8",
            Code::Unimplemented => "12",
            Code::Internal => "13",
            Code::Unavailable => "14",
            Code::Unauthenticated => "16",
        }
    }
}

/// The length of a message prefix.
pub const PREFIX: usize = 5;

/// A message prefix: whether the message is compressed, and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// The compressed flag (any non-zero first byte).
    pub compressed: bool,
    /// The message length.
    pub len: usize,
}

impl Prefix {
    /// The prefix at the start of `b`, if there are 5 bytes.
    pub fn parse(b: &[u8]) -> Option<Prefix> {
        let p: &[u8; PREFIX] = b.first_chunk()?;
        Some(Prefix {
            compressed: p[0] != 0,
            len: u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize,
        })
    }

    /// The one uncompressed message that is all of `body`, if it is exactly that.
    pub fn single_message(body: &[u8]) -> Option<&[u8]> {
        let p = Prefix::parse(body)?;
        let msg = body.get(PREFIX..)?;
        (!p.compressed && msg.len() == p.len).then_some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_render_as_grpc_status_numbers() {
        for c in [
            Code::Ok,
            Code::InvalidArgument,
            Code::ResourceExhausted,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::Unauthenticated,
        ] {
            assert_eq!(c.as_str(), (c as u8).to_string());
        }
    }

    #[test]
    fn prefixes_parse_with_their_flag() {
        assert_eq!(Prefix::parse(&[0, 0, 0, 1]), None);
        assert_eq!(
            Prefix::parse(&[1, 0, 0, 1, 0, 9]),
            Some(Prefix {
                compressed: true,
                len: 256
            })
        );
        assert_eq!(
            Prefix::single_message(&[0, 0, 0, 0, 2, 7, 7]),
            Some(&[7u8, 7][..])
        );
        assert_eq!(
            Prefix::single_message(&[1, 0, 0, 0, 2, 7, 7]),
            None,
            "compressed"
        );
        assert_eq!(
            Prefix::single_message(&[0, 0, 0, 0, 3, 7, 7]),
            None,
            "short"
        );
        assert_eq!(
            Prefix::single_message(&[0, 0, 0, 0, 1, 7, 7]),
            None,
            "trailing bytes"
        );
    }
}
