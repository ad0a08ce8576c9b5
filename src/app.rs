//! The composition root: the one place that wires discovery, tunnels, the upstream pool, the
//! proxy and the listeners together.
//!
//! [`start`] does everything that can fail for a reason the user must fix (kubeconfig, RBAC,
//! no pods, busy ports, etcd unreachable inside the pod) and returns a [`Running`] proxy whose
//! [`Summary`] the caller prints; [`Running::serve`] then runs until shutdown.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Version};
use http_body_util::{BodyExt, Empty, Full};
use tokio::sync::watch;

use crate::auth::Auth;
use crate::config::{Config, TlsSource};
use crate::endpoints::MemberEndpoints;
use crate::error::{find_cause, one_line, BoxError};
use crate::k8s::discovery::{Discovery, EtcdPod, Selection};
use crate::k8s::{self, tunnel};
use crate::listener::{self, tls, Endpoint};
use crate::proxy::Proxy;
use crate::router::Backends;
use crate::upstream::health::{Health, HealthConfig};
use crate::upstream::{Dial, DialFuture, Upstream, UpstreamBody};

/// How long the start-up probe of one member may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kubeconfig or client problem.
    #[error(transparent)]
    Kube(#[from] k8s::Error),
    /// Finding the pods failed.
    #[error(transparent)]
    Discovery(#[from] k8s::discovery::Error),
    /// A local port could not be opened.
    #[error(transparent)]
    Listen(#[from] listener::Error),
    /// The users file is unusable.
    #[error(transparent)]
    Auth(#[from] crate::auth::Error),
    /// The local TLS setup failed.
    #[error(transparent)]
    Tls(#[from] listener::tls::Error),
    /// A tunnel problem every member has (RBAC, etcd not on loopback …).
    #[error(transparent)]
    Tunnel(#[from] tunnel::Error),
    /// No member answered the probe.
    #[error("no etcd member is reachable: {0}")]
    Unreachable(String),
}

/// What the proxy serves, for the start-up summary.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Namespace of the pods.
    pub namespace: String,
    /// How they were found, e.g. `statefulset etcd`.
    pub target: String,
    /// The kubeconfig context.
    pub context: String,
    /// The cluster endpoint's URL.
    pub cluster_url: String,
    /// Each member: name, local URL, and a note (version or problem).
    pub members: Vec<(String, String, String)>,
    /// The CA certificate clients need, when --tls-auto made it.
    pub ca_cert: Option<std::path::PathBuf>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.members.iter().map(|m| m.0.as_str()).collect();
        let n = names.len();
        let noun = if n == 1 { "member" } else { "members" };
        writeln!(
            f,
            "Forwarding {} in namespace {} ({n} {noun}: {}) via context {}",
            self.target,
            self.namespace,
            names.join(" "),
            self.context
        )?;
        let width = names
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(0)
            .max("cluster".len());
        write!(f, "  {:width$}  {}", "cluster", self.cluster_url)?;
        for (name, url, note) in &self.members {
            write!(f, "\n  {name:width$}  {url}  {note}")?;
        }
        if let Some(ca) = &self.ca_cert {
            write!(
                f,
                "\nTLS with a local CA: etcdctl --cacert {}",
                ca.display()
            )?;
        }
        Ok(())
    }
}

/// A proxy whose endpoints are bound and whose members answered.
pub struct Running {
    summary: Summary,
    cluster: Endpoint,
    members: MemberEndpoints,
    proxy: Proxy,
    discovery: Discovery,
    selection: Selection,
    pods_tx: watch::Sender<Arc<Vec<EtcdPod>>>,
    health: Health,
    upstream: Upstream,
    legacy: HashSet<String>,
    stop_tx: watch::Sender<bool>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// Connects to Kubernetes, finds the pods, binds the endpoints and probes each member.
pub async fn start(cfg: Config) -> Result<Running, Error> {
    let kube = k8s::connect(
        cfg.kubeconfig.as_ref(),
        cfg.context.as_deref(),
        cfg.namespace.as_deref(),
    )
    .await?;
    let discovery = Discovery::new(kube.client.clone(), &kube.namespace, cfg.remote_port);
    let (resolved, pods) = discovery.find(&cfg.target).await?;

    let auth = cfg
        .auth_file
        .as_deref()
        .map(Auth::load)
        .transpose()?
        .map(Arc::new);
    let (tls, ca_cert) = tls_config(&cfg)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = listener::bind(cfg.listen).await?;
    let addr = listener
        .local_addr()
        .map_err(|source| listener::Error::Bind {
            addr: cfg.listen,
            source,
        })?;
    let cluster = Endpoint {
        listener,
        name: Arc::from("cluster"),
        pinned: None,
    };
    let (mut members, map_rx) =
        MemberEndpoints::new(cfg.listen.ip(), cfg.member_ports, scheme, tls.clone());
    members.bind_initial(&pods).await?;

    let (pods_tx, pods_rx) = watch::channel(Arc::new(pods.clone()));
    let tunnels = tunnel::Tunneler::new(kube.client.clone(), &kube.namespace);
    let upstream = Upstream::new(
        Arc::new(TunnelDial(tunnels)),
        cfg.keepalive,
        cfg.keepalive_timeout,
    );
    let versions = probe_all(&upstream, &pods).await?;
    let legacy: HashSet<String> = pods
        .iter()
        .zip(&versions)
        .filter(|(_, v)| v.as_deref().is_ok_and(|v| v.starts_with("2.")))
        .map(|(p, _)| p.name.clone())
        .collect();
    let health = Health::new(HealthConfig {
        interval: cfg.keepalive,
        timeout: cfg.keepalive_timeout,
        ..HealthConfig::default()
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let backends = Backends::new(pods_rx, health.clone());
    let proxy = Proxy::new(
        upstream.clone(),
        backends,
        map_rx,
        health.clone(),
        legacy.clone(),
        stop_rx,
        auth,
    );
    let notes = versions.into_iter().map(|v| match v {
        Ok(v) => format!("(etcd {v})"),
        Err(e) => format!("(unreachable: {e})"),
    });
    let summary = Summary {
        namespace: kube.namespace.clone(),
        target: resolved.description.clone(),
        context: kube.context.clone(),
        cluster_url: format!("{scheme}://{addr}"),
        members: members
            .urls(&pods)
            .into_iter()
            .zip(notes)
            .map(|((n, u), note)| (n, u, note))
            .collect(),
        ca_cert,
    };
    Ok(Running {
        summary,
        cluster,
        members,
        proxy,
        discovery,
        selection: resolved.selection,
        pods_tx,
        health,
        upstream,
        legacy,
        stop_tx,
        tls,
    })
}

impl Running {
    /// What is being served.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests (a second SIGINT or
    /// SIGTERM stops the wait).
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), Error> {
        let stop_rx = self.stop_tx.subscribe();
        let cluster = tokio::spawn(listener::serve(
            self.cluster,
            self.proxy.clone(),
            self.tls,
            stop_rx.clone(),
        ));
        let members = tokio::spawn(self.members.run(
            self.proxy.clone(),
            self.pods_tx.subscribe(),
            stop_rx,
        ));
        let watcher = tokio::spawn(self.discovery.watch(self.selection, self.pods_tx.clone()));
        let probes = tokio::spawn(self.health.run_probes(
            self.upstream,
            self.pods_tx.subscribe(),
            self.legacy,
        ));
        shutdown.await;
        let _ = self.stop_tx.send(true);
        watcher.abort();
        probes.abort();
        tokio::select! {
            _ = async { let _ = tokio::join!(cluster, members); } => {}
            _ = crate::shutdown::signal() => tracing::warn!("second signal: exiting without waiting for open requests"),
        }
        Ok(())
    }
}

/// The local TLS configuration, and the CA path to show when --tls-auto made it.
fn tls_config(cfg: &Config) -> Result<(Option<Arc<rustls::ServerConfig>>, Option<PathBuf>), Error> {
    let client_ca = cfg.client_ca.as_deref();
    match &cfg.tls {
        None => Ok((None, None)),
        Some(TlsSource::Files { cert, key }) => {
            Ok((Some(tls::server_config(cert, key, client_ca)?), None))
        }
        Some(TlsSource::Auto { sans }) => {
            let dir = tls::auto::default_dir().map_err(tls::Error::from)?;
            let made = tls::auto::ensure(&dir, sans).map_err(tls::Error::from)?;
            Ok((
                Some(tls::server_config(&made.cert, &made.key, client_ca)?),
                Some(made.ca_cert),
            ))
        }
    }
}

/// Port-forward tunnels as the upstream pool's dialer.
struct TunnelDial(tunnel::Tunneler);

impl Dial for TunnelDial {
    fn dial(&self, pod: &str, port: u16) -> DialFuture {
        let tunneler = self.0.clone();
        let pod = pod.to_owned();
        Box::pin(async move {
            let stream = tunneler.open(&pod, port).await?;
            Ok(Box::pin(stream) as crate::upstream::BoxIo)
        })
    }
}

/// Probes every member: opens its tunnel, asks `/version` over HTTP/1.1 and warms the HTTP/2
/// connection gRPC will use. Returns each member's etcd version or why it is unreachable;
/// fails if RBAC forbids tunnels or no member answers.
async fn probe_all(
    upstream: &Upstream,
    pods: &[EtcdPod],
) -> Result<Vec<Result<String, String>>, Error> {
    let results = futures::future::join_all(pods.iter().map(|p| probe(upstream, p))).await;
    let mut notes = Vec::new();
    let mut first_error = None;
    let mut ok = 0;
    for (pod, result) in pods.iter().zip(results) {
        match result {
            Ok(version) => {
                ok += 1;
                notes.push(Ok(version));
            }
            Err(e) => {
                if let Some(t @ tunnel::Error::Forbidden { .. }) =
                    find_cause::<tunnel::Error>(e.as_ref())
                {
                    return Err(Error::Unreachable(t.to_string()));
                }
                let msg = match find_cause::<tunnel::Error>(e.as_ref()) {
                    Some(t) => t.to_string(),
                    None => one_line(e.as_ref()),
                };
                tracing::warn!(member = %pod.name, error = %msg, "member not reachable at start-up");
                first_error.get_or_insert(msg.clone());
                notes.push(Err(msg));
            }
        }
    }
    match (ok, first_error) {
        (0, Some(e)) => Err(Error::Unreachable(e)),
        _ => Ok(notes),
    }
}

/// The probe failed with this message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ProbeError(String);

async fn probe(upstream: &Upstream, pod: &EtcdPod) -> Result<String, BoxError> {
    let attempt = async {
        let req = Request::builder()
            .uri(format!("http://{}:{}/version", pod.name, pod.port))
            .header(header::HOST, format!("{}:{}", pod.name, pod.port))
            .version(Version::HTTP_11)
            .body(empty_body())?;
        let resp = upstream.send(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(ProbeError(format!("GET /version answered {status}")).into());
        }
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let version = v
            .get("etcdserver")
            .and_then(|s| s.as_str())
            .unwrap_or("?")
            .to_owned();
        if !version.starts_with("2.") {
            warm_grpc(upstream, pod).await;
        }
        Ok::<_, BoxError>(version)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError(format!(
            "no answer from {} within {PROBE_TIMEOUT:?}",
            pod.name
        ))
        .into()),
    }
}

/// Opens the member's HTTP/2 connection ahead of the first gRPC call with a gRPC health check.
async fn warm_grpc(upstream: &Upstream, pod: &EtcdPod) {
    let req = Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}:{}/grpc.health.v1.Health/Check",
            pod.name, pod.port
        ))
        .version(Version::HTTP_2)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .body(
            Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))
                .map_err(|never| match never {})
                .boxed(),
        );
    let Ok(req) = req else { return };
    match upstream.send(req).await {
        Ok(resp) => {
            let _ = resp.into_body().collect().await;
        }
        Err(e) => tracing::debug!(member = %pod.name, error = %one_line(&e), "gRPC warm-up failed"),
    }
}

fn empty_body() -> UpstreamBody {
    Empty::new().map_err(|never| match never {}).boxed()
}
