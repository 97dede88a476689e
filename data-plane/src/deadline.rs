//! The request deadline of a stream, enforced on its client connection.
//!
//! A stream's relay checks `request_timeout` only when hyper polls it, and hyper polls it only
//! when the client's socket can take more: a client that stops reading stops the checks, and
//! with them the stream — the client connection and the upstream one stay open for as long as
//! the client likes. So a stream's response also holds its deadline (plus [`GRACE`], so that a
//! relay that is still polled ends the stream itself with its error event) on the connection,
//! whose socket fails every read and write once it passed: hyper then closes the connection
//! and drops the stream, which closes the upstream connection and records the request.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep, sleep_until};

/// Past the stream's own deadline, before the connection is failed.
pub const GRACE: Duration = Duration::from_secs(1);

/// The latest deadline of the streams a client connection carries (HTTP/2 may carry
/// several; each is cut when the last one's passes).
#[derive(Debug, Default, Clone)]
pub struct ConnectionDeadline(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    /// Set on every change, so the socket looks at `state` only then.
    changed: AtomicBool,
    /// Streams holding a deadline, and the latest of them.
    state: Mutex<(usize, Option<Instant>)>,
}

impl ConnectionDeadline {
    /// Holds `at` on the connection until the returned guard drops.
    pub fn hold(&self, at: Instant) -> Held {
        let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 += 1;
        state.1 = Some(state.1.map_or(at, |t| t.max(at)));
        self.0.changed.store(true, Ordering::Release);
        Held(self.clone())
    }

    /// The socket's side: `true` once the deadline held passed (registering a wake-up for it
    /// otherwise).
    ///
    /// Inlined into the socket's reads and writes, where it is asked about ten times a request:
    /// its common answer (nothing changed, no stream's deadline held) is two loads, and the rest
    /// is out of line so that the call does not save and restore registers for it.
    #[inline]
    pub fn poll_expired(&self, timer: &mut Option<Alarm>, cx: &mut Context<'_>) -> bool {
        // A plain load first: the socket asks at every read and write, and a swap would take
        // the cache line exclusively each time.
        if !self.0.changed.load(Ordering::Relaxed) && timer.is_none() {
            return false;
        }
        self.poll_expired_slow(timer, cx)
    }

    #[inline(never)]
    fn poll_expired_slow(&self, timer: &mut Option<Alarm>, cx: &mut Context<'_>) -> bool {
        if self.0.changed.load(Ordering::Relaxed) && self.0.changed.swap(false, Ordering::Acquire) {
            let at = self
                .0
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .1;
            match (at, timer.as_mut()) {
                (None, _) => *timer = None,
                (Some(at), Some(alarm)) => alarm.reset(at),
                (Some(at), None) => *timer = Some(Alarm::at(at)),
            }
        }
        timer
            .as_mut()
            .is_some_and(|alarm| alarm.poll(cx).is_ready())
    }
}

/// A tokio [`Sleep`] for a future polled far more often than the sleep can fire (a socket at
/// every read and write, a stream's relay at every event): the sleep itself is polled only
/// when its answer could have changed — after it was set, when the task's waker is another,
/// or once tokio's timer has taken it out of its wheel (it fired) — and otherwise asking costs
/// an atomic load. Polling the sleep each time cost about 200 instructions (the cooperative
/// budget, the timer entry's waker exchange), several times per relayed event.
#[derive(Debug)]
pub struct Alarm {
    sleep: Pin<Box<Sleep>>,
    /// The waker tokio holds for the sleep, once it holds one.
    waker: Option<Waker>,
}

impl Alarm {
    /// An alarm for `deadline`.
    pub fn at(deadline: Instant) -> Self {
        Self {
            sleep: Box::pin(sleep_until(deadline)),
            waker: None,
        }
    }

    /// Moves the alarm to `deadline`.
    pub fn reset(&mut self, deadline: Instant) {
        self.sleep.as_mut().reset(deadline);
        self.waker = None;
    }

    /// `Ready` once the deadline passed; else `Pending`, and the task is woken when it
    /// passes.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(waker) = &self.waker
            && waker.will_wake(cx.waker())
            && !self.sleep.is_elapsed()
        {
            return Poll::Pending;
        }
        let poll = self.sleep.as_mut().poll(cx);
        self.waker = poll.is_pending().then(|| cx.waker().clone());
        poll
    }
}

/// A stream's hold on its connection's deadline.
#[derive(Debug)]
pub struct Held(ConnectionDeadline);

impl Drop for Held {
    fn drop(&mut self) {
        let shared = &self.0.0;
        let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 = state.0.saturating_sub(1);
        if state.0 == 0 {
            state.1 = None;
        }
        shared.changed.store(true, Ordering::Release);
    }
}

/// A response body holding its deadline on the connection while it is sent, if it is a
/// stream's. Every response of a connection is one (with or without a hold), so that a
/// stream's body is not boxed a second time to hold its deadline: each of its frames went
/// through that second box's dynamic call and its error mapping (about 140 instructions an
/// event).
pub struct Holding<B> {
    body: B,
    _held: Option<Held>,
}

impl<B> Holding<B> {
    pub fn new(body: B, held: Option<Held>) -> Self {
        Self { body, _held: held }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Holding<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expires_at_the_latest_deadline_held_and_not_once_released() {
        let deadline = ConnectionDeadline::default();
        let mut timer = None;
        let expired = |timer: &mut Option<Alarm>| {
            let waker = futures::task::noop_waker();
            deadline.poll_expired(timer, &mut Context::from_waker(&waker))
        };
        assert!(!expired(&mut timer), "nothing held");
        let now = Instant::now();
        let first = deadline.hold(now + Duration::from_secs(1));
        let second = deadline.hold(now + Duration::from_secs(3));
        assert!(!expired(&mut timer));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!expired(&mut timer), "the later one still runs");
        drop(first);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(expired(&mut timer));
        drop(second);
        assert!(!expired(&mut timer), "released");
    }
}
