//! The member type every module shares: one etcd member as the proxy knows it, whoever found
//! it (Kubernetes discovery, `--endpoints`). A leaf: it depends on nothing in the crate, so
//! routing, health, endpoints and upstream can use it without depending on discovery.

/// One etcd member (a pod, or an `--endpoints` URL), as the proxy needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdPod {
    /// Pod name; in a StatefulSet also the etcd member name.
    pub name: String,
    /// Pod IP, for members that advertise IP URLs.
    pub ip: Option<String>,
    /// Ready condition is True and the pod is not terminating.
    pub ready: bool,
    /// etcd's client port inside the pod.
    pub port: u16,
    /// The name a TLS member's certificate should carry: `<hostname>.<subdomain>.<ns>.svc`
    /// for StatefulSet pods; for host-network pods (control-plane etcd) the host of the
    /// advertised client URL, else the pod IP (= the node IP); the host of a `--endpoints`
    /// URL. Also the host the member advertises, which the rewrite maps by.
    pub dns_name: Option<String>,
}

/// StatefulSet ordinal order (`etcd-2` before `etcd-10`), then name.
pub fn sort_pods(pods: &mut [EtcdPod]) {
    pods.sort_by(|a, b| (ordinal(&a.name), &a.name).cmp(&(ordinal(&b.name), &b.name)));
}

fn ordinal(name: &str) -> Option<u64> {
    name.rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}
