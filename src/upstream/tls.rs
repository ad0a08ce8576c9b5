//! TLS to etcd itself, inside the tunnel, when etcd serves `https://` (flags named after
//! etcdctl's: `--etcd-cacert`, `--etcd-cert`, `--etcd-key`).
//!
//! The server name is the member's name as discovery found it (`EtcdPod::dns_name`):
//! `<pod>.<service>.<ns>.svc` for a StatefulSet pod; for control-plane etcd (kubeadm's
//! host-network static pods) the host the member advertises, its node IP, which kubeadm's
//! server certificate carries as an IP SAN (an IP string is a valid rustls `ServerName`);
//! or `--etcd-server-name` for every member. Never the tunnel's 127.0.0.1, which etcd's
//! certificates do not name (etcd-io/etcd#7522), even though kubeadm's do: the proxy
//! verifies that it reached the member it meant to, and a made-up service name would not be
//! in a kubeadm certificate at all. ALPN follows etcd's TLS listener (`docs/etcd-protocols.md` §2.3):
//! gRPC connections offer `h2`; HTTP connections offer `http/1.1` (etcd's Go server then
//! serves HTTP/1.1 without agreeing on a protocol).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use tokio_rustls::TlsConnector;

/// Why upstream TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read.
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the material.
    #[error("invalid upstream TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// `--etcd-cert` without `--etcd-key` or the other way round.
    #[error("--etcd-cert and --etcd-key go together")]
    HalfIdentity,
}

/// Maps a member (pod) name to the DNS name its certificate should carry.
pub type Names = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Client TLS toward etcd.
#[derive(Clone)]
pub struct UpstreamTls {
    h1: TlsConnector,
    h2: TlsConnector,
    /// A fixed server name for every member (`--etcd-server-name`).
    server_name: Option<String>,
    names: Names,
    /// Without `--etcd-cert`: notes whether etcd asked for a client certificate.
    no_cert: Option<Arc<NoClientCert>>,
}

/// The client "identity" without `--etcd-cert`: none, but it remembers that a server asked
/// for one. With TLS 1.3 the client's handshake is over before etcd checks the (empty)
/// certificate, so etcd's refusal arrives later as an alert that can lose the race with the
/// tunnel closing; this flag is what reliably says "etcd wants a client certificate".
#[derive(Debug, Default)]
struct NoClientCert {
    asked: AtomicBool,
}

impl ResolvesClientCert for NoClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// The member has no name to verify its certificate against.
#[derive(Debug, thiserror::Error)]
#[error("no TLS server name for etcd member {0}; pass --etcd-server-name")]
pub struct NoServerName(pub String);

impl UpstreamTls {
    /// Loads the CA and optional client identity.
    pub fn load(
        cacert: &Path,
        identity: Option<(&Path, &Path)>,
        server_name: Option<String>,
        names: Names,
    ) -> Result<Self, Error> {
        let mut roots = RootCertStore::empty();
        for c in certs(cacert, "CA certificates")? {
            roots.add(c)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut no_cert = None;
        let config = match identity {
            Some((cert, key)) => {
                let chain = certs(cert, "a client certificate")?;
                let key = crate::pem::key(key).map_err(|reason| Error::Pem {
                    what: "a client key",
                    path: key.to_owned(),
                    reason,
                })?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => {
                let resolver = Arc::new(NoClientCert::default());
                no_cert = Some(resolver.clone());
                builder.with_client_cert_resolver(resolver)
            }
        };
        let with_alpn = |alpn: &[u8]| {
            let mut c = config.clone();
            c.alpn_protocols = vec![alpn.to_vec()];
            TlsConnector::from(Arc::new(c))
        };
        Ok(Self {
            h1: with_alpn(b"http/1.1"),
            h2: with_alpn(b"h2"),
            server_name,
            names,
            no_cert,
        })
    }

    /// Whether a client certificate was configured (`--etcd-cert`).
    pub fn has_identity(&self) -> bool {
        self.no_cert.is_none()
    }

    /// Whether etcd asked for a client certificate that was not configured.
    pub fn client_cert_requested(&self) -> bool {
        self.no_cert
            .as_ref()
            .is_some_and(|n| n.asked.load(Ordering::Relaxed))
    }

    /// The connector for HTTP/2 (gRPC) or HTTP/1.1 connections.
    pub(super) fn connector(&self, h2: bool) -> &TlsConnector {
        if h2 {
            &self.h2
        } else {
            &self.h1
        }
    }

    /// The name to verify `pod`'s certificate against.
    pub(super) fn server_name(&self, pod: &str) -> Result<ServerName<'static>, NoServerName> {
        let name = self
            .server_name
            .clone()
            .or_else(|| (self.names)(pod))
            .ok_or_else(|| NoServerName(pod.to_owned()))?;
        ServerName::try_from(name).map_err(|_| NoServerName(pod.to_owned()))
    }
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, Error> {
    crate::pem::certs(path).map_err(|reason| Error::Pem {
        what,
        path: path.to_owned(),
        reason,
    })
}
