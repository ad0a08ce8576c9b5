//! Everything the request path can fail with, each failure knowing how it reads to the client:
//! a gRPC status (Trailers-Only, with etcd's or our own message) or an HTTP status with a
//! one-line text body. The pipeline returns `Result<_, Failure>` and renders once at the top,
//! so no step builds an error response of its own.
//!
//! The codes follow what clients do with them: `UNAVAILABLE` (and 502/503) when another
//! member or a retry may succeed, so clients fail over; `INVALID_ARGUMENT`/413 for a request
//! etcd itself would refuse; `INTERNAL` when etcd's answer cannot be handled.

use http::{Response, StatusCode};

use super::reply::error_response;
use super::ProxyBody;
use crate::auth::ERR_REQUEST_TOO_LARGE;
use crate::grpc::Code;
use crate::router::Class;

/// Why a request got no answer from etcd.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// A request body over what the proxy buffers, in etcd's words.
    #[error("{ERR_REQUEST_TOO_LARGE}")]
    TooLarge,
    /// The request body could not be read from the client.
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    /// No member can take the request now.
    #[error("{0}")]
    NoMember(String),
    /// A gRPC request for a member that runs etcd 2.x.
    #[error(
        "etcd member {0} runs etcd 2.x, which has no v3 gRPC API; use the v2 API (ETCDCTL_API=2)"
    )]
    Legacy(String),
    /// A streamed body was already sent once (no replay is possible).
    #[error("request body already sent")]
    BodySent,
    /// The request could not be made into an upstream request.
    #[error("{0}")]
    BadRequest(String),
    /// The member did not answer.
    #[error("etcd member {member} unreachable: {reason}")]
    Unreachable {
        /// The member.
        member: String,
        /// Why, in one line.
        reason: String,
    },
    /// The response to rewrite could not be read from etcd.
    #[error("etcd-proxy could not read the {path} response: {reason}")]
    ReadResponse {
        /// The request path.
        path: String,
        /// Why.
        reason: String,
    },
    /// etcd's response could not be rewritten.
    #[error("etcd-proxy could not rewrite the {path} response from etcd: {reason}")]
    Malformed {
        /// The request path.
        path: String,
        /// Why.
        reason: String,
    },
}

impl Failure {
    /// The HTTP status and gRPC code this failure answers with.
    pub fn status(&self) -> (StatusCode, Code) {
        match self {
            Failure::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, Code::InvalidArgument),
            Failure::BadBody(_) | Failure::BadRequest(_) => {
                (StatusCode::BAD_REQUEST, Code::Internal)
            }
            Failure::NoMember(_) => (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
            Failure::Legacy(_) => (StatusCode::NOT_IMPLEMENTED, Code::Unimplemented),
            Failure::BodySent | Failure::Unreachable { .. } | Failure::ReadResponse { .. } => {
                (StatusCode::BAD_GATEWAY, Code::Unavailable)
            }
            Failure::Malformed { .. } => (StatusCode::BAD_GATEWAY, Code::Internal),
        }
    }

    /// The response in the client's protocol.
    pub fn respond(&self, class: Class) -> Response<ProxyBody> {
        let (http, grpc) = self.status();
        error_response(class, http, grpc, &self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_render_in_the_clients_protocol() {
        #[rustfmt::skip]
        let cases = [
            (Failure::TooLarge, 413, "3", "etcdserver: request is too large"),
            (Failure::NoMember("no ready etcd member".into()), 503, "14", "no ready etcd member"),
            (Failure::Legacy("etcd-0".into()), 501, "12", "etcd member etcd-0 runs etcd 2.x, which has no v3 gRPC API; use the v2 API (ETCDCTL_API=2)"),
            (Failure::Unreachable { member: "etcd-1".into(), reason: "refused".into() }, 502, "14", "etcd member etcd-1 unreachable: refused"),
            (Failure::Malformed { path: "/p".into(), reason: "bad".into() }, 502, "13", "etcd-proxy could not rewrite the /p response from etcd: bad"),
        ];
        for (failure, http, grpc, message) in cases {
            let g = failure.respond(Class::Grpc);
            assert_eq!(
                g.status(),
                StatusCode::OK,
                "{failure:?}: gRPC errors are HTTP 200"
            );
            assert_eq!(g.headers()["grpc-status"], grpc, "{failure:?}");
            let h = failure.respond(Class::Http);
            assert_eq!(h.status().as_u16(), http, "{failure:?}");
            assert_eq!(failure.to_string(), message);
        }
    }
}
