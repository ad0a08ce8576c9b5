//! Start-up, footprint and tunnel reuse of etcd-proxy on the simulated cluster.
//!
//! `cargo bench --bench startup` — not a test: it prints figures, it asserts nothing.
//!
//! * time from spawning `etcd-proxy` to its printed summary (it prints after every member
//!   answered through its tunnel: that is "ready"), median of several starts;
//! * resident memory when idle, after the warm-up;
//! * wall time of sequential `etcdctl get` processes, direct to a member vs through the proxy,
//!   and how many port-forward tunnels those gets opened (the goal: none).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

const STARTS: usize = 7;
const GETS: usize = 30;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn timed_gets(endpoint: &str) -> Duration {
    let mut times = Vec::new();
    for _ in 0..GETS {
        let t = Instant::now();
        support::ctl3(endpoint, &["get", "bench"]).await;
        times.push(t.elapsed());
    }
    median(times)
}

#[tokio::main]
async fn main() {
    std::env::set_var("ETCD_PROXY_TEST_LOG", "warn");
    let sim = support::cluster(3).await;

    let mut starts = Vec::new();
    for _ in 0..STARTS {
        let t = Instant::now();
        let proxy = support::start_proxy(&sim, &[]).await;
        starts.push(t.elapsed());
        drop(proxy);
    }

    let proxy = support::start_proxy(&sim, &[]).await;
    support::ctl3(&proxy.cluster_addr, &["put", "bench", "x"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // let allocations settle before sampling
    let pid = proxy.child.id().expect("pid");
    let idle = rss_kib(pid);

    let direct = sim.member_client_url("etcd-0").expect("member url");
    let direct_get = timed_gets(&direct).await;
    let tunnels_before = sim.portforward_count();
    let proxied_get = timed_gets(&proxy.cluster_addr).await;
    let opened = sim.portforward_count() - tunnels_before;
    let after = rss_kib(pid);

    println!(
        "etcd-proxy start-up and footprint (3 members, simulated cluster, {} build)",
        build()
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| start to ready, median of {STARTS} | {:.1} ms |",
        ms(median(starts))
    );
    println!(
        "| idle RSS | {} KiB |",
        idle.map_or("?".into(), |k| k.to_string())
    );
    println!(
        "| RSS after {GETS} etcdctl gets | {} KiB |",
        after.map_or("?".into(), |k| k.to_string())
    );
    println!(
        "| etcdctl get, direct to etcd-0, median | {:.1} ms |",
        ms(direct_get)
    );
    println!(
        "| etcdctl get through the proxy, median | {:.1} ms (ratio {:.2}) |",
        ms(proxied_get),
        ratio(proxied_get, direct_get)
    );
    println!("| tunnels opened by {GETS} warm gets | {opened} |");
    drop(proxy);
    sim.shutdown().await;
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn build() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}
