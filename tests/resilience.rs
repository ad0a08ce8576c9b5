use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;

use crate::support::{cluster, start_proxy, until_leader_learned, within, within_for};

/// Counts of one load run.
#[derive(Default)]
struct Load {
    reads: AtomicUsize,
    writes: AtomicUsize,
    failed_reads: AtomicUsize,
    failed_writes: AtomicUsize,
}

/// Runs `workers` clients doing get+put pairs against `endpoint` until `until`.
async fn load(endpoint: String, workers: usize, until: Instant, counts: Arc<Load>) {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let endpoint = endpoint.clone();
        let counts = counts.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = within(
                "Client::connect",
                Client::connect([endpoint.as_str()], None),
            )
            .await
            .expect("connect");
            let mut i = 0u64;
            while Instant::now() < until {
                i += 1;
                let key = format!("load/{w}");
                let put = tokio::time::timeout(
                    Duration::from_secs(10),
                    c.put(key.clone(), i.to_string(), None),
                )
                .await;
                counts.writes.fetch_add(1, Ordering::Relaxed);
                if !matches!(put, Ok(Ok(_))) {
                    counts.failed_writes.fetch_add(1, Ordering::Relaxed);
                }
                let get = tokio::time::timeout(Duration::from_secs(10), c.get(key, None)).await;
                counts.reads.fetch_add(1, Ordering::Relaxed);
                if !matches!(get, Ok(Ok(_))) {
                    counts.failed_reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        within("load task", t).await.expect("load task");
    }
}

/// The name of a member that is not the raft leader.
async fn a_follower(proxy: &crate::support::Proxy) -> String {
    for (name, url) in &proxy.members {
        if let Some((id, leader)) = leader_seen_by(url).await {
            if id != leader {
                return name.clone();
            }
        }
    }
    panic!("no follower among {:?}", proxy.members);
}

/// `member`'s own ID and the raft leader it sees (0 during an election), if it answers.
async fn leader_seen_by(url: &str) -> Option<(u64, u64)> {
    let attempt = tokio::time::timeout(Duration::from_secs(2), async {
        let mut c = Client::connect([url], None).await.ok()?;
        let s = c.status().await.ok()?;
        Some((s.header()?.member_id(), s.leader()))
    });
    attempt.await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_member_under_load_fails_no_reads() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &[]).await;
    let victim = a_follower(&proxy).await;

    let counts = Arc::new(Load::default());
    let until = Instant::now() + Duration::from_secs(4);
    let run = tokio::spawn(load(proxy.cluster_addr.clone(), 8, until, counts.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    within("sim.kill_pod", sim.kill_pod(&victim))
        .await
        .expect("kill pod");
    run.await.expect("load");

    let (reads, writes) = (
        counts.reads.load(Ordering::Relaxed),
        counts.writes.load(Ordering::Relaxed),
    );
    let failed_reads = counts.failed_reads.load(Ordering::Relaxed);
    let failed_writes = counts.failed_writes.load(Ordering::Relaxed);
    eprintln!("pod kill under load: {reads} reads ({failed_reads} failed), {writes} writes ({failed_writes} failed)");
    assert!(reads > 100, "the load ran: {reads} reads");
    assert_eq!(failed_reads, 0, "reads are replayed on another member");
    assert!(
        failed_writes <= 8,
        "only writes in flight on the dead member may fail: {failed_writes}"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_leader_dies_writes_and_reads_follow_the_new_leader() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &["--keepalive", "200ms"]).await;
    let mut old = None;
    for (name, url) in &proxy.members {
        if let Some((id, leader)) = leader_seen_by(url).await {
            if id == leader {
                old = Some((name.clone(), id));
            }
        }
    }
    let (old_pod, old_id) = old.expect("a leader");
    let mut c = within(
        "Client::connect",
        Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect");
    until_leader_learned(&mut c, old_id).await;
    let deadline = Instant::now() + crate::support::DEADLINE;

    within("sim.kill_pod", sim.kill_pod(&old_pod))
        .await
        .expect("kill the leader");
    let survivors: Vec<&String> = proxy
        .members
        .iter()
        .filter(|(name, _)| *name != old_pod)
        .map(|(_, url)| url)
        .collect();
    let new_id = loop {
        let mut elected = None;
        for url in &survivors {
            if let Some((_, leader)) = leader_seen_by(url).await {
                if leader != 0 && leader != old_id {
                    elected = Some(leader);
                }
            }
        }
        if let Some(id) = elected {
            break id;
        }
        assert!(Instant::now() < deadline, "no new leader was elected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Both kinds of request settle on the new leader (health checks every 200 ms learn it).
    loop {
        let put = tokio::time::timeout(Duration::from_secs(5), c.put("failover", "1", None)).await;
        let get = tokio::time::timeout(Duration::from_secs(5), c.get("failover", None)).await;
        let served = |id: Option<u64>| id == Some(new_id);
        let put_by = put
            .ok()
            .and_then(Result::ok)
            .and_then(|r| Some(r.header()?.member_id()));
        let get_by = get
            .ok()
            .and_then(Result::ok)
            .and_then(|r| Some(r.header()?.member_id()));
        if served(put_by) && served(get_by) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "requests never settled on the new leader {new_id:x}: put by {put_by:?}, get by {get_by:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = within("c.get", c.get("failover", None)).await.expect("get");
    assert_eq!(
        r.kvs()[0].value(),
        b"1",
        "the write through the new leader is read back"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_every_tunnel_repeatedly_fails_no_reads() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &[]).await;
    let mut c = within(
        "Client::connect",
        Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect");
    within("c.put", c.put("cut", "v", None)).await.expect("put");

    let counts = Arc::new(Load::default());
    let until = Instant::now() + Duration::from_secs(4);
    let reader = {
        let counts = counts.clone();
        tokio::spawn(async move {
            while Instant::now() < until {
                let get = tokio::time::timeout(Duration::from_secs(10), c.get("cut", None)).await;
                counts.reads.fetch_add(1, Ordering::Relaxed);
                if !matches!(&get, Ok(Ok(r)) if r.kvs().first().map(|kv| kv.value()) == Some(b"v"))
                {
                    counts.failed_reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let before = sim.portforward_count();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sim.cut_tunnels();
    }
    within("reader", reader).await.expect("reader");
    let reads = counts.reads.load(Ordering::Relaxed);
    let failed = counts.failed_reads.load(Ordering::Relaxed);
    eprintln!(
        "tunnels cut every 500 ms: {reads} reads, {failed} failed, {} tunnels opened",
        sim.portforward_count() - before
    );
    assert!(reads > 50, "{reads}");
    assert_eq!(failed, 0);
    assert!(sim.portforward_count() > before, "tunnels were re-opened");
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sees_every_revision_once_while_tunnels_are_cut() {
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::sync::watch;

    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &[]).await;
    let args = [
        "--endpoints",
        &proxy.cluster_addr,
        "watch",
        "--prefix",
        "/w",
        "-w",
        "json",
    ];
    let mut cmd = crate::support::etcdctl(3, &args);
    cmd.stdout(Stdio::piped()).kill_on_drop(true);
    let mut child = cmd.spawn().expect("etcdctl watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();

    // The watcher publishes the last revision it saw, and stops at `target` (or after 60 s).
    let (progress_tx, mut progress) = watch::channel(0i64);
    let (target_tx, target) = watch::channel(i64::MAX);
    let seen = tokio::spawn(async move {
        let mut revs: Vec<i64> = Vec::new();
        let give_up = Instant::now() + Duration::from_secs(60);
        while Instant::now() < give_up && revs.last().is_none_or(|r| r < &*target.borrow()) {
            let Ok(line) =
                tokio::time::timeout(Duration::from_millis(200), lines.next_line()).await
            else {
                continue;
            };
            let Ok(Some(line)) = line else { break };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            for ev in v["Events"].as_array().into_iter().flatten() {
                revs.push(ev["kv"]["mod_revision"].as_i64().expect("mod_revision"));
            }
            if let Some(last) = revs.last() {
                progress_tx.send_replace(*last);
            }
        }
        revs
    });

    let mut c = within(
        "Client::connect",
        Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect");
    // Writes count once the watch is known to be registered: a write it reported.
    let first = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let put = c.put("/w/k", "0", None).await.expect("put before the cuts");
            let rev = put.header().expect("header").revision();
            let reported =
                tokio::time::timeout(Duration::from_millis(500), progress.wait_for(|r| *r >= rev))
                    .await;
            if matches!(reported, Ok(Ok(_))) {
                return rev;
            }
        }
    })
    .await
    .expect("the watch reports a write");

    let mut written = Vec::new();
    let until = Instant::now() + Duration::from_secs(4);
    let mut next_cut = Instant::now() + Duration::from_millis(300);
    let mut i = 0;
    while Instant::now() < until {
        if Instant::now() >= next_cut {
            sim.cut_tunnels();
            next_cut += Duration::from_millis(300);
        }
        i += 1;
        // A put whose reply was lost may still have been applied: it then shows up as an extra
        // revision, which is fine; what was acknowledged must be seen exactly once.
        let put =
            tokio::time::timeout(Duration::from_secs(10), c.put("/w/k", i.to_string(), None)).await;
        if let Ok(Ok(r)) = put {
            written.push(r.header().expect("header").revision());
        }
    }
    target_tx.send_replace(*written.last().expect("writes"));
    // The watcher gives up by itself after its 60 s.
    let revs = within_for(Duration::from_secs(60), "the watcher", seen)
        .await
        .expect("watch output");
    child.start_kill().expect("kill watch");
    let revs: Vec<i64> = revs.into_iter().filter(|r| *r > first).collect();
    eprintln!(
        "watch under tunnel cuts every 300 ms: {} acknowledged writes, {} events seen after the first, {} tunnels opened",
        written.len(),
        revs.len(),
        sim.portforward_count()
    );
    assert!(written.len() > 20, "the writer ran: {}", written.len());
    assert!(
        revs.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicates: {revs:?}"
    );
    for rev in &written {
        assert!(
            revs.contains(rev),
            "acknowledged revision {rev} was not delivered: {revs:?}"
        );
    }
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_past_a_compaction_gets_etcds_compaction_error() {
    use etcd_client::CompactionOptions;

    let sim = cluster(1).await;
    let proxy = start_proxy(&sim, &[]).await;
    let direct = sim.member_client_url("etcd-0").expect("member url");
    let mut d = within("Client::connect", Client::connect([direct.as_str()], None))
        .await
        .expect("direct");
    let mut c = within(
        "Client::connect",
        Client::connect([proxy.cluster_addr.as_str()], None),
    )
    .await
    .expect("connect");
    let mut w = within(
        "c.watch",
        c.watch("c/", Some(etcd_client::WatchOptions::new().with_prefix())),
    )
    .await
    .expect("watch");
    assert!(within("w.message", w.message())
        .await
        .expect("created")
        .expect("msg")
        .created());
    within("d.put", d.put("c/1", "1", None)).await.expect("put");
    let ev = within("w.message", w.message())
        .await
        .expect("event")
        .expect("msg");
    assert_eq!(ev.events().len(), 1);

    // The tunnels die and no new one can be opened for 3 s; meanwhile history is compacted.
    let pause = within("sim.pause_api", sim.pause_api(Duration::from_secs(3)));
    let compact = async {
        sim.cut_tunnels();
        within("d.put", d.put("c/2", "2", None)).await.expect("put");
        let rev = within("d.put", d.put("c/3", "3", None))
            .await
            .expect("put")
            .header()
            .expect("header")
            .revision();
        within(
            "d.compact",
            d.compact(rev, Some(CompactionOptions::new().with_physical())),
        )
        .await
        .expect("compact");
        rev
    };
    let ((), compacted_at) = tokio::join!(pause, compact);

    let resp = tokio::time::timeout(Duration::from_secs(30), w.message())
        .await
        .expect("the client hears back, not silence")
        .expect("a response, not a transport error")
        .expect("message");
    assert!(resp.canceled(), "the resumed watch was cancelled: {resp:?}");
    assert_eq!(
        resp.compact_revision(),
        compacted_at,
        "etcd's compaction error reaches the client"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_members_failure_leaves_other_connections_alone() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &[]).await;
    // Kill a follower (killing the leader would stall writes for an election, which is etcd's
    // business, not isolation's).
    let victim = a_follower(&proxy).await;
    let (_, other_url) = proxy
        .members
        .iter()
        .find(|(n, _)| *n != victim)
        .cloned()
        .expect("another member");
    let mut pinned = within(
        "Client::connect",
        Client::connect([other_url.as_str()], None),
    )
    .await
    .expect("connect");
    let mut w = within("pinned.watch", pinned.watch("iso", None))
        .await
        .expect("watch");
    assert!(within("w.message", w.message())
        .await
        .expect("created")
        .expect("msg")
        .created());
    let opened = sim.portforward_count();

    within("sim.kill_pod", sim.kill_pod(&victim))
        .await
        .expect("kill");
    within("pinned.put", pinned.put("iso", "1", None))
        .await
        .expect("the other member's connection still works");
    let ev = tokio::time::timeout(Duration::from_secs(10), w.message())
        .await
        .expect("event")
        .expect("ok")
        .expect("msg");
    assert_eq!(ev.events()[0].kv().expect("kv").value(), b"1");
    // Nothing had to be re-opened for the untouched member (the victim's probes may open some).
    let reopened_for_other = sim.portforward_count() - opened;
    assert!(
        reopened_for_other <= 2,
        "{reopened_for_other} tunnels opened after the kill"
    );
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_long_poll_ends_cleanly_when_its_tunnel_drops() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let sim = cluster(1).await;
    let proxy = start_proxy(&sim, &[]).await;
    let ep = proxy.cluster_addr.clone();
    let mut s = within(
        "tokio::net::TcpStream::connect",
        tokio::net::TcpStream::connect(&ep),
    )
    .await
    .expect("connect");
    let req = format!("GET /v2/keys/lp?wait=true HTTP/1.1\r\nHost: {ep}\r\n\r\n");
    within("s.write_all", s.write_all(req.as_bytes()))
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = within("s.read", s.read(&mut buf)).await.expect("headers");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    sim.cut_tunnels();
    // The client's request ends (v2 clients then retry with waitIndex); it does not hang.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the long-poll hung after its tunnel dropped");
    drop(proxy);
    within("sim.shutdown", sim.shutdown()).await;
}
