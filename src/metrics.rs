//! Prometheus metrics, served on the optional admin listener (`--admin`): requests by route
//! and member, errors, tunnels opened and open, upstream latency, member health.
//!
//! One process-wide registry (as Prometheus clients usually have): every module records into
//! it without threading a handle through its constructors.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a forwarded request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `grpc` or `http`.
    pub class: &'static str,
    /// The member that served it.
    pub member: String,
}

/// Labels of a member.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    /// The member (pod) name.
    pub member: String,
}

/// Every metric etcd-proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Requests forwarded, by class and member.
    pub requests: Family<RequestLabels, Counter>,
    /// Forwarding attempts that failed at the transport level, by class and member.
    pub upstream_errors: Family<RequestLabels, Counter>,
    /// Time to upstream response headers, by class and member.
    pub upstream_latency: Family<RequestLabels, Histogram>,
    /// Tunnels opened since start.
    pub tunnels_opened: Counter,
    /// Tunnels open now.
    pub tunnels_open: Gauge<i64, std::sync::atomic::AtomicI64>,
    /// 1 if a member is healthy, 0 if marked down.
    pub member_up: Family<MemberLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    /// Watch streams resumed after losing their upstream.
    pub watch_resumes: Counter<u64, AtomicU64>,
}

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("etcd_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        let upstream_errors = Family::<RequestLabels, Counter>::default();
        let upstream_latency = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let tunnels_opened = Counter::default();
        let tunnels_open = Gauge::default();
        let member_up = Family::default();
        let watch_resumes = Counter::default();
        registry.register("requests", "Requests forwarded to etcd", requests.clone());
        registry.register(
            "upstream_errors",
            "Forwarding attempts that failed in transport",
            upstream_errors.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time until etcd's response headers",
            upstream_latency.clone(),
        );
        registry.register(
            "tunnels_opened",
            "Port-forward tunnels opened",
            tunnels_opened.clone(),
        );
        registry.register(
            "tunnels_open",
            "Port-forward tunnels open now",
            tunnels_open.clone(),
        );
        registry.register("member_up", "1 if the member is healthy", member_up.clone());
        registry.register(
            "watch_resumes",
            "Watch streams resumed on a new upstream",
            watch_resumes.clone(),
        );
        Self {
            registry,
            requests,
            upstream_errors,
            upstream_latency,
            tunnels_opened,
            tunnels_open,
            member_up,
            watch_resumes,
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_prometheus_text() {
        let m = get();
        m.requests
            .get_or_create(&RequestLabels {
                class: "grpc",
                member: "etcd-0".into(),
            })
            .inc();
        m.member_up
            .get_or_create(&MemberLabels {
                member: "etcd-0".into(),
            })
            .set(1);
        let text = m.encode();
        assert!(
            text.contains("etcd_proxy_requests_total{class=\"grpc\",member=\"etcd-0\"}"),
            "{text}"
        );
        assert!(
            text.contains("etcd_proxy_member_up{member=\"etcd-0\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
