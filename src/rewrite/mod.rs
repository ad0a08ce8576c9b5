//! Rewriting the member client URLs that etcd advertises.
//!
//! etcd members publish `--advertise-client-urls` through raft, so every client sees the same
//! in-cluster names (`http://etcd-0.etcd.ns.svc.cluster.local:2379`) that a laptop cannot
//! resolve. Clients that sync endpoints from the member list (etcdctl v2, clientv3 `AutoSync`,
//! `etcdctl ... --cluster`) would leave the proxy for those names. This module replaces each
//! member's client URLs with the one local endpoint that is pinned to that member.
//!
//! Members are matched to pods by what they advertise first and by name second: a
//! StatefulSet names members after pods, but control-plane etcd (kubeadm) names them after
//! nodes (member `cp-1` in pod `etcd-cp-1`) and advertises `https://<node-ip>:2379`, so the
//! member name alone never finds the pod there.
//!
//! It is pure: bytes in, bytes out, no IO, no Kubernetes. The caller builds an [`AddrMap`] from
//! discovery and logs the [`Rewritten::unmapped`] members.
//!
//! * [`grpc`]: byte-exact protobuf rewrite of `etcdserverpb.Cluster/Member*` responses.
//! * [`v2`]: `/v2/members`, `/v2/members/leader`, `/v2/machines`.
//! * [`gateway`]: the v3 JSON gateway's `/v3/cluster/member/*`.

pub mod gateway;
pub mod grpc;
mod json;
#[cfg(test)]
mod proptests;
pub mod v2;

use bytes::Bytes;

/// What can go wrong while rewriting a response body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Malformed protobuf.
    #[error(transparent)]
    Wire(#[from] crate::protowire::Error),
    /// The gRPC body is not a whole sequence of length-prefixed messages.
    #[error("truncated gRPC frame: {0} trailing bytes do not form a whole message")]
    TruncatedFrame(usize),
    /// A gRPC message was compressed (flag 1); we pass such bodies through untouched.
    #[error("gRPC message is compressed")]
    Compressed,
    /// A JSON body that was not the JSON etcd sends.
    #[error("malformed JSON: {0}")]
    Json(String),
    /// A text body that is not UTF-8.
    #[error("body is not UTF-8")]
    NotUtf8,
}

/// One member's local endpoint, as the proxy serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// The pod that backs the member (member name = pod name in a StatefulSet, not in
    /// control-plane etcd).
    pub pod: String,
    /// The pod's IP (or the host of a `--endpoints` URL), if known: members advertising IP
    /// URLs map through it.
    pub pod_ip: Option<String>,
    /// The host the member advertises, when discovery knows it (kubeadm's annotation; the
    /// TLS server name): with `port`, an exact match even when pod IPs say nothing (several
    /// host-network pods behind one NAT address).
    pub host: Option<String>,
    /// etcd's port at that address: with it, `host:port` matches exactly (several members on
    /// one host, as with `--endpoints` on a single machine).
    pub port: Option<u16>,
    /// The URL the client should use for this member, e.g. `http://127.0.0.1:4002`.
    pub url: String,
}

/// Maps advertised members and URLs to the local endpoints that reach them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrMap {
    endpoints: Vec<LocalEndpoint>,
}

/// A rewritten body, and the names of members that could not be mapped (kept as they were).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The new body.
    pub body: Bytes,
    /// Members whose URLs were left alone because no pod matched them (name, or first URL).
    pub unmapped: Vec<String>,
}

impl AddrMap {
    /// A map over these endpoints.
    pub fn new(endpoints: Vec<LocalEndpoint>) -> Self {
        Self { endpoints }
    }

    /// The local URL for a member: by an advertised URL's exact `host:port` first (the
    /// advertised host, then the pod IP), then by name (a StatefulSet names members after
    /// pods), then by an advertised URL's host alone (pod IP, pod name, or the pod-name
    /// prefix of a DNS name).
    pub fn local_for_member(&self, name: &str, client_urls: &[&str]) -> Option<&str> {
        if let Some(url) = client_urls.iter().find_map(|u| self.exact(u)) {
            return Some(url);
        }
        if !name.is_empty() {
            if let Some(e) = self.endpoints.iter().find(|e| e.pod == name) {
                return Some(&e.url);
            }
        }
        client_urls.iter().find_map(|u| self.by_host(u))
    }

    /// The local URL for one advertised client URL: by exact `host:port`, then by its host.
    pub fn local_for_url(&self, url: &str) -> Option<&str> {
        self.exact(url).or_else(|| self.by_host(url))
    }

    /// The endpoint whose advertised host, else pod IP, and port are exactly the URL's.
    fn exact(&self, url: &str) -> Option<&str> {
        let host = url_host(url)?;
        let port = url_port(url)?;
        let at = |e: &&LocalEndpoint, h: &Option<String>| {
            h.as_deref() == Some(host) && e.port == Some(port)
        };
        self.endpoints
            .iter()
            .find(|e| at(e, &e.host))
            .or_else(|| self.endpoints.iter().find(|e| at(e, &e.pod_ip)))
            .map(|e| e.url.as_str())
    }

    /// The endpoint whose pod IP, pod name or advertised host is the URL's host, or whose pod
    /// name is its first DNS label.
    fn by_host(&self, url: &str) -> Option<&str> {
        let host = url_host(url)?;
        let first_label = host.split('.').next().unwrap_or(host);
        self.endpoints
            .iter()
            .find(|e| {
                e.pod_ip.as_deref() == Some(host)
                    || e.host.as_deref() == Some(host)
                    || e.pod == host
                    || e.pod == first_label
            })
            .map(|e| e.url.as_str())
    }
}

/// The host of `scheme://host[:port][/...]`, without brackets for IPv6.
pub(crate) fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split_once(']').map(|(h, _)| h);
    }
    let host = authority.split_once(':').map_or(authority, |(h, _)| h);
    (!host.is_empty()).then_some(host)
}

/// The explicit port of `scheme://host:port/...`.
fn url_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let after_host = match authority.rsplit_once(']') {
        Some((_, tail)) => tail,
        None => authority,
    };
    after_host
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The map the tests use: three pods, each with a local endpoint.
    pub(crate) fn three_pods() -> AddrMap {
        AddrMap::new(
            (0..3)
                .map(|i| LocalEndpoint {
                    pod: format!("etcd-{i}"),
                    pod_ip: Some(format!("10.244.0.{}", 10 + i)),
                    host: Some(format!("etcd-{i}.etcd.etcd.svc")),
                    port: Some(2379),
                    url: format!("http://127.0.0.1:{}", 4002 + i),
                })
                .collect(),
        )
    }

    #[test]
    fn maps_by_name_then_dns_prefix_then_ip() {
        let m = three_pods();
        assert_eq!(
            m.local_for_member("etcd-1", &[]),
            Some("http://127.0.0.1:4003")
        );
        assert_eq!(
            m.local_for_member("", &["http://etcd-2.etcd.etcd.svc.cluster.local:2379"]),
            Some("http://127.0.0.1:4004")
        );
        assert_eq!(
            m.local_for_member("infra0", &["https://10.244.0.10:2379"]),
            Some("http://127.0.0.1:4002")
        );
        assert_eq!(m.local_for_member("other", &["http://db-0.x:2379"]), None);
        assert_eq!(m.local_for_url("http://[::1]:2379"), None);
    }

    #[test]
    fn same_host_members_map_by_port() {
        let m = AddrMap::new(
            (0..2)
                .map(|i| LocalEndpoint {
                    pod: format!("endpoint-{i}"),
                    pod_ip: Some("127.0.0.1".into()),
                    host: Some("127.0.0.1".into()),
                    port: Some(2379 + 10 * i),
                    url: format!("http://127.0.0.1:{}", 4002 + i),
                })
                .collect(),
        );
        assert_eq!(
            m.local_for_member("m2", &["http://127.0.0.1:2389"]),
            Some("http://127.0.0.1:4003")
        );
        assert_eq!(
            m.local_for_url("http://127.0.0.1:2379"),
            Some("http://127.0.0.1:4002")
        );
        assert_eq!(url_port("https://[::1]:2379/x"), Some(2379));
        assert_eq!(url_port("http://a"), None);
    }

    /// kubeadm: pods `etcd-cp-N`, members `cp-N` advertising `https://<node-ip>:2379`.
    fn control_plane(pod_ips: [&str; 3], advertised: [&str; 3]) -> AddrMap {
        AddrMap::new(
            (0..3)
                .map(|i| LocalEndpoint {
                    pod: format!("etcd-cp-{}", i + 1),
                    pod_ip: Some(pod_ips[i].into()),
                    host: Some(advertised[i].into()),
                    port: Some(2379),
                    url: format!("https://127.0.0.1:{}", 2381 + i),
                })
                .collect(),
        )
    }

    #[test]
    fn control_plane_members_map_by_advertised_node_ip_not_name() {
        let ips = ["10.0.0.11", "10.0.0.12", "10.0.0.13"];
        let m = control_plane(ips, ips);
        assert_eq!(
            m.local_for_member("cp-2", &["https://10.0.0.12:2379"]),
            Some("https://127.0.0.1:2382")
        );
        assert_eq!(m.local_for_member("cp-2", &[]), None, "names differ");
        // Every node behind one NAT address as the pod IP (Vagrant): the advertised host
        // (kubeadm's annotation) still tells them apart.
        let nat = ["10.0.2.15"; 3];
        let m = control_plane(nat, ["192.168.56.11", "192.168.56.12", "192.168.56.13"]);
        for (i, ip) in ["192.168.56.11", "192.168.56.12", "192.168.56.13"]
            .iter()
            .enumerate()
        {
            let url = format!("https://{ip}:2379");
            let want = format!("https://127.0.0.1:{}", 2381 + i);
            assert_eq!(
                m.local_for_member(&format!("cp-{}", i + 1), &[&url]),
                Some(want.as_str())
            );
        }
    }

    #[test]
    fn an_advertised_url_beats_a_member_name_naming_another_pod() {
        let m = three_pods();
        assert_eq!(
            m.local_for_member("etcd-0", &["http://10.244.0.12:2379"]),
            Some("http://127.0.0.1:4004")
        );
    }

    #[test]
    fn url_host_handles_ports_paths_and_ipv6() {
        assert_eq!(url_host("http://a.b:1/x"), Some("a.b"));
        assert_eq!(url_host("https://[fd00::1]:2379"), Some("fd00::1"));
        assert_eq!(url_host("unix://sock"), Some("sock"));
        assert_eq!(url_host("http://"), None);
    }
}
