//! The gRPC port's connections. Taken by the listener crate's [`Acceptor`], as the HTTP
//! listeners' are: at most `--grpc-max-connections` open at once (past it a new one gets a
//! refusal and is closed, counted in `sluice_grpc_connections_refused_total`), and a pause
//! instead of a spinning accept loop when the process is out of file descriptors. And each
//! must send HTTP/2's connection preface within `--grpc-handshake-timeout` (TLS's handshake
//! too, where the port has TLS): health checks and reflection need no token, so anyone who
//! reaches the port could otherwise hold connections without sending a byte, each a task and
//! a descriptor, for ever. Once the preface has come, hyper's keep-alive PINGs end a
//! connection whose peer stops answering.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use sluice_listener::{Acceptor, Slot};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The bytes of HTTP/2's connection preface (`PRI * HTTP/2.0…`), which a client sends first.
const PREFACE_BYTES: usize = 24;

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

/// The connections `acceptor` takes, for tonic's `serve_with_incoming_shutdown`.
pub fn connections(
    acceptor: Acceptor,
    handshake_timeout: Duration,
) -> impl Stream<Item = std::io::Result<GrpcConnection>> {
    futures::stream::unfold(acceptor, move |acceptor| async move {
        let (tcp, _peer, slot) = acceptor.accept().await;
        // No Nagle: a snapshot or an ack written in several pieces would otherwise wait for
        // the peer's delayed ACK (40 ms on Linux) before its last piece.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let connection = GrpcConnection {
            tcp,
            _slot: slot,
            read: 0,
            preface_due: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
        };
        Some((Ok(connection), acceptor))
    })
}

/// A connection to the gRPC port, holding its slot of the connection limit, and failing its
/// reads once the preface is overdue.
#[derive(Debug)]
pub struct GrpcConnection {
    tcp: TcpStream,
    _slot: Slot,
    /// Bytes read while the preface is awaited.
    read: usize,
    /// Until [`PREFACE_BYTES`] have come.
    preface_due: Option<Pin<Box<Sleep>>>,
}

impl Connected for GrpcConnection {
    type ConnectInfo = TcpConnectInfo;

    /// The peer's address, as for a plain `TcpStream` (the token checks limit failures by it).
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
        let before = buf.filled().len();
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if let Some(due) = &mut this.preface_due {
            this.read += buf.filled().len() - before;
            if this.read >= PREFACE_BYTES {
                this.preface_due = None;
            } else if read.is_pending() && due.as_mut().poll(cx).is_ready() {
                tracing::debug!("closed a gRPC connection that sent no preface in time");
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within the handshake timeout",
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
