//! The users file (`--auth-file`): htpasswd-style `name:hash` lines with bcrypt (`$2a$`,
//! `$2b$`, `$2y$`, as `htpasswd -B` writes) or argon2 (`$argon2id$…`, PHC strings) hashes.
//! Plaintext and weak htpasswd schemes (MD5, SHA1, crypt) are refused when the file is loaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use argon2::{PasswordHash, PasswordVerifier};
use sha2::{Digest, Sha256};

/// Why the users file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read --auth-file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `name:hash` with a supported hash.
    #[error("--auth-file {path} line {line}: {reason}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong (never the password or hash itself).
        reason: &'static str,
    },
    /// No users at all.
    #[error("--auth-file {path} has no users; add lines with `htpasswd -B {path} NAME`")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

enum Hash {
    Bcrypt(String),
    Argon2(String),
}

/// The users and their password hashes.
pub struct Users {
    users: HashMap<String, Hash>,
}

impl Users {
    /// Loads and checks the users file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self, Error> {
        let err = |line: usize, reason: &'static str| Error::Line {
            path: path.to_owned(),
            line,
            reason,
        };
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, hash) = line
                .split_once(':')
                .ok_or_else(|| err(i + 1, "expected NAME:HASH"))?;
            if name.is_empty() {
                return Err(err(i + 1, "empty user name"));
            }
            let hash = if ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
                Hash::Bcrypt(hash.to_owned())
            } else if hash.starts_with("$argon2") {
                // A PHC string may stop after the salt; without a hash nothing ever verifies.
                PasswordHash::new(hash)
                    .ok()
                    .filter(|h| h.hash.is_some())
                    .ok_or_else(|| err(i + 1, "malformed argon2 hash"))?;
                Hash::Argon2(hash.to_owned())
            } else {
                return Err(err(
                    i + 1,
                    "not a bcrypt or argon2 hash; plaintext and weak hashes are refused (make one with `htpasswd -B`)",
                ));
            };
            users.insert(name.to_owned(), hash);
        }
        if users.is_empty() {
            return Err(Error::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self { users })
    }

    /// A fingerprint of `name`'s entry (name and hash), which changes when the entry does;
    /// `None` for an unknown user. Tokens carry it, so a changed password revokes them.
    pub fn binding(&self, name: &str) -> Option<[u8; 8]> {
        let hash = match self.users.get(name)? {
            Hash::Bcrypt(h) | Hash::Argon2(h) => h,
        };
        let digest = Sha256::new()
            .chain_update(name.as_bytes())
            .chain_update(b":")
            .chain_update(hash.as_bytes())
            .finalize();
        digest[..8].try_into().ok()
    }

    /// How many users there are.
    pub fn count(&self) -> usize {
        self.users.len()
    }

    /// Parses the users file's text (`path` names it in errors).
    pub fn parse_text(text: &str, path: &Path) -> Result<Self, Error> {
        Self::parse(text, path)
    }

    /// Whether `password` is `name`'s. Slow on purpose (the hash's cost); unknown users cost
    /// the same as known ones so that names cannot be probed by timing.
    pub fn verify(&self, name: &str, password: &str) -> bool {
        match self.users.get(name) {
            Some(Hash::Bcrypt(h)) => bcrypt::verify(password, h).unwrap_or(false),
            Some(Hash::Argon2(h)) => PasswordHash::new(h)
                .map(|parsed| {
                    argon2::Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false),
            None => {
                // Spend the time a real check would take.
                let _ = bcrypt::verify(password, DUMMY_BCRYPT);
                false
            }
        }
    }
}

/// Any valid bcrypt hash of cost 10: checked against for unknown users, result ignored.
const DUMMY_BCRYPT: &str = "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_and_argon2_users_verify() {
        use argon2::PasswordHasher;
        let b = bcrypt::hash("secret", 4).unwrap();
        let a: PasswordHash = argon2::Argon2::default()
            .hash_password_with_salt(b"other", b"0123456789abcdef")
            .unwrap();
        let a = a.to_string();
        let text = format!("# users\nalice:{b}\n\nbob:{a}\n");
        let users = Users::parse(&text, Path::new("users")).unwrap();
        assert!(users.verify("alice", "secret"));
        assert!(!users.verify("alice", "wrong"));
        assert!(users.verify("bob", "other"));
        assert!(!users.verify("carol", "secret"));
    }

    #[test]
    fn plaintext_and_weak_hashes_are_refused_without_echoing_them() {
        for bad in [
            "alice:secret",
            "alice:$apr1$abc$def",
            "alice:{SHA}abc",
            "nocolon",
            "alice:$argon2id$v=19$m=19456,t=2,p=1$MDEyMzQ1Njc4OWFiY2RlZg",
        ] {
            let err = Users::parse(bad, Path::new("users"))
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains("line 1"), "{err}");
            assert!(
                !err.contains("secret") && !err.contains("abc"),
                "no secret in {err}"
            );
        }
        assert!(matches!(
            Users::parse("# nobody\n", Path::new("u")),
            Err(Error::Empty { .. })
        ));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// A well-formed `name:hash` line (bcrypt prefixes as `htpasswd -B` and other tools
        /// write them, or a valid argon2 PHC string), with the spaces a hand edit leaves.
        fn user_line() -> impl Strategy<Value = (String, String)> {
            (
                "[A-Za-z0-9._@-]{1,12}",
                prop_oneof![
                    ("\\$2[aby]\\$[0-9]{2}\\$[./A-Za-z0-9]{0,53}").boxed(),
                    Just(ARGON2.to_owned()).boxed(),
                ],
                "[ \t]{0,2}",
                "[ \t]{0,2}",
            )
                .prop_map(|(name, hash, lead, trail)| {
                    (name.clone(), format!("{lead}{name}:{hash}{trail}"))
                })
        }

        const ARGON2: &str =
            "$argon2id$v=19$m=19456,t=2,p=1$MDEyMzQ1Njc4OWFiY2RlZg$2cZbUF9RwOZOmLn4iLGMtM1BNAcRyHKNMEzV10IbFQQ";

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// A file of valid lines, comments and blank lines loads exactly its users (a
            /// repeated name: the last line wins); one bad line anywhere is reported by its
            /// number.
            #[test]
            fn files_load_their_users_or_name_the_bad_line(
                lines in prop::collection::vec(
                    prop_oneof![
                        3 => user_line().prop_map(|(n, l)| (Some(n), l)),
                        1 => "#[^\\n\\r]{0,20}".prop_map(|c| (None, c)),
                        1 => "[ \t]{0,3}".prop_map(|b| (None, b)),
                    ],
                    1..12,
                ),
                bad in prop::option::of((any::<prop::sample::Index>(), prop_oneof![
                    Just("alice:secret"),
                    Just("nocolon"),
                    Just(":$2b$10$x"),
                    Just("bob:$argon2id$v=19$garbage"),
                    Just("carol:{SHA}abc="),
                ])),
                crlf in any::<bool>(),
            ) {
                let mut text: Vec<String> = lines.iter().map(|(_, l)| l.clone()).collect();
                let bad_line = bad.map(|(at, line)| {
                    let at = at.index(text.len() + 1);
                    text.insert(at, line.to_owned());
                    at + 1
                });
                let text = text.join(if crlf { "\r\n" } else { "\n" });
                let names: std::collections::BTreeSet<&str> =
                    lines.iter().filter_map(|(n, _)| n.as_deref()).collect();
                match (Users::parse(&text, Path::new("users")), bad_line) {
                    (Err(Error::Line { line, .. }), Some(want)) => prop_assert_eq!(line, want),
                    (Ok(users), None) => {
                        let got: std::collections::BTreeSet<&str> =
                            users.users.keys().map(String::as_str).collect();
                        prop_assert_eq!(got, names);
                    }
                    (Err(Error::Empty { .. }), None) => prop_assert!(names.is_empty()),
                    (other, want) => prop_assert!(false, "{:?} for bad line {:?}", other.err(), want),
                }
            }

            /// Any text as the users file: loaded or refused with a line number, never a panic.
            #[test]
            fn users_file_takes_any_text(text in any::<String>()) {
                crate::fuzzing::users_file(text.as_bytes());
            }
        }
    }
}
