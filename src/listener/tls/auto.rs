//! `--tls-auto`: a local CA and a server certificate for the loopback names, generated once
//! (rcgen) and reused across runs, so `etcdctl --cacert <path>` keeps working.
//!
//! Files live in `<config dir>/etcd-proxy/tls/` (`~/.config/etcd-proxy/tls` on Linux): `ca.crt`,
//! `ca.key`, `server.crt`, `server.key`; keys are written with mode 0600. The server
//! certificate is re-issued (by the same CA) when the requested names change.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Why the automatic certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No config directory on this system.
    #[error("--tls-auto needs a config directory (set $HOME or XDG_CONFIG_HOME), or pass --tls-cert/--tls-key")]
    NoConfigDir,
    /// Reading or writing the files failed.
    #[error("--tls-auto: {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// rcgen failed.
    #[error("--tls-auto: cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Paths of the generated material.
#[derive(Debug, Clone)]
pub struct AutoTls {
    /// The CA certificate to give clients (`etcdctl --cacert`).
    pub ca_cert: PathBuf,
    /// The server certificate.
    pub cert: PathBuf,
    /// The server key.
    pub key: PathBuf,
}

/// The default directory for the generated files.
pub fn default_dir() -> Result<PathBuf, Error> {
    dirs::config_dir()
        .map(|d| d.join("etcd-proxy").join("tls"))
        .ok_or(Error::NoConfigDir)
}

/// Ensures a CA and a server certificate for loopback plus `extra_sans` exist in `dir`.
pub fn ensure(dir: &Path, extra_sans: &[String]) -> Result<AutoTls, Error> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let paths = AutoTls {
        ca_cert: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    let ca_key_path = dir.join("ca.key");
    let sans_path = dir.join("server.sans");

    let issuer = match (
        fs::read_to_string(&paths.ca_cert),
        fs::read_to_string(&ca_key_path),
    ) {
        (Ok(cert), Ok(key)) => Issuer::from_ca_cert_pem(&cert, KeyPair::from_pem(&key)?)?,
        _ => {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(DnType::CommonName, "etcd-proxy local CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key)?;
            write(&paths.ca_cert, cert.pem().as_bytes(), false).map_err(io(&paths.ca_cert))?;
            write(&ca_key_path, key.serialize_pem().as_bytes(), true).map_err(io(&ca_key_path))?;
            Issuer::new(params, key)
        }
    };

    let mut sans = vec![
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        "localhost".to_owned(),
    ];
    sans.extend(extra_sans.iter().cloned());
    let wanted = sans.join(",");
    let current = fs::read_to_string(&sans_path).unwrap_or_default();
    if current.trim() != wanted || !paths.cert.exists() || !paths.key.exists() {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "etcd-proxy");
        params.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => s.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()?;
        let cert = params.signed_by(&key, &issuer)?;
        write(&paths.cert, cert.pem().as_bytes(), false).map_err(io(&paths.cert))?;
        write(&paths.key, key.serialize_pem().as_bytes(), true).map_err(io(&paths.key))?;
        write(&sans_path, wanted.as_bytes(), false).map_err(io(&sans_path))?;
    }
    Ok(paths)
}

/// Writes a file, private (0600) if it holds a key.
fn write(path: &Path, data: &[u8], private: bool) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    options.open(path)?.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_reused_and_reissued_for_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure(dir.path(), &[]).unwrap();
        let ca = fs::read(&first.ca_cert).unwrap();
        let cert = fs::read(&first.cert).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&first.key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let mode = fs::metadata(dir.path().join("ca.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600);
        }
        let again = ensure(dir.path(), &[]).unwrap();
        assert_eq!(fs::read(&again.cert).unwrap(), cert, "reused");
        let more = ensure(dir.path(), &["proxy.example.com".into()]).unwrap();
        assert_ne!(
            fs::read(&more.cert).unwrap(),
            cert,
            "re-issued for the new name"
        );
        assert_eq!(fs::read(&more.ca_cert).unwrap(), ca, "same CA");
        // The result loads as a rustls server config.
        assert!(super::super::server_config(&more.cert, &more.key, None).is_ok());
    }
}
