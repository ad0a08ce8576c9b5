//! Property tests of the member rewrites against messages built by a real protobuf
//! implementation (etcd's own `.proto` files, compiled by prost in `etcd-client`) and by
//! `serde_json`.
//!
//! The property: a rewrite changes each mappable member's `clientURLs` to its one local URL
//! and nothing else — not the header, not the other members, not the order of fields, not
//! fields it does not know. Members are generated with a known answer (found by pod name, by
//! the pod label of a DNS name, by `host:port`, or not at all), so the expected output does
//! not come from the code under test.

use etcd_client::proto::{PbMember, PbMemberAddResponse, PbMemberListResponse, PbResponseHeader};
use proptest::prelude::*;
use prost::Message;
use serde_json::{json, Value};

use super::{gateway, grpc, v2};
use crate::fuzzing::addr_map;
use crate::protowire::{put_len_field, put_varint_field};

/// How a generated member relates to [`addr_map`].
#[derive(Debug, Clone)]
enum Who {
    /// Named after a pod: the name decides, whatever the URLs.
    Pod(usize),
    /// Unnamed, advertising `<pod>.<svc>…` among unknown URLs.
    Dns(usize),
    /// Unnamed, advertising an IP and port that one endpoint has exactly.
    HostPort(usize),
    /// Neither name nor URL maps: kept and reported.
    Stranger,
    /// No client URLs yet (not started): kept, not reported.
    Unstarted,
}

/// The local URLs of `addr_map()`'s endpoints, in order.
const LOCAL: [&str; 5] = [
    "http://127.0.0.1:4002",
    "http://127.0.0.1:4003",
    "http://127.0.0.1:4004",
    "http://127.0.0.1:4005",
    "http://127.0.0.1:4006",
];
const PODS: [&str; 5] = ["etcd-0", "etcd-1", "etcd-2", "host-a", "host-b"];

/// A URL no endpoint matches: its host starts with `s`, unlike every pod name and address.
fn stranger_url() -> impl Strategy<Value = String> {
    ("https?", "s[a-z0-9-]{0,8}(\\.[a-z]{1,4}){0,2}", 1u16..)
        .prop_map(|(scheme, host, port)| format!("{scheme}://{host}:{port}"))
}

/// A member with a known mapping: (who, member).
fn member() -> impl Strategy<Value = (Who, PbMember)> {
    let who = prop_oneof![
        (0..5usize).prop_map(Who::Pod),
        (0..3usize).prop_map(Who::Dns),
        (3..5usize).prop_map(Who::HostPort),
        Just(Who::Stranger),
        Just(Who::Unstarted),
    ];
    (
        who,
        any::<u64>(),
        "m[^\\x00]{0,10}",
        prop::collection::vec(any::<String>(), 0..3),
        prop::collection::vec(stranger_url(), 0..3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(who, id, other_name, peers, mut urls, named, learner)| {
            let name = match &who {
                Who::Pod(i) => PODS[*i].to_owned(),
                Who::Stranger | Who::Unstarted if named => other_name,
                _ => String::new(),
            };
            match &who {
                Who::Dns(i) => urls.insert(
                    urls.len() / 2,
                    format!("http://{}.etcd.ns.svc:2379", PODS[*i]),
                ),
                Who::HostPort(i) => urls.push(format!(
                    "https://192.168.1.5:{}",
                    if *i == 3 { 2379 } else { 22379 }
                )),
                Who::Stranger if urls.is_empty() => urls.push("http://s:1".into()),
                Who::Unstarted => urls.clear(),
                _ => {}
            }
            let m = PbMember {
                id,
                name,
                peer_ur_ls: peers,
                client_ur_ls: urls,
                is_learner: learner,
            };
            (who, m)
        })
}

/// The member as the rewrite should leave it, and what it should report as unmapped.
fn expected(who: &Who, m: &PbMember) -> (PbMember, Option<String>) {
    if m.client_ur_ls.is_empty() {
        // Not started (whoever it is): nothing to rewrite, nothing to report.
        return (m.clone(), None);
    }
    let local = match who {
        Who::Pod(i) | Who::Dns(i) | Who::HostPort(i) => Some(LOCAL[*i]),
        Who::Stranger | Who::Unstarted => None,
    };
    let mut want = m.clone();
    if let Some(local) = local {
        want.client_ur_ls = vec![local.to_owned()];
    }
    let unmapped = matches!(who, Who::Stranger).then(|| {
        if m.name.is_empty() {
            m.client_ur_ls[0].clone()
        } else {
            m.name.clone()
        }
    });
    (want, unmapped)
}

/// Fields this version of etcd does not have (a newer etcd's additions): numbers above any
/// in `Member` or the responses, of every wire type.
fn unknown_fields() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            (16u64..1000, any::<u64>()).prop_map(|(n, v)| {
                let mut f = Vec::new();
                put_varint_field(&mut f, n, v);
                f
            }),
            (16u64..1000, prop::collection::vec(any::<u8>(), 0..8)).prop_map(|(n, p)| {
                let mut f = Vec::new();
                put_len_field(&mut f, n, &p);
                f
            }),
            (16u64..1000, any::<u32>()).prop_map(|(n, v)| {
                let mut f = Vec::new();
                crate::protowire::put_varint(&mut f, (n << 3) | 5);
                f.extend_from_slice(&v.to_le_bytes());
                f
            }),
        ],
        0..3,
    )
    .prop_map(|fs| fs.concat())
}

fn header() -> impl Strategy<Value = Option<PbResponseHeader>> {
    prop::option::of(
        (any::<u64>(), any::<u64>(), any::<i64>(), any::<u64>()).prop_map(
            |(cluster_id, member_id, revision, raft_term)| PbResponseHeader {
                cluster_id,
                member_id,
                revision,
                raft_term,
            },
        ),
    )
}

/// A response message: the header, then each (field number, member + its unknown fields),
/// then top-level unknown fields. Built field by field so unknown fields can go in; prost
/// decodes it to the same message (checked by the tests).
fn assemble(
    header: &Option<PbResponseHeader>,
    members: &[(u64, PbMember, Vec<u8>)],
    unknown: &[u8],
) -> Vec<u8> {
    let mut msg = Vec::new();
    if let Some(h) = header {
        put_len_field(&mut msg, 1, &h.encode_to_vec());
    }
    for (number, m, extra) in members {
        let mut bytes = m.encode_to_vec();
        bytes.extend_from_slice(extra);
        put_len_field(&mut msg, *number, &bytes);
    }
    msg.extend_from_slice(unknown);
    msg
}

fn frame(msg: &[u8]) -> Vec<u8> {
    crate::proxy::frames::frame(msg).to_vec()
}

/// A member list: (who, member, the member's unknown fields).
fn members(max: usize) -> impl Strategy<Value = Vec<(Who, PbMember, Vec<u8>)>> {
    prop::collection::vec(
        (member(), unknown_fields()).prop_map(|((who, m), extra)| (who, m, extra)),
        0..max,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// MemberList, MemberRemove, MemberUpdate and MemberPromote: members in field 2.
    #[test]
    fn member_list_changes_only_client_urls(
        header in header(),
        members in members(6),
        unknown in unknown_fields(),
        method in prop_oneof![
            Just(grpc::ClusterMethod::List),
            Just(grpc::ClusterMethod::Remove),
            Just(grpc::ClusterMethod::Update),
            Just(grpc::ClusterMethod::Promote),
        ],
        messages in 1..3usize,
    ) {
        let input: Vec<_> = members.iter().map(|(_, m, x)| (2, m.clone(), x.clone())).collect();
        let msg = assemble(&header, &input, &unknown);
        let reference = PbMemberListResponse {
            header,
            members: members.iter().map(|(_, m, _)| m.clone()).collect(),
        };
        prop_assert_eq!(PbMemberListResponse::decode(msg.as_slice()).unwrap(), reference.clone());

        let mut want_members = Vec::new();
        let mut want_unmapped = Vec::new();
        for (who, m, extra) in &members {
            let (w, u) = expected(who, m);
            want_members.push((2, w, extra.clone()));
            want_unmapped.extend(u);
        }
        let want_msg = assemble(&header, &want_members, &unknown);

        let body = frame(&msg).repeat(messages);
        let out = grpc::rewrite_body(method, &body, &addr_map()).unwrap();
        prop_assert_eq!(&out.body[..], &frame(&want_msg).repeat(messages)[..], "byte-exact");
        prop_assert_eq!(out.unmapped, (0..messages).flat_map(|_| want_unmapped.clone()).collect::<Vec<_>>());

        let decoded = PbMemberListResponse::decode(&out.body[5..5 + want_msg.len()]).unwrap();
        let want = PbMemberListResponse {
            header,
            members: want_members.into_iter().map(|(_, m, _)| m).collect(),
        };
        prop_assert_eq!(decoded, want);
    }

    /// MemberAdd: the new member in field 2 and the list in field 3, both rewritten.
    #[test]
    fn member_add_changes_only_client_urls(
        header in header(),
        new_member in prop::option::of(member()),
        members in members(5),
        unknown in unknown_fields(),
    ) {
        let mut input = Vec::new();
        let mut want_members = Vec::new();
        if let Some((who, m)) = &new_member {
            input.push((2, m.clone(), Vec::new()));
            want_members.push((2, expected(who, m).0, Vec::new()));
        }
        for (who, m, extra) in &members {
            input.push((3, m.clone(), extra.clone()));
            want_members.push((3, expected(who, m).0, extra.clone()));
        }
        let msg = assemble(&header, &input, &unknown);
        let reference = PbMemberAddResponse {
            header,
            member: new_member.as_ref().map(|(_, m)| m.clone()),
            members: members.iter().map(|(_, m, _)| m.clone()).collect(),
        };
        prop_assert_eq!(PbMemberAddResponse::decode(msg.as_slice()).unwrap(), reference);

        let out = grpc::rewrite_body(grpc::ClusterMethod::Add, &frame(&msg), &addr_map()).unwrap();
        let want_msg = assemble(&header, &want_members, &unknown);
        prop_assert_eq!(&out.body[..], &frame(&want_msg)[..], "byte-exact");
        let decoded = PbMemberAddResponse::decode(&out.body[5..]).unwrap();
        let mut want_list = want_members.into_iter().map(|(_, m, _)| m);
        let want = PbMemberAddResponse {
            header,
            member: new_member.map(|_| want_list.next().unwrap()),
            members: want_list.collect(),
        };
        prop_assert_eq!(decoded, want);
    }

    /// A response from an etcd no member of which the proxy knows comes out byte for byte.
    #[test]
    fn nothing_mapped_is_byte_identical(header in header(), members in members(4)) {
        let reference = PbMemberListResponse {
            header,
            members: members.into_iter().map(|(_, m, _)| m).collect(),
        };
        let body = frame(&reference.encode_to_vec());
        let out = grpc::rewrite_body(grpc::ClusterMethod::List, &body, &super::AddrMap::default()).unwrap();
        prop_assert_eq!(&out.body[..], &body[..]);
    }

    /// Whatever etcd (or something posing as it) sends: an error or a body, never a panic.
    #[test]
    fn member_rewrite_takes_any_bytes(data in prop::collection::vec(any::<u8>(), 0..512)) {
        crate::fuzzing::member_rewrite(&data);
    }

    /// `/v2/members` and `/v2/members/leader`: only `clientURLs` changes, key order and other
    /// members included; the output is compact JSON, ending in a newline if etcd's did.
    #[test]
    fn v2_members_change_only_client_urls(
        members in members(5),
        extra in json_value(),
        pretty in any::<bool>(),
        newline in any::<bool>(),
    ) {
        let (input, want, unmapped) = json_members(&members, &extra);
        let body = json!({ "members": input });
        let want = json!({ "members": want });
        let out = v2::rewrite_body(v2::V2Route::Members, &text(&body, pretty, newline), &addr_map()).unwrap();
        prop_assert_eq!(std::str::from_utf8(&out.body).unwrap(), compact(&want, newline));
        prop_assert_eq!(out.unmapped, unmapped);

        if let (Some(one), Some(want_one)) = (body["members"].get(0), want["members"].get(0)) {
            let out = v2::rewrite_body(v2::V2Route::Leader, &text(one, pretty, newline), &addr_map()).unwrap();
            prop_assert_eq!(std::str::from_utf8(&out.body).unwrap(), compact(want_one, newline));
        }
    }

    /// `/v2/machines`: each URL maps to its member's local URL, in order, once each.
    #[test]
    fn v2_machines(members in members(6)) {
        let mut urls = Vec::new();
        let mut want: Vec<String> = Vec::new();
        for (who, m, _) in &members {
            let Some(url) = m.client_ur_ls.first() else { continue };
            if matches!(who, Who::Pod(_)) {
                continue; // found by name only
            }
            // The URL of a member found by URL (its only mappable one) or a stranger's.
            let url = m.client_ur_ls.iter().find(|u| !u.contains("://s")).unwrap_or(url);
            urls.push(url.clone());
            let mapped = match who {
                Who::Dns(i) | Who::HostPort(i) => LOCAL[*i].to_owned(),
                _ => url.clone(),
            };
            if !want.contains(&mapped) {
                want.push(mapped);
            }
        }
        let out = v2::rewrite_body(v2::V2Route::Machines, urls.join(", ").as_bytes(), &addr_map()).unwrap();
        prop_assert_eq!(std::str::from_utf8(&out.body).unwrap(), want.join(", "));
    }

    /// The JSON gateway's member responses (proto field names, `member` for MemberAdd).
    #[test]
    fn gateway_changes_only_client_urls(
        members in members(5),
        new_member in prop::option::of(member()),
        extra in json_value(),
        pretty in any::<bool>(),
    ) {
        let (input, want, _) = json_members(&members, &extra);
        let mut body = json!({
            "header": { "cluster_id": "1", "member_id": "2", "raft_term": "3" },
            "members": input,
        });
        let mut want = json!({ "header": body["header"].clone(), "members": want });
        if let Some((who, m)) = &new_member {
            let (i, w, _) = json_members(&[(who.clone(), m.clone(), Vec::new())], &extra);
            body["member"] = i[0].clone();
            want["member"] = w[0].clone();
        }
        let out = gateway::rewrite_body(&text(&body, pretty, false), &addr_map()).unwrap();
        prop_assert_eq!(std::str::from_utf8(&out.body).unwrap(), compact(&want, false));
    }

    /// Any bytes as a v2 or gateway body: an error or a body, never a panic.
    #[test]
    fn json_rewrites_take_any_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        crate::fuzzing::v2_rewrite(&data);
        crate::fuzzing::gateway_rewrite(&data);
    }

    /// Any text shaped like JSON (more likely to parse than bytes).
    #[test]
    fn json_rewrites_take_any_json(v in json_value()) {
        let s = v.to_string();
        for route in 0..3u8 {
            crate::fuzzing::v2_rewrite(&[&[route], s.as_bytes()].concat());
        }
        crate::fuzzing::gateway_rewrite(s.as_bytes());
    }
}

/// Arbitrary JSON without floats (etcd's member JSON has none; a float's digits may
/// legitimately change in a parse and print).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec(("[a-zA-Z]{1,8}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// v2-style member objects (with an unknown key holding `extra`), the objects the rewrite
/// should produce, and the unmapped names.
fn json_members(
    members: &[(Who, PbMember, Vec<u8>)],
    extra: &Value,
) -> (Vec<Value>, Vec<Value>, Vec<String>) {
    let (mut input, mut want, mut unmapped) = (Vec::new(), Vec::new(), Vec::new());
    for (who, m, _) in members {
        let obj = |urls: &[String]| {
            json!({
                "id": format!("{:x}", m.id),
                "name": m.name,
                "peerURLs": m.peer_ur_ls,
                "clientURLs": urls,
                "x-newer-etcd": extra,
            })
        };
        let (w, u) = expected(who, m);
        input.push(obj(&m.client_ur_ls));
        want.push(obj(&w.client_ur_ls));
        unmapped.extend(u);
    }
    (input, want, unmapped)
}

fn text(v: &Value, pretty: bool, newline: bool) -> Vec<u8> {
    let mut s = if pretty {
        serde_json::to_string_pretty(v).unwrap()
    } else {
        v.to_string()
    };
    if newline {
        s.push('\n');
    }
    s.into_bytes()
}

fn compact(v: &Value, newline: bool) -> String {
    let mut s = v.to_string();
    if newline {
        s.push('\n');
    }
    s
}
