//! TLS on the local endpoints (rustls), with ALPN `h2` and `http/1.1` so gRPC and HTTP/1.1
//! clients share a port, and optional client-certificate authentication.
//!
//! The certificate comes from files (`--tls-cert/--tls-key`) or from [`auto`]: a local CA and
//! a server certificate generated once and kept in the user's config directory.

pub mod auto;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read or held nothing usable.
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
    /// rustls refused the certificate, key or CA.
    #[error("invalid TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA could not be used.
    #[error("invalid --client-ca {path}: {reason}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Generating or storing the automatic certificate failed.
    #[error(transparent)]
    Auto(#[from] auto::Error),
}

/// The rustls server configuration for `cert`/`key`, requiring client certificates signed by
/// `client_ca` if given.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, Error> {
    let chain = load_certs(cert, "a certificate chain")?;
    let key = crate::pem::key(key).map_err(|reason| Error::Pem {
        what: "a private key",
        path: key.to_owned(),
        reason,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca, "CA certificates")? {
                roots.add(c).map_err(|e| Error::ClientCa {
                    path: ca.to_owned(),
                    reason: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::ClientCa {
                    path: ca.to_owned(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn load_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, Error> {
    crate::pem::certs(path).map_err(|reason| Error::Pem {
        what,
        path: path.to_owned(),
        reason,
    })
}
