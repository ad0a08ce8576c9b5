//! Authentication in front of etcd, for users listed in `--auth-file`, in the forms unmodified
//! clients already speak:
//!
//! * gRPC (etcdctl `--user`, clientv3 `Username/Password`): the client calls
//!   `etcdserverpb.Auth/Authenticate`; the proxy answers it itself with its own token, then
//!   requires that token as `token` metadata on every call and **removes it** before forwarding
//!   (etcd checks any token it is sent, even with auth off, and a `x.N`-shaped one can hang:
//!   `docs/etcd-protocols.md` §6.3).
//! * HTTP (v2 `--username`, the JSON gateway, curl): `Authorization: Basic …`, or the JSON
//!   gateway's `POST /v3/auth/authenticate` and then `Authorization: <token>`; removed too.
//!
//! Refusals use etcd's own errors, so clients react as they would to etcd (clientv3 logs in
//! again on "invalid auth token"). `/health`, `/version`, gRPC health and `MemberList` stay
//! open: etcdctl `--cluster` asks MemberList without credentials in some versions.
//!
//! Without `--auth-file` the proxy does no authentication and etcd's own auth (tokens,
//! `Authorization`) passes through untouched.

mod limit;
mod tokens;
pub(crate) mod users;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

use crate::grpc::Code;
use crate::protowire::{put_len_field, Fields, LEN};
use crate::router::Class;

/// Why authentication cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The users file.
    #[error(transparent)]
    Users(#[from] users::Error),
    /// The token key.
    #[error(transparent)]
    Key(#[from] tokens::KeyError),
}

/// etcd's messages (`api/v3rpc/rpctypes/error.go`; `docs/etcd-protocols.md` §6.2), so clients
/// map them to their errors.
pub const ERR_AUTH_FAILED: &str = "etcdserver: authentication failed, invalid user ID or password";
/// Sent when a call carries no token.
pub const ERR_USER_EMPTY: &str = "etcdserver: user name is empty";
/// Sent when a token is unknown or expired.
pub const ERR_INVALID_TOKEN: &str = "etcdserver: invalid auth token";
/// Sent for a request over the size etcd (or the proxy, for what it buffers) accepts.
pub const ERR_REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";

/// A successful HTTP Basic check is remembered this long, so v2 clients (which send Basic on
/// every request) do not pay a bcrypt verification per request.
const BASIC_CACHE: Duration = Duration::from_secs(60);
/// Largest login request body read.
const MAX_LOGIN_BODY: usize = 64 * 1024;
/// Password hashes checked at once, each on a blocking thread: a flood of logins queues for
/// these instead of taking a thread each, and the event loop never runs one.
const HASH_WORKERS: usize = 2;

/// The answer to a request that is not forwarded.
#[derive(Debug)]
pub enum Verdict {
    /// Refuse a gRPC call with this status.
    GrpcError {
        /// gRPC status code.
        code: Code,
        /// etcd's message.
        message: &'static str,
    },
    /// Refuse an HTTP request with 401.
    Unauthorized {
        /// What is wrong.
        message: &'static str,
    },
    /// Answer a gRPC `Authenticate` with this serialized `AuthenticateResponse`.
    GrpcLogin(Bytes),
    /// Answer a gateway `/v3/auth/authenticate` with this JSON.
    GatewayLogin(Bytes),
    /// A login request larger than the proxy reads: etcd's "request is too large".
    TooLarge(Class),
}

/// A request the auth layer lets through, with its credentials removed.
#[derive(Debug)]
pub enum Pass<R> {
    /// It carried valid credentials.
    Authenticated(R),
    /// It is one of the few open to anyone (health, version, member list).
    Open(R),
}

/// How often the users file is checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Users, tokens and login throttling.
pub struct Auth {
    path: PathBuf,
    /// The users file as last loaded; shared with the blocking threads that check passwords.
    users: RwLock<Arc<users::Users>>,
    tokens: tokens::Tokens,
    limiter: limit::Limiter,
    hashers: tokio::sync::Semaphore,
    basic_ok: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Auth {
    /// Loads the users file, and the token key if one is given (else tokens are signed with a
    /// random key of this process's own).
    pub fn load(path: &Path, token_key: Option<&Path>) -> Result<Self, Error> {
        let tokens = match token_key {
            Some(k) => tokens::Tokens::from_file(k)?,
            None => tokens::Tokens::random()?,
        };
        Ok(Self {
            path: path.to_owned(),
            users: RwLock::new(Arc::new(users::Users::load(path)?)),
            tokens,
            limiter: limit::Limiter::default(),
            hashers: tokio::sync::Semaphore::new(HASH_WORKERS),
            basic_ok: Mutex::new(HashMap::new()),
        })
    }

    /// The token key's id, for the start-up log (replicas sharing logins show the same).
    pub fn key_id(&self) -> String {
        self.tokens.key_id()
    }

    fn users(&self) -> Arc<users::Users> {
        self.users.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reloads the users file whenever its contents change, so that a new password or a
    /// removed user takes effect (and revokes that user's tokens) without a restart. A file
    /// that no longer parses keeps the users last loaded, with a warning.
    pub async fn follow_users_file(self: Arc<Self>) {
        let mut seen = std::fs::read(&self.path).ok();
        loop {
            tokio::time::sleep(RELOAD_EVERY).await;
            let now = std::fs::read(&self.path).ok();
            if now == seen {
                continue;
            }
            seen = now;
            let Some(bytes) = &seen else {
                tracing::warn!(path = %self.path.display(), "cannot read --auth-file; keeping the users last loaded");
                continue;
            };
            let text = String::from_utf8_lossy(bytes);
            match users::Users::parse_text(&text, &self.path) {
                Ok(users) => {
                    tracing::info!(users = users.count(), "reloaded --auth-file");
                    *self.users.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(users);
                    self.basic_ok
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clear();
                }
                Err(e) => tracing::warn!("{e}; keeping the users last loaded"),
            }
        }
    }

    /// Whether `token` is a live token of a user whose entry is unchanged since it was issued.
    fn token_ok(&self, token: &str) -> bool {
        self.tokens
            .check(token, unix_now())
            .is_some_and(|c| self.users().binding(&c.user) == Some(c.binding))
    }

    /// A token for `user`, bound to their current entry.
    fn issue(&self, user: &str) -> Option<String> {
        let binding = self.users().binding(user)?;
        Some(self.tokens.issue(user, binding, unix_now()))
    }

    /// Checks `req` (of protocol `class`, from `peer`): `Ok` with the request stripped of the
    /// proxy's credentials, or the verdict to answer with.
    pub async fn check(
        &self,
        class: Class,
        peer: IpAddr,
        mut req: Request<Incoming>,
    ) -> Result<Pass<Request<Incoming>>, Verdict> {
        let path = req.uri().path().to_owned();
        match class {
            Class::Grpc => {
                if path == "/etcdserverpb.Auth/Authenticate" {
                    return Err(self.grpc_login(peer, req).await);
                }
                let token = take(req.headers_mut(), "token")
                    .or_else(|| take(req.headers_mut(), "authorization"));
                if grpc_open(&path) {
                    return Ok(Pass::Open(req));
                }
                match token {
                    None => Err(Verdict::GrpcError {
                        code: Code::InvalidArgument,
                        message: ERR_USER_EMPTY,
                    }),
                    Some(t) if self.token_ok(&t) => Ok(Pass::Authenticated(req)),
                    Some(_) => Err(Verdict::GrpcError {
                        code: Code::Unauthenticated,
                        message: ERR_INVALID_TOKEN,
                    }),
                }
            }
            Class::Http => {
                if req.method() == Method::POST && is_gateway_login(&path) {
                    return Err(self.gateway_login(peer, req).await);
                }
                let credentials = take(req.headers_mut(), header::AUTHORIZATION.as_str());
                if http_open(&path) {
                    return Ok(Pass::Open(req));
                }
                match credentials {
                    None => Err(Verdict::Unauthorized {
                        message: "authentication required",
                    }),
                    Some(value) => match value.strip_prefix("Basic ") {
                        Some(b64) => {
                            if self.basic(peer, b64.trim()).await {
                                Ok(Pass::Authenticated(req))
                            } else {
                                Err(Verdict::Unauthorized {
                                    message: ERR_AUTH_FAILED,
                                })
                            }
                        }
                        None if self.token_ok(value.trim()) => Ok(Pass::Authenticated(req)),
                        None => Err(Verdict::Unauthorized {
                            message: ERR_INVALID_TOKEN,
                        }),
                    },
                }
            }
        }
    }

    /// Verifies a login, throttled per client address (attempts still being checked count).
    /// The hash check (tens of milliseconds by design) runs on one of [`HASH_WORKERS`]
    /// blocking threads, never on the event loop that serves everyone.
    async fn login(&self, peer: IpAddr, name: &str, password: &str) -> Option<String> {
        let Some(attempt) = self.limiter.begin(peer) else {
            tracing::debug!(%peer, user = name, "login refused: too many failures from this address");
            return None;
        };
        let verified = match self.hashers.acquire().await {
            Ok(_permit) => {
                let users = self.users();
                let (n, p) = (name.to_owned(), password.to_owned());
                tokio::task::spawn_blocking(move || users.verify(&n, &p))
                    .await
                    .unwrap_or(false)
            }
            Err(_) => false,
        };
        let blocked = attempt.finish(verified);
        if verified {
            return Some(name.to_owned());
        }
        if blocked {
            tracing::warn!(%peer, "too many failed logins; refusing logins from this address for a while");
        } else {
            tracing::info!(%peer, user = name, "failed login");
        }
        None
    }

    async fn basic(&self, peer: IpAddr, b64: &str) -> bool {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            return false;
        };
        let key: [u8; 32] = Sha256::digest(&decoded).into();
        {
            let cache = self.basic_ok.lock().unwrap_or_else(|p| p.into_inner());
            if cache.get(&key).is_some_and(|t| t.elapsed() < BASIC_CACHE) {
                return true;
            }
        }
        let Ok(text) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((name, password)) = text.split_once(':') else {
            return false;
        };
        let ok = self.login(peer, name, password).await.is_some();
        if ok {
            let mut cache = self.basic_ok.lock().unwrap_or_else(|p| p.into_inner());
            cache.retain(|_, t| t.elapsed() < BASIC_CACHE);
            cache.insert(key, Instant::now());
        }
        ok
    }

    async fn grpc_login(&self, peer: IpAddr, req: Request<Incoming>) -> Verdict {
        let failed = Verdict::GrpcError {
            code: Code::InvalidArgument,
            message: ERR_AUTH_FAILED,
        };
        let body = match read_body(req).await {
            Body::Read(b) => b,
            Body::TooLarge => return Verdict::TooLarge(Class::Grpc),
            Body::Broken => return failed,
        };
        let Some((name, password)) = parse_grpc_login(&body) else {
            return failed;
        };
        let Some(token) = self
            .login(peer, &name, &password)
            .await
            .and_then(|user| self.issue(&user))
        else {
            return failed;
        };
        // AuthenticateResponse { header = 1 (empty); token = 2 }.
        let mut out = Vec::new();
        put_len_field(&mut out, 1, &[]);
        put_len_field(&mut out, 2, token.as_bytes());
        Verdict::GrpcLogin(Bytes::from(out))
    }

    async fn gateway_login(&self, peer: IpAddr, req: Request<Incoming>) -> Verdict {
        let failed = Verdict::Unauthorized {
            message: ERR_AUTH_FAILED,
        };
        let body = match read_body(req).await {
            Body::Read(b) => b,
            Body::TooLarge => return Verdict::TooLarge(Class::Http),
            Body::Broken => return failed,
        };
        let Some((name, password)) = parse_gateway_login(&body) else {
            return failed;
        };
        let Some(token) = self
            .login(peer, &name, &password)
            .await
            .and_then(|user| self.issue(&user))
        else {
            return failed;
        };
        let json = serde_json::json!({ "header": {}, "token": token });
        Verdict::GatewayLogin(Bytes::from(json.to_string()))
    }
}

/// Seconds since the Unix epoch: token expiry must mean the same on every replica.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The name and password of a gRPC `Authenticate` body: one length-prefixed message,
/// `AuthenticateRequest { name = 1; password = 2; }`. `None` if the message is malformed.
/// A compressed message, or one whose prefix does not match the body, is malformed.
pub(crate) fn parse_grpc_login(body: &[u8]) -> Option<(String, String)> {
    let msg = crate::grpc::Prefix::single_message(body)?;
    let (mut name, mut password) = (String::new(), String::new());
    for field in Fields::new(msg) {
        let f = field.ok()?;
        match (f.number, f.wire_type) {
            (1, LEN) => name = String::from_utf8_lossy(f.payload).into_owned(),
            (2, LEN) => password = String::from_utf8_lossy(f.payload).into_owned(),
            _ => {}
        }
    }
    Some((name, password))
}

/// The name and password of a JSON gateway `/v3/auth/authenticate` body
/// (`{"name": …, "password": …}`; a missing or non-string member reads as empty).
/// `None` if the body is not JSON.
pub(crate) fn parse_gateway_login(body: &[u8]) -> Option<(String, String)> {
    let v = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    let name = v["name"].as_str().unwrap_or_default().to_owned();
    let password = v["password"].as_str().unwrap_or_default().to_owned();
    Some((name, password))
}

/// A login request's body.
enum Body {
    Read(Bytes),
    TooLarge,
    Broken,
}

async fn read_body(req: Request<Incoming>) -> Body {
    match Limited::new(req.into_body(), MAX_LOGIN_BODY)
        .collect()
        .await
    {
        Ok(c) => Body::Read(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Body::TooLarge,
        Err(_) => Body::Broken,
    }
}

/// Removes a header, returning its value.
fn take(headers: &mut HeaderMap, name: &str) -> Option<String> {
    headers
        .remove(name)
        .and_then(|v| v.to_str().ok().map(str::to_owned))
}

fn grpc_open(path: &str) -> bool {
    path == "/etcdserverpb.Cluster/MemberList" || path.starts_with("/grpc.health.v1.Health/")
}

fn http_open(path: &str) -> bool {
    matches!(path, "/health" | "/version")
}

fn is_gateway_login(path: &str) -> bool {
    [
        "/v3/auth/authenticate",
        "/v3beta/auth/authenticate",
        "/v3alpha/auth/authenticate",
    ]
    .contains(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_paths() {
        assert!(grpc_open("/etcdserverpb.Cluster/MemberList"));
        assert!(!grpc_open("/etcdserverpb.Cluster/MemberAdd"));
        assert!(!grpc_open("/etcdserverpb.KV/Range"));
        assert!(http_open("/health"));
        assert!(!http_open("/v2/keys/a"));
        assert!(is_gateway_login("/v3beta/auth/authenticate"));
    }

    mod properties {
        use super::super::{parse_gateway_login, parse_grpc_login};
        use crate::protowire::put_varint_field;
        use etcd_client::proto::PbAuthenticateRequest;
        use proptest::prelude::*;
        use prost::Message;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// An `AuthenticateRequest` prost encoded reads back as its name and password,
            /// whatever fields a newer client adds after them.
            #[test]
            fn grpc_login_reads_what_prost_wrote(
                name in any::<String>(),
                password in any::<String>(),
                unknown in prop::collection::vec((3u64..100, any::<u64>()), 0..3),
            ) {
                let mut msg = PbAuthenticateRequest { name: name.clone(), password: password.clone() }
                    .encode_to_vec();
                for (n, v) in unknown {
                    put_varint_field(&mut msg, n, v);
                }
                let body = crate::proxy::frames::frame(&msg);
                prop_assert_eq!(parse_grpc_login(&body), Some((name, password)));
            }

            /// The gateway's JSON login, with other members around the two it reads.
            #[test]
            fn gateway_login_reads_name_and_password(
                name in any::<String>(),
                password in any::<String>(),
                other in any::<String>(),
            ) {
                let body = serde_json::json!({ "other": other, "password": password, "name": name });
                prop_assert_eq!(
                    parse_gateway_login(body.to_string().as_bytes()),
                    Some((name, password))
                );
            }

            /// Any bytes as a login body: credentials or a refusal, never a panic.
            #[test]
            fn logins_take_any_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
                crate::fuzzing::authenticate(&data);
            }
        }
    }
}
