//! Fault injection: what the mock does instead of answering normally, and for how many requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

/// Something the mock does to a `/v1/...` request instead of answering it normally.
///
/// JSON (serde's external tagging, snake_case):
/// `{"status":{"code":429,"retry_after":{"seconds":2}}}`, `{"status":{"code":503}}`, `"reset"`,
/// `"stall"`, `{"delay_ms":2000}`, `{"queued_ms":2000}`, `{"thinking_ms":2000}`,
/// `{"cut_after_chunks":3}`, `{"garbage":"not_json"}` (or
/// `"invalid_sse"`, `"giant_line"`, `"bad_tool_call"`), `{"echo_key":{"code":401}}`,
/// `"request_too_large"`, `"key_invalid"`, `"xai_key_invalid"`, `"model_access_denied"`,
/// `{"body":{"code":404,"body":"{\"error\":…}"}}`, `{"page":{"code":301}}`, `{"stream_reset":7}`, `"go_away"`; a spec
/// may name the one `"model"` it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Answer with this status and an OpenAI-style error body (`rate_limit_exceeded` for 429,
    /// `server_error` for 5xx), plus the `Retry-After` / `retry-after-ms` headers if given.
    Status {
        code: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<RetryAfter>,
    },
    /// Read the request, then close the TCP connection with a RST and no response at all.
    Reset,
    /// Read the request and never answer, until the client gives up, the mock shuts down, or
    /// [`STALL_LIMIT`] passes (then the connection is closed without a response).
    Stall,
    /// Wait this many milliseconds (on top of the configured latency), then answer normally.
    /// A client that hangs up meanwhile gets nothing and is charged nothing: the request is
    /// dropped before its usage is counted.
    DelayMs(u64),
    /// A stream: its head at once, then an SSE comment (`: keep-alive`) every 100 ms for this
    /// many milliseconds before its first event, as DeepSeek answers a request waiting in its
    /// queue. A whole answer waits as with [`Fault::DelayMs`].
    QueuedMs(u64),
    /// A stream: its head at once, then nothing for this many milliseconds before its first
    /// event, as a reasoning model answers a streamed chat request (its first chunk comes with
    /// the answer's first token, once it has thought). A whole answer waits as with
    /// [`Fault::DelayMs`].
    ThinkingMs(u64),
    /// Send the response head and the first `k` SSE events (the role chunk counts as the first),
    /// then close the connection: no `[DONE]`, and the chunked body is left unterminated. A
    /// non-streaming request gets its `Content-Length` and only the first half of the JSON body.
    CutAfterChunks(usize),
    /// Answer 200 with a body the client cannot use.
    Garbage(GarbageKind),
    /// Answer with this status and an error whose message quotes the API key the request
    /// presented, as some providers do ("Incorrect API key provided: sk-…").
    EchoKey { code: u16 },
    /// Answer 429 as OpenAI does a request whose tokens alone pass the organization's tokens
    /// per minute ("Request too large for … Limit 30000, Requested 61337"): no `Retry-After`,
    /// and waiting does not help.
    RequestTooLarge,
    /// Answer 400 as Google's OpenAI-compatible endpoint answers a request whose API key is
    /// revoked, expired or mistyped: `"API key not valid. Please pass a valid API key."`,
    /// status `INVALID_ARGUMENT`, reason `API_KEY_INVALID`, in a list of one error.
    KeyInvalid,
    /// Answer 400 as xAI answers a request whose API key is revoked or mistyped: a top-level
    /// `error` string, "Incorrect API key provided: xa***Ju. You can obtain an API key from
    /// https://console.x.ai." (the presented key's first and last two characters), beside
    /// `"code": "Client specified an invalid argument"`.
    XaiKeyInvalid,
    /// Answer 400 as Anthropic answers every request of an account out of credit:
    /// `invalid_request_error`, "Your credit balance is too low to access the Anthropic API…",
    /// in Anthropic's error shape (on any route).
    OutOfCredit,
    /// Answer 402 as OpenRouter answers a request its account could pay with fewer
    /// `max_tokens` ("This request requires more credits, or fewer max_tokens. You requested up
    /// to 4096 tokens, but can only afford 1000."): the request's size, not the account.
    Unaffordable,
    /// Answer 403 as OpenAI answers a project without access to the requested model:
    /// `model_not_found`, "Project `proj_…` does not have access to model `…`".
    ModelAccessDenied,
    /// HTTP/2: read the request, then reset its stream (`RST_STREAM`) with this error code,
    /// sending no answer: 7 (`REFUSED_STREAM`) says the server did not process it, as a server
    /// at its streams' limit refuses one; 2 (`INTERNAL_ERROR`) or 8 (`CANCEL`) leave it unsaid.
    /// HTTP/1.1 has no streams: the connection is closed with a RST, as [`Fault::Reset`].
    StreamReset(u32),
    /// HTTP/2 over TLS: a new connection is sent, once its first request's `HEADERS` came, a
    /// `GOAWAY` with `NO_ERROR` whose last stream id (0) leaves that request out, then
    /// closed: what a server recycling its connections (nginx, Envoy, Go's) tells the streams
    /// it will not process. Taken by the connection, before any request is counted; a request
    /// that meets it on a connection already open (or over HTTP/1.1) gets [`Fault::Reset`].
    GoAway,
    /// Answer with this status and this body, as `application/json` (or as
    /// `text/event-stream` when it starts with `data:` or `event:`): what a server that is not OpenAI
    /// answers, its errors and figures in its own shape (Gemini's, TGI's, Ollama's, Groq's).
    Body { code: u16, body: String },
    /// Answer with this status and an HTML page, as something other than the API would: a
    /// web server redirecting (3xx, with a `Location` to the same path over https), a
    /// TLS-intercepting proxy's block or login page (200).
    Page { code: u16 },
    /// Answer with this status and a body that never ends, one space every `every_ms`: an
    /// error page a broken server or proxy trickles out, never silent for long.
    Trickle { code: u16, every_ms: u64 },
}

/// How long a [`Fault::Stall`] holds a request at most.
pub const STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// The kinds of unusable 200 bodies [`Fault::Garbage`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GarbageKind {
    /// `content-type: application/json` with an HTML error page as the body.
    NotJson,
    /// `content-type: text/event-stream` with broken events (truncated JSON, a line that is not
    /// SSE, a chunk with wrong field types) and no `[DONE]`.
    InvalidSse,
    /// `content-type: text/event-stream` and one line `data: xxxx…` of 8 MiB with no newline.
    GiantLine,
    /// `content-type: text/event-stream` and no byte: the body ends at once.
    EmptyStream,
    /// `content-type: application/json` with a chat completion calling a tool whose arguments
    /// are not a JSON object (an array), with its `usage` (5 prompt and 5 completion tokens):
    /// valid chat, but no `tool_use` a Messages client could be given.
    BadToolCall,
}

/// The retry hints sent with a [`Fault::Status`].
///
/// JSON: `{"seconds":2}` (`Retry-After: 2`), `{"seconds":2,"as_http_date":true}`
/// (`Retry-After: <HTTP date now + 2 s>`), `{"millis":1500}` (`retry-after-ms: 1500`), or both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryAfter {
    /// Sends `Retry-After` with this many seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<u64>,
    /// Sends `Retry-After` as an HTTP date (now + `seconds`) instead of a number.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub as_http_date: bool,
    /// Sends `retry-after-ms` with this many milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub millis: Option<u64>,
}

impl RetryAfter {
    /// `Retry-After: <secs>`.
    pub fn seconds(secs: u64) -> Self {
        Self {
            seconds: Some(secs),
            ..Self::default()
        }
    }

    /// `Retry-After: <HTTP date secs from now>`.
    pub fn http_date(secs: u64) -> Self {
        Self {
            seconds: Some(secs),
            as_http_date: true,
            millis: None,
        }
    }

    /// `retry-after-ms: <ms>` only.
    pub fn millis(ms: u64) -> Self {
        Self {
            millis: Some(ms),
            ..Self::default()
        }
    }

    /// Also send `retry-after-ms: <ms>`.
    pub fn with_millis(mut self, ms: u64) -> Self {
        self.millis = Some(ms);
        self
    }
}

/// A fault and how many requests it applies to.
///
/// JSON: `{"fault": <Fault>, "count": 3}`; `count` absent or `null` = every request until
/// cleared; `"model": "m"` applies it to requests for that model alone (as providers limit
/// each model apart).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSpec {
    pub fault: Fault,
    #[serde(default)]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl FaultSpec {
    /// Only for requests for `model`.
    pub fn for_model(mut self, model: &str) -> Self {
        self.model = Some(model.to_owned());
        self
    }
}

impl Fault {
    /// This fault for the next `n` requests.
    pub fn times(self, n: u64) -> FaultSpec {
        FaultSpec {
            fault: self,
            count: Some(n),
            model: None,
        }
    }

    /// This fault for every request until the faults are cleared.
    pub fn always(self) -> FaultSpec {
        FaultSpec {
            fault: self,
            count: None,
            model: None,
        }
    }

    /// A 429 `rate_limit_exceeded` with `Retry-After: <secs>`.
    pub fn rate_limited(secs: u64) -> Self {
        Fault::Status {
            code: 429,
            retry_after: Some(RetryAfter::seconds(secs)),
        }
    }

    /// A bare status with its OpenAI-style error body.
    pub fn status(code: u16) -> Self {
        Fault::Status {
            code,
            retry_after: None,
        }
    }
}

impl From<Fault> for FaultSpec {
    /// A bare fault applies until cleared.
    fn from(fault: Fault) -> Self {
        fault.always()
    }
}

/// What `GET /_mock/faults` shows: the plan in order, with what is left of each count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultStatus {
    pub fault: Fault,
    /// Requests this fault still applies to; `None` = until cleared.
    pub remaining: Option<u64>,
}

struct ActiveFault {
    fault: Fault,
    remaining: Option<AtomicU64>,
    model: Option<String>,
}

/// The fault plan: faults tried in order, each consumed by a count. Lock-free for requests.
pub(crate) struct FaultPlan {
    plan: ArcSwap<Vec<ActiveFault>>,
}

impl FaultPlan {
    pub(crate) fn new() -> Self {
        Self {
            plan: ArcSwap::from_pointee(Vec::new()),
        }
    }

    pub(crate) fn set(&self, specs: Vec<FaultSpec>) {
        let plan = specs
            .into_iter()
            .map(|s| ActiveFault {
                fault: s.fault,
                remaining: s.count.map(AtomicU64::new),
                model: s.model,
            })
            .collect();
        self.plan.store(Arc::new(plan));
    }

    pub(crate) fn clear(&self) {
        self.set(Vec::new());
    }

    /// The fault for the request being served (for `model`, if it names one), consuming one
    /// unit of its count.
    pub(crate) fn take(&self, model: Option<&str>) -> Option<Fault> {
        let plan = self.plan.load();
        for f in plan.iter() {
            if f.model.is_some() && f.model.as_deref() != model {
                continue;
            }
            match &f.remaining {
                None => return Some(f.fault.clone()),
                Some(r) => {
                    if r.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        return Some(f.fault.clone());
                    }
                }
            }
        }
        None
    }

    /// Whether a new HTTP/2 connection is to be sent a [`Fault::GoAway`]: the plan's first
    /// fault for any model, with some count left, is one (a unit of its count is consumed).
    pub(crate) fn take_go_away(&self) -> bool {
        let plan = self.plan.load();
        let Some(first) = plan.iter().find(|f| {
            f.model.is_none()
                && f.remaining
                    .as_ref()
                    .is_none_or(|r| r.load(Ordering::Acquire) > 0)
        }) else {
            return false;
        };
        first.fault == Fault::GoAway
            && first.remaining.as_ref().is_none_or(|r| {
                r.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                    .is_ok()
            })
    }

    pub(crate) fn status(&self) -> Vec<FaultStatus> {
        self.plan
            .load()
            .iter()
            .map(|f| FaultStatus {
                fault: f.fault.clone(),
                remaining: f.remaining.as_ref().map(|r| r.load(Ordering::Acquire)),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn counts_are_consumed_in_order_then_healthy() {
        let plan = FaultPlan::new();
        plan.set(vec![Fault::status(500).times(1), Fault::Reset.times(2)]);
        assert_eq!(plan.take(None), Some(Fault::status(500)));
        assert_eq!(plan.take(None), Some(Fault::Reset));
        assert_eq!(plan.take(None), Some(Fault::Reset));
        assert_eq!(plan.take(None), None);
        plan.set(vec![Fault::Stall.always()]);
        assert_eq!(plan.take(None), Some(Fault::Stall));
        assert_eq!(plan.take(None), Some(Fault::Stall));
        plan.clear();
        assert_eq!(plan.take(None), None);
        // A fault for one model leaves the others alone.
        plan.set(vec![Fault::status(429).always().for_model("a")]);
        assert_eq!(plan.take(Some("b")), None);
        assert_eq!(plan.take(None), None);
        assert_eq!(plan.take(Some("a")), Some(Fault::status(429)));
    }

    #[test]
    fn json_shapes() {
        let spec: FaultSpec = serde_json::from_str(
            r#"{"fault":{"status":{"code":429,"retry_after":{"seconds":2,"millis":1500}}},"count":3}"#,
        )
        .unwrap();
        assert_eq!(
            spec,
            Fault::Status {
                code: 429,
                retry_after: Some(RetryAfter::seconds(2).with_millis(1500))
            }
            .times(3)
        );
        let spec: FaultSpec = serde_json::from_str(r#"{"fault":"reset"}"#).unwrap();
        assert_eq!(spec, Fault::Reset.always());
        let spec: FaultSpec =
            serde_json::from_str(r#"{"fault":{"cut_after_chunks":2},"count":1}"#).unwrap();
        assert_eq!(spec, Fault::CutAfterChunks(2).times(1));
        let spec: FaultSpec =
            serde_json::from_str(r#"{"fault":{"garbage":"giant_line"}}"#).unwrap();
        assert_eq!(spec, Fault::Garbage(GarbageKind::GiantLine).always());
        let spec: FaultSpec = serde_json::from_str(r#"{"fault":{"delay_ms":250}}"#).unwrap();
        assert_eq!(spec, Fault::DelayMs(250).always());
        assert_eq!(
            serde_json::to_string(&Fault::rate_limited(1)).unwrap(),
            r#"{"status":{"code":429,"retry_after":{"seconds":1}}}"#
        );
    }
}
