//! The API server's lifecycle: started once, and stopped and started again
//! on the same port to simulate an apiserver outage.
//!
//! Stopping aborts the accept task. That drops the listener, so new
//! connections are refused, and the task's `JoinSet` of connections, so every
//! in-flight request ends and every watch stream is cut (its producer task
//! sees the receiver gone and stops). Port-forward sockets are not touched:
//! once upgraded they belong to their own tasks (see [`crate::portforward`]),
//! which is how a tunnel whose apiserver-to-kubelet path is unaffected keeps
//! working while the front door refuses connections. The object store is not
//! part of the server, so a restarted server keeps the resourceVersion
//! history and watches resume without a 410.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::{api, Shared, SimError};

/// How long re-binding the same port may take (a socket still closing, or a
/// short-lived other user of the port).
const REBIND_DEADLINE: Duration = Duration::from_secs(10);
const REBIND_RETRY: Duration = Duration::from_millis(20);

/// The running (or paused) HTTPS API server.
pub(crate) struct ApiServer {
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl ApiServer {
    /// Starts serving on an already bound listener.
    pub fn start(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        shared: Arc<Shared>,
    ) -> Result<Self, SimError> {
        let addr = listener
            .local_addr()
            .map_err(|e| SimError::io("reading the API server address", e))?;
        let server = ApiServer {
            addr,
            acceptor,
            shared,
            task: Mutex::new(None),
        };
        server.spawn(listener);
        Ok(server)
    }

    fn lock(&self) -> MutexGuard<'_, Option<JoinHandle<()>>> {
        self.task.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(&self, listener: TcpListener) {
        let task = tokio::spawn(api::serve(
            listener,
            self.acceptor.clone(),
            self.shared.clone(),
        ));
        if let Some(old) = self.lock().replace(task) {
            old.abort();
        }
    }

    /// Closes the listener and ends every in-flight API request and watch;
    /// returns once they are gone.
    pub async fn stop(&self) {
        let task = self.lock().take();
        if let Some(task) = task {
            task.abort();
            // Awaiting the aborted task guarantees its listener and
            // connections have been dropped.
            let _ = task.await;
        }
    }

    /// Listens on the same address again. Tokio sets `SO_REUSEADDR`, so
    /// connections of the old listener lingering in TIME_WAIT do not block
    /// the bind; anything else holding the port is retried until a deadline.
    pub async fn resume(&self) -> Result<(), SimError> {
        let deadline = Instant::now() + REBIND_DEADLINE;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("re-binding {} failed, retrying: {e}", self.addr);
                    tokio::time::sleep(REBIND_RETRY).await;
                }
                Err(e) => {
                    return Err(SimError::io(
                        format!("re-binding the API server on {}", self.addr),
                        e,
                    ))
                }
            }
        };
        self.spawn(listener);
        Ok(())
    }

    /// Non-blocking stop for `Drop` paths.
    pub fn abort(&self) {
        if let Some(task) = self.lock().take() {
            task.abort();
        }
    }
}
