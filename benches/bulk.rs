//! Bulk transfers over a tunnel with a real round trip: etcd-proxy against the real
//! `kubectl port-forward` and against no tunnel at all.
//!
//! `cargo bench --bench bulk` — not a test: it prints markdown tables, it asserts only that
//! each transfer completed whole.
//!
//! One real etcd member in the simulated cluster, seeded with a database of about
//! `BENCH_SNAPSHOT_MB` (of ~930 KB values), of which `BENCH_RANGE_MB` under one prefix, and
//! `BENCH_WATCH_EVENTS` small events written 100 to a transaction (so that etcd's watch
//! catch-up, which sends at most 1,000 revisions per 100 ms sync, is not what is measured).
//! Each transfer is one `etcdctl` process, the way a user runs it:
//!
//! * **snapshot**: `etcdctl snapshot save` (into `/dev/shm` when there is one);
//! * **range**: `etcdctl get --prefix` of the range prefix, its output counted;
//! * **watch**: `etcdctl watch --prefix --rev` from before the events, until the last one is
//!   printed.
//!
//! Targets, per round-trip time (the simulator delays every port-forward frame by half of it,
//! each way):
//!
//! * **direct**: etcd-0's own client URL, no tunnel (the physical limit of this machine);
//! * **kubectl port-forward**: the real kubectl (from the `PATH`; its rows are left out, with
//!   a note, when it is not installed), started once as a user starts it,
//!   `kubectl --kubeconfig … --context sim -n … port-forward pod/etcd-0 PORT:2379` on a free
//!   port, ready when it prints its `Forwarding from` line. It keeps one connection to the
//!   API server and opens a stream pair on it per accepted connection. Its protocol is its
//!   default (`KUBECTL_PORT_FORWARD_WEBSOCKETS` removed from its environment;
//!   `BENCH_KUBECTL_WEBSOCKETS` sets it): the bench reads which one it used from the
//!   simulator's counters and prints it;
//! * **port-forward/conn (kube-rs)**: a forwarder in this process that opens one
//!   port-forward (kube-rs, WebSocket) per accepted connection, what kube-rs' example and
//!   kftray do;
//! * **etcd-proxy** through etcd-0's member endpoint and through its cluster endpoint
//!   (`--portforward auto`), tunnels warm (the proxy keeps them between client processes);
//! * only when named in `BENCH_TARGETS`, **spdy**: a second etcd-proxy with
//!   `--portforward spdy`, member endpoint. The simulator's SPDY connections queue more
//!   frames in flight than its WebSocket ones, so at large round trips this row separates
//!   what the tunnel protocol costs from what the proxy costs.
//!
//! Then, without tunnels, etcd-proxy in gateway mode (`--endpoints`) against direct.
//!
//! Per target and transfer the tables give the median wall time, that time over kubectl's
//! and over direct's in the same cell (below 1 is faster), the target process's CPU time
//! during the transfer (the `schedstat` of its threads) and its peak RSS (`VmHWM` after the
//! transfer, reset before it through `/proc/PID/clear_refs`). A last table compares
//! etcd-proxy with kubectl against the goals of issue 13: at most 1.0× kubectl's time at
//! every round trip, 0.5× at 20 ms.
//!
//! Noise: every process (etcd, etcdctl, kubectl, the proxy and the simulator, which runs in
//! this process) shares the machine's cores, so cells without a round trip measure CPU more
//! than tunnels. etcd starts a watch catch-up at its next sync of unsynced watchers, every
//! 100 ms, so a watch waits 0–100 ms for its first event whatever the target; the watch
//! tables give the median time to the first event, which also holds the tunnel's set-up and
//! the catch-up response (etcd sends it as one message, and etcdctl prints none of it before
//! the whole has arrived), apart from the printing that follows.
//!
//! Environment (defaults in brackets): `BENCH_RTTS` [0,10,20,50] in ms; `BENCH_SNAPSHOT_MB`
//! [60]; `BENCH_RANGE_MB` [40]; `BENCH_WATCH_EVENTS` [50000]; `BENCH_REPEAT` [1] runs per
//! target and cell (median reported; the targets take turns within a cell, so a ratio pairs
//! runs made moments apart); `BENCH_SECTIONS` [all]: transfers `snapshot`, `range`,
//! `watch` and modes `gateway`, `tunnel` (naming none of a kind keeps all of that kind);
//! `BENCH_TARGETS` [all but `spdy`] of `kubectl`, `naive`, `member`, `cluster`, `spdy`
//! (direct always runs); `BENCH_KUBECTL_WEBSOCKETS` [unset] is passed to kubectl as
//! `KUBECTL_PORT_FORWARD_WEBSOCKETS`. `ETCD_PROXY_BIN` runs another etcd-proxy build (a
//! before and after).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use etcd_client::{Client, Txn, TxnOp};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

const RANGE_PREFIX: &str = "bulk/range/";
const FILL_PREFIX: &str = "bulk/fill/";
const WATCH_PREFIX: &str = "bulk/watch/";
/// The size of each value of the range and of the rest of the database.
const VALUE_BYTES: usize = 930 * 1000;
const EVENTS_PER_TXN: usize = 100;
const EVENT_VALUE_BYTES: usize = 100;
/// What one such event adds to the database file, measured with etcd 3.4.
const EVENT_DB_BYTES: usize = 190;
/// Bound on one transfer.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(180);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str) -> Option<Vec<String>> {
    let v = std::env::var(name).ok()?;
    Some(v.split(',').map(|k| k.trim().to_owned()).collect())
}

struct Settings {
    rtts: Vec<u64>,
    snapshot_mb: u64,
    range_mb: u64,
    watch_events: usize,
    repeat: usize,
    sections: Option<Vec<String>>,
    targets: Option<Vec<String>>,
}

impl Settings {
    fn from_env() -> Self {
        let rtts = env_list("BENCH_RTTS")
            .map(|l| l.iter().filter_map(|v| v.parse().ok()).collect())
            .unwrap_or_else(|| vec![0, 10, 20, 50]);
        Settings {
            rtts,
            snapshot_mb: env_u64("BENCH_SNAPSHOT_MB", 60).max(1),
            range_mb: env_u64("BENCH_RANGE_MB", 40).max(1),
            watch_events: env_u64("BENCH_WATCH_EVENTS", 50_000) as usize,
            repeat: env_u64("BENCH_REPEAT", 1).max(1) as usize,
            sections: env_list("BENCH_SECTIONS"),
            targets: env_list("BENCH_TARGETS"),
        }
    }

    /// Transfers (`snapshot`, `range`, `watch`) and modes (`gateway`, `tunnel`) are selected
    /// separately: naming none of a kind keeps all of it.
    fn wants_section(&self, key: &str) -> bool {
        const OPS: [&str; 3] = ["snapshot", "range", "watch"];
        let Some(named) = &self.sections else {
            return true;
        };
        let same_kind = |k: &String| OPS.contains(&k.as_str()) == OPS.contains(&key);
        named.iter().any(|k| k == key) || !named.iter().any(same_kind)
    }

    /// `direct` always runs; `spdy` only when named.
    fn wants_target(&self, key: &str) -> bool {
        match &self.targets {
            _ if key == "direct" => true,
            Some(t) => t.iter().any(|k| k == key),
            None => key != "spdy",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurement

/// Resets the peak RSS of `pid` (Linux ≥ 4.0: writing 5 to `clear_refs`).
fn reset_peak(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

/// `VmHWM` of `pid`, in KiB: its peak RSS since start or the last [`reset_peak`].
fn peak_kib(pid: Option<u32>) -> Option<u64> {
    status_kib(pid?, "VmHWM:")
}

/// CPU time `pid` has run so far: the sum over its threads of the first field of
/// `/proc/PID/task/TID/schedstat` (nanoseconds on a CPU). Threads that exit take their time
/// with them, so a difference can undercount for a process that ends threads mid-transfer.
fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", pid?)).ok()?;
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(Duration::from_nanos(ns))
}

fn millis(d: Option<Duration>) -> String {
    d.map_or("–".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3))
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("–".into(), |k| format!("{:.0}", k as f64 / 1024.0))
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("–".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn ratio(a: Option<Duration>, b: Option<Duration>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if !b.is_zero() => format!("{:.2}", a.as_secs_f64() / b.as_secs_f64()),
        _ => "–".into(),
    }
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Snapshot,
    Range,
    Watch,
}

impl Op {
    fn key(self) -> &'static str {
        match self {
            Op::Snapshot => "snapshot",
            Op::Range => "range",
            Op::Watch => "watch",
        }
    }
}

/// What the seeding wrote: enough to check that a transfer arrived whole.
struct Seeded {
    range_keys: usize,
    /// `etcdctl get` output of the range: key, newline, value, newline per pair.
    range_output: usize,
    watch_from: i64,
    watch_events: usize,
}

fn etcdctl(endpoint: &str, args: &[&str]) -> Command {
    let mut all = vec![
        "--endpoints",
        endpoint,
        "--dial-timeout",
        "10s",
        "--command-timeout",
        "170s",
    ];
    all.extend_from_slice(args);
    let mut cmd = support::etcdctl(3, &all);
    cmd.stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// What one transfer took.
struct Took {
    /// Wall time, from starting `etcdctl` to its last byte.
    total: Duration,
    /// For the watch: until its first event was printed. etcd starts a catch-up at its next
    /// sync of unsynced watchers, every 100 ms, so this varies by up to that much from run
    /// to run whatever the target.
    first: Option<Duration>,
}

/// One transfer through `endpoint`.
async fn transfer(op: Op, endpoint: &str, seeded: &Seeded, dir: &Path) -> Took {
    let run = async {
        let t = Instant::now();
        match op {
            Op::Snapshot => {
                let file = dir.join("snapshot.db");
                let _ = std::fs::remove_file(&file);
                let out = etcdctl(
                    endpoint,
                    &["snapshot", "save", file.to_str().expect("utf-8")],
                )
                .stdout(Stdio::null())
                .output()
                .await
                .expect("etcdctl snapshot save");
                let took = t.elapsed();
                assert!(
                    out.status.success(),
                    "snapshot save through {endpoint}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let len = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
                assert!(
                    len as usize >= seeded.range_output,
                    "snapshot through {endpoint} is {len} bytes"
                );
                let _ = std::fs::remove_file(&file);
                Took {
                    total: took,
                    first: None,
                }
            }
            Op::Range => {
                let mut child = etcdctl(endpoint, &["get", "--prefix", RANGE_PREFIX])
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("etcdctl get");
                let mut stdout = child.stdout.take().expect("stdout");
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0;
                loop {
                    let n = stdout.read(&mut buf).await.expect("read etcdctl output");
                    if n == 0 {
                        break;
                    }
                    total += n;
                }
                let status = child.wait().await.expect("wait etcdctl");
                let took = t.elapsed();
                assert!(status.success(), "get --prefix through {endpoint} failed");
                assert_eq!(
                    total, seeded.range_output,
                    "get --prefix through {endpoint}: output size ({} keys expected)",
                    seeded.range_keys
                );
                Took {
                    total: took,
                    first: None,
                }
            }
            Op::Watch => {
                let rev = seeded.watch_from.to_string();
                let mut child = etcdctl(
                    endpoint,
                    &["watch", "--prefix", WATCH_PREFIX, "--rev", &rev],
                )
                .stdout(Stdio::piped())
                .spawn()
                .expect("etcdctl watch");
                let mut stdout = child.stdout.take().expect("stdout");
                // Three lines per event: PUT, the key, the value.
                let want = 3 * seeded.watch_events;
                let mut lines = 0;
                let mut buf = vec![0u8; 1 << 16];
                let mut first = None;
                while lines < want {
                    let n = stdout.read(&mut buf).await.expect("read etcdctl output");
                    assert!(n > 0, "watch through {endpoint} ended after {lines} lines");
                    first.get_or_insert_with(|| t.elapsed());
                    lines += buf[..n].iter().filter(|b| **b == b'\n').count();
                }
                let took = t.elapsed();
                let _ = child.kill().await;
                Took { total: took, first }
            }
        }
    };
    tokio::time::timeout(TRANSFER_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} through {endpoint} took over {TRANSFER_TIMEOUT:?}",
                op.key()
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Seeding

fn random_value(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    // Printable, so that `etcdctl get` prints it as it is; no newlines.
    (0..len).map(|_| rng.alphanumeric() as u8).collect()
}

/// How many large values make a database of about `BENCH_SNAPSHOT_MB` with the events (each
/// takes about `EVENT_DB_BYTES` in bbolt).
fn values_for(s: &Settings) -> usize {
    let events = s.watch_events * EVENT_DB_BYTES;
    (s.snapshot_mb as usize * 1_000_000)
        .saturating_sub(events)
        .div_ceil(VALUE_BYTES)
}

async fn seed(url: &str, s: &Settings) -> Seeded {
    let mut c = Client::connect([url], None).await.expect("connect");
    let mut rng = fastrand::Rng::with_seed(13);
    let range_keys = (s.range_mb as usize * 1_000_000).div_ceil(VALUE_BYTES);
    let total_keys = values_for(s);
    let mut range_output = 0;
    for i in 0..total_keys.max(range_keys) {
        let (key, value) = if i < range_keys {
            (
                format!("{RANGE_PREFIX}{i:04}"),
                random_value(&mut rng, VALUE_BYTES),
            )
        } else {
            (
                format!("{FILL_PREFIX}{i:04}"),
                random_value(&mut rng, VALUE_BYTES),
            )
        };
        if i < range_keys {
            range_output += key.len() + 1 + value.len() + 1;
        }
        c.put(key, value, None).await.expect("seed put");
    }
    let watch_from = c
        .get("bulk/none", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision()
        + 1;
    let value = vec![b'v'; EVENT_VALUE_BYTES];
    let mut written = 0;
    while written < s.watch_events {
        let n = EVENTS_PER_TXN.min(s.watch_events - written);
        let ops: Vec<TxnOp> = (written..written + n)
            .map(|i| TxnOp::put(format!("{WATCH_PREFIX}{i:06}"), value.clone(), None))
            .collect();
        c.txn(Txn::new().and_then(ops)).await.expect("seed txn");
        written += n;
    }
    Seeded {
        range_keys,
        range_output,
        watch_from,
        watch_events: s.watch_events,
    }
}

// ---------------------------------------------------------------------------------------------

struct Target {
    key: &'static str,
    name: &'static str,
    endpoint: String,
    /// The process whose peak RSS is reported.
    pid: Option<u32>,
}

/// One target's outcome in one cell: median time and highest peak RSS (KiB).
#[derive(Clone, Copy)]
struct Outcome {
    time: Option<Duration>,
    peak: Option<u64>,
    /// Median CPU time of the target's process during the transfer.
    cpu: Option<Duration>,
    /// Median time to the watch's first event.
    first: Option<Duration>,
}

/// One cell: every target `repeat` times, taking turns; per target the median time and the
/// highest peak RSS.
async fn cell(
    op: Op,
    targets: &[Target],
    seeded: &Seeded,
    repeat: usize,
    dir: &Path,
) -> Vec<Outcome> {
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
    let mut peaks: Vec<Option<u64>> = vec![None; targets.len()];
    let mut cpus: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
    let mut firsts: Vec<Vec<Duration>> = vec![Vec::new(); targets.len()];
    for round in 0..repeat {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let t = &targets[i];
            reset_peak(t.pid);
            let cpu_before = cpu_time(t.pid);
            let took = transfer(op, &t.endpoint, seeded, dir).await;
            if let (Some(a), Some(b)) = (cpu_before, cpu_time(t.pid)) {
                cpus[i].push(b.saturating_sub(a));
            }
            match took.first {
                Some(f) => eprintln!(
                    "  {} {}: {:.2} s (first event after {:.3} s)",
                    op.key(),
                    t.key,
                    took.total.as_secs_f64(),
                    f.as_secs_f64()
                ),
                None => eprintln!(
                    "  {} {}: {:.2} s",
                    op.key(),
                    t.key,
                    took.total.as_secs_f64()
                ),
            }
            times[i].push(took.total);
            firsts[i].extend(took.first);
            if let Some(p) = peak_kib(t.pid) {
                peaks[i] = Some(peaks[i].map_or(p, |q: u64| q.max(p)));
            }
        }
    }
    times
        .into_iter()
        .zip(peaks)
        .zip(cpus)
        .zip(firsts)
        .map(|(((time, peak), cpu), first)| Outcome {
            time: median(time),
            peak,
            cpu: median(cpu),
            first: median(first),
        })
        .collect()
}

fn command_line() -> String {
    let mut vars: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("BENCH_") || k == "ETCD_PROXY_BIN")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    vars.sort();
    vars.push("cargo bench --bench bulk".into());
    vars.join(" ")
}

fn scratch_dir() -> tempfile::TempDir {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(&shm) {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

fn op_title(op: Op, s: &Settings, seeded: &Seeded, db_bytes: u64) -> String {
    match op {
        Op::Snapshot => format!(
            "`etcdctl snapshot save` ({:.1} MB database)",
            db_bytes as f64 / 1e6
        ),
        Op::Range => format!(
            "`etcdctl get --prefix` ({} keys, {:.1} MB)",
            seeded.range_keys,
            seeded.range_output as f64 / 1e6
        ),
        Op::Watch => format!(
            "`etcdctl watch --rev` catching up on {} events ({} per revision)",
            s.watch_events, EVENTS_PER_TXN
        ),
    }
}

/// The port-forward counters of the simulator: WebSocket v4 upgrades, SPDY connections,
/// and of those the ones tunnelled through a WebSocket.
fn forward_counts(sim: &etcd_proxy_sim::SimCluster) -> [u64; 3] {
    [
        sim.portforward_count(),
        sim.spdy_upgrade_count(),
        sim.spdy_tunnel_count(),
    ]
}

/// Which port-forward protocol a client used, from the counters before and after.
fn protocol(before: [u64; 3], after: [u64; 3]) -> &'static str {
    let [ws, spdy, tunnelled] = [0, 1, 2].map(|i| after[i] - before[i]);
    match (ws, spdy, tunnelled) {
        (_, _, t) if t > 0 => {
            "SPDY/3.1 tunnelled through a WebSocket (`SPDY/3.1+portforward.k8s.io`)"
        }
        (_, s, _) if s > 0 => "SPDY/3.1 (`POST`, `portforward.k8s.io`)",
        (w, _, _) if w > 0 => "WebSocket (`v4.channel.k8s.io`)",
        _ => "none seen",
    }
}

/// `time / reference`: below 1 is faster than the reference.
fn time_ratio(r: &[Outcome], i: usize, reference: Option<usize>) -> String {
    match reference {
        Some(j) if j != i => ratio(r[i].time, r[j].time),
        Some(_) => "1.00".into(),
        None => "–".into(),
    }
}

/// What the figures of issue 13 ask of etcd-proxy against kubectl at `rtt`.
fn goal(rtt: u64) -> f64 {
    if rtt == 20 {
        0.5
    } else {
        1.0
    }
}

#[tokio::main]
async fn main() {
    let s = Settings::from_env();
    let dir = scratch_dir();
    println!("# Bulk transfers through a tunnel with a round trip");
    println!();
    println!("* command: `{}`", command_line());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "* machine: nproc {cpus}, {} build; one real etcd {} member (simulated Kubernetes), \
         every process on the same machine",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        support::etcd_version()
    );
    println!(
        "* RTT: the simulator delays every port-forward frame by RTT/2 each way; time is one \
         `etcdctl` process end to end, median of {} run(s), targets taking turns; `× kubectl` \
         and `× direct` are that time over kubectl's and direct's in the same cell (below 1 \
         is faster); CPU is the target process's CPU time during the transfer (median), peak \
         RSS its VmHWM during the transfer (MiB)",
        s.repeat
    );

    let sim = support::cluster(1).await;
    let pod = sim.pod_names()[0].clone();
    let direct = sim.member_client_url(&pod).expect("member url");
    eprintln!("seeding {direct}");
    let seeded = seed(&direct, &s).await;
    let db_bytes = {
        let mut c = Client::connect([direct.as_str()], None)
            .await
            .expect("connect");
        c.status().await.expect("status").db_size() as u64
    };
    println!(
        "* database: {:.1} MB ({} values of {} KB, {} events of {} bytes)",
        db_bytes as f64 / 1e6,
        values_for(&s).max(seeded.range_keys),
        VALUE_BYTES / 1000,
        s.watch_events,
        EVENT_VALUE_BYTES
    );

    let ops: Vec<Op> = [Op::Snapshot, Op::Range, Op::Watch]
        .into_iter()
        .filter(|o| s.wants_section(o.key()))
        .collect();

    if s.wants_section("gateway") {
        gateway(&s, &ops, &direct, &seeded, db_bytes, dir.path()).await;
    }
    if s.wants_section("tunnel") {
        tunnel(&s, &ops, &sim, &pod, &direct, &seeded, db_bytes, dir.path()).await;
    }
}

/// etcd-proxy in gateway mode (`--endpoints`, no tunnel) against direct.
async fn gateway(
    s: &Settings,
    ops: &[Op],
    direct: &str,
    seeded: &Seeded,
    db_bytes: u64,
    dir: &Path,
) {
    eprintln!("gateway mode");
    let gw = support::start_proxy_args(&["--endpoints", direct, "--listen", "127.0.0.1:0"]).await;
    support::ctl3(&gw.cluster_addr, &["get", "bulk/none"]).await;
    let gw_pid = gw.child.id();
    let targets = vec![
        Target {
            key: "direct",
            name: "direct",
            endpoint: direct.to_owned(),
            pid: None,
        },
        Target {
            key: "member",
            name: "etcd-proxy member",
            endpoint: gw.members[0].1.clone(),
            pid: gw_pid,
        },
        Target {
            key: "cluster",
            name: "etcd-proxy cluster",
            endpoint: gw.cluster_addr.clone(),
            pid: gw_pid,
        },
    ];
    let targets: Vec<Target> = targets
        .into_iter()
        .filter(|t| s.wants_target(t.key))
        .collect();
    println!();
    println!("## Gateway mode (`--endpoints`, no tunnel)");
    println!();
    println!("| transfer | target | time | × direct | throughput / direct | CPU | peak RSS |");
    println!("|---|---|---|---|---|---|---|");
    for &op in ops {
        let r = cell(op, &targets, seeded, s.repeat, dir).await;
        for (i, t) in targets.iter().enumerate() {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                op_title(op, s, seeded, db_bytes),
                t.name,
                secs(r[i].time),
                time_ratio(&r, i, Some(0)),
                ratio(r[0].time, r[i].time),
                millis(r[i].cpu),
                mib(r[i].peak)
            );
        }
    }
}

/// Through tunnels with a round trip: direct, kubectl, the per-connection forwarder and
/// etcd-proxy, per transfer and RTT.
#[allow(clippy::too_many_arguments)]
async fn tunnel(
    s: &Settings,
    ops: &[Op],
    sim: &etcd_proxy_sim::SimCluster,
    pod: &str,
    direct: &str,
    seeded: &Seeded,
    db_bytes: u64,
    dir: &Path,
) {
    println!();
    println!("## Through port-forward tunnels");
    println!();
    // kubectl first, alone, so that the simulator's counters tell which protocol it uses.
    let kubectl = if !s.wants_target("kubectl") {
        None
    } else if !support::kubectl::installed() {
        println!("* kubectl is not installed: no `kubectl port-forward` rows");
        None
    } else {
        let before = forward_counts(sim);
        let websockets = std::env::var("BENCH_KUBECTL_WEBSOCKETS").ok();
        let pf = support::kubectl::port_forward(
            sim.kubeconfig_path(),
            "sim",
            sim.namespace(),
            pod,
            2379,
            websockets.as_deref(),
        )
        .await;
        support::ctl3(&pf.addr, &["get", "bulk/none"]).await;
        let version = std::process::Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default();
        println!(
            "* `kubectl port-forward pod/{pod}` ({version}, KUBECTL_PORT_FORWARD_WEBSOCKETS {}) \
             used {}",
            websockets.as_deref().unwrap_or("unset"),
            protocol(before, forward_counts(sim))
        );
        Some(pf)
    };
    let before = forward_counts(sim);
    let proxy = support::start_proxy(sim, &[]).await;
    let proxy_pid = proxy.child.id();
    let member = proxy.members[0].1.clone();
    for ep in [&member, &proxy.cluster_addr] {
        // Warm: the proxy's tunnel to the member is open before the first transfer.
        support::ctl3(ep, &["get", "bulk/none"]).await;
    }
    println!(
        "* etcd-proxy (`--portforward auto`) used {}; its RSS before the transfers: {} MiB",
        protocol(before, forward_counts(sim)),
        mib(proxy_pid.and_then(|p| status_kib(p, "VmRSS:")))
    );
    let spdy = if s.wants_target("spdy") {
        let p = support::start_proxy(sim, &["--portforward", "spdy"]).await;
        support::ctl3(&p.members[0].1, &["get", "bulk/none"]).await;
        Some(p)
    } else {
        None
    };
    let naive = if s.wants_target("naive") {
        Some(support::forwarder::naive_forwarder(sim, pod).await)
    } else {
        None
    };
    let mut targets = vec![Target {
        key: "direct",
        name: "direct",
        endpoint: direct.to_owned(),
        pid: None,
    }];
    if let Some(k) = &kubectl {
        targets.push(Target {
            key: "kubectl",
            name: "kubectl port-forward",
            endpoint: k.addr.clone(),
            pid: k.pid,
        });
    }
    if let Some((addr, _)) = &naive {
        targets.push(Target {
            key: "naive",
            name: "port-forward/conn (kube-rs)",
            endpoint: addr.clone(),
            pid: None,
        });
    }
    for (key, name, endpoint) in [
        ("member", "etcd-proxy member", member),
        ("cluster", "etcd-proxy cluster", proxy.cluster_addr.clone()),
    ] {
        if s.wants_target(key) {
            targets.push(Target {
                key,
                name,
                endpoint,
                pid: proxy_pid,
            });
        }
    }
    if let Some(p) = &spdy {
        targets.push(Target {
            key: "spdy",
            name: "etcd-proxy member, `--portforward spdy`",
            endpoint: p.members[0].1.clone(),
            pid: p.child.id(),
        });
    }
    let kubectl_at = targets.iter().position(|t| t.key == "kubectl");
    // (transfer, RTT, etcd-proxy target, ratio to kubectl) for the summary.
    let mut figures: Vec<(Op, u64, &'static str, String)> = Vec::new();
    for &op in ops {
        println!();
        println!("### {}", op_title(op, s, seeded, db_bytes));
        println!();
        let watch = op == Op::Watch;
        println!(
            "| RTT | target | time |{} × kubectl | × direct | CPU | peak RSS |",
            if watch { " first event |" } else { "" }
        );
        println!(
            "|---|---|---|{}---|---|---|---|",
            if watch { "---|" } else { "" }
        );
        for &rtt in &s.rtts {
            sim.set_latency(Duration::from_millis(rtt) / 2);
            eprintln!("{} at {rtt} ms RTT", op.key());
            let r = cell(op, &targets, seeded, s.repeat, dir).await;
            for (i, t) in targets.iter().enumerate() {
                let first = if watch {
                    format!(" {} |", secs(r[i].first))
                } else {
                    String::new()
                };
                println!(
                    "| {rtt} ms | {} | {} |{first} {} | {} | {} | {} |",
                    t.name,
                    secs(r[i].time),
                    time_ratio(&r, i, kubectl_at),
                    time_ratio(&r, i, Some(0)),
                    millis(r[i].cpu),
                    mib(r[i].peak)
                );
                if t.key == "member" || t.key == "cluster" {
                    figures.push((op, rtt, t.key, time_ratio(&r, i, kubectl_at)));
                }
            }
        }
        sim.set_latency(Duration::ZERO);
    }
    if kubectl_at.is_none() || figures.is_empty() {
        return;
    }
    println!();
    println!("## etcd-proxy against kubectl");
    println!();
    println!("| transfer | RTT | endpoint | × kubectl | goal | met |");
    println!("|---|---|---|---|---|---|");
    for (op, rtt, key, r) in figures {
        let met = r
            .parse::<f64>()
            .map_or("–", |v| if v <= goal(rtt) { "yes" } else { "no" });
        println!(
            "| {} | {rtt} ms | {key} | {r} | ≤ {:.1} | {met} |",
            op.key(),
            goal(rtt)
        );
    }
}
