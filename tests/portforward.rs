use std::collections::BTreeSet;

use etcd_proxy_sim::{SimCluster, SimConfig};

use crate::support::{ctl3, proxy_fails, start_proxy, within, within_for, Proxy, START_DEADLINE};

/// A 2-member simulated cluster of Kubernetes 1.`minor`.
async fn cluster_at(minor: u32) -> SimCluster {
    within_for(
        START_DEADLINE,
        "the simulated cluster starts",
        SimCluster::start(SimConfig {
            members: 2,
            kubernetes_minor: minor,
            ..SimConfig::default()
        }),
    )
    .await
    .expect("simulated cluster starts")
}

/// put/get, member list and `endpoint status --cluster` through the proxy.
async fn works(proxy: &Proxy, what: &str) {
    let ep = proxy.cluster_addr.as_str();
    ctl3(ep, &["put", "row", what]).await;
    let got = ctl3(ep, &["get", "row", "--print-value-only"]).await.stdout;
    assert_eq!(got.trim(), what);

    let members: BTreeSet<String> = proxy.member_urls().into_iter().collect();
    let list = ctl3(ep, &["member", "list", "-w", "json"]).await.stdout;
    let v: serde_json::Value = serde_json::from_str(&list).expect("member list json");
    let listed: BTreeSet<String> = v["members"]
        .as_array()
        .expect("members")
        .iter()
        .flat_map(|m| m["clientURLs"].as_array().unwrap().iter())
        .map(|u| u.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, members, "{what}: {list}");

    let status = ctl3(ep, &["endpoint", "status", "--cluster", "-w", "json"])
        .await
        .stdout;
    let rows: serde_json::Value = serde_json::from_str(&status).expect("status json");
    let ids: BTreeSet<u64> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["Status"]["header"]["member_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{what}: every member answers: {status}");
}

/// A Role with only `create` on pods/portforward (what kubectl needed for years): the
/// WebSocket GET is refused, SPDY carries the tunnels, one SPDY connection per pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_only_role_falls_back_to_spdy_on_1_31_and_1_35() {
    for minor in [31, 35] {
        let sim = cluster_at(minor).await;
        let proxy = start_proxy(&sim, &["--context", "sim-portforward-create"]).await;
        works(&proxy, &format!("create-only-1.{minor}")).await;
        assert_eq!(sim.portforward_count(), 0, "no WebSocket was accepted");
        assert_eq!(
            sim.spdy_upgrade_count(),
            2,
            "one SPDY connection per pod carries all of its tunnels"
        );
        drop(proxy);
        within("sim.shutdown", sim.shutdown()).await;
    }
}

/// A Role with only `get` on pods/portforward works over WebSocket up to 1.34.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_only_role_uses_websocket_on_1_31() {
    let sim = cluster_at(31).await;
    let proxy = start_proxy(&sim, &["--context", "sim-portforward-get"]).await;
    works(&proxy, "get-only-1.31").await;
    assert!(sim.portforward_count() > 0);
    assert_eq!(sim.spdy_upgrade_count(), 0, "SPDY was never needed");
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

/// `--portforward spdy` never tries WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_spdy() {
    let sim = cluster_at(33).await;
    let proxy = start_proxy(&sim, &["--portforward", "spdy"]).await;
    works(&proxy, "explicit-spdy").await;
    assert_eq!(sim.portforward_count(), 0);
    assert_eq!(sim.spdy_upgrade_count(), 2);
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

/// Both protocols refused: one line naming both verbs and deploy/rbac.yaml, quoting both
/// refusals. On 1.35 a get-only Role is refused both ways too (WebSocket needs `create`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_both_ways_names_both_verbs() {
    let sim = cluster_at(35).await;
    let kc = sim.kubeconfig_path().to_str().unwrap().to_owned();
    for context in ["sim-no-portforward", "sim-portforward-get"] {
        let (status, err) = proxy_fails(&[
            "--kubeconfig",
            &kc,
            "--context",
            context,
            "--listen",
            "127.0.0.1:0",
        ])
        .await;
        assert!(!status.success(), "{context}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{context}: one line:\n{err}");
        assert!(
            err.contains("needs `get` and `create` on `pods/portforward`"),
            "{context}: {err}"
        );
        assert!(err.contains("deploy/rbac.yaml"), "{context}: {err}");
        assert!(err.contains("WebSocket (GET)"), "{context}: {err}");
        assert!(
            err.contains(&format!(
                "SPDY (POST): pods \"etcd-0\" is forbidden: User \"{context}\" cannot create"
            )) || err.contains(&format!(
                "SPDY (POST): pods \"etcd-1\" is forbidden: User \"{context}\" cannot create"
            )),
            "{context}: {err}"
        );
    }
    within("sim.shutdown", sim.shutdown()).await;
}

/// SPDY connections cut every 500 ms (the API server or kubelet dropping them): reads never
/// fail, and each cut is followed by a fresh upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spdy_connections_cut_repeatedly_fail_no_reads() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::time::Instant;

    let sim = cluster_at(33).await;
    let proxy = start_proxy(&sim, &["--portforward", "spdy"]).await;
    let mut c = within(
        "Client::connect",
        etcd_client::Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect");
    within("c.put", c.put("cut", "v", None)).await.expect("put");
    let (reads, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let until = Instant::now() + Duration::from_secs(4);
    let reader = {
        let (reads, failed) = (reads.clone(), failed.clone());
        tokio::spawn(async move {
            while Instant::now() < until {
                let get = tokio::time::timeout(Duration::from_secs(10), c.get("cut", None)).await;
                reads.fetch_add(1, Ordering::Relaxed);
                if !matches!(&get, Ok(Ok(r)) if r.kvs().first().map(|kv| kv.value()) == Some(b"v"))
                {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let before = sim.spdy_upgrade_count();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sim.cut_tunnels();
    }
    within("reader", reader).await.expect("reader");
    let (reads, failed) = (
        reads.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "SPDY connections cut every 500 ms: {reads} reads, {failed} failed, {} upgrades",
        sim.spdy_upgrade_count() - before
    );
    assert!(reads > 50, "{reads}");
    assert_eq!(failed, 0);
    assert!(
        sim.spdy_upgrade_count() > before,
        "connections were re-opened"
    );
    assert_eq!(sim.portforward_count(), 0);
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

/// The kubelet's streaming idle timeout counts every SPDY frame: health checks more frequent
/// than it keep the pod's one connection open; when the kubelet closes an idle connection,
/// the next request upgrades a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spdy_and_the_kubelet_idle_timeout() {
    use std::time::Duration;
    use tokio::time::Instant;

    let sim = cluster_at(33).await;
    sim.set_kubelet_idle_timeout(Some(Duration::from_millis(1500)));
    let proxy = start_proxy(&sim, &["--portforward", "spdy", "--keepalive", "300ms"]).await;
    ctl3(&proxy.cluster_addr, &["put", "idle", "1"]).await;
    let upgrades = sim.spdy_upgrade_count();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        sim.idle_closures(),
        0,
        "keepalive shorter than the idle timeout"
    );
    ctl3(&proxy.cluster_addr, &["get", "idle"]).await;
    assert_eq!(sim.spdy_upgrade_count(), upgrades, "no new upgrade");
    drop(proxy);

    // Health checks every 3 s, pings every 5 s, idle timeout 1 s: the kubelet closes it.
    sim.set_kubelet_idle_timeout(Some(Duration::from_secs(1)));
    let proxy = start_proxy(&sim, &["--portforward", "spdy", "--keepalive", "3s"]).await;
    let closed_before = sim.idle_closures();
    let deadline = Instant::now() + crate::support::DEADLINE;
    while sim.idle_closures() == closed_before {
        assert!(
            Instant::now() < deadline,
            "no SPDY connection was closed as idle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let upgrades = sim.spdy_upgrade_count();
    assert_eq!(
        ctl3(&proxy.cluster_addr, &["get", "idle", "--print-value-only"])
            .await
            .stdout
            .trim(),
        "1"
    );
    // A new connection replaces the closed one (for this request or the next health check).
    while sim.spdy_upgrade_count() == upgrades {
        assert!(
            Instant::now() < deadline,
            "no new SPDY connection was upgraded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}
