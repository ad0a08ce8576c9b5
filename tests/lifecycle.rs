use std::time::{Duration, Instant};

use etcd_client::Client;

use crate::support::{cluster, ctl3, start_proxy, within, DEADLINE};

/// How soon "at once" and "promptly" are: well under the proxy's 10 s drain cap, so a
/// shutdown that sits the cap out (or waits for idle clients to leave) fails.
const PROMPT: Duration = Duration::from_secs(3);

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

/// `host:port` of an `http://host:port` URL.
fn addr(url: &str) -> &str {
    url.split_once("://").map_or(url, |(_, a)| a)
}

/// Polls until connections to `addr` are refused: nothing listens there any more.
async fn until_refused(addr: &str) {
    let deadline = Instant::now() + PROMPT;
    loop {
        match within("connect", tokio::net::TcpStream::connect(addr)).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections {PROMPT:?} after the signal"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the member directly (not through the proxy) until `key` holds `value`.
async fn until_stored(etcd: &mut Client, key: &str, value: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = within("get from etcd", etcd.get(key, None))
            .await
            .expect("get from etcd");
        if got.kvs().first().map(|kv| kv.value()) == Some(value.as_bytes()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{key}={value} never reached etcd"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client of the proxy and one straight to the only member of `sim`.
async fn clients(sim: &etcd_proxy_sim::SimCluster, proxy: &str) -> (Client, Client) {
    let c = within("connect", Client::connect([proxy], None))
        .await
        .expect("connect");
    let url = sim
        .member_client_url(&sim.pod_names()[0])
        .expect("member URL");
    let etcd = within("connect to etcd", Client::connect([url], None))
        .await
        .expect("connect to etcd");
    (c, etcd)
}

/// A put through `c` that is held in flight: every tunnel frame is delayed `latency` each
/// way. Returns once etcd has applied it, so its answer is still on its way back through the
/// proxy for about `latency`. The task keeps the client, and so its connection, open.
async fn put_in_flight(
    sim: &etcd_proxy_sim::SimCluster,
    mut c: Client,
    etcd: &mut Client,
    latency: Duration,
) -> tokio::task::JoinHandle<(
    Result<etcd_client::PutResponse, etcd_client::Error>,
    Instant,
    Client,
)> {
    within("put", c.put("k", "before", None))
        .await
        .expect("put");
    sim.set_latency(latency);
    let in_flight = tokio::spawn(async move {
        let put = within("the put held in flight", c.put("k", "during", None)).await;
        (put, Instant::now(), c)
    });
    until_stored(etcd, "k", "during").await;
    assert!(!in_flight.is_finished(), "the put is in flight");
    in_flight
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let sim = cluster(1).await;
    let mut proxy = start_proxy(&sim, &[]).await;
    let (c, mut etcd) = clients(&sim, &proxy.cluster_addr).await;
    let in_flight = put_in_flight(&sim, c, &mut etcd, Duration::from_millis(1500)).await;

    signal(proxy.child.id().expect("pid"), "-TERM");
    // Every listener closes at once, while the put is still draining.
    until_refused(&proxy.cluster_addr).await;
    for (_, url) in &proxy.members {
        until_refused(addr(url)).await;
    }
    assert!(
        proxy.child.try_wait().expect("try_wait").is_none(),
        "the proxy exited with a request in flight"
    );
    if in_flight.is_finished() {
        let (put, _, _) = within("the in-flight put", in_flight).await.expect("task");
        panic!("the in-flight put ended before the listeners closed: {put:?}");
    }

    let (put, done_at, _c) = within("the in-flight put", in_flight).await.expect("task");
    put.expect("the in-flight put completes during the drain");
    let status = within("the proxy exits", proxy.child.wait())
        .await
        .expect("wait");
    let after = done_at.elapsed();
    assert!(status.success(), "clean exit: {status}");
    // The client is still connected: the drain ends with the last request, not with the
    // last connection or the 10 s cap.
    assert!(
        after < PROMPT,
        "the proxy exited {after:?} after its last in-flight request finished"
    );
    sim.set_latency(Duration::ZERO);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let sim = cluster(1).await;
    let mut proxy = start_proxy(&sim, &[]).await;
    let (c, mut etcd) = clients(&sim, &proxy.cluster_addr).await;
    let in_flight = put_in_flight(&sim, c, &mut etcd, Duration::from_secs(4)).await;

    let pid = proxy.child.id().expect("pid");
    signal(pid, "-TERM");
    // The first signal was handled: the proxy is draining.
    until_refused(&proxy.cluster_addr).await;
    assert!(!in_flight.is_finished(), "the put is still draining");
    signal(pid, "-TERM");
    let again = Instant::now();
    within("the proxy exits", proxy.child.wait())
        .await
        .expect("wait");
    let took = again.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the proxy took {took:?} to exit after a second signal"
    );
    let (put, _, _c) = within("the in-flight put", in_flight).await.expect("task");
    assert!(
        put.is_err(),
        "the second signal did not cut the in-flight put: {put:?}"
    );
    sim.set_latency(Duration::ZERO);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_watch_ends_promptly_on_shutdown() {
    let sim = cluster(1).await;
    let mut proxy = start_proxy(&sim, &[]).await;
    let mut c = within(
        "connect",
        Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect");
    let mut w = within("watch", c.watch("x", None)).await.expect("watch");
    let created = within("watch created", w.message())
        .await
        .expect("created")
        .expect("message");
    assert!(created.created());
    let stopped_at = Instant::now();
    signal(proxy.child.id().expect("pid"), "-INT");

    // The client sees its stream end with UNAVAILABLE from the proxy, not a broken
    // connection when the process goes.
    let ended = within("the watch ends", w.message()).await;
    let took = stopped_at.elapsed();
    match ended {
        Err(etcd_client::Error::GRpcStatus(s)) => {
            assert_eq!(i32::from(s.code()), 14, "UNAVAILABLE: {s:?}");
            assert!(s.message().contains("shutting down"), "{s:?}");
        }
        other => panic!("the watch did not end with UNAVAILABLE: {other:?}"),
    }
    assert!(took < PROMPT, "the watch ended {took:?} after the signal");
    let status = within("the proxy exits", proxy.child.wait())
        .await
        .expect("wait");
    let took = stopped_at.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < PROMPT, "the proxy exited {took:?} after the signal");
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_a_laptop_sleep_that_broke_every_tunnel() {
    let sim = cluster(3).await;
    let proxy = start_proxy(
        &sim,
        &["--keepalive", "300ms", "--keepalive-timeout", "500ms"],
    )
    .await;
    ctl3(&proxy.cluster_addr, &["put", "sleep", "before"]).await;
    let pid = proxy.child.id().expect("pid");

    // The laptop sleeps longer than the keepalive timeout; meanwhile its flows die.
    signal(pid, "-STOP");
    sim.cut_tunnels();
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(pid, "-CONT");

    // The very next request works, without restarting the proxy.
    let got = ctl3(&proxy.cluster_addr, &["get", "sleep", "--print-value-only"]).await;
    assert_eq!(got.stdout.trim(), "before");
    ctl3(&proxy.cluster_addr, &["put", "sleep", "after"]).await;
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}
