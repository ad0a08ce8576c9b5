//! Fault controls of the simulator, exercised through kube-rs as etcd-proxy
//! uses it: the kubelet's idle timeout on port-forward sockets, an API server
//! outage and restart, scaling the StatefulSet with real etcd membership
//! changes, and a pod restart that changes the pod IP.

use std::future::{Future, IntoFuture};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;

use etcd_proxy_sim::{within_for, SimCluster, SimConfig};

const STEP: Duration = Duration::from_secs(15);

/// Starting etcd members: a cluster (each member gets 30 s to report healthy, and a failed
/// start is retried once), a scale step, a pod restart.
const START: Duration = Duration::from_secs(90);

/// Awaits `fut` for at most [`STEP`]; a hang fails the test naming `what` and the line.
#[track_caller]
fn within<'a, F: IntoFuture + 'a>(what: &'a str, fut: F) -> impl Future<Output = F::Output> + 'a {
    within_for(STEP, what, fut)
}

fn members(n: usize) -> SimConfig {
    SimConfig {
        members: n,
        ..SimConfig::default()
    }
}

async fn client(c: &SimCluster) -> Client {
    let kc = kube::config::Kubeconfig::read_from(c.kubeconfig_path()).expect("kubeconfig");
    let cfg = within(
        "kube::Config::from_custom_kubeconfig",
        kube::Config::from_custom_kubeconfig(kc, &Default::default()),
    )
    .await
    .expect("kube config");
    Client::try_from(cfg).expect("client")
}

async fn pods(c: &SimCluster) -> Api<Pod> {
    Api::namespaced(client(c).await, "etcd")
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

async fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + STEP;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Sends `GET /health` on a kept-alive tunnel stream and reads one whole response.
async fn health_roundtrip(s: &mut DuplexStream) {
    within(
        "s.write_all",
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !String::from_utf8_lossy(&buf).contains(r#""health":"true""#) {
        let n = tokio::time::timeout(STEP, s.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "tunnel closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `ETCDCTL_API=3 etcdctl --endpoints <ep> <args>`: (success, stdout + stderr).
fn etcdctl(ep: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(ep)
        .args(args)
        .output()
        .expect("run etcdctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The next watcher event that is not an error (the watcher reports
/// connection failures and retries after its backoff).
async fn next_event(
    w: &mut (impl futures::Stream<Item = watcher::Result<watcher::Event<Pod>>> + Unpin),
) -> watcher::Event<Pod> {
    let deadline = Instant::now() + STEP;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, w.next())
            .await
            .expect("watcher event in time")
        {
            Some(Ok(ev)) => return ev,
            Some(Err(_)) => continue,
            None => panic!("watcher ended"),
        }
    }
}

#[tokio::test]
async fn idle_timeout_closes_silent_tunnels_only() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(members(1)))
        .await
        .expect("start");
    let pods = pods(&c).await;

    // Opened before the timeout is set: the new value applies to it too.
    let mut silent_pf = within("pods.portforward", pods.portforward("etcd-0", &[2379]))
        .await
        .expect("upgrade");
    let mut silent = silent_pf.take_stream(2379).expect("stream");
    assert!(wait_until(|| c.open_tunnels() == 1).await);
    let started = Instant::now();
    c.set_kubelet_idle_timeout(Some(Duration::from_millis(300)));
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), silent.read_to_end(&mut buf))
        .await
        .expect("the idle socket is closed");
    let took = started.elapsed();
    assert!(read.is_ok() && buf.is_empty(), "{read:?} {buf:?}");
    assert!(
        took >= Duration::from_millis(250),
        "closed after only {took:?}"
    );
    assert!(
        took <= Duration::from_millis(1200),
        "closed only after {took:?}"
    );
    assert_eq!(c.idle_closures(), 1);
    assert!(wait_until(|| c.open_tunnels() == 0).await);

    // Traffic every 100 ms keeps a socket open well past the timeout.
    let mut busy_pf = within("pods.portforward", pods.portforward("etcd-0", &[2379]))
        .await
        .expect("upgrade");
    let mut busy = busy_pf.take_stream(2379).expect("stream");
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        health_roundtrip(&mut busy).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    health_roundtrip(&mut busy).await;
    assert_eq!(c.open_tunnels(), 1);
    assert_eq!(c.idle_closures(), 1);

    // `None` turns it off again, for open sockets as well.
    c.set_kubelet_idle_timeout(None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    health_roundtrip(&mut busy).await;
    assert_eq!(c.idle_closures(), 1);
    within("c.shutdown", c.shutdown()).await;
}

/// True if `e` (or an error it wraps) is a refused TCP connection.
fn is_connection_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

#[tokio::test]
async fn api_pause_keeps_watches_and_open_tunnels() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(members(1)))
        .await
        .expect("start");
    let pods = pods(&c).await;
    let mut w = watcher(pods.clone(), watcher::Config::default().labels("app=etcd"))
        .default_backoff()
        .boxed();
    loop {
        if matches!(next_event(&mut w).await, watcher::Event::InitDone) {
            break;
        }
    }
    let mut pf = within("pods.portforward", pods.portforward("etcd-0", &[2379]))
        .await
        .expect("upgrade");
    let mut tunnel = pf.take_stream(2379).expect("stream");
    health_roundtrip(&mut tunnel).await;

    let addr = c.api_url().trim_start_matches("https://").to_string();
    let during = async {
        // The listener is gone: wait for the first refused connection.
        let deadline = Instant::now() + STEP;
        while within(
            "tokio::net::TcpStream::connect",
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        .is_ok()
        {
            assert!(Instant::now() < deadline, "the API server never went away");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let fresh = self::pods(&c).await;
        let err = within("fresh.list", fresh.list(&ListParams::default()))
            .await
            .expect_err("list during the pause");
        assert!(is_connection_refused(&err), "{err:?}");
        // The tunnel opened before the pause still reaches etcd.
        health_roundtrip(&mut tunnel).await;
    };
    let pause = within("c.pause_api", c.pause_api(Duration::from_secs(1)));
    tokio::join!(pause, during);

    assert_eq!(
        within("pods.list", pods.list(&ListParams::default()))
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    health_roundtrip(&mut tunnel).await;
    assert_eq!(c.open_tunnels(), 1);
    // The watcher resumes from its resourceVersion: no relist (no Init), just the change.
    within("c.kill_pod", c.kill_pod("etcd-0"))
        .await
        .expect("kill");
    match next_event(&mut w).await {
        watcher::Event::Apply(p) => assert!(!is_ready(&p)),
        other => panic!("expected the pod update, got {other:?}"),
    }
    within_for(START, "c.restart_pod", c.restart_pod("etcd-0"))
        .await
        .expect("restart");
    let mut pf = within("pods.portforward", pods.portforward("etcd-0", &[2379]))
        .await
        .expect("upgrade");
    let mut tunnel = pf.take_stream(2379).expect("stream");
    health_roundtrip(&mut tunnel).await;

    // A restart cuts the tunnels too, and the server is back at once.
    within("c.restart_api", c.restart_api()).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut buf))
        .await
        .expect("the tunnel ends with the restart");
    assert!(read.is_err() || buf.is_empty(), "{buf:?}");
    assert_eq!(c.open_tunnels(), 0);
    assert_eq!(
        within("pods.list", pods.list(&ListParams::default()))
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    within("c.shutdown", c.shutdown()).await;
}

#[tokio::test]
async fn scale_up_and_down_changes_etcd_membership() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(members(1)))
        .await
        .expect("start");
    let pods = pods(&c).await;
    let rv = within("pods.list", pods.list(&ListParams::default()))
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    let mut raw = within(
        "pods.watch",
        pods.watch(&WatchParams::default().labels("app=etcd"), &rv),
    )
    .await
    .expect("watch")
    .boxed();
    let mut w = watcher(pods.clone(), watcher::Config::default()).boxed();
    loop {
        if matches!(next_event(&mut w).await, watcher::Event::InitDone) {
            break;
        }
    }

    within_for(START, "c.scale", c.scale(2))
        .await
        .expect("scale up");
    assert_eq!(c.pod_names(), ["etcd-0", "etcd-1"]);
    let advertised = c.advertised_client_url("etcd-1").expect("advertised URL");
    assert_eq!(advertised, "http://etcd-1.etcd.etcd.svc.cluster.local:2379");
    let new_url = c.member_client_url("etcd-1").expect("client URL");
    let (ok, out) = etcdctl(&new_url, &["endpoint", "health"]);
    assert!(ok && out.contains("is healthy"), "{out}");
    let first = c.member_client_url("etcd-0").expect("client URL");
    let (ok, out) = etcdctl(&first, &["member", "list"]);
    assert!(
        ok && out.contains(", etcd-1, ") && out.contains(&advertised),
        "{out}"
    );
    match tokio::time::timeout(STEP, raw.try_next())
        .await
        .expect("event")
        .expect("ok")
    {
        Some(WatchEvent::Added(p)) => {
            assert_eq!(p.metadata.name.as_deref(), Some("etcd-1"));
            assert!(is_ready(&p));
        }
        other => panic!("expected ADDED, got {other:?}"),
    }
    match next_event(&mut w).await {
        watcher::Event::Apply(p) => assert_eq!(p.metadata.name.as_deref(), Some("etcd-1")),
        other => panic!("expected the new pod, got {other:?}"),
    }
    let sts: Api<StatefulSet> = Api::namespaced(client(&c).await, "etcd");
    let s = within("sts.get", sts.get("etcd"))
        .await
        .expect("statefulset");
    assert_eq!(s.spec.and_then(|s| s.replicas), Some(2));
    assert_eq!(s.status.and_then(|s| s.ready_replicas), Some(2));

    // Through a tunnel into the new pod, etcd answers.
    let mut pf = within("pods.portforward", pods.portforward("etcd-1", &[2379]))
        .await
        .expect("upgrade");
    let mut tunnel = pf.take_stream(2379).expect("stream");
    health_roundtrip(&mut tunnel).await;

    within_for(START, "c.scale", c.scale(1))
        .await
        .expect("scale down");
    assert_eq!(c.pod_names(), ["etcd-0"]);
    assert_eq!(c.member_client_url("etcd-1"), None);
    let (ok, out) = etcdctl(&first, &["member", "list"]);
    assert!(ok && !out.contains("etcd-1"), "{out}");
    match tokio::time::timeout(STEP, raw.try_next())
        .await
        .expect("event")
        .expect("ok")
    {
        Some(WatchEvent::Modified(p)) => assert!(p.metadata.deletion_timestamp.is_some()),
        other => panic!("expected MODIFIED with deletionTimestamp, got {other:?}"),
    }
    match tokio::time::timeout(STEP, raw.try_next())
        .await
        .expect("event")
        .expect("ok")
    {
        Some(WatchEvent::Deleted(p)) => assert_eq!(p.metadata.name.as_deref(), Some("etcd-1")),
        other => panic!("expected DELETED, got {other:?}"),
    }
    loop {
        match next_event(&mut w).await {
            watcher::Event::Delete(p) => {
                assert_eq!(p.metadata.name.as_deref(), Some("etcd-1"));
                break;
            }
            watcher::Event::Apply(_) => continue,
            other => panic!("expected the deletion, got {other:?}"),
        }
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut buf))
        .await
        .expect("the tunnel into the deleted pod ends");
    assert!(read.is_err() || buf.is_empty(), "{buf:?}");
    assert!(wait_until(|| c.open_tunnels() == 0).await);
    let status = within("sts.get", sts.get("etcd"))
        .await
        .expect("statefulset")
        .status
        .expect("status");
    assert_eq!((status.replicas, status.ready_replicas), (1, Some(1)));
    within("c.shutdown", c.shutdown()).await;
}

#[tokio::test]
async fn restarted_pod_gets_a_new_ip() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(members(1)))
        .await
        .expect("start");
    let pods = pods(&c).await;
    let before = c.pod_ip("etcd-0").expect("ip");
    let listed = within("pods.get", pods.get("etcd-0")).await.expect("get");
    assert_eq!(listed.status.and_then(|s| s.pod_ip), Some(before.clone()));
    within("c.kill_pod", c.kill_pod("etcd-0"))
        .await
        .expect("kill");
    assert_eq!(c.pod_ip("etcd-0"), Some(before.clone()));
    within_for(START, "c.restart_pod", c.restart_pod("etcd-0"))
        .await
        .expect("restart");
    let after = c.pod_ip("etcd-0").expect("ip");
    assert_ne!(before, after);
    let pod = within("pods.get", pods.get("etcd-0")).await.expect("get");
    assert!(is_ready(&pod));
    let status = pod.status.expect("status");
    assert_eq!(status.pod_ip, Some(after.clone()));
    assert_eq!(status.pod_ips.expect("podIPs")[0].ip, after);
    assert_eq!(c.pod_ip("nope"), None);
    within("c.shutdown", c.shutdown()).await;
}

#[tokio::test]
async fn scale_without_v2_uses_etcdctl() {
    let cfg = SimConfig {
        enable_v2: false,
        ..members(1)
    };
    let c = within_for(START, "SimCluster::start", SimCluster::start(cfg))
        .await
        .expect("start");
    within_for(START, "c.scale", c.scale(2))
        .await
        .expect("scale up");
    let first = c.member_client_url("etcd-0").expect("client URL");
    let (ok, out) = etcdctl(&first, &["member", "list"]);
    assert!(
        ok && out.contains("http://etcd-1.etcd.etcd.svc.cluster.local:2379"),
        "{out}"
    );
    within_for(START, "c.scale", c.scale(1))
        .await
        .expect("scale down");
    let (ok, out) = etcdctl(&first, &["member", "list"]);
    assert!(ok && !out.contains("etcd-1"), "{out}");
    assert_eq!(c.pod_names(), ["etcd-0"]);
    within("c.shutdown", c.shutdown()).await;
}
