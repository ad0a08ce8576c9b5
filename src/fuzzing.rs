//! Entry points for the fuzz targets (`fuzz/`) and the property tests; not API.
//!
//! Every parser that sees bytes from a client or from etcd has one function here taking
//! arbitrary bytes. Each returns normally for any input, malformed or not: the parsers report
//! malformed input as errors and must never panic, loop or allocate beyond a bound. Where a
//! parse succeeds, the function also checks the invariants the proxy relies on (a rewrite
//! of its own output changes nothing, a watch ID written is the one read back, a message split
//! anywhere reassembles the same) and panics if one is broken, so that a fuzzer reports it.
//!
//! The real modules stay private; these wrappers are thin so that the fuzz targets follow the
//! code they exercise. [`TARGETS`](crate::fuzzing::TARGETS) names them all, for the fuzz crate and for the regression
//! test that replays `fuzz/regressions/<target>/*`.

use std::path::Path;

use crate::auth::users::Users;
use crate::auth::{parse_gateway_login, parse_grpc_login};
use crate::protowire::{self, Fields, LEN};
use crate::proxy::frames::{self, Deframer};
use crate::proxy::watches::proto as watch;
use crate::rewrite::{gateway, grpc, v2, AddrMap, LocalEndpoint};

/// An entry point: takes any bytes, panics only on a broken invariant.
pub type Target = fn(&[u8]);

/// Every entry point, by the name of its fuzz target.
pub const TARGETS: &[(&str, Target)] = &[
    ("protowire", protowire),
    ("member_rewrite", member_rewrite),
    ("grpc_deframe", grpc_deframe),
    ("watch_request", watch_request),
    ("watch_response", watch_response),
    ("watch_relay", watch_relay),
    ("authenticate", authenticate),
    ("v2_rewrite", v2_rewrite),
    ("gateway_rewrite", gateway_rewrite),
    ("users_file", users_file),
    ("authority", authority),
    ("spdy_frame", spdy_frame),
];

/// The member map the rewrite targets use: members found by pod name, by the pod-name label
/// of a DNS name, by IPv4 and IPv6 pod address, and by exact `host:port` for two members on
/// one host. No local URL maps back to a member, as in a real deployment, so a rewrite of a
/// rewritten body changes nothing.
pub fn addr_map() -> AddrMap {
    let endpoint = |pod: &str, ip: &str, port: Option<u16>, local: u16| LocalEndpoint {
        pod: pod.to_owned(),
        pod_ip: Some(ip.to_owned()),
        host: None,
        port,
        url: format!("http://127.0.0.1:{local}"),
    };
    AddrMap::new(vec![
        endpoint("etcd-0", "10.244.0.10", Some(2379), 4002),
        endpoint("etcd-1", "10.244.0.11", Some(2379), 4003),
        endpoint("etcd-2", "fd00::12", Some(2379), 4004),
        endpoint("host-a", "192.168.1.5", Some(2379), 4005),
        endpoint("host-b", "192.168.1.5", Some(22379), 4006),
    ])
}

/// The protobuf field walker: fields tile the bytes they cover, and each field's parts agree
/// with its raw bytes.
pub fn protowire(data: &[u8]) {
    let mut covered = 0;
    for field in Fields::new(data) {
        let Ok(field) = field else { break };
        assert_eq!(
            data[covered..].as_ptr(),
            field.raw.as_ptr(),
            "fields are contiguous"
        );
        covered += field.raw.len();
        let mut pos = 0;
        let key = protowire::read_varint(field.raw, &mut pos).expect("the key re-reads");
        assert_eq!(key >> 3, field.number);
        assert_eq!((key & 7) as u8, field.wire_type);
        match field.wire_type {
            LEN => assert!(field.raw.ends_with(field.payload)),
            0 => {
                protowire::varint_value(field.raw).expect("a varint field's value re-reads");
            }
            _ => assert!(field.payload.is_empty()),
        }
    }
    assert!(covered <= data.len());
    let mut pos = 0;
    if let Ok(v) = protowire::read_varint(data, &mut pos) {
        let mut out = Vec::new();
        protowire::put_varint(&mut out, v);
        assert!(out.len() <= pos, "the canonical varint is never longer");
        let mut again = 0;
        assert_eq!(protowire::read_varint(&out, &mut again), Ok(v));
    }
}

/// The `Member*` response rewrite. The first byte picks the method, the rest is the gRPC body.
pub fn member_rewrite(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let method = [
        grpc::ClusterMethod::List,
        grpc::ClusterMethod::Add,
        grpc::ClusterMethod::Remove,
        grpc::ClusterMethod::Update,
        grpc::ClusterMethod::Promote,
    ][usize::from(pick) % 5];
    let map = addr_map();
    let Ok(once) = grpc::rewrite_body(method, body, &map) else {
        return;
    };
    let twice = grpc::rewrite_body(method, &once.body, &map).expect("our output parses");
    assert_eq!(once.body, twice.body, "a rewritten body rewrites to itself");
    let mut d = Deframer::new(frames::MAX_FROM_ETCD);
    d.push(&once.body);
    let mut messages = 0;
    while let Some(msg) = d.next_message().expect("our output is uncompressed frames") {
        messages += 1;
        for field in Fields::new(&msg) {
            field.expect("our output is well-formed protobuf");
        }
    }
    assert_eq!(
        messages,
        count_frames(body),
        "one message out per message in"
    );
}

/// Messages in a whole, well-formed gRPC body.
fn count_frames(mut body: &[u8]) -> usize {
    let mut n = 0;
    while body.len() >= 5 {
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        body = &body[5 + len..];
        n += 1;
    }
    n
}

/// gRPC message reassembly. The first byte sets the chunk size the rest arrives in; the
/// messages must be those of the whole stream parsed at once, up to the same error.
pub fn grpc_deframe(data: &[u8]) {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut d = Deframer::new(frames::MAX_FROM_ETCD);
    let mut got = Vec::new();
    let mut error = None;
    'chunks: for piece in stream.chunks(usize::from(chunk) + 1) {
        d.push(piece);
        loop {
            match d.next_message() {
                Ok(Some(m)) => got.push(m),
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break 'chunks;
                }
            }
        }
    }
    let mut want = Vec::new();
    let mut want_error = None;
    let mut rest = stream;
    while rest.len() >= 5 {
        if rest[0] != 0 {
            want_error = Some(frames::Error::Compressed);
            break;
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if len > frames::MAX_FROM_ETCD {
            want_error = Some(frames::Error::TooLarge(len, frames::MAX_FROM_ETCD));
            break;
        }
        let Some(msg) = rest.get(5..5 + len) else {
            break;
        };
        want.push(msg);
        rest = &rest[5 + len..];
    }
    assert_eq!(got, want);
    assert_eq!(error, want_error);
    for m in got {
        let mut again = Deframer::new(frames::MAX_FROM_ETCD);
        again.push(&frames::frame(&m));
        assert_eq!(again.next_message(), Ok(Some(m)), "frame() round trips");
    }
}

/// The relay of etcd's Watch responses to the client. Byte 0 sets the chunk size, byte 1 the
/// watch ID that must be translated (responses for it are held whole); the rest is etcd's
/// stream, cut where it ends. What goes to the client is the stream's bytes in order, and,
/// with the padding of a cut response, whole messages.
pub fn watch_relay(data: &[u8]) {
    use crate::proxy::watches::relay::{Abort, Relay, Step};
    let [chunk, held, stream @ ..] = data else {
        return;
    };
    let mut relay = Relay::new();
    let mut steps = Vec::new();
    for piece in stream.chunks(usize::from(*chunk) + 1) {
        let piece = bytes::Bytes::copy_from_slice(piece);
        if relay
            .push(piece, |h| h.watch_id != i64::from(*held), &mut steps)
            .is_err()
        {
            return;
        }
    }
    let mut client = Vec::new();
    for s in &steps {
        if let Step::Whole(b) | Step::Pass(b) = s {
            client.extend_from_slice(b);
        }
    }
    assert!(
        stream.starts_with(&client),
        "the client gets etcd's bytes, in order"
    );
    match relay.abort() {
        Some(Abort::Pad(pad, _)) => client.extend_from_slice(&pad),
        // The client's stream ends with an error instead.
        Some(Abort::Impossible) => return,
        None => {}
    }
    let mut at = 0;
    while let Some(p) = crate::grpc::Prefix::parse(&client[at..]) {
        assert!(!p.compressed);
        at += crate::grpc::PREFIX + p.len;
        assert!(
            at <= client.len(),
            "the client's bytes end at a message boundary"
        );
    }
    assert_eq!(
        at,
        client.len(),
        "the client's bytes end at a message boundary"
    );
}

/// The SPDY/3.1 frames an API server sends on a port-forward connection. Byte 0 sets the
/// chunk size the rest arrives in; the frames decoded must be those of the whole input decoded
/// at once, up to the same error, and re-encoding them (header blocks compressed anew) must
/// decode to the same frames.
pub fn spdy_frame(data: &[u8]) {
    use crate::k8s::spdy::frame::{Decoder, Encoder};
    use bytes::BytesMut;
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let decode_all = |pieces: &mut dyn Iterator<Item = &[u8]>| {
        let mut dec = Decoder::new();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for piece in pieces {
            buf.extend_from_slice(piece);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(e) => return (frames, Some(e.to_string())),
                }
            }
        }
        (frames, None)
    };
    let chunked = decode_all(&mut stream.chunks(usize::from(chunk) + 1));
    let whole = decode_all(&mut std::iter::once(stream));
    assert_eq!(chunked, whole, "chunking changes nothing");
    let Ok(mut enc) = Encoder::new() else {
        return;
    };
    let mut again = BytesMut::new();
    for f in &whole.0 {
        if enc.encode(f, &mut again).is_err() {
            // A decoded frame the encoder refuses (say, a header block past its bound once
            // compressed differently): nothing to compare.
            return;
        }
    }
    let (frames, error) = decode_all(&mut std::iter::once(&again[..]));
    assert_eq!(error, None, "what the encoder wrote decodes");
    assert_eq!(frames, whole.0, "frames survive a re-encoding");
}

/// A client's `WatchRequest`, and the re-creation the proxy builds from it after a failover.
pub fn watch_request(data: &[u8]) {
    match watch::parse_request(data) {
        Ok(watch::Request::Create {
            create,
            start_revision,
            watch_id,
        }) => {
            for from in [
                0,
                -1,
                1,
                start_revision,
                start_revision.wrapping_add(1),
                i64::MAX,
            ] {
                let again = watch::recreate(&create, from).expect("a parsed create re-encodes");
                let Ok(watch::Request::Create {
                    start_revision: s,
                    watch_id: id,
                    ..
                }) = watch::parse_request(&again)
                else {
                    panic!("a re-created watch parses as a create: {again:?}");
                };
                assert_eq!((s, id), (from.max(0), 0), "watch {watch_id} from {from}");
            }
        }
        Ok(watch::Request::Cancel { watch_id }) => {
            assert_eq!(
                watch::parse_request(&watch::cancel(watch_id)),
                Ok(watch::Request::Cancel { watch_id })
            );
        }
        Ok(watch::Request::Other) | Err(_) => {}
    }
}

/// etcd's `WatchResponse`, and the watch-ID translation the proxy applies to it. The first
/// byte picks the new ID.
pub fn watch_response(data: &[u8]) {
    let Some((&pick, msg)) = data.split_first() else {
        return;
    };
    let id = [0, 1, 2, 0x7f, 0x80, -1, i64::MIN, i64::MAX][usize::from(pick) % 8];
    let parsed = watch::parse_response(msg);
    let Ok(out) = watch::with_watch_id(msg, id) else {
        assert!(parsed.is_err(), "the walk fails only on malformed fields");
        return;
    };
    if let Ok(before) = parsed {
        let after = watch::parse_response(&out).expect("a translated response parses");
        assert_eq!(
            after,
            watch::Response {
                watch_id: id,
                ..before
            }
        );
    }
}

/// The gRPC `Authenticate` and JSON gateway login bodies.
pub fn authenticate(data: &[u8]) {
    if let Some((name, password)) = parse_grpc_login(data) {
        let mut msg = Vec::new();
        protowire::put_len_field(&mut msg, 1, name.as_bytes());
        protowire::put_len_field(&mut msg, 2, password.as_bytes());
        let body = frames::frame(&msg);
        assert_eq!(parse_grpc_login(&body), Some((name, password)));
    }
    if let Some((name, password)) = parse_gateway_login(data) {
        let body = serde_json::json!({ "name": name, "password": password }).to_string();
        assert_eq!(parse_gateway_login(body.as_bytes()), Some((name, password)));
    }
}

/// The v2 member responses. The first byte picks the route, the rest is the body.
pub fn v2_rewrite(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let route = [
        v2::V2Route::Members,
        v2::V2Route::Leader,
        v2::V2Route::Machines,
    ][usize::from(pick) % 3];
    let map = addr_map();
    let Ok(once) = v2::rewrite_body(route, body, &map) else {
        return;
    };
    let twice = v2::rewrite_body(route, &once.body, &map).expect("our output parses");
    assert_eq!(once.body, twice.body, "a rewritten body rewrites to itself");
}

/// The JSON gateway's member responses.
pub fn gateway_rewrite(data: &[u8]) {
    let map = addr_map();
    let Ok(once) = gateway::rewrite_body(data, &map) else {
        return;
    };
    let twice = gateway::rewrite_body(&once.body, &map).expect("our output parses");
    assert_eq!(once.body, twice.body, "a rewritten body rewrites to itself");
}

/// The `--auth-file` users file (read as text; a file that is not UTF-8 fails to load before
/// parsing).
pub fn users_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(crate::auth::users::Error::Line { line, .. }) =
        Users::parse(text, Path::new("users"))
    {
        assert!(line >= 1 && line <= text.lines().count(), "line {line}");
    }
}

/// The `:authority` repair on a client connection. The first byte sets the size of the pipe
/// the rest is written through, so frames arrive split at every point. A stream that is not
/// HTTP/2 must come out unchanged.
pub fn authority(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some((&pipe, stream)) = data.split_first() else {
        return;
    };
    let out = RUNTIME.with(|rt| {
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(usize::from(pipe) + 1);
            let writer = async move {
                // The reader may fail the connection before it has read everything.
                let _ = client.write_all(stream).await;
            };
            let reader = async {
                let mut out = Vec::new();
                crate::listener::authority::RepairAuthority::new(server)
                    .read_to_end(&mut out)
                    .await
                    .map(|_| out)
            };
            tokio::join!(writer, reader).1
        })
    });
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let n = stream.len().min(PREFACE.len());
    if stream[..n] != PREFACE[..n] {
        assert_eq!(out.expect("HTTP/1 passes"), stream, "HTTP/1 passes through");
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays every input under `fuzz/regressions/<target>/` through its target: inputs that
    /// once crashed or broke an invariant, kept so that a fix stays fixed.
    #[test]
    fn fuzz_regressions_replay() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
        let mut replayed = 0;
        for dir in std::fs::read_dir(&root).expect("fuzz/regressions exists") {
            let dir = dir.unwrap().path();
            if !dir.is_dir() {
                continue;
            }
            let name = dir.file_name().unwrap().to_str().unwrap().to_owned();
            let (_, run) = TARGETS
                .iter()
                .find(|(t, _)| *t == name)
                .unwrap_or_else(|| panic!("fuzz/regressions/{name}: no such target"));
            for input in std::fs::read_dir(&dir).unwrap() {
                let input = input.unwrap().path();
                let data = std::fs::read(&input).unwrap();
                let outcome = std::panic::catch_unwind(|| run(&data));
                assert!(outcome.is_ok(), "{} fails again", input.display());
                replayed += 1;
            }
        }
        assert!(
            replayed > 0,
            "no regression inputs under {}",
            root.display()
        );
    }

    /// The targets accept the inputs that reach their deepest paths, not just garbage.
    #[test]
    fn targets_run_on_valid_inputs() {
        let mut member = Vec::new();
        protowire::put_len_field(&mut member, 2, b"etcd-1");
        protowire::put_len_field(&mut member, 4, b"http://etcd-1.etcd:2379");
        let mut msg = Vec::new();
        protowire::put_len_field(&mut msg, 2, &member);
        let body = frames::frame(&msg);
        let once = grpc::rewrite_body(grpc::ClusterMethod::List, &body, &addr_map()).unwrap();
        assert!(once.body.windows(14).any(|w| w == b"127.0.0.1:4003"));
        member_rewrite(&[[0u8].as_slice(), &body].concat());
        grpc_deframe(&[[2u8].as_slice(), &body, &body].concat());
        watch_request(&crate::proxy::watches::proto::tests::create_req(
            b"/k", 5, 3,
        ));
        watch_response(
            &[
                [3u8].as_slice(),
                &crate::proxy::watches::proto::tests::resp(3, true, 10, &[9, 10]),
            ]
            .concat(),
        );
        authenticate(br#"{"name":"a","password":"b"}"#);
        v2_rewrite(br#"{"members":[{"name":"etcd-0","clientURLs":["http://x:1"]}]}"#);
        gateway_rewrite(br#"{"members":[{"name":"","clientURLs":["http://[fd00::12]:2379"]}]}"#);
        users_file(b"alice:$2b$04$abc\n");
        authority(b"\x03GET / HTTP/1.1\r\n\r\n");

        // A SYN_REPLY with a compressed header block, DATA and a PING, in chunks of 7.
        use crate::k8s::spdy::frame::{Encoder, Frame};
        let mut spdy = bytes::BytesMut::new();
        let mut enc = Encoder::new().unwrap();
        let headers = vec![("streamtype".to_owned(), "data".to_owned())];
        for f in [
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: headers.into_iter().collect(),
            },
            Frame::Data {
                stream_id: 1,
                flags: 0,
                data: bytes::Bytes::from_static(b"etcd"),
            },
            Frame::Ping { id: 2 },
        ] {
            enc.encode(&f, &mut spdy).unwrap();
        }
        spdy_frame(&[[6u8].as_slice(), &spdy].concat());

        // A catch-up response large enough to be passed on before its end, cut short.
        let revs: Vec<i64> = (100..400).collect();
        let big = frames::frame(&crate::proxy::watches::proto::tests::resp(
            3, false, 500, &revs,
        ));
        watch_relay(&[[200u8, 9].as_slice(), &big[..big.len() - 40]].concat());
    }
}
