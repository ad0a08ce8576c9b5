//! Test fixtures: start the simulated cluster, the proxy binary, and etcdctl.

#![allow(dead_code)]

use std::future::{Future, IntoFuture};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use etcd_proxy_sim::{SimCluster, SimConfig};

pub mod attack;
pub mod forwarder;
pub mod kubectl;
pub mod proxies;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Generous bound for anything that should take a second or two.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Bound for starting a simulated cluster: its members get 30 s to report healthy, and a
/// start that fails is retried once.
pub const START_DEADLINE: Duration = Duration::from_secs(90);

/// Awaits `fut` for at most [`DEADLINE`]; past that the test fails naming `what` and the
/// caller's line, so a hang fails instead of blocking CI.
///
/// Every await in the tests goes through this (or [`within_for`]), except awaits of the
/// helpers in this module, which bound themselves, and of fixed sleeps.
#[track_caller]
pub fn within<'a, F>(what: &'a str, fut: F) -> impl Future<Output = F::Output> + 'a
where
    F: IntoFuture + 'a,
{
    within_for(DEADLINE, what, fut)
}

/// [`within`] with another bound.
#[track_caller]
pub fn within_for<'a, F>(
    limit: Duration,
    what: &'a str,
    fut: F,
) -> impl Future<Output = F::Output> + 'a
where
    F: IntoFuture + 'a,
{
    etcd_proxy_sim::within_for(limit, what, fut)
}

/// A simulated cluster with `members` real etcd members, within [`START_DEADLINE`].
pub async fn cluster(members: usize) -> SimCluster {
    let start = SimCluster::start(SimConfig {
        members,
        ..SimConfig::default()
    });
    within_for(START_DEADLINE, "the simulated cluster starts", start)
        .await
        .expect("simulated cluster starts")
}

/// A running `etcd-proxy` process.
pub struct Proxy {
    pub child: Child,
    /// `http://127.0.0.1:PORT` of the cluster endpoint.
    pub cluster_url: String,
    /// `host:port` of the cluster endpoint (etcdctl v3 style).
    pub cluster_addr: String,
    /// (member name, local URL) per member.
    pub members: Vec<(String, String)>,
    /// The whole summary as printed.
    pub summary: String,
    /// The rest of its stdout, after the summary.
    pub stdout: Lines<BufReader<ChildStdout>>,
}

impl Proxy {
    /// The etcdctl-v3 style endpoint list of every member endpoint.
    pub fn member_urls(&self) -> Vec<String> {
        self.members.iter().map(|(_, u)| u.clone()).collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The proxy binary with `args`, logging to the test's stderr. `ETCD_PROXY_BIN` names another
/// build to run instead (a benchmark's before and after).
pub fn proxy_command(args: &[&str]) -> Command {
    let bin = std::env::var_os("ETCD_PROXY_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_etcd-proxy").into());
    let mut cmd = Command::new(bin);
    cmd.args(args).env_remove("KUBECONFIG");
    // Proxies come from the kubeconfig (or a test's own environment), never the runner's.
    for var in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.env(
        "ETCD_PROXY_LOG",
        std::env::var("ETCD_PROXY_TEST_LOG").unwrap_or_else(|_| "etcd_proxy=warn,error".into()),
    )
    .stdin(Stdio::null())
    .kill_on_drop(true);
    cmd
}

/// Starts the proxy against `sim` on free ports and waits for its summary (its readiness).
pub async fn start_proxy(sim: &SimCluster, extra: &[&str]) -> Proxy {
    start_proxy_env(sim, extra, &[]).await
}

/// [`start_proxy`] with extra environment variables.
pub async fn start_proxy_env(sim: &SimCluster, extra: &[&str], env: &[(&str, &str)]) -> Proxy {
    start_proxy_with(sim.kubeconfig_path(), extra, env).await
}

/// [`start_proxy_env`] with another kubeconfig.
pub async fn start_proxy_with(kubeconfig: &Path, extra: &[&str], env: &[(&str, &str)]) -> Proxy {
    let kubeconfig = kubeconfig.to_str().expect("utf-8 path").to_owned();
    let mut args = vec!["--kubeconfig", kubeconfig.as_str()];
    if !extra.contains(&"--listen") {
        args.extend(["--listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    let mut cmd = proxy_command(&args);
    cmd.envs(env.iter().copied());
    spawn_and_read_summary(cmd).await
}

/// Spawns the proxy and parses its start-up summary (which it prints once ready).
pub async fn spawn_and_read_summary(mut cmd: Command) -> Proxy {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn etcd-proxy");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    // Bounded as a whole below.
    let read = async {
        let first = lines.next_line().await.ok()??;
        // "Forwarding ... (N members: ...) via context ..."
        let n: usize = first.split('(').nth(1)?.split(' ').next()?.parse().ok()?;
        let mut summary = first.clone();
        let mut rows = Vec::new();
        for _ in 0..=n {
            let line = lines.next_line().await.ok()??;
            summary.push('\n');
            summary.push_str(&line);
            let mut cols = line.split_whitespace();
            rows.push((cols.next()?.to_owned(), cols.next()?.to_owned()));
        }
        Some((summary, rows))
    };
    let (summary, mut rows) = match tokio::time::timeout(DEADLINE, read).await {
        Ok(Some(r)) => r,
        other => {
            let _ = child.start_kill();
            let out = within("the killed proxy exits", child.wait_with_output())
                .await
                .expect("proxy output");
            panic!(
                "etcd-proxy did not print its summary ({}): stderr:\n{}",
                if other.is_err() {
                    "timed out"
                } else {
                    "exited or malformed"
                },
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let (cluster_name, cluster_url) = rows.remove(0);
    assert_eq!(cluster_name, "cluster", "summary:\n{summary}");
    let cluster_addr = cluster_url
        .split_once("://")
        .map_or(cluster_url.as_str(), |(_, a)| a)
        .to_owned();
    Proxy {
        child,
        cluster_url,
        cluster_addr,
        members: rows,
        summary,
        stdout: lines,
    }
}

/// The outcome of a command that must finish.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics with the output unless the command succeeded.
    pub fn ok(self) -> Self {
        assert!(
            self.status.success(),
            "command failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs a command to completion within [`DEADLINE`], feeding it `stdin`.
pub async fn run(mut cmd: Command, stdin: &str) -> Output {
    use tokio::io::AsyncWriteExt;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn");
    if let Some(mut input) = child.stdin.take() {
        within("writing stdin", input.write_all(stdin.as_bytes()))
            .await
            .expect("stdin");
    }
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("command did not finish within {DEADLINE:?}: {cmd:?}"))
        .expect("wait");
    Output {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `etcdctl` with `ETCDCTL_API=api`.
pub fn etcdctl(api: u8, args: &[&str]) -> Command {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", api.to_string())
        .env_remove("ETCDCTL_ENDPOINTS")
        .args(args);
    cmd
}

/// Runs etcdctl v3 against `endpoints` and requires success.
pub async fn ctl3(endpoints: &str, args: &[&str]) -> Output {
    let mut all = vec![
        "--endpoints",
        endpoints,
        "--dial-timeout",
        "5s",
        "--command-timeout",
        "10s",
    ];
    all.extend_from_slice(args);
    run(etcdctl(3, &all), "").await.ok()
}

/// Runs etcdctl v2 against `endpoints` (endpoint sync on) and requires success.
pub async fn ctl2(endpoints: &str, args: &[&str]) -> Output {
    let mut all = vec!["--endpoints", endpoints, "--total-timeout", "10s"];
    all.extend_from_slice(args);
    run(etcdctl(2, &all), "").await.ok()
}

/// Runs the proxy with `args` where it must fail: its exit status and stderr.
pub async fn proxy_fails(args: &[&str]) -> (ExitStatus, String) {
    proxy_fails_env(args, &[]).await
}

/// [`proxy_fails`] with extra environment variables.
pub async fn proxy_fails_env(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let mut cmd = proxy_command(args);
    cmd.env("ETCD_PROXY_LOG", "error")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn etcd-proxy");
    let mut stderr = child.stderr.take().expect("stderr");
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap_or_else(|_| panic!("etcd-proxy {args:?} hung instead of failing"))
        .expect("wait");
    let mut err = String::new();
    within("reading stderr", stderr.read_to_string(&mut err))
        .await
        .expect("read stderr");
    (status, err)
}

/// A path that does not exist.
pub fn missing_path(dir: &Path) -> String {
    dir.join("no-such-kubeconfig")
        .to_string_lossy()
        .into_owned()
}

/// A free loopback port (bound, then released), picked where outgoing connections do not
/// take ports (`etcd_proxy_sim::free_port`).
pub fn free_port() -> u16 {
    etcd_proxy_sim::free_port(std::net::Ipv4Addr::LOCALHOST.into()).expect("a free port")
}

/// A standalone etcd member outside any (simulated) Kubernetes, advertising its real URL.
pub struct Etcd {
    pub child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

/// The command for a single-member etcd cluster named `name`, with its data in `data`.
pub fn etcd_command(data: &Path, name: &str, client_url: &str, peer_url: &str) -> Command {
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", name, "--data-dir"])
        .arg(data)
        .args([
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
        ])
        .args([
            "--listen-peer-urls",
            peer_url,
            "--initial-advertise-peer-urls",
            peer_url,
        ])
        .args(["--initial-cluster", &format!("{name}={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// The version of the `etcd` on the `PATH` (`X.Y.Z`), which every test starts.
pub fn etcd_version() -> String {
    let out = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .expect("etcd --version");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("etcd Version: "))
        .expect("a version line")
        .trim()
        .to_owned()
}

/// Starts a single real etcd member on free ports and waits until `/health` answers.
pub async fn standalone_etcd(extra: &[&str]) -> Etcd {
    let dir = tempfile::tempdir().expect("tempdir");
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let mut cmd = etcd_command(&dir.path().join("data"), "solo", &url, &peer_url);
    cmd.arg("--enable-v2").args(extra);
    let child = cmd.spawn().expect("spawn etcd");
    let addr = format!("127.0.0.1:{client}");
    let healthy = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await {
                use tokio::io::AsyncWriteExt;
                let req =
                    format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
                if s.write_all(req.as_bytes()).await.is_ok() {
                    let mut out = String::new();
                    if s.read_to_string(&mut out).await.is_ok()
                        && out.contains("\"health\":\"true\"")
                    {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(healthy.is_ok(), "standalone etcd did not become healthy");
    Etcd {
        child,
        url,
        _dir: dir,
    }
}

/// Starts the proxy with exactly `args` (no simulated cluster) and waits for its summary.
pub async fn start_proxy_args(args: &[&str]) -> Proxy {
    spawn_and_read_summary(proxy_command(args)).await
}

/// Certificates for a test: a CA, a server certificate for `server_names` and a client
/// certificate, written as PEM files into a directory.
pub struct Pki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

/// Makes a [`Pki`] in `dir`.
pub fn pki(dir: &Path, server_names: &[&str]) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |names: Vec<String>, usages: Vec<Eku>| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = usages;
        let cert = params.signed_by(&key, &issuer).expect("certificate");
        (cert.pem(), key.serialize_pem())
    };
    let names = server_names.iter().map(|n| n.to_string()).collect();
    let (server_cert, server_key) = leaf(names, vec![Eku::ServerAuth, Eku::ClientAuth]);
    let (client_cert, client_key) =
        leaf(vec!["etcd-proxy-client".to_string()], vec![Eku::ClientAuth]);
    let write = |name: &str, pem: String| {
        let p = dir.join(name);
        std::fs::write(&p, pem).expect("write PEM");
        p.to_str().expect("utf-8 path").to_owned()
    };
    Pki {
        ca: write("ca.crt", ca_cert.pem()),
        server_cert: write("server.crt", server_cert),
        server_key: write("server.key", server_key),
        client_cert: write("client.crt", client_cert),
        client_key: write("client.key", client_key),
    }
}

/// Puts through `c` until one is served by `leader` (the proxy learns the leader from its
/// status probes), bounded by [`DEADLINE`].
pub async fn until_leader_learned(c: &mut etcd_client::Client, leader: u64) {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let r = within("put", c.put("lead", "x", None)).await.expect("put");
        if r.header().expect("header").member_id() == leader {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "puts never reached the leader {leader:x}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
