//! `--direct`, the in-cluster gateway's mode: pod discovery through the pod's service account,
//! connections straight to the pod IPs. The simulator gives its pods reachable loopback IPs
//! (each member serving on its pod IP and container port, like a container) and a
//! service-account directory for the Role of deploy/gateway.yaml, which has no
//! `pods/portforward`: a tunnel would be refused.

use std::time::Duration;

use etcd_proxy_sim::{PodNetwork, SimCluster, SimConfig};

use crate::support::{ctl3, proxy_command, spawn_and_read_summary, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_in_a_pod_dials_pod_ips_and_follows_a_restarted_pod() {
    let sim = within(
        "the simulated cluster",
        SimCluster::start(SimConfig {
            pod_network: PodNetwork::Loopback,
            ..SimConfig::default()
        }),
    )
    .await
    .expect("simulated cluster");
    let api = sim.api_url();
    let (host, port) = api
        .trim_start_matches("https://")
        .rsplit_once(':')
        .expect("host:port");
    let home = tempfile::tempdir().unwrap();
    let sa_dir = sim.service_account_dir();
    let mut cmd = proxy_command(&[
        "--direct",
        "--statefulset",
        "etcd",
        "--listen",
        "127.0.0.1:0",
    ]);
    cmd.env("KUBERNETES_SERVICE_HOST", host)
        .env("KUBERNETES_SERVICE_PORT", port)
        .env("ETCD_PROXY_SERVICEACCOUNT_DIR", &sa_dir)
        // No kubeconfig anywhere: as in a pod.
        .env("HOME", home.path());
    let proxy = spawn_and_read_summary(cmd).await;
    assert!(proxy.summary.contains("in-cluster"), "{}", proxy.summary);
    let ep = proxy.cluster_addr.as_str();

    ctl3(ep, &["put", "direct", "1"]).await;
    let got = ctl3(ep, &["get", "direct", "--print-value-only"]).await;
    assert_eq!(got.stdout.trim(), "1");
    let list = ctl3(ep, &["member", "list"]).await.stdout;
    for (_, url) in &proxy.members {
        assert!(list.contains(url.as_str()), "{list}");
    }
    let status = ctl3(ep, &["endpoint", "status", "--cluster"]).await.stdout;
    assert_eq!(status.lines().count(), 3, "{status}");
    assert_eq!(sim.portforward_count(), 0, "no tunnel in direct mode");

    // etcd-1's pod is re-created with a new IP; its member endpoint follows.
    let old_ip = sim.pod_ip("etcd-1").unwrap();
    within("restarting etcd-1", sim.restart_pod("etcd-1"))
        .await
        .unwrap();
    let new_ip = sim.pod_ip("etcd-1").unwrap();
    assert_ne!(old_ip, new_ip);
    let member = proxy
        .members
        .iter()
        .find(|(n, _)| n == "etcd-1")
        .map(|(_, u)| u.trim_start_matches("http://").to_owned())
        .expect("etcd-1's endpoint");
    within("etcd-1 through its new IP", async {
        loop {
            let out = crate::support::run(
                crate::support::etcdctl(
                    3,
                    &[
                        "--endpoints",
                        &member,
                        "--command-timeout",
                        "2s",
                        "get",
                        "direct",
                        "--print-value-only",
                    ],
                ),
                "",
            )
            .await;
            if out.status.success() && out.stdout.trim() == "1" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    drop(proxy);
    within("simulator shutdown", sim.shutdown()).await;
}
