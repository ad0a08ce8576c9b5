//! Bulk transfers through a tunnel with a round trip arrive whole, and the proxy does not
//! hold them: a snapshot through etcd-0's member endpoint is byte for byte the one taken
//! directly, a range of ~40 MB arrives with every key and value, and the proxy's peak RSS
//! stays far below the size of what went through it, also for a client that stops reading a
//! range or a watch catch-up of ~40 MB. Not timed (`benches/bulk.rs` is).

use std::time::Duration;

use tokio::time::timeout;

use crate::support::{cluster, ctl3, etcdctl, run, start_proxy, within_for, Output};

const PREFIX: &str = "bulk/range/";
const KEYS: usize = 40;
const VALUE_BYTES: usize = 1_000_000;
/// The proxy's peak RSS while ~90 MB pass through it.
const MAX_PEAK_RSS_KIB: u64 = 64 * 1024;
/// One snapshot or range of ~40 MB, even in a debug build on a busy machine.
const TRANSFER: Duration = Duration::from_secs(60);

fn key(i: usize) -> String {
    format!("{PREFIX}{i:03}")
}

/// The value of key `i`: printable (so `etcdctl get` prints it as stored), no newlines, and
/// different for every key, so a value delivered under the wrong key is caught.
fn value(i: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(i as u64);
    (0..VALUE_BYTES).map(|_| rng.alphanumeric() as u8).collect()
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn snapshot(endpoint: &str, file: &std::path::Path) -> Vec<u8> {
    let path = file.to_str().expect("utf-8 path");
    let save = etcdctl(
        3,
        &[
            "--endpoints",
            endpoint,
            "--dial-timeout",
            "5s",
            "--command-timeout",
            "60s",
            "snapshot",
            "save",
            path,
        ],
    );
    let out: Output = timeout(TRANSFER, run(save, ""))
        .await
        .unwrap_or_else(|_| panic!("snapshot save through {endpoint} took over {TRANSFER:?}"));
    out.ok();
    std::fs::read(file).expect("read snapshot")
}

/// Writes the `KEYS` values directly to the member at `url`.
async fn seed(url: &str) {
    let mut c = timeout(
        Duration::from_secs(10),
        etcd_client::Client::connect([url], None),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    for i in 0..KEYS {
        timeout(Duration::from_secs(10), c.put(key(i), value(i), None))
            .await
            .expect("put in time")
            .expect("put");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_and_a_large_range_arrive_whole_over_a_slow_tunnel() {
    let sim = cluster(1).await;
    let pod = sim.pod_names()[0].clone();
    let direct = sim.member_client_url(&pod).expect("member url");
    seed(&direct).await;
    let proxy = start_proxy(&sim, &[]).await;
    let pid = proxy.child.id().expect("proxy pid");
    let member = proxy.members[0].1.clone();
    // A real round trip on the tunnel: windows and their updates take turns.
    sim.set_latency(Duration::from_millis(5));
    timeout(TRANSFER, ctl3(&member, &["get", "warm"]))
        .await
        .expect("warm-up get in time");
    let before_kib = status_kib(pid, "VmHWM:").expect("VmHWM");

    let dir = tempfile::tempdir().expect("tempdir");
    let through = snapshot(&member, &dir.path().join("proxy.db")).await;
    let direct_snapshot = snapshot(&direct, &dir.path().join("direct.db")).await;
    assert!(
        through.len() > KEYS * VALUE_BYTES,
        "snapshot through the proxy: {} bytes",
        through.len()
    );
    // Same revision, no writes in between: etcd writes the same bytes (bbolt pages and the
    // trailing SHA-256) both times.
    assert_eq!(
        through.len(),
        direct_snapshot.len(),
        "snapshot sizes differ"
    );
    assert!(
        through == direct_snapshot,
        "the snapshot through the proxy differs from the direct one"
    );

    let got = timeout(
        TRANSFER,
        ctl3(&proxy.cluster_addr, &["get", "--prefix", PREFIX]),
    )
    .await
    .expect("range in time")
    .stdout;
    // Plain output: key, newline, value, newline per pair.
    let lines: Vec<&str> = got.split_terminator('\n').collect();
    assert_eq!(lines.len(), 2 * KEYS, "keys and values in the range");
    for (i, pair) in lines.chunks(2).enumerate() {
        assert_eq!(pair[0], key(i));
        assert_eq!(pair[1].len(), VALUE_BYTES, "value of {}", key(i));
        assert!(
            pair[1].as_bytes() == value(i).as_slice(),
            "value of {} differs",
            key(i)
        );
    }

    let peak_kib = status_kib(pid, "VmHWM:").expect("VmHWM");
    assert!(
        peak_kib <= MAX_PEAK_RSS_KIB,
        "proxy peak RSS {peak_kib} KiB (before the transfers: {before_kib} KiB) after passing \
         {} MB through",
        (through.len() + got.len()) / 1_000_000
    );
    sim.set_latency(Duration::ZERO);
}

/// A `RangeRequest` for every key under `PREFIX`.
fn range_request() -> Vec<u8> {
    let mut end = PREFIX.as_bytes().to_vec();
    *end.last_mut().expect("prefix") += 1;
    // RangeRequest { key = 1, range_end = 2 }.
    let mut msg = vec![0x0a, PREFIX.len() as u8];
    msg.extend_from_slice(PREFIX.as_bytes());
    msg.extend_from_slice(&[0x12, end.len() as u8]);
    msg.extend_from_slice(&end);
    msg
}

/// A gRPC message: the 5-byte prefix, then `msg`.
fn grpc_frame(msg: &[u8]) -> bytes::Bytes {
    let mut framed = vec![0];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(msg);
    framed.into()
}

/// An HTTP/2 connection to `addr` with h2's default windows (64 KiB), and a gRPC call to
/// `path` with one message (the request stream stays open unless `end`): the response body,
/// and the request stream.
async fn raw_call(
    addr: &str,
    path: &str,
    msg: &[u8],
    end: bool,
) -> (h2::RecvStream, h2::SendStream<bytes::Bytes>) {
    let tcp = timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let (client, conn) = timeout(Duration::from_secs(5), h2::client::handshake(tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    tokio::spawn(conn);
    let mut client = timeout(Duration::from_secs(5), client.ready())
        .await
        .expect("ready in time")
        .expect("ready");
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut send) = client.send_request(req, false).expect("send request");
    send.send_data(grpc_frame(msg), end).expect("send body");
    let response = timeout(Duration::from_secs(10), response)
        .await
        .expect("response in time")
        .expect("response");
    assert_eq!(response.status(), 200);
    (response.into_body(), send)
}

/// A proxy with a warm tunnel to the one member: the member endpoint's address, and the
/// proxy's RSS (KiB) to measure growth from.
async fn warm_proxy(sim: &etcd_proxy_sim::SimCluster) -> (crate::support::Proxy, String, u64) {
    let proxy = start_proxy(sim, &[]).await;
    let pid = proxy.child.id().expect("proxy pid");
    let member = proxy.members[0].1.clone();
    timeout(TRANSFER, ctl3(&member, &["get", "warm"]))
        .await
        .expect("warm-up get in time");
    let before_kib = status_kib(pid, "VmRSS:").expect("VmRSS");
    let addr = member.trim_start_matches("http://").to_owned();
    (proxy, addr, before_kib)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_a_window_not_the_response() {
    let sim = cluster(1).await;
    let pod = sim.pod_names()[0].clone();
    seed(&sim.member_client_url(&pod).expect("member url")).await;
    let (proxy, addr, before_kib) = warm_proxy(&sim).await;
    let pid = proxy.child.id().expect("proxy pid");
    let (mut body, _send) = raw_call(&addr, "/etcdserverpb.KV/Range", &range_request(), true).await;

    // etcd has over 40 MB to send; the client reads nothing for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled_kib = status_kib(pid, "VmRSS:").expect("VmRSS");
    let held_mib = stalled_kib.saturating_sub(before_kib) / 1024;
    assert!(
        held_mib <= 24,
        "the proxy grew by {held_mib} MiB ({before_kib} KiB before) for a client that reads \
         nothing of a {} MB response",
        KEYS * VALUE_BYTES / 1_000_000
    );

    let mut total = 0;
    while let Some(data) = timeout(Duration::from_secs(10), body.data())
        .await
        .expect("data in time")
    {
        let data = data.expect("data");
        total += data.len();
        let _ = body.flow_control().release_capacity(data.len());
    }
    assert!(total > KEYS * VALUE_BYTES, "{total} bytes arrived");
    let trailers = timeout(Duration::from_secs(5), body.trailers())
        .await
        .expect("trailers in time")
        .expect("trailers")
        .expect("some trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
}

/// Writes `txns` transactions of `puts` keys under `prefix` (values of `value_len` bytes)
/// straight to the member at `url`: a watch backlog of `txns` revisions. Returns the writer and
/// the first transaction's revision.
async fn write_events(
    url: &str,
    prefix: &str,
    txns: usize,
    puts: usize,
    value_len: usize,
) -> (etcd_client::Client, i64) {
    use etcd_client::{Client, Txn, TxnOp};
    let mut writer = timeout(Duration::from_secs(10), Client::connect([url], None))
        .await
        .expect("connect in time")
        .expect("connect");
    let value = "v".repeat(value_len);
    let mut first = 0;
    for t in 0..txns {
        let ops: Vec<TxnOp> = (0..puts)
            .map(|i| TxnOp::put(format!("{prefix}{t:03}/{i:03}"), value.as_str(), None))
            .collect();
        let r = timeout(
            Duration::from_secs(10),
            writer.txn(Txn::new().and_then(ops)),
        )
        .await
        .expect("txn in time")
        .expect("txn");
        if t == 0 {
            first = r.header().expect("header").revision();
        }
    }
    (writer, first)
}

/// A watch catching up from an old revision gets its backlog as one response of several
/// megabytes, which the proxy passes on while it is still arriving. Its bookkeeping must still
/// see every event: a tunnel cut right after the catch-up resumes from the revision after the
/// last one delivered, so every event arrives exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_watch_catch_up_resumes_after_a_cut_with_every_event_once() {
    use etcd_client::{Client, WatchOptions};

    // About 2.5 MB in one response: under etcd-client's 4 MiB message limit.
    const TXNS: usize = 150;
    const PUTS_PER_TXN: usize = 100;
    let sim = cluster(1).await;
    let pod = sim.pod_names()[0].clone();
    let direct = sim.member_client_url(&pod).expect("member url");
    let (mut writer, first) = write_events(&direct, "bulk/watch/", TXNS, PUTS_PER_TXN, 100).await;
    let proxy = start_proxy(&sim, &[]).await;
    let mut client = timeout(
        Duration::from_secs(10),
        Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let options = WatchOptions::new().with_prefix().with_start_revision(first);
    let mut stream = timeout(
        Duration::from_secs(10),
        client.watch("bulk/watch/", Some(options)),
    )
    .await
    .expect("watch in time")
    .expect("watch");

    let mut revisions: Vec<i64> = Vec::new();
    let mut cut = false;
    let mut last = first + TXNS as i64 - 1;
    while revisions.last().is_none_or(|r| *r < last) {
        let msg = timeout(TRANSFER, stream.message())
            .await
            .expect("watch response in time")
            .expect("watch stream")
            .expect("watch stream open");
        let events = msg.events();
        // Each transaction is one revision with PUTS_PER_TXN events.
        for e in events.iter().step_by(PUTS_PER_TXN) {
            revisions.push(e.kv().expect("kv").mod_revision());
        }
        if !events.is_empty() && !cut {
            assert!(
                events.len() > 10 * PUTS_PER_TXN,
                "the catch-up came as one large response: {} events",
                events.len()
            );
            // Cut every tunnel, then write one more transaction: the resumed watch must
            // start after what was delivered.
            sim.cut_tunnels();
            cut = true;
            let r = timeout(
                Duration::from_secs(10),
                writer.put("bulk/watch/after", "x", None),
            )
            .await
            .expect("put in time")
            .expect("put");
            last = r.header().expect("header").revision();
        }
    }
    let expected: Vec<i64> = (first..=last).collect();
    assert_eq!(revisions, expected, "every revision once, in order");
    drop(proxy);
    within_for(Duration::from_secs(30), "sim.shutdown", sim.shutdown()).await;
}

/// A `WatchRequest` creating a watch on every key under `prefix` from revision `start`.
fn watch_create_request(prefix: &str, start: i64) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("prefix") += 1;
    // WatchCreateRequest { key = 1, range_end = 2, start_revision = 3 }.
    let mut create = vec![0x0a, prefix.len() as u8];
    create.extend_from_slice(prefix.as_bytes());
    create.extend_from_slice(&[0x12, end.len() as u8]);
    create.extend_from_slice(&end);
    create.push(0x18);
    let mut v = start as u64;
    while v >= 0x80 {
        create.push((v as u8) | 0x80);
        v >>= 7;
    }
    create.push(v as u8);
    // WatchRequest { create_request = 1 }.
    let mut msg = vec![0x0a, create.len() as u8];
    msg.extend_from_slice(&create);
    msg
}

/// A watch catching up from an old revision gets one response of ~40 MB. A client that reads
/// none of it makes the proxy hold its budget toward the client and a window toward etcd, not
/// the response (which it used to reassemble whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_watch_catch_up_holds_a_window_not_the_response() {
    const WATCHED: &str = "bulk/watched/";
    const TXNS: usize = 400;
    const PUTS_PER_TXN: usize = 100;
    const EVENT_VALUE: usize = 1000;
    let sim = cluster(1).await;
    let pod = sim.pod_names()[0].clone();
    let direct = sim.member_client_url(&pod).expect("member url");
    let (_writer, first) = write_events(&direct, WATCHED, TXNS, PUTS_PER_TXN, EVENT_VALUE).await;
    let (proxy, addr, before_kib) = warm_proxy(&sim).await;
    let pid = proxy.child.id().expect("proxy pid");
    let (mut body, _send) = raw_call(
        &addr,
        "/etcdserverpb.Watch/Watch",
        &watch_create_request(WATCHED, first),
        false,
    )
    .await;
    let backlog = TXNS * PUTS_PER_TXN * EVENT_VALUE;
    // etcd has over 40 MB of events to send at its next sync (every 100 ms); the client
    // reads nothing for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled_kib = status_kib(pid, "VmRSS:").expect("VmRSS");
    let held_mib = stalled_kib.saturating_sub(before_kib) / 1024;
    eprintln!("stalled watch catch-up: the proxy grew by {held_mib} MiB");
    assert!(
        held_mib <= 24,
        "the proxy grew by {held_mib} MiB ({before_kib} KiB before) for a client that reads \
         nothing of a {} MB watch catch-up",
        backlog / 1_000_000
    );

    let mut total = 0;
    while total < backlog {
        let data = timeout(Duration::from_secs(10), body.data())
            .await
            .expect("data in time")
            .expect("the watch stream stays open")
            .expect("data");
        total += data.len();
        let _ = body.flow_control().release_capacity(data.len());
    }
    drop(proxy);
    within_for(Duration::from_secs(30), "sim.shutdown", sim.shutdown()).await;
}
