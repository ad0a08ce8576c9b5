//! What the proxy answers itself: errors in the client's protocol (gRPC Trailers-Only with
//! `grpc-status`, or HTTP with a one-line text body) and the small bodies it builds.

use bytes::Bytes;
use futures::stream;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;

use super::ProxyBody;
use crate::auth::Verdict;
use crate::error::BoxError;
use crate::grpc::Code;
use crate::router::Class;

pub(super) fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

pub(super) fn with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> ProxyBody {
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![Ok(Frame::data(data))];
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    StreamBody::new(stream::iter(frames)).boxed()
}

/// An error in the client's protocol: gRPC Trailers-Only, or HTTP with a text body.
pub(super) fn error_response(
    class: Class,
    http: StatusCode,
    grpc: Code,
    msg: &str,
) -> Response<ProxyBody> {
    let mut resp = match class {
        Class::Grpc => {
            let mut r = Response::new(empty());
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_static(grpc.as_str()));
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
pub(super) fn percent_encode(msg: &str) -> String {
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

/// The answer to a request the auth layer did not let through.
pub(super) fn verdict(path: &str, verdict: Verdict) -> Response<ProxyBody> {
    match verdict {
        Verdict::GrpcError { code, message } => {
            error_response(Class::Grpc, StatusCode::OK, code, message)
        }
        Verdict::Unauthorized { message } => unauthorized(path, message),
        Verdict::GrpcLogin(msg) => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let mut r = Response::new(with_trailers(super::frames::frame(&msg), Some(trailers)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            r
        }
        Verdict::TooLarge(class) => super::Failure::TooLarge.respond(class),
        Verdict::GatewayLogin(json) => {
            let mut r = Response::new(full(json));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
    }
}

/// 401 in the dialect of the API the path belongs to (v2 error JSON, gateway error JSON, text).
fn unauthorized(path: &str, message: &str) -> Response<ProxyBody> {
    let (body, json) = if path.starts_with("/v2/") {
        let v = serde_json::json!({
            "errorCode": 110,
            "message": "The request requires user authentication",
            "cause": message,
            "index": 0
        });
        (v.to_string(), true)
    } else if path.starts_with("/v3") {
        (
            serde_json::json!({ "error": message, "message": message, "code": 16 }).to_string(),
            true,
        )
    } else {
        (format!("etcd-proxy: {message}\n"), false)
    };
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    let ct = if json {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"etcd-proxy\""),
    );
    r
}

fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_errors_are_trailers_only_with_encoded_message() {
        let r = error_response(
            Class::Grpc,
            StatusCode::BAD_GATEWAY,
            Code::Unavailable,
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
            Code::Unavailable,
            "x",
        );
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
