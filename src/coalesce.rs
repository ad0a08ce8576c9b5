//! Makes `h2` write many small frames in one system call, on both sides of the proxy.
//!
//! The `h2` crate copies a DATA frame into its 16 KiB write buffer only when the payload is
//! smaller than a threshold; a larger payload is chained behind the buffer and the buffer must
//! be written out before the next frame can be queued. The threshold is 256 bytes when the
//! socket says it supports vectored writes and 1 KiB when it does not (`h2` 0.4
//! `codec/framed_write.rs`, `CHAIN_THRESHOLD` and `CHAIN_THRESHOLD_WITHOUT_VECTORED_IO`).
//!
//! A TCP socket supports vectored writes, so every gRPC response of 256 bytes or more (a
//! Range with one 256-byte value already is) cost one `writev` of its own, even when a dozen
//! responses for the same connection were ready at once. Measured with 100 clients over 10
//! connections: 1.2 `writev` per get. Reporting "not vectored" raises the threshold, and the
//! responses that are ready together leave in one write: 0.4 writes per get, and the proxy's
//! CPU per 1,000 gets fell from 35 to 24 ms. Payloads of 1 KiB and more are still chained,
//! now as two plain writes (header, payload) instead of one `writev`; their cost is the copy.
//!
//! The upstream connections (`upstream::h2`, on the `h2` crate directly) are wrapped too: the
//! requests that are ready together go to etcd in one write.
//!
//! A chained payload is written as it comes, but it still took two writes: `h2` writes its
//! buffer (the frame header, and any small frames before it), then the payload, then flushes.
//! In a bulk transfer every 16 KiB DATA frame (what etcd and its clients send) cost two
//! system calls. So writes smaller than `GATHER` are gathered, copied, and leave together on
//! the next flush, which both `h2` and hyper's HTTP/1 issue after every batch of writes: a
//! frame and its header leave in one write. Copying 16 KiB costs less than a system call. The
//! gathering buffer is freed after a flush when it has grown, so an idle connection holds
//! none.
//!
//! Even so, `h2` flushes after every large DATA frame to make room for the next, so a bulk
//! response left as one system call per 16 KiB frame (the largest frame etcdctl accepts). A
//! flush that finds a full-size frame gathered is therefore put off once, with the task woken,
//! so that the frames `h2` has ready behind it join it: measured on a 41 MB range in gateway
//! mode, 2,610 `sendto` calls became 1,407, and the proxy's CPU for it fell by a fifth.
//!
//! Reading has the mirror problem on the upstream connections, where bulk responses arrive:
//! `h2` reads into what is left of its frame buffer, about 8 KiB at a time, two system calls
//! per DATA frame. [`ReadAhead`] reads up to `READ_AHEAD` at once. Only the upstream
//! connections use it: there are few of them (one per member), while the listeners may hold
//! thousands of connections, each of which would keep the buffer.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes smaller than this are gathered until the next flush.
const GATHER: usize = 64 * 1024;
/// A gathering buffer that has grown past this is freed once written out.
const KEEP: usize = 16 * 1024;
/// A flush that finds at least this much gathered (a full-size DATA frame) is put off once:
/// see [`CoalesceWrites::poll_flush`].
const DEFER_FROM: usize = 16 * 1024;
/// What [`ReadAhead`] asks the socket for at once.
const READ_AHEAD: usize = 64 * 1024;

/// A connection that hides its vectored-write support from `h2` and gathers small writes
/// until the next flush.
pub(crate) struct CoalesceWrites<S> {
    inner: S,
    /// Bytes accepted and not yet written, from `written` on.
    out: Vec<u8>,
    written: usize,
    /// How much was gathered when a flush was last put off.
    deferred_at: Option<usize>,
}

impl<S> CoalesceWrites<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            out: Vec::new(),
            written: 0,
            deferred_at: None,
        }
    }
}

impl<S: AsyncWrite + Unpin> CoalesceWrites<S> {
    /// Writes out everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        self.deferred_at = None;
        if self.out.capacity() > KEEP {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for CoalesceWrites<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CoalesceWrites<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.len() + data.len() > GATHER {
            ready!(this.poll_drain(cx))?;
        }
        if data.len() >= GATHER {
            // Nothing is gathered now: a large write goes as it is.
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.out.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    /// The point of this type: `h2` then copies payloads under 1 KiB into its write buffer.
    fn is_write_vectored(&self) -> bool {
        false
    }

    /// `h2` flushes after every large DATA frame, to make room for the next one, and again at
    /// the end of each batch. A flush that finds a full-size frame gathered, and more gathered
    /// than at the last such flush, is therefore put off: the task is woken and `Ready`
    /// returned, so `h2` queues the frames it has ready behind it and they leave in one write.
    /// The flush that finds nothing new since (the end of the batch, or the poll the wake-up
    /// brings) writes. Small writes are never put off. Every user of this type (`h2`, hyper's
    /// HTTP/1) flushes on each poll, which the wake-up guarantees.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let gathered = this.out.len();
        if gathered - this.written >= DEFER_FROM
            && gathered < GATHER
            && this.deferred_at != Some(gathered)
        {
            this.deferred_at = Some(gathered);
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// Reads from the socket in chunks of up to `READ_AHEAD`, whatever the reader asks for.
pub(crate) struct ReadAhead<S> {
    inner: S,
    /// Allocated on the first read; bytes `start..end` are read and not yet handed on.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<S> ReadAhead<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Box::default(),
            start: 0,
            end: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.start == this.end {
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if this.buf.is_empty() {
                this.buf = vec![0; READ_AHEAD].into_boxed_slice();
            }
            let mut ahead = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut ahead))?;
            this.start = 0;
            this.end = ahead.filled().len();
        }
        let n = (this.end - this.start).min(out.remaining());
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::Waker;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn hides_vectored_writes_and_passes_bytes_both_ways() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut a = CoalesceWrites::new(a);
        assert!(
            !a.is_write_vectored(),
            "h2 would chain payloads of 256 bytes"
        );
        a.write_all(b"response").await.unwrap();
        a.flush().await.unwrap();
        let mut got = [0u8; 8];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"response");
        b.write_all(b"request").await.unwrap();
        let mut got = [0u8; 7];
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"request");
    }

    #[tokio::test]
    async fn small_writes_leave_together_on_flush_and_large_ones_at_once() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut a = CoalesceWrites::new(a);
        a.write_all(b"head").await.unwrap();
        a.write_all(b"er").await.unwrap();
        let mut got = [0u8; 6];
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), b.read_exact(&mut got))
                .await
                .is_err(),
            "gathered until the flush"
        );
        a.flush().await.unwrap();
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"header");
        // Gathered bytes go first, then a write too large to gather.
        let big = vec![9u8; GATHER + 1];
        a.write_all(b"x").await.unwrap();
        a.write_all(&big).await.unwrap();
        a.flush().await.unwrap();
        let mut got = vec![0u8; GATHER + 2];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got[0], b'x');
        assert!(got[1..].iter().all(|&c| c == 9));
        assert!(a.out.capacity() <= KEEP, "a grown buffer is freed");
    }

    /// Records the size of every write that reaches it.
    #[derive(Default)]
    struct Recorder(Vec<usize>);

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().0.push(data.len());
            Poll::Ready(Ok(data.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// `h2` writing three full-size DATA frames, flushing after each to make room and once
    /// more at the end of the batch: one write. A small write is flushed at once.
    #[tokio::test]
    async fn large_frames_flushed_one_by_one_leave_in_one_write() {
        let mut w = CoalesceWrites::new(Recorder::default());
        let frame = vec![7u8; DEFER_FROM + 9];
        for _ in 0..3 {
            w.write_all(&frame).await.unwrap();
            w.flush().await.unwrap();
        }
        assert!(w.inner.0.is_empty(), "put off while frames keep coming");
        w.flush().await.unwrap();
        assert_eq!(w.inner.0, [3 * frame.len()], "then one write");
        w.write_all(b"small").await.unwrap();
        w.flush().await.unwrap();
        assert_eq!(
            w.inner.0,
            [3 * frame.len(), 5],
            "small writes are never put off"
        );
    }

    /// A put-off flush wakes its task, so a task that flushes on every poll (as `h2` and
    /// hyper do) writes on its next poll even if nothing else wakes it.
    #[tokio::test]
    async fn a_put_off_flush_wakes_its_task() {
        let mut w = CoalesceWrites::new(Recorder::default());
        w.write_all(&vec![1u8; DEFER_FROM]).await.unwrap();
        let woken = Arc::new(AtomicBool::new(false));
        let waker = Waker::from(Arc::new(Flag(woken.clone())));
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut w).poll_flush(&mut cx).is_ready());
        assert!(woken.load(Ordering::SeqCst), "the task is woken");
        assert!(w.inner.0.is_empty());
        assert!(Pin::new(&mut w).poll_flush(&mut cx).is_ready());
        assert_eq!(w.inner.0, [DEFER_FROM]);
    }

    struct Flag(Arc<AtomicBool>);

    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn read_ahead_hands_on_every_byte_in_order() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut b = ReadAhead::new(b);
        let sent: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        a.write_all(&sent).await.unwrap();
        drop(a);
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        loop {
            let n = b.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn tcp_sockets_do_report_vectored_writes() {
        // The reason this type exists; if tokio stops reporting it, the wrapper is moot.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        assert!(client.is_write_vectored());
    }
}
