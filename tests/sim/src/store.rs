//! The object store: pod state, the global resourceVersion and the watch history.
//!
//! Like etcd under a real apiserver, every change bumps one cluster-wide,
//! monotonically increasing resourceVersion (served as a decimal string) and
//! is appended to a bounded event history, the simulator's "watch cache".
//! Watches resume from that history; a resourceVersion older than the oldest
//! kept event is answered with 410 Expired, which is what makes
//! kube-runtime's watcher relist.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::broadcast;

use crate::objects::{self, Identity, PodState};

/// How many events the history keeps (the apiserver's default watch cache
/// size was 100 before it became dynamic).
const HISTORY: usize = 100;

/// The first resourceVersion handed out. Starting above 1 mimics a cluster
/// with some past, so a client asking for resourceVersion "1" really is too old.
const FIRST_RV: u64 = 1000;

/// What the StatefulSet object reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StsStatus {
    pub spec_replicas: i32,
    pub generation: i64,
    pub replicas: i32,
    pub ready: i32,
    pub rv: u64,
}

/// The pods' network: which /16 their IPs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PodCidr {
    /// The first two octets.
    prefix: [u8; 2],
}

impl PodCidr {
    /// 10.244.0.0/16, a typical pod CIDR: nothing on this machine answers there, as a
    /// laptop cannot reach pod IPs.
    pub const UNROUTABLE: PodCidr = PodCidr { prefix: [10, 244] };

    /// 10.0.0.0/16, the control-plane nodes' network in the control-plane layout: as
    /// unreachable from here as a real cluster's node IPs are from a laptop.
    pub const NODES: PodCidr = PodCidr { prefix: [10, 0] };

    /// Whether addresses in it answer on this machine (a loopback network).
    pub fn reachable(self) -> bool {
        self.prefix[0] == 127
    }

    /// 127.`second`.0.0/16, inside loopback: every address answers on this machine, so the
    /// members can listen on their pod IPs for `--direct`.
    pub fn loopback(second: u8) -> PodCidr {
        PodCidr {
            prefix: [127, second],
        }
    }

    /// The `n`-th address.
    pub fn ip(self, n: u32) -> String {
        let n = n % (1 << 16);
        let [a, b] = self.prefix;
        format!("{a}.{b}.{}.{}", n >> 8, n & 0xff)
    }
}

/// A watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One stored pod event.
#[derive(Debug, Clone)]
pub(crate) struct PodEvent {
    pub rv: u64,
    pub kind: EventType,
    pub pod: Pod,
}

struct Inner {
    rv: u64,
    /// resourceVersion of the StatefulSet (bumped when readyReplicas changes).
    sts_rv: u64,
    /// The StatefulSet's `spec.replicas` and `metadata.generation` (bumped by a scale).
    sts_replicas: usize,
    sts_generation: i64,
    /// The pods' network.
    cidr: PodCidr,
    /// Index of the next pod IP handed out (see [`PodCidr::ip`]).
    next_ip: u32,
    /// resourceVersion of the Service (set once).
    svc_rv: u64,
    pods: Vec<PodState>,
    history: VecDeque<PodEvent>,
}

/// Shared, thread-safe store.
pub(crate) struct Store {
    pub id: Identity,
    inner: Mutex<Inner>,
    events: broadcast::Sender<PodEvent>,
}

/// What a new watch starts from: events to replay and a live receiver, taken atomically.
pub(crate) enum WatchStart {
    /// Replay these, then follow the receiver (skipping rv <= last replayed).
    Events(Vec<PodEvent>, broadcast::Receiver<PodEvent>, u64),
    /// The requested resourceVersion is older than the history: 410.
    Expired {
        requested: u64,
        oldest_minus_one: u64,
    },
}

impl Store {
    /// A store holding the given pods (each recorded as an ADDED event).
    pub fn new(id: Identity, mut pods: Vec<PodState>, cidr: PodCidr, next_ip: u32) -> Self {
        let (events, _) = broadcast::channel(1024);
        let mut rv = FIRST_RV;
        rv += 1;
        let svc_rv = rv;
        let mut history = VecDeque::new();
        for p in &mut pods {
            rv += 1;
            p.resource_version = rv;
            history.push_back(PodEvent {
                rv,
                kind: EventType::Added,
                pod: objects::pod(&id, p),
            });
        }
        rv += 1;
        let sts_rv = rv;
        Store {
            id,
            inner: Mutex::new(Inner {
                rv,
                sts_rv,
                sts_replicas: pods.len(),
                sts_generation: 1,
                cidr,
                next_ip,
                svc_rv,
                pods,
                history,
            }),
            events,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// All pods as objects, with the list's resourceVersion.
    pub fn pods(&self) -> (Vec<Pod>, u64) {
        let inner = self.lock();
        let pods = inner
            .pods
            .iter()
            .map(|p| objects::pod(&self.id, p))
            .collect();
        (pods, inner.rv)
    }

    /// A snapshot of one pod's state.
    pub fn pod_state(&self, name: &str) -> Option<PodState> {
        self.lock().pods.iter().find(|p| p.name == name).cloned()
    }

    /// Pod names in ordinal order.
    pub fn pod_names(&self) -> Vec<String> {
        self.lock().pods.iter().map(|p| p.name.clone()).collect()
    }

    /// What the StatefulSet object shows: spec, generation and status counts.
    pub fn statefulset_status(&self) -> StsStatus {
        let inner = self.lock();
        let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
        StsStatus {
            spec_replicas: count(inner.sts_replicas),
            generation: inner.sts_generation,
            replicas: count(inner.pods.len()),
            ready: count(inner.pods.iter().filter(|p| p.ready).count()),
            rv: inner.sts_rv,
        }
    }

    /// A user scaled the StatefulSet: `spec.replicas` changes and the
    /// generation goes up (an update of the spec).
    pub fn set_spec_replicas(&self, replicas: usize) {
        let mut inner = self.lock();
        if inner.sts_replicas == replicas {
            return;
        }
        inner.sts_replicas = replicas;
        inner.sts_generation += 1;
        inner.rv += 1;
        inner.sts_rv = inner.rv;
    }

    /// A fresh pod IP. Every pod sandbox gets a new address from the node's
    /// pod CIDR; addresses are not reused while the simulator runs, so a changed IP is always
    /// visible.
    pub fn alloc_ip(&self) -> String {
        let mut inner = self.lock();
        let n = inner.next_ip;
        inner.next_ip = inner.next_ip.wrapping_add(1);
        inner.cidr.ip(n)
    }

    /// The pods' network.
    pub fn cidr(&self) -> PodCidr {
        self.lock().cidr
    }

    /// The Service's resourceVersion.
    pub fn service_rv(&self) -> u64 {
        self.lock().svc_rv
    }

    /// Flips a pod's readiness (a no-op if unchanged); returns false for an unknown pod.
    /// `restarted` also bumps the container restart count.
    pub fn set_ready(&self, name: &str, ready: bool, restarted: bool) -> bool {
        self.update_pod(name, |p| {
            if p.ready == ready {
                return false;
            }
            p.ready = ready;
            p.transition = objects::now();
            if restarted {
                p.restart_count += 1;
            }
            true
        })
    }

    /// Applies `change` to the named pod; if it reports a change, records a
    /// MODIFIED event. Returns false for an unknown pod.
    pub fn update_pod(&self, name: &str, change: impl FnOnce(&mut PodState) -> bool) -> bool {
        let mut inner = self.lock();
        let Some(idx) = inner.pods.iter().position(|p| p.name == name) else {
            return false;
        };
        if !change(&mut inner.pods[idx]) {
            return true;
        }
        inner.rv += 1;
        let rv = inner.rv;
        inner.pods[idx].resource_version = rv;
        let pod = objects::pod(&self.id, &inner.pods[idx]);
        self.record(&mut inner, EventType::Modified, pod);
        true
    }

    /// Creates a pod (an ADDED event); the StatefulSet status follows.
    pub fn add_pod(&self, mut state: PodState) {
        let mut inner = self.lock();
        inner.rv += 1;
        state.resource_version = inner.rv;
        let pod = objects::pod(&self.id, &state);
        let at = inner
            .pods
            .iter()
            .position(|p| p.ordinal > state.ordinal)
            .unwrap_or(inner.pods.len());
        inner.pods.insert(at, state);
        self.record(&mut inner, EventType::Added, pod);
    }

    /// Removes a pod for good (a DELETED event). As with etcd under the
    /// apiserver, the DELETED object is the last state carrying the
    /// resourceVersion of the deletion (`storage/etcd3/watcher.go`).
    pub fn remove_pod(&self, name: &str) -> bool {
        let mut inner = self.lock();
        let Some(idx) = inner.pods.iter().position(|p| p.name == name) else {
            return false;
        };
        let mut state = inner.pods.remove(idx);
        inner.rv += 1;
        state.resource_version = inner.rv;
        let pod = objects::pod(&self.id, &state);
        self.record(&mut inner, EventType::Deleted, pod);
        true
    }

    /// Appends an event at the current resourceVersion, then the
    /// StatefulSet controller's status update (another write).
    fn record(&self, inner: &mut Inner, kind: EventType, pod: Pod) {
        let event = PodEvent {
            rv: inner.rv,
            kind,
            pod,
        };
        inner.history.push_back(event.clone());
        while inner.history.len() > HISTORY {
            inner.history.pop_front();
        }
        inner.rv += 1;
        inner.sts_rv = inner.rv;
        // Sent under the lock so watchers see events in resourceVersion order.
        let _ = self.events.send(event);
    }

    /// Where a watch from `since` starts. `None` means "" / "0": synthetic ADDED
    /// events for the current state, then changes.
    pub fn watch_from(&self, since: Option<u64>) -> WatchStart {
        let inner = self.lock();
        let rx = self.events.subscribe();
        match since {
            None => {
                let events = inner
                    .pods
                    .iter()
                    .map(|p| PodEvent {
                        rv: p.resource_version,
                        kind: EventType::Added,
                        pod: objects::pod(&self.id, p),
                    })
                    .collect();
                WatchStart::Events(events, rx, inner.rv)
            }
            Some(since) => {
                let oldest = inner.history.front().map_or(inner.rv + 1, |e| e.rv);
                if since < oldest.saturating_sub(1) {
                    return WatchStart::Expired {
                        requested: since,
                        oldest_minus_one: oldest - 1,
                    };
                }
                let events = inner
                    .history
                    .iter()
                    .filter(|e| e.rv > since)
                    .cloned()
                    .collect();
                WatchStart::Events(events, rx, since.max(inner.rv))
            }
        }
    }
}
