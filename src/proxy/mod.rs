//! The per-request pipeline: route → pick a member → forward → rewrite (if needed) → respond.
//!
//! A failed attempt is repeated on another member when that is safe (see
//! [`crate::router::replay`]): such request bodies are buffered, all others stream. Bodies stream
//! both ways. Only the few responses that carry member URLs are buffered (to a
//! cap), rewritten and re-emitted with their trailers. Failures become the error the client's
//! protocol expects: a gRPC status (`UNAVAILABLE` for an unreachable member, `INTERNAL` for a
//! response that cannot be rewritten) or an HTTP 502/503 with a one-line text body.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::auth::Auth;
use crate::error::{find_cause, one_line, BoxError};
use crate::k8s::tunnel;
use crate::metrics;
use crate::rewrite::{self, AddrMap, Rewritten};
use crate::router::{self, Backends, Class, Replay, Rewrite, Route};
use crate::upstream::health::Health;
use crate::upstream::{Body as UpstreamResponse, Upstream, UpstreamBody};

mod forward;
pub(crate) mod frames;
#[cfg(test)]
mod proptests;
mod reply;
pub(crate) mod watches;

use forward::{strip_hop_by_hop, upstream_request, wants_upgrade};
use reply::{
    empty, error_response, with_trailers, GRPC_INTERNAL, GRPC_UNAVAILABLE, GRPC_UNIMPLEMENTED,
};

/// The response body type.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Responses we rewrite are small (a member list); anything bigger is refused, not buffered.
const MAX_REWRITE_BODY: usize = 16 << 20;

/// Request bodies buffered for a possible second attempt: etcd refuses requests over
/// `--max-request-bytes` (1.5 MiB by default) anyway.
const MAX_REPLAY_BODY: usize = 4 << 20;

/// Attempts one request may make: every ready member once, then one more on a fresh
/// connection (when every pooled connection died at once, each attempt finds a dead one).
fn max_attempts(ready_members: usize) -> usize {
    ready_members.clamp(1, 4) + 1
}

/// The proxy, shared by every local endpoint.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    upstream: Upstream,
    backends: Backends,
    addr_map: watch::Receiver<Arc<AddrMap>>,
    health: Health,
    /// Members running etcd 2.x: HTTP only, no gRPC on the client port.
    legacy: HashSet<String>,
    /// Turns true when the proxy shuts down: long-lived streams end then.
    stopping: watch::Receiver<bool>,
    /// Local authentication, if `--auth-file` was given.
    auth: Option<Arc<Auth>>,
}

/// The `class` label of a route.
fn class_label(class: Class) -> &'static str {
    match class {
        Class::Grpc => "grpc",
        Class::Http => "http",
    }
}

/// A request body: streamed once, or buffered so that it can be sent again.
enum ReqBody {
    Streamed(Option<Incoming>),
    Buffered(Bytes),
}

impl ReqBody {
    async fn new(body: Incoming, replay: Replay) -> Result<Self, BoxError> {
        if replay == Replay::Never {
            return Ok(Self::Streamed(Some(body)));
        }
        let collected = Limited::new(body, MAX_REPLAY_BODY).collect().await?;
        Ok(Self::Buffered(collected.to_bytes()))
    }

    /// The whole body, if it was buffered.
    fn buffered(&self) -> Option<&[u8]> {
        match self {
            Self::Buffered(bytes) => Some(bytes),
            Self::Streamed(_) => None,
        }
    }

    /// The body for the next attempt; `None` once a streamed body was sent.
    fn next(&mut self) -> Option<UpstreamBody> {
        match self {
            Self::Streamed(body) => body.take().map(|b| b.map_err(BoxError::from).boxed()),
            Self::Buffered(bytes) => Some(
                Full::new(bytes.clone())
                    .map_err(|never| match never {})
                    .boxed(),
            ),
        }
    }
}

impl Proxy {
    /// A proxy forwarding through `upstream` to the members `backends` picks, reporting each
    /// attempt's outcome to `health`; `legacy` names the members that run etcd 2.x, and
    /// `stopping` turning true ends the watch streams it holds.
    pub fn new(
        upstream: Upstream,
        backends: Backends,
        addr_map: watch::Receiver<Arc<AddrMap>>,
        health: Health,
        legacy: HashSet<String>,
        stopping: watch::Receiver<bool>,
        auth: Option<Arc<Auth>>,
    ) -> Self {
        let inner = Inner {
            upstream,
            backends,
            addr_map,
            health,
            legacy,
            stopping,
            auth,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Serves one request from `peer`; `pinned` names the member of a per-member endpoint.
    pub async fn handle(
        &self,
        pinned: Option<&str>,
        peer: IpAddr,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let route = router::classify(&req);
        let mut req = match &self.inner.auth {
            Some(auth) => {
                let path = req.uri().path().to_owned();
                match auth.check(route.class, peer, req).await {
                    Ok(req) => req,
                    Err(verdict) => return Ok(reply::verdict(&path, verdict)),
                }
            }
            None => req,
        };
        if route.class == Class::Grpc
            && req.uri().path() == watches::PATH
            && !self.is_legacy(pinned)
        {
            let (parts, body) = req.into_parts();
            return Ok(watches::serve(
                self.inner.clone(),
                pinned.map(str::to_owned),
                parts,
                body,
            ));
        }
        let client_upgrade = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let mut body = match ReqBody::new(body, route.replay).await {
            Ok(b) => b,
            Err(e) => {
                let msg = format!("cannot read the request body: {e}");
                return Ok(error_response(
                    route.class,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    GRPC_INTERNAL,
                    &msg,
                ));
            }
        };
        let mut tried: Vec<String> = Vec::new();
        // A member endpoint is pinned: no need to look into the body.
        let leader_first = pinned.is_none()
            && router::leader::wants_leader(
                self.inner.backends.reads(),
                route.class,
                &parts.method,
                &path,
                parts.uri.query(),
                body.buffered(),
            );
        let mut resp = loop {
            let pod = match self.inner.backends.pick(pinned, &tried, leader_first) {
                Ok(pod) => pod,
                Err(e) => {
                    let status = StatusCode::SERVICE_UNAVAILABLE;
                    return Ok(error_response(
                        route.class,
                        status,
                        GRPC_UNAVAILABLE,
                        &e.to_string(),
                    ));
                }
            };
            if route.class == Class::Grpc && self.inner.legacy.contains(&pod.name) {
                let msg = format!(
                    "etcd member {} runs etcd 2.x, which has no v3 gRPC API; use the v2 API (ETCDCTL_API=2)",
                    pod.name
                );
                return Ok(error_response(
                    route.class,
                    StatusCode::NOT_IMPLEMENTED,
                    GRPC_UNIMPLEMENTED,
                    &msg,
                ));
            }
            let Some(up_body) = body.next() else {
                // Unreachable: a streamed body is only ever sent once (no replay).
                let msg = "request body already sent";
                return Ok(error_response(
                    route.class,
                    StatusCode::BAD_GATEWAY,
                    GRPC_UNAVAILABLE,
                    msg,
                ));
            };
            let up_req = match upstream_request(&parts, up_body, route.class, &pod.name, pod.port) {
                Ok(r) => r,
                Err(e) => {
                    let status = StatusCode::BAD_REQUEST;
                    return Ok(error_response(
                        route.class,
                        status,
                        GRPC_INTERNAL,
                        &e.to_string(),
                    ));
                }
            };
            tracing::debug!(member = %pod.name, %path, class = ?route.class, "forwarding");
            let labels = metrics::RequestLabels {
                class: class_label(route.class),
                member: pod.name.clone(),
            };
            let started = std::time::Instant::now();
            match self.inner.upstream.send(up_req).await {
                Ok(r) => {
                    self.inner.health.record(&pod.name, true);
                    let m = metrics::get();
                    m.requests.get_or_create(&labels).inc();
                    m.upstream_latency
                        .get_or_create(&labels)
                        .observe(started.elapsed().as_secs_f64());
                    break r;
                }
                Err(e) => {
                    self.inner.health.record(&pod.name, false);
                    metrics::get().upstream_errors.get_or_create(&labels).inc();
                    let msg = match find_cause::<tunnel::Error>(&e) {
                        Some(t) => t.to_string(),
                        None => one_line(&e),
                    };
                    let replayable = match route.replay {
                        Replay::Always => true,
                        // A tunnel error means the bytes never reached etcd.
                        Replay::OnConnectError => e.is_connect() || tunnel::never_reached_etcd(&e),
                        Replay::Never => false,
                    };
                    tried.push(pod.name.clone());
                    if replayable
                        && pinned.is_none()
                        && tried.len() < max_attempts(self.inner.backends.ready_count())
                    {
                        tracing::info!(member = %pod.name, %path, error = %msg, "upstream request failed; trying another member");
                        continue;
                    }
                    tracing::warn!(member = %pod.name, %path, error = %msg, "upstream request failed");
                    let msg = format!("etcd member {} unreachable: {msg}", pod.name);
                    return Ok(error_response(
                        route.class,
                        StatusCode::BAD_GATEWAY,
                        GRPC_UNAVAILABLE,
                        &msg,
                    ));
                }
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = client_upgrade {
                let upstream = hyper::upgrade::on(&mut resp);
                tokio::spawn(splice_upgrade(client, upstream));
            }
            let (parts, _) = resp.into_parts();
            return Ok(Response::from_parts(parts, empty()));
        }
        Ok(self.respond(route, &path, resp).await)
    }

    /// Whether the pinned member runs etcd 2.x (the cluster endpoint checks per attempt).
    fn is_legacy(&self, pinned: Option<&str>) -> bool {
        pinned.is_some_and(|p| self.inner.legacy.contains(p))
    }

    /// Streams the response, or rewrites it if the route says so.
    async fn respond(
        &self,
        route: Route,
        path: &str,
        resp: Response<UpstreamResponse>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        let rewrite = route.rewrite.filter(|r| match r {
            Rewrite::Grpc(_) => parts.status == StatusCode::OK,
            Rewrite::V2(_) | Rewrite::Gateway => {
                parts.status.is_success() && !parts.headers.contains_key(header::CONTENT_ENCODING)
            }
        });
        let Some(rewrite) = rewrite else {
            return Response::from_parts(parts, body.boxed());
        };
        let collected = match Limited::new(body, MAX_REWRITE_BODY).collect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%path, error = %e, "could not read the response to rewrite");
                let msg = format!("etcd-proxy could not read the {path} response: {e}");
                return error_response(
                    route.class,
                    StatusCode::BAD_GATEWAY,
                    GRPC_UNAVAILABLE,
                    &msg,
                );
            }
        };
        let trailers = collected.trailers().cloned();
        let data = collected.to_bytes();
        let map = self.inner.addr_map.borrow().clone();
        let result = match rewrite {
            Rewrite::Grpc(m) => rewrite::grpc::rewrite_body(m, &data, &map),
            Rewrite::V2(r) => rewrite::v2::rewrite_body(r, &data, &map),
            Rewrite::Gateway => rewrite::gateway::rewrite_body(&data, &map),
        };
        let body = match result {
            Ok(Rewritten { body, unmapped }) => {
                for member in unmapped {
                    tracing::warn!(%member, %path, "member matches no pod; its client URLs are left as etcd advertises them");
                }
                body
            }
            Err(rewrite::Error::Compressed) => {
                tracing::warn!(%path, "compressed gRPC response passed through without rewriting member URLs");
                data
            }
            Err(e) => {
                tracing::warn!(%path, error = %e, "malformed response from etcd");
                let msg =
                    format!("etcd-proxy could not rewrite the {path} response from etcd: {e}");
                return error_response(route.class, StatusCode::BAD_GATEWAY, GRPC_INTERNAL, &msg);
            }
        };
        parts.headers.remove(header::CONTENT_LENGTH);
        if route.class == Class::Http {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        Response::from_parts(parts, with_trailers(body, trailers))
    }
}

/// Pipes bytes between an upgraded client connection (a JSON-gateway WebSocket) and etcd.
async fn splice_upgrade(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((c, u)) => {
            let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        }
        Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
    }
}
