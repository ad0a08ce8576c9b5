//! The connector seam: a client (hyper-util's HTTP/1.1 pool through `tower::Service`, or the
//! HTTP/2 map in `h2.rs` through [`Connector::open`]) asks for a connection to etcd's port in a
//! pod (`http://<pod>:<port>`), and a [`Dial`] implementation opens it: a
//! port-forward tunnel in normal use, a plain TCP connection with `--direct`/`--endpoints`
//! and in tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::tls::UpstreamTls;
use super::BoxError;

/// A boxed byte stream.
pub type BoxIo = Pin<Box<dyn AsyncReadWrite>>;

/// What a dialed connection must be.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + 'static> AsyncReadWrite for T {}

/// The future a [`Dial`] returns.
pub type DialFuture = Pin<Box<dyn Future<Output = Result<BoxIo, BoxError>> + Send>>;

/// Opens a byte stream to etcd's `port` in `pod`.
pub trait Dial: Send + Sync + 'static {
    /// Opens one connection.
    fn dial(&self, pod: &str, port: u16) -> DialFuture;
}

/// hyper-util connector over a [`Dial`].
#[derive(Clone)]
pub(super) struct Connector {
    dial: Arc<dyn Dial>,
    /// TLS to etcd, and whether this connector serves the HTTP/2 client (for ALPN).
    tls: Option<(UpstreamTls, bool)>,
}

impl Connector {
    pub(super) fn new(dial: Arc<dyn Dial>, tls: Option<(UpstreamTls, bool)>) -> Self {
        Self { dial, tls }
    }
}

/// The URI had no host or port: a bug in the caller, reported as a connect error.
#[derive(Debug, thiserror::Error)]
#[error("upstream URI {0} names no pod and port")]
struct BadUri(String);

impl tower::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let target = uri
            .host()
            .zip(uri.port_u16())
            .map(|(h, p)| (h.to_owned(), p));
        let this = self.clone();
        Box::pin(async move {
            let (pod, port) = target.ok_or_else(|| BadUri(uri.to_string()))?;
            Ok(Conn {
                io: TokioIo::new(this.open(&pod, port).await?),
            })
        })
    }
}

impl Connector {
    /// Opens a connection to etcd's `port` in `pod`, with TLS to etcd if configured.
    pub(super) async fn open(&self, pod: &str, port: u16) -> Result<BoxIo, BoxError> {
        let io = self.dial.dial(pod, port).await?;
        Ok(match &self.tls {
            None => io,
            Some((tls, h2)) => {
                let name = tls.server_name(pod)?;
                Box::pin(tls.connector(*h2).connect(name, io).await?) as BoxIo
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A dialed connection, as hyper sees it.
    pub(super) struct Conn {
        #[pin]
        io: TokioIo<BoxIo>,
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

/// Only hyper-util's HTTP/1.1 pool uses this type (the HTTP/2 map wraps [`Connector::open`]'s
/// stream in `coalesce::CoalesceWrites` itself); hyper's default "not vectored" is kept.
impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}
