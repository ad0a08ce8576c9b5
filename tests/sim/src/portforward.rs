//! The `pods/{name}/portforward` connect subresource over WebSocket
//! (`v4.channel.k8s.io`), byte-for-byte like the kubelet's handler.
//!
//! This is the part etcd-proxy depends on most, so it follows the Kubernetes
//! source closely rather than whatever would be convenient:
//! - handshake and framing: `pkg/kubelet/cri/streaming/portforward/websocket.go`
//!   and `staging/src/k8s.io/apimachinery/pkg/util/httpstream/wsstream/conn.go`;
//! - the dial inside the pod and its error text: the CRI runtime
//!   (containerd `sandbox_portforward_linux.go`), which dials `localhost:<port>`
//!   in the pod's network namespace.
//!
//! Per requested port `i`, channel `2i` carries data (both ways) and `2i+1`
//! errors (server to client only). Right after the upgrade the server writes
//! the port number, 2 bytes little-endian, on both channels. v4 has no
//! half-close: the only way to end a stream is to close the whole WebSocket,
//! which the server does when the pod's TCP connection ends, and the client
//! does when it is finished.
//!
//! The server's close comes [`RUNTIME_CLOSE_GRACE`] after the pod's end, not at once: the
//! runtime copies each direction in a goroutine of its own and, once one has ended, waits up
//! to 1 s for the other before closing the stream (containerd
//! `internal/cri/server/sandbox_portforward_linux.go` `portForward`: "give a chance to
//! terminate gracefully or timeout after 1s"). Over v4 the client-to-pod copy can only end
//! by a failed write to the pod or the WebSocket's end, so when the pod closes first the
//! client sees nothing for that second, then the close (the kubelet closes the WebSocket
//! when every port's `PortForward` has returned, `websocket.go` `run`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::api::{full, status_response, Body};
use crate::faults::ValveHandle;
use crate::idle::{self, Activity};
use crate::inflight::{Held, InFlight};
use crate::objects::{PodState, CLIENT_PORT, PEER_PORT};
use crate::{etcd, status, Shared};

/// Binary subprotocol: `[channel][payload]` binary messages.
const V4_BINARY: &str = "v4.channel.k8s.io";
/// Text subprotocol: `['0'+channel][base64(payload)]` text messages.
const V4_BASE64: &str = "v4.base64.channel.k8s.io";
/// Largest chunk read from the pod per message.
const CHUNK: usize = 32 * 1024;
/// How long to wait for the client's Close reply after the server closed.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// containerd's wait for the other direction once one has ended (module doc); the default
/// of [`crate::SimCluster::set_close_grace`].
pub(crate) const RUNTIME_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Registry of live port-forward sockets, for counting and fault injection.
#[derive(Debug)]
pub(crate) struct Tunnels {
    next_id: AtomicU64,
    upgrades: AtomicU64,
    open: Mutex<HashMap<u64, OpenSocket>>,
    /// The kubelet's streaming idle timeout (see [`crate::idle`]).
    idle_timeout: watch::Sender<Option<Duration>>,
    pub(crate) idle_closures: AtomicU64,
    /// Accepted SPDY upgrades (one per connection, each carrying many streams), plain or
    /// tunnelled through WebSocket.
    pub(crate) spdy_upgrades: AtomicU64,
    /// Of those, the ones tunnelled through WebSocket (`SPDY/3.1+portforward.k8s.io`).
    pub(crate) spdy_tunnels: AtomicU64,
}

/// One open socket: which pod it forwards to, how to kill it, and how to freeze its API
/// server connection.
#[derive(Debug)]
struct OpenSocket {
    pod: String,
    task: AbortHandle,
    valve: Option<ValveHandle>,
}

impl Default for Tunnels {
    fn default() -> Self {
        Tunnels {
            next_id: AtomicU64::new(0),
            upgrades: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            idle_timeout: watch::Sender::new(None),
            idle_closures: AtomicU64::new(0),
            spdy_upgrades: AtomicU64::new(0),
            spdy_tunnels: AtomicU64::new(0),
        }
    }
}

impl Tunnels {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, OpenSocket>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `task` as an open socket forwarding to `pod` over the API server connection of
    /// `valve`: counted by [`Tunnels::open`], killed by [`Tunnels::cut`] and
    /// [`Tunnels::cut_pod`], frozen by [`Tunnels::freeze`].
    pub(crate) fn register<F, Fut>(
        self: &Arc<Self>,
        pod: String,
        valve: Option<ValveHandle>,
        task: F,
    ) where
        F: FnOnce(u64) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        // Hold the registry lock across spawn so the task cannot finish (and
        // deregister) before it is registered.
        let mut open = self.lock();
        let reg = Registration {
            tunnels: self.clone(),
            id,
        };
        let handle = tokio::spawn(async move {
            let _reg = reg;
            task(id).await;
        });
        open.insert(
            id,
            OpenSocket {
                pod,
                task: handle.abort_handle(),
                valve,
            },
        );
    }

    /// The idle timeout, to follow its changes.
    pub(crate) fn idle_timeout_watch(&self) -> watch::Receiver<Option<Duration>> {
        self.idle_timeout.subscribe()
    }

    /// A number for a connection, for messages.
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::SeqCst)
    }

    /// Accepted SPDY upgrades so far.
    pub fn spdy_upgrades(&self) -> u64 {
        self.spdy_upgrades.load(Ordering::SeqCst)
    }

    /// Accepted SPDY connections tunnelled through WebSocket so far.
    pub fn spdy_tunnels(&self) -> u64 {
        self.spdy_tunnels.load(Ordering::SeqCst)
    }

    /// Accepted WebSocket upgrades so far.
    pub fn upgrades(&self) -> u64 {
        self.upgrades.load(Ordering::SeqCst)
    }

    /// Sockets currently open.
    pub fn open(&self) -> usize {
        self.lock().len()
    }

    /// Aborts every open socket: its WebSocket and pod TCP connection are dropped without a Close.
    pub fn cut(&self) {
        self.cut_where(|_| true);
    }

    /// Aborts the sockets forwarding to `pod`.
    pub fn cut_pod(&self, pod: &str) {
        self.cut_where(|s| s.pod == pod);
    }

    /// Freezes the API server connections of the sockets to `pod` (all with `None`); they
    /// stay registered. Returns how many.
    pub fn freeze(&self, pod: Option<&str>) -> usize {
        let open = self.lock();
        let mut n = 0;
        for s in open.values() {
            if pod.is_none_or(|p| p == s.pod) {
                if let Some(v) = &s.valve {
                    v.freeze();
                    n += 1;
                }
            }
        }
        n
    }

    fn cut_where(&self, pick: impl Fn(&OpenSocket) -> bool) {
        let handles: Vec<AbortHandle> = {
            let mut open = self.lock();
            let ids: Vec<u64> = open
                .iter()
                .filter(|(_, s)| pick(s))
                .map(|(id, _)| *id)
                .collect();
            ids.iter()
                .filter_map(|id| open.remove(id))
                .map(|s| s.task)
                .collect()
        };
        for h in handles {
            h.abort();
        }
    }

    /// Sets the idle timeout; open sockets pick it up at once.
    pub fn set_idle_timeout(&self, timeout: Option<Duration>) {
        self.idle_timeout.send_replace(timeout);
    }

    /// Sockets closed by the idle timeout so far.
    pub fn idle_closures(&self) -> u64 {
        self.idle_closures.load(Ordering::SeqCst)
    }
}

/// Removes a socket from the registry when its task ends or is aborted.
struct Registration {
    tunnels: Arc<Tunnels>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tunnels.lock().remove(&self.id);
    }
}

/// The negotiated framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Binary,
    Base64,
}

impl Codec {
    fn encode(self, channel: u8, payload: &[u8]) -> Message {
        match self {
            Codec::Binary => {
                let mut v = Vec::with_capacity(payload.len() + 1);
                v.push(channel);
                v.extend_from_slice(payload);
                Message::Binary(Bytes::from(v))
            }
            Codec::Base64 => {
                let mut s = String::with_capacity(payload.len() * 4 / 3 + 5);
                s.push(char::from(b'0' + channel));
                base64::engine::general_purpose::STANDARD.encode_string(payload, &mut s);
                Message::Text(s.into())
            }
        }
    }

    /// `(channel, payload)` of a data message; `None` for frames carrying no data.
    fn decode(self, msg: &Message) -> Option<(u8, Vec<u8>)> {
        match (self, msg) {
            (Codec::Binary, Message::Binary(b)) => {
                let (&ch, rest) = b.split_first()?;
                Some((ch, rest.to_vec()))
            }
            (Codec::Base64, Message::Text(t)) => {
                let bytes = t.as_bytes();
                let (&ch, rest) = bytes.split_first()?;
                let payload = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .ok()?;
                Some((ch.checked_sub(b'0')?, payload))
            }
            _ => None,
        }
    }
}

/// The WebSocket subprotocols a request offers, in order (comma-separated values of every
/// `Sec-WebSocket-Protocol` header).
pub(crate) fn offered_subprotocols(req: &Request<Incoming>) -> Vec<String> {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Picks the first client-offered subprotocol the port-forward handler allows
/// (`conn.go` `handshake`; allowed set from `websocket.go` `handleWebSocketStreams`:
/// "", `v4.channel.k8s.io`, `v4.base64.channel.k8s.io`; there is no v5 for port-forward).
/// `Some(None)` means "no protocol requested" (binary framing, no response header).
fn negotiate(req: &Request<Incoming>) -> Option<(Option<&'static str>, Codec)> {
    let offered = offered_subprotocols(req);
    if offered.is_empty() {
        return Some((None, Codec::Binary));
    }
    offered.iter().find_map(|p| match p.as_str() {
        V4_BINARY => Some((Some(V4_BINARY), Codec::Binary)),
        V4_BASE64 => Some((Some(V4_BASE64), Codec::Base64)),
        _ => None,
    })
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Parses the requested ports like `NewV4Options` (`websocket.go`): comma-separated, 1..=65535.
fn parse_ports(query: &HashMap<String, String>) -> Result<Vec<u16>, String> {
    // The apiserver turns `PodPortForwardOptions.Ports` (`ports=`) into the
    // kubelet's `port=` (`pkg/registry/core/pod/strategy.go` `streamParams`);
    // the kubelet insists on it.
    let raw = query
        .get("ports")
        .or_else(|| query.get("port"))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "query parameter \"port\" is required".to_string())?;
    let ports: Vec<u16> = raw
        .split(',')
        .map(|s| {
            let s = s.trim();
            match s.parse::<u16>() {
                Ok(0) => Err(format!("port {s:?} must be > 0")),
                Ok(p) => Ok(p),
                Err(e) => Err(format!("unable to parse {s:?} as a port: {e}")),
            }
        })
        .collect::<Result<_, _>>()?;
    // Channel ids are one byte and 255 is reserved (conn.go), so at most 127 ports.
    if ports.len() > 127 {
        return Err(format!("too many ports requested: {}", ports.len()));
    }
    Ok(ports)
}

/// Handles the connect request: validation, handshake, then a background socket task.
pub(crate) fn handle(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    namespace: &str,
    pod_name: &str,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let pod = if namespace == shared.cfg.namespace {
        shared.store.pod_state(pod_name)
    } else {
        None
    };
    let Some(pod) = pod else {
        return status_response(status::not_found("", "pods", pod_name));
    };
    let is_ws = header_has_token(&req, header::CONNECTION, "upgrade")
        && header_has_token(&req, header::UPGRADE, "websocket");
    if !is_ws {
        if !header_has_token(&req, header::CONNECTION, "upgrade") {
            // The apiserver's UpgradeAwareHandler (upgradeRequired=true) refuses plain
            // requests (`apimachinery/pkg/util/proxy/upgradeaware.go`).
            return status_response(status::bad_request("Upgrade request required"));
        }
        // Any other upgrade goes to the kubelet's SPDY handler (`ServePortForward`:
        // WebSocket requests to `handleWebSocketStreams`, the rest to `handleHttpStreams`).
        return crate::spdy::handle(shared, req, pod);
    }
    // From 1.31 (`PortForwardWebsockets`) the API server serves WebSocket requests that ask
    // for the SPDY tunnel itself (`subresources.go`: `translator.NewTranslatingHandler(…,
    // wsstream.IsWebSocketRequestWithTunnelingProtocol)`); others go on to the kubelet.
    if shared.cfg.kubernetes_minor >= 31 {
        if let Some(offered) = crate::spdy::tunnel_request(&req) {
            return crate::spdy::handle_tunnel(shared, req, pod, offered);
        }
    }
    // `NewV4Options` wants ports only from WebSocket requests; SPDY carries them per stream.
    let ports = match parse_ports(query) {
        Ok(p) => p,
        Err(msg) => return status_response(status::bad_request(&msg)),
    };
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = key.filter(|_| version_ok) else {
        // golang.org/x/net/websocket answers a bad handshake with a bare 400.
        let mut res = Response::new(full(Bytes::new()));
        *res.status_mut() = StatusCode::BAD_REQUEST;
        res.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return res;
    };
    let Some((protocol, codec)) = negotiate(&req) else {
        // x/net/websocket turns a failed `Handshake` callback into a bare 403.
        let mut res = Response::new(full(Bytes::new()));
        *res.status_mut() = StatusCode::FORBIDDEN;
        return res;
    };

    let valve = req.extensions().get::<ValveHandle>().cloned();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tunnels = shared.tunnels.clone();
    tunnels.upgrades.fetch_add(1, Ordering::SeqCst);
    let id = tunnels.next_id.fetch_add(1, Ordering::SeqCst);
    {
        // Hold the registry lock across spawn so the task cannot finish (and
        // deregister) before it is registered.
        let mut open = tunnels.lock();
        let reg = Registration {
            tunnels: tunnels.clone(),
            id,
        };
        let pod_name = pod.name.clone();
        let frozen = valve.clone();
        let task = tokio::spawn(async move {
            let _reg = reg;
            match on_upgrade.await {
                Ok(upgraded) => {
                    shared.faults.after_upgrade(&pod.name, frozen.as_ref());
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        None,
                    )
                    .await;
                    session(shared, ws, pod, ports, codec).await;
                }
                Err(e) => tracing::debug!("port-forward upgrade failed: {e}"),
            }
        });
        open.insert(
            id,
            OpenSocket {
                pod: pod_name,
                task: task.abort_handle(),
                valve,
            },
        );
    }

    let mut res = Response::new(full(Bytes::new()));
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    res
}

/// Where "localhost:<port> inside the pod" really is.
pub(crate) fn pod_local_target(shared: &Shared, pod: &PodState, port: u16) -> SocketAddr {
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let member = shared.member(&pod.name);
    let real = match (port, member.as_ref().map(|m| &m.spec)) {
        // etcd's client listener. When the simulated etcd listens "only on the
        // pod IP" it is bound to 127.0.0.2, so 127.0.0.1 genuinely refuses.
        (CLIENT_PORT, Some(m)) => Some(m.client_port),
        (PEER_PORT, Some(m)) => Some(m.peer_port),
        _ => None,
    };
    // Nothing listens on other ports in the pod: dial a port just released.
    let port = real.or_else(|| etcd::free_port(lo).ok()).unwrap_or(1);
    SocketAddr::new(lo, port)
}

/// Go's rendering of a failed dial (`net.OpError`).
fn go_dial_error(net: &str, addr: &str, e: &std::io::Error) -> String {
    let why = match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        std::io::ErrorKind::TimedOut => "i/o timeout".to_string(),
        _ => e.to_string(),
    };
    format!("dial {net} {addr}: connect: {why}")
}

/// The error text the kubelet writes on the error channel when the runtime's
/// dial fails. The CRI streaming server passes the sandbox id as the "pod" and
/// an empty uid (`pkg/kubelet/cri/streaming/server.go` `servePortForward`),
/// hence `uid :`; the rest is containerd's wrapping of both dial attempts.
///
/// For a host-network pod (the control-plane layout) containerd dials in its own network
/// namespace and names it `"host"` (`sandbox_portforward_linux.go`: `netNSPath = "host"`).
pub(crate) fn forward_error(
    pod: &PodState,
    port: u16,
    e: &std::io::Error,
    host_network: bool,
) -> String {
    let v4 = go_dial_error("tcp4", &format!("127.0.0.1:{port}"), e);
    let v6 = go_dial_error("tcp6", &format!("[::1]:{port}"), e);
    let netns = if host_network {
        "host".to_string()
    } else {
        format!("/var/run/netns/cni-{}", pod.netns_id)
    };
    format!(
        "error forwarding port {port} to pod {sandbox}, uid : failed to execute portforward in network namespace \"{netns}\": failed to connect to localhost:{port} inside namespace \"{sandbox}\", IPv4: {v4} IPv6 {v6} ",
        sandbox = pod.sandbox_id,
    )
}

/// Bytes for the pod, to be written no earlier than the instant, and their place in the
/// connection's budget toward the pod.
type ToPod = mpsc::Sender<(Instant, Vec<u8>, Option<Held>)>;

/// A message to the client, to be sent no earlier than `due`, and the place its data takes in
/// the connection's budget toward the client (none for control messages).
type Outgoing = (Instant, Message, Option<Held>);

/// Queue lengths far above what the in-flight budgets let through: bytes bind, not messages.
pub(crate) const QUEUE: usize = 4096;

/// Runs one port-forward socket until the pod side or the client ends it.
async fn session<S>(
    shared: Arc<Shared>,
    ws: WebSocketStream<S>,
    pod: PodState,
    ports: Vec<u16>,
    codec: Codec,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let mut tasks = JoinSet::new();
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(QUEUE);
    // The connection's budgets of bytes in flight, each way (`inflight`).
    let (toward_client, toward_pod) = (InFlight::new(), InFlight::new());
    let activity = Arc::new(Activity::new());
    let idle = idle::expired(&activity, shared.tunnels.idle_timeout.subscribe());
    tokio::pin!(idle);
    // Writer: delivers queued messages in order, each after its due time.
    let sent = activity.clone();
    let sh = shared.clone();
    tasks.spawn(async move {
        while let Some((due, msg, held)) = out_rx.recv().await {
            wait_until(due).await;
            let closing = msg.is_close();
            if !closing {
                // conn.go `write` resets the idle deadline before sending.
                sent.touch();
            }
            if sink.send(msg).await.is_err() || closing {
                break;
            }
            if let Some(held) = held {
                held.acked(sh.latency());
            }
        }
    });
    let due = || Instant::now() + shared.latency();

    // Initial frames: the port, little-endian, on the data then the error channel.
    for (i, port) in ports.iter().enumerate() {
        let (data_ch, err_ch) = channels(i);
        for ch in [data_ch, err_ch] {
            if out_tx
                .send((due(), codec.encode(ch, &port.to_le_bytes()), None))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    // One pod TCP connection per port, dialled eagerly.
    let (done_tx, mut done_rx) = mpsc::channel::<usize>(ports.len().max(1));
    let mut to_pod: Vec<Option<ToPod>> = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        let (data_ch, err_ch) = channels(i);
        let target = pod_local_target(&shared, &pod, port);
        match TcpStream::connect(target).await {
            Err(e) => {
                let host_network = shared.cfg.layout == crate::Layout::ControlPlane;
                let text = forward_error(&pod, port, &e, host_network);
                let _ = out_tx
                    .send((due(), codec.encode(err_ch, text.as_bytes()), None))
                    .await;
                let _ = done_tx.send(i).await;
                to_pod.push(None);
            }
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                let (mut rd, mut wr) = tcp.into_split();
                let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>, Option<Held>)>(QUEUE);
                to_pod.push(Some(tx));
                let out = out_tx.clone();
                let done = done_tx.clone();
                let sh = shared.clone();
                let budget = toward_client.clone();
                tasks.spawn(async move {
                    let to_client = async {
                        let mut buf = vec![0u8; CHUNK];
                        loop {
                            match rd.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    let held = budget.reserve(n).await;
                                    let at = Instant::now() + sh.latency();
                                    let msg = codec.encode(data_ch, &buf[..n]);
                                    if out.send((at, msg, held)).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    };
                    let to_pod = async {
                        while let Some((at, bytes, held)) = rx.recv().await {
                            wait_until(at).await;
                            if wr.write_all(&bytes).await.is_err() {
                                return;
                            }
                            if let Some(held) = held {
                                held.acked(sh.latency());
                            }
                        }
                    };
                    tokio::pin!(to_client, to_pod);
                    // The first direction to end starts the runtime's grace for the other.
                    tokio::select! {
                        () = &mut to_client => {
                            let _ = tokio::time::timeout(sh.close_grace(), &mut to_pod).await;
                        }
                        () = &mut to_pod => {
                            let _ = tokio::time::timeout(sh.close_grace(), &mut to_client).await;
                        }
                    }
                    let _ = done.send(i).await;
                });
            }
        }
    }

    let mut finished = vec![false; ports.len()];
    let mut closing_since: Option<Instant> = None;
    loop {
        let grace = async {
            match closing_since {
                Some(t) => tokio::time::sleep_until(t + CLOSE_GRACE).await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(m)) => {
                    if m.is_binary() || m.is_text() {
                        // A received message resets the idle deadline, whatever
                        // its channel; Ping/Pong do not (see `idle`).
                        activity.touch();
                    }
                    let Some((ch, payload)) = codec.decode(&m) else { continue };
                    let idx = usize::from(ch / 2);
                    // Odd channels are write-only (error); unknown channels are ignored (conn.go).
                    if ch % 2 == 1 || payload.is_empty() {
                        continue;
                    }
                    if let Some(Some(tx)) = to_pod.get(idx) {
                        // One TCP connection: a full budget holds up every channel.
                        let held = toward_pod.reserve(payload.len()).await;
                        let _ = tx.send((due(), payload, held)).await;
                    }
                }
            },
            Some(i) = done_rx.recv() => {
                if let Some(f) = finished.get_mut(i) {
                    *f = true;
                }
                if closing_since.is_none() && finished.iter().all(|f| *f) {
                    // Every port is done: close the WebSocket (conn.Close()).
                    let close = Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "".into(),
                    }));
                    let _ = out_tx.send((due(), close, None)).await;
                    closing_since = Some(Instant::now() + shared.latency());
                }
            }
            _ = grace => break,
            _ = &mut idle => {
                // conn.go's receive fails with an i/o timeout and `Close` cannot
                // write its Close frame past the deadline: the socket just ends.
                shared.tunnels.idle_closures.fetch_add(1, Ordering::SeqCst);
                tracing::debug!("port-forward to {} closed by the idle timeout", pod.name);
                break;
            }
        }
    }
    // Dropping `tasks` aborts the pod connections and the writer.
    drop(to_pod);
    tasks.shutdown().await;
}

/// `(data, error)` channel numbers of the i-th port.
fn channels(i: usize) -> (u8, u8) {
    let data = u8::try_from(i * 2).unwrap_or(u8::MAX - 1);
    (data, data.saturating_add(1))
}

/// Waits for an injected delay. Without latency the frame is already due and goes at once:
/// tokio's timer rounds every sleep up to its next 1 ms tick, which would add a millisecond
/// per frame that no real API server adds.
pub(crate) async fn wait_until(due: Instant) {
    if due > Instant::now() {
        tokio::time::sleep_until(due).await;
    }
}
