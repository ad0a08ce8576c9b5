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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_with_client_certificates_against_real_etcd() {
    use crate::support::{etcdctl, free_port, proxy_fails, run, DEADLINE};
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    // The server certificate names only etcd-0.etcd.test.svc, never 127.0.0.1.
    let crate::support::Pki {
        ca,
        server_cert: cert,
        server_key: key,
        client_cert,
        client_key,
    } = crate::support::pki(dir.path(), &["etcd-0.etcd.test.svc"]);
    let (client, peer) = (free_port(), free_port());
    let url = format!("https://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut etcd =
        crate::support::etcd_command(&dir.path().join("data"), "etcd-0", &url, &peer_url);
    etcd.args([
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--client-cert-auth",
        "--trusted-ca-file",
        &ca,
    ]);
    let _etcd = etcd.spawn().expect("spawn etcd");
    // Ready once it answers a client-certificate request (name check off for this probe only).
    let ready = tokio::time::timeout(DEADLINE, async {
        loop {
            let probe = etcdctl(
                3,
                &[
                    "--endpoints",
                    &url,
                    "--cacert",
                    &ca,
                    "--cert",
                    &client_cert,
                    "--key",
                    &client_key,
                    "--insecure-skip-tls-verify",
                    "endpoint",
                    "health",
                ],
            );
            if run(probe, "").await.status.success() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(ready.is_ok(), "TLS etcd did not start");

    let base = [
        "--endpoints",
        url.as_str(),
        "--listen",
        "127.0.0.1:0",
        "--etcd-cacert",
        ca.as_str(),
    ];
    let mut args = base.to_vec();
    args.extend([
        "--etcd-cert",
        &client_cert,
        "--etcd-key",
        &client_key,
        "--etcd-server-name",
        "etcd-0.etcd.test.svc",
    ]);
    let proxy = start_proxy_args(&args).await;
    ctl3(&proxy.cluster_addr, &["put", "tls-upstream", "1"]).await;
    assert_eq!(
        ctl3(
            &proxy.cluster_addr,
            &["get", "tls-upstream", "--print-value-only"]
        )
        .await
        .stdout
        .trim(),
        "1"
    );
    let health = crate::clients::http1(&proxy.cluster_addr, "GET", "/health", "").await;
    assert!(
        health.contains("\"health\":\"true\""),
        "HTTP/1.1 over upstream TLS: {health}"
    );
    drop(proxy);

    // Without a client certificate etcd refuses the connection: a clear start-up error.
    let (status, err) =
        proxy_fails(&[&base[..], &["--etcd-server-name", "etcd-0.etcd.test.svc"]].concat()).await;
    assert!(!status.success(), "{err}");
    assert!(err.contains("no etcd member is reachable"), "{err}");
    // The certificate does not name 127.0.0.1: without the right server name, verification fails.
    let mut wrong = base.to_vec();
    wrong.extend(["--etcd-cert", &client_cert, "--etcd-key", &client_key]);
    let (status, err) = proxy_fails(&wrong).await;
    assert!(!status.success());
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}
