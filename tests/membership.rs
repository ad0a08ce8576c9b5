use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;

use crate::support::{
    cluster, ctl3, start_proxy, within, within_for, Proxy, DEADLINE, START_DEADLINE,
};

/// The client URLs `member list` shows through the proxy.
async fn listed_urls(proxy: &Proxy) -> BTreeSet<String> {
    let out = ctl3(&proxy.cluster_addr, &["member", "list", "-w", "json"])
        .await
        .stdout;
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["members"]
        .as_array()
        .expect("members")
        .iter()
        .flat_map(|m| m["clientURLs"].as_array().cloned().unwrap_or_default())
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect()
}

/// Waits (bounded) until `member list` through the proxy shows `n` members, all local.
async fn until_members(proxy: &Proxy, n: usize) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let urls = listed_urls(proxy).await;
        if urls.len() == n && urls.iter().all(|u| u.starts_with("http://127.0.0.1:")) {
            return urls;
        }
        assert!(
            Instant::now() < deadline,
            "member list never showed {n} local members: {urls:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `endpoint status --cluster` rows: (endpoint, member id).
async fn status_rows(proxy: &Proxy) -> BTreeSet<(String, u64)> {
    let out = ctl3(
        &proxy.cluster_addr,
        &["endpoint", "status", "--cluster", "-w", "json"],
    )
    .await
    .stdout;
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
    rows.as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            let ep = r["Endpoint"].as_str().expect("endpoint").to_owned();
            (ep, r["Status"]["header"]["member_id"].as_u64().expect("id"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_outage_and_scaling_3_5_3_while_serving() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &[]).await;
    let mut c = within(
        "Client::connect",
        Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect");
    within("c.put", c.put("k", "v", None)).await.expect("put");

    // The API server is down for 3 s: traffic through open tunnels goes on.
    let failures = Arc::new(AtomicUsize::new(0));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (failures, reads) = (failures.clone(), reads.clone());
        let until = Instant::now() + Duration::from_secs(4);
        tokio::spawn(async move {
            while Instant::now() < until {
                reads.fetch_add(1, Ordering::Relaxed);
                if !matches!(
                    tokio::time::timeout(Duration::from_secs(5), c.get("k", None)).await,
                    Ok(Ok(_))
                ) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    within("sim.pause_api", sim.pause_api(Duration::from_secs(3))).await;
    within("reader", reader).await.expect("reader");
    assert!(reads.load(Ordering::Relaxed) > 50);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "reads during the API outage"
    );

    // Discovery caught up after the outage: scaling up shows in member list through the proxy.
    within_for(START_DEADLINE, "sim.scale", sim.scale(5))
        .await
        .expect("scale up");
    let five = until_members(&proxy, 5).await;
    let rows = status_rows(&proxy).await;
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert_eq!(
        rows.iter().map(|r| r.1).collect::<BTreeSet<_>>().len(),
        5,
        "distinct members: {rows:?}"
    );
    assert_eq!(
        rows.iter().map(|r| r.0.clone()).collect::<BTreeSet<_>>(),
        five
    );

    within_for(START_DEADLINE, "sim.scale", sim.scale(3))
        .await
        .expect("scale down");
    let three = until_members(&proxy, 3).await;
    assert_eq!(status_rows(&proxy).await.len(), 3);
    for gone in five.difference(&three) {
        let addr = gone.trim_start_matches("http://");
        assert!(
            within(
                "tokio::net::TcpStream::connect",
                tokio::net::TcpStream::connect(addr)
            )
            .await
            .is_err(),
            "endpoint {gone} of a removed member still open"
        );
    }
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_idle_timeout_shorter_than_the_keepalive_closes_tunnels_longer_does_not() {
    let sim = cluster(1).await;
    // Keepalive every 300 ms, kubelet idle timeout 1.5 s: tunnels stay open while idle.
    sim.set_kubelet_idle_timeout(Some(Duration::from_millis(1500)));
    let proxy = start_proxy(&sim, &["--keepalive", "300ms"]).await;
    ctl3(&proxy.cluster_addr, &["put", "idle", "1"]).await;
    let opened = sim.portforward_count();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        sim.idle_closures(),
        0,
        "keepalive shorter than the idle timeout"
    );
    ctl3(&proxy.cluster_addr, &["get", "idle"]).await;
    assert_eq!(
        sim.portforward_count(),
        opened,
        "no tunnel had to be re-opened"
    );
    drop(proxy);

    // Keepalive every 3 s, idle timeout 1 s: the kubelet closes idle tunnels between checks.
    sim.set_kubelet_idle_timeout(Some(Duration::from_secs(1)));
    let proxy = start_proxy(&sim, &["--keepalive", "3s"]).await;
    let closed_before = sim.idle_closures();
    let deadline = Instant::now() + DEADLINE;
    while sim.idle_closures() == closed_before {
        assert!(
            Instant::now() < deadline,
            "keepalive longer than the idle timeout: no tunnel was closed as idle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The proxy still works: it opens new tunnels.
    assert_eq!(
        ctl3(&proxy.cluster_addr, &["get", "idle", "--print-value-only"])
            .await
            .stdout
            .trim(),
        "1"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_pod_with_a_new_ip_is_used_again() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &[]).await;
    let (name, url) = proxy.members[1].clone();
    let ip_before = sim.pod_ip(&name);
    within("sim.kill_pod", sim.kill_pod(&name))
        .await
        .expect("kill");
    within_for(START_DEADLINE, "sim.restart_pod", sim.restart_pod(&name))
        .await
        .expect("restart");
    assert_ne!(sim.pod_ip(&name), ip_before);
    // The member endpoint reaches the restarted member (bounded wait for it to rejoin).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = crate::support::run(
            crate::support::etcdctl(
                3,
                &[
                    "--endpoints",
                    &url,
                    "--command-timeout",
                    "2s",
                    "endpoint",
                    "health",
                ],
            ),
            "",
        )
        .await;
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "member {name} never came back: {}",
            out.stderr
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(status_rows(&proxy).await.len(), 3);
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}
