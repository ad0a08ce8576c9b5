//! Gateway replicas behind one load balancer: logins made on one are good on the others when
//! they share `--token-key` and the users file, and a changed users file revokes them.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::clients::http1;
use crate::support::attack::h2_client;
use crate::support::{standalone_etcd, start_proxy_args, Proxy, DEADLINE};

fn write_users(path: &Path, password: &str) {
    let hash = bcrypt::hash(password, 4).unwrap();
    std::fs::write(path, format!("alice:{hash}\n")).unwrap();
}

async fn replica(etcd_url: &str, users: &Path, key: &Path) -> Proxy {
    start_proxy_args(&[
        "--endpoints",
        etcd_url,
        "--auth-file",
        users.to_str().unwrap(),
        "--token-key",
        key.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .await
}

/// A JSON-gateway login on `proxy`: the token.
async fn gateway_token(proxy: &Proxy) -> String {
    let resp = http1(
        &proxy.cluster_addr,
        "POST",
        "/v3/auth/authenticate",
        r#"{"name":"alice","password":"wonderland"}"#,
    )
    .await;
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{resp}"));
    v["token"].as_str().unwrap().to_owned()
}

/// A JSON-gateway put with `token` on a new connection: the raw response.
async fn gateway_put(proxy: &Proxy, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = &proxy.cluster_addr;
    let body = r#"{"key":"cmVwbGljYQ==","value":"eWVz"}"#;
    let req = format!(
        "POST /v3/kv/put HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

/// A gRPC `Range` of "replica" carrying `token` as metadata, on a new HTTP/2 connection:
/// the grpc-status and grpc-message.
async fn grpc_range(proxy: &Proxy, token: &str) -> (String, String) {
    let (mut send, _conn) = h2_client(proxy.cluster_addr.parse().unwrap()).await;
    // RangeRequest { key = 1: "replica" }, length-prefixed.
    let mut msg = vec![0x0a, 7];
    msg.extend_from_slice(b"replica");
    let mut body = vec![0, 0, 0, 0, msg.len() as u8];
    body.extend(msg);
    let req = http::Request::post(format!(
        "http://{}/etcdserverpb.KV/Range",
        proxy.cluster_addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("token", token)
    .body(Full::new(Bytes::from(body)))
    .unwrap();
    let resp = tokio::time::timeout(DEADLINE, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = resp.into_parts();
    let collected = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .unwrap()
        .unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| parts.headers.get(name))
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    (field("grpc-status"), field("grpc-message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_a_key_accept_each_others_tokens_until_the_users_file_changes() {
    let etcd = standalone_etcd(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let (users, key, other_key) = (
        dir.path().join("users"),
        dir.path().join("key"),
        dir.path().join("other"),
    );
    write_users(&users, "wonderland");
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::write(&other_key, [8u8; 32]).unwrap();
    let a = replica(&etcd.url, &users, &key).await;
    let b = replica(&etcd.url, &users, &key).await;
    let stranger = replica(&etcd.url, &users, &other_key).await;

    // JSON gateway: log in on A, put on B.
    let token = gateway_token(&a).await;
    let put = gateway_put(&b, &token).await;
    assert!(put.starts_with("HTTP/1.1 200"), "{put}");

    // gRPC: etcdctl-style Authenticate on B, a call with that token on A.
    let client = etcd_client::Client::connect([b.cluster_addr.as_str()], None)
        .await
        .unwrap();
    let grpc_token = tokio::time::timeout(
        DEADLINE,
        client
            .auth_client()
            .authenticate("alice".into(), "wonderland".into()),
    )
    .await
    .unwrap()
    .unwrap()
    .token()
    .to_owned();
    assert_eq!(
        grpc_range(&a, &grpc_token).await,
        ("0".into(), String::new())
    );

    // Another key: refused, with etcd's own error.
    let (status, message) = grpc_range(&stranger, &grpc_token).await;
    assert_eq!(
        (status.as_str(), message.as_str()),
        ("16", "etcdserver: invalid auth token")
    );
    let put = gateway_put(&stranger, &token).await;
    assert!(put.starts_with("HTTP/1.1 401"), "{put}");

    // A new password in the users file revokes alice's tokens on every replica.
    write_users(&users, "looking-glass");
    let revoked = tokio::time::timeout(DEADLINE, async {
        loop {
            let (sa, _) = grpc_range(&a, &grpc_token).await;
            let (sb, _) = grpc_range(&b, &grpc_token).await;
            if sa == "16" && sb == "16" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        revoked.is_ok(),
        "tokens still accepted after the password changed"
    );
    let put = gateway_put(&b, &token).await;
    assert!(put.starts_with("HTTP/1.1 401"), "{put}");
}
