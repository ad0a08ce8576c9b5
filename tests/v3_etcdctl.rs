use std::collections::BTreeSet;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{cluster, ctl3, etcdctl, run, start_proxy, within, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_txn_lease_and_watch_through_the_cluster_endpoint() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &[]).await;
    let ep = proxy.cluster_addr.as_str();

    ctl3(ep, &["put", "foo", "bar"]).await;
    assert_eq!(
        ctl3(ep, &["get", "foo", "--print-value-only"])
            .await
            .stdout
            .trim(),
        "bar"
    );

    // A warm `etcdctl get` (a new process, a new client connection) opens no new tunnel.
    let before = sim.portforward_count();
    for _ in 0..3 {
        assert_eq!(
            ctl3(ep, &["get", "foo", "--print-value-only"])
                .await
                .stdout
                .trim(),
            "bar"
        );
    }
    assert_eq!(
        sim.portforward_count(),
        before,
        "warm gets must reuse the open tunnels"
    );

    // txn reads its three sections from stdin.
    let txn = run(
        etcdctl(3, &["--endpoints", ep, "txn"]),
        "value(\"foo\") = \"bar\"\n\nput foo baz\n\nput foo qux\n\n",
    )
    .await
    .ok();
    assert!(txn.stdout.starts_with("SUCCESS"), "{}", txn.stdout);
    assert_eq!(
        ctl3(ep, &["get", "foo", "--print-value-only"])
            .await
            .stdout
            .trim(),
        "baz"
    );

    // Lease: grant, attach, read back.
    let grant = ctl3(ep, &["lease", "grant", "60"]).await.stdout;
    let id = grant
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_owned();
    ctl3(ep, &["put", "--lease", &id, "leased", "v"]).await;
    let ttl = ctl3(ep, &["lease", "timetolive", &id, "--keys"])
        .await
        .stdout;
    assert!(ttl.contains("leased"), "{ttl}");

    // Watch: a long-lived stream sees a later write.
    let mut watch = etcdctl(3, &["--endpoints", ep, "watch", "--prefix", "/w"]);
    watch.stdout(Stdio::piped()).kill_on_drop(true);
    let mut child = watch.spawn().expect("etcdctl watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    // The watch is registered before etcdctl prints anything; write until it reports the event.
    let seen = tokio::time::timeout(DEADLINE, async {
        let mut n = 0;
        loop {
            n += 1;
            ctl3(ep, &["put", "/w/k", &format!("v{n}")]).await;
            let got =
                tokio::time::timeout(std::time::Duration::from_millis(500), lines.next_line())
                    .await;
            if let Ok(Ok(Some(line))) = got {
                return line;
            }
        }
    })
    .await
    .expect("watch event");
    assert_eq!(seen, "PUT");
    let key = within("lines.next_line", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(key, "/w/k");

    ctl3(ep, &["del", "foo"]).await;
    assert_eq!(ctl3(ep, &["get", "foo"]).await.stdout.trim(), "");
    drop(child);
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_list_and_cluster_commands_see_local_endpoints() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &[]).await;
    let ep = proxy.cluster_addr.as_str();
    let member_urls: BTreeSet<String> = proxy.member_urls().into_iter().collect();
    assert_eq!(member_urls.len(), 3, "{}", proxy.summary);

    // member list: the client URLs are the proxy's member endpoints, not in-cluster names.
    let list = ctl3(ep, &["member", "list", "-w", "json"]).await.stdout;
    let v: serde_json::Value = serde_json::from_str(&list).expect("member list json");
    let mut listed = BTreeSet::new();
    for m in v["members"].as_array().expect("members") {
        let name = m["name"].as_str().unwrap();
        let urls: Vec<&str> = m["clientURLs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap())
            .collect();
        let expected = proxy
            .members
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, u)| u.as_str());
        assert_eq!(
            urls,
            vec![expected.expect("member has an endpoint")],
            "member {name}"
        );
        listed.insert(urls[0].to_owned());
    }
    assert_eq!(listed, member_urls);
    assert!(
        v["header"]["cluster_id"].as_u64().unwrap_or(0) != 0,
        "header kept: {list}"
    );

    // endpoint status --cluster: one row per member, each reporting its own member ID.
    let status = ctl3(ep, &["endpoint", "status", "--cluster", "-w", "json"])
        .await
        .stdout;
    let rows: serde_json::Value = serde_json::from_str(&status).expect("status json");
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 3, "{status}");
    let endpoints: BTreeSet<String> = rows
        .iter()
        .map(|r| r["Endpoint"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(endpoints, member_urls);
    let ids: BTreeSet<u64> = rows
        .iter()
        .map(|r| r["Status"]["header"]["member_id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids.len(),
        3,
        "each member endpoint reaches a different member: {status}"
    );

    // endpoint health --cluster reaches every member too.
    let health = ctl3(ep, &["endpoint", "health", "--cluster"]).await;
    assert_eq!(
        health.stdout.matches("is healthy").count() + health.stderr.matches("is healthy").count(),
        3
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_kind_finds_the_members() {
    let sim = cluster(2).await;
    for (args, found) in [
        (&["--service", "etcd"][..], "service etcd"),
        (&["-l", "app=etcd"][..], "pods app=etcd"),
        (&["--statefulset", "etcd"][..], "statefulset etcd"),
        (&["--pod", "etcd-1"][..], "pod etcd-1"),
        (&["-n", "etcd"][..], "statefulset etcd"),
    ] {
        let proxy = start_proxy(&sim, args).await;
        assert!(
            proxy
                .summary
                .starts_with(&format!("Forwarding {found} in namespace etcd")),
            "{args:?}: {}",
            proxy.summary
        );
        let expected = if args[0] == "--pod" { 1 } else { 2 };
        assert_eq!(proxy.members.len(), expected, "{}", proxy.summary);
        assert_eq!(
            ctl3(&proxy.cluster_addr, &["endpoint", "health"])
                .await
                .status
                .code(),
            Some(0)
        );
        drop(proxy);
    }
    within("sim.shutdown", sim.shutdown()).await;
}

/// The leader's member ID and the other members' IDs, from `endpoint status --cluster`.
async fn leader_and_followers(ep: &str) -> (String, Vec<String>) {
    let out = ctl3(ep, &["endpoint", "status", "--cluster", "-w", "json"]).await;
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).expect("status JSON");
    let mut leader = String::new();
    let mut followers = Vec::new();
    for row in rows.as_array().expect("rows") {
        let id = row["Status"]["header"]["member_id"]
            .as_u64()
            .expect("member_id");
        if row["Status"]["leader"].as_u64() == Some(id) {
            leader = format!("{id:x}");
        } else {
            followers.push(format!("{id:x}"));
        }
    }
    (leader, followers)
}

/// etcdctl's commands with nothing but the cluster endpoint, as a user would type them.
/// (`check perf` takes a minute and `elect`/`watch`/`make-mirror` run until stopped: watches
/// are covered above; the rest reach etcd through the same routes as these.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_etcdctl_command_works_through_the_cluster_endpoint_alone() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &[]).await;
    let ep = proxy.cluster_addr.as_str();
    let dir = tempfile::tempdir().unwrap();

    ctl3(ep, &["put", "sweep", "v"]).await;
    let txn = run(
        etcdctl(3, &["--endpoints", ep, "txn"]),
        "value(\"sweep\") = \"v\"\n\nput sweep/txn yes\n\nput sweep/txn no\n\n",
    )
    .await
    .ok();
    assert!(txn.stdout.starts_with("SUCCESS"), "{}", txn.stdout);

    let lease = ctl3(ep, &["lease", "grant", "60"]).await.stdout;
    let id = lease
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_owned();
    ctl3(ep, &["put", "sweep/leased", "x", "--lease", &id]).await;
    ctl3(ep, &["lease", "keep-alive", "--once", &id]).await;
    let ttl = ctl3(ep, &["lease", "timetolive", &id, "--keys"])
        .await
        .stdout;
    assert!(ttl.contains("sweep/leased"), "{ttl}");
    ctl3(ep, &["lease", "revoke", &id]).await;

    let locked = ctl3(ep, &["lock", "sweep-lock", "echo", "held"])
        .await
        .stdout;
    assert!(locked.contains("held"), "{locked}");

    let rev = ctl3(ep, &["get", "sweep", "-w", "json"]).await.stdout;
    let rev: serde_json::Value = serde_json::from_str(&rev).unwrap();
    let rev = rev["header"]["revision"].as_u64().unwrap().to_string();
    ctl3(ep, &["compaction", &rev]).await;
    ctl3(ep, &["defrag", "--cluster"]).await;
    let hashes = ctl3(ep, &["endpoint", "hashkv", "--cluster"]).await.stdout;
    assert_eq!(hashes.lines().count(), 3, "{hashes}");
    // etcdctl 3.4 prints health to stderr, 3.5 to stdout.
    let health = ctl3(ep, &["endpoint", "health", "--cluster"]).await;
    let health = health.stdout + &health.stderr;
    assert_eq!(health.matches("is healthy").count(), 3, "{health}");

    let snap = dir.path().join("snap.db");
    ctl3(ep, &["snapshot", "save", snap.to_str().unwrap()]).await;
    let status = run(
        etcdctl(
            3,
            &["snapshot", "status", snap.to_str().unwrap(), "-w", "json"],
        ),
        "",
    )
    .await
    .ok();
    assert!(status.stdout.contains("\"revision\""), "{}", status.stdout);

    // etcd refuses reconfiguration until every member has been connected for a while
    // ("unhealthy cluster", strict reconfig check): a fresh cluster gets a few seconds.
    let added = within("member add", async {
        loop {
            let out = run(
                etcdctl(
                    3,
                    &[
                        "--endpoints",
                        ep,
                        "member",
                        "add",
                        "sweep-learner",
                        "--learner",
                        "--peer-urls",
                        "http://127.0.0.1:9",
                    ],
                ),
                "",
            )
            .await;
            if out.status.success() {
                return out.stdout;
            }
            // Transient refusals only: a fresh cluster's strict check, or a slow machine.
            let transient = ["unhealthy cluster", "timed out", "deadline exceeded"];
            assert!(
                transient.iter().any(|t| out.stderr.contains(t)),
                "{}",
                out.stderr
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    })
    .await;
    let new_id = added
        .split_whitespace()
        .skip_while(|w| *w != "Member")
        .nth(1)
        .expect("new member ID")
        .to_owned();
    ctl3(ep, &["member", "remove", &new_id]).await;

    // move-leader finds the leader by asking the endpoints it is given for their status.
    let (leader, followers) = leader_and_followers(ep).await;
    let target = &followers[0];
    let moved = ctl3(ep, &["move-leader", target]).await.stdout;
    assert!(
        moved.contains(&format!("from {leader} to {target}")),
        "{moved}"
    );
    let (now, _) = within("the new leader to show", async {
        loop {
            let (l, f) = leader_and_followers(ep).await;
            if &l == target {
                return (l, f);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(&now, target);
    drop(proxy);
    within("simulator shutdown", sim.shutdown()).await;
}
