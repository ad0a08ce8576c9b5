use std::time::{Duration, Instant};

use etcd_client::Client;

use crate::support::{cluster, ctl3, start_proxy, DEADLINE};

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let sim = cluster(1).await;
    let mut proxy = start_proxy(&sim, &[]).await;
    let mut c = Client::connect([proxy.cluster_addr.as_str()], None)
        .await
        .expect("connect");
    c.put("k", "v", None).await.expect("put");

    // Every tunnel frame now takes 400 ms each way: a get is in flight for ~1 s.
    sim.set_latency(Duration::from_millis(400));
    let in_flight = tokio::spawn(async move { c.get("k", None).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = proxy.child.id().expect("pid");
    let stopped_at = Instant::now();
    signal(pid, "-TERM");

    let got = tokio::time::timeout(DEADLINE, in_flight)
        .await
        .expect("get finishes")
        .expect("task");
    let got = got.expect("the in-flight get completes during the drain");
    assert_eq!(got.kvs()[0].value(), b"v");
    let status = tokio::time::timeout(DEADLINE, proxy.child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert!(status.success(), "clean exit: {status}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(12),
        "bounded drain: {:?}",
        stopped_at.elapsed()
    );
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(&proxy.cluster_addr)
        .await
        .is_err());
    sim.set_latency(Duration::ZERO);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_watch_ends_promptly_on_shutdown() {
    let sim = cluster(1).await;
    let mut proxy = start_proxy(&sim, &[]).await;
    let mut c = Client::connect([proxy.cluster_addr.as_str()], None)
        .await
        .expect("connect");
    let mut w = c.watch("x", None).await.expect("watch");
    assert!(w
        .message()
        .await
        .expect("created")
        .expect("message")
        .created());
    let pid = proxy.child.id().expect("pid");
    let stopped_at = Instant::now();
    signal(pid, "-INT");
    let status = tokio::time::timeout(DEADLINE, proxy.child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert!(status.success(), "{status}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(12),
        "{:?}",
        stopped_at.elapsed()
    );
    sim.shutdown().await;
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
    sim.shutdown().await;
}
