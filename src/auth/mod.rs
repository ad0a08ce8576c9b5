//! Authentication in front of etcd, for users listed in `--auth-file`, in the forms unmodified
//! clients already speak:
//!
//! * gRPC (etcdctl `--user`, clientv3 `Username/Password`): the client calls
//!   `etcdserverpb.Auth/Authenticate`; the proxy answers it itself with its own token, then
//!   requires that token as `token` metadata on every call and **removes it** before forwarding
//!   (etcd checks any token it is sent, even with auth off, and a `x.N`-shaped one can hang).
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
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

use crate::protowire::{put_len_field, Fields, LEN};
use crate::router::Class;

pub use users::Error;

/// etcd's messages (`api/v3rpc/rpctypes/error.go`), so clients map them to their errors.
pub const ERR_AUTH_FAILED: &str = "etcdserver: authentication failed, invalid user ID or password";
/// Sent when a call carries no token.
pub const ERR_USER_EMPTY: &str = "etcdserver: user name is empty";
/// Sent when a token is unknown or expired.
pub const ERR_INVALID_TOKEN: &str = "etcdserver: invalid auth token";

/// gRPC codes etcd uses for those (`codes.InvalidArgument`, `codes.Unauthenticated`).
pub const INVALID_ARGUMENT: u8 = 3;
/// `codes.Unauthenticated`.
pub const UNAUTHENTICATED: u8 = 16;

/// A successful HTTP Basic check is remembered this long, so v2 clients (which send Basic on
/// every request) do not pay a bcrypt verification per request.
const BASIC_CACHE: Duration = Duration::from_secs(60);
/// Largest login request body read.
const MAX_LOGIN_BODY: usize = 64 * 1024;

/// The answer to a request that is not forwarded.
#[derive(Debug)]
pub enum Verdict {
    /// Refuse a gRPC call with this status.
    GrpcError {
        /// gRPC status code.
        code: u8,
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
}

/// Users, tokens and login throttling.
pub struct Auth {
    /// Shared with the blocking threads that check passwords.
    users: Arc<users::Users>,
    tokens: tokens::Tokens,
    limiter: limit::Limiter,
    basic_ok: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Auth {
    /// Loads the users file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        Ok(Self {
            users: Arc::new(users::Users::load(path)?),
            tokens: tokens::Tokens::default(),
            limiter: limit::Limiter::default(),
            basic_ok: Mutex::new(HashMap::new()),
        })
    }

    /// Checks `req` (of protocol `class`, from `peer`): `Ok` with the request stripped of the
    /// proxy's credentials, or the verdict to answer with.
    pub async fn check(
        &self,
        class: Class,
        peer: IpAddr,
        mut req: Request<Incoming>,
    ) -> Result<Request<Incoming>, Verdict> {
        let path = req.uri().path().to_owned();
        match class {
            Class::Grpc => {
                if path == "/etcdserverpb.Auth/Authenticate" {
                    return Err(self.grpc_login(peer, req).await);
                }
                let token = take(req.headers_mut(), "token")
                    .or_else(|| take(req.headers_mut(), "authorization"));
                if grpc_open(&path) {
                    return Ok(req);
                }
                match token {
                    None => Err(Verdict::GrpcError {
                        code: INVALID_ARGUMENT,
                        message: ERR_USER_EMPTY,
                    }),
                    Some(t) if self.tokens.check(&t).is_some() => Ok(req),
                    Some(_) => Err(Verdict::GrpcError {
                        code: UNAUTHENTICATED,
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
                    return Ok(req);
                }
                match credentials {
                    None => Err(Verdict::Unauthorized {
                        message: "authentication required",
                    }),
                    Some(value) => match value.strip_prefix("Basic ") {
                        Some(b64) => {
                            if self.basic(peer, b64.trim()).await {
                                Ok(req)
                            } else {
                                Err(Verdict::Unauthorized {
                                    message: ERR_AUTH_FAILED,
                                })
                            }
                        }
                        None if self.tokens.check(value.trim()).is_some() => Ok(req),
                        None => Err(Verdict::Unauthorized {
                            message: ERR_INVALID_TOKEN,
                        }),
                    },
                }
            }
        }
    }

    /// Verifies a login, throttled per client address. The hash check (tens of milliseconds
    /// by design) runs on a blocking thread, never on the event loop that serves everyone.
    async fn login(&self, peer: IpAddr, name: &str, password: &str) -> Option<String> {
        if !self.limiter.allowed(peer) {
            tracing::warn!(%peer, user = name, "login refused: too many failures from this address");
            return None;
        }
        let users = self.users.clone();
        let (n, p) = (name.to_owned(), password.to_owned());
        let verified = tokio::task::spawn_blocking(move || users.verify(&n, &p))
            .await
            .unwrap_or(false);
        if verified {
            self.limiter.succeeded(peer);
            return Some(name.to_owned());
        }
        if self.limiter.failed(peer) {
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
            code: INVALID_ARGUMENT,
            message: ERR_AUTH_FAILED,
        };
        let Some(body) = read_body(req).await else {
            return failed;
        };
        let Some((name, password)) = parse_grpc_login(&body) else {
            return failed;
        };
        let Some(token) = self
            .login(peer, &name, &password)
            .await
            .and_then(|user| self.tokens.issue(&user))
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
        let Some(body) = read_body(req).await else {
            return failed;
        };
        let Some((name, password)) = parse_gateway_login(&body) else {
            return failed;
        };
        let Some(token) = self
            .login(peer, &name, &password)
            .await
            .and_then(|user| self.tokens.issue(&user))
        else {
            return failed;
        };
        let json = serde_json::json!({ "header": {}, "token": token });
        Verdict::GatewayLogin(Bytes::from(json.to_string()))
    }
}

/// The name and password of a gRPC `Authenticate` body: one length-prefixed message,
/// `AuthenticateRequest { name = 1; password = 2; }`. `None` if the message is malformed.
/// The gRPC prefix is skipped, not checked: a wrong length or flag cannot make a wrong
/// password right, and etcd's clients never compress.
pub(crate) fn parse_grpc_login(body: &[u8]) -> Option<(String, String)> {
    let msg = body.get(5..)?;
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

async fn read_body(req: Request<Incoming>) -> Option<Bytes> {
    Limited::new(req.into_body(), MAX_LOGIN_BODY)
        .collect()
        .await
        .ok()
        .map(|c| c.to_bytes())
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
