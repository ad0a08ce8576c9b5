//! Wire-level checks of the simulator with hand-rolled clients (no kube-rs),
//! so the protocol details etcd-proxy relies on are pinned independently of
//! one client's behaviour: subprotocol choice, the initial port frames, the
//! channel layout, the Close after the pod side ends (a second late, as containerd
//! closes), watch timeouts, and the silent faults: an upgrade never answered, a
//! black hole after the upgrade, a connection dropped without FIN or RST.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use etcd_proxy_sim::{within_for, PortForwardFault, SimCluster, SimConfig};

const STEP: Duration = Duration::from_secs(15);

/// Starting etcd members: a cluster (each member gets 30 s to report healthy, and a failed
/// start is retried once), a scale step, a pod restart.
const START: Duration = Duration::from_secs(90);

/// Awaits `fut` for at most [`STEP`]; a hang fails the test naming `what` and the line.
#[track_caller]
fn within<'a, F: IntoFuture + 'a>(what: &'a str, fut: F) -> impl Future<Output = F::Output> + 'a {
    within_for(STEP, what, fut)
}
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

struct Conn {
    addr: String,
    token: String,
    tls: tokio_rustls::TlsConnector,
}

fn conn(c: &SimCluster) -> Conn {
    let kc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.kubeconfig_path()).unwrap()).unwrap();
    let tls = c
        .api_tls_connector()
        .expect("a TLS connector for the API server");
    let token = kc["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "sim-admin")
        .unwrap()["user"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    Conn {
        addr: c.api_url().trim_start_matches("https://").to_string(),
        token,
        tls,
    }
}

impl Conn {
    async fn tls(&self) -> TlsStream<TcpStream> {
        let tcp = within("TcpStream::connect", TcpStream::connect(&self.addr))
            .await
            .unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        within("self.tls.connect", self.tls.connect(name, tcp))
            .await
            .unwrap()
    }

    async fn ws(
        &self,
        path_and_query: &str,
        protocols: &str,
    ) -> Result<(WebSocketStream<TlsStream<TcpStream>>, Option<String>), WsError> {
        let mut req = format!("wss://{}{path_and_query}", self.addr)
            .into_client_request()
            .unwrap();
        let h = req.headers_mut();
        h.insert(
            "Authorization",
            format!("Bearer {}", self.token).parse().unwrap(),
        );
        h.insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
        let (ws, resp) = within(
            "tokio_tungstenite::client_async",
            tokio_tungstenite::client_async(req, self.tls().await),
        )
        .await?;
        let proto = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap().to_string());
        Ok((ws, proto))
    }

    /// A raw HTTP/1.1 GET; returns the whole response text (chunk framing included).
    async fn get(&self, path_and_query: &str) -> String {
        let mut s = self.tls().await;
        let req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
            self.addr, self.token
        );
        within("s.write_all", s.write_all(req.as_bytes()))
            .await
            .unwrap();
        let mut buf = Vec::new();
        // A TLS peer closing without close_notify is fine here.
        let _ = tokio::time::timeout(STEP, s.read_to_end(&mut buf))
            .await
            .unwrap();
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Reads messages until the server's Close; returns (data, close code).
async fn drain<S>(
    ws: &mut WebSocketStream<S>,
    base64: bool,
) -> (Vec<(u8, Vec<u8>)>, Option<CloseCode>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut frames = Vec::new();
    loop {
        let msg = tokio::time::timeout(STEP, ws.next()).await.unwrap();
        match msg {
            Some(Ok(Message::Binary(b))) if !base64 => frames.push((b[0], b[1..].to_vec())),
            Some(Ok(Message::Text(t))) if base64 => {
                let t = t.as_bytes();
                frames.push((t[0] - b'0', B64.decode(&t[1..]).unwrap()));
            }
            Some(Ok(Message::Close(f))) => return (frames, f.map(|f| f.code)),
            Some(Ok(other)) => panic!("unexpected message {other:?}"),
            Some(Err(e)) => panic!("websocket error {e}"),
            None => return (frames, None),
        }
    }
}

fn one_member() -> SimConfig {
    SimConfig {
        members: 1,
        ..SimConfig::default()
    }
}

const VERSION_REQ: &[u8] = b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
const PF: &str = "/api/v1/namespaces/etcd/pods/etcd-0/portforward?ports=2379";

#[tokio::test]
async fn binary_v4_frames_and_close() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(one_member()))
        .await
        .expect("start");
    let conn = conn(&c);
    // kube-rs' offer: the handler has no v5 for port-forward, so v4 is chosen.
    let (mut ws, proto) = conn
        .ws(PF, "v5.channel.k8s.io, v4.channel.k8s.io")
        .await
        .unwrap();
    assert_eq!(proto.as_deref(), Some("v4.channel.k8s.io"));
    // 2379 = 0x094B, little-endian on data (0) then error (1).
    for want in [[0u8, 0x4B, 0x09], [1, 0x4B, 0x09]] {
        match tokio::time::timeout(STEP, ws.next()).await.unwrap() {
            Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &want),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Bytes on the error channel are discarded by the server (write-only channel).
    within(
        "ws.send",
        ws.send(Message::Binary(b"\x01garbage".to_vec().into())),
    )
    .await
    .unwrap();
    let mut req = vec![0u8];
    req.extend_from_slice(VERSION_REQ);
    within("ws.send", ws.send(Message::Binary(req.into())))
        .await
        .unwrap();
    let (frames, close) = drain(&mut ws, false).await;
    assert!(frames.iter().all(|(ch, _)| *ch == 0), "{frames:?}");
    let data: Vec<u8> = frames.into_iter().flat_map(|(_, d)| d).collect();
    let text = String::from_utf8_lossy(&data);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("etcdserver"), "{text}");
    // etcd closed the connection (Connection: close), so the server closed the socket.
    assert_eq!(close, Some(CloseCode::Normal));
    within("c.shutdown", c.shutdown()).await;
}

#[tokio::test]
async fn base64_subprotocol_refused_dial_and_rejections() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(one_member()))
        .await
        .expect("start");
    let conn = conn(&c);

    // First client-offered protocol wins (conn.go handshake).
    let (mut ws, proto) = conn
        .ws(PF, "v4.base64.channel.k8s.io, v4.channel.k8s.io")
        .await
        .unwrap();
    assert_eq!(proto.as_deref(), Some("v4.base64.channel.k8s.io"));
    let mut msg = String::from("0");
    B64.encode_string(VERSION_REQ, &mut msg);
    within("ws.send", ws.send(Message::Text(msg.into())))
        .await
        .unwrap();
    let (frames, close) = drain(&mut ws, true).await;
    assert_eq!(frames[0], (0, vec![0x4B, 0x09]));
    assert_eq!(frames[1], (1, vec![0x4B, 0x09]));
    let data: Vec<u8> = frames[2..].iter().flat_map(|(_, d)| d.clone()).collect();
    assert!(String::from_utf8_lossy(&data).contains("etcdserver"));
    assert_eq!(close, Some(CloseCode::Normal));

    // Nothing listens on port 1234 in the pod: error text on channel 1, then Close.
    let path = "/api/v1/namespaces/etcd/pods/etcd-0/portforward?ports=1234";
    let (mut ws, _) = conn.ws(path, "v4.channel.k8s.io").await.unwrap();
    let (frames, close) = drain(&mut ws, false).await;
    assert_eq!(frames.len(), 3, "{frames:?}");
    assert_eq!(frames[0], (0, 1234u16.to_le_bytes().to_vec()));
    assert_eq!(frames[1], (1, 1234u16.to_le_bytes().to_vec()));
    assert_eq!(frames[2].0, 1);
    let err = String::from_utf8(frames[2].1.clone()).unwrap();
    assert!(
        err.starts_with("error forwarding port 1234 to pod "),
        "{err}"
    );
    assert!(
        err.contains("failed to connect to localhost:1234 inside namespace"),
        "{err}"
    );
    assert!(
        err.contains("dial tcp4 127.0.0.1:1234: connect: connection refused"),
        "{err}"
    );
    assert_eq!(close, Some(CloseCode::Normal));

    // No supported subprotocol offered: the handshake fails with 403.
    match conn.ws(PF, "v5.channel.k8s.io").await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected an HTTP error, got {:?}", other.map(|(_, p)| p)),
    }
    // No ports: 400 Status from the kubelet's option parsing.
    match conn
        .ws(
            "/api/v1/namespaces/etcd/pods/etcd-0/portforward",
            "v4.channel.k8s.io",
        )
        .await
    {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 400),
        other => panic!("expected an HTTP error, got {:?}", other.map(|(_, p)| p)),
    }
    // Unknown pod: 404.
    match conn
        .ws(
            "/api/v1/namespaces/etcd/pods/etcd-9/portforward?ports=2379",
            "v4.channel.k8s.io",
        )
        .await
    {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected an HTTP error, got {:?}", other.map(|(_, p)| p)),
    }
    assert_eq!(c.portforward_count(), 2);
    within("c.shutdown", c.shutdown()).await;
}

#[tokio::test]
async fn watch_ends_after_timeout_with_bookmark_and_unknown_paths_404() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(one_member()))
        .await
        .expect("start");
    let conn = conn(&c);
    let started = std::time::Instant::now();
    let resp = conn
        .get("/api/v1/namespaces/etcd/pods?watch=true&resourceVersion=0&timeoutSeconds=1&allowWatchBookmarks=true&labelSelector=app%3Detcd")
        .await;
    let took = started.elapsed();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("transfer-encoding: chunked"), "{resp}");
    assert!(resp.contains(r#""type":"ADDED""#), "{resp}");
    assert!(resp.contains(r#""type":"BOOKMARK""#), "{resp}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );

    // Streaming list (sendInitialEvents): ADDED, then the initial-events-end bookmark.
    let resp = conn
        .get("/api/v1/namespaces/etcd/pods?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1")
        .await;
    let added = resp.find(r#""type":"ADDED""#).expect("ADDED");
    let end = resp
        .find("k8s.io/initial-events-end")
        .expect("end bookmark");
    assert!(added < end, "{resp}");

    // A selector matching nothing: no ADDED event.
    let resp = conn
        .get("/api/v1/namespaces/etcd/pods?watch=1&timeoutSeconds=1&labelSelector=app%3Dother")
        .await;
    assert!(
        resp.starts_with("HTTP/1.1 200") && !resp.contains("ADDED"),
        "{resp}"
    );

    let resp = conn.get("/api/v1/nodes").await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    assert!(
        resp.contains("the server could not find the requested resource"),
        "{resp}"
    );
    let resp = conn
        .get("/api/v1/namespaces/etcd/pods?labelSelector=a%20b")
        .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    within("c.shutdown", c.shutdown()).await;
}

/// What a test that asserts silence waits for: long against a local round trip (well under
/// a millisecond here), short against the test.
const SILENCE: Duration = Duration::from_millis(500);

fn two_members() -> SimConfig {
    SimConfig {
        members: 2,
        ..SimConfig::default()
    }
}

/// Reads the two port-prefix frames the kubelet writes right after the upgrade.
async fn port_prefix<S>(ws: &mut WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for want in [[0u8, 0x4B, 0x09], [1, 0x4B, 0x09]] {
        match tokio::time::timeout(STEP, ws.next()).await.unwrap() {
            Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &want),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Sends `GET /health` (kept alive) on the data channel and waits for etcd's answer.
async fn health<S>(ws: &mut WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut req = vec![0u8];
    req.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    within("ws.send", ws.send(Message::Binary(req.into())))
        .await
        .unwrap();
    let mut text = String::new();
    while !text.contains("}") {
        match tokio::time::timeout(STEP, ws.next()).await.unwrap() {
            Some(Ok(Message::Binary(b))) if b[0] == 0 => {
                text.push_str(&String::from_utf8_lossy(&b[1..]));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    text
}

#[tokio::test]
async fn an_unanswered_upgrade_is_held_until_the_fault_clears_and_spares_other_pods() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(two_members()))
        .await
        .expect("start");
    let conn = Arc::new(conn(&c));
    c.set_portforward_fault("etcd-0", Some(PortForwardFault::Unanswered));
    let held = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let pf = "/api/v1/namespaces/etcd/pods/etcd-0/portforward?ports=2379";
            let (mut ws, _) = conn.ws(pf, "v4.channel.k8s.io").await.expect("upgrade");
            port_prefix(&mut ws).await;
            health(&mut ws).await
        })
    };
    let mut held = held;
    assert!(
        tokio::time::timeout(SILENCE, &mut held).await.is_err(),
        "the upgrade to etcd-0 is not answered"
    );
    // Another pod (another node's kubelet) answers meanwhile.
    let pf1 = "/api/v1/namespaces/etcd/pods/etcd-1/portforward?ports=2379";
    let (mut ws, _) = conn.ws(pf1, "v4.channel.k8s.io").await.expect("etcd-1");
    port_prefix(&mut ws).await;
    assert!(health(&mut ws).await.contains("\"health\":\"true\""));
    assert!(!held.is_finished(), "still held");

    c.set_portforward_fault("etcd-0", None);
    let answer = within("the held upgrade", held).await.expect("task");
    assert!(answer.contains("\"health\":\"true\""), "{answer}");
    within("c.shutdown", c.shutdown()).await;
}

#[tokio::test]
async fn a_black_hole_answers_the_upgrade_and_passes_nothing_after() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(one_member()))
        .await
        .expect("start");
    let conn = conn(&c);
    c.set_portforward_fault("etcd-0", Some(PortForwardFault::BlackHole));
    let (mut ws, proto) = conn.ws(PF, "v4.channel.k8s.io").await.expect("101");
    assert_eq!(proto.as_deref(), Some("v4.channel.k8s.io"));
    assert!(
        tokio::time::timeout(SILENCE, ws.next()).await.is_err(),
        "not even the port prefix arrives, nor a close"
    );
    assert_eq!(c.open_tunnels(), 1, "the socket stays open");

    c.set_portforward_fault("etcd-0", None);
    let (mut ws, _) = conn.ws(PF, "v4.channel.k8s.io").await.expect("101");
    port_prefix(&mut ws).await;
    assert!(health(&mut ws).await.contains("\"health\":\"true\""));
    within("c.shutdown", c.shutdown()).await;
}

#[tokio::test]
async fn a_silent_drop_freezes_open_tunnels_without_a_close_and_spares_new_ones() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(two_members()))
        .await
        .expect("start");
    let conn = conn(&c);
    let pf1 = "/api/v1/namespaces/etcd/pods/etcd-1/portforward?ports=2379";
    let (mut dropped, _) = conn.ws(PF, "v4.channel.k8s.io").await.expect("etcd-0");
    let (mut other, _) = conn.ws(pf1, "v4.channel.k8s.io").await.expect("etcd-1");
    for ws in [&mut dropped, &mut other] {
        port_prefix(ws).await;
        assert!(health(ws).await.contains("\"health\":\"true\""));
    }

    assert_eq!(c.drop_tunnels_silently(Some("etcd-0")), 1);
    let mut req = vec![0u8];
    req.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    // The write is accepted (the kernel buffers it); nothing comes back, not even a close.
    within("ws.send", dropped.send(Message::Binary(req.into())))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(SILENCE, dropped.next()).await.is_err(),
        "no answer, no close, no reset"
    );
    // The other pod's tunnel, and a new one to the same pod, work.
    assert!(health(&mut other).await.contains("\"health\":\"true\""));
    let (mut fresh, _) = conn
        .ws(PF, "v4.channel.k8s.io")
        .await
        .expect("a new tunnel");
    port_prefix(&mut fresh).await;
    assert!(health(&mut fresh).await.contains("\"health\":\"true\""));
    within("c.shutdown", c.shutdown()).await;
}

/// After the pod ends the connection, the WebSocket closes only after the runtime's grace
/// for the other direction (containerd: 1 s), or at once with no grace.
#[tokio::test]
async fn the_close_after_the_pod_ends_waits_for_the_runtimes_grace() {
    let c = within_for(START, "SimCluster::start", SimCluster::start(one_member()))
        .await
        .expect("start");
    let conn = conn(&c);
    // The time from etcd's last bytes (its answer to `Connection: close`) to the Close.
    let gap = || async {
        let (mut ws, _) = conn.ws(PF, "v4.channel.k8s.io").await.expect("101");
        port_prefix(&mut ws).await;
        let mut req = vec![0u8];
        req.extend_from_slice(VERSION_REQ);
        within("ws.send", ws.send(Message::Binary(req.into())))
            .await
            .unwrap();
        let mut last = tokio::time::Instant::now();
        loop {
            match tokio::time::timeout(STEP, ws.next()).await.unwrap() {
                Some(Ok(Message::Binary(_))) => last = tokio::time::Instant::now(),
                Some(Ok(Message::Close(_))) => return last.elapsed(),
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let with_grace = gap().await;
    assert!(
        with_grace >= Duration::from_millis(900),
        "closed {with_grace:?} after the pod's end: containerd waits 1 s"
    );
    c.set_close_grace(Duration::ZERO);
    let without = gap().await;
    assert!(
        without < Duration::from_millis(500),
        "closed {without:?} after the pod's end with no grace"
    );
    within("c.shutdown", c.shutdown()).await;
}
