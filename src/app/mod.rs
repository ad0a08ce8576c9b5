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

use tokio::sync::watch;

use crate::auth::Auth;
use crate::config::{Config, TlsSource};
use crate::endpoints::MemberEndpoints;
use crate::k8s::discovery::{Discovery, Selection};
use crate::k8s::{self, tunnel};
use crate::listener::{self, tls, Admission, Endpoint, Limits, Serving};
use crate::member::EtcdPod;
use crate::proxy::Proxy;
use crate::router::Backends;
use crate::upstream::health::{Health, HealthConfig};
use crate::upstream::tls::{Names, UpstreamTls};
use crate::upstream::{Dial, Upstream};

mod dial;
mod probe;
mod source;

use dial::{DirectDial, TunnelDial};
use probe::probe_all;
use source::{Connect, Source};

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
    /// TLS to etcd could not be set up.
    #[error(transparent)]
    UpstreamTls(#[from] crate::upstream::tls::Error),
    /// The local TLS setup failed.
    #[error(transparent)]
    Tls(#[from] listener::tls::Error),
    /// A tunnel problem every member has (RBAC, etcd not on loopback …).
    #[error(transparent)]
    Tunnel(#[from] tunnel::Error),
    /// A `--endpoints` URL is unusable.
    #[error(transparent)]
    Endpoint(#[from] source::EndpointError),
    /// No member answered the probe.
    #[error("no etcd member is reachable: {0}")]
    Unreachable(String),
}

/// One member in the start-up summary.
#[derive(Debug, Clone)]
pub struct MemberLine {
    /// The member (pod) name.
    pub name: String,
    /// Its local endpoint's URL.
    pub url: String,
    /// Its etcd version, or why it did not answer.
    pub note: String,
}

/// What the proxy serves, for the start-up summary.
#[derive(Debug, Clone)]
pub struct Summary {
    /// What is served and how, e.g. `statefulset etcd in namespace etcd through port-forward
    /// via context aks-admin`.
    pub origin: String,
    /// The cluster endpoint's URL.
    pub cluster_url: String,
    /// Each member's line.
    pub members: Vec<MemberLine>,
    /// The CA certificate clients need, when --tls-auto made it.
    pub ca_cert: Option<std::path::PathBuf>,
    /// The admin listener's address, if any.
    pub admin: Option<std::net::SocketAddr>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
        let n = names.len();
        let noun = if n == 1 { "member" } else { "members" };
        writeln!(
            f,
            "Forwarding {} ({n} {noun}: {})",
            self.origin,
            names.join(" ")
        )?;
        let width = names
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(0)
            .max("cluster".len());
        write!(f, "  {:width$}  {}", "cluster", self.cluster_url)?;
        for MemberLine { name, url, note } in &self.members {
            write!(f, "\n  {name:width$}  {url}  {note}")?;
        }
        if let Some(admin) = &self.admin {
            write!(f, "\nAdmin: http://{admin}/metrics and /healthz")?;
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

/// A proxy whose endpoints are bound and whose members answered: everything [`Running::serve`]
/// starts.
pub struct Running {
    /// What is served, as printed at start-up.
    summary: Summary,
    /// The cluster endpoint, bound.
    cluster: Endpoint,
    /// The member endpoints, bound; they follow the pods.
    members: MemberEndpoints,
    /// The request pipeline every endpoint shares.
    proxy: Proxy,
    /// Where to watch the pods (none with `--endpoints`).
    follow: Option<(Discovery, Selection)>,
    /// The current members, published to the router, endpoints, health checks and dialer.
    pods_tx: watch::Sender<Arc<Vec<EtcdPod>>>,
    /// Member health, fed by requests and by the probes `serve` runs.
    health: Health,
    /// Upstream connections, shared with the health probes.
    upstream: Upstream,
    /// Members that run etcd 2.x (HTTP only).
    legacy: HashSet<String>,
    /// Turns true when the proxy stops: listeners drain, watches end.
    stop_tx: watch::Sender<bool>,
    /// TLS and connection limits for every endpoint.
    serving: Serving,
    /// The admin listener, bound, if `--admin` was given.
    admin: Option<tokio::net::TcpListener>,
}

/// Connects to Kubernetes, finds the pods, binds the endpoints and probes each member.
pub async fn start(cfg: Config) -> Result<Running, Error> {
    let Source {
        pods,
        connect,
        follow,
        origin,
    } = Source::find(&cfg).await?;
    let admin = match cfg.admin {
        Some(addr) => Some(listener::bind(addr).await?),
        None => None,
    };
    let auth = load_auth(&cfg)?;
    let (serving, ca_cert) = serving(&cfg)?;
    let scheme = if serving.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let (cluster, cluster_addr) = bind_cluster(cfg.listen).await?;
    let (mut members, map_rx) =
        MemberEndpoints::new(cfg.listen.ip(), cfg.member_ports, scheme, serving.clone());
    members.bind_initial(&pods).await?;

    let (pods_tx, pods_rx) = watch::channel(Arc::new(pods.clone()));
    let upstream_tls = upstream_tls(&cfg, &pods_rx)?;
    let dial: Arc<dyn Dial> = match connect {
        Connect::Tunnels(tunnels) => Arc::new(TunnelDial(*tunnels)),
        Connect::Direct => Arc::new(DirectDial {
            pods: pods_rx.clone(),
            timeout: cfg.dial_timeout,
        }),
    };
    // --keepalive paces both the HTTP/2 pings on upstream connections and the health checks
    // (which also keep idle tunnels alive); --keepalive-timeout bounds the answer to either.
    let upstream = Upstream::new(
        dial,
        upstream_tls.clone(),
        cfg.keepalive,
        cfg.keepalive_timeout,
    );
    let health = Health::new(HealthConfig {
        interval: cfg.keepalive,
        timeout: cfg.keepalive_timeout,
        ..HealthConfig::default()
    });

    let versions = probe_all(&upstream, &pods, upstream_tls.as_ref()).await?;
    let legacy: HashSet<String> = pods
        .iter()
        .zip(&versions)
        .filter(|(_, v)| v.as_deref().is_ok_and(|v| v.starts_with("2.")))
        .map(|(p, _)| p.name.clone())
        .collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let backends = Backends::new(pods_rx, health.clone(), cfg.reads);
    let proxy = Proxy::new(
        upstream.clone(),
        backends,
        map_rx,
        health.clone(),
        legacy.clone(),
        stop_rx,
        auth,
    );
    let summary = Summary {
        origin,
        cluster_url: format!("{scheme}://{cluster_addr}"),
        members: members
            .urls(&pods)
            .into_iter()
            .zip(versions)
            .map(|((name, url), version)| MemberLine {
                name,
                url,
                note: match version {
                    Ok(v) => format!("(etcd {v})"),
                    Err(e) => format!("(unreachable: {e})"),
                },
            })
            .collect(),
        ca_cert,
        admin: admin.as_ref().and_then(|l| l.local_addr().ok()),
    };
    Ok(Running {
        summary,
        cluster,
        members,
        proxy,
        follow,
        pods_tx,
        health,
        upstream,
        legacy,
        stop_tx,
        serving,
        admin,
    })
}

/// The users file and token key, if `--auth-file` was given; follows the users file.
fn load_auth(cfg: &Config) -> Result<Option<Arc<Auth>>, Error> {
    let Some(users) = cfg.auth_file.as_deref() else {
        return Ok(None);
    };
    let auth = Arc::new(Auth::load(users, cfg.token_key.as_deref())?);
    tracing::info!(key = %auth.key_id(), shared = cfg.token_key.is_some(), "login tokens signed");
    tokio::spawn(auth.clone().follow_users_file());
    Ok(Some(auth))
}

/// How every local endpoint serves: TLS and connection limits. Also the CA path to show when
/// --tls-auto made it.
fn serving(cfg: &Config) -> Result<(Serving, Option<PathBuf>), Error> {
    let (tls, ca_cert) = tls_config(cfg)?;
    let admission = Admission::new(Limits {
        max_connections: cfg.max_connections,
        max_connections_per_address: cfg.max_connections_per_address,
        max_connection_rate_per_address: cfg.max_connection_rate_per_address,
        header_timeout: cfg.header_timeout,
    });
    Ok((Serving { tls, admission }, ca_cert))
}

/// Binds the cluster endpoint; returns it with the address it got.
async fn bind_cluster(
    addr: std::net::SocketAddr,
) -> Result<(Endpoint, std::net::SocketAddr), Error> {
    let listener = listener::bind(addr).await?;
    let local = listener
        .local_addr()
        .map_err(|source| listener::Error::Bind { addr, source })?;
    let endpoint = Endpoint {
        listener,
        name: Arc::from("cluster"),
        pinned: None,
    };
    Ok((endpoint, local))
}

/// TLS toward etcd, if `--etcd-cacert` was given: each member's certificate is checked
/// against the name discovery found for it (the pods watch keeps it current).
fn upstream_tls(
    cfg: &Config,
    pods: &watch::Receiver<Arc<Vec<EtcdPod>>>,
) -> Result<Option<UpstreamTls>, Error> {
    let Some(t) = &cfg.etcd_tls else {
        return Ok(None);
    };
    let pods = pods.clone();
    let names: Names = Arc::new(move |pod: &str| {
        pods.borrow()
            .iter()
            .find(|p| p.name == pod)
            .and_then(|p| p.dns_name.clone())
    });
    let identity = t.identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    Ok(Some(UpstreamTls::load(
        &t.cacert,
        identity,
        t.server_name.clone(),
        names,
    )?))
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
            self.serving,
            stop_rx.clone(),
        ));
        let members = tokio::spawn(self.members.run(
            self.proxy.clone(),
            self.pods_tx.subscribe(),
            stop_rx,
        ));
        if let Some(admin) = self.admin {
            let (health, pods) = (self.health.clone(), self.pods_tx.subscribe());
            tokio::spawn(crate::admin::serve(
                admin,
                health,
                pods,
                self.stop_tx.subscribe(),
            ));
        }
        let pods_tx = self.pods_tx.clone();
        let watcher = tokio::spawn(async move {
            match self.follow {
                Some((discovery, selection)) => discovery.watch(selection, pods_tx).await,
                None => std::future::pending().await,
            }
        });
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
