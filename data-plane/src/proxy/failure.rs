//! What an upstream's answer says: the failures an attempt meets ([`Failure`]) and what each
//! tells of its backend's health, and the words providers answer in read for it (a model or
//! a key refused, an account out of quota or credit, an overload, a wait named in the body, an
//! error as a stream's first event).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::answer_memory::Full;
use crate::cooldown::{self, Outcome, Scope};
use crate::metrics::AttemptOutcome;
use crate::redact::redact_error;
use crate::snapshot::Policy;

/// Whether a 429's body says the request alone passes the provider's limit, which waiting
/// does not fix: OpenAI's "Request too large for gpt-4o in organization … on tokens per min
/// (TPM): Limit 30000, Requested 61337". The backend is not overloaded and does not cool down
/// (one client resending such a request would otherwise keep every backend it is tried on
/// cooling, for everyone); another backend, perhaps of an organization with more room, is
/// still tried.
pub(super) fn refuses_the_request_itself(body: &[u8]) -> bool {
    memchr::memmem::find(body, b"Request too large for").is_some()
}

/// A 429 ([`refuses_the_request_itself`]), or Groq's 413 in the same words, refusing a
/// request that alone passes the provider's per-minute limit.
pub(super) fn too_large_for_the_limit(status: StatusCode, body: &[u8]) -> bool {
    matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::PAYLOAD_TOO_LARGE
    ) && refuses_the_request_itself(body)
}

/// Why an attempt failed before anything reached the client.
#[derive(Debug)]
pub(super) enum Failure {
    /// 429 or 5xx, with what is needed to pass it on. `in_body`: said in the body of a 2xx
    /// whole answer ([`error_in_answer`]): the backend answered, the model failed, so it
    /// counts against the model alone.
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
        content_type: Option<HeaderValue>,
        body: Bytes,
        in_body: bool,
    },
    /// The connection could not be made (or closed before the request was written): the
    /// provider never saw the request.
    Connect(String),
    /// The connection broke after the request was (or may have been) written, before the
    /// answer's head or a stream's first event: the provider may be generating it, and
    /// billing it. Another backend is tried as after a connect error
    /// (`retry_on_connect_error`), but the attempt's reserve stays charged, as a timeout's
    /// does, and a client left without an answer is told not to send it again.
    Lost(String),
    /// The answer did not come in time (a connect timeout is a connect error). The model's
    /// slowness (`of_model`) when the wait was for a whole answer's head or a stream's first
    /// event, which come once the model has thought; the backend's when a stream's head did
    /// not come, which a provider sends once it has taken the request.
    Timeout { of_model: bool },
    /// The request's own deadline passed while the attempt waited for its answer (its head,
    /// a stream's first event, a whole answer's body) before its own wait was over (an
    /// attempt after slow failures gets what is left of it): not the backend's slowness, so
    /// nothing of its health, and no time for another attempt. Billed as a timeout is.
    Deadline,
    /// A broken or oversized body.
    Invalid(String),
    /// Something other than the backend's API answered: a redirect (never followed: it
    /// would carry the key to another host; a base URL on `http://` behind an https redirect,
    /// a moved host), an egress proxy's 407, a web page as a 2xx (a TLS-intercepting proxy's
    /// block or login page, a base URL naming a web site). The provider never saw the
    /// request: nothing billed, tried elsewhere as after a connect error, the backend's
    /// failure.
    NotTheApi(String),
    /// 401 or 403: the backend refused the credentials Sluice holds for it (a revoked or
    /// mistyped provider key, a project without access). Nothing the client can fix: the
    /// next backend is tried, the failure counts towards the backend's cooldown, and a client
    /// every backend refused gets 502 `upstream_auth_failed`, not the provider's 401 (which
    /// the SDKs report as the client's own key being wrong) nor its body (which names the
    /// provider account). Also an account out of credit (`unfunded`): 402 (DeepSeek,
    /// OpenRouter, Mistral, Anthropic's `billing_error`), or Anthropic's 400 "Your credit
    /// balance is too low": a backend that cannot serve anyone, not the client's mistake.
    /// Or the model refused to the backend's account (OpenAI's 403 "Project … does not have
    /// access to model", a 404 `model_not_found`, an Azure deployment not found): failed over
    /// too, counted towards that model's cooldown at the backend alone, and 502
    /// `upstream_model_unavailable` when no backend serves it.
    Refused { status: StatusCode, why: Refusal },
    /// The answer came, but the whole answers held in memory reached
    /// `--max-buffered-answer-bytes`, or those to the request's key its share of it, while it
    /// was read: 503 `server_busy`. Not the backend's failure, and not asked of another (it
    /// has answered). With the text of the answer's top-level `usage`, read from the rest of
    /// it without keeping it, when it had one (a successful answer, read to its end).
    MemoryFull(Full, Option<Vec<u8>>),
    /// This replica is out of file descriptors (`EMFILE`, `ENFILE`): it could not open the
    /// upstream connection. Its own state, not the backend's: 503 `server_busy`, no other
    /// backend tried (each would fail the same), no cooldown.
    OutOfFiles,
    /// The answer's head came (a status neither 429 nor 5xx), then its body broke, stalled
    /// (`timeout`) or passed the size limit. The provider has generated, and billed, the
    /// answer: it is not asked of another backend (no retry after the first byte), nor by
    /// the client's SDK (`forward::error_after_billing`). With the text of the answer's
    /// top-level `usage` when it was cut for its size and read on for it
    /// (`forward::read_body`).
    Cut {
        timeout: bool,
        detail: String,
        usage: Option<Vec<u8>>,
    },
}

/// What a backend's refusal ([`Failure::Refused`]) was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The backend's key.
    Key,
    /// The provider account's credit.
    Unfunded,
    /// The model, to the backend's account.
    Model,
    /// A model the request's tools call on (not the routed one), to the backend's account:
    /// failed over, but counted against nothing, as the client's request drew it.
    Feature,
}

impl Failure {
    /// Whether the backend said it is only busy, and so frees up at its cooldown's end: a 429
    /// (not OpenAI's account out of credit, `insufficient_quota`, which no wait ends) or a
    /// 503 that said when to come back.
    pub(super) fn says_when_free(&self) -> bool {
        match self {
            Self::Status { status, body, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                !out_of_quota(body)
            }
            Self::Status {
                status,
                retry_after,
                ..
            } => *status == StatusCode::SERVICE_UNAVAILABLE && retry_after.is_some(),
            _ => false,
        }
    }

    /// What the failure says of the backend's health; `None`: nothing (this replica's own).
    pub(super) fn health(&self) -> Option<Outcome> {
        if matches!(self, Self::OutOfFiles | Self::Deadline) {
            return None;
        }
        Some(match self {
            Self::Status { status, body, .. } if too_large_for_the_limit(*status, body) => {
                Outcome::Success
            }
            Self::Status {
                status,
                retry_after,
                body,
                ..
            } if *status == StatusCode::TOO_MANY_REQUESTS => Outcome::RateLimited {
                retry_after: *retry_after,
                // Providers limit each model apart; a spent account is spent for all.
                scope: match out_of_quota(body) {
                    true => Scope::Backend,
                    false => Scope::Model,
                },
            },
            // A call the backend does not serve (`count_tokens`, legacy completions or
            // embeddings at a server without them): the backend answered.
            Self::Status { status, .. } if status.is_client_error() => Outcome::Success,
            Self::MemoryFull(..) => Outcome::Success,
            // A 503 (or any 5xx) may say when to come back, as a 429 does. A model overloaded
            // is that model's: providers overload one model while serving the others.
            Self::Status {
                retry_after,
                body,
                in_body,
                ..
            } => Outcome::Failure {
                retry_after: *retry_after,
                scope: match *in_body || model_overloaded(body) {
                    true => Scope::Model,
                    false => Scope::Backend,
                },
            },
            Self::Refused {
                why: Refusal::Model,
                ..
            } => Outcome::Failure {
                retry_after: None,
                scope: Scope::Model,
            },
            // The backend answered; the client's tools asked for what its account lacks.
            Self::Refused {
                why: Refusal::Feature,
                ..
            } => Outcome::Success,
            // A model thinking, or queued, for longer than the settings allow must not take
            // the backend's other models out; a backend that does not even answer a stream's
            // head is down for every model.
            Self::Timeout { of_model } => Outcome::Failure {
                retry_after: None,
                scope: match of_model {
                    true => Scope::Model,
                    false => Scope::Backend,
                },
            },
            _ => Outcome::Failure {
                retry_after: None,
                scope: Scope::Backend,
            },
        })
    }

    pub(super) fn retryable(&self, policy: &Policy) -> bool {
        match self {
            // An account out of credit, as a 402 is: always, whatever `retry_on_rate_limit`
            // says (not a rate limit another backend would meet too).
            Self::Status { status, body, .. }
                if *status == StatusCode::TOO_MANY_REQUESTS && out_of_quota(body) =>
            {
                true
            }
            Self::Status { status, body, .. }
                if *status == StatusCode::TOO_MANY_REQUESTS
                    || too_large_for_the_limit(*status, body) =>
            {
                policy.retry_on_rate_limit
            }
            // A call the backend does not serve: another may.
            Self::Status { status, .. } if status.is_client_error() => true,
            Self::Status { .. } => policy.retry_on_server_error,
            Self::Refused { .. } => true,
            Self::Connect(_) | Self::Lost(_) | Self::Invalid(_) | Self::NotTheApi(_) => {
                policy.retry_on_connect_error
            }
            Self::Timeout { .. } => policy.retry_on_timeout,
            Self::Cut { .. } | Self::MemoryFull(..) | Self::OutOfFiles | Self::Deadline => false,
        }
    }

    /// A backend's 404 or 405 to a call it does not serve at all (`count_tokens`, legacy
    /// completions, embeddings): another backend may serve it.
    pub(super) fn lacks_endpoint(&self) -> bool {
        matches!(self, Self::Status { status, .. }
            if matches!(*status, StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED))
    }

    /// A failure reading the body of an answer whose head came.
    pub(super) fn cut(failure: Failure) -> Failure {
        match failure {
            Self::Timeout { .. } => Self::Cut {
                timeout: true,
                detail: "no byte of the answer within the idle timeout".into(),
                usage: None,
            },
            Self::Invalid(detail) | Self::Connect(detail) | Self::Lost(detail) => Self::Cut {
                timeout: false,
                detail,
                usage: None,
            },
            other => other,
        }
    }

    pub(super) fn metric_outcome(&self) -> AttemptOutcome {
        match self {
            Self::Status { status, body, .. }
                if *status == StatusCode::TOO_MANY_REQUESTS
                    || too_large_for_the_limit(*status, body) =>
            {
                AttemptOutcome::rate_limited
            }
            Self::Status { .. } if self.lacks_endpoint() => AttemptOutcome::not_served,
            Self::Status { status, .. } if status.is_client_error() => AttemptOutcome::ok,
            Self::Status { .. } => AttemptOutcome::server_error,
            Self::Refused { .. } => AttemptOutcome::auth_error,
            Self::Connect(_) | Self::Lost(_) => AttemptOutcome::connect_error,
            Self::Timeout { .. } | Self::Deadline | Self::Cut { timeout: true, .. } => {
                AttemptOutcome::timeout
            }
            Self::Invalid(_) | Self::NotTheApi(_) | Self::Cut { timeout: false, .. } => {
                AttemptOutcome::invalid_response
            }
            // The backend answered.
            Self::MemoryFull(..) => AttemptOutcome::ok,
            Self::OutOfFiles => AttemptOutcome::local_error,
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Self::Status { status, .. } => format!("status {}", status.as_u16()),
            Self::Refused {
                status,
                why: Refusal::Key,
            } => format!("credentials refused: status {}", status.as_u16()),
            Self::Refused {
                status,
                why: Refusal::Unfunded,
            } => format!("account out of credit: status {}", status.as_u16()),
            Self::Refused {
                status,
                why: Refusal::Model,
            } => format!(
                "the model refused to the backend's account: status {}",
                status.as_u16()
            ),
            Self::Refused {
                status,
                why: Refusal::Feature,
            } => format!(
                "a model the request's tools use refused to the backend's account: status {}",
                status.as_u16()
            ),
            Self::Connect(e) => format!("connect: {e}"),
            Self::Lost(e) => format!("connection lost after the request was sent: {e}"),
            Self::Timeout { .. } => "timeout before the first byte".to_owned(),
            Self::Deadline => "the request's deadline passed before the answer".to_owned(),
            Self::Invalid(e) => format!("invalid response: {e}"),
            Self::NotTheApi(e) => format!("not the API: {e}"),
            Self::Cut { detail, .. } => format!("answer cut after its head: {detail}"),
            Self::MemoryFull(Full::Replica, _) => {
                "answer refused: --max-buffered-answer-bytes held".to_owned()
            }
            Self::MemoryFull(Full::Key, _) => {
                "answer refused: the key's share of --max-buffered-answer-bytes held".to_owned()
            }
            Self::OutOfFiles => "this replica is out of file descriptors".to_owned(),
        }
    }
}

/// Whether a 429's body is OpenAI's account out of credit (`insufficient_quota`), not a rate
/// limit: the whole backend's, and no wait ends it.
pub(super) fn out_of_quota(body: &[u8]) -> bool {
    memchr::memmem::find(body, b"insufficient_quota").is_some()
}

/// Whether a 402's body says the request would be paid for with fewer tokens (OpenRouter:
/// "This request requires more credits, or fewer max_tokens. You requested up to N tokens, but
/// can only afford M."): the client's to fix, passed on as it came.
pub(super) fn fewer_tokens_would_do(body: &[u8]) -> bool {
    memchr::memmem::find(body, b"fewer max_tokens").is_some()
        || memchr::memmem::find(body, b"can only afford").is_some()
}

/// Whether a 400's body is Anthropic saying the account behind the backend is out of credit
/// (`invalid_request_error`, "Your credit balance is too low to access the Anthropic API"):
/// read in its `error.message`, not anywhere in the body, so that a message quoting what the
/// client sent cannot pass for it.
pub(super) fn out_of_credit(body: &[u8]) -> bool {
    const TOO_LOW: &str = "credit balance is too low";
    if memchr::memmem::find(body, TOO_LOW.as_bytes()).is_none() {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message")?.as_str().map(str::to_owned))
        .is_some_and(|message| message.contains(TOO_LOW))
}

/// Whether a 403's or 404's body is the provider refusing a model to the backend's account,
/// not its key: the routed model ([`Refusal::Model`]: OpenAI's `model_not_found`, 403 "Project
/// `proj_…` does not have access to model `gpt-4.1`" or 404 "The model `x` does not exist or
/// you do not have access to it"; Azure's `DeploymentNotFound`; Anthropic's `not_found_error`
/// "model: x"; Ollama's "model 'x' not found", vLLM's "The model `x` does not exist.",
/// Google's `NOT_FOUND` "models/x is not found"), or one the request's tools call on (`Refusal::Feature`: OpenAI's 403 "must be
/// verified to use the model `gpt-image-1`", `code: null`, which a client's image tool draws).
/// Read where each provider puts it (`error.code`, or `error.type` and `error.message`), not
/// anywhere in the body.
pub(super) fn refused_model(body: &[u8]) -> Option<Refusal> {
    let finder = |needle: &[u8]| memchr::memmem::find(body, needle).is_some();
    if !finder(b"model_not_found")
        && !finder(b"DeploymentNotFound")
        && !finder(b"not_found_error")
        && !finder(b"NotFoundError")
        && !finder(b"NOT_FOUND")
        && !finder(b"verified to use the model")
    {
        return None;
    }
    let value = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    // The error where each server puts it: under `error` (OpenAI's shape), in a list of one
    // (Google's), or the body itself (vLLM's `{"object":"error",…}`).
    let error = match (&value, error_member(&value)) {
        (_, Some(error)) => error,
        (serde_json::Value::Array(_), None) => return None,
        (body, None) => body,
    };
    let text = |member: &str| error.get(member).and_then(serde_json::Value::as_str);
    let message = text("message").unwrap_or_default();
    if matches!(text("code"), Some("model_not_found" | "DeploymentNotFound"))
        // Anthropic's "model: x"; Ollama's "model 'x' not found" and "model \"x\" not found,
        // try pulling it first" (a model not pulled on that node).
        || (text("type") == Some("not_found_error")
            && (message.starts_with("model:")
                || (message.starts_with("model ") && message.contains(" not found"))))
        // vLLM's "The model `x` does not exist." (not among its `--served-model-name`s).
        || (text("type") == Some("NotFoundError") && message.starts_with("The model `"))
        // Google's "models/x is not found for API version v1beta, or is not supported …"
        // (a model retired).
        || (text("status") == Some("NOT_FOUND") && message.starts_with("models/"))
    {
        return Some(Refusal::Model);
    }
    (text("code").is_none()
        && text("message").is_some_and(|m| m.contains("must be verified to use the model")))
    .then_some(Refusal::Feature)
}

/// Whether a 400's body is the provider refusing the backend's own key: Google answers a
/// revoked, expired or mistyped key with 400 and the reason `API_KEY_INVALID` where others
/// answer 401, and xAI with 400 and a top-level `error` string, "Incorrect API key
/// provided: xa***Ju. You can obtain an API key from https://console.x.ai." (URL-encoded in
/// some of its answers). Passed on, the client would be told that its own key is not valid.
/// Each is read where its provider puts it (`error.details[].reason`, the error alone or in
/// a list of one; the start of the top-level string), not anywhere in the body: a message
/// quoting what the client sent must not pass for it.
pub(super) fn refuses_the_key(body: &[u8]) -> bool {
    const XAI: [&str; 2] = [
        "Incorrect API key provided",
        "Incorrect%20API%20key%20provided",
    ];
    let google = memchr::memmem::find(body, b"API_KEY_INVALID").is_some();
    if !google && memchr::memmem::find(body, b"Incorrect").is_none() {
        return false;
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    if let Some(serde_json::Value::String(message)) = value.get("error") {
        return XAI.iter().any(|words| message.starts_with(words));
    }
    error_member(&value)
        .and_then(|e| e.get("details"))
        .and_then(serde_json::Value::as_array)
        .is_some_and(|details| {
            details.iter().any(|d| {
                d.get("reason").and_then(serde_json::Value::as_str) == Some("API_KEY_INVALID")
            })
        })
}

/// The `error` of an upstream's error body, alone or in a list of one (as Google's
/// OpenAI-compatible endpoint writes it).
pub(super) fn error_member(value: &serde_json::Value) -> Option<&serde_json::Value> {
    match value {
        serde_json::Value::Array(errors) => errors.first()?.get("error"),
        other => other.get("error"),
    }
}

/// The wait Google's APIs ask for in an error's body alone (no `Retry-After`): a
/// `google.rpc.RetryInfo` among `error.details`, its `retryDelay` a protobuf duration in JSON
/// (`"41s"`, `"0.5s"`); the error alone or in a list of one, as the OpenAI-compatible endpoint
/// writes it. `None` for any other body.
pub(super) fn retry_delay_in_body(body: &[u8]) -> Option<Duration> {
    memchr::memmem::find(body, b"retryDelay")?;
    let value = serde_json::from_slice::<serde_json::Value>(body).ok()?;
    error_member(&value)?
        .get("details")?
        .as_array()?
        .iter()
        .filter(|detail| {
            detail
                .get("@type")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|kind| kind.ends_with("google.rpc.RetryInfo"))
        })
        .find_map(|detail| {
            let seconds = detail
                .get("retryDelay")?
                .as_str()?
                .strip_suffix('s')?
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)?;
            Some(Duration::from_secs_f64(
                seconds.min(cooldown::MAX_RETRY_AFTER.as_secs_f64()),
            ))
        })
}

/// What the first event of a stream makes of its attempt.
pub(super) enum FirstEvent {
    /// The stream is the backend's answer: relayed from this event on.
    Commit,
    /// The upstream's own error, before anything reached the client: the attempt failed.
    Failed(Failure),
    /// An `error` event whose data has not all come yet.
    Unfinished,
}

/// A Responses create's stream before its output, read as it comes. OpenAI reports a rate
/// limit or an empty account in the stream, after `response.created` and
/// `response.in_progress` and before any output, where a chat request gets an HTTP 429.
/// Committed at `response.created`, such a stream was never failed over, though its client
/// had been sent nothing it could use and the provider billed nothing (Codex CLI, which always
/// streams, failed its turns while a second account stood by). So the lifecycle events
/// (`response.created`, `response.queued`, `response.in_progress`) are held; a failure after
/// them whose code is the backend's or its model's, and that reports no usage (nothing
/// billed), fails the attempt (as [`Failure::Status`] with the status of its HTTP form, its
/// cooldown read from that body as a whole answer's), as does any first event a stream of
/// another API would fail over on ([`first_event`]); any other event commits.
#[derive(Debug, Default)]
pub(super) struct LifecycleHold {
    parser: crate::sse::SseParser,
    items: Vec<crate::sse::Item>,
    /// A lifecycle event has come: the stream has begun.
    pub held: bool,
}

impl LifecycleHold {
    /// Reads the stream's next bytes: what its events so far make of the attempt (`Unfinished`
    /// while no event decides it).
    pub fn push(&mut self, chunk: &[u8], api_key: &[u8]) -> FirstEvent {
        if self.parser.push(chunk, &mut self.items).is_err() {
            return FirstEvent::Commit;
        }
        for item in self.items.drain(..) {
            let crate::sse::Item::Event(event) = item else {
                continue;
            };
            if let Some(decided) = after_lifecycle(&event, api_key) {
                return decided;
            }
            self.held = true;
        }
        FirstEvent::Unfinished
    }
}

/// What a Responses stream's event makes of its held attempt; `None` for a lifecycle event.
fn after_lifecycle(event: &crate::sse::Event, api_key: &[u8]) -> Option<FirstEvent> {
    let value = serde_json::from_str::<serde_json::Value>(&event.data).ok();
    let text = |at: &str| value.as_ref()?.pointer(at)?.as_str();
    let kind = text("/type").or(event.event.as_deref());
    if let Some("response.created" | "response.queued" | "response.in_progress") = kind {
        return None;
    }
    if let Some("error" | "response.failed") = kind
        // Billed (its usage says so): the answer, its usage charged as it ends the stream.
        && value
            .as_ref()
            .and_then(|v| v.pointer("/response/usage"))
            .is_none_or(serde_json::Value::is_null)
    {
        // Nested (`response.failed`'s `response.error`, OpenAI's `error` event), or flat
        // (the event's schema: its own `type` is then the event's).
        let error = ["/response/error", "/error", ""].iter().find_map(|at| {
            let error = value.as_ref()?.pointer(at)?;
            error.get("code").and_then(serde_json::Value::as_str)?;
            Some((error, at.is_empty()))
        });
        if let Some(failure) = error.and_then(|(error, flat)| responses_error(error, flat, api_key))
        {
            return Some(FirstEvent::Failed(failure));
        }
    }
    // An error of the shapes other streams fail over on (`{"error":{"type":"server_error"}}`
    // with no code, TGI's overload).
    Some(match first_event(&event.to_bytes(), api_key) {
        FirstEvent::Failed(failure) => FirstEvent::Failed(failure),
        _ => FirstEvent::Commit,
    })
}

/// A Responses failure's `error` (`{code, message, …}`; `flat`: the fields of an `error`
/// event's own, whose `type` is the event's) as the attempt's failure, when its code is the
/// backend's or its model's: the HTTP answer it stands for (429 for a rate limit or an empty
/// account, 500 for `server_error`), its body `{"error":{…}}` as that answer's would be, read
/// for its cooldown as one. `None`: the request's own failure, its answer.
fn responses_error(error: &serde_json::Value, flat: bool, api_key: &[u8]) -> Option<Failure> {
    let code = error.get("code").and_then(serde_json::Value::as_str);
    let kind = match flat {
        true => None,
        false => error.get("type").and_then(serde_json::Value::as_str),
    };
    // An account out of credit is told as OpenAI's HTTP answer tells it, `insufficient_quota`,
    // which cools the whole backend and is passed on as the account's (a flat event's own
    // `type` is the event's, so its code alone says it).
    let unfunded = kind == Some("insufficient_quota")
        || matches!(
            code,
            Some("insufficient_quota" | "credit_balance_exhausted")
        );
    let status = match code {
        _ if unfunded => StatusCode::TOO_MANY_REQUESTS,
        Some("rate_limit_exceeded" | "too_many_requests") => StatusCode::TOO_MANY_REQUESTS,
        Some("server_error") => StatusCode::INTERNAL_SERVER_ERROR,
        _ => return None,
    };
    let mut error = error.clone();
    if let Some(error) = error.as_object_mut() {
        error.retain(|k, _| matches!(k.as_str(), "code" | "message" | "param"));
        let kind = match unfunded {
            true => Some("insufficient_quota"),
            false => kind.or(code),
        };
        if let Some(kind) = kind {
            error.insert("type".into(), kind.into());
        }
    }
    let body = serde_json::json!({ "error": error }).to_string();
    Some(Failure::Status {
        status,
        retry_after: None,
        content_type: Some(HeaderValue::from_static("application/json")),
        body: redact_error(Bytes::from(body), api_key),
        // The backend's failure, as `response.failed` ending a stream is (`relay.rs`).
        in_body: false,
    })
}

/// A whole Responses create answered 200 with `"status": "failed"` and no usage (nothing
/// billed): the failure its `error` names, as [`responses_error`] reads it. Taken for a
/// success, a backend failing every synchronous create this way kept its share and never
/// cooled, and the failure, which reached no client yet, was not failed over. One search for
/// `"failed"` over each such answer before it is parsed.
pub(super) fn failed_response(body: &[u8], api_key: &[u8]) -> Option<Failure> {
    memchr::memmem::find(body, b"\"failed\"")?;
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        status: Option<String>,
        #[serde(default)]
        error: serde_json::Value,
        #[serde(default)]
        usage: serde_json::Value,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    if answer.status.as_deref() != Some("failed") || !answer.usage.is_null() {
        return None;
    }
    responses_error(&answer.error, false, api_key)
}

/// Whether the first line of `bytes` with a field, past comments and blank lines, names the
/// event `error` (Anthropic's `event: error`) or is a `data` line whose value is an `error`
/// object (TGI's overload after its 200 head: `data: {"error":{"message":"Model is
/// overloaded",…}}`): a cheap look at every stream's first chunk, false at once for a stream
/// opening with any other `data:` or `event: message_start`.
pub(super) fn opens_with_an_error(bytes: &[u8]) -> bool {
    let bytes = crate::sse::without_bom(bytes);
    // Whether `line` says error, or, `unfinished` (the bytes end inside it), may yet: a read
    // ending at `data: {"er` is not known to begin a chunk, and committed as one, the
    // provider's error reached the client with no failover.
    let says_error = |line: &[u8], unfinished: bool| {
        let opens = |line: &[u8], word: &[u8]| {
            line.starts_with(word) || (unfinished && word.starts_with(line))
        };
        match line.strip_prefix(b"data:") {
            Some(data) => opens(data.strip_prefix(b" ").unwrap_or(data), b"{\"error\""),
            None => match line.strip_prefix(b"event:") {
                Some(name) => {
                    let name = name.strip_prefix(b" ").unwrap_or(name);
                    name == b"error" || (unfinished && b"error".starts_with(name))
                }
                // The bytes end inside the field's name.
                None => unfinished && (opens(line, b"data:") || opens(line, b"event:")),
            },
        }
    };
    let lines = bytes.split_inclusive(|&b| b == b'\n').map(|line| {
        let unfinished = !line.ends_with(b"\n");
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        (line.strip_suffix(b"\r").unwrap_or(line), unfinished)
    });
    // The usual stream opens with its first `data:` line.
    if bytes.starts_with(b"data") {
        return lines
            .take(1)
            .any(|(line, unfinished)| says_error(line, unfinished));
    }
    lines
        .filter(|(line, _)| !line.is_empty() && !line.starts_with(b":"))
        .take(1)
        .any(|(line, unfinished)| says_error(line, unfinished))
}

/// Whether a 5xx's body says its model is overloaded, not the backend: Anthropic's
/// `overloaded_error` (a 529, or a stream's first event) and its 500 `api_error` "Overloaded",
/// OpenAI's "That model is currently overloaded with other requests", Google's 503 "The model
/// is overloaded" (TGI's "Model is overloaded" comes as a 429, its model's already). Anthropic overloads one
/// model (an Opus outage while Sonnet and Haiku answer); cooling the backend took its other
/// models out, and the overloaded one, between cooldowns, was never skipped on its own.
/// OpenAI's "The server is overloaded" stays the backend's.
pub(super) fn model_overloaded(body: &[u8]) -> bool {
    [
        &b"overloaded_error"[..],
        b"\"Overloaded\"",
        b"model is currently overloaded",
        // Google's 503 "The model is overloaded. Please try again later." (its Pro overloads
        // while Flash answers).
        b"model is overloaded",
    ]
    .into_iter()
    .any(|said| memchr::memmem::find(body, said).is_some())
}

/// The first event of a stream, when it is the upstream's `error` event saying it is
/// overloaded, failing or rate limited: Anthropic answers an overloaded streamed request 200
/// and then this event, most often as the only one. Nothing has reached the client yet, so
/// the attempt fails as the same error in an HTTP status would (529, 500, 429: its body is
/// the event's data, the shape of Anthropic's error bodies), counted as that status is (an
/// overload towards its model's cooldown at the backend: [`model_overloaded`]) and failed
/// over. TGI's overload, an unnamed first event, is a 429 of its model. Any other first event,
/// an error of the request's own (`invalid_request_error`, TGI's validation errors) included,
/// commits the stream as before.
pub(super) fn first_event(bytes: &[u8], api_key: &[u8]) -> FirstEvent {
    if !opens_with_an_error(bytes) {
        return FirstEvent::Commit;
    }
    let mut parser = crate::sse::SseParser::default();
    let mut items = Vec::new();
    if parser.push(bytes, &mut items).is_err() {
        return FirstEvent::Commit;
    }
    let Some(data) = items.iter().find_map(|item| match item {
        crate::sse::Item::Event(event) => Some(&event.data),
        crate::sse::Item::Comment(_) => None,
    }) else {
        return FirstEvent::Unfinished;
    };
    let value = serde_json::from_str::<serde_json::Value>(data).ok();
    let text = |at: &str| value.as_ref()?.pointer(at)?.as_str();
    let status = match text("/error/type") {
        Some("overloaded_error") => 529,
        // vLLM's Messages endpoint names its failures `internal_error`, OpenAI its own
        // `server_error` (a chat chunk `{"error":{"type":"server_error",…}}`).
        Some("api_error" | "internal_error" | "server_error") => 500,
        Some("rate_limit_error") => 429,
        // TGI streams its overload (the 429 of a whole answer) after a 200 head, as
        // `{"error":{"message":"Model is overloaded","http_status_code":422}}`, or in its own
        // shape `{"error":"Model is overloaded","error_type":"overloaded"}`.
        _ if text("/error/message") == Some("Model is overloaded")
            || text("/error_type") == Some("overloaded") =>
        {
            429
        }
        _ => return FirstEvent::Commit,
    };
    FirstEvent::Failed(Failure::Status {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        retry_after: None,
        content_type: Some(HeaderValue::from_static("application/json")),
        body: redact_error(Bytes::copy_from_slice(data.as_bytes()), api_key),
        in_body: false,
    })
}

/// The status a whole 2xx chat or completion answer stands for when it is its provider's
/// error: OpenRouter answers 200 once a model has started and puts a failure after that in
/// the body, `{"error":{"code":502,"message":"Provider returned error",…}}`. An answer that
/// opens with its `error` member, set (as the SDKs read a stream's chunk: Python's truth), and
/// has no choice is the error its `error.code` names when that is a 4xx or 5xx, else 502.
/// Nothing has reached the client: it fails over, as the same error in a status would, where
/// it was passed on as a success (a 200 the SDKs raise nothing on) and ended the model's
/// streak of failures. Only the answer's first bytes are looked at before it is parsed:
/// searching every answer for `"error"`, or for a choice's `finish_reason` of `"error"`
/// (OpenRouter's other shape, a partial answer, which is passed on as it came and counted an
/// answer), cost 430 to 520 instructions a request.
pub(super) fn error_in_answer(body: &[u8]) -> Option<StatusCode> {
    let opens_with_error = body
        .trim_ascii_start()
        .strip_prefix(b"{")
        .is_some_and(|rest| rest.trim_ascii_start().starts_with(b"\"error\""));
    if !opens_with_error {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        error: serde_json::Value,
        #[serde(default)]
        choices: Option<Vec<serde::de::IgnoredAny>>,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    if !is_set(&answer.error) || answer.choices.is_some_and(|choices| !choices.is_empty()) {
        return None;
    }
    let code = answer
        .error
        .get("code")
        .and_then(serde_json::Value::as_u64)
        .and_then(|code| u16::try_from(code).ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .filter(|code| code.is_client_error() || code.is_server_error());
    Some(code.unwrap_or(StatusCode::BAD_GATEWAY))
}

/// Whether an `error` member is set, by Python's truth (the SDKs' `data.get("error")`): null,
/// false, 0, "", [] and {} are no error.
pub(super) fn is_set(error: &serde_json::Value) -> bool {
    match error {
        serde_json::Value::Null => false,
        serde_json::Value::Bool(set) => *set,
        serde_json::Value::Number(n) => n.as_f64() != Some(0.0),
        serde_json::Value::String(s) => !s.is_empty(),
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
    }
}

/// The searcher for `"error"`, a key or a value (a stream's error events), built once.
pub(super) static ERROR_WORD: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| {
        memchr::memmem::FinderBuilder::new()
            .build_forward_with_ranker(super::usage_figures::JsonRank, b"\"error\"")
    });

/// Whether `bytes`, the start of an SSE stream, hold a line of an event's `data` field (the
/// field name, then `:`, a line end, or the end of what came so far): a stream that holds
/// only comments (`: keep-alive`) and blank lines has sent no event yet.
pub(super) fn starts_an_event(bytes: &[u8]) -> bool {
    let bytes = crate::sse::without_bom(bytes);
    let field_at = |at: usize| {
        bytes
            .get(at + 4)
            .is_none_or(|b| matches!(b, b':' | b'\n' | b'\r'))
    };
    // The usual stream: its first event's `data:` line first.
    if bytes.starts_with(b"data") && field_at(0) {
        return true;
    }
    memchr::memmem::find_iter(bytes, b"data").any(|at| {
        let line_start = at == 0 || matches!(bytes[at - 1], b'\n' | b'\r');
        line_start && field_at(at)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A Responses create's stream, read as it comes: lifecycle events are held however they
    /// are cut; a rate limit or an empty account after them fails the attempt (the account's
    /// told as `insufficient_quota`, flat or nested, which cools the whole backend); a failure
    /// that reports usage (billed) is the answer; an error of another stream's shape (OpenAI's
    /// chunk with no code) fails as it would there; any other event commits.
    #[test]
    fn a_responses_stream_is_held_until_its_output_or_its_failure() {
        let created = format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"id\":\"r\",\"instructions\":\"{}\",\"usage\":null}}}}\n\n",
            "x".repeat(100 * 1024)
        );
        let read = |events: &str| {
            let mut hold = LifecycleHold::default();
            let mut last = FirstEvent::Unfinished;
            // In reads of 16 KiB, as TLS gives them.
            for chunk in events.as_bytes().chunks(16 * 1024) {
                last = hold.push(chunk, b"sk-k");
                if !matches!(last, FirstEvent::Unfinished) {
                    break;
                }
            }
            (hold.held, last)
        };
        let status = |events: String| match read(&events).1 {
            FirstEvent::Failed(Failure::Status { status, body, .. }) => {
                Some((status.as_u16(), out_of_quota(&body)))
            }
            FirstEvent::Failed(other) => panic!("{other:?}"),
            FirstEvent::Commit => None,
            FirstEvent::Unfinished => Some((0, false)),
        };
        assert!(read(&created).0, "held");
        assert_eq!(status(created.clone()), Some((0, false)), "held, undecided");
        let nested = |kind: &str, code: &str| {
            format!(
                "{created}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"{kind}\",\"code\":\"{code}\",\"message\":\"m\"}}}}\n\n"
            )
        };
        assert_eq!(
            status(nested("tokens", "rate_limit_exceeded")),
            Some((429, false))
        );
        assert_eq!(status(nested("insufficient_quota", "x")), Some((429, true)));
        let flat = format!(
            "{created}event: error\ndata: {{\"type\":\"error\",\"code\":\"credit_balance_exhausted\",\"message\":\"m\"}}\n\n"
        );
        assert_eq!(status(flat), Some((429, true)), "the account's");
        let failed = |usage: &str| {
            format!(
                "{created}event: response.failed\ndata: {{\"type\":\"response.failed\",\"response\":{{\"status\":\"failed\",\"usage\":{usage},\"error\":{{\"code\":\"server_error\",\"message\":\"m\"}}}}}}\n\n"
            )
        };
        assert_eq!(status(failed("null")), Some((500, false)));
        assert_eq!(
            status(failed(r#"{"input_tokens":9,"output_tokens":90}"#)),
            None,
            "billed: the answer"
        );
        let chunk =
            r#"data: {"error":{"message":"m","type":"server_error","param":null,"code":null}}"#;
        assert_eq!(status(format!("{created}{chunk}\n\n")), Some((500, false)));
        assert_eq!(status(format!("{chunk}\n\n")), Some((500, false)));
        let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\n";
        assert_eq!(status(format!("{created}{delta}")), None);
        assert_eq!(
            status(nested("invalid_request_error", "context_length_exceeded")),
            None
        );
    }

    /// A stream has begun its first event once a line of a `data` field came, whatever the
    /// line ends and however the bytes were cut; comments, blank lines, an `event:` line alone
    /// and `data` inside another line or field name are not one.
    #[test]
    fn only_a_first_event_named_error_is_looked_at_again() {
        for opens in [
            "event: error\ndata: {}\n\n",
            "event:error\r\ndata: {}",
            ": keep-alive\n\nevent: error\n",
            // An unnamed event whose data is an error object (TGI's), after comments too.
            "data: {\"error\": 1}\n\n",
            "data:{\"error\"",
            ": keep-alive\n\ndata: {\"error\":{\"message\":\"Model is overloaded\"}}\n\n",
            // A read ending inside a line that may yet say so.
            "data: {\"er",
            "data: {",
            "data:",
            "da",
            "event: err",
            ": keep-alive\n\ndata: {\"err",
        ] {
            assert!(opens_with_an_error(opens.as_bytes()), "{opens:?}");
        }
        for not in [
            "data: {\"id\":\"chatcmpl-1\",\"error\":null}\n\n",
            "data: [DONE]\n\n",
            ": keep-alive\n\ndata: {\"id\":\"chatcmpl-1\"}\n\n",
            "event: message_start\ndata: {}\n\n",
            "event: errors\n",
            ": event: error\n",
            "",
            "data: {\"id\"",
            "data: {\"er\n",
            "event: message",
        ] {
            assert!(!opens_with_an_error(not.as_bytes()), "{not:?}");
        }
        let event = |kind: &str| {
            format!(
                "event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"{kind}\",\"message\":\"m\"}}}}\n\n"
            )
        };
        let status = |bytes: &str| match first_event(bytes.as_bytes(), b"sk-k") {
            FirstEvent::Failed(Failure::Status { status, .. }) => Some(status.as_u16()),
            FirstEvent::Failed(other) => panic!("{other:?}"),
            FirstEvent::Commit => None,
            FirstEvent::Unfinished => Some(0),
        };
        assert_eq!(status(&event("overloaded_error")), Some(529));
        assert_eq!(status(&event("api_error")), Some(500));
        assert_eq!(status(&event("rate_limit_error")), Some(429));
        assert_eq!(status(&event("invalid_request_error")), None);
        assert_eq!(status("event: error\ndata: {\"type\":\"error\""), Some(0));
        assert_eq!(status("data: {}\n\n"), None);
        assert_eq!(status("data: {\"er"), Some(0));
        // TGI's overload after its head, in the OpenAI form and its own; its validation errors
        // (the client's parameters) commit the stream.
        let tgi = r#"data: {"error":{"message":"Model is overloaded","http_status_code":422}}"#;
        assert_eq!(status(&format!("{tgi}\n\n")), Some(429));
        assert_eq!(status(&tgi[..40]), Some(0));
        let own = r#"data: {"error":"Model is overloaded","error_type":"overloaded"}"#;
        assert_eq!(status(&format!("{own}\n\n")), Some(429));
        let invalid = r#"data: {"error":{"message":"Input validation error: `top_p` must be > 0.0 and < 1.0","http_status_code":422}}"#;
        assert_eq!(status(&format!("{invalid}\n\n")), None);
        let quoted = r#"data: {"error":{"message":"Your prompt: Model is overloaded?","http_status_code":422}}"#;
        assert_eq!(status(&format!("{quoted}\n\n")), None);
    }

    #[test]
    fn a_stream_starts_an_event_at_its_first_data_line() {
        for started in [
            "data: {}",
            "data:{}\n\n",
            ": keep-alive\n\ndata: {}",
            ": keep-alive\r\n\r\ndata",
            ": a\rdata\r",
            "event: message_start\ndata: {",
            "data",
            "\u{FEFF}data: {}",
        ] {
            assert!(starts_an_event(started.as_bytes()), "{started:?}");
        }
        for not_yet in [
            "",
            ": keep-alive\n\n",
            ": OPENROUTER PROCESSING\n\n: data: x\n\n",
            "event: message_start\n",
            "\n\n",
            "metadata: x\n",
            "dataset: x\n",
            ": keep-alive data\n",
        ] {
            assert!(!starts_an_event(not_yet.as_bytes()), "{not_yet:?}");
        }
    }

    /// A model refused to the backend's account is read where each provider puts it; words in
    /// a message (which may quote the client's request) are not.
    #[test]
    fn a_refused_model_is_read_from_the_errors_code_or_type() {
        for refused in [
            r#"{"error":{"message":"Project `proj_x` does not have access to model `gpt-4.1`","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#,
            r#"{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}"#,
            r#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-x"}}"#,
        ] {
            assert_eq!(
                refused_model(refused.as_bytes()),
                Some(Refusal::Model),
                "{refused}"
            );
        }
        // Drawn by the client's tools, not the routed model: counted against nothing.
        let verified = r#"{"error":{"message":"Your organization must be verified to use the model `gpt-image-1`. Please go to: https://platform.openai.com/settings/organization/general and click on Verify Organization.","type":"invalid_request_error","param":null,"code":null}}"#;
        assert_eq!(refused_model(verified.as_bytes()), Some(Refusal::Feature));
        let failure = Failure::Refused {
            status: StatusCode::FORBIDDEN,
            why: Refusal::Feature,
        };
        assert_eq!(failure.health(), Some(Outcome::Success));
        for not_the_model in [
            r#"{"error":{"message":"model_not_found","type":"invalid_request_error","code":"permission_denied"}}"#,
            r#"{"type":"error","error":{"type":"not_found_error","message":"file: f-1 not found"}}"#,
            r#"{"error":{"message":"Invalid URL (POST /v1/chat/completion)","type":"invalid_request_error","code":null}}"#,
            "model_not_found",
        ] {
            assert_eq!(
                refused_model(not_the_model.as_bytes()),
                None,
                "{not_the_model}"
            );
        }
    }

    #[test]
    fn googles_retry_delay_is_read_from_its_retry_info() {
        let google = |details: &str| {
            format!(
                r#"[{{"error":{{"code":429,"message":"You exceeded your current quota","status":"RESOURCE_EXHAUSTED","details":{details}}}}}]"#
            )
        };
        let info = r#"[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"41s"}]"#;
        assert_eq!(
            retry_delay_in_body(google(info).as_bytes()),
            Some(Duration::from_secs(41))
        );
        let alone = r#"{"error":{"code":429,"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"0.5s"}]}}"#;
        assert_eq!(
            retry_delay_in_body(alone.as_bytes()),
            Some(Duration::from_millis(500))
        );
        let far = r#"{"error":{"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"99999999s"}]}}"#;
        assert_eq!(
            retry_delay_in_body(far.as_bytes()),
            Some(cooldown::MAX_RETRY_AFTER)
        );
        // Not a RetryInfo, not a duration, or only quoted in a message: nothing.
        for body in [
            google(r#"[{"@type":"type.googleapis.com/google.rpc.Help","retryDelay":"41s"}]"#),
            google(r#"[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"41"}]"#),
            google(r#"[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"-1s"}]"#),
            r#"{"error":{"message":"retryDelay 41s"}}"#.to_owned(),
            "not json retryDelay".to_owned(),
        ] {
            assert_eq!(retry_delay_in_body(body.as_bytes()), None, "{body}");
        }
    }

    /// A 429 cools the model it was for; OpenAI's `insufficient_quota` (the account's credit
    /// spent) cools the backend, for every model.
    #[test]
    fn a_429_is_the_models_unless_the_whole_account_is_spent() {
        let limited = |body: &str| {
            Failure::Status {
                status: StatusCode::TOO_MANY_REQUESTS,
                retry_after: None,
                content_type: None,
                body: Bytes::from(body.to_owned()),
                in_body: false,
            }
            .health()
        };
        let scope = |outcome| match outcome {
            Some(Outcome::RateLimited { scope, .. }) => scope,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            scope(limited(
                r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM)","type":"tokens","code":"rate_limit_exceeded"}}"#
            )),
            Scope::Model
        );
        assert_eq!(
            scope(limited(
                r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#
            )),
            Scope::Backend
        );
    }

    /// Google's refusal of a key, alone or in a list of one, and xAI's (a 400 whose top-level
    /// `error` is the sentence, plain or URL-encoded) are the key refused; the words in a
    /// message (which may quote the client's request) are not.
    #[test]
    fn a_refused_key_is_read_where_google_and_xai_put_it_only() {
        let refused = r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#;
        assert!(refuses_the_key(refused.as_bytes()));
        assert!(refuses_the_key(format!("[{refused}]").as_bytes()));
        for xai in [
            r#"{"code":"Client specified an invalid argument","error":"Incorrect API key provided: xa***Ju. You can obtain an API key from https://console.x.ai."}"#,
            r#"{"code":"Client specified an invalid argument","error":"Incorrect%20API%20key%20provided:%20ba***na.%20You%20can%20obtain%20an%20API%20key%20from%20https://console.x.ai."}"#,
        ] {
            assert!(refuses_the_key(xai.as_bytes()), "{xai}");
        }
        for not_the_key in [
            r#"{"error":{"code":400,"message":"Invalid value \"API_KEY_INVALID\" at 'contents'","status":"INVALID_ARGUMENT"}}"#,
            r#"{"error":{"message":"unknown parameter: \"reason\":\"API_KEY_INVALID\""}}"#,
            r#"{"error":{"code":400,"details":[{"reason":"BAD_REQUEST"}]}}"#,
            "API_KEY_INVALID but not JSON",
            r#"{"error":{"message":"Incorrect API key provided: sk-…","type":"invalid_request_error"}}"#,
            r#"{"error":"Invalid value: 'Incorrect API key provided' in messages[0]"}"#,
            "Incorrect API key provided: not JSON",
        ] {
            assert!(!refuses_the_key(not_the_key.as_bytes()), "{not_the_key}");
        }
    }
}
