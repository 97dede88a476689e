//! Relaying an upstream SSE stream to the client event by event, counting its usage, hiding
//! the usage chunk the client did not ask for, and ending with an error event (never a silent
//! truncation) when the upstream fails after the first byte.
//!
//! The relay is the client's response body itself: hyper polls it when the client connection
//! can take more, and it polls the upstream body in turn. No task and no channel sit between
//! the two connections, so an event costs one wake-up of the client connection's task and is
//! read from the upstream only as fast as the client takes it. When the client goes away,
//! hyper drops the body and the accounting records the cancel.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame};
use sluice_proto::v1::ErrorKind;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::accounting::{Accounting, usage_of};
use crate::error::error_body;
use crate::spool::Written;
use crate::sse::{Item, SseParser};
use crate::upstream::{self, UpstreamBody};

/// How long to keep reading an upstream after `[DONE]` so its connection can be reused.
const DRAIN_AFTER_DONE: Duration = Duration::from_secs(2);

/// What to record once a frame has been handed to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Continue,
    /// The stream is complete: `[DONE]` or the error event that ends an interrupted stream.
    Finish(ErrorKind),
}

pub(super) struct Relay {
    /// `None` once the stream has ended (the connection is drained or dropped).
    upstream: Option<UpstreamBody>,
    parser: SseParser,
    items: Vec<Item>,
    ready: VecDeque<(Bytes, Then)>,
    /// `None` once finished (usage recorded).
    acct: Option<Accounting>,
    /// The frame that ends the stream, held until its usage record is written.
    last: Option<(Written, Bytes)>,
    /// The client asked for `stream_options.include_usage`.
    forward_usage: bool,
    idle_timeout: Duration,
    deadline: Instant,
    /// Fires at the idle timeout or the deadline, whichever comes first.
    timer: Pin<Box<Sleep>>,
    /// The timer measures upstream silence only: it restarts when the relay is polled again
    /// after handing out a frame (time the client took to accept it does not count).
    rearm: bool,
    /// Holds shutdown until the stream is over, so its usage is recorded.
    _in_flight: TaskTrackerToken,
}

impl Relay {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        upstream: UpstreamBody,
        first: Bytes,
        acct: Accounting,
        forward_usage: bool,
        idle_timeout: Duration,
        deadline: Instant,
        in_flight: TaskTrackerToken,
    ) -> Self {
        let mut relay = Self {
            upstream: Some(upstream),
            parser: SseParser::default(),
            items: Vec::new(),
            ready: VecDeque::new(),
            acct: Some(acct),
            last: None,
            forward_usage,
            idle_timeout,
            deadline,
            timer: Box::pin(sleep_until(deadline.min(Instant::now() + idle_timeout))),
            rearm: false,
            _in_flight: in_flight,
        };
        relay.take(&first);
        relay
    }

    /// Parses a chunk from the upstream into frames for the client.
    fn take(&mut self, bytes: &[u8]) {
        let parsed = self.parser.push(bytes, &mut self.items);
        let mut items = std::mem::take(&mut self.items);
        for item in items.drain(..) {
            match item {
                Item::Comment(text) => self
                    .ready
                    .push_back((Bytes::from(format!(":{text}\n\n")), Then::Continue)),
                Item::Event(event) => {
                    if event.data == "[DONE]" {
                        self.ready
                            .push_back((event.to_bytes(), Then::Finish(ErrorKind::Unspecified)));
                        self.drain_upstream();
                        break;
                    }
                    if let Some((tokens, usage_only)) = usage_of(&event.data) {
                        if let Some(acct) = &mut self.acct {
                            acct.tokens(tokens);
                        }
                        if usage_only && !self.forward_usage {
                            continue;
                        }
                    }
                    self.ready.push_back((event.to_bytes(), Then::Continue));
                }
            }
        }
        self.items = items;
        if self.upstream.is_some()
            && let Err(e) = parsed
        {
            self.interrupt(&e.to_string());
        }
    }

    /// Ends the stream with an error event after what is already queued.
    fn interrupt(&mut self, why: &str) {
        tracing::warn!(reason = why, "upstream stream interrupted");
        self.upstream = None;
        let message = format!("The upstream stream was interrupted: {why}.");
        let body = error_body(&message, "server_error", None, Some("stream_interrupted"));
        let mut event = Vec::with_capacity(body.len() + 8);
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(&body);
        event.extend_from_slice(b"\n\n");
        self.ready.push_back((
            Bytes::from(event),
            Then::Finish(ErrorKind::StreamInterrupted),
        ));
    }

    /// After `[DONE]`: reads the rest of the upstream body in the background so its
    /// connection goes back to the pool, while the client's response ends now.
    fn drain_upstream(&mut self) {
        let Some(mut upstream) = self.upstream.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(DRAIN_AFTER_DONE, async {
                    while let Ok(Some(_)) = upstream::next_chunk(&mut upstream).await {}
                })
                .await;
            });
        }
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some((written, _)) = &mut this.last {
                let _ = ready!(Pin::new(written).poll(cx));
                let bytes = this.last.take().map(|(_, bytes)| bytes).unwrap_or_default();
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            if let Some((bytes, then)) = this.ready.pop_front() {
                if let Some(acct) = &mut this.acct {
                    acct.first_byte();
                }
                if let Then::Finish(kind) = then {
                    // Nothing after the frame that ends the stream, which goes once the
                    // record is written.
                    this.ready.clear();
                    this.upstream = None;
                    if let Some(acct) = this.acct.take() {
                        this.last = Some((acct.finish(StatusCode::OK, kind), bytes));
                        continue;
                    }
                }
                this.rearm = true;
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            let Some(upstream) = &mut this.upstream else {
                return Poll::Ready(None);
            };
            if std::mem::take(&mut this.rearm) {
                let until = this.deadline.min(Instant::now() + this.idle_timeout);
                this.timer.as_mut().reset(until);
            }
            match Pin::new(upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.rearm = true;
                        this.take(&data);
                    }
                    continue;
                }
                Poll::Ready(Some(Err(_))) => {
                    this.interrupt("the upstream connection failed");
                    continue;
                }
                Poll::Ready(None) => {
                    this.interrupt("the upstream stream ended before [DONE]");
                    continue;
                }
                Poll::Pending => {}
            }
            ready!(this.timer.as_mut().poll(cx));
            if Instant::now() >= this.deadline {
                this.interrupt("the request deadline passed");
            } else {
                this.interrupt("the upstream stream went silent");
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.upstream.is_none() && self.ready.is_empty() && self.last.is_none()
    }
}
