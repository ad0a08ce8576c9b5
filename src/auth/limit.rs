//! Slows down password guessing: after [`MAX_FAILURES`] failed logins from one client address
//! within [`WINDOW`], every further attempt from it fails without a check for [`BLOCK`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed per window.
pub const MAX_FAILURES: u32 = 5;
/// The counting window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// How long a client stays blocked.
pub const BLOCK: Duration = Duration::from_secs(30);

#[derive(Clone, Copy)]
struct Entry {
    failures: u32,
    since: Instant,
    blocked_until: Option<Instant>,
}

/// Failed-login counts per client address.
#[derive(Default)]
pub struct Limiter {
    clients: Mutex<HashMap<IpAddr, Entry>>,
}

impl Limiter {
    /// Whether `ip` may try to log in now.
    pub fn allowed(&self, ip: IpAddr) -> bool {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .get(&ip)
            .and_then(|e| e.blocked_until)
            .is_none_or(|until| Instant::now() >= until)
    }

    /// Records a failed login from `ip`; returns true if it is now blocked.
    pub fn failed(&self, ip: IpAddr) -> bool {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        clients.retain(|_, e| {
            now.duration_since(e.since) < WINDOW || e.blocked_until.is_some_and(|u| u > now)
        });
        let e = clients.entry(ip).or_insert(Entry {
            failures: 0,
            since: now,
            blocked_until: None,
        });
        if now.duration_since(e.since) >= WINDOW {
            *e = Entry {
                failures: 0,
                since: now,
                blocked_until: None,
            };
        }
        e.failures += 1;
        if e.failures >= MAX_FAILURES {
            e.blocked_until = Some(now + BLOCK);
            return true;
        }
        false
    }

    /// Records a successful login: the count starts again.
    pub fn succeeded(&self, ip: IpAddr) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_repeated_failures_per_address() {
        let l = Limiter::default();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 1..MAX_FAILURES {
            assert!(!l.failed(a));
            assert!(l.allowed(a));
        }
        assert!(l.failed(a));
        assert!(!l.allowed(a));
        assert!(l.allowed(b), "other clients are not affected");
        l.succeeded(b);
        assert!(!l.allowed(a));
    }
}
