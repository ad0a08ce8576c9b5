//! Forward proxies as kubeconfigs' `proxy-url` names them: HTTP `CONNECT` (optionally behind
//! TLS, optionally with Basic auth) and SOCKS5 (optionally with username/password, RFC 1929).
//!
//! Each resolves host names only from its own table (`hosts`): a name the table lacks is
//! refused (502 / SOCKS "host unreachable"). Pointing a kubeconfig at a name only the proxy
//! knows, such as [`etcd_proxy_sim::EXTRA_SAN`], makes any connection that bypasses the
//! proxy fail to resolve, so a test passes only if every connection went through it. Each
//! proxy records the targets it relayed and the requests it refused.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// What a proxy did.
#[derive(Debug, Default, Clone)]
pub struct ProxyLog {
    /// `host:port` of every tunnel opened, in order.
    pub relayed: Vec<String>,
    /// Why requests were refused, in order.
    pub refused: Vec<String>,
}

/// A running proxy; stops accepting when dropped (tunnels already open end with the test).
pub struct TestProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    log: Arc<Mutex<ProxyLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    /// What it did so far.
    pub fn log(&self) -> ProxyLog {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The proxy's name table and credentials.
#[derive(Clone, Default)]
pub struct ProxyOptions {
    /// Host names it resolves (IP literals are used as they are).
    pub hosts: HashMap<String, IpAddr>,
    /// Required credentials (Basic for HTTP, RFC 1929 for SOCKS5).
    pub credentials: Option<(String, String)>,
    /// TLS in front of an HTTP proxy (an `https://` proxy-url).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

struct Shared {
    opts: ProxyOptions,
    log: Arc<Mutex<ProxyLog>>,
}

impl Shared {
    fn refuse(&self, why: String) {
        self.log.lock().unwrap().refused.push(why);
    }

    /// Resolves `host` from the table and connects to `host:port`.
    async fn dial(&self, host: &str, port: u16) -> Option<TcpStream> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip = match self.opts.hosts.get(host) {
            Some(ip) => *ip,
            None => match host.parse::<IpAddr>() {
                Ok(ip) => ip,
                Err(_) => {
                    self.refuse(format!("{host}:{port}: unknown host"));
                    return None;
                }
            },
        };
        match TcpStream::connect((ip, port)).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                self.log
                    .lock()
                    .unwrap()
                    .relayed
                    .push(format!("{host}:{port}"));
                Some(s)
            }
            Err(e) => {
                self.refuse(format!("{host}:{port}: {e}"));
                None
            }
        }
    }
}

/// Accepts on a free port of `ip` and serves each connection with `serve`.
async fn start<F, Fut>(ip: IpAddr, opts: ProxyOptions, serve: F) -> TestProxy
where
    F: Fn(Arc<Shared>, TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind((ip, 0)).await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    let log = Arc::new(Mutex::new(ProxyLog::default()));
    let shared = Arc::new(Shared {
        opts,
        log: log.clone(),
    });
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            while conns.try_join_next().is_some() {}
            conns.spawn(serve(shared.clone(), tcp));
        }
    });
    TestProxy { addr, log, task }
}

/// An HTTP `CONNECT` proxy (TLS in front when `opts.tls` is set).
pub async fn http_proxy(opts: ProxyOptions) -> TestProxy {
    start(LOOPBACK, opts, |shared, tcp| async move {
        match shared.opts.tls.clone() {
            Some(tls) => match tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await {
                Ok(tls) => serve_http(shared, tls).await,
                Err(e) => shared.refuse(format!("TLS handshake: {e}")),
            },
            None => serve_http(shared, tcp).await,
        }
    })
    .await
}

async fn serve_http<S>(shared: Arc<Shared>, io: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(connect(shared, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
}

/// Answers one `CONNECT`: checks credentials, then relays once the client has the 200.
async fn connect(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Empty<bytes::Bytes>> {
    let status = |code| {
        let mut r = Response::new(Empty::new());
        *r.status_mut() = code;
        r
    };
    if req.method() != Method::CONNECT {
        shared.refuse(format!("{} {}: not CONNECT", req.method(), req.uri()));
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    if let Some((user, pass)) = &shared.opts.credentials {
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        );
        let given = req.headers().get(http::header::PROXY_AUTHORIZATION);
        if given.is_none_or(|g| g.as_bytes() != want.as_bytes()) {
            shared.refuse(format!("{}: bad proxy credentials", req.uri()));
            let mut r = status(StatusCode::PROXY_AUTHENTICATION_REQUIRED);
            r.headers_mut().insert(
                http::header::PROXY_AUTHENTICATE,
                http::HeaderValue::from_static("Basic realm=\"test\""),
            );
            return r;
        }
    }
    let Some(authority) = req.uri().authority().cloned() else {
        shared.refuse(format!("{}: no authority", req.uri()));
        return status(StatusCode::BAD_REQUEST);
    };
    let host = authority.host().to_owned();
    let port = authority.port_u16().unwrap_or(443);
    // Resolve and dial before answering, as real proxies do: a failure is a 502.
    let Some(mut upstream) = shared.dial(&host, port).await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut client = TokioIo::new(upgraded);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    });
    status(StatusCode::OK)
}

/// A SOCKS5 proxy (RFC 1928), `CONNECT` only, with RFC 1929 username/password when
/// `opts.credentials` is set.
pub async fn socks5_proxy(opts: ProxyOptions) -> TestProxy {
    start(LOOPBACK, opts, |shared, tcp| async move {
        if let Err(e) = serve_socks(&shared, tcp).await {
            shared.refuse(format!("SOCKS5: {e}"));
        }
    })
    .await
}

async fn serve_socks(shared: &Shared, mut tcp: TcpStream) -> std::io::Result<()> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut head = [0u8; 2];
    tcp.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(bad("not SOCKS5"));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    tcp.read_exact(&mut methods).await?;
    let method = if shared.opts.credentials.is_some() {
        2
    } else {
        0
    };
    if !methods.contains(&method) {
        tcp.write_all(&[5, 0xff]).await?;
        return Err(bad("no acceptable authentication method"));
    }
    tcp.write_all(&[5, method]).await?;
    if let Some((user, pass)) = &shared.opts.credentials {
        let mut ver_len = [0u8; 2];
        tcp.read_exact(&mut ver_len).await?;
        let mut given_user = vec![0u8; usize::from(ver_len[1])];
        tcp.read_exact(&mut given_user).await?;
        let mut plen = [0u8; 1];
        tcp.read_exact(&mut plen).await?;
        let mut given_pass = vec![0u8; usize::from(plen[0])];
        tcp.read_exact(&mut given_pass).await?;
        if given_user != user.as_bytes() || given_pass != pass.as_bytes() {
            tcp.write_all(&[1, 1]).await?;
            return Err(bad("bad credentials"));
        }
        tcp.write_all(&[1, 0]).await?;
    }
    let mut req = [0u8; 4];
    tcp.read_exact(&mut req).await?;
    if req[0] != 5 || req[1] != 1 {
        tcp.write_all(&[5, 7, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
        return Err(bad("not CONNECT"));
    }
    let host = match req[3] {
        1 => {
            let mut ip = [0u8; 4];
            tcp.read_exact(&mut ip).await?;
            IpAddr::from(ip).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            tcp.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            tcp.read_exact(&mut name).await?;
            String::from_utf8(name).map_err(|_| bad("non-UTF-8 host name"))?
        }
        4 => {
            let mut ip = [0u8; 16];
            tcp.read_exact(&mut ip).await?;
            IpAddr::from(ip).to_string()
        }
        _ => return Err(bad("unknown address type")),
    };
    let mut port = [0u8; 2];
    tcp.read_exact(&mut port).await?;
    let port = u16::from_be_bytes(port);
    let Some(mut upstream) = shared.dial(&host, port).await else {
        // 4: host unreachable.
        tcp.write_all(&[5, 4, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
        return Ok(());
    };
    tcp.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
    Ok(())
}

/// A TLS server configuration for a proxy at 127.0.0.1/localhost, and the PEM of the CA
/// that signed it (for the kubeconfig's CA bundle: kube and kubectl verify an `https://`
/// proxy with the cluster's TLS settings).
pub fn proxy_tls() -> (Arc<rustls::ServerConfig>, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test proxy CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (Arc::new(config), ca_cert.pem())
}

/// A plain TCP relay on `ip`:free port to `to`, counting connections: a second address for
/// the API server whose IP is not in its certificate.
pub async fn relay(ip: IpAddr, to: SocketAddr) -> TestProxy {
    start(
        ip,
        ProxyOptions::default(),
        move |shared, mut tcp| async move {
            if let Some(mut upstream) = shared.dial(&to.ip().to_string(), to.port()).await {
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream).await;
            }
        },
    )
    .await
}
