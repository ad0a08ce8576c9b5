//! gRPC `Watch` streams that survive the loss of their tunnel or member.
//!
//! The proxy terminates the client's Watch stream and keeps its own upstream stream. It
//! remembers every watch the client created (the create request, the client's watch ID, and
//! the next revision the client has not seen: last delivered event + 1, or the revision a
//! progress notification vouched for). When the upstream stream breaks — tunnel cut, pod
//! killed, connection reset — it opens a new one on a ready member, re-creates each watch
//! from its next revision, swallows the re-creation's `created` reply and translates the new
//! upstream watch IDs back to the client's. The client sees one unbroken stream with every
//! event exactly once, in order. If a revision was compacted meanwhile, etcd's cancel with
//! `compact_revision` reaches the client as etcd sent it.
//!
//! Known gap: a response fragmented across messages (`fragment`, for watch responses over
//! the message size limit) that is cut in the middle is re-delivered from its revision.

pub(crate) mod proto;
pub(crate) mod relay;
mod table;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::forward::upstream_request;
use super::frames::{frame, payload, Deframer, Error as FrameError, MAX_FROM_CLIENT};
use super::{Inner, ProxyBody};
use crate::error::{one_line, BoxError};
use crate::grpc::Code;
use crate::router::Class;
use crate::upstream::Body as UpstreamResponse;
use relay::{Abort, Relay, Step};
use table::{Table, Translated, Verdict};

/// The gRPC path of etcd's watch stream.
pub(super) const PATH: &str = "/etcdserverpb.Watch/Watch";

/// How long a session keeps trying to reach a member before telling the client UNAVAILABLE.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
/// First and longest wait between reconnection attempts.
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Bytes of responses the session may have queued for the client that hyper has not taken
/// yet (a single larger message takes the whole budget): a client that stops reading during a
/// catch-up of multi-megabyte messages makes the session hold at most this much.
const OUT_BUDGET: usize = 4 << 20;

type Item = Result<Frame<Bytes>, BoxError>;

/// The way to the client: frames in order; a data frame holds its share of `OUT_BUDGET` until
/// hyper takes it, which it does only when the client's stream has room (so etcd's window is
/// released only for what is handed on, as for every other response).
#[derive(Clone)]
struct Out {
    tx: mpsc::Sender<(Item, Option<OwnedSemaphorePermit>)>,
    budget: Arc<Semaphore>,
}

impl Out {
    /// Queues a frame, waiting for budget first if it is data; `Err` once the client is gone.
    async fn send(&self, item: Item) -> Result<(), ()> {
        let share = match &item {
            Ok(f) => f.data_ref().map(|d| d.len().clamp(1, OUT_BUDGET)),
            Err(_) => None,
        };
        let permit = match share {
            Some(n) => Some(
                self.budget
                    .clone()
                    .acquire_many_owned(n as u32)
                    .await
                    .map_err(|_| ())?,
            ),
            None => None,
        };
        self.tx.send((item, permit)).await.map_err(|_| ())
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Serves a client's Watch stream: answers at once and runs the session in its own task.
pub(super) fn serve(
    inner: Arc<Inner>,
    pinned: Option<String>,
    parts: Parts,
    body: Incoming,
) -> Response<ProxyBody> {
    let (tx, rx) = mpsc::channel(64);
    let out = Out {
        tx,
        budget: Arc::new(Semaphore::new(OUT_BUDGET)),
    };
    let span = tracing::debug_span!("watch");
    tokio::spawn(
        Session::new(inner, pinned)
            .run(parts, body, out)
            .instrument(span),
    );
    // A frame's permit goes back as hyper takes the frame.
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|(item, _permit)| (item, rx))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// How one upstream stream ended.
enum Ended {
    /// The client is gone or the stream finished for good: the session is over.
    Done,
    /// The upstream broke: reconnect and resume. `established`: it had answered, so this was
    /// a loss rather than a failed attempt (which backs off).
    Lost { why: String, established: bool },
}

/// The response to an upstream Watch request, not yet arrived.
type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<UpstreamResponse>, String>> + Send>>;

/// One upstream stream being set up: where requests go, and its response.
struct Attempt {
    tx: mpsc::UnboundedSender<Bytes>,
    response: ResponseFuture,
    member: String,
}

/// The next frame of the upstream body, once there is one.
async fn next_frame(body: &mut Option<UpstreamResponse>) -> Option<Result<Frame<Bytes>, BoxError>> {
    match body {
        Some(b) => b.frame().await,
        None => std::future::pending().await,
    }
}

/// One client Watch stream: its table, and the I/O that moves messages through it.
struct Session {
    inner: Arc<Inner>,
    pinned: Option<String>,
    table: Table,
}

impl Session {
    fn new(inner: Arc<Inner>, pinned: Option<String>) -> Self {
        Self {
            inner,
            pinned,
            table: Table::default(),
        }
    }

    async fn run(mut self, parts: Parts, mut client: Incoming, out: Out) {
        let mut client_frames = Deframer::new(MAX_FROM_CLIENT);
        let mut client_done = false;
        let mut failing_since: Option<Instant> = None;
        let mut backoff = BACKOFF_START;
        let mut last_error = String::from("no attempt made");
        let mut relay = Relay::new();
        while !out.is_closed() {
            if failing_since.is_some_and(|t| t.elapsed() > GIVE_UP_AFTER) {
                let msg = format!(
                    "etcd-proxy could not reach an etcd member for the watch stream: {last_error}"
                );
                let _ = out
                    .send(Ok(Frame::trailers(grpc_trailers(Code::Unavailable, &msg))))
                    .await;
                return;
            }
            let ended = match self.start(&parts) {
                Ok(attempt) => {
                    self.pump(
                        &mut client,
                        &mut client_frames,
                        &mut client_done,
                        attempt,
                        &mut relay,
                        &out,
                    )
                    .await
                }
                Err(why) => Ended::Lost {
                    why,
                    established: false,
                },
            };
            if matches!(ended, Ended::Lost { .. }) && !self.finish_cut(&mut relay, &out).await {
                return;
            }
            match ended {
                Ended::Done => return,
                Ended::Lost {
                    why,
                    established: true,
                } => {
                    tracing::info!(watches = self.table.len(), reason = %why, "watch stream lost; resuming");
                    crate::metrics::get().watch_resumes.inc();
                    failing_since = None;
                    backoff = BACKOFF_START;
                }
                Ended::Lost {
                    why,
                    established: false,
                } => {
                    tracing::debug!(reason = %why, "watch stream attempt failed");
                    failing_since.get_or_insert_with(Instant::now);
                    last_error = why;
                    tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Starts an upstream Watch stream on a member and queues the re-creation of the client's
    /// watches. Nothing is awaited: etcd sends no response headers before the first create.
    fn start(&mut self, parts: &Parts) -> Result<Attempt, String> {
        let pod = self
            .inner
            .backends
            .pick(self.pinned.as_deref(), &[], false)
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
        });
        let body = StreamBody::new(stream).boxed();
        let req = upstream_request(parts, body, Class::Grpc, &pod.name, pod.port)
            .map_err(|e| e.to_string())?;
        let upstream = self.inner.upstream.clone();
        let member = pod.name.clone();
        let response: ResponseFuture = Box::pin(async move {
            upstream
                .send(req)
                .await
                .map_err(|e| format!("{member}: {}", one_line(&e)))
        });
        for req in self.table.resume() {
            let _ = tx.send(frame(&req));
        }
        Ok(Attempt {
            tx,
            response,
            member: pod.name.clone(),
        })
    }

    /// Moves messages both ways until the upstream stream ends or the client goes away.
    async fn pump(
        &mut self,
        client: &mut Incoming,
        client_frames: &mut Deframer,
        client_done: &mut bool,
        attempt: Attempt,
        relay: &mut Relay,
        out: &Out,
    ) -> Ended {
        let Attempt {
            tx,
            mut response,
            member,
        } = attempt;
        // Once the client has half-closed, the upstream request ends after the re-creations.
        let mut up_tx = (!*client_done).then_some(tx);
        let mut upstream: Option<UpstreamResponse> = None;
        let mut steps = Vec::new();
        let lost = |why: String, established: bool| Ended::Lost { why, established };
        let mut stopping = self.inner.stopping.clone();
        loop {
            tokio::select! {
                r = &mut response, if upstream.is_none() => match r {
                    Ok(resp) if resp.status() == StatusCode::OK => {
                        self.inner.health.record(&member, true);
                        if resp.headers().contains_key("grpc-status") {
                            // Trailers-Only: an immediate error such as a rejected token.
                            let headers = resp.headers().clone();
                            return self.trailers(headers, *client_done, out).await;
                        }
                        upstream = Some(resp.into_body());
                    }
                    Ok(resp) => return lost(format!("{member} answered HTTP {}", resp.status()), false),
                    Err(e) => {
                        self.inner.health.record(&member, false);
                        return lost(e, false);
                    }
                },
                f = client.frame(), if !*client_done => match f {
                    Some(Ok(f)) => {
                        let Ok(data) = f.into_data() else { continue };
                        client_frames.push(&data);
                        loop {
                            match client_frames.next_message() {
                                Ok(Some(msg)) => {
                                    let Some(req) = self.table.on_client_message(&msg) else { continue };
                                    if let Some(tx) = up_tx.as_ref() {
                                        let _ = tx.send(frame(&req));
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    let code = match e {
                                        FrameError::TooLarge(..) => Code::ResourceExhausted,
                                        FrameError::Compressed => Code::Internal,
                                    };
                                    let _ = out.send(Ok(Frame::trailers(grpc_trailers(code, &e.to_string())))).await;
                                    return Ended::Done;
                                }
                            }
                        }
                    }
                    Some(Err(_)) => return Ended::Done,
                    None => {
                        *client_done = true;
                        up_tx = None;
                    }
                },
                f = next_frame(&mut upstream) => match f {
                    Some(Ok(f)) => match f.into_data() {
                        Ok(data) => {
                            steps.clear();
                            let table = &self.table;
                            if let Err(e) = relay.push(data, |head| table.passes(head), &mut steps) {
                                return lost(e.to_string(), true);
                            }
                            for step in steps.drain(..) {
                                let resp = match step {
                                    // Unchanged messages go on as they came, uncopied.
                                    Step::Whole(framed) => match self.table.on_upstream_message(payload(&framed)) {
                                        Translated::Pass => framed,
                                        Translated::Rewritten(m) => frame(&m),
                                        Translated::Swallow => continue,
                                    },
                                    Step::Pass(bytes) => bytes,
                                    Step::Passed(summary) => {
                                        let verdict = summary.map(|r| self.table.on_response(&r));
                                        if verdict.is_some_and(|v| v != Verdict::Pass) {
                                            // Only a field after the events could do this;
                                            // etcd writes none there.
                                            tracing::warn!("a watch response passed on as it came should have been translated");
                                        }
                                        continue;
                                    }
                                };
                                if out.send(Ok(Frame::data(resp))).await.is_err() {
                                    return Ended::Done;
                                }
                            }
                        }
                        Err(f) => {
                            let trailers = f.into_trailers().unwrap_or_default();
                            if !self.finish_cut(relay, out).await {
                                return Ended::Done;
                            }
                            return self.trailers(trailers, *client_done, out).await;
                        }
                    },
                    Some(Err(e)) => return lost(format!("{member}: {}", one_line(&*e)), true),
                    None => return lost(format!("{member} ended the stream without a status"), true),
                },
                _ = out.closed() => return Ended::Done,
                _ = async { let _ = stopping.wait_for(|s| *s).await; } => {
                    let msg = "etcd-proxy is shutting down";
                    let _ = out.send(Ok(Frame::trailers(grpc_trailers(Code::Unavailable, msg)))).await;
                    return Ended::Done;
                }
            }
        }
    }

    /// Completes a response the upstream cut in the middle of, after part of it went to the
    /// client (see [`relay`]); `false` if it could not be, and the client's stream has ended.
    async fn finish_cut(&mut self, relay: &mut Relay, out: &Out) -> bool {
        match relay.abort() {
            None => true,
            Some(Abort::Pad(pad, delivered)) => {
                if let Some(r) = delivered {
                    self.table.on_response(&r);
                }
                out.send(Ok(Frame::data(pad))).await.is_ok()
            }
            Some(Abort::Impossible) => {
                let msg = "the watch stream to etcd broke in the middle of a response";
                let _ = out
                    .send(Ok(Frame::trailers(grpc_trailers(Code::Unavailable, msg))))
                    .await;
                false
            }
        }
    }

    /// The upstream ended with a status: pass it on, unless it says the member is unavailable
    /// (for example it lost its leader) and the client still wants events.
    async fn trailers(&mut self, trailers: HeaderMap, client_done: bool, out: &Out) -> Ended {
        let status = trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("2")
            .to_owned();
        if status == Code::Unavailable.as_str() && !client_done {
            let why = format!("etcd said UNAVAILABLE: {:?}", trailers.get("grpc-message"));
            return Ended::Lost {
                why,
                established: true,
            };
        }
        let _ = out.send(Ok(Frame::trailers(trailers))).await;
        Ended::Done
    }
}

fn grpc_trailers(status: Code, msg: &str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static(status.as_str()));
    if let Ok(v) = HeaderValue::from_str(&super::reply::percent_encode(msg)) {
        t.insert("grpc-message", v);
    }
    t
}
