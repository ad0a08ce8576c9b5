//! How many bytes a port-forward connection may have in flight one way, with injected latency.
//!
//! In a real cluster a tunnel is one TCP connection from the client to the API server (and on
//! to the kubelet), whatever the protocol on top: WebSocket, SPDY, or SPDY inside WebSocket.
//! What limits a bulk transfer over a long round trip is how many unacknowledged bytes TCP
//! lets the sender have out: the smaller of the receiver's window and the sender's buffer.
//! Linux autotunes both up to its defaults' maxima, `net.ipv4.tcp_wmem` 4 MiB and
//! `net.ipv4.tcp_rmem` 6 MiB, so one direction of a connection carries at most
//! [`IN_FLIGHT`] bytes per round trip.
//!
//! The simulator applies the same budget to every protocol, per connection and direction: a
//! message takes its bytes before it is queued with its delay, and gives them back one more
//! one-way delay after it was delivered (the acknowledgement's way back). Without latency
//! the budget only bounds what is queued.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The bytes one direction of a connection may have unacknowledged.
pub(crate) const IN_FLIGHT: usize = 4 << 20;

/// One direction of one connection.
#[derive(Clone)]
pub(crate) struct InFlight(Arc<Semaphore>);

/// Bytes in flight: give them back with [`Held::acked`] once delivered.
pub(crate) struct Held {
    _room: OwnedSemaphorePermit,
}

impl InFlight {
    pub(crate) fn new() -> Self {
        Self(Arc::new(Semaphore::new(IN_FLIGHT)))
    }

    /// Waits until `n` more bytes may be in flight (a message larger than the budget takes
    /// all of it). `None` never happens: the semaphore is never closed.
    pub(crate) async fn reserve(&self, n: usize) -> Option<Held> {
        let n = n.clamp(1, IN_FLIGHT) as u32;
        self.0
            .clone()
            .acquire_many_owned(n)
            .await
            .ok()
            .map(|_room| Held { _room })
    }
}

impl Held {
    /// The bytes were delivered: their room comes back after the acknowledgement's trip.
    pub(crate) fn acked(self, latency: Duration) {
        if latency.is_zero() {
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            drop(self);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn room_comes_back_a_one_way_delay_after_delivery() {
        let link = InFlight::new();
        let all = link.reserve(IN_FLIGHT).await.expect("room");
        let more = tokio::time::timeout(Duration::from_millis(1), link.reserve(1)).await;
        assert!(more.is_err(), "nothing more fits while the budget is out");
        let latency = Duration::from_millis(10);
        all.acked(latency);
        let start = tokio::time::Instant::now();
        let one = tokio::time::timeout(Duration::from_secs(1), link.reserve(1))
            .await
            .expect("room again")
            .expect("open");
        assert_eq!(start.elapsed(), latency);
        drop(one);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_larger_than_the_budget_takes_all_of_it() {
        let link = InFlight::new();
        let big = link.reserve(IN_FLIGHT * 2).await.expect("room");
        assert!(
            tokio::time::timeout(Duration::from_millis(1), link.reserve(1))
                .await
                .is_err()
        );
        big.acked(Duration::ZERO);
        assert!(link.reserve(1).await.is_some());
    }
}
