//! Local endpoints: accept TCP connections and serve HTTP/1.1 and HTTP/2 (prior knowledge,
//! which is how gRPC clients speak h2c) on the same socket.
//!
//! hyper-util's `auto` builder reads the first bytes to tell the HTTP/2 preface from HTTP/1
//! and replays them; `authority::RepairAuthority` first repairs the malformed `:authority`
//! some etcd clients send on HTTP/2. Each connection gets its own task and tracing span; a
//! malformed frame or a reset ends only that connection; `coalesce::CoalesceWrites` lets
//! responses that are ready together leave in one write.
//!
//! Every listener is treated as exposed to hostile clients. Before a connection has sent an
//! authenticated request, everything it can make us hold is bounded: the number of its
//! connections ([`admission`]), its time to a first request and its idle time
//! (`activity`), the size of what is decoded for it (the header limits set in
//! `http_builder`, and [`authority`] for the one block we decode ourselves). Once trusted, no
//! idle or read timeouts apply: watches, lease keep-alives and v2 `?wait=true` long-polls can
//! be silent for hours.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::proxy::{Authenticated, Proxy};
use crate::upstream::BoxIo;

mod activity;
pub mod admission;
pub mod authority;
#[cfg(test)]
mod proptests;
pub mod tls;

use activity::Activity;
use admission::Refusal;
pub use admission::{Admission, Limits};

/// How long in-flight requests may run after shutdown starts.
const DRAIN: Duration = Duration::from_secs(10);

/// etcd allows unlimited concurrent streams (`docs/etcd-protocols.md` §7.2); clientv3
/// multiplexes every RPC of a process on one connection, so the h2 default of 200 would
/// throttle a busy client.
const MAX_CONCURRENT_STREAMS: u32 = 4096;

/// Why a local endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process has the port.
    #[error("{addr} is already in use (another etcd-proxy or etcd?); choose another address with --listen or --member-ports")]
    InUse {
        /// The address.
        addr: SocketAddr,
    },
    /// Any other bind failure.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Binds a local endpoint.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AddrInUse => Error::InUse { addr },
            _ => Error::Bind { addr, source },
        })
}

/// One local endpoint: the cluster endpoint (`pinned == None`) or a member's.
pub struct Endpoint {
    /// The bound socket.
    pub listener: TcpListener,
    /// `cluster` or the member name, for logs.
    pub name: Arc<str>,
    /// The member this endpoint is pinned to.
    pub pinned: Option<Arc<str>>,
}

/// What every local endpoint of one proxy shares.
#[derive(Clone)]
pub struct Serving {
    /// TLS, if the endpoints serve it.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connection limits, with the per-address counts all endpoints draw on.
    pub admission: Arc<Admission>,
}

/// How long a connection closed for idleness may take to finish after its GOAWAY.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The HTTP/1.1 and HTTP/2 server settings, with every limit on unauthenticated input
/// explicit rather than left to a default that could change under us.
fn http_builder(limits: Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(MAX_HTTP1_HEADERS)
        .max_buf_size(MAX_HTTP1_BUFFER);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_frame_size(authority::MAX_FRAME as u32)
        .max_header_list_size(authority::MAX_HEADER_LIST as u32)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_RESETS);
    builder
}

/// Header fields per HTTP/1.1 request (hyper's default, made explicit).
const MAX_HTTP1_HEADERS: usize = 100;
/// HTTP/1.1 read buffer: bounds a request head (and the body bytes read ahead of the
/// handler).
const MAX_HTTP1_BUFFER: usize = 64 * 1024;
/// Streams a client may reset before they are accepted (h2's rapid-reset bound, explicit).
const MAX_PENDING_RESETS: usize = 20;
/// Streams the server may reset for a client's errors before the connection goes away.
const MAX_LOCAL_RESETS: usize = 1024;

/// Serves `endpoint` (over TLS when `serving.tls` is set) until `shutdown` turns true, then
/// drains for up to `DRAIN` (10 s).
pub async fn serve(
    endpoint: Endpoint,
    proxy: Proxy,
    serving: Serving,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = serving.admission.limits();
    let builder = Arc::new(http_builder(limits));
    let acceptor = serving.tls.map(tokio_rustls::TlsAcceptor::from);
    let admission = serving.admission.listener();
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = endpoint.listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: log, back off a little, keep serving.
                    tracing::warn!(endpoint = %endpoint.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
        };
        let permit = match admission.admit(peer.ip()) {
            Ok(p) => p,
            Err(refusal) => {
                if let Some(n) = admission.refused() {
                    let why = match refusal {
                        Refusal::Listener => {
                            format!("--max-connections ({})", limits.max_connections)
                        }
                        Refusal::Address => format!(
                            "--max-connections-per-address ({}) for {}",
                            limits.max_connections_per_address,
                            peer.ip()
                        ),
                        Refusal::Rate => format!(
                            "--max-connection-rate-per-address ({}/s) for {}",
                            limits.max_connection_rate_per_address,
                            peer.ip()
                        ),
                    };
                    tracing::warn!(endpoint = %endpoint.name, refused = n, "closing new connections: {why} reached");
                }
                drop(tcp);
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        // A debug-level span: it is entered on every poll of the connection, which costs
        // measurably when enabled; hyper runs each HTTP/2 request in a task of its own, outside
        // the span, anyway. Events that matter at the default level name the peer themselves.
        let span = tracing::debug_span!("conn", endpoint = %endpoint.name, peer = %peer);
        let activity = Arc::new(Activity::default());
        let service = {
            let activity = activity.clone();
            let proxy = proxy.clone();
            let pinned = endpoint.pinned.clone();
            service_fn(move |req| {
                let proxy = proxy.clone();
                let pinned = pinned.clone();
                let activity = activity.clone();
                // Boxed: hyper moves each request's future into a task of its own, and moving
                // the whole pipeline's state (several KiB) by value showed up as memmove in
                // profiles.
                let fut: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
                    let in_flight = activity.begin();
                    let resp = proxy.handle(pinned.as_deref(), peer.ip(), req).await;
                    if let Ok(r) = &resp {
                        if r.extensions().get::<Authenticated>().is_some() {
                            activity.trust();
                        }
                    }
                    drop(in_flight);
                    resp
                });
                fut
            })
        };
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let stop = shutdown.clone();
        connections.spawn(
            async move {
                let _permit = permit;
                tracing::debug!("accepted");
                let io: BoxIo = match acceptor {
                    None => Box::pin(tcp),
                    Some(acceptor) => {
                        match tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(stream)) => Box::pin(stream),
                            Ok(Err(e)) => {
                                tracing::info!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::info!(%peer, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                let io = TokioIo::new(crate::coalesce::CoalesceWrites::new(
                    authority::RepairAuthority::new(io),
                ));
                // Driven until it ends: asked to finish (GOAWAY, or close when idle) when the
                // proxy stops, and closed when it stays untrusted and idle too long.
                let conn = builder.serve_connection_with_upgrades(io, service);
                tokio::pin!(conn);
                let mut stop = stop;
                let mut stopping = false;
                let result = loop {
                    tokio::select! {
                        result = conn.as_mut() => break result,
                        _ = async { let _ = stop.wait_for(|s| *s).await; }, if !stopping => {
                            stopping = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        _ = activity.untrusted_idle(limits.header_timeout), if !stopping => {
                            tracing::debug!("closing a connection with no authenticated request");
                            conn.as_mut().graceful_shutdown();
                            break tokio::time::timeout(CLOSE_GRACE, conn.as_mut())
                                .await
                                .unwrap_or(Ok(()));
                        }
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
    drop(endpoint.listener);
    connections.close();
    if tokio::time::timeout(DRAIN, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(endpoint = %endpoint.name, "connections still open after {DRAIN:?}; closing them");
    }
}
