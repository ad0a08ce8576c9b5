//! The etcd PKI of a kubeadm control plane, for [`crate::Layout::ControlPlane`].
//!
//! kubeadm makes one etcd CA and, per control-plane node, a server certificate; clients (the
//! API server, kubeadm's own health checks, an admin with etcdctl) present client
//! certificates signed by the same CA, because etcd runs with `--client-cert-auth`. The
//! simulator mints the same set with the same names, subjects and SANs
//! (`cmd/kubeadm/app/phases/certs/certlist.go`: `KubeadmCertEtcdCA`, `KubeadmCertEtcdServer`,
//! `KubeadmCertEtcdHealthcheck`, `KubeadmCertEtcdAPIClient`; SANs from
//! `cmd/kubeadm/app/util/pkiutil/pki_helpers.go` `GetEtcdAltNames`: the node name,
//! `localhost`, the node's advertise address, `127.0.0.1` and `::1`; the common name is the
//! node name). Notably there is no `<pod>.<service>` DNS name: a client must verify the
//! member against its node IP (or node name).
//!
//! Files keep kubeadm's names under a temp dir standing in for `/etc/kubernetes/pki`:
//! `etcd/ca.crt`, `etcd/healthcheck-client.{crt,key}`, `apiserver-etcd-client.{crt,key}`, and
//! each node's `etcd/server.{crt,key}` under its own directory (every node has its own
//! `/etc/kubernetes/pki`). Peer certificates are not made: the simulated members talk to each
//! other over plain HTTP, which no client can see.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};

use crate::SimError;

/// The client-side files of a simulated kubeadm etcd PKI: what a user copies off a
/// control-plane node to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdPki {
    /// `/etc/kubernetes/pki/etcd/ca.crt`: the CA that signs etcd's server certificates (and
    /// the client certificates etcd accepts).
    pub ca_cert: PathBuf,
    /// `/etc/kubernetes/pki/apiserver-etcd-client.crt`: the API server's client certificate.
    pub apiserver_client_cert: PathBuf,
    /// `/etc/kubernetes/pki/apiserver-etcd-client.key`.
    pub apiserver_client_key: PathBuf,
    /// `/etc/kubernetes/pki/etcd/healthcheck-client.crt`: kubeadm's health-check client.
    pub healthcheck_client_cert: PathBuf,
    /// `/etc/kubernetes/pki/etcd/healthcheck-client.key`.
    pub healthcheck_client_key: PathBuf,
}

/// One node's server certificate and key.
#[derive(Debug, Clone)]
pub(crate) struct ServerCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The CA, able to sign more certificates.
pub(crate) struct EtcdCa {
    issuer: Issuer<'static, KeyPair>,
    pub files: EtcdPki,
}

fn write(path: &Path, pem: &str) -> Result<(), SimError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| SimError::io(format!("creating {}", dir.display()), e))?;
    }
    std::fs::write(path, pem).map_err(|e| SimError::io(format!("writing {}", path.display()), e))
}

/// A leaf signed by `issuer`: `sans` (IP strings become IP SANs), common name `cn`.
fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    cn: &str,
    sans: Vec<String>,
    usages: Vec<Eku>,
) -> Result<(String, String), SimError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = usages;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl EtcdCa {
    /// Makes the CA and the two client certificates under `pki` (the stand-in for
    /// `/etc/kubernetes/pki`).
    pub fn generate(pki: &Path) -> Result<Self, SimError> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name.push(DnType::CommonName, "etcd-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;
        let files = EtcdPki {
            ca_cert: pki.join("etcd/ca.crt"),
            apiserver_client_cert: pki.join("apiserver-etcd-client.crt"),
            apiserver_client_key: pki.join("apiserver-etcd-client.key"),
            healthcheck_client_cert: pki.join("etcd/healthcheck-client.crt"),
            healthcheck_client_key: pki.join("etcd/healthcheck-client.key"),
        };
        write(&files.ca_cert, &ca_cert.pem())?;
        write(&pki.join("etcd/ca.key"), &ca_key.serialize_pem())?;
        let issuer = Issuer::new(ca, ca_key);
        let clients = [
            (
                "kube-apiserver-etcd-client",
                &files.apiserver_client_cert,
                &files.apiserver_client_key,
            ),
            (
                "kube-etcd-healthcheck-client",
                &files.healthcheck_client_cert,
                &files.healthcheck_client_key,
            ),
        ];
        for (cn, cert_path, key_path) in clients {
            let (cert, key) = leaf(&issuer, cn, Vec::new(), vec![Eku::ClientAuth])?;
            write(cert_path, &cert)?;
            write(key_path, &key)?;
        }
        Ok(Self { issuer, files })
    }

    /// `etcd/server.{crt,key}` for `node` with advertise address `ip`, under `pki` (that
    /// node's `/etc/kubernetes/pki`). Server and client auth, as kubeadm's.
    pub fn server(&self, pki: &Path, node: &str, ip: &str) -> Result<ServerCert, SimError> {
        let sans = [node, "localhost", ip, "127.0.0.1", "::1"]
            .map(str::to_owned)
            .to_vec();
        let (cert, key) = leaf(
            &self.issuer,
            node,
            sans,
            vec![Eku::ServerAuth, Eku::ClientAuth],
        )?;
        let out = ServerCert {
            cert: pki.join("etcd/server.crt"),
            key: pki.join("etcd/server.key"),
        };
        write(&out.cert, &cert)?;
        write(&out.key, &key)?;
        Ok(out)
    }
}
