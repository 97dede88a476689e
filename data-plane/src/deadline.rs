//! The end of a stream (its run, by the settings its request arrived under: [`RunsUntil`]),
//! enforced on its client connection.
//!
//! A stream's relay checks its end only when hyper polls it, and hyper polls it only
//! when the client's socket can take more: a client that stops reading stops the checks, and
//! with them the stream — the client connection and the upstream one stay open for as long as
//! the client likes. So a stream's response also holds its deadline (plus [`GRACE`], so that a
//! relay that is still polled ends the stream itself with its error event) on the connection,
//! whose socket fails every read and write once it passed: hyper then closes the connection
//! and drops the stream, which closes the upstream connection and records the request.
//!
//! On HTTP/2 a connection carries several streams, and hyper stops polling one whose client
//! grants it no flow-control window while the others go on: so the connection fails at the
//! *earliest* deadline among the streams it carries. A stream whose relay is polled ends
//! before its deadline and its grace pass, and lets go of its hold; only a stream the client
//! holds still (or that could not send its end) cuts the connection, the client's others with
//! it. (The latest deadline let a client keep a stalled stream, and the upstream connection
//! and the limits it holds, for as long as it opened another stream now and then.)

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep, sleep_until};

use crate::answer_memory::AnswerPermit;

/// Past the stream's own deadline, before the connection is failed.
pub const GRACE: Duration = Duration::from_secs(1);

/// A stream's own end, put on its response by the relay's maker: when the settings of the
/// snapshot its request was served under end it. The connection holds this, not the end the
/// snapshot current when the head goes out would give: a setting lowered while the head was
/// awaited would otherwise cut the connection before the relay's end, without its error
/// event.
#[derive(Debug, Clone, Copy)]
pub struct RunsUntil(pub Instant);

/// The earliest deadline of the streams a client connection carries (HTTP/2 may carry
/// several: see the module's docs).
#[derive(Debug, Default, Clone)]
pub struct ConnectionDeadline(Arc<Shared>);

#[derive(Debug, Default)]
struct Shared {
    /// Set on every change, so the socket looks at `held` only then.
    changed: AtomicBool,
    /// The deadline each stream holds (one on HTTP/1; a few on HTTP/2).
    held: Mutex<Vec<Instant>>,
}

impl ConnectionDeadline {
    /// Holds `at` on the connection until the returned guard drops.
    pub fn hold(&self, at: Instant) -> Held {
        self.0
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(at);
        self.0.changed.store(true, Ordering::Release);
        Held(self.clone(), at)
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
                .held
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .min()
                .copied();
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

/// A stream's hold on its connection's deadline: the connection and the deadline it holds.
#[derive(Debug)]
pub struct Held(ConnectionDeadline, Instant);

impl Drop for Held {
    fn drop(&mut self) {
        let shared = &self.0.0;
        let mut held = shared.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = held.iter().position(|&at| at == self.1) {
            held.swap_remove(at);
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
    /// What the answer holds of the answers' memory (an answer of the replica's own on
    /// HTTP/2), given back with its last bytes.
    _memory: Option<AnswerPermit>,
}

/// The last frame's bytes with the deadline and the memory their answer holds.
struct HeldBytes {
    bytes: Bytes,
    _held: Option<Held>,
    _memory: Option<AnswerPermit>,
}

impl AsRef<[u8]> for HeldBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl<B> Holding<B> {
    pub fn new(body: B, held: Option<Held>, memory: Option<AnswerPermit>) -> Self {
        Self {
            body,
            _held: held,
            _memory: memory,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Holding<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if (self._held.is_none() && self._memory.is_none()) || !self.body.is_end_stream() {
            return Poll::Ready(frame);
        }
        // The last frame: hyper drops the body once it has it, before the client has taken
        // its bytes (a whole answer is one frame). The hold goes with the bytes, until they
        // are written.
        Poll::Ready(frame.map(|frame| {
            frame.map(|frame| {
                frame.map_data(|bytes| {
                    Bytes::from_owner(HeldBytes {
                        bytes,
                        _held: self._held.take(),
                        _memory: self._memory.take(),
                    })
                })
            })
        }))
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

    /// The connection fails at the earliest deadline still held: a stream let go of (its
    /// relay ended it in time) no longer counts, and one a client holds still cuts the
    /// connection at its own deadline, however many later streams it opens beside it.
    #[tokio::test(start_paused = true)]
    async fn expires_at_the_earliest_deadline_held_and_not_once_released() {
        let deadline = ConnectionDeadline::default();
        let mut timer = None;
        let expired = |timer: &mut Option<Alarm>| {
            let waker = futures::task::noop_waker();
            deadline.poll_expired(timer, &mut Context::from_waker(&waker))
        };
        assert!(!expired(&mut timer), "nothing held");
        let now = Instant::now();
        let ended_in_time = deadline.hold(now + Duration::from_secs(1));
        let stalled = deadline.hold(now + Duration::from_secs(3));
        assert!(!expired(&mut timer));
        drop(ended_in_time);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!expired(&mut timer), "the one released no longer counts");
        // A later stream beside the stalled one does not put its deadline off.
        let later = deadline.hold(now + Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(expired(&mut timer), "cut at the stalled stream's deadline");
        drop(stalled);
        assert!(!expired(&mut timer), "the later one still runs");
        drop(later);
        assert!(!expired(&mut timer), "released");
    }
}
