//! The Kubernetes objects the simulated cluster serves: the etcd StatefulSet,
//! its headless Service and one Pod per member.
//!
//! They are built with the `k8s-openapi` types and serialised with serde, so
//! the JSON on the wire is genuine Kubernetes JSON (field names, omitted
//! empties, RFC 3339 timestamps) rather than a hand-written approximation.
//! The shape mirrors what the StatefulSet controller and kubelet produce for
//! an etcd StatefulSet (labels `statefulset.kubernetes.io/pod-name`,
//! `apps.kubernetes.io/pod-index`, an ownerReference, Ready conditions).
//!
//! With [`Layout::ControlPlane`] the pods are instead kubeadm's static etcd pods as the
//! kubelet mirrors them to the API server (see [`static_pod`]), and there is no StatefulSet or
//! Service at all.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetStatus};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStatus, HostIP, HostPathVolumeSource, Pod, PodCondition, PodIP, PodSpec, PodStatus,
    PodTemplateSpec, ResourceRequirements, Service, ServicePort, ServiceSpec, Toleration, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, ObjectMeta, OwnerReference, Time,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use crate::store::StsStatus;
use crate::{random, Layout, SimError};

/// The image the simulated pods claim to run (matches the installed etcd 3.4.23).
pub(crate) const ETCD_IMAGE: &str = "registry.k8s.io/etcd:3.4.23-0";
/// The container port etcd clients use.
pub(crate) const CLIENT_PORT: u16 = 2379;
/// The container port etcd peers use.
pub(crate) const PEER_PORT: u16 = 2380;
/// The pods' `terminationGracePeriodSeconds` (the API default).
const TERMINATION_GRACE_SECONDS: i64 = 30;
/// The node every simulated pod is scheduled on.
const NODE_NAME: &str = "sim-node-0";

/// Cluster-wide identity shared by all objects.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub namespace: String,
    /// The StatefulSet and Service name, or the static pod manifest's name (`etcd`).
    pub name: String,
    pub layout: Layout,
    /// The control-plane Nodes' uids, by ordinal (mirror pods are owned by their Node).
    pub node_uids: Vec<String>,
    pub statefulset_uid: String,
    pub service_uid: String,
    pub created: Timestamp,
}

impl Identity {
    /// `{app: <name>}`, the StatefulSet selector and Service selector.
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_string(), self.name.clone())])
    }

    /// `etcd-0`, `etcd-1`, ... or, for static pods, `etcd-cp-1`, ...: the kubelet names a
    /// mirror pod `<manifest pod name>-<node name>` (`pkg/kubelet/config/common.go`
    /// `generatePodName`).
    pub fn pod_name(&self, ordinal: usize) -> String {
        match self.layout {
            Layout::StatefulSet => format!("{}-{ordinal}", self.name),
            Layout::ControlPlane => format!("{}-{}", self.name, self.node_name(ordinal)),
        }
    }

    /// The node a pod runs on: `cp-1`, `cp-2`, ... for control-plane nodes (each runs one etcd
    /// member, named after the node), [`NODE_NAME`] for every StatefulSet pod.
    pub fn node_name(&self, ordinal: usize) -> String {
        match self.layout {
            Layout::StatefulSet => NODE_NAME.to_string(),
            Layout::ControlPlane => format!("cp-{}", ordinal + 1),
        }
    }

    /// `http://etcd-0.etcd.<ns>.svc.cluster.local:2379`: what the member advertises.
    pub fn advertised_client_url(&self, ordinal: usize) -> String {
        format!(
            "http://{}.{}.{}.svc.cluster.local:{CLIENT_PORT}",
            self.pod_name(ordinal),
            self.name,
            self.namespace
        )
    }
}

/// The mutable per-pod state the store keeps.
#[derive(Debug, Clone)]
pub(crate) struct PodState {
    pub ordinal: usize,
    pub name: String,
    pub uid: String,
    /// CRI sandbox id (64 hex chars), used in kubelet/containerd error text.
    pub sandbox_id: String,
    /// Network namespace id (`/var/run/netns/cni-<id>`).
    pub netns_id: String,
    pub created: Timestamp,
    pub ready: bool,
    pub restart_count: i32,
    /// When Ready last flipped.
    pub transition: Timestamp,
    pub resource_version: u64,
    /// `status.podIP`: fixed for the life of a pod sandbox, new with each sandbox.
    pub ip: String,
    /// Set once the pod is being deleted (`metadata.deletionTimestamp`).
    pub deleting: Option<Timestamp>,
}

impl PodState {
    /// A freshly created, Running and Ready pod with a new uid and sandbox.
    pub fn new(ordinal: usize, name: String, ip: String) -> Result<Self, SimError> {
        let now = now();
        Ok(PodState {
            ordinal,
            name,
            uid: random::uuid_v4()?,
            sandbox_id: random::random_hex(32)?,
            netns_id: random::uuid_v4()?,
            created: now,
            ready: true,
            restart_count: 0,
            transition: now,
            resource_version: 0,
            ip,
            deleting: None,
        })
    }

    /// The kubelet re-created the pod sandbox (`kuberuntime_manager.go`
    /// `computePodActions`: a changed/dead sandbox is killed and re-created,
    /// and every container with it). Same pod (name, uid), but a new sandbox,
    /// network namespace and IP, and the container's restart count goes up.
    pub fn new_sandbox(&mut self, ip: String) -> Result<(), SimError> {
        self.sandbox_id = random::random_hex(32)?;
        self.netns_id = random::uuid_v4()?;
        self.ip = ip;
        Ok(())
    }

    /// The pod's labels, as the StatefulSet controller sets them.
    pub fn labels(&self, id: &Identity) -> BTreeMap<String, String> {
        let mut l = id.selector_labels();
        l.insert(
            "statefulset.kubernetes.io/pod-name".into(),
            self.name.clone(),
        );
        l.insert(
            "apps.kubernetes.io/pod-index".into(),
            self.ordinal.to_string(),
        );
        l
    }
}

fn container_ports() -> Vec<ContainerPort> {
    vec![
        ContainerPort {
            name: Some("client".into()),
            container_port: i32::from(CLIENT_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        },
        ContainerPort {
            name: Some("peer".into()),
            container_port: i32::from(PEER_PORT),
            protocol: Some("TCP".into()),
            ..Default::default()
        },
    ]
}

fn pod_spec(id: &Identity, hostname: Option<String>) -> PodSpec {
    PodSpec {
        containers: vec![Container {
            name: "etcd".into(),
            image: Some(ETCD_IMAGE.into()),
            command: Some(vec!["etcd".into()]),
            ports: Some(container_ports()),
            image_pull_policy: Some("IfNotPresent".into()),
            termination_message_path: Some("/dev/termination-log".into()),
            termination_message_policy: Some("File".into()),
            ..Default::default()
        }],
        hostname: hostname.clone(),
        subdomain: hostname.map(|_| id.name.clone()),
        restart_policy: Some("Always".into()),
        dns_policy: Some("ClusterFirst".into()),
        scheduler_name: Some("default-scheduler".into()),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        ..Default::default()
    }
}

fn condition(type_: &str, ok: bool, at: Timestamp, reason: Option<&str>) -> PodCondition {
    PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        last_transition_time: Some(Time(at)),
        reason: reason.map(str::to_string),
        ..Default::default()
    }
}

/// The Pod object for one member.
pub(crate) fn pod(id: &Identity, p: &PodState) -> Pod {
    if id.layout == Layout::ControlPlane {
        return static_pod(id, p);
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(p.name.clone()),
            generate_name: Some(format!("{}-", id.name)),
            namespace: Some(id.namespace.clone()),
            uid: Some(p.uid.clone()),
            resource_version: Some(p.resource_version.to_string()),
            creation_timestamp: Some(Time(p.created)),
            // A graceful delete sets both (`staging/src/k8s.io/apiserver/pkg/registry/rest/delete.go`
            // `BeforeDelete`): the grace period is the pod's terminationGracePeriodSeconds.
            deletion_timestamp: p.deleting.map(Time),
            deletion_grace_period_seconds: p.deleting.map(|_| TERMINATION_GRACE_SECONDS),
            labels: Some(p.labels(id)),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "StatefulSet".into(),
                name: id.name.clone(),
                uid: id.statefulset_uid.clone(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE_NAME.into()),
            ..pod_spec(id, Some(p.name.clone()))
        }),
        status: Some(pod_status(p, "10.0.0.4", "BestEffort")),
    }
}

/// The status the kubelet reports: Running, Ready as `p` says, one `etcd` container.
fn pod_status(p: &PodState, host_ip: &str, qos: &str) -> PodStatus {
    let container_id = format!("containerd://{}", &p.sandbox_id);
    let state = if p.ready {
        ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(p.transition)),
            }),
            ..Default::default()
        }
    } else {
        // A killed etcd: the container terminated, as the kubelet reports a SIGKILL.
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 137,
                reason: Some("Error".into()),
                finished_at: Some(Time(p.transition)),
                started_at: Some(Time(p.created)),
                container_id: Some(container_id.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }
    };
    let not_ready_reason = (!p.ready).then_some("ContainersNotReady");
    PodStatus {
        phase: Some("Running".into()),
        host_ip: Some(host_ip.into()),
        host_ips: Some(vec![HostIP { ip: host_ip.into() }]),
        pod_ip: Some(p.ip.clone()),
        pod_ips: Some(vec![PodIP { ip: p.ip.clone() }]),
        start_time: Some(Time(p.created)),
        qos_class: Some(qos.into()),
        conditions: Some(vec![
            condition("PodReadyToStartContainers", true, p.created, None),
            condition("Initialized", true, p.created, None),
            condition("Ready", p.ready, p.transition, not_ready_reason),
            condition("ContainersReady", p.ready, p.transition, not_ready_reason),
            condition("PodScheduled", true, p.created, None),
        ]),
        container_statuses: Some(vec![ContainerStatus {
            name: "etcd".into(),
            image: ETCD_IMAGE.into(),
            image_id: format!("{ETCD_IMAGE}@sha256:{}", "0".repeat(64)),
            container_id: Some(container_id),
            ready: p.ready,
            started: Some(p.ready),
            restart_count: p.restart_count,
            state: Some(state),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// What a kubeadm control-plane member advertises: `https://<node IP>:2379`
/// (`cmd/kubeadm/app/util/etcd/etcd.go` `GetClientURL` of the node's advertise address).
pub(crate) fn control_plane_client_url(node_ip: &str) -> String {
    format!("https://{node_ip}:{CLIENT_PORT}")
}

/// kubeadm's etcd command line for a node (`cmd/kubeadm/app/phases/etcd/local.go`
/// `getEtcdCommand`), as the pod spec shows it; the simulator's real etcd gets the same
/// client-side flags with its own paths and ports (see `etcd.rs`).
fn kubeadm_etcd_command(node: &str, ip: &str, initial_cluster: &str) -> Vec<String> {
    let client = control_plane_client_url(ip);
    let peer = format!("https://{ip}:{PEER_PORT}");
    let pki = "/etc/kubernetes/pki/etcd";
    let mut c = vec!["etcd".to_string()];
    c.extend([
        format!("--advertise-client-urls={client}"),
        format!("--cert-file={pki}/server.crt"),
        "--client-cert-auth=true".into(),
        "--data-dir=/var/lib/etcd".into(),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster={initial_cluster}"),
        format!("--key-file={pki}/server.key"),
        format!("--listen-client-urls=https://127.0.0.1:{CLIENT_PORT},{client}"),
        "--listen-metrics-urls=http://127.0.0.1:2381".into(),
        format!("--listen-peer-urls={peer}"),
        format!("--name={node}"),
        format!("--peer-cert-file={pki}/peer.crt"),
        "--peer-client-cert-auth=true".into(),
        format!("--peer-key-file={pki}/peer.key"),
        format!("--peer-trusted-ca-file={pki}/ca.crt"),
        "--snapshot-count=10000".into(),
        format!("--trusted-ca-file={pki}/ca.crt"),
    ]);
    c
}

/// A kubeadm static etcd pod as the API server shows it: the mirror pod the kubelet creates
/// for `/etc/kubernetes/manifests/etcd.yaml`.
///
/// * The manifest: `cmd/kubeadm/app/util/staticpod/utils.go` `ComponentPod` (namespace
///   `kube-system`, labels `component: etcd` and `tier: control-plane`, `hostNetwork: true`,
///   `priorityClassName: system-node-critical`) and `cmd/kubeadm/app/phases/etcd/local.go`
///   `GetEtcdPodSpec` (the command, hostPath volumes, 100m/100Mi requests, and the
///   `kubeadm.kubernetes.io/etcd.advertise-client-urls` annotation). No container ports.
/// * The mirror pod: `pkg/kubelet/pod/mirror_client.go` `CreateMirrorPod` (the
///   `kubernetes.io/config.mirror` annotation, an ownerReference to the Node) and
///   `pkg/kubelet/config/common.go` (`config.hash`/`config.seen`/`config.source` annotations,
///   `spec.nodeName`, the `-<node>` name suffix, the toleration of every NoExecute taint).
/// * A host-network pod's IP is its node's IP: `status.podIP == status.hostIP`.
pub(crate) fn static_pod(id: &Identity, p: &PodState) -> Pod {
    let node = id.node_name(p.ordinal);
    // The manifest's hash: fixed for the pod's life (a restart does not change the manifest).
    let hash: String = p.uid.chars().filter(|c| *c != '-').collect();
    let annotations = BTreeMap::from([
        (
            "kubeadm.kubernetes.io/etcd.advertise-client-urls".to_string(),
            control_plane_client_url(&p.ip),
        ),
        ("kubernetes.io/config.hash".into(), hash.clone()),
        ("kubernetes.io/config.mirror".into(), hash),
        ("kubernetes.io/config.seen".into(), p.created.to_string()),
        ("kubernetes.io/config.source".into(), "file".into()),
    ]);
    let labels = BTreeMap::from([
        ("component".to_string(), "etcd".to_string()),
        ("tier".to_string(), "control-plane".to_string()),
    ]);
    let initial_cluster = format!("{node}=https://{}:{PEER_PORT}", p.ip);
    let host_path = |name: &str, path: &str| Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some("DirectoryOrCreate".into()),
        }),
        ..Default::default()
    };
    let quantity = |q: &str| Quantity(q.into());
    Pod {
        metadata: ObjectMeta {
            name: Some(p.name.clone()),
            namespace: Some(id.namespace.clone()),
            uid: Some(p.uid.clone()),
            resource_version: Some(p.resource_version.to_string()),
            creation_timestamp: Some(Time(p.created)),
            deletion_timestamp: p.deleting.map(Time),
            deletion_grace_period_seconds: p.deleting.map(|_| TERMINATION_GRACE_SECONDS),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.clone(),
                uid: id.node_uids.get(p.ordinal).cloned().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "etcd".into(),
                image: Some(ETCD_IMAGE.into()),
                command: Some(kubeadm_etcd_command(&node, &p.ip, &initial_cluster)),
                image_pull_policy: Some("IfNotPresent".into()),
                resources: Some(ResourceRequirements {
                    requests: Some(BTreeMap::from([
                        ("cpu".to_string(), quantity("100m")),
                        ("memory".to_string(), quantity("100Mi")),
                    ])),
                    ..Default::default()
                }),
                volume_mounts: Some(vec![
                    VolumeMount {
                        name: "etcd-data".into(),
                        mount_path: "/var/lib/etcd".into(),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: "etcd-certs".into(),
                        mount_path: "/etc/kubernetes/pki/etcd".into(),
                        ..Default::default()
                    },
                ]),
                termination_message_path: Some("/dev/termination-log".into()),
                termination_message_policy: Some("File".into()),
                ..Default::default()
            }],
            host_network: Some(true),
            node_name: Some(node),
            priority: Some(2_000_001_000),
            priority_class_name: Some("system-node-critical".into()),
            tolerations: Some(vec![Toleration {
                operator: Some("Exists".into()),
                effect: Some("NoExecute".into()),
                ..Default::default()
            }]),
            volumes: Some(vec![
                host_path("etcd-certs", "/etc/kubernetes/pki/etcd"),
                host_path("etcd-data", "/var/lib/etcd"),
            ]),
            restart_policy: Some("Always".into()),
            dns_policy: Some("ClusterFirst".into()),
            enable_service_links: Some(true),
            scheduler_name: Some("default-scheduler".into()),
            termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
            ..Default::default()
        }),
        status: Some(pod_status(p, &p.ip, "Burstable")),
    }
}

/// The StatefulSet that owns the pods.
pub(crate) fn statefulset(id: &Identity, st: StsStatus) -> StatefulSet {
    let replicas = st.replicas;
    let ready_replicas = st.ready;
    StatefulSet {
        metadata: ObjectMeta {
            name: Some(id.name.clone()),
            namespace: Some(id.namespace.clone()),
            uid: Some(id.statefulset_uid.clone()),
            resource_version: Some(st.rv.to_string()),
            generation: Some(st.generation),
            creation_timestamp: Some(Time(id.created)),
            labels: Some(id.selector_labels()),
            ..Default::default()
        },
        spec: Some(StatefulSetSpec {
            replicas: Some(st.spec_replicas),
            service_name: Some(id.name.clone()),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(id.selector_labels()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(id.selector_labels()),
                    ..Default::default()
                }),
                spec: Some(pod_spec(id, None)),
            },
            ..Default::default()
        }),
        status: Some(StatefulSetStatus {
            observed_generation: Some(st.generation),
            replicas,
            ready_replicas: Some(ready_replicas),
            available_replicas: Some(ready_replicas),
            current_replicas: Some(replicas),
            updated_replicas: Some(replicas),
            ..Default::default()
        }),
    }
}

/// The headless governing Service.
pub(crate) fn service(id: &Identity, rv: u64) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(id.name.clone()),
            namespace: Some(id.namespace.clone()),
            uid: Some(id.service_uid.clone()),
            resource_version: Some(rv.to_string()),
            creation_timestamp: Some(Time(id.created)),
            labels: Some(id.selector_labels()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            cluster_ips: Some(vec!["None".into()]),
            type_: Some("ClusterIP".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(id.selector_labels()),
            ports: Some(vec![
                ServicePort {
                    name: Some("client".into()),
                    port: i32::from(CLIENT_PORT),
                    target_port: Some(IntOrString::Int(i32::from(CLIENT_PORT))),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("peer".into()),
                    port: i32::from(PEER_PORT),
                    target_port: Some(IntOrString::Int(i32::from(PEER_PORT))),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    }
}

/// `{kind: <Kind>List, apiVersion, metadata: {resourceVersion}, items}`.
pub(crate) fn list(kind: &str, api_version: &str, rv: u64, items: Vec<Value>) -> Value {
    json!({
        "kind": format!("{kind}List"),
        "apiVersion": api_version,
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    })
}

/// Serialises a k8s-openapi resource, including its `apiVersion` and `kind`.
pub(crate) fn to_json<T: serde::Serialize>(obj: &T) -> Result<Value, serde_json::Error> {
    serde_json::to_value(obj)
}

/// The current time, truncated to whole seconds as `metav1.Time` serialises it.
pub(crate) fn now() -> Timestamp {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0);
    Timestamp::from_second(secs).unwrap_or(Timestamp::UNIX_EPOCH)
}
