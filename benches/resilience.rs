//! Resilience figures on the simulated cluster (not a test: it prints, it asserts nothing).
//!
//! `cargo bench --bench resilience` runs two scenarios:
//!
//! 1. **Pod kill under load.** Clients run get/put pairs through the cluster endpoint; one
//!    follower's etcd is killed mid-run. Printed: request rate, failed reads and writes, the
//!    longest single request around the kill, and the time until throughput is back to 80 %
//!    of its pre-kill level.
//! 2. **Watch under tunnel cuts.** A watch runs through the proxy while a writer puts a key
//!    steadily and every tunnel is cut every `CUT_EVERY_SECS` (default 30) for
//!    `WATCH_MINUTES` (default 10). Printed: acknowledged writes, events lost, duplicates.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, WatchOptions};
use tokio::sync::Mutex;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Samples {
    /// (time since start, latency, is read, ok)
    ops: Vec<(Duration, Duration, bool, bool)>,
}

async fn follower(proxy: &support::Proxy) -> String {
    for (name, url) in &proxy.members {
        let mut c = Client::connect([url.as_str()], None)
            .await
            .expect("connect");
        let s = c.status().await.expect("status");
        if s.leader() != s.header().expect("header").member_id() {
            return name.clone();
        }
    }
    panic!("no follower");
}

async fn pod_kill_under_load() {
    let sim = support::cluster(3).await;
    let proxy = support::start_proxy(&sim, &[]).await;
    let victim = follower(&proxy).await;
    let samples = Arc::new(Mutex::new(Samples::default()));
    let start = Instant::now();
    let run_for = Duration::from_secs(10);
    let kill_at = Duration::from_secs(4);
    let mut tasks = Vec::new();
    for w in 0..16 {
        let ep = proxy.cluster_addr.clone();
        let samples = samples.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect([ep.as_str()], None).await.expect("connect");
            let key = format!("bench/{w}");
            while start.elapsed() < run_for {
                let t = Instant::now();
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(10), c.put(key.clone(), "v", None))
                        .await,
                    Ok(Ok(_))
                );
                let put = (start.elapsed(), t.elapsed(), false, ok);
                let t = Instant::now();
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(10), c.get(key.clone(), None)).await,
                    Ok(Ok(_))
                );
                let get = (start.elapsed(), t.elapsed(), true, ok);
                let mut s = samples.lock().await;
                s.ops.push(put);
                s.ops.push(get);
            }
        }));
    }
    tokio::time::sleep(kill_at).await;
    sim.kill_pod(&victim).await.expect("kill");
    for t in tasks {
        t.await.expect("worker");
    }
    let s = samples.lock().await;
    let total = s.ops.len();
    let failed_reads = s.ops.iter().filter(|o| o.2 && !o.3).count();
    let failed_writes = s.ops.iter().filter(|o| !o.2 && !o.3).count();
    let before: Vec<_> = s
        .ops
        .iter()
        .filter(|o| o.0 > Duration::from_secs(1) && o.0 < kill_at)
        .collect();
    let rate_before = before.len() as f64 / (kill_at.as_secs_f64() - 1.0);
    let worst_after = s
        .ops
        .iter()
        .filter(|o| o.0 >= kill_at && o.0 < kill_at + Duration::from_secs(3))
        .map(|o| o.1)
        .max()
        .unwrap_or_default();
    // Recovery: first 100 ms bucket after the kill whose rate is back to 80 % of before.
    let bucket = Duration::from_millis(100);
    let mut recovery = None;
    let mut t = kill_at;
    while t < run_for {
        let n = s
            .ops
            .iter()
            .filter(|o| o.0 >= t && o.0 < t + bucket)
            .count();
        if n as f64 / bucket.as_secs_f64() >= 0.8 * rate_before {
            recovery = Some(t + bucket - kill_at);
            break;
        }
        t += bucket;
    }
    println!("## Pod kill under load (16 clients, get+put pairs, follower {victim} killed at 4 s)");
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| requests | {total} in {:.0} s ({rate_before:.0} req/s before the kill) |",
        run_for.as_secs_f64()
    );
    println!("| failed reads | {failed_reads} |");
    println!("| failed writes | {failed_writes} |");
    println!(
        "| slowest request in the 3 s after the kill | {:.0} ms |",
        worst_after.as_secs_f64() * 1000.0
    );
    match recovery {
        Some(r) => println!(
            "| throughput back to 80 % after | {:.0} ms |",
            r.as_secs_f64() * 1000.0
        ),
        None => println!("| throughput back to 80 % after | not within the run |"),
    }
    drop(proxy);
    sim.shutdown().await;
}

async fn watch_under_cuts() {
    let minutes = env_u64("WATCH_MINUTES", 10);
    let cut_every = Duration::from_secs(env_u64("CUT_EVERY_SECS", 30));
    let sim = support::cluster(3).await;
    let proxy = support::start_proxy(&sim, &[]).await;
    let mut watcher = Client::connect([proxy.cluster_addr.as_str()], None)
        .await
        .expect("connect");
    let mut stream = watcher
        .watch("w/", Some(WatchOptions::new().with_prefix()))
        .await
        .expect("watch");
    assert!(stream
        .message()
        .await
        .expect("created")
        .expect("msg")
        .created());
    let seen = tokio::spawn(async move {
        let mut revs = Vec::new();
        while let Ok(Some(m)) = stream.message().await {
            revs.extend(
                m.events()
                    .iter()
                    .filter_map(|e| e.kv())
                    .map(|kv| kv.mod_revision()),
            );
        }
        revs
    });
    let mut c = Client::connect([proxy.cluster_addr.as_str()], None)
        .await
        .expect("connect");
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    let mut next_cut = Instant::now() + cut_every;
    let (mut written, mut cuts, mut i) = (Vec::new(), 0, 0u64);
    while Instant::now() < end {
        if Instant::now() >= next_cut {
            sim.cut_tunnels();
            cuts += 1;
            next_cut += cut_every;
        }
        i += 1;
        if let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_secs(10), c.put("w/k", i.to_string(), None)).await
        {
            written.push(r.header().expect("header").revision());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = *written.last().expect("writes");
    // Let the watcher deliver up to the last write, then end the stream by dropping the proxy.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let r = c
            .get("w/k", None)
            .await
            .expect("get")
            .header()
            .expect("header")
            .revision();
        if r >= last {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(proxy);
    let revs = seen.await.expect("watcher");
    let lost = written.iter().filter(|r| !revs.contains(r)).count();
    let duplicates = revs.windows(2).filter(|w| w[0] >= w[1]).count();
    println!(
        "## Watch under tunnel cuts ({minutes} min, every tunnel cut every {} s)",
        cut_every.as_secs()
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!("| tunnel cuts | {cuts} |");
    println!("| acknowledged writes | {} |", written.len());
    println!("| events delivered | {} |", revs.len());
    println!("| acknowledged writes never delivered | {lost} |");
    println!("| duplicated or out-of-order events | {duplicates} |");
    sim.shutdown().await;
}

#[tokio::main]
async fn main() {
    std::env::set_var("ETCD_PROXY_TEST_LOG", "warn");
    pod_kill_under_load().await;
    watch_under_cuts().await;
}
