//! Upstream connections to etcd members, pooled and reused.
//!
//! Two clients share one [`Dial`] seam: gRPC goes as HTTP/2 prior knowledge (h2c) over one
//! multiplexed connection per member (`h2`, on the `h2` crate), everything else as
//! HTTP/1.1 through hyper-util's pool (etcd's plain port sends every HTTP/2 connection to its
//! gRPC server, so v2, the JSON gateway, `/health` and `/version` must be HTTP/1.1;
//! `docs/etcd-protocols.md` §2.2). Each upstream connection is one tunnel; connections stay
//! open between client processes, so a new `etcdctl` does not wait for a new tunnel
//! (`docs/portforward.md` §6).
//!
//! The request URI's host is the pod name and its port etcd's port in the pod: both clients
//! key connections by it and the dialer resolves it.

mod connect;
mod h2;
pub mod health;
pub mod tls;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use connect::{BoxIo, Dial, DialFuture};
pub use h2::H2Body;

pub use crate::error::BoxError;

/// The request body type sent upstream.
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

/// etcd's gRPC server (`--grpc-keepalive-min-time`, default 5 s) sends GOAWAY
/// `too_many_pings` to a client that pings more often than this while streams are open.
const ETCD_MIN_PING_INTERVAL: Duration = Duration::from_secs(5);
/// Idle HTTP/1.1 connections (each one a tunnel) are closed after this.
const H1_IDLE: Duration = Duration::from_secs(90);

/// How many bytes of one response etcd may send ahead of what the proxy has handed on to the
/// client (our receive window per upstream stream). A stream can move at most this much per
/// round trip of the tunnel, so it must cover the bandwidth-delay product of the slowest
/// tunnel we want to run at full speed; it is also what a stalled client can make the proxy
/// hold for one stream (see `h2/mod.rs`, "Flow control").
const STREAM_WINDOW: u32 = 8 << 20;
/// The same for all the streams of one member connection together: the most a member's
/// connection holds for clients that do not read. Four streams' worth, so that one or two
/// stalled streams cannot close the window for everything else multiplexed on the tunnel.
const CONNECTION_WINDOW: u32 = 4 * STREAM_WINDOW;

/// An empty unary gRPC call to `path` on `pod:port`, for the proxy's own calls (warm-up,
/// health and leader probes): one zero-length message, as protobuf encodes an empty request.
pub fn grpc_call(pod: &str, port: u16, path: &str) -> Option<Request<UpstreamBody>> {
    Request::builder()
        .method("POST")
        .uri(format!("http://{pod}:{port}{path}"))
        .version(Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(
            Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))
                .map_err(|never| match never {})
                .boxed(),
        )
        .ok()
}

/// The upstream clients.
#[derive(Clone)]
pub struct Upstream {
    h1: Client<connect::Connector, UpstreamBody>,
    h2: h2::H2Pool,
}

/// A failed upstream request.
#[derive(Debug)]
pub enum Error {
    /// On the gRPC (HTTP/2) path.
    H2(h2::H2Error),
    /// On the HTTP/1.1 path.
    H1(hyper_util::client::legacy::Error),
}

impl From<h2::H2Error> for Error {
    fn from(e: h2::H2Error) -> Self {
        Error::H2(e)
    }
}

impl From<hyper_util::client::legacy::Error> for Error {
    fn from(e: hyper_util::client::legacy::Error) -> Self {
        Error::H1(e)
    }
}

/// A connection that could not be opened reads as its cause: hyper-util's own text for it,
/// "client error (Connect)", says nothing the cause does not.
impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::H2(e) => std::fmt::Display::fmt(e, f),
            Error::H1(e) => match connect_cause(e) {
                Some(cause) => std::fmt::Display::fmt(cause, f),
                None => std::fmt::Display::fmt(e, f),
            },
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::H2(e) => std::error::Error::source(e),
            Error::H1(e) => connect_cause(e).or_else(|| std::error::Error::source(e)),
        }
    }
}

/// The connector's error behind a failed HTTP/1.1 connect, if that is what failed.
fn connect_cause(
    e: &hyper_util::client::legacy::Error,
) -> Option<&(dyn std::error::Error + 'static)> {
    if e.is_connect() {
        std::error::Error::source(e)
    } else {
        None
    }
}

impl Error {
    /// The connection could not be opened: the request never reached etcd.
    pub fn is_connect(&self) -> bool {
        match self {
            Error::H2(e) => e.is_connect(),
            Error::H1(e) => e.is_connect(),
        }
    }
}

impl Upstream {
    /// Clients that open connections with `dial` (wrapped in TLS to etcd if `tls`). HTTP/2 connections with open streams (a
    /// watch, a lease keep-alive) are pinged every `keepalive` (at least 5 s, etcd's minimum)
    /// and dropped when a ping goes unanswered for `timeout`, so a dead tunnel under a silent
    /// watch is found in seconds. Idle connections are not pinged: grpc-go counts pings on a
    /// connection without streams as abuse (its `defaultPingTimeout` is 2 hours) and closes it
    /// with `too_many_pings`; the health checks keep idle tunnels busy instead.
    pub fn new(
        dial: Arc<dyn Dial>,
        tls: Option<tls::UpstreamTls>,
        keepalive: Duration,
        timeout: Duration,
    ) -> Self {
        let h1_connector = connect::Connector::new(dial.clone(), tls.clone().map(|t| (t, false)));
        let h2_connector = connect::Connector::new(dial, tls.map(|t| (t, true)));
        let h1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(H1_IDLE)
            .pool_max_idle_per_host(64)
            .build(h1_connector);
        let mut builder = ::h2::client::Builder::new();
        builder
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(1 << 16);
        let settings = h2::H2Settings {
            builder,
            keepalive: keepalive.max(ETCD_MIN_PING_INTERVAL),
            timeout,
        };
        Self {
            h1,
            h2: h2::H2Pool::new(h2_connector, settings),
        }
    }

    /// Sends `req` on a pooled connection; HTTP/2 requests go over h2c, all others HTTP/1.1.
    pub async fn send(&self, req: Request<UpstreamBody>) -> Result<Response<Body>, Error> {
        if req.version() == Version::HTTP_2 {
            Ok(self.h2.send(req).await?.map(Body::H2))
        } else {
            Ok(self.h1.request(req).await?.map(Body::H1))
        }
    }
}

/// A response body from etcd, from either client.
#[derive(Debug)]
pub enum Body {
    /// From the HTTP/1.1 pool.
    H1(Incoming),
    /// From an HTTP/2 connection.
    H2(H2Body),
}

/// Errors keep their type inside the box: hyper's server finds an `h2::Error` in the chain
/// and resets the client's stream with etcd's code.
impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::H1(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
            Body::H2(b) => Pin::new(b).poll_frame(cx).map_err(BoxError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::H1(b) => b.is_end_stream(),
            Body::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::H1(b) => b.size_hint(),
            Body::H2(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect to member etcd-0 at 127.0.0.1:1: refused")]
    struct Refused;

    struct RefusingDial;

    impl Dial for RefusingDial {
        fn dial(&self, _pod: &str, _port: u16) -> DialFuture {
            Box::pin(async { Err(Refused.into()) })
        }
    }

    fn upstream() -> Upstream {
        Upstream::new(
            Arc::new(RefusingDial),
            None,
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
    }

    #[tokio::test]
    async fn a_failed_connect_reads_as_its_cause_on_both_paths() {
        for version in [Version::HTTP_11, Version::HTTP_2] {
            let req = Request::builder()
                .uri("http://etcd-0:2379/version")
                .version(version)
                .body(
                    Full::new(Bytes::new())
                        .map_err(|never| match never {})
                        .boxed(),
                )
                .unwrap();
            let err = upstream().send(req).await.expect_err("refused");
            assert!(err.is_connect(), "{version:?}: {err}");
            assert_eq!(
                crate::error::one_line(&err),
                "cannot connect to member etcd-0 at 127.0.0.1:1: refused",
                "{version:?}"
            );
            assert!(
                crate::error::find_cause::<Refused>(&err).is_some(),
                "{version:?}: {err:?}"
            );
        }
    }
}
