//! What a serving thread's requests see of the process stopping (`server::Proxy::serve` drives
//! it): first the lame duck, during which the replica serves as before but `/readyz` answers
//! 503 and every HTTP/1 answer carries `Connection: close`, so that load balancers stop
//! sending and clients retire their keep-alive connections themselves (a connection the
//! replica closed between requests could be under a request the client was just sending: a
//! `POST` nginx cannot resend, answered 502); then, shortly before the drain timeout runs out,
//! the end of the streams still relayed, each with an error event its client can read, not a
//! connection cut mid-stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

thread_local! {
    /// This serving thread's drain ran out: what its runtime drops from now on, the stop cut
    /// ([`Stopping::cut_the_rest`]).
    static CUT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the request being dropped on this thread is one the stop cut: its drain ran out
/// with the request still waiting on its upstream, not its client leaving.
pub fn cut_by_the_stop() -> bool {
    CUT.get()
}

/// One serving thread's view of the stop (each thread has its own, so that the streams of one
/// register with a `Notify` no other thread's take a lock of).
#[derive(Debug, Default)]
pub struct Stopping {
    lame_duck: AtomicBool,
    streams_end: AtomicBool,
    /// Wakes the relays of [`StreamsEnd`] when the streams are to end.
    notify: Arc<Notify>,
}

impl Stopping {
    /// From the stop's first moment on: the replica is no longer ready, and HTTP/1 answers
    /// close their connections.
    pub fn start_lame_duck(&self) {
        self.lame_duck.store(true, Ordering::Relaxed);
    }

    pub fn lame_duck(&self) -> bool {
        self.lame_duck.load(Ordering::Relaxed)
    }

    /// Ends every stream relayed on this thread with an error event.
    pub fn end_streams(&self) {
        self.streams_end.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// The drain ran out: the requests this thread's runtime drops from now on (its last
    /// connections, closed) are the stop's doing ([`cut_by_the_stop`]). Called on the serving
    /// thread itself, whose runtime then drops them.
    pub fn cut_the_rest(&self) {
        CUT.set(true);
    }

    /// A watch for [`Stopping::end_streams`], for one stream's relay.
    pub fn streams_end(self: &Arc<Self>) -> StreamsEnd {
        StreamsEnd {
            stopping: Arc::clone(self),
            notified: None,
            waker: None,
        }
    }
}

/// One stream's watch for the end of the drain, polled whenever its relay waits on the
/// upstream (once an event): after the first wait it costs a waker comparison and an atomic
/// load, the `Notify` being polled again only when the relay's waker is another (as
/// [`crate::deadline::Alarm`] does for its sleep).
#[derive(Debug)]
pub struct StreamsEnd {
    stopping: Arc<Stopping>,
    /// Made at the first wait (a stream answered whole by its first chunk never waits).
    notified: Option<Pin<Box<OwnedNotified>>>,
    /// The waker the `Notify` holds.
    waker: Option<Waker>,
}

impl StreamsEnd {
    /// Whether the streams are to end (an atomic load: for a relay that is being polled
    /// anyway).
    #[inline]
    pub fn ended(&self) -> bool {
        self.stopping.streams_end.load(Ordering::SeqCst)
    }

    /// `Ready` once the streams are to end; else `Pending`, and the task is woken when they
    /// are.
    #[inline]
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(waker) = &self.waker
            && waker.will_wake(cx.waker())
        {
            return if self.ended() {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
        self.register(cx)
    }

    /// [`StreamsEnd::poll`] with a waker the `Notify` does not hold yet.
    #[inline(never)]
    fn register(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Made before the flag is read: a `notify_waiters` after its making wakes it, and one
        // before it came after the flag was set, which the read below sees.
        let notified = self
            .notified
            .get_or_insert_with(|| Box::pin(Arc::clone(&self.stopping.notify).notified_owned()));
        if notified.as_mut().poll(cx).is_ready() || self.ended() {
            return Poll::Ready(());
        }
        self.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::future::poll_fn;

    #[tokio::test]
    async fn a_stream_waiting_is_woken_when_the_streams_end() {
        let stopping = Arc::new(Stopping::default());
        let mut end = stopping.streams_end();
        let waiting = tokio::spawn(async move { poll_fn(|cx| end.poll(cx)).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        stopping.end_streams();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_stream_watching_after_the_end_is_told_at_once() {
        let stopping = Arc::new(Stopping::default());
        stopping.end_streams();
        let mut end = stopping.streams_end();
        poll_fn(|cx| end.poll(cx)).await;
        assert!(!stopping.lame_duck());
        stopping.start_lame_duck();
        assert!(stopping.lame_duck());
    }
}
