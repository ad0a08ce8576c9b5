//! Tokens the proxy issues to authenticated clients (etcdctl `--user` calls `Authenticate`
//! and sends the token as `token` metadata; JSON-gateway clients send it as `Authorization`).
//!
//! A token is signed, not remembered: `etcd-proxy.<claims>.<mac>`, where the claims are a
//! format version, the signing key's id, an expiry time (Unix seconds), a fingerprint of the
//! user's entry in the users file, and the user name; the MAC is HMAC-SHA256 over the claims
//! with the token key (base64url both). So:
//!
//! * every process that has the same key (`--token-key`) accepts the tokens of every other:
//!   gateway replicas behind one load balancer share logins, and a restart keeps them;
//!   without `--token-key` the key is random per process, and tokens die with it;
//! * expiry is a fixed [`TTL`] from login, not sliding (nothing is stored to slide): clients
//!   re-authenticate on "invalid auth token", as clientv3 does by itself and as etcd's own JWT
//!   tokens require;
//! * a token names the user *entry* it was issued for: when the users file changes that
//!   user's hash (or removes the user), the fingerprint no longer matches and the token is
//!   refused by every process that has loaded the new file;
//! * the MAC is checked in constant time, and tokens are never forwarded to etcd (etcd
//!   validates any token it is sent, even with auth disabled).

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// How long a token is valid after login.
pub const TTL: Duration = Duration::from_secs(600);
/// Our tokens start with this, so that they are recognisable in logs of the client side.
const PREFIX: &str = "etcd-proxy.";
/// The claims' format version.
const VERSION: u8 = 1;
/// The shortest key accepted (bytes).
pub const MIN_KEY: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// A fingerprint of a user's entry in the users file.
pub type Binding = [u8; 8];

/// Why `--token-key` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read --token-key {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Too little key material.
    #[error("--token-key {path} holds {len} bytes; it needs at least {MIN_KEY} random bytes (e.g. `head -c 32 /dev/urandom > {path}`)")]
    Short {
        /// The file.
        path: PathBuf,
        /// Its length after trimming.
        len: usize,
    },
    /// The OS gave no randomness for a per-process key.
    #[error("cannot make a random token key: {0}")]
    Random(String),
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user it was issued to.
    pub user: String,
    /// The fingerprint of the user's entry when it was issued.
    pub binding: Binding,
}

/// Issues and checks tokens with one key.
pub struct Tokens {
    key: Vec<u8>,
    key_id: [u8; 4],
}

impl Tokens {
    /// Tokens signed with a random key of this process's own.
    pub fn random() -> Result<Self, KeyError> {
        let mut key = vec![0u8; MIN_KEY];
        getrandom::fill(&mut key).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::with_key(key))
    }

    /// Tokens signed with the key in `path` (its bytes, without surrounding whitespace, so a
    /// base64 or hex text key works as well as raw bytes).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let raw = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let key = raw.trim_ascii();
        if key.len() < MIN_KEY {
            return Err(KeyError::Short {
                path: path.to_owned(),
                len: key.len(),
            });
        }
        Ok(Self::with_key(key.to_vec()))
    }

    fn with_key(key: Vec<u8>) -> Self {
        let digest = Sha256::digest(&key);
        let key_id = [digest[0], digest[1], digest[2], digest[3]];
        Self { key, key_id }
    }

    /// A short id of the key, safe to log: replicas that log different ids do not share
    /// logins.
    pub fn key_id(&self) -> String {
        self.key_id.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length.
        HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!())
    }

    /// A token for `user` (whose entry fingerprints to `binding`), issued at `now` (Unix
    /// seconds).
    pub fn issue(&self, user: &str, binding: Binding, now: u64) -> String {
        let mut claims = Vec::with_capacity(21 + user.len());
        claims.push(VERSION);
        claims.extend_from_slice(&self.key_id);
        claims.extend_from_slice(&(now + TTL.as_secs()).to_be_bytes());
        claims.extend_from_slice(&binding);
        claims.extend_from_slice(user.as_bytes());
        let mut mac = self.mac();
        mac.update(&claims);
        let tag = mac.finalize().into_bytes();
        format!("{PREFIX}{}.{}", B64.encode(&claims), B64.encode(tag))
    }

    /// What `token` says, if this key signed it and it has not expired at `now`.
    pub fn check(&self, token: &str, now: u64) -> Option<Claims> {
        let (claims, tag) = token.strip_prefix(PREFIX)?.split_once('.')?;
        let (claims, tag) = (B64.decode(claims).ok()?, B64.decode(tag).ok()?);
        let mut mac = self.mac();
        mac.update(&claims);
        mac.verify_slice(&tag).ok()?;
        let (&version, rest) = claims.split_first()?;
        let (key_id, rest) = rest.split_first_chunk::<4>()?;
        let (expiry, rest) = rest.split_first_chunk::<8>()?;
        let (binding, user) = rest.split_first_chunk::<8>()?;
        if version != VERSION || *key_id != self.key_id || u64::from_be_bytes(*expiry) <= now {
            return None;
        }
        Some(Claims {
            user: String::from_utf8(user.to_vec()).ok()?,
            binding: *binding,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn keyed(byte: u8) -> Tokens {
        Tokens::with_key(vec![byte; MIN_KEY])
    }

    #[test]
    fn tokens_check_with_the_same_key_only() {
        let (a, b) = (keyed(1), keyed(1));
        let t = a.issue("alice", [7; 8], NOW);
        assert!(t.starts_with(PREFIX));
        let claims = b.check(&t, NOW).expect("another process with the same key");
        assert_eq!(
            claims,
            Claims {
                user: "alice".into(),
                binding: [7; 8]
            }
        );
        assert_eq!(keyed(2).check(&t, NOW), None, "another key");
        assert_ne!(a.key_id(), keyed(2).key_id());
    }

    #[test]
    fn tokens_expire_a_fixed_time_after_login() {
        let t = keyed(1).issue("alice", [0; 8], NOW);
        assert!(keyed(1).check(&t, NOW + TTL.as_secs() - 1).is_some());
        assert!(keyed(1).check(&t, NOW + TTL.as_secs()).is_none());
    }

    #[test]
    fn tampered_or_malformed_tokens_are_refused() {
        let k = keyed(1);
        let t = k.issue("alice", [0; 8], NOW);
        let (head, tag) = t.rsplit_once('.').unwrap();
        // Claims of another user under alice's tag.
        let bob = k.issue("bob", [0; 8], NOW);
        let bob_claims = bob.strip_prefix(PREFIX).unwrap().split_once('.').unwrap().0;
        assert_eq!(k.check(&format!("{PREFIX}{bob_claims}.{tag}"), NOW), None);
        let mut flipped = tag.as_bytes().to_vec();
        flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
        let flipped = format!("{head}.{}", String::from_utf8(flipped).unwrap());
        assert_eq!(k.check(&flipped, NOW), None);
        for junk in [
            "",
            "etcd-proxy.",
            "etcd-proxy..",
            "etcd-proxy.a.b",
            "x.y.z",
            &t[..t.len() - 1],
        ] {
            assert_eq!(k.check(junk, NOW), None, "{junk:?}");
        }
    }

    #[test]
    fn key_files_need_enough_material_and_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "too short\n").unwrap();
        let err = Tokens::from_file(&short).err().unwrap().to_string();
        assert!(err.contains("holds 9 bytes"), "{err}");
        let text = dir.path().join("text");
        std::fs::write(&text, format!("{}\n", "k".repeat(MIN_KEY))).unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, "k".repeat(MIN_KEY)).unwrap();
        let t = Tokens::from_file(&text).unwrap().issue("u", [0; 8], NOW);
        assert!(Tokens::from_file(&raw).unwrap().check(&t, NOW).is_some());
        let missing = Tokens::from_file(&dir.path().join("none")).err().unwrap();
        assert!(missing.to_string().starts_with("cannot read --token-key"));
    }
}
