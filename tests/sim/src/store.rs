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

/// A watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
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
    pub fn new(id: Identity, mut pods: Vec<PodState>) -> Self {
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

    /// Number of Ready pods and the StatefulSet's resourceVersion.
    pub fn statefulset_status(&self) -> (i32, u64) {
        let inner = self.lock();
        let ready = inner.pods.iter().filter(|p| p.ready).count();
        (i32::try_from(ready).unwrap_or(i32::MAX), inner.sts_rv)
    }

    /// The Service's resourceVersion.
    pub fn service_rv(&self) -> u64 {
        self.lock().svc_rv
    }

    /// Flips a pod's readiness (a no-op if unchanged); returns false for an unknown pod.
    /// `restarted` also bumps the container restart count.
    pub fn set_ready(&self, name: &str, ready: bool, restarted: bool) -> bool {
        let mut inner = self.lock();
        let Some(idx) = inner.pods.iter().position(|p| p.name == name) else {
            return false;
        };
        if inner.pods[idx].ready == ready {
            return true;
        }
        inner.rv += 1;
        let rv = inner.rv;
        let pod = {
            let p = &mut inner.pods[idx];
            p.ready = ready;
            p.transition = objects::now();
            if restarted {
                p.restart_count += 1;
            }
            p.resource_version = rv;
            objects::pod(&self.id, p)
        };
        let event = PodEvent {
            rv,
            kind: EventType::Modified,
            pod,
        };
        inner.history.push_back(event.clone());
        while inner.history.len() > HISTORY {
            inner.history.pop_front();
        }
        // The StatefulSet controller then updates readyReplicas: another write.
        inner.rv += 1;
        inner.sts_rv = inner.rv;
        // Sent under the lock so watchers see events in resourceVersion order.
        let _ = self.events.send(event);
        true
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
