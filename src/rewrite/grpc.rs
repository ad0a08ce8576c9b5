//! Byte-exact rewrite of `etcdserverpb.Cluster/Member*` gRPC responses.
//!
//! Only `Member.clientURLs` (field 4) changes. The response header, every other field and any
//! unknown field are copied byte for byte, in their order; lengths are recomputed and each
//! message is re-emitted with compressed-flag 0 (gRPC allows an uncompressed message whatever
//! `grpc-encoding` says). Field numbers: `docs/etcd-protocols.md` §1.2, from
//! `api/etcdserverpb/rpc.proto`; the algorithm: §1.6.

use bytes::Bytes;

use super::{AddrMap, Error, Rewritten};
use crate::grpc::{Prefix, PREFIX};
use crate::protowire::{put_len_field, Fields, LEN};

/// The five Cluster RPCs whose responses carry `Member` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterMethod {
    /// `MemberList`: members in field 2.
    List,
    /// `MemberAdd`: the new member in field 2, all members in field 3.
    Add,
    /// `MemberRemove`: members in field 2.
    Remove,
    /// `MemberUpdate`: members in field 2.
    Update,
    /// `MemberPromote`: members in field 2.
    Promote,
}

impl ClusterMethod {
    /// The method for a gRPC `:path`, if it is one whose response we rewrite.
    pub fn from_path(path: &str) -> Option<Self> {
        Some(match path.strip_prefix("/etcdserverpb.Cluster/")? {
            "MemberList" => Self::List,
            "MemberAdd" => Self::Add,
            "MemberRemove" => Self::Remove,
            "MemberUpdate" => Self::Update,
            "MemberPromote" => Self::Promote,
            _ => return None,
        })
    }

    /// Whether top-level field `n` of the response is a `Member`.
    fn is_member_field(self, n: u64) -> bool {
        match self {
            Self::Add => n == 2 || n == 3,
            _ => n == 2,
        }
    }
}

/// `Member` field numbers.
const MEMBER_NAME: u64 = 2;
const MEMBER_CLIENT_URLS: u64 = 4;

/// Rewrites a whole gRPC response body (zero or more length-prefixed messages).
///
/// A compressed message gives [`Error::Compressed`]; the caller passes the body through.
pub fn rewrite_body(method: ClusterMethod, body: &[u8], map: &AddrMap) -> Result<Rewritten, Error> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut unmapped = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() < PREFIX {
            return Err(Error::TruncatedFrame(rest.len()));
        }
        let Some(Prefix { compressed, len }) = Prefix::parse(rest) else {
            return Err(Error::TruncatedFrame(rest.len()));
        };
        let msg = rest
            .get(PREFIX..PREFIX + len)
            .ok_or(Error::TruncatedFrame(rest.len()))?;
        if compressed {
            return Err(Error::Compressed);
        }
        let new = rewrite_message(method, msg, map, &mut unmapped)?;
        let new_len = u32::try_from(new.len()).map_err(|_| Error::TruncatedFrame(new.len()))?;
        out.push(0);
        out.extend_from_slice(&new_len.to_be_bytes());
        out.extend_from_slice(&new);
        rest = &rest[PREFIX + len..];
    }
    Ok(Rewritten {
        body: Bytes::from(out),
        unmapped,
    })
}

/// Rewrites one response message.
fn rewrite_message(
    method: ClusterMethod,
    msg: &[u8],
    map: &AddrMap,
    unmapped: &mut Vec<String>,
) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(msg.len() + 32);
    for field in Fields::new(msg) {
        let field = field?;
        if field.wire_type == LEN && method.is_member_field(field.number) {
            let member = rewrite_member(field.payload, map, unmapped)?;
            put_len_field(&mut out, field.number, &member);
        } else {
            out.extend_from_slice(field.raw);
        }
    }
    Ok(out)
}

/// Rewrites one `Member`: its clientURLs become the member's local URL, once.
fn rewrite_member(
    member: &[u8],
    map: &AddrMap,
    unmapped: &mut Vec<String>,
) -> Result<Vec<u8>, Error> {
    let mut name = "";
    let mut urls: Vec<&str> = Vec::new();
    for field in Fields::new(member) {
        let field = field?;
        if field.wire_type != LEN {
            continue;
        }
        match field.number {
            MEMBER_NAME => name = std::str::from_utf8(field.payload).unwrap_or(""),
            MEMBER_CLIENT_URLS => urls.push(std::str::from_utf8(field.payload).unwrap_or("")),
            _ => {}
        }
    }
    if urls.is_empty() {
        // Not started yet (or a learner being added): nothing to rewrite.
        return Ok(member.to_vec());
    }
    let Some(local) = map.local_for_member(name, &urls) else {
        unmapped.push(if name.is_empty() {
            urls[0].to_owned()
        } else {
            name.to_owned()
        });
        return Ok(member.to_vec());
    };
    let mut out = Vec::with_capacity(member.len());
    let mut written = false;
    for field in Fields::new(member) {
        let field = field?;
        if field.wire_type == LEN && field.number == MEMBER_CLIENT_URLS {
            if !written {
                put_len_field(&mut out, MEMBER_CLIENT_URLS, local.as_bytes());
                written = true;
            }
        } else {
            out.extend_from_slice(field.raw);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::tests::three_pods;
    use crate::rewrite::{AddrMap, LocalEndpoint};

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The MemberList response captured from etcd 3.4.23 (`docs/etcd-protocols.md` §1.4):
    /// member `m1` advertising `http://10.99.0.1:2379,http://127.0.0.1:2379`.
    fn captured() -> Vec<u8> {
        let mut v = unhex(
            "00 0000006f 0a17 0896af879d9f8de8a21c 10ecd481eea0a6dd8fb701 2002
             1254 08ecd481eea0a6dd8fb701 12026d31 1a15",
        );
        v.extend_from_slice(b"http://127.0.0.1:2380");
        v.extend_from_slice(&[0x22, 0x15]);
        v.extend_from_slice(b"http://10.99.0.1:2379");
        v.extend_from_slice(&[0x22, 0x15]);
        v.extend_from_slice(b"http://127.0.0.1:2379");
        v
    }

    fn m1_map() -> AddrMap {
        AddrMap::new(vec![LocalEndpoint {
            pod: "m1".into(),
            pod_ip: None,
            host: None,
            port: None,
            url: "http://127.0.0.1:4001".into(),
        }])
    }

    #[test]
    fn captured_member_list_is_rewritten_byte_exactly() {
        let body = captured();
        assert_eq!(
            body.len(),
            5 + 0x6f,
            "fixture matches its own length prefix"
        );
        let out = rewrite_body(ClusterMethod::List, &body, &m1_map()).unwrap();
        // Expected bytes (docs/etcd-protocols.md §1.6): header untouched, one client URL,
        // lengths redone.
        let mut want = unhex(
            "00 00000058 0a17 0896af879d9f8de8a21c 10ecd481eea0a6dd8fb701 2002
             123d 08ecd481eea0a6dd8fb701 12026d31 1a15",
        );
        want.extend_from_slice(b"http://127.0.0.1:2380");
        want.extend_from_slice(&[0x22, 0x15]);
        want.extend_from_slice(b"http://127.0.0.1:4001");
        assert_eq!(out.body.as_ref(), want.as_slice());
        assert!(out.unmapped.is_empty());
    }

    #[test]
    fn unknown_fields_and_learner_flag_survive() {
        // members[0] = {ID 1, name "etcd-0", clientURLs "http://x:2379", isLearner true, field 9 "zz"}
        let mut member = unhex("0801 1206");
        member.extend_from_slice(b"etcd-0");
        member.extend_from_slice(&[0x22, 13]);
        member.extend_from_slice(b"http://x:2379");
        member.extend_from_slice(&unhex("2801 4a02 7a7a"));
        let mut msg = unhex("0a02 2007 7803"); // header{raft_term 7}, unknown field 15 varint 3
        msg.push(0x12);
        msg.push(member.len() as u8);
        msg.extend_from_slice(&member);
        let mut body = vec![0, 0, 0, 0, msg.len() as u8];
        body.extend_from_slice(&msg);

        let out = rewrite_body(ClusterMethod::List, &body, &three_pods()).unwrap();
        let s = out.body.as_ref();
        let find = |needle: &[u8]| s.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"http://127.0.0.1:4002"));
        assert!(!find(b"http://x:2379"));
        assert!(
            find(&unhex("2801 4a02 7a7a")),
            "isLearner and unknown field kept"
        );
        assert!(
            find(&unhex("0a02 2007 7803")),
            "header and unknown top-level field kept"
        );
    }

    #[test]
    fn member_add_rewrites_both_member_fields_and_skips_unstarted() {
        // new member (no name, no clientURLs) in field 2; members in field 3: etcd-1 started.
        let mut new_member = unhex("0805");
        put_len_field(&mut new_member, 3, b"http://p:2380");
        let mut started = unhex("0802 1206");
        started.extend_from_slice(b"etcd-1");
        started.extend_from_slice(&[0x22, 13]);
        started.extend_from_slice(b"http://y:2379");
        let mut msg = Vec::new();
        put_len_field(&mut msg, 2, &new_member);
        put_len_field(&mut msg, 3, &new_member);
        put_len_field(&mut msg, 3, &started);
        let mut body = vec![0];
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(&msg);

        let out = rewrite_body(ClusterMethod::Add, &body, &three_pods()).unwrap();
        let s = out.body.as_ref();
        assert!(s.windows(21).any(|w| w == b"http://127.0.0.1:4003"));
        assert_eq!(s.windows(13).filter(|w| *w == b"http://p:2380").count(), 2);
    }

    #[test]
    fn unmapped_member_is_kept_and_reported() {
        let out = rewrite_body(ClusterMethod::List, &captured(), &three_pods()).unwrap();
        assert_eq!(out.body.as_ref(), captured().as_slice());
        assert_eq!(out.unmapped, vec!["m1".to_string()]);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let body = captured();
        for cut in [1, 4, 6, 40, body.len() - 1] {
            assert!(
                rewrite_body(ClusterMethod::List, &body[..cut], &m1_map()).is_err(),
                "cut {cut}"
            );
        }
        // A member whose length runs past the message.
        let bad = [0, 0, 0, 0, 3, 0x12, 0x7f, 0x08];
        assert!(matches!(
            rewrite_body(ClusterMethod::List, &bad, &m1_map()),
            Err(Error::Wire(crate::protowire::Error::Truncated { .. }))
        ));
        let mut compressed = body.clone();
        compressed[0] = 1;
        assert_eq!(
            rewrite_body(ClusterMethod::List, &compressed, &m1_map()),
            Err(Error::Compressed)
        );
        assert_eq!(
            rewrite_body(ClusterMethod::List, &[], &m1_map())
                .unwrap()
                .body
                .len(),
            0
        );
    }

    #[test]
    fn paths() {
        assert_eq!(
            ClusterMethod::from_path("/etcdserverpb.Cluster/MemberAdd"),
            Some(ClusterMethod::Add)
        );
        assert_eq!(ClusterMethod::from_path("/etcdserverpb.KV/Range"), None);
    }
}
