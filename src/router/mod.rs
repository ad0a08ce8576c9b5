//! Which etcd protocol a request speaks, which response rewrite it needs, and which member
//! serves it.
//!
//! Classification follows etcd's own client-port multiplexer (`docs/etcd-protocols.md` §2):
//! HTTP/2 with a gRPC content type is gRPC; everything else is HTTP and goes upstream as
//! HTTP/1.1.
//! The cluster endpoint sends writes and linearizable reads to the raft leader when it is
//! known and healthy ([`leader`]), spreads everything else round-robin over the ready, healthy
//! members (as clientv3's balancer does per RPC), and skips members a failed attempt already
//! tried; a member endpoint is pinned to its pod.

pub mod leader;
pub mod replay;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{header, Method, Request, Version};
use tokio::sync::watch;

use crate::member::EtcdPod;
use crate::rewrite::{gateway, grpc::ClusterMethod, v2::V2Route};
use crate::upstream::health::Health;
pub use leader::Reads;
pub use replay::Replay;

/// The protocol class of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// gRPC: forwarded as HTTP/2 over h2c.
    Grpc,
    /// Anything else: forwarded as HTTP/1.1.
    Http,
}

/// The rewrite a response needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrite {
    /// A gRPC `Cluster/Member*` response.
    Grpc(ClusterMethod),
    /// A v2 members/leader/machines response.
    V2(V2Route),
    /// A JSON gateway `cluster/member/*` response.
    Gateway,
}

/// The route of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// How it goes upstream.
    pub class: Class,
    /// The rewrite its response needs, if any; other responses stream through untouched.
    pub rewrite: Option<Rewrite>,
    /// Whether a failed attempt may be repeated on another member.
    pub replay: Replay,
}

/// Classifies a request.
pub fn classify<B>(req: &Request<B>) -> Route {
    let path = req.uri().path();
    let is_grpc = req.version() == Version::HTTP_2
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
    if is_grpc {
        let rewrite = ClusterMethod::from_path(path).map(Rewrite::Grpc);
        return Route {
            class: Class::Grpc,
            rewrite,
            replay: replay::grpc(path),
        };
    }
    let rewrite = match (req.method(), V2Route::from_path(path)) {
        (&Method::GET, Some(r)) => Some(Rewrite::V2(r)),
        _ if req.method() == Method::POST && gateway::is_member_path(path) => {
            Some(Rewrite::Gateway)
        }
        _ => None,
    };
    Route {
        class: Class::Http,
        rewrite,
        replay: replay::http(req),
    }
}

/// Chooses the member for a request.
#[derive(Clone)]
pub struct Backends {
    pods: watch::Receiver<Arc<Vec<EtcdPod>>>,
    health: Health,
    next: Arc<AtomicUsize>,
    reads: Reads,
}

/// No member can take the request.
#[derive(Debug, thiserror::Error)]
pub enum PickError {
    /// The cluster has no ready member.
    #[error("no ready etcd member (pods: {0})")]
    NoneReady(String),
    /// The pinned member's pod is gone.
    #[error("member pod {0} no longer exists")]
    Gone(String),
}

impl Backends {
    /// Backends over the pod set discovery publishes, avoiding members `health` marks down
    /// and sending linearizable reads where `reads` says.
    pub fn new(pods: watch::Receiver<Arc<Vec<EtcdPod>>>, health: Health, reads: Reads) -> Self {
        Self {
            pods,
            health,
            next: Arc::new(AtomicUsize::new(0)),
            reads,
        }
    }

    /// Where linearizable reads go.
    pub fn reads(&self) -> Reads {
        self.reads
    }

    /// How many members are ready.
    pub fn ready_count(&self) -> usize {
        self.pods.borrow().iter().filter(|p| p.ready).count()
    }

    /// The pod for a request: the pinned one, or the next ready one round-robin, preferring
    /// healthy members and skipping those in `tried`. If every candidate is marked down, the
    /// ready ones are tried anyway: a wrong health verdict must not stop all traffic.
    ///
    /// With `leader_first`, the raft leader is chosen when it is among the best candidates:
    /// a write sent to a follower costs one more hop inside the cluster.
    ///
    /// This runs for every request, so it allocates nothing: candidate sets are bit masks
    /// over the first [`MAX_MEMBERS`] pods, and the result points into the pod snapshot.
    pub fn pick(
        &self,
        pinned: Option<&str>,
        tried: &[String],
        leader_first: bool,
    ) -> Result<Picked, PickError> {
        let pods = self.pods.borrow().clone();
        if let Some(name) = pinned {
            return match pods.iter().position(|p| p.name == name) {
                Some(index) => Ok(Picked { pods, index }),
                None => Err(PickError::Gone(name.to_owned())),
            };
        }
        let (mut ready, mut fresh) = (0u64, 0u64);
        for (i, p) in pods.iter().enumerate().take(MAX_MEMBERS) {
            ready |= u64::from(p.ready) << i;
            fresh |= u64::from(!tried.contains(&p.name)) << i;
        }
        let names = || pods.iter().map(|p| p.name.as_str());
        let up = self.health.up_mask(names());
        // Preference: untried and healthy, untried, healthy, any ready member. A member tried
        // before is retried on a new connection (the failed one is gone from the pool).
        let candidates = [ready & fresh & up, ready & fresh, ready & up, ready]
            .into_iter()
            .find(|m| *m != 0)
            .unwrap_or(0);
        if candidates == 0 {
            let names = pods
                .iter()
                .map(|p| format!("{} not ready", p.name))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(PickError::NoneReady(if names.is_empty() {
                "none".into()
            } else {
                names
            }));
        }
        if leader_first {
            if let Some(index) = self.health.leader_position(names()) {
                if index < MAX_MEMBERS && candidates & (1 << index) != 0 {
                    return Ok(Picked { pods, index });
                }
            }
        }
        let nth = self.next.fetch_add(1, Ordering::Relaxed) % candidates.count_ones() as usize;
        let mut rest = candidates;
        for _ in 0..nth {
            rest &= rest - 1;
        }
        let index = rest.trailing_zeros() as usize;
        Ok(Picked { pods, index })
    }
}

/// Pods past this many are never picked: candidate sets are `u64` masks. etcd clusters have
/// 3, 5 or 7 members (etcd's FAQ advises against more), so this is no limit in practice.
pub const MAX_MEMBERS: usize = u64::BITS as usize;

/// The member chosen for one request: a view into the pod snapshot it was chosen from.
#[derive(Debug)]
pub struct Picked {
    pods: Arc<Vec<EtcdPod>>,
    index: usize,
}

impl std::ops::Deref for Picked {
    type Target = EtcdPod;

    fn deref(&self) -> &EtcdPod {
        &self.pods[self.index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn req(version: Version, method: Method, path: &str, ct: &str) -> Request<()> {
        Request::builder()
            .version(version)
            .method(method)
            .uri(path)
            .header("content-type", ct)
            .body(())
            .unwrap()
    }

    #[test]
    fn classifies_like_etcds_cmux() {
        let r = classify(&req(
            Version::HTTP_2,
            Method::POST,
            "/etcdserverpb.KV/Range",
            "application/grpc",
        ));
        assert_eq!(
            r,
            Route {
                class: Class::Grpc,
                rewrite: None,
                replay: Replay::Always
            }
        );
        let r = classify(&req(
            Version::HTTP_2,
            Method::POST,
            "/etcdserverpb.Cluster/MemberList",
            "application/grpc+proto",
        ));
        assert_eq!(r.rewrite, Some(Rewrite::Grpc(ClusterMethod::List)));
        let r = classify(&req(Version::HTTP_2, Method::GET, "/health", "text/plain"));
        assert_eq!(
            r.class,
            Class::Http,
            "h2 non-gRPC goes upstream as HTTP/1.1"
        );
        let r = classify(&req(Version::HTTP_11, Method::GET, "/v2/machines", ""));
        assert_eq!(r.rewrite, Some(Rewrite::V2(V2Route::Machines)));
        let r = classify(&req(Version::HTTP_11, Method::PUT, "/v2/members", ""));
        assert_eq!(r.rewrite, None, "member writes are not rewritten");
        let r = classify(&req(
            Version::HTTP_11,
            Method::POST,
            "/v3/cluster/member/list",
            "application/json",
        ));
        assert_eq!(r.rewrite, Some(Rewrite::Gateway));
    }

    fn pod(name: &str, ready: bool) -> EtcdPod {
        EtcdPod {
            name: name.into(),
            ip: None,
            ready,
            port: 2379,
            dns_name: None,
        }
    }

    #[test]
    fn round_robin_over_ready_pods_and_pinning() {
        let pods = vec![pod("a", true), pod("b", false), pod("c", true)];
        let (_tx, rx) = watch::channel(Arc::new(pods));
        let b = Backends::new(rx, Health::default(), Reads::Leader);
        let picks: Vec<String> = (0..4)
            .map(|_| b.pick(None, &[], false).unwrap().name.clone())
            .collect();
        assert_eq!(picks, ["a", "c", "a", "c"]);
        assert_eq!(b.pick(Some("b"), &[], false).unwrap().name, "b");
        assert!(matches!(
            b.pick(Some("z"), &[], false),
            Err(PickError::Gone(_))
        ));
        let (_tx, rx) = watch::channel(Arc::new(vec![pod("a", false)]));
        let err = Backends::new(rx, Health::default(), Reads::Leader)
            .pick(None, &[], false)
            .unwrap_err();
        assert!(err.to_string().contains("a not ready"), "{err}");
    }

    #[test]
    fn writes_go_to_the_leader_when_it_is_a_good_candidate() {
        let pods = vec![pod("a", true), pod("b", true), pod("c", true)];
        let (_tx, rx) = watch::channel(Arc::new(pods));
        let health = Health::default();
        let b = Backends::new(rx, health.clone(), Reads::Leader);
        health.record("b", true);
        assert!(health
            .leader_position(["a", "b", "c"].into_iter())
            .is_none());
        assert_ne!(
            b.pick(None, &[], true).unwrap().name,
            "",
            "no leader known: round-robin"
        );
        health.learn_for_tests("b", 2, 2);
        for _ in 0..4 {
            assert_eq!(b.pick(None, &[], true).unwrap().name, "b");
        }
        assert_ne!(
            b.pick(None, &["b".into()], true).unwrap().name,
            "b",
            "a failed leader is skipped"
        );
        let reads: Vec<String> = (0..3)
            .map(|_| b.pick(None, &[], false).unwrap().name.clone())
            .collect();
        assert!(
            reads.iter().any(|n| n != "b"),
            "reads still spread: {reads:?}"
        );
    }

    #[test]
    fn round_robin_covers_every_member_up_to_the_mask_width() {
        let pods: Vec<EtcdPod> = (0..MAX_MEMBERS + 3)
            .map(|i| pod(&format!("p{i}"), true))
            .collect();
        let (_tx, rx) = watch::channel(Arc::new(pods));
        let b = Backends::new(rx, Health::default(), Reads::Leader);
        let picked: BTreeSet<String> = (0..2 * MAX_MEMBERS)
            .map(|_| b.pick(None, &[], false).unwrap().name.clone())
            .collect();
        assert_eq!(picked.len(), MAX_MEMBERS);
        assert!(!picked.contains(&format!("p{MAX_MEMBERS}")));
        // A pinned member is found whatever its position.
        let last = format!("p{}", MAX_MEMBERS + 2);
        assert_eq!(b.pick(Some(&last), &[], false).unwrap().name, last);
    }

    #[test]
    fn unhealthy_and_tried_members_are_skipped() {
        let pods = vec![pod("a", true), pod("b", true), pod("c", true)];
        let (_tx, rx) = watch::channel(Arc::new(pods));
        let health = Health::default();
        health.record("b", false);
        health.record("b", false);
        let b = Backends::new(rx, health.clone(), Reads::Leader);
        for _ in 0..6 {
            assert_ne!(b.pick(None, &[], false).unwrap().name, "b");
        }
        assert_eq!(b.pick(None, &["a".into()], false).unwrap().name, "c");
        // Only the down member is untried: try it rather than fail.
        assert_eq!(
            b.pick(None, &["a".into(), "c".into()], false).unwrap().name,
            "b"
        );
        // Everything was tried: healthy members again, on new connections.
        let all: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert_ne!(b.pick(None, &all, false).unwrap().name, "b");
    }
}
