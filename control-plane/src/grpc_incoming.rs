//! The gRPC port's connections. Taken by the listener crate's [`Acceptor`], as the HTTP
//! listeners' are: at most `--grpc-max-connections` open at once (past it a new one gets a
//! refusal and is closed, counted in `sluice_grpc_connections_refused_total`), and a pause
//! instead of a spinning accept loop when the process is out of file descriptors. And each
//! must send its first request with a token (the admin's or the data planes') within
//! `--grpc-first-request-timeout` (which bounds TLS's handshake too, where the port has TLS):
//! anyone who reaches the port could otherwise hold connections for ever, each a task, a
//! descriptor and a slot of the limit, without sending a byte, or half of HTTP/2's preface,
//! or after a TLS handshake nothing (hyper waits for the preface with no timer), or requests
//! without a token (health checks and reflection need none). Clients with a token connect when
//! they have a request to send (tonic's channels, `sluicectl`), so the bound costs them
//! nothing; a client without one (a probe) is closed after the timeout, its requests answered
//! meanwhile.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use sluice_listener::{Acceptor, Slot};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

const REFUSAL_REASON: &[u8] =
    b"too many open connections to the gRPC port (--grpc-max-connections)";

/// What a connection refused past the limit is sent on a plaintext port before it is
/// closed: the server's half of HTTP/2's preface (an empty SETTINGS frame), then a GOAWAY
/// (`ENHANCE_YOUR_CALM`) carrying the reason as its debug data.
pub const REFUSAL: [u8; 9 + 9 + 8 + REFUSAL_REASON.len()] = refusal();

const fn refusal() -> [u8; 9 + 9 + 8 + REFUSAL_REASON.len()] {
    let mut frames = [0; 9 + 9 + 8 + REFUSAL_REASON.len()];
    // SETTINGS: length 0, type 4, no flags, stream 0.
    frames[3] = 4;
    // GOAWAY: length, type 7, no flags, stream 0; last stream 0, error code 0xb.
    let length = 8 + REFUSAL_REASON.len();
    frames[9] = (length >> 16) as u8;
    frames[10] = (length >> 8) as u8;
    frames[11] = length as u8;
    frames[12] = 7;
    frames[9 + 9 + 7] = 0xb;
    let mut i = 0;
    while i < REFUSAL_REASON.len() {
        frames[9 + 9 + 8 + i] = REFUSAL_REASON[i];
        i += 1;
    }
    frames
}

/// The connections that have sent no request with a token yet, by their peer's address
/// (which tonic hands each request as its connect info): the token checks
/// (`api::auth::TokenCheck`) mark a connection started at its first such request.
#[derive(Debug, Default, Clone)]
pub struct Waiting(Arc<Mutex<HashMap<SocketAddr, Arc<AtomicBool>>>>);

impl Waiting {
    fn add(&self, peer: SocketAddr) -> Arc<AtomicBool> {
        let started = Arc::new(AtomicBool::new(false));
        let mut waiting = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.insert(peer, Arc::clone(&started));
        started
    }

    fn remove(&self, peer: &SocketAddr) -> Option<Arc<AtomicBool>> {
        let mut waiting = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.remove(peer)
    }

    /// The connection from `peer` made a request with a token: it is no longer timed.
    pub fn started(&self, peer: SocketAddr) {
        if let Some(started) = self.remove(&peer) {
            started.store(true, Ordering::Relaxed);
        }
    }
}

/// After the first request's deadline, how long a connection still has before it is closed:
/// its first request may have come just before, and be checked in a task of its own, which
/// marks the connection started a moment later.
const MARKING_GRACE: Duration = Duration::from_secs(1);

/// The connections `acceptor` takes, for tonic's `serve_with_incoming_shutdown`; `waiting`
/// is the token checks'.
pub fn connections(
    acceptor: Acceptor,
    first_request_timeout: Duration,
    waiting: Waiting,
) -> impl Stream<Item = std::io::Result<GrpcConnection>> {
    futures::stream::unfold(acceptor, move |acceptor| {
        let waiting = waiting.clone();
        async move {
            let (tcp, peer, slot) = acceptor.accept().await;
            // No Nagle: a snapshot or an ack written in several pieces would otherwise wait
            // for the peer's delayed ACK (40 ms on Linux) before its last piece.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
            let started = waiting.add(peer);
            let connection = GrpcConnection {
                tcp,
                _slot: slot,
                peer,
                waiting,
                started,
                due: Some(Box::pin(tokio::time::sleep(first_request_timeout))),
                graced: false,
            };
            Some((Ok(connection), acceptor))
        }
    })
}

/// A connection to the gRPC port, holding its slot of the connection limit, and failing its
/// reads once its first request is overdue.
#[derive(Debug)]
pub struct GrpcConnection {
    tcp: TcpStream,
    _slot: Slot,
    peer: SocketAddr,
    waiting: Waiting,
    started: Arc<AtomicBool>,
    /// Until the first request has come.
    due: Option<Pin<Box<Sleep>>>,
    /// `due` was moved on by [`MARKING_GRACE`] once.
    graced: bool,
}

impl Drop for GrpcConnection {
    fn drop(&mut self) {
        if self.due.is_some() && !self.started.load(Ordering::Relaxed) {
            self.waiting.remove(&self.peer);
        }
    }
}

impl Connected for GrpcConnection {
    type ConnectInfo = TcpConnectInfo;

    /// The peer's address, as for a plain `TcpStream` (the token checks limit failures by it,
    /// and mark the connection started by it).
    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for GrpcConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        // What the peer sent is read first: a request that came by the deadline is served.
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if read.is_ready() {
            return read;
        }
        if let Some(due) = &mut this.due {
            if this.started.load(Ordering::Relaxed) {
                this.due = None;
            } else if due.as_mut().poll(cx).is_ready() {
                if !this.graced {
                    this.graced = true;
                    let later = tokio::time::Instant::now() + MARKING_GRACE;
                    due.as_mut().reset(later);
                    // Registered for the new deadline.
                    let _ = due.as_mut().poll(cx);
                    return read;
                }
                tracing::debug!(peer = %this.peer, "closed a gRPC connection that made no request with a token in time");
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request with a token within the first-request timeout",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for GrpcConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
