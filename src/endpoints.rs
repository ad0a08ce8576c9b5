//! The per-member local endpoints, following the member set.
//!
//! Each member pod gets its own local listener, pinned to it, so `etcdctl ... --cluster`
//! reaches every member once. Scaling the StatefulSet adds and removes members while the
//! proxy runs: a new pod gets an endpoint (port = first member port + its StatefulSet ordinal,
//! so `etcd-3` keeps the same port across restarts of the proxy), a deleted pod's endpoint is
//! closed, and the rewrite map follows, so MemberList through the proxy shows the change.
//! Control-plane static pods (`etcd-<node>`) get their port from a numeric node-name suffix
//! the same way, or a free one when two nodes' suffixes collide.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::MemberPorts;
use crate::listener::{self, Endpoint, Serving};
use crate::member::EtcdPod;
use crate::proxy::Proxy;
use crate::rewrite::{AddrMap, LocalEndpoint};

/// One member's endpoint.
struct Open {
    url: String,
    /// Bound but not serving yet (before [`MemberEndpoints::run`]).
    unstarted: Option<Endpoint>,
    /// Stops this endpoint's listener.
    stop: Option<watch::Sender<bool>>,
}

/// The member endpoints and the rewrite map built from them.
pub struct MemberEndpoints {
    ip: IpAddr,
    ports: MemberPorts,
    /// `http` or `https`, for the URLs.
    scheme: &'static str,
    serving: Serving,
    open: BTreeMap<String, Open>,
    map_tx: watch::Sender<Arc<AddrMap>>,
}

impl MemberEndpoints {
    /// No endpoints yet, on `ip`, served as `serving` says (TLS, limits); the receiver follows
    /// the rewrite map.
    pub fn new(
        ip: IpAddr,
        ports: MemberPorts,
        scheme: &'static str,
        serving: Serving,
    ) -> (Self, watch::Receiver<Arc<AddrMap>>) {
        let (map_tx, map_rx) = watch::channel(Arc::new(AddrMap::default()));
        (
            Self {
                ip,
                ports,
                scheme,
                serving,
                open: BTreeMap::new(),
                map_tx,
            },
            map_rx,
        )
    }

    /// Binds an endpoint for each of the first pods; a busy port is an error here.
    pub async fn bind_initial(&mut self, pods: &[EtcdPod]) -> Result<(), listener::Error> {
        for (i, pod) in pods.iter().enumerate() {
            let endpoint = self.bind(pod, i).await?;
            self.insert(pod, endpoint);
        }
        self.publish(pods);
        Ok(())
    }

    /// (member, URL) of each endpoint, in member order.
    pub fn urls(&self, pods: &[EtcdPod]) -> Vec<(String, String)> {
        pods.iter()
            .filter_map(|p| {
                self.open
                    .get(&p.name)
                    .map(|o| (p.name.clone(), o.url.clone()))
            })
            .collect()
    }

    /// Serves every endpoint and follows `pods` until `stop` turns true.
    pub async fn run(
        mut self,
        proxy: Proxy,
        mut pods: watch::Receiver<Arc<Vec<EtcdPod>>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tasks = JoinSet::new();
        self.start_unstarted(&proxy, &mut tasks);
        loop {
            tokio::select! {
                changed = pods.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = pods.borrow_and_update().clone();
                    self.reconcile(&current).await;
                    self.start_unstarted(&proxy, &mut tasks);
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            }
        }
        for open in self.open.values_mut() {
            if let Some(s) = open.stop.take() {
                let _ = s.send(true);
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Adds endpoints for new pods, closes those of removed pods, refreshes the map.
    async fn reconcile(&mut self, pods: &[EtcdPod]) {
        let gone: Vec<String> = self
            .open
            .keys()
            .filter(|n| !pods.iter().any(|p| &p.name == *n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(mut open) = self.open.remove(&name) {
                tracing::info!(member = %name, url = %open.url, "member removed; closing its endpoint");
                if let Some(s) = open.stop.take() {
                    let _ = s.send(true);
                }
            }
        }
        for (i, pod) in pods.iter().enumerate() {
            if self.open.contains_key(&pod.name) {
                continue;
            }
            match self.bind(pod, i).await {
                Ok(endpoint) => {
                    self.insert(pod, endpoint);
                    let url = self
                        .open
                        .get(&pod.name)
                        .map(|o| o.url.clone())
                        .unwrap_or_default();
                    tracing::info!(member = %pod.name, %url, "new member; serving its endpoint");
                }
                Err(e) => {
                    tracing::warn!(member = %pod.name, error = %e, "cannot open an endpoint for the new member")
                }
            }
        }
        self.publish(pods);
    }

    async fn bind(&self, pod: &EtcdPod, index: usize) -> Result<Endpoint, listener::Error> {
        let port = match self.ports {
            MemberPorts::From(base) => {
                let offset = ordinal(&pod.name).unwrap_or(index);
                let port = u16::try_from(offset)
                    .ok()
                    .and_then(|o| base.checked_add(o))
                    .unwrap_or(0);
                // Pod names that are not StatefulSet ordinals can share a suffix (static pods
                // `etcd-a-1` and `etcd-b-1` on nodes `a-1` and `b-1`): the second gets a free port.
                if self.serves_port(port) {
                    0
                } else {
                    port
                }
            }
            MemberPorts::Ephemeral => 0,
        };
        let listener = listener::bind(SocketAddr::new(self.ip, port)).await?;
        let name: Arc<str> = Arc::from(pod.name.as_str());
        Ok(Endpoint {
            listener,
            name: name.clone(),
            pinned: Some(name),
        })
    }

    /// Whether an open endpoint already listens on `port`.
    fn serves_port(&self, port: u16) -> bool {
        let suffix = format!(":{port}");
        self.open.values().any(|o| o.url.ends_with(&suffix))
    }

    fn insert(&mut self, pod: &EtcdPod, endpoint: Endpoint) {
        let url = endpoint
            .listener
            .local_addr()
            .map(|a| format!("{}://{a}", self.scheme))
            .unwrap_or_default();
        self.open.insert(
            pod.name.clone(),
            Open {
                url,
                unstarted: Some(endpoint),
                stop: None,
            },
        );
    }

    fn start_unstarted(&mut self, proxy: &Proxy, tasks: &mut JoinSet<()>) {
        for open in self.open.values_mut() {
            if let Some(endpoint) = open.unstarted.take() {
                let (tx, rx) = watch::channel(false);
                open.stop = Some(tx);
                tasks.spawn(listener::serve(
                    endpoint,
                    proxy.clone(),
                    self.serving.clone(),
                    rx,
                ));
            }
        }
    }

    fn publish(&self, pods: &[EtcdPod]) {
        let endpoints = pods
            .iter()
            .filter_map(|p| {
                let open = self.open.get(&p.name)?;
                Some(LocalEndpoint {
                    pod: p.name.clone(),
                    pod_ip: p.ip.clone(),
                    host: p.dns_name.clone(),
                    port: Some(p.port),
                    url: open.url.clone(),
                })
            })
            .collect();
        self.map_tx.send_replace(Arc::new(AddrMap::new(endpoints)));
    }
}

/// The StatefulSet ordinal of `etcd-3`.
fn ordinal(name: &str) -> Option<usize> {
    name.rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn pod(name: &str) -> EtcdPod {
        EtcdPod {
            name: name.into(),
            ip: Some(format!("10.0.0.{}", name.len())),
            ready: true,
            port: 2379,
            dns_name: None,
        }
    }

    #[tokio::test]
    async fn endpoints_follow_the_members() {
        let (mut eps, map) = MemberEndpoints::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            MemberPorts::Ephemeral,
            "http",
            Serving {
                tls: None,
                admission: crate::listener::Admission::new(Default::default()),
            },
        );
        let three: Vec<EtcdPod> = ["etcd-0", "etcd-1", "etcd-2"].map(pod).to_vec();
        eps.bind_initial(&three).await.unwrap();
        assert_eq!(eps.urls(&three).len(), 3);
        assert!(map.borrow().local_for_member("etcd-2", &[]).is_some());

        let five: Vec<EtcdPod> = ["etcd-0", "etcd-1", "etcd-2", "etcd-3", "etcd-4"]
            .map(pod)
            .to_vec();
        eps.reconcile(&five).await;
        assert_eq!(eps.urls(&five).len(), 5);
        assert!(map.borrow().local_for_member("etcd-4", &[]).is_some());

        eps.reconcile(&three).await;
        assert_eq!(eps.urls(&five).len(), 3);
        assert!(map.borrow().local_for_member("etcd-4", &[]).is_none());
    }

    #[tokio::test]
    async fn colliding_node_suffixes_get_distinct_ports() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let pods: Vec<EtcdPod> = ["etcd-a-1", "etcd-b-1"].map(pod).to_vec();
        // A base port just released; another process may take base + 1 meanwhile, so retry.
        for _ in 0..5 {
            let base = crate::listener::bind(SocketAddr::new(lo, 0))
                .await
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let serving = Serving {
                tls: None,
                admission: crate::listener::Admission::new(Default::default()),
            };
            let (mut eps, _map) =
                MemberEndpoints::new(lo, MemberPorts::From(base), "https", serving);
            if eps.bind_initial(&pods).await.is_err() {
                continue;
            }
            let urls = eps.urls(&pods);
            assert!(urls[0].1.ends_with(&format!(":{}", base + 1)), "{urls:?}");
            assert_ne!(urls[0].1, urls[1].1);
            return;
        }
        panic!("no free base port");
    }

    #[test]
    fn ordinals() {
        assert_eq!(ordinal("etcd-12"), Some(12));
        assert_eq!(ordinal("etcd"), None);
        assert_eq!(ordinal("my-etcd-abc"), None);
    }
}
