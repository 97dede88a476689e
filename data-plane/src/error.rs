//! Every error the proxy itself answers with, and the one mapping to an HTTP status and an
//! OpenAI-style body `{"error":{"message","type","param","code"}}`, or on Anthropic's routes
//! Anthropic's `{"type":"error","error":{"type","message"}}`. Messages never echo a key.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use sluice_proto::v1::ErrorKind;

use crate::request::RequestError;
use crate::snapshot::ApiFormat;

pub(crate) use sluice_domain::text::quoted;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("This Sluice data plane has not received its configuration yet; try again shortly.")]
    NotReady,
    #[error(
        "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
    )]
    MissingApiKey,
    #[error("Incorrect API key provided.")]
    InvalidApiKey,
    #[error("This API key has expired. Ask the administrator of this gateway for a new key.")]
    KeyExpired,
    #[error("The request body is larger than the limit of {limit} bytes.")]
    BodyTooLarge { limit: usize },
    /// The request is to be translated for a backend of the other API, and the tree of JSON
    /// values its body makes would pass the memory for request bodies
    /// (`--max-buffered-body-bytes`) however empty.
    #[error(
        "The request body holds too many JSON values to be translated for the backend serving \
         its model."
    )]
    BodyTooManyValues,
    #[error("The request body could not be read.")]
    BodyUnreadable,
    /// The client closed its connection (or reset its stream) before its body had arrived:
    /// recorded as a client leaving (499 `client_cancelled`), as anywhere else, not as its
    /// mistake. Nobody reads the answer.
    #[error("The client closed its connection before its request body had arrived.")]
    ClientLeft,
    #[error("The request body did not arrive within {} s.", .limit.as_secs())]
    BodyTimeout { limit: Duration },
    #[error(
        "This Sluice data plane is reading too many request bodies at once; try again shortly."
    )]
    BodiesBusy,
    /// An upstream's whole answer found the answers this replica holds in memory at
    /// `--max-buffered-answer-bytes`. The provider has generated it: SDKs are told not to
    /// send it again on their own (`x-should-retry: false`, no `Retry-After`).
    #[error("This Sluice data plane holds too many answers in memory at once; try again shortly.")]
    AnswersBusy,
    /// The same, but for the answers to this request's key, at their share of it
    /// (`--max-buffered-answer-bytes-per-key`): its clients have not yet read large answers
    /// they asked for.
    #[error(
        "This API key's answers not yet read by its clients fill its share of this Sluice data \
         plane's memory; read them, then try again."
    )]
    KeyAnswersBusy,
    /// This replica is out of file descriptors: it cannot open an upstream connection.
    #[error("This Sluice data plane cannot open more connections right now; try again shortly.")]
    OutOfFiles,
    #[error(transparent)]
    InvalidRequest(#[from] RequestError),
    /// The request cannot be expressed in the API of the backend serving its model.
    #[error("{0} (The backend serving this model speaks another API; see docs/anthropic.md.)")]
    Untranslatable(#[from] crate::anthropic::Untranslatable),
    /// No backend of the model speaks an API with this endpoint.
    #[error("The model `{model}` is served only by backends whose API has no {path} endpoint.")]
    EndpointUnsupported { model: String, path: &'static str },
    /// `count_tokens` for a model only OpenAI-format backends serve (see docs/anthropic.md).
    #[error(
        "The model `{}` is served only by OpenAI-format backends, which have no count_tokens endpoint, and Sluice does not guess a count without the model's tokenizer. Count with a model an Anthropic backend serves, or read usage.input_tokens from a message.", quoted(.0)
    )]
    TokenCountUnsupported(String),
    #[error("This API key is not allowed to use the model `{}`.", quoted(.0))]
    ModelNotAllowed(String),
    #[error("The model `{}` does not exist or you do not have access to it.", quoted(.0))]
    ModelNotFound(String),
    #[error("Rate limit reached for this API key. Please try again in {}s.", retry_after_secs(*.retry_after))]
    KeyRateLimited { retry_after: Duration },
    #[error(
        "Rate limit reached for this API key on tokens per min (TPM): Limit {limit}. Please try again in {}s.",
        retry_after_secs(*.retry_after)
    )]
    KeyTokensLimited { limit: u32, retry_after: Duration },
    #[error(
        "Too many requests in flight for this API key: at most {limit} at once (max_parallel_requests). Please try again in 1s."
    )]
    KeyParallelLimited { limit: u32 },
    #[error(
        "The budget of this API key cannot be checked right now (the gateway's control plane \
         is unreachable); try again shortly."
    )]
    BudgetUnavailable { retry_after: Duration },
    #[error("{}", budget_spent_message(.key_name, *.max_budget, *.resets))]
    BudgetSpent {
        key_name: String,
        max_budget: f64,
        resets: Option<std::time::SystemTime>,
    },
    #[error(
        "Every backend serving `{model}` is cooling down or at its rate limit. Please try again in {}s.",
        retry_after_secs(*.retry_after)
    )]
    BackendsBusy {
        model: String,
        retry_after: Duration,
    },
    #[error("The upstream provider could not be reached.")]
    UpstreamConnect,
    /// The connection to every backend tried broke after the request was sent, before the
    /// answer: the provider may have generated, and billed, it.
    #[error("The connection to the upstream provider broke before its answer came.")]
    UpstreamConnectionLost,
    #[error(
        "The upstream provider refused this gateway's credentials for it. Your API key is fine; the gateway's administrator must fix the provider key."
    )]
    UpstreamCredentials,
    /// The provider account behind every backend tried is out of credit (402, Anthropic's
    /// 400 "credit balance is too low").
    #[error(
        "The upstream provider's account behind this gateway is out of credit. Your API key is fine; the gateway's administrator must fund the provider account."
    )]
    UpstreamUnfunded,
    /// Every backend tried refused the model to the account behind it (OpenAI's 403 "does not
    /// have access to model", a 404 `model_not_found`, an Azure deployment not found): the
    /// operator's routing, not the client's request.
    #[error(
        "The upstream provider refused this model to the gateway's account for it. The model name is right; the gateway's administrator must fix the backend's model list or the provider account's access."
    )]
    UpstreamModelUnavailable,
    #[error("The upstream provider did not answer in time.")]
    UpstreamTimeout,
    #[error("The upstream provider sent an invalid or oversized response.")]
    UpstreamInvalid,
    #[error("Invalid URL ({method} {path})")]
    UnknownPath { method: String, path: String },
    #[error("Method {method} is not allowed for {path}.")]
    MethodNotAllowed { method: String, path: String },
    #[error("{path} is served over HTTP only; this gateway does not take WebSocket connections.")]
    WebSocketRefused { path: String },
    #[error("Sluice cannot record this request's usage right now ({0}); try again shortly.")]
    UsageUnrecordable(crate::spool::Unwritten),
    #[error(
        "Invalid '{param}': '{id}' is not a response id this gateway issued to this API key (it may have been altered, or signed with a key since retired)."
    )]
    InvalidResponseId { param: &'static str, id: String },
    #[error(
        "The response '{id}' is held by a backend that is disabled, was deleted or no longer serves the Responses API; its state cannot be reached until that backend serves it again."
    )]
    ResponseBackendGone { id: String },
    #[error(
        "The response '{id}' is held by a backend that is cooling down; its state lives only there. Please try again in {}s.",
        retry_after_secs(*.retry_after)
    )]
    ResponseBackendCoolingDown { id: String, retry_after: Duration },
    #[error(
        "The backend holding previous response '{id}' does not serve the model `{model}`; continue with a model it serves."
    )]
    ResponseBackendLacksModel { id: String, model: String },
    #[error(
        "The model `{}` is not served by any backend that supports the Responses API; use /v1/chat/completions for it.", quoted(.0)
    )]
    ResponsesUnsupported(String),
    #[error(
        "Background responses are not available to this API key: their tokens are spent after the create returns, where its budget and limits cannot hold them. Send the request without 'background'."
    )]
    BackgroundNotAllowed,
    #[error(
        "This Sluice data plane cannot issue response ids yet (its configuration has no affinity key); try again shortly."
    )]
    NoAffinityKey,
}

/// Names the budget and when it resets, so the client knows what happened and until when.
fn budget_spent_message(
    key_name: &str,
    max_budget: f64,
    resets: Option<std::time::SystemTime>,
) -> String {
    let key_name = sluice_domain::text::escape_control(key_name);
    match resets {
        Some(at) => format!(
            "The budget of {max_budget:.2} for API key \"{key_name}\" is spent; it resets at {}.",
            humantime::format_rfc3339_seconds(at)
        ),
        None => format!(
            "The budget of {max_budget:.2} for API key \"{key_name}\" is spent; it does not \
             reset: ask the administrator of this gateway to raise it."
        ),
    }
}

/// The status recorded for a request whose client left before any response was sent
/// (nginx's "client closed request").
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotReady | Self::UsageUnrecordable(_) | Self::BudgetUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::MissingApiKey | Self::InvalidApiKey | Self::KeyExpired => {
                StatusCode::UNAUTHORIZED
            }
            Self::BodyTooLarge { .. } | Self::BodyTooManyValues => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyUnreadable
            | Self::InvalidRequest(_)
            | Self::Untranslatable(_)
            | Self::EndpointUnsupported { .. }
            | Self::TokenCountUnsupported(_) => StatusCode::BAD_REQUEST,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::ClientLeft => {
                StatusCode::from_u16(CLIENT_CLOSED_REQUEST).unwrap_or(StatusCode::BAD_REQUEST)
            }
            Self::BodiesBusy | Self::AnswersBusy | Self::KeyAnswersBusy | Self::OutOfFiles => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::ModelNotFound(_) | Self::UnknownPath { .. } => StatusCode::NOT_FOUND,
            Self::KeyRateLimited { .. }
            | Self::KeyTokensLimited { .. }
            | Self::KeyParallelLimited { .. }
            | Self::BackendsBusy { .. }
            | Self::BudgetSpent { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamConnect
            | Self::UpstreamConnectionLost
            | Self::UpstreamInvalid
            | Self::UpstreamCredentials
            | Self::UpstreamUnfunded
            | Self::UpstreamModelUnavailable => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::WebSocketRefused { .. } => StatusCode::UPGRADE_REQUIRED,
            Self::InvalidResponseId { .. }
            | Self::ResponseBackendLacksModel { .. }
            | Self::ResponsesUnsupported(_)
            | Self::BackgroundNotAllowed => StatusCode::BAD_REQUEST,
            Self::ResponseBackendGone { .. } => StatusCode::NOT_FOUND,
            Self::ResponseBackendCoolingDown { .. } | Self::NoAffinityKey => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// OpenAI's `type` and `code` for this error.
    fn type_and_code(&self) -> (&'static str, &'static str) {
        match self {
            Self::NotReady => ("server_error", "not_ready"),
            Self::MissingApiKey | Self::InvalidApiKey => {
                ("invalid_request_error", "invalid_api_key")
            }
            Self::KeyExpired => ("invalid_request_error", "api_key_expired"),
            Self::BodyTooLarge { .. } | Self::BodyTooManyValues => {
                ("invalid_request_error", "request_too_large")
            }
            Self::BodyUnreadable => ("invalid_request_error", "invalid_request_body"),
            Self::BodyTimeout { .. } => ("invalid_request_error", "request_timeout"),
            Self::ClientLeft => ("invalid_request_error", "client_cancelled"),
            Self::BodiesBusy | Self::AnswersBusy | Self::KeyAnswersBusy | Self::OutOfFiles => {
                ("server_error", "server_busy")
            }
            Self::InvalidRequest(e) => ("invalid_request_error", e.code()),
            Self::Untranslatable(_) => ("invalid_request_error", "untranslatable"),
            Self::EndpointUnsupported { .. } | Self::TokenCountUnsupported(_) => {
                ("invalid_request_error", "unsupported_endpoint")
            }
            Self::ModelNotAllowed(_) => ("invalid_request_error", "model_not_allowed"),
            Self::ModelNotFound(_) => ("invalid_request_error", "model_not_found"),
            Self::KeyRateLimited { .. }
            | Self::KeyParallelLimited { .. }
            | Self::BackendsBusy { .. } => ("requests", "rate_limit_exceeded"),
            // As OpenAI answers a TPM limit.
            Self::KeyTokensLimited { .. } => ("tokens", "rate_limit_exceeded"),
            // OpenAI's answer when an account's quota is spent; its SDKs raise RateLimitError
            // (and, told `x-should-retry: false`, do not retry it).
            Self::BudgetSpent { .. } => ("insufficient_quota", "insufficient_quota"),
            Self::BudgetUnavailable { .. } => ("server_error", "budget_unavailable"),
            Self::UpstreamConnect => ("server_error", "upstream_unreachable"),
            Self::UpstreamConnectionLost => ("server_error", "upstream_connection_lost"),
            Self::UpstreamCredentials => ("server_error", "upstream_auth_failed"),
            Self::UpstreamUnfunded => ("server_error", "upstream_account_unfunded"),
            Self::UpstreamModelUnavailable => ("server_error", "upstream_model_unavailable"),
            Self::UpstreamTimeout => ("server_error", "upstream_timeout"),
            Self::UpstreamInvalid => ("server_error", "upstream_invalid_response"),
            Self::UnknownPath { .. } => ("invalid_request_error", "unknown_url"),
            Self::MethodNotAllowed { .. } => ("invalid_request_error", "method_not_allowed"),
            Self::WebSocketRefused { .. } => ("invalid_request_error", "websocket_not_supported"),
            Self::UsageUnrecordable(_) => ("server_error", "usage_unrecordable"),
            Self::InvalidResponseId { .. } => ("invalid_request_error", "invalid_response_id"),
            Self::ResponseBackendGone { .. } => {
                ("invalid_request_error", "response_backend_unavailable")
            }
            Self::ResponseBackendCoolingDown { .. } => {
                ("server_error", "response_backend_cooling_down")
            }
            Self::ResponseBackendLacksModel { .. } => {
                ("invalid_request_error", "response_backend_lacks_model")
            }
            Self::ResponsesUnsupported(_) => ("invalid_request_error", "responses_not_supported"),
            Self::BackgroundNotAllowed => ("invalid_request_error", "background_not_allowed"),
            Self::NoAffinityKey => ("server_error", "not_ready"),
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest(e) => e.param(),
            Self::Untranslatable(e) => Some(&e.param),
            Self::ModelNotAllowed(_)
            | Self::ModelNotFound(_)
            | Self::ResponseBackendLacksModel { .. }
            | Self::ResponsesUnsupported(_)
            | Self::EndpointUnsupported { .. }
            | Self::TokenCountUnsupported(_) => Some("model"),
            Self::InvalidResponseId { param, .. } => Some(param),
            Self::BackgroundNotAllowed => Some("background"),
            _ => None,
        }
    }

    /// How long the client should wait, for the `Retry-After` header.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::KeyRateLimited { retry_after }
            | Self::KeyTokensLimited { retry_after, .. }
            | Self::BackendsBusy { retry_after, .. }
            | Self::BudgetUnavailable { retry_after } => Some(*retry_after),
            // A replica without its first snapshot, or unable to write its usage down: the
            // load balancer may send the retry to another.
            Self::BodiesBusy
            | Self::OutOfFiles
            | Self::NoAffinityKey
            | Self::NotReady
            | Self::UsageUnrecordable(_)
            | Self::KeyParallelLimited { .. } => Some(Duration::from_secs(1)),
            Self::ResponseBackendCoolingDown { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// What the usage record says about a request that ended with this error.
    pub fn error_kind(&self) -> ErrorKind {
        match self {
            Self::KeyRateLimited { .. }
            | Self::KeyTokensLimited { .. }
            | Self::KeyParallelLimited { .. }
            | Self::BackendsBusy { .. } => ErrorKind::RateLimited,
            Self::ModelNotFound(_) => ErrorKind::NoBackend,
            Self::UpstreamConnect | Self::UpstreamConnectionLost => ErrorKind::UpstreamConnect,
            Self::UpstreamCredentials | Self::UpstreamUnfunded | Self::UpstreamModelUnavailable => {
                ErrorKind::UpstreamStatus
            }
            Self::UpstreamInvalid => ErrorKind::UpstreamInvalid,
            Self::UpstreamTimeout => ErrorKind::UpstreamTimeout,
            Self::NotReady
            | Self::BodiesBusy
            | Self::AnswersBusy
            | Self::KeyAnswersBusy
            | Self::OutOfFiles
            | Self::UsageUnrecordable(_)
            | Self::NoAffinityKey
            | Self::BudgetUnavailable { .. } => ErrorKind::Internal,
            Self::ResponseBackendGone { .. } | Self::ResponsesUnsupported(_) => {
                ErrorKind::NoBackend
            }
            Self::ResponseBackendCoolingDown { .. } => ErrorKind::RateLimited,
            Self::ClientLeft => ErrorKind::ClientCancelled,
            // Client errors: the status code tells them apart; there is no kind for them.
            _ => ErrorKind::Unspecified,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let (kind, code) = self.type_and_code();
        error_body(&self.to_string(), kind, self.param(), Some(code))
    }
}

/// An OpenAI-style error body.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Bytes {
    #[derive(Serialize)]
    struct Inner<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<&'a str>,
        code: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct Outer<'a> {
        error: Inner<'a>,
    }
    let body = Outer {
        error: Inner {
            message,
            kind,
            param,
            code,
        },
    };
    // Serialising plain strings cannot fail; an empty body would still be a valid response.
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

impl ProxyError {
    /// The answer in the shape of the client's API (`format`): OpenAI's, or Anthropic's, whose
    /// error `type` follows the status as Anthropic's SDKs expect (401
    /// `authentication_error`, 404 `not_found_error`, 429 `rate_limit_error`, …).
    pub fn into_response_as(self, format: ApiFormat) -> Response {
        let body = match format {
            ApiFormat::OpenAi => self.body(),
            // Anthropic's messages name the field first (`messages.1.content: …`): the
            // body has no `param`.
            ApiFormat::Anthropic => {
                let message = match (&self, self.param()) {
                    // OpenAI's wording names only the Authorization header.
                    (Self::MissingApiKey, _) => {
                        "x-api-key header is required (or Authorization: Bearer YOUR_KEY)."
                            .to_owned()
                    }
                    (_, Some(param)) => format!("{param}: {self}"),
                    (_, None) => self.to_string(),
                };
                crate::anthropic::error::body(self.status().as_u16(), &message)
            }
        };
        let mut response = (self.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(wait) = self.retry_after() {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(wait)),
            );
        }
        if matches!(self, Self::AnswersBusy | Self::KeyAnswersBusy) {
            headers.insert(
                http::HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("false"),
            );
        }
        if matches!(
            self,
            Self::BudgetSpent { .. }
                | Self::UpstreamCredentials
                | Self::UpstreamUnfunded
                | Self::UpstreamModelUnavailable
        ) {
            // The OpenAI SDKs retry every 429 and 5xx unless told not to; a spent budget does
            // not come back in seconds, nor does a provider key revoked, an account without
            // credit or a model the providers refuse: what only the operator can fix (each
            // retry went through every backend again, to the same answer).
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        response
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        self.into_response_as(ApiFormat::OpenAi)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn rounds_retry_after_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn a_spent_budget_is_insufficient_quota_naming_the_budget_and_its_reset() {
        let resets = std::time::UNIX_EPOCH + Duration::from_secs(1_798_761_600);
        let r = ProxyError::BudgetSpent {
            key_name: "team-a".into(),
            max_budget: 50.0,
            resets: Some(resets),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(
            r.headers().get("retry-after").is_none(),
            "nothing to wait for"
        );
        let e = ProxyError::BudgetSpent {
            key_name: "team-a".into(),
            max_budget: 50.0,
            resets: Some(resets),
        };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "insufficient_quota");
        assert_eq!(v["error"]["code"], "insufficient_quota");
        assert_eq!(
            v["error"]["message"],
            "The budget of 50.00 for API key \"team-a\" is spent; it resets at 2027-01-01T00:00:00Z."
        );
        let lifetime = ProxyError::BudgetSpent {
            key_name: "k".into(),
            max_budget: 1.0,
            resets: None,
        };
        assert!(
            lifetime.to_string().contains("does not reset"),
            "{lifetime}"
        );
    }

    #[tokio::test]
    async fn on_anthropic_routes_errors_are_anthropic_shaped_with_the_same_status_and_headers() {
        let body = |r: Response| async move {
            let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
        };
        let cases = [
            (ProxyError::InvalidApiKey, 401, "authentication_error"),
            (
                ProxyError::ModelNotFound("m".into()),
                404,
                "not_found_error",
            ),
            (
                ProxyError::ModelNotAllowed("m".into()),
                403,
                "permission_error",
            ),
            (
                ProxyError::InvalidRequest(RequestError::InvalidJson("eof".into())),
                400,
                "invalid_request_error",
            ),
            (
                ProxyError::BodyTooLarge { limit: 1 },
                413,
                "request_too_large",
            ),
            (ProxyError::UpstreamTimeout, 504, "timeout_error"),
            (ProxyError::UpstreamConnect, 502, "api_error"),
            (ProxyError::NotReady, 503, "overloaded_error"),
        ];
        for (err, status, kind) in cases {
            let message = match err.param() {
                Some(param) => format!("{param}: {err}"),
                None => err.to_string(),
            };
            let r = err.into_response_as(ApiFormat::Anthropic);
            assert_eq!(r.status().as_u16(), status, "{message}");
            assert_eq!(
                body(r).await,
                serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
            );
        }
        let r = ProxyError::MissingApiKey.into_response_as(ApiFormat::Anthropic);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let missing = body(r).await;
        assert_eq!(missing["error"]["type"], "authentication_error");
        assert!(
            missing["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("x-api-key header is required"),
            "{missing}"
        );
        // The field at fault leads the message, as in Anthropic's own.
        let r = ProxyError::Untranslatable(crate::anthropic::Untranslatable::new(
            "messages[1].content[0]",
            "Content blocks of type `document` cannot be sent to an OpenAI-format backend.",
        ))
        .into_response_as(ApiFormat::Anthropic);
        let message = body(r).await["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            message.starts_with("messages[1].content[0]: Content blocks of type `document`"),
            "{message}"
        );
        let r = ProxyError::KeyRateLimited {
            retry_after: Duration::from_millis(1500),
        }
        .into_response_as(ApiFormat::Anthropic);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(body(r).await["error"]["type"], "rate_limit_error");
        let r = ProxyError::BudgetSpent {
            key_name: "k".into(),
            max_budget: 1.0,
            resets: None,
        }
        .into_response_as(ApiFormat::Anthropic);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()["x-should-retry"], "false");
        assert_eq!(body(r).await["error"]["type"], "rate_limit_error");
    }

    #[test]
    fn bodies_are_openai_shaped() {
        let e = ProxyError::ModelNotFound("gpt-9".into());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {
                "message": "The model `gpt-9` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found"
            }})
        );
        let r = ProxyError::BackendsBusy {
            model: "m".into(),
            retry_after: Duration::from_millis(2500),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }
}
