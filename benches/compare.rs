//! etcd-proxy side by side with etcd's own proxies, on the same real 3-member etcd cluster.
//!
//! `cargo bench --bench compare` — not a test: it prints markdown tables, it asserts nothing.
//!
//! Targets, all in one invocation against the simulated cluster's real etcd 3.4 members:
//!
//! * **direct**: the members themselves (the physical limit). Serial latency goes to the leader
//!   and to a follower (ratios are to the leader), cold starts to `etcd-0`; throughput spreads
//!   the client connections over the three members.
//! * **etcd gateway** (L4 TCP round robin) and **etcd grpc-proxy** (L7), both from `/usr/bin/etcd`.
//! * **etcd-proxy gateway mode** (`--endpoints`, direct TCP to the members), through its cluster
//!   endpoint (linearizable reads to the leader, the default; and a second proxy with
//!   `--reads spread`) and through `etcd-0`'s own endpoint (the cost of the hop alone, same
//!   member as direct).
//! * **etcd-proxy tunnel mode** (through the simulated cluster's port-forward tunnels).
//!
//! Measured: serial linearizable get latency, get and put throughput with 100 clients over 10
//! connections, cold `etcdctl get` processes, the RSS of each proxy idle and holding 1,000 HTTP/2
//! connections, and (tunnel mode with injected latency) a cold `etcdctl get` through etcd-proxy
//! against a naive forwarder that opens one port-forward per accepted connection.
//!
//! Environment overrides (defaults in brackets): `BENCH_SECONDS` [5] per throughput run,
//! `BENCH_WARMUP_MS` [500] of unrecorded load before each run, `BENCH_REPEAT` [3] runs per
//! target (median reported), `BENCH_CLIENTS` [100], `BENCH_CONNS` [10] connections,
//! `BENCH_SERIAL_GETS` [2000], `BENCH_COLD_GETS` [50], `BENCH_H2_CONNS` [1000],
//! `BENCH_LATENCY_MS` [10] one-way, `BENCH_LATENCY_GETS` [11]. For a quick loop while
//! profiling, `BENCH_TARGETS` keeps only the targets named (comma-separated: `gateway`,
//! `grpc-proxy`, `endpoints`, `endpoints-spread`, `endpoints-member`, `tunnels`, `naive`; direct
//! always runs) and `BENCH_SECTIONS` only the sections named (`serial`, `throughput`, `cold`, `memory`,
//! `latency`). `BENCH_PROXY_LOG` [etcd-proxy's default] is the log filter etcd-proxy runs with.
//!
//! `BENCH_CPUS` [`shared`]: with `shared`, every process competes for every core, so a ratio
//! measures what a request costs the whole machine. With `split`, the etcd members run on CPU 0
//! and everything else (this load generator, the simulated API server, every proxy) on the
//! other CPUs, pinned with `taskset`. That is the deployment etcd-proxy is for: the cluster is on
//! other machines than the laptop running the proxy and its clients, so the proxy's CPU does
//! not slow etcd down, and what it saves etcd (reads and writes sent to the leader) shows.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use etcd_client::Client;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

const GET_KEY: &str = "bench/get";
const VALUE_BYTES: usize = 256;
/// Bound on any single request; a request that takes longer counts as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Settings {
    seconds: u64,
    warmup: Duration,
    repeat: usize,
    clients: usize,
    conns: usize,
    serial_gets: usize,
    cold_gets: usize,
    h2_conns: usize,
    latency: Duration,
    latency_gets: usize,
    targets: Option<Vec<String>>,
    sections: Option<Vec<String>>,
    split_cpus: bool,
}

impl Settings {
    fn from_env() -> Self {
        Settings {
            seconds: env_u64("BENCH_SECONDS", 5).max(1),
            warmup: Duration::from_millis(env_u64("BENCH_WARMUP_MS", 500)),
            repeat: env_u64("BENCH_REPEAT", 3).max(1) as usize,
            clients: env_u64("BENCH_CLIENTS", 100).max(1) as usize,
            conns: env_u64("BENCH_CONNS", 10).max(1) as usize,
            serial_gets: env_u64("BENCH_SERIAL_GETS", 2000).max(1) as usize,
            cold_gets: env_u64("BENCH_COLD_GETS", 50).max(1) as usize,
            h2_conns: env_u64("BENCH_H2_CONNS", 1000) as usize,
            latency: Duration::from_millis(env_u64("BENCH_LATENCY_MS", 10)),
            latency_gets: env_u64("BENCH_LATENCY_GETS", 11).max(1) as usize,
            targets: env_list("BENCH_TARGETS"),
            sections: env_list("BENCH_SECTIONS"),
            split_cpus: match std::env::var("BENCH_CPUS").as_deref() {
                Ok("split") => true,
                Ok("shared") | Err(_) => false,
                Ok(other) => panic!("BENCH_CPUS={other}: expected `shared` or `split`"),
            },
        }
    }

    fn wants_target(&self, key: &str) -> bool {
        key == "direct"
            || self
                .targets
                .as_ref()
                .is_none_or(|t| t.iter().any(|k| k == key))
    }

    fn wants_section(&self, key: &str) -> bool {
        self.sections
            .as_ref()
            .is_none_or(|t| t.iter().any(|k| k == key))
    }
}

fn env_list(name: &str) -> Option<Vec<String>> {
    let v = std::env::var(name).ok()?;
    Some(v.split(',').map(|k| k.trim().to_owned()).collect())
}

// ---------------------------------------------------------------------------------------------
// Statistics and formatting

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_dur(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    let m = d.as_secs_f64() * 1000.0;
    if m < 10.0 {
        format!("{m:.3} ms")
    } else {
        format!("{m:.1} ms")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "?".into()
    }
}

fn dratio(a: Duration, b: Duration) -> String {
    ratio(a.as_secs_f64(), b.as_secs_f64())
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) the process has used so far. Assumes `CLK_TCK` = 100, the Linux
/// default (no libc here to ask `sysconf`).
fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace().skip(11);
    let ticks: u64 = f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Pins every thread of process `pid` to `cpus` (a `taskset` CPU list); threads it starts
/// later inherit the mask.
fn pin(pid: u32, cpus: &str) {
    let status = std::process::Command::new("taskset")
        .args(["--all-tasks", "--pid", "--cpu-list", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .expect("BENCH_CPUS=split needs taskset (util-linux)");
    assert!(
        status.success(),
        "taskset could not pin process {pid} to CPUs {cpus}"
    );
}

fn host_port(url: &str) -> &str {
    url.split_once("://").map_or(url, |(_, a)| a)
}

// ---------------------------------------------------------------------------------------------
// Targets

/// Something to benchmark: where a lone client goes, where a crowd of clients goes, and the
/// process behind it (none for direct).
struct Target {
    /// The name `BENCH_TARGETS` selects it by.
    key: &'static str,
    name: &'static str,
    /// One endpoint, for serial latency and cold starts.
    serial: String,
    /// Client connection `i` goes to `spread[i % len]`.
    spread: Vec<String>,
    pid: Option<u32>,
}

/// `etcd gateway` or `etcd grpc-proxy` from the installed etcd.
struct GoProxy {
    child: Child,
    addr: String,
}

async fn start_go_proxy(kind: &str, members: &[String], dir: &Path) -> GoProxy {
    let addr = format!("127.0.0.1:{}", support::free_port());
    let endpoints = members
        .iter()
        .map(|m| host_port(m))
        .collect::<Vec<_>>()
        .join(",");
    let log_path = dir.join(format!("{kind}.log"));
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut cmd = Command::new("etcd");
    cmd.args([kind, "start"])
        .arg(format!("--listen-addr={addr}"))
        .arg(format!("--endpoints={endpoints}"));
    if kind == "grpc-proxy" {
        cmd.arg(format!(
            "--data-dir={}",
            dir.join("grpc-proxy.data").display()
        ));
    }
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn etcd proxy");
    if !wait_ready(&addr).await {
        panic!(
            "etcd {kind} did not serve a get within {:?}; its log:\n{}",
            support::DEADLINE,
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    GoProxy { child, addr }
}

/// Waits until a linearizable get through `addr` succeeds.
async fn wait_ready(addr: &str) -> bool {
    let deadline = Instant::now() + support::DEADLINE;
    while Instant::now() < deadline {
        let attempt = tokio::time::timeout(Duration::from_secs(3), async {
            let mut c = Client::connect([addr], None).await.ok()?;
            c.get(GET_KEY, None).await.ok()
        })
        .await;
        if let Ok(Some(_)) = attempt {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Serial latency

/// Serial gets through each endpoint, interleaved: `rounds` rounds, each running a share of
/// the gets against every endpoint in turn (starting one endpoint later each round), so that
/// a slow moment of the machine hits every target alike. Returns each endpoint's latencies by
/// round.
async fn serial_latency(
    endpoints: &[String],
    gets: usize,
    rounds: usize,
) -> Vec<Vec<Vec<Duration>>> {
    let mut clients = Vec::new();
    for endpoint in endpoints {
        let mut c = Client::connect([endpoint.as_str()], None)
            .await
            .expect("connect");
        for _ in 0..(gets / 10).max(50) {
            c.get(GET_KEY, None).await.expect("warm-up get");
        }
        clients.push(c);
    }
    let per_round = gets.div_ceil(rounds);
    let mut lat = vec![Vec::with_capacity(rounds); endpoints.len()];
    for round in 0..rounds {
        for k in 0..clients.len() {
            let i = (round + k) % clients.len();
            let mut this = Vec::with_capacity(per_round);
            for _ in 0..per_round {
                let t = Instant::now();
                clients[i].get(GET_KEY, None).await.expect("get");
                this.push(t.elapsed());
            }
            this.sort();
            lat[i].push(this);
        }
    }
    lat
}

// ---------------------------------------------------------------------------------------------
// Throughput

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Get,
    Put,
}

struct Run {
    ops_per_sec: f64,
    /// CPU time of the target's process per 1,000 recorded ops.
    cpu_per_kop: Option<Duration>,
    /// CPU time of all etcd members together per 1,000 recorded ops.
    etcd_cpu_per_kop: Option<Duration>,
    /// CPU time of this process (the load generator, and the simulated API server, which
    /// carries the tunnel target's traffic) per 1,000 recorded ops.
    bench_cpu_per_kop: Option<Duration>,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

/// `clients` tasks over `conns` connections (connection `i` to `spread[i % len]`), each
/// repeating `op` back to back; ops that start during the warm-up are not recorded.
async fn load(spread: &[String], pid: Option<u32>, etcd_pids: &[u32], op: Op, s: &Settings) -> Run {
    let mut conns = Vec::with_capacity(s.conns);
    for i in 0..s.conns {
        let ep = spread[i % spread.len()].as_str();
        let mut c = Client::connect([ep], None).await.expect("connect");
        c.get(GET_KEY, None).await.expect("first get");
        conns.push(c);
    }
    let start = Instant::now() + s.warmup;
    let end = start + Duration::from_secs(s.seconds);
    let value = vec![b'v'; VALUE_BYTES];
    let etcd_pids = etcd_pids.to_vec();
    let cpu = tokio::spawn(async move {
        let sample = |pids: &[u32]| -> Vec<Option<Duration>> {
            let mut all: Vec<Option<Duration>> =
                vec![cpu_time(pid), cpu_time(Some(std::process::id()))];
            let etcd: Option<Duration> = pids.iter().map(|p| cpu_time(Some(*p))).sum();
            all.push(etcd);
            all
        };
        tokio::time::sleep_until(start.into()).await;
        let before = sample(&etcd_pids);
        tokio::time::sleep_until(end.into()).await;
        let after = sample(&etcd_pids);
        before
            .into_iter()
            .zip(after)
            .map(|(b, a)| Some(a?.saturating_sub(b?)))
            .collect::<Vec<_>>()
    });
    let mut tasks = Vec::with_capacity(s.clients);
    for task in 0..s.clients {
        let mut c = conns[task % s.conns].clone();
        let key = format!("bench/put/{task}");
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let ok = match op {
                    Op::Get => matches!(
                        tokio::time::timeout(OP_TIMEOUT, c.get(GET_KEY, None)).await,
                        Ok(Ok(_))
                    ),
                    Op::Put => matches!(
                        tokio::time::timeout(OP_TIMEOUT, c.put(key.as_str(), value.clone(), None))
                            .await,
                        Ok(Ok(_))
                    ),
                };
                if t >= start {
                    if ok {
                        lat.push(t.elapsed());
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.expect("load task");
        all.extend(lat);
        errors += e;
    }
    all.sort();
    let cpu = cpu.await.expect("cpu sampler");
    let per_kop = |c: Option<Duration>| {
        c.filter(|_| !all.is_empty())
            .map(|c| c.mul_f64(1000.0 / all.len() as f64))
    };
    Run {
        ops_per_sec: all.len() as f64 / s.seconds as f64,
        cpu_per_kop: per_kop(cpu[0]),
        bench_cpu_per_kop: per_kop(cpu[1]),
        etcd_cpu_per_kop: per_kop(cpu[2]),
        p50: percentile(&all, 50),
        p99: percentile(&all, 99),
        errors,
    }
}

// ---------------------------------------------------------------------------------------------
// Cold starts

/// Wall time of `n` sequential `etcdctl get` processes against `endpoint`, and their median.
async fn cold_gets(endpoint: &str, n: usize) -> (Duration, Duration) {
    let mut each = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        support::ctl3(endpoint, &["get", GET_KEY]).await;
        each.push(t.elapsed());
    }
    (t0.elapsed(), median_dur(each))
}

// ---------------------------------------------------------------------------------------------
// Open HTTP/2 connections

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_SETTINGS: u8 = 4;
const FLAG_ACK: u8 = 1;

/// Opens a TCP connection, sends the HTTP/2 preface and an empty SETTINGS frame, waits for the
/// server's SETTINGS and acknowledges it. The returned task keeps reading (and discarding)
/// until the connection ends; it reports whether it is still open.
async fn h2_connection(addr: &str) -> std::io::Result<JoinHandle<()>> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let mut hello = H2_PREFACE.to_vec();
    hello.extend_from_slice(&[0, 0, 0, FRAME_SETTINGS, 0, 0, 0, 0, 0]);
    s.write_all(&hello).await?;
    let handshake = async {
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await?;
            if head[3] == FRAME_SETTINGS && head[4] & FLAG_ACK == 0 {
                s.write_all(&[0, 0, 0, FRAME_SETTINGS, FLAG_ACK, 0, 0, 0, 0])
                    .await?;
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no SETTINGS"))??;
    Ok(tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    }))
}

/// RSS of `pid` while `n` HTTP/2 connections to `addr` are held: (established, still open
/// when sampled, RSS).
async fn rss_with_connections(
    addr: &str,
    pid: Option<u32>,
    n: usize,
) -> (usize, usize, Option<u64>) {
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|_| h2_connection(addr))
        .buffer_unordered(50)
        .collect()
        .await;
    let held: Vec<JoinHandle<()>> = results.into_iter().filter_map(Result::ok).collect();
    let established = held.len();
    tokio::time::sleep(Duration::from_millis(1000)).await; // let the proxy settle
    let rss = rss_kib(pid);
    let open = held.iter().filter(|h| !h.is_finished()).count();
    for h in &held {
        h.abort();
    }
    (established, open, rss)
}

/// Median wall time of `n` cold `etcdctl get` processes against `endpoint`, and how many
/// port-forwards they opened.
async fn cold_through_tunnels(
    sim: &etcd_proxy_sim::SimCluster,
    endpoint: &str,
    n: usize,
) -> (Duration, u64) {
    support::ctl3(endpoint, &["get", GET_KEY]).await; // warm-up, not counted
    let before = sim.portforward_count();
    let mut each = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        support::ctl3(endpoint, &["get", GET_KEY]).await;
        each.push(t.elapsed());
    }
    (median_dur(each), sim.portforward_count() - before)
}

// ---------------------------------------------------------------------------------------------

async fn leader_of(sim: &etcd_proxy_sim::SimCluster) -> String {
    for pod in sim.pod_names() {
        let url = sim.member_client_url(&pod).expect("member url");
        let mut c = Client::connect([url.as_str()], None)
            .await
            .expect("connect");
        let s = c.status().await.expect("status");
        if s.leader() == s.header().expect("header").member_id() {
            return pod;
        }
    }
    "?".into()
}

fn command_line() -> String {
    let mut vars: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("BENCH_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    vars.sort();
    vars.push("cargo bench --bench compare".into());
    vars.join(" ")
}

fn machine_note() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let etcd = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "etcd ?".into());
    format!(
        "nproc {cpus} ({model}); {etcd}; {} build",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    )
}

#[tokio::main]
async fn main() {
    // etcd-proxy runs with its default log filter, as users run it (spans per connection
    // included); BENCH_PROXY_LOG overrides.
    let log = std::env::var("BENCH_PROXY_LOG").unwrap_or_else(|_| "etcd_proxy=info,error".into());
    std::env::set_var("ETCD_PROXY_TEST_LOG", log);
    let s = Settings::from_env();
    let work = tempfile::tempdir().expect("tempdir");

    println!("# etcd-proxy compared with etcd's own proxies");
    println!();
    println!("* command: `{}`", command_line());
    println!("* machine: {}", machine_note());
    println!(
        "* one real 3-member etcd cluster (simulated Kubernetes); load generator: etcd-client \
         in this process (tokio), on the same machine as etcd, the proxies and the \
         simulated API server; ratio = value / direct"
    );

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if s.split_cpus {
        assert!(
            cpus >= 2,
            "BENCH_CPUS=split needs at least 2 CPUs, this machine has {cpus}"
        );
        // Before anything is spawned: every child (proxies included) inherits this mask.
        pin(std::process::id(), &format!("1-{}", cpus - 1));
        let rest = if cpus == 2 {
            "CPU 1".to_owned()
        } else {
            format!("CPUs 1-{}", cpus - 1)
        };
        println!(
            "* CPUs split: the etcd members run on CPU 0, everything else on {rest} \
             (as when the cluster runs on other machines than the proxy and its clients)"
        );
    } else {
        println!("* CPUs shared: every process may run on every core");
    }

    let sim = support::cluster(3).await;
    if s.split_cpus {
        for pid in sim.etcd_pids() {
            pin(pid, "0");
        }
    }
    let members: Vec<String> = sim
        .pod_names()
        .iter()
        .map(|p| sim.member_client_url(p).expect("member url"))
        .collect();
    {
        let mut c = Client::connect([members[0].as_str()], None)
            .await
            .expect("connect");
        c.put(GET_KEY, vec![b'g'; VALUE_BYTES], None)
            .await
            .expect("seed put");
    }
    let leader = leader_of(&sim).await;
    println!(
        "* members: {} (leader: {leader}); direct cold starts go to {}",
        sim.pod_names().join(" "),
        sim.pod_names()[0]
    );

    eprintln!("starting etcd gateway, etcd grpc-proxy and etcd-proxy (both modes)");
    let gateway = start_go_proxy("gateway", &members, work.path()).await;
    let grpc_proxy = start_go_proxy("grpc-proxy", &members, work.path()).await;
    let endpoints_arg = members.join(",");
    // Every client of this bench comes from 127.0.0.1, and the memory section holds its
    // connections idle for seconds: lift the per-address limits and the untrusted-idle
    // timeout, which are there for strangers, so that every target serves the same load.
    let unlimited = [
        "--max-connections-per-address",
        "100000",
        "--max-connection-rate-per-address",
        "100000",
        "--header-timeout",
        "10m",
    ];
    let ep_gateway = support::start_proxy_args(
        &[
            &["--endpoints", &endpoints_arg, "--listen", "127.0.0.1:0"][..],
            &unlimited,
        ]
        .concat(),
    )
    .await;
    let ep_spread = support::start_proxy_args(
        &[
            &[
                "--endpoints",
                &endpoints_arg,
                "--listen",
                "127.0.0.1:0",
                "--reads",
                "spread",
            ][..],
            &unlimited,
        ]
        .concat(),
    )
    .await;
    let ep_tunnel = support::start_proxy(&sim, &unlimited).await;
    let pod = sim.pod_names()[0].clone();
    let (naive_addr, _naive) = support::forwarder::naive_forwarder(&sim, &pod).await;
    for addr in [
        &ep_gateway.cluster_addr,
        &ep_spread.cluster_addr,
        &ep_tunnel.cluster_addr,
        &naive_addr,
    ] {
        assert!(wait_ready(addr).await, "etcd-proxy at {addr} serves no get");
    }

    let targets = vec![
        Target {
            key: "direct",
            name: "direct",
            serial: members[0].clone(),
            spread: members.clone(),
            pid: None,
        },
        Target {
            key: "gateway",
            name: "etcd gateway (L4)",
            serial: gateway.addr.clone(),
            spread: vec![gateway.addr.clone()],
            pid: gateway.child.id(),
        },
        Target {
            key: "grpc-proxy",
            name: "etcd grpc-proxy (L7)",
            serial: grpc_proxy.addr.clone(),
            spread: vec![grpc_proxy.addr.clone()],
            pid: grpc_proxy.child.id(),
        },
        Target {
            key: "endpoints",
            name: "etcd-proxy --endpoints",
            serial: ep_gateway.cluster_addr.clone(),
            spread: vec![ep_gateway.cluster_addr.clone()],
            pid: ep_gateway.child.id(),
        },
        Target {
            key: "endpoints-spread",
            name: "etcd-proxy --endpoints --reads spread",
            serial: ep_spread.cluster_addr.clone(),
            spread: vec![ep_spread.cluster_addr.clone()],
            pid: ep_spread.child.id(),
        },
        Target {
            key: "endpoints-member",
            name: "etcd-proxy --endpoints, etcd-0's own endpoint",
            serial: ep_gateway.members[0].1.clone(),
            spread: vec![ep_gateway.members[0].1.clone()],
            pid: ep_gateway.child.id(),
        },
        Target {
            key: "tunnels",
            name: "etcd-proxy tunnels",
            serial: ep_tunnel.cluster_addr.clone(),
            spread: vec![ep_tunnel.cluster_addr.clone()],
            pid: ep_tunnel.child.id(),
        },
        Target {
            key: "naive",
            name: "reference: naive port-forward per connection (etcd-0)",
            serial: naive_addr.clone(),
            spread: vec![naive_addr.clone()],
            pid: None,
        },
    ];
    let targets: Vec<Target> = targets
        .into_iter()
        .filter(|t| s.wants_target(t.key))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_fresh: Vec<Option<u64>> = targets.iter().map(|t| rss_kib(t.pid)).collect();

    if s.wants_section("serial") {
        // Serial latency. Direct to both raft roles: a follower answers a linearizable get
        // only after a ReadIndex round trip to the leader.
        eprintln!("serial gets");
        let pods = sim.pod_names();
        // Ratios are to the leader, the fastest a linearizable get can be.
        let follower = pods
            .iter()
            .find(|p| **p != leader)
            .expect("a follower")
            .clone();
        let mut rows: Vec<(String, String)> = targets
            .iter()
            .map(|t| (t.name.to_owned(), t.serial.clone()))
            .collect();
        rows[0] = (
            format!("direct to {leader} (leader)"),
            sim.member_client_url(&leader).expect("member url"),
        );
        rows.insert(
            1,
            (
                format!("direct to {follower} (follower)"),
                sim.member_client_url(&follower).expect("member url"),
            ),
        );
        // The floor for any proxy: one extra hop that does nothing but copy bytes, as a
        // separate process (etcd's L4 gateway with the leader as its only endpoint).
        let relay_dir = work.path().join("leader-relay");
        std::fs::create_dir_all(&relay_dir).expect("relay dir");
        let leader_url = sim.member_client_url(&leader).expect("member url");
        let relay = start_go_proxy("gateway", std::slice::from_ref(&leader_url), &relay_dir).await;
        rows.insert(
            2,
            (
                "reference: one bare TCP hop to the leader (etcd gateway, leader only)".into(),
                relay.addr.clone(),
            ),
        );
        let endpoints: Vec<String> = rows.iter().map(|(_, e)| e.clone()).collect();
        let rounds = 10;
        let by_round = serial_latency(&endpoints, s.serial_gets, rounds).await;
        drop(relay);
        let all: Vec<Vec<Duration>> = by_round
            .iter()
            .map(|r| {
                let mut v: Vec<Duration> = r.iter().flatten().copied().collect();
                v.sort();
                v
            })
            .collect();
        let p = |i: usize, q: usize| percentile(&all[i], q);
        println!();
        println!(
            "## Serial linearizable get, 1 client ({} gets per target after {} warm-up gets, \
             interleaved in {rounds} rounds)",
            s.serial_gets,
            (s.serial_gets / 10).max(50)
        );
        println!();
        println!(
            "| target | p50 | p99 | p50 ratio to the leader | p50 ratio round by round: median (min-max) | p99 ratio |"
        );
        println!("|---|---|---|---|---|---|");
        for (i, (name, _)) in rows.iter().enumerate() {
            let paired: Vec<f64> = (0..rounds)
                .map(|r| {
                    percentile(&by_round[i][r], 50).as_secs_f64()
                        / percentile(&by_round[0][r], 50).as_secs_f64()
                })
                .collect();
            let (lo, hi) = paired
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            println!(
                "| {} | {} | {} | {} | {:.2} ({lo:.2}-{hi:.2}) | {} |",
                name,
                ms(p(i, 50)),
                ms(p(i, 99)),
                dratio(p(i, 50), p(0, 50)),
                median_f64(paired),
                dratio(p(i, 99), p(0, 99))
            );
        }
    }
    // Throughput, repeats interleaved across targets so drift hits every target alike, and
    // each round starts one target later, so no target always follows the same one (a
    // grpc-proxy run leaves etcd with garbage to collect, for one).
    let mut opened_during_load = vec![0u64; targets.len()];
    let ops: &[Op] = if s.wants_section("throughput") {
        &[Op::Get, Op::Put]
    } else {
        &[]
    };
    for &op in ops {
        let mut runs: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
        for rep in 0..s.repeat {
            for k in 0..targets.len() {
                let i = (k + rep) % targets.len();
                let t = &targets[i];
                eprintln!(
                    "{} throughput, run {}/{}: {}",
                    if op == Op::Get { "get" } else { "put" },
                    rep + 1,
                    s.repeat,
                    t.name
                );
                let before = sim.portforward_count();
                let etcd_pids = sim.etcd_pids();
                runs[i].push(load(&t.spread, t.pid, &etcd_pids, op, &s).await);
                opened_during_load[i] += sim.portforward_count() - before;
            }
        }
        println!();
        println!(
            "## {} throughput: {} clients over {} connections, {} s per run, median of {} runs",
            if op == Op::Get {
                "Linearizable get"
            } else {
                "Put (256-byte values)"
            },
            s.clients,
            s.conns,
            s.seconds,
            s.repeat
        );
        println!();
        println!(
            "| target | ops/s | p50 | p99 | ops/s ratio | ops/s ratio round by round: median (min-max) | p50 ratio | p99 ratio | errors | CPU per 1k ops: proxy / etcd (3 members) / bench process | ops/s of each run |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        let med = |r: &[Run]| {
            (
                median_f64(r.iter().map(|x| x.ops_per_sec).collect()),
                median_dur(r.iter().map(|x| x.p50).collect()),
                median_dur(r.iter().map(|x| x.p99).collect()),
            )
        };
        let direct = med(&runs[0]);
        for (t, r) in targets.iter().zip(&runs) {
            let (ops, p50, p99) = med(r);
            let cpu_of = |f: fn(&Run) -> Option<Duration>| {
                let v: Vec<Duration> = r.iter().filter_map(f).collect();
                if v.is_empty() {
                    "-".to_owned()
                } else {
                    ms(median_dur(v))
                }
            };
            let cpu = format!(
                "{} / {} / {}",
                cpu_of(|x| x.cpu_per_kop),
                cpu_of(|x| x.etcd_cpu_per_kop),
                cpu_of(|x| x.bench_cpu_per_kop)
            );
            // Each round runs every target back to back, so a ratio within a round is the
            // one least disturbed by the machine's drift between rounds.
            let rounds: Vec<f64> = r
                .iter()
                .zip(&runs[0])
                .filter(|(_, d)| d.ops_per_sec > 0.0)
                .map(|(x, d)| x.ops_per_sec / d.ops_per_sec)
                .collect();
            let paired = if rounds.is_empty() {
                "?".to_owned()
            } else {
                let lo = rounds.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = rounds.iter().copied().fold(0.0, f64::max);
                format!("{:.2} ({lo:.2}-{hi:.2})", median_f64(rounds))
            };
            println!(
                "| {} | {ops:.0} | {} | {} | {} | {paired} | {} | {} | {} | {} | {} |",
                t.name,
                ms(p50),
                ms(p99),
                ratio(ops, direct.0),
                dratio(p50, direct.1),
                dratio(p99, direct.2),
                r.iter().map(|x| x.errors).sum::<u64>(),
                cpu,
                r.iter()
                    .map(|x| format!("{:.0}", x.ops_per_sec))
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
        }
    }

    if s.wants_section("cold") {
        // Cold starts.
        eprintln!("cold etcdctl gets");
        let mut cold = Vec::new();
        for t in &targets {
            cold.push(cold_gets(&t.serial, s.cold_gets).await);
        }
        println!();
        println!(
            "## Cold start: {} sequential `etcdctl get` processes (ETCDCTL_API=3)",
            s.cold_gets
        );
        println!();
        println!("| target | wall time | median per get | ratio |");
        println!("|---|---|---|---|");
        for (t, (total, each)) in targets.iter().zip(&cold) {
            println!(
                "| {} | {} | {} | {} |",
                t.name,
                ms(*total),
                ms(*each),
                dratio(*total, cold[0].0)
            );
        }
    }
    if s.wants_section("memory") {
        // Memory.
        eprintln!("memory with {} HTTP/2 connections", s.h2_conns);
        let rss_after_load: Vec<Option<u64>> = targets.iter().map(|t| rss_kib(t.pid)).collect();
        let mut held = Vec::new();
        // One row per process (the member endpoint shares the --endpoints process).
        let mut measured = std::collections::HashSet::new();
        for (i, t) in targets.iter().enumerate() {
            if t.pid.is_none() || !measured.insert(t.pid) {
                continue;
            }
            held.push((i, rss_with_connections(&t.serial, t.pid, s.h2_conns).await));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        println!();
        println!(
        "## Resident memory (VmRSS) of each proxy process; {} connections = TCP + HTTP/2 preface \
         + SETTINGS exchange, held open",
        s.h2_conns
    );
        println!();
        println!(
        "| process | idle, fresh | idle, after the load runs | with {} h2 connections | per connection | connections established / open at sample |",
        s.h2_conns
    );
        println!("|---|---|---|---|---|---|");
        for &(i, (est, open, rss)) in &held {
            let per = match (rss, rss_after_load[i]) {
                (Some(a), Some(b)) if est > 0 => {
                    format!("{:.1} KiB", (a as f64 - b as f64) / est as f64)
                }
                _ => "?".into(),
            };
            println!(
                "| {} | {} | {} | {} | {per} | {est} / {open} |",
                targets[i].name,
                mib(rss_fresh[i]),
                mib(rss_after_load[i]),
                mib(rss)
            );
        }
    }
    // Tunnel mode with latency: etcd-proxy vs a port-forward per connection.
    let opened = |key: &str| {
        targets
            .iter()
            .position(|t| t.key == key)
            .map_or(0, |i| opened_during_load[i])
    };
    if s.wants_section("latency") && s.wants_target("tunnels") && s.wants_target("naive") {
        eprintln!("cold gets through tunnels, with and without latency");
        let mut rows = Vec::new();
        for one_way in [Duration::ZERO, s.latency] {
            sim.set_latency(one_way);
            let naive = cold_through_tunnels(&sim, &naive_addr, s.latency_gets).await;
            let proxy = cold_through_tunnels(&sim, &ep_tunnel.cluster_addr, s.latency_gets).await;
            rows.push((one_way, naive, proxy));
        }
        sim.set_latency(Duration::ZERO);
        println!();
        println!(
        "## Cold `etcdctl get` through port-forward tunnels: median of {} (after one warm-up), \
         RTT = 2 x injected one-way latency per port-forward frame",
        s.latency_gets
    );
        println!();
        println!(
        "| one-way latency | naive: one port-forward per connection (to {pod}) | etcd-proxy tunnels | etcd-proxy / naive | port-forwards opened: naive / etcd-proxy |"
    );
        println!("|---|---|---|---|---|");
        for (one_way, naive, proxy) in &rows {
            println!(
                "| {} ms | {} | {} | {} | {} / {} |",
                one_way.as_millis(),
                ms(naive.0),
                ms(proxy.0),
                dratio(proxy.0, naive.0),
                naive.1,
                proxy.1
            );
        }
        println!();
        println!(
            "* port-forwards opened during all throughput runs: etcd-proxy tunnels {}, naive \
         forwarder {} (it opens one per client connection)",
            opened("tunnels"),
            opened("naive")
        );
    }

    drop(ep_tunnel);
    drop(ep_gateway);
    drop(ep_spread);
    drop(grpc_proxy);
    drop(gateway);
    sim.shutdown().await;
}
