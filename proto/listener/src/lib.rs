//! The HTTP listener both servers serve on (the data plane's `/v1/…`, the control plane's
//! dashboard, JSON API and `/metrics`).
//!
//! axum's `serve` has no timer and no limit: a client sending its headers a line every few
//! seconds (or nothing at all) holds a connection and a file descriptor for as long as it
//! likes, and once the descriptors are gone new clients time out with nothing logged. Here:
//!
//! - [`Acceptor`] takes connections up to a limit; past it a connection gets a `503` and is
//!   closed, counted, and logged (at most once per 10 s). An accept that fails for the server's
//!   own reasons (out of file descriptors, `EMFILE`) is logged the same way and retried after a
//!   short pause, so the loop neither dies nor spins.
//! - [`Http`] serves a connection with hyper-util's HTTP/1.1 + h2c builder and a header read
//!   timeout: a request head not complete within it (the first one, or the next one on a
//!   kept-alive connection) closes the connection, as does a connection that has not sent a
//!   whole first request head by then in any protocol; and a write timeout
//!   ([`write_timeout`]): a connection whose client accepts none of an answer for that long
//!   is closed.
//!
//! Connections are watched for shutdown by a [`Graceful`], which looks at the shutdown signal
//! with one atomic load at each wake-up of a connection (see its docs for what that saved).
//!
//! HTTP/1's header read timeout runs on a [`HeadTimer`] of the connection's own: one tokio
//! sleep kept for the connection's life and moved to each new deadline, not a new sleep for
//! every request head (see its docs for what that saved).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use sluice_domain::logging::LogLimiter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

pub use write_timeout::DEFAULT_WRITE_TIMEOUT;
use write_timeout::WriteTimeout;

mod write_timeout;

/// The default for `--idle-timeout` (data plane) and `--http-idle-timeout` (control plane):
/// nginx's default `keepalive_timeout`, past the 60 s for which AWS's load balancers and
/// ingress-nginx keep an idle connection to a server by default. A front that keeps one longer
/// than its server does sometimes sends a request on a connection the server is closing, and
/// answers its client 502.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

/// The default for `--header-read-timeout` on both servers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the acceptor pauses after an accept failed for the server's own reasons.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one line per this interval for each kind of refusal an outsider can cause.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What a connection past the limit receives before it is closed.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 121\r\n\
\r\n\
{\"error\":{\"message\":\"too many open connections: try again shortly\",\"type\":\"server_error\",\"code\":\"too_many_connections\"}}\n";

/// One of the [`Acceptor`]'s connection slots: the connection counts against the limit until
/// this is dropped.
#[derive(Debug)]
#[must_use = "the connection only counts while its slot is held"]
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

/// Accepts TCP connections, at most `max_connections` open at once.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max_connections: usize,
    /// `sluice_connections_refused_total`.
    refused: Counter,
    refusal_log: LogLimiter,
    error_log: LogLimiter,
    /// Written to a connection refused past the limit before it is closed.
    refusal: &'static [u8],
}

impl Acceptor {
    /// `refused` counts the connections refused past the limit.
    pub fn new(listener: TcpListener, max_connections: usize, refused: Counter) -> Self {
        let max_connections = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            refused,
            refusal_log: LogLimiter::new(LOG_INTERVAL),
            error_log: LogLimiter::new(LOG_INTERVAL),
            refusal: TOO_MANY_CONNECTIONS,
        }
    }

    /// Writes `refusal` to a connection refused past the limit instead of HTTP/1's 503 (a
    /// gRPC port's HTTP/2 GOAWAY; nothing on a TLS port, where plain bytes mean nothing).
    pub fn refusing_with(mut self, refusal: &'static [u8]) -> Self {
        self.refusal = refusal;
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection within the limit. Cancel-safe: dropping the future loses nothing
    /// but a pause after an accept error.
    pub async fn accept(&self) -> (TcpStream, SocketAddr, Slot) {
        loop {
            match self.listener.accept().await {
                Ok((tcp, peer)) => match Arc::clone(&self.slots).try_acquire_owned() {
                    Ok(slot) => return (tcp, peer, Slot(slot)),
                    Err(_) => self.refuse(&tcp, peer),
                },
                // The peer's trouble (it left before we took it), not ours.
                Err(e) if is_peer_error(&e) => {}
                Err(e) => {
                    if let Some(held_back) = self.error_log.permit() {
                        tracing::error!(
                            error = %e,
                            errors_since_last_line = held_back,
                            open_connections = self.open(),
                            "accepting a connection failed (out of file descriptors?): new clients wait in the listen queue; retrying"
                        );
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }

    /// Stops listening. The connections the kernel has already completed (its accept queue)
    /// are taken first, within the limit, and returned, in blocking mode as `std` sockets for
    /// whichever runtime serves them: closing the listening socket with them queued would
    /// reset them, although their clients may have sent a request on them (a `POST` a load
    /// balancer cannot send again). Later connects are refused, which a load balancer takes
    /// to another replica. They are taken with `accept(2)` itself, not through tokio, whose
    /// readiness may not yet know of the latest.
    pub fn close(self) -> Vec<(std::net::TcpStream, SocketAddr, Slot)> {
        let mut queued = Vec::new();
        let listener = match self.listener.into_std() {
            Ok(listener) => listener,
            Err(e) => {
                tracing::debug!(error = %e, "closing the listener");
                return queued;
            }
        };
        // `into_std` leaves the socket non-blocking: `accept` ends at an empty queue.
        loop {
            match listener.accept() {
                Ok((tcp, peer)) => match Arc::clone(&self.slots).try_acquire_owned() {
                    Ok(slot) => queued.push((tcp, peer, Slot(slot))),
                    Err(_) => {
                        self.refused.inc();
                        let _ = std::io::Write::write(&mut &tcp, self.refusal);
                    }
                },
                Err(e) if is_peer_error(&e) => {}
                Err(_) => break,
            }
        }
        queued
    }

    fn open(&self) -> usize {
        self.max_connections - self.slots.available_permits()
    }

    fn refuse(&self, tcp: &TcpStream, peer: SocketAddr) {
        self.refused.inc();
        // Best effort and never waiting: a new socket's send buffer takes this at once.
        let _ = tcp.try_write(self.refusal);
        if let Some(held_back) = self.refusal_log.permit() {
            tracing::warn!(
                %peer,
                max_connections = self.max_connections,
                refused_since_last_line = held_back,
                "refused a connection: too many open connections"
            );
        }
    }
}

fn is_peer_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset, Interrupted};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset | Interrupted
    )
}

/// Once draining has started, how long a connection that has sent no request yet has to
/// send its first (see [`Http::serve`]).
pub const FIRST_REQUEST_WHEN_DRAINING: Duration = Duration::from_secs(1);

/// How long an h2 peer has to answer a keep-alive PING before its connection is closed.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The most an HTTP/1 request's head may take (its request line and headers), past which it
/// is answered `431` and the connection closed. hyper's default is its read buffer's, about
/// 408 KiB, held for each connection until the header read timeout and counted by no memory
/// bound: about 1,300 connections that send a head that large and never end it would take a
/// 512 MiB replica, without a key. 32 KiB is ten times what the SDKs send and the headers a
/// front adds, and twice what nginx takes by default (4 × 8 KiB); HTTP/2's own bound is
/// hyper's 16 KiB header list. It also bounds each read of a request's body, which
/// then comes in reads of at most 32 KiB.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Serves connections: HTTP/1.1 and h2c (prior knowledge), with a header read timeout and a
/// write timeout.
#[derive(Clone, Debug)]
pub struct Http {
    builder: auto::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    write_timeout: Duration,
    /// Connections closed by the write timeout.
    write_timeouts: Counter,
}

impl Http {
    /// `write_timeouts` counts the connections closed because their client accepted none of
    /// an answer for `write_timeout`. A kept-alive HTTP/1 connection may wait `idle_timeout`
    /// for the first byte of its next request, then `header_read_timeout` for the rest of its
    /// head ([`HeadTimer`]).
    pub fn new(
        header_read_timeout: Duration,
        idle_timeout: Duration,
        write_timeout: Duration,
        write_timeouts: Counter,
    ) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .max_buf_size(MAX_HEAD_BYTES);
        // An h2 connection has no head to time: once its first request has come, nothing
        // closed it, and a client could hold it (and a connection slot) by staying silent.
        // Pinged after that long without a frame, a peer that does not answer within
        // `H2_PING_TIMEOUT` is gone, and its connection closed.
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(header_read_timeout)
            .keep_alive_timeout(H2_PING_TIMEOUT);
        Self {
            builder,
            header_read_timeout,
            idle_timeout,
            write_timeout,
            write_timeouts,
        }
    }

    /// Serves no request over h2c, for a listener no client needs it on (browsers, Prometheus
    /// and fronts all speak HTTP/1.1 to it): an h2 client may keep 200 answers per connection
    /// in hyper's buffer by granting their streams no window, which no write timeout sees (the
    /// socket never fills), and a listener without per-answer deadlines would hold them for
    /// good. An h2 connection is still accepted (hyper-util's builder cannot refuse the
    /// protocol on a connection that may upgrade), but it may open no stream: each is refused
    /// (`REFUSED_STREAM`) before any service runs, so no answer is ever made or held.
    pub fn http1_only(mut self) -> Self {
        self.builder.http2().max_concurrent_streams(0);
        self
    }

    /// Serves one connection until it closes, watched by `graceful`: when shutdown starts it
    /// ends after the request in flight or at once between requests, and a connection that
    /// has sent no request yet ends after its first, or when none has come within
    /// [`FIRST_REQUEST_WHEN_DRAINING`]. The connection is closed when it has not sent a whole
    /// request head within the header read timeout, then whenever HTTP/1 waits longer than
    /// that for the next one, and when a write waits longer than the write timeout for the
    /// client to accept any of it.
    pub fn serve<I, S, B>(
        &self,
        io: I,
        service: S,
        graceful: &Graceful,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Arc::new(AtomicBool::new(false));
        let service = Started {
            inner: service,
            started: Arc::clone(&started),
        };
        let reads = Arc::new(AtomicU64::new(0));
        let mut builder = self.builder.clone();
        builder.http1().timer(HeadTimer {
            sleep: Arc::default(),
            reads: Arc::clone(&reads),
            head: self.header_read_timeout,
            idle: self.idle_timeout,
        });
        let connection = builder
            .serve_connection_with_upgrades(
                TokioIo::new(WriteTimeout::new(
                    io,
                    self.write_timeout,
                    self.write_timeouts.clone(),
                    reads,
                )),
                service,
            )
            .into_owned();
        let mut shutdown = graceful.tx.subscribe();
        let shutdown_seen = shutdown.clone();
        let first_head = self.header_read_timeout;
        async move {
            let mut connection = std::pin::pin!(connection);
            // Registered with the shutdown signal by polling this, which takes the signal's
            // lock: only again when the connection's waker is another than the one it holds.
            let mut on_shutdown = std::pin::pin!(shutdown.changed());
            let mut registered: Option<Waker> = None;
            let mut draining = false;
            // HTTP/1's own timer starts once the protocol is known; this one covers the
            // bytes before it (a client that sends nothing, or half an h2 preface). It is
            // dropped once a request has arrived: polled with the connection at each of its
            // wake-ups until it ran out, it cost about 600 instructions a request.
            let mut first_head = std::pin::pin!(Some(tokio::time::sleep(first_head)));
            // Whether hyper was told to end the connection (see below).
            let mut ending = false;
            let served = std::future::poll_fn(|cx| {
                if !draining {
                    // A dropped `Graceful` counts as a shutdown, as a change does.
                    draining = shutdown_seen.has_changed().unwrap_or(true);
                    if !draining && !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        draining = on_shutdown.as_mut().poll(cx).is_ready();
                        registered = Some(cx.waker().clone());
                    }
                    if draining && let Some(sleep) = first_head.as_mut().as_pin_mut() {
                        let soon = tokio::time::Instant::now() + FIRST_REQUEST_WHEN_DRAINING;
                        if sleep.deadline() > soon {
                            sleep.reset(soon);
                        }
                    }
                }
                if let Poll::Ready(served) = connection.as_mut().poll(cx) {
                    return Poll::Ready(Some(served));
                }
                // hyper ends an HTTP/1 connection between requests at once, unread: a
                // connection that has served no request yet was opened to send one (a load
                // balancer's, just as the stop began), so it is told only once its first
                // request arrived, or closed by the first head's timer, shortened above. And
                // only after the poll above, in which hyper read what the socket held: a
                // request already there is answered, then the connection closes.
                if draining && !ending && started.load(Ordering::Relaxed) {
                    ending = true;
                    connection.as_mut().graceful_shutdown();
                    if let Poll::Ready(served) = connection.as_mut().poll(cx) {
                        return Poll::Ready(Some(served));
                    }
                }
                if started.load(Ordering::Relaxed) {
                    first_head.set(None);
                } else if let Some(sleep) = first_head.as_mut().as_pin_mut()
                    && sleep.poll(cx).is_ready()
                {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            let Some(served) = served else {
                tracing::debug!("closed a connection that sent no request head in time");
                return;
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
    }
}

/// Ends the connections [`Http::serve`] serves between requests once [`Graceful::shutdown`]
/// is called (or it is dropped), and waits for them to close. What hyper-util's
/// `GracefulShutdown` does, with the same `watch` channel, but cheaper on the way: that one
/// polled the channel's `changed()` at every wake-up of a connection (three a request), each
/// time taking the lock of the channel's waiter list, about 400 instructions a request. Here a
/// connection registers its waker once (again only if it changes) and otherwise looks at the
/// channel's version with one atomic load.
#[derive(Debug)]
pub struct Graceful {
    tx: watch::Sender<()>,
}

impl Default for Graceful {
    fn default() -> Self {
        Self::new()
    }
}

impl Graceful {
    pub fn new() -> Self {
        Self {
            tx: watch::channel(()).0,
        }
    }

    /// Starts the shutdown of every connection watched, and waits until all have closed.
    pub async fn shutdown(self) {
        let Self { tx } = self;
        let _ = tx.send(());
        tx.closed().await;
    }
}

/// hyper's timer for one HTTP/1 connection, which hyper uses only for the header read
/// timeout: each wait for a request head gets a [`HeadSleep`] for its deadline, and every one
/// of them is served by the one tokio sleep the connection keeps, moved to that deadline when
/// it runs out before it ([`poll_until`]).
///
/// hyper times a kept-alive connection's wait for its next head from the end of the last
/// answer, so its header read timeout is also how long an idle connection is kept, and a
/// front (a load balancer) that keeps idle connections longer than that sometimes sends a
/// request on one the server is just closing: its client gets a 502. So the wait runs out only
/// when no byte has come for `idle` (the idle timeout), or when a head that has begun is not
/// whole `head` to twice `head` after its first byte (the header read timeout, checked at
/// each `head`: the connection's reads are counted, not timed, which costs a load and a store
/// a read rather than a clock read).
///
/// hyper-util's `TokioTimer` gave each wait a new tokio sleep in a box of its own: inserted
/// into the time driver's wheel when the wait began, removed when the head came. Inserting a
/// timer due sooner than the driver's next wake-up makes tokio wake the driver (an `eventfd`
/// write, then a turn of the scheduler loop with nothing to run), and the head's 30 s came
/// before the first-byte timeout of the call each request had just made, so that happened at
/// every request. A sleep kept and moved later is not touched in the wheel: tokio only notes
/// its new deadline, and reinserts it when the old one passes.
#[derive(Clone)]
struct HeadTimer {
    /// Made at the first wait (inside the runtime), dropped with the connection.
    sleep: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
    /// The connection's reads that brought bytes ([`WriteTimeout`] counts them).
    reads: Arc<AtomicU64>,
    head: Duration,
    idle: Duration,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = tokio::time::Instant::from(deadline);
        let began = deadline.checked_sub(self.head).unwrap_or(deadline);
        let idle_until = began + self.idle;
        Box::pin(HeadSleep {
            deadline: deadline.min(idle_until),
            idle_until,
            head: self.head,
            reads: Arc::clone(&self.reads),
            seen: self.reads.load(Ordering::Relaxed),
            begun: false,
            sleep: Arc::clone(&self.sleep),
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(sleep) => sleep.get_mut().deadline = new_deadline.into(),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into()
    }
}

/// One wait of a [`HeadTimer`]: ready once no byte has come for its idle timeout, or once a
/// head that has begun is not whole in time. hyper holds at most one at a time for a
/// connection (it drops the last before it asks for the next).
struct HeadSleep {
    /// When the wait is next looked at: `head` after it began, then each `head` after.
    deadline: tokio::time::Instant,
    /// When a wait in which no byte has come ends.
    idle_until: tokio::time::Instant,
    head: Duration,
    reads: Arc<AtomicU64>,
    /// The connection's reads at the last look.
    seen: u64,
    /// Bytes of a head have come: at the next look the wait ends.
    begun: bool,
    sleep: Arc<Mutex<Option<Pin<Box<tokio::time::Sleep>>>>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut kept = this.sleep.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let deadline = this.deadline;
            let sleep = kept.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() > deadline {
                sleep.as_mut().reset(deadline);
            }
            std::task::ready!(poll_until(sleep, deadline, cx));
            let reads = this.reads.load(Ordering::Relaxed);
            if this.begun {
                return Poll::Ready(());
            }
            if reads != this.seen {
                // A head began since the last look: it has `head` more.
                this.seen = reads;
                this.begun = true;
                this.deadline = deadline + this.head;
            } else if deadline < this.idle_until {
                this.deadline = (deadline + this.head).min(this.idle_until);
            } else {
                return Poll::Ready(());
            }
        }
    }
}

/// Ready once `until` has passed, on a sleep kept for waits one after another and set no
/// later than `until`. A sleep set earlier is left as it is until it runs out, then moved to
/// `until`: moving it at every wait cost about 140 instructions (`Sleep::reset`), letting it
/// run out costs a wake-up with nothing to do once per deadline's length.
pub fn poll_until(
    sleep: &mut Pin<Box<tokio::time::Sleep>>,
    until: tokio::time::Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        std::task::ready!(sleep.as_mut().poll(cx));
        if sleep.deadline() >= until {
            return Poll::Ready(());
        }
        sleep.as_mut().reset(until);
    }
}

impl hyper::rt::Sleep for HeadSleep {}

/// A service that notes that a request arrived.
struct Started<S> {
    inner: S,
    started: Arc<AtomicBool>,
}

impl<S, R> Service<R> for Started<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: R) -> Self::Future {
        self.started.store(true, Ordering::Relaxed);
        self.inner.call(request)
    }
}

/// Raises this process's soft limit on open files to its hard limit, and returns the limit
/// then in force. Container runtimes (containerd 2, Docker) and systemd start a process with a
/// soft limit of 1,024 and a much higher hard one: each client connection, each upstream
/// connection of a request in flight and each spool file takes a descriptor, so a data plane
/// with a few hundred requests in flight would run out far below what it may have.
#[cfg(unix)]
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    const FIRST_HEAD: Duration = Duration::from_millis(300);
    const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

    /// Serves one in-memory connection whose answers take `answer_after`; returns the
    /// client's end, the server's task, and the shutdown watching it (dropping it starts
    /// the shutdown).
    fn serve(
        answer_after: Duration,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<()>,
        Graceful,
    ) {
        let (client, served, graceful, _) = serve_answer(answer_after, "ok".into());
        (client, served, graceful)
    }

    /// [`serve`] answering `answer`, with the counter of write timeouts.
    fn serve_answer(
        answer_after: Duration,
        answer: String,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<()>,
        Graceful,
        Counter,
    ) {
        serve_idle(answer_after, answer, FIRST_HEAD)
    }

    /// [`serve_answer`] with an idle timeout of `idle` (the others' is the head's).
    fn serve_idle(
        answer_after: Duration,
        answer: String,
        idle: Duration,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<()>,
        Graceful,
        Counter,
    ) {
        let (client, server) = tokio::io::duplex(4096);
        let service = service_fn(move |_: Request<Incoming>| {
            let answer = answer.clone();
            async move {
                tokio::time::sleep(answer_after).await;
                Ok::<_, std::convert::Infallible>(Response::new(answer))
            }
        });
        let graceful = Graceful::new();
        let write_timeouts = Counter::default();
        let served = Http::new(FIRST_HEAD, idle, WRITE_TIMEOUT, write_timeouts.clone())
            .serve(server, service, &graceful);
        (client, tokio::spawn(served), graceful, write_timeouts)
    }

    /// A client that asks for an answer far larger than the socket takes and then reads
    /// none of it: hyper holds the whole answer and waits for the socket with no deadline
    /// of its own, so without the write timeout the connection stays open for good.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_none_of_its_answer_is_closed_at_the_write_timeout() {
        let (mut client, served, _graceful, write_timeouts) =
            serve_answer(Duration::ZERO, "x".repeat(1 << 20));
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(WRITE_TIMEOUT * 4, served)
            .await
            .expect("closed once the client accepted nothing for the write timeout")
            .unwrap();
        assert!(started.elapsed() >= WRITE_TIMEOUT, "closed early");
        assert_eq!(write_timeouts.get(), 1);
        // What the client gets is a cut answer: the socket's 4 KiB and then the end.
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        assert!(received.len() < 1 << 20, "{} bytes", received.len());
    }

    /// A client reading a little every half write timeout, for many times the timeout, gets
    /// its whole answer: only a client that accepts nothing for the timeout is cut.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_gets_its_whole_answer() {
        let answer = "x".repeat(64 << 10);
        let (mut client, served, _graceful, write_timeouts) =
            serve_answer(Duration::ZERO, answer.clone());
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut received = Vec::new();
        let mut buf = [0; 2048];
        let started = tokio::time::Instant::now();
        while !received.ends_with(answer.as_bytes()) {
            tokio::time::sleep(WRITE_TIMEOUT / 2).await;
            let read = client.read(&mut buf).await.unwrap();
            assert_ne!(read, 0, "cut after {} bytes", received.len());
            received.extend_from_slice(&buf[..read]);
        }
        assert!(started.elapsed() > WRITE_TIMEOUT * 10);
        assert_eq!(write_timeouts.get(), 0);
        drop(client);
        served.await.unwrap();
    }

    /// A head past [`MAX_HEAD_BYTES`] is answered 431 and its connection closed at once, not
    /// held (with the buffer it filled) until the header read timeout; one just below is
    /// served.
    #[tokio::test(start_paused = true)]
    async fn a_head_past_its_bound_is_refused_at_once_and_one_below_is_served() {
        let filler = |bytes: usize| format!("x-filler: {}\r\n", "a".repeat(bytes));
        let (mut client, served, _graceful) = serve(Duration::ZERO);
        let head = format!("GET / HTTP/1.1\r\nhost: x\r\n{}\r\n", filler(30 << 10));
        client.write_all(head.as_bytes()).await.unwrap();
        let mut answer = [0; 64];
        let read = client.read(&mut answer).await.unwrap();
        assert!(
            answer[..read].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            &answer[..read]
        );
        drop(client);
        served.await.unwrap();

        let (mut client, served, _graceful) = serve(Duration::ZERO);
        // A head that never ends: only its size can stop it before the timeout.
        let head = format!("GET / HTTP/1.1\r\nhost: x\r\n{}", filler(MAX_HEAD_BYTES));
        let started = tokio::time::Instant::now();
        // The server may stop reading once it has refused: the rest of the head may not go.
        let _ = client.write_all(head.as_bytes()).await;
        let mut received = Vec::new();
        let _ = client.read_to_end(&mut received).await;
        assert!(
            received.starts_with(b"HTTP/1.1 431"),
            "{:?}",
            String::from_utf8_lossy(&received)
        );
        served.await.unwrap();
        assert!(
            started.elapsed() < FIRST_HEAD,
            "held until the header read timeout"
        );
    }

    // Paused time: the timers run out as soon as nothing else can run, no sleeping.
    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_closed_at_the_header_read_timeout() {
        let (_client, served, _graceful) = serve(Duration::ZERO);
        tokio::time::timeout(FIRST_HEAD * 4, served)
            .await
            .expect("closed in time")
            .unwrap();
    }

    /// An h2c client that asks once, then neither sends nor reads anything (not even the
    /// server's PINGs): its connection is closed once a PING goes unanswered.
    #[tokio::test(start_paused = true)]
    async fn a_silent_h2_client_after_its_request_is_closed_when_it_answers_no_ping() {
        let (mut client, served, _graceful) = serve(Duration::ZERO);
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS, empty.
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        // HEADERS on stream 1, END_STREAM | END_HEADERS: :method GET, :scheme http, :path /
        // (HPACK's static table, indexed).
        hello.extend_from_slice(&[0, 0, 3, 1, 0x05, 0, 0, 0, 1, 0x82, 0x86, 0x84]);
        client.write_all(&hello).await.unwrap();
        // Answered: the server's frames arrive (its SETTINGS and the response).
        let mut frames = [0; 1024];
        let read = client.read(&mut frames).await.unwrap();
        assert!(read > 0);
        // Then the client falls silent and reads nothing more.
        tokio::time::timeout(FIRST_HEAD * 2 + H2_PING_TIMEOUT * 2, served)
            .await
            .expect("closed once its PING went unanswered")
            .unwrap();
    }

    /// A listener made HTTP/1.1 only answers no h2 request (the same request is answered by a
    /// listener built for both, above), and still serves HTTP/1.1.
    #[tokio::test(start_paused = true)]
    async fn an_http1_only_listener_refuses_h2() {
        let (mut client, server) = tokio::io::duplex(4096);
        let service = service_fn(|_: Request<Incoming>| async {
            Ok::<_, std::convert::Infallible>(Response::new("ok".to_owned()))
        });
        let graceful = Graceful::new();
        let served = tokio::spawn(
            Http::new(FIRST_HEAD, FIRST_HEAD, WRITE_TIMEOUT, Counter::default())
                .http1_only()
                .serve(server, service, &graceful),
        );
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        hello.extend_from_slice(&[0, 0, 3, 1, 0x05, 0, 0, 0, 1, 0x82, 0x86, 0x84]);
        client.write_all(&hello).await.unwrap();
        // Whatever comes back (the server's SETTINGS, the stream refused) holds no answer.
        let mut frames = Vec::new();
        let mut buf = [0; 1024];
        while let Ok(Ok(read @ 1..)) = tokio::time::timeout(FIRST_HEAD, client.read(&mut buf)).await
        {
            frames.extend_from_slice(&buf[..read]);
        }
        assert!(!frames.is_empty());
        assert!(
            !frames.windows(2).any(|w| w == b"ok"),
            "answered over h2: {frames:?}"
        );
        drop(client);
        tokio::time::timeout(FIRST_HEAD * 4, served)
            .await
            .expect("served")
            .unwrap();
        // HTTP/1.1 is served.
        let (mut client, server) = tokio::io::duplex(4096);
        let service = service_fn(|_: Request<Incoming>| async {
            Ok::<_, std::convert::Infallible>(Response::new("ok".to_owned()))
        });
        let _served = tokio::spawn(
            Http::new(FIRST_HEAD, FIRST_HEAD, WRITE_TIMEOUT, Counter::default())
                .http1_only()
                .serve(server, service, &graceful),
        );
        assert!(ask(&mut client).await.ends_with("ok"));
    }

    // Paused time: the timers run out as soon as nothing else can run, no sleeping.
    #[tokio::test(start_paused = true)]
    async fn an_answer_slower_than_the_header_read_timeout_still_arrives() {
        let (mut client, served, _graceful) = serve(FIRST_HEAD * 3);
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = vec![0; 1024];
        let read = tokio::time::timeout(FIRST_HEAD * 10, client.read(&mut answer))
            .await
            .expect("answered")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
        drop(client);
        served.await.unwrap();
    }

    /// Sends a request on a kept-alive connection and reads its whole answer.
    async fn ask(client: &mut tokio::io::DuplexStream) -> String {
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0; 1024];
        while !answer.ends_with(b"\r\n\r\nok") {
            let read = client.read(&mut buf).await.unwrap();
            assert_ne!(read, 0, "closed before the answer");
            answer.extend_from_slice(&buf[..read]);
        }
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Reads the rest of the connection: one whole answer, then the server's close.
    async fn answered_then_closed(client: &mut tokio::io::DuplexStream) {
        let mut answer = Vec::new();
        tokio::time::timeout(FIRST_HEAD * 4, client.read_to_end(&mut answer))
            .await
            .expect("closed in time")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    }

    // Paused time. The connection's one kept sleep is moved to each wait's deadline: waits
    // shorter than the timeout, one after another for many times its length, close nothing,
    // and the first longer one closes the connection.
    #[tokio::test(start_paused = true)]
    async fn each_wait_for_a_head_has_its_own_deadline_on_the_kept_sleep() {
        let (mut client, served, _graceful) = serve(Duration::ZERO);
        for _ in 0..10 {
            assert!(ask(&mut client).await.starts_with("HTTP/1.1 200 OK\r\n"));
            tokio::time::sleep(FIRST_HEAD * 2 / 3).await;
        }
        assert!(!served.is_finished());
        let waited = tokio::time::Instant::now();
        tokio::time::timeout(FIRST_HEAD * 4, served)
            .await
            .expect("closed in time")
            .unwrap();
        let waited = waited.elapsed() + FIRST_HEAD * 2 / 3;
        assert!(
            waited >= FIRST_HEAD && waited < FIRST_HEAD * 2,
            "closed {waited:?} after the last answer"
        );
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    }

    /// With an idle timeout longer than the header read timeout (a load balancer in front that
    /// keeps idle connections a minute), a kept-alive connection silent for several header
    /// timeouts is still open and answers its next request; silent for the idle timeout it is
    /// closed.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_kept_for_the_idle_timeout_not_the_header_timeout() {
        let idle = FIRST_HEAD * 10;
        let (mut client, served, _graceful, _) = serve_idle(Duration::ZERO, "ok".into(), idle);
        assert!(ask(&mut client).await.starts_with("HTTP/1.1 200 OK\r\n"));
        tokio::time::sleep(FIRST_HEAD * 5).await;
        assert!(!served.is_finished(), "closed before its idle timeout");
        assert!(ask(&mut client).await.starts_with("HTTP/1.1 200 OK\r\n"));
        let waited = tokio::time::Instant::now();
        tokio::time::timeout(idle * 2, served)
            .await
            .expect("closed at the idle timeout")
            .unwrap();
        let waited = waited.elapsed();
        assert!(
            waited >= idle && waited <= idle + FIRST_HEAD,
            "closed after {waited:?}"
        );
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    }

    /// A long idle timeout does not lengthen the header read timeout: a head begun after a
    /// while idle and then left unfinished is closed one to two header timeouts after its first
    /// byte, not at the idle timeout.
    #[tokio::test(start_paused = true)]
    async fn a_head_begun_after_idling_still_has_only_the_header_timeout() {
        let idle = FIRST_HEAD * 10;
        let (mut client, served, _graceful, _) = serve_idle(Duration::ZERO, "ok".into(), idle);
        assert!(ask(&mut client).await.starts_with("HTTP/1.1 200 OK\r\n"));
        tokio::time::sleep(FIRST_HEAD * 3 + FIRST_HEAD / 2).await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let first_byte = tokio::time::Instant::now();
        tokio::time::timeout(idle, served)
            .await
            .expect("closed at the header timeout")
            .unwrap();
        let waited = first_byte.elapsed();
        assert!(
            waited >= FIRST_HEAD && waited <= FIRST_HEAD * 2,
            "closed {waited:?} after the head's first byte"
        );
    }

    // Paused time. A shutdown started while a request is being answered lets the answer go
    // out, then closes the connection, and returns once it has closed.
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_lets_the_answer_in_progress_out_then_closes_the_connection() {
        let (mut client, served, graceful) = serve(FIRST_HEAD / 2);
        assert!(ask(&mut client).await.starts_with("HTTP/1.1 200 OK\r\n"));
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(FIRST_HEAD / 10).await;
        let shutdown = tokio::spawn(graceful.shutdown());
        tokio::time::sleep(FIRST_HEAD / 10).await;
        assert!(!shutdown.is_finished(), "the answer is still on its way");
        answered_then_closed(&mut client).await;
        tokio::time::timeout(FIRST_HEAD, shutdown)
            .await
            .expect("the shutdown returns once the connection closed")
            .unwrap();
        served.await.unwrap();
    }

    // Paused time. An idle kept-alive connection is closed at once by a shutdown.
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_closes_an_idle_connection_at_once() {
        let (mut client, served, graceful) = serve(Duration::ZERO);
        assert!(ask(&mut client).await.starts_with("HTTP/1.1 200 OK\r\n"));
        tokio::time::timeout(FIRST_HEAD / 10, graceful.shutdown())
            .await
            .expect("closed at once");
        served.await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    }

    // Paused time. A request already sent on an idle kept-alive connection when a shutdown
    // starts is answered, then the connection closes: closed unread, its client (nginx with
    // a POST) could only answer 502.
    #[tokio::test(start_paused = true)]
    async fn a_request_already_sent_when_a_shutdown_starts_is_answered() {
        let (mut client, served, graceful) = serve(FIRST_HEAD / 10);
        assert!(ask(&mut client).await.starts_with("HTTP/1.1 200 OK\r\n"));
        tokio::time::sleep(FIRST_HEAD / 10).await;
        // In the socket before the server's task runs again, which by then sees the
        // shutdown too.
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let _ = graceful.tx.send(());
        let shutdown = tokio::spawn(graceful.shutdown());
        answered_then_closed(&mut client).await;
        shutdown.await.unwrap();
        served.await.unwrap();
    }

    // Paused time. A connection that has sent no request when a shutdown starts was opened
    // to send one: its first request is answered, then it closes.
    #[tokio::test(start_paused = true)]
    async fn a_new_connection_is_answered_once_after_a_shutdown_starts() {
        let (mut client, served, graceful) = serve(Duration::ZERO);
        let shutdown = tokio::spawn(graceful.shutdown());
        tokio::time::sleep(FIRST_HEAD / 10).await;
        assert!(!served.is_finished(), "closed before its first request");
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        answered_then_closed(&mut client).await;
        shutdown.await.unwrap();
        served.await.unwrap();
    }

    // Paused time. A new connection that sends nothing holds a shutdown for
    // FIRST_REQUEST_WHEN_DRAINING, not for the whole header read timeout.
    #[tokio::test(start_paused = true)]
    async fn a_new_connection_that_sends_nothing_holds_a_shutdown_briefly() {
        let long_head = FIRST_REQUEST_WHEN_DRAINING * 30;
        let (_client, server) = tokio::io::duplex(4096);
        let service = service_fn(|_: Request<Incoming>| async {
            Ok::<_, std::convert::Infallible>(Response::new("ok".to_owned()))
        });
        let graceful = Graceful::new();
        let served = tokio::spawn(
            Http::new(long_head, long_head, WRITE_TIMEOUT, Counter::default())
                .serve(server, service, &graceful),
        );
        tokio::time::sleep(FIRST_REQUEST_WHEN_DRAINING).await;
        let started = tokio::time::Instant::now();
        tokio::time::timeout(long_head / 2, graceful.shutdown())
            .await
            .expect("the silent connection closed");
        let waited = started.elapsed();
        assert!(
            waited >= FIRST_REQUEST_WHEN_DRAINING && waited < FIRST_REQUEST_WHEN_DRAINING * 2,
            "held the shutdown {waited:?}"
        );
        served.await.unwrap();
    }

    #[test]
    fn the_refusal_is_a_whole_http_response() {
        let text = std::str::from_utf8(TOO_MANY_CONNECTIONS).unwrap_or_default();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(
            head.ends_with(&format!("\r\ncontent-length: {}", body.len())),
            "{head}"
        );
    }
}
