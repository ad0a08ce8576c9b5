use crate::support::{ctl3, standalone_etcd, start_proxy_args};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_mode_serves_real_etcd_without_kubernetes() {
    let etcd = standalone_etcd(&[]).await;
    let proxy = start_proxy_args(&["--endpoints", &etcd.url, "--listen", "127.0.0.1:0"]).await;
    assert!(
        proxy
            .summary
            .contains("from --endpoints, connecting directly"),
        "{}",
        proxy.summary
    );
    let ep = proxy.cluster_addr.as_str();
    ctl3(ep, &["put", "gw", "1"]).await;
    assert_eq!(
        ctl3(ep, &["get", "gw", "--print-value-only"])
            .await
            .stdout
            .trim(),
        "1"
    );
    // The member advertises its own URL; the proxy maps it by host:port to the member endpoint.
    let list = ctl3(ep, &["member", "list"]).await.stdout;
    assert!(list.contains(&proxy.members[0].1), "{list}");
    assert!(!list.contains(&etcd.url), "{list}");
    let status = ctl3(ep, &["endpoint", "status", "--cluster"]).await.stdout;
    assert!(status.contains(&proxy.members[0].1), "{status}");
    drop(proxy);
    drop(etcd);
}
