//! The kubelet's `--streaming-connection-idle-timeout` for port-forward sockets.
//!
//! The kubelet hands the timeout to the WebSocket stream
//! (`pkg/kubelet/cri/streaming/portforward/websocket.go` calls
//! `conn.SetIdleTimeout(idleTimeout)`), and
//! `staging/src/k8s.io/apimachinery/pkg/util/httpstream/wsstream/conn.go`
//! enforces it with `resetTimeout()`, which moves the connection's
//! read/write deadline to now+timeout. It is called before each
//! `websocket.Message.Receive` in `handle` and at the start of each `write`.
//! So the socket dies once no message has been received *or* sent for the
//! timeout: the pending receive fails with an i/o timeout, the loop ends and
//! `conn.Close()` runs. Its Close frame is written with the expired deadline,
//! so it never reaches the client: the connection just ends.
//!
//! Ping/Pong frames do not count as activity. This is from reading the code
//! (not observed on a cluster): golang.org/x/net/websocket answers pings
//! inside `Message.Receive` (its frame handler writes the Pong and keeps
//! reading) without going through conn.go's `resetTimeout`.
//!
//! The timeout is read anew whenever it changes, so a new value also applies
//! to sockets that are already open.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// When a socket last received or sent a data message.
#[derive(Debug)]
pub(crate) struct Activity {
    base: Instant,
    /// Nanoseconds after `base`.
    last: AtomicU64,
}

impl Activity {
    /// Active as of now.
    pub fn new() -> Self {
        Activity {
            base: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Records a data message received or sent (conn.go `resetTimeout`).
    pub fn touch(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// Resolves once the socket has been idle for the current timeout; never
/// while the timeout is `None`.
pub(crate) async fn expired(activity: &Activity, mut timeout: watch::Receiver<Option<Duration>>) {
    // Once the sender is gone the value can no longer change.
    let mut changes_possible = true;
    loop {
        let current = *timeout.borrow_and_update();
        let deadline = current.map(|t| activity.last() + t);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return;
        }
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Woken at the old deadline: re-check, activity may have moved it.
            _ = sleep => {}
            changed = timeout.changed(), if changes_possible => {
                changes_possible = changed.is_ok();
            }
        }
        if deadline.is_none() && !changes_possible {
            return std::future::pending().await;
        }
    }
}
