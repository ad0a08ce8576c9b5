use std::path::{Path, PathBuf};

use crate::support::{cluster, etcdctl, pki, run, start_proxy, start_proxy_env, within};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_auto_serves_etcdctl_v3_and_v2_with_https_member_urls() {
    let sim = cluster(3).await;
    let home = tempfile::tempdir().unwrap();
    let env = [("XDG_CONFIG_HOME", s(home.path()))];
    let proxy = start_proxy_env(&sim, &["--tls-auto"], &env).await;
    let ca = home.path().join("etcd-proxy/tls/ca.crt");
    assert!(ca.exists(), "CA written to the config dir");
    assert!(
        proxy.cluster_url.starts_with("https://127.0.0.1:"),
        "{}",
        proxy.summary
    );
    assert!(
        proxy.members.iter().all(|(_, u)| u.starts_with("https://")),
        "{}",
        proxy.summary
    );

    let ep = proxy.cluster_url.as_str();
    let v3 = |args: &[&str]| {
        let mut all = vec!["--endpoints", ep, "--cacert", s(&ca)];
        all.extend_from_slice(args);
        etcdctl(3, &all)
    };
    run(v3(&["put", "tls", "yes"]), "").await.ok();
    assert_eq!(
        run(v3(&["get", "tls", "--print-value-only"]), "")
            .await
            .ok()
            .stdout
            .trim(),
        "yes"
    );
    // A value far over h2's copy threshold and frame size crosses TLS intact, both ways.
    let big: String = (0..100_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    run(v3(&["put", "tls-big"]), &big).await.ok();
    let got = run(v3(&["get", "tls-big", "--print-value-only"]), "")
        .await
        .ok()
        .stdout;
    assert_eq!(got.trim_end_matches('\n'), big, "100 kB value through TLS");
    let list = run(v3(&["member", "list"]), "").await.ok().stdout;
    for (_, url) in &proxy.members {
        assert!(list.contains(url.as_str()), "{list}");
    }
    let status = run(v3(&["endpoint", "status", "--cluster", "-w", "json"]), "")
        .await
        .ok()
        .stdout;
    let rows: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 3, "{status}");

    // v2 syncs to the https member URLs and trusts them with the same CA.
    let v2 = run(
        etcdctl(
            2,
            &["--endpoints", ep, "--ca-file", s(&ca), "set", "/t", "1"],
        ),
        "",
    )
    .await
    .ok();
    assert_eq!(v2.stdout.trim(), "1");
    let ls = run(
        etcdctl(2, &["--endpoints", ep, "--ca-file", s(&ca), "ls", "/"]),
        "",
    )
    .await
    .ok();
    assert!(ls.stdout.contains("/t"), "{}", ls.stdout);

    // Without the CA the client refuses the certificate.
    let untrusted = run(
        etcdctl(
            3,
            &["--endpoints", ep, "--dial-timeout", "2s", "get", "tls"],
        ),
        "",
    )
    .await;
    assert!(!untrusted.status.success());
    drop(proxy);

    // A second run reuses the same CA.
    let before = std::fs::read(&ca).unwrap();
    let again = start_proxy_env(&sim, &["--tls-auto"], &env).await;
    assert_eq!(std::fs::read(&ca).unwrap(), before);
    drop(again);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_with_client_ca() {
    let sim = cluster(1).await;
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path(), &["127.0.0.1", "localhost"]);
    let [ca, cert, key, client_cert, client_key] = [
        p.ca,
        p.server_cert,
        p.server_key,
        p.client_cert,
        p.client_key,
    ]
    .map(PathBuf::from);
    let args = [
        "--tls-cert",
        s(&cert),
        "--tls-key",
        s(&key),
        "--client-ca",
        s(&ca),
    ];
    let proxy = start_proxy(&sim, &args).await;
    let ep = proxy.cluster_url.as_str();

    let with = etcdctl(
        3,
        &[
            "--endpoints",
            ep,
            "--cacert",
            s(&ca),
            "--cert",
            s(&client_cert),
            "--key",
            s(&client_key),
            "put",
            "m",
            "1",
        ],
    );
    run(with, "").await.ok();
    let without = etcdctl(
        3,
        &[
            "--endpoints",
            ep,
            "--cacert",
            s(&ca),
            "--dial-timeout",
            "2s",
            "--command-timeout",
            "3s",
            "get",
            "m",
        ],
    );
    let out = run(without, "").await;
    assert!(
        !out.status.success(),
        "no client certificate must be refused: {}",
        out.stdout
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_flag_points_etcdctl_at_the_proxy() {
    let sim = cluster(1).await;
    let home = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", crate::support::free_port());
    // Only the cluster port is fixed (--env needs one); member ports are picked free.
    let flags = [
        "--tls-auto",
        "--listen",
        listen.as_str(),
        "--member-ports",
        "0",
    ];
    let mut cmd = crate::support::proxy_command(&[&["--env"][..], &flags[..]].concat());
    cmd.env("XDG_CONFIG_HOME", home.path());
    let out = run(cmd, "").await.ok().stdout;
    let vars: Vec<(String, String)> = out
        .lines()
        .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect();
    assert!(
        vars.iter()
            .any(|(k, v)| k == "ETCDCTL_ENDPOINTS" && *v == format!("https://{listen}")),
        "{out}"
    );
    assert!(vars.iter().any(|(k, _)| k == "ETCDCTL_CACERT"), "{out}");

    let proxy = start_proxy_env(&sim, &flags, &[("XDG_CONFIG_HOME", s(home.path()))]).await;
    let mut put = tokio::process::Command::new("etcdctl");
    put.envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args(["put", "env", "ok"]);
    run(put, "").await.ok();
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}
