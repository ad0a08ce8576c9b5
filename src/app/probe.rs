//! The start-up probe: every member answers `/version` through its tunnel before the proxy
//! says it is ready, which also opens (and so warms) each member's connections.
//!
//! A member that refuses the connection for want of a client certificate (etcd's
//! `--client-cert-auth`, on by default in kubeadm and RKE2), or rejects the one given, is
//! reported as exactly that, with the flags to pass: the bare symptom (a TLS alert, or just a
//! closed connection) does not say what to do.

use std::time::Duration;

use http::{header, Request, Version};
use http_body_util::{BodyExt, Empty};

use super::Error;
use crate::error::{find_cause, one_line, BoxError};
use crate::k8s::tunnel;
use crate::member::EtcdPod;
use crate::upstream::tls::UpstreamTls;
use crate::upstream::{Upstream, UpstreamBody};

/// How long the start-up probe of one member may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Probes every member: opens its tunnel, asks `/version` over HTTP/1.1 and warms the HTTP/2
/// connection gRPC will use. Returns each member's etcd version or why it is unreachable;
/// fails if RBAC forbids tunnels or no member answers.
///
/// `tls` (TLS to etcd, if on) words a refusal for want of a client certificate.
pub(super) async fn probe_all(
    upstream: &Upstream,
    pods: &[EtcdPod],
    tls: Option<&UpstreamTls>,
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
                    None => match tls {
                        Some(tls) => client_cert_refusal(e.as_ref(), tls),
                        None => plain_to_tls(e.as_ref()),
                    }
                    .unwrap_or_else(|| one_line(e.as_ref())),
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

/// Plain HTTP sent to etcd's TLS port: etcd closes the connection without a word (its TLS
/// listener sits below the HTTP server, so Go's "HTTP request to an HTTPS server" answer is
/// never sent). A connection closed before any response is what that looks like.
fn plain_to_tls(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    find_cause::<hyper::Error>(e)
        .filter(|h| h.is_incomplete_message())
        .map(|_| {
            format!(
                "{}; if etcd serves TLS (kubeadm and RKE2 do), pass --etcd-cacert, --etcd-cert and \
                 --etcd-key",
                one_line(e)
            )
        })
}

/// Missing client certificate: without `--etcd-cert`, etcd asked for one during the
/// handshake.
const CLIENT_CERT_REQUIRED: &str = "etcd requires a client certificate (it runs with \
     --client-cert-auth): pass --etcd-cert and --etcd-key, e.g. apiserver-etcd-client.crt and \
     .key from /etc/kubernetes/pki on a kubeadm control-plane node";

/// A failure caused by etcd's client-certificate check, as one line naming the fix; `None`
/// for other failures. Without a certificate, etcd having asked for one during the handshake
/// is the evidence (its alert may never arrive: see `NoClientCert` in `upstream/tls.rs`);
/// with one, Go's TLS server answers a certificate it cannot verify with `bad_certificate`.
fn client_cert_refusal(e: &(dyn std::error::Error + 'static), tls: &UpstreamTls) -> Option<String> {
    if find_cause::<ProbeError>(e).is_some() {
        // etcd answered (or the probe timed out): not a handshake refusal.
        return None;
    }
    if !tls.has_identity() {
        return tls
            .client_cert_requested()
            .then(|| CLIENT_CERT_REQUIRED.to_owned());
    }
    use rustls::AlertDescription as Alert;
    let rustls::Error::AlertReceived(alert) = find_cause::<rustls::Error>(e)? else {
        return None;
    };
    matches!(
        alert,
        Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::UnsupportedCertificate
    )
    .then(|| {
        format!(
            "etcd rejected the client certificate given with --etcd-cert (TLS alert {alert:?}): \
             it must be signed by the CA etcd trusts (kubeadm: /etc/kubernetes/pki/etcd/ca.crt) \
             and be valid for client authentication"
        )
    })
}

fn empty_body() -> UpstreamBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejected_client_certificate_names_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca".to_string()]).unwrap();
        let ca_path = dir.path().join("ca.crt");
        std::fs::write(&ca_path, ca.cert.pem()).unwrap();
        let (cert, key) = (dir.path().join("c.crt"), dir.path().join("c.key"));
        std::fs::write(&cert, ca.cert.pem()).unwrap();
        std::fs::write(&key, ca.signing_key.serialize_pem()).unwrap();
        let names: crate::upstream::tls::Names = std::sync::Arc::new(|_: &str| None);
        let with = UpstreamTls::load(&ca_path, Some((&cert, &key)), None, names.clone()).unwrap();
        let alert: BoxError = Box::new(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
        ));
        let msg = client_cert_refusal(alert.as_ref(), &with).unwrap();
        assert!(msg.contains("rejected the client certificate"), "{msg}");
        let other: BoxError = Box::new(std::io::Error::other("connection reset"));
        assert_eq!(client_cert_refusal(other.as_ref(), &with), None);
        // Without a certificate, only etcd asking for one during a handshake says so.
        let without = UpstreamTls::load(&ca_path, None, None, names).unwrap();
        assert!(!without.has_identity());
        assert_eq!(client_cert_refusal(other.as_ref(), &without), None);
    }
}
