//! The gRPC side of the upstream: one multiplexed HTTP/2 connection per member, shared by
//! every request to it, in a map keyed by `pod:port`.
//!
//! hyper-util's pooled client did this job before. For HTTP/2 it pools nothing a map cannot:
//! there is one connection per member, and every stream shares it. Its per-request work
//! (checkout, key hashing, moving the request future through several layers) measured at
//! ~5,000 instructions per request under callgrind, 5 % of the proxy's whole cost per get,
//! so the gRPC path uses hyper's connection API directly. HTTP/1.1 (v2, the JSON gateway,
//! health checks) stays on hyper-util's pool: it needs one connection per request in flight.
//!
//! What the pool did that matters here is kept:
//! * one dial per member at a time: requests that arrive while a connection is being set up
//!   wait for that one (a dial is a port-forward tunnel), and the dial runs in its own task;
//! * a closed connection is replaced on the next request;
//! * a request that never left on a connection that turned out to be closed goes again on a
//!   fresh one (hyper hands it back, body included), once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::{BoxFuture, FutureExt, Shared};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_util::rt::TokioExecutor;
use tower::Service;

use super::connect::Connector;
use super::{BoxError, UpstreamBody};

type Sender = SendRequest<UpstreamBody>;
type Connecting = Shared<BoxFuture<'static, Result<Sender, ConnectError>>>;

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
}

impl ConnectError {
    /// The error that stopped the connection.
    pub fn cause(&self) -> &(dyn std::error::Error + 'static) {
        &**self.0
    }
}

enum Slot {
    Ready(Sender),
    Connecting(Connecting),
}

/// HTTP/2 connections to the members.
#[derive(Clone)]
pub(super) struct H2Pool {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    builder: Builder<TokioExecutor>,
    conns: Mutex<HashMap<String, Slot>>,
}

/// A failed HTTP/2 request.
#[derive(Debug, thiserror::Error)]
pub enum H2Error {
    /// No connection to the member could be opened: the request never left.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The request failed on an open connection.
    #[error(transparent)]
    Request(#[from] hyper::Error),
    /// The request URI names no member (a bug in the caller).
    #[error("upstream URI {0} names no pod and port")]
    NoAuthority(String),
}

impl H2Error {
    /// The request never left: no connection could be opened.
    pub fn is_connect(&self) -> bool {
        matches!(self, H2Error::Connect(_) | H2Error::NoAuthority(_))
    }
}

impl H2Pool {
    pub(super) fn new(connector: Connector, builder: Builder<TokioExecutor>) -> Self {
        Self {
            inner: Arc::new(Inner {
                connector,
                builder,
                conns: Mutex::default(),
            }),
        }
    }

    /// Sends `req` on the connection to the member its URI names, opening one if needed.
    pub(super) async fn send(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, H2Error> {
        let Some(key) = req.uri().authority().map(|a| a.as_str().to_owned()) else {
            return Err(H2Error::NoAuthority(req.uri().to_string()));
        };
        let mut retried = false;
        loop {
            let mut sender = self.sender(&key).await?;
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // The connection closed before the request left: once more, on a new one.
                    Some(back) if !retried => {
                        self.forget(&key);
                        retried = true;
                        req = back;
                    }
                    _ => return Err(H2Error::Request(e.into_error())),
                },
            }
        }
    }

    /// An open connection to `key`: the current one, the one being opened, or a new one.
    async fn sender(&self, key: &str) -> Result<Sender, ConnectError> {
        let connecting = {
            let mut conns = self.lock();
            match conns.get(key) {
                Some(Slot::Ready(s)) if !s.is_closed() => return Ok(s.clone()),
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
                    Ok(s) => conns.insert(key.to_owned(), Slot::Ready(s.clone())),
                    Err(_) => conns.remove(key),
                };
            }
        }
        result
    }

    /// Drops the connection to `key` from the map if it has closed.
    fn forget(&self, key: &str) {
        let mut conns = self.lock();
        // The connection that failed is closed by now; a newer, open one stays.
        if matches!(conns.get(key), Some(Slot::Ready(s)) if s.is_closed()) {
            conns.remove(key);
        }
    }

    /// Opens a connection in a task of its own: it completes even if every request that
    /// waited for it gives up (a half-opened tunnel is not left paused until the next one).
    fn connect(&self, key: &str) -> Connecting {
        let inner = self.inner.clone();
        let uri = Uri::builder()
            .scheme("http")
            .authority(key)
            .path_and_query("/")
            .build();
        let opening = tokio::spawn(async move {
            let uri = uri.map_err(ConnectError::new)?;
            let io = inner
                .connector
                .clone()
                .call(uri)
                .await
                .map_err(ConnectError::new)?;
            let (sender, conn) = inner
                .builder
                .handshake(io)
                .await
                .map_err(ConnectError::new)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
            });
            Ok(sender)
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
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
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
        H2Pool::new(
            Connector::new(dial, None),
            Builder::new(TokioExecutor::new()),
        )
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
}
