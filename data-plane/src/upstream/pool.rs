//! Keep-alive HTTP/1 connections to plain `http://` upstreams reached directly, kept by each
//! serving thread per backend authority: hyper's own `client::conn::http1::SendRequest`
//! handles in a thread-local list, in place of hyper-util's legacy pool for those calls.
//!
//! Why: hyper-util's pool cost about 5,500 instructions a proxied request (callgrind,
//! 2026-12-03: `Checkout::poll` 3,490, `Pooled::drop` with `PoolInner::put` 1,630, `Extra::set`
//! 410), 2,100 of them SipHash over its `(Scheme, Authority)` key (`Authority` hashes a
//! lowercased byte at a time), and it spawned a task for each HTTP/1 request to put the
//! connection back once the answer's body had been read. The data plane runs one
//! current-thread runtime per core, and a connection is only ever used by the thread whose
//! runtime drives it, so a thread can keep its connections in a plain list without locks,
//! shared state or background tasks. Measured with it: 83,690 → 73,670 instructions a
//! request (`./e2e/bench-callgrind.sh`, docs/benchmarks.md), more than the pool's own cost
//! because the task per request, its wake-ups and allocations went too.
//!
//! What it does, as hyper-util's pool did for these calls:
//! - connects with the client's [`HttpConnector`] (the same TCP settings and connect timeout)
//!   and spawns the connection's task (one per connection, none per request);
//! - writes the request in origin form (`/path?query`); the caller has set `Host`;
//! - keeps every connection it made (up to [`KEPT_PER_BACKEND`] per thread and backend) and
//!   sends a request on one only when hyper says it is ready for the next (the previous
//!   answer read to its end); a connection closed by either side is dropped from the list,
//!   and one whose last request was sent more than [`IDLE_TIMEOUT`] ago is not used again
//!   (counted from the request, not from the answer's end as hyper-util did: after an
//!   answer that took longer, such as a long stream, the connection is closed sooner);
//! - when a reused connection turns out closed before any byte of the request was written
//!   (hyper gives the request back), sends it once more on a new connection. A new
//!   connection's failure is the caller's; a kept one that fails at once, before any byte of
//!   an answer, was closed idle as it was given the request, never read ([`closed_idle`]).
//!
//! - closes what it no longer uses: a backend's list is looked through when it is called (one
//!   entry more at each call, round the list, besides the search for a ready one), and while
//!   the thread keeps any connection a task of its own looks over all of them every
//!   [`SWEEP_EVERY`] ([`sweeping`]), so an idle connection's socket is closed between
//!   [`IDLE_TIMEOUT`] and [`SWEEP_EVERY`] after that, whether or not its backend is called
//!   again (a backend deleted or moved, a quiet hour).

use std::cell::RefCell;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::{Either, ready};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::TrySendError;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service as _;

use super::BoxError;

/// A connection whose last request was sent longer ago than this is not used again, here and
/// in hyper-util's pool: under the idle timeouts of the load balancers most often in front of
/// a backend (an AWS ALB's 60 s, ingress-nginx's 75 s), so that a connection is let go before
/// the balancer closes it, not raced (see [`closed_idle`]). (It was 90 s: every request after
/// 60 to 90 s of quiet behind an ALB met the race.)
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(55);

/// Connections a thread keeps per backend; one made past this serves its request and closes.
const KEPT_PER_BACKEND: usize = 1024;

/// How often a thread that keeps connections looks over all of them and closes those spent
/// (idle past [`IDLE_TIMEOUT`], or closed), of every backend ([`sweeping`]): those of a backend
/// no longer called (deleted, moved to another address) are otherwise looked at never again,
/// and after a burst a backend called once a minute frees one a call, so a server that keeps
/// idle connections open (TGI, Ollama) would hold them, and a descriptor each, for hours.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

type Sender = SendRequest<Full<Bytes>>;

type Answer = Result<Response<Incoming>, TrySendError<Request<Full<Bytes>>>>;

thread_local! {
    /// This thread's connections, by the authority (`host:port`) of their backend's URI.
    /// The keys come from the control plane's backends, never from a client, so foldhash
    /// (one pass over the text) instead of SipHash.
    static KEPT: RefCell<foldhash::HashMap<Box<str>, Kept>> = RefCell::default();

    /// The task that looks over [`KEPT`] every [`SWEEP_EVERY`] while it holds any connection.
    static SWEEPER: RefCell<Option<tokio::task::JoinHandle<()>>> = const { RefCell::new(None) };
}

/// Starts this thread's [`sweeping`] task unless it runs (it ends when the thread keeps no
/// connection, and with its runtime). Called as a connection is kept: off the path of a
/// request on a kept one.
fn keep_sweeping() {
    SWEEPER.with_borrow_mut(|sweeper| {
        if sweeper.as_ref().is_none_or(|task| task.is_finished()) {
            *sweeper = Some(tokio::spawn(sweeping(SWEEP_EVERY, Instant::now)));
        }
    });
}

/// Every `every`, closes this thread's spent connections ([`sweep_all`], as at `now()`); ends
/// once none is kept. Spawned on a serving thread's own runtime (current-thread), so it looks
/// over that thread's [`KEPT`].
async fn sweeping(every: Duration, now: fn() -> Instant) {
    loop {
        tokio::time::sleep(every).await;
        let left = KEPT.with_borrow_mut(|kept| {
            sweep_all(kept, now());
            kept.len()
        });
        if left == 0 {
            return;
        }
    }
}

/// Whether this thread's [`sweeping`] task runs, for tests.
#[cfg(test)]
pub(super) fn sweeping_here() -> bool {
    SWEEPER.with_borrow(|sweeper| sweeper.as_ref().is_some_and(|task| !task.is_finished()))
}

/// Runs [`sweeping`] every `every` with its clock `now`, for tests.
#[cfg(test)]
pub(super) async fn sweeping_for_test(every: Duration, now: fn() -> Instant) {
    sweeping(every, now).await
}

/// This thread's kept connections to `authority`, and a look over all of them as at `now`
/// ([`sweep_all`]), for tests.
#[cfg(test)]
pub(super) fn kept_after_sweep_at(authority: &str, now: Instant) -> (usize, usize) {
    KEPT.with_borrow_mut(|kept| {
        let before = kept.get(authority).map_or(0, |k| k.connections.len());
        sweep_all(kept, now);
        (
            before,
            kept.get(authority).map_or(0, |k| k.connections.len()),
        )
    })
}

/// Closes the spent connections of every backend, and forgets backends left with none.
fn sweep_all(kept: &mut foldhash::HashMap<Box<str>, Kept>, now: Instant) {
    kept.retain(|_, backend| {
        backend
            .connections
            .retain(|connection| !connection.spent(now));
        backend.sweep = 0;
        !backend.connections.is_empty()
    });
}

/// The connections a thread keeps to one backend: those in use and those idle.
#[derive(Default)]
struct Kept {
    connections: Vec<Connection>,
    /// The entry the next call looks at for closed or expired connections.
    sweep: usize,
}

struct Connection {
    sender: Sender,
    /// When its last request was sent.
    used: Instant,
}

impl Connection {
    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.used) > IDLE_TIMEOUT
    }

    /// Closed, or idle for too long: never to be used again.
    fn spent(&self, now: Instant) -> bool {
        self.sender.is_closed() || (self.sender.is_ready() && self.expired(now))
    }
}

/// What became of a request offered to the kept connections.
// Clippy sees `F` as empty; hyper's answer future holds a request too (about 270 bytes).
#[allow(clippy::large_enum_variant)]
enum OnKept<F> {
    /// Sent on one: the answer to come.
    Sent(F),
    /// None was ready: the request, given back.
    NoneReady(Request<Full<Bytes>>),
}

impl Kept {
    /// Sends `request` on a connection that is ready for it, or gives the request back.
    fn send(
        &mut self,
        request: Request<Full<Bytes>>,
        now: Instant,
    ) -> OnKept<impl Future<Output = Answer> + use<>> {
        self.sweep_one(now);
        // The newest first: under a steady load the same few stay in use and the others
        // expire.
        let mut at = self.connections.len();
        while at > 0 {
            at -= 1;
            let connection = &mut self.connections[at];
            if connection.sender.is_ready() && !connection.expired(now) {
                connection.used = now;
                return OnKept::Sent(connection.sender.try_send_request(request));
            }
            if connection.spent(now) {
                self.connections.swap_remove(at);
            }
        }
        OnKept::NoneReady(request)
    }

    /// Drops the entry at the sweep position if it is spent, and moves the position on.
    fn sweep_one(&mut self, now: Instant) {
        if self.sweep >= self.connections.len() {
            self.sweep = 0;
        }
        if let Some(connection) = self.connections.get(self.sweep) {
            if connection.spent(now) {
                self.connections.swap_remove(self.sweep);
            } else {
                self.sweep += 1;
            }
        }
    }
}

/// Sends `request` (absolute URI, `Host` set) to its `http://` upstream over a connection of
/// this thread's, a new one when none is ready, and returns the answer once its head arrived.
///
/// A connection kept is looked for at once, before the future is made; a new one is made
/// in a future of its own, boxed, so that the future returned (part of every request's
/// future, moved with it) holds only the kept connection's answer and the URI: 400 bytes
/// instead of 1,500, which cost about 7,000 instructions a request in copies.
pub(super) fn send(
    connector: &HttpConnector,
    connect_timeout: Duration,
    mut request: Request<Full<Bytes>>,
) -> impl Future<Output = Result<Response<Incoming>, BoxError>> + Send + use<'_> {
    let uri = std::mem::take(request.uri_mut());
    *request.uri_mut() = origin_form(&uri);
    let now = Instant::now();
    let on_kept = KEPT.with_borrow_mut(|kept| match kept.get_mut(authority(&uri)) {
        Some(kept) => kept.send(request, now),
        None => OnKept::NoneReady(request),
    });
    // Combinators rather than an `async` block, which would keep a second copy of the kept
    // connection's answer (about 270 bytes) beside the one it awaits.
    match on_kept {
        OnKept::Sent(answer) => Either::Left(answer.then(move |answer| match answer {
            Ok(response) => Either::Left(ready(Ok(response))),
            // Closed before the request was written: it can go on a new connection.
            Err(mut e) => match e.take_message() {
                Some(request) => Either::Right(Box::pin(connect_and_send(
                    connector,
                    connect_timeout,
                    uri,
                    request,
                    now,
                ))),
                None => {
                    let e = e.into_error();
                    Either::Left(ready(Err(match closed_idle(&e, now.elapsed()) {
                        true => Box::new(NotSent(e.into())) as BoxError,
                        false => Box::new(e),
                    })))
                }
            },
        })),
        OnKept::NoneReady(request) => Either::Right(Box::pin(connect_and_send(
            connector,
            connect_timeout,
            uri,
            request,
            now,
        ))),
    }
}

/// How soon after a kept connection was given a request its closing before any byte of an
/// answer (hyper's incomplete message, or a reset) is taken for the server having closed it
/// idle, the request unread: the keep-alive race, which a server's idle timeout (uvicorn's
/// 5 s, nginx's 75 s) meets whenever a busy thread reuses the connection in the instant the
/// server closes it. A server that took the request and failed it later (a generation cut by
/// a load balancer) is seconds in.
const CLOSED_IDLE_WITHIN: Duration = Duration::from_millis(500);

/// Whether `e`, the failure of a request sent `after` ago, is its connection closed before the
/// server read the request (see [`CLOSED_IDLE_WITHIN`]). hyper's incomplete message means no
/// byte of an answer came (one begun is another error).
fn closed_idle(e: &hyper::Error, after: Duration) -> bool {
    after < CLOSED_IDLE_WITHIN
        && (e.is_incomplete_message()
            || std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .filter_map(|e| e.downcast_ref::<std::io::Error>())
            .any(|e| {
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                )
            }))
}

/// Sends `request` on a new connection to `uri`'s authority, kept afterwards. Connecting
/// (the name's lookup, TCP, the HTTP/1 handshake) is given `connect_timeout` in all; past it
/// the request is never sent.
async fn connect_and_send(
    connector: &HttpConnector,
    connect_timeout: Duration,
    uri: Uri,
    request: Request<Full<Bytes>>,
    now: Instant,
) -> Result<Response<Incoming>, BoxError> {
    let connecting = async {
        let io = connector.clone().call(uri.clone()).await?;
        Ok::<_, BoxError>(http1::handshake(io).await?)
    };
    let within = super::connecting_bound(connect_timeout);
    let (mut sender, connection) = tokio::time::timeout(within, connecting)
        .await
        .map_err(|_| NotSent(super::connect_timed_out(within)))?
        .map_err(NotSent)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "upstream connection failed");
        }
    });
    let answer = sender.try_send_request(request);
    KEPT.with_borrow_mut(|kept| {
        // A new connection is rare enough to pay for the key's allocation.
        let kept = kept.entry(authority(&uri).into()).or_default();
        if kept.connections.len() < KEPT_PER_BACKEND {
            kept.connections.push(Connection { sender, used: now });
        }
    });
    keep_sweeping();
    // A new connection closed at once after the request was written is not taken for one
    // never read (as a kept one is, [`closed_idle`]): a server that read the request and
    // failed at once (a crash on it, a reset) may have begun it, and there is no idle close
    // to race with.
    answer.await.map_err(|mut e| match e.take_message() {
        // Closed before the request was written.
        Some(_) => Box::new(NotSent(e.into_error().into())) as BoxError,
        None => Box::new(e.into_error()),
    })
}

/// An upstream call's error from before its request was written (the connection could not
/// be made, or closed first): the provider never saw the request.
#[derive(Debug)]
pub(super) struct NotSent(pub(super) BoxError);

impl std::fmt::Display for NotSent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for NotSent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// What a backend's connections are kept by: its URI's `host:port`.
fn authority(uri: &Uri) -> &str {
    uri.authority().map_or("", |authority| authority.as_str())
}

/// `uri`'s path and query alone, as hyper-util's client writes them for HTTP/1 (`/` when
/// there is no path).
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(path) if path.as_str() != "/" => Uri::from(path.clone()),
        _ => Uri::default(),
    }
}
