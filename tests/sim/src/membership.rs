//! Real etcd membership changes, made the way an etcd chart's scripts make
//! them: through a live member's client URL, never by editing files.
//!
//! With `--enable-v2` the v2 members API is used (`POST /v2/members`,
//! `DELETE /v2/members/<hex id>`, `GET /v2/members`; etcd
//! `etcdserver/api/v2http/client.go` `membersHandler`). Without it that API
//! is not served, so `etcdctl` with `ETCDCTL_API=3` does the same through
//! the v3 Cluster service (`member add/remove/list`).
//!
//! Changes are retried until a deadline because etcd's strict reconfiguration
//! check refuses them for a while after a membership change ("unhealthy
//! cluster": a voting member must have been connected for `HealthInterval`,
//! 5 s; etcd `etcdserver/server.go` `mayAddMember`/`mayRemoveMember`).
//! Before each attempt the member list is read, so a change that was applied
//! although its answer was lost is not made twice.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::Instant;

use crate::SimError;

/// Bound on one HTTP request or etcdctl run.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts of a refused change.
const RETRY: Duration = Duration::from_millis(200);

/// One entry of the member list.
#[derive(Debug, Clone)]
pub(crate) struct MemberInfo {
    /// The member id in hex, as `member remove` and `/v2/members/<id>` take it.
    pub id: String,
    /// Empty until the member has started and published itself.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

/// How to talk to the cluster: the endpoints to try, and which API.
#[derive(Debug, Clone)]
pub(crate) struct Cluster {
    /// Real client URLs of live members, tried in order.
    pub endpoints: Vec<String>,
    pub v2: bool,
}

/// The etcdctl binary: `etcdctl` on the `PATH`, or `SIM_ETCDCTL_BIN`.
fn etcdctl_binary() -> PathBuf {
    std::env::var_os("SIM_ETCDCTL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcdctl"))
}

fn failed(action: &str, reason: impl Into<String>) -> SimError {
    SimError::Membership {
        action: action.to_string(),
        reason: reason.into(),
    }
}

impl Cluster {
    /// The member list, from the first endpoint that answers.
    pub async fn list(&self) -> Result<Vec<MemberInfo>, SimError> {
        let mut last = String::from("no endpoints");
        for ep in &self.endpoints {
            let r = if self.v2 {
                v2_list(ep).await
            } else {
                v3_list(ep).await
            };
            match r {
                Ok(list) => return Ok(list),
                Err(e) => last = format!("{ep}: {e}"),
            }
        }
        Err(failed("member list", last))
    }

    /// Adds a member with this peer URL (a no-op if it is already listed).
    pub async fn add(&self, name: &str, peer_url: &str, deadline: Instant) -> Result<(), SimError> {
        let action = format!("member add {name} {peer_url}");
        let done = |list: &[MemberInfo]| find_peer(list, peer_url).is_some();
        self.retry(&action, deadline, done, |ep: String, _| async move {
            if self.v2 {
                let body = json!({"peerURLs": [peer_url]}).to_string();
                let (code, text) = http(&ep, Method::POST, "/v2/members", Some(body)).await?;
                match code {
                    StatusCode::CREATED => Ok(()),
                    _ => Err(format!("{code}: {}", text.trim())),
                }
            } else {
                let peer = format!("--peer-urls={peer_url}");
                etcdctl(&ep, &["member", "add", name, &peer])
                    .await
                    .map(drop)
            }
        })
        .await
    }

    /// Removes the member with this peer URL (a no-op if it is not listed).
    pub async fn remove(&self, peer_url: &str, deadline: Instant) -> Result<(), SimError> {
        let action = format!("member remove {peer_url}");
        let done = |list: &[MemberInfo]| find_peer(list, peer_url).is_none();
        self.retry(
            &action,
            deadline,
            done,
            |ep: String, list: Vec<MemberInfo>| async move {
                let id = find_peer(&list, peer_url)
                    .map(|m| m.id.clone())
                    .ok_or("member vanished")?;
                if self.v2 {
                    let path = format!("/v2/members/{id}");
                    let (code, text) = http(&ep, Method::DELETE, &path, None).await?;
                    match code {
                        StatusCode::NO_CONTENT => Ok(()),
                        _ => Err(format!("{code}: {}", text.trim())),
                    }
                } else {
                    etcdctl(&ep, &["member", "remove", &id]).await.map(drop)
                }
            },
        )
        .await
    }

    /// Runs `attempt` on each endpoint until `done` (checked on a fresh
    /// member list before every round) says the change is in place.
    async fn retry<F, Fut>(
        &self,
        action: &str,
        deadline: Instant,
        done: impl Fn(&[MemberInfo]) -> bool,
        attempt: F,
    ) -> Result<(), SimError>
    where
        F: Fn(String, Vec<MemberInfo>) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let mut last = String::from("not attempted");
        loop {
            match self.list().await {
                Ok(list) if done(&list) => return Ok(()),
                Ok(list) => {
                    for ep in &self.endpoints {
                        match attempt(ep.clone(), list.clone()).await {
                            Ok(()) => return Ok(()),
                            Err(e) => last = format!("{ep}: {e}"),
                        }
                    }
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(failed(action, last));
            }
            tracing::debug!("{action} not done yet, retrying: {last}");
            tokio::time::sleep(RETRY).await;
        }
    }
}

fn find_peer<'l>(list: &'l [MemberInfo], peer_url: &str) -> Option<&'l MemberInfo> {
    list.iter()
        .find(|m| m.peer_urls.iter().any(|u| u == peer_url))
}

/// One HTTP/1.1 request to `base` (`http://host:port`); returns the status and body.
async fn http(
    base: &str,
    method: Method,
    path: &str,
    json_body: Option<String>,
) -> Result<(StatusCode, String), String> {
    let url = url::Url::parse(base).map_err(|e| format!("bad endpoint {base}: {e}"))?;
    let host = url.host_str().ok_or("endpoint without a host")?.to_string();
    let port = url
        .port_or_known_default()
        .ok_or("endpoint without a port")?;
    let call = async {
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, format!("{host}:{port}"));
        if json_body.is_some() {
            // The members API insists on it (415 otherwise).
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(json_body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let result = async {
            let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let code = res.status();
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((code, String::from_utf8_lossy(&body).into_owned()))
        }
        .await;
        driver.abort();
        result
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| format!("no answer from {base} within {CALL_TIMEOUT:?}"))?
}

#[derive(Deserialize)]
struct V2Members {
    #[serde(default)]
    members: Vec<V2Member>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct V2Member {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default, rename = "peerURLs")]
    peer_urls: Vec<String>,
    #[serde(default, rename = "clientURLs")]
    client_urls: Vec<String>,
}

async fn v2_list(ep: &str) -> Result<Vec<MemberInfo>, String> {
    let (code, text) = http(ep, Method::GET, "/v2/members", None).await?;
    if code != StatusCode::OK {
        return Err(format!("{code}: {}", text.trim()));
    }
    let parsed: V2Members = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    Ok(parsed
        .members
        .into_iter()
        .map(|m| MemberInfo {
            id: m.id,
            name: m.name,
            peer_urls: m.peer_urls,
            client_urls: m.client_urls,
        })
        .collect())
}

/// `etcdctl member list -w json` (ids are decimal there).
#[derive(Deserialize)]
struct V3Members {
    #[serde(default)]
    members: Vec<V3Member>,
}

#[derive(Deserialize)]
struct V3Member {
    #[serde(rename = "ID")]
    id: u64,
    #[serde(default)]
    name: String,
    #[serde(default, rename = "peerURLs")]
    peer_urls: Vec<String>,
    #[serde(default, rename = "clientURLs")]
    client_urls: Vec<String>,
}

async fn v3_list(ep: &str) -> Result<Vec<MemberInfo>, String> {
    let out = etcdctl(ep, &["member", "list", "-w", "json"]).await?;
    let parsed: V3Members = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    Ok(parsed
        .members
        .into_iter()
        .map(|m| MemberInfo {
            id: format!("{:x}", m.id),
            name: m.name,
            peer_urls: m.peer_urls,
            client_urls: m.client_urls,
        })
        .collect())
}

/// Runs `ETCDCTL_API=3 etcdctl --endpoints <ep> <args>`; its stdout on success.
async fn etcdctl(ep: &str, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(etcdctl_binary());
    cmd.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(ep)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(CALL_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("etcdctl {args:?} timed out"))?
        .map_err(|e| format!("running etcdctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "etcdctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
