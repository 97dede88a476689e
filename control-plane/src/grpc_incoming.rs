//! The gRPC port's connections. Taken by the listener crate's [`Acceptor`], as the HTTP
//! listeners' are: at most `--grpc-max-connections` open at once (past it a new one gets a
//! refusal and is closed, counted in `sluice_grpc_connections_refused_total`), and a pause
//! instead of a spinning accept loop when the process is out of file descriptors. And each
//! must send its first request within `--grpc-first-request-timeout` (which bounds TLS's
//! handshake too, where the port has TLS): health checks and reflection need no token, so
//! anyone who reaches the port could otherwise hold connections for ever without sending a
//! byte, or half of HTTP/2's preface, or after a TLS handshake nothing (hyper waits for the
//! preface with no timer, and PINGs only once it came), each a task, a descriptor and a slot
//! of the limit. Once a request has come, hyper's keep-alive PINGs end a connection whose
//! peer stops answering. Clients connect when they have a request to send (tonic's channels,
//! `sluicectl`), so the bound costs them nothing.

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
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

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

/// The connections that have sent no request yet, by their peer's address (which tonic
/// hands each request as its connect info): [`FirstRequestLayer`] marks a connection
/// started at its first request.
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
}

/// The connections `acceptor` takes, for tonic's `serve_with_incoming_shutdown`; `waiting`
/// is the [`FirstRequestLayer`]'s.
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

    /// The peer's address, as for a plain `TcpStream` (the token checks limit failures by
    /// it, and [`FirstRequestLayer`] finds the connection by it).
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
        if let Some(due) = &mut this.due {
            if this.started.load(Ordering::Relaxed) {
                this.due = None;
            } else if due.as_mut().poll(cx).is_ready() {
                tracing::debug!(peer = %this.peer, "closed a gRPC connection that sent no request in time");
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within the first-request timeout",
                )));
            }
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
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

/// Marks a connection started at its first request (see [`Waiting`]).
#[derive(Debug, Clone)]
pub struct FirstRequestLayer(pub Waiting);

impl<S> tower::Layer<S> for FirstRequestLayer {
    type Service = FirstRequest<S>;

    fn layer(&self, inner: S) -> FirstRequest<S> {
        FirstRequest {
            inner,
            waiting: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FirstRequest<S> {
    inner: S,
    waiting: Waiting,
}

impl<S, B> tower::Service<http::Request<B>> for FirstRequest<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        let extensions = request.extensions();
        let peer = extensions
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| {
                extensions
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|tls| tls.get_ref().remote_addr())
            });
        if let Some(started) = peer.and_then(|peer| self.waiting.remove(&peer)) {
            started.store(true, Ordering::Relaxed);
        }
        self.inner.call(request)
    }
}
