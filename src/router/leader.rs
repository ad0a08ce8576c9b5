//! Which requests the cluster endpoint sends to the raft leader.
//!
//! Writes always do: a follower would forward the proposal to the leader, one more hop inside
//! the cluster. Linearizable reads do too by default ([`Reads::Leader`]): a follower answers
//! one only after a ReadIndex round trip to the leader (etcd `v3_server.go`,
//! `linearizableReadLoop`), while the leader confirms its lease with the heartbeat it sends
//! anyway (`docs/etcd-protocols.md` §8). The reads then share one upstream connection, which
//! batches them.
//!
//! Evidence (`cargo bench --bench compare`): a serial get through etcd-proxy costs about the
//! same as a get sent directly to a follower, and the proxy's CPU per get falls.
//!
//! `Maintenance/Status` and `MoveLeader` go to the leader whatever `--reads` says: etcdctl
//! `move-leader` asks each endpoint it is given for its status and sends `MoveLeader` to the
//! one that says it leads, so through the cluster endpoint alone the status must come from the
//! leader (and the transfer must reach it: only the leader can hand leadership over).
//!
//! Reads that never involve the leader keep spreading round-robin: serializable Range
//! requests (any member answers them from its own store) and v2 GETs without `quorum=true`.
//! [`Reads::Spread`] spreads every read, as clientv3's balancer does, for clusters whose
//! leader is busy enough to need the help.

use http::Method;

use super::replay::is_write;
use super::Class;
use crate::protowire::{varint_value, Fields};

/// Where linearizable reads go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reads {
    /// To the leader, when it is known and ready.
    #[default]
    Leader,
    /// Round-robin over the ready members.
    Spread,
}

const GRPC_RANGE: &str = "/etcdserverpb.KV/Range";
/// Calls only the leader answers usefully (gRPC and JSON gateway paths).
const LEADER_ONLY: [&str; 8] = [
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/MoveLeader",
    "/v3/maintenance/status",
    "/v3beta/maintenance/status",
    "/v3alpha/maintenance/status",
    "/v3/maintenance/transfer-leadership",
    "/v3beta/maintenance/transfer-leadership",
    "/v3alpha/maintenance/transfer-leadership",
];
/// `RangeRequest.serializable` (etcd `rpc.proto`; `docs/etcd-protocols.md` §1.2).
const RANGE_SERIALIZABLE: u64 = 7;
/// The varint wire type.
const VARINT: u8 = 0;

/// Whether a request should go to the leader. `body` is the buffered request body, if it was
/// buffered (Range bodies always are: reads may be replayed).
pub fn wants_leader(
    reads: Reads,
    class: Class,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: Option<&[u8]>,
) -> bool {
    if is_write(class, method, path) || LEADER_ONLY.contains(&path.trim_end_matches('/')) {
        return true;
    }
    if reads == Reads::Spread {
        return false;
    }
    match class {
        Class::Grpc => path == GRPC_RANGE && !body.is_some_and(grpc_serializable),
        Class::Http => {
            let gateway_range = ["/v3/kv/range", "/v3beta/kv/range", "/v3alpha/kv/range"]
                .contains(&path.trim_end_matches('/'));
            if gateway_range {
                return !body.is_some_and(json_serializable);
            }
            path.starts_with("/v2/keys")
                && *method == Method::GET
                && query.is_some_and(|q| q.split('&').any(|kv| kv == "quorum=true"))
        }
    }
}

/// Whether a gRPC-framed `RangeRequest` asks for a serializable read. A compressed or
/// malformed message counts as linearizable, etcd's default.
fn grpc_serializable(body: &[u8]) -> bool {
    let Some(msg) = crate::grpc::Prefix::single_message(body) else {
        return false;
    };
    Fields::new(msg)
        .map_while(Result::ok)
        .filter(|f| f.number == RANGE_SERIALIZABLE && f.wire_type == VARINT)
        .any(|f| varint_value(f.raw).is_ok_and(|v| v != 0))
}

/// Whether a JSON-gateway range request says `"serializable": true`.
fn json_serializable(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("serializable").and_then(serde_json::Value::as_bool))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protowire::{put_len_field, put_varint_field};

    fn grpc_range(serializable: bool) -> Vec<u8> {
        let mut msg = Vec::new();
        put_len_field(&mut msg, 1, b"key");
        if serializable {
            put_varint_field(&mut msg, RANGE_SERIALIZABLE, 1);
        }
        let mut framed = vec![0];
        framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        framed.extend_from_slice(&msg);
        framed
    }

    /// Protocol, method, path, query, buffered body, and whether it goes to the leader.
    type Case<'a> = (
        Class,
        Method,
        &'a str,
        Option<&'a str>,
        Option<&'a [u8]>,
        bool,
    );

    #[test]
    fn writes_linearizable_reads_and_leader_calls_go_to_the_leader() {
        let (lin, ser) = (grpc_range(false), grpc_range(true));
        let mut compressed = ser.clone();
        compressed[0] = 1;
        let json = br#"{"key":"YQ=="}"#.as_slice();
        let json_ser = br#"{"key":"YQ==","serializable":true}"#.as_slice();
        let quorum = Some("recursive=false&quorum=true");
        let (g, h) = (Class::Grpc, Class::Http);
        #[rustfmt::skip]
        let cases: [Case; 12] = [
            (g, Method::POST, "/etcdserverpb.KV/Put", None, None, true),
            (g, Method::POST, GRPC_RANGE, None, Some(&lin), true),
            (g, Method::POST, GRPC_RANGE, None, Some(&ser), false),
            // Compressed: cannot be read, so etcd's default (linearizable).
            (g, Method::POST, GRPC_RANGE, None, Some(&compressed), true),
            (g, Method::POST, "/etcdserverpb.Maintenance/Status", None, None, true),
            (g, Method::POST, "/etcdserverpb.Maintenance/MoveLeader", None, None, true),
            (g, Method::POST, "/etcdserverpb.Maintenance/HashKV", None, None, false),
            (h, Method::POST, "/v3/kv/range", None, Some(json), true),
            (h, Method::POST, "/v3beta/kv/range", None, Some(json_ser), false),
            (h, Method::GET, "/v2/keys/a", None, None, false),
            (h, Method::GET, "/v2/keys/a", quorum, None, true),
            (h, Method::PUT, "/v2/keys/a", None, None, true),
        ];
        for (class, method, path, query, body, want) in cases {
            let got = wants_leader(Reads::Leader, class, &method, path, query, body);
            assert_eq!(got, want, "{method} {path} {query:?}");
        }
    }

    #[test]
    fn spread_sends_only_writes_to_the_leader() {
        let lin = grpc_range(false);
        let spread = |method: Method, path: &str| {
            wants_leader(Reads::Spread, Class::Grpc, &method, path, None, Some(&lin))
        };
        assert!(!spread(Method::POST, GRPC_RANGE));
        assert!(spread(Method::POST, "/etcdserverpb.KV/Txn"));
        assert!(spread(Method::POST, "/etcdserverpb.Maintenance/MoveLeader"));
    }
}
