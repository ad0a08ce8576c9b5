//! Finding the etcd pods and following them.
//!
//! A target (StatefulSet, Service, label selector, pod, or auto-detection) resolves to a pod
//! selection; the selection is listed once at start-up and then watched, so readiness changes
//! and pod IPs reach the router. Only ready pods take cluster traffic.
//!
//! Two shapes of etcd are common. An etcd StatefulSet: members are named after their pods and
//! advertise `<pod>.<service>` DNS names, which their certificates carry. Control-plane etcd
//! (kubeadm, RKE2): static pods `etcd-<node>` in `kube-system`, labelled `component=etcd`,
//! on the host network, members named after their *nodes* (not pods) and advertising
//! `https://<node-ip>:2379`; their certificates name the node name, the node IP, `localhost`
//! and `127.0.0.1` but no service name. So the name a member's certificate is checked against
//! ([`EtcdPod::dns_name`]) comes from the pod: the StatefulSet DNS name, else for a
//! host-network pod the host it advertises (kubeadm's
//! `kubeadm.kubernetes.io/etcd.advertise-client-urls` annotation) or its pod IP, which is the
//! node IP. Nothing downstream may assume member name = pod name: the rewrite maps members by
//! the URLs they advertise.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::ListParams;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::watch;

use crate::config::Target;
use crate::member::{sort_pods, EtcdPod};

/// The port etcd serves clients on when the pod spec does not say.
const DEFAULT_CLIENT_PORT: u16 = 2379;
/// etcd 2.x's legacy client port.
const LEGACY_CLIENT_PORT: u16 = 4001;
/// The URLs a kubeadm etcd member advertises, on its static pod
/// (`cmd/kubeadm/app/constants/constants.go` `EtcdAdvertiseClientUrlsAnnotationKey`).
const KUBEADM_ADVERTISE_ANNOTATION: &str = "kubeadm.kubernetes.io/etcd.advertise-client-urls";
/// Labels tried by auto-detection, in order: Helm charts and operators, then kubeadm's
/// static pods (`cmd/kubeadm/app/util/staticpod/utils.go` `ComponentPod`).
const AUTO_LABELS: [&str; 3] = ["app=etcd", "app.kubernetes.io/name=etcd", "component=etcd"];

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RBAC forbids reading the resource.
    #[error(
        "forbidden to {verb} {resource} in namespace {namespace}: the Kubernetes user needs \
         get/list/watch on {resource} (see deploy/rbac.yaml); API server said: {message}"
    )]
    Forbidden {
        /// The verb.
        verb: &'static str,
        /// The resource.
        resource: &'static str,
        /// The namespace.
        namespace: String,
        /// The API server's message.
        message: String,
    },
    /// A named StatefulSet or Service does not exist.
    #[error("{kind} \"{name}\" not found in namespace {namespace}")]
    NotFound {
        /// `statefulset` or `service`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The namespace.
        namespace: String,
    },
    /// A StatefulSet or Service with no usable selector.
    #[error("{kind} \"{name}\" has no label selector to find its pods with")]
    NoSelector {
        /// `statefulset` or `service`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// Nothing matched.
    #[error("no etcd pods in namespace {namespace} (tried {tried}); choose them with --statefulset, --service, -l or --pod, or another -n")]
    NoPods {
        /// The namespace.
        namespace: String,
        /// What was tried, for the message.
        tried: String,
    },
    /// Any other API failure.
    #[error("cannot {verb} {resource} in namespace {namespace}: {source}")]
    Api {
        /// The verb.
        verb: &'static str,
        /// The resource.
        resource: &'static str,
        /// The namespace.
        namespace: String,
        /// What kube said.
        #[source]
        source: kube::Error,
    },
}

/// How the pods are selected once the target is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// A label selector.
    Labels(String),
    /// One pod.
    Name(String),
    /// Every pod whose containers run an etcd image.
    Image,
}

/// A resolved target: what to watch, and how to name it to the user.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The selection.
    pub selection: Selection,
    /// E.g. `statefulset etcd`, `pods app=etcd`.
    pub description: String,
}

/// Discovery over one namespace.
#[derive(Clone)]
pub struct Discovery {
    client: kube::Client,
    namespace: String,
    remote_port: Option<u16>,
}

impl Discovery {
    /// Discovery in `namespace`; `remote_port` overrides the port found in the pod spec.
    pub fn new(client: kube::Client, namespace: &str, remote_port: Option<u16>) -> Self {
        Self {
            client,
            namespace: namespace.to_owned(),
            remote_port,
        }
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Resolves the target and lists its pods. Fails if there are none.
    pub async fn find(&self, target: &Target) -> Result<(Resolved, Vec<EtcdPod>), Error> {
        let candidates: Vec<Resolved> = match target {
            Target::StatefulSet(name) => {
                vec![self
                    .statefulset(name)
                    .await?
                    .ok_or_else(|| Error::NotFound {
                        kind: "statefulset",
                        name: name.clone(),
                        namespace: self.namespace.clone(),
                    })?]
            }
            Target::Service(name) => vec![self.service(name).await?],
            Target::Selector(sel) => {
                vec![Resolved {
                    selection: Selection::Labels(sel.clone()),
                    description: format!("pods {sel}"),
                }]
            }
            Target::Pod(name) => {
                vec![Resolved {
                    selection: Selection::Name(name.clone()),
                    description: format!("pod {name}"),
                }]
            }
            Target::Auto => {
                let mut c = Vec::new();
                match self.statefulset("etcd").await {
                    Ok(Some(sts)) => c.push(sts),
                    Ok(None) => {}
                    // A Role for control-plane etcd in kube-system need not cover
                    // StatefulSets: the pods are what auto-detection is after.
                    Err(Error::Forbidden { .. }) => {
                        tracing::debug!("cannot read statefulset etcd; looking for pods by label")
                    }
                    Err(e) => return Err(e),
                }
                for sel in AUTO_LABELS {
                    c.push(Resolved {
                        selection: Selection::Labels(sel.into()),
                        description: format!("pods {sel}"),
                    });
                }
                c.push(Resolved {
                    selection: Selection::Image,
                    description: "pods running an etcd image".into(),
                });
                c
            }
        };
        let mut tried = Vec::new();
        for resolved in candidates {
            let pods = self.list(&resolved.selection).await?;
            if !pods.is_empty() {
                return Ok((resolved, pods));
            }
            tried.push(resolved.description);
        }
        if matches!(target, Target::Auto) {
            tried.insert(0, "statefulset etcd".into());
        }
        Err(Error::NoPods {
            namespace: self.namespace.clone(),
            tried: tried.join(", "),
        })
    }

    /// The pods of a selection, sorted by StatefulSet ordinal, then name.
    pub async fn list(&self, selection: &Selection) -> Result<Vec<EtcdPod>, Error> {
        let pods = self
            .pods()
            .list(&list_params(selection))
            .await
            .map_err(|e| self.api_error("list", "pods", e))?;
        let mut found: Vec<EtcdPod> = pods
            .items
            .iter()
            .filter(|p| selected(selection, p))
            .filter_map(|p| self.to_etcd_pod(p))
            .collect();
        sort_pods(&mut found);
        Ok(found)
    }

    /// Watches the selection forever, publishing the current pod set after every change.
    /// Watch errors are logged and retried with kube-runtime's backoff.
    pub async fn watch(self, selection: Selection, tx: watch::Sender<Arc<Vec<EtcdPod>>>) {
        let config = match &selection {
            Selection::Labels(sel) => watcher::Config::default().labels(sel),
            Selection::Name(name) => {
                watcher::Config::default().fields(&format!("metadata.name={name}"))
            }
            Selection::Image => watcher::Config::default(),
        };
        let mut stream = watcher::watcher(self.pods(), config)
            .default_backoff()
            .boxed();
        let mut current: BTreeMap<String, EtcdPod> = BTreeMap::new();
        let mut initial: BTreeMap<String, EtcdPod> = BTreeMap::new();
        while let Some(event) = stream.next().await {
            let changed = match event {
                Ok(Event::Init) => {
                    initial.clear();
                    false
                }
                Ok(Event::InitApply(p)) => {
                    if let Some(e) = self.to_etcd_pod(&p).filter(|_| selected(&selection, &p)) {
                        initial.insert(e.name.clone(), e);
                    }
                    false
                }
                Ok(Event::InitDone) => {
                    current = std::mem::take(&mut initial);
                    true
                }
                Ok(Event::Apply(p)) => {
                    match self.to_etcd_pod(&p).filter(|_| selected(&selection, &p)) {
                        Some(e) => current.insert(e.name.clone(), e.clone()) != Some(e),
                        None => false,
                    }
                }
                Ok(Event::Delete(p)) => current
                    .remove(p.metadata.name.as_deref().unwrap_or_default())
                    .is_some(),
                Err(e) => {
                    // Open tunnels keep working meanwhile; the watch relists when it is back.
                    let error = super::safe_one_line(&e);
                    tracing::warn!(%error, "lost the pod watch (is the API server reachable?); retrying");
                    false
                }
            };
            if changed {
                let mut pods: Vec<EtcdPod> = current.values().cloned().collect();
                sort_pods(&mut pods);
                tracing::debug!(
                    ready = pods.iter().filter(|p| p.ready).count(),
                    total = pods.len(),
                    "pods changed"
                );
                tx.send_replace(Arc::new(pods));
            }
        }
    }

    async fn statefulset(&self, name: &str) -> Result<Option<Resolved>, Error> {
        let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.namespace);
        let Some(sts) = api
            .get_opt(name)
            .await
            .map_err(|e| self.api_error("get", "statefulsets", e))?
        else {
            return Ok(None);
        };
        let labels = sts
            .spec
            .and_then(|s| s.selector.match_labels)
            .unwrap_or_default();
        if labels.is_empty() {
            return Err(Error::NoSelector {
                kind: "statefulset",
                name: name.to_owned(),
            });
        }
        Ok(Some(Resolved {
            selection: Selection::Labels(join_labels(&labels)),
            description: format!("statefulset {name}"),
        }))
    }

    async fn service(&self, name: &str) -> Result<Resolved, Error> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.namespace);
        let svc = api
            .get_opt(name)
            .await
            .map_err(|e| self.api_error("get", "services", e))?
            .ok_or_else(|| Error::NotFound {
                kind: "service",
                name: name.to_owned(),
                namespace: self.namespace.clone(),
            })?;
        let labels = svc.spec.and_then(|s| s.selector).unwrap_or_default();
        if labels.is_empty() {
            return Err(Error::NoSelector {
                kind: "service",
                name: name.to_owned(),
            });
        }
        Ok(Resolved {
            selection: Selection::Labels(join_labels(&labels)),
            description: format!("service {name}"),
        })
    }

    fn to_etcd_pod(&self, pod: &Pod) -> Option<EtcdPod> {
        let name = pod.metadata.name.clone()?;
        let status = pod.status.as_ref();
        let ready = pod.metadata.deletion_timestamp.is_none()
            && status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Some(EtcdPod {
            name,
            ip: status.and_then(|s| s.pod_ip.clone()),
            ready,
            port: self.remote_port.unwrap_or_else(|| client_port(pod)),
            dns_name: tls_name(pod, &self.namespace),
        })
    }

    fn api_error(&self, verb: &'static str, resource: &'static str, e: kube::Error) -> Error {
        let namespace = self.namespace.clone();
        match super::api_status(&e) {
            Some((403, message)) => Error::Forbidden {
                verb,
                resource,
                namespace,
                message: message.to_owned(),
            },
            _ => Error::Api {
                verb,
                resource,
                namespace,
                source: e,
            },
        }
    }
}

fn list_params(selection: &Selection) -> ListParams {
    match selection {
        Selection::Labels(sel) => ListParams::default().labels(sel),
        Selection::Name(name) => ListParams::default().fields(&format!("metadata.name={name}")),
        Selection::Image => ListParams::default(),
    }
}

/// Whether `pod` belongs to the selection beyond what the API server filtered.
fn selected(selection: &Selection, pod: &Pod) -> bool {
    match selection {
        Selection::Image => pod.spec.as_ref().is_some_and(|s| {
            s.containers
                .iter()
                .any(|c| c.image.as_deref().is_some_and(is_etcd_image))
        }),
        _ => true,
    }
}

/// The name `pod`'s etcd certificate is verified against (see [`EtcdPod::dns_name`]).
///
/// A StatefulSet pod (hostname and subdomain set) has a stable DNS name, which charts put in
/// the certificate. A host-network pod has none: kubeadm's server certificate names the node
/// (`GetEtcdAltNames`: node name, `localhost`, advertise address, `127.0.0.1`, `::1`), and
/// the advertise address is what the member advertises. Its host comes from kubeadm's
/// annotation when present (it can differ from the pod IP on nodes with several addresses,
/// as with Vagrant's NAT interface), else the pod IP, which is the node IP. Other pods have
/// no name to check (`--etcd-server-name` gives one).
fn tls_name(pod: &Pod, namespace: &str) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let (Some(host), Some(sub)) = (spec.hostname.as_deref(), spec.subdomain.as_deref()) {
        return Some(format!("{host}.{sub}.{namespace}.svc"));
    }
    if spec.host_network != Some(true) {
        return None;
    }
    let advertised = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(KUBEADM_ADVERTISE_ANNOTATION))
        .and_then(|urls| urls.split(',').next())
        .and_then(|url| crate::rewrite::url_host(url.trim()))
        .map(str::to_owned);
    advertised.or_else(|| pod.status.as_ref()?.pod_ip.clone())
}

/// `quay.io/coreos/etcd:v3.4`, `registry.k8s.io/etcd:3.5.9-0`, `bitnami/etcd` …
fn is_etcd_image(image: &str) -> bool {
    let path = image.split('@').next().unwrap_or(image);
    let last = path.rsplit('/').next().unwrap_or(path);
    let repo = last.split(':').next().unwrap_or(last);
    repo == "etcd" || repo.starts_with("etcd-")
}

/// The container port named `client`, else 2379 or 4001 if declared, else 2379.
fn client_port(pod: &Pod) -> u16 {
    let ports: Vec<_> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .collect();
    let port = |p: i32| u16::try_from(p).ok();
    ports
        .iter()
        .find(|p| p.name.as_deref() == Some("client"))
        .and_then(|p| port(p.container_port))
        .or_else(|| {
            [DEFAULT_CLIENT_PORT, LEGACY_CLIENT_PORT]
                .into_iter()
                .find(|want| ports.iter().any(|p| port(p.container_port) == Some(*want)))
        })
        .unwrap_or(DEFAULT_CLIENT_PORT)
}

fn join_labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, ContainerPort, PodSpec};

    fn pod_with_ports(ports: &[(Option<&str>, i32)]) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "etcd".into(),
                    ports: Some(
                        ports
                            .iter()
                            .map(|(n, p)| ContainerPort {
                                name: n.map(str::to_owned),
                                container_port: *p,
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn client_port_prefers_the_named_port_then_2379_then_4001() {
        assert_eq!(
            client_port(&pod_with_ports(&[
                (Some("peer"), 2380),
                (Some("client"), 12379)
            ])),
            12379
        );
        assert_eq!(
            client_port(&pod_with_ports(&[(None, 4001), (None, 2379)])),
            2379
        );
        assert_eq!(
            client_port(&pod_with_ports(&[(None, 4001), (None, 7001)])),
            4001
        );
        assert_eq!(client_port(&pod_with_ports(&[])), 2379);
    }

    #[test]
    fn etcd_images() {
        for yes in [
            "quay.io/coreos/etcd:v2.3.8",
            "registry.k8s.io/etcd:3.5.9-0",
            "etcd",
            "bitnami/etcd@sha256:ab",
        ] {
            assert!(is_etcd_image(yes), "{yes}");
        }
        for no in [
            "nginx",
            "etcd-operator-x/nginx",
            "quay.io/coreos/etcdctl-helper",
        ] {
            assert!(!is_etcd_image(no), "{no}");
        }
    }

    fn host_network_pod(ip: &str, annotation: Option<&str>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some("etcd-cp-1".into());
        pod.metadata.annotations = annotation
            .map(|a| BTreeMap::from([(KUBEADM_ADVERTISE_ANNOTATION.to_string(), a.to_string())]));
        pod.spec = Some(PodSpec {
            host_network: Some(true),
            node_name: Some("cp-1".into()),
            ..Default::default()
        });
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some(ip.into()),
            ..Default::default()
        });
        pod
    }

    #[test]
    fn tls_names_for_statefulset_and_control_plane_pods() {
        let sts = Pod {
            spec: Some(PodSpec {
                hostname: Some("etcd-0".into()),
                subdomain: Some("etcd".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(tls_name(&sts, "db").as_deref(), Some("etcd-0.etcd.db.svc"));

        // kubeadm: the advertised host, which may differ from the pod (node) IP.
        let annotated = host_network_pod("10.0.2.15", Some("https://192.168.56.11:2379"));
        assert_eq!(
            tls_name(&annotated, "kube-system").as_deref(),
            Some("192.168.56.11")
        );
        let v6 = host_network_pod("fd00::b", Some("https://[fd00::b]:2379"));
        assert_eq!(tls_name(&v6, "kube-system").as_deref(), Some("fd00::b"));
        // RKE2 and others without the annotation: the pod IP, which is the node IP.
        let plain = host_network_pod("10.0.0.11", None);
        assert_eq!(
            tls_name(&plain, "kube-system").as_deref(),
            Some("10.0.0.11")
        );
        // A Deployment's pod has no stable name.
        let other = Pod {
            spec: Some(PodSpec::default()),
            ..Default::default()
        };
        assert_eq!(tls_name(&other, "db"), None);
    }

    /// An API server answering as for a kubeadm cluster and a Role for `kube-system` that
    /// covers pods but not StatefulSets.
    fn kubeadm_api() -> kube::Client {
        let service = tower::service_fn(|req: http::Request<kube::client::Body>| async move {
            let path = req.uri().path().to_owned();
            let query = req.uri().query().unwrap_or_default().to_owned();
            let list = |items: serde_json::Value| {
                serde_json::json!({"kind": "PodList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": "7"}, "items": items})
            };
            let (code, body) = if path.ends_with("/statefulsets/etcd") {
                let status = serde_json::json!({"kind": "Status", "apiVersion": "v1",
                    "status": "Failure", "reason": "Forbidden", "code": 403,
                    "message": "statefulsets.apps \"etcd\" is forbidden"});
                (403, status)
            } else if path.ends_with("/pods") && query.contains("component") {
                let pod = serde_json::json!({
                    "metadata": {"name": "etcd-cp-1", "namespace": "kube-system",
                        "labels": {"component": "etcd", "tier": "control-plane"}},
                    "spec": {"hostNetwork": true, "nodeName": "cp-1",
                        "containers": [{"name": "etcd"}]},
                    "status": {"podIP": "10.0.0.11", "conditions": [
                        {"type": "Ready", "status": "True"}]}});
                (200, list(serde_json::json!([pod])))
            } else {
                (200, list(serde_json::json!([])))
            };
            let body = http_body_util::Full::new(bytes::Bytes::from(body.to_string()));
            http::Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(body)
        });
        kube::Client::new(service, "kube-system")
    }

    #[tokio::test]
    async fn auto_detection_finds_static_pods_without_statefulset_rights() {
        let discovery = Discovery::new(kubeadm_api(), "kube-system", None);
        let (resolved, pods) = discovery.find(&Target::Auto).await.unwrap();
        assert_eq!(resolved.description, "pods component=etcd");
        assert_eq!(
            resolved.selection,
            Selection::Labels("component=etcd".into())
        );
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].name, "etcd-cp-1");
        assert!(pods[0].ready);
        assert_eq!(pods[0].port, 2379);
        assert_eq!(pods[0].dns_name.as_deref(), Some("10.0.0.11"));
        // A named StatefulSet still needs the right: the error says so.
        let named = discovery.find(&Target::StatefulSet("etcd".into())).await;
        assert!(matches!(named, Err(Error::Forbidden { .. })), "{named:?}");
    }

    #[test]
    fn pods_sort_by_ordinal() {
        let mut pods: Vec<EtcdPod> = ["etcd-10", "etcd-2", "etcd-0"]
            .iter()
            .map(|n| EtcdPod {
                name: (*n).into(),
                ip: None,
                ready: true,
                port: 2379,
                dns_name: None,
            })
            .collect();
        sort_pods(&mut pods);
        let names: Vec<_> = pods.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["etcd-0", "etcd-2", "etcd-10"]);
    }
}
