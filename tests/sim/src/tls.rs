//! TLS material and the kubeconfig that trusts it.
//!
//! A real client (kube-rs with rustls) verifies the API server certificate
//! against `certificate-authority-data`, so the simulator mints its own CA and
//! a server certificate for `127.0.0.1`/`localhost` instead of disabling
//! verification: etcd-proxy's TLS path is exercised exactly as against a
//! cluster.
//!
//! The server certificate carries the SANs kubeadm gives the API server
//! (`cmd/kubeadm/app/util/pkiutil/pki_helpers.go` `GetAPIServerAltNames`): `kubernetes`,
//! `kubernetes.default`, `kubernetes.default.svc`, `kubernetes.default.svc.cluster.local`, the
//! Service IP 10.96.0.1, and the advertise address (127.0.0.1, plus `localhost`), and one extra
//! name as `--apiserver-cert-extra-sans` adds: [`EXTRA_SAN`], under `.invalid` (RFC 6761) so
//! it resolves nowhere and only a proxy that maps it reaches the simulator.
//!
//! Client certificates are verified when given, as kube-apiserver does with
//! `--client-ca-file` (`tls.VerifyClientCertIfGiven`), against the same CA: kubeadm signs
//! `admin.conf`'s `kubernetes-admin` certificate (organization `kubeadm:cluster-admins`) with
//! the cluster CA.

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::SimError;

/// The API server certificate's extra SAN, which resolves nowhere.
pub const EXTRA_SAN: &str = "etcd-proxy-sim.invalid";

/// The group kubeadm's `kubernetes-admin` certificate carries (kubeadm 1.29+; before, it was
/// `system:masters`), bound to `cluster-admin`.
pub(crate) const ADMIN_GROUPS: [&str; 2] = ["kubeadm:cluster-admins", "system:masters"];

/// The CA certificate (PEM), the rustls server configuration using a leaf signed by it, and
/// an admin client certificate and key (PEM) signed by it.
pub(crate) struct ServerTls {
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    pub config: Arc<rustls::ServerConfig>,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
}

/// Generates a CA, the API server's certificate and kubeadm's admin client certificate.
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
    let sans = [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "10.96.0.1",
        "127.0.0.1",
        "localhost",
        EXTRA_SAN,
    ];
    let mut leaf_params = CertificateParams::new(sans.map(str::to_owned).to_vec())?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    leaf_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf_params.signed_by(&leaf_key, &issuer)?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin
        .distinguished_name
        .push(DnType::CommonName, "kubernetes-admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, ADMIN_GROUPS[0]);
    admin.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &issuer)?;

    let chain = vec![CertificateDer::from(leaf_cert.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_cert.der().to_vec()))?;
    let clients =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| SimError::Config(format!("client certificate verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)?;
    // The simulated apiserver speaks HTTP/1.1 only (WebSocket upgrades need it).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerTls {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().to_vec(),
        config: Arc::new(config),
        admin_cert_pem: admin_cert.pem(),
        admin_key_pem: admin_key.serialize_pem(),
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

/// The admin client certificate and key, where [`SimCluster::admin_client_cert`] reads them.
///
/// [`SimCluster::admin_client_cert`]: crate::SimCluster::admin_client_cert
pub(crate) fn write_admin_client(dir: &Path, tls: &ServerTls) -> Result<(), SimError> {
    for (name, text) in [
        (ADMIN_CERT_FILE, &tls.admin_cert_pem),
        (ADMIN_KEY_FILE, &tls.admin_key_pem),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| SimError::io(format!("writing {}", path.display()), e))?;
    }
    Ok(())
}

/// kubeadm's names for the admin credentials (in `admin.conf`), under the simulator's dir.
pub(crate) const ADMIN_CERT_FILE: &str = "admin.crt";
/// See [`ADMIN_CERT_FILE`].
pub(crate) const ADMIN_KEY_FILE: &str = "admin.key";

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

/// The user a verified client certificate names: its common name, if one of its
/// organizations (groups) is an admin group. Other certificates authenticate no one here (the
/// simulator binds no other groups).
pub(crate) fn cert_admin(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let cn = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
    let admin = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .any(|o| ADMIN_GROUPS.contains(&o));
    admin.then_some(cn)
}
