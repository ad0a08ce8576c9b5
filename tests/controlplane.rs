//! Control-plane etcd as kubeadm deploys it: static pods `etcd-<node>` in `kube-system`
//! (found by `component=etcd`), members named after their nodes and advertising
//! `https://<node-ip>:2379`, TLS with client-certificate auth. etcdctl v3 goes through the
//! proxy with the kubeadm-style client certificate; the member URLs it learns are the
//! proxy's. Through port-forward tunnels (a laptop) and with `--direct` (inside the cluster
//! network, dialling the node IPs).

use std::collections::BTreeSet;

use etcd_proxy_sim::{PodNetwork, SimCluster, SimConfig};

use crate::support::{
    ctl3, etcdctl, pki, proxy_fails, run, start_proxy, within, within_for, START_DEADLINE,
};

async fn control_plane(members: usize) -> SimCluster {
    within_for(
        START_DEADLINE,
        "the simulated control plane starts",
        SimCluster::start(SimConfig::control_plane(members)),
    )
    .await
    .expect("simulated control plane")
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_through_the_proxy_to_kubeadm_etcd() {
    let sim = control_plane(3).await;
    let pki = sim.etcd_pki().expect("kubeadm PKI").clone();
    let proxy = start_proxy(
        &sim,
        &[
            "--context",
            "sim",
            "-n",
            "kube-system",
            "--etcd-cacert",
            s(&pki.ca_cert),
            "--etcd-cert",
            s(&pki.apiserver_client_cert),
            "--etcd-key",
            s(&pki.apiserver_client_key),
        ],
    )
    .await;
    assert!(
        proxy.summary.contains("component=etcd") && proxy.summary.contains("kube-system"),
        "auto-detected the static pods:\n{}",
        proxy.summary
    );
    let pods: Vec<&str> = proxy.members.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        pods,
        ["etcd-cp-1", "etcd-cp-2", "etcd-cp-3"],
        "{}",
        proxy.summary
    );
    assert!(
        !proxy.summary.contains("unreachable"),
        "every member answered over TLS:\n{}",
        proxy.summary
    );

    let ep = proxy.cluster_addr.as_str();
    ctl3(ep, &["put", "cp-key", "v1"]).await;
    let got = ctl3(ep, &["get", "cp-key", "--print-value-only"]).await;
    assert_eq!(got.stdout.trim(), "v1");

    // member list: members named after nodes, each advertising its local endpoint instead of
    // https://<node-ip>:2379.
    let list = ctl3(ep, &["member", "list", "-w", "json"]).await.stdout;
    let list: serde_json::Value = serde_json::from_str(&list).expect("member list JSON");
    let members = list["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{list}");
    for m in members {
        let name = m["name"].as_str().expect("name");
        let pod = format!("etcd-{name}");
        let local = proxy
            .members
            .iter()
            .find(|(p, _)| *p == pod)
            .map(|(_, u)| u.clone())
            .unwrap_or_else(|| panic!("member {name} has no pod {pod}"));
        assert_eq!(m["clientURLs"], serde_json::json!([local]), "{list}");
    }
    assert!(!list.to_string().contains("10.0.0."), "{list}");

    // endpoint status --cluster: etcdctl syncs to the rewritten URLs and asks each member,
    // one row per member, all through the proxy.
    let status = ctl3(ep, &["endpoint", "status", "--cluster", "-w", "json"])
        .await
        .stdout;
    let rows: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let endpoints: BTreeSet<String> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["Endpoint"].as_str().expect("Endpoint").to_owned())
        .collect();
    let locals: BTreeSet<String> = proxy.member_urls().into_iter().collect();
    assert_eq!(endpoints, locals, "{status}");
    let ids: BTreeSet<u64> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            r["Status"]["header"]["member_id"]
                .as_u64()
                .expect("member_id")
        })
        .collect();
    assert_eq!(ids.len(), 3, "three distinct members: {status}");

    // Each member endpoint reaches its own member.
    for (pod, url) in &proxy.members {
        let addr = url.trim_start_matches("http://");
        ctl3(addr, &["put", &format!("via-{pod}"), "1"]).await;
    }

    // A restarted static pod keeps its node IP; its endpoint comes back through new tunnels.
    within_for(
        START_DEADLINE,
        "restart etcd-cp-2",
        sim.restart_pod("etcd-cp-2"),
    )
    .await
    .expect("restart");
    let cp2 = proxy.members[1].1.trim_start_matches("http://").to_owned();
    let back = within("etcd-cp-2 answers again", async {
        loop {
            let out = run(
                etcdctl(
                    3,
                    &[
                        "--endpoints",
                        &cp2,
                        "--dial-timeout",
                        "2s",
                        "put",
                        "after",
                        "1",
                    ],
                ),
                "",
            )
            .await;
            if out.status.success() {
                return out;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(back.stdout.contains("OK"), "{}", back.stdout);
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_foreign_client_certificates_are_one_clear_line() {
    let sim = control_plane(1).await;
    let pki_files = sim.etcd_pki().expect("kubeadm PKI").clone();
    let kubeconfig = s(sim.kubeconfig_path()).to_owned();
    let base = [
        "--kubeconfig",
        kubeconfig.as_str(),
        "--listen",
        "127.0.0.1:0",
        "--context",
        "sim",
        "-n",
        "kube-system",
    ];
    let fails = |extra: Vec<String>| {
        let mut args: Vec<String> = base.iter().map(|a| a.to_string()).collect();
        args.extend(extra);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (status, err) = proxy_fails(&args).await;
            assert!(!status.success(), "{err}");
            assert_eq!(err.trim().lines().count(), 1, "one line, got:\n{err}");
            err
        }
    };
    let ca = s(&pki_files.ca_cert).to_owned();

    // No TLS flags at all: etcd hangs up on plain HTTP.
    let err = fails(vec![]).await;
    assert!(err.contains("if etcd serves TLS"), "{err}");

    // The CA but no client certificate: etcd ends the handshake.
    let err = fails(vec!["--etcd-cacert".into(), ca.clone()]).await;
    assert!(
        err.contains("etcd requires a client certificate")
            && err.contains("--etcd-cert and --etcd-key"),
        "{err}"
    );

    // A client certificate from another CA.
    let dir = tempfile::tempdir().unwrap();
    let other = pki(dir.path(), &["localhost"]);
    let err = fails(vec![
        "--etcd-cacert".into(),
        ca.clone(),
        "--etcd-cert".into(),
        other.client_cert,
        "--etcd-key".into(),
        other.client_key,
    ])
    .await;
    assert!(err.contains("rejected the client certificate"), "{err}");
    within("sim.shutdown", sim.shutdown()).await;
}

/// `--direct` from inside the cluster network: the proxy dials each member at its pod IP,
/// which is the node IP, and verifies the certificate against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_dials_node_ips_over_tls() {
    let sim = within_for(
        START_DEADLINE,
        "the simulated control plane starts",
        SimCluster::start(SimConfig {
            pod_network: PodNetwork::Loopback,
            ..SimConfig::control_plane(2)
        }),
    )
    .await
    .expect("simulated control plane");
    let pki = sim.etcd_pki().expect("kubeadm PKI").clone();
    let node_ip = sim.pod_ip("etcd-cp-1").expect("pod IP");
    assert!(node_ip.starts_with("127."), "{node_ip}");
    assert_eq!(
        sim.advertised_client_url("etcd-cp-1"),
        Some(format!("https://{node_ip}:2379"))
    );
    let proxy = start_proxy(
        &sim,
        &[
            "--direct",
            "-n",
            "kube-system",
            "--etcd-cacert",
            s(&pki.ca_cert),
            "--etcd-cert",
            s(&pki.healthcheck_client_cert),
            "--etcd-key",
            s(&pki.healthcheck_client_key),
        ],
    )
    .await;
    let ep = proxy.cluster_addr.as_str();
    ctl3(ep, &["put", "direct-cp", "1"]).await;
    let status = ctl3(ep, &["endpoint", "status", "--cluster"]).await.stdout;
    assert_eq!(status.lines().count(), 2, "{status}");
    for (_, url) in &proxy.members {
        assert!(status.contains(url.as_str()), "{status}");
    }
    assert_eq!(sim.portforward_count(), 0, "no tunnel in direct mode");
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}
