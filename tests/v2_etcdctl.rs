use crate::support::{cluster, ctl2, start_proxy, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_commands_work_without_no_sync() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &[]).await;
    let ep = proxy.cluster_url.as_str();

    // etcdctl v2 syncs its endpoints from /v2/members first; without the rewrite it would jump
    // to http://etcd-N.etcd.etcd.svc.cluster.local:2379 and fail with "no such host".
    ctl2(ep, &["set", "/a", "1"]).await;
    assert_eq!(ctl2(ep, &["get", "/a"]).await.stdout.trim(), "1");
    ctl2(ep, &["mkdir", "/dir"]).await;
    let ls = ctl2(ep, &["ls", "/"]).await.stdout;
    let mut entries: Vec<&str> = ls.lines().collect();
    entries.sort_unstable();
    assert_eq!(entries, ["/a", "/dir"]);

    let members = ctl2(ep, &["member", "list"]).await.stdout;
    assert_eq!(members.lines().count(), 3, "{members}");
    for (name, url) in &proxy.members {
        let line = members
            .lines()
            .find(|l| l.contains(&format!("name={name} ")))
            .unwrap_or_else(|| panic!("{members}"));
        assert!(line.contains(&format!("clientURLs={url} ")), "{line}");
    }
    assert!(!members.contains("svc.cluster.local"), "{members}");

    // cluster-health GETs <clientURL>/health of every member directly.
    let health = ctl2(ep, &["cluster-health"]).await.stdout;
    assert!(health.contains("cluster is healthy"), "{health}");
    assert_eq!(
        health
            .matches("is healthy: got healthy result from")
            .count(),
        3,
        "{health}"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}
