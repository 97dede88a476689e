//! Relaying an upstream SSE stream to the client event by event, counting its usage, hiding
//! the usage chunk the client did not ask for, and ending with an error event (never a silent
//! truncation) when the upstream fails after the first byte.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use hyper::body::Incoming;
use sluice_proto::v1::ErrorKind;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout_at};

use super::accounting::{Accounting, usage_of};
use crate::error::error_body;
use crate::sse::{Item, SseParser};
use crate::upstream;

/// How long to keep reading an upstream after `[DONE]` so its connection can be reused.
const DRAIN_AFTER_DONE: Duration = Duration::from_secs(2);

pub(super) struct Relay {
    pub upstream: Incoming,
    pub first: Bytes,
    pub tx: mpsc::Sender<Result<Bytes, Infallible>>,
    pub acct: Accounting,
    /// The client asked for `stream_options.include_usage`.
    pub forward_usage: bool,
    pub idle_timeout: Duration,
    pub deadline: Instant,
}

pub(super) async fn relay(relay: Relay) {
    let Relay {
        mut upstream,
        first,
        tx,
        mut acct,
        forward_usage,
        idle_timeout,
        deadline,
    } = relay;
    let mut parser = SseParser::default();
    let mut items = Vec::new();
    let mut chunk = Some(first);
    loop {
        if let Some(bytes) = chunk.take() {
            let parsed = parser.push(&bytes, &mut items);
            let mut done = false;
            for item in items.drain(..) {
                let out = match item {
                    Item::Comment(text) => Bytes::from(format!(":{text}\n\n")),
                    Item::Event(event) => {
                        if event.data == "[DONE]" {
                            done = true;
                        } else if let Some((tokens, usage_only)) = usage_of(&event.data) {
                            acct.tokens(tokens);
                            if usage_only && !forward_usage {
                                continue;
                            }
                        }
                        event.to_bytes()
                    }
                };
                if tx.send(Ok(out)).await.is_err() {
                    acct.cancelled();
                    return;
                }
                acct.first_byte();
                if done {
                    acct.finish(StatusCode::OK, ErrorKind::Unspecified);
                    drop(tx);
                    // Finish reading so the pooled connection can serve the next request.
                    let _ = timeout_at(Instant::now() + DRAIN_AFTER_DONE, async {
                        while let Ok(Some(_)) = upstream::next_chunk(&mut upstream).await {}
                    })
                    .await;
                    return;
                }
            }
            if let Err(e) = parsed {
                return interrupt(tx, acct, &e.to_string()).await;
            }
        }
        let until = deadline.min(Instant::now() + idle_timeout);
        tokio::select! {
            biased;
            () = tx.closed() => {
                acct.cancelled();
                return;
            }
            next = timeout_at(until, upstream::next_chunk(&mut upstream)) => match next {
                Err(_) if Instant::now() >= deadline => {
                    return interrupt(tx, acct, "the request deadline passed").await;
                }
                Err(_) => {
                    return interrupt(tx, acct, "the upstream stream went silent").await;
                }
                Ok(Err(_)) => {
                    return interrupt(tx, acct, "the upstream connection failed").await;
                }
                Ok(Ok(None)) => {
                    return interrupt(tx, acct, "the upstream stream ended before [DONE]").await;
                }
                Ok(Ok(Some(bytes))) => chunk = Some(bytes),
            }
        }
    }
}

/// Ends the client's stream with an error event.
async fn interrupt(tx: mpsc::Sender<Result<Bytes, Infallible>>, acct: Accounting, why: &str) {
    tracing::warn!(reason = why, "upstream stream interrupted");
    let message = format!("The upstream stream was interrupted: {why}.");
    let body = error_body(&message, "server_error", None, Some("stream_interrupted"));
    let mut event = Vec::with_capacity(body.len() + 8);
    event.extend_from_slice(b"data: ");
    event.extend_from_slice(&body);
    event.extend_from_slice(b"\n\n");
    if tx.send(Ok(Bytes::from(event))).await.is_err() {
        acct.cancelled();
        return;
    }
    acct.finish(StatusCode::OK, ErrorKind::StreamInterrupted);
}
