//! Member health, so the cluster endpoint stops sending work to a member that cannot answer.
//!
//! Two signals feed one state per member: passive (every forwarded request's transport
//! outcome) and active (a periodic `GET /health` over HTTP/1.1 and a gRPC `Status` over HTTP/2,
//! through the member's tunnels — which also keeps those tunnels from idling out). The
//! `Status` answers also say which member leads raft, so writes can go straight to it. A member falls
//! after [`HealthConfig::fall`] consecutive failures and rises after [`HealthConfig::rise`]
//! consecutive successes, so one blip does not flap it (pingora's `health_check.rs` thresholds).
//! A member that is down is probed with capped exponential backoff and jitter: each probe
//! re-opens its tunnel, which is how broken tunnels are re-established ahead of traffic.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Version};
use http_body_util::{BodyExt, Empty};
use tokio::sync::watch;

use super::Upstream;
use crate::member::EtcdPod;
use crate::protowire::{varint_value, Fields, LEN};

/// Health-check settings.
#[derive(Debug, Clone, Copy)]
pub struct HealthConfig {
    /// Probe interval for healthy members.
    pub interval: Duration,
    /// How long one probe may take.
    pub timeout: Duration,
    /// Consecutive failures that mark a member down.
    pub fall: u32,
    /// Consecutive successes that mark it up again.
    pub rise: u32,
    /// Longest wait between probes of a member that is down.
    pub max_backoff: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            fall: 2,
            rise: 2,
            max_backoff: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct State {
    up: bool,
    failures: u32,
    successes: u32,
}

impl Default for State {
    fn default() -> Self {
        Self {
            up: true,
            failures: 0,
            successes: 0,
        }
    }
}

/// The health of every member, shared by the router and the probes.
#[derive(Clone, Default)]
pub struct Health {
    states: Arc<Mutex<HashMap<String, State>>>,
    config: HealthConfig,
    leader: Arc<Mutex<Leader>>,
}

/// Whether `member` takes cluster traffic: unknown members do.
fn takes_traffic(states: &HashMap<String, State>, member: &str) -> bool {
    states.get(member).is_none_or(|s| s.up)
}

/// What the status probes taught us about raft leadership.
#[derive(Default)]
struct Leader {
    /// Member ID of each pod.
    ids: HashMap<String, u64>,
    /// The leader's member ID, as the last probe that answered saw it.
    leader: Option<u64>,
}

impl Health {
    /// Health tracking with `config`.
    pub fn new(config: HealthConfig) -> Self {
        Self {
            states: Arc::default(),
            config,
            leader: Arc::default(),
        }
    }

    /// Records a status probe: `pod` is member `member`, and `leader` leads (0: no leader).
    fn learn(&self, pod: &str, member: u64, leader: u64) {
        let mut l = self.leader.lock().unwrap_or_else(|p| p.into_inner());
        l.ids.insert(pod.to_owned(), member);
        let new = (leader != 0).then_some(leader);
        if l.leader != new {
            tracing::debug!(leader = ?new.map(|id| format!("{id:x}")), "raft leader changed");
            l.leader = new;
        }
    }

    /// [`Self::learn`], for other modules' tests.
    #[cfg(test)]
    pub(crate) fn learn_for_tests(&self, pod: &str, member: u64, leader: u64) {
        self.learn(pod, member, leader);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, State>> {
        self.states
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether `member` takes cluster traffic (unknown members do).
    pub fn is_up(&self, member: &str) -> bool {
        takes_traffic(&self.lock(), member)
    }

    /// [`Self::is_up`] for many members under one lock: bit `i` is set when the `i`-th name
    /// takes cluster traffic. Names past the mask's width (64) get no bit.
    pub fn up_mask<'a>(&self, names: impl Iterator<Item = &'a str>) -> u64 {
        let states = self.lock();
        names
            .take(u64::BITS as usize)
            .enumerate()
            .filter(|(_, name)| takes_traffic(&states, name))
            .fold(0, |mask, (i, _)| mask | 1 << i)
    }

    /// Where the leader's pod is among `names`, if the leader is known. Writes go there: a
    /// follower would forward them to the leader, one more hop. No copies: this runs on every
    /// request that prefers the leader.
    pub fn leader_position<'a>(&self, mut names: impl Iterator<Item = &'a str>) -> Option<usize> {
        let l = self.leader.lock().unwrap_or_else(|p| p.into_inner());
        let leader = l.leader?;
        let (pod, _) = l.ids.iter().find(|(_, id)| **id == leader)?;
        names.position(|name| name == pod)
    }

    /// Records one outcome; logs when the member changes state.
    pub fn record(&self, member: &str, ok: bool) {
        // Called on every forwarded request: no allocation unless the member is new.
        let mut states = self.lock();
        let first = !states.contains_key(member);
        if first {
            states.insert(member.to_owned(), State::default());
        }
        let Some(s) = states.get_mut(member) else {
            return;
        };
        let was_up = s.up;
        if ok {
            s.failures = 0;
            s.successes = s.successes.saturating_add(1);
            if !s.up && s.successes >= self.config.rise {
                s.up = true;
                tracing::info!(member, "member is healthy again");
            }
        } else {
            s.successes = 0;
            s.failures = s.failures.saturating_add(1);
            if s.up && s.failures >= self.config.fall {
                s.up = false;
                tracing::warn!(
                    member,
                    "member marked down; the cluster endpoint avoids it until it recovers"
                );
            }
        }
        if first || was_up != s.up {
            let labels = crate::metrics::MemberLabels {
                member: member.to_owned(),
            };
            crate::metrics::get()
                .member_up
                .get_or_create(&labels)
                .set(i64::from(s.up));
        }
    }

    /// Probes every known member forever: healthy ones each interval, down ones with backoff.
    /// Members in `legacy` (etcd 2.x) have no gRPC and get the HTTP check only.
    pub async fn run_probes(
        self,
        upstream: Upstream,
        pods: watch::Receiver<Arc<Vec<EtcdPod>>>,
        legacy: HashSet<String>,
    ) {
        // Dropping the set (when this task is aborted) aborts every member's probe loop.
        let mut set: tokio::task::JoinSet<()> = tokio::task::JoinSet::new();
        let mut tasks: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
        let mut pods = pods;
        loop {
            let current = pods.borrow_and_update().clone();
            tasks.retain(|name, task| {
                let keep = current.iter().any(|p| &p.name == name);
                if !keep {
                    task.abort();
                }
                keep
            });
            for pod in current.iter() {
                if !tasks.contains_key(&pod.name) {
                    let grpc = !legacy.contains(&pod.name);
                    let probe = set.spawn(self.clone().probe_member(
                        upstream.clone(),
                        pod.clone(),
                        grpc,
                    ));
                    tasks.insert(pod.name.clone(), probe);
                }
            }
            if pods.changed().await.is_err() {
                break;
            }
        }
    }

    async fn probe_member(self, upstream: Upstream, pod: EtcdPod, grpc: bool) {
        let mut backoff = self.config.interval;
        loop {
            let timeout = self.config.timeout;
            let ok = if grpc {
                let (http, ids) = tokio::join!(
                    probe_http(&upstream, &pod, timeout),
                    probe_grpc(&upstream, &pod, timeout)
                );
                if let Some((member, leader)) = ids {
                    self.learn(&pod.name, member, leader);
                }
                http && ids.is_some()
            } else {
                probe_http(&upstream, &pod, timeout).await
            };
            self.record(&pod.name, ok);
            backoff = if self.is_up(&pod.name) {
                self.config.interval
            } else {
                (backoff * 2).min(self.config.max_backoff)
            };
            tokio::time::sleep(jitter(backoff)).await;
        }
    }
}

/// ±20 % so that probes of many members do not line up.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.8 + fastrand::f64() * 0.4)
}

/// `GET /health` through the member's tunnel: up if etcd answers `"health":"true"`.
async fn probe_http(upstream: &Upstream, pod: &EtcdPod, timeout: Duration) -> bool {
    let authority = format!("{}:{}", pod.name, pod.port);
    let req = Request::builder()
        .uri(format!("http://{authority}/health"))
        .header(header::HOST, authority.as_str())
        .version(Version::HTTP_11)
        .body(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        );
    let Ok(req) = req else { return false };
    let attempt = async {
        let resp = upstream.send(req).await.ok()?;
        let status = resp.status();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some(status.is_success() && body.windows(15).any(|w| w == b"\"health\":\"true\""))
    };
    let ok = matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)));
    if !ok {
        tracing::debug!(member = %pod.name, "HTTP health probe failed");
    }
    ok
}

/// `etcdserverpb.Maintenance/Status` over the member's HTTP/2 connection (the one client gRPC
/// traffic uses): the member's ID and the raft leader's, if it answered with grpc-status 0.
async fn probe_grpc(upstream: &Upstream, pod: &EtcdPod, timeout: Duration) -> Option<(u64, u64)> {
    let req = super::grpc_call(&pod.name, pod.port, "/etcdserverpb.Maintenance/Status")?;
    let attempt = async {
        let resp = upstream.send(req).await.ok()?;
        let in_headers = resp.headers().get("grpc-status").cloned();
        let collected = resp.into_body().collect().await.ok()?;
        let status = in_headers.or_else(|| {
            collected
                .trailers()
                .and_then(|t| t.get("grpc-status").cloned())
        });
        if status.is_none_or(|s| s != "0") {
            return None;
        }
        status_ids(&collected.to_bytes())
    };
    let ids = tokio::time::timeout(timeout, attempt).await.ok().flatten();
    if ids.is_none() {
        tracing::debug!(member = %pod.name, "gRPC status probe failed");
    }
    ids
}

/// `(header.member_id, leader)` of a framed `StatusResponse` (`rpc.proto`: header = 1 with
/// member_id = 2; leader = 4; `docs/etcd-protocols.md` §1.2).
fn status_ids(body: &[u8]) -> Option<(u64, u64)> {
    let msg = crate::grpc::Prefix::single_message(body)?;
    let (mut member, mut leader) = (0, 0);
    for field in Fields::new(msg) {
        let field = field.ok()?;
        match (field.number, field.wire_type) {
            (1, LEN) => {
                for f in Fields::new(field.payload) {
                    let f = f.ok()?;
                    if (f.number, f.wire_type) == (2, 0) {
                        member = varint_value(f.raw).ok()?;
                    }
                }
            }
            (4, 0) => leader = varint_value(field.raw).ok()?,
            _ => {}
        }
    }
    Some((member, leader))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_stop_one_blip_from_flapping() {
        let h = Health::new(HealthConfig::default());
        assert!(h.is_up("a"), "unknown members take traffic");
        h.record("a", false);
        assert!(h.is_up("a"), "one failure is a blip");
        h.record("a", false);
        assert!(!h.is_up("a"));
        h.record("a", true);
        assert!(!h.is_up("a"), "one success is not enough to rise");
        h.record("a", false);
        h.record("a", true);
        h.record("a", true);
        assert!(h.is_up("a"));
        assert!(h.is_up("b"), "members are independent");
    }

    #[test]
    fn the_leader_is_learned_from_status_answers() {
        let h = Health::new(HealthConfig::default());
        let pods = || ["etcd-0", "etcd-1", "etcd-2"].into_iter();
        assert_eq!(h.leader_position(pods()), None);
        h.learn("etcd-0", 10, 11);
        assert_eq!(
            h.leader_position(pods()),
            None,
            "leader 11 not mapped to a pod yet"
        );
        h.learn("etcd-1", 11, 11);
        assert_eq!(h.leader_position(pods()), Some(1));
        assert_eq!(
            h.leader_position(["etcd-0"].into_iter()),
            None,
            "the leader's pod is not among these"
        );
        h.learn("etcd-0", 10, 0);
        assert_eq!(
            h.leader_position(pods()),
            None,
            "no leader during an election"
        );
    }

    #[test]
    fn status_response_ids() {
        use crate::protowire::{put_len_field, put_varint_field};
        let mut header = Vec::new();
        put_varint_field(&mut header, 1, 99);
        put_varint_field(&mut header, 2, 0xb71f);
        let mut msg = Vec::new();
        put_len_field(&mut msg, 1, &header);
        put_len_field(&mut msg, 2, b"3.4.23");
        put_varint_field(&mut msg, 4, 0xabc);
        let mut body = vec![0];
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(&msg);
        assert_eq!(status_ids(&body), Some((0xb71f, 0xabc)));
        assert_eq!(status_ids(&body[..8]), None);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
        }
    }
}
