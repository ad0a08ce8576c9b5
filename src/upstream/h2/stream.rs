//! One stream on an upstream HTTP/2 connection: sending the request body (what is ready at
//! once in the caller's task, the rest in a pipe task that respects the send window) and the
//! response body as an [`hyper::body::Body`].

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures::future::poll_fn;
use h2::{Reason, RecvStream, SendStream};
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::{BoxError, ConnState, UpstreamBody};

/// Counts a stream as open while any part of it is under way.
#[derive(Debug)]
pub(super) struct StreamGuard(Arc<ConnState>);

impl StreamGuard {
    pub(super) fn new(state: Arc<ConnState>) -> Self {
        if state.open.fetch_add(1, Ordering::Relaxed) == 0 {
            // A stored permit if the keepalive task is not waiting yet.
            state.opened.notify_one();
        }
        Self(state)
    }
}

impl Clone for StreamGuard {
    fn clone(&self) -> Self {
        Self::new(self.0.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends the frames `body` has ready without waiting; `Ok(true)` once the body has ended.
pub(super) fn send_ready(
    body: &mut UpstreamBody,
    tx: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Result<bool, BoxError> {
    loop {
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => return Ok(false),
            Poll::Ready(None) => {
                tx.send_data(Bytes::new(), true)?;
                return Ok(true);
            }
            Poll::Ready(Some(frame)) => {
                if send_frame(frame?, body.is_end_stream(), tx)? {
                    return Ok(true);
                }
            }
        }
    }
}

/// Sends one body frame; `Ok(true)` if it ended the stream.
fn send_frame(
    frame: Frame<Bytes>,
    end: bool,
    tx: &mut SendStream<Bytes>,
) -> Result<bool, h2::Error> {
    match frame.into_data() {
        Ok(data) => {
            tx.send_data(data, end)?;
            Ok(end)
        }
        Err(frame) => match frame.into_trailers() {
            Ok(trailers) => {
                tx.send_trailers(trailers)?;
                Ok(true)
            }
            Err(_) => Ok(false),
        },
    }
}

/// Pipes the rest of a body that is still being written, one chunk per window.
pub(super) async fn pipe(mut body: UpstreamBody, mut tx: SendStream<Bytes>, _open: StreamGuard) {
    loop {
        // The next chunk, unless etcd resets the stream first.
        let next = poll_fn(|cx| {
            if let Poll::Ready(r) = tx.poll_reset(cx) {
                return Poll::Ready(Err(r.map_or_else(|e| e.to_string(), |r| r.to_string())));
            }
            Pin::new(&mut body).poll_frame(cx).map(Ok)
        })
        .await;
        let frame = match next {
            Err(why) => {
                tracing::debug!(%why, "upstream reset a stream while its request was being sent");
                return;
            }
            Ok(None) => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "request body failed; resetting the upstream stream");
                tx.send_reset(Reason::CANCEL);
                return;
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            // Wait for window before queueing, so a fast writer cannot fill memory.
            if !data.is_empty() && wait_capacity(&mut tx, data.len()).await.is_err() {
                return;
            }
        }
        match send_frame(frame, body.is_end_stream(), &mut tx) {
            Ok(false) => {}
            Ok(true) | Err(_) => return,
        }
    }
}

/// Waits until the stream may send at least part of `len` bytes.
async fn wait_capacity(tx: &mut SendStream<Bytes>, len: usize) -> Result<(), ()> {
    tx.reserve_capacity(len);
    while tx.capacity() == 0 {
        match poll_fn(|cx| tx.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(()),
        }
    }
    Ok(())
}

/// The body of a response from etcd: DATA frames, then trailers. Each frame's bytes are
/// released to etcd's window as the frame is yielded, that is, handed on (module docs of
/// `h2/mod.rs`, "Flow control").
#[derive(Debug)]
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
    done: bool,
    _open: StreamGuard,
}

impl H2Body {
    pub(super) fn new(recv: RecvStream, open: StreamGuard) -> Self {
        Self {
            recv,
            data_done: false,
            done: false,
            _open: open,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The bytes are handed on: etcd may send more.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.data_done = true,
            }
        }
        let trailers: Result<Option<HeaderMap>, h2::Error> = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        Poll::Ready(trailers.transpose().map(|t| t.map(Frame::trailers)))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
