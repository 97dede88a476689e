//! A mock upstream OpenAI provider for tests, end-to-end runs, benchmarks and the quick start.
//!
//! It speaks the OpenAI HTTP API on one listener, over HTTP/1.1 or HTTP/2 (hyper-util's auto
//! builder: HTTP/2 with prior knowledge on plain TCP, and by ALPN `h2` over TLS, which offers
//! `h2` and `http/1.1` as providers' fronts do; [`MockStats::http2_requests`] counts it):
//! - `POST /v1/chat/completions`: `chat.completion` JSON (indented by two spaces, as OpenAI
//!   writes whole answers, and the legacy completions' and embeddings' too), or with `"stream":true` SSE
//!   `chat.completion.chunk` events: a `delta.role` chunk, [`MockConfig::chunk_count`] `delta.content`
//!   chunks, a chunk with `finish_reason` (`"stop"`, or `"length"` when `max_tokens` /
//!   `max_completion_tokens` cut the answer short), with `stream_options.include_usage` a chunk with
//!   `choices: []` and `usage`, then `data: [DONE]`; with `include_usage` every other chunk says
//!   `"usage":null`, and every chunk ends with OpenAI's `obfuscation` padding (1–16 letters and
//!   digits) unless `stream_options.include_obfuscation` is false (not in the Mistral flavour,
//!   [`MockConfig::refuses_stream_options`]); a member of `stream_options` OpenAI does not know
//!   is refused as OpenAI refuses it (400 `Unknown parameter: 'stream_options.<name>'.`,
//!   `unknown_parameter`). `n` choices are supported. A request that
//!   offers `tools` (`tool_choice` not `none`) and does not end with a `tool` message is answered
//!   with one call of the chosen (or first) function, its arguments filling each property of its
//!   schema (`"mock"`, `1`, `true`), `finish_reason: "tool_calls"`; streamed as OpenAI streams it
//!   (the call's id and name, then its arguments in two pieces). A function name OpenAI refuses,
//!   in `tools` or an assistant turn's `tool_calls`, is refused as OpenAI refuses it: 400 at
//!   `tools[N].function.name` (or `messages[N].tool_calls[M].function.name`),
//!   `string_above_max_length` past 64 characters, `empty_string`, `invalid_value` outside
//!   `^[a-zA-Z0-9_-]+$` (Anthropic takes 128 characters, so a Messages request translated for an
//!   OpenAI backend must shorten its names).
//! - `POST /v1/completions`: the legacy `text_completion`, JSON and SSE likewise (no role chunk).
//! - `POST /v1/embeddings`: `input` as a string, strings, token ids or lists of token ids;
//!   `encoding_format` `float` or `base64` (little-endian f32); `dimensions` overrides the size.
//!   Vectors are deterministic unit vectors of the input ([`embedding_vector`]).
//! - `GET /v1/models` (the configured models) and `GET /v1/models/{id}`.
//! - The Responses API with state kept per instance (`responses.rs`): `POST /v1/responses`
//!   (JSON, or with `"stream":true` named SSE events `response.created` … `response.completed`
//!   and no `[DONE]`; `previous_response_id`; `background`), `GET`/`DELETE /v1/responses/{id}`,
//!   `GET /v1/responses/{id}/input_items`, `POST /v1/responses/{id}/cancel`. An id another
//!   instance created is a 404 here, as it would be at a real provider.
//! - Anthropic's Messages API (`anthropic.rs`): `POST /v1/messages` (JSON, or the named SSE
//!   events of the real API, `ping` and tool use included) and `POST /v1/messages/count_tokens`,
//!   as strict as the current API, with Anthropic's error shape and `x-api-key` +
//!   `anthropic-version` required. On these routes a [`Fault::Status`] answers in Anthropic's
//!   shape (529 `overloaded_error`), and [`Fault::CutAfterChunks`] sends that many events and
//!   then an `error` event, as the real API ends a stream that fails midway.
//! - Azure OpenAI's deployments' layout: `/openai/deployments/<name>/<endpoint>?api-version=…`
//!   is served as `/v1/<endpoint>` (404 "Resource not found" without an `api-version`); with
//!   [`MockConfig::key_header`] `api-key` the key is read from Azure's header.
//!
//! Responses echo the requested `model`. Usage is deterministic: `prompt_tokens` = whitespace
//! separated words over all message contents / prompts / inputs (token ids count one each; at least
//! 1), `completion_tokens` = `chunk_count` (or `max_tokens` when smaller and > 0) per choice.
//! A chat request with a `prompt_cache_key` has its messages before the last read from a
//! prompt cache, as OpenAI's automatic caching does: the longest such prefix sent before under
//! that key counts as `prompt_tokens_details.cached_tokens` (0 the first time), and the
//! longest prefix's tokens past those read as `cache_write_tokens` (written to the cache, as
//! the Anthropic side reports a cache creation; reported only with a `prompt_cache_key`). A
//! chat request with a `reasoning_effort` other than `none` spends `chunk_count` reasoning
//! tokens a choice, inside `completion_tokens` (`completion_tokens_details.reasoning_tokens`).
//! A tool call's `usage` carries the same details as a text answer's. The Responses API's
//! `input_tokens_details` always names `cache_write_tokens` (0: its cache is read through
//! `previous_response_id`), as its type requires.
//! The completion text is `"[<name>] tok1 tok2 …"`, one word per completion token.
//! A chat or Responses answer's `service_tier` is the tier its request asked for (`default`
//! for `auto` or none, `priority` for `fast`), unless [`MockConfig::served_tiers`] serves that
//! tier as another, as OpenAI may (`sluice-mock --serve-tier auto=priority`).
//! Every `/v1` response carries `x-mock-name: <name>` and an `x-request-id`.
//!
//! Errors are OpenAI's `{"error":{"message","type","param","code"}}`: 401 `invalid_api_key`, 400
//! `invalid_request_error` (bad JSON, missing `model`/`messages`/`prompt`/`input`, `stream_options`
//! without `stream`, bad `n`, a function name OpenAI refuses), 404 `model_not_found`, 404 for unknown URLs, 405 for wrong methods.
//!
//! Faults ([`Fault`]) apply to the routed `/v1` endpoints (all five, models included), in the order
//! set, before authentication. Latency applies to every answer except resets and stalls.
//! HTTP/2 has faults of its own: [`Fault::StreamReset`] resets the request's stream with the
//! code it names (`REFUSED_STREAM`, unprocessed; `INTERNAL_ERROR`, unsaid), and
//! [`Fault::GoAway`] sends a new TLS connection a graceful `GOAWAY` that leaves its first
//! request out, in raw frames, before any request is counted. A stream cut by
//! [`Fault::CutAfterChunks`] over HTTP/2 ends with hyper's `RST_STREAM(INTERNAL_ERROR)`.
//!
//! # Control API (same listener, no auth)
//! - `GET /_mock/stats` → [`MockStats`] JSON.
//! - `POST /_mock/reset` → 204; all counters to zero.
//! - `GET /_mock/faults` → `[{"fault": <Fault>, "remaining": 2 | null}]`.
//! - `POST /_mock/faults` with a [`FaultSpec`] `{"fault": <Fault>, "count": 3}` (count absent or null =
//!   until cleared) or a JSON list of them (applied in order) → 200 and the plan as for `GET`;
//!   replaces the previous plan. 400 with an error body if the JSON is not a fault spec.
//! - `DELETE /_mock/faults` → 204; healthy again.
//! - `GET /_mock/last_messages` → the last [`MessagesExchange`] on a Messages route (its
//!   headers, body and the answer's bytes), or `null`.

mod anthropic;
mod fault;
mod openai;
mod responses;
mod server;
mod state;
mod stats;
mod stream;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

pub use anthropic::MessagesExchange;
pub use fault::{Fault, FaultSpec, FaultStatus, GarbageKind, RetryAfter, STALL_LIMIT};
pub use openai::embedding_vector;
pub use stats::{EndpointCounts, MockStats, OTHER_MODELS};

use state::Shared;

/// How a mock server behaves. `Default` is a healthy, instant provider named `mock` that accepts
/// any model and any (or no) API key.
#[derive(Clone)]
pub struct MockConfig {
    /// Sent as `x-mock-name` and at the start of every completion text, so tests see who answered.
    pub name: String,
    /// Models served (`GET /v1/models` lists them); others get 404 `model_not_found`. Empty = any.
    pub models: Vec<String>,
    /// When set, requests need `Authorization: Bearer <api_key>`, else 401 `invalid_api_key`.
    pub api_key: Option<String>,
    /// When set (with `api_key`), the key is read from this header alone, bare (after `Bearer `
    /// in `authorization`): `api-key`, as Azure OpenAI's deployments take it, or
    /// `authorization` on the Messages routes, as a gateway in front of Anthropic's API that
    /// takes bearer tokens only.
    pub key_header: Option<String>,
    /// Wait before answering (before the response head, hence before the first byte).
    pub latency: Duration,
    /// Content chunks per streamed choice, and completion tokens per choice.
    pub chunk_count: usize,
    /// Wait between consecutive SSE events.
    pub chunk_interval: Duration,
    /// Embedding size unless the request sets `dimensions`.
    pub embedding_dims: usize,
    /// Pieces a streamed tool call's arguments (or input) come in, each an event of its own
    /// (`chunk_interval` apart): 2, as the OpenAI and Anthropic examples show; more for the
    /// token by token streams of long arguments.
    pub tool_call_pieces: usize,
    /// As Mistral's API: a chat or completion request with `stream_options` gets 422
    /// `extra_forbidden`, and a stream carries its usage in its last chunk, beside the finish
    /// reason, unasked.
    pub refuses_stream_options: bool,
    /// Tiers served in place of others, `(tier, instead)`: a request the mock would serve at
    /// `tier` (by its `service_tier`: `default` for `auto` or none, `priority` for `fast`) is
    /// served, and its answer's `service_tier` says so, at `instead`, as OpenAI serves `auto`
    /// at a project's own tier and flex at the standard tier when capacity is short ("This
    /// response value may be different from the value set in the parameter"). Chat and
    /// Responses answers alike. Names other than `default`, `priority`, `flex`, `scale` and
    /// `ultrafast` are not served.
    pub served_tiers: Vec<(String, String)>,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            name: "mock".to_owned(),
            models: Vec::new(),
            api_key: None,
            key_header: None,
            latency: Duration::ZERO,
            chunk_count: 5,
            chunk_interval: Duration::ZERO,
            embedding_dims: 8,
            tool_call_pieces: 2,
            refuses_stream_options: false,
            served_tiers: Vec::new(),
        }
    }
}

impl fmt::Debug for MockConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockConfig")
            .field("name", &self.name)
            .field("models", &self.models)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("key_header", &self.key_header)
            .field("latency", &self.latency)
            .field("chunk_count", &self.chunk_count)
            .field("chunk_interval", &self.chunk_interval)
            .field("embedding_dims", &self.embedding_dims)
            .field("tool_call_pieces", &self.tool_call_pieces)
            .field("refuses_stream_options", &self.refuses_stream_options)
            .field("served_tiers", &self.served_tiers)
            .finish()
    }
}

/// `text` cut into `pieces` pieces of about the same length (fewer when it is shorter; at a
/// character's boundary).
pub(crate) fn in_pieces(text: &str, pieces: usize) -> Vec<&str> {
    let mut cut = Vec::with_capacity(pieces);
    let mut rest = text;
    for left in (1..=pieces.max(1)).rev() {
        let at = (rest.len() / left..=rest.len())
            .find(|i| rest.is_char_boundary(*i))
            .unwrap_or(rest.len());
        let (piece, after) = rest.split_at(at);
        if !piece.is_empty() {
            cut.push(piece);
        }
        rest = after;
    }
    cut
}

impl MockConfig {
    /// The default config with this name.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    pub fn with_models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.models = models.into_iter().map(Into::into).collect();
        self
    }

    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// See [`MockConfig::key_header`].
    pub fn with_key_header(mut self, header: impl Into<String>) -> Self {
        self.key_header = Some(header.into().to_ascii_lowercase());
        self
    }

    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    pub fn with_chunk_count(mut self, count: usize) -> Self {
        self.chunk_count = count;
        self
    }

    pub fn with_chunk_interval(mut self, interval: Duration) -> Self {
        self.chunk_interval = interval;
        self
    }

    pub fn with_embedding_dims(mut self, dims: usize) -> Self {
        self.embedding_dims = dims;
        self
    }

    /// See [`MockConfig::refuses_stream_options`].
    pub fn refusing_stream_options(mut self) -> Self {
        self.refuses_stream_options = true;
        self
    }

    /// See [`MockConfig::served_tiers`]: requests served at `tier` are served at `instead`.
    pub fn serving_tier(mut self, tier: &str, instead: &str) -> Self {
        self.served_tiers
            .push((tier.to_owned(), instead.to_owned()));
        self
    }

    /// The tier a request the mock would serve at `tier` is served at
    /// ([`MockConfig::served_tiers`]).
    pub(crate) fn serves(&self, tier: &'static str) -> &'static str {
        self.served_tiers
            .iter()
            .find(|(from, _)| from == tier)
            .and_then(|(_, instead)| openai::tier_name(instead))
            .unwrap_or(tier)
    }
}

/// A running mock provider. Stops on [`MockServer::shutdown`] or when dropped.
pub struct MockServer {
    addr: SocketAddr,
    /// `https` when it serves over TLS ([`MockServer::start_tls`]).
    scheme: &'static str,
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl MockServer {
    /// Binds `addr` (`127.0.0.1:0` picks a free port) and serves in the background on the current
    /// tokio runtime. Fails if the address cannot be bound or there is no runtime.
    pub fn start(config: MockConfig, addr: SocketAddr) -> io::Result<MockServer> {
        Self::serve(config, addr, None)
    }

    /// [`MockServer::start`] on `127.0.0.1:0`.
    pub fn start_local(config: MockConfig) -> io::Result<MockServer> {
        Self::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// [`MockServer::start_local`] over TLS, as providers serve (`https://`, HTTP/2 or HTTP/1.1
    /// as ALPN settles), with the certificate chain and key of these PEM files
    /// (`crate::certs::make_certificates` writes a CA and a certificate for 127.0.0.1 signed
    /// by it).
    pub fn start_tls(config: MockConfig, cert: &Path, key: &Path) -> io::Result<MockServer> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(io::Error::other)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(io::Error::other)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(io::Error::other)?;
        // HTTP/2 when the client offers it, as providers' fronts (Cloudflare's) negotiate it.
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        Self::serve(
            config,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Some(acceptor),
        )
    }

    /// [`MockServer::start_tls`] with a CA and a certificate for 127.0.0.1 made in `dir` (by
    /// `openssl`): a client trusts it with `dir/ca.pem` (the data plane's `--upstream-ca`).
    pub fn start_tls_in(config: MockConfig, dir: &Path) -> io::Result<MockServer> {
        crate::certs::make_certificates(dir);
        Self::start_tls(config, &dir.join("server.pem"), &dir.join("server.key"))
    }

    fn serve(
        config: MockConfig,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> io::Result<MockServer> {
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let listener = {
            let _entered = runtime.enter();
            server::bind(addr)?
        };
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let accept = runtime.spawn(server::accept_loop(listener, Arc::clone(&shared), tls));
        Ok(MockServer {
            addr,
            scheme,
            shared,
            accept: Mutex::new(Some(accept)),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>/v1` (`https://` over TLS), what an OpenAI client takes as its base URL.
    pub fn base_url(&self) -> String {
        format!("{}://{}/v1", self.scheme, self.addr)
    }

    pub fn config(&self) -> &MockConfig {
        &self.shared.config
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MockStats {
        self.shared.counters.snapshot()
    }

    /// Sets every counter to zero.
    pub fn reset_stats(&self) {
        self.shared.counters.reset();
    }

    /// Replaces the fault plan with this one fault (`Fault::times(n)`, `Fault::always()`, or a bare
    /// `Fault`, which applies until cleared).
    pub fn set_fault(&self, spec: impl Into<FaultSpec>) {
        self.shared.faults.set(vec![spec.into()]);
    }

    /// Replaces the fault plan with these faults, applied in order as their counts run out.
    pub fn set_faults(&self, specs: Vec<FaultSpec>) {
        self.shared.faults.set(specs);
    }

    /// The fault plan with what remains of each count.
    pub fn faults(&self) -> Vec<FaultStatus> {
        self.shared.faults.status()
    }

    /// Back to healthy.
    pub fn clear_faults(&self) {
        self.shared.faults.clear();
    }

    /// The last request to a Messages route and the bytes it was answered with.
    pub fn last_messages(&self) -> Option<MessagesExchange> {
        self.shared
            .last_messages
            .lock()
            .ok()
            .and_then(|last| last.clone())
    }

    /// The path (with its query) and headers of the last request to a Responses API route
    /// (`body` and `answer` empty).
    pub fn last_responses_request(&self) -> Option<MessagesExchange> {
        self.shared
            .last_responses
            .lock()
            .ok()
            .and_then(|last| last.clone())
    }

    /// Stops accepting, closes every open connection (in-flight responses are cut off) and returns
    /// once the port is closed.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        let accept = self.accept.lock().ok().and_then(|mut a| a.take());
        if let Some(accept) = accept {
            let _ = accept.await;
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

impl fmt::Debug for MockServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockServer")
            .field("addr", &self.addr)
            .field("config", &self.shared.config)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Arguments cut into pieces read back whole; two pieces cut where they always were (the
    /// middle), more as asked, fewer only for shorter text, never inside a character.
    #[test]
    fn arguments_are_cut_into_the_pieces_asked_for() {
        let arguments = r#"{"content":"mock","description":"mock","file_path":"mock"}"#;
        let middle = arguments.len() / 2;
        assert_eq!(
            in_pieces(arguments, 2),
            [&arguments[..middle], &arguments[middle..]]
        );
        for pieces in [1, 2, 7, 40, arguments.len()] {
            let cut = in_pieces(arguments, pieces);
            assert_eq!(cut.len(), pieces);
            assert_eq!(cut.concat(), arguments);
        }
        assert_eq!(in_pieces("ab", 5), ["a", "b"]);
        assert_eq!(in_pieces("", 3), Vec::<&str>::new());
        assert_eq!(in_pieces("éé", 4).concat(), "éé");
        assert_eq!(in_pieces("éé", 4).len(), 2);
    }
}
