//! The per-request pipeline: route → pick a member → forward → rewrite (if needed) → respond.
//!
//! Bodies stream both ways. Only the few responses that carry member URLs are buffered (to a
//! cap), rewritten and re-emitted with their trailers. Failures become the error the client's
//! protocol expects: a gRPC status (`UNAVAILABLE` for an unreachable member, `INTERNAL` for a
//! response that cannot be rewritten) or an HTTP 502/503 with a one-line text body.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::error::{find_cause, one_line, BoxError};
use crate::k8s::tunnel;
use crate::rewrite::{self, AddrMap, Rewritten};
use crate::router::{self, Backends, Class, Rewrite, Route};
use crate::upstream::Upstream;

/// The response body type.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Responses we rewrite are small (a member list); anything bigger is refused, not buffered.
const MAX_REWRITE_BODY: usize = 16 << 20;

/// gRPC status codes we emit (grpc/grpc doc/statuscodes.md).
const GRPC_UNIMPLEMENTED: u8 = 12;
const GRPC_INTERNAL: u8 = 13;
const GRPC_UNAVAILABLE: u8 = 14;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
];

/// The proxy, shared by every local endpoint.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    upstream: Upstream,
    backends: Backends,
    addr_map: watch::Receiver<Arc<AddrMap>>,
    /// Members running etcd 2.x: HTTP only, no gRPC on the client port.
    legacy: HashSet<String>,
}

impl Proxy {
    /// A proxy forwarding through `upstream` to the members `backends` picks; `legacy` names
    /// the members that run etcd 2.x.
    pub fn new(
        upstream: Upstream,
        backends: Backends,
        addr_map: watch::Receiver<Arc<AddrMap>>,
        legacy: HashSet<String>,
    ) -> Self {
        let inner = Inner {
            upstream,
            backends,
            addr_map,
            legacy,
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Serves one request; `pinned` names the member of a per-member endpoint.
    pub async fn handle(
        &self,
        pinned: Option<&str>,
        mut req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let route = router::classify(&req);
        let pod = match self.inner.backends.pick(pinned) {
            Ok(pod) => pod,
            Err(e) => {
                return Ok(error_response(
                    route.class,
                    StatusCode::SERVICE_UNAVAILABLE,
                    GRPC_UNAVAILABLE,
                    &e.to_string(),
                ))
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
        let client_upgrade = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let up_req = match upstream_request(req, route.class, &pod.name, pod.port) {
            Ok(r) => r,
            Err(e) => {
                return Ok(error_response(
                    route.class,
                    StatusCode::BAD_REQUEST,
                    GRPC_INTERNAL,
                    &e.to_string(),
                ))
            }
        };
        let path = up_req.uri().path().to_owned();
        tracing::debug!(member = %pod.name, %path, class = ?route.class, "forwarding");
        let mut resp = match self.inner.upstream.send(up_req).await {
            Ok(r) => r,
            Err(e) => {
                let msg = match find_cause::<tunnel::Error>(&e) {
                    Some(t) => t.to_string(),
                    None => one_line(&e),
                };
                tracing::warn!(member = %pod.name, %path, error = %msg, "upstream request failed");
                let msg = format!("etcd member {} unreachable: {msg}", pod.name);
                return Ok(error_response(
                    route.class,
                    StatusCode::BAD_GATEWAY,
                    GRPC_UNAVAILABLE,
                    &msg,
                ));
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

    /// Streams the response, or rewrites it if the route says so.
    async fn respond(
        &self,
        route: Route,
        path: &str,
        resp: Response<Incoming>,
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
            return Response::from_parts(parts, body.map_err(BoxError::from).boxed());
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

/// A bad request URI (cannot happen for requests hyper accepted, but never panic).
#[derive(Debug, thiserror::Error)]
#[error("cannot forward request: {0}")]
struct BadRequest(#[from] http::Error);

/// Builds the upstream request: same method, path, headers (minus hop-by-hop) and body.
fn upstream_request(
    req: Request<Incoming>,
    class: Class,
    pod: &str,
    port: u16,
) -> Result<Request<crate::upstream::UpstreamBody>, BadRequest> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = format!("{pod}:{port}");
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path)
        .build()?;
    let upgrade = wants_upgrade(&parts.headers);
    let keep_te_trailers = class == Class::Grpc;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    match class {
        Class::Grpc => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            if keep_te_trailers {
                parts
                    .headers
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
        }
        Class::Http => {
            parts.version = Version::HTTP_11;
            let host = HeaderValue::from_str(&authority).map_err(http::Error::from)?;
            parts.headers.insert(header::HOST, host);
        }
    }
    Ok(Request::from_parts(
        parts,
        body.map_err(BoxError::from).boxed(),
    ))
}

/// Removes hop-by-hop headers and those named in `Connection`; keeps `Upgrade` and
/// `Connection: upgrade` for a protocol switch.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && (name == "upgrade" || name == "connection") {
            continue;
        }
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
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

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> ProxyBody {
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![Ok(Frame::data(data))];
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    StreamBody::new(stream::iter(frames)).boxed()
}

/// An error in the client's protocol: gRPC Trailers-Only, or HTTP with a text body.
fn error_response(class: Class, http: StatusCode, grpc: u8, msg: &str) -> Response<ProxyBody> {
    let mut resp = match class {
        Class::Grpc => {
            let mut r = Response::new(empty());
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(u16::from(grpc)));
            if let Ok(v) = HeaderValue::from_str(&percent_encode(msg)) {
                h.insert("grpc-message", v);
            }
            r
        }
        Class::Http => {
            let body = Full::new(Bytes::from(format!("etcd-proxy: {msg}\n")))
                .map_err(|never| match never {})
                .boxed();
            let mut r = Response::new(body);
            *r.status_mut() = http;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
    };
    resp.headers_mut()
        .insert("x-etcd-proxy-error", HeaderValue::from_static("1"));
    resp
}

/// gRPC's `grpc-message` encoding: printable ASCII except `%` as is, the rest `%XX`.
fn percent_encode(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_upgrades_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-etcd-index", HeaderValue::from_static("7"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-etcd-index"));

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn grpc_errors_are_trailers_only_with_encoded_message() {
        let r = error_response(
            Class::Grpc,
            StatusCode::BAD_GATEWAY,
            GRPC_UNAVAILABLE,
            "no ready member: 100% gone\n",
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(
            r.headers()["grpc-message"],
            "no ready member: 100%25 gone%0A"
        );
        let r = error_response(
            Class::Http,
            StatusCode::SERVICE_UNAVAILABLE,
            GRPC_UNAVAILABLE,
            "x",
        );
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
