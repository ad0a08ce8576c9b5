//! The Kubernetes objects the simulated cluster serves: the etcd StatefulSet,
//! its headless Service and one Pod per member.
//!
//! They are built with the `k8s-openapi` types and serialised with serde, so
//! the JSON on the wire is genuine Kubernetes JSON (field names, omitted
//! empties, RFC 3339 timestamps) rather than a hand-written approximation.
//! The shape mirrors what the StatefulSet controller and kubelet produce for
//! an etcd StatefulSet (labels `statefulset.kubernetes.io/pod-name`,
//! `apps.kubernetes.io/pod-index`, an ownerReference, Ready conditions).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetStatus};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStatus, Pod, PodCondition, PodIP, PodSpec, PodStatus, PodTemplateSpec, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, ObjectMeta, OwnerReference, Time,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use crate::store::StsStatus;
use crate::{random, SimError};

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
    pub name: String,
    pub statefulset_uid: String,
    pub service_uid: String,
    pub created: Timestamp,
}

impl Identity {
    /// `{app: <name>}`, the StatefulSet selector and Service selector.
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_string(), self.name.clone())])
    }

    /// `etcd-0`, `etcd-1`, ...
    pub fn pod_name(&self, ordinal: usize) -> String {
        format!("{}-{ordinal}", self.name)
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
    let container_id = format!("containerd://{}", &p.sandbox_id);
    let (state, last_state) = if p.ready {
        (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(p.transition)),
                }),
                ..Default::default()
            },
            None,
        )
    } else {
        // A killed etcd: the container terminated, as the kubelet reports a SIGKILL.
        (
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
            },
            None,
        )
    };
    let not_ready_reason = (!p.ready).then_some("ContainersNotReady");
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
        status: Some(PodStatus {
            phase: Some("Running".into()),
            host_ip: Some("10.0.0.4".into()),
            pod_ip: Some(p.ip.clone()),
            pod_ips: Some(vec![PodIP { ip: p.ip.clone() }]),
            start_time: Some(Time(p.created)),
            qos_class: Some("BestEffort".into()),
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
                last_state,
                ..Default::default()
            }]),
            ..Default::default()
        }),
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
