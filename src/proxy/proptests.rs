//! Property tests of gRPC message reassembly and of the Watch messages a resuming proxy reads
//! and rewrites, against messages prost encodes from etcd's own `.proto` files
//! (`etcd-client`'s generated types).
//!
//! Properties: messages split at any points reassemble unchanged; what the proxy reads of a
//! `WatchRequest`/`WatchResponse` is what prost encoded; a re-created watch is the client's
//! with only `start_revision` and `watch_id` changed; a translated response is etcd's with
//! only `watch_id` changed, byte for byte where prost's field order allows.

use etcd_client::proto::{
    PbEvent, PbKeyValue, PbResponseHeader, PbWatchRequest, PbWatchRequestUnion, PbWatchResponse,
};
use proptest::prelude::*;
use prost::Message;

use super::frames::{frame, Deframer};
use super::watches::proto as watch;

/// Client fields of a `WatchCreateRequest`: key, range end, start revision, progress notify,
/// filters, prev_kv, watch ID, fragment.
type CreateFields = (Vec<u8>, Vec<u8>, i64, bool, Vec<i32>, bool, i64, bool);

/// A `WatchRequest` carrying a create request with these fields. The create type is not
/// exported by name; the union's variant builds it.
fn create_request(f: &CreateFields) -> PbWatchRequest {
    let mut union = PbWatchRequestUnion::CreateRequest(Default::default());
    if let PbWatchRequestUnion::CreateRequest(c) = &mut union {
        c.key = f.0.clone();
        c.range_end = f.1.clone();
        c.start_revision = f.2;
        c.progress_notify = f.3;
        c.filters = f.4.clone();
        c.prev_kv = f.5;
        c.watch_id = f.6;
        c.fragment = f.7;
    }
    PbWatchRequest {
        request_union: Some(union),
    }
}

fn create_fields() -> impl Strategy<Value = CreateFields> {
    (
        prop::collection::vec(any::<u8>(), 0..16),
        prop::collection::vec(any::<u8>(), 0..4),
        any::<i64>(),
        any::<bool>(),
        prop::collection::vec(0..2i32, 0..3),
        any::<bool>(),
        watch_id(),
        any::<bool>(),
    )
}

fn key_value() -> impl Strategy<Value = PbKeyValue> {
    (
        prop::collection::vec(any::<u8>(), 0..8),
        any::<i64>(),
        any::<i64>(),
        any::<i64>(),
        prop::collection::vec(any::<u8>(), 0..8),
        any::<i64>(),
    )
        .prop_map(
            |(key, create_revision, mod_revision, version, value, lease)| PbKeyValue {
                key,
                create_revision,
                mod_revision,
                version,
                value,
                lease,
            },
        )
}

/// A watch ID: often 0 (absent on the wire, chosen by the server), else anything.
fn watch_id() -> impl Strategy<Value = i64> {
    prop_oneof![Just(0i64), 1..100i64, any::<i64>()]
}

fn watch_response() -> impl Strategy<Value = PbWatchResponse> {
    let header = prop::option::of(
        (any::<u64>(), any::<u64>(), any::<i64>(), any::<u64>()).prop_map(
            |(cluster_id, member_id, revision, raft_term)| PbResponseHeader {
                cluster_id,
                member_id,
                revision,
                raft_term,
            },
        ),
    );
    let event = (
        0..2i32,
        prop::option::of(key_value()),
        prop::option::of(key_value()),
    )
        .prop_map(|(r#type, kv, prev_kv)| PbEvent {
            r#type,
            kv,
            prev_kv,
        });
    (
        header,
        watch_id(),
        any::<bool>(),
        any::<bool>(),
        any::<i64>(),
        ".{0,12}",
        any::<bool>(),
        prop::collection::vec(event, 0..4),
    )
        .prop_map(
            |(
                header,
                watch_id,
                created,
                canceled,
                compact_revision,
                cancel_reason,
                fragment,
                events,
            )| {
                PbWatchResponse {
                    header,
                    watch_id,
                    created,
                    canceled,
                    compact_revision,
                    cancel_reason,
                    fragment,
                    events,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Length-prefixed messages split into chunks at arbitrary points come out whole and in
    /// order, each as soon as its last byte arrives.
    #[test]
    fn messages_split_anywhere_reassemble(
        messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..6),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let stream: Vec<u8> = messages.iter().flat_map(|m| frame(m).to_vec()).collect();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        cuts.push(0);
        cuts.push(stream.len());
        cuts.sort_unstable();
        let mut d = Deframer::new(super::frames::MAX_FROM_ETCD);
        let mut got = Vec::new();
        for w in cuts.windows(2) {
            d.push(&stream[w[0]..w[1]]);
            while let Some(m) = d.next_message().unwrap() {
                got.push(m.to_vec());
            }
        }
        prop_assert_eq!(got, messages);
    }

    /// Any bytes, in chunks of any size: messages, a refusal, or a wait for more.
    #[test]
    fn deframer_takes_any_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        crate::fuzzing::grpc_deframe(&data);
    }

    /// A create request reads as prost wrote it, and re-creating it from a revision changes
    /// only `start_revision` (absent if not positive) and `watch_id` (left to the server).
    #[test]
    fn create_requests_read_and_recreate(f in create_fields(), from in any::<i64>()) {
        let req = create_request(&f);
        let Some(PbWatchRequestUnion::CreateRequest(c)) = &req.request_union else {
            unreachable!()
        };
        let parsed = watch::parse_request(&req.encode_to_vec()).unwrap();
        prop_assert_eq!(
            parsed.clone(),
            watch::Request::Create {
                create: c.encode_to_vec(),
                start_revision: f.2,
                watch_id: f.6,
            }
        );
        let watch::Request::Create { create, .. } = parsed else { unreachable!() };
        let again = PbWatchRequest::decode(&watch::recreate(&create, from).unwrap()[..]).unwrap();
        let mut want = f.clone();
        want.2 = from.max(0);
        want.6 = 0;
        prop_assert_eq!(again, create_request(&want));
    }

    /// Cancel and progress requests, both ways.
    #[test]
    fn cancel_and_progress_requests(watch_id in any::<i64>()) {
        let mut cancel = PbWatchRequestUnion::CancelRequest(Default::default());
        if let PbWatchRequestUnion::CancelRequest(c) = &mut cancel {
            c.watch_id = watch_id;
        }
        let cancel = PbWatchRequest { request_union: Some(cancel) };
        prop_assert_eq!(
            watch::parse_request(&cancel.encode_to_vec()).unwrap(),
            watch::Request::Cancel { watch_id }
        );
        prop_assert_eq!(PbWatchRequest::decode(&watch::cancel(watch_id)[..]).unwrap(), cancel);
        let progress = PbWatchRequest {
            request_union: Some(PbWatchRequestUnion::ProgressRequest(Default::default())),
        };
        prop_assert_eq!(
            watch::parse_request(&progress.encode_to_vec()).unwrap(),
            watch::Request::Other
        );
    }

    /// What the proxy reads of a response is what prost wrote; giving it another watch ID
    /// changes that field only, where prost would have put it.
    #[test]
    fn responses_read_and_translate(r in watch_response(), new_id in watch_id()) {
        let bytes = r.encode_to_vec();
        let got = watch::parse_response(&bytes).unwrap();
        let want = watch::Response {
            watch_id: r.watch_id,
            created: r.created,
            canceled: r.canceled,
            fragment: r.fragment,
            revision: r.header.as_ref().map_or(0, |h| h.revision),
            last_event: r
                .events
                .iter()
                .map(|e| e.kv.as_ref().map_or(0, |kv| kv.mod_revision))
                .max(),
        };
        prop_assert_eq!(got, want);

        let out = watch::with_watch_id(&bytes, new_id).unwrap();
        let translated = PbWatchResponse { watch_id: new_id, ..r.clone() };
        prop_assert_eq!(PbWatchResponse::decode(&out[..]).unwrap(), translated.clone());
        if r.header.is_some() || r.watch_id != 0 {
            // The ID goes where prost puts it: right after the header.
            prop_assert_eq!(out, translated.encode_to_vec());
        }
    }

    /// etcd's responses in chunks cut anywhere, large ones passed on before they end: the
    /// client gets exactly the bytes etcd sent, and the table learns of every response once,
    /// what a whole parse of it says.
    #[test]
    fn watch_responses_relay_unchanged_in_any_chunks(
        responses in prop::collection::vec((watch_response(), any::<bool>()), 0..5),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
        held in watch_id(),
    ) {
        use super::watches::relay::{Relay, Step};
        // Half are plain event responses, the kind passed on early.
        let encoded: Vec<Vec<u8>> = responses
            .into_iter()
            .map(|(r, plain)| match plain {
                true => PbWatchResponse { created: false, canceled: false, ..r },
                false => r,
            })
            .map(|r| r.encode_to_vec())
            .collect();
        let stream: Vec<u8> = encoded.iter().flat_map(|m| frame(m).to_vec()).collect();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        cuts.push(0);
        cuts.push(stream.len());
        cuts.sort_unstable();
        let mut relay = Relay::new();
        let mut steps = Vec::new();
        for w in cuts.windows(2) {
            let chunk = bytes::Bytes::copy_from_slice(&stream[w[0]..w[1]]);
            relay.push(chunk, |h| h.watch_id != held, &mut steps).unwrap();
        }
        let mut sent = Vec::new();
        let mut learned = Vec::new();
        for s in steps {
            match s {
                Step::Whole(b) => {
                    learned.push(watch::parse_response(super::frames::payload(&b)).ok());
                    sent.extend_from_slice(&b);
                }
                Step::Pass(b) => sent.extend_from_slice(&b),
                Step::Passed(summary) => learned.push(summary),
            }
        }
        prop_assert_eq!(sent, stream);
        let expected: Vec<_> = encoded.iter().map(|m| watch::parse_response(m).ok()).collect();
        prop_assert_eq!(learned, expected);
    }

    /// The upstream breaks at any point: what the client got, padded, is whole messages, and
    /// the cut one holds whole revisions of the original with the table told the last of them.
    #[test]
    fn watch_responses_cut_anywhere_leave_the_client_whole_revisions(
        responses in prop::collection::vec(watch_response(), 1..4),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        stop in any::<prop::sample::Index>(),
    ) {
        use super::watches::relay::{Abort, Relay, Step};
        let encoded: Vec<Vec<u8>> = responses
            .into_iter()
            .map(|r| PbWatchResponse { created: false, canceled: false, fragment: false, ..r })
            .map(|r| r.encode_to_vec())
            .collect();
        let stream: Vec<u8> = encoded.iter().flat_map(|m| frame(m).to_vec()).collect();
        let stop = stop.index(stream.len() + 1);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stop + 1)).collect();
        cuts.push(0);
        cuts.push(stop);
        cuts.sort_unstable();
        let mut relay = Relay::new();
        let mut steps = Vec::new();
        for w in cuts.windows(2) {
            let chunk = bytes::Bytes::copy_from_slice(&stream[w[0]..w[1]]);
            relay.push(chunk, |_| true, &mut steps).unwrap();
        }
        let mut client = Vec::new();
        for s in &steps {
            if let Step::Whole(b) | Step::Pass(b) = s {
                client.extend_from_slice(b);
            }
        }
        let delivered = match relay.abort() {
            Some(Abort::Pad(pad, delivered)) => {
                client.extend_from_slice(&pad);
                delivered
            }
            Some(Abort::Impossible) => return Ok(()),
            None => None,
        };
        // The client's bytes are whole messages: the originals, then maybe one cut short.
        let mut d = Deframer::new(super::frames::MAX_FROM_ETCD);
        d.push(&client);
        let mut got = Vec::new();
        while let Some(m) = d.next_message().unwrap() {
            got.push(m);
        }
        prop_assert_eq!(d.next_message(), Ok(None));
        let n = got.len();
        prop_assert!(n <= encoded.len());
        for (g, e) in got.iter().zip(&encoded).take(n.saturating_sub(1)) {
            prop_assert_eq!(&g[..], &e[..]);
        }
        if let Some(last) = got.last() {
            let original = PbWatchResponse::decode(&encoded[n - 1][..]).unwrap();
            let seen = PbWatchResponse::decode(&last[..]).unwrap();
            if seen != original {
                // Cut: a non-empty prefix of the events, ending at a revision boundary.
                let k = seen.events.len();
                prop_assert!(k > 0 && k < original.events.len());
                prop_assert_eq!(&seen.events[..], &original.events[..k]);
                let rev = |e: &PbEvent| e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                prop_assert_ne!(rev(&original.events[k - 1]), rev(&original.events[k]));
                let told = delivered.expect("the table learns what was delivered");
                prop_assert_eq!(told.last_event, seen.events.iter().map(rev).max());
            }
        }
    }

    /// Any bytes as a client's request or etcd's response: parsed or refused, never a panic.
    #[test]
    fn watch_messages_take_any_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        crate::fuzzing::watch_request(&data);
        crate::fuzzing::watch_response(&data);
        crate::fuzzing::watch_relay(&data);
    }
}
