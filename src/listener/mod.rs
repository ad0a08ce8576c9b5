//! Local endpoints: accept TCP connections and serve HTTP/1.1 and HTTP/2 (prior knowledge,
//! which is how gRPC clients speak h2c) on the same socket.
//!
//! hyper-util's `auto` builder reads the first bytes to tell the HTTP/2 preface from HTTP/1
//! and replays them; `authority::RepairAuthority` first repairs the malformed `:authority`
//! some etcd clients send on HTTP/2. Each connection gets its own task and tracing span; a
//! malformed frame or a reset ends only that connection; `coalesce::CoalesceWrites` lets
//! responses that are ready together leave in one write. No idle or read timeouts apply: watches, lease
//! keep-alives and v2 `?wait=true` long-polls can be silent for hours.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::proxy::Proxy;
use crate::upstream::BoxIo;

pub(crate) mod authority;
#[cfg(test)]
mod proptests;
pub mod tls;

/// How long in-flight requests may run after shutdown starts.
const DRAIN: Duration = Duration::from_secs(10);

/// etcd allows unlimited concurrent streams; clientv3 multiplexes every RPC of a process on
/// one connection, so the h2 default of 200 would throttle a busy client.
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

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves `endpoint` (over TLS when `tls` is set) until `shutdown` turns true, then drains for
/// up to `DRAIN` (10 s).
pub async fn serve(
    endpoint: Endpoint,
    proxy: Proxy,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    let builder = Arc::new(builder);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
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
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        // A debug-level span: it is entered on every poll of the connection, and enabled it
        // cost 6-11 % of the proxy's CPU under load (`cargo bench --bench compare`); hyper
        // runs each HTTP/2 request in a task of its own, outside the span, anyway. Events that matter at
        // the default level name the peer themselves.
        let span = tracing::debug_span!("conn", endpoint = %endpoint.name, peer = %peer);
        let proxy = proxy.clone();
        let pinned = endpoint.pinned.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            let pinned = pinned.clone();
            // Boxed: hyper moves each request's future into a task of its own, and moving the
            // whole pipeline's state (several KiB) by value showed up as memmove in profiles.
            Box::pin(async move { proxy.handle(pinned.as_deref(), peer.ip(), req).await })
        });
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(
            async move {
                tracing::debug!("accepted");
                let io: BoxIo = match acceptor {
                    None => Box::pin(tcp),
                    Some(acceptor) => {
                        match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(tcp)).await {
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
                let result = watcher
                    .watch(
                        builder
                            .serve_connection_with_upgrades(io, service)
                            .into_owned(),
                    )
                    .await;
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
    drop(endpoint.listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(endpoint = %endpoint.name, "connections still open after {DRAIN:?}; closing them");
    }
}
