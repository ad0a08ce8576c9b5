use std::path::Path;

use crate::clients::http1;
use crate::support::{cluster, ctl3, etcdctl, run, start_proxy, within};

/// A users file with alice (password "wonderland"), bcrypt at the lowest cost for speed.
fn users_file(dir: &Path) -> String {
    let path = dir.join("users");
    let hash = bcrypt::hash("wonderland", 4).unwrap();
    std::fs::write(&path, format!("# etcd-proxy users\nalice:{hash}\n")).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_user_v2_username_and_gateway_tokens() {
    let sim = cluster(1).await;
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let proxy = start_proxy(&sim, &["--auth-file", &users]).await;
    let ep = proxy.cluster_addr.as_str();

    // Right password: etcdctl logs in (Authenticate answered by the proxy) and its calls carry
    // the proxy's token. etcd (auth off) still checks any token it receives and would reject
    // ours with "invalid auth token": the put succeeding shows the token was removed.
    ctl3(ep, &["--user", "alice:wonderland", "put", "secret", "42"]).await;
    let got = ctl3(
        ep,
        &[
            "--user",
            "alice:wonderland",
            "get",
            "secret",
            "--print-value-only",
        ],
    )
    .await;
    assert_eq!(got.stdout.trim(), "42");

    let wrong = run(
        etcdctl(
            3,
            &["--endpoints", ep, "--user", "alice:nope", "get", "secret"],
        ),
        "",
    )
    .await;
    assert!(!wrong.status.success());
    assert!(
        wrong
            .stderr
            .contains("authentication failed, invalid user ID or password"),
        "{}",
        wrong.stderr
    );
    let missing = run(etcdctl(3, &["--endpoints", ep, "get", "secret"]), "").await;
    assert!(!missing.status.success());
    assert!(
        missing.stderr.contains("user name is empty"),
        "{}",
        missing.stderr
    );
    // MemberList stays open (etcdctl --cluster asks it without credentials).
    ctl3(ep, &["member", "list"]).await;

    // v2: HTTP Basic on every request, including the endpoint sync.
    let url = proxy.cluster_url.as_str();
    let v2 = run(
        etcdctl(
            2,
            &[
                "--endpoints",
                url,
                "--username",
                "alice:wonderland",
                "set",
                "/v2k",
                "1",
            ],
        ),
        "",
    )
    .await
    .ok();
    assert_eq!(v2.stdout.trim(), "1");
    let v2_wrong = run(
        etcdctl(
            2,
            &[
                "--endpoints",
                url,
                "--no-sync",
                "--username",
                "alice:nope",
                "get",
                "/v2k",
            ],
        ),
        "",
    )
    .await;
    assert!(!v2_wrong.status.success(), "{}", v2_wrong.stdout);

    // JSON gateway: authenticate, then the raw token in Authorization.
    let login = http1(
        ep,
        "POST",
        "/v3/auth/authenticate",
        r#"{"name":"alice","password":"wonderland"}"#,
    )
    .await;
    assert!(login.starts_with("HTTP/1.1 200"), "{login}");
    let body = login.split("\r\n\r\n").nth(1).unwrap_or_default();
    let token = serde_json::from_str::<serde_json::Value>(body).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let put = authed(ep, "/v3/kv/put", r#"{"key":"Zw==","value":"MQ=="}"#, &token).await;
    assert!(put.starts_with("HTTP/1.1 200"), "{put}");
    let anonymous = http1(ep, "POST", "/v3/kv/range", r#"{"key":"Zw=="}"#).await;
    assert!(anonymous.starts_with("HTTP/1.1 401"), "{anonymous}");
    let forged = authed(ep, "/v3/kv/range", r#"{"key":"Zw=="}"#, "etcd-proxy.0000").await;
    assert!(
        forged.starts_with("HTTP/1.1 401") && forged.contains("invalid auth token"),
        "{forged}"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

async fn authed(addr: &str, path: &str, body: &str, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = within(
        "tokio::net::TcpStream::connect",
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    within("s.write_all", s.write_all(req.as_bytes()))
        .await
        .unwrap();
    let mut out = Vec::new();
    within("s.read_to_end", s.read_to_end(&mut out))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_passwords_block_the_client_for_a_while() {
    let sim = cluster(1).await;
    let dir = tempfile::tempdir().unwrap();
    let users = users_file(dir.path());
    let proxy = start_proxy(&sim, &["--auth-file", &users]).await;
    let ep = proxy.cluster_addr.as_str();
    for _ in 0..5 {
        let out = run(
            etcdctl(3, &["--endpoints", ep, "--user", "alice:guess", "get", "x"]),
            "",
        )
        .await;
        assert!(!out.status.success());
    }
    let blocked = run(
        etcdctl(
            3,
            &["--endpoints", ep, "--user", "alice:wonderland", "get", "x"],
        ),
        "",
    )
    .await;
    assert!(
        !blocked.status.success(),
        "the right password is refused while blocked"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_auth_file_etcds_own_auth_passes_through() {
    let sim = cluster(1).await;
    let direct = sim.member_client_url("etcd-0").unwrap();
    for args in [&["user", "add", "root:rootpw"][..], &["auth", "enable"][..]] {
        let mut all = vec!["--endpoints", direct.as_str()];
        all.extend_from_slice(args);
        run(etcdctl(3, &all), "").await.ok();
    }
    let proxy = start_proxy(&sim, &[]).await;
    let ep = proxy.cluster_addr.as_str();
    ctl3(ep, &["--user", "root:rootpw", "put", "etcd-auth", "ok"]).await;
    let anonymous = run(etcdctl(3, &["--endpoints", ep, "get", "etcd-auth"]), "").await;
    assert!(
        !anonymous.status.success(),
        "etcd itself refuses: {}",
        anonymous.stdout
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}
