//! The HTTP upgrade that turns an API-server connection into a SPDY/3.1 port-forward
//! connection, through kube's client (so its proxy, TLS, client certificates, bearer tokens and
//! exec plugins apply unchanged).
//!
//! kube 5 upgrades only to WebSocket (`Client::connect`), but its `Client::send` hands back
//! hyper's response, whose pending upgrade `hyper::upgrade::on` resolves, so the SPDY
//! upgrade is a plain POST with the right headers (client-go
//! `apimachinery/pkg/util/httpstream/spdy/roundtripper.go`):
//! `Connection: Upgrade`, `Upgrade: SPDY/3.1`, `X-Stream-Protocol-Version: portforward.k8s.io`.
//! The API server authorizes the POST as verb `create` on `pods/portforward`.
//!
//! A success is `101` with `Connection` containing `upgrade`, `Upgrade` containing
//! `spdy/3.1` (case-insensitive, as client-go checks) and the protocol echoed. Anything
//! else is a refusal; its body is the API server's `Status` JSON or the kubelet's text,
//! read up to [`MAX_ERROR_BODY`] bytes.
//!
//! The upgrade must finish by the caller's deadline (the dial timeout): an API server that
//! reads the request and never answers (a wedged kubelet behind its proxy, which waits for
//! the kubelet's answer without a deadline) would otherwise hold the dial forever.

use http::{header, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use tokio::time::Instant;

use super::conn::{Keepalive, SpdyConn};

/// The port-forward subprotocol.
pub const PROTOCOL: &str = "portforward.k8s.io";
/// The header that offers and echoes it.
pub const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
/// How much of a refusal's body is read.
pub const MAX_ERROR_BODY: usize = 64 * 1024;

/// Why the upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The server answered, but not with a SPDY upgrade.
    #[error("{message} (HTTP {status})")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The `Status` message, or the body's text.
        message: String,
    },
    /// A 101 that is not a usable SPDY port-forward connection.
    #[error("the API server's upgrade response is not SPDY/3.1 port-forward: {0}")]
    Protocol(String),
    /// The request did not get an answer (a failed exec plugin without its secrets).
    #[error(transparent)]
    Kube(crate::k8s::exec::Redacted),
    /// No answer by the deadline.
    #[error("no answer to the SPDY port-forward upgrade in time")]
    Timeout,
}

/// Upgrades a POST to `pods/{pod}/portforward` in `namespace` to SPDY by `deadline`; the
/// connection is then pinged as `keepalive` says.
pub async fn connect(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    keepalive: Keepalive,
    deadline: Instant,
) -> Result<SpdyConn, UpgradeError> {
    tokio::time::timeout_at(deadline, connect_inner(client, namespace, pod, keepalive))
        .await
        .map_err(|_| UpgradeError::Timeout)?
}

async fn connect_inner(
    client: &kube::Client,
    namespace: &str,
    pod: &str,
    keepalive: Keepalive,
) -> Result<SpdyConn, UpgradeError> {
    let req = Request::post(format!(
        "/api/v1/namespaces/{namespace}/pods/{pod}/portforward"
    ))
    .header(header::CONNECTION, "Upgrade")
    .header(header::UPGRADE, "SPDY/3.1")
    .header(PROTOCOL_HEADER, PROTOCOL)
    .body(kube::client::Body::from(Vec::new()))
    .map_err(|e| UpgradeError::Protocol(e.to_string()))?;
    let res = client
        .send(req)
        .await
        .map_err(|e| UpgradeError::Kube(e.into()))?;
    if res.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(refusal(res).await);
    }
    check_101(res.headers())?;
    let upgraded = hyper::upgrade::on(res)
        .await
        .map_err(|e| UpgradeError::Protocol(e.to_string()))?;
    SpdyConn::start(TokioIo::new(upgraded), keepalive)
        .map_err(|e| UpgradeError::Protocol(e.to_string()))
}

/// Checks a 101 as client-go does (`roundtripper.go` `NewConnection`, `portforward.go`
/// `ForwardPorts`).
fn check_101(headers: &http::HeaderMap) -> Result<(), UpgradeError> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.to_ascii_lowercase().contains(token))
        })
    };
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "spdy/3.1") {
        return Err(UpgradeError::Protocol(
            "missing Connection: Upgrade or Upgrade: SPDY/3.1".into(),
        ));
    }
    let echoed = headers
        .get(PROTOCOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if echoed != PROTOCOL {
        return Err(UpgradeError::Protocol(format!(
            "unable to negotiate protocol: client supports {PROTOCOL:?}, server returned {echoed:?}"
        )));
    }
    Ok(())
}

/// The refusal's message: the `Status` message if the body is one, else its text.
async fn refusal(res: http::Response<kube::client::Body>) -> UpgradeError {
    let status = res.status().as_u16();
    let body = http_body_util::Limited::new(res.into_body(), MAX_ERROR_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
    let message = if message.is_empty() {
        StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("refused")
            .to_owned()
    } else {
        message
    };
    UpgradeError::Refused { status, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_101_is_checked_like_client_go() {
        let good = [
            ("connection", "Upgrade"),
            ("upgrade", "SPDY/3.1"),
            ("x-stream-protocol-version", "portforward.k8s.io"),
        ];
        assert!(check_101(&headers(&good)).is_ok());
        // Case-insensitive substring matches, as client-go does.
        assert!(check_101(&headers(&[
            ("connection", "keep-alive, upgrade"),
            ("upgrade", "spdy/3.1"),
            ("x-stream-protocol-version", "portforward.k8s.io"),
        ]))
        .is_ok());
        assert!(matches!(
            check_101(&headers(&good[1..])),
            Err(UpgradeError::Protocol(_))
        ));
        let err = check_101(&headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "SPDY/3.1"),
            ("x-stream-protocol-version", "v4.channel.k8s.io"),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("unable to negotiate protocol"),
            "{err}"
        );
        assert!(check_101(&headers(&good[..2])).is_err(), "no echo");
    }
}
