//! The data plane's view of the world: one immutable [`Snapshot`] built and validated from the
//! control plane's message (fallible prepare), then published through [`SnapshotStore`]
//! (infallible swap). A request loads the current snapshot once and uses only that value.

use std::collections::{HashMap, HashSet};

use foldhash::HashMap as FastMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use http::{HeaderName, HeaderValue, Uri, header};
use sluice_proto::v1 as proto;
use tokio::sync::watch;
use url::Url;

use sluice_domain::endpoint as path;
pub use sluice_domain::pool::Pool;
use sluice_domain::price::{LongContext, Prices};
use sluice_domain::settings::InvalidDuration;
pub use sluice_domain::settings::Policy;

use crate::affinity::AffinityKeys;
use crate::anthropic::Sampling;
use crate::calls::CallPrices;
use crate::clock::{Clock, Now, std_duration, system_time};
use crate::cooldown::{CooldownTracker, FleetCooldown, MAX_RETRY_AFTER, Whose};
use crate::ratelimit::{ParallelLimit, RateLimiter, TokenBucket};
use crate::tiers::Tiers;
use crate::upstream::{UpstreamClient, UpstreamTls};

/// Why a snapshot was refused (sent back to the control plane as the nack's detail).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "snapshot version {got} is older than the current version {have} of the same control-plane epoch"
    )]
    Stale { got: u64, have: u64 },
    #[error("backend {backend}: invalid base_url: {reason}")]
    InvalidBaseUrl { backend: String, reason: String },
    #[error("backend id {0} appears twice")]
    DuplicateBackend(String),
    #[error("backend {0}: unknown pool")]
    InvalidPool(String),
    #[error("backend {backend}: model route with an empty name")]
    EmptyModelName { backend: String },
    #[error("backend {0}: api key is not a valid header value")]
    InvalidApiKey(String),
    #[error("backend {0}: unknown api_format")]
    InvalidApiFormat(String),
    #[error("backend {0}: anthropic_version is not a valid header value")]
    InvalidAnthropicVersion(String),
    #[error("backend {0}: unknown key_header")]
    InvalidKeyHeader(String),
    #[error("client key {0}: key_sha256 must be 32 bytes")]
    InvalidKeyHash(String),
    #[error("client key {0}: the same key hash appears twice")]
    DuplicateKeyHash(String),
    #[error(transparent)]
    InvalidDuration(#[from] InvalidDuration),
    #[error("building the upstream HTTP client failed: {0}")]
    UpstreamClient(String),
    #[error("affinity key {0}: the secret must be 32 bytes")]
    InvalidAffinityKey(u32),
    #[error(
        "the snapshot comes from another database ({got}) than the one this replica serves \
         ({have}): the control plane was started on an empty or another database (a restore \
         copied to the wrong place, a volume not mounted?). Serving the current snapshot; \
         restart this replica to take the new database deliberately"
    )]
    OtherDatabase { got: String, have: String },
}

/// The endpoints the proxy serves: OpenAI's, and Anthropic's Messages API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    /// `POST /v1/responses`, and the calls on a stored response.
    Responses,
    /// `POST /v1/responses/compact`: a conversation made short (the SDKs'
    /// `responses.compact`, the Agents SDK's compaction session), billed as a create is.
    ResponsesCompact,
    /// `POST /v1/responses/input_tokens`: a Responses request's input counted, not generated.
    ResponsesInputTokens,
    /// Anthropic's `POST /v1/messages`.
    Messages,
    /// Anthropic's `POST /v1/messages/count_tokens`.
    CountTokens,
}

impl Endpoint {
    /// The path after the base URL (`/v1`).
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => path::CHAT_COMPLETIONS,
            Self::Completions => path::COMPLETIONS,
            Self::Embeddings => path::EMBEDDINGS,
            Self::Responses => path::RESPONSES,
            Self::ResponsesCompact => path::RESPONSES_COMPACT,
            Self::ResponsesInputTokens => path::RESPONSES_INPUT_TOKENS,
            Self::Messages => path::MESSAGES,
            Self::CountTokens => path::COUNT_TOKENS,
        }
    }

    /// Whether the endpoint can stream (embeddings, compactions and token counts cannot).
    pub fn can_stream(self) -> bool {
        !matches!(
            self,
            Self::Embeddings
                | Self::CountTokens
                | Self::ResponsesCompact
                | Self::ResponsesInputTokens
        )
    }

    /// Whether the request is the Responses API's: its response ids are Sluice's, and a
    /// `previous_response_id` pins it to the backend holding that response.
    pub fn is_responses(self) -> bool {
        matches!(
            self,
            Self::Responses | Self::ResponsesCompact | Self::ResponsesInputTokens
        )
    }

    /// Whether the request only counts a prompt's tokens: free (the providers bill nothing
    /// for it, and its answer has no usage), so it takes no reserve of a budget nor of a
    /// tokens-per-minute limit.
    pub fn counts_only(self) -> bool {
        matches!(self, Self::CountTokens | Self::ResponsesInputTokens)
    }

    /// The API the client speaks here: the shape of its answers and errors.
    pub fn format(self) -> ApiFormat {
        match self {
            Self::Messages | Self::CountTokens => ApiFormat::Anthropic,
            _ => ApiFormat::OpenAi,
        }
    }

    pub fn to_proto(self) -> proto::Endpoint {
        match self {
            Self::ChatCompletions => proto::Endpoint::ChatCompletions,
            Self::Completions => proto::Endpoint::Completions,
            Self::Embeddings => proto::Endpoint::Embeddings,
            // Counted with the Responses API's requests: the statistics name the APIs.
            Self::Responses | Self::ResponsesCompact | Self::ResponsesInputTokens => {
                proto::Endpoint::Responses
            }
            Self::Messages => proto::Endpoint::Messages,
            Self::CountTokens => proto::Endpoint::MessagesCountTokens,
        }
    }
}

/// The API a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFormat {
    OpenAi,
    /// Anthropic's Messages API: chat completions are translated to it and back.
    Anthropic,
}

/// The `max_tokens` an Anthropic backend gets when neither the client nor the route sets one.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// An upstream provider as routing sees it.
#[derive(Debug)]
pub struct Backend {
    pub id: String,
    /// Shared with metric labels and the accounting of each request.
    pub name: Arc<str>,
    pub pool: Pool,
    pub priority: i32,
    /// Relative share among equals, at least 1.
    pub weight: u32,
    pub format: ApiFormat,
    chat_uri: Uri,
    completions_uri: Uri,
    embeddings_uri: Uri,
    responses_uri: Uri,
    responses_compact_uri: Uri,
    responses_input_tokens_uri: Uri,
    /// The base URL, for the paths that name a stored response.
    base: Url,
    /// `<base>/messages`: where an Anthropic backend takes chat and Messages requests.
    messages_uri: Uri,
    /// `<base>/messages/count_tokens`, for an Anthropic backend.
    count_tokens_uri: Uri,
    /// The header that carries its API key ([`KeyHeader`]) and its value (`Bearer <key>` in
    /// `Authorization`, else the bare key), marked sensitive; `None` when it has no key.
    key: Option<(HeaderName, HeaderValue)>,
    /// `anthropic-version`, for an Anthropic backend.
    anthropic_version: Option<HeaderValue>,
    /// The `Host` header of its requests, for a plain `http://` backend (every URI above has
    /// the base's scheme and authority).
    host: Option<HeaderValue>,
    /// Whether its answers' `total_tokens` hold a thinking model's thoughts, billed as
    /// output, that no other figure reports ([`thoughts_in_total`]).
    pub thoughts_in_total: bool,
    /// This replica's share of the backend's RPM limit.
    pub limiter: Option<RateLimiter>,
    /// This replica's share of the backend's TPM limit.
    pub tokens: Option<TokenBucket>,
    /// The control plane's cooldown state of the backend (from every replica's reports), its
    /// end on this replica's monotonic clock; who made its last changes is in `cooldown_run`.
    pub cooldown: FleetCooldown,
    /// The author of the last changes and the epoch they were based on, if any.
    pub cooldown_run: Option<(String, u64)>,
    /// The control plane's cooldown states of models at the backend (their names at the
    /// provider), those that differ from the initial one.
    pub model_cooldowns: Vec<ModelCooldown>,
    /// Whether it serves the Responses API.
    pub responses_api: bool,
    /// The member a Messages request's `max_tokens` becomes in the chat request it is
    /// translated to ([`completion_limit_member`]).
    pub completion_limit: &'static str,
    /// Whether a chat request translated for it may carry `temperature` and `top_p`: by its
    /// `anthropic-version` (an OpenAI-format backend: [`Sampling::Taken`], unused).
    pub sampling: Sampling,
}

/// The control plane's cooldown state of one model at a backend ([`Backend::cooldown`]'s
/// alike).
#[derive(Debug)]
pub struct ModelCooldown {
    pub model: String,
    pub cooldown: FleetCooldown,
    pub run: Option<(String, u64)>,
}

/// A cooldown's end, as a snapshot sent at `now` gives it, on this replica's monotonic clock:
/// the time left of it (`remaining`), or, from a control plane older than that, its end by
/// the control plane's clock (`until`). `None` when it has ended.
fn cooldown_end(
    remaining: Option<&sluice_proto::wkt::Duration>,
    until: Option<&sluice_proto::wkt::Timestamp>,
    policy: &Policy,
    now: Now,
) -> Option<tokio::time::Instant> {
    match remaining.and_then(std_duration) {
        // No cooldown is longer than the cap or the longest Retry-After.
        Some(left) => now
            .instant
            .checked_add(left.min(policy.cooldown.cap.max(MAX_RETRY_AFTER))),
        // A control plane older than `cooldown_remaining`: its clock against ours.
        None => until.and_then(system_time).map(|wall| now.instant_at(wall)),
    }
    .filter(|until| *until > now.instant)
}

/// Whether a backend at `base` is Google's (its Gemini API's OpenAI-compatible endpoint at
/// `generativelanguage.googleapis.com`, or Vertex AI's at `*-aiplatform.googleapis.com`),
/// whose `usage` counts a thinking model's thoughts in `total_tokens` alone (prompt 9,
/// completion 3, total 105) and which bills them as output: the excess is read as reasoning
/// ([`crate::usage::Tokens::with_unshown_as_reasoning`]). Not for other servers, whose totals
/// can hold input tokens beyond the prompt's figure.
pub fn thoughts_in_total(base: &Url) -> bool {
    let host = base.host_str().unwrap_or_default().to_ascii_lowercase();
    host.ends_with(".googleapis.com")
}

/// The chat request member that caps the answer's tokens, for a backend at `base`:
/// `max_completion_tokens` for OpenAI's own API and Azure OpenAI, whose reasoning models
/// (o-series, GPT-5) refuse `max_tokens` (400 `unsupported_parameter`) and whose other models
/// take either; `max_tokens` for every other OpenAI-compatible server, which all know it and
/// not all the newer name (some refuse an unknown member, some ignore it and so the limit).
pub fn completion_limit_member(base: &Url) -> &'static str {
    let host = base.host_str().unwrap_or_default().to_ascii_lowercase();
    let openai = host == "api.openai.com"
        || host.ends_with(".openai.azure.com")
        || host.ends_with(".cognitiveservices.azure.com");
    if openai {
        "max_completion_tokens"
    } else {
        "max_tokens"
    }
}

impl Backend {
    /// The full upstream URI of an endpoint, `None` when the backend's API has no such
    /// endpoint: an Anthropic backend serves chat and Messages only (translated or not), an
    /// OpenAI-format backend cannot count tokens.
    pub fn uri(&self, endpoint: Endpoint) -> Option<&Uri> {
        match (self.format, endpoint) {
            (ApiFormat::OpenAi, Endpoint::ChatCompletions | Endpoint::Messages) => {
                Some(&self.chat_uri)
            }
            (ApiFormat::OpenAi, Endpoint::Completions) => Some(&self.completions_uri),
            (ApiFormat::OpenAi, Endpoint::Embeddings) => Some(&self.embeddings_uri),
            (ApiFormat::OpenAi, Endpoint::Responses) => Some(&self.responses_uri),
            (ApiFormat::OpenAi, Endpoint::ResponsesCompact) => Some(&self.responses_compact_uri),
            (ApiFormat::OpenAi, Endpoint::ResponsesInputTokens) => {
                Some(&self.responses_input_tokens_uri)
            }
            (ApiFormat::OpenAi, Endpoint::CountTokens) => None,
            (ApiFormat::Anthropic, Endpoint::ChatCompletions | Endpoint::Messages) => {
                Some(&self.messages_uri)
            }
            (ApiFormat::Anthropic, Endpoint::CountTokens) => Some(&self.count_tokens_uri),
            (ApiFormat::Anthropic, _) => None,
        }
    }

    /// `<base>/responses/<id>[/<action>][?<query>]`: a call on the stored response `id`
    /// (percent-encoded as one path segment), with the base URL's own query first, if any.
    /// `None` if that is not a valid URI.
    pub fn stored_response_uri(
        &self,
        id: &str,
        action: Option<&str>,
        query: Option<&str>,
    ) -> Option<Uri> {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().ok()?;
            path.pop_if_empty().push("responses").push(id);
            if let Some(action) = action {
                path.push(action);
            }
        }
        let query = match (self.base.query(), query) {
            (Some(own), Some(given)) => Some(format!("{own}&{given}")),
            (own, given) => own.or(given).map(str::to_owned),
        };
        url.set_query(query.as_deref());
        Uri::try_from(url.as_str()).ok()
    }

    /// The headers that authenticate a request upstream: the key's (if it has one), and
    /// `anthropic-version` for an Anthropic backend.
    pub fn auth_headers(&self) -> impl Iterator<Item = (HeaderName, &HeaderValue)> {
        let key = self.key.as_ref().map(|(name, value)| (name.clone(), value));
        let version = self
            .anthropic_version
            .as_ref()
            .map(|value| (HeaderName::from_static("anthropic-version"), value));
        key.into_iter().chain(version)
    }

    /// The `Host` header of the backend's requests, when made ahead
    /// ([`crate::upstream::host_header`]).
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// The `Authorization` header to send upstream, if the backend's key goes in it.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.key
            .as_ref()
            .filter(|(name, _)| name == header::AUTHORIZATION)
            .map(|(_, value)| value)
    }

    /// The backend's API key (empty when it has none), to remove from what upstreams echo.
    pub fn api_key(&self) -> &[u8] {
        match &self.key {
            Some((name, value)) if name == header::AUTHORIZATION => {
                value.as_bytes().strip_prefix(b"Bearer ")
            }
            Some((_, value)) => Some(value.as_bytes()),
            None => None,
        }
        .unwrap_or_default()
    }
}

/// One way to serve a public model: a backend and the name that backend knows the model by.
#[derive(Debug, Clone)]
pub struct Route {
    /// Index into [`Snapshot::backends`].
    pub backend: usize,
    pub upstream_model: String,
    /// What a request served by this route costs.
    pub prices: Prices,
    /// What its prices are multiplied by at the price tiers its answers may report.
    pub tiers: Tiers,
    /// What each call of a tool its provider bills by the call costs.
    pub call_prices: CallPrices,
    /// `max_tokens` for an Anthropic backend when the client gave none.
    pub default_max_tokens: u32,
    /// The most output tokens a request translated for this route asks for
    /// (`ModelRoute.max_output_tokens`); `None`: as the client asks.
    pub max_output_tokens: Option<u32>,
}

/// A client key's identity and permissions.
#[derive(Debug)]
pub struct ClientKey {
    pub id: String,
    pub name: String,
    /// `None` allows every model.
    pub allowed_models: Option<HashSet<String>>,
    pub limiter: Option<RateLimiter>,
    /// This replica's share of the key's TPM limit.
    pub tokens: Option<TokenBucket>,
    /// This replica's share of the key's `max_parallel_requests`.
    pub parallel: Option<ParallelLimit>,
    /// The control plane found the key past its expiry: it is refused as expired.
    pub expired: bool,
    /// Its expire time, by which a replica refuses it on its own ([`ClientKey::expired_at`]).
    pub expires: Option<SystemTime>,
    /// The control plane found the key's budget spent for the current period: it is refused
    /// with 429 `insufficient_quota` until a snapshot says otherwise.
    pub budget_spent: Option<SpentBudget>,
}

/// A spent budget, as the refusal names it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpentBudget {
    pub max_budget: f64,
    /// When its period resets; `None`: never (a lifetime budget).
    pub resets: Option<SystemTime>,
}

/// How long past a key's expire time, by this replica's clock, the replica refuses it on its
/// own: the control plane's `expired` decides while the replica is connected, sooner; this
/// holds a replica cut off from it (an outage, a partition), and is long enough that a replica
/// whose clock runs that much ahead never refuses a key the control plane still takes.
pub const EXPIRY_GRACE: Duration = Duration::from_secs(60);

impl ClientKey {
    /// Whether the key is refused as expired at `now` (this replica's wall clock): the control
    /// plane said so, or its expire time passed [`EXPIRY_GRACE`] ago.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        self.expired
            || self
                .expires
                .is_some_and(|at| now >= at.checked_add(EXPIRY_GRACE).unwrap_or(at))
    }

    pub fn may_use(&self, model: &str) -> bool {
        self.allowed_models
            .as_ref()
            .is_none_or(|allowed| allowed.contains(model))
    }
}

/// Everything one request needs, immutable once built.
#[derive(Debug)]
pub struct Snapshot {
    /// The control plane's start this snapshot came from (versions compare only within one).
    pub epoch: String,
    /// The database it was built from (empty from a control plane that predates the id): a
    /// snapshot of another database is refused ([`SnapshotError::OtherDatabase`]).
    pub database_id: String,
    /// Whether its control plane keeps a cooldown per model at a backend
    /// ([`crate::cooldown`]): under one that does not, a 429 is reported as the backend's.
    pub model_cooldowns: bool,
    pub version: u64,
    pub nonce: String,
    pub created: Option<SystemTime>,
    pub replica_count: u32,
    pub policy: Policy,
    /// When this replica built it (for `sluice_snapshot_age_seconds`).
    pub applied_at: std::time::Instant,
    /// The keys that sign and check Responses API ids.
    pub affinity: Arc<AffinityKeys>,
    backends: Vec<Backend>,
    /// Public model name → routes, sorted primary before fallback, then by priority. The
    /// names are shared with metric labels.
    ///
    /// This map and the next are looked up on every request, so they hash with foldhash
    /// (randomly seeded, several times cheaper than SipHash); their keys come from the
    /// control plane, never from a client, so no client can fill them with collisions.
    routes: FastMap<Arc<str>, Vec<Route>>,
    keys: FastMap<[u8; 32], ClientKey>,
    /// One pooled client per serving thread, so that a thread only ever uses connections
    /// whose I/O its own runtime drives.
    upstream: Arc<[UpstreamClient]>,
}

impl Snapshot {
    /// Validates `message` and builds the routing tables, the key map and the rate limiters.
    /// Limiters and the upstream clients (`pools` of them) are carried over from `previous`
    /// where they still fit.
    pub fn prepare(
        message: proto::Snapshot,
        previous: Option<&Snapshot>,
        now: Now,
        pools: usize,
    ) -> Result<Self, SnapshotError> {
        Self::prepare_with(message, previous, now, pools, &UpstreamTls::default(), None)
    }

    /// [`Snapshot::prepare`] with upstream clients that make TLS connections as `tls` says,
    /// for a replica ranked `rank` among the snapshot's share holders (`None`: not listed).
    pub fn prepare_with(
        message: proto::Snapshot,
        previous: Option<&Snapshot>,
        now: Now,
        pools: usize,
        tls: &UpstreamTls,
        rank: Option<u32>,
    ) -> Result<Self, SnapshotError> {
        let policy = match &message.settings {
            Some(settings) => Policy::try_from(settings)?,
            None => Policy::default(),
        };
        let replica_count = message.replica_count.max(1);

        let previous_backends: HashMap<&str, &Backend> = previous
            .map(|p| p.backends.iter().map(|b| (b.id.as_str(), b)).collect())
            .unwrap_or_default();
        let mut backends = Vec::with_capacity(message.backends.len());
        let mut routes: FastMap<Arc<str>, Vec<Route>> = FastMap::default();
        let mut ids = HashSet::new();
        for b in message.backends {
            if !ids.insert(b.id.clone()) {
                return Err(SnapshotError::DuplicateBackend(b.id));
            }
            let pool =
                Pool::try_from(b.pool).map_err(|_| SnapshotError::InvalidPool(b.id.clone()))?;
            let base = parse_base_url(&b.id, &b.base_url)?;
            let format = match proto::ApiFormat::try_from(b.api_format) {
                Ok(proto::ApiFormat::Anthropic) => ApiFormat::Anthropic,
                Ok(proto::ApiFormat::Unspecified | proto::ApiFormat::Openai) => ApiFormat::OpenAi,
                Err(_) => return Err(SnapshotError::InvalidApiFormat(b.id.clone())),
            };
            let key = if b.api_key.is_empty() {
                None
            } else {
                let name = match proto::KeyHeader::try_from(b.key_header) {
                    Ok(proto::KeyHeader::Unspecified) => match format {
                        ApiFormat::OpenAi => header::AUTHORIZATION,
                        ApiFormat::Anthropic => HeaderName::from_static("x-api-key"),
                    },
                    Ok(proto::KeyHeader::Bearer) => header::AUTHORIZATION,
                    Ok(proto::KeyHeader::XApiKey) => HeaderName::from_static("x-api-key"),
                    Ok(proto::KeyHeader::ApiKey) => HeaderName::from_static("api-key"),
                    Err(_) => return Err(SnapshotError::InvalidKeyHeader(b.id.clone())),
                };
                let value = if name == header::AUTHORIZATION {
                    format!("Bearer {}", b.api_key)
                } else {
                    b.api_key.clone()
                };
                let mut value = HeaderValue::try_from(value)
                    .map_err(|_| SnapshotError::InvalidApiKey(b.id.clone()))?;
                value.set_sensitive(true);
                Some((name, value))
            };
            let anthropic_version = match format {
                ApiFormat::OpenAi => None,
                ApiFormat::Anthropic if b.anthropic_version.is_empty() => {
                    Some(HeaderValue::from_static(crate::anthropic::DEFAULT_VERSION))
                }
                ApiFormat::Anthropic => Some(
                    HeaderValue::try_from(b.anthropic_version.as_str())
                        .map_err(|_| SnapshotError::InvalidAnthropicVersion(b.id.clone()))?,
                ),
            };
            let index = backends.len();
            let mut served = HashSet::new();
            for model in &b.models {
                if model.name.is_empty() {
                    return Err(SnapshotError::EmptyModelName { backend: b.id });
                }
                // A model listed twice on one backend is one route, not two attempts.
                if !served.insert(model.name.as_str()) {
                    continue;
                }
                let upstream_model = if model.upstream_name.is_empty() {
                    model.name.clone()
                } else {
                    model.upstream_name.clone()
                };
                routes
                    .entry(model.name.as_str().into())
                    .or_default()
                    .push(Route {
                        backend: index,
                        upstream_model,
                        prices: Prices::per_mtok(
                            model.input_price_per_mtok,
                            model.cached_input_price_per_mtok,
                            model.cache_write_price_per_mtok,
                            model.output_price_per_mtok,
                        )
                        .with_audio(
                            model.audio_input_price_per_mtok,
                            model.audio_output_price_per_mtok,
                        )
                        .with_long_context(model.long_context.map(|l| LongContext {
                            above: l.above_prompt_tokens,
                            input: l.input_multiplier,
                            output: l.output_multiplier,
                        })),
                        tiers: Tiers::new(
                            model
                                .tier_multipliers
                                .iter()
                                .map(|t| (t.tier.as_str(), t.multiplier)),
                        ),
                        call_prices: CallPrices::new(
                            model
                                .call_prices
                                .iter()
                                .map(|c| (c.tool.as_str(), c.price_per_thousand_calls)),
                        ),
                        default_max_tokens: match model.default_max_tokens {
                            0 => DEFAULT_MAX_TOKENS,
                            n => n,
                        },
                        max_output_tokens: (model.max_output_tokens > 0)
                            .then_some(model.max_output_tokens),
                    });
            }
            let until = cooldown_end(
                b.cooldown_remaining.as_ref(),
                b.cooldown_until.as_ref(),
                &policy,
                now,
            );
            let model_cooldowns = b
                .model_cooldowns
                .into_iter()
                .map(|m| ModelCooldown {
                    cooldown: FleetCooldown {
                        epoch: m.cooldown_epoch,
                        streak: m.consecutive_failures,
                        until: cooldown_end(
                            m.cooldown_remaining.as_ref(),
                            m.cooldown_until.as_ref(),
                            &policy,
                            now,
                        ),
                        since: None,
                        reset_at: None,
                        run: None,
                    },
                    run: (!m.cooldown_changed_by.is_empty())
                        .then_some((m.cooldown_changed_by, m.cooldown_run_basis)),
                    model: m.model,
                })
                .collect();
            let before = previous_backends.get(b.id.as_str());
            let limiter = RateLimiter::carry_over(
                before.and_then(|p| p.limiter.as_ref()),
                b.rpm_limit,
                replica_count,
                now.instant,
            );
            let tokens = TokenBucket::carry_over(
                before.and_then(|p| p.tokens.as_ref()),
                b.tpm_limit,
                replica_count,
                now.instant,
            );
            let chat_uri = endpoint_uri(&b.id, &base, Endpoint::ChatCompletions)?;
            backends.push(Backend {
                thoughts_in_total: thoughts_in_total(&base),
                host: crate::upstream::host_header(&chat_uri),
                chat_uri,
                completions_uri: endpoint_uri(&b.id, &base, Endpoint::Completions)?,
                embeddings_uri: endpoint_uri(&b.id, &base, Endpoint::Embeddings)?,
                responses_uri: endpoint_uri(&b.id, &base, Endpoint::Responses)?,
                responses_compact_uri: endpoint_uri(&b.id, &base, Endpoint::ResponsesCompact)?,
                responses_input_tokens_uri: endpoint_uri(
                    &b.id,
                    &base,
                    Endpoint::ResponsesInputTokens,
                )?,
                messages_uri: endpoint_uri(&b.id, &base, Endpoint::Messages)?,
                count_tokens_uri: endpoint_uri(&b.id, &base, Endpoint::CountTokens)?,
                completion_limit: completion_limit_member(&base),
                sampling: anthropic_version
                    .as_ref()
                    .map_or(Sampling::Taken, |v| Sampling::of_version(v.as_bytes())),
                base,
                format,
                anthropic_version,
                id: b.id,
                name: b.name.into(),
                pool,
                priority: b.priority,
                weight: b.weight.max(1),
                key,
                limiter,
                tokens,
                cooldown: FleetCooldown {
                    epoch: b.cooldown_epoch,
                    streak: b.consecutive_failures,
                    until,
                    since: None,
                    reset_at: None,
                    run: None,
                },
                cooldown_run: (!b.cooldown_changed_by.is_empty())
                    .then_some((b.cooldown_changed_by, b.cooldown_run_basis)),
                model_cooldowns,
                responses_api: b.responses_api.unwrap_or(true),
            });
        }
        for list in routes.values_mut() {
            list.sort_by_key(|r| (backends[r.backend].pool, backends[r.backend].priority));
        }

        let previous_keys: HashMap<&str, &ClientKey> = previous
            .map(|p| p.keys.values().map(|k| (k.id.as_str(), k)).collect())
            .unwrap_or_default();
        let mut keys = FastMap::with_capacity_and_hasher(
            message.client_keys.len(),
            foldhash::fast::RandomState::default(),
        );
        for k in message.client_keys {
            let hash: [u8; 32] = k
                .key_sha256
                .as_slice()
                .try_into()
                .map_err(|_| SnapshotError::InvalidKeyHash(k.id.clone()))?;
            let before = previous_keys.get(k.id.as_str());
            let limiter = RateLimiter::carry_over(
                before.and_then(|p| p.limiter.as_ref()),
                k.rpm_limit,
                replica_count,
                now.instant,
            );
            let tokens = TokenBucket::carry_over(
                before.and_then(|p| p.tokens.as_ref()),
                k.tpm_limit,
                replica_count,
                now.instant,
            );
            let parallel = ParallelLimit::carry_over(
                before.and_then(|p| p.parallel.as_ref()),
                k.max_parallel_requests,
                replica_count,
                rank,
            );
            let key = ClientKey {
                allowed_models: if k.allowed_models.is_empty() {
                    None
                } else {
                    Some(k.allowed_models.into_iter().collect())
                },
                id: k.id,
                name: k.name,
                limiter,
                tokens,
                parallel,
                expired: k.expired,
                expires: k.expire_time.as_ref().and_then(system_time),
                budget_spent: k.budget_spent.then(|| SpentBudget {
                    max_budget: k.max_budget,
                    resets: k.budget_reset_time.as_ref().and_then(system_time),
                }),
            };
            if let Some(dup) = keys.insert(hash, key) {
                return Err(SnapshotError::DuplicateKeyHash(dup.id));
            }
        }

        let upstream = match previous {
            Some(p)
                if p.policy.connect_timeout == policy.connect_timeout
                    && p.upstream.len() == pools.max(1) =>
            {
                Arc::clone(&p.upstream)
            }
            _ => (0..pools.max(1))
                .map(|_| upstream_client(policy.connect_timeout, tls))
                .collect::<Result<_, _>>()?,
        };

        let affinity = AffinityKeys::from_proto(&message.affinity_keys)
            .map_err(SnapshotError::InvalidAffinityKey)?;
        Ok(Self {
            affinity: Arc::new(affinity),
            epoch: message.epoch,
            database_id: message.database_id,
            model_cooldowns: message.model_cooldowns,
            version: message.version,
            nonce: message.nonce,
            created: message.create_time.as_ref().and_then(system_time),
            replica_count,
            policy,
            applied_at: std::time::Instant::now(),
            backends,
            routes,
            keys,
            upstream,
        })
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The backend with this id and its index, if it is in the snapshot (enabled).
    pub fn backend_by_id(&self, id: &str) -> Option<(usize, &Backend)> {
        self.backends.iter().enumerate().find(|(_, b)| b.id == id)
    }

    /// Routes for a public model, primary before fallback and by priority; `None` if no
    /// backend serves it.
    pub fn routes(&self, model: &str) -> Option<&[Route]> {
        self.routes.get(model).map(Vec::as_slice)
    }

    /// [`Snapshot::routes`] together with the snapshot's own copy of the name.
    pub fn model(&self, model: &str) -> Option<(&Arc<str>, &[Route])> {
        self.routes
            .get_key_value(model)
            .map(|(name, routes)| (name, routes.as_slice()))
    }

    /// Public model names, sorted.
    pub fn models(&self) -> Vec<&str> {
        let mut models: Vec<&str> = self.routes.keys().map(|m| &**m).collect();
        models.sort_unstable();
        models
    }

    /// The client key with this SHA-256, if active.
    pub fn client_key(&self, sha256: &[u8; 32]) -> Option<&ClientKey> {
        self.keys.get(sha256)
    }

    /// The pooled upstream HTTP client of serving thread `pool`.
    pub fn upstream(&self, pool: usize) -> &UpstreamClient {
        &self.upstream[pool % self.upstream.len()]
    }
}

fn parse_base_url(backend: &str, raw: &str) -> Result<Url, SnapshotError> {
    let invalid = |reason: String| SnapshotError::InvalidBaseUrl {
        backend: backend.to_owned(),
        reason,
    };
    let url = Url::parse(raw).map_err(|e| invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "scheme {} is not http or https",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host".to_owned()));
    }
    // Credentials in the URL would go out in the `Host` header; the API key has its own field.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "user or password in the URL; use the API key".to_owned(),
        ));
    }
    if url.fragment().is_some() {
        return Err(invalid("fragment not allowed".to_owned()));
    }
    Ok(url)
}

fn endpoint_uri(backend: &str, base: &Url, endpoint: Endpoint) -> Result<Uri, SnapshotError> {
    joined_uri(backend, base, endpoint.path())
}

fn joined_uri(backend: &str, base: &Url, path: &str) -> Result<Uri, SnapshotError> {
    let invalid = |reason: String| SnapshotError::InvalidBaseUrl {
        backend: backend.to_owned(),
        reason,
    };
    // The path goes before the base's own query (Azure OpenAI's `?api-version=…`), if any.
    let mut without_query = base.clone();
    without_query.set_query(None);
    let joined = match base.query() {
        Some(query) => format!(
            "{}{path}?{query}",
            without_query.as_str().trim_end_matches('/')
        ),
        None => format!("{}{path}", without_query.as_str().trim_end_matches('/')),
    };
    // Parsed by `url` first: it normalizes (percent-encoding, IDNA hosts) what `Uri` would
    // refuse or take literally.
    let normalized = Url::parse(&joined).map_err(|e| invalid(e.to_string()))?;
    Uri::try_from(normalized.as_str()).map_err(|e| invalid(e.to_string()))
}

fn upstream_client(
    connect_timeout: Duration,
    tls: &UpstreamTls,
) -> Result<UpstreamClient, SnapshotError> {
    UpstreamClient::new(connect_timeout, tls).map_err(SnapshotError::UpstreamClient)
}

/// What [`SnapshotStore::apply`] did with an accepted snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It is now the current snapshot.
    Swapped,
    /// Its version is the current one; nothing changed.
    Unchanged,
}

/// Why this replica refused a snapshot (the `reason` of `sluice_snapshot_refusals_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Older than the current one of the same control-plane epoch.
    Stale,
    /// It did not validate (see [`SnapshotError`]).
    Invalid,
    /// Larger than [`sluice_proto::limits::MAX_SNAPSHOT_BYTES`]: it was not even decoded.
    TooLarge,
    /// Built from another database than the current one ([`SnapshotError::OtherDatabase`]).
    OtherDatabase,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::Stale,
        Refusal::Invalid,
        Refusal::TooLarge,
        Refusal::OtherDatabase,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Stale => "stale",
            Refusal::Invalid => "invalid",
            Refusal::TooLarge => "too_large",
            Refusal::OtherDatabase => "other_database",
        }
    }
}

/// The last snapshot this replica refused that would have replaced its current one: until
/// the control plane sends one it accepts, the replica serves an older configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale {
    /// The refused snapshot's version; `None` when it was too large to be decoded.
    pub refused_version: Option<u64>,
    pub why: Refusal,
}

/// Holds the current snapshot. Requests `load` it; the snapshot subscriber `apply`s new ones.
#[derive(Debug)]
pub struct SnapshotStore {
    current: ArcSwapOption<Snapshot>,
    version: watch::Sender<u64>,
    cooldowns: Arc<CooldownTracker>,
    /// Upstream clients per snapshot: one per serving thread.
    pools: usize,
    /// How they make TLS connections.
    tls: UpstreamTls,
    /// Snapshots refused since start, by [`Refusal`] (in the order of [`Refusal::ALL`]).
    refusals: [AtomicU64; 4],
    /// Set by a refusal that leaves this replica behind, cleared by the next snapshot taken.
    stale: Mutex<Option<Stale>>,
    clock: Clock,
    /// How the control plane names this replica as the author of cooldown changes.
    author: String,
    /// This replica's node id, as `Snapshot.share_holders` lists it.
    node_id: String,
    /// The snapshot stream is open: the control plane answered it, and it has not ended.
    connected: AtomicBool,
}

impl Default for SnapshotStore {
    fn default() -> Self {
        Self::new(Arc::new(CooldownTracker::new()))
    }
}

impl SnapshotStore {
    pub fn new(cooldowns: Arc<CooldownTracker>) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            version: watch::Sender::new(0),
            cooldowns,
            pools: 1,
            tls: UpstreamTls::default(),
            refusals: Default::default(),
            stale: Mutex::new(None),
            clock: Clock::default(),
            author: String::new(),
            node_id: String::new(),
            connected: AtomicBool::new(false),
        }
    }

    /// Tells this replica's own cooldown changes apart in snapshots by `author`
    /// (`sluice_domain::cooldown::author`).
    pub fn with_author(mut self, author: String) -> Self {
        self.author = author;
        self
    }

    /// Finds this replica's rank in a snapshot's share holders by `node_id`.
    pub fn with_node_id(mut self, node_id: String) -> Self {
        self.node_id = node_id;
        self
    }

    /// Reads the time from `clock` (a skewed one in tests) instead of the system's.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Where this replica reads the time.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Builds `pools` upstream clients per snapshot (one per serving thread) instead of one.
    pub fn with_upstream_pools(mut self, pools: usize) -> Self {
        self.pools = pools.max(1);
        self
    }

    /// Makes the upstream clients' TLS connections as `tls` says.
    pub fn with_upstream_tls(mut self, tls: UpstreamTls) -> Self {
        self.tls = tls;
        self
    }

    /// The current snapshot; `None` until the first one arrived.
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// The current version (0 before the first snapshot); changes on every swap.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn cooldowns(&self) -> &Arc<CooldownTracker> {
        &self.cooldowns
    }

    /// Counts a refused snapshot.
    pub fn refused(&self, why: Refusal) {
        self.refusals[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a snapshot that could not be decoded at all (too large): this replica is now
    /// behind the control plane.
    pub fn refused_undecoded(&self, why: Refusal) {
        self.refused(why);
        self.set_stale(Some(Stale {
            refused_version: None,
            why,
        }));
    }

    /// Why this replica is behind the control plane, if it is (`/readyz` says so).
    pub fn stale(&self) -> Option<Stale> {
        *self.stale.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_stale(&self, stale: Option<Stale>) {
        *self.stale.lock().unwrap_or_else(PoisonError::into_inner) = stale;
    }

    /// Whether the snapshot stream is open (`sluice_control_plane_connected`): a replica
    /// that is not follows no change made since it lost it.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Set by the subscriber when the control plane answers the stream and when it ends.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// Snapshots refused since start, for each reason.
    pub fn refusals(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL
            .into_iter()
            .map(|why| (why, self.refusals[why as usize].load(Ordering::Relaxed)))
    }

    /// Validates and swaps in a snapshot from the control plane. On error the current snapshot
    /// stays (and the refusal is counted). Within one control-plane epoch versions never go
    /// backwards and the current version again is `Unchanged`; a snapshot of another epoch
    /// (the control plane restarted, perhaps on a restored backup with lower versions) is
    /// taken whatever its version.
    pub fn apply(&self, message: proto::Snapshot) -> Result<Applied, SnapshotError> {
        self.apply_at(message, self.clock.now())
    }

    /// [`SnapshotStore::apply`], calling `before_swap` once the snapshot is taken, just before
    /// requests see it (not when it is refused, or is the version in use): what must be ready
    /// for the requests it lets in, such as the budget pools of the keys it brings.
    pub fn apply_before_swap(
        &self,
        message: proto::Snapshot,
        before_swap: impl FnOnce(),
    ) -> Result<Applied, SnapshotError> {
        self.apply_at_with(message, self.clock.now(), before_swap)
    }

    /// [`SnapshotStore::apply`] at `now`: for a caller that keeps its own time, such as the
    /// protocol simulation.
    pub fn apply_at(&self, message: proto::Snapshot, now: Now) -> Result<Applied, SnapshotError> {
        self.apply_at_with(message, now, || {})
    }

    fn apply_at_with(
        &self,
        message: proto::Snapshot,
        now: Now,
        before_swap: impl FnOnce(),
    ) -> Result<Applied, SnapshotError> {
        let version = message.version;
        let result = self.try_apply(message, now, before_swap);
        match &result {
            Ok(_) => self.set_stale(None),
            // An older snapshot than the current one leaves nothing behind.
            Err(SnapshotError::Stale { .. }) => self.refused(Refusal::Stale),
            Err(e) => {
                let why = match e {
                    SnapshotError::OtherDatabase { .. } => Refusal::OtherDatabase,
                    _ => Refusal::Invalid,
                };
                self.refused(why);
                self.set_stale(Some(Stale {
                    refused_version: Some(version),
                    why,
                }));
            }
        }
        result
    }

    fn try_apply(
        &self,
        message: proto::Snapshot,
        now: Now,
        before_swap: impl FnOnce(),
    ) -> Result<Applied, SnapshotError> {
        let current = self.current.load_full();
        // Another database is not followed as another epoch is: a control plane started on an
        // empty or wrong one would take every backend and key from every replica at once.
        if let Some(current) = current.as_ref()
            && !current.database_id.is_empty()
            && !message.database_id.is_empty()
            && current.database_id != message.database_id
        {
            return Err(SnapshotError::OtherDatabase {
                got: message.database_id,
                have: current.database_id.clone(),
            });
        }
        if let Some(current) = current.as_ref().filter(|c| c.epoch == message.epoch) {
            if message.version < current.version {
                return Err(SnapshotError::Stale {
                    got: message.version,
                    have: current.version,
                });
            }
            if message.version == current.version {
                return Ok(Applied::Unchanged);
            }
        }
        let rank = message
            .share_holders
            .iter()
            .position(|holder| *holder == self.node_id)
            .and_then(|rank| u32::try_from(rank).ok());
        let next = Arc::new(Snapshot::prepare_with(
            message,
            current.as_deref(),
            now,
            self.pools,
            &self.tls,
            rank,
        )?);
        let whose = |by: &str| {
            if !self.author.is_empty() && by == self.author {
                Whose::Mine
            } else {
                Whose::Another
            }
        };
        // The models each backend serves: a model's state at a backend that no longer serves
        // it is forgotten, its reports the control plane drops with it.
        let mut served: HashMap<&str, HashSet<&str>> = HashMap::new();
        for route in next.routes.values().flatten() {
            served
                .entry(next.backends[route.backend].id.as_str())
                .or_default()
                .insert(route.upstream_model.as_str());
        }
        self.cooldowns.observe_snapshot(
            next.model_cooldowns,
            next.backends.iter().map(|b| {
                let fleet = |cooldown: FleetCooldown, run: &Option<(String, u64)>| {
                    let run = run.as_ref().map(|(by, basis)| (whose(by), *basis));
                    FleetCooldown { run, ..cooldown }
                };
                (
                    b.id.as_str(),
                    fleet(b.cooldown, &b.cooldown_run),
                    b.model_cooldowns
                        .iter()
                        .map(move |m| (m.model.as_str(), fleet(m.cooldown, &m.run))),
                )
            }),
            |backend: &str, model: &str| {
                served
                    .get(backend)
                    .is_some_and(|models| models.contains(model))
            },
            &next.policy.cooldown,
            now.instant,
        );
        let version = next.version;
        before_swap();
        self.current.store(Some(Arc::clone(&next)));
        // Now in use: what the carried-over token buckets owe is converted to their new rates
        // (a snapshot refused above left the buckets in use as they were).
        for tokens in next
            .keys
            .values()
            .filter_map(|k| k.tokens.as_ref())
            .chain(next.backends.iter().filter_map(|b| b.tokens.as_ref()))
        {
            tokens.take_over(now.instant);
        }
        self.version.send_replace(version);
        Ok(Applied::Swapped)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// OpenAI's own API and Azure OpenAI take `max_completion_tokens` (their reasoning models
    /// refuse `max_tokens`); every other server gets the older name all of them know.
    #[test]
    fn a_translated_max_tokens_is_named_as_the_backend_takes_it() {
        for (base, member) in [
            ("https://api.openai.com/v1", "max_completion_tokens"),
            ("https://API.OpenAI.com/v1/", "max_completion_tokens"),
            (
                "https://my-east.openai.azure.com/openai/v1",
                "max_completion_tokens",
            ),
            (
                "https://res.cognitiveservices.azure.com/openai/v1",
                "max_completion_tokens",
            ),
            ("http://127.0.0.1:8000/v1", "max_tokens"),
            ("https://api.mistral.ai/v1", "max_tokens"),
            ("https://api.openai.com.example.net/v1", "max_tokens"),
        ] {
            let url = Url::parse(base).unwrap();
            assert_eq!(completion_limit_member(&url), member, "{base}");
        }
    }

    /// Only Google's endpoints count a thinking model's thoughts in the total alone.
    #[test]
    fn thoughts_are_read_from_the_total_at_googles_endpoints_alone() {
        for (base, google) in [
            (
                "https://generativelanguage.googleapis.com/v1beta/openai",
                true,
            ),
            (
                "https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/us-central1/endpoints/openapi",
                true,
            ),
            (
                "https://GenerativeLanguage.GoogleAPIs.com/v1beta/openai/",
                true,
            ),
            ("https://api.openai.com/v1", false),
            ("http://litellm.internal:4000/v1", false),
            ("https://googleapis.com.example.net/v1", false),
            ("http://127.0.0.1:8000/v1", false),
        ] {
            let url = Url::parse(base).unwrap();
            assert_eq!(thoughts_in_total(&url), google, "{base}");
        }
    }
    use sha2::{Digest, Sha256};
    use tokio::time::Instant;

    /// A snapshot whose client keys are these `(id, plaintext)` pairs.
    pub(crate) fn snapshot_with_keys(keys: &[(&str, &str)], now: Now) -> Snapshot {
        Snapshot::prepare(proto_with_keys(keys), None, now, 1).unwrap()
    }

    /// The message of [`snapshot_with_keys`], to change before preparing it.
    pub(crate) fn proto_with_keys(keys: &[(&str, &str)]) -> proto::Snapshot {
        let mut message = snapshot(1);
        message.client_keys = keys
            .iter()
            .map(|(id, key)| proto::SnapshotClientKey {
                id: (*id).into(),
                name: format!("name-{id}"),
                key_sha256: Sha256::digest(key.as_bytes()).to_vec(),
                ..Default::default()
            })
            .collect();
        message
    }

    pub(crate) fn backend(id: &str, pool: proto::Pool, priority: i32) -> proto::SnapshotBackend {
        proto::SnapshotBackend {
            id: id.into(),
            name: format!("name-{id}"),
            base_url: "http://127.0.0.1:9/v1".into(),
            pool: pool as i32,
            priority,
            weight: 1,
            models: vec![proto::ModelRoute {
                name: "gpt-4o-mini".into(),
                upstream_name: format!("up-{id}"),
                ..Default::default()
            }],
            api_key: "sk-upstream".into(),
            rpm_limit: 60,
            ..Default::default()
        }
    }

    fn snapshot(version: u64) -> proto::Snapshot {
        proto::Snapshot {
            version,
            nonce: format!("n{version}"),
            backends: vec![
                backend("fb", proto::Pool::Fallback, 0),
                backend("p2", proto::Pool::Primary, 2),
                backend("p1", proto::Pool::Primary, 1),
            ],
            client_keys: vec![proto::SnapshotClientKey {
                id: "k1".into(),
                name: "app".into(),
                key_sha256: Sha256::digest(b"sk-client").to_vec(),
                allowed_models: vec![],
                rpm_limit: 0,
                expired: false,
                ..Default::default()
            }],
            settings: None,
            replica_count: 2,
            create_time: None,
            epoch: "e1".into(),
            affinity_keys: vec![],
            share_holders: vec![],
            database_id: "db-1".into(),
            model_cooldowns: true,
        }
    }

    #[tokio::test]
    async fn prepares_routes_in_pool_and_priority_order() {
        let snap = Snapshot::prepare(snapshot(1), None, Now::read(), 1).unwrap();
        let routes = snap.routes("gpt-4o-mini").unwrap();
        let ids: Vec<&str> = routes
            .iter()
            .map(|r| snap.backends()[r.backend].id.as_str())
            .collect();
        assert_eq!(ids, ["p1", "p2", "fb"]);
        assert_eq!(routes[0].upstream_model, "up-p1");
        let b = &snap.backends()[routes[0].backend];
        assert_eq!(
            b.uri(Endpoint::ChatCompletions).unwrap(),
            "http://127.0.0.1:9/v1/chat/completions"
        );
        assert!(b.authorization().unwrap().is_sensitive());
        let hash: [u8; 32] = Sha256::digest(b"sk-client").into();
        assert_eq!(snap.client_key(&hash).unwrap().id, "k1");
        assert!(snap.client_key(&[0; 32]).is_none());
    }

    #[tokio::test]
    async fn settings_left_unset_take_the_control_planes_defaults() {
        // What `sluicectl settings get` shows on a new installation.
        for settings in [None, Some(proto::Settings::default())] {
            let mut message = snapshot(1);
            message.settings = settings;
            let policy = Snapshot::prepare(message, None, Now::read(), 1)
                .unwrap()
                .policy;
            assert_eq!(policy.first_byte_timeout, Duration::from_secs(60));
            assert_eq!(policy.connect_timeout, Duration::from_secs(5));
            assert_eq!(policy.request_timeout, Duration::from_secs(600));
            assert_eq!(policy.cooldown.cap, Duration::from_secs(300));
            assert_eq!(policy.max_attempts, 3);
        }
    }

    #[tokio::test]
    async fn normalizes_upstream_uris_once() {
        let mut message = snapshot(1);
        for b in &mut message.backends {
            if b.id == "p1" {
                b.base_url = "https://Bücher.example:8443/my v1/".into();
            }
        }
        let snap = Snapshot::prepare(message, None, Now::read(), 1).unwrap();
        let b = snap.backends().iter().find(|b| b.id == "p1").unwrap();
        assert_eq!(
            b.uri(Endpoint::Embeddings).unwrap(),
            "https://xn--bcher-kva.example:8443/my%20v1/embeddings"
        );
    }

    /// Azure OpenAI's deployments: the base URL's `api-version` stays after each endpoint's
    /// path (and before a stored response call's own query), the key goes in `api-key`.
    #[tokio::test]
    async fn a_base_urls_query_follows_every_path() {
        let mut message = snapshot(1);
        message.backends.truncate(1);
        message.backends[0].base_url =
            "https://r.openai.azure.com/openai/deployments/gpt-4o?api-version=2024-10-21".into();
        message.backends[0].key_header = proto::KeyHeader::ApiKey as i32;
        let snap = Snapshot::prepare(message, None, Now::read(), 1).unwrap();
        let b = &snap.backends()[0];
        assert_eq!(
            b.uri(Endpoint::ChatCompletions).unwrap(),
            "https://r.openai.azure.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(
            b.uri(Endpoint::Embeddings).unwrap(),
            "https://r.openai.azure.com/openai/deployments/gpt-4o/embeddings?api-version=2024-10-21"
        );
        assert_eq!(
            b.stored_response_uri("resp_1", Some("input_items"), Some("limit=2"))
                .unwrap(),
            "https://r.openai.azure.com/openai/deployments/gpt-4o/responses/resp_1/input_items?api-version=2024-10-21&limit=2"
        );
        let headers: Vec<_> = b.auth_headers().collect();
        assert_eq!(headers.len(), 1);
        assert_eq!(headers[0].0, "api-key");
        assert_eq!(headers[0].1, "sk-upstream");
        assert!(headers[0].1.is_sensitive());
        assert_eq!(b.api_key(), b"sk-upstream");
        assert!(b.authorization().is_none());
    }

    /// Each key header, for each format: the header named carries the key, bare except in
    /// `Authorization`; no other header carries it.
    #[tokio::test]
    async fn the_key_goes_in_the_header_chosen() {
        use proto::KeyHeader as K;
        for (format, chosen, name, value) in [
            (
                proto::ApiFormat::Openai,
                K::Unspecified,
                "authorization",
                "Bearer sk-upstream",
            ),
            (
                proto::ApiFormat::Openai,
                K::ApiKey,
                "api-key",
                "sk-upstream",
            ),
            (
                proto::ApiFormat::Openai,
                K::XApiKey,
                "x-api-key",
                "sk-upstream",
            ),
            (
                proto::ApiFormat::Anthropic,
                K::Unspecified,
                "x-api-key",
                "sk-upstream",
            ),
            (
                proto::ApiFormat::Anthropic,
                K::Bearer,
                "authorization",
                "Bearer sk-upstream",
            ),
        ] {
            let mut message = snapshot(1);
            message.backends.truncate(1);
            message.backends[0].api_format = format as i32;
            message.backends[0].key_header = chosen as i32;
            let snap = Snapshot::prepare(message, None, Now::read(), 1).unwrap();
            let b = &snap.backends()[0];
            let keys: Vec<_> = b
                .auth_headers()
                .filter(|(name, _)| name != "anthropic-version")
                .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
                .collect();
            assert_eq!(
                keys,
                [(name.to_owned(), value.to_owned())],
                "{format:?} {chosen:?}"
            );
            assert_eq!(b.api_key(), b"sk-upstream", "{format:?} {chosen:?}");
        }
        let mut bad = snapshot(1);
        bad.backends[0].key_header = 99;
        assert!(matches!(
            Snapshot::prepare(bad, None, Now::read(), 1),
            Err(SnapshotError::InvalidKeyHeader(_))
        ));
    }

    #[tokio::test]
    async fn rejects_bad_input() {
        for url in ["ftp://x/v1", "http://user:secret@x/v1", "http://x/v1#q"] {
            let mut bad = snapshot(1);
            bad.backends[0].base_url = url.into();
            let err = Snapshot::prepare(bad, None, Now::read(), 1).unwrap_err();
            assert!(
                matches!(err, SnapshotError::InvalidBaseUrl { .. }),
                "{url}: {err}"
            );
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        let mut bad = snapshot(1);
        bad.backends[1].id = "fb".into();
        assert!(matches!(
            Snapshot::prepare(bad, None, Now::read(), 1),
            Err(SnapshotError::DuplicateBackend(_))
        ));
        let mut bad = snapshot(1);
        bad.client_keys[0].key_sha256 = vec![1, 2, 3];
        assert!(matches!(
            Snapshot::prepare(bad, None, Now::read(), 1),
            Err(SnapshotError::InvalidKeyHash(_))
        ));
        let mut bad = snapshot(1);
        bad.settings = Some(proto::Settings {
            connect_timeout: Some(pbjson_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..Default::default()
        });
        assert!(matches!(
            Snapshot::prepare(bad, None, Now::read(), 1),
            Err(SnapshotError::InvalidDuration(InvalidDuration(
                "connect_timeout"
            )))
        ));
    }

    #[tokio::test]
    async fn store_never_goes_backwards_and_keeps_the_old_one_on_error() {
        let store = SnapshotStore::default();
        assert!(store.load().is_none());
        assert_eq!(store.apply(snapshot(2)).unwrap(), Applied::Swapped);
        assert_eq!(store.apply(snapshot(2)).unwrap(), Applied::Unchanged);
        assert!(matches!(
            store.apply(snapshot(1)),
            Err(SnapshotError::Stale { got: 1, have: 2 })
        ));
        let mut bad = snapshot(3);
        bad.backends[0].base_url = "not a url".into();
        assert!(store.apply(bad).is_err());
        assert_eq!(store.load().unwrap().version, 2);
        assert_eq!(*store.watch().borrow(), 2);
    }

    /// What must be ready for the requests a snapshot lets in (the budget pools of the keys
    /// it brings) is made ready before they can see it, and only for a snapshot taken: a
    /// request of a new budgeted key let in before its pool existed was served on no budget.
    #[tokio::test]
    async fn what_a_snapshot_needs_is_made_ready_before_requests_see_it() {
        let store = SnapshotStore::default();
        store.apply(snapshot(2)).unwrap();
        let mut seen = None;
        let applied = store.apply_before_swap(snapshot(3), || {
            seen = store.load().map(|s| s.version);
        });
        assert_eq!(applied.unwrap(), Applied::Swapped);
        assert_eq!(seen, Some(2), "called while requests still saw the old one");
        assert_eq!(store.load().unwrap().version, 3);
        let mut called = false;
        let _ = store.apply_before_swap(snapshot(3), || called = true);
        let _ = store.apply_before_swap(snapshot(1), || called = true);
        let mut bad = snapshot(4);
        bad.backends[0].base_url = "not a url".into();
        let _ = store.apply_before_swap(bad, || called = true);
        assert!(
            !called,
            "not for the version in use, a stale one, or one refused"
        );
    }

    #[tokio::test]
    async fn a_new_epoch_is_followed_whatever_its_version() {
        let store = SnapshotStore::default();
        store.apply(snapshot(8)).unwrap();
        // The control plane restarted on a restored backup: lower versions, new epoch.
        let restored = |version| proto::Snapshot {
            epoch: "e2".into(),
            ..snapshot(version)
        };
        assert_eq!(store.apply(restored(3)).unwrap(), Applied::Swapped);
        assert_eq!(store.load().unwrap().version, 3);
        assert_eq!(store.apply(restored(3)).unwrap(), Applied::Unchanged);
        assert!(matches!(
            store.apply(restored(2)),
            Err(SnapshotError::Stale { got: 2, have: 3 })
        ));
        assert_eq!(store.apply(restored(4)).unwrap(), Applied::Swapped);
        let counts: Vec<(Refusal, u64)> = store.refusals().collect();
        assert_eq!(
            counts,
            [
                (Refusal::Stale, 1),
                (Refusal::Invalid, 0),
                (Refusal::TooLarge, 0),
                (Refusal::OtherDatabase, 0)
            ]
        );
    }

    /// A control plane started on an empty or wrong database (a restore copied to the wrong
    /// place, a volume not mounted) sends a snapshot of another database, with no backend and
    /// no key: taken as a new epoch is, it emptied every replica at once. It is refused, the
    /// current one stays, and `/readyz` says why; the same database restored (a new epoch,
    /// lower versions) is followed, and a control plane that predates the id is taken as any.
    #[tokio::test]
    async fn a_snapshot_of_another_database_is_refused() {
        let store = SnapshotStore::default();
        store.apply(snapshot(8)).unwrap();
        let empty = proto::Snapshot {
            epoch: "e2".into(),
            database_id: "db-2".into(),
            backends: vec![],
            client_keys: vec![],
            ..snapshot(1)
        };
        assert!(matches!(
            store.apply(empty),
            Err(SnapshotError::OtherDatabase { .. })
        ));
        assert_eq!(store.load().unwrap().version, 8);
        assert_eq!(store.load().unwrap().backends.len(), 3);
        assert_eq!(
            store.stale(),
            Some(Stale {
                refused_version: Some(1),
                why: Refusal::OtherDatabase
            })
        );
        let restored = proto::Snapshot {
            epoch: "e3".into(),
            ..snapshot(3)
        };
        assert_eq!(store.apply(restored).unwrap(), Applied::Swapped);
        assert_eq!(store.stale(), None);
        let unnamed = proto::Snapshot {
            epoch: "e4".into(),
            database_id: String::new(),
            ..snapshot(2)
        };
        assert_eq!(store.apply(unnamed).unwrap(), Applied::Swapped);
        let counts: Vec<(Refusal, u64)> = store.refusals().collect();
        assert_eq!(counts[3], (Refusal::OtherDatabase, 1));
        // A replica just started takes any database.
        let fresh = SnapshotStore::default();
        let other = proto::Snapshot {
            database_id: "db-2".into(),
            ..snapshot(1)
        };
        assert_eq!(fresh.apply(other).unwrap(), Applied::Swapped);
    }

    #[tokio::test]
    async fn limiters_keep_their_tokens_across_swaps() {
        let store = SnapshotStore::default();
        store.apply(snapshot(1)).unwrap();
        let first = store.load().unwrap();
        // 60 rpm over 2 replicas: 30/min, burst 3.
        let limiter = first.backends()[0].limiter.clone().unwrap();
        for _ in 0..3 {
            limiter.try_acquire(Instant::now()).unwrap();
        }
        store.apply(snapshot(2)).unwrap();
        let second = store.load().unwrap();
        assert!(
            second.backends()[0]
                .limiter
                .as_ref()
                .unwrap()
                .try_acquire(Instant::now())
                .is_err()
        );
    }

    #[tokio::test]
    async fn token_buckets_and_requests_in_flight_survive_a_swap() {
        let with_limits = |version| {
            let mut message = snapshot(version);
            message.backends[0].tpm_limit = 6_000;
            message.client_keys[0].tpm_limit = 6_000;
            message.client_keys[0].max_parallel_requests = 1;
            message
        };
        let store = SnapshotStore::default();
        store.apply(with_limits(1)).unwrap();
        let first = store.load().unwrap();
        let key = first
            .client_key(&Sha256::digest(b"sk-client").into())
            .unwrap();
        let now = Instant::now();
        // Each bucket is emptied (burst 600) and the one request allowed is in flight.
        key.tokens
            .as_ref()
            .unwrap()
            .try_admit(600, now)
            .unwrap()
            .settle(600);
        let backend = first.backends()[0].tokens.as_ref().unwrap();
        backend.try_admit(600, now).unwrap().settle(600);
        let held = key.parallel.as_ref().unwrap().try_enter().unwrap();
        store.apply(with_limits(2)).unwrap();
        let second = store.load().unwrap();
        let key = second
            .client_key(&Sha256::digest(b"sk-client").into())
            .unwrap();
        assert!(key.tokens.as_ref().unwrap().try_admit(1, now).is_err());
        assert!(
            second.backends()[0]
                .tokens
                .as_ref()
                .unwrap()
                .try_admit(1, now)
                .is_err()
        );
        assert!(key.parallel.as_ref().unwrap().try_enter().is_none());
        drop(held);
        assert!(key.parallel.as_ref().unwrap().try_enter().is_some());
    }
}
