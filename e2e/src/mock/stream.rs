//! Response bodies produced over time: SSE streams, cut bodies and garbage.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use hyper::body::Frame;

use super::fault::GarbageKind;
use super::openai::{self, Delta, Meta, Usage};
use super::state::Shared;
use super::stats::bump;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type FrameResult = Result<Frame<Bytes>, BoxError>;

/// The error a body yields to make hyper drop the connection mid-response.
#[derive(Debug, thiserror::Error)]
#[error("connection cut by fault injection")]
pub(crate) struct Cut;

/// How long a cut body waits after its last bytes so that they reach the socket before the close.
const CUT_FLUSH: Duration = Duration::from_millis(10);

/// Which OpenAI stream format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    Chat,
    Completion,
}

/// Everything a streamed answer will contain, fixed before the first byte.
#[derive(Debug, Clone)]
pub(crate) struct StreamPlan {
    pub(crate) flavor: Flavor,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) n: u32,
    /// Content chunks per choice (= completion tokens per choice).
    pub(crate) tokens: usize,
    pub(crate) finish_reason: &'static str,
    /// `Some` when the client asked for `stream_options.include_usage`.
    pub(crate) usage: Option<Usage>,
    /// `Some` for a provider that sends the usage in the last chunk, beside its finish
    /// reason, unasked (Mistral): no usage chunk of its own.
    pub(crate) last_chunk_usage: Option<Usage>,
    /// Chat chunks end with an `obfuscation` ([`openai::obfuscation`]).
    pub(crate) obfuscate: bool,
    pub(crate) interval: Duration,
    /// Close the connection after this many events (no `[DONE]`).
    pub(crate) cut_after: Option<usize>,
    /// Send `: keep-alive` comments for this long before the first event (a queued request).
    pub(crate) queued_for: Duration,
    /// Send nothing for this long before the first event (a model thinking).
    pub(crate) thinking_for: Duration,
    /// The chunks' `service_tier` ([`openai::served_tier`]).
    pub(crate) service_tier: &'static str,
}

impl StreamPlan {
    fn n(&self) -> usize {
        self.n as usize
    }

    fn role_events(&self) -> usize {
        match self.flavor {
            Flavor::Chat => self.n(),
            Flavor::Completion => 0,
        }
    }

    /// Events before `[DONE]`: role chunks (chat), content chunks, finish chunks, the usage chunk.
    fn total_events(&self) -> usize {
        self.role_events() + self.tokens * self.n() + self.n() + usize::from(self.usage.is_some())
    }

    /// The bytes of event `e` and the usage it carries, if it is the usage chunk.
    fn event(&self, e: usize, name: &str) -> (Bytes, Option<Usage>) {
        let meta = Meta {
            id: &self.id,
            created: self.created,
            model: &self.model,
            service_tier: self.service_tier,
        };
        let n = self.n().max(1);
        let roles = self.role_events();
        let contents = roles + self.tokens * n;
        let finishes = contents + n;
        let usage_field = self.usage.map(|_| None);
        let chunk = |index: usize, delta: Option<Delta<'_>>, usage: Option<Option<Usage>>| {
            let padded = match &delta {
                Some(Delta::Content(text)) => text.len(),
                _ => 0,
            };
            let obfuscation = self.obfuscate.then(|| openai::obfuscation(e, padded));
            let index = u32::try_from(index).unwrap_or(0);
            match self.flavor {
                Flavor::Chat => openai::chat_chunk(meta, index, delta, usage, obfuscation),
                Flavor::Completion => openai::completion_chunk(meta, index, delta, usage),
            }
        };
        if e < roles {
            (chunk(e, Some(Delta::Role), usage_field), None)
        } else if e < contents {
            let k = e - roles;
            let text = openai::piece(name, (k / n) as u64);
            (chunk(k % n, Some(Delta::Content(&text)), usage_field), None)
        } else if e < finishes {
            let last = self.last_chunk_usage.filter(|_| e + 1 == finishes);
            (
                chunk(
                    e - contents,
                    Some(Delta::Finish(self.finish_reason)),
                    last.map(Some).or(usage_field),
                ),
                last,
            )
        } else {
            (chunk(0, None, Some(self.usage)), self.usage)
        }
    }
}

struct SseState {
    plan: StreamPlan,
    shared: Arc<Shared>,
    next: usize,
    finished: bool,
}

impl Drop for SseState {
    fn drop(&mut self) {
        if !self.finished {
            bump(&self.shared.counters.streams_aborted);
        }
    }
}

/// The SSE body for `plan`: `data: <chunk>\n\n` events, then `data: [DONE]\n\n`, or a cut.
pub(crate) fn sse(plan: StreamPlan, shared: Arc<Shared>) -> impl Stream<Item = FrameResult> + Send {
    use futures::StreamExt as _;
    // One at once, then one every 100 ms while the request is queued.
    let keep_alives =
        futures::stream::unfold((plan.queued_for, true), |(left, first)| async move {
            if left.is_zero() {
                return None;
            }
            let step = if first {
                Duration::ZERO
            } else {
                left.min(KEEP_ALIVE_EVERY)
            };
            tokio::time::sleep(step).await;
            let left = if first { left } else { left - step };
            Some((
                Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n"))),
                (left, false),
            ))
        });
    let thinking_for = plan.thinking_for;
    let thinking = futures::stream::once(async move {
        if !thinking_for.is_zero() {
            tokio::time::sleep(thinking_for).await;
        }
    })
    .filter_map(|()| std::future::ready(None));
    let state = SseState {
        plan,
        shared,
        next: 0,
        finished: false,
    };
    let events = futures::stream::unfold(state, |mut st| async move {
        if st.finished {
            return None;
        }
        let total = st.plan.total_events();
        if st.next > 0 && st.next < total && !st.plan.interval.is_zero() {
            tokio::time::sleep(st.plan.interval).await;
        }
        if st.plan.cut_after.map(|k| k.min(total)) == Some(st.next) {
            tokio::time::sleep(CUT_FLUSH).await;
            st.finished = true;
            bump(&st.shared.counters.streams_cut);
            return Some((Err(Box::new(Cut) as BoxError), st));
        }
        if st.next >= total {
            st.finished = true;
            bump(&st.shared.counters.streams_completed);
            return Some((Ok(Frame::data(Bytes::from_static(openai::DONE))), st));
        }
        let (bytes, usage) = st.plan.event(st.next, &st.shared.config.name);
        if let Some(u) = usage {
            st.shared
                .counters
                .usage(u.prompt_tokens, u.completion_tokens);
            st.shared
                .counters
                .detail(u.cached_tokens, u.reasoning_tokens);
        }
        st.next += 1;
        Some((Ok(Frame::data(bytes)), st))
    });
    keep_alives.chain(thinking).chain(events)
}

/// How often a queued stream's keep-alive comment is sent.
const KEEP_ALIVE_EVERY: Duration = Duration::from_millis(100);

/// A Responses API stream: `events` one by one (no `[DONE]`: the stream ends after its
/// terminal event), `usage` counted when the last one goes out, or a cut after `cut_after`.
pub(crate) fn events(
    events: Vec<Bytes>,
    usage: Option<super::responses::ResponseUsage>,
    cut_after: Option<usize>,
    shared: Arc<Shared>,
) -> impl Stream<Item = FrameResult> + Send {
    struct State {
        events: std::vec::IntoIter<Bytes>,
        sent: usize,
        total: usize,
        usage: Option<super::responses::ResponseUsage>,
        cut_after: Option<usize>,
        shared: Arc<Shared>,
        finished: bool,
    }
    impl Drop for State {
        fn drop(&mut self) {
            if !self.finished {
                bump(&self.shared.counters.streams_aborted);
            }
        }
    }
    let total = events.len();
    let state = State {
        events: events.into_iter(),
        sent: 0,
        total,
        usage,
        cut_after,
        shared,
        finished: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        if st.finished {
            return None;
        }
        let interval = st.shared.config.chunk_interval;
        if st.sent > 0 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        if st.cut_after.map(|k| k.min(st.total)) == Some(st.sent) {
            tokio::time::sleep(CUT_FLUSH).await;
            st.finished = true;
            bump(&st.shared.counters.streams_cut);
            return Some((Err(Box::new(Cut) as BoxError), st));
        }
        let event = st.events.next()?;
        st.sent += 1;
        if st.sent == st.total {
            st.finished = true;
            bump(&st.shared.counters.streams_completed);
            if let Some(u) = st.usage {
                st.shared.counters.usage(u.input, u.output);
                st.shared.counters.detail(u.cached, u.reasoning);
            }
        }
        Some((Ok(Frame::data(event)), st))
    })
}

/// The first half of `body`, then a dropped connection.
pub(crate) fn cut_in_half(body: Bytes) -> impl Stream<Item = FrameResult> + Send {
    let half = body.slice(..body.len() / 2);
    futures::stream::unfold(Some(half), |state| async move {
        match state {
            Some(half) => Some((Ok(Frame::data(half)), None)),
            None => {
                tokio::time::sleep(CUT_FLUSH).await;
                Some((Err(Box::new(Cut) as BoxError), None))
            }
        }
    })
}

static GIANT: [u8; 64 * 1024] = [b'x'; 64 * 1024];
/// Size of the [`GarbageKind::GiantLine`] line.
pub(crate) const GIANT_LINE_BYTES: usize = 8 * 1024 * 1024;

const INVALID_SSE: &[u8] = b"data: {\"id\":\"chatcmpl-broken\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"delta\":\n\n\
this line is not server-sent events\n\n\
data: {\"choices\":[{\"index\":\"zero\",\"delta\":{\"content\":42}}]}\n\n\
event: ping\n\
data\n\n\
data: {]\n\n";

const NOT_JSON: &[u8] =
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n";

const BAD_TOOL_CALL: &[u8] = br#"{"id":"chatcmpl-garbage","object":"chat.completion","created":1,"model":"mock","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_garbage","type":"function","function":{"name":"Write","arguments":"[1]"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}"#;

/// The content type and body of a garbage answer.
pub(crate) fn garbage(
    kind: GarbageKind,
) -> (
    &'static str,
    Box<dyn Stream<Item = FrameResult> + Send + Unpin>,
) {
    let data = |b: &'static [u8]| Ok(Frame::data(Bytes::from_static(b)));
    match kind {
        GarbageKind::NotJson => (
            "application/json",
            Box::new(futures::stream::iter([data(NOT_JSON)])),
        ),
        GarbageKind::BadToolCall => (
            "application/json",
            Box::new(futures::stream::iter([data(BAD_TOOL_CALL)])),
        ),
        GarbageKind::InvalidSse => (
            "text/event-stream; charset=utf-8",
            Box::new(futures::stream::iter([data(INVALID_SSE)])),
        ),
        GarbageKind::GiantLine => {
            let pieces = GIANT_LINE_BYTES / GIANT.len();
            let line =
                std::iter::once(data(b"data: ")).chain((0..pieces).map(move |_| data(&GIANT)));
            (
                "text/event-stream; charset=utf-8",
                Box::new(futures::stream::iter(line)),
            )
        }
        GarbageKind::EmptyStream => (
            "text/event-stream; charset=utf-8",
            Box::new(futures::stream::iter(std::iter::empty())),
        ),
    }
}
