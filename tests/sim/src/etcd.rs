//! Real etcd members: one `/usr/bin/etcd` process per simulated pod.
//!
//! The simulator never fakes etcd itself: every "pod" is backed by a real etcd
//! process with its own data dir, so whatever etcd-proxy does through a tunnel
//! hits the genuine server (its gRPC/HTTP2 stack, its member list that
//! advertises unresolvable in-cluster DNS names, its /health endpoint).
//!
//! Ports are picked below the kernel's ephemeral range and released again ([`free_port`]).
//! That leaves a tiny race with other processes; [`crate::SimCluster::start`] retries the
//! whole start once if a member fails to come up.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::SimError;

/// The etcd binary: `etcd` on the `PATH` (CI puts another etcd version first to run the suite
/// against it), or `SIM_ETCD_BIN`.
pub(crate) fn etcd_binary() -> PathBuf {
    std::env::var_os("SIM_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// A TCP port on `ip` that is free now (bound, then released again), for a process that will
/// bind it a moment later.
///
/// It is picked at random below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`,
/// 32768-60999 by default), not by binding port 0: a port from that range can be handed to
/// any process's next outgoing connection before etcd binds it, and the tests make thousands.
/// That race failed a scale-up whose new member's peer port was taken between `MemberAdd`
/// and the member's start. Port 0 remains the fallback.
pub fn free_port(ip: IpAddr) -> Result<u16, SimError> {
    let bind = |port: u16| std::net::TcpListener::bind(SocketAddr::new(ip, port));
    if let Some((lo, hi)) = below_ephemeral_range() {
        for _ in 0..64 {
            let port = crate::random::random_in(lo, hi)?;
            if bind(port).is_ok() {
                return Ok(port);
            }
        }
    }
    let listener =
        bind(0).map_err(|e| SimError::io(format!("binding {ip}:0 to find a free port"), e))?;
    let port = listener
        .local_addr()
        .map_err(|e| SimError::io("reading a bound port", e))?
        .port();
    Ok(port)
}

/// Up to 10,000 ports just below the kernel's ephemeral range, if it starts high enough.
fn below_ephemeral_range() -> Option<(u16, u16)> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let start: u16 = range
        .as_deref()
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(32768);
    (start > 11_024).then(|| (start - 10_000, start - 1))
}

/// Everything needed to (re)start one member.
#[derive(Debug, Clone)]
pub(crate) struct MemberSpec {
    /// etcd's `--name`: the pod name (`etcd-0`) in a StatefulSet, the node name (`cp-1`) for
    /// kubeadm's static pods.
    pub name: String,
    /// The pod backing this member (`etcd-0`, `etcd-cp-1`).
    pub pod: String,
    /// Address etcd's client listener binds: 127.0.0.1, or 127.0.0.2 standing in
    /// for "the pod IP only" when the simulated etcd must not listen on loopback.
    pub client_ip: IpAddr,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    /// `etcd-0=http://127.0.0.1:p0,...` shared by all members.
    pub initial_cluster: String,
    pub cluster_token: String,
    /// `--initial-cluster-state existing`: the member joins a running cluster
    /// it was added to (scale-up) instead of bootstrapping a new one.
    pub join_existing: bool,
    /// The in-cluster DNS URL the member advertises (never resolvable from a laptop).
    pub advertise_client_url: String,
    pub enable_v2: bool,
    /// HTTPS with client-certificate auth on the client port, as kubeadm runs etcd; `None`
    /// serves plain HTTP. Peer traffic stays plain HTTP either way.
    pub tls: Option<MemberTls>,
    /// `--listen-metrics-urls http://127.0.0.1:<port>`: kubeadm's probe port (plain HTTP
    /// `/health`), which the simulator polls when the client port needs a client certificate.
    pub metrics_port: Option<u16>,
}

/// kubeadm's client TLS flags for a member (`cmd/kubeadm/app/phases/etcd/local.go`
/// `getEtcdCommand`): `--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth`.
#[derive(Debug, Clone)]
pub(crate) struct MemberTls {
    /// The member's server certificate (`/etc/kubernetes/pki/etcd/server.crt`).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The etcd CA clients must be signed by (`/etc/kubernetes/pki/etcd/ca.crt`).
    pub ca: PathBuf,
}

impl MemberSpec {
    /// `http://127.0.0.1:PORT` (or 127.0.0.2; `https` with TLS) where this member really
    /// serves clients.
    pub fn client_url(&self) -> String {
        format!(
            "{}://{}:{}",
            self.scheme(),
            self.client_ip,
            self.client_port
        )
    }

    /// `https` with client TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Peer URL as it appears in `--initial-cluster`.
    pub fn peer_url(&self) -> String {
        format!("http://{}:{}", Ipv4Addr::LOCALHOST, self.peer_port)
    }
}

/// One etcd process slot: the spec plus the currently running child, if any.
#[derive(Debug)]
pub(crate) struct Member {
    pub spec: MemberSpec,
    child: Mutex<Option<Child>>,
    /// The pod IP and container port etcd also serves clients on, when pod IPs are reachable
    /// here (a new one with each pod sandbox).
    pod_addr: Mutex<Option<SocketAddr>>,
}

impl Member {
    pub fn new(spec: MemberSpec) -> Self {
        Member {
            spec,
            child: Mutex::new(None),
            pod_addr: Mutex::new(None),
        }
    }

    /// Where the next [`Member::spawn`] also listens: the pod's IP, as a container would.
    pub fn set_pod_addr(&self, addr: Option<SocketAddr>) {
        *self.pod_addr.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    /// `--listen-client-urls`: loopback (for port-forward) and the pod IP, if reachable.
    fn listen_client_urls(&self) -> String {
        match *self.pod_addr.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(addr) => format!("{},{}://{addr}", self.spec.client_url(), self.spec.scheme()),
            None => self.spec.client_url(),
        }
    }

    /// Spawns the etcd process (on the existing data dir, if any).
    pub fn spawn(&self) -> Result<(), SimError> {
        let s = &self.spec;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log_path)
            .map_err(|e| SimError::io(format!("opening {}", s.log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| SimError::io("duplicating the etcd log handle", e))?;
        let binary = etcd_binary();
        let mut cmd = Command::new(&binary);
        cmd.arg("--name")
            .arg(&s.name)
            .arg("--data-dir")
            .arg(&s.data_dir)
            .arg("--listen-client-urls")
            .arg(self.listen_client_urls())
            .arg("--advertise-client-urls")
            .arg(&s.advertise_client_url)
            .arg("--listen-peer-urls")
            .arg(s.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(s.peer_url())
            .arg("--initial-cluster")
            .arg(&s.initial_cluster)
            .arg("--initial-cluster-state")
            .arg(if s.join_existing { "existing" } else { "new" })
            .arg("--initial-cluster-token")
            .arg(&s.cluster_token)
            .arg("--logger")
            .arg("zap");
        if s.enable_v2 {
            cmd.arg("--enable-v2");
        }
        if let Some(tls) = &s.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        if let Some(port) = s.metrics_port {
            cmd.arg("--listen-metrics-urls")
                .arg(format!("http://{}:{port}", Ipv4Addr::LOCALHOST));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|source| SimError::EtcdSpawn {
            member: s.name.clone(),
            binary,
            source,
        })?;
        let previous = self.lock_child().replace(child);
        if let Some(mut old) = previous {
            // Never leave an orphan behind if spawn is called twice.
            let _ = old.start_kill();
        }
        Ok(())
    }

    /// The running etcd process's id, for measuring it (benchmarks read its CPU time).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.lock_child().as_ref().and_then(Child::id)
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        // A poisoned lock only means another thread panicked while holding it;
        // the Option inside is still meaningful.
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Polls `GET /health` until etcd reports healthy, the process exits, or the deadline passes:
    /// on the metrics port if there is one (as kubeadm's probes do), else the client port.
    pub async fn wait_healthy(&self, deadline: Instant) -> Result<(), SimError> {
        let addr = match self.spec.metrics_port {
            Some(port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            None => SocketAddr::new(self.spec.client_ip, self.spec.client_port),
        };
        loop {
            if let Some(status) = self.exited()? {
                return Err(self.unhealthy(format!("etcd exited early with {status}")));
            }
            if health_ok(addr).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(
                    self.unhealthy(format!("no healthy answer on {addr} before the deadline"))
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Some(status)` if the child has exited, `None` while it runs.
    fn exited(&self) -> Result<Option<std::process::ExitStatus>, SimError> {
        let mut guard = self.lock_child();
        match guard.as_mut() {
            None => Ok(None),
            Some(child) => child
                .try_wait()
                .map_err(|e| SimError::io("polling the etcd process", e)),
        }
    }

    fn unhealthy(&self, reason: String) -> SimError {
        SimError::EtcdUnhealthy {
            member: self.spec.name.clone(),
            reason,
            log_tail: log_tail(&self.spec.log_path, 15),
        }
    }

    /// Kills the process (SIGKILL, like a crashed container) and reaps it.
    pub async fn kill(&self) -> Result<(), SimError> {
        let child = self.lock_child().take();
        if let Some(mut child) = child {
            child
                .kill()
                .await
                .map_err(|e| SimError::io(format!("killing etcd member {}", self.spec.name), e))?;
        }
        Ok(())
    }

    /// Waits until the process exits on its own (etcd shuts itself down once
    /// it learns it was removed from the cluster: "the member has been
    /// permanently removed from the cluster"); SIGKILLs it at the deadline.
    pub async fn wait_exit_or_kill(&self, deadline: Instant) -> Result<(), SimError> {
        loop {
            if self.lock_child().is_none() {
                return Ok(());
            }
            if self.exited()?.is_some() {
                self.lock_child().take();
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::debug!("etcd {} did not exit by itself; killing it", self.spec.name);
                return self.kill().await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Best-effort, non-blocking kill for `Drop` paths.
    pub fn start_kill(&self) {
        if let Some(child) = self.lock_child().as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// True if `GET /health` on `addr` answers 200 with `"health":"true"`.
async fn health_ok(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        Some(text.starts_with("HTTP/1.1 200") && text.contains(r#""health":"true""#))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

/// The last `n` lines of a log file, for error messages.
fn log_tail(path: &std::path::Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
