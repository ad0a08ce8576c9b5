//! `etcd-proxy --env`: the shell lines that point etcdctl at the proxy the same flags would
//! start, for `eval "$(etcd-proxy --env --tls-auto)"`.
//!
//! etcdctl reads `ETCDCTL_ENDPOINTS` in both API versions and `ETCDCTL_CACERT` in v3 (v2's
//! `ETCDCTL_CA_FILE` is left out: etcdctl v3 warns about every variable it does not know).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::{Config, TlsSource};
use crate::listener::tls;

/// Why the lines cannot be printed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Port 0 means "pick one when starting": nothing to print yet.
    #[error("--env needs a fixed --listen port (not 0)")]
    EphemeralPort,
    /// The automatic CA could not be made.
    #[error(transparent)]
    Tls(#[from] tls::auto::Error),
}

/// The `export …` lines for `cfg`.
pub fn exports(cfg: &Config) -> Result<String, Error> {
    if cfg.listen.port() == 0 {
        return Err(Error::EphemeralPort);
    }
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let addr = SocketAddr::new(reachable(cfg.listen.ip()), cfg.listen.port());
    let mut lines = vec![
        "export ETCDCTL_API=3".to_owned(),
        format!(
            "export ETCDCTL_ENDPOINTS={}",
            quote(&format!("{scheme}://{addr}"))
        ),
    ];
    if let Some(TlsSource::Auto { sans }) = &cfg.tls {
        let made = tls::auto::ensure(&tls::auto::default_dir()?, sans)?;
        let ca = quote(&made.ca_cert.display().to_string());
        lines.push(format!("export ETCDCTL_CACERT={ca}"));
    }
    Ok(lines.join("\n"))
}

/// A wildcard listen address is reached through loopback.
fn reachable(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        other => other,
    }
}

/// Single-quoted for POSIX shells.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn cfg(args: &[&str]) -> Config {
        let mut v = vec!["etcd-proxy"];
        v.extend_from_slice(args);
        Config::try_from(Cli::try_parse_from(v).unwrap()).unwrap()
    }

    #[test]
    fn plain_and_wildcard_listeners() {
        let out = exports(&cfg(&[])).unwrap();
        assert_eq!(
            out,
            "export ETCDCTL_API=3\nexport ETCDCTL_ENDPOINTS='http://127.0.0.1:4001'"
        );
        let out = exports(&cfg(&["--listen", "0.0.0.0:2379", "--insecure-expose"])).unwrap();
        assert!(out.contains("'http://127.0.0.1:2379'"), "{out}");
        assert!(matches!(
            exports(&cfg(&["--listen", "127.0.0.1:0"])),
            Err(Error::EphemeralPort)
        ));
        assert_eq!(quote("a'b"), r"'a'\''b'");
    }
}
