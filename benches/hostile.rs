//! What hostile, unauthenticated clients cost an exposed etcd-proxy gateway, and what a
//! legitimate client notices meanwhile.
//!
//! `cargo bench --bench hostile` — not a test: it prints figures, it asserts nothing (the
//! bounds are asserted in `tests/hostile.rs`). One real etcd member, etcd-proxy with
//! `--endpoints` and `--auth-file` (bcrypt cost 10) on loopback, and per attack:
//!
//! * the proxy's peak RSS growth during it (VmHWM, reset before each attack) and CPU time;
//! * how long until each offending connection was closed (median and max), and how many were
//!   still open after the attack's limit;
//! * a logged-in gRPC client's get latency (p50/p99) during the attack, next to its p50 with
//!   no attack.
//!
//! `HOSTILE_SCALE=N` multiplies the attack sizes (default 1: the figures).

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures::{Future, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use support::attack::{
    connect_from, cpu_time, gateway_login, hpack_bomb, hpack_bomb_block, oversized_frame, rss_kib,
    send_and_hold, Closed, PREFACE,
};

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const HOLD: Duration = Duration::from_secs(15);

fn percentile(v: &mut [Duration], p: usize) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Gets in a loop until `stop` turns true; their latencies.
async fn legit_gets(
    mut client: etcd_client::Client,
    mut stop: watch::Receiver<bool>,
) -> Vec<Duration> {
    let mut lat = Vec::new();
    while !*stop.borrow_and_update() {
        let t = Instant::now();
        tokio::select! {
            r = client.get("legit", None) => {
                r.expect("legit get");
                lat.push(t.elapsed());
            }
            _ = stop.changed() => break,
        }
    }
    lat
}

struct Row {
    attack: &'static str,
    rss_kib: u64,
    cpu: Duration,
    closed: Vec<Option<Closed>>,
    legit: Vec<Duration>,
    note: String,
}

/// Runs `attack` against the proxy while a legitimate client gets in a loop.
async fn measure<F>(pid: u32, client: &etcd_client::Client, attack: &'static str, run: F) -> Row
where
    F: Future<Output = (Vec<Option<Closed>>, String)>,
{
    // Reset the peak-RSS mark (Linux: clear_refs 5), then start from the current RSS.
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let (before, _) = rss_kib(pid);
    let cpu_before = cpu_time(pid);
    let (stop_tx, stop_rx) = watch::channel(false);
    let legit = tokio::spawn(legit_gets(client.clone(), stop_rx));
    let (closed, note) = run.await;
    let _ = stop_tx.send(true);
    let legit = legit.await.expect("legit client");
    let (_, peak) = rss_kib(pid);
    Row {
        attack,
        rss_kib: peak.saturating_sub(before),
        cpu: cpu_time(pid) - cpu_before,
        closed,
        legit,
        note,
    }
}

async fn hold_all(to: SocketAddr, attacks: Vec<Vec<u8>>, parallel: usize) -> Vec<Option<Closed>> {
    futures::stream::iter(attacks)
        .map(|bytes| async move {
            let s = TcpStream::connect(to).await.ok()?;
            send_and_hold(s, &bytes, HOLD).await
        })
        .buffer_unordered(parallel)
        .collect()
        .await
}

async fn slowloris(to: SocketAddr, n: usize) -> Vec<Option<Closed>> {
    futures::future::join_all((0..n).map(|i| async move {
        let mut s = TcpStream::connect(to).await.ok()?;
        let started = Instant::now();
        for b in b"GET /v2/keys/ HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if s.write_all(&[*b]).await.is_err() {
                return Some(Closed {
                    after: started.elapsed(),
                    goaway: false,
                });
            }
            if started.elapsed() > HOLD {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(500 + (i % 100) as u64)).await;
        }
        None
    }))
    .await
}

#[tokio::main]
async fn main() {
    std::env::set_var("ETCD_PROXY_TEST_LOG", "error");
    let scale: usize = std::env::var("HOSTILE_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let etcd = support::standalone_etcd(&[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    let hash = bcrypt::hash("wonderland", 10).expect("bcrypt");
    std::fs::write(&users, format!("alice:{hash}\n")).expect("users file");
    let proxy = support::start_proxy_args(&[
        "--endpoints",
        &etcd.url,
        "--auth-file",
        users.to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    let pid = proxy.child.id().expect("pid");
    let to: SocketAddr = proxy.cluster_addr.parse().expect("addr");
    let options = etcd_client::ConnectOptions::new().with_user("alice", "wonderland");
    let mut client = etcd_client::Client::connect([proxy.cluster_addr.as_str()], Some(options))
        .await
        .expect("legit client logs in");
    client.put("legit", "x", None).await.expect("put");

    let mut rows = vec![
        measure(pid, &client, "none (baseline, 2 s)", async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            (Vec::new(), String::new())
        })
        .await,
    ];
    let big = hpack_bomb_block(4000, 30_000);
    let small = hpack_bomb_block(4000, 12_000);
    rows.push(
        measure(pid, &client, "HPACK bomb, 34 KB frame (x4)", async {
            let a = (0..4 * scale).map(|_| hpack_bomb(&big, None)).collect();
            (hold_all(to, a, 4).await, "~115 MiB decoded each".into())
        })
        .await,
    );
    rows.push(
        measure(pid, &client, "HPACK bomb, 16 KB frame (x4)", async {
            let a = (0..4 * scale).map(|_| hpack_bomb(&small, None)).collect();
            (hold_all(to, a, 4).await, "~46 MiB decoded each".into())
        })
        .await,
    );
    rows.push(
        measure(pid, &client, "16 MiB frame header, held (x4)", async {
            let a = (0..4 * scale).map(|_| oversized_frame()).collect();
            (hold_all(to, a, 4).await, String::new())
        })
        .await,
    );
    rows.push(
        measure(pid, &client, "random frames (x3000, 100 at once)", async {
            let a = (0..3000 * scale as u64)
                .map(|i| {
                    let mut rng = fastrand::Rng::with_seed(i);
                    let mut b = PREFACE.to_vec();
                    b.extend((0..rng.usize(1..4096)).map(|_| rng.u8(..)));
                    b
                })
                .collect();
            (hold_all(to, a, 100).await, String::new())
        })
        .await,
    );
    rows.push(
        measure(pid, &client, "slowloris HTTP/1.1 (x400)", async {
            (slowloris(to, 400 * scale).await, String::new())
        })
        .await,
    );
    rows.push(
        measure(pid, &client, "connection flood (x1000 held)", async {
            let held = futures::future::join_all((0..1000 * scale).map(|_| async move {
                let s = connect_from(LOCAL, to).await.ok()?;
                send_and_hold(s, b"", HOLD).await
            }))
            .await;
            (held, "cap: 256 per address".into())
        })
        .await,
    );
    rows.push(
        measure(pid, &client, "300 bad logins, 50 at once", async {
            let flood = futures::stream::iter(0..300 * scale)
                .map(|_| gateway_login(LOCAL, to, "alice", "guess"))
                .buffer_unordered(50)
                .collect::<Vec<_>>();
            let elsewhere = async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let t = Instant::now();
                let ok = gateway_login(ELSEWHERE, to, "alice", "wonderland")
                    .await
                    .is_ok_and(|(s, _)| s == 200);
                (ok, t.elapsed())
            };
            let (flood, (ok, took)) = tokio::join!(flood, elsewhere);
            let refused = flood.iter().filter(|r| matches!(r, Ok((401, _)))).count();
            let note = format!(
                "{refused} refused; login from another address: {} in {} ms",
                if ok { "ok" } else { "FAILED" },
                ms(took)
            );
            (Vec::new(), note)
        })
        .await,
    );

    let mut base = rows[0].legit.clone();
    let base_p50 = percentile(&mut base, 50);
    println!(
        "\n## Hostile clients against `etcd-proxy --endpoints … --auth-file …` (scale {scale})\n"
    );
    println!("| attack | peak RSS growth | proxy CPU | closed: median / max | left open | legit get p50 / p99 (ms) | p50 vs none | notes |");
    println!("|---|---|---|---|---|---|---|---|");
    for mut r in rows {
        let mut closed: Vec<Duration> = r.closed.iter().flatten().map(|c| c.after).collect();
        let open = r.closed.iter().filter(|c| c.is_none()).count();
        let goaway = r.closed.iter().flatten().filter(|c| c.goaway).count();
        let (p50, p99) = (percentile(&mut r.legit, 50), percentile(&mut r.legit, 99));
        let closed_col = if closed.is_empty() {
            "-".to_owned()
        } else {
            let (med, max) = (percentile(&mut closed, 50), percentile(&mut closed, 100));
            format!("{} / {} ms ({goaway} GOAWAY)", ms(med), ms(max))
        };
        println!(
            "| {} | {:.1} MiB | {:.2} s | {} | {} | {} / {} (n={}) | {:.2} | {} |",
            r.attack,
            r.rss_kib as f64 / 1024.0,
            r.cpu.as_secs_f64(),
            closed_col,
            open,
            ms(p50),
            ms(p99),
            r.legit.len(),
            p50.as_secs_f64() / base_p50.as_secs_f64().max(1e-9),
            r.note
        );
    }
    drop(proxy);
    drop(etcd);
}
