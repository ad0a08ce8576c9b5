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

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use connect::{BoxIo, Dial, DialFuture};

/// Errors that travel through bodies and layers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body type sent upstream.
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

/// How often an idle HTTP/2 upstream connection is pinged. Well under the 4 minutes after
/// which Azure's load balancer silently drops an idle flow.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is dropped.
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle HTTP/1.1 connections (each one a tunnel) are closed after this.
const H1_IDLE: Duration = Duration::from_secs(90);

/// The pooled upstream clients.
#[derive(Clone)]
pub struct Upstream {
    h1: Client<connect::Connector, UpstreamBody>,
    h2: Client<connect::Connector, UpstreamBody>,
}

impl Upstream {
    /// Clients that open connections with `dial`.
    pub fn new(dial: Arc<dyn Dial>) -> Self {
        let connector = connect::Connector::new(dial);
        let h1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(H1_IDLE)
            .pool_max_idle_per_host(64)
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(None)
            .http2_keep_alive_interval(H2_KEEPALIVE)
            .http2_keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
            .http2_keep_alive_while_idle(true)
            .http2_initial_stream_window_size(1 << 20)
            .http2_initial_connection_window_size(4 << 20)
            .http2_max_frame_size(1 << 16)
            .build(connector);
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

/// The first error of type `T` in `err`'s source chain, looking inside `io::Error`s too
/// (`io::Error::source` skips the error it wraps).
pub fn find_cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(t) = find_cause::<T>(inner) {
                return Some(t);
            }
        }
        cur = e.source();
    }
    None
}

/// `err` and its causes on one line, without repeats (hyper repeats its sources in `Display`).
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|i| i as &(dyn std::error::Error + 'static))
        });
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("inner cause")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_are_found_inside_io_errors() {
        let e = Outer(std::io::Error::other(Inner));
        assert!(find_cause::<Inner>(&e).is_some());
        assert_eq!(one_line(&e), "outer: inner cause");
    }
}
