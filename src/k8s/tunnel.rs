//! Port-forward tunnels: one kube-rs `Portforwarder` (WebSocket `v4.channel.k8s.io`) per TCP
//! connection to etcd inside a pod.
//!
//! A v4 WebSocket carries exactly one TCP connection (the kubelet dials the pod once per
//! socket), so the upstream pool opens one tunnel per upstream connection and keeps it. The
//! kubelet reports failures as text on the port's error channel — for example when etcd does
//! not listen on the pod's loopback, which is where the container runtime dials. We surface
//! that text as the connection's read error instead of a bare EOF, so the user sees why.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

/// Why a tunnel could not be opened or died.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RBAC does not allow port-forwarding.
    #[error(
        "forbidden to port-forward to pod {pod} in namespace {namespace}: the Kubernetes user needs \
         `create` on `pods/portforward` (see deploy/rbac.yaml); API server said: {message}"
    )]
    Forbidden {
        /// The pod.
        pod: String,
        /// The namespace.
        namespace: String,
        /// The API server's message.
        message: String,
    },
    /// The pod is gone.
    #[error("pod {pod} not found in namespace {namespace}")]
    PodNotFound {
        /// The pod.
        pod: String,
        /// The namespace.
        namespace: String,
    },
    /// The upgrade failed for another reason.
    #[error("cannot open a port-forward tunnel to pod {pod}: {source}")]
    Open {
        /// The pod.
        pod: String,
        /// What kube said.
        #[source]
        source: kube::Error,
    },
    /// Nothing listens on the port on the pod's loopback.
    #[error(
        "nothing is listening on localhost:{port} inside pod {pod}: etcd is down there, or it does \
         not listen on the pod's loopback, where port-forward connects (make etcd listen on \
         127.0.0.1 or 0.0.0.0, or pass the right --remote-port)"
    )]
    NotListening {
        /// The pod.
        pod: String,
        /// The port.
        port: u16,
    },
    /// Any other error text the kubelet sent.
    #[error("port-forward to pod {pod} failed: {message}")]
    Kubelet {
        /// The pod.
        pod: String,
        /// The kubelet's text.
        message: String,
    },
}

/// Opens port-forward tunnels to pods in one namespace.
#[derive(Clone)]
pub struct Tunneler {
    pods: Api<Pod>,
    namespace: String,
}

impl Tunneler {
    /// Tunnels through `client` into `namespace`.
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            pods: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
        }
    }

    /// Opens one tunnel to `port` in `pod`.
    pub async fn open(&self, pod: &str, port: u16) -> Result<TunnelStream, Error> {
        let mut forwarder = self
            .pods
            .portforward(pod, &[port])
            .await
            .map_err(|e| self.open_error(pod, e))?;
        let (Some(stream), Some(error)) = (forwarder.take_stream(port), forwarder.take_error(port))
        else {
            return Err(Error::Kubelet {
                pod: pod.to_owned(),
                message: "port missing from forwarder".into(),
            });
        };
        let span = tracing::debug_span!("tunnel", pod, port);
        let m = crate::metrics::get();
        m.tunnels_opened.inc();
        m.tunnels_open.inc();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(e) = forwarder.join().await {
                    tracing::debug!(error = %e, "tunnel ended with an error");
                }
                crate::metrics::get().tunnels_open.dec();
            },
            span,
        ));
        tracing::debug!(pod, port, "tunnel opened");
        Ok(TunnelStream {
            stream,
            error: Some(Box::pin(error)),
            pod: pod.to_owned(),
            port,
        })
    }

    fn open_error(&self, pod: &str, e: kube::Error) -> Error {
        let (pod, namespace) = (pod.to_owned(), self.namespace.clone());
        match super::api_status(&e) {
            Some((403, message)) => Error::Forbidden {
                pod,
                namespace,
                message: message.to_owned(),
            },
            Some((404, _)) => Error::PodNotFound { pod, namespace },
            _ => Error::Open { pod, source: e },
        }
    }
}

/// Whether `err` shows that a request never reached etcd because its tunnel failed: the
/// tunnel could not be opened, or the kubelet could not connect to etcd inside the pod.
///
/// hyper's HTTP/1 keeps our error as an `io::Error` source, but the `h2` crate flattens I/O
/// errors to their kind and text, so on HTTP/2 connections the text is all that is left.
pub fn never_reached_etcd(err: &(dyn std::error::Error + 'static)) -> bool {
    crate::error::find_cause::<Error>(err).is_some()
        || crate::error::one_line(err).contains(NOT_LISTENING_PREFIX)
}

/// The start of [`Error::NotListening`]'s text.
const NOT_LISTENING_PREFIX: &str = "nothing is listening on localhost:";

/// Classifies the kubelet's error-channel text.
fn kubelet_error(pod: &str, port: u16, message: String) -> Error {
    if message.contains("connection refused") {
        Error::NotListening {
            pod: pod.to_owned(),
            port,
        }
    } else {
        Error::Kubelet {
            pod: pod.to_owned(),
            message,
        }
    }
}

type ErrorFuture = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// The byte stream of one tunnel. At EOF it reports the kubelet's error text, if any.
pub struct TunnelStream {
    stream: DuplexStream,
    error: Option<ErrorFuture>,
    pod: String,
    port: u16,
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before => {
                // EOF: if the kubelet said why, say it (the message precedes the close).
                if let Some(mut error) = this.error.take() {
                    if let Poll::Ready(Some(message)) = error.as_mut().poll(cx) {
                        let e = kubelet_error(&this.pod, this.port, message);
                        return Poll::Ready(Err(io::Error::other(e)));
                    }
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn eof_carries_the_kubelet_error() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let msg = "error forwarding port 2379 to pod etcd-0, uid 1: dial tcp4 127.0.0.1:2379: connect: connection refused";
        let mut t = TunnelStream {
            stream: ours,
            error: Some(Box::pin(std::future::ready(Some(msg.to_owned())))),
            pod: "etcd-0".into(),
            port: 2379,
        };
        theirs.write_all(b"hi").await.unwrap();
        drop(theirs);
        let mut buf = Vec::new();
        let err = t.read_to_end(&mut buf).await.unwrap_err();
        assert_eq!(buf, b"hi");
        assert!(
            err.to_string()
                .contains("nothing is listening on localhost:2379 inside pod etcd-0"),
            "{err}"
        );
    }

    #[test]
    fn refused_dials_are_recognised_even_as_flattened_text() {
        let typed = Error::NotListening {
            pod: "etcd-0".into(),
            port: 2379,
        };
        assert!(never_reached_etcd(&typed));
        // What h2 leaves of it: an io::Error with the text only.
        let flattened = io::Error::other(typed.to_string());
        assert!(never_reached_etcd(&flattened));
        assert!(!never_reached_etcd(&io::Error::other(
            "connection reset by peer"
        )));
    }

    #[tokio::test]
    async fn clean_eof_without_error_text() {
        let (ours, theirs) = tokio::io::duplex(64);
        let mut t = TunnelStream {
            stream: ours,
            error: Some(Box::pin(std::future::ready(None))),
            pod: "p".into(),
            port: 1,
        };
        drop(theirs);
        let mut buf = Vec::new();
        assert_eq!(t.read_to_end(&mut buf).await.unwrap(), 0);
    }
}
