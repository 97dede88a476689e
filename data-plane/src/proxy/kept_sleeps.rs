//! The upstream call's timeouts (the first byte's, a whole body's pauses) on tokio sleeps the
//! serving thread keeps from one request to the next, instead of a new sleep each time.
//!
//! `tokio::time::timeout_at` makes a new timer for each call it waits on: inserted into the
//! time driver's wheel at its first wait, removed when the call ends first (as nearly every
//! call does), about 700 instructions a request for the first-byte timeout. A sleep moved to a
//! later deadline than the one it was inserted for is not touched in the wheel (tokio only
//! notes the new deadline, and reinserts the timer when the old one passes), and each
//! request's deadlines are later than the last one's on the same thread. So the sleeps stay
//! with the thread's [`KeptSleeps`], and [`within`] takes one only when the call has to be
//! waited for: a body already read needs no timer, and no clock reading for its deadline. A
//! kept sleep set to an earlier deadline than the wait's is not even moved until it runs out
//! ([`sluice_listener::poll_until`]).
//!
//! A kept sleep still holds the waker of the last task that waited on it, until it is used
//! again or its deadline passes (then that task gets a wake-up with nothing to do); with
//! at most [`KEPT`] sleeps a thread, that bounds what finished tasks it can keep allocated.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::task::Poll;

use sluice_listener::poll_until;
use tokio::time::{Instant, Sleep};

/// At most this many sleeps kept by a thread; more waits at once get new ones.
const KEPT: usize = 64;

/// One serving thread's spare sleeps (in its [`super::AppState`], which belongs to one
/// thread and its runtime: a sleep belongs to the runtime that made it).
#[derive(Default)]
pub struct KeptSleeps(Mutex<Vec<Pin<Box<Sleep>>>>);

/// The call's deadline passed first.
#[derive(Debug)]
pub(super) struct Elapsed;

/// `call`, or [`Elapsed`] once the deadline passes first: `tokio::time::timeout_at` on a kept
/// sleep. The deadline is asked for only if `call` is not ready at once, and the call is
/// polled first, as `timeout_at` does.
pub(super) async fn within<F: Future>(
    sleeps: &KeptSleeps,
    deadline: impl FnOnce() -> Instant,
    call: F,
) -> Result<F::Output, Elapsed> {
    let mut call = std::pin::pin!(call);
    let mut deadline = Some(deadline);
    let mut waiting: Option<(Instant, Kept<'_>)> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = call.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if waiting.is_none()
            && let Some(deadline) = deadline.take()
        {
            waiting = Some((deadline(), Kept(sleeps, None)));
        }
        let Some((until, kept)) = &mut waiting else {
            return Poll::Pending;
        };
        match poll_until(kept.take(*until), *until, cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// A sleep taken from a [`KeptSleeps`], given back when dropped.
struct Kept<'a>(&'a KeptSleeps, Option<Pin<Box<Sleep>>>);

impl Kept<'_> {
    /// The sleep, taken from the spares at the first call, set no later than `until`.
    fn take(&mut self, until: Instant) -> &mut Pin<Box<Sleep>> {
        let sleep = self.1.get_or_insert_with(|| {
            let spare = self
                .0
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            spare.unwrap_or_else(|| Box::pin(tokio::time::sleep_until(until)))
        });
        if sleep.deadline() > until {
            sleep.as_mut().reset(until);
        }
        sleep
    }
}

impl Drop for Kept<'_> {
    fn drop(&mut self) {
        if let Some(sleep) = self.1.take() {
            let mut spare = self.0.0.lock().unwrap_or_else(PoisonError::into_inner);
            if spare.len() < KEPT {
                spare.push(sleep);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::time::Duration;

    // Paused time: the clock moves only to the next timer.
    #[tokio::test(start_paused = true)]
    async fn a_call_slower_than_its_deadline_times_out_and_a_faster_one_does_not() {
        let sleeps = KeptSleeps::default();
        let second = Duration::from_secs(1);
        for _ in 0..3 {
            let started = Instant::now();
            let slow = within(
                &sleeps,
                || Instant::now() + second,
                tokio::time::sleep(second * 2),
            );
            assert!(slow.await.is_err());
            assert_eq!(started.elapsed(), second);
            let fast = within(&sleeps, || Instant::now() + second * 2, async {
                tokio::time::sleep(second).await;
                7
            });
            assert_eq!(fast.await.unwrap(), 7);
            assert_eq!(started.elapsed(), second * 2);
        }
        assert_eq!(
            sleeps.0.lock().unwrap().len(),
            1,
            "one sleep, kept and used again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_than_the_kept_sleeps_last_one_still_holds() {
        let sleeps = KeptSleeps::default();
        let second = Duration::from_secs(1);
        let long = within(
            &sleeps,
            || Instant::now() + second * 10,
            tokio::time::sleep(second),
        );
        assert!(long.await.is_ok());
        let started = Instant::now();
        let short = within(
            &sleeps,
            || Instant::now() + second,
            std::future::pending::<()>(),
        );
        assert!(short.await.is_err());
        assert_eq!(started.elapsed(), second);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_ready_at_once_asks_for_no_deadline_and_takes_no_sleep() {
        let sleeps = KeptSleeps::default();
        let ready = within(&sleeps, || unreachable!("no deadline needed"), async { 3 });
        assert_eq!(ready.await.unwrap(), 3);
        assert!(sleeps.0.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn waits_at_once_get_sleeps_of_their_own() {
        let sleeps = KeptSleeps::default();
        let second = Duration::from_secs(1);
        let started = Instant::now();
        let (a, b) = tokio::join!(
            within(
                &sleeps,
                || Instant::now() + second,
                std::future::pending::<()>()
            ),
            within(
                &sleeps,
                || Instant::now() + second * 2,
                std::future::pending::<()>()
            ),
        );
        assert!(a.is_err() && b.is_err());
        assert_eq!(started.elapsed(), second * 2);
        assert_eq!(sleeps.0.lock().unwrap().len(), 2);
    }
}
