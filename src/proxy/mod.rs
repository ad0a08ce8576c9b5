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

use crate::auth::{Auth, Pass};
use crate::error::{find_cause, one_line, BoxError};
use crate::k8s::tunnel;
use crate::metrics;
use crate::rewrite::{self, AddrMap, Rewritten};
use crate::router::{self, Backends, Class, Replay, Rewrite, Route};
use crate::upstream::health::Health;
use crate::upstream::{Body as UpstreamResponse, Upstream, UpstreamBody};

mod failure;
mod forward;
pub(crate) mod frames;
#[cfg(test)]
mod proptests;
mod reply;
pub(crate) mod watches;

pub use failure::Failure;
use forward::{strip_hop_by_hop, upstream_request, wants_upgrade};
use reply::{empty, with_trailers};

/// Marks a response to a request that passed the proxy's authentication, so the listener
/// can stop treating its connection as a stranger's.
#[derive(Debug, Clone, Copy)]
pub struct Authenticated;

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
    async fn new(body: Incoming, replay: Replay) -> Result<Self, Failure> {
        if replay == Replay::Never {
            return Ok(Self::Streamed(Some(body)));
        }
        match Limited::new(body, MAX_REPLAY_BODY).collect().await {
            Ok(collected) => Ok(Self::Buffered(collected.to_bytes())),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Failure::TooLarge),
            Err(e) => Err(Failure::BadBody(e.to_string())),
        }
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
    /// A response to a request that passed authentication (any request, without
    /// `--auth-file`) carries the [`Authenticated`] extension.
    pub async fn handle(
        &self,
        pinned: Option<&str>,
        peer: IpAddr,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let route = router::classify(&req);
        let req = match &self.inner.auth {
            Some(auth) => {
                let path = req.uri().path().to_owned();
                match auth.check(route.class, peer, req).await {
                    Ok(Pass::Authenticated(req)) => req,
                    Ok(Pass::Open(req)) => return Ok(self.forward(pinned, route, req).await),
                    Err(verdict) => return Ok(reply::verdict(&path, verdict)),
                }
            }
            None => req,
        };
        let mut resp = self.forward(pinned, route, req).await;
        resp.extensions_mut().insert(Authenticated);
        Ok(resp)
    }

    /// Forwards an admitted request; a failure answers in the client's protocol.
    async fn forward(
        &self,
        pinned: Option<&str>,
        route: Route,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        self.try_forward(pinned, route, req)
            .await
            .unwrap_or_else(|failure| failure.respond(route.class))
    }

    /// The pipeline: watch streams are handed off; everything else reads (or streams) its
    /// body, goes to a member with retries, and has its response streamed or rewritten.
    async fn try_forward(
        &self,
        pinned: Option<&str>,
        route: Route,
        mut req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Failure> {
        if route.class == Class::Grpc
            && req.uri().path() == watches::PATH
            && !self.is_legacy(pinned)
        {
            let (parts, body) = req.into_parts();
            let pinned = pinned.map(str::to_owned);
            return Ok(watches::serve(self.inner.clone(), pinned, parts, body));
        }
        let client_upgrade = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let mut body = ReqBody::new(body, route.replay).await?;
        // A member endpoint is pinned: no need to look into the body.
        let leader_first = pinned.is_none()
            && router::leader::wants_leader(
                self.inner.backends.reads(),
                route.class,
                &parts.method,
                parts.uri.path(),
                parts.uri.query(),
                body.buffered(),
            );
        let mut resp = self
            .send_with_retries(pinned, route, &parts, &mut body, leader_first)
            .await?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = client_upgrade {
                let upstream = hyper::upgrade::on(&mut resp);
                tokio::spawn(splice_upgrade(client, upstream));
            }
            let (parts, _) = resp.into_parts();
            return Ok(Response::from_parts(parts, empty()));
        }
        self.respond(route, parts.uri.path(), resp).await
    }

    /// Sends the request to a member, and to another when an attempt fails in a way that is
    /// safe to repeat ([`Replay`]) and members are left to try.
    async fn send_with_retries(
        &self,
        pinned: Option<&str>,
        route: Route,
        parts: &http::request::Parts,
        body: &mut ReqBody,
        leader_first: bool,
    ) -> Result<Response<UpstreamResponse>, Failure> {
        let path = parts.uri.path();
        let mut tried: Vec<String> = Vec::new();
        loop {
            let pod = self
                .inner
                .backends
                .pick(pinned, &tried, leader_first)
                .map_err(|e| Failure::NoMember(e.to_string()))?;
            if route.class == Class::Grpc && self.inner.legacy.contains(&pod.name) {
                return Err(Failure::Legacy(pod.name.clone()));
            }
            let up_body = body.next().ok_or(Failure::BodySent)?;
            let up_req = upstream_request(parts, up_body, route.class, &pod.name, pod.port)
                .map_err(|e| Failure::BadRequest(e.to_string()))?;
            tracing::debug!(member = %pod.name, %path, class = ?route.class, "forwarding");
            let e = match self.attempt(&pod.name, route.class, up_req).await {
                Ok(resp) => return Ok(resp),
                Err(e) => e,
            };
            let reason = match find_cause::<tunnel::Error>(&e) {
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
                tracing::info!(member = %pod.name, %path, error = %reason, "upstream request failed; trying another member");
                continue;
            }
            tracing::warn!(member = %pod.name, %path, error = %reason, "upstream request failed");
            return Err(Failure::Unreachable {
                member: pod.name.clone(),
                reason,
            });
        }
    }

    /// One attempt on `member`, with its outcome reported to health and metrics.
    async fn attempt(
        &self,
        member: &str,
        class: Class,
        up_req: Request<UpstreamBody>,
    ) -> Result<Response<UpstreamResponse>, crate::upstream::Error> {
        let labels = metrics::RequestLabels {
            class: class_label(class),
            member: member.to_owned(),
        };
        let started = std::time::Instant::now();
        let result = self.inner.upstream.send(up_req).await;
        self.inner.health.record(member, result.is_ok());
        let m = metrics::get();
        match &result {
            Ok(_) => {
                m.requests.get_or_create(&labels).inc();
                m.upstream_latency
                    .get_or_create(&labels)
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(_) => {
                m.upstream_errors.get_or_create(&labels).inc();
            }
        }
        result
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
    ) -> Result<Response<ProxyBody>, Failure> {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        let rewrite = route.rewrite.filter(|r| match r {
            // A Trailers-Only answer (an error: grpc-status in the headers) has no message to
            // rewrite, and must leave as it came, headers ending the stream.
            Rewrite::Grpc(_) => {
                parts.status == StatusCode::OK && !parts.headers.contains_key("grpc-status")
            }
            Rewrite::V2(_) | Rewrite::Gateway => {
                parts.status.is_success() && !parts.headers.contains_key(header::CONTENT_ENCODING)
            }
        });
        let Some(rewrite) = rewrite else {
            return Ok(Response::from_parts(parts, body.boxed()));
        };
        let collected = Limited::new(body, MAX_REWRITE_BODY)
            .collect()
            .await
            .map_err(|e| {
                tracing::warn!(%path, error = %e, "could not read the response to rewrite");
                Failure::ReadResponse {
                    path: path.to_owned(),
                    reason: e.to_string(),
                }
            })?;
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
                return Err(Failure::Malformed {
                    path: path.to_owned(),
                    reason: e.to_string(),
                });
            }
        };
        parts.headers.remove(header::CONTENT_LENGTH);
        if route.class == Class::Http {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        Ok(Response::from_parts(parts, with_trailers(body, trailers)))
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
