//! Which requests the cluster endpoint sends to the raft leader.
//!
//! Writes always do: a follower would forward the proposal to the leader, one more hop inside
//! the cluster. Linearizable reads do too by default ([`Reads::Leader`]): a follower answers
//! one only after a ReadIndex round trip to the leader (etcd `v3_server.go`,
//! `linearizableReadLoop`), while the leader confirms its lease with the heartbeat it sends
//! anyway. Measured here (`cargo bench --bench compare`): a serial get through etcd-proxy
//! costs about the same as a get sent directly to a follower, and the proxy's CPU per get
//! falls because one upstream connection carries the reads and batches them.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Reads {
    /// To the leader, when it is known and ready.
    #[default]
    Leader,
    /// Round-robin over the ready members.
    Spread,
}

const GRPC_RANGE: &str = "/etcdserverpb.KV/Range";
/// `RangeRequest.serializable` (etcd `rpc.proto`).
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
    if is_write(class, method, path) {
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
    let Some((&0, msg)) = body.split_first() else {
        return false;
    };
    let Some(msg) = msg.get(4..) else {
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

    #[test]
    fn writes_and_linearizable_reads_go_to_the_leader() {
        let leader = |class, method: Method, path: &str, query, body: Option<&[u8]>| {
            wants_leader(Reads::Leader, class, &method, path, query, body)
        };
        let lin = grpc_range(false);
        let ser = grpc_range(true);
        assert!(leader(
            Class::Grpc,
            Method::POST,
            "/etcdserverpb.KV/Put",
            None,
            None
        ));
        assert!(leader(
            Class::Grpc,
            Method::POST,
            GRPC_RANGE,
            None,
            Some(&lin)
        ));
        assert!(!leader(
            Class::Grpc,
            Method::POST,
            GRPC_RANGE,
            None,
            Some(&ser)
        ));
        let mut compressed = ser.clone();
        compressed[0] = 1;
        assert!(leader(
            Class::Grpc,
            Method::POST,
            GRPC_RANGE,
            None,
            Some(&compressed)
        ));
        assert!(!leader(
            Class::Grpc,
            Method::POST,
            "/etcdserverpb.Maintenance/Status",
            None,
            None
        ));

        let json = br#"{"key":"YQ=="}"#.as_slice();
        let json_ser = br#"{"key":"YQ==","serializable":true}"#.as_slice();
        assert!(leader(
            Class::Http,
            Method::POST,
            "/v3/kv/range",
            None,
            Some(json)
        ));
        assert!(!leader(
            Class::Http,
            Method::POST,
            "/v3beta/kv/range",
            None,
            Some(json_ser)
        ));
        assert!(!leader(Class::Http, Method::GET, "/v2/keys/a", None, None));
        let quorum = Some("recursive=false&quorum=true");
        assert!(leader(Class::Http, Method::GET, "/v2/keys/a", quorum, None));
        assert!(leader(Class::Http, Method::PUT, "/v2/keys/a", None, None));
    }

    #[test]
    fn spread_sends_only_writes_to_the_leader() {
        let lin = grpc_range(false);
        let spread = |method: Method, path: &str| {
            wants_leader(Reads::Spread, Class::Grpc, &method, path, None, Some(&lin))
        };
        assert!(!spread(Method::POST, GRPC_RANGE));
        assert!(spread(Method::POST, "/etcdserverpb.KV/Txn"));
    }
}
