//! Pod watches: a chunked HTTP response carrying one JSON `WatchEvent` per line.
//!
//! Semantics follow the apiserver's watch cache
//! (`staging/src/k8s.io/apiserver/pkg/storage/cacher/`):
//! - `resourceVersion` "" or "0": synthetic ADDED events for the current state, then changes;
//! - a number N: every kept event with a resourceVersion greater than N, then changes;
//! - N older than the history: one ERROR event carrying a 410 `Expired` Status
//!   (`cacher.go` answers with `newErrWatcher(err)`), then the stream ends;
//! - `allowWatchBookmarks`: BOOKMARK events periodically and right before a timeout;
//! - `timeoutSeconds`: the stream ends cleanly after that long;
//! - `sendInitialEvents=true` (streaming lists, KEP-3157): synthetic ADDED
//!   events for the current state, then a BOOKMARK annotated
//!   `k8s.io/initial-events-end: "true"`, then changes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::api::{pod_field, status_response, Body};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{PodEvent, WatchStart};
use crate::{objects, status, Shared};

/// Default watch length when the client sets no timeout (the apiserver picks
/// a random value in [minRequestTimeout, 2*minRequestTimeout], i.e. 30–60 min).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
/// How often a bookmark is sent (the cacher's `bookmarkFrequency` is one minute).
const BOOKMARK_EVERY: Duration = Duration::from_secs(60);

/// One serialised event line.
fn line(kind: &str, object: Value) -> Bytes {
    let mut bytes = serde_json::to_vec(&json!({"type": kind, "object": object}))
        .unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn bookmark(rv: u64) -> Bytes {
    line(
        "BOOKMARK",
        json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}}),
    )
}

/// The bookmark that ends the initial events of a streaming list.
fn initial_events_end(rv: u64) -> Bytes {
    line(
        "BOOKMARK",
        json!({"kind": "Pod", "apiVersion": "v1", "metadata": {
            "resourceVersion": rv.to_string(),
            "annotations": {"k8s.io/initial-events-end": "true"},
        }}),
    )
}

/// Starts a pod watch and returns the streaming response.
pub(crate) fn watch_pods(
    shared: Arc<Shared>,
    ns_ok: bool,
    labels: LabelSelector,
    fields: FieldSelector,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let flag = |k: &str| matches!(query.get(k).map(String::as_str), Some("true" | "1"));
    let initial_events = flag("sendInitialEvents");
    let bookmarks = flag("allowWatchBookmarks");
    if initial_events && !bookmarks {
        // Validation in `staging/src/k8s.io/apimachinery/pkg/apis/meta/internalversion/validation`.
        return status_response(status::bad_request(
            "sendInitialEvents is forbidden for watch unless the WatchBookmarks feature gate is enabled and allowWatchBookmarks is set",
        ));
    }
    let since = match query.get("resourceVersion").map(String::as_str) {
        _ if initial_events => None,
        None | Some("") | Some("0") => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return status_response(status::bad_request(&format!(
                    "invalid resource version {v:?}"
                )))
            }
        },
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);

    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    let start = shared.store.watch_from(since);
    let filter = move |e: &PodEvent| {
        ns_ok
            && labels.matches(&e.pod.metadata.labels.clone().unwrap_or_default())
            && fields.matches(|f| pod_field(&e.pod, f))
    };
    tokio::spawn(async move {
        let deadline = Instant::now() + timeout;
        let (backlog, live, mut last_rv) = match start {
            WatchStart::Expired {
                requested,
                oldest_minus_one,
            } => {
                let err = status::expired(requested, oldest_minus_one);
                let _ = tx.send(line("ERROR", err)).await;
                return;
            }
            WatchStart::Events(backlog, live, last_rv) => (backlog, live, last_rv),
        };
        for e in backlog.iter().filter(|e| filter(e)) {
            if send_event(&shared, &tx, e).await.is_err() {
                return;
            }
        }
        if initial_events && tx.send(initial_events_end(last_rv)).await.is_err() {
            return;
        }
        follow(shared, tx, live, filter, &mut last_rv, deadline, bookmarks).await;
    });

    let stream = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|o| o.map(|b| Ok::<_, Infallible>(Frame::data(b))))
    });
    let mut res = Response::new(StreamBody::new(stream).boxed_unsync());
    *res.status_mut() = StatusCode::OK;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    res
}

/// Sends one event (after the injected latency).
async fn send_event(
    shared: &Shared,
    tx: &mpsc::Sender<Bytes>,
    e: &PodEvent,
) -> Result<(), mpsc::error::SendError<Bytes>> {
    let obj = objects::to_json(&e.pod).unwrap_or(Value::Null);
    let latency = shared.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    tx.send(line(e.kind.as_str(), obj)).await
}

/// Streams live events until the deadline, the client going away, or the
/// watch falling too far behind (then the stream ends and the client rewatches).
async fn follow(
    shared: Arc<Shared>,
    tx: mpsc::Sender<Bytes>,
    mut live: broadcast::Receiver<PodEvent>,
    filter: impl Fn(&PodEvent) -> bool,
    last_rv: &mut u64,
    deadline: Instant,
    bookmarks: bool,
) {
    let mut next_bookmark = Instant::now() + BOOKMARK_EVERY;
    loop {
        let wake = if bookmarks {
            next_bookmark.min(deadline)
        } else {
            deadline
        };
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep_until(wake) => {
                if bookmarks {
                    // Only claim what this watch has actually seen.
                    if tx.send(bookmark(*last_rv)).await.is_err() {
                        return;
                    }
                    next_bookmark = Instant::now() + BOOKMARK_EVERY;
                }
                if Instant::now() >= deadline {
                    return;
                }
            }
            ev = live.recv() => match ev {
                Ok(e) => {
                    if e.rv <= *last_rv {
                        continue;
                    }
                    *last_rv = e.rv;
                    if filter(&e) && send_event(&shared, &tx, &e).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}
