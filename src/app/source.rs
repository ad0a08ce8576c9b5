//! Where the members come from: Kubernetes (the pods of a StatefulSet, Service, selector or
//! pod, reached through port-forward tunnels or, with `--direct`, at their pod IPs), or a fixed
//! list of etcd URLs (`--endpoints`, no Kubernetes at all: the in-cluster gateway or a test).

use http::Uri;

use super::Error;
use crate::config::Config;
use crate::k8s::discovery::{Discovery, Selection};
use crate::k8s::spdy::conn::Keepalive;
use crate::k8s::{self, tunnel};
use crate::member::EtcdPod;

/// How member connections are made.
pub(super) enum Connect {
    /// Port-forward tunnels.
    Tunnels(Box<tunnel::Tunneler>),
    /// Plain TCP to each member's address.
    Direct,
}

/// The members found, and how to follow and reach them.
pub(super) struct Source {
    /// The members at start-up.
    pub pods: Vec<EtcdPod>,
    /// How to connect.
    pub connect: Connect,
    /// Discovery to follow pod changes (`None` for a fixed list).
    pub follow: Option<(Discovery, Selection)>,
    /// For the summary: what is served and through what.
    pub origin: String,
}

/// A `--endpoints` URL that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Not `http(s)://host:port`.
    #[error("--endpoints {0}: expected http://HOST:PORT (or https:// with --etcd-cacert)")]
    Malformed(String),
    /// `https://` needs upstream TLS settings.
    #[error("--endpoints {0}: https:// etcd endpoints need --etcd-cacert (and --etcd-cert/--etcd-key for client-cert auth)")]
    Tls(String),
    /// `http://` with upstream TLS on.
    #[error("--endpoints {0}: plain http:// endpoint while --etcd-cacert turns on TLS to etcd")]
    Plain(String),
}

impl Source {
    /// Finds the members as the configuration says.
    pub(super) async fn find(cfg: &Config) -> Result<Self, Error> {
        if !cfg.endpoints.is_empty() {
            let pods = cfg
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, url)| endpoint_member(i, url, cfg.etcd_tls.is_some()))
                .collect::<Result<Vec<_>, _>>()?;
            let origin = format!(
                "{} etcd endpoints from --endpoints, connecting directly",
                pods.len()
            );
            return Ok(Self {
                pods,
                connect: Connect::Direct,
                follow: None,
                origin,
            });
        }
        let kube = k8s::connect(
            cfg.kubeconfig.as_ref(),
            cfg.context.as_deref(),
            cfg.namespace.as_deref(),
        )
        .await?;
        let discovery = Discovery::new(kube.client.clone(), &kube.namespace, cfg.remote_port);
        let (resolved, pods) = discovery.find(&cfg.target).await.map_err(|e| match &e {
            k8s::discovery::Error::Api { source, .. } => kube
                .unreachable(source)
                .map_or_else(|| Error::from(e), Error::from),
            _ => Error::from(e),
        })?;
        let (connect, how) = if cfg.direct {
            (Connect::Direct, "at their pod IPs")
        } else {
            (
                Connect::Tunnels(Box::new(tunnel::Tunneler::new(
                    kube.client.clone(),
                    &kube.namespace,
                    cfg.portforward,
                    tunnel::Timing {
                        dial: cfg.dial_timeout,
                        keepalive: Keepalive {
                            every: cfg.keepalive,
                            timeout: cfg.keepalive_timeout,
                        },
                    },
                ))),
                "through port-forward",
            )
        };
        let origin = format!(
            "{} in namespace {} {how} via context {}",
            resolved.description, kube.namespace, kube.context
        );
        Ok(Self {
            pods,
            connect,
            follow: Some((discovery, resolved.selection)),
            origin,
        })
    }
}

/// A member for the i-th `--endpoints` URL: named `endpoint-i`, its host as the address.
fn endpoint_member(i: usize, url: &str, tls: bool) -> Result<EtcdPod, EndpointError> {
    let uri: Uri = url
        .parse()
        .map_err(|_| EndpointError::Malformed(url.to_owned()))?;
    match (uri.scheme_str(), tls) {
        (Some("http"), false) | (Some("https"), true) => {}
        (Some("https"), false) => return Err(EndpointError::Tls(url.to_owned())),
        (Some("http"), true) => return Err(EndpointError::Plain(url.to_owned())),
        _ => return Err(EndpointError::Malformed(url.to_owned())),
    }
    let host = uri
        .host()
        .ok_or_else(|| EndpointError::Malformed(url.to_owned()))?;
    let port = uri.port_u16().unwrap_or(2379);
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok(EtcdPod {
        name: format!("endpoint-{i}"),
        ip: Some(host.clone()),
        ready: true,
        port,
        dns_name: Some(host),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        let m = endpoint_member(1, "http://127.0.0.1:12379", false).unwrap();
        assert_eq!(
            (m.name.as_str(), m.ip.as_deref(), m.port),
            ("endpoint-1", Some("127.0.0.1"), 12379)
        );
        assert_eq!(
            endpoint_member(0, "http://etcd:2379", false)
                .unwrap()
                .ip
                .as_deref(),
            Some("etcd")
        );
        assert!(matches!(
            endpoint_member(0, "https://a:1", false),
            Err(EndpointError::Tls(_))
        ));
        assert!(matches!(
            endpoint_member(0, "a:1", false),
            Err(EndpointError::Malformed(_))
        ));
        assert!(endpoint_member(0, "https://a:1", true).is_ok());
        assert!(matches!(
            endpoint_member(0, "http://a:1", true),
            Err(EndpointError::Plain(_))
        ));
    }
}
