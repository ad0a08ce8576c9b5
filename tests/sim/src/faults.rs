//! Silent faults on port-forward connections: the ones that end in no answer at all rather
//! than an error, which a client can only notice with timeouts of its own.
//!
//! - **An upgrade nobody answers** ([`PortForwardFault::Unanswered`]). The API server proxies
//!   the port-forward request to the kubelet and waits for its response with no deadline of
//!   its own: `UpgradeAwareHandler.tryUpgrade`
//!   (`staging/src/k8s.io/apimachinery/pkg/util/proxy/upgradeaware.go`) writes the request to
//!   the backend connection (`dial`) and reads the answer with `getResponse`, a plain
//!   `http.ReadResponse` (a deadline is set only on the path that relays a refusal), and
//!   port-forward is a long-running request, exempt from the API server's request timeout
//!   (kube-apiserver's `BasicLongRunningRequestCheck` lists `portforward`). A kubelet whose
//!   streaming server is wedged (or a node that accepted the connection and then fell off the
//!   network) therefore leaves the client's upgrade unanswered, on an open TLS connection,
//!   for as long as the client waits. Other pods (other nodes) are not affected. Here the
//!   request is authenticated and authorized as usual and then held until the fault is
//!   cleared, when it is answered as if the kubelet had come back.
//! - **A black hole after the upgrade** ([`PortForwardFault::BlackHole`]). The 101 reaches
//!   the client and then no byte passes in either direction: not the port prefix the kubelet
//!   writes right after a WebSocket upgrade (`portforward/websocket.go`
//!   `handleWebSocketStreams`), not a SPDY SYN_REPLY. This is what a client sees when the
//!   path drops right after the upgrade (the silent drop below, at the worst moment).
//! - **A silent drop** ([`Faults::drop_silently`]): established connections stop passing
//!   bytes both ways, with no FIN and no RST, as when a cloud load balancer forgets an idle
//!   flow (an Azure Load Balancer without TCP reset: `load-balancer-tcp-reset.md`) or the
//!   network partitions. The client's kernel would retransmit for many minutes before giving
//!   up; only the client's own keepalive notices. New connections are not affected: the
//!   load balancer forgot the old flows, not the route.
//!
//! All three act on the API server's TCP connection ([`Valve`], under TLS), so WebSocket,
//! SPDY and WebSocket-tunnelled SPDY connections are affected alike. A frozen connection is
//! never unfrozen (a dropped flow does not come back), and its socket is never closed while
//! the simulator runs: if the server side ends (say, the kubelet's idle timeout), its FIN
//! would be dropped too, so the socket is kept open instead.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// A fault on new port-forward requests to one pod, set with
/// [`crate::SimCluster::set_portforward_fault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortForwardFault {
    /// The upgrade request is read and not answered until the fault is cleared (a wedged
    /// kubelet behind the API server's proxy).
    Unanswered,
    /// The upgrade is answered with 101 and then the connection passes no bytes either way,
    /// for good (the path dropped right after the upgrade).
    BlackHole,
}

/// The faults in force, per pod.
pub(crate) struct Faults {
    by_pod: watch::Sender<HashMap<String, PortForwardFault>>,
    /// Sockets of frozen connections whose server side has ended, kept open (see the module
    /// doc) until [`Faults::release`].
    kept: Arc<Mutex<Vec<Box<dyn Send>>>>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            by_pod: watch::Sender::new(HashMap::new()),
            kept: Arc::default(),
        }
    }
}

impl Faults {
    /// Sets (or with `None` clears) the fault on new port-forward requests to `pod`.
    pub fn set(&self, pod: &str, fault: Option<PortForwardFault>) {
        self.by_pod.send_modify(|m| {
            match fault {
                Some(f) => m.insert(pod.to_owned(), f),
                None => m.remove(pod),
            };
        });
    }

    /// The fault on `pod` now.
    pub fn get(&self, pod: &str) -> Option<PortForwardFault> {
        self.by_pod.borrow().get(pod).copied()
    }

    /// Waits while `fault` is in force on `pod`.
    pub async fn while_in_force(&self, pod: &str, fault: PortForwardFault) {
        let mut rx = self.by_pod.subscribe();
        // The sender lives as long as `self`: an error cannot happen while we are borrowed.
        let _ = rx.wait_for(|m| m.get(pod) != Some(&fault)).await;
    }

    /// A valve for a new connection.
    pub fn valve(&self) -> ValveHandle {
        ValveHandle {
            frozen: Arc::new(AtomicBool::new(false)),
            kept: self.kept.clone(),
        }
    }

    /// Freezes `valve` (if any) now that its upgrade to `pod` is complete, when `pod` has a
    /// [`PortForwardFault::BlackHole`]: the 101 has been written, nothing more will be.
    pub fn after_upgrade(&self, pod: &str, valve: Option<&ValveHandle>) {
        if self.get(pod) == Some(PortForwardFault::BlackHole) {
            if let Some(v) = valve {
                v.freeze();
            }
        }
    }

    /// Closes the sockets kept open for frozen connections that ended.
    pub fn release(&self) {
        lock(&self.kept).clear();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Freezes one connection's [`Valve`]; cheap to clone (it travels in request extensions).
#[derive(Clone)]
pub(crate) struct ValveHandle {
    frozen: Arc<AtomicBool>,
    kept: Arc<Mutex<Vec<Box<dyn Send>>>>,
}

impl std::fmt::Debug for ValveHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValveHandle")
            .field("frozen", &self.frozen)
            .finish_non_exhaustive()
    }
}

impl ValveHandle {
    /// From now on the connection passes no bytes, for good.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// Wraps the connection's socket.
    pub fn wrap<S: Send + 'static>(&self, io: S) -> Valve<S> {
        Valve {
            io: Some(io),
            handle: self.clone(),
        }
    }
}

/// A socket that can be frozen: while frozen, reads and writes never complete (no byte in
/// or out, no EOF, no error), and dropping it keeps the socket open.
pub(crate) struct Valve<S: Send + 'static> {
    io: Option<S>,
    handle: ValveHandle,
}

impl<S: Send + 'static> Valve<S> {
    fn frozen(&self) -> bool {
        self.handle.frozen.load(Ordering::SeqCst)
    }
}

impl<S: Send + 'static> Drop for Valve<S> {
    fn drop(&mut self) {
        if self.frozen() {
            if let Some(io) = self.io.take() {
                lock(&self.handle.kept).push(Box::new(io));
            }
        }
    }
}

// Frozen polls return `Pending` without registering a waker: nothing ever wakes a dropped
// flow. The inner socket may still wake the task (data arrived); it then finds the valve
// frozen and sleeps again.
impl<S: AsyncRead + Unpin + Send + 'static> AsyncRead for Valve<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.frozen() {
            return Poll::Pending;
        }
        match this.io.as_mut() {
            Some(io) => Pin::new(io).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<S: AsyncWrite + Unpin + Send + 'static> AsyncWrite for Valve<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.frozen() {
            return Poll::Pending;
        }
        match this.io.as_mut() {
            Some(io) => Pin::new(io).poll_write(cx, buf),
            None => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.frozen() {
            return Poll::Pending;
        }
        match this.io.as_mut() {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.frozen() {
            return Poll::Pending;
        }
        match this.io.as_mut() {
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_frozen_valve_passes_nothing_and_keeps_the_socket() {
        let faults = Faults::default();
        let (ours, mut theirs) = tokio::io::duplex(64);
        let handle = faults.valve();
        let mut valve = handle.wrap(ours);
        valve.write_all(b"before").await.unwrap();
        let mut got = [0u8; 6];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"before");

        handle.freeze();
        theirs.write_all(b"after").await.unwrap();
        let mut buf = [0u8; 5];
        let read = tokio::time::timeout(Duration::from_millis(50), valve.read(&mut buf)).await;
        assert!(read.is_err(), "a frozen valve delivers nothing");
        let write = tokio::time::timeout(Duration::from_millis(50), valve.write_all(b"x")).await;
        assert!(write.is_err(), "a frozen valve sends nothing");

        drop(valve);
        let eof = tokio::time::timeout(Duration::from_millis(50), theirs.read(&mut buf)).await;
        assert!(eof.is_err(), "no EOF: the socket is kept open");
        faults.release();
        let eof = tokio::time::timeout(Duration::from_secs(5), theirs.read(&mut buf)).await;
        assert!(matches!(eof, Ok(Ok(0))), "released: {eof:?}");
    }

    #[tokio::test]
    async fn faults_are_per_pod_and_cleared_waiters_go_on() {
        let faults = Arc::new(Faults::default());
        faults.set("etcd-1", Some(PortForwardFault::Unanswered));
        assert_eq!(faults.get("etcd-0"), None);
        assert_eq!(faults.get("etcd-1"), Some(PortForwardFault::Unanswered));
        let waiter = {
            let faults = faults.clone();
            tokio::spawn(async move {
                faults
                    .while_in_force("etcd-1", PortForwardFault::Unanswered)
                    .await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "held while the fault is in force");
        faults.set("etcd-1", None);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released")
            .unwrap();
    }
}
