//! Port-forward tunnels: one TCP connection to etcd inside a pod, over WebSocket
//! (`v4.channel.k8s.io`, kube-rs' `Portforwarder`) or SPDY/3.1 (`portforward.k8s.io`,
//! [`super::spdy`]).
//!
//! The API server authorizes the port-forward subresource by HTTP method: the WebSocket
//! upgrade is a GET (verb `get`; from Kubernetes 1.35 also `create`), SPDY is a POST (verb
//! `create`). `--portforward auto` does what kubectl does: WebSocket first, SPDY when the
//! WebSocket upgrade is refused (any answer but 101). Unlike kubectl, which decides per
//! run, etcd-proxy remembers the fallback: once SPDY worked where WebSocket was refused,
//! new tunnels go straight to SPDY rather than paying a refused upgrade each time.
//!
//! A v4 WebSocket carries exactly one TCP connection (the kubelet dials the pod once per
//! socket), so each tunnel is its own upgrade. SPDY multiplexes: one upgraded connection
//! per pod carries a stream pair per tunnel, and is replaced when it dies.
//!
//! The kubelet reports failures as text on the port's error channel or stream — for example
//! when etcd does not listen on the pod's loopback, which is where the container runtime
//! dials. We surface that text as the connection's read error instead of a bare EOF, so the
//! user sees why.
//!
//! Opening a tunnel is bounded by the dial timeout ([`Timing::dial`], `--dial-timeout`): an
//! API server or kubelet that accepts the upgrade and never answers would otherwise hold the
//! dial, and every request waiting for that member's connection, forever. Each dial has its
//! own deadline and holds no lock shared with other pods (the only lock held across an
//! upgrade is the pod's own SPDY slot), so one member's hang never delays another's tunnels.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::time::Instant;

use super::spdy::conn::{ConnError, Keepalive, SpdyConn};
use super::spdy::upgrade::{self, UpgradeError};
use crate::cli::PortForward;

/// What RBAC must grant for tunnels, in every message about a refused port-forward.
const RBAC_ADVICE: &str = "the Kubernetes user needs `get` and `create` on `pods/portforward` \
     (WebSocket port-forward is a GET, SPDY a POST, and from Kubernetes 1.35 WebSocket needs \
     both; see deploy/rbac.yaml)";

/// Why a tunnel could not be opened or died.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RBAC does not allow port-forwarding.
    #[error(
        "forbidden to port-forward to pod {pod} in namespace {namespace}: {RBAC_ADVICE}; API \
         server said: {message}"
    )]
    Forbidden {
        /// The pod.
        pod: String,
        /// The namespace.
        namespace: String,
        /// The API server's message (both, when both protocols were refused).
        message: String,
    },
    /// The pod is gone.
    #[error("pod {pod} not found in namespace {namespace}")]
    PodNotFound {
        /// The pod.
        pod: String,
        /// The namespace.
        namespace: String,
    },
    /// The WebSocket upgrade failed for another reason.
    #[error("cannot open a port-forward tunnel to pod {pod}: {source}")]
    Open {
        /// The pod.
        pod: String,
        /// What kube said (a failed exec plugin without its secrets).
        #[source]
        source: super::exec::Redacted,
    },
    /// The SPDY upgrade failed for another reason.
    #[error("cannot open a SPDY port-forward connection to pod {pod}: {source}")]
    SpdyOpen {
        /// The pod.
        pod: String,
        /// Why.
        #[source]
        source: UpgradeError,
    },
    /// The SPDY connection could not carry a new tunnel.
    #[error("cannot open a port-forward stream to pod {pod}: {source}")]
    SpdyStream {
        /// The pod.
        pod: String,
        /// Why.
        #[source]
        source: ConnError,
    },
    /// Nothing listens on the port on the pod's loopback.
    #[error(
        "nothing is listening on localhost:{port} inside pod {pod}: etcd is down there, or it does \
         not listen on the pod's loopback, where port-forward connects (make etcd listen on \
         127.0.0.1 or 0.0.0.0, or pass the right --remote-port)"
    )]
    NotListening {
        /// The pod.
        pod: String,
        /// The port.
        port: u16,
    },
    /// The tunnel did not open within the dial timeout.
    #[error(
        "port-forward to pod {pod} did not open within {after:?} (--dial-timeout): no answer \
         from the API server or from the kubelet on the pod's node"
    )]
    DialTimeout {
        /// The pod.
        pod: String,
        /// The dial timeout.
        after: Duration,
    },
    /// Any other error text the kubelet sent.
    #[error("port-forward to pod {pod} failed: {message}")]
    Kubelet {
        /// The pod.
        pod: String,
        /// The kubelet's text.
        message: String,
    },
}

/// A refused WebSocket upgrade: `(HTTP status, message)`; `None` for errors that are not a
/// refusal (no answer at all), where falling back would not help (kubectl's
/// `IsUpgradeFailure`).
fn ws_refusal(e: &kube::Error) -> Option<(u16, String)> {
    match e {
        kube::Error::Api(s) => Some((s.code, s.message.clone())),
        kube::Error::UpgradeConnection(u) => Some((0, u.to_string())),
        _ => None,
    }
}

/// One SPDY connection per pod, shared by that pod's tunnels.
type SpdyPool = Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<SpdyConn>>>>>;

/// How long tunnels may take to open, and how SPDY connections are checked.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long opening one tunnel may take, upgrade included (`--dial-timeout`).
    pub dial: Duration,
    /// Pings on SPDY connections (`--keepalive`, `--keepalive-timeout`). WebSocket tunnels
    /// carry one upstream connection each, which the health checks and HTTP/2 pings check.
    pub keepalive: Keepalive,
}

/// Opens port-forward tunnels to pods in one namespace.
#[derive(Clone)]
pub struct Tunneler {
    pods: Api<Pod>,
    client: kube::Client,
    namespace: String,
    mode: PortForward,
    timing: Timing,
    /// `auto` saw WebSocket refused and SPDY work: skip WebSocket from now on.
    prefer_spdy: Arc<AtomicBool>,
    spdy: Arc<SpdyPool>,
}

impl Tunneler {
    /// Tunnels through `client` into `namespace` with the protocol(s) of `mode`.
    pub fn new(client: kube::Client, namespace: &str, mode: PortForward, timing: Timing) -> Self {
        Self {
            pods: Api::namespaced(client.clone(), namespace),
            client,
            namespace: namespace.to_owned(),
            mode,
            timing,
            prefer_spdy: Arc::new(AtomicBool::new(false)),
            spdy: Arc::default(),
        }
    }

    /// Opens one tunnel to `port` in `pod` within the dial timeout.
    pub async fn open(&self, pod: &str, port: u16) -> Result<TunnelStream, Error> {
        let deadline = Instant::now() + self.timing.dial;
        match self.mode {
            PortForward::WebSocket => match self.open_ws_by(pod, port, deadline).await? {
                Ok(t) => Ok(t),
                Err(e) => Err(self.ws_error(pod, e)),
            },
            PortForward::Spdy => self.open_spdy(pod, port, deadline).await,
            PortForward::Auto if self.prefer_spdy.load(Ordering::Relaxed) => {
                self.open_spdy(pod, port, deadline).await
            }
            PortForward::Auto => {
                // A WebSocket upgrade that times out was not refused: no fallback (kubectl
                // falls back only on `IsUpgradeFailure`).
                let ws = match self.open_ws_by(pod, port, deadline).await? {
                    Ok(t) => return Ok(t),
                    Err(e) => e,
                };
                let Some((ws_status, ws_message)) = ws_refusal(&ws) else {
                    return Err(self.ws_error(pod, ws));
                };
                tracing::debug!(pod, status = ws_status, message = %ws_message, "WebSocket port-forward refused; trying SPDY");
                match self.open_spdy(pod, port, deadline).await {
                    Ok(t) => {
                        if !self.prefer_spdy.swap(true, Ordering::Relaxed) {
                            tracing::info!(
                                "the API server refused the WebSocket port-forward ({ws_message}); \
                                 using SPDY, which needs only `create` on pods/portforward"
                            );
                        }
                        Ok(t)
                    }
                    Err(Error::Forbidden {
                        pod,
                        namespace,
                        message,
                    }) if ws_status == 403 => Err(Error::Forbidden {
                        pod,
                        namespace,
                        message: format!("WebSocket (GET): {ws_message}; {message}"),
                    }),
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// [`Self::open_ws`] by `deadline`: the outer `Err` is the dial timeout.
    async fn open_ws_by(
        &self,
        pod: &str,
        port: u16,
        deadline: Instant,
    ) -> Result<Result<TunnelStream, kube::Error>, Error> {
        tokio::time::timeout_at(deadline, self.open_ws(pod, port))
            .await
            .map_err(|_| self.timed_out(pod))
    }

    fn timed_out(&self, pod: &str) -> Error {
        Error::DialTimeout {
            pod: pod.to_owned(),
            after: self.timing.dial,
        }
    }

    async fn open_ws(&self, pod: &str, port: u16) -> Result<TunnelStream, kube::Error> {
        let mut forwarder = self.pods.portforward(pod, &[port]).await?;
        let (Some(stream), Some(error)) = (forwarder.take_stream(port), forwarder.take_error(port))
        else {
            return Err(kube::Error::Service("port missing from forwarder".into()));
        };
        let span = tracing::debug_span!("tunnel", pod, port);
        let m = crate::metrics::get();
        m.tunnels_opened.inc();
        m.tunnels_open.inc();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(e) = forwarder.join().await {
                    tracing::debug!(error = %e, "tunnel ended with an error");
                }
                crate::metrics::get().tunnels_open.dec();
            },
            span,
        ));
        tracing::debug!(pod, port, "tunnel opened");
        Ok(TunnelStream {
            stream,
            error: Some(Box::pin(error)),
            pod: pod.to_owned(),
            port,
            _open: None,
        })
    }

    /// A stream pair on the pod's SPDY connection, upgrading a new connection if there is
    /// none or it died (once per call: a fresh connection that fails is an error), all by
    /// `deadline`.
    async fn open_spdy(
        &self,
        pod: &str,
        port: u16,
        deadline: Instant,
    ) -> Result<TunnelStream, Error> {
        let slot = {
            let mut pool = self.spdy.lock().unwrap_or_else(|p| p.into_inner());
            prune(&mut pool);
            pool.entry(pod.to_owned()).or_default().clone()
        };
        // The connection that just failed us, if any: replaced unless another tunnel
        // already replaced it.
        let mut failed: Option<SpdyConn> = None;
        loop {
            let conn = {
                // Held across the upgrade: concurrent tunnels to one pod share one upgrade.
                let mut current = tokio::time::timeout_at(deadline, slot.lock())
                    .await
                    .map_err(|_| self.timed_out(pod))?;
                let failed_here = |c: &SpdyConn| failed.as_ref().is_some_and(|f| f.same(c));
                match current.as_ref() {
                    Some(c) if c.is_open() && !failed_here(c) => c.clone(),
                    _ => {
                        let c = upgrade::connect(
                            &self.client,
                            &self.namespace,
                            pod,
                            self.timing.keepalive,
                            deadline,
                        )
                        .await
                        .map_err(|e| self.spdy_error(pod, e))?;
                        tracing::debug!(pod, "SPDY port-forward connection opened");
                        *current = Some(c.clone());
                        c
                    }
                }
            };
            match conn.open(port, deadline).await {
                Ok((stream, error)) => {
                    tracing::debug!(pod, port, "SPDY tunnel opened");
                    let m = crate::metrics::get();
                    m.tunnels_opened.inc();
                    m.tunnels_open.inc();
                    return Ok(TunnelStream {
                        stream,
                        error: Some(error),
                        pod: pod.to_owned(),
                        port,
                        _open: Some(OpenGuard),
                    });
                }
                Err(e) if e.connection_gone() && failed.is_none() => {
                    tracing::debug!(pod, error = %e, "SPDY connection gone; upgrading a new one");
                    failed = Some(conn);
                }
                Err(ConnError::Timeout) if Instant::now() >= deadline => {
                    return Err(self.timed_out(pod))
                }
                Err(e) => {
                    return Err(Error::SpdyStream {
                        pod: pod.to_owned(),
                        source: e,
                    })
                }
            }
        }
    }

    fn ws_error(&self, pod: &str, e: kube::Error) -> Error {
        let (pod, namespace) = (pod.to_owned(), self.namespace.clone());
        match super::api_status(&e) {
            Some((403, message)) => Error::Forbidden {
                pod,
                namespace,
                message: format!("WebSocket (GET): {message}"),
            },
            Some((404, _)) => Error::PodNotFound { pod, namespace },
            _ => Error::Open {
                pod,
                source: e.into(),
            },
        }
    }

    fn spdy_error(&self, pod: &str, e: UpgradeError) -> Error {
        let (pod, namespace) = (pod.to_owned(), self.namespace.clone());
        match e {
            UpgradeError::Refused {
                status: 403,
                message,
            } => Error::Forbidden {
                pod,
                namespace,
                message: format!("SPDY (POST): {message}"),
            },
            UpgradeError::Refused { status: 404, .. } => Error::PodNotFound { pod, namespace },
            UpgradeError::Timeout => Error::DialTimeout {
                pod,
                after: self.timing.dial,
            },
            source => Error::SpdyOpen { pod, source },
        }
    }
}

/// Forgets the pods whose SPDY connection is gone and that nobody is opening a tunnel to, so
/// that pods deleted long ago (a Deployment's pods get new names) leave nothing behind.
fn prune(pool: &mut HashMap<String, Arc<tokio::sync::Mutex<Option<SpdyConn>>>>) {
    pool.retain(|_, slot| {
        Arc::strong_count(slot) > 1
            || slot
                .try_lock()
                .map_or(true, |c| c.as_ref().is_some_and(SpdyConn::is_open))
    });
}

/// Counts an open SPDY tunnel in the metrics until dropped.
struct OpenGuard;

impl Drop for OpenGuard {
    fn drop(&mut self) {
        crate::metrics::get().tunnels_open.dec();
    }
}

/// Whether `err` shows that a request never reached etcd because its tunnel failed: the
/// tunnel could not be opened, or the kubelet could not connect to etcd inside the pod.
///
/// hyper's HTTP/1 keeps our error as an `io::Error` source, but the `h2` crate flattens I/O
/// errors to their kind and text, so on HTTP/2 connections the text is all that is left.
pub fn never_reached_etcd(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::error::find_cause::<Error>(err).is_some()
        || crate::error::one_line(err).contains(NOT_LISTENING_PREFIX)
}

/// The start of [`Error::NotListening`]'s text.
const NOT_LISTENING_PREFIX: &str = "nothing is listening on localhost:";

/// Classifies the kubelet's error-channel text.
fn kubelet_error(pod: &str, port: u16, message: String) -> Error {
    if message.contains("connection refused") {
        Error::NotListening {
            pod: pod.to_owned(),
            port,
        }
    } else {
        Error::Kubelet {
            pod: pod.to_owned(),
            message,
        }
    }
}

type ErrorFuture = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// The byte stream of one tunnel. At EOF it reports the kubelet's error text, if any.
pub struct TunnelStream {
    stream: DuplexStream,
    error: Option<ErrorFuture>,
    pod: String,
    port: u16,
    _open: Option<OpenGuard>,
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before => {
                // EOF: if the kubelet said why, say it (the message precedes the close).
                if let Some(mut error) = this.error.take() {
                    if let Poll::Ready(Some(message)) = error.as_mut().poll(cx) {
                        let e = kubelet_error(&this.pod, this.port, message);
                        return Poll::Ready(Err(io::Error::other(e)));
                    }
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn eof_carries_the_kubelet_error() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let msg = "error forwarding port 2379 to pod etcd-0, uid 1: dial tcp4 127.0.0.1:2379: connect: connection refused";
        let mut t = TunnelStream {
            stream: ours,
            error: Some(Box::pin(std::future::ready(Some(msg.to_owned())))),
            pod: "etcd-0".into(),
            port: 2379,
            _open: None,
        };
        theirs.write_all(b"hi").await.unwrap();
        drop(theirs);
        let mut buf = Vec::new();
        let err = t.read_to_end(&mut buf).await.unwrap_err();
        assert_eq!(buf, b"hi");
        assert!(
            err.to_string()
                .contains("nothing is listening on localhost:2379 inside pod etcd-0"),
            "{err}"
        );
    }

    #[test]
    fn refused_dials_are_recognised_even_as_flattened_text() {
        let typed = Error::NotListening {
            pod: "etcd-0".into(),
            port: 2379,
        };
        assert!(never_reached_etcd(&typed));
        // What h2 leaves of it: an io::Error with the text only.
        let flattened = io::Error::other(typed.to_string());
        assert!(never_reached_etcd(&flattened));
        assert!(!never_reached_etcd(&io::Error::other(
            "connection reset by peer"
        )));
    }

    /// An API server that accepts connections and never answers (wedged, or waiting for a
    /// wedged kubelet).
    async fn mute_api_server() -> kube::Client {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    #[tokio::test]
    async fn an_unanswered_upgrade_fails_at_the_dial_timeout_in_every_mode() {
        let client = mute_api_server().await;
        let timing = Timing {
            dial: Duration::from_millis(300),
            keepalive: Keepalive {
                every: Duration::from_secs(2),
                timeout: Duration::from_secs(5),
            },
        };
        for mode in [PortForward::WebSocket, PortForward::Spdy, PortForward::Auto] {
            let tunnels = Tunneler::new(client.clone(), "etcd", mode, timing);
            let start = Instant::now();
            let err = tokio::time::timeout(Duration::from_secs(10), tunnels.open("etcd-0", 2379))
                .await
                .expect("the dial is bounded")
                .err()
                .expect("nobody answered");
            assert!(start.elapsed() >= timing.dial, "{mode:?}");
            assert!(matches!(err, Error::DialTimeout { .. }), "{mode:?}: {err}");
            assert_eq!(
                err.to_string(),
                "port-forward to pod etcd-0 did not open within 300ms (--dial-timeout): no \
                 answer from the API server or from the kubelet on the pod's node"
            );
            assert!(never_reached_etcd(&err), "safe to send elsewhere");
        }
    }

    #[tokio::test]
    async fn clean_eof_without_error_text() {
        let (ours, theirs) = tokio::io::duplex(64);
        let mut t = TunnelStream {
            stream: ours,
            error: Some(Box::pin(std::future::ready(None))),
            pod: "p".into(),
            port: 1,
            _open: None,
        };
        drop(theirs);
        let mut buf = Vec::new();
        assert_eq!(t.read_to_end(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_spdy_pool_forgets_pods_with_no_connection_and_no_dialer() {
        let keepalive = Keepalive {
            every: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
        };
        let (io, _server) = tokio::io::duplex(1 << 16);
        let live = SpdyConn::start(io, keepalive).expect("a connection");
        let (io, server) = tokio::io::duplex(1 << 16);
        let dead = SpdyConn::start(io, keepalive).expect("a connection");
        drop(server);
        tokio::time::timeout(Duration::from_secs(5), async {
            while dead.is_open() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the connection notices its end");
        let slot = |c: Option<SpdyConn>| Arc::new(tokio::sync::Mutex::new(c));
        let dialing = slot(None);
        let mut pool: HashMap<_, _> = [
            ("live".to_owned(), slot(Some(live))),
            ("dead".to_owned(), slot(Some(dead))),
            ("never".to_owned(), slot(None)),
            ("dialing".to_owned(), dialing.clone()),
        ]
        .into();
        prune(&mut pool);
        let mut left: Vec<_> = pool.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["dialing", "live"]);
    }
}
