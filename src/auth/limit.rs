//! Slows down password guessing, per client address.
//!
//! An address may have at most [`MAX_FAILURES`] attempts that failed within [`WINDOW`] *or are
//! still being checked*: attempts in flight count against the budget before their outcome is
//! known, so a client that sends fifty logins at once gets five checks, not fifty. Once the
//! failures reach the budget, every attempt from that address is refused without a check for
//! [`BLOCK`]. A success clears the address's failures.
//!
//! Invariant: an entry's `in_flight` equals the number of live [`Attempt`]s for its address,
//! and an entry is only forgotten when it has none (so a finishing attempt always finds it).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Failed (or unfinished) attempts allowed per window.
pub const MAX_FAILURES: u32 = 5;
/// The counting window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// How long a client stays blocked.
pub const BLOCK: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
struct Entry {
    failures: u32,
    in_flight: u32,
    since: Instant,
    blocked_until: Option<Instant>,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            failures: 0,
            in_flight: 0,
            since: now,
            blocked_until: None,
        }
    }

    fn blocked(&self, now: Instant) -> bool {
        self.blocked_until.is_some_and(|u| now < u)
    }

    /// Worth keeping: counts in the window, a block in force, or attempts in flight.
    fn live(&self, now: Instant) -> bool {
        self.in_flight > 0
            || self.blocked(now)
            || (self.failures > 0 && now.duration_since(self.since) < WINDOW)
    }
}

/// Login attempts per client address.
#[derive(Default)]
pub struct Limiter {
    clients: Mutex<HashMap<IpAddr, Entry>>,
}

impl Limiter {
    /// Starts an attempt from `ip`, or `None` if it must be refused without a check.
    pub fn begin(&self, ip: IpAddr) -> Option<Attempt<'_>> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        clients.retain(|_, e| e.live(now));
        let e = clients.entry(ip).or_insert_with(|| Entry::new(now));
        if e.blocked_until.is_some_and(|u| now >= u) {
            // The block served its time: a clean slate.
            e.blocked_until = None;
            e.failures = 0;
            e.since = now;
        }
        if now.duration_since(e.since) >= WINDOW && !e.blocked(now) {
            e.failures = 0;
            e.since = now;
        }
        if e.blocked(now) || e.failures + e.in_flight >= MAX_FAILURES {
            return None;
        }
        e.in_flight += 1;
        Some(Attempt {
            limiter: self,
            ip,
            done: false,
        })
    }

    fn finish(&self, ip: IpAddr, ok: bool) -> bool {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let Some(e) = clients.get_mut(&ip) else {
            return false;
        };
        e.in_flight = e.in_flight.saturating_sub(1);
        if ok {
            e.failures = 0;
            e.blocked_until = None;
            return false;
        }
        if e.failures == 0 {
            e.since = now;
        }
        e.failures += 1;
        if e.failures >= MAX_FAILURES && !e.blocked(now) {
            e.blocked_until = Some(now + BLOCK);
            return true;
        }
        false
    }
}

/// A login attempt being checked; dropped unfinished (its client went away), it counts as a
/// failure.
pub struct Attempt<'a> {
    limiter: &'a Limiter,
    ip: IpAddr,
    done: bool,
}

impl Attempt<'_> {
    /// Records the outcome; returns true if the address is now blocked.
    pub fn finish(mut self, ok: bool) -> bool {
        self.done = true;
        self.limiter.finish(self.ip, ok)
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.finish(self.ip, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn blocks_after_repeated_failures_per_address() {
        let l = Limiter::default();
        let (a, b) = (ip("127.0.0.1"), ip("127.0.0.2"));
        for _ in 1..MAX_FAILURES {
            assert!(!l.begin(a).unwrap().finish(false));
        }
        assert!(l.begin(a).unwrap().finish(false), "the last failure blocks");
        assert!(l.begin(a).is_none());
        assert!(l.begin(b).is_some(), "other clients are not affected");
        tokio::time::advance(BLOCK).await;
        assert!(l.begin(a).is_some(), "the block ends");
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_in_flight_count_before_their_outcome_is_known() {
        let l = Limiter::default();
        let a = ip("10.1.1.1");
        let attempts: Vec<_> = (0..MAX_FAILURES).map(|_| l.begin(a).unwrap()).collect();
        assert!(
            l.begin(a).is_none(),
            "no sixth check while five are running"
        );
        let mut attempts = attempts.into_iter();
        attempts.next().unwrap().finish(true);
        assert!(
            l.begin(a).is_some(),
            "a success frees its place and clears failures"
        );
        drop(attempts);
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_attempts_count_as_failures() {
        let l = Limiter::default();
        let a = ip("10.1.1.2");
        for _ in 0..MAX_FAILURES {
            drop(l.begin(a).unwrap());
        }
        assert!(l.begin(a).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_older_than_the_window_are_forgotten() {
        let l = Limiter::default();
        let a = ip("10.1.1.3");
        for _ in 1..MAX_FAILURES {
            l.begin(a).unwrap().finish(false);
        }
        tokio::time::advance(WINDOW).await;
        for _ in 1..MAX_FAILURES {
            assert!(!l.begin(a).unwrap().finish(false), "a fresh window");
        }
    }
}
