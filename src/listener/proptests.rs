//! Property tests of the `:authority` repair ([`super::authority`]) on whole client
//! connections: HPACK-encoded requests, header blocks split into CONTINUATION frames, padding,
//! and the connection arriving in pieces of any size.
//!
//! Properties: a connection whose first `:authority` is valid comes out byte for byte; one
//! whose first is malformed comes out with every request's headers as sent except
//! `:authority`, repaired to `host:port` where it had a scheme and dropped where it cannot be
//! repaired; every other frame is unchanged.

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::authority::RepairAuthority;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;

/// An `:authority` with a known fate.
#[derive(Debug, Clone)]
enum Authority {
    /// Valid `host[:port]`: kept.
    Valid(String),
    /// `scheme://host:port/…` as etcdctl 3.4 `--cluster` sends: becomes `host:port`.
    Scheme(String, String),
    /// Unrepairable (clientv3 3.5.0's `#initially=[…]`): dropped.
    Garbage(String),
    /// None sent.
    Absent,
}

fn host_port() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,10}(\\.[a-z0-9]{1,6}){0,2}(:[0-9]{1,5})?"
}

fn authority() -> impl Strategy<Value = Authority> {
    prop_oneof![
        host_port().prop_map(Authority::Valid),
        ("https?", host_port(), "(/[a-z0-9]{0,6}){0,2}")
            .prop_map(|(s, hp, path)| Authority::Scheme(format!("{s}://{hp}{path}"), hp)),
        "[a-z:/.,0-9]{0,20}".prop_map(|inner| Authority::Garbage(format!("#initially=[{inner}]"))),
        Just(Authority::Absent),
    ]
}

/// One request: its authority, extra headers, how its block is cut into frames (cut points
/// as fractions), padding of the HEADERS frame, END_STREAM, and a DATA frame after it.
type Request = (
    Authority,
    Vec<(String, String)>,
    Vec<u8>,
    Option<u8>,
    bool,
    Vec<u8>,
);

fn request() -> impl Strategy<Value = Request> {
    (
        authority(),
        prop::collection::vec(("[a-z][a-z-]{0,10}", "[ -~]{0,30}"), 0..4),
        prop::collection::vec(any::<u8>(), 0..3),
        prop::option::of(0..8u8),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..20),
    )
}

fn headers(r: &Request, stream: u32) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut h: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b":method".to_vec(), b"POST".to_vec()),
        (b":scheme".to_vec(), b"http".to_vec()),
        (
            b":path".to_vec(),
            format!("/etcdserverpb.KV/Range{stream}").into_bytes(),
        ),
    ];
    match &r.0 {
        Authority::Valid(a) | Authority::Scheme(a, _) | Authority::Garbage(a) => {
            h.push((b":authority".to_vec(), a.clone().into_bytes()))
        }
        Authority::Absent => {}
    }
    for (n, v) in &r.1 {
        h.push((n.clone().into_bytes(), v.clone().into_bytes()));
    }
    h
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A client connection: preface, SETTINGS, then each request's HEADERS (+ CONTINUATIONs)
/// and DATA, encoded with one HPACK encoder as a client does.
fn connection(requests: &[Request]) -> Vec<u8> {
    let mut enc = loona_hpack::Encoder::new();
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    for (i, r) in requests.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        let h = headers(r, stream);
        let block = enc.encode(h.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut cuts: Vec<usize> =
            r.2.iter()
                .map(|c| usize::from(*c) * block.len() / 256)
                .collect();
        cuts.sort_unstable();
        cuts.dedup();
        cuts.retain(|&c| c > 0);
        let mut pieces = Vec::new();
        let mut start = 0;
        for c in cuts.into_iter().chain([block.len()]) {
            pieces.push(&block[start..c]);
            start = c;
        }
        let end_stream = if r.4 { END_STREAM } else { 0 };
        for (k, piece) in pieces.iter().enumerate() {
            let last = if k + 1 == pieces.len() {
                END_HEADERS
            } else {
                0
            };
            if k == 0 {
                let (flags, payload) = match r.3 {
                    Some(pad) => {
                        let mut p = vec![pad];
                        p.extend_from_slice(piece);
                        p.extend(std::iter::repeat_n(0, usize::from(pad)));
                        (PADDED, p)
                    }
                    None => (0, piece.to_vec()),
                };
                out.extend(frame(HEADERS, flags | end_stream | last, stream, &payload));
            } else {
                out.extend(frame(CONTINUATION, last, stream, piece));
            }
        }
        if !r.4 {
            out.extend(frame(0x0, END_STREAM, stream, &r.5));
        }
    }
    out
}

/// What hyper reads from the wrapper when the client writes `input` in pieces of `chunk`.
fn through(input: &[u8], chunk: usize) -> std::io::Result<Vec<u8>> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(async {
            let (mut client, server) = tokio::io::duplex(chunk);
            let write = async move {
                for piece in input.chunks(chunk) {
                    client.write_all(piece).await.unwrap();
                }
            };
            let read = async {
                let mut out = Vec::new();
                RepairAuthority::new(server).read_to_end(&mut out).await?;
                Ok(out)
            };
            tokio::join!(write, read).1
        })
}

/// Frames as (type, flags, stream, payload).
fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while b.len() >= 9 {
        let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
        let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
        v.push((b[3], b[4], stream, b[9..9 + len].to_vec()));
        b = &b[9 + len..];
    }
    assert!(b.is_empty(), "whole frames");
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn authority_is_kept_repaired_or_dropped(
        requests in prop::collection::vec(request(), 1..4),
        chunk in 1..200usize,
    ) {
        for r in &requests {
            if let Authority::Valid(a) | Authority::Scheme(_, a) = &r.0 {
                prop_assert!(http::uri::Authority::try_from(a.as_str()).is_ok(), "generator: {}", a);
            }
            if let Authority::Garbage(a) | Authority::Scheme(a, _) = &r.0 {
                prop_assert!(http::uri::Authority::try_from(a.as_str()).is_err(), "generator: {}", a);
            }
        }
        let input = connection(&requests);
        let out = through(&input, chunk).unwrap();
        if matches!(requests[0].0, Authority::Valid(_) | Authority::Absent) {
            prop_assert_eq!(out, input, "a valid first block passes the connection through");
            return Ok(());
        }
        prop_assert!(out.starts_with(PREFACE));
        let fs = frames(&out[PREFACE.len()..]);
        prop_assert_eq!(&fs[0], &(0x4, 0, 0, vec![]));
        let mut dec = loona_hpack::Decoder::new();
        let mut rest = fs[1..].iter();
        for (i, r) in requests.iter().enumerate() {
            let stream = 1 + 2 * i as u32;
            let (kind, flags, s, block) = rest.next().unwrap();
            prop_assert_eq!((*kind, *s), (HEADERS, stream));
            prop_assert_eq!(flags & END_HEADERS, END_HEADERS, "small blocks fit one frame");
            prop_assert_eq!(flags & END_STREAM != 0, r.4);
            let got = dec.decode(block).unwrap();
            let mut want = headers(r, stream);
            match &r.0 {
                Authority::Scheme(_, fixed) => {
                    for (n, v) in &mut want {
                        if n == b":authority" {
                            *v = fixed.clone().into_bytes();
                        }
                    }
                }
                Authority::Garbage(_) => want.retain(|(n, _)| n != b":authority"),
                Authority::Valid(_) | Authority::Absent => {}
            }
            prop_assert_eq!(got, want);
            if !r.4 {
                prop_assert_eq!(rest.next().unwrap(), &(0x0, END_STREAM, stream, r.5.clone()));
            }
        }
        prop_assert!(rest.next().is_none());
    }

    /// HTTP/1.1 (or anything not starting with the HTTP/2 preface) passes through untouched.
    #[test]
    fn other_protocols_pass_through(
        data in prop::collection::vec(any::<u8>(), 1..300),
        chunk in 1..64usize,
    ) {
        prop_assume!(!data.starts_with(&PREFACE[..data.len().min(PREFACE.len())]));
        prop_assert_eq!(through(&data, chunk).unwrap(), data);
    }

    /// Any bytes after the preface: repaired, passed, or the connection failed; never a panic.
    #[test]
    fn any_frames_after_the_preface(
        data in prop::collection::vec(any::<u8>(), 0..300),
        pipe in any::<u8>(),
    ) {
        crate::fuzzing::authority(&[&[pipe], PREFACE, &data].concat());
    }
}
