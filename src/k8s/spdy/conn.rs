//! A SPDY/3.1 port-forward client connection: one upgraded HTTP connection to the API
//! server (relayed to the kubelet's streaming server), carrying one stream pair per
//! forwarded TCP connection.
//!
//! What the server expects, and so what this code does (kubelet
//! `pkg/kubelet/cri/streaming/portforward/httpstream.go`, client-go
//! `tools/portforward/portforward.go`; see docs/spdy-portforward.md):
//! - A pair is an **error stream** then a **data stream**, both SYN_STREAMs with headers
//!   `streamtype` (`error`/`data`), `port` and the same `requestid`. Each waits for its
//!   SYN_REPLY before the next step, as kubectl does: DATA sent before the pair is complete
//!   can block a worker of the server's frame dispatcher and stall the pair forever.
//! - The client never writes on the error stream: it half-closes it at once (empty DATA
//!   with FIN) and reads it to EOF. Text there is the kubelet's error for this pair.
//! - No flow control: the server neither sends WINDOW_UPDATE nor honours ours, so DATA is
//!   sent without windows. Back-pressure is by blocking: the reader task hands each DATA
//!   frame to its stream and waits while that stream's buffer is full, exactly as the
//!   server's spdystream does. A consumer that stops reading stalls the whole connection;
//!   etcd-proxy's consumers are hyper connections that always read, and a consumer that
//!   goes away is detected (its buffer is closed) and its stream reset.
//!
//! Invariants:
//! - **Stream ids increase in the order SYN_STREAMs are written.** An id is allocated and
//!   its SYN_STREAM queued under the same lock, and one writer task encodes frames in
//!   queue order (this also keeps the shared header-compression context in step).
//! - **Every received header block is inflated**, even for unknown streams (the decoder
//!   does it for every frame), or the compression state would drift.
//! - **Bounded.** Frames and header blocks are capped in [`super::frame`]; error-stream
//!   text is kept up to [`MAX_ERROR_TEXT`]; each stream buffers at most [`STREAM_BUFFER`]
//!   bytes towards its consumer.
//! - **A dead connection is noticed.** The client pings [`Keepalive::every`] after the last
//!   answer (the kubelet's server echoes pings and never starts its own); one unanswered for
//!   [`Keepalive::timeout`] fails the connection: its streams end, and new tunnels get a fresh
//!   upgrade. A connection dropped silently (no FIN, no RST: a load balancer's idle drop, a
//!   partition) is therefore given up within `every + timeout`, etcd-proxy's `--keepalive`
//!   plus `--keepalive-timeout`, not after the kernel's retransmission timeout.
//! - **Opening a stream pair is bounded** by the caller's deadline (the dial timeout), and
//!   a pair that misses it is reset, so that a wedged kubelet leaves nothing behind.
//! - **The connection ends with its last user.** Dropping the last [`SpdyConn`] and the last
//!   stream aborts the reader and writer tasks, which closes the TCP connection.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::frame::{self, rst, Decoder, Encoder, Frame, FrameError, FLAG_FIN};

/// How long the server may take to accept a stream (client-go's `createStreamResponseTimeout`).
pub const STREAM_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes buffered per stream towards its consumer (also the largest local read per DATA).
pub const STREAM_BUFFER: usize = 64 * 1024;
/// Most error-stream text kept per pair.
pub const MAX_ERROR_TEXT: usize = 16 * 1024;

/// The connection's pings. kubectl pings every 5 s (client-go `transport/spdy/spdy.go`
/// `PingPeriod`) to keep idle connections alive through load balancers' idle timeouts, but
/// never gives up on an unanswered one; etcd-proxy does, so that a silently dropped TCP
/// connection is noticed instead of showing only as stream timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    /// Time from one ping's answer to the next ping.
    pub every: Duration,
    /// How long a ping may go unanswered before the connection is failed.
    pub timeout: Duration,
}
/// Largest DATA frame written: Go's `io.Copy` buffer, what kubectl and the runtime use.
const MAX_WRITE: usize = 32 * 1024;
/// Queued DATA frames before senders wait for the socket.
const DATA_QUEUE: usize = 64;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;

/// Why the connection or a stream failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnError {
    /// The connection is gone (or going away); open a new one.
    #[error("SPDY connection to the pod closed: {0}")]
    Closed(String),
    /// The server reset the stream instead of accepting it.
    #[error("the kubelet refused the port-forward stream (RST_STREAM status {0})")]
    Refused(u32),
    /// No SYN_REPLY in time.
    #[error("timed out waiting for the kubelet to accept a port-forward stream")]
    Timeout,
    /// All stream ids are used.
    #[error("SPDY connection has used all its stream ids")]
    Exhausted,
}

impl ConnError {
    /// Whether a fresh connection could succeed where this one failed.
    pub fn connection_gone(&self) -> bool {
        matches!(self, ConnError::Closed(_) | ConnError::Exhausted)
    }
}

/// The error text of one pair, delivered when the error stream ends: `None` if it ended
/// empty (success).
pub type ErrorText = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// A client SPDY connection. Cheap to clone; all clones share the connection.
#[derive(Clone)]
pub struct SpdyConn {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SpdyConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpdyConn").finish_non_exhaustive()
    }
}

struct Shared {
    state: Arc<Mutex<State>>,
    ctrl: mpsc::UnboundedSender<Frame>,
    data: mpsc::Sender<Frame>,
    _tasks: Tasks,
}

/// Aborts the reader and writer when the connection's last user is gone.
struct Tasks(Vec<AbortHandle>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[derive(Default)]
struct State {
    /// The next client stream id (odd).
    next_id: u32,
    /// The next requestid.
    next_request: u64,
    streams: HashMap<u32, Slot>,
    /// Set once the connection cannot open streams: why.
    closed: Option<String>,
    /// The outstanding ping's id.
    ping: Option<u32>,
    /// The next ping id (odd).
    next_ping: u32,
    /// The id of the last ping answered, for the ping loop.
    pong: Option<watch::Sender<u32>>,
    /// Becomes true when the connection has failed; pumps stop waiting on it.
    dead: Option<watch::Sender<bool>>,
}

/// A stream the client opened.
struct Slot {
    /// Resolved by SYN_REPLY (or a reset, or the connection's end).
    reply: Option<oneshot::Sender<Result<(), ConnError>>>,
    sink: Sink,
}

enum Sink {
    /// Payload goes to the stream's consumer.
    Data(mpsc::Sender<Bytes>),
    /// Payload is error text, collected until the stream ends.
    Error {
        text: Vec<u8>,
        done: Option<oneshot::Sender<Option<String>>>,
    },
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl SpdyConn {
    /// Runs the SPDY client protocol over `io`, an upgraded connection, pinging it as
    /// `keepalive` says.
    pub fn start<S>(io: S, keepalive: Keepalive) -> Result<Self, FrameError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let encoder = Encoder::new()?;
        let (rd, wr) = tokio::io::split(io);
        let state = Arc::new(Mutex::new(State {
            next_id: 1,
            next_ping: 1,
            dead: Some(watch::Sender::new(false)),
            pong: Some(watch::Sender::new(0)),
            ..State::default()
        }));
        let pongs = lock(&state).pong.as_ref().map(watch::Sender::subscribe);
        let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
        let (data_tx, data_rx) = mpsc::channel(DATA_QUEUE);
        let writer = tokio::spawn(write_loop(wr, encoder, ctrl_rx, data_rx, state.clone()));
        let reader = tokio::spawn(read_loop(rd, state.clone(), ctrl_tx.clone()));
        let pinger = tokio::spawn(ping_loop(state.clone(), ctrl_tx.clone(), keepalive, pongs));
        Ok(Self {
            shared: Arc::new(Shared {
                state,
                ctrl: ctrl_tx,
                data: data_tx,
                _tasks: Tasks(vec![
                    writer.abort_handle(),
                    reader.abort_handle(),
                    pinger.abort_handle(),
                ]),
            }),
        })
    }

    /// Whether `other` is a handle to this same connection.
    pub fn same(&self, other: &SpdyConn) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Whether the connection can still open streams.
    pub fn is_open(&self) -> bool {
        lock(&self.shared.state).closed.is_none()
    }

    /// Forwards one TCP connection to `port` in the pod: opens the error stream, then the
    /// data stream, as kubectl does. Returns the data stream's bytes and its error text.
    /// The server must accept both by `deadline` (and within [`STREAM_REPLY_TIMEOUT`]).
    pub async fn open(
        &self,
        port: u16,
        deadline: Instant,
    ) -> Result<(DuplexStream, ErrorText), ConnError> {
        let deadline = deadline.min(Instant::now() + STREAM_REPLY_TIMEOUT);
        let request = {
            let mut st = lock(&self.shared.state);
            let r = st.next_request;
            st.next_request += 1;
            r
        };
        let headers = |kind: &str| {
            vec![
                ("streamtype".to_owned(), kind.to_owned()),
                ("port".to_owned(), port.to_string()),
                ("requestid".to_owned(), request.to_string()),
            ]
        };
        // The error stream: accepted, then half-closed at once; read to its end.
        let (done_tx, done_rx) = oneshot::channel();
        let error_sink = Sink::Error {
            text: Vec::new(),
            done: Some(done_tx),
        };
        let (error_id, reply) = self.syn_stream(headers("error"), error_sink)?;
        self.await_reply(error_id, reply, deadline).await?;
        let _ = self.shared.ctrl.send(Frame::Data {
            stream_id: error_id,
            flags: FLAG_FIN,
            data: Bytes::new(),
        });
        let error: ErrorText = Box::pin(async move { done_rx.await.unwrap_or(None) });

        // The data stream.
        let (in_tx, in_rx) = mpsc::channel::<Bytes>(4);
        let opened = match self.syn_stream(headers("data"), Sink::Data(in_tx)) {
            Ok((data_id, reply)) => self
                .await_reply(data_id, reply, deadline)
                .await
                .map(|()| data_id),
            Err(e) => Err(e),
        };
        let data_id = match opened {
            Ok(id) => id,
            Err(e) => {
                // Half a pair is of no use: let the server forget the error stream too.
                self.reset(error_id);
                return Err(e);
            }
        };
        let (near, far) = tokio::io::duplex(STREAM_BUFFER);
        let dead = lock(&self.shared.state)
            .dead
            .as_ref()
            .map(watch::Sender::subscribe);
        tokio::spawn(pump(self.clone(), data_id, far, in_rx, dead));
        Ok((near, error))
    }

    /// Allocates the next id and queues its SYN_STREAM, atomically.
    fn syn_stream(
        &self,
        headers: frame::Headers,
        sink: Sink,
    ) -> Result<(u32, oneshot::Receiver<Result<(), ConnError>>), ConnError> {
        let mut st = lock(&self.shared.state);
        if let Some(why) = &st.closed {
            return Err(ConnError::Closed(why.clone()));
        }
        let id = st.next_id;
        if id > frame::MAX_STREAM_ID {
            st.closed = Some("all stream ids used".into());
            return Err(ConnError::Exhausted);
        }
        st.next_id = id.saturating_add(2);
        let (tx, rx) = oneshot::channel();
        st.streams.insert(
            id,
            Slot {
                reply: Some(tx),
                sink,
            },
        );
        let syn = Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers,
        };
        if self.shared.ctrl.send(syn).is_err() {
            st.streams.remove(&id);
            return Err(ConnError::Closed("writer stopped".into()));
        }
        Ok((id, rx))
    }

    async fn await_reply(
        &self,
        id: u32,
        reply: oneshot::Receiver<Result<(), ConnError>>,
        deadline: Instant,
    ) -> Result<(), ConnError> {
        match tokio::time::timeout_at(deadline, reply).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ConnError::Closed("connection ended".into())),
            Err(_) => {
                lock(&self.shared.state).streams.remove(&id);
                let _ = self.shared.ctrl.send(Frame::RstStream {
                    stream_id: id,
                    status: rst::CANCEL,
                });
                Err(ConnError::Timeout)
            }
        }
    }

    /// Forgets a stream and resets it, if the server has not ended it already.
    fn reset(&self, id: u32) {
        let known = lock(&self.shared.state).streams.remove(&id).is_some();
        if known {
            let _ = self.shared.ctrl.send(Frame::RstStream {
                stream_id: id,
                status: rst::CANCEL,
            });
        }
    }
}

/// Moves one data stream's bytes between the connection and its consumer (`far` is the
/// consumer's duplex peer).
async fn pump(
    conn: SpdyConn,
    id: u32,
    far: DuplexStream,
    mut inbound: mpsc::Receiver<Bytes>,
    dead: Option<watch::Receiver<bool>>,
) {
    let (mut far_rd, mut far_wr) = tokio::io::split(far);
    let data = conn.shared.data.clone();
    let outbound = async {
        let mut buf = vec![0u8; MAX_WRITE];
        loop {
            match far_rd.read(&mut buf).await {
                Ok(0) => {
                    // Local EOF: half-close, as kubectl does after its copy ends.
                    let _ = data
                        .send(Frame::Data {
                            stream_id: id,
                            flags: FLAG_FIN,
                            data: Bytes::new(),
                        })
                        .await;
                    return true;
                }
                Ok(n) => {
                    let f = Frame::Data {
                        stream_id: id,
                        flags: 0,
                        data: Bytes::copy_from_slice(&buf[..n]),
                    };
                    if data.send(f).await.is_err() {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    };
    let inbound = async {
        while let Some(bytes) = inbound.recv().await {
            if far_wr.write_all(&bytes).await.is_err() {
                // The consumer is gone.
                return false;
            }
        }
        // The server ended the stream (FIN, reset or connection end): EOF for the consumer.
        let _ = far_wr.shutdown().await;
        true
    };
    let dead = async {
        match dead {
            Some(mut d) => {
                let _ = d.wait_for(|dead| *dead).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(outbound, inbound, dead);
    let (mut out_done, mut in_done) = (None, None);
    while out_done.is_none() || in_done.is_none() {
        tokio::select! {
            ok = &mut outbound, if out_done.is_none() => out_done = Some(ok),
            ok = &mut inbound, if in_done.is_none() => in_done = Some(ok),
            // The connection failed: a send to a stuck writer would wait forever.
            () = &mut dead => return,
        }
        if out_done == Some(false) || in_done == Some(false) {
            break;
        }
    }
    if out_done != Some(true) || in_done != Some(true) {
        conn.reset(id);
    } else {
        lock(&conn.shared.state).streams.remove(&id);
    }
}

async fn write_loop<W: AsyncWrite>(
    wr: W,
    mut encoder: Encoder,
    mut ctrl: mpsc::UnboundedReceiver<Frame>,
    mut data: mpsc::Receiver<Frame>,
    state: Arc<Mutex<State>>,
) {
    tokio::pin!(wr);
    let mut buf = BytesMut::new();
    let why = loop {
        let frame = tokio::select! {
            biased;
            Some(f) = ctrl.recv() => f,
            Some(f) = data.recv() => f,
            else => break "closed".to_owned(),
        };
        buf.clear();
        if let Err(e) = encoder.encode(&frame, &mut buf) {
            break e.to_string();
        }
        // Batch whatever else is queued into one write.
        while buf.len() < READ_CHUNK {
            let Ok(f) = ctrl.try_recv().or_else(|_| data.try_recv()) else {
                break;
            };
            if let Err(e) = encoder.encode(&f, &mut buf) {
                return fail(&state, e.to_string());
            }
        }
        if let Err(e) = wr.write_all(&buf).await {
            break e.to_string();
        }
        if let Err(e) = wr.flush().await {
            break e.to_string();
        }
    };
    fail(&state, why);
}

async fn read_loop<R: AsyncRead>(
    rd: R,
    state: Arc<Mutex<State>>,
    ctrl: mpsc::UnboundedSender<Frame>,
) {
    tokio::pin!(rd);
    let mut decoder = Decoder::new();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let why = 'outer: loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(f)) => {
                    if let Err(why) = handle(f, &state, &ctrl).await {
                        break 'outer why;
                    }
                }
                Ok(None) => break,
                Err(e) => break 'outer e.to_string(),
            }
        }
        buf.reserve(READ_CHUNK);
        match rd.read_buf(&mut buf).await {
            Ok(0) => break "the server closed the connection".to_owned(),
            Ok(_) => {}
            Err(e) => break e.to_string(),
        }
    };
    fail(&state, why);
}

/// Acts on one frame from the server. `Err` ends the connection.
async fn handle(
    f: Frame,
    state: &Mutex<State>,
    ctrl: &mpsc::UnboundedSender<Frame>,
) -> Result<(), String> {
    match f {
        Frame::SynReply {
            stream_id, flags, ..
        } => {
            let mut st = lock(state);
            if let Some(slot) = st.streams.get_mut(&stream_id) {
                if let Some(r) = slot.reply.take() {
                    let _ = r.send(Ok(()));
                }
            }
            if flags & FLAG_FIN != 0 {
                end_stream(&mut st, stream_id);
            }
        }
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            let sender = {
                let mut st = lock(state);
                match st.streams.get_mut(&stream_id) {
                    // DATA before SYN_REPLY is dropped, as spdystream does.
                    Some(slot) if slot.reply.is_some() => None,
                    Some(Slot {
                        sink: Sink::Error { text, .. },
                        ..
                    }) => {
                        let room = MAX_ERROR_TEXT.saturating_sub(text.len());
                        text.extend_from_slice(&data[..data.len().min(room)]);
                        None
                    }
                    Some(Slot {
                        sink: Sink::Data(tx),
                        ..
                    }) if !data.is_empty() => Some(tx.clone()),
                    _ => None,
                }
            };
            if let Some(tx) = sender {
                // Blocks while the consumer's buffer is full (see the module doc).
                if tx.send(data).await.is_err() {
                    // The pump has gone and reset the stream; drop the bytes.
                }
            }
            if flags & FLAG_FIN != 0 {
                end_stream(&mut lock(state), stream_id);
            }
        }
        Frame::RstStream { stream_id, status } => {
            let mut st = lock(state);
            if let Some(slot) = st.streams.get_mut(&stream_id) {
                if let Some(r) = slot.reply.take() {
                    let _ = r.send(Err(ConnError::Refused(status)));
                }
            }
            end_stream(&mut st, stream_id);
        }
        Frame::Ping { id } => {
            if id % 2 == 0 {
                // The server's ping (never seen from the kubelet): echo it.
                let _ = ctrl.send(Frame::Ping { id });
            } else {
                // The reply to ours.
                let mut st = lock(state);
                if st.ping == Some(id) {
                    st.ping = None;
                    if let Some(pong) = &st.pong {
                        pong.send_replace(id);
                    }
                }
            }
        }
        Frame::GoAway { .. } => {
            // No new streams; the open ones run until the server closes them.
            lock(state)
                .closed
                .get_or_insert_with(|| "the server sent GOAWAY".into());
        }
        Frame::SynStream { stream_id, .. } => {
            // Port-forward servers never open streams.
            let _ = ctrl.send(Frame::RstStream {
                stream_id,
                status: rst::REFUSED_STREAM,
            });
        }
        Frame::Headers { .. }
        | Frame::Settings { .. }
        | Frame::WindowUpdate { .. }
        | Frame::Unknown { .. } => {}
    }
    Ok(())
}

/// The server finished (or reset) a stream, or the connection died: EOF for its consumer,
/// and the error text, if the kubelet wrote any.
///
/// A reset or a lost connection delivers no text of its own, on purpose: etcd-proxy treats
/// kubelet error text as "this connection never reached etcd" (safe to retry anywhere),
/// which is true of the kubelet's dial errors but not of a connection lost mid-request.
fn end_stream(st: &mut State, id: u32) {
    let Some(slot) = st.streams.remove(&id) else {
        return;
    };
    if let Some(r) = slot.reply {
        let _ = r.send(Err(ConnError::Closed(
            "stream ended before it was accepted".into(),
        )));
    }
    if let Sink::Error { text, done } = slot.sink {
        let text = String::from_utf8_lossy(&text).trim().to_owned();
        let message = (!text.is_empty()).then_some(text);
        if let Some(done) = done {
            let _ = done.send(message);
        }
    }
    // A data sink is dropped here: its pump sees the end and shuts the consumer's side.
}

/// Pings [`Keepalive::every`] after the previous answer, one ping at a time as spdystream's
/// `Ping` does; fails the connection when one goes unanswered for [`Keepalive::timeout`].
async fn ping_loop(
    state: Arc<Mutex<State>>,
    ctrl: mpsc::UnboundedSender<Frame>,
    keepalive: Keepalive,
    pongs: Option<watch::Receiver<u32>>,
) {
    let Some(mut pongs) = pongs else { return };
    loop {
        tokio::time::sleep(keepalive.every).await;
        let id = {
            let mut st = lock(&state);
            if st.closed.is_some() && st.streams.is_empty() {
                return;
            }
            let id = st.next_ping;
            // Odd ids from the client, never 0; wrap within 31 bits.
            st.next_ping = if id >= frame::MAX_STREAM_ID - 2 {
                1
            } else {
                id + 2
            };
            st.ping = Some(id);
            id
        };
        if ctrl.send(Frame::Ping { id }).is_err() {
            return;
        }
        match tokio::time::timeout(keepalive.timeout, pongs.wait_for(|p| *p == id)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                let timeout = keepalive.timeout;
                fail(
                    &state,
                    format!("no reply to a SPDY PING within {timeout:?}"),
                );
                return;
            }
        }
    }
}

/// The connection is over: every waiting stream fails, every consumer sees EOF (see
/// [`end_stream`] for why no error text is made up).
fn fail(state: &Mutex<State>, why: String) {
    let mut st = lock(state);
    st.closed.get_or_insert_with(|| why.clone());
    if let Some(dead) = &st.dead {
        dead.send_replace(true);
    }
    let ids: Vec<u32> = st.streams.keys().copied().collect();
    for id in ids {
        if let Some(slot) = st.streams.get_mut(&id) {
            if let Some(r) = slot.reply.take() {
                let _ = r.send(Err(ConnError::Closed(why.clone())));
            }
        }
        end_stream(&mut st, id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server: reads frames from the client, answers with `respond`.
    async fn server(
        io: DuplexStream,
        mut respond: impl FnMut(&Frame) -> Vec<Frame> + Send + 'static,
    ) -> Vec<Frame> {
        let (mut rd, mut wr) = tokio::io::split(io);
        let mut dec = Decoder::new();
        let mut enc = Encoder::new().unwrap();
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        loop {
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                let mut out = BytesMut::new();
                for r in respond(&f) {
                    enc.encode(&r, &mut out).unwrap();
                }
                wr.write_all(&out).await.unwrap();
                seen.push(f);
            }
            if rd.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return seen;
            }
        }
    }

    /// kubectl's ping period, and a timeout.
    const KEEPALIVE: Keepalive = Keepalive {
        every: Duration::from_secs(5),
        timeout: Duration::from_secs(15),
    };

    /// A deadline no test reaches.
    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn reply(id: u32) -> Frame {
        Frame::SynReply {
            stream_id: id,
            flags: 0,
            headers: Vec::new(),
        }
    }

    #[tokio::test]
    async fn pair_order_headers_and_echo() {
        let (client, srv) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(server(srv, |f| match f {
            Frame::SynStream { stream_id, .. } => vec![reply(*stream_id)],
            // Echo data back on the data stream (id 3), then finish it.
            Frame::Data {
                stream_id: 3,
                data,
                flags,
            } if !data.is_empty() || *flags & FLAG_FIN != 0 => vec![
                Frame::Data {
                    stream_id: 3,
                    flags: 0,
                    data: data.clone(),
                },
                Frame::Data {
                    stream_id: 3,
                    flags: *flags & FLAG_FIN,
                    data: Bytes::new(),
                },
                Frame::Data {
                    stream_id: 1,
                    flags: *flags & FLAG_FIN,
                    data: Bytes::new(),
                },
            ],
            _ => vec![],
        }));
        let conn = SpdyConn::start(client, KEEPALIVE).unwrap();
        let (mut s, error) = conn.open(2379, far()).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        assert_eq!(error.await, None);
        drop(s);
        drop(conn);
        let seen = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        let Frame::SynStream {
            stream_id: 1,
            headers,
            ..
        } = &seen[0]
        else {
            panic!("{seen:?}")
        };
        assert_eq!(frame::header(headers, "streamtype"), Some("error"));
        assert_eq!(frame::header(headers, "port"), Some("2379"));
        assert_eq!(frame::header(headers, "requestid"), Some("0"));
        // The error stream is half-closed before the data stream is opened.
        assert!(matches!(
            &seen[1],
            Frame::Data { stream_id: 1, flags: FLAG_FIN, data } if data.is_empty()
        ));
        let Frame::SynStream {
            stream_id: 3,
            headers,
            ..
        } = &seen[2]
        else {
            panic!("{seen:?}")
        };
        assert_eq!(frame::header(headers, "streamtype"), Some("data"));
        assert_eq!(frame::header(headers, "requestid"), Some("0"));
    }

    #[tokio::test]
    async fn error_text_and_refusal() {
        let (client, srv) = tokio::io::duplex(1 << 16);
        tokio::spawn(server(srv, |f| match f {
            Frame::SynStream { stream_id: 1, .. } => vec![reply(1)],
            Frame::SynStream { stream_id: 3, .. } => vec![
                reply(3),
                Frame::Data {
                    stream_id: 1,
                    flags: FLAG_FIN,
                    data: Bytes::from_static(b"error forwarding port 2379: connection refused"),
                },
                Frame::Data {
                    stream_id: 3,
                    flags: FLAG_FIN,
                    data: Bytes::new(),
                },
            ],
            // The next pair is refused.
            Frame::SynStream { stream_id, .. } => vec![Frame::RstStream {
                stream_id: *stream_id,
                status: rst::CANCEL,
            }],
            _ => vec![],
        }));
        let conn = SpdyConn::start(client, KEEPALIVE).unwrap();
        let (mut s, error) = conn.open(2379, far()).await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
        assert!(error.await.unwrap().contains("connection refused"));
        let Err(err) = conn.open(2379, far()).await else {
            panic!("the second pair was accepted")
        };
        assert!(matches!(err, ConnError::Refused(rst::CANCEL)), "{err}");
        assert!(conn.is_open());
    }

    #[tokio::test]
    async fn server_close_fails_streams() {
        let (client, srv) = tokio::io::duplex(1 << 16);
        let conn = SpdyConn::start(client, KEEPALIVE).unwrap();
        drop(srv);
        let Err(err) = conn.open(1, far()).await else {
            panic!("opened a stream on a dead connection")
        };
        assert!(err.connection_gone(), "{err}");
        assert!(!conn.is_open());
    }

    /// A server that swallows everything (a silently dead TCP connection) is noticed by the
    /// unanswered ping; one that echoes pings keeps the connection.
    #[tokio::test(start_paused = true)]
    async fn unanswered_pings_fail_the_connection() {
        let (client, srv) = tokio::io::duplex(1 << 16);
        let silent = tokio::spawn(server(srv, |_| vec![]));
        let conn = SpdyConn::start(client, KEEPALIVE).unwrap();
        tokio::time::sleep(KEEPALIVE.every + KEEPALIVE.timeout - Duration::from_millis(1)).await;
        assert!(conn.is_open(), "not before the timeout");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(!conn.is_open());
        drop(conn);
        let seen = silent.await.unwrap();
        assert!(matches!(seen[0], Frame::Ping { id: 1 }), "{seen:?}");

        let (client, srv) = tokio::io::duplex(1 << 16);
        tokio::spawn(server(srv, |f| match f {
            Frame::Ping { id } => vec![Frame::Ping { id: *id }],
            _ => vec![],
        }));
        let conn = SpdyConn::start(client, KEEPALIVE).unwrap();
        tokio::time::sleep(KEEPALIVE.timeout * 4).await;
        assert!(conn.is_open());
    }

    /// A server that never accepts a stream (a wedged kubelet): `open` gives up at the
    /// caller's deadline and resets the stream it asked for.
    #[tokio::test(start_paused = true)]
    async fn an_unaccepted_stream_gives_up_at_the_deadline() {
        let (client, srv) = tokio::io::duplex(1 << 16);
        let silent = tokio::spawn(server(srv, |_| vec![]));
        let conn = SpdyConn::start(client, KEEPALIVE).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        let Err(err) = conn.open(2379, deadline).await else {
            panic!("a stream nobody accepted opened")
        };
        assert!(matches!(err, ConnError::Timeout), "{err}");
        assert_eq!(Instant::now(), deadline);
        assert!(
            conn.is_open(),
            "one slow stream does not condemn the connection"
        );
        // Let the writer send the reset before the connection goes.
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(conn);
        let seen = silent.await.unwrap();
        assert!(
            seen.iter().any(|f| matches!(
                f,
                Frame::RstStream {
                    stream_id: 1,
                    status: rst::CANCEL
                }
            )),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn garbage_from_the_server_ends_the_connection() {
        let (client, mut srv) = tokio::io::duplex(1 << 16);
        let conn = SpdyConn::start(client, KEEPALIVE).unwrap();
        // A control frame claiming 16 MiB.
        srv.write_all(&[0x80, 3, 0, 2, 0, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        let Err(err) = conn.open(1, far()).await else {
            panic!("opened a stream on a dead connection")
        };
        assert!(err.connection_gone(), "{err}");
    }
}
