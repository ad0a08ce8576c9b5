use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;

use crate::support::{cluster, start_proxy};

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
            let mut c = Client::connect([endpoint.as_str()], None)
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
        t.await.expect("load task");
    }
}

/// The name of a member that is not the raft leader.
async fn a_follower(proxy: &crate::support::Proxy) -> String {
    for (name, url) in &proxy.members {
        let mut c = Client::connect([url.as_str()], None)
            .await
            .expect("connect member");
        let status = c.status().await.expect("status");
        if status.leader() != status.header().expect("header").member_id() {
            return name.clone();
        }
    }
    panic!("no follower among {:?}", proxy.members);
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
    sim.kill_pod(&victim).await.expect("kill pod");
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
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_every_tunnel_repeatedly_fails_no_reads() {
    let sim = cluster(3).await;
    let proxy = start_proxy(&sim, &[]).await;
    let mut c = Client::connect([proxy.cluster_addr.as_str()], None)
        .await
        .expect("connect");
    c.put("cut", "v", None).await.expect("put");

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
    reader.await.expect("reader");
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
    sim.shutdown().await;
}
