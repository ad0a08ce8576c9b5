//! Who may hold a connection: caps on open connections per listener and per client address,
//! and the per-connection limits a client meets before it has authenticated.
//!
//! Every listener is assumed exposed. A connection costs memory before it has said anything
//! (socket buffers, a task, hyper's and h2's state), so the count of connections is the first
//! bound: a connection over either cap is closed at once, before TLS or HTTP. The per-address
//! cap keeps one client from taking the listener's whole budget; the per-listener cap bounds
//! the total, whatever the number of addresses. Setting a connection up (TLS, the HTTP/2
//! handshake) costs CPU too, so each address also has a rate of new connections (a token
//! bucket, as large as one second's worth): a client that opens and drops connections as fast
//! as it can gets most of them closed at accept, which costs next to nothing.
//!
//! Refusals are logged as one warning per [`WARN_EVERY`] per listener that counts the
//! connections refused since the last one, so a flood cannot flood the log too.
//!
//! Invariant: a [`Permit`] exists for every accepted connection that is being served, and its
//! drop gives both counts back; the counts therefore never drift, however a connection ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// How often a listener may log that it refused connections.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Limits on what a client may do before its requests have been authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections per listener.
    pub max_connections: usize,
    /// Open connections per client address, over all listeners.
    pub max_connections_per_address: usize,
    /// New connections per second per client address, over all listeners (also the burst).
    pub max_connection_rate_per_address: u32,
    /// How long a connection may stay without a request in flight until one of its requests
    /// has been authenticated (from accept: the time to a first complete request). Also
    /// hyper's HTTP/1.1 header read timeout.
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_address: 256,
            max_connection_rate_per_address: 200,
            header_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener has `max_connections` open.
    Listener,
    /// The client's address has `max_connections_per_address` open.
    Address,
    /// The client's address opened more than `max_connection_rate_per_address` in the last
    /// second.
    Rate,
}

/// Addresses remembered before idle ones are forgotten (bounds the table against clients
/// with very many addresses).
const MAX_TRACKED: usize = 65_536;

/// One client address.
#[derive(Debug)]
struct Client {
    open: usize,
    /// New connections it may still open now.
    tokens: f64,
    refilled: Instant,
}

impl Client {
    /// Adds what `rate` has earned since the last refill, up to one second's worth.
    fn refill(&mut self, now: Instant, rate: f64) {
        let earned = now.duration_since(self.refilled).as_secs_f64() * rate;
        self.tokens = (self.tokens + earned).min(rate);
        self.refilled = now;
    }
}

/// Connection counts shared by every listener of one proxy.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    per_address: Mutex<HashMap<IpAddr, Client>>,
}

impl Admission {
    /// Counts for `limits`.
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            per_address: Mutex::new(HashMap::new()),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A listener's own count, drawing on these shared ones.
    pub fn listener(self: &Arc<Self>) -> ListenerAdmission {
        ListenerAdmission {
            shared: self.clone(),
            open: Arc::new(AtomicUsize::new(0)),
            warn: Arc::new(WarnGate::default()),
        }
    }
}

/// One listener's connection count.
#[derive(Debug, Clone)]
pub struct ListenerAdmission {
    shared: Arc<Admission>,
    open: Arc<AtomicUsize>,
    warn: Arc<WarnGate>,
}

impl ListenerAdmission {
    /// Admits a connection from `peer`, or says why not.
    pub fn admit(&self, peer: IpAddr) -> Result<Permit, Refusal> {
        let limits = self.shared.limits;
        if self.open.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Listener);
        }
        let mut per = self
            .shared
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let rate = f64::from(limits.max_connection_rate_per_address);
        let now = Instant::now();
        if per.len() >= MAX_TRACKED {
            per.retain(|_, c| c.open > 0);
        }
        let client = per.entry(peer).or_insert(Client {
            open: 0,
            tokens: rate,
            refilled: now,
        });
        client.refill(now, rate);
        let refusal = if client.open >= limits.max_connections_per_address {
            Some(Refusal::Address)
        } else if client.tokens < 1.0 {
            Some(Refusal::Rate)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            drop(per);
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(refusal);
        }
        client.tokens -= 1.0;
        client.open += 1;
        Ok(Permit {
            shared: self.shared.clone(),
            open: self.open.clone(),
            peer,
        })
    }

    /// Counts a refusal; returns how many to report now, if a warning is due.
    pub fn refused(&self) -> Option<u64> {
        self.warn.hit(Instant::now())
    }

    /// Connections open on this listener.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One admitted connection; dropping it gives its place back.
#[derive(Debug)]
pub struct Permit {
    shared: Arc<Admission>,
    open: Arc<AtomicUsize>,
    peer: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        let mut per = self
            .shared
            .per_address
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let rate = f64::from(self.shared.limits.max_connection_rate_per_address);
        if let Some(c) = per.get_mut(&self.peer) {
            c.open -= 1;
            c.refill(Instant::now(), rate);
            // Forgotten once nothing is open and its bucket is full again: it would start
            // afresh in the same state.
            if c.open == 0 && c.tokens >= rate {
                per.remove(&self.peer);
            }
        }
    }
}

/// Lets one warning through per [`WARN_EVERY`], counting the events in between.
#[derive(Debug, Default)]
struct WarnGate {
    /// Events since the last warning.
    pending: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl WarnGate {
    /// Records one event at `now`; `Some(n)` when a warning covering `n` events is due.
    fn hit(&self, now: Instant) -> Option<u64> {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            return None;
        }
        *last = Some(now);
        Some(self.pending.swap(0, Ordering::AcqRel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn each_address_opens_at_most_its_rate_per_second() {
        let shared = Admission::new(Limits {
            max_connection_rate_per_address: 10,
            ..Limits::default()
        });
        let l = shared.listener();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        for _ in 0..10 {
            drop(l.admit(a).expect("within the burst"));
        }
        assert_eq!(l.admit(a).unwrap_err(), Refusal::Rate);
        assert!(l.admit(b).is_ok(), "another address has its own bucket");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(l.admit(a).is_ok(), "a tenth of a second earns one");
        assert_eq!(l.admit(a).unwrap_err(), Refusal::Rate);
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..10 {
            drop(l.admit(a).expect("refilled to one second's worth, no more"));
        }
        assert_eq!(l.admit(a).unwrap_err(), Refusal::Rate);
    }

    #[tokio::test(start_paused = true)]
    async fn caps_per_address_and_per_listener_and_gives_places_back() {
        let shared = Admission::new(Limits {
            max_connections: 3,
            max_connections_per_address: 2,
            ..Limits::default()
        });
        let l = shared.listener();
        let a1 = l.admit(ip("10.0.0.1")).unwrap();
        let _a2 = l.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(l.admit(ip("10.0.0.1")).unwrap_err(), Refusal::Address);
        let _b1 = l.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(l.admit(ip("10.0.0.3")).unwrap_err(), Refusal::Listener);
        assert_eq!(l.open(), 3, "refusals leave no count behind");
        drop(a1);
        assert_eq!(l.open(), 2);
        let _a3 = l.admit(ip("10.0.0.1")).expect("a place was given back");
    }

    #[tokio::test(start_paused = true)]
    async fn the_address_count_spans_listeners() {
        let shared = Admission::new(Limits {
            max_connections_per_address: 1,
            ..Limits::default()
        });
        let (one, two) = (shared.listener(), shared.listener());
        let _p = one.admit(ip("::1")).unwrap();
        assert_eq!(two.admit(ip("::1")).unwrap_err(), Refusal::Address);
        assert!(two.admit(ip("127.0.0.2")).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_reported_once_per_interval_with_their_count() {
        let gate = WarnGate::default();
        assert_eq!(gate.hit(Instant::now()), Some(1));
        for _ in 0..99 {
            assert_eq!(gate.hit(Instant::now()), None);
        }
        tokio::time::advance(WARN_EVERY).await;
        assert_eq!(
            gate.hit(Instant::now()),
            Some(100),
            "the 99 held back, and this one"
        );
        assert_eq!(gate.hit(Instant::now()), None);
    }
}
