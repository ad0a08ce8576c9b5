use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{
    cluster, ctl3, missing_path, proxy_fails, start_proxy, within, within_for, DEADLINE,
    START_DEADLINE,
};

/// Exactly one line on stderr, containing `needle`, and a non-zero exit.
fn one_clear_line(status: std::process::ExitStatus, stderr: &str, needle: &str) {
    assert!(!status.success(), "must fail: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line, got:\n{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn usage_and_kubeconfig_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (status, err) = proxy_fails(&["--no-such-flag"]).await;
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--no-such-flag"), "{err}");

    let missing = missing_path(dir.path());
    let (status, err) = proxy_fails(&["--kubeconfig", &missing]).await;
    one_clear_line(
        status,
        &err,
        "not found: pass --kubeconfig PATH or set KUBECONFIG",
    );

    let (status, err) = proxy_fails(&["--listen", "0.0.0.0:4001"]).await;
    one_clear_line(
        status,
        &err,
        "refusing to listen on 0.0.0.0:4001 without TLS and authentication",
    );

    // Not YAML a kubeconfig can be: one line, and none of the file (the YAML parser's own
    // message shows an excerpt, which in a kubeconfig may be a token).
    let broken = dir.path().join("broken-kubeconfig");
    std::fs::write(
        &broken,
        "apiVersion: v1\nusers:\n- name: me\n  user:\n    token: s3cret-t0ken\n  - oops: [\n",
    )
    .unwrap();
    let (status, err) = proxy_fails(&["--kubeconfig", broken.to_str().unwrap()]).await;
    one_clear_line(status, &err, "cannot load kubeconfig: ");
    assert!(!err.contains("s3cret-t0ken"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_errors_are_one_clear_line() {
    let sim = cluster(1).await;
    let kc = sim.kubeconfig_path().to_str().unwrap().to_owned();
    let base = ["--kubeconfig", kc.as_str(), "--listen", "127.0.0.1:0"];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        proxy_fails(&refs).await
    };

    let (status, err) = run(with(&["--context", "nope"])).await;
    one_clear_line(
        status,
        &err,
        "context \"nope\" not found in the kubeconfig (available: ",
    );

    let (status, err) = run(with(&["-n", "empty"])).await;
    one_clear_line(
        status,
        &err,
        "no etcd pods in namespace empty (tried statefulset etcd, pods app=etcd",
    );

    let (status, err) = run(with(&["--statefulset", "other"])).await;
    one_clear_line(status, &err, "statefulset \"other\" not found in namespace");

    let (status, err) = run(with(&["--context", "sim-no-list"])).await;
    one_clear_line(status, &err, "needs get/list/watch on");

    let (status, err) = run(with(&["--context", "sim-no-portforward"])).await;
    one_clear_line(
        status,
        &err,
        "needs `get` and `create` on `pods/portforward`",
    );
    assert!(err.contains("deploy/rbac.yaml"), "{err}");
    // Both refusals are quoted: the WebSocket GET and the SPDY POST.
    assert!(
        err.contains("cannot get resource \"pods/portforward\""),
        "{err}"
    );
    assert!(
        err.contains("cannot create resource \"pods/portforward\""),
        "{err}"
    );

    // A busy local port.
    let busy = within("TcpListener::bind", TcpListener::bind("127.0.0.1:0"))
        .await
        .unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let args = vec![
        "--kubeconfig".to_string(),
        kc.clone(),
        "--listen".into(),
        addr.clone(),
    ];
    let (status, err) = run(args).await;
    one_clear_line(status, &err, &format!("{addr} is already in use"));
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_not_listening_on_the_pod_loopback_is_named() {
    let sim = within_for(
        START_DEADLINE,
        "etcd_proxy_sim::SimCluster::start",
        etcd_proxy_sim::SimCluster::start(etcd_proxy_sim::SimConfig {
            members: 1,
            loopback_listen: false,
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let kc = sim.kubeconfig_path().to_str().unwrap().to_owned();
    let (status, err) = proxy_fails(&["--kubeconfig", &kc, "--listen", "127.0.0.1:0"]).await;
    one_clear_line(
        status,
        &err,
        "nothing is listening on localhost:2379 inside pod etcd-0: etcd is down there, or it does not listen on the pod's loopback",
    );
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_client_frames_end_only_that_connection() {
    let sim = cluster(1).await;
    let proxy = start_proxy(&sim, &[]).await;
    let ep = proxy.cluster_addr.clone();

    // A good client connection stays open across the bad ones.
    let mut client = within(
        "etcd_client::Client::connect",
        etcd_client::Client::connect([ep.as_str()], None),
    )
    .await
    .unwrap();
    within("client.put", client.put("before", "1", None))
        .await
        .unwrap();

    for garbage in [
        // HTTP/2 preface followed by a frame header claiming a 16 MiB DATA frame on stream 0.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x00\x00\x00\x00\x00\x00junk".to_vec(),
        // Neither HTTP/1 nor HTTP/2.
        b"\x16\x03\x01\x02\x00garbage that is not http\r\n\r\n".to_vec(),
        // A truncated HTTP/1 request line, then EOF.
        b"GET /v2/keys".to_vec(),
    ] {
        let mut s = within("TcpStream::connect", TcpStream::connect(&ep))
            .await
            .unwrap();
        within("s.write_all", s.write_all(&garbage)).await.unwrap();
        let _ = within("s.shutdown", s.shutdown()).await;
        let mut buf = Vec::new();
        let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "the proxy must close a malformed connection, not hang"
        );
    }

    within("client.put", client.put("after", "2", None))
        .await
        .expect("the good connection still works");
    assert_eq!(
        ctl3(&ep, &["get", "after", "--print-value-only"])
            .await
            .stdout
            .trim(),
        "2"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}
