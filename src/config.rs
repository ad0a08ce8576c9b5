//! The validated configuration the proxy runs with, built from the command line.
//!
//! Everything a flag combination can get wrong is caught here, before any network IO, with a
//! message that says what to change.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::{Cli, ReadsArg};
use crate::router::Reads;

/// How the etcd pods are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A StatefulSet named `etcd`, else pods labelled `app=etcd` or
    /// `app.kubernetes.io/name=etcd`, else pods running an etcd image.
    Auto,
    /// The pods of this StatefulSet (its `spec.selector`).
    StatefulSet(String),
    /// The pods this Service selects.
    Service(String),
    /// Pods matching a label selector.
    Selector(String),
    /// One pod by name.
    Pod(String),
}

/// Where the per-member endpoints listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberPorts {
    /// Member N on `base + N`.
    From(u16),
    /// Free ports chosen by the OS.
    Ephemeral,
}

/// Where the local TLS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// `--tls-cert` and `--tls-key`.
    Files {
        /// Certificate chain (PEM).
        cert: PathBuf,
        /// Private key (PEM).
        key: PathBuf,
    },
    /// `--tls-auto`, with extra subject alternative names.
    Auto {
        /// Names beyond 127.0.0.1, ::1 and localhost.
        sans: Vec<String>,
    },
}

/// The proxy's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Explicit kubeconfig path; `None` means `$KUBECONFIG` or `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Context override.
    pub context: Option<String>,
    /// Namespace override.
    pub namespace: Option<String>,
    /// How to find the pods.
    pub target: Target,
    /// etcd's port in the pod, if given.
    pub remote_port: Option<u16>,
    /// The cluster endpoint.
    pub listen: SocketAddr,
    /// The per-member endpoints.
    pub member_ports: MemberPorts,
    /// Where linearizable reads go.
    pub reads: Reads,
    /// Threads serving requests (0: one per core).
    pub threads: usize,
    /// Health-check (and idle keepalive) interval.
    pub keepalive: Duration,
    /// How long a check or ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// How long opening a member connection (a tunnel, or a TCP connect) may take.
    pub dial_timeout: Duration,
    /// Local TLS, if any.
    pub tls: Option<TlsSource>,
    /// CA for client certificates (requires TLS).
    pub client_ca: Option<PathBuf>,
    /// Users file for local authentication.
    pub auth_file: Option<PathBuf>,
    /// Key that signs login tokens, shared by replicas.
    pub token_key: Option<PathBuf>,
    /// Connect to pod IPs instead of port-forwarding.
    pub direct: bool,
    /// The port-forward protocol.
    pub portforward: crate::cli::PortForward,
    /// Fixed etcd URLs to serve without Kubernetes.
    pub endpoints: Vec<String>,
    /// TLS to etcd: CA, optional client identity, optional fixed server name.
    pub etcd_tls: Option<EtcdTls>,
    /// The admin listener (`/metrics`, `/healthz`).
    pub admin: Option<SocketAddr>,
    /// Open connections per local endpoint.
    pub max_connections: usize,
    /// Open connections per client address.
    pub max_connections_per_address: usize,
    /// New connections per second per client address.
    pub max_connection_rate_per_address: u32,
    /// Time to a first request, and idle time until authenticated.
    pub header_timeout: Duration,
}

/// TLS settings toward etcd.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// CA certificates.
    pub cacert: PathBuf,
    /// Client certificate and key.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Fixed server name.
    pub server_name: Option<String>,
}

/// A flag combination that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Empty names would select nothing.
    #[error("--{flag} needs a non-empty value")]
    Empty {
        /// The flag.
        flag: &'static str,
    },
    /// Member ports would overflow.
    #[error("--member-ports {base} leaves no room for the members (ports stop at 65535)")]
    MemberPortsOverflow {
        /// The base port.
        base: u16,
    },
    /// A keepalive or timeout setting of zero.
    #[error("--{flag} must be longer than zero")]
    ZeroDuration {
        /// The flag.
        flag: &'static str,
    },
    /// A limit of zero would refuse every connection.
    #[error("--{flag} must be at least 1")]
    ZeroCount {
        /// The flag.
        flag: &'static str,
    },
    /// An off-host listener without TLS (and authentication).
    #[error(
        "refusing to listen on {addr} without TLS and authentication: anyone who can reach it \
         could use etcd. Add --tls-auto (or --tls-cert/--tls-key) and --auth-file, listen on \
         127.0.0.1, or pass --insecure-expose if you really mean it"
    )]
    NotLoopback {
        /// The address.
        addr: SocketAddr,
    },
    /// An off-host admin listener.
    #[error("refusing to serve --admin on {addr}: metrics have no authentication; use a loopback address or --insecure-expose")]
    AdminNotLoopback {
        /// The address.
        addr: SocketAddr,
    },
    /// `--client-ca` without TLS.
    #[error("--client-ca needs TLS: add --tls-auto or --tls-cert/--tls-key")]
    ClientCaWithoutTls,
}

impl TryFrom<Cli> for Config {
    type Error = Error;

    fn try_from(cli: Cli) -> Result<Self, Error> {
        let target = match (cli.statefulset, cli.service, cli.selector, cli.pod) {
            (Some(s), ..) => Target::StatefulSet(non_empty(s, "statefulset")?),
            (_, Some(s), ..) => Target::Service(non_empty(s, "service")?),
            (_, _, Some(s), _) => Target::Selector(non_empty(s, "selector")?),
            (.., Some(p)) => Target::Pod(non_empty(p, "pod")?),
            _ => Target::Auto,
        };
        let tls = match (cli.tls_cert, cli.tls_key, cli.tls_auto) {
            (Some(cert), Some(key), _) => Some(TlsSource::Files { cert, key }),
            (_, _, true) => Some(TlsSource::Auto { sans: cli.tls_san }),
            _ => None,
        };
        if cli.client_ca.is_some() && tls.is_none() {
            return Err(Error::ClientCaWithoutTls);
        }
        if let Some(admin) = cli.admin.filter(|a| !a.ip().is_loopback()) {
            if !cli.insecure_expose {
                return Err(Error::AdminNotLoopback { addr: admin });
            }
        }
        let protected = tls.is_some() && cli.auth_file.is_some();
        if !cli.listen.ip().is_loopback() && !protected && !cli.insecure_expose {
            return Err(Error::NotLoopback { addr: cli.listen });
        }
        let member_ports = match cli.member_ports {
            Some(0) => MemberPorts::Ephemeral,
            Some(base) => MemberPorts::From(base),
            None if cli.listen.port() == 0 => MemberPorts::Ephemeral,
            None => MemberPorts::From(
                cli.listen
                    .port()
                    .checked_add(1)
                    .ok_or(Error::MemberPortsOverflow { base: 65535 })?,
            ),
        };
        if let MemberPorts::From(base) = member_ports {
            if base == u16::MAX {
                return Err(Error::MemberPortsOverflow { base });
            }
        }
        if cli.keepalive.is_zero() {
            return Err(Error::ZeroDuration { flag: "keepalive" });
        }
        if cli.keepalive_timeout.is_zero() {
            return Err(Error::ZeroDuration {
                flag: "keepalive-timeout",
            });
        }
        if cli.dial_timeout.is_zero() {
            return Err(Error::ZeroDuration {
                flag: "dial-timeout",
            });
        }
        if cli.header_timeout.is_zero() {
            return Err(Error::ZeroDuration {
                flag: "header-timeout",
            });
        }
        if cli.max_connections == 0 {
            return Err(Error::ZeroCount {
                flag: "max-connections",
            });
        }
        if cli.max_connection_rate_per_address == 0 {
            return Err(Error::ZeroCount {
                flag: "max-connection-rate-per-address",
            });
        }
        if cli.max_connections_per_address == 0 {
            return Err(Error::ZeroCount {
                flag: "max-connections-per-address",
            });
        }
        Ok(Config {
            kubeconfig: cli.kubeconfig,
            context: cli.context.filter(|c| !c.is_empty()),
            namespace: cli.namespace.filter(|n| !n.is_empty()),
            target,
            remote_port: cli.remote_port,
            listen: cli.listen,
            member_ports,
            reads: match cli.reads {
                ReadsArg::Leader => Reads::Leader,
                ReadsArg::Spread => Reads::Spread,
            },
            threads: cli.threads,
            keepalive: cli.keepalive,
            keepalive_timeout: cli.keepalive_timeout,
            dial_timeout: cli.dial_timeout,
            tls,
            client_ca: cli.client_ca,
            auth_file: cli.auth_file,
            token_key: cli.token_key,
            direct: cli.direct,
            portforward: cli.portforward,
            endpoints: cli.endpoints,
            admin: cli.admin,
            max_connections: cli.max_connections,
            max_connections_per_address: cli.max_connections_per_address,
            max_connection_rate_per_address: cli.max_connection_rate_per_address,
            header_timeout: cli.header_timeout,
            etcd_tls: cli.etcd_cacert.map(|cacert| EtcdTls {
                cacert,
                identity: cli.etcd_cert.zip(cli.etcd_key),
                server_name: cli.etcd_server_name,
            }),
        })
    }
}

fn non_empty(s: String, flag: &'static str) -> Result<String, Error> {
    if s.trim().is_empty() {
        Err(Error::Empty { flag })
    } else {
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn cfg(args: &[&str]) -> Result<Config, Error> {
        let mut v = vec!["etcd-proxy"];
        v.extend_from_slice(args);
        Config::try_from(Cli::try_parse_from(v).unwrap())
    }

    #[test]
    fn member_ports_follow_the_listen_port() {
        assert_eq!(cfg(&[]).unwrap().member_ports, MemberPorts::From(4002));
        assert_eq!(
            cfg(&["--listen", "127.0.0.1:0"]).unwrap().member_ports,
            MemberPorts::Ephemeral
        );
        assert_eq!(
            cfg(&["--member-ports", "5000"]).unwrap().member_ports,
            MemberPorts::From(5000)
        );
        assert!(matches!(
            cfg(&["--listen", "127.0.0.1:65535"]),
            Err(Error::MemberPortsOverflow { .. })
        ));
    }

    #[test]
    fn off_host_listeners_are_refused() {
        let err = cfg(&["--listen", "0.0.0.0:4001"]).unwrap_err();
        assert!(
            err.to_string().contains("without TLS and authentication"),
            "{err}"
        );
        assert!(cfg(&["--listen", "[::1]:4001"]).is_ok());
        assert!(
            cfg(&["--listen", "0.0.0.0:4001", "--tls-auto"]).is_err(),
            "TLS alone is not enough"
        );
        assert!(cfg(&["--listen", "0.0.0.0:4001", "--insecure-expose"]).is_ok());
        assert!(
            cfg(&["--listen", "0.0.0.0:4001", "--auth-file", "u"]).is_err(),
            "auth alone is not enough"
        );
        assert!(cfg(&["--listen", "0.0.0.0:4001", "--tls-auto", "--auth-file", "u"]).is_ok());
    }

    #[test]
    fn tls_flags() {
        assert_eq!(cfg(&[]).unwrap().tls, None);
        let c = cfg(&["--tls-auto", "--tls-san", "proxy.example"]).unwrap();
        assert_eq!(
            c.tls,
            Some(TlsSource::Auto {
                sans: vec!["proxy.example".into()]
            })
        );
        let c = cfg(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap();
        assert!(matches!(c.tls, Some(TlsSource::Files { .. })));
        assert!(matches!(
            cfg(&["--client-ca", "ca.pem"]),
            Err(Error::ClientCaWithoutTls)
        ));
    }

    #[test]
    fn keepalive_durations() {
        let c = cfg(&["--keepalive", "500ms", "--keepalive-timeout", "3s"]).unwrap();
        assert_eq!(c.keepalive, Duration::from_millis(500));
        assert_eq!(c.keepalive_timeout, Duration::from_secs(3));
        assert!(matches!(
            cfg(&["--keepalive", "0s"]),
            Err(Error::ZeroDuration { .. })
        ));
        assert_eq!(cfg(&[]).unwrap().dial_timeout, Duration::from_secs(10));
        assert_eq!(
            cfg(&["--dial-timeout", "3s"]).unwrap().dial_timeout,
            Duration::from_secs(3)
        );
        assert!(matches!(
            cfg(&["--dial-timeout", "0s"]),
            Err(Error::ZeroDuration {
                flag: "dial-timeout"
            })
        ));
    }

    #[test]
    fn targets() {
        assert_eq!(cfg(&[]).unwrap().target, Target::Auto);
        assert_eq!(
            cfg(&["-l", "app=x"]).unwrap().target,
            Target::Selector("app=x".into())
        );
        assert!(matches!(
            cfg(&["--pod", " "]),
            Err(Error::Empty { flag: "pod" })
        ));
    }
}
