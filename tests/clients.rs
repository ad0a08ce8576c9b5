use std::collections::BTreeSet;

use etcd_client::{Client, GetOptions, WatchOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{cluster, start_proxy, until_leader_learned, within, DEADLINE};

/// Sends one raw HTTP/1.1 request and returns the whole response. Every step is bounded, so
/// callers await it directly.
pub async fn http1(addr: &str, method: &str, path: &str, body: &str) -> String {
    let mut s = within("TcpStream::connect", TcpStream::connect(addr))
        .await
        .expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    within("s.write_all", s.write_all(req.as_bytes()))
        .await
        .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("response in time")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_crate_kv_watch_lease_and_members() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &[]).await;
    let mut client = within(
        "Client::connect",
        Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect");

    within("client.put", client.put("k1", "v1", None))
        .await
        .expect("put");
    let got = within("client.get", client.get("k1", None))
        .await
        .expect("get");
    assert_eq!(got.kvs()[0].value(), b"v1");

    let mut watch = within(
        "client.watch",
        client.watch("w/", Some(WatchOptions::new().with_prefix())),
    )
    .await
    .expect("watch");
    let created = within("watch.message", watch.message())
        .await
        .expect("watch created")
        .expect("message");
    assert!(created.created());
    within("client.put", client.put("w/x", "1", None))
        .await
        .expect("put");
    let ev = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .expect("event in time")
        .expect("ok")
        .expect("some");
    assert_eq!(ev.events()[0].kv().expect("kv").key(), b"w/x");

    let lease = within("client.lease_grant", client.lease_grant(30, None))
        .await
        .expect("grant");
    let (mut keeper, mut stream) = within(
        "client.lease_keep_alive",
        client.lease_keep_alive(lease.id()),
    )
    .await
    .expect("keepalive");
    within("keeper.keep_alive", keeper.keep_alive())
        .await
        .expect("send keepalive");
    let ka = within("stream.message", stream.message())
        .await
        .expect("keepalive reply")
        .expect("some");
    assert_eq!(ka.id(), lease.id());
    assert!(ka.ttl() > 0);

    let members = within("client.member_list", client.member_list())
        .await
        .expect("member list");
    let urls: BTreeSet<String> = members
        .members()
        .iter()
        .flat_map(|m| m.client_urls().to_vec())
        .collect();
    assert_eq!(
        urls,
        proxy.member_urls().into_iter().collect::<BTreeSet<_>>()
    );

    // Each member endpoint is pinned to its own member.
    let mut ids = BTreeSet::new();
    for (_, url) in &proxy.members {
        let mut c = within("Client::connect", Client::connect([url.as_str()], None))
            .await
            .expect("connect member");
        ids.insert(
            within("c.status", c.status())
                .await
                .expect("status")
                .header()
                .expect("header")
                .member_id(),
        );
    }
    assert_eq!(ids.len(), 3);
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_gateway_and_raw_v2_responses_are_rewritten() {
    let sim = cluster(2).await;
    let proxy = start_proxy(&sim, &[]).await;
    let ep = proxy.cluster_addr.as_str();

    for prefix in ["/v3", "/v3beta"] {
        let resp = http1(ep, "POST", &format!("{prefix}/cluster/member/list"), "{}").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        for (_, url) in &proxy.members {
            assert!(
                resp.contains(&format!("\"clientURLs\":[\"{url}\"]")),
                "{prefix}: {resp}"
            );
        }
        assert!(!resp.contains("svc.cluster.local"), "{resp}");
        assert!(resp.contains("\"cluster_id\""), "header kept: {resp}");
    }

    // Gateway KV round trip (base64 "foo" / "bar").
    let put = http1(ep, "POST", "/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#).await;
    assert!(put.starts_with("HTTP/1.1 200"), "{put}");
    let get = http1(ep, "POST", "/v3/kv/range", r#"{"key":"Zm9v"}"#).await;
    assert!(get.contains("\"value\":\"YmFy\""), "{get}");

    let machines = http1(ep, "GET", "/v2/machines", "").await;
    let body = machines.split("\r\n\r\n").nth(1).unwrap_or_default();
    let listed: BTreeSet<&str> = body.split(", ").collect();
    let want: BTreeSet<String> = proxy.member_urls().into_iter().collect();
    assert_eq!(
        listed,
        want.iter().map(String::as_str).collect(),
        "{machines}"
    );

    // /version is passed through untouched (clients pick their API prefix from it).
    let version = http1(ep, "GET", "/version", "").await;
    let installed = crate::support::etcd_version();
    assert!(
        version.contains(&format!("\"etcdserver\":\"{installed}\"")),
        "{version} (etcd on the PATH is {installed})"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

/// Reads from `s` until `needle` appears in what was read (or the deadline passes).
async fn read_until(s: &mut TcpStream, acc: &mut String, needle: &str) {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        while !acc.contains(needle) {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "connection closed before {needle:?}; got:\n{acc}");
            acc.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in time; got:\n{acc}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_long_poll_and_gateway_streams_are_not_buffered() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let sim = cluster(1).await;
    let proxy = start_proxy(&sim, &[]).await;
    let ep = proxy.cluster_addr.as_str();

    // v2 long-poll: etcd sends the headers at once and the event when it happens; the proxy
    // must stream both without waiting for the body to end.
    let mut lp = within("TcpStream::connect", TcpStream::connect(ep))
        .await
        .unwrap();
    let req = format!("GET /v2/keys/lp?wait=true HTTP/1.1\r\nHost: {ep}\r\n\r\n");
    within("lp.write_all", lp.write_all(req.as_bytes()))
        .await
        .unwrap();
    let mut got = String::new();
    read_until(&mut lp, &mut got, "\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.to_ascii_lowercase().contains("x-etcd-index"), "{got}");
    assert!(!got.contains("\"action\""), "no event yet: {got}");
    let set = http1(ep, "PUT", "/v2/keys/lp?value=hello", "").await;
    assert!(set.contains("\"action\":\"set\""), "{set}");
    read_until(&mut lp, &mut got, "\"value\":\"hello\"").await;

    // Gateway watch over a streamed POST body: the created event arrives while the stream is open.
    let mut w = within("TcpStream::connect", TcpStream::connect(ep))
        .await
        .unwrap();
    let body = r#"{"create_request":{"key":"c3Q="}}"#;
    let req = format!(
        "POST /v3/watch HTTP/1.1\r\nHost: {ep}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    within("w.write_all", w.write_all(req.as_bytes()))
        .await
        .unwrap();
    let mut got = String::new();
    read_until(&mut w, &mut got, "\"created\":true").await;
    let put = http1(ep, "POST", "/v3/kv/put", r#"{"key":"c3Q=","value":"MQ=="}"#).await;
    assert!(put.starts_with("HTTP/1.1 200"), "{put}");
    read_until(&mut w, &mut got, "\"value\":\"MQ==\"").await;

    // Gateway watch over a WebSocket upgrade.
    let url = format!("ws://{ep}/v3/watch");
    let (mut ws, resp) =
        tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url.as_str()))
            .await
            .expect("upgrade in time")
            .expect("websocket upgrade through the proxy");
    assert_eq!(resp.status(), 101);
    within(
        "ws.send",
        ws.send(Message::text(r#"{"create_request":{"key":"d3M="}}"#)),
    )
    .await
    .unwrap();
    let first = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("message in time")
        .unwrap()
        .unwrap();
    assert!(
        first.to_text().unwrap().contains("\"created\":true"),
        "{first}"
    );
    http1(ep, "POST", "/v3/kv/put", r#"{"key":"d3M=","value":"Mg=="}"#).await;
    let event = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("event in time")
        .unwrap()
        .unwrap();
    assert!(
        event.to_text().unwrap().contains("\"value\":\"Mg==\""),
        "{event}"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

/// The member IDs that served `n` gets of `key`.
async fn readers(c: &mut Client, n: usize, serializable: bool) -> BTreeSet<u64> {
    let mut readers = BTreeSet::new();
    for _ in 0..n {
        let opts = serializable.then(|| GetOptions::new().with_serializable());
        let r = within("c.get", c.get("lead", opts)).await.expect("get");
        readers.insert(r.header().expect("header").member_id());
    }
    readers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_linearizable_reads_go_to_the_raft_leader() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &["--keepalive", "200ms"]).await;
    let mut c = within(
        "Client::connect",
        Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect");
    let leader = within("c.status", c.status())
        .await
        .expect("status")
        .leader();
    until_leader_learned(&mut c, leader).await;
    for _ in 0..10 {
        let r = within("c.put", c.put("lead", "y", None))
            .await
            .expect("put");
        assert_eq!(
            r.header().expect("header").member_id(),
            leader,
            "every write goes to the leader"
        );
    }
    let linearizable = readers(&mut c, 12, false).await;
    assert_eq!(
        linearizable,
        BTreeSet::from([leader]),
        "linearizable reads go to the leader"
    );
    let serializable = readers(&mut c, 12, true).await;
    assert!(
        serializable.len() > 1,
        "serializable reads spread: {serializable:?}"
    );
    drop(proxy);

    // --reads spread (here on a multi-threaded proxy): writes still go to the leader.
    let proxy = start_proxy(
        &sim,
        &[
            "--keepalive",
            "200ms",
            "--reads",
            "spread",
            "--threads",
            "2",
        ],
    )
    .await;
    let mut c = within(
        "Client::connect",
        Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect");
    until_leader_learned(&mut c, leader).await;
    let linearizable = readers(&mut c, 12, false).await;
    assert!(
        linearizable.len() > 1,
        "with --reads spread, linearizable reads spread: {linearizable:?}"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_serves_metrics_and_healthz() {
    let sim = cluster(3).await;
    let mut proxy = start_proxy(&sim, &["--admin", "127.0.0.1:0"]).await;
    let line = tokio::time::timeout(DEADLINE, proxy.stdout.next_line())
        .await
        .expect("admin line")
        .unwrap()
        .unwrap();
    let admin = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("admin address")
        .to_owned();
    let mut c = within(
        "Client::connect",
        Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect");
    within("c.put", c.put("m", "1", None)).await.expect("put");

    let metrics = http1(&admin, "GET", "/metrics", "").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("etcd_proxy_requests_total{class=\"grpc\",member="),
        "{metrics}"
    );
    assert!(
        metrics.contains("etcd_proxy_tunnels_opened_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("etcd_proxy_upstream_latency_seconds_bucket"),
        "{metrics}"
    );
    let healthz = http1(&admin, "GET", "/healthz", "").await;
    assert!(
        healthz.starts_with("HTTP/1.1 200") && healthz.contains("3 of 3 members"),
        "{healthz}"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

/// Values on both sides of `h2`'s copy/chain threshold (256 bytes with vectored writes, 1 KiB
/// without; see `listener/coalesce.rs`) and of its 16 KiB frame size, written and read
/// concurrently over one connection so that their frames interleave, then all in one range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_of_every_size_cross_intact_when_interleaved() {
    let sim = cluster(1).await;
    let proxy = start_proxy(&sim, &[]).await;
    let client = within(
        "Client::connect",
        Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect");
    let sizes = [
        0usize,
        1,
        255,
        256,
        257,
        1023,
        1024,
        1025,
        16 * 1024 - 9,
        16 * 1024 + 1,
        65_537,
        1 << 20,
    ];
    let value = |i: usize, len: usize| -> Vec<u8> {
        (0..len).map(|j| (j * 31 + i * 7 + j / 251) as u8).collect()
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (i, &len) in sizes.iter().enumerate() {
        let mut c = client.clone();
        tasks.spawn(async move {
            let key = format!("sizes/{i:02}");
            within("c.put", c.put(key.as_str(), value(i, len), None))
                .await
                .expect("put");
            let got = within("c.get", c.get(key.as_str(), None))
                .await
                .expect("get");
            assert_eq!(got.kvs()[0].value(), value(i, len), "value of {len} bytes");
        });
    }
    while let Some(done) = within("tasks.join_next", tasks.join_next()).await {
        done.expect("task");
    }
    let mut c = client.clone();
    let all = within(
        "c.get",
        c.get("sizes/", Some(GetOptions::new().with_prefix())),
    )
    .await
    .expect("range");
    assert_eq!(all.kvs().len(), sizes.len());
    for (i, kv) in all.kvs().iter().enumerate() {
        assert_eq!(kv.value(), value(i, sizes[i]), "range: value {i}");
    }
}
