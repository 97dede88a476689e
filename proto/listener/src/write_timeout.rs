//! The write timeout: a connection whose client accepts none of what the server writes for
//! that long is closed (nginx's `send_timeout`).
//!
//! Without it, a client that sends a request and never reads the answer holds its connection
//! (and a connection slot) for as long as it likes once the answer is larger than the socket
//! buffers: hyper takes a whole non-streamed body into its write buffer at once and waits for
//! the socket to become writable, with no deadline of its own. The clock runs only while a
//! write waits for a full socket, from the first write that found it full; any byte the client
//! accepts stops it. A slow reader is therefore never cut, only one that stopped reading; an
//! upstream that is slow to answer writes nothing and is never cut by it either.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep, sleep_until};

/// The default for `--write-timeout` (data plane) and `--http-write-timeout` (control plane),
/// nginx's default `send_timeout`.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection's socket whose writes fail once one has waited `timeout` for a full socket.
pub(crate) struct WriteTimeout<I> {
    io: I,
    timeout: Duration,
    /// Made at the connection's first full socket; most connections never have one.
    sleep: Option<Pin<Box<Sleep>>>,
    /// A write is waiting for the socket, and `sleep` is set to when it gives up.
    stalled: bool,
    /// The timeout passed (counted once; every write fails from then on).
    expired: bool,
    /// Connections closed by the write timeout.
    timeouts: Counter,
    /// Reads that brought bytes, counted for the connection's [`crate::HeadTimer`], which
    /// tells an idle wait for a head from one whose head has begun by it.
    reads: Arc<AtomicU64>,
}

impl<I> WriteTimeout<I> {
    pub(crate) fn new(io: I, timeout: Duration, timeouts: Counter, reads: Arc<AtomicU64>) -> Self {
        Self {
            io,
            timeout,
            sleep: None,
            stalled: false,
            expired: false,
            timeouts,
            reads,
        }
    }

    /// What a write answered, unless it waited for a full socket past the timeout. Only a
    /// write the socket took stops the clock (a flush of a TCP socket is ready at once and
    /// writes nothing).
    #[inline]
    fn watch<T>(
        &mut self,
        written: Poll<std::io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<T>> {
        if written.is_ready() {
            self.stalled = false;
            return written;
        }
        self.poll_stalled(cx).map(Err)
    }

    #[inline(never)]
    fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        if !self.expired {
            // The clock starts at the first write that finds the socket full.
            if !self.stalled {
                self.stalled = true;
                let at = Instant::now() + self.timeout;
                match &mut self.sleep {
                    Some(sleep) => sleep.as_mut().reset(at),
                    None => self.sleep = Some(Box::pin(sleep_until(at))),
                }
            }
            if let Some(sleep) = &mut self.sleep {
                ready!(sleep.as_mut().poll(cx));
            }
            self.expired = true;
            self.timeouts.inc();
            tracing::debug!(
                write_timeout = ?self.timeout,
                "closed a connection whose client accepted none of its answer within the write timeout"
            );
        }
        Poll::Ready(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client accepted none of the answer within the write timeout",
        ))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteTimeout<I> {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            // This task alone writes it: a load and a store, not a locked add.
            let reads = self.reads.load(Ordering::Relaxed);
            self.reads.store(reads.wrapping_add(1), Ordering::Relaxed);
        }
        read
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<I> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(written, cx)
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(written, cx)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Pending => this.poll_stalled(cx).map(Err),
            flushed => flushed,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
