//! The optional admin listener (`--admin ADDR`): `/metrics` in Prometheus text format and
//! `/healthz` (200 while at least one member is ready and healthy, else 503), for the gateway
//! Deployment's probes and for scraping.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::member::EtcdPod;
use crate::metrics;
use crate::upstream::health::Health;

/// Scrapers and probes need a few connections; more are refused, whoever opens them.
const MAX_CONNECTIONS: usize = 64;
/// Time to send a request head, and to stay idle between requests.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves the admin endpoints until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    pods: watch::Receiver<Arc<Vec<EtcdPod>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // Over the cap: the connection is closed at once.
        };
        let (health, pods) = (health.clone(), pods.clone());
        let service = service_fn(move |req| {
            let (health, pods) = (health.clone(), pods.clone());
            async move { Ok::<_, Infallible>(answer(&req, &health, &pods)) }
        });
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn answer(
    req: &Request<Incoming>,
    health: &Health,
    pods: &watch::Receiver<Arc<Vec<EtcdPod>>>,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(metrics::get().encode())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/healthz" => {
            let pods = pods.borrow().clone();
            let up = pods
                .iter()
                .filter(|p| p.ready && health.is_up(&p.name))
                .count();
            let status = if up > 0 {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(
                status,
                format!("{up} of {} members ready and healthy\n", pods.len()),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "try /metrics or /healthz\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
