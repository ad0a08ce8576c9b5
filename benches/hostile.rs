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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

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

/// A logged-in client on a thread and runtime of its own (so that the attack tasks of this
/// process do not delay it), connected once before any attack, as a client that was there
/// first: it keeps its connection, so per-address limits the attacks trip do not apply to it.
struct Legit {
    start: tokio::sync::mpsc::UnboundedSender<Arc<AtomicBool>>,
    done: tokio::sync::mpsc::UnboundedReceiver<Vec<Duration>>,
}

impl Legit {
    /// Connects and logs in; returns once logged in.
    fn connect(endpoint: String) -> Legit {
        let (start, mut start_rx) = tokio::sync::mpsc::unbounded_channel::<Arc<AtomicBool>>();
        let (done_tx, done) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let options = etcd_client::ConnectOptions::new().with_user("alice", "wonderland");
                let mut client = etcd_client::Client::connect([endpoint.as_str()], Some(options))
                    .await
                    .expect("legit client logs in");
                let _ = ready_tx.send(());
                while let Some(stop) = start_rx.recv().await {
                    let mut lat = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        client.get("legit", None).await.expect("legit get");
                        lat.push(t.elapsed());
                    }
                    let _ = done_tx.send(lat);
                }
            })
        });
        ready_rx.recv().expect("legit client started");
        Legit { start, done }
    }

    /// Gets in a loop while `run` goes; their latencies.
    async fn during<T>(&mut self, run: impl Future<Output = T>) -> (T, Vec<Duration>) {
        let stop = Arc::new(AtomicBool::new(false));
        self.start.send(stop.clone()).expect("legit client alive");
        let out = run.await;
        stop.store(true, Ordering::Relaxed);
        (out, self.done.recv().await.expect("latencies"))
    }
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
async fn measure<F>(pid: u32, legit: &mut Legit, attack: &'static str, run: F) -> Row
where
    F: Future<Output = (Vec<Option<Closed>>, String)>,
{
    // Reset the peak-RSS mark (Linux: clear_refs 5), then start from the current RSS.
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    let (before, _) = rss_kib(pid);
    let cpu_before = cpu_time(pid);
    let ((closed, note), legit) = legit.during(run).await;
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

/// Sends `round()`'s attacks again and again for at least `at_least`, so that attacks that
/// end in a millisecond still overlap the legitimate client's gets.
async fn repeat<F>(at_least: Duration, round: F) -> Vec<Option<Closed>>
where
    F: Fn() -> Vec<Vec<u8>>,
{
    let started = Instant::now();
    let mut closed = Vec::new();
    while started.elapsed() < at_least {
        closed.extend(hold_all(SOCKET_ADDR.get().copied().expect("set"), round(), 4).await);
    }
    closed
}

/// The proxy's address, for [`repeat`].
static SOCKET_ADDR: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();

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
    SOCKET_ADDR.set(to).expect("once");
    let round_for = Duration::from_secs(2);
    let ep = proxy.cluster_addr.clone();
    let options = etcd_client::ConnectOptions::new().with_user("alice", "wonderland");
    let mut client = etcd_client::Client::connect([ep.as_str()], Some(options))
        .await
        .expect("legit client logs in");
    client.put("legit", "x", None).await.expect("put");
    let mut legit = Legit::connect(ep.clone());

    let mut rows = vec![
        measure(pid, &mut legit, "none (baseline, 2 s)", async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            (Vec::new(), String::new())
        })
        .await,
    ];
    let big = hpack_bomb_block(4000, 30_000);
    let small = hpack_bomb_block(4000, 12_000);
    rows.push(
        measure(
            pid,
            &mut legit,
            "HPACK bomb, 34 KB frame (x4, for 2 s)",
            async {
                let round = || (0..4 * scale).map(|_| hpack_bomb(&big, None)).collect();
                (
                    repeat(round_for, round).await,
                    "~115 MiB decoded each".into(),
                )
            },
        )
        .await,
    );
    rows.push(
        measure(
            pid,
            &mut legit,
            "HPACK bomb, 16 KB frame (x4, for 2 s)",
            async {
                let round = || (0..4 * scale).map(|_| hpack_bomb(&small, None)).collect();
                (
                    repeat(round_for, round).await,
                    "~46 MiB decoded each".into(),
                )
            },
        )
        .await,
    );
    rows.push(
        measure(
            pid,
            &mut legit,
            "16 MiB frame header, held (x4, for 2 s)",
            async {
                let round = || (0..4 * scale).map(|_| oversized_frame()).collect();
                (repeat(round_for, round).await, String::new())
            },
        )
        .await,
    );
    rows.push(
        measure(
            pid,
            &mut legit,
            "random frames (x3000, 100 at once)",
            async {
                let a = (0..3000 * scale as u64)
                    .map(|i| {
                        let mut rng = fastrand::Rng::with_seed(i);
                        let mut b = PREFACE.to_vec();
                        b.extend((0..rng.usize(1..4096)).map(|_| rng.u8(..)));
                        b
                    })
                    .collect();
                (hold_all(to, a, 100).await, String::new())
            },
        )
        .await,
    );
    rows.push(
        measure(pid, &mut legit, "slowloris HTTP/1.1 (x400)", async {
            (slowloris(to, 400 * scale).await, String::new())
        })
        .await,
    );
    rows.push(
        measure(pid, &mut legit, "connection flood (x1000 held)", async {
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
        measure(pid, &mut legit, "300 bad logins, 50 at once", async {
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
