//! Whether a connection has earned the right to stay open while it does nothing.
//!
//! A connection is *untrusted* until one of its requests has passed the proxy's authentication
//! (every request does when there is no `--auth-file`). An untrusted connection may not stay
//! idle — no request being handled — for longer than the header timeout, counted from accept
//! or from the end of its last request. That one rule bounds the time to a first complete
//! request on both protocols (HTTP/2 has no header read timeout of its own in hyper), and
//! closes connections that only ever fail to log in or only send frames that never make a
//! request (SETTINGS, PING, a header block that never ends).
//!
//! Once trusted, a connection has no idle limit: watches, lease keep-alives and v2
//! long-polls are silent for hours by design. Trust costs nothing per request afterwards (one
//! atomic load).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
struct Idle {
    in_flight: usize,
    since: Instant,
}

/// One connection's activity.
#[derive(Debug)]
pub struct Activity {
    trusted: AtomicBool,
    idle: watch::Sender<Idle>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            trusted: AtomicBool::new(false),
            idle: watch::Sender::new(Idle {
                in_flight: 0,
                since: Instant::now(),
            }),
        }
    }
}

impl Activity {
    /// Marks a request as being handled until the returned guard drops (nothing to track once
    /// the connection is trusted).
    pub fn begin(&self) -> Option<InFlight<'_>> {
        if self.trusted.load(Ordering::Relaxed) {
            return None;
        }
        self.idle.send_modify(|i| i.in_flight += 1);
        Some(InFlight(self))
    }

    /// One of the connection's requests was authenticated.
    pub fn trust(&self) {
        if !self.trusted.swap(true, Ordering::Relaxed) {
            // Wakes `untrusted_idle`, which then never completes.
            self.idle.send_modify(|_| {});
        }
    }

    /// Completes when the connection has been untrusted and idle for `timeout`; never, once
    /// it is trusted.
    pub async fn untrusted_idle(&self, timeout: Duration) {
        let mut rx = self.idle.subscribe();
        loop {
            if self.trusted.load(Ordering::Relaxed) {
                return std::future::pending().await;
            }
            let idle = *rx.borrow_and_update();
            if idle.in_flight > 0 {
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(idle.since + timeout) => return,
                changed = rx.changed() => if changed.is_err() {
                    return std::future::pending().await;
                },
            }
        }
    }
}

/// A request being handled; its drop starts the idle clock again when it was the last.
pub struct InFlight<'a>(&'a Activity);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.idle.send_modify(|i| {
            i.in_flight -= 1;
            if i.in_flight == 0 {
                i.since = Instant::now();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const T: Duration = Duration::from_secs(10);

    /// Whether `untrusted_idle` completes within `within`.
    async fn closes_within(a: &Activity, within: Duration) -> bool {
        tokio::time::timeout(within, a.untrusted_idle(T))
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_untrusted_connection_closes_after_the_timeout_from_accept() {
        let a = Activity::default();
        tokio::time::advance(T / 2).await;
        assert!(!closes_within(&a, T / 2 - Duration::from_millis(1)).await);
        assert!(closes_within(&a, Duration::from_millis(2)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_holds_it_open_and_its_end_restarts_the_clock() {
        let a = Arc::new(Activity::default());
        let guard = a.begin();
        assert!(
            !closes_within(&a, T * 3).await,
            "a request is being handled"
        );
        drop(guard);
        assert!(!closes_within(&a, T - Duration::from_millis(1)).await);
        assert!(closes_within(&a, Duration::from_millis(2)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trusted_connection_is_never_closed_for_idleness() {
        let a = Activity::default();
        let guard = a.begin();
        a.trust();
        drop(guard);
        assert!(a.begin().is_none(), "nothing is tracked once trusted");
        assert!(!closes_within(&a, T * 100).await);
    }

    #[tokio::test(start_paused = true)]
    async fn trust_given_while_waiting_stops_the_clock() {
        let a = Arc::new(Activity::default());
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.untrusted_idle(T).await }
        });
        tokio::time::advance(T / 2).await;
        a.trust();
        tokio::time::advance(T * 10).await;
        assert!(!waiter.is_finished());
        waiter.abort();
    }
}
