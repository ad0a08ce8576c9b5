//! Tokens the proxy issues to authenticated clients (etcdctl `--user` calls `Authenticate`
//! and sends the token as `token` metadata; JSON-gateway clients send it as `Authorization`).
//!
//! Tokens are 128 random bits, kept only as SHA-256 digests (a lookup compares digests, so
//! the time taken says nothing about the token), expire after [`TTL`] without use, and are
//! never forwarded to etcd: etcd validates any token it is sent, even with auth disabled.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use sha2::{Digest, Sha256};

/// A token unused this long is forgotten (etcd's simple tokens: 5 minutes).
pub const TTL: Duration = Duration::from_secs(300);
/// Our tokens start with this, so that they are recognisable in logs of the client side.
const PREFIX: &str = "etcd-proxy.";

/// Issued tokens.
#[derive(Default)]
pub struct Tokens {
    live: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl Tokens {
    /// Issues a token for `user` (`None` if the OS has no randomness to give).
    pub fn issue(&self, user: &str) -> Option<String> {
        let mut bytes = [0u8; 16];
        // The OS generator; if it fails, no token is better than a guessable one.
        let random = getrandom::fill(&mut bytes).map(|()| u128::from_be_bytes(bytes));
        let token = match random {
            Ok(n) => format!("{PREFIX}{n:032x}"),
            Err(_) => return None,
        };
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        live.retain(|_, (_, used)| now.duration_since(*used) < TTL);
        live.insert(digest(&token), (user.to_owned(), now));
        Some(token)
    }

    /// The user a live token belongs to (refreshing it), or `None`.
    pub fn check(&self, token: &str) -> Option<String> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let entry = live.get_mut(&digest(token))?;
        if now.duration_since(entry.1) >= TTL {
            return None;
        }
        entry.1 = now;
        Some(entry.0.clone())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_check_and_others_do_not() {
        let t = Tokens::default();
        let a = t.issue("alice").unwrap();
        assert!(a.starts_with(PREFIX));
        assert_eq!(t.check(&a).as_deref(), Some("alice"));
        assert_eq!(t.check("etcd-proxy.00000000000000000000000000000000"), None);
        assert_ne!(Some(a), t.issue("alice"), "fresh every time");
    }
}
