//! Upstream connections to etcd members, pooled and reused.
//!
//! Two hyper-util pooled clients share one [`Dial`] seam: gRPC goes as HTTP/2 prior knowledge
//! (h2c) over one multiplexed connection per member, everything else as HTTP/1.1 (etcd's plain
//! port sends every HTTP/2 connection to its gRPC server, so v2, the JSON gateway, `/health`
//! and `/version` must be HTTP/1.1; `etcd-protocols.md` §2.2). Each upstream connection is one
//! tunnel; connections stay open between client processes, so a new `etcdctl` does not wait
//! for a new tunnel.
//!
//! The request URI's host is the pod name and its port etcd's port in the pod: the pool keys
//! connections by it and the dialer resolves it.

mod connect;
pub mod health;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use connect::{BoxIo, Dial, DialFuture};

pub use crate::error::BoxError;

/// The request body type sent upstream.
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

/// etcd's gRPC server (`--grpc-keepalive-min-time`, default 5 s) sends GOAWAY
/// `too_many_pings` to a client that pings more often than this while streams are open.
const ETCD_MIN_PING_INTERVAL: Duration = Duration::from_secs(5);
/// Idle HTTP/1.1 connections (each one a tunnel) are closed after this.
const H1_IDLE: Duration = Duration::from_secs(90);

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

/// The pooled upstream clients.
#[derive(Clone)]
pub struct Upstream {
    h1: Client<connect::Connector, UpstreamBody>,
    h2: Client<connect::Connector, UpstreamBody>,
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
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(None)
            .http2_keep_alive_interval(keepalive.max(ETCD_MIN_PING_INTERVAL))
            .http2_keep_alive_timeout(timeout)
            .http2_keep_alive_while_idle(false)
            .http2_initial_stream_window_size(1 << 20)
            .http2_initial_connection_window_size(4 << 20)
            .http2_max_frame_size(1 << 16)
            .build(h2_connector);
        Self { h1, h2 }
    }

    /// Sends `req` on a pooled connection; HTTP/2 requests go over h2c, all others HTTP/1.1.
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        if req.version() == Version::HTTP_2 {
            self.h2.request(req).await
        } else {
            self.h1.request(req).await
        }
    }
}
