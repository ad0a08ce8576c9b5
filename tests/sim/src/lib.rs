//! `etcd-proxy-sim`: a simulated Kubernetes API server backed by real etcd members.
//!
//! Kubernetes cannot run on the machines etcd-proxy is developed and tested
//! on, yet etcd-proxy's whole job is talking to Kubernetes: discover etcd pods
//! through the API and tunnel to them with the port-forward subresource. This
//! crate stands in for the cluster. It runs genuine `etcd` processes (one per
//! "pod"), and in front of them an HTTPS API server that speaks the real
//! wire protocols: apiserver JSON and `Status` errors, list/watch semantics
//! with resourceVersions, bearer-token auth with RBAC-style denials (port-forward
//! authorized by HTTP method and Kubernetes version), API discovery, and the
//! kubelet's port-forward protocols: WebSocket (`v4.channel.k8s.io`) and
//! SPDY/3.1 (`portforward.k8s.io`, what `kubectl port-forward` falls back to). Faults
//! (killed pods, cut tunnels, latency, the kubelet's idle timeout, API server
//! outages, scaling with real etcd membership changes, and the silent ones: upgrades never
//! answered, connections black-holed after the upgrade or dropped without FIN or RST) can be
//! injected from tests.
//!
//! Two layouts ([`Layout`]): an etcd StatefulSet with its headless Service (the default), or
//! kubeadm's control-plane etcd — static pods `etcd-<node>` in `kube-system`, host network,
//! members named after their nodes, advertising `https://<node-ip>:2379`, serving clients
//! over TLS with client-certificate auth from a kubeadm-style PKI ([`EtcdPki`]). Peer traffic
//! stays plain HTTP on loopback in both: no client sees it.
//!
//! Fidelity matters more than convenience here: this is what proves
//! etcd-proxy works, so behaviour follows the Kubernetes source, cited in
//! comments where it is non-obvious.

mod api;
mod auth;
mod discovery;
mod error;
mod etcd;
pub use etcd::free_port;
mod faults;
mod idle;
mod inflight;
mod membership;
mod objects;
mod pki;
mod portforward;
mod random;
mod scale;
mod selector;
mod server;
mod spdy;
mod status;
mod store;
mod tls;
mod variant;
mod watch;

use std::future::{Future, IntoFuture};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;

pub use error::SimError;
pub use faults::PortForwardFault;
pub use pki::EtcdPki;
/// The SPDY/3.1 frame codec the simulator's kubelet side uses (etcd-proxy's own, compiled
/// here too), for tests that speak SPDY to the simulator by hand.
#[doc(hidden)]
pub use spdy::frame as spdy_frame;
pub use tls::EXTRA_SAN;
pub use variant::{CaData, KubeconfigVariant, UserAuth};

use auth::Auth;
use etcd::{Member, MemberSpec, MemberTls};
use faults::Faults;
use objects::{Identity, PodState};
use portforward::Tunnels;
use server::ApiServer;
use store::{PodCidr, Store};

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
    /// The simulated Kubernetes minor version (1.x), reported by `/version`. It decides how
    /// port-forward is authorized: from 1.35 (`AuthorizePodWebsocketUpgradeCreatePermission`,
    /// beta and on by default) a WebSocket upgrade needs `create` as well as `get`.
    /// Default 33.
    pub kubernetes_minor: u32,
    /// Where pod IPs come from. Default [`PodNetwork::Unroutable`]. With
    /// [`Layout::ControlPlane`] the pods use the host network, so these are node IPs:
    /// 10.0.0.11, 10.0.0.12, ... when unroutable.
    pub pod_network: PodNetwork,
    /// How etcd is deployed. Default [`Layout::StatefulSet`].
    pub layout: Layout,
}

/// How the simulated etcd is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// A StatefulSet `<name>` with a headless Service `<name>`, pods `<name>-0`, ... whose
    /// members are named after their pods and advertise
    /// `http://<pod>.<name>.<ns>.svc.cluster.local:2379`; plain HTTP.
    #[default]
    StatefulSet,
    /// kubeadm's stacked etcd: one static pod `<name>-<node>` per control-plane node `cp-1`,
    /// `cp-2`, ... (labels `component=etcd`, `tier=control-plane`, `hostNetwork: true`, pod IP
    /// = node IP), members named after their nodes, advertising `https://<node-ip>:2379`, TLS
    /// with `--client-cert-auth` (see [`SimCluster::etcd_pki`]). No StatefulSet and no Service:
    /// the API server answers 404 for them. Port-forward reaches the member's listener on the
    /// host's loopback, as the runtime does for a host-network pod. Scaling is not supported
    /// (kubeadm adds members with `kubeadm join`, not a replica count).
    ControlPlane,
}

/// The pods' network, as the machine running the simulator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodNetwork {
    /// Pod IPs from 10.244.0.0/16, which nothing here answers: a laptop outside the cluster.
    #[default]
    Unroutable,
    /// Pod IPs from a free 127.N.0.0/16, each member also serving clients on its pod IP and
    /// container port (2379) like a container: a process inside the cluster network, for
    /// `--direct`. A restarted pod gets a new IP and its member moves there.
    Loopback,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            members: 3,
            namespace: "etcd".to_string(),
            name: "etcd".to_string(),
            loopback_listen: true,
            enable_v2: true,
            kubernetes_minor: 33,
            pod_network: PodNetwork::Unroutable,
            layout: Layout::StatefulSet,
        }
    }
}

impl SimConfig {
    /// kubeadm's control-plane etcd with `members` nodes: [`Layout::ControlPlane`] in
    /// `kube-system`, static pods named `etcd-<node>`, no v2 API (kubeadm does not pass
    /// `--enable-v2`).
    pub fn control_plane(members: usize) -> Self {
        SimConfig {
            members,
            namespace: "kube-system".into(),
            name: "etcd".into(),
            layout: Layout::ControlPlane,
            enable_v2: false,
            ..SimConfig::default()
        }
    }
}

/// State shared by the API server tasks and the [`SimCluster`] handle.
pub(crate) struct Shared {
    pub cfg: SimConfig,
    pub store: Store,
    pub auth: Auth,
    /// The temp dir holding every member's data dir and log.
    pub root: PathBuf,
    /// The running members, in ordinal order; changes when scaling.
    members: Mutex<Vec<Arc<Member>>>,
    pub tunnels: Arc<Tunnels>,
    /// Silent faults on port-forward connections.
    pub faults: Faults,
    latency_nanos: AtomicU64,
    /// The container runtime's grace for the other direction of a forwarded connection once
    /// one direction has ended.
    close_grace_nanos: AtomicU64,
    /// The etcd PKI, with [`Layout::ControlPlane`].
    pki: Option<EtcdPki>,
}

impl Shared {
    /// The injected one-way latency.
    pub fn latency(&self) -> Duration {
        Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed))
    }

    /// See [`SimCluster::set_close_grace`].
    pub fn close_grace(&self) -> Duration {
        Duration::from_nanos(self.close_grace_nanos.load(Ordering::Relaxed))
    }

    /// Closes every port-forward socket, frozen ones included.
    fn cut_all(&self) {
        self.tunnels.cut();
        self.faults.release();
    }

    fn lock_members(&self) -> MutexGuard<'_, Vec<Arc<Member>>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A snapshot of the members.
    pub fn members(&self) -> Vec<Arc<Member>> {
        self.lock_members().clone()
    }

    /// The member backing `pod` (by pod name: member names are node names in the
    /// control-plane layout).
    pub fn member(&self, pod: &str) -> Option<Arc<Member>> {
        self.lock_members()
            .iter()
            .find(|m| m.spec.pod == pod)
            .cloned()
    }

    fn add_member(&self, member: Arc<Member>) {
        self.lock_members().push(member);
    }

    fn remove_member(&self, pod: &str) {
        self.lock_members().retain(|m| m.spec.pod != pod);
    }
}

/// A running simulated cluster. Dropping it kills the etcd members (best
/// effort); call [`SimCluster::shutdown`] for an orderly stop.
pub struct SimCluster {
    shared: Arc<Shared>,
    server: ApiServer,
    /// Serialises scaling: etcd allows one membership change at a time.
    scaling: tokio::sync::Mutex<()>,
    api_addr: SocketAddr,
    kubeconfig: PathBuf,
    /// The API server's CA certificate (DER).
    ca_der: Vec<u8>,
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
        let node_uids = (0..cfg.members)
            .map(|_| random::uuid_v4())
            .collect::<Result<Vec<_>, _>>()?;
        let id = Identity {
            namespace: cfg.namespace.clone(),
            name: cfg.name.clone(),
            layout: cfg.layout,
            node_uids,
            statefulset_uid: random::uuid_v4()?,
            service_uid: random::uuid_v4()?,
            created: objects::now(),
        };
        let (cidr, first_ip) = match (cfg.pod_network, cfg.layout) {
            (PodNetwork::Unroutable, Layout::StatefulSet) => (PodCidr::UNROUTABLE, FIRST_POD_IP),
            (PodNetwork::Unroutable, Layout::ControlPlane) => (PodCidr::NODES, FIRST_NODE_IP),
            (PodNetwork::Loopback, _) => (free_loopback_cidr()?, FIRST_POD_IP),
        };
        let ips: Vec<String> = (0..cfg.members)
            .map(|ordinal| cidr.ip(first_ip + ordinal_u32(ordinal)))
            .collect();
        let pki = match cfg.layout {
            Layout::StatefulSet => None,
            Layout::ControlPlane => Some(pki::EtcdCa::generate(&dir.path().join("pki"))?),
        };
        let members = plan_members(&cfg, &id, dir.path(), &ips, pki.as_ref())?;
        for (m, ip) in members.iter().zip(&ips) {
            m.set_pod_addr(pod_addr(cidr, ip));
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

        let mut pods = Vec::with_capacity(cfg.members);
        for (ordinal, ip) in ips.into_iter().enumerate() {
            pods.push(PodState::new(ordinal, id.pod_name(ordinal), ip)?);
        }
        let next_ip = first_ip + ordinal_u32(cfg.members);

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

        let gateway = auth
            .users
            .iter()
            .find(|u| u.context == "sim-gateway")
            .map(|u| u.token.clone())
            .unwrap_or_default();
        tls::write_admin_client(dir.path(), &tls)?;
        tls::write_service_account(
            &dir.path().join("serviceaccount"),
            &gateway,
            &tls.ca_pem,
            &cfg.namespace,
        )?;
        let shared = Arc::new(Shared {
            store: Store::new(id, pods, cidr, next_ip),
            cfg,
            auth,
            root: dir.path().to_path_buf(),
            members: Mutex::new(members.into_iter().map(Arc::new).collect()),
            tunnels: Arc::new(Tunnels::default()),
            faults: Faults::default(),
            latency_nanos: AtomicU64::new(0),
            close_grace_nanos: AtomicU64::new(nanos(portforward::RUNTIME_CLOSE_GRACE)),
            pki: pki.map(|ca| ca.files),
        });
        let ca_der = tls.ca_der;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.config);
        let server = ApiServer::start(listener, acceptor, shared.clone())?;
        Ok(SimCluster {
            shared,
            server,
            scaling: tokio::sync::Mutex::new(()),
            api_addr,
            kubeconfig,
            ca_der,
            dir: Some(dir),
        })
    }

    /// The kubeconfig file (inside a temp dir owned by this cluster).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A TLS connector that trusts the API server's CA (no client certificate), for tests
    /// that speak to the API server below kube-rs.
    pub fn api_tls_connector(&self) -> Result<tokio_rustls::TlsConnector, SimError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from(self.ca_der.clone()))?;
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
            config,
        )))
    }

    /// `https://127.0.0.1:PORT`.
    pub fn api_url(&self) -> String {
        format!("https://{}", self.api_addr)
    }

    /// The namespace holding the etcd objects.
    pub fn namespace(&self) -> &str {
        &self.shared.cfg.namespace
    }

    /// Pod names in ordinal order (`etcd-0`, `etcd-1`, ...; `etcd-cp-1`, ... for the
    /// control-plane layout).
    pub fn pod_names(&self) -> Vec<String> {
        self.shared.store.pod_names()
    }

    /// The etcd member name (`--name`) of `pod`: the pod name in a StatefulSet, the node
    /// name (`cp-1`) for a control-plane static pod.
    pub fn member_name(&self, pod: &str) -> Option<String> {
        self.shared.member(pod).map(|m| m.spec.name.clone())
    }

    /// With [`Layout::ControlPlane`]: the kubeadm-style CA and client certificates a user
    /// copies off a control-plane node (`--etcd-cacert`, `--etcd-cert`, `--etcd-key`).
    pub fn etcd_pki(&self) -> Option<&EtcdPki> {
        self.shared.pki.as_ref()
    }

    /// The member's real client URL (`http://127.0.0.1:PORT`), for test assertions only.
    pub fn member_client_url(&self, pod: &str) -> Option<String> {
        self.shared.member(pod).map(|m| m.spec.client_url())
    }

    /// The process ids of the running etcd members, for measuring them (benchmarks read
    /// their CPU time).
    pub fn etcd_pids(&self) -> Vec<u32> {
        self.shared
            .members()
            .iter()
            .filter_map(|m| m.pid())
            .collect()
    }

    /// A pod's service-account directory (`token`, `ca.crt`, `namespace`, as the kubelet
    /// mounts at /var/run/secrets/kubernetes.io/serviceaccount) for the ServiceAccount of
    /// deploy/gateway.yaml; with `KUBERNETES_SERVICE_HOST`/`PORT` from [`SimCluster::api_url`]
    /// a process uses it as if it ran in a pod.
    pub fn service_account_dir(&self) -> PathBuf {
        self.shared.root.join("serviceaccount")
    }

    /// The pod's current `status.podIP`.
    pub fn pod_ip(&self, pod: &str) -> Option<String> {
        self.shared.store.pod_state(pod).map(|p| p.ip)
    }

    /// The URL the member advertises: `http://etcd-0.etcd.<ns>.svc.cluster.local:2379`, or
    /// `https://<node-ip>:2379` for the control-plane layout.
    pub fn advertised_client_url(&self, pod: &str) -> Option<String> {
        self.shared
            .member(pod)
            .map(|m| m.spec.advertise_client_url.clone())
    }

    /// Accepted port-forward WebSocket upgrades so far.
    pub fn portforward_count(&self) -> u64 {
        self.shared.tunnels.upgrades()
    }

    /// Accepted port-forward SPDY connections so far (each carries many forwarded
    /// connections), plain or tunnelled through WebSocket.
    pub fn spdy_upgrade_count(&self) -> u64 {
        self.shared.tunnels.spdy_upgrades()
    }

    /// Of [`SimCluster::spdy_upgrade_count`], those tunnelled through WebSocket
    /// (`SPDY/3.1+portforward.k8s.io`, served from Kubernetes 1.31).
    pub fn spdy_tunnel_count(&self) -> u64 {
        self.shared.tunnels.spdy_tunnels()
    }

    /// Port-forward sockets (WebSocket or SPDY connections) currently open.
    pub fn open_tunnels(&self) -> usize {
        self.shared.tunnels.open()
    }

    /// Fault: abruptly closes every open port-forward socket and its pod connection.
    pub fn cut_tunnels(&self) {
        self.shared.cut_all();
    }

    /// Fault: abruptly closes the port-forward sockets to `pod` (a kubelet restart on its
    /// node).
    pub fn cut_pod_tunnels(&self, pod: &str) {
        self.shared.tunnels.cut_pod(pod);
    }

    /// Fault: from now on, new port-forward requests to `pod` meet `fault` (`None` clears
    /// it; requests held by [`PortForwardFault::Unanswered`] are then answered). Connections
    /// already open are not affected; see [`SimCluster::drop_tunnels_silently`] for those.
    /// The `faults` module cites what each fault follows.
    pub fn set_portforward_fault(&self, pod: &str, fault: Option<PortForwardFault>) {
        self.shared.faults.set(pod, fault);
    }

    /// Fault: the open port-forward connections to `pod` (to every pod with `None`) stop
    /// passing bytes in both directions, without FIN or RST, for good: a load balancer's idle
    /// drop or a partition. New connections work. Returns how many connections were dropped.
    pub fn drop_tunnels_silently(&self, pod: Option<&str>) -> usize {
        self.shared.tunnels.freeze(pod)
    }

    /// How long the container runtime waits for the other direction of a forwarded
    /// connection once one has ended (the pod closed, say) before closing the stream:
    /// containerd's 1 s (the default here), during which the client sees neither data nor
    /// the close. Applies to WebSocket and SPDY port-forward alike.
    pub fn set_close_grace(&self, grace: Duration) {
        self.shared
            .close_grace_nanos
            .store(nanos(grace), Ordering::Relaxed);
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
    /// Ready again once `/health` answers. The kubelet re-created the pod
    /// sandbox, so the pod keeps its name and uid but gets a new IP (see
    /// `objects::PodState::new_sandbox`); the restart count goes up.
    pub async fn restart_pod(&self, pod: &str) -> Result<(), SimError> {
        let member = self
            .shared
            .member(pod)
            .ok_or_else(|| SimError::NoSuchPod(pod.to_string()))?;
        member.kill().await?;
        // The new sandbox's IP is known before its container starts; a host-network pod
        // keeps its node's IP.
        let ip = match self.shared.cfg.layout {
            Layout::StatefulSet => self.shared.store.alloc_ip(),
            Layout::ControlPlane => self
                .shared
                .store
                .pod_state(pod)
                .map(|p| p.ip)
                .unwrap_or_default(),
        };
        member.set_pod_addr(pod_addr(self.shared.store.cidr(), &ip));
        member.spawn()?;
        member
            .wait_healthy(Instant::now() + HEALTH_DEADLINE)
            .await?;
        let mut sandbox = Ok(());
        self.shared.store.update_pod(pod, |p| {
            sandbox = p.new_sandbox(ip);
            p.ready = true;
            p.transition = objects::now();
            p.restart_count += 1;
            true
        });
        sandbox
    }

    /// Scales the StatefulSet to `members` pods, one etcd member at a time:
    /// real `member add` + start on the way up, `member remove` + stop on the
    /// way down (highest ordinal first). The `scale` module documents the sequence.
    /// Scaling down right after a scale-up takes about 5 s: etcd's strict
    /// reconfiguration check refuses the removal until the new member has
    /// been connected for its `HealthInterval`, and this waits it out.
    /// Returns once every change is done; stops at the first failure.
    pub async fn scale(&self, members: usize) -> Result<(), SimError> {
        if members == 0 {
            return Err(SimError::Config("members must be at least 1".into()));
        }
        if self.shared.cfg.layout == Layout::ControlPlane {
            return Err(SimError::Config(
                "control-plane etcd has no replica count to scale (kubeadm join adds members)"
                    .into(),
            ));
        }
        let _one_at_a_time = self.scaling.lock().await;
        self.shared.store.set_spec_replicas(members);
        loop {
            let names = self.shared.store.pod_names();
            let current = names.len();
            if current < members {
                scale::add_member(&self.shared, current).await?;
            } else if current > members {
                let last = names.last().cloned().unwrap_or_default();
                scale::remove_member(&self.shared, &last).await?;
            } else {
                return Ok(());
            }
        }
    }

    /// The kubelet's `--streaming-connection-idle-timeout` for port-forward
    /// sockets: a socket with no data message received or sent for this long
    /// is closed. `None` (the default) disables it. Applies to open sockets too.
    pub fn set_kubelet_idle_timeout(&self, timeout: Option<Duration>) {
        self.shared.tunnels.set_idle_timeout(timeout);
    }

    /// Port-forward sockets closed by the idle timeout so far.
    pub fn idle_closures(&self) -> u64 {
        self.shared.tunnels.idle_closures()
    }

    /// Fault: the API server is unavailable for `down`. New connections are
    /// refused and every in-flight API request and watch ends; open
    /// port-forward sockets keep working. Then it serves again on the same
    /// port with the same resourceVersion history. Returns once it is back.
    /// (If the port cannot be bound again, which needs another process to
    /// take it meanwhile, the error is logged and the server stays down.)
    pub async fn pause_api(&self, down: Duration) {
        self.server.stop().await;
        tokio::time::sleep(down).await;
        self.resume_api().await;
    }

    /// Fault: an API server restart. Like [`SimCluster::pause_api`] with no
    /// downtime, but every port-forward socket is cut too (a restarting
    /// apiserver drops the tunnels it proxies).
    pub async fn restart_api(&self) {
        self.server.stop().await;
        self.shared.cut_all();
        self.resume_api().await;
    }

    async fn resume_api(&self) {
        if let Err(e) = self.server.resume().await {
            tracing::error!("the simulated API server could not come back: {e}");
        }
    }

    /// Fault: delays every port-forward frame (each direction) and every API response.
    pub fn set_latency(&self, one_way: Duration) {
        self.shared
            .latency_nanos
            .store(nanos(one_way), Ordering::Relaxed);
    }

    /// Kills the members, stops the server and removes the temp dir.
    pub async fn shutdown(mut self) {
        self.server.stop().await;
        self.shared.cut_all();
        for m in &self.shared.members() {
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
        self.shared.cut_all();
        for m in &self.shared.members() {
            m.start_kill();
        }
    }
}

/// For tests driving the simulator: awaits `fut` for at most `limit`, and past that panics
/// naming `what` and the caller's line, so a hang fails the test instead of blocking CI.
///
/// [`SimCluster`]'s async methods do not time out themselves (beyond a starting member's 30 s
/// to report healthy); tests await them through this.
#[track_caller]
pub fn within_for<'a, F>(
    limit: Duration,
    what: &'a str,
    fut: F,
) -> impl Future<Output = F::Output> + 'a
where
    F: IntoFuture + 'a,
{
    let at = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(limit, fut).await {
            Ok(out) => out,
            Err(_) => panic!("{what}: not done within {limit:?} (at {at})"),
        }
    }
}

/// Where a member serves clients on its pod IP: with a loopback pod network only.
pub(crate) fn pod_addr(cidr: PodCidr, ip: &str) -> Option<SocketAddr> {
    if !cidr.reachable() {
        return None;
    }
    Some(SocketAddr::new(ip.parse().ok()?, objects::CLIENT_PORT))
}

/// A 127.N.0.0/16 whose first pod addresses' client port is free (another simulator in the
/// same test run may have taken one).
fn free_loopback_cidr() -> Result<PodCidr, SimError> {
    for _ in 0..64 {
        let byte = u8::from_str_radix(&random::random_hex(1)?, 16).unwrap_or(0);
        if byte == 0 || byte == 255 {
            continue;
        }
        let cidr = PodCidr::loopback(byte);
        let free = (0..16).all(|n| {
            pod_addr(cidr, &cidr.ip(FIRST_POD_IP + n))
                .is_some_and(|a| std::net::TcpListener::bind(a).is_ok())
        });
        if free {
            return Ok(cidr);
        }
    }
    Err(SimError::io(
        "finding a free loopback pod network",
        std::io::Error::from(std::io::ErrorKind::AddrInUse),
    ))
}

/// Index (see [`PodCidr::ip`]) of the first pod's IP: 10.244.0.10.
const FIRST_POD_IP: u32 = 10;

/// Index of the first control-plane node's IP: 10.0.0.11.
const FIRST_NODE_IP: u32 = 11;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn ordinal_u32(ordinal: usize) -> u32 {
    u32::try_from(ordinal).unwrap_or(u32::MAX)
}

/// Picks ports and builds the member specs (data dirs under `root`); `ips` are the pods'
/// IPs, and `pki` (control-plane layout) signs each node's server certificate.
fn plan_members(
    cfg: &SimConfig,
    id: &Identity,
    root: &Path,
    ips: &[String],
    pki: Option<&pki::EtcdCa>,
) -> Result<Vec<Member>, SimError> {
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
    for (ordinal, ip) in ips.iter().enumerate() {
        let pod = id.pod_name(ordinal);
        let member_dir = root.join(&pod);
        std::fs::create_dir_all(&member_dir)
            .map_err(|e| SimError::io(format!("creating {}", member_dir.display()), e))?;
        let (name, advertise_client_url, tls, metrics_port) = match (cfg.layout, pki) {
            (Layout::ControlPlane, Some(ca)) => {
                let node = id.node_name(ordinal);
                let server = ca.server(&member_dir.join("pki"), &node, ip)?;
                let tls = MemberTls {
                    cert: server.cert,
                    key: server.key,
                    ca: ca.files.ca_cert.clone(),
                };
                let url = objects::control_plane_client_url(ip);
                (node, url, Some(tls), Some(etcd::free_port(lo)?))
            }
            _ => (pod.clone(), id.advertised_client_url(ordinal), None, None),
        };
        specs.push(MemberSpec {
            client_ip,
            client_port: etcd::free_port(client_ip)?,
            peer_port: etcd::free_port(lo)?,
            data_dir: member_dir.join("data"),
            log_path: member_dir.join("etcd.log"),
            initial_cluster: String::new(),
            cluster_token: token.clone(),
            join_existing: false,
            advertise_client_url,
            enable_v2: cfg.enable_v2,
            name,
            pod,
            tls,
            metrics_port,
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
