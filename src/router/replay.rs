//! Which requests may be sent again to another member when the first attempt fails.
//!
//! A request whose connection never reached etcd (the tunnel could not be opened, the pooled
//! connection was already dead) can always go elsewhere. A request that may have reached etcd
//! can only be repeated if repeating it changes nothing: reads. Requests whose bodies stream
//! from the client (Watch, LeaseKeepAlive, gateway watch streams, upgrades) are never buffered
//! and so never replayed; they fail and the client re-establishes them.

use http::{header, Method, Request};

/// How a request may be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Stream the body; no second attempt.
    Never,
    /// Buffer the body; try another member if the connection failed before sending.
    OnConnectError,
    /// Buffer the body; try another member after any transport failure (reads).
    Always,
}

/// gRPC methods whose requests stream from the client: buffering them would never finish.
const CLIENT_STREAMING: [&str; 2] = [
    "/etcdserverpb.Watch/Watch",
    "/etcdserverpb.Lease/LeaseKeepAlive",
];

/// gRPC methods that only read, so a repeat is harmless.
const GRPC_READS: [&str; 15] = [
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.Cluster/MemberList",
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Hash",
    "/etcdserverpb.Maintenance/HashKV",
    "/etcdserverpb.Lease/LeaseTimeToLive",
    "/etcdserverpb.Lease/LeaseLeases",
    "/etcdserverpb.Auth/AuthStatus",
    "/etcdserverpb.Auth/UserGet",
    "/etcdserverpb.Auth/UserList",
    "/etcdserverpb.Auth/RoleGet",
    "/etcdserverpb.Auth/RoleList",
    "/v3electionpb.Election/Leader",
    "/grpc.health.v1.Health/Check",
    "/etcdserverpb.Maintenance/Snapshot",
];

/// Services whose methods (other than [`CLIENT_STREAMING`]) take unary requests.
const UNARY_SERVICES: [&str; 4] = [
    "/etcdserverpb.",
    "/v3lockpb.",
    "/v3electionpb.",
    "/grpc.health.v1.",
];

/// JSON-gateway paths (after `/v3`, `/v3beta` or `/v3alpha`) that only read.
const GATEWAY_READS: [&str; 5] = [
    "kv/range",
    "cluster/member/list",
    "maintenance/status",
    "lease/timetolive",
    "lease/leases",
];

/// JSON-gateway paths whose request bodies stream.
const GATEWAY_STREAMS: [&str; 2] = ["watch", "lease/keepalive"];

/// The replay policy of a gRPC request.
pub fn grpc(path: &str) -> Replay {
    if CLIENT_STREAMING.contains(&path) || !UNARY_SERVICES.iter().any(|s| path.starts_with(s)) {
        Replay::Never
    } else if GRPC_READS.contains(&path) {
        Replay::Always
    } else {
        Replay::OnConnectError
    }
}

/// The replay policy of an HTTP request (v2, gateway, health …).
pub fn http<B>(req: &Request<B>) -> Replay {
    if req.headers().contains_key(header::UPGRADE) {
        return Replay::Never;
    }
    let path = req.uri().path();
    let gateway = ["/v3/", "/v3beta/", "/v3alpha/"]
        .iter()
        .find_map(|p| path.strip_prefix(p));
    if let Some(rest) = gateway {
        let rest = rest.trim_end_matches('/');
        if GATEWAY_STREAMS.contains(&rest) {
            return Replay::Never;
        }
        if req.method() == Method::POST && GATEWAY_READS.contains(&rest) {
            return Replay::Always;
        }
    }
    let query = req.uri().query().unwrap_or("");
    let long_poll = query
        .split('&')
        .any(|kv| kv == "wait=true" || kv == "stream=true");
    match *req.method() {
        Method::GET | Method::HEAD if !long_poll => Replay::Always,
        _ => Replay::OnConnectError,
    }
}

/// gRPC methods that change the keyspace or leases: raft proposals, best sent to the leader.
const GRPC_WRITES: [&str; 6] = [
    "/etcdserverpb.KV/Put",
    "/etcdserverpb.KV/DeleteRange",
    "/etcdserverpb.KV/Txn",
    "/etcdserverpb.KV/Compact",
    "/etcdserverpb.Lease/LeaseGrant",
    "/etcdserverpb.Lease/LeaseRevoke",
];

/// Whether a request is a write that the raft leader should take (a follower forwards it).
pub fn is_write(class: super::Class, method: &Method, path: &str) -> bool {
    match class {
        super::Class::Grpc => GRPC_WRITES.contains(&path),
        super::Class::Http => {
            let gateway = ["/v3/", "/v3beta/", "/v3alpha/"]
                .iter()
                .find_map(|p| path.strip_prefix(p));
            match gateway {
                Some(rest) => matches!(
                    rest,
                    "kv/put" | "kv/deleterange" | "kv/txn" | "lease/grant" | "lease/revoke"
                ),
                None => {
                    path.starts_with("/v2/keys")
                        && *method != Method::GET
                        && *method != Method::HEAD
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, uri: &str) -> Request<()> {
        Request::builder().method(method).uri(uri).body(()).unwrap()
    }

    #[test]
    fn grpc_policies() {
        assert_eq!(grpc("/etcdserverpb.KV/Range"), Replay::Always);
        assert_eq!(grpc("/etcdserverpb.KV/Put"), Replay::OnConnectError);
        assert_eq!(
            grpc("/etcdserverpb.KV/Txn"),
            Replay::OnConnectError,
            "a txn may write"
        );
        assert_eq!(grpc("/etcdserverpb.Watch/Watch"), Replay::Never);
        assert_eq!(grpc("/etcdserverpb.Lease/LeaseKeepAlive"), Replay::Never);
        assert_eq!(
            grpc("/other.Service/Method"),
            Replay::Never,
            "unknown services may stream"
        );
    }

    #[test]
    fn writes() {
        use super::super::Class;
        assert!(is_write(Class::Grpc, &Method::POST, "/etcdserverpb.KV/Put"));
        assert!(!is_write(
            Class::Grpc,
            &Method::POST,
            "/etcdserverpb.KV/Range"
        ));
        assert!(is_write(Class::Http, &Method::PUT, "/v2/keys/a"));
        assert!(!is_write(Class::Http, &Method::GET, "/v2/keys/a"));
        assert!(is_write(Class::Http, &Method::POST, "/v3/kv/put"));
        assert!(!is_write(Class::Http, &Method::POST, "/v3/kv/range"));
    }

    #[test]
    fn http_policies() {
        assert_eq!(http(&req(Method::GET, "/v2/keys/a")), Replay::Always);
        assert_eq!(
            http(&req(Method::GET, "/v2/keys/a?wait=true&recursive=true")),
            Replay::OnConnectError
        );
        assert_eq!(
            http(&req(Method::PUT, "/v2/keys/a?value=1")),
            Replay::OnConnectError
        );
        assert_eq!(http(&req(Method::POST, "/v3/kv/range")), Replay::Always);
        assert_eq!(
            http(&req(Method::POST, "/v3beta/kv/put")),
            Replay::OnConnectError
        );
        assert_eq!(http(&req(Method::POST, "/v3/watch")), Replay::Never);
        let mut up = req(Method::GET, "/v3/watch");
        up.headers_mut()
            .insert(header::UPGRADE, "websocket".parse().unwrap());
        assert_eq!(http(&up), Replay::Never);
    }
}
