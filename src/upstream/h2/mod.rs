//! The gRPC side of the upstream: one multiplexed HTTP/2 connection per member, shared by
//! every request to it, in a map keyed by `pod:port`, on the `h2` crate directly.
//!
//! A request costs no task and no channel hop of its own: the task serving the client's
//! request opens the stream, queues what the body already holds behind the HEADERS and awaits
//! the response itself. `h2` buffers that DATA until the stream has send window, which is
//! safe because a buffered gRPC request is at most a few MiB (the proxy buffers only bodies it
//! may replay, to a cap). The HEADERS and DATA of a unary call therefore leave in one write,
//! and etcd's reader wakes once per call. A body the client is still writing (Watch,
//! LeaseKeepAlive) is piped by a task of its own, which waits for send window before each
//! chunk, so a fast writer cannot fill memory. Sending a request body and reading a response
//! body are in `stream.rs`.
//!
//! The map keeps these invariants:
//! * at most one dial per member at a time: requests that arrive while a connection is being
//!   set up wait for that one (a dial is a port-forward tunnel), and the dial runs in its own
//!   task, so that it completes even if the request that started it gives up;
//! * a connection known to be closed is replaced on the next request;
//! * a request that found its connection closed before it could leave goes again on a fresh
//!   one, once. Such a request, like one etcd refused with `REFUSED_STREAM`, never reached
//!   etcd ([`H2Error::is_connect`]), so the proxy may also send it to another member.
//!
//! Flow control on responses (`stream.rs`), the part that decides bulk throughput:
//! * etcd sends on a stream only as far as our receive window for it allows, and on the
//!   connection only as far as the connection window allows. `h2` gives window back
//!   (WINDOW_UPDATE) only for bytes we release, once the released bytes reach half of what is
//!   left of the window. So a stream moves at most one stream window per round trip of the
//!   tunnel: the window must cover the bandwidth-delay product. Through a port-forward the
//!   round trip is the API server's and the kubelet's, tens of milliseconds, and a window
//!   that is too small shows as a transfer whose time grows with the round trip while no CPU
//!   is busy. etcd's own client (grpc-go) grows its windows up to 16 MiB by estimating the
//!   bandwidth-delay product with pings; ours are fixed (`STREAM_WINDOW`,
//!   `CONNECTION_WINDOW` in `upstream/mod.rs`): a member connection is shared and lives
//!   for hours, a fixed window is at full size from the first byte of every transfer, and
//!   it needs no pings, which etcd polices (`too_many_pings`).
//! * Bytes are released only when handed on: `H2Body` releases a DATA frame's bytes when it
//!   yields the frame to its reader. hyper's server asks for the next frame only when the
//!   client's stream has send capacity, and buffers at most its send-buffer limit per
//!   stream; the watch session asks only when its bounded channel to the client has room.
//!   Whatever etcd sends beyond what the client reads stays in `h2`'s receive buffer,
//!   counted against the windows. A client slower than etcd therefore makes the proxy hold
//!   at most one stream window for its stream, and all of a member connection's slow
//!   clients together at most one connection window: a response is never buffered whole
//!   (except the few small ones that are rewritten, `proxy`).
//! * The connection window is several stream windows, so that a stream whose client has
//!   stopped reading cannot stop the others on the same tunnel.
//!
//! Kept from hyper's client: keepalive (`keepalive.rs`). While streams are open, each
//! connection is pinged and closed when an answer takes longer than `timeout`, so a dead tunnel
//! under a silent watch is found in seconds. Sending a request body and reading a response body
//! are in `stream.rs`.

mod keepalive;
mod stream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{poll_fn, BoxFuture, FutureExt, Shared};
use h2::client::SendRequest;
use h2::Reason;
use http::{Request, Response};
use hyper::body::Body;

pub use stream::H2Body;
use stream::{pipe, send_ready, StreamGuard};

use super::connect::{BoxIo, Connector};
use super::{BoxError, UpstreamBody};
use crate::coalesce::{CoalesceWrites, ReadAhead};

type Io = CoalesceWrites<ReadAhead<BoxIo>>;
type Connecting = Shared<BoxFuture<'static, Result<Conn, ConnectError>>>;

/// Why a connection to a member could not be opened; shared by every request that waited.
#[derive(Debug, Clone)]
pub struct ConnectError(Arc<BoxError>);

/// Reads as its cause (which says what could not be reached and why) and has it as its
/// source, so the cause is found by type and `one_line` prints it once.
impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.cause())
    }
}

impl ConnectError {
    fn new(e: impl Into<BoxError>) -> Self {
        Self(Arc::new(e.into()))
    }

    /// The error that stopped the connection.
    pub fn cause(&self) -> &(dyn std::error::Error + 'static) {
        &**self.0
    }
}

/// A failed HTTP/2 request.
#[derive(Debug, thiserror::Error)]
pub enum H2Error {
    /// No connection to the member could be opened: the request never left.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection was closed before the request could leave.
    #[error("connection to the member closed: {0}")]
    NotSent(#[source] h2::Error),
    /// The request failed on an open connection.
    #[error(transparent)]
    Request(h2::Error),
    /// The connection was given up while the request waited for its answer: a ping went
    /// unanswered (the tunnel under it stopped passing data).
    #[error(
        "no answer to an HTTP/2 ping within {after:?} (--keepalive-timeout): the connection to \
         the member stopped passing data"
    )]
    Unanswered {
        /// The keepalive timeout.
        after: Duration,
        /// What `h2` reported.
        #[source]
        source: h2::Error,
    },
    /// Reading the request body failed; the stream was reset.
    #[error("reading the request body: {0}")]
    Body(#[source] BoxError),
    /// The request URI names no member (a bug in the caller).
    #[error("upstream URI {0} names no pod and port")]
    NoAuthority(String),
}

impl H2Error {
    /// The request never reached etcd: no connection, or etcd refused the stream unprocessed.
    pub fn is_connect(&self) -> bool {
        match self {
            H2Error::Connect(_) | H2Error::NotSent(_) | H2Error::NoAuthority(_) => true,
            // RFC 9113 §8.7: REFUSED_STREAM means no application processing took place.
            H2Error::Request(e) => e.reason() == Some(Reason::REFUSED_STREAM),
            H2Error::Unanswered { .. } | H2Error::Body(_) => false,
        }
    }
}

/// HTTP/2 settings and keepalive for the connections to the members.
#[derive(Clone)]
pub(super) struct H2Settings {
    pub builder: h2::client::Builder,
    /// Time between pings while streams are open.
    pub keepalive: Duration,
    /// How long a ping may go unanswered.
    pub timeout: Duration,
}

/// What a connection's task and the requests on it share.
#[derive(Debug, Default)]
struct ConnState {
    closed: AtomicBool,
    /// Streams whose request or response is still under way (for keepalive).
    open: AtomicUsize,
    /// Notified when `open` leaves zero (for keepalive).
    opened: tokio::sync::Notify,
    /// Set when keepalive gave the connection up for an unanswered ping.
    unanswered: AtomicBool,
}

/// An open connection to a member.
#[derive(Clone)]
struct Conn {
    sender: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Acquire)
    }
}

enum Slot {
    Ready(Conn),
    Connecting(Connecting),
}

/// HTTP/2 connections to the members.
#[derive(Clone)]
pub(super) struct H2Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    settings: H2Settings,
    conns: Mutex<HashMap<String, Slot>>,
}

impl H2Pool {
    pub(super) fn new(connector: Connector, settings: H2Settings) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                settings,
                conns: Mutex::default(),
            }),
        }
    }

    /// Sends `req` on the connection to the member its URI names, opening one if needed.
    pub(super) async fn send(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<H2Body>, H2Error> {
        let Some(key) = req.uri().authority().map(|a| a.as_str().to_owned()) else {
            return Err(H2Error::NoAuthority(req.uri().to_string()));
        };
        let (parts, mut body) = req.into_parts();
        let mut retried = false;
        let (mut sender, state) = loop {
            let conn = self.conn(&key).await?;
            match conn.sender.clone().ready().await {
                Ok(sender) => break (sender, conn.state),
                // The connection closed before the request could leave: once more, on a new one.
                Err(_) if !retried => {
                    self.forget(&key, &conn.state);
                    retried = true;
                }
                Err(e) => return Err(H2Error::NotSent(e)),
            }
        };
        let open = StreamGuard::new(state.clone());
        let end = body.is_end_stream();
        let (response, mut tx) = sender
            .send_request(Request::from_parts(parts, ()), end)
            .map_err(H2Error::NotSent)?;
        if !end {
            // What the body already holds goes behind the HEADERS now, in this task.
            match poll_fn(|cx| Poll::Ready(send_ready(&mut body, &mut tx, cx))).await {
                Ok(true) => {}
                Ok(false) => {
                    tokio::spawn(pipe(body, tx, open.clone()));
                }
                Err(e) => {
                    tx.send_reset(Reason::CANCEL);
                    return Err(H2Error::Body(e));
                }
            }
        }
        let resp = response.await.map_err(|source| {
            if state.unanswered.load(Ordering::Acquire) {
                H2Error::Unanswered {
                    after: self.inner.settings.timeout,
                    source,
                }
            } else {
                H2Error::Request(source)
            }
        })?;
        Ok(resp.map(|recv| H2Body::new(recv, open)))
    }

    /// An open connection to `key`: the current one, the one being opened, or a new one.
    async fn conn(&self, key: &str) -> Result<Conn, ConnectError> {
        let connecting = {
            let mut conns = self.lock();
            match conns.get(key) {
                Some(Slot::Ready(c)) if !c.is_closed() => return Ok(c.clone()),
                Some(Slot::Connecting(c)) => c.clone(),
                _ => {
                    let c = self.connect(key);
                    conns.insert(key.to_owned(), Slot::Connecting(c.clone()));
                    c
                }
            }
        };
        let result = connecting.clone().await;
        let mut conns = self.lock();
        // Only the attempt still on record is replaced: a newer one may have begun meanwhile.
        if let Some(Slot::Connecting(c)) = conns.get(key) {
            if c.ptr_eq(&connecting) {
                match &result {
                    Ok(conn) => conns.insert(key.to_owned(), Slot::Ready(conn.clone())),
                    Err(_) => conns.remove(key),
                };
            }
        }
        result
    }

    /// Drops the connection `state` belongs to from the map, if it is still there.
    fn forget(&self, key: &str, state: &Arc<ConnState>) {
        state.closed.store(true, Ordering::Release);
        let mut conns = self.lock();
        if matches!(conns.get(key), Some(Slot::Ready(c)) if Arc::ptr_eq(&c.state, state)) {
            conns.remove(key);
        }
    }

    /// Opens a connection in a task of its own: it completes even if every request that
    /// waited for it gives up (a half-opened tunnel is not left paused until the next one).
    fn connect(&self, key: &str) -> Connecting {
        let inner = self.inner.clone();
        let target = key
            .rsplit_once(':')
            .and_then(|(pod, port)| Some((pod.to_owned(), port.parse::<u16>().ok()?)));
        let key = key.to_owned();
        let opening = tokio::spawn(async move {
            let (pod, port) = target.ok_or_else(|| ConnectError::new(H2Error::NoAuthority(key)))?;
            let io = inner
                .connector
                .open(&pod, port)
                .await
                .map_err(ConnectError::new)?;
            let (sender, mut conn) = inner
                .settings
                .builder
                .handshake::<_, Bytes>(CoalesceWrites::new(ReadAhead::new(io)))
                .await
                .map_err(ConnectError::new)?;
            let state = Arc::new(ConnState::default());
            let pings = conn.ping_pong();
            tokio::spawn(keepalive::drive(
                conn,
                pings,
                state.clone(),
                inner.settings.keepalive,
                inner.settings.timeout,
            ));
            Ok(Conn { sender, state })
        });
        async move { opening.await.map_err(ConnectError::new)? }
            .boxed()
            .shared()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Frame;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::{TcpListener, TcpStream};

    use super::super::connect::{BoxIo, Dial, DialFuture};
    use super::*;

    /// Dials a local HTTP/2 server, counting dials; `refuse` makes every dial fail.
    struct CountingDial {
        addr: std::net::SocketAddr,
        dials: AtomicUsize,
        refuse: bool,
        delay: Duration,
        /// Dials whose TCP connection was made.
        connected: Arc<AtomicUsize>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("tunnel refused")]
    struct Refused;

    impl Dial for CountingDial {
        fn dial(&self, _pod: &str, _port: u16) -> DialFuture {
            self.dials.fetch_add(1, Ordering::SeqCst);
            let (addr, refuse, delay) = (self.addr, self.refuse, self.delay);
            let connected = self.connected.clone();
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if refuse {
                    return Err(Refused.into());
                }
                let tcp = TcpStream::connect(addr).await?;
                connected.fetch_add(1, Ordering::SeqCst);
                Ok(Box::pin(tcp) as BoxIo)
            })
        }
    }

    /// An HTTP/2 server that answers every request with 200; with `one_per_conn`, each
    /// connection closes after its first response.
    async fn server(one_per_conn: bool) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
                    let done_tx = std::sync::Mutex::new(Some(done_tx));
                    let svc = service_fn(move |_req| {
                        if one_per_conn {
                            if let Some(tx) = done_tx.lock().unwrap().take() {
                                let _ = tx.send(());
                            }
                        }
                        async {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        }
                    });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = done_rx => {
                            // Let the response leave, then close the connection.
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
        });
        addr
    }

    fn counting(addr: std::net::SocketAddr, refuse: bool, delay: Duration) -> Arc<CountingDial> {
        Arc::new(CountingDial {
            addr,
            dials: AtomicUsize::new(0),
            refuse,
            delay,
            connected: Arc::default(),
        })
    }

    fn pool(dial: Arc<CountingDial>) -> H2Pool {
        keepalive_pool(dial, Duration::from_secs(5), Duration::from_secs(5))
    }

    fn get() -> Request<UpstreamBody> {
        Request::builder()
            .uri("http://etcd-0:2379/etcdserverpb.KV/Range")
            .version(http::Version::HTTP_2)
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap()
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_dial_and_one_connection() {
        let dial = counting(server(false).await, false, Duration::ZERO);
        let pool = pool(dial.clone());
        let sends = (0..20).map(|_| pool.send(get()));
        for resp in futures::future::join_all(sends).await {
            assert_eq!(resp.expect("response").status(), 200);
        }
        assert_eq!(pool.send(get()).await.expect("again").status(), 200);
        assert_eq!(dial.dials.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_closed_connection_is_replaced_on_the_next_request() {
        let dial = counting(server(true).await, false, Duration::ZERO);
        let pool = pool(dial.clone());
        for _ in 0..3 {
            let resp = pool.send(get()).await.expect("response");
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
            // Wait until the server's close has reached the client side.
            let key = "etcd-0:2379";
            for _ in 0..200 {
                if matches!(pool.lock().get(key), Some(Slot::Ready(s)) if s.is_closed()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert_eq!(dial.dials.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_dial_completes_after_the_request_that_started_it_gave_up() {
        let dial = counting(server(false).await, false, Duration::from_millis(50));
        let pool = pool(dial.clone());
        let gave_up = tokio::time::timeout(Duration::from_millis(5), pool.send(get())).await;
        assert!(
            gave_up.is_err(),
            "the dial takes longer than the caller waits"
        );
        // Nobody polls the dial now; it finishes in its own task.
        let mut finished = false;
        for _ in 0..400 {
            if dial.connected.load(Ordering::SeqCst) == 1 {
                finished = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(finished, "the dial went on without the request");
        assert_eq!(pool.send(get()).await.expect("response").status(), 200);
        assert_eq!(dial.dials.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_dial_is_a_connect_error_with_its_cause_and_is_not_cached() {
        let dial = counting("127.0.0.1:1".parse().unwrap(), true, Duration::ZERO);
        let pool = pool(dial.clone());
        let err = pool.send(get()).await.expect_err("refused");
        assert!(err.is_connect(), "{err}");
        assert!(
            crate::error::find_cause::<Refused>(&err).is_some(),
            "{err:?}"
        );
        assert_eq!(crate::error::one_line(&err), "tunnel refused");
        let _ = pool.send(get()).await.expect_err("refused again");
        assert_eq!(
            dial.dials.load(Ordering::SeqCst),
            2,
            "a failure is not kept"
        );
    }

    /// Accepts an HTTP/2 connection's first stream and answers its HEADERS; the connection
    /// (to keep serving) and the stream's two halves.
    async fn first_stream(
        tcp: TcpStream,
    ) -> Option<(
        ::h2::server::Connection<TcpStream, Bytes>,
        http::Request<::h2::RecvStream>,
        ::h2::SendStream<Bytes>,
    )> {
        let mut conn = ::h2::server::handshake(tcp).await.ok()?;
        let (req, mut respond) = conn.accept().await?.ok()?;
        let tx = respond.send_response(http::Response::new(()), false).ok()?;
        Some((conn, req, tx))
    }

    /// An HTTP/2 server that answers each request's HEADERS and then echoes its DATA; with
    /// `freeze_after`, it stops reading the connection that long after the first answer, so
    /// pings go unanswered.
    async fn echo_server(freeze_after: Option<Duration>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let Some((mut conn, req, mut tx)) = first_stream(tcp).await else {
                        return;
                    };
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            let _ = tx.send_data(chunk, false);
                        }
                        let _ = tx.send_data(Bytes::new(), true);
                    });
                    let serve = async { while conn.accept().await.is_some() {} };
                    match freeze_after {
                        None => serve.await,
                        Some(after) => {
                            let _ = tokio::time::timeout(after, serve).await;
                            // Hold the connection without reading it.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        addr
    }

    fn keepalive_pool(dial: Arc<CountingDial>, every: Duration, timeout: Duration) -> H2Pool {
        H2Pool::new(
            Connector::new(dial, None),
            H2Settings {
                builder: h2::client::Builder::new(),
                keepalive: every,
                timeout,
            },
        )
    }

    /// A request whose body the caller writes while the response streams back.
    fn streaming() -> (
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        Request<UpstreamBody>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let chunks = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
        });
        let req = Request::builder()
            .method("POST")
            .uri("http://etcd-0:2379/etcdserverpb.Watch/Watch")
            .version(http::Version::HTTP_2)
            .body(http_body_util::StreamBody::new(chunks).boxed())
            .unwrap();
        (tx, req)
    }

    #[tokio::test]
    async fn a_body_still_being_written_streams_both_ways() {
        let dial = counting(echo_server(None).await, false, Duration::ZERO);
        let pool = pool(dial);
        let (tx, req) = streaming();
        let mut body = pool.send(req).await.expect("response").into_body();
        for chunk in ["one", "two", "three"] {
            tx.send(Bytes::from(chunk)).unwrap();
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("echo in time")
                .expect("a frame")
                .expect("no error");
            assert_eq!(frame.into_data().unwrap(), chunk);
        }
        drop(tx);
        let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .expect("end in time")
            .expect("clean end");
        assert!(rest.to_bytes().is_empty());
    }

    #[tokio::test]
    async fn an_unanswered_ping_fails_the_open_streams_and_the_connection_is_replaced() {
        let every = Duration::from_millis(100);
        let timeout = Duration::from_millis(200);

        // A peer that answers pings: the stream stays open through several of them.
        let dial = counting(echo_server(None).await, false, Duration::ZERO);
        let pool = keepalive_pool(dial, every, timeout);
        let (_tx, req) = streaming();
        let mut body = pool.send(req).await.expect("response").into_body();
        let quiet = tokio::time::timeout(every * 8, body.frame()).await;
        assert!(quiet.is_err(), "a live connection is kept: {quiet:?}");

        // A peer that stops reading: the stream fails once a ping goes unanswered.
        let dial = counting(
            echo_server(Some(Duration::from_millis(20))).await,
            false,
            Duration::ZERO,
        );
        let pool = keepalive_pool(dial.clone(), every, timeout);
        let (_tx, req) = streaming();
        let mut body = pool.send(req).await.expect("response").into_body();
        let failed = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the dead connection is noticed within the keepalive timeout");
        assert!(matches!(failed, Some(Err(_))), "{failed:?}");
        // The next request dials again instead of using the dead connection.
        let (_tx, req) = streaming();
        let _ = pool.send(req).await.expect("response on a new connection");
        assert_eq!(dial.dials.load(Ordering::SeqCst), 2);
    }

    /// A peer that accepts the connection and then says nothing (a tunnel black-holed from
    /// the start): the first request's stream is pinged at once, not a keepalive period
    /// later, and fails once the ping goes unanswered.
    #[tokio::test]
    async fn a_stream_after_a_quiet_spell_is_pinged_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        let every = Duration::from_secs(60);
        let timeout = Duration::from_millis(200);
        let pool = keepalive_pool(counting(addr, false, Duration::ZERO), every, timeout);
        let start = tokio::time::Instant::now();
        let failed = tokio::time::timeout(Duration::from_secs(10), pool.send(get()))
            .await
            .expect("given up within the ping timeout, not the keepalive period");
        let err = failed.expect_err("a silent peer cannot answer");
        assert!(matches!(err, H2Error::Unanswered { .. }), "{err:?}");
        assert!(!err.is_connect(), "the request may have reached etcd");
        assert!(
            err.to_string()
                .starts_with("no answer to an HTTP/2 ping within 200ms (--keepalive-timeout)"),
            "{err}"
        );
        assert!(start.elapsed() >= timeout, "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_reset_from_etcd_reaches_the_client_with_its_code() {
        // etcd's side: answers the stream's HEADERS and, once the proxy has them, resets it.
        let (got_headers, reset_now) = tokio::sync::oneshot::channel::<()>();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let etcd = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let Some((mut conn, _req, mut tx)) = first_stream(tcp).await else {
                return;
            };
            tokio::spawn(async move {
                let _ = reset_now.await;
                tx.send_reset(Reason::ENHANCE_YOUR_CALM);
            });
            while conn.accept().await.is_some() {}
        });
        // The proxy's side: hyper's server, answering with the upstream response as is.
        let pool = pool(counting(etcd, false, Duration::ZERO));
        let got_headers = Arc::new(Mutex::new(Some(got_headers)));
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = front.accept().await.unwrap();
            let svc = service_fn(move |_req| {
                let pool = pool.clone();
                let got_headers = got_headers.clone();
                async move {
                    let resp = pool.send(get()).await.expect("response headers");
                    if let Some(tx) = got_headers.lock().unwrap().take() {
                        let _ = tx.send(());
                    }
                    Ok::<_, std::convert::Infallible>(resp.map(super::super::Body::H2))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
        // The client.
        let tcp = TcpStream::connect(front_addr).await.unwrap();
        let (client, conn) = ::h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let req = Request::post("http://etcd-proxy/etcdserverpb.KV/Range")
            .body(())
            .unwrap();
        let (response, _tx) = client.send_request(req, true).unwrap();
        // The reset may overtake the response HEADERS on the client's side; either way it
        // must carry etcd's code.
        let outcome = tokio::time::timeout(Duration::from_secs(5), async move {
            let mut body = response.await?.into_body();
            while body.data().await.transpose()?.is_some() {}
            Ok::<_, ::h2::Error>(())
        })
        .await
        .expect("reset in time");
        let err = outcome.expect_err("the stream is reset");
        assert_eq!(err.reason(), Some(Reason::ENHANCE_YOUR_CALM), "{err}");
    }
}
