//! Silent faults on the tunnels, over WebSocket and SPDY: an upgrade the API server never
//! answers, a connection black-holed right after its upgrade, and every established tunnel
//! dropped without FIN or RST; and the container runtime's 1 s wait before it closes the
//! tunnels of a pod whose side ended. For each, the member is counted down while the others
//! keep serving without delay, and the proxy recovers within a bound made of its own
//! timeouts.
//!
//! The proxy runs with short timeouts so that the bounds are seconds: [`DIAL`],
//! [`KEEPALIVE`], [`KEEPALIVE_TIMEOUT`]. Each bound is the sum of the timeouts that the
//! recovery path waits out, plus [`MARGIN`] for the rest (a tunnel, a health check, the
//! jitter of the checks, a loaded CI machine).

use std::time::{Duration, Instant};

use etcd_client::Client;
use etcd_proxy_sim::{PortForwardFault, SimCluster};

use crate::support::{cluster, start_proxy, within, within_for, Proxy, START_DEADLINE};

/// `--dial-timeout`.
const DIAL: Duration = Duration::from_secs(2);
/// `--keepalive`: health checks (and SPDY pings) this often.
const KEEPALIVE: Duration = Duration::from_millis(500);
/// `--keepalive-timeout`.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 connections with open streams are pinged at most this often (etcd's
/// `--grpc-keepalive-min-time`; `upstream/mod.rs` `ETCD_MIN_PING_INTERVAL`).
const H2_PING_FLOOR: Duration = Duration::from_secs(5);
/// Slack on top of each bound.
const MARGIN: Duration = Duration::from_secs(3);
/// How long a request to a healthy member may take while another member is failing: an
/// unloaded local round trip takes milliseconds; this only has to stay well below every
/// timeout the failing member makes the proxy wait out.
const PROMPT: Duration = Duration::from_millis(1500);

fn flag(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The proxy over `protocol`, with the short timeouts, and its admin address.
async fn proxy(sim: &SimCluster, protocol: &str) -> (Proxy, String) {
    let (dial, keepalive, timeout) = (flag(DIAL), flag(KEEPALIVE), flag(KEEPALIVE_TIMEOUT));
    let mut proxy = start_proxy(
        sim,
        &[
            "--portforward",
            protocol,
            "--dial-timeout",
            &dial,
            "--keepalive",
            &keepalive,
            "--keepalive-timeout",
            &timeout,
            "--admin",
            "127.0.0.1:0",
        ],
    )
    .await;
    let line = within("the admin line", proxy.stdout.next_line())
        .await
        .expect("stdout")
        .expect("admin line");
    let admin = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .expect("admin address")
        .to_owned();
    (proxy, admin)
}

/// `etcd_proxy_member_up` for `member` (`None` before the member's first outcome).
async fn member_up(admin: &str, member: &str) -> Option<bool> {
    let metrics = crate::clients::http1(admin, "GET", "/metrics", "").await;
    let prefix = format!("etcd_proxy_member_up{{member=\"{member}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim() == "1")
}

/// Waits until `member` is reported `up` (or down), checking `others` meanwhile; returns
/// how long it took. Fails past `bound`.
async fn until_reported(
    admin: &str,
    member: &str,
    up: bool,
    bound: Duration,
    others: &mut Others,
) -> Duration {
    let start = Instant::now();
    loop {
        if member_up(admin, member).await == Some(up) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "{member} not reported {} within {bound:?}",
            if up { "up" } else { "down" }
        );
        others.check().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The healthy members: the cluster endpoint and their own endpoints must answer
/// [`PROMPT`]ly whatever the failing member does.
struct Others {
    cluster: Client,
    members: Vec<(String, Client)>,
    checks: usize,
}

impl Others {
    async fn new(proxy: &Proxy, victim: &str) -> Self {
        let cluster = within(
            "Client::connect",
            Client::connect([proxy.cluster_addr.as_str()], None),
        )
        .await
        .expect("connect");
        let mut members = Vec::new();
        for (name, url) in proxy.members.iter().filter(|(n, _)| n != victim) {
            let c = within("Client::connect", Client::connect([url.as_str()], None))
                .await
                .expect("connect");
            members.push((name.clone(), c));
        }
        Self {
            cluster,
            members,
            checks: 0,
        }
    }

    /// A write and a read through the cluster endpoint, a read through each healthy
    /// member's endpoint.
    async fn check(&mut self) {
        self.checks += 1;
        let value = self.checks.to_string();
        let put = tokio::time::timeout(PROMPT, self.cluster.put("others", value.as_str(), None));
        assert!(
            matches!(put.await, Ok(Ok(_))),
            "a write through the cluster endpoint was held up"
        );
        let get = tokio::time::timeout(PROMPT, self.cluster.get("others", None));
        assert!(
            matches!(get.await, Ok(Ok(_))),
            "a read through the cluster endpoint was held up"
        );
        for (name, c) in &mut self.members {
            let get = tokio::time::timeout(PROMPT, c.get("others", None)).await;
            assert!(matches!(get, Ok(Ok(_))), "{name}'s endpoint was held up");
        }
    }
}

/// A follower (the leader's loss would stall writes for an election: etcd's business, not
/// the proxy's isolation).
async fn a_follower(proxy: &Proxy) -> String {
    for (name, url) in &proxy.members {
        let status = tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = Client::connect([url.as_str()], None).await.ok()?;
            let s = c.status().await.ok()?;
            Some((s.header()?.member_id(), s.leader()))
        })
        .await;
        if let Ok(Some((id, leader))) = status {
            if id != leader && leader != 0 {
                return name.clone();
            }
        }
    }
    panic!("no follower among {:?}", proxy.members);
}

/// Reads through `member_url`, which must fail, until one fails with `why` (the first may
/// instead meet the connection that the fault's cut is closing): how long that one took and
/// the error's text.
async fn failing_read(member_url: &str, why: &str) -> (Duration, String) {
    let mut c = within("Client::connect", Client::connect([member_url], None))
        .await
        .expect("connect");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let got = within("a read from the failing member", c.get("others", None)).await;
        let err = got
            .expect_err("the failing member cannot answer")
            .to_string();
        if err.contains(why) {
            return (start.elapsed(), err);
        }
        seen.push(err);
    }
    panic!("no read failed with {why:?}: {seen:#?}");
}

/// `GET /version` through `member_url`, which must fail, until it fails with `why` (as
/// [`failing_read`]): how long that one took and the whole response.
async fn failing_http(member_url: &str, why: &str) -> (Duration, String) {
    let addr = member_url.trim_start_matches("http://");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let text = crate::clients::http1(addr, "GET", "/version", "").await;
        if text.contains(why) {
            return (start.elapsed(), text);
        }
        seen.push(text);
    }
    panic!("no GET failed with {why:?}: {seen:#?}");
}

/// Reads through `member_url` until one succeeds; returns how long it took. Fails past
/// `bound`.
async fn until_served(member_url: &str, bound: Duration) -> Duration {
    let start = Instant::now();
    let mut c = within("Client::connect", Client::connect([member_url], None))
        .await
        .expect("connect");
    loop {
        let left = bound.saturating_sub(start.elapsed());
        assert!(
            !left.is_zero(),
            "{member_url} did not serve again within {bound:?}"
        );
        if let Ok(Ok(_)) = tokio::time::timeout(left, c.get("others", None)).await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn url_of<'a>(proxy: &'a Proxy, member: &str) -> &'a str {
    proxy
        .members
        .iter()
        .find(|(n, _)| n == member)
        .map(|(_, u)| u.as_str())
        .expect("member endpoint")
}

/// The API server reads the victim's upgrade requests and never answers (a wedged kubelet):
/// each dial fails after `--dial-timeout` with an error that says so, the member is reported
/// down, the other members and the cluster endpoint answer promptly throughout, and once the
/// kubelet answers again the member serves again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_upgrade_fails_the_dial_in_time_and_holds_up_no_other_member() {
    for protocol in ["websocket", "spdy"] {
        let sim = cluster(3).await;
        let (proxy, admin) = proxy(&sim, protocol).await;
        let victim = a_follower(&proxy).await;
        let mut others = Others::new(&proxy, &victim).await;
        others.check().await;

        sim.set_portforward_fault(&victim, Some(PortForwardFault::Unanswered));
        sim.cut_pod_tunnels(&victim);
        let why =
            format!("did not open within {DIAL:?} (--dial-timeout): no answer from the API server");
        let (took, err) = failing_read(url_of(&proxy, &victim), &why).await;
        eprintln!("{protocol}: a read from {victim} failed after {took:?}: {err}");
        assert!(
            took < DIAL + MARGIN,
            "{protocol}: the dial was not bounded: {took:?}"
        );
        // HTTP/1.1 (v2, the JSON gateway) meets the same bound and the same words.
        let (took, text) = failing_http(url_of(&proxy, &victim), &why).await;
        eprintln!("{protocol}: GET /version from {victim} failed after {took:?}");
        assert!(text.starts_with("HTTP/1.1 502"), "{protocol}: {text}");
        assert!(took < DIAL + MARGIN, "{protocol}: {took:?}");
        // Two failed checks, each bounded by the check's timeout.
        let bound = (KEEPALIVE + KEEPALIVE_TIMEOUT) * 2 + DIAL + MARGIN;
        let down = until_reported(&admin, &victim, false, bound, &mut others).await;
        eprintln!("{protocol}: {victim} reported down {down:?} after its first failed read");
        others.check().await;

        sim.set_portforward_fault(&victim, None);
        let back = until_served(url_of(&proxy, &victim), DIAL + MARGIN).await;
        eprintln!("{protocol}: {victim} served again {back:?} after the kubelet answered");
        drop(proxy);
        within("sim.shutdown", sim.shutdown()).await;
    }
}

/// The victim's upgrades are answered with 101 and then nothing flows. Over SPDY the stream
/// pair is never accepted, so the dial fails at `--dial-timeout`; over WebSocket kube-rs
/// hands the tunnel over at the 101, and the HTTP/2 connection on it is given up when the
/// ping its first stream gets goes unanswered. Either way the member is reported down, the others keep serving,
/// and once upgrades work again the member serves within a dial and a keepalive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_after_the_upgrade_is_given_up_and_holds_up_no_other_member() {
    for protocol in ["websocket", "spdy"] {
        let sim = cluster(3).await;
        let (proxy, admin) = proxy(&sim, protocol).await;
        let victim = a_follower(&proxy).await;
        let mut others = Others::new(&proxy, &victim).await;
        others.check().await;

        sim.set_portforward_fault(&victim, Some(PortForwardFault::BlackHole));
        sim.cut_pod_tunnels(&victim);
        let (why, bound) = if protocol == "spdy" {
            ("did not open within", DIAL + MARGIN)
        } else {
            // The new connection's first stream is pinged at once.
            (
                "no answer to an HTTP/2 ping within 1s (--keepalive-timeout)",
                KEEPALIVE_TIMEOUT + MARGIN,
            )
        };
        let (took, err) = failing_read(url_of(&proxy, &victim), why).await;
        eprintln!("{protocol}: a read from {victim} failed after {took:?}: {err}");
        assert!(took < bound, "{protocol}: {took:?}");
        let bound = (KEEPALIVE + KEEPALIVE_TIMEOUT) * 2 + DIAL + MARGIN;
        let down = until_reported(&admin, &victim, false, bound, &mut others).await;
        eprintln!("{protocol}: {victim} reported down {down:?} after its first failed read");
        others.check().await;

        sim.set_portforward_fault(&victim, None);
        // Connections still open into the black hole are given up by their pings, new ones
        // work at once.
        let bound = KEEPALIVE + KEEPALIVE_TIMEOUT + DIAL + H2_PING_FLOOR + MARGIN;
        let back = until_served(url_of(&proxy, &victim), bound).await;
        eprintln!("{protocol}: {victim} served again {back:?} after the black hole ended");
        let up = until_reported(&admin, &victim, true, bound, &mut others).await;
        eprintln!("{protocol}: {victim} reported up {up:?} later");
        drop(proxy);
        within("sim.shutdown", sim.shutdown()).await;
    }
}

/// Every established tunnel stops passing bytes, without FIN or RST (a load balancer's idle
/// drop, a partition): a watch through the cluster endpoint still delivers the next event,
/// and reads through every member endpoint succeed again, within the keepalive that notices
/// the drop plus a dial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_drop_of_every_tunnel_is_noticed_and_watches_resume() {
    for protocol in ["websocket", "spdy"] {
        let sim = cluster(3).await;
        let (proxy, _admin) = proxy(&sim, protocol).await;
        let mut c = within(
            "Client::connect",
            Client::connect([proxy.cluster_addr.as_str()], None),
        )
        .await
        .expect("connect");
        let mut events = within("c.watch", c.watch("drop", None))
            .await
            .expect("watch");
        let created = within("events.message", events.message()).await;
        assert!(created.expect("ok").expect("msg").created());
        // Every member has a tunnel open before the drop.
        for (_, url) in &proxy.members {
            until_served(url, Duration::from_secs(10)).await;
        }

        let dropped = sim.drop_tunnels_silently(None);
        assert!(dropped >= 3, "{protocol}: {dropped} connections dropped");
        let start = Instant::now();
        let direct = sim.member_client_url("etcd-0").expect("url");
        let mut d = within("Client::connect", Client::connect([direct.as_str()], None))
            .await
            .expect("direct");
        within("d.put", d.put("drop", "after", None))
            .await
            .expect("put");
        // SPDY: the connection's ping (every --keepalive, --keepalive-timeout to answer).
        // WebSocket: the watch's HTTP/2 connection is pinged (at most every 5 s, etcd's
        // minimum) and dropped when the ping goes unanswered.
        let every = if protocol == "spdy" {
            KEEPALIVE
        } else {
            KEEPALIVE.max(H2_PING_FLOOR)
        };
        let bound = every + KEEPALIVE_TIMEOUT + DIAL + MARGIN;
        let ev = tokio::time::timeout(bound, events.message())
            .await
            .unwrap_or_else(|_| panic!("{protocol}: the watch was not resumed within {bound:?}"))
            .expect("ok")
            .expect("msg");
        assert_eq!(ev.events()[0].kv().expect("kv").value(), b"after");
        eprintln!(
            "{protocol}: the watch delivered the event {:?} after the drop",
            start.elapsed()
        );
        for (name, url) in &proxy.members {
            let took = until_served(url, bound).await;
            eprintln!("{protocol}: {name} served {took:?} later");
        }
        drop(proxy);
        within("sim.shutdown", sim.shutdown()).await;
    }
}

/// The pod side ends (etcd is killed) and the runtime waits its 1 s grace before closing the
/// tunnels (containerd's): requests in that second meet a connection that says nothing.
/// Reads through the cluster endpoint never fail, requests to the dead member fail with the
/// kubelet's reason instead of hanging, and after the restart the member serves again
/// within the grace, a keepalive and a dial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pods_tunnels_closing_a_second_late_cost_no_reads() {
    const GRACE: Duration = Duration::from_secs(1);
    for protocol in ["websocket", "spdy"] {
        let sim = cluster(3).await;
        let (proxy, _admin) = proxy(&sim, protocol).await;
        let victim = a_follower(&proxy).await;
        let mut c = within(
            "Client::connect",
            Client::connect([proxy.cluster_addr.as_str()], None),
        )
        .await
        .expect("connect");
        within("c.put", c.put("grace", "v", None))
            .await
            .expect("put");
        let reader = tokio::spawn(async move {
            let (mut reads, mut failed) = (0, 0);
            let until = Instant::now() + Duration::from_secs(4);
            while Instant::now() < until {
                reads += 1;
                let get = tokio::time::timeout(Duration::from_secs(10), c.get("grace", None));
                if !matches!(get.await, Ok(Ok(r)) if r.kvs().len() == 1) {
                    failed += 1;
                }
            }
            (reads, failed)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        within("sim.kill_pod", sim.kill_pod(&victim))
            .await
            .expect("kill");
        let (took, err) = failing_read(
            url_of(&proxy, &victim),
            "nothing is listening on localhost:2379",
        )
        .await;
        eprintln!("{protocol}: a read from the dead {victim} failed after {took:?}: {err}");
        assert!(took < GRACE + DIAL + MARGIN, "{protocol}: {took:?}");
        let (reads, failed) = within("reader", reader).await.expect("reader");
        eprintln!("{protocol}: {reads} reads through the cluster endpoint, {failed} failed");
        assert!(reads > 20, "{protocol}: the reader ran: {reads}");
        assert_eq!(failed, 0, "{protocol}: reads go to the live members");

        // The restarted member gets 30 s to report healthy.
        within_for(START_DEADLINE, "sim.restart_pod", sim.restart_pod(&victim))
            .await
            .expect("restart");
        let bound = GRACE + KEEPALIVE + KEEPALIVE_TIMEOUT + DIAL + MARGIN;
        let back = until_served(url_of(&proxy, &victim), bound).await;
        eprintln!("{protocol}: {victim} served {back:?} after its restart");
        drop(proxy);
        within("sim.shutdown", sim.shutdown()).await;
    }
}
