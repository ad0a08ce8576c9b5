//! The start-up probe: every member answers `/version` through its tunnel before the proxy
//! says it is ready, which also opens (and so warms) each member's connections.

use std::time::Duration;

use http::{header, Request, Version};
use http_body_util::{BodyExt, Empty};

use super::Error;
use crate::error::{find_cause, one_line, BoxError};
use crate::k8s::discovery::EtcdPod;
use crate::k8s::tunnel;
use crate::upstream::{Upstream, UpstreamBody};

/// How long the start-up probe of one member may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Probes every member: opens its tunnel, asks `/version` over HTTP/1.1 and warms the HTTP/2
/// connection gRPC will use. Returns each member's etcd version or why it is unreachable;
/// fails if RBAC forbids tunnels or no member answers.
pub(super) async fn probe_all(
    upstream: &Upstream,
    pods: &[EtcdPod],
) -> Result<Vec<Result<String, String>>, Error> {
    let results = futures::future::join_all(pods.iter().map(|p| probe(upstream, p))).await;
    let mut notes = Vec::new();
    let mut first_error = None;
    let mut ok = 0;
    for result in results {
        match result {
            Ok(version) => {
                ok += 1;
                notes.push(Ok(version));
            }
            Err(e) => {
                if let Some(t @ tunnel::Error::Forbidden { .. }) =
                    find_cause::<tunnel::Error>(e.as_ref())
                {
                    return Err(Error::Unreachable(t.to_string()));
                }
                let msg = match find_cause::<tunnel::Error>(e.as_ref()) {
                    Some(t) => t.to_string(),
                    None => one_line(e.as_ref()),
                };
                first_error.get_or_insert(msg.clone());
                notes.push(Err(msg));
            }
        }
    }
    match (ok, first_error) {
        (0, Some(e)) => Err(Error::Unreachable(e)),
        _ => {
            // Some members answered: the proxy starts, and says which did not.
            for (pod, note) in pods.iter().zip(&notes) {
                if let Err(error) = note {
                    tracing::warn!(member = %pod.name, %error, "member not reachable at start-up");
                }
            }
            Ok(notes)
        }
    }
}

/// The probe failed with this message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ProbeError(String);

async fn probe(upstream: &Upstream, pod: &EtcdPod) -> Result<String, BoxError> {
    let attempt = async {
        let req = Request::builder()
            .uri(format!("http://{}:{}/version", pod.name, pod.port))
            .header(header::HOST, format!("{}:{}", pod.name, pod.port))
            .version(Version::HTTP_11)
            .body(empty_body())?;
        let resp = upstream.send(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            return Err(ProbeError(format!("GET /version answered {status}")).into());
        }
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let version = v
            .get("etcdserver")
            .and_then(|s| s.as_str())
            .unwrap_or("?")
            .to_owned();
        if !version.starts_with("2.") {
            warm_grpc(upstream, pod).await;
        }
        Ok::<_, BoxError>(version)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError(format!(
            "no answer from {} within {PROBE_TIMEOUT:?}",
            pod.name
        ))
        .into()),
    }
}

/// Opens the member's HTTP/2 connection ahead of the first gRPC call with a gRPC health check.
async fn warm_grpc(upstream: &Upstream, pod: &EtcdPod) {
    let Some(req) = crate::upstream::grpc_call(&pod.name, pod.port, "/grpc.health.v1.Health/Check")
    else {
        return;
    };
    match upstream.send(req).await {
        Ok(resp) => {
            let _ = resp.into_body().collect().await;
        }
        Err(e) => tracing::debug!(member = %pod.name, error = %one_line(&e), "gRPC warm-up failed"),
    }
}

fn empty_body() -> UpstreamBody {
    Empty::new().map_err(|never| match never {}).boxed()
}
