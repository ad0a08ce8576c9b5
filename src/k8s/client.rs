//! The `kube::Client`: kube's default stack, rebuilt with `TCP_NODELAY` on the socket.
//!
//! Every tunnel byte crosses the API-server connection as a small WebSocket or SPDY frame;
//! with Nagle on, about half of the small requests measured waited ~40 ms for a delayed ACK
//! (`docs/portforward.md` §5). kube's `ClientBuilder` makes its own `HttpConnector` and offers
//! no switch for it, so the stack is assembled here the way kube 5's
//! `client/builder.rs` (`TryFrom<Config> for ClientBuilder`, `make_generic_builder`) does it,
//! keeping each of its defaults:
//!
//! - the proxy (see [`super::proxy`]): HTTP `CONNECT` (hyper-util `Tunnel`), the same over TLS
//!   to an `https://` proxy (verified with the cluster's TLS settings, as kube and Go's
//!   `net/http` do), or SOCKS5 (hyper-util `SocksV5`, names resolved by the proxy);
//! - TLS from the kubeconfig: CA, client certificate (or the exec plugin's),
//!   `tls-server-name`, `insecure-skip-tls-verify`;
//! - `hyper_timeout::TimeoutConnector` with the config's connect (30 s), read (none) and write
//!   (295 s) timeouts. The connect timeout covers TCP, the proxy handshake and TLS. The
//!   read/write timeouts wrap the connection itself, so they also apply to upgraded
//!   (port-forward) connections;
//! - the base URI, kube's retry of 429/503/504 (`default_retry`), the auth layer (token,
//!   token file, exec plugin, refreshed as they expire) and the extra (impersonation) headers.
//!
//! kube's request-tracing layer is left out: it only logs, and logs every 5xx at error level,
//! where etcd-proxy reports failures itself in one line.
//!
//! `TCP_NODELAY` and TCP keepalive (30 s, as client-go) are set on the socket to the proxy when
//! there is one: that is the connection the frames cross first.

use http::Uri;
use hyper::rt::{Read, Write};
use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::connect::proxy::{SocksV5, Tunnel};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::TokioExecutor;
use kube::client::retry::RetryPolicy;
use kube::client::ConfigExt;
use tower::retry::RetryLayer;
use tower::{BoxError, Service, ServiceBuilder};

use super::proxy::{Kind, Proxy};

/// TCP keepalive on the API-server connection, as client-go dials it (`transport/cache.go`:
/// `net.Dialer{KeepAlive: 30s}`, which Go applies as both idle time and probe interval): a
/// connection that went away silently while idle (a laptop that slept or changed networks,
/// a load balancer's idle drop) is reset by the kernel instead of holding the pod watch or a
/// quiet tunnel forever. kube's own connector sets none.
const TCP_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);

/// kube's default client for `config`, through `proxy`, with `TCP_NODELAY`.
pub fn build(
    config: &kube::Config,
    namespace: &str,
    proxy: Option<&Proxy>,
) -> Result<kube::Client, kube::Error> {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_keepalive(Some(TCP_KEEPALIVE));
    tcp.set_keepalive_interval(Some(TCP_KEEPALIVE));
    let Some(proxy) = proxy else {
        return finish(tcp, config, namespace);
    };
    match proxy.kind {
        Kind::Http => finish(tunnel(proxy, tcp), config, namespace),
        Kind::Https => {
            let tls = config.rustls_https_connector_with_connector(tcp)?;
            finish(tunnel(proxy, tls), config, namespace)
        }
        Kind::Socks5 => {
            let mut socks = SocksV5::new(proxy.uri.clone(), tcp);
            if let Some((user, pass)) = &proxy.socks_auth {
                socks = socks.with_auth(user.clone(), pass.clone());
            }
            finish(socks, config, namespace)
        }
    }
}

/// HTTP `CONNECT` through `proxy`, reached with `connector`.
fn tunnel<C>(proxy: &Proxy, connector: C) -> Tunnel<C> {
    let tunnel = Tunnel::new(proxy.uri.clone(), connector);
    match &proxy.basic_auth {
        Some(auth) => tunnel.with_auth(auth.clone()),
        None => tunnel,
    }
}

/// TLS, timeouts and kube's layers on top of `connector` (which reaches the API server's
/// TCP port, directly or through a proxy).
fn finish<C>(
    connector: C,
    config: &kube::Config,
    namespace: &str,
) -> Result<kube::Client, kube::Error>
where
    C: Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: Connection + Read + Write + Send + Unpin + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    let https = config.rustls_https_connector_with_connector(connector)?;
    let mut timed = TimeoutConnector::new(https);
    timed.set_connect_timeout(config.connect_timeout);
    timed.set_read_timeout(config.read_timeout);
    timed.set_write_timeout(config.write_timeout);
    timed.set_reset_reader_on_write(config.reset_reader_on_write);
    let hyper_client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build::<_, kube::client::Body>(timed);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(BoxError::from)
        .service(hyper_client);
    Ok(kube::Client::new(service, namespace.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// kube's default connect timeout.
    const KUBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

    /// A server that accepts TCP and never answers the TLS handshake: the request fails at
    /// kube's 30 s connect timeout (on a paused clock), not later and not never.
    #[tokio::test(start_paused = true)]
    async fn connect_timeout_covers_the_tls_handshake() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let config = kube::Config::new(format!("https://{addr}").parse().unwrap());
        assert_eq!(config.connect_timeout, Some(KUBE_CONNECT_TIMEOUT));
        let client = build(&config, "default", None).unwrap();
        let started = tokio::time::Instant::now();
        let req = http::Request::get("/version").body(Vec::new()).unwrap();
        let outcome = tokio::time::timeout(KUBE_CONNECT_TIMEOUT * 2, client.request_text(req))
            .await
            .expect("the connect timeout fires before twice its length");
        let err = outcome.expect_err("nothing answers the handshake");
        let waited = started.elapsed();
        assert!(
            waited >= KUBE_CONNECT_TIMEOUT
                && waited < KUBE_CONNECT_TIMEOUT + Duration::from_secs(1),
            "failed after {waited:?}: {err}"
        );
        held.abort();
    }

    /// kube's default retry is kept: a 503 is retried (after kube's short backoff, on a paused
    /// clock) and the caller sees the 200 that follows; `default_retry: false` turns it off.
    #[tokio::test(start_paused = true)]
    async fn a_503_is_retried_as_kube_does() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        let server = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        let status = if n == 0 { 503 } else { 200 };
                        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"ok"));
                        let mut res = http::Response::new(body);
                        *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        async move { Ok::<_, std::convert::Infallible>(res) }
                    });
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        let mut config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = build(&config, "default", None).unwrap();
        let req = http::Request::get("/version").body(Vec::new()).unwrap();
        let text = tokio::time::timeout(Duration::from_secs(10), client.request_text(req))
            .await
            .expect("answered")
            .expect("the retry got the 200");
        assert_eq!(text, "ok");
        assert_eq!(served.load(Ordering::SeqCst), 2, "one 503, one retry");

        served.store(0, Ordering::SeqCst);
        config.default_retry = false;
        let client = build(&config, "default", None).unwrap();
        let req = http::Request::get("/version").body(Vec::new()).unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(10), client.request_text(req))
            .await
            .expect("answered");
        assert!(outcome.is_err(), "the 503 reaches the caller");
        assert_eq!(served.load(Ordering::SeqCst), 1);
        server.abort();
    }
}
