//! TLS material and the kubeconfig that trusts it.
//!
//! A real client (kube-rs with rustls) verifies the API server certificate
//! against `certificate-authority-data`, so the simulator mints its own CA and
//! a server certificate for `127.0.0.1`/`localhost` instead of disabling
//! verification: etcd-proxy's TLS path is exercised exactly as against a
//! cluster.

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::SimError;

/// The CA certificate (PEM) and the rustls server configuration using a leaf signed by it.
pub(crate) struct ServerTls {
    pub ca_pem: String,
    pub config: Arc<rustls::ServerConfig>,
}

/// Generates a CA and a server certificate for IP 127.0.0.1 and DNS localhost.
pub(crate) fn generate() -> Result<ServerTls, SimError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "etcd-proxy-sim CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate()?;
    let mut leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    leaf_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer)?;

    let chain = vec![CertificateDer::from(leaf_cert.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    // The simulated apiserver speaks HTTP/1.1 only (WebSocket upgrades need it).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        ca_pem: ca_cert.pem(),
        config: Arc::new(config),
    })
}

/// One kubeconfig user/context pair.
pub(crate) struct KubeconfigUser<'a> {
    pub context: &'a str,
    pub user: &'a str,
    pub token: &'a str,
}

/// Writes a kubeconfig (JSON, which is valid YAML) with one cluster `sim`,
/// one context per user, and `current_context` selected.
pub(crate) fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca_pem: &str,
    namespace: &str,
    users: &[KubeconfigUser<'_>],
    current_context: &str,
) -> Result<(), SimError> {
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    let contexts: Vec<_> = users
        .iter()
        .map(|u| {
            serde_json::json!({
                "name": u.context,
                "context": {"cluster": "sim", "user": u.user, "namespace": namespace},
            })
        })
        .collect();
    let user_entries: Vec<_> = users
        .iter()
        .map(|u| serde_json::json!({"name": u.user, "user": {"token": u.token}}))
        .collect();
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [{
            "name": "sim",
            "cluster": {"server": server, "certificate-authority-data": ca_data},
        }],
        "users": user_entries,
        "contexts": contexts,
        "current-context": current_context,
    });
    let text = serde_json::to_string_pretty(&doc)?;
    std::fs::write(path, text)
        .map_err(|e| SimError::io(format!("writing kubeconfig {}", path.display()), e))
}

/// Writes a service-account directory as the kubelet projects it into a pod
/// (`pkg/kubelet/volumemanager`, the `kube-api-access-*` projected volume): `token`, `ca.crt`
/// and `namespace`.
pub(crate) fn write_service_account(
    dir: &Path,
    token: &str,
    ca_pem: &str,
    namespace: &str,
) -> Result<(), SimError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| SimError::io(format!("creating {}", dir.display()), e))?;
    for (name, text) in [
        ("token", token),
        ("ca.crt", ca_pem),
        ("namespace", namespace),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| SimError::io(format!("writing {}", path.display()), e))?;
    }
    Ok(())
}
