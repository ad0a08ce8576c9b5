//! SPDY port-forward and its authorization, checked against real clients:
//! - the real `kubectl port-forward` (1.32, Go's spdystream) through a Role with only
//!   `create` on `pods/portforward`: kubectl's WebSocket attempt (a GET) is refused, it
//!   falls back to SPDY (a POST) and forwards (skipped when kubectl is not installed);
//! - raw upgrade requests, for the verb-by-method rules and the 1.35 `create` re-check.

use std::future::{Future, IntoFuture};
use std::process::Stdio;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use etcd_proxy_sim::{within_for, SimCluster, SimConfig};

const STEP: Duration = Duration::from_secs(15);
const START: Duration = Duration::from_secs(90);

#[track_caller]
fn within<'a, F: IntoFuture + 'a>(what: &'a str, fut: F) -> impl Future<Output = F::Output> + 'a {
    within_for(STEP, what, fut)
}

fn one_member(minor: u32) -> SimConfig {
    SimConfig {
        members: 1,
        kubernetes_minor: minor,
        ..SimConfig::default()
    }
}

/// The kubeconfig as JSON.
fn kubeconfig(c: &SimCluster) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(c.kubeconfig_path()).unwrap()).unwrap()
}

/// The bearer token of `user`.
fn token(c: &SimCluster, user: &str) -> String {
    kubeconfig(c)["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == user)
        .unwrap()["user"]["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn tls(c: &SimCluster) -> tokio_rustls::TlsConnector {
    c.api_tls_connector()
        .expect("a TLS connector for the API server")
}

/// Sends one upgrade request as `user` and returns the status code and the body of a
/// refusal (up to 4 KiB).
async fn upgrade(c: &SimCluster, user: &str, websocket: bool) -> (u16, String) {
    let addr = c.api_url().trim_start_matches("https://").to_owned();
    let tcp = within("connect", TcpStream::connect(&addr)).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut s = within("tls", tls(c).connect(name, tcp)).await.unwrap();
    let path = "/api/v1/namespaces/etcd/pods/etcd-0/portforward";
    let token = token(c, user);
    let req = if websocket {
        // What kube-rs sends (GET, v4 subprotocol, ports in the query).
        format!(
            "GET {path}?ports=2379 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
        )
    } else {
        // What client-go's SPDY round tripper sends.
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
             Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
             X-Stream-Protocol-Version: portforward.k8s.io\r\nContent-Length: 0\r\n\r\n"
        )
    };
    within("write", s.write_all(req.as_bytes())).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = within("read", s.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let code: u16 = head[9..12].parse().unwrap();
    if code == 101 {
        return (code, String::new());
    }
    // The refusal's body (Content-Length framed, as hyper writes full bodies).
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = within("read body", s.read(&mut chunk)).await.unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    (code, String::from_utf8_lossy(&buf[head_end..]).into_owned())
}

/// Verb by method (`requestinfo.go`), and from 1.35 `create` for WebSocket too
/// (`subresources.go` `ensureAuthorizedForVerb`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_by_method_and_version() {
    for minor in [31, 35] {
        let c = within_for(
            START,
            "SimCluster::start",
            SimCluster::start(one_member(minor)),
        )
        .await
        .expect("start");
        let ws_create_ok = minor < 35;
        // (user, WebSocket allowed, SPDY allowed)
        let table = [
            ("sim-admin", true, true),
            ("sim-portforward-create", false, true),
            ("sim-portforward-get", ws_create_ok, false),
            ("sim-no-portforward", false, false),
        ];
        for (user, ws_ok, spdy_ok) in table {
            let (code, body) = upgrade(&c, user, true).await;
            assert_eq!(
                code,
                if ws_ok { 101 } else { 403 },
                "1.{minor} {user} WebSocket: {body}"
            );
            let (code, body) = upgrade(&c, user, false).await;
            assert_eq!(
                code,
                if spdy_ok { 101 } else { 403 },
                "1.{minor} {user} SPDY: {body}"
            );
            if !spdy_ok {
                let status: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(status["reason"], "Forbidden");
                assert_eq!(
                    status["message"],
                    format!(
                        "pods \"etcd-0\" is forbidden: User \"{user}\" cannot create resource \
                         \"pods/portforward\" in API group \"\" in the namespace \"etcd\""
                    )
                );
            }
        }
        // The 1.35 re-check answers with the resource, the name and RBAC's empty reason.
        if minor >= 35 {
            let (_, body) = upgrade(&c, "sim-portforward-get", true).await;
            let status: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(status["message"], "pods \"etcd-0\" is forbidden: ");
            assert_eq!(status["code"], 403);
        } else {
            let (_, body) = upgrade(&c, "sim-portforward-create", true).await;
            assert!(
                body.contains("cannot get resource \\\"pods/portforward\\\""),
                "{body}"
            );
        }
        within("shutdown", c.shutdown()).await;
    }
}

/// Whether kubectl is installed (the kubectl checks are skipped without it).
fn have_kubectl() -> bool {
    let ok = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("kubectl not installed: skipping the kubectl port-forward check");
    }
    ok
}

/// Runs `kubectl port-forward pod/etcd-0 :2379` as `context` and checks etcd's health twice
/// through it (two TCP connections).
async fn kubectl_forward(c: &SimCluster, context: &str) {
    let mut kubectl = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(c.kubeconfig_path())
        .args(["--context", context, "port-forward", "pod/etcd-0", ":2379"])
        .env_remove("KUBECTL_PORT_FORWARD_WEBSOCKETS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(kubectl.stdout.take().unwrap()).lines();
    // "Forwarding from 127.0.0.1:PORT -> 2379"
    let port = loop {
        let Some(line) = within("kubectl's Forwarding line", lines.next_line())
            .await
            .unwrap()
        else {
            let mut err = String::new();
            let mut stderr = kubectl.stderr.take().unwrap();
            let _ = within("kubectl's stderr", stderr.read_to_string(&mut err)).await;
            panic!("kubectl exited: {err}");
        };
        if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
            break rest.split(' ').next().unwrap().parse::<u16>().unwrap();
        }
    };
    for _ in 0..2 {
        let mut s = within("connect", TcpStream::connect(("127.0.0.1", port)))
            .await
            .unwrap();
        within(
            "write",
            s.write_all(b"GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n"),
        )
        .await
        .unwrap();
        let mut resp = Vec::new();
        within("read the health answer", s.read_to_end(&mut resp))
            .await
            .unwrap();
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.contains("\"health\":\"true\""), "{resp}");
    }
    let _ = kubectl.start_kill();
    let _ = within("kubectl exits", kubectl.wait()).await;
}

/// The anchor: real kubectl (1.32) through a Role with only `create` on pods/portforward.
/// Its WebSocket tunnel (a GET, verb `get`) is refused; it falls back to a SPDY POST, and
/// both forwarded connections share that one SPDY connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_port_forward_with_a_create_only_role() {
    if !have_kubectl() {
        return;
    }
    let c = within_for(
        START,
        "SimCluster::start",
        SimCluster::start(one_member(33)),
    )
    .await
    .expect("start");
    kubectl_forward(&c, "sim-portforward-create").await;
    assert_eq!(c.spdy_upgrade_count(), 1, "one SPDY connection for both");
    assert_eq!(c.spdy_tunnel_count(), 0, "the WebSocket GET was refused");
    assert_eq!(c.portforward_count(), 0);
    within("shutdown", c.shutdown()).await;
}

/// With both verbs, kubectl ≥ 1.31 tunnels SPDY through a WebSocket where the API server
/// offers that (1.31+), and falls back to the SPDY POST where it does not (1.30).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_port_forward_tunnels_through_websocket_from_1_31() {
    if !have_kubectl() {
        return;
    }
    for (minor, tunnels) in [(33, 1), (30, 0)] {
        let c = within_for(
            START,
            "SimCluster::start",
            SimCluster::start(one_member(minor)),
        )
        .await
        .expect("start");
        kubectl_forward(&c, "sim").await;
        assert_eq!(c.spdy_upgrade_count(), 1, "1.{minor}");
        assert_eq!(c.spdy_tunnel_count(), tunnels, "1.{minor}");
        within("shutdown", c.shutdown()).await;
    }
}

/// Raw SPDY against the kubelet side, for the rules kubectl never exercises: invalid streams
/// are reset without a reply, a second error stream in a pair is reported on the first,
/// pings are echoed, a pair forwards and then ends both streams, a refused dial is reported
/// as the kubelet's text on the error stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_stream_rules() {
    use bytes::{Bytes, BytesMut};
    use etcd_proxy_sim::spdy_frame::{rst, Decoder, Encoder, Frame, FLAG_FIN};

    let c = within_for(
        START,
        "SimCluster::start",
        SimCluster::start(one_member(33)),
    )
    .await
    .expect("start");
    let addr = c.api_url().trim_start_matches("https://").to_owned();
    let tcp = within("connect", TcpStream::connect(&addr)).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut s = within("tls", tls(&c).connect(name, tcp)).await.unwrap();
    let req = format!(
        "POST /api/v1/namespaces/etcd/pods/etcd-0/portforward HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\
         X-Stream-Protocol-Version: portforward.k8s.io\r\nContent-Length: 0\r\n\r\n",
        token(&c, "sim-admin")
    );
    within("write", s.write_all(req.as_bytes())).await.unwrap();
    let mut buf = BytesMut::new();
    let head_end = loop {
        within("read", s.read_buf(&mut buf)).await.unwrap();
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("x-stream-protocol-version: portforward.k8s.io"),
        "{head}"
    );
    let _ = buf.split_to(head_end);

    let mut enc = Encoder::new().unwrap();
    let mut dec = Decoder::new();
    let h = |kind: &str, port: &str, request: &str| {
        vec![
            ("streamtype".to_owned(), kind.to_owned()),
            ("port".to_owned(), port.to_owned()),
            ("requestid".to_owned(), request.to_owned()),
        ]
    };
    let syn = |id: u32, headers| Frame::SynStream {
        stream_id: id,
        associated_to: 0,
        priority: 0,
        flags: 0,
        headers,
    };
    let data = |id: u32, flags: u8, bytes: &'static [u8]| Frame::Data {
        stream_id: id,
        flags,
        data: Bytes::from_static(bytes),
    };
    let mut out = BytesMut::new();
    for f in [
        // No port: reset, no reply.
        syn(1, vec![("streamtype".to_owned(), "data".to_owned())]),
        // A pair with a duplicate error stream.
        syn(3, h("error", "2379", "7")),
        syn(5, h("error", "2379", "7")),
        Frame::Ping { id: 1 },
    ] {
        enc.encode(&f, &mut out).unwrap();
    }
    within("write", s.write_all(&out)).await.unwrap();

    // Reads frames until `done` says stop; returns them all.
    async fn read_until(
        s: &mut (impl tokio::io::AsyncRead + Unpin),
        dec: &mut Decoder,
        buf: &mut BytesMut,
        seen: &mut Vec<Frame>,
        done: impl Fn(&[Frame]) -> bool,
    ) {
        while !done(seen) {
            match dec.decode(buf).unwrap() {
                Some(f) => seen.push(f),
                None => {
                    let n = within("read frames", s.read_buf(buf)).await.unwrap();
                    assert!(n > 0, "closed; saw {seen:?}");
                }
            }
        }
    }
    // Everything received on one stream, as text.
    fn payload(seen: &[Frame], id: u32) -> String {
        let bytes: Vec<u8> = seen
            .iter()
            .filter_map(|f| match f {
                Frame::Data {
                    stream_id, data, ..
                } if *stream_id == id => Some(data.to_vec()),
                _ => None,
            })
            .flatten()
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    let mut seen = Vec::new();
    read_until(&mut s, &mut dec, &mut buf, &mut seen, |f| {
        f.iter().any(|f| matches!(f, Frame::Ping { id: 1 }))
            && f.iter().any(|f| {
                matches!(f, Frame::Data { stream_id: 3, data, .. }
                    if data.starts_with(b"error processing stream for request 7: error stream already assigned"))
            })
    })
    .await;
    assert!(seen.contains(&Frame::RstStream {
        stream_id: 1,
        status: rst::CANCEL
    }));
    assert!(!seen
        .iter()
        .any(|f| matches!(f, Frame::SynReply { stream_id: 1, .. })));
    for id in [3, 5] {
        assert!(
            seen.iter()
                .any(|f| matches!(f, Frame::SynReply { stream_id, .. } if *stream_id == id)),
            "{id}: {seen:?}"
        );
    }

    // Complete the pair and talk to etcd; then the server ends both streams.
    out.clear();
    enc.encode(&syn(7, h("data", "2379", "7")), &mut out)
        .unwrap();
    enc.encode(
        &data(
            7,
            FLAG_FIN,
            b"GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n",
        ),
        &mut out,
    )
    .unwrap();
    within("write", s.write_all(&out)).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut s, &mut dec, &mut buf, &mut seen, |f| {
        f.iter()
            .any(|f| matches!(f, Frame::Data { stream_id: 7, flags, .. } if flags & FLAG_FIN != 0))
    })
    .await;
    let body = payload(&seen, 7);
    assert!(body.contains("\"health\":\"true\""), "{body}");
    // The error stream ended too (empty: success), before the data stream.
    let fin = |id: u32| {
        seen.iter()
            .position(|f| matches!(f, Frame::Data { stream_id, flags, .. } if *stream_id == id && flags & FLAG_FIN != 0))
    };
    assert!(fin(3).unwrap() < fin(7).unwrap(), "{seen:?}");

    // A port nothing listens on: the kubelet's error text, then both streams end.
    out.clear();
    enc.encode(&syn(9, h("error", "1", "8")), &mut out).unwrap();
    enc.encode(&syn(11, h("data", "1", "8")), &mut out).unwrap();
    within("write", s.write_all(&out)).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut s, &mut dec, &mut buf, &mut seen, |f| {
        f.iter()
            .any(|f| matches!(f, Frame::Data { stream_id: 11, flags, .. } if flags & FLAG_FIN != 0))
    })
    .await;
    let text = payload(&seen, 9);
    assert!(
        text.starts_with("error forwarding port 1 to pod ") && text.contains("connection refused"),
        "{text}"
    );
    drop(s);
    within("shutdown", c.shutdown()).await;
}
