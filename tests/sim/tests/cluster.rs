//! End-to-end tests of the simulator with the real clients etcd-proxy uses:
//! a `kube::Client` built from the generated kubeconfig, kube-rs' WebSocket
//! port-forward, kube-runtime's watcher, and real etcd members behind it.

use std::future::{Future, IntoFuture};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

fn one_member() -> SimConfig {
    SimConfig {
        members: 1,
        ..SimConfig::default()
    }
}

async fn client_for(path: &std::path::Path, context: Option<&str>) -> Client {
    let kc = Kubeconfig::read_from(path).expect("kubeconfig parses");
    let opts = KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    let cfg = within(
        "kube::Config::from_custom_kubeconfig",
        kube::Config::from_custom_kubeconfig(kc, &opts),
    )
    .await
    .expect("kube config");
    Client::try_from(cfg).expect("client")
}

async fn client(c: &SimCluster, context: Option<&str>) -> Client {
    client_for(c.kubeconfig_path(), context).await
}

fn api_code(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Sends a raw HTTP/1.1 request through a fresh port-forward and returns the whole response.
async fn http_via_tunnel(pods: &Api<Pod>, pod: &str, path: &str) -> String {
    let mut pf = tokio::time::timeout(STEP, pods.portforward(pod, &[2379]))
        .await
        .expect("portforward in time")
        .expect("portforward");
    let mut s = pf.take_stream(2379).expect("stream");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    within("s.write_all", s.write_all(req.as_bytes()))
        .await
        .expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    drop(s);
    let _ = tokio::time::timeout(STEP, pf.join()).await;
    String::from_utf8_lossy(&buf).into_owned()
}

async fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + STEP;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test]
async fn discovery_objects_and_portforward() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(one_member()))
        .await
        .expect("start");
    assert!(c.api_url().starts_with("https://127.0.0.1:"));
    let kc = std::fs::read_to_string(c.kubeconfig_path()).unwrap();
    assert!(kc.contains("certificate-authority-data"));
    let client = client(&c, None).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "etcd");

    let list = within(
        "pods.list",
        pods.list(&ListParams::default().labels("app=etcd")),
    )
    .await
    .expect("list");
    assert_eq!(list.items.len(), 1);
    let pod = &list.items[0];
    assert_eq!(pod.metadata.name.as_deref(), Some("etcd-0"));
    assert!(is_ready(pod));
    assert!(list.metadata.resource_version.is_some());
    let labels = pod.metadata.labels.clone().unwrap();
    assert_eq!(labels["statefulset.kubernetes.io/pod-name"], "etcd-0");
    assert_eq!(labels["apps.kubernetes.io/pod-index"], "0");

    let none = within(
        "pods.list",
        pods.list(&ListParams::default().labels("app=etcd,app notin (etcd)")),
    )
    .await
    .unwrap();
    assert!(none.items.is_empty());
    let by_name = within(
        "pods.list",
        pods.list(&ListParams::default().fields("metadata.name=etcd-0")),
    )
    .await
    .unwrap();
    assert_eq!(by_name.items.len(), 1);

    let other: Api<Pod> = Api::namespaced(client.clone(), "default");
    assert!(within("other.list", other.list(&ListParams::default()))
        .await
        .unwrap()
        .items
        .is_empty());
    assert_eq!(
        api_code(within("other.get", other.get("etcd-0")).await.unwrap_err()).0,
        404
    );
    let (code, msg) = api_code(within("pods.get", pods.get("nope")).await.unwrap_err());
    assert_eq!((code, msg.as_str()), (404, r#"pods "nope" not found"#));

    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), "etcd");
    let s = within("sts.get", sts.get("etcd"))
        .await
        .expect("statefulset");
    let spec = s.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some("etcd"));
    assert_eq!(spec.selector.match_labels.unwrap()["app"], "etcd");
    assert_eq!(s.status.unwrap().ready_replicas, Some(1));
    assert_eq!(
        within("sts.list", sts.list(&ListParams::default()))
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    let svcs: Api<Service> = Api::namespaced(client.clone(), "etcd");
    let svc = within("svcs.get", svcs.get("etcd")).await.expect("service");
    let svc_spec = svc.spec.unwrap();
    assert_eq!(svc_spec.cluster_ip.as_deref(), Some("None"));
    assert!(svc_spec
        .ports
        .unwrap()
        .iter()
        .any(|p| p.name.as_deref() == Some("client") && p.port == 2379));

    let before = c.portforward_count();
    let resp = http_via_tunnel(&pods, "etcd-0", "/version").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("etcdserver"), "{resp}");
    assert_eq!(c.portforward_count(), before + 1);
    assert!(
        wait_until(|| c.open_tunnels() == 0).await,
        "tunnel not closed"
    );
    within("c.shutdown", c.shutdown()).await;
}

#[tokio::test]
async fn three_members_advertise_cluster_dns_names() {
    let c = within_for(
        START,
        "SimCluster::start",
        SimCluster::start(SimConfig::default()),
    )
    .await
    .expect("start");
    assert_eq!(c.pod_names(), ["etcd-0", "etcd-1", "etcd-2"]);
    assert_eq!(
        c.advertised_client_url("etcd-1").as_deref(),
        Some("http://etcd-1.etcd.etcd.svc.cluster.local:2379")
    );
    assert!(c
        .member_client_url("etcd-2")
        .unwrap()
        .starts_with("http://127.0.0.1:"));
    let pods: Api<Pod> = Api::namespaced(client(&c, None).await, "etcd");
    let list = within(
        "pods.list",
        pods.list(&ListParams::default().labels("app=etcd")),
    )
    .await
    .unwrap();
    assert_eq!(list.items.len(), 3);
    assert!(list.items.iter().all(is_ready));
    // Through a tunnel to etcd-2, the member list shows the in-cluster names.
    let resp = http_via_tunnel(&pods, "etcd-2", "/v2/members").await;
    for i in 0..3 {
        assert!(
            resp.contains(&format!("http://etcd-{i}.etcd.etcd.svc.cluster.local:2379")),
            "{resp}"
        );
    }
    within("c.shutdown", c.shutdown()).await;
}

/// A copy of the kubeconfig whose every token is replaced.
fn kubeconfig_with_bad_token(c: &SimCluster, dir: &std::path::Path) -> std::path::PathBuf {
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.kubeconfig_path()).unwrap()).unwrap();
    for u in doc["users"].as_array_mut().unwrap() {
        u["user"]["token"] = "not-a-valid-token".into();
    }
    let path = dir.join("bad-kubeconfig");
    std::fs::write(&path, doc.to_string()).unwrap();
    path
}

#[tokio::test]
async fn rbac_denials_and_bad_token() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(one_member()))
        .await
        .expect("start");

    let no_pf: Api<Pod> = Api::namespaced(client(&c, Some("sim-no-portforward")).await, "etcd");
    assert_eq!(
        within("no_pf.list", no_pf.list(&ListParams::default()))
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let (code, msg) = api_code(
        within("no_pf.portforward", no_pf.portforward("etcd-0", &[2379]))
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(code, 403);
    // kube-rs' port-forward is a WebSocket GET: verb `get` (requestinfo.go).
    assert_eq!(
        msg,
        r#"pods "etcd-0" is forbidden: User "sim-no-portforward" cannot get resource "pods/portforward" in API group "" in the namespace "etcd""#
    );
    assert_eq!(c.portforward_count(), 0);

    let no_list_client = client(&c, Some("sim-no-list")).await;
    let no_list: Api<Pod> = Api::namespaced(no_list_client.clone(), "etcd");
    let (code, msg) = api_code(
        within("no_list.list", no_list.list(&ListParams::default()))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403);
    assert_eq!(
        msg,
        r#"pods is forbidden: User "sim-no-list" cannot list resource "pods" in API group "" in the namespace "etcd""#
    );
    assert_eq!(
        api_code(
            within("no_list.get", no_list.get("etcd-0"))
                .await
                .unwrap_err()
        )
        .0,
        403
    );
    let sts: Api<StatefulSet> = Api::namespaced(no_list_client, "etcd");
    assert!(within("sts.get", sts.get("etcd")).await.is_ok());

    let dir = tempfile::tempdir().unwrap();
    let bad = kubeconfig_with_bad_token(&c, dir.path());
    let pods: Api<Pod> = Api::namespaced(client_for(&bad, None).await, "etcd");
    let (code, msg) = api_code(
        within("pods.list", pods.list(&ListParams::default()))
            .await
            .unwrap_err(),
    );
    assert_eq!((code, msg.as_str()), (401, "Unauthorized"));
    within("c.shutdown", c.shutdown()).await;
}

#[tokio::test]
async fn etcd_not_on_loopback_refuses_portforward() {
    let cfg = SimConfig {
        loopback_listen: false,
        ..one_member()
    };
    let c = within_for(START, "SimCluster::start", SimCluster::start(cfg))
        .await
        .expect("start");
    assert!(c
        .member_client_url("etcd-0")
        .unwrap()
        .starts_with("http://127.0.0.2:"));
    let pods: Api<Pod> = Api::namespaced(client(&c, None).await, "etcd");
    let mut pf = within("pods.portforward", pods.portforward("etcd-0", &[2379]))
        .await
        .expect("upgrade");
    assert_eq!(c.portforward_count(), 1);
    let err = tokio::time::timeout(STEP, pf.take_error(2379).unwrap())
        .await
        .expect("error in time")
        .expect("an error message");
    assert!(
        err.starts_with("error forwarding port 2379 to pod "),
        "{err}"
    );
    assert!(
        err.contains("dial tcp4 127.0.0.1:2379: connect: connection refused"),
        "{err}"
    );
    within("c.shutdown", c.shutdown()).await;
}

#[tokio::test]
async fn watch_kill_restart_and_expired() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(one_member()))
        .await
        .expect("start");
    let client = client(&c, None).await;
    let pods: Api<Pod> = Api::namespaced(client, "etcd");

    // kube-runtime's watcher: initial list, then the kill shows up as an update.
    let mut w = watcher(pods.clone(), watcher::Config::default().labels("app=etcd")).boxed();
    loop {
        let ev = tokio::time::timeout(STEP, w.try_next())
            .await
            .unwrap()
            .unwrap();
        if matches!(ev, Some(watcher::Event::InitDone)) {
            break;
        }
    }
    // The streaming-list flavour (sendInitialEvents) also completes its initial state.
    let mut streaming = watcher(pods.clone(), watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(STEP, streaming.try_next())
            .await
            .unwrap()
            .unwrap()
        {
            Some(watcher::Event::InitApply(p)) => initial.push(p.metadata.name.unwrap()),
            Some(watcher::Event::InitDone) => break,
            Some(_) => continue,
            None => panic!("streaming watcher ended"),
        }
    }
    assert_eq!(initial, ["etcd-0"]);
    drop(streaming);

    // A raw watch from the list's resourceVersion, to see the event type.
    let rv = within("pods.list", pods.list(&ListParams::default()))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut raw = within(
        "pods.watch",
        pods.watch(&WatchParams::default().labels("app=etcd"), &rv),
    )
    .await
    .unwrap()
    .boxed();

    within("c.kill_pod", c.kill_pod("etcd-0"))
        .await
        .expect("kill");
    match tokio::time::timeout(STEP, raw.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Modified(p)) => assert!(!is_ready(&p)),
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    loop {
        match tokio::time::timeout(STEP, w.try_next())
            .await
            .unwrap()
            .unwrap()
        {
            Some(watcher::Event::Apply(p)) => {
                assert!(!is_ready(&p));
                break;
            }
            Some(_) => continue,
            None => panic!("watcher ended"),
        }
    }
    let sts: Api<StatefulSet> =
        Api::namespaced(client_for(c.kubeconfig_path(), None).await, "etcd");
    assert_eq!(
        within("sts.get", sts.get("etcd"))
            .await
            .unwrap()
            .status
            .unwrap()
            .ready_replicas,
        Some(0)
    );

    // Port-forward to the dead member: upgrade works, the dial is refused.
    let mut pf = within("pods.portforward", pods.portforward("etcd-0", &[2379]))
        .await
        .expect("upgrade");
    let err = tokio::time::timeout(STEP, pf.take_error(2379).unwrap())
        .await
        .unwrap()
        .expect("error text");
    assert!(err.contains("connection refused"), "{err}");

    within_for(START, "c.restart_pod", c.restart_pod("etcd-0"))
        .await
        .expect("restart");
    match tokio::time::timeout(STEP, raw.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Modified(p)) => {
            assert!(is_ready(&p));
            let cs = &p.status.unwrap().container_statuses.unwrap()[0];
            assert_eq!(cs.restart_count, 1);
        }
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    let resp = http_via_tunnel(&pods, "etcd-0", "/health").await;
    assert!(resp.contains(r#""health":"true""#), "{resp}");

    // A resourceVersion older than the history: one ERROR event with 410 Expired.
    let mut old = within("pods.watch", pods.watch(&WatchParams::default(), "1"))
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(STEP, old.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Error(s)) => {
            assert_eq!(s.code, 410);
            assert_eq!(s.reason, "Expired");
            assert!(
                s.message.starts_with("too old resource version: 1 ("),
                "{}",
                s.message
            );
        }
        other => panic!("expected ERROR, got {other:?}"),
    }
    assert!(tokio::time::timeout(STEP, old.try_next())
        .await
        .unwrap()
        .unwrap()
        .is_none());
    within("c.shutdown", c.shutdown()).await;
}

#[tokio::test]
async fn cut_tunnels_closes_streams_and_latency_delays_frames() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(one_member()))
        .await
        .expect("start");
    let pods: Api<Pod> = Api::namespaced(client(&c, None).await, "etcd");
    let mut pf = within("pods.portforward", pods.portforward("etcd-0", &[2379]))
        .await
        .expect("upgrade");
    let mut s = pf.take_stream(2379).unwrap();
    // An incomplete request: etcd waits for more, so only the cut can end the read.
    within("s.write_all", s.write_all(b"GET /version HTTP/1.1\r\n"))
        .await
        .unwrap();
    assert!(wait_until(|| c.open_tunnels() == 1).await);
    c.cut_tunnels();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("read ends promptly after the cut");
    assert!(read.is_err() || buf.is_empty(), "unexpected data: {buf:?}");
    assert_eq!(c.open_tunnels(), 0);

    // 150 ms one way: the upgrade, the request and the response each pay it.
    c.set_latency(Duration::from_millis(150));
    let started = std::time::Instant::now();
    let resp = http_via_tunnel(&pods, "etcd-0", "/version").await;
    let took = started.elapsed();
    assert!(resp.contains("etcdserver"), "{resp}");
    assert!(took >= Duration::from_millis(450), "took only {took:?}");
    c.set_latency(Duration::ZERO);
    within("c.shutdown", c.shutdown()).await;
}
