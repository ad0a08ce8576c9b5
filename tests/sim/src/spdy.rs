//! The `pods/{name}/portforward` connect subresource over SPDY/3.1
//! (`portforward.k8s.io`), as the kubelet's CRI streaming server serves it.
//!
//! What it follows:
//! - the upgrade and protocol negotiation: `staging/src/k8s.io/apimachinery/pkg/util/httpstream/spdy/upgrade.go`
//!   (`UpgradeResponse`) and `.../httpstream/httpstream.go` (`Handshake`);
//! - stream validation, pairing by `requestid`, the 30 s creation timeout and the
//!   error-stream texts: `pkg/kubelet/cri/streaming/portforward/httpstream.go`;
//! - connection behaviour (SYN_REPLY at once, no SETTINGS/PING/WINDOW_UPDATE of its own,
//!   pings echoed, GOAWAY ends reading, no flow control, blocking delivery of DATA):
//!   `moby/spdystream` `connection.go`, `stream.go`;
//! - the dial and copy in the pod, with its 1 s grace after either side ends:
//!   containerd `internal/cri/server/sandbox_portforward_linux.go`.
//!
//! Also the API server's WebSocket tunnel for SPDY (`SPDY/3.1+portforward.k8s.io`, what
//! kubectl ≥ 1.31 tries first), from 1.31 on: [`handle_tunnel`].
//!
//! The frame codec is etcd-proxy's own (`src/k8s/spdy/{frame,zlib}.rs`, compiled here
//! with `#[path]`). Sharing it is safe because the real `kubectl port-forward` (Go's
//! spdystream on the client side) is tested against this server: that pins both the
//! encoding and the decoding to Go's.
//!
//! Deliberate simplifications, each invisible to a client that behaves like kubectl: the
//! frame workers (5 queues by `stream-id mod 5`) are one queue, so there is no
//! head-of-line blocking between unrelated streams beyond what one queue gives; and a
//! failed copy after a successful dial writes no error text (newer kubelets reset instead).

#[path = "../../../src/k8s/spdy/frame.rs"]
pub mod frame;
#[path = "../../../src/k8s/spdy/zlib.rs"]
pub mod zlib;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role as WsRole};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::api::{full, Body};
use crate::faults::ValveHandle;
use crate::idle::{self, Activity};
use crate::inflight::{Held, InFlight};
use crate::objects::PodState;
use crate::portforward::{
    forward_error, offered_subprotocols, pod_local_target, wait_until, QUEUE,
};
use crate::Shared;
use frame::{rst, Decoder, Encoder, Frame, FLAG_FIN};

/// The only subprotocol the streaming server supports (`portforward/constants.go`).
const PROTOCOL: &str = "portforward.k8s.io";
const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
/// `streamCreationTimeout` default (`pkg/kubelet/cri/streaming/server.go` `DefaultConfig`).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Go's `io.Copy` buffer: the largest DATA frame the runtime writes.
const CHUNK: usize = 32 * 1024;

fn header_contains(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.to_ascii_lowercase().contains(token))
    })
}

fn text(code: StatusCode, body: String) -> Response<Body> {
    let mut res = Response::new(full(body));
    *res.status_mut() = code;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// Serves a (non-WebSocket) upgrade request for `pod`: `UpgradeResponse` plus `Handshake`.
pub(crate) fn handle(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    pod: PodState,
) -> Response<Body> {
    // upgrade.go `UpgradeResponse`: case-insensitive substring checks.
    if !header_contains(&req, header::CONNECTION, "upgrade")
        || !header_contains(&req, header::UPGRADE, "spdy/3.1")
    {
        let got = |n: header::HeaderName| {
            req.headers()
                .get_all(n)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(" ")
        };
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "unable to upgrade: missing upgrade headers in request: Connection=[{}] Upgrade=[{}]",
                got(header::CONNECTION),
                got(header::UPGRADE)
            ),
        );
    }
    let offered: Vec<String> = req
        .headers()
        .get_all(PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_owned)
        .collect();
    if let Some(refusal) = kubelet_refusal(&offered) {
        return refusal;
    }
    let valve = req.extensions().get::<ValveHandle>().cloned();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tunnels = shared.tunnels.clone();
    tunnels.spdy_upgrades.fetch_add(1, Ordering::SeqCst);
    let pod_name = pod.name.clone();
    let frozen = valve.clone();
    tunnels.register(pod_name, valve, move |_reg| async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                shared.faults.after_upgrade(&pod.name, frozen.as_ref());
                session(shared, TokioIo::new(upgraded), pod).await;
            }
            Err(e) => tracing::debug!("SPDY port-forward upgrade failed: {e}"),
        }
    });
    let mut res = Response::new(full(Bytes::new()));
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(PROTOCOL_HEADER, HeaderValue::from_static(PROTOCOL));
    res
}

/// httpstream.go `Handshake`: every comma-separated client value of
/// `X-Stream-Protocol-Version`; the first one the server supports wins. Returns the
/// response the kubelet writes instead of upgrading, if it refuses.
fn kubelet_refusal(values: &[String]) -> Option<Response<Body>> {
    let offered: Vec<&str> = values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        // Handshake returns an error without writing; Go's server then answers an empty 200
        // (code reading).
        return Some(Response::new(full(Bytes::new())));
    }
    if !offered.contains(&PROTOCOL) {
        let mut res = text(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports [{}], server accepts [{PROTOCOL}]",
                offered.join(" ")
            ),
        );
        res.headers_mut().insert(
            "x-accepted-stream-protocol-versions",
            HeaderValue::from_static(PROTOCOL),
        );
        return Some(res);
    }
    None
}

/// The prefix of WebSocket subprotocols that tunnel SPDY (`k8s.io/apimachinery/pkg/util/portforward`
/// `WebsocketsSPDYTunnelingPrefix`).
const TUNNEL_PREFIX: &str = "SPDY/3.1+";

/// The offered WebSocket subprotocols, if any asks for the SPDY tunnel
/// (`wsstream.IsWebSocketRequestWithTunnelingProtocol`).
pub(crate) fn tunnel_request(req: &Request<Incoming>) -> Option<Vec<String>> {
    let offered = offered_subprotocols(req);
    offered
        .iter()
        .any(|p| p.starts_with(TUNNEL_PREFIX))
        .then_some(offered)
}

/// The API server's WebSocket tunnel for SPDY (feature `PortForwardWebsockets`, beta and on
/// from 1.31; `staging/src/k8s.io/apiserver/pkg/util/proxy/streamtunnel.go`): the API
/// server terminates the WebSocket, upgrades to the kubelet with a SPDY POST offering the
/// protocols without their prefix, and on the kubelet's 101 completes the WebSocket
/// handshake with `SPDY/3.1+<negotiated>`. Binary messages then carry the raw SPDY bytes;
/// any other kubelet answer is passed back as it is.
pub(crate) fn handle_tunnel(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    pod: PodState,
    offered: Vec<String>,
) -> Response<Body> {
    let backend: Vec<String> = offered
        .iter()
        .filter_map(|p| p.strip_prefix(TUNNEL_PREFIX))
        .filter(|p| p.ends_with(".k8s.io"))
        .map(str::to_owned)
        .collect();
    if backend.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: no tunneling spdy protocols provided".into(),
        );
    }
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = key.filter(|_| version_ok) else {
        // gorilla/websocket's Upgrader refuses a bad handshake with 400 and its reason.
        return text(
            StatusCode::BAD_REQUEST,
            "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header is missing or blank or unsupported version".into(),
        );
    };
    if let Some(refusal) = kubelet_refusal(&backend) {
        return refusal;
    }
    let valve = req.extensions().get::<ValveHandle>().cloned();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let tunnels = shared.tunnels.clone();
    tunnels.spdy_upgrades.fetch_add(1, Ordering::SeqCst);
    tunnels.spdy_tunnels.fetch_add(1, Ordering::SeqCst);
    let pod_name = pod.name.clone();
    let frozen = valve.clone();
    tunnels.register(pod_name, valve, move |_reg| async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("SPDY tunnel upgrade failed: {e}");
                return;
            }
        };
        shared.faults.after_upgrade(&pod.name, frozen.as_ref());
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), WsRole::Server, None).await;
        let (near, far) = tokio::io::duplex(64 * 1024);
        tokio::join!(session(shared, near, pod), bridge(ws, far));
    });
    let mut res = Response::new(full(Bytes::new()));
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    h.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("SPDY/3.1+portforward.k8s.io"),
    );
    res
}

/// Copies between the WebSocket (binary messages, boundaries meaningless) and the SPDY
/// session's byte stream, as the API server's tunnel does: one binary message per write;
/// a client Close or error ends the stream; the session's end sends Close 1000.
async fn bridge<S>(ws: WebSocketStream<S>, far: tokio::io::DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use futures::{SinkExt, StreamExt};
    let (mut sink, mut stream) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(far);
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
                // Pings are answered by tungstenite; text is not part of the protocol.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_) | Message::Close(_))) | Some(Err(_)) | None => break,
            },
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => {
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code: CloseCode::Normal,
                            reason: "".into(),
                        })))
                        .await;
                    break;
                }
                Ok(n) => {
                    if sink
                        .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            },
        }
    }
    let _ = wr.shutdown().await;
}

/// A frame for the writer, not to be sent before its due time (injected latency), and the
/// room its data takes in the budget toward the client (none for control frames).
type Out = (Instant, Frame, Option<Held>);

/// The way to the client for one stream pair: the connection's frame queue and its budget of
/// bytes in flight toward the client.
struct ToClient {
    frames: mpsc::Sender<Out>,
    room: InFlight,
}

/// One half of a pair, once accepted.
#[derive(Debug, Clone, Copy)]
struct Half {
    id: u32,
    port: u16,
}

/// `httpStreamPair`: the streams of one request id.
struct Pair {
    error: Option<Half>,
    data: Option<Half>,
    timer: tokio::task::AbortHandle,
}

/// Per data stream: where its client bytes go, and its client-side end.
struct DataIn {
    to_pod: mpsc::Sender<(Instant, Bytes, Option<Held>)>,
}

/// What the read loop learns from the pair tasks.
enum Event {
    /// The pair's creation timed out.
    Timeout(String),
    /// A pair's forwarding ended (both streams closed): `(error id, data id)`.
    Done(u32, u32),
}

async fn session<S>(shared: Arc<Shared>, io: S, pod: PodState)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let activity = Arc::new(Activity::new());
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(QUEUE);
    // The connection's budgets of bytes in flight, each way (`inflight`).
    let (toward_client, toward_pod) = (InFlight::new(), InFlight::new());
    let mut tasks = JoinSet::new();
    // The writer: one Encoder, frames in queue order (so header compression stays in step).
    let sent = activity.clone();
    let sh = shared.clone();
    tasks.spawn(async move {
        let Ok(mut enc) = Encoder::new() else { return };
        let mut buf = BytesMut::new();
        while let Some((due, f, held)) = out_rx.recv().await {
            wait_until(due).await;
            buf.clear();
            if enc.encode(&f, &mut buf).is_err() {
                break;
            }
            sent.touch();
            if wr.write_all(&buf).await.is_err() {
                break;
            }
            if let Some(held) = held {
                held.acked(sh.latency());
            }
            let goaway = matches!(f, Frame::GoAway { .. });
            if goaway {
                let _ = wr.shutdown().await;
                break;
            }
        }
    });
    let due = || Instant::now() + shared.latency();
    let idle = idle::expired(&activity, shared.tunnels.idle_timeout_watch());
    tokio::pin!(idle);

    let mut dec = Decoder::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut last_id = 0u32;
    // Streams replied to and not yet finished (reset at `Close()`), and the last one accepted.
    let mut open_streams: std::collections::BTreeSet<u32> = std::collections::BTreeSet::new();
    let mut last_accepted = 0u32;
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut data_in: HashMap<u32, DataIn> = HashMap::new();
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<Event>();
    let conn_id = shared.tunnels.next_conn_id();

    'read: loop {
        // Frames already buffered first, in order.
        loop {
            let f = match dec.decode(&mut buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                // spdystream: any parse error ends the read loop.
                Err(e) => {
                    tracing::debug!("SPDY port-forward: bad frame: {e}");
                    break 'read;
                }
            };
            activity.touch();
            match f {
                Frame::SynStream {
                    stream_id, headers, ..
                } => {
                    // connection.go `validateStreamId`: ids must increase.
                    if stream_id <= last_id {
                        let _ = out_tx
                            .send((
                                due(),
                                Frame::RstStream {
                                    stream_id,
                                    status: rst::PROTOCOL_ERROR,
                                },
                                None,
                            ))
                            .await;
                        continue;
                    }
                    last_id = stream_id;
                    // httpstream.go `newStreamHandler` → `validateStream`: a bad stream is reset, never replied to.
                    let port = frame::header(&headers, "port")
                        .and_then(|p| p.parse::<u16>().ok())
                        .filter(|p| *p > 0);
                    let kind = frame::header(&headers, "streamtype").map(str::to_owned);
                    let (Some(port), Some(kind @ ("error" | "data"))) = (port, kind.as_deref())
                    else {
                        let _ = out_tx
                            .send((
                                due(),
                                Frame::RstStream {
                                    stream_id,
                                    status: rst::CANCEL,
                                },
                                None,
                            ))
                            .await;
                        continue;
                    };
                    let _ = out_tx
                        .send((
                            due(),
                            Frame::SynReply {
                                stream_id,
                                flags: 0,
                                headers: Vec::new(),
                            },
                            None,
                        ))
                        .await;
                    open_streams.insert(stream_id);
                    last_accepted = stream_id;
                    // `requestID`: the header, else guessed from the ids (error = id, data = id - 2).
                    let request = match frame::header(&headers, "requestid") {
                        Some(r) => r.to_owned(),
                        None if kind == "data" => stream_id.saturating_sub(2).to_string(),
                        None => stream_id.to_string(),
                    };
                    let half = Half {
                        id: stream_id,
                        port,
                    };
                    let pair = pairs.entry(request.clone()).or_insert_with(|| {
                        let ev = ev_tx.clone();
                        let r = request.clone();
                        let timer = tokio::spawn(async move {
                            tokio::time::sleep(STREAM_CREATION_TIMEOUT).await;
                            let _ = ev.send(Event::Timeout(r));
                        });
                        Pair {
                            error: None,
                            data: None,
                            timer: timer.abort_handle(),
                        }
                    });
                    let slot = if kind == "error" {
                        &mut pair.error
                    } else {
                        &mut pair.data
                    };
                    if slot.is_some() {
                        // httpStreamPair.add: "error stream already assigned".
                        if let Some(err) = pair.error {
                            let msg = format!(
                                "error processing stream for request {request}: {kind} stream already assigned"
                            );
                            let _ = out_tx
                                .send((
                                    due(),
                                    Frame::Data {
                                        stream_id: err.id,
                                        flags: 0,
                                        data: msg.into(),
                                    },
                                    None,
                                ))
                                .await;
                        }
                        continue;
                    }
                    *slot = Some(half);
                    if let (Some(error), Some(data)) = (pair.error, pair.data) {
                        pair.timer.abort();
                        pairs.remove(&request);
                        let (to_pod, rx) = mpsc::channel(QUEUE);
                        data_in.insert(data.id, DataIn { to_pod });
                        tasks.spawn(forward(
                            shared.clone(),
                            pod.clone(),
                            error,
                            data,
                            rx,
                            ToClient {
                                frames: out_tx.clone(),
                                room: toward_client.clone(),
                            },
                            ev_tx.clone(),
                        ));
                    }
                }
                Frame::Data {
                    stream_id,
                    flags,
                    data,
                } => {
                    // Blocking hand-off to the stream's reader, as spdystream's frame workers do.
                    if let Some(d) = data_in.get(&stream_id) {
                        if !data.is_empty() {
                            // One TCP connection: a full budget holds up every stream.
                            let held = toward_pod.reserve(data.len()).await;
                            let _ = d.to_pod.send((due(), data, held)).await;
                        }
                        if flags & FLAG_FIN != 0 {
                            data_in.remove(&stream_id);
                        }
                    }
                }
                Frame::RstStream { stream_id, .. } => {
                    // The stream's reads return EOF.
                    data_in.remove(&stream_id);
                }
                Frame::Ping { id } => {
                    let _ = out_tx.send((due(), Frame::Ping { id }, None)).await;
                }
                // spdystream stops reading at GOAWAY.
                Frame::GoAway { .. } => break 'read,
                // Parsed and dropped ("unhandled frame type").
                Frame::SynReply { .. }
                | Frame::Headers { .. }
                | Frame::Settings { .. }
                | Frame::WindowUpdate { .. }
                | Frame::Unknown { .. } => {}
            }
        }
        buf.reserve(64 * 1024);
        tokio::select! {
            n = rd.read_buf(&mut buf) => match n {
                Ok(0) | Err(_) => break 'read,
                Ok(_) => {}
            },
            Some(ev) = ev_rx.recv() => match ev {
                Event::Timeout(request) => {
                    if let Some(p) = pairs.remove(&request) {
                        if let Some(err) = p.error {
                            let msg = format!(
                                "(conn=0x{conn_id:x}, request={request}) timed out waiting for streams"
                            );
                            let _ = out_tx
                                .send((due(), Frame::Data { stream_id: err.id, flags: 0, data: msg.into() }, None))
                                .await;
                        }
                    }
                }
                Event::Done(error, data) => {
                    data_in.remove(&data);
                    open_streams.remove(&error);
                    open_streams.remove(&data);
                }
            },
            _ = &mut idle => {
                shared.tunnels.idle_closures.fetch_add(1, Ordering::SeqCst);
                tracing::debug!("SPDY port-forward to {} closed by the idle timeout", pod.name);
                break 'read;
            }
        }
    }
    // `Close()`: reset every stream, GOAWAY with the last accepted id, then the socket goes.
    for p in pairs.values() {
        p.timer.abort();
    }
    data_in.clear();
    for &stream_id in &open_streams {
        let _ = out_tx.try_send((
            due(),
            Frame::RstStream {
                stream_id,
                status: rst::CANCEL,
            },
            None,
        ));
    }
    let last = last_accepted;
    let _ = out_tx.try_send((
        due(),
        Frame::GoAway {
            last_good_stream_id: last,
            status: 0,
        },
        None,
    ));
    drop(out_tx);
    // Give the writer a moment to flush the goodbye, then drop everything.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(r) = tasks.join_next().await {
            if r.is_err() {
                break;
            }
        }
    })
    .await;
    tasks.shutdown().await;
}

/// `httpStreamHandler.portForward` + the runtime's `PortForward`: dial localhost:port in the
/// pod, copy both ways, then close the error stream and the data stream (in that order:
/// the kubelet's deferred closes run last-in first-out).
async fn forward(
    shared: Arc<Shared>,
    pod: PodState,
    error: Half,
    data: Half,
    mut from_client: mpsc::Receiver<(Instant, Bytes, Option<Held>)>,
    client: ToClient,
    events: mpsc::UnboundedSender<Event>,
) {
    let ToClient {
        frames: out,
        room: toward_client,
    } = client;
    let due = || Instant::now() + shared.latency();
    let port = data.port;
    let target = pod_local_target(&shared, &pod, port);
    match TcpStream::connect(target).await {
        Err(e) => {
            let host_network = shared.cfg.layout == crate::Layout::ControlPlane;
            let msg = forward_error(&pod, port, &e, host_network);
            let _ = out
                .send((
                    due(),
                    Frame::Data {
                        stream_id: error.id,
                        flags: 0,
                        data: msg.into(),
                    },
                    None,
                ))
                .await;
        }
        Ok(tcp) => {
            let _ = tcp.set_nodelay(true);
            let (mut pod_rd, mut pod_wr) = tcp.into_split();
            let to_client = async {
                let mut b = vec![0u8; CHUNK];
                loop {
                    match pod_rd.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let held = toward_client.reserve(n).await;
                            let f = Frame::Data {
                                stream_id: data.id,
                                flags: 0,
                                data: Bytes::copy_from_slice(&b[..n]),
                            };
                            if out.send((due(), f, held)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            };
            let to_pod = async {
                while let Some((at, bytes, held)) = from_client.recv().await {
                    wait_until(at).await;
                    if pod_wr.write_all(&bytes).await.is_err() {
                        return;
                    }
                    if let Some(held) = held {
                        held.acked(shared.latency());
                    }
                }
                // No CloseWrite on the pod socket: containerd does not half-close.
            };
            tokio::pin!(to_client, to_pod);
            // The first direction to end starts the runtime's grace for the other.
            let grace = shared.close_grace();
            tokio::select! {
                () = &mut to_client => {
                    let _ = tokio::time::timeout(grace, &mut to_pod).await;
                }
                () = &mut to_pod => {
                    let _ = tokio::time::timeout(grace, &mut to_client).await;
                }
            }
        }
    }
    let _ = events.send(Event::Done(error.id, data.id));
    for id in [error.id, data.id] {
        let _ = out
            .send((
                due(),
                Frame::Data {
                    stream_id: id,
                    flags: FLAG_FIN,
                    data: Bytes::new(),
                },
                None,
            ))
            .await;
    }
}
