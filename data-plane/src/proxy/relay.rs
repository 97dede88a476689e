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
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body::{Body, Frame};
use memchr::memmem::Finder;
use sluice_proto::v1::ErrorKind;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::accounting::{Accounting, Tokens};
use super::failure::{ERROR_WORD, is_set};
use super::health::StreamHealth;
use super::usage_figures::{JsonRank, usage_of, usage_of_answer, usage_value_of_answer};
use crate::answer_memory::{AnswerMemory, AnswerPermit, Full, UNCOUNTED_STREAM_BYTES};
use crate::anthropic::Usage;
use crate::anthropic::stream::{ChunksFromEvents, EventUsage, EventsFromChunks, Flow};
use crate::cooldown::{Outcome, Scope};
use crate::deadline::Alarm;
use crate::error::error_body;
use crate::metrics::{Label, Metrics};
use crate::responses::{self, IdRewrite};
use crate::spool::Written;
use crate::sse::{Event, Item, SseError, SseParser};
use crate::stopping::StreamsEnd;
use crate::upstream::{self, UpstreamBody};

/// How long to keep reading an upstream after `[DONE]` so its connection can be reused.
const DRAIN_AFTER_DONE: Duration = Duration::from_secs(2);

/// What a stream's client is sent after `--stream-keepalive` of silence: an SSE comment,
/// which the official SDKs, browsers' `EventSource` and any reader of the format skip.
pub(super) const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// What to record once a frame has been handed to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Continue,
    /// A comment (a keep-alive): no part of the answer, so not its first byte.
    Aside,
    /// The stream is complete: `[DONE]` or the error event that ends an interrupted stream.
    Finish(ErrorKind),
}

/// Which API's stream is relayed.
pub(super) enum Mode {
    /// Chat or legacy completions: ends with `[DONE]`; `forward_usage` when the client asked
    /// for `stream_options.include_usage` (else the usage chunk Sluice added is hidden).
    Chat { forward_usage: bool },
    /// The Responses API: named events, response ids rewritten, ends with its terminal event
    /// (`response.completed`, `.failed`, `.incomplete`, `error`); usage from the final
    /// response object, counted when `count_usage` (a create, not a retrieve).
    Responses {
        ids: Box<IdRewrite>,
        count_usage: bool,
    },
    /// Translated between the two APIs event by event (see [`Translation`]).
    Translated(Box<Translation>),
    /// Anthropic's Messages API from an Anthropic backend: every event passed on as it came,
    /// its usage read on the way (when `count_usage`: a message, not a token count); ends with
    /// `message_stop` or an `error` event.
    Messages {
        usage: EventUsage,
        count_usage: bool,
    },
}

impl Mode {
    /// Whether the stream's tokens are the request's (not a retrieve of a stored response,
    /// nor a token count): only then does a stream cut short count its output deltas.
    fn counts_usage(&self) -> bool {
        match self {
            Self::Chat { .. } | Self::Translated(_) => true,
            Self::Responses { count_usage, .. } | Self::Messages { count_usage, .. } => {
                *count_usage
            }
        }
    }
}

/// A stream translated between OpenAI's and Anthropic's APIs.
pub(super) enum Translation {
    /// An Anthropic backend's events as chat completion chunks.
    ChatFromEvents(ChunksFromEvents),
    /// An OpenAI-format backend's chat chunks as Anthropic events.
    EventsFromChunks(EventsFromChunks),
}

impl Translation {
    /// Translates one event into `frames`; the tokens reported so far.
    fn push(&mut self, event: &Event, frames: &mut Vec<Bytes>) -> (Flow, Option<Usage>) {
        match self {
            Self::ChatFromEvents(t) => (t.push(event, frames), t.usage()),
            Self::EventsFromChunks(t) => (t.push(event, frames), t.usage()),
        }
    }

    /// A whole (non-streamed) answer in the client's API: the status and body it gets, with
    /// the tokens of a success. `Err` when a 2xx body is not what the backend's API answers
    /// (or, from an OpenAI-format backend, holds tool arguments that are not a JSON object,
    /// but for a call cut off by the token limit, which is left out), with the tokens its
    /// `usage` reports all the same: the backend answered, and may have charged for it.
    /// `created`: now, in Unix seconds.
    pub(super) fn whole(
        &self,
        status: StatusCode,
        body: &[u8],
        created: u64,
    ) -> Result<(StatusCode, Bytes, Option<Tokens>), Option<Tokens>> {
        use crate::anthropic::{error, message, response};
        match self {
            Self::ChatFromEvents(_) => {
                if !status.is_success() {
                    let (status, body) = error::to_openai(status, body);
                    return Ok((status, body, None));
                }
                match crate::utf8::text(body).and_then(|text| message::completion_of(text, created))
                {
                    Some((completion, usage)) => {
                        Ok((status, Bytes::from(completion), usage.map(tokens_of)))
                    }
                    None => Err(usage_value_of_answer(body)
                        .and_then(response::anthropic_usage_in)
                        .map(tokens_of)),
                }
            }
            Self::EventsFromChunks(t) => {
                if !status.is_success() {
                    return Ok((status, error::to_anthropic(status, body), None));
                }
                let text = crate::utf8::text(body).ok_or(None)?;
                let tokens = usage_of_answer(text);
                // Calls of tools whose names were made portable are named as the client
                // named them, in the answer's tree.
                let names = t.names();
                if names.is_empty()
                    && let Some(message) = response::completion_to_message_in_shape(text)
                {
                    return Ok((status, Bytes::from(message), tokens));
                }
                serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .filter(|completion| completion.get("choices").is_some_and(|c| c.is_array()))
                    .map(|mut completion| {
                        names.restore(&mut completion);
                        completion
                    })
                    .and_then(|completion| response::completion_to_message(&completion).ok())
                    .map(|message| (status, Bytes::from(message.to_string()), tokens))
                    .ok_or(tokens)
            }
        }
    }

    /// Whether the client reads Anthropic's event stream (else OpenAI's chunks).
    fn client_is_anthropic(&self) -> bool {
        match self {
            Self::ChatFromEvents(_) => false,
            Self::EventsFromChunks(_) => true,
        }
    }
}

/// Tokens as translated from either API, as the usage record takes them: with what an
/// OpenAI-format total held beyond them, which [`Accounting::tokens`] reads as a chat
/// stream's (Google's thoughts).
pub(super) fn tokens_of(usage: Usage) -> Tokens {
    Tokens {
        prompt: usage.input,
        completion: usage.output,
        cached_prompt: usage.cache_read,
        cache_write: usage.cache_creation,
        cache_write_1h: usage.cache_creation_1h,
        reasoning: usage.reasoning,
        unshown: usage.unshown,
        ..Tokens::default()
    }
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
    mode: Mode,
    /// A translation's output for one event.
    frames: Vec<Bytes>,
    /// Where events passed on are written in wire form, each split off as its frame, unless
    /// the upstream's chunk is the event in that form already (see [`wire_frame`]): one
    /// allocation serves event after event once hyper has sent and dropped the earlier ones.
    wire: BytesMut,
    /// Events relayed so far.
    events: u64,
    /// The Responses API numbers its events: the number an error event Sluice adds takes
    /// (one past the last relayed, which a stream resumed `starting_after` N starts past N).
    next_sequence: u64,
    idle_timeout: Duration,
    deadline: Instant,
    /// Fires at the idle timeout or the deadline, whichever comes first (a [`Pending`]
    /// stream's first event's wait instead of the idle timeout), or for the next keep-alive.
    /// It is moved lazily:
    /// when it fires early because the upstream spoke since it was set, it is set again to
    /// `silent_since + idle_timeout` (reset at every event, it was moved in tokio's timer wheel
    /// for each one).
    timer: Alarm,
    /// Since when the upstream has been silent, as far as the timer is concerned.
    silent_since: Instant,
    /// The timer measures upstream silence only: it restarts when the relay is polled again
    /// after handing out a frame (time the client took to accept it does not count).
    rearm: bool,
    /// `--stream-keepalive`: the client is sent [`KEEP_ALIVE`] once it has been sent nothing
    /// this long, and again each time as long (the timer fires for it too; a comment does not
    /// restart the upstream's silence, so it never hides a stalled upstream).
    keep_alive: Option<Duration>,
    /// When the last of those comments went (the stream's start before the first).
    kept_alive: Instant,
    /// When the client was last handed a frame, as far as the keep-alives are concerned
    /// (read with the upstream's silence, after the frame: see `rearm`). The upstream may
    /// speak without the client hearing anything: a translation drops what the client's API
    /// has no place for.
    heard_since: Instant,
    /// A frame was handed to the client since `heard_since` was set.
    handed: bool,
    /// A stream committed before its first event ([`Pending`]), until that event comes.
    pending: Option<Box<Pending>>,
    /// Holds shutdown until the stream is over, so its usage is recorded.
    _in_flight: TaskTrackerToken,
    /// Ends the stream with an error event shortly before the drain timeout runs out.
    streams_end: StreamsEnd,
    /// Where the stream's end is recorded for its backend's cooldown (once; `None` after).
    health: Option<StreamHealth>,
    /// A chat stream's upstream sent its own error event (`data: {"error": …}`, as vLLM does
    /// when generation fails after the head): the stream ends as interrupted, however its body
    /// ends (OpenAI's closes with no `[DONE]`: [`Relay::ended_without_done`]).
    upstream_error: bool,
    /// The last usage a chat stream reported came as a stream's last chunk brings it: alone
    /// (`choices: []`, as Sluice asks for it) or with a `finish_reason` (Perplexity sends usage
    /// in every chunk and no `[DONE]`). A body that ends cleanly after it is complete; one
    /// that ends after usage in a chunk of the middle (vLLM's `continuous_usage_stats`) is
    /// cut.
    usage_ends: bool,
    /// That error event was the stream's first: an overload there failed over before the
    /// stream was committed (`failure::first_event`), so this one may be the server refusing
    /// the client's own request (TGI validates a request's parameters after its 200 head): its
    /// end counts for the backend's cooldown neither way.
    error_first: bool,
    /// A Responses stream ended by the provider's own failure (`response.failed`, `error`)
    /// that says the backend failed (`server_error`) or is over a limit
    /// (`rate_limit_exceeded`, `insufficient_quota`): its end, for the backend's cooldown
    /// ([`responses_failure`]). `None`: an answer (the request's own fault included).
    upstream_failure: Option<Outcome>,
    /// What the stream holds of the answers' memory while it reads and queues a large event
    /// (see [`Relay::count_memory`]).
    memory: HeldMemory,
}

/// A stream committed to its backend before its first event (`--stream-keepalive`): what the
/// attempt would have judged at that event, the relay judges instead.
pub(super) struct Pending {
    /// The first event is waited for until then (the request's deadline: no other backend
    /// can be asked once the head went out), not `idle_stream_timeout` of silence: the
    /// upstream's own comments (a provider's queue keep-alives) do not extend it.
    pub(super) event_by: Instant,
    /// The end of the wait an attempt gives a first event (`answer_timeout`): no event by
    /// then is its model's failure, as at an attempt, whether the stream then reaches
    /// `event_by` (unless that comes first) or its client leaves.
    pub(super) answer_by: Instant,
    /// For the time to the first event (`sluice_upstream_ttft_seconds`), from the attempt's
    /// send.
    pub(super) sent: Instant,
    pub(super) metrics: Arc<Metrics>,
    pub(super) backend: Label,
}

impl Pending {
    /// What a wait for the first event that ended at `at` without it says of the backend: its
    /// model's failure once the wait an attempt gives it (`answer_by`) was over, else nothing.
    fn ended_at(&self, at: Instant) -> Option<Outcome> {
        (at >= self.answer_by).then_some(Outcome::Failure {
            retry_after: None,
            scope: Scope::Model,
        })
    }
}

/// The answers' memory (`--max-buffered-answer-bytes` and the key's share of it) a stream
/// holds while a large event is in it: an image in a Responses stream is megabytes, and a
/// hostile upstream may send events up to the bound in every stream at once.
struct HeldMemory {
    answers: Arc<AnswerMemory>,
    permit: Option<AnswerPermit>,
    /// The bytes `permit` holds.
    counted: usize,
}

impl Relay {
    /// `max_event_bytes` bounds one event (and one line): the response size limit, as a
    /// whole answer has (an image generated in a Responses stream comes whole in one event,
    /// megabytes of base64).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        upstream: UpstreamBody,
        first: Bytes,
        acct: Accounting,
        mode: Mode,
        idle_timeout: Duration,
        deadline: Instant,
        max_event_bytes: usize,
        in_flight: TaskTrackerToken,
        streams_end: StreamsEnd,
        health: Option<StreamHealth>,
        answers: Arc<AnswerMemory>,
        keep_alive: Option<Duration>,
        pending: Option<Box<Pending>>,
    ) -> Self {
        let now = Instant::now();
        let silence_ends = match &pending {
            Some(pending) => pending.event_by,
            None => deadline.min(now + idle_timeout),
        };
        let mut relay = Self {
            upstream: Some(upstream),
            parser: SseParser::new(max_event_bytes),
            items: Vec::new(),
            ready: VecDeque::new(),
            acct: Some(acct),
            last: None,
            mode,
            frames: Vec::new(),
            wire: BytesMut::new(),
            events: 0,
            next_sequence: 0,
            idle_timeout,
            deadline,
            timer: Alarm::at(
                keep_alive.map_or(silence_ends, |every| silence_ends.min(now + every)),
            ),
            silent_since: now,
            rearm: false,
            keep_alive,
            kept_alive: now,
            heard_since: now,
            handed: false,
            pending,
            _in_flight: in_flight,
            streams_end,
            health,
            upstream_error: false,
            usage_ends: false,
            error_first: false,
            upstream_failure: None,
            memory: HeldMemory {
                answers,
                permit: None,
                counted: 0,
            },
        };
        relay.take(first);
        relay
    }

    /// Parses a chunk from the upstream into frames for the client, within the answers'
    /// memory.
    fn take(&mut self, chunk: Bytes) {
        // What this chunk may complete and queue: itself and the event begun before it.
        let read = chunk.len() + self.parser.buffered_bytes();
        self.parse_chunk(chunk);
        self.count_memory(read);
    }

    /// What a large event holds, counted against the answers' memory as it grows: the bytes
    /// of it the parser holds and the frames queued for the client, once each, as a whole
    /// answer is counted by its bytes (counted three times over, for the copies its reading
    /// makes for a moment, an event of half `--max-response-bytes` was cut on an idle replica,
    /// where the limit promises events up to all of it). Past what a stream keeps for itself
    /// ([`UNCOUNTED_STREAM_BYTES`], uncounted as a small whole answer is), all of it. When the
    /// memory or the key's share cannot take it, the stream ends with an error event, as a
    /// whole answer that cannot be held gets its 503: a replica reading dozens of large events
    /// at once holds no more than `--max-buffered-answer-bytes` for them.
    fn count_memory(&mut self, read: usize) {
        let held = &mut self.memory;
        // `read` bounds what was queued: a small chunk ending a line begun in an earlier one
        // queues an event as large as both.
        if held.counted == 0
            && read <= UNCOUNTED_STREAM_BYTES
            && self.parser.held_bytes() <= UNCOUNTED_STREAM_BYTES
        {
            return;
        }
        let queued: usize = self.ready.iter().map(|(frame, _)| frame.len()).sum();
        let holds = self.parser.buffered_bytes() + queued;
        if holds <= UNCOUNTED_STREAM_BYTES {
            held.permit = None;
            held.counted = 0;
            return;
        }
        let Some(acct) = &self.acct else {
            return;
        };
        if holds <= held.counted {
            return;
        }
        match held.answers.take(acct.key_id(), holds - held.counted) {
            Ok(permit) => {
                held.counted = holds;
                match &mut held.permit {
                    Some(mine) => mine.merge(permit),
                    None => held.permit = Some(permit),
                }
            }
            Err(full) => {
                held.permit = None;
                held.counted = 0;
                // Nothing of the event is kept: the stream ends here.
                self.ready.clear();
                self.parser = SseParser::new(0);
                self.wire = BytesMut::new();
                self.ended(None);
                tracing::warn!(
                    bytes = holds,
                    "a stream's event could not be held: the answers' memory is full"
                );
                let whose = match full {
                    Full::Replica => "this Sluice data plane's answers",
                    Full::Key => "this API key's answers",
                };
                self.end_with_error(&format!(
                    "The stream was cut short: {whose} fill the memory it may hold, and the \
                     stream's next event ({holds} bytes with its copies) could not be read. Try \
                     again shortly."
                ));
            }
        }
    }

    /// Parses a chunk from the upstream into frames for the client.
    fn parse_chunk(&mut self, chunk: Bytes) {
        if self.ready.is_empty() && self.ready.capacity() > KEPT_ITEMS {
            self.ready = VecDeque::new();
        }
        // A chat chunk that is one whole event in wire form, as upstreams send nearly all of
        // them: read where it is (no copy into the parser's buffer, no item list) and passed
        // on as it came, as the loop below would pass it on.
        if let Mode::Chat { forward_usage } = self.mode
            && let Some(data) = self.parser.whole_data(&chunk)
            && data != DONE
        {
            // An error chunk carries no output (OpenRouter's has an empty delta): a chunk of
            // content, nearly every one, is not searched for an `error`.
            let output = is_output_delta_data(data);
            self.note_error(!output && is_error_event(data));
            if output && let Some(acct) = &mut self.acct {
                acct.output_delta();
            }
            self.events += 1;
            if count_chat_usage(&mut self.acct, data, forward_usage, &mut self.usage_ends) {
                self.ready.push_back((chunk, Then::Continue));
            }
            if self.pending.is_some() {
                self.first_event_came();
            }
            return;
        }
        let (parsed, mut chunk) = parse(&mut self.parser, chunk, &mut self.items);
        let mut items = std::mem::take(&mut self.items);
        // A Responses event's deltas are counted by its data's `type` when it is read.
        let counts_usage = self.mode.counts_usage() && !matches!(self.mode, Mode::Responses { .. });
        for item in items.drain(..) {
            if let (Item::Event(event), Some(acct)) = (&item, &mut self.acct)
                && counts_usage
                && is_output_delta(event)
            {
                acct.output_delta();
            }
            match item {
                Item::Comment(text) => self
                    .ready
                    .push_back((Bytes::from(format!(":{text}\n\n")), Then::Aside)),
                Item::Event(event) if matches!(self.mode, Mode::Translated(_)) => {
                    if self.translate(&event) {
                        break;
                    }
                }
                Item::Event(event) if matches!(self.mode, Mode::Messages { .. }) => {
                    let end = self.take_messages_event(&event, &mut chunk);
                    self.parser.recycle(event.data);
                    if end {
                        break;
                    }
                }
                Item::Event(event) => {
                    if event.data == DONE && matches!(self.mode, Mode::Responses { .. }) {
                        // No Responses event: a relay that ends every stream with it (as
                        // chat's) sends it after an upstream's failure too, before any final
                        // event. Its client, whose SDK stops at it, must not take it for the
                        // answer's end.
                        self.upstream_failed("the upstream stream ended before its final event");
                        break;
                    }
                    if event.data == DONE {
                        let kind = self.chat_end();
                        self.ready.push_back((event.to_bytes(), Then::Finish(kind)));
                        self.drain_upstream();
                        break;
                    }
                    let forward_usage = match &self.mode {
                        Mode::Chat { forward_usage } => *forward_usage,
                        Mode::Translated(_) | Mode::Messages { .. } => false,
                        // Its failures are its events' `type`s (`take_responses_event`), not
                        // an `error` member: a lifecycle event's response has one, null.
                        Mode::Responses { .. } => {
                            self.events += 1;
                            if self.take_responses_event(event) {
                                break;
                            }
                            continue;
                        }
                    };
                    self.note_error(
                        !is_output_delta_data(&event.data) && is_error_event(&event.data),
                    );
                    self.events += 1;
                    if !count_chat_usage(
                        &mut self.acct,
                        &event.data,
                        forward_usage,
                        &mut self.usage_ends,
                    ) {
                        self.parser.recycle(event.data);
                        continue;
                    }
                    let frame = wire_frame(&mut self.wire, &event, &mut chunk);
                    self.ready.push_back((frame, Then::Continue));
                    self.parser.recycle(event.data);
                }
            }
        }
        self.items = items;
        // One chunk of many tiny events (a hostile upstream's) grew these: their room is not
        // kept for the rest of the stream.
        if self.items.capacity() > KEPT_ITEMS {
            self.items = Vec::new();
        }
        if self.upstream.is_some()
            && let Err(e) = parsed
        {
            self.upstream_failed(&e.to_string());
        }
        if self.events > 0 && self.pending.is_some() {
            self.first_event_came();
        }
    }

    /// A stream committed before its first event has it: its backend answers (its streak
    /// ends, as an attempt's first event ends it), its time to the first event is measured,
    /// and from now on silence is timed by `idle_stream_timeout`.
    fn first_event_came(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        pending
            .metrics
            .upstream_ttft(&pending.backend, pending.sent.elapsed());
        // An error as the first event counts for the backend's cooldown neither way
        // ([`Relay::error_first`]): no answer either.
        if let Some(health) = &mut self.health
            && !self.error_first
        {
            health.answering();
        }
        self.timer.reset(self.next_alarm());
    }

    /// A Responses API event: queued with its response ids rewritten, its usage counted.
    /// Returns true when it ends the stream.
    fn take_responses_event(&mut self, mut event: crate::sse::Event) -> bool {
        let Mode::Responses { ids, count_usage } = &self.mode else {
            return false;
        };
        let rewritten = match responses::rewrite_event(&event.data, ids) {
            Ok(rewritten) => rewritten,
            Err(e) => {
                self.upstream_failed(&format!(
                    "the upstream sent an event Sluice cannot read ({e})"
                ));
                return true;
            }
        };
        if let Some(number) = rewritten.sequence_number {
            self.next_sequence = number.saturating_add(1);
        }
        // By the data's `type`, which every event has, not the `event:` line, which a server
        // may leave out: a stream cut short is charged a token per delta either way.
        if *count_usage
            && let Some(acct) = &mut self.acct
            && rewritten
                .event_type
                .as_deref()
                .is_some_and(|t| t.starts_with("response.") && t.ends_with(".delta"))
        {
            acct.output_delta();
        }
        if *count_usage && let Some(acct) = &mut self.acct {
            acct.calls_in_event(rewritten.event_type.as_deref(), event.data.as_bytes());
        }
        if *count_usage
            && let Some(tokens) = rewritten.tokens
            && let Some(acct) = &mut self.acct
        {
            acct.tokens(tokens);
            acct.priced_in(event.data.as_bytes());
        }
        event.data = String::from_utf8_lossy(&rewritten.bytes).into_owned();
        let kind = match rewritten.event_type.as_deref() {
            Some("response.completed" | "response.incomplete") => Some(ErrorKind::Unspecified),
            Some(t) if responses::is_terminal(t) => {
                // A retrieve replays the stored response's events, its end too: a failure
                // of the past, which says nothing of the backend now (counted, three
                // streams of one failed background response cooled the whole backend).
                if *count_usage {
                    self.upstream_failure = responses_failure(&event.data);
                }
                Some(ErrorKind::UpstreamStatus)
            }
            _ => None,
        };
        match kind {
            Some(kind) => {
                self.ready.push_back((event.to_bytes(), Then::Finish(kind)));
                self.drain_upstream();
                true
            }
            None => {
                self.ready.push_back((event.to_bytes(), Then::Continue));
                false
            }
        }
    }

    /// Queues the client's frames for one translated event; true once the stream is over.
    fn translate(&mut self, event: &Event) -> bool {
        let Mode::Translated(translation) = &mut self.mode else {
            return false;
        };
        let mut frames = std::mem::take(&mut self.frames);
        let (flow, usage) = translation.push(event, &mut frames);
        self.note_error(matches!(flow, Flow::Failed));
        self.events += 1;
        if let Some(acct) = &mut self.acct {
            acct.calls_in_event(event.event.as_deref(), event.data.as_bytes());
        }
        if let (Some(usage), Some(acct)) = (usage, &mut self.acct) {
            acct.tokens(tokens_of(usage));
            if may_change_the_price(event) {
                acct.priced_in(event.data.as_bytes());
            }
        }
        let end = match flow {
            Flow::Continue => None,
            Flow::Done => Some(ErrorKind::Unspecified),
            Flow::Failed => Some(ErrorKind::StreamInterrupted),
        };
        let count = frames.len();
        for (i, frame) in frames.drain(..).enumerate() {
            let then = match end {
                Some(kind) if i + 1 == count => Then::Finish(kind),
                _ => Then::Continue,
            };
            self.ready.push_back((frame, then));
        }
        self.frames = frames;
        if end.is_some() {
            self.drain_upstream();
        }
        end.is_some()
    }

    /// Queues an event of an Anthropic stream passed through, as it came (see [`wire_frame`]
    /// for `chunk`); true once the stream is over.
    fn take_messages_event(&mut self, event: &Event, chunk: &mut Option<Bytes>) -> bool {
        let Mode::Messages { usage, count_usage } = &mut self.mode else {
            return false;
        };
        let flow = usage.observe(event);
        if *count_usage && let Some(acct) = &mut self.acct {
            acct.calls_in_event(event.event.as_deref(), event.data.as_bytes());
        }
        if *count_usage && let (Some(usage), Some(acct)) = (usage.usage(), &mut self.acct) {
            acct.tokens(tokens_of(usage));
            if may_change_the_price(event) {
                acct.priced_in(event.data.as_bytes());
            }
        }
        self.note_error(matches!(flow, Flow::Failed));
        self.events += 1;
        let then = match flow {
            Flow::Continue => Then::Continue,
            Flow::Done => Then::Finish(ErrorKind::Unspecified),
            Flow::Failed => Then::Finish(ErrorKind::StreamInterrupted),
        };
        let frame = wire_frame(&mut self.wire, event, chunk);
        self.ready.push_back((frame, then));
        if then == Then::Continue {
            return false;
        }
        self.drain_upstream();
        true
    }

    /// A chat stream (relayed, or translated for a Messages client) whose body ended before
    /// `[DONE]`: one that ended cleanly inside its `[DONE]` (without the blank line after
    /// it), or after usage reported as a stream's last chunk brings it ([`Relay::usage_ends`];
    /// a translated one's, any usage), is complete, and ends as `[DONE]` ends it (Perplexity sends none; some servers leave out
    /// the last blank line); another unfinished event is dropped, as the format says. A
    /// relayed chat stream that carried its upstream's own error event has been answered
    /// with it, however its body ends (OpenAI closes it after the error chunk, with no
    /// `[DONE]`): it ends as interrupted, its model's failure ([`Relay::chat_end`]), not with
    /// a second error event of Sluice's nor as its backend's failure. True when the stream is
    /// over so. `broken`: the connection failed rather than ending the body.
    fn ended_without_done(&mut self, broken: bool) -> bool {
        let chunks = match &self.mode {
            Mode::Chat { .. } => true,
            Mode::Translated(t) => matches!(**t, Translation::EventsFromChunks(_)),
            Mode::Messages { .. } | Mode::Responses { .. } => false,
        };
        if !chunks {
            return false;
        }
        let relayed = matches!(self.mode, Mode::Chat { .. });
        let answered_with_its_error = relayed && self.upstream_error;
        let done = !broken && self.parser.unfinished_data_is(DONE);
        // A translated stream's usage is its translation's to judge.
        let has_usage = !broken
            && (self.usage_ends
                || !relayed && self.acct.as_ref().is_some_and(Accounting::has_usage));
        if !done && !has_usage && !answered_with_its_error {
            return false;
        }
        self.upstream = None;
        if matches!(self.mode, Mode::Translated(_)) {
            // A Messages client's stream ends as `[DONE]` ends it: its last block closed,
            // `message_delta` with the usage, `message_stop`.
            let done = Event {
                event: None,
                data: DONE.to_owned(),
                id: None,
            };
            self.translate(&done);
            return true;
        }
        let kind = self.chat_end();
        self.ready
            .push_back((Bytes::from_static(b"data: [DONE]\n\n"), Then::Finish(kind)));
        true
    }

    /// Notes whether the event about to be counted is the upstream's own error (a chat
    /// chunk's `{"error": …}`, a Messages stream's `error` event, or what a translation
    /// fails on).
    fn note_error(&mut self, error: bool) {
        self.upstream_error |= error;
        if self.events == 0 {
            self.error_first = error;
        }
    }

    /// How a chat stream that reached its end ends: as interrupted when its upstream sent its
    /// own error event on the way (the client's SDK raised it), else normally.
    fn chat_end(&self) -> ErrorKind {
        if self.upstream_error {
            ErrorKind::StreamInterrupted
        } else {
            ErrorKind::Unspecified
        }
    }

    /// When the client is due its next keep-alive: `keep_alive` after the later of the last
    /// frame handed out and the last keep-alive.
    fn keep_alive_due(&self) -> Option<Instant> {
        self.keep_alive
            .map(|every| self.heard_since.max(self.kept_alive) + every)
    }

    /// When the upstream's silence ends the stream: its first event's wait while that is
    /// [`Pending`], then `idle_timeout` of silence, never past the deadline.
    fn silence_ends(&self) -> Instant {
        match &self.pending {
            Some(pending) => pending.event_by,
            None => self.deadline.min(self.silent_since + self.idle_timeout),
        }
    }

    /// When the timer is next needed: the silence's end or the next keep-alive.
    fn next_alarm(&self) -> Instant {
        let ends = self.silence_ends();
        self.keep_alive_due().map_or(ends, |at| at.min(ends))
    }

    /// Records the stream's end for its backend's cooldown, once.
    fn ended(&mut self, health: Option<Outcome>) {
        if let (Some(record), Some(health)) = (self.health.take(), health) {
            record.record(health);
        }
    }

    /// [`Relay::interrupt`] for a failure of the upstream's: its backend's failure.
    fn upstream_failed(&mut self, why: &str) {
        self.ended(Some(Outcome::Failure {
            retry_after: None,
            scope: Scope::Backend,
        }));
        self.interrupt(why);
    }

    /// Ends the stream with an error event after what is already queued.
    fn interrupt(&mut self, why: &str) {
        // Its request's id, which its `request finished` line (with the backend) carries.
        let request_id = self.acct.as_ref().map_or("", Accounting::request_id);
        tracing::warn!(request_id, reason = why, "upstream stream interrupted");
        self.end_with_error(&format!("The upstream stream was interrupted: {why}."));
    }

    /// Ends the stream with an error event, as [`Relay::interrupt`] does, because this replica
    /// is stopping and its drain timeout is about to run out.
    fn end_for_the_stop(&mut self) {
        self.ended(None);
        tracing::info!("a stream still running at the end of the drain ended with an error event");
        self.end_with_error(
            "The stream was cut short: this Sluice replica is shutting down. Send the request \
             again.",
        );
    }

    /// Ends the stream with an error event carrying `message`, in the client's API's form.
    fn end_with_error(&mut self, message: &str) {
        self.upstream = None;
        let event = match &self.mode {
            Mode::Translated(t) if t.client_is_anthropic() => {
                crate::anthropic::error::event(502, message).to_vec()
            }
            Mode::Messages { .. } => crate::anthropic::error::event(502, message).to_vec(),
            Mode::Chat { .. } | Mode::Translated(_) => {
                let body = error_body(message, "server_error", None, Some("stream_interrupted"));
                let mut event = Vec::with_capacity(body.len() + 8);
                event.extend_from_slice(b"data: ");
                event.extend_from_slice(&body);
                event.extend_from_slice(b"\n\n");
                event
            }
            // The Responses API's own error event (`ResponseErrorEvent`), its fields both
            // flat, as its schema has them, and nested under `error`, as OpenAI's stream
            // sends them: openai-python raises on the nested form only, and took a flat one
            // for an event, ending the loop over a cut answer as over a whole one.
            Mode::Responses { .. } => {
                let data = serde_json::json!({
                    "type": "error",
                    "code": "stream_interrupted",
                    "message": message,
                    "param": null,
                    "sequence_number": self.next_sequence.max(self.events),
                    "error": {
                        "type": "server_error",
                        "code": "stream_interrupted",
                        "message": message,
                        "param": null,
                    },
                });
                format!("event: error\ndata: {data}\n\n").into_bytes()
            }
        };
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

/// The data of the event that ends a chat stream.
const DONE: &str = "[DONE]";

/// Whether a chat stream's event is its upstream's error event, as the SDKs read one (they
/// raise on a chunk whose top-level `error` is set: openai-python's `data.get("error")`):
/// an object whose first member is `error` (vLLM's, and OpenAI's shape of an error body), or
/// one with an `error` among its members (OpenRouter's mid-stream error: a chunk with `id`,
/// `object`, ..., `error`, and `choices` whose `finish_reason` is `"error"`). Most chunks name
/// no `error`: one search tells them; a chunk that does is parsed. Asked only of chunks that
/// carry no output (the relay's callers): the search cost 225 instructions a relayed event
/// when every chunk was asked.
fn is_error_event(data: &str) -> bool {
    if data
        .strip_prefix('{')
        .is_some_and(|rest| rest.trim_start().starts_with("\"error\""))
    {
        return true;
    }
    if ERROR_WORD.find(data.as_bytes()).is_none() {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Chunk {
        #[serde(default)]
        error: serde_json::Value,
    }
    serde_json::from_str::<Chunk>(data).is_ok_and(|chunk| is_set(&chunk.error))
}

/// Whether an event of a stream whose usage was counted may name the answer's price tier or
/// count its tools' calls: Anthropic's `message_start` and `message_delta` (its other events
/// repeat no usage), or an OpenAI chunk (named by no `event:` line, read once its usage has
/// come).
fn may_change_the_price(event: &Event) -> bool {
    matches!(
        event.event.as_deref(),
        None | Some("message_start" | "message_delta")
    )
}

/// Counts the usage a chat event reports, if any; whether its frame goes to the client (not
/// when it is the usage chunk Sluice asked for and the client did not).
fn count_chat_usage(
    acct: &mut Option<Accounting>,
    data: &str,
    forward_usage: bool,
    usage_ends: &mut bool,
) -> bool {
    let Some((tokens, usage_only)) = usage_of(data) else {
        return true;
    };
    *usage_ends = usage_only || non_empty_string_after(data, &FINISH_REASON_KEY);
    if let Some(acct) = acct {
        acct.tokens(tokens);
        acct.priced_in(data.as_bytes());
    }
    !usage_only || forward_usage
}

/// Parses `chunk` into `items`; with the chunk itself when it is the one event parsed, in
/// wire form (see [`wire_frame`]).
fn parse(
    parser: &mut SseParser,
    chunk: Bytes,
    items: &mut Vec<Item>,
) -> (Result<(), SseError>, Option<Bytes>) {
    match parser.push_whole(&chunk, items) {
        Ok(whole) => (Ok(()), whole.then_some(chunk)),
        Err(e) => (Err(e), None),
    }
}

/// `event` in wire form: `chunk`, the upstream's chunk that is just that event in that form
/// when there is one ([`SseParser::push_whole`]), else written to a frame split off `wire`.
/// Passed on, it costs no copy, no newline search and no share of `wire`. `event` must be the
/// event parsed from `chunk`, unchanged: the chunk is sent for it as it came. A chunk passed on
/// shares the allocation of the upstream connection's read buffer until hyper has written it,
/// as a bare proxy's frames do; hyper queues at most 16 frames for a client before it stops
/// polling the body, so a slow client holds a bounded part of it.
fn wire_frame(wire: &mut BytesMut, event: &Event, chunk: &mut Option<Bytes>) -> Bytes {
    if let Some(chunk) = chunk.take() {
        return chunk;
    }
    event.write_to(wire);
    let frame = wire.split().freeze();
    if frame.len() > KEPT_WIRE_BYTES {
        // Its allocation goes with the frame once sent, not kept for the rest of the stream.
        *wire = BytesMut::new();
    }
    frame
}

/// The most items, and frames queued, whose room the relay keeps between chunks.
const KEPT_ITEMS: usize = 1024;

/// The largest frame whose allocation the relay keeps writing into (see [`wire_frame`]).
const KEPT_WIRE_BYTES: usize = 64 * 1024;

/// Whether an upstream event carries output, at least one completion token: Anthropic's
/// `content_block_delta`, a Responses API `*.delta`, or an OpenAI chunk with non-empty text,
/// tool-call arguments or refusal. A cheap look at the bytes, not a parse: it only counts
/// what a stream cut short is charged.
fn is_output_delta(event: &Event) -> bool {
    match event.event.as_deref() {
        Some("content_block_delta") => true,
        Some(name) if name.starts_with("response.") => name.ends_with(".delta"),
        Some(_) => false,
        None => is_output_delta_data(&event.data),
    }
}

/// Whether the data of an unnamed event (an OpenAI chunk) carries output.
fn is_output_delta_data(data: &str) -> bool {
    OUTPUT_KEYS
        .iter()
        .any(|key| non_empty_string_after(data, key))
}

/// The keys of an OpenAI chunk whose non-empty string is output, with their quotes.
/// Reasoning, which OpenAI-compatible servers stream before any content (DeepSeek's and
/// vLLM's `reasoning_content`, OpenRouter's and others' `reasoning`), is output too: billed as
/// such, and a stream cut short while the model reasons is charged for it. So is a spoken
/// answer's (an audio model's `delta.audio`, its `transcript` beside the speech's `data`).
/// Searched last, so that a chunk of content is told by the first search.
const OUTPUT_KEY_NAMES: [&str; 7] = [
    "\"content\"",
    "\"text\"",
    "\"arguments\"",
    "\"refusal\"",
    "\"reasoning_content\"",
    "\"reasoning\"",
    "\"transcript\"",
];

/// [`OUTPUT_KEY_NAMES`]' searchers, built once (a `str` search builds its own at every call).
static OUTPUT_KEYS: LazyLock<[Finder<'static>; 7]> = LazyLock::new(|| {
    OUTPUT_KEY_NAMES
        .map(|key| memchr::memmem::FinderBuilder::new().build_forward_with_ranker(JsonRank, key))
});

/// The key of a choice's `finish_reason`, searched for in chunks that carry usage.
static FINISH_REASON_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| {
    memchr::memmem::FinderBuilder::new().build_forward_with_ranker(JsonRank, b"\"finish_reason\"")
});

/// Whether some `key` in `json` is followed by `:` and a string that is not empty.
fn non_empty_string_after(json: &str, key: &Finder<'_>) -> bool {
    key.find_iter(json.as_bytes()).any(|at| {
        // `at` and the end of the key are at a `"`, so on character boundaries.
        json[at + key.needle().len()..]
            .trim_start()
            .strip_prefix(':')
            .and_then(|value| value.trim_start().strip_prefix('"'))
            .is_some_and(|string| !string.starts_with('"'))
    })
}

impl Drop for Relay {
    /// A stream its client left (or that ended without a word on its health): the backend
    /// was answering. One left before its first event ([`Pending`]) says nothing of its
    /// backend, unless that event was overdue (a backend that sends its head and then
    /// nothing, whose clients give up before the deadline, would otherwise end its streak
    /// with each and never cool down).
    fn drop(&mut self) {
        let health = match self.pending.take() {
            None => Some(Outcome::Success),
            Some(pending) => pending.ended_at(Instant::now()),
        };
        self.ended(health);
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
                // Comments, and the error event Sluice ends a stream with before any event of
                // its upstream's, are no first token.
                if let Some(acct) = &mut this.acct
                    && then != Then::Aside
                    && this.events > 0
                {
                    acct.first_byte();
                }
                this.handed = true;
                if let Then::Finish(kind) = then {
                    // Its upstream's own error event ended it (Anthropic's mid-stream
                    // `overloaded_error`, OpenRouter's error chunk): the model's failure at
                    // the backend, which answered with it (a gateway serving many models
                    // must not cool them all for one provider's), unless that error was its
                    // first event ([`Relay::error_first`]); any other end, an answer. (A
                    // broken connection, or a stream cut, is the backend's: `upstream_failed`
                    // records it first.)
                    let upstream_failure = this.upstream_failure.take();
                    this.ended(match kind {
                        ErrorKind::StreamInterrupted if this.error_first => None,
                        ErrorKind::StreamInterrupted => Some(Outcome::Failure {
                            retry_after: None,
                            scope: Scope::Model,
                        }),
                        // A Responses stream the provider ended with its own failure.
                        _ => Some(upstream_failure.unwrap_or(Outcome::Success)),
                    });
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
            // Polled: no need to be woken for it (a client slow to read a stream whose
            // upstream is always ready never lets the relay wait below).
            if this.streams_end.ended() {
                this.end_for_the_stop();
                continue;
            }
            if std::mem::take(&mut this.rearm) {
                this.silent_since = Instant::now();
                if std::mem::take(&mut this.handed) {
                    this.heard_since = this.silent_since;
                }
            }
            match Pin::new(upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.rearm = true;
                        this.take(data);
                    }
                    continue;
                }
                Poll::Ready(Some(Err(_))) => {
                    if !this.ended_without_done(true) {
                        this.upstream_failed("the upstream connection failed");
                    }
                    continue;
                }
                Poll::Ready(None) => {
                    if this.ended_without_done(false) {
                        continue;
                    }
                    let why = match this.mode {
                        Mode::Chat { .. } => "the upstream stream ended before [DONE]",
                        Mode::Translated(_) | Mode::Messages { .. } => {
                            "the upstream stream ended before its last event"
                        }
                        Mode::Responses { .. } => {
                            "the upstream stream ended before its final event"
                        }
                    };
                    this.upstream_failed(why);
                    continue;
                }
                Poll::Pending => {}
            }
            if this.streams_end.poll(cx).is_ready() {
                this.end_for_the_stop();
                continue;
            }
            ready!(this.timer.poll(cx));
            let now = Instant::now();
            if now < this.silence_ends() {
                // Silent, but not for too long: a keep-alive when one is due.
                if let Some(at) = this.keep_alive_due()
                    && at <= now
                {
                    this.kept_alive = now;
                    this.timer.reset(this.next_alarm());
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(KEEP_ALIVE)))));
                }
                this.timer.reset(this.next_alarm());
                continue;
            }
            if let Some(pending) = this.pending.take() {
                // No first event in the wait an attempt would have given it (to the deadline:
                // no other backend could take it over): its model's failure, as at an attempt,
                // unless the deadline cut that wait short.
                this.ended(pending.ended_at(pending.event_by));
                this.interrupt("no first event came before the request's deadline");
            } else if now >= this.deadline {
                this.ended(None);
                // Sluice's own limit, not the upstream's doing.
                tracing::info!("a stream reached its stream_timeout and was ended");
                this.end_with_error(
                    "The stream ran for the longest this gateway allows (its stream_timeout \
                     setting) and was ended.",
                );
            } else {
                // A model's silence, as a timeout before the answer is (`Failure::health`):
                // a reasoning model thinking past the idle timeout must not take the
                // backend's other models out.
                this.ended(Some(Outcome::Failure {
                    retry_after: None,
                    scope: Scope::Model,
                }));
                this.interrupt("the upstream stream went silent");
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.upstream.is_none() && self.ready.is_empty() && self.last.is_none()
    }
}

/// What a Responses stream's terminal failure (`response.failed` with `response.error`, or
/// an `error` event with its `code`, flat or nested under `error`) says of its backend: a
/// failure of the backend (`server_error`), the model over its rate limit
/// (`rate_limit_exceeded`, `too_many_requests`), the account out of credit
/// (`insufficient_quota`, `credit_balance_exhausted`, or an error of type
/// `insufficient_quota`: the whole backend's, as its HTTP 429 is); `None` for anything else,
/// the request's own fault (`context_length_exceeded`, a content filter, `invalid_prompt`),
/// which is the backend answering. Counted an answer, a backend failing or limited in every
/// stream kept its share of traffic and never cooled down.
fn responses_failure(data: &str) -> Option<Outcome> {
    let event: serde_json::Value = serde_json::from_str(data).ok()?;
    let read = |at: &[&str]| {
        at.iter()
            .find_map(|at| event.pointer(at).and_then(serde_json::Value::as_str))
    };
    let out_of_credit = Outcome::RateLimited {
        retry_after: None,
        scope: Scope::Backend,
    };
    if read(&["/response/error/type", "/error/type"]) == Some("insufficient_quota") {
        return Some(out_of_credit);
    }
    match read(&["/response/error/code", "/code", "/error/code"])? {
        "server_error" => Some(Outcome::Failure {
            retry_after: None,
            scope: Scope::Backend,
        }),
        "rate_limit_exceeded" | "too_many_requests" => Some(Outcome::RateLimited {
            retry_after: None,
            scope: Scope::Model,
        }),
        "insufficient_quota" | "credit_balance_exhausted" => Some(out_of_credit),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A 2xx answer that cannot be given to the client in its API is an `Err` carrying the
    /// tokens its `usage` reports, either way; one that can carries them with its body.
    #[test]
    fn an_answer_that_cannot_be_translated_still_reports_its_tokens() {
        use crate::anthropic::stream::{ChunksFromEvents, EventsFromChunks};
        let for_messages = Translation::EventsFromChunks(EventsFromChunks::default());
        let bad_call = br#"{"id":"c","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"[1]"}}]},"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":5,"completion_tokens":7}}"#;
        let tokens = for_messages
            .whole(StatusCode::OK, bad_call, 0)
            .unwrap_err()
            .unwrap();
        assert_eq!((tokens.prompt, tokens.completion), (5, 7));
        assert_eq!(
            for_messages
                .whole(StatusCode::OK, b"<html>", 0)
                .unwrap_err(),
            None
        );
        let good = String::from_utf8_lossy(bad_call).replace("[1]", "{}");
        let (status, _, tokens) = for_messages
            .whole(StatusCode::OK, good.as_bytes(), 0)
            .unwrap();
        assert_eq!(
            (status, tokens.map(|t| t.completion)),
            (StatusCode::OK, Some(7))
        );

        let for_chat = Translation::ChatFromEvents(ChunksFromEvents::new(0, false));
        // Not a message (no `type`), though it says what it spent.
        let not_a_message =
            br#"{"id":"m","content":[],"usage":{"input_tokens":3,"output_tokens":4}}"#;
        let tokens = for_chat
            .whole(StatusCode::OK, not_a_message, 0)
            .unwrap_err()
            .unwrap();
        assert_eq!((tokens.prompt, tokens.completion), (3, 4));
    }

    /// Google's OpenAI-compatible endpoint counts a thinking model's thoughts in
    /// `total_tokens` alone, and bills them as output. A Messages client's stream translated
    /// from it is charged them as a chat client's identical stream is: completion 3 + 93
    /// thoughts, 93 of them reasoning; not the 3 visible tokens alone.
    #[test]
    fn googles_thoughts_are_charged_on_a_translated_stream_as_on_a_chat_stream() {
        use crate::anthropic::stream::EventsFromChunks;
        use crate::snapshot::Endpoint;
        let chunks = [
            r#"{"choices":[{"delta":{"content":"1","role":"assistant"},"index":0}],"created":1,"id":"x","model":"gemini-3-flash-preview","object":"chat.completion.chunk","usage":{"completion_tokens":1,"prompt_tokens":9,"total_tokens":103}}"#,
            r#"{"choices":[{"delta":{"content":", 2","role":"assistant"},"finish_reason":"length","index":0}],"created":1,"id":"x","model":"gemini-3-flash-preview","object":"chat.completion.chunk","usage":{"completion_tokens":3,"prompt_tokens":9,"total_tokens":105}}"#,
        ];
        for google in [true, false] {
            let mut chat = Some(Accounting::on_a_backend(Endpoint::ChatCompletions, google));
            let mut messages = Accounting::on_a_backend(Endpoint::Messages, google);
            let mut translation = Translation::EventsFromChunks(EventsFromChunks::default());
            let mut frames = Vec::new();
            for chunk in chunks {
                count_chat_usage(&mut chat, chunk, true, &mut false);
                let (_, usage) = translation.push(&event(None, chunk), &mut frames);
                messages.tokens(tokens_of(usage.unwrap()));
            }
            let charged = if google { (9, 96, 93) } else { (9, 3, 0) };
            let chat = chat.unwrap();
            assert_eq!(chat.recorded_tokens(), charged, "google: {google}");
            assert_eq!(messages.recorded_tokens(), charged, "google: {google}");
        }
    }

    fn event(name: Option<&str>, data: &str) -> Event {
        Event {
            event: name.map(str::to_owned),
            data: data.to_owned(),
            id: None,
        }
    }

    #[test]
    fn a_chunk_that_is_one_event_in_wire_form_is_passed_on_as_it_came() {
        let mut wire = BytesMut::new();
        let frames = |parser: &mut SseParser, wire: &mut BytesMut, chunk: &[u8]| {
            let chunk = Bytes::copy_from_slice(chunk);
            let mut items = Vec::new();
            let (parsed, mut whole) = parse(parser, chunk.clone(), &mut items);
            assert_eq!(parsed, Ok(()));
            let frames: Vec<Bytes> = items
                .iter()
                .filter_map(|item| match item {
                    Item::Event(event) => Some(wire_frame(wire, event, &mut whole)),
                    Item::Comment(_) => None,
                })
                .collect();
            let passed_on = frames.iter().any(|frame| frame.as_ptr() == chunk.as_ptr());
            (frames, passed_on)
        };
        let mut parser = SseParser::default();
        let written = b"data: {\"a\":1}\n\n";
        let (sent, passed_on) = frames(&mut parser, &mut wire, written);
        assert_eq!(sent, [&written[..]]);
        assert!(passed_on, "the same bytes, not a copy");
        // Any other form is written as Sluice writes events.
        for (chunk, expected) in [
            (&b"data:{\"a\":1}\n\n"[..], vec![&written[..]]),
            (b"data: {\"a\":1}\r\n\r\n", vec![written]),
            (
                b"data: {\"a\":1}\n\ndata: {\"a\":1}\n\n",
                vec![written, written],
            ),
            (b"data: a\ndata: b\n\n", vec![b"data: a\ndata: b\n\n"]),
        ] {
            let (sent, passed_on) = frames(&mut parser, &mut wire, chunk);
            assert_eq!(sent, expected, "{}", String::from_utf8_lossy(chunk));
            assert!(!passed_on);
        }
        // The end of an event begun in an earlier chunk is written too.
        assert_eq!(
            frames(&mut parser, &mut wire, b"data: {").0,
            [] as [&[u8]; 0]
        );
        let (sent, passed_on) = frames(&mut parser, &mut wire, b"data: x}\n\n");
        assert_eq!(sent, [&b"data: {data: x}\n\n"[..]]);
        assert!(!passed_on);
    }

    #[test]
    fn output_deltas_are_told_from_other_events_of_each_api() {
        for (name, data, output) in [
            (None, r#"{"choices":[{"delta":{"content":"Hel"}}]}"#, true),
            (
                None,
                r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
                false,
            ),
            (
                None,
                r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
                false,
            ),
            (None, r#"{"choices":[],"usage":{"prompt_tokens":1}}"#, false),
            (None, r#"{"choices":[{"text":" world","index":0}]}"#, true),
            (
                None,
                r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments": "{\"a"}}]}}]}"#,
                true,
            ),
            (None, r#"{"choices":[{"delta":{"content":null}}]}"#, false),
            // Reasoning streamed before the content: DeepSeek's, OpenRouter's.
            (
                None,
                r#"{"choices":[{"delta":{"content":null,"reasoning_content":"Let me"}}]}"#,
                true,
            ),
            (
                None,
                r#"{"choices":[{"delta":{"role":"assistant","reasoning":"Hmm"}}]}"#,
                true,
            ),
            (
                None,
                r#"{"choices":[{"delta":{"reasoning_details":[],"reasoning":""}}]}"#,
                false,
            ),
            // A spoken answer: its transcript beside the speech.
            (
                None,
                r#"{"choices":[{"delta":{"audio":{"id":"audio_1","transcript":"Hel"}}}]}"#,
                true,
            ),
            (Some("content_block_delta"), "{}", true),
            (
                Some("message_delta"),
                r#"{"usage":{"output_tokens":3}}"#,
                false,
            ),
            (Some("response.output_text.delta"), "{}", true),
            (Some("response.created"), r#"{"text":"x"}"#, false),
        ] {
            assert_eq!(
                is_output_delta(&event(name, data)),
                output,
                "{name:?} {data}"
            );
        }
    }

    /// [`is_output_delta`] for an OpenAI chunk as written with `str` searches: what the
    /// searchers built with [`JsonRank`] must agree with.
    fn is_output_delta_by_str_search(data: &str) -> bool {
        OUTPUT_KEY_NAMES.iter().any(|key| {
            data.match_indices(key).any(|(at, _)| {
                data[at + key.len()..]
                    .trim_start()
                    .strip_prefix(':')
                    .and_then(|value| value.trim_start().strip_prefix('"'))
                    .is_some_and(|string| !string.starts_with('"'))
            })
        })
    }

    proptest::proptest! {
        /// The keys' searchers find every occurrence `str` finds, whatever the chunk.
        #[test]
        fn the_output_key_searches_agree_with_str_searches(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "\"content\"", "\"text\"", "\"arguments\"", "\"refusal\"", "\"content",
                    "\"reasoning\"", "\"reasoning_content\"", "\"reasoning",
                    "content\"", "\"c", ":", " ", "\"", "\"\"", "x", "\\\"", "{", "}", ",",
                    "\"chatcmpl-1\"", "\"choices\"", "\u{e9}", "null",
                ]),
                0..32,
            ),
        ) {
            let data = pieces.concat();
            proptest::prop_assert_eq!(
                is_output_delta(&event(None, &data)),
                is_output_delta_by_str_search(&data),
                "{}",
                data
            );
        }
    }
}
