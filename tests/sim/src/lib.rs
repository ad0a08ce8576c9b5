//! `etcd-proxy-sim`: a simulated Kubernetes API server backed by real etcd members.
//!
//! Kubernetes cannot run on the machines etcd-proxy is developed and tested
//! on, yet etcd-proxy's whole job is talking to Kubernetes: discover etcd pods
//! through the API and tunnel to them with the port-forward subresource. This
//! crate stands in for the cluster. It runs genuine `etcd` processes (one per
//! "pod"), and in front of them an HTTPS API server that speaks the real
//! wire protocols: apiserver JSON and `Status` errors, list/watch semantics
//! with resourceVersions, bearer-token auth with RBAC-style denials, and the
//! kubelet's WebSocket port-forward protocol (`v4.channel.k8s.io`). Faults
//! (killed pods, cut tunnels, latency) can be injected from tests.
//!
//! Fidelity matters more than convenience here: this is what proves
//! etcd-proxy works, so behaviour follows the Kubernetes source, cited in
//! comments where it is non-obvious.

mod api;
mod auth;
mod error;
mod etcd;
mod objects;
mod portforward;
mod random;
mod selector;
mod status;
mod store;
mod tls;
mod watch;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use error::SimError;

use auth::Auth;
use etcd::{Member, MemberSpec};
use objects::{Identity, PodState};
use portforward::Tunnels;
use store::Store;

/// How long members get to report healthy.
const HEALTH_DEADLINE: Duration = Duration::from_secs(30);

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of etcd members (pods). Default 3.
    pub members: usize,
    /// Namespace of the StatefulSet, Service and pods. Default `etcd`.
    pub namespace: String,
    /// StatefulSet/Service name and pod prefix (`etcd-0`, ...). Default `etcd`.
    pub name: String,
    /// `true` (default): etcd listens on loopback inside the "pod", so
    /// port-forward works. `false`: etcd listens only on the pod IP, and
    /// port-forward's dial to localhost is refused as with kubelet/containerd.
    pub loopback_listen: bool,
    /// Start etcd with `--enable-v2`. Default true.
    pub enable_v2: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            members: 3,
            namespace: "etcd".to_string(),
            name: "etcd".to_string(),
            loopback_listen: true,
            enable_v2: true,
        }
    }
}

/// State shared by the API server tasks and the [`SimCluster`] handle.
pub(crate) struct Shared {
    pub cfg: SimConfig,
    pub store: Store,
    pub auth: Auth,
    pub members: Vec<Member>,
    pub tunnels: Arc<Tunnels>,
    latency_nanos: AtomicU64,
}

impl Shared {
    /// The injected one-way latency.
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    fn member(&self, pod: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.spec.name == pod)
    }
}

/// A running simulated cluster. Dropping it kills the etcd members (best
/// effort); call [`SimCluster::shutdown`] for an orderly stop.
pub struct SimCluster {
    shared: Arc<Shared>,
    server: JoinHandle<()>,
    api_addr: SocketAddr,
    kubeconfig: PathBuf,
    // Declared last: removed after the processes using it are gone.
    dir: Option<tempfile::TempDir>,
}

impl SimCluster {
    /// Starts the etcd members (waiting until each is healthy), the API server,
    /// and writes the kubeconfig. Retries once if a member fails to come up
    /// (free ports are picked with a small race).
    pub async fn start(cfg: SimConfig) -> Result<SimCluster, SimError> {
        if cfg.members == 0 {
            return Err(SimError::Config("members must be at least 1".into()));
        }
        match Self::start_once(cfg.clone()).await {
            Ok(c) => Ok(c),
            Err(e) => {
                tracing::warn!("simulated cluster failed to start, retrying once: {e}");
                Self::start_once(cfg).await
            }
        }
    }

    async fn start_once(cfg: SimConfig) -> Result<SimCluster, SimError> {
        let dir = tempfile::Builder::new()
            .prefix("etcd-proxy-sim-")
            .tempdir()
            .map_err(|e| SimError::io("creating the temp dir", e))?;
        let id = Identity {
            namespace: cfg.namespace.clone(),
            name: cfg.name.clone(),
            members: cfg.members,
            statefulset_uid: random::uuid_v4()?,
            service_uid: random::uuid_v4()?,
            created: objects::now(),
        };
        let members = plan_members(&cfg, &id, dir.path())?;

        for m in &members {
            m.spawn()?;
        }
        let deadline = Instant::now() + HEALTH_DEADLINE;
        let health =
            futures::future::try_join_all(members.iter().map(|m| m.wait_healthy(deadline)));
        if let Err(e) = health.await {
            for m in &members {
                let _ = m.kill().await;
            }
            return Err(e);
        }

        let now = objects::now();
        let mut pods = Vec::with_capacity(cfg.members);
        for ordinal in 0..cfg.members {
            pods.push(PodState {
                ordinal,
                name: id.pod_name(ordinal),
                uid: random::uuid_v4()?,
                sandbox_id: random::random_hex(32)?,
                netns_id: random::uuid_v4()?,
                created: now,
                ready: true,
                restart_count: 0,
                transition: now,
                resource_version: 0,
            });
        }

        let tls = tls::generate()?;
        let listener = TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))
            .await
            .map_err(|e| SimError::io("binding the API server", e))?;
        let api_addr = listener
            .local_addr()
            .map_err(|e| SimError::io("reading the API server address", e))?;
        let auth = Auth::generate()?;
        let kubeconfig = dir.path().join("kubeconfig");
        let users: Vec<tls::KubeconfigUser<'_>> = auth
            .users
            .iter()
            .map(|u| tls::KubeconfigUser {
                context: u.context,
                user: u.name,
                token: &u.token,
            })
            .collect();
        tls::write_kubeconfig(
            &kubeconfig,
            &format!("https://{api_addr}"),
            &tls.ca_pem,
            &cfg.namespace,
            &users,
            "sim",
        )?;

        let shared = Arc::new(Shared {
            store: Store::new(id, pods),
            cfg,
            auth,
            members,
            tunnels: Arc::new(Tunnels::default()),
            latency_nanos: AtomicU64::new(0),
        });
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config);
        let server = tokio::spawn(api::serve(listener, acceptor, shared.clone()));
        Ok(SimCluster {
            shared,
            server,
            api_addr,
            kubeconfig,
            dir: Some(dir),
        })
    }

    /// The kubeconfig file (inside a temp dir owned by this cluster).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:PORT`.
    pub fn api_url(&self) -> String {
        format!("https://{}", self.api_addr)
    }

    /// The namespace holding the etcd objects.
    pub fn namespace(&self) -> &str {
        &self.shared.cfg.namespace
    }

    /// Pod names in ordinal order (`etcd-0`, `etcd-1`, ...).
    pub fn pod_names(&self) -> Vec<String> {
        self.shared.store.pod_names()
    }

    /// The member's real client URL (`http://127.0.0.1:PORT`), for test assertions only.
    pub fn member_client_url(&self, pod: &str) -> Option<String> {
        self.shared.member(pod).map(|m| m.spec.client_url())
    }

    /// The URL the member advertises: `http://etcd-0.etcd.<ns>.svc.cluster.local:2379`.
    pub fn advertised_client_url(&self, pod: &str) -> Option<String> {
        self.shared
            .member(pod)
            .map(|m| m.spec.advertise_client_url.clone())
    }

    /// Accepted port-forward WebSocket upgrades so far.
    pub fn portforward_count(&self) -> u64 {
        self.shared.tunnels.upgrades()
    }

    /// Port-forward sockets currently open.
    pub fn open_tunnels(&self) -> usize {
        self.shared.tunnels.open()
    }

    /// Fault: abruptly closes every open port-forward socket and its pod connection.
    pub fn cut_tunnels(&self) {
        self.shared.tunnels.cut();
    }

    /// Fault: SIGKILLs the pod's etcd; the pod turns NotReady (a MODIFIED
    /// watch event) and port-forward dials to it are refused.
    pub async fn kill_pod(&self, pod: &str) -> Result<(), SimError> {
        let member = self
            .shared
            .member(pod)
            .ok_or_else(|| SimError::NoSuchPod(pod.to_string()))?;
        member.kill().await?;
        self.shared.store.set_ready(pod, false, false);
        Ok(())
    }

    /// Starts the pod's etcd again on the same data dir and ports; the pod is
    /// Ready again once `/health` answers.
    pub async fn restart_pod(&self, pod: &str) -> Result<(), SimError> {
        let member = self
            .shared
            .member(pod)
            .ok_or_else(|| SimError::NoSuchPod(pod.to_string()))?;
        member.kill().await?;
        member.spawn()?;
        member
            .wait_healthy(Instant::now() + HEALTH_DEADLINE)
            .await?;
        self.shared.store.set_ready(pod, true, true);
        Ok(())
    }

    /// Fault: delays every port-forward frame (each direction) and every API response.
    pub fn set_latency(&self, one_way: Duration) {
        let nanos = u64::try_from(one_way.as_nanos()).unwrap_or(u64::MAX);
        self.shared.latency_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Kills the members, stops the server and removes the temp dir.
    pub async fn shutdown(mut self) {
        self.server.abort();
        let _ = (&mut self.server).await;
        self.shared.tunnels.cut();
        for m in &self.shared.members {
            if let Err(e) = m.kill().await {
                tracing::warn!("{e}");
            }
        }
        if let Some(dir) = self.dir.take() {
            if let Err(e) = dir.close() {
                tracing::warn!("removing the simulator's temp dir: {e}");
            }
        }
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        self.server.abort();
        self.shared.tunnels.cut();
        for m in &self.shared.members {
            m.start_kill();
        }
    }
}

/// Picks ports and builds the member specs (data dirs under `root`).
fn plan_members(cfg: &SimConfig, id: &Identity, root: &Path) -> Result<Vec<Member>, SimError> {
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // 127.0.0.2 stands in for the pod IP: reachable on this machine, but not
    // what "localhost" inside the pod means.
    let client_ip = if cfg.loopback_listen {
        lo
    } else {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))
    };
    let token = format!("etcd-proxy-sim-{}", random::random_hex(8)?);
    let mut specs = Vec::with_capacity(cfg.members);
    for ordinal in 0..cfg.members {
        let name = id.pod_name(ordinal);
        let member_dir = root.join(&name);
        std::fs::create_dir_all(&member_dir)
            .map_err(|e| SimError::io(format!("creating {}", member_dir.display()), e))?;
        specs.push(MemberSpec {
            client_ip,
            client_port: etcd::free_port(client_ip)?,
            peer_port: etcd::free_port(lo)?,
            data_dir: member_dir.join("data"),
            log_path: member_dir.join("etcd.log"),
            initial_cluster: String::new(),
            cluster_token: token.clone(),
            advertise_client_url: id.advertised_client_url(ordinal),
            enable_v2: cfg.enable_v2,
            name,
        });
    }
    let initial_cluster = specs
        .iter()
        .map(|s| format!("{}={}", s.name, s.peer_url()))
        .collect::<Vec<_>>()
        .join(",");
    Ok(specs
        .into_iter()
        .map(|mut s| {
            s.initial_cluster = initial_cluster.clone();
            Member::new(s)
        })
        .collect())
}
