//! What the mock served, counted with atomics so that counting costs requests almost nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

/// A snapshot of the mock's counters (`GET /_mock/stats` returns it as JSON).
///
/// ```json
/// {"requests":{"chat_completions":3,"completions":0,"embeddings":1,"models":0,"other":0},
///  "responses":{"200":3,"429":1},"connections":2,
///  "streams_started":2,"streams_completed":1,"streams_cut":1,"streams_aborted":0,
///  "prompt_tokens":12,"completion_tokens":10,"faults_applied":2,"resets":0,"stalls":0,
///  "models":{"gpt-4o-mini":4}}
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MockStats {
    /// `/v1/...` requests received, by endpoint (faulted and rejected ones included).
    pub requests: EndpointCounts,
    /// `/v1/...` responses sent, by HTTP status (faults included; resets and stalls send none).
    pub responses: BTreeMap<u16, u64>,
    /// TCP connections accepted.
    pub connections: u64,
    /// `/v1/...` requests received over HTTP/2 (of [`MockStats::requests`]).
    #[serde(default)]
    pub http2_requests: u64,
    /// Streams reset by [`Fault::StreamReset`](super::Fault::StreamReset) (over HTTP/2).
    #[serde(default)]
    pub stream_resets: u64,
    /// `GOAWAY`s sent by [`Fault::GoAway`](super::Fault::GoAway).
    #[serde(default)]
    pub go_aways: u64,
    /// SSE responses begun.
    pub streams_started: u64,
    /// SSE responses that sent `data: [DONE]`.
    pub streams_completed: u64,
    /// SSE responses cut by [`Fault::CutAfterChunks`](super::Fault::CutAfterChunks).
    pub streams_cut: u64,
    /// SSE responses the client walked away from before the end.
    pub streams_aborted: u64,
    /// Sum of `usage.prompt_tokens` over every usage object sent (JSON bodies and stream usage chunks).
    pub prompt_tokens: u64,
    /// Sum of `usage.completion_tokens` over every usage object sent.
    pub completion_tokens: u64,
    /// Sum of the cached input tokens of every usage sent.
    #[serde(default)]
    pub cached_tokens: u64,
    /// Sum of the reasoning tokens of every usage sent.
    #[serde(default)]
    pub reasoning_tokens: u64,
    /// Requests answered by a fault instead of normally.
    pub faults_applied: u64,
    /// Connections closed by [`Fault::Reset`](super::Fault::Reset).
    pub resets: u64,
    /// Requests held by [`Fault::Stall`](super::Fault::Stall).
    pub stalls: u64,
    /// Requests per `model` string received (the upstream name as the gateway sent it; counted for
    /// every parsed request that named one, faulted or not).
    pub models: BTreeMap<String, u64>,
}

impl MockStats {
    /// Responses sent with this status.
    pub fn responses_with(&self, status: u16) -> u64 {
        self.responses.get(&status).copied().unwrap_or(0)
    }

    /// Requests that named this model.
    pub fn model_requests(&self, model: &str) -> u64 {
        self.models.get(model).copied().unwrap_or(0)
    }
}

/// Requests by endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCounts {
    /// `POST /v1/chat/completions`
    pub chat_completions: u64,
    /// `POST /v1/completions`
    pub completions: u64,
    /// `POST /v1/embeddings`
    pub embeddings: u64,
    /// `GET /v1/models` and `GET /v1/models/{id}`
    pub models: u64,
    /// Any other `/v1/...` path or method.
    pub other: u64,
    /// `/v1/responses` and `/v1/responses/{id}[/input_items|/cancel]`
    #[serde(default)]
    pub responses: u64,
    /// `POST /v1/messages` and `POST /v1/messages/count_tokens` (Anthropic's API)
    #[serde(default)]
    pub messages: u64,
}

impl EndpointCounts {
    /// All `/v1/...` requests.
    pub fn total(&self) -> u64 {
        self.chat_completions
            + self.completions
            + self.embeddings
            + self.models
            + self.other
            + self.responses
            + self.messages
    }
}

/// The endpoints the mock tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    ChatCompletions = 0,
    Completions = 1,
    Embeddings = 2,
    Models = 3,
    Other = 4,
    Responses = 5,
    Messages = 6,
}

/// Distinct model names remembered; more are counted under [`OTHER_MODELS`].
const MAX_MODELS: usize = 10_000;
/// Where requests for models beyond [`MAX_MODELS`] distinct names are counted.
pub const OTHER_MODELS: &str = "<other>";

#[derive(Default)]
pub(crate) struct Counters {
    requests: [AtomicU64; 7],
    /// Indexed by status code; codes are 100..=999.
    responses: Vec<AtomicU64>,
    pub(crate) connections: AtomicU64,
    pub(crate) http2_requests: AtomicU64,
    pub(crate) stream_resets: AtomicU64,
    pub(crate) go_aways: AtomicU64,
    pub(crate) streams_started: AtomicU64,
    pub(crate) streams_completed: AtomicU64,
    pub(crate) streams_cut: AtomicU64,
    pub(crate) streams_aborted: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    reasoning_tokens: AtomicU64,
    pub(crate) faults_applied: AtomicU64,
    pub(crate) resets: AtomicU64,
    pub(crate) stalls: AtomicU64,
    models: ArcSwap<HashMap<String, Arc<AtomicU64>>>,
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn new() -> Self {
        Self {
            responses: (0..1000).map(|_| AtomicU64::new(0)).collect(),
            ..Self::default()
        }
    }

    pub(crate) fn request(&self, endpoint: Endpoint) {
        bump(&self.requests[endpoint as usize]);
    }

    pub(crate) fn response(&self, status: u16) {
        if let Some(c) = self.responses.get(usize::from(status)) {
            bump(c);
        }
    }

    pub(crate) fn usage(&self, prompt_tokens: u64, completion_tokens: u64) {
        self.prompt_tokens
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion_tokens, Ordering::Relaxed);
    }

    /// Of the tokens just counted by [`Counters::usage`], those read from the cache and those
    /// spent on reasoning.
    pub(crate) fn detail(&self, cached_tokens: u64, reasoning_tokens: u64) {
        self.cached_tokens
            .fetch_add(cached_tokens, Ordering::Relaxed);
        self.reasoning_tokens
            .fetch_add(reasoning_tokens, Ordering::Relaxed);
    }

    pub(crate) fn model(&self, model: &str) {
        if let Some(c) = self.models.load().get(model) {
            bump(c);
            return;
        }
        // First time this name is seen: copy-on-write insert (rare; requests only ever read).
        let mut counter = None;
        self.models.rcu(|map| {
            let mut map = HashMap::clone(map);
            let key = if map.len() < MAX_MODELS || map.contains_key(model) {
                model
            } else {
                OTHER_MODELS
            };
            counter = Some(Arc::clone(map.entry(key.to_owned()).or_default()));
            map
        });
        if let Some(c) = counter {
            bump(&c);
        }
    }

    pub(crate) fn snapshot(&self) -> MockStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let r = |e: Endpoint| get(&self.requests[e as usize]);
        MockStats {
            requests: EndpointCounts {
                chat_completions: r(Endpoint::ChatCompletions),
                completions: r(Endpoint::Completions),
                embeddings: r(Endpoint::Embeddings),
                models: r(Endpoint::Models),
                other: r(Endpoint::Other),
                responses: r(Endpoint::Responses),
                messages: r(Endpoint::Messages),
            },
            responses: self
                .responses
                .iter()
                .enumerate()
                .filter_map(|(code, c)| {
                    let n = get(c);
                    (n > 0).then(|| (u16::try_from(code).unwrap_or(0), n))
                })
                .collect(),
            connections: get(&self.connections),
            http2_requests: get(&self.http2_requests),
            stream_resets: get(&self.stream_resets),
            go_aways: get(&self.go_aways),
            streams_started: get(&self.streams_started),
            streams_completed: get(&self.streams_completed),
            streams_cut: get(&self.streams_cut),
            streams_aborted: get(&self.streams_aborted),
            prompt_tokens: get(&self.prompt_tokens),
            completion_tokens: get(&self.completion_tokens),
            cached_tokens: get(&self.cached_tokens),
            reasoning_tokens: get(&self.reasoning_tokens),
            faults_applied: get(&self.faults_applied),
            resets: get(&self.resets),
            stalls: get(&self.stalls),
            models: self
                .models
                .load()
                .iter()
                .map(|(k, v)| (k.clone(), get(v)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }

    pub(crate) fn reset(&self) {
        let zero = |c: &AtomicU64| c.store(0, Ordering::Relaxed);
        self.requests.iter().for_each(zero);
        self.responses.iter().for_each(zero);
        for c in [
            &self.connections,
            &self.http2_requests,
            &self.stream_resets,
            &self.go_aways,
            &self.streams_started,
            &self.streams_completed,
            &self.streams_cut,
            &self.streams_aborted,
            &self.prompt_tokens,
            &self.completion_tokens,
            &self.cached_tokens,
            &self.reasoning_tokens,
            &self.faults_applied,
            &self.resets,
            &self.stalls,
        ] {
            zero(c);
        }
        self.models.store(Arc::default());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn snapshot_round_trips_through_json_and_reset_zeroes() {
        let c = Counters::new();
        c.request(Endpoint::ChatCompletions);
        c.response(200);
        c.response(429);
        c.response(429);
        c.usage(3, 5);
        c.model("a");
        c.model("a");
        c.model("b");
        let s = c.snapshot();
        assert_eq!(s.requests.chat_completions, 1);
        assert_eq!(s.responses_with(429), 2);
        assert_eq!((s.prompt_tokens, s.completion_tokens), (3, 5));
        assert_eq!(s.model_requests("a"), 2);
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""responses":{"200":1,"429":2}"#), "{json}");
        assert_eq!(serde_json::from_str::<MockStats>(&json).unwrap(), s);
        c.reset();
        assert_eq!(c.snapshot(), MockStats::default());
    }
}
