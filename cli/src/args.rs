//! Every noun, verb and flag of `sluicectl`, and the parsers for values that
//! need more than `FromStr` (model routes, endpoints, times).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice_proto::v1 as pb;

/// `sluicectl`: manage a Sluice control plane over gRPC.
#[derive(Debug, Parser)]
#[command(
    name = "sluicectl",
    version,
    about = "Manage a Sluice control plane: backends, client keys, cooldowns, settings and usage."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags that every command accepts, before or after the verb.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Control plane gRPC address; https:// connects with TLS.
    #[arg(
        long,
        global = true,
        env = "SLUICE_ENDPOINT",
        default_value = "http://127.0.0.1:50051",
        value_parser = parse_endpoint
    )]
    pub endpoint: String,

    /// PEM file of the CA that signed the control plane's certificate
    /// (default for https://: the system's roots and the webpki roots).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// Admin token, sent as `authorization: Bearer <token>`.
    #[arg(
        long,
        global = true,
        env = "SLUICE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// Read the admin token from FILE (takes precedence over --token).
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Output format: readable tables, or the proto3 JSON of the response.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// Give up on the control plane after this long (e.g. 10s, 1m).
    #[arg(long, global = true, default_value = "10s", value_parser = sluice_domain::time::positive_duration)]
    pub timeout: Duration,
}

/// How responses are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upstream providers and the models they serve.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Client keys that applications present to the data planes.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Backends that routing skips after 429s or failures.
    #[command(subcommand)]
    Cooldown(CooldownCommand),
    /// Data plane replicas connected to the control plane.
    #[command(subcommand)]
    Dataplane(DataplaneCommand),
    /// The retry, timeout and cooldown policy of every data plane.
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// Requests, tokens, cost and latency.
    #[command(subcommand)]
    Stats(StatsCommand),
}

#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend.
    #[command(
        after_help = "Example:\n  OPENAI_API_KEY=sk-... sluicectl backend add --name openai-main \\\n    --base-url https://api.openai.com/v1 --priority 10 --rpm 500 \\\n    --model gpt-4o-mini:gpt-4o-mini:0.15:0.60 --api-key-env OPENAI_API_KEY"
    )]
    Add(BackendAddArgs),
    /// List every backend.
    #[command(alias = "ls")]
    List,
    /// Show one backend and its models.
    Get {
        /// Backend id or name.
        backend: String,
    },
    /// Change the given fields of a backend; fields not given stay as they are.
    Update(BackendUpdateArgs),
    /// Delete a backend.
    #[command(alias = "rm", alias = "delete")]
    Remove {
        /// Backend id or name.
        backend: String,
    },
    /// Let routing use a backend again.
    Enable {
        /// Backend id or name.
        backend: String,
    },
    /// Keep routing away from a backend without deleting it.
    Disable {
        /// Backend id or name.
        backend: String,
    },
}

/// Flags of `backend add`.
#[derive(Debug, Args)]
pub struct BackendAddArgs {
    /// Unique name, 1 to 64 characters.
    #[arg(long)]
    pub name: String,
    /// OpenAI-compatible base URL, e.g. https://api.openai.com/v1.
    #[arg(long, value_name = "URL")]
    pub base_url: String,
    #[arg(long, value_enum, default_value_t = PoolArg::Primary)]
    pub pool: PoolArg,
    /// Lower is tried first within a pool.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Share of traffic among backends of equal pool and priority, at least 1 (to take a
    /// backend out of rotation, `backend disable` it).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub weight: u32,
    /// Requests per minute across all data planes; 0 means no limit.
    #[arg(long, value_name = "RPM", default_value_t = 0)]
    pub rpm: u32,
    /// Prompt + completion tokens per minute across all data planes (the provider's token
    /// quota); 0 means no limit.
    #[arg(long, value_name = "TPM", default_value_t = 0, visible_alias = "tpm")]
    pub tpm_limit: u32,
    /// Add the backend disabled.
    #[arg(long)]
    pub disabled: bool,
    /// Whether it serves the Responses API (/v1/responses); default: yes.
    #[arg(long, value_name = "BOOL")]
    pub responses_api: Option<bool>,
    /// A model it serves: NAME[:UPSTREAM[:IN_PRICE[/CACHED_PRICE[/CACHE_WRITE_PRICE]]:OUT_PRICE]],
    /// prices per million tokens in the settings' currency (CACHED_PRICE for prompt tokens
    /// read from the provider's cache, CACHE_WRITE_PRICE for those written to it, each
    /// IN_PRICE when not given, e.g. claude-sonnet-4-5::3/0.3/3.75:15); repeat for each model.
    #[arg(long = "model", value_name = "SPEC", value_parser = parse_model_route)]
    pub models: Vec<pb::ModelRoute>,
    /// The API the backend speaks.
    #[arg(long, value_enum, default_value_t = ApiFormatArg::Openai)]
    pub api_format: ApiFormatArg,
    /// `anthropic-version` sent to an Anthropic backend (default: the current official SDK's).
    #[arg(long, value_name = "VERSION")]
    pub anthropic_version: Option<String>,
    /// The header its API key goes in (default: the API format's own, `Authorization: Bearer`
    /// for openai, `x-api-key` for anthropic): `api-key` for Azure OpenAI's deployments,
    /// `bearer` for a gateway in front of Anthropic's API that takes bearer tokens only.
    #[arg(long, value_enum, value_name = "HEADER")]
    pub key_header: Option<KeyHeaderArg>,
    /// max_tokens sent to an Anthropic backend for each --model when the client gives none
    /// (default 4096).
    #[arg(long, value_name = "N")]
    pub default_max_tokens: Option<u32>,
    /// The most output tokens a request translated for each --model asks for (a Messages
    /// client's max_tokens to an OpenAI-format backend, a chat client's to an Anthropic one):
    /// 16384 for gpt-4o, which refuses Claude Code's 32000 (default: as the client asks).
    #[arg(long, value_name = "N")]
    pub max_output_tokens: Option<u32>,
    /// A price tier of a --model: MODEL:TIER=MULTIPLIER, what its prices are multiplied by
    /// when the answer says it was served at TIER (OpenAI's service_tier: priority, which
    /// its "fast" requests are answered with too, ultrafast, flex; Anthropic's usage.speed
    /// fast and usage.inference_geo us), e.g. gpt-5:priority=2, gpt-5:flex=0.5,
    /// claude-opus-4-6:fast=6; repeat for each.
    #[arg(long = "tier", value_name = "MODEL:TIER=MULTIPLIER", value_parser = parse_tier)]
    pub tiers: Vec<TierArg>,
    /// What each call of a tool the provider runs costs a --model, per 1,000 calls:
    /// MODEL:TOOL=PRICE, the tool as answers count it (Anthropic's usage.server_tool_use
    /// web_search_requests: web_search; a Responses object's web_search_call and
    /// file_search_call items: web_search, file_search), e.g. claude-sonnet-4-5:web_search=10,
    /// gpt-5:file_search=2.5; the tool `request` is the request itself, charged once for each
    /// one answered (a search model's fee: gpt-4o-search-preview:request=25); repeat for each.
    #[arg(
        long = "call-price",
        value_name = "MODEL:TOOL=PRICE",
        value_parser = parse_call_price
    )]
    pub call_prices: Vec<CallPriceArg>,
    /// A --model's prices for a long request: MODEL:ABOVE:IN_MULTIPLIER:OUT_MULTIPLIER, its
    /// prompt tokens (cached included) at IN_MULTIPLIER times their prices and its output
    /// at OUT_MULTIPLIER times when its prompt is more than ABOVE tokens, e.g.
    /// gpt-5.4:272000:2:1.5; repeat for each model.
    #[arg(
        long = "long-context",
        value_name = "MODEL:ABOVE:IN:OUT",
        value_parser = parse_long_context
    )]
    pub long_contexts: Vec<LongContextArg>,
    /// A --model's prices of audio tokens, per million: MODEL:IN/OUT, its prompt's audio
    /// (usage.prompt_tokens_details.audio_tokens) at IN and its spoken answer's
    /// (completion_tokens_details.audio_tokens) at OUT, e.g. gpt-audio:32/64; either left
    /// empty (gpt-audio:32/) costs the text's price; repeat for each model.
    #[arg(
        long = "audio-price",
        value_name = "MODEL:IN/OUT",
        value_parser = parse_audio_price
    )]
    pub audio_prices: Vec<AudioPriceArg>,
    #[command(flatten)]
    pub api_key: ApiKeyArgs,
}

/// Flags of `backend update`: each one given is changed, nothing else.
#[derive(Debug, Args)]
pub struct BackendUpdateArgs {
    /// Backend id or name.
    pub backend: String,
    /// New unique name.
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    #[arg(long, value_enum)]
    pub pool: Option<PoolArg>,
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Share of traffic among backends of equal pool and priority, at least 1 (to take a
    /// backend out of rotation, `backend disable` it).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub weight: Option<u32>,
    #[arg(long, value_name = "RPM")]
    pub rpm: Option<u32>,
    /// Tokens per minute across all data planes; 0 means no limit.
    #[arg(long, value_name = "TPM", visible_alias = "tpm")]
    pub tpm_limit: Option<u32>,
    /// Disable the backend.
    #[arg(long, conflicts_with = "enabled")]
    pub disabled: bool,
    /// Enable the backend.
    #[arg(long)]
    pub enabled: bool,
    /// Whether it serves the Responses API (/v1/responses): true, false, or default (what
    /// its API format says: yes for OpenAI, no for Anthropic).
    #[arg(long, value_name = "BOOL|default", value_parser = parse_responses_api)]
    pub responses_api: Option<ResponsesApi>,
    /// Replaces the whole model list:
    /// NAME[:UPSTREAM[:IN_PRICE[/CACHED_PRICE[/CACHE_WRITE_PRICE]]:OUT_PRICE]],
    /// repeatable. A model given without an UPSTREAM keeps the upstream name of the
    /// backend's route of the same name (NAME:NAME points it at NAME itself); one given
    /// without prices keeps that route's prices (and `default_max_tokens`).
    #[arg(long = "model", value_name = "SPEC", value_parser = parse_model_update)]
    pub models: Vec<ModelUpdate>,
    /// The API the backend speaks.
    #[arg(long, value_enum)]
    pub api_format: Option<ApiFormatArg>,
    /// `anthropic-version` sent to an Anthropic backend ("" for the default).
    #[arg(long, value_name = "VERSION")]
    pub anthropic_version: Option<String>,
    /// The header its API key goes in: default (the API format's own), bearer, x-api-key or
    /// api-key.
    #[arg(long, value_enum, value_name = "HEADER")]
    pub key_header: Option<KeyHeaderArg>,
    /// max_tokens for each --model given when the client gives none (needs --model).
    #[arg(long, value_name = "N", requires = "models")]
    pub default_max_tokens: Option<u32>,
    /// The most output tokens a request translated for each --model given asks for (see
    /// `backend add --help`; 0: as the client asks; needs --model).
    #[arg(long, value_name = "N", requires = "models")]
    pub max_output_tokens: Option<u32>,
    /// A price tier of a --model, MODEL:TIER=MULTIPLIER (see `backend add --help`): sets
    /// that tier of the model, its other tiers kept; TIER=1 takes it off (needs --model).
    #[arg(
        long = "tier",
        value_name = "MODEL:TIER=MULTIPLIER",
        value_parser = parse_tier,
        requires = "models"
    )]
    pub tiers: Vec<TierArg>,
    /// What each call of a tool costs a --model, MODEL:TOOL=PRICE per 1,000 calls (see
    /// `backend add --help`): sets that tool's price, the model's others kept; TOOL=0 takes
    /// it off (needs --model).
    #[arg(
        long = "call-price",
        value_name = "MODEL:TOOL=PRICE",
        value_parser = parse_call_price,
        requires = "models"
    )]
    pub call_prices: Vec<CallPriceArg>,
    /// A --model's prices for a long request, MODEL:ABOVE:IN:OUT (see `backend add --help`),
    /// or MODEL:none to take them off; a model given none keeps its own (needs --model).
    #[arg(
        long = "long-context",
        value_name = "MODEL:ABOVE:IN:OUT|MODEL:none",
        value_parser = parse_long_context,
        requires = "models"
    )]
    pub long_contexts: Vec<LongContextArg>,
    /// A --model's prices of audio tokens, MODEL:IN/OUT per million (see `backend add
    /// --help`), or MODEL:none to charge audio as text; a model given none keeps its own
    /// (needs --model).
    #[arg(
        long = "audio-price",
        value_name = "MODEL:IN/OUT|MODEL:none",
        value_parser = parse_audio_price,
        requires = "models"
    )]
    pub audio_prices: Vec<AudioPriceArg>,
    #[command(flatten)]
    pub api_key: ApiKeyArgs,
    /// Remove the stored API key: the backend's requests carry none from then on (a
    /// self-hosted server that takes no key; also how a keyed backend moves to another
    /// origin without one).
    #[arg(long, conflicts_with_all = ["api_key_env", "api_key_stdin"])]
    pub clear_api_key: bool,
}

/// Where the provider's API key comes from. Never argv: it would show in `ps`
/// and in shell history.
#[derive(Debug, Args)]
pub struct ApiKeyArgs {
    /// Read the provider's API key from the environment variable of this name (the name, as
    /// OPENAI_API_KEY, not the key).
    #[arg(long, value_name = "VAR", conflicts_with = "api_key_stdin")]
    pub api_key_env: Option<String>,
    /// Read the provider's API key from the first line of standard input.
    #[arg(long)]
    pub api_key_stdin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ApiFormatArg {
    /// The OpenAI API and OpenAI-compatible providers.
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
}

/// The header a backend's API key goes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyHeaderArg {
    /// The API format's own.
    Default,
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// `x-api-key: <key>`.
    XApiKey,
    /// `api-key: <key>` (Azure OpenAI).
    ApiKey,
}

impl From<KeyHeaderArg> for pb::KeyHeader {
    fn from(header: KeyHeaderArg) -> Self {
        match header {
            KeyHeaderArg::Default => pb::KeyHeader::Unspecified,
            KeyHeaderArg::Bearer => pb::KeyHeader::Bearer,
            KeyHeaderArg::XApiKey => pb::KeyHeader::XApiKey,
            KeyHeaderArg::ApiKey => pb::KeyHeader::ApiKey,
        }
    }
}

impl From<ApiFormatArg> for pb::ApiFormat {
    fn from(format: ApiFormatArg) -> Self {
        match format {
            ApiFormatArg::Openai => pb::ApiFormat::Openai,
            ApiFormatArg::Anthropic => pb::ApiFormat::Anthropic,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PoolArg {
    Primary,
    Fallback,
}

impl From<PoolArg> for pb::Pool {
    fn from(pool: PoolArg) -> Self {
        match pool {
            PoolArg::Primary => pb::Pool::Primary,
            PoolArg::Fallback => pb::Pool::Fallback,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a client key and print it (the only time it is shown).
    Create {
        #[arg(long)]
        name: String,
        /// A model the key may use; repeat for more; none given allows every model.
        #[arg(long = "allow-model", value_name = "MODEL")]
        allowed_models: Vec<String>,
        /// Requests per minute across all data planes; 0 means no limit.
        #[arg(long, value_name = "RPM", default_value_t = 0)]
        rpm: u32,
        #[command(flatten)]
        limits: KeyLimitArgs,
        /// When the key stops working (RFC 3339, or a date: midnight UTC); data planes then
        /// answer 401 saying it expired (for 30 days; then as an unknown key). Must be in the
        /// future. Default: never.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        expires: Option<SystemTime>,
        #[command(flatten)]
        budget: BudgetArgs,
    },
    /// List client keys (their prefixes, never the keys), oldest first.
    #[command(alias = "ls")]
    List {
        /// Leave revoked keys out.
        #[arg(long)]
        active: bool,
    },
    /// Show one client key.
    Get {
        /// Client key id or name.
        key: String,
    },
    /// Change a key's name, models, limits or expiry; applications keep using the same key.
    #[command(
        after_help = "Example:\n  sluicectl key update team-a --rpm 1200 --tpm-limit 200000 --max-parallel 8 --expires 2027-06-30\n  sluicectl key update team-a --all-models --expires never"
    )]
    Update(KeyUpdateArgs),
    /// Revoke a client key: data planes reject it from their next snapshot on.
    Revoke {
        /// Client key id or name.
        key: String,
    },
}

/// Flags of `key update`: each one given is changed, nothing else.
#[derive(Debug, Args)]
pub struct KeyUpdateArgs {
    /// Client key id or name.
    pub key: String,
    /// New unique name.
    #[arg(long)]
    pub name: Option<String>,
    /// Replaces the models the key may use; repeat for more.
    #[arg(
        long = "allow-model",
        value_name = "MODEL",
        conflicts_with = "all_models"
    )]
    pub allowed_models: Vec<String>,
    /// Allow every model.
    #[arg(long)]
    pub all_models: bool,
    /// Requests per minute across all data planes; 0 means no limit.
    #[arg(long, value_name = "RPM")]
    pub rpm: Option<u32>,
    #[command(flatten)]
    pub limits: KeyLimitArgs,
    /// New expiry (RFC 3339, or a date: midnight UTC; must be in the future), or `never`.
    #[arg(long, value_name = "TIME|never", value_parser = parse_expiry)]
    pub expires: Option<Expiry>,
    #[command(flatten)]
    pub budget: BudgetArgs,
}

/// A key's token and concurrency limits: `--tpm-limit` and `--max-parallel`.
#[derive(Debug, Args)]
pub struct KeyLimitArgs {
    /// Prompt + completion tokens per minute across all data planes; 0 means no limit.
    #[arg(long, value_name = "TPM", visible_alias = "tpm")]
    pub tpm_limit: Option<u32>,
    /// Requests in flight at once across all data planes, divided among them: each of n
    /// replicas admits ⌊N/n⌋ or one more (at least 1) of the key's requests, N in all, so
    /// give room for a load balancer's uneven spread; 0 means no limit.
    #[arg(long, value_name = "N", visible_alias = "max-parallel-requests")]
    pub max_parallel: Option<u32>,
}

/// A key's budget: `--max-budget` and `--budget-period`.
#[derive(Debug, Args)]
pub struct BudgetArgs {
    /// Spend allowed per budget period, in the currency of the route prices; 0 removes the budget.
    #[arg(long, value_name = "AMOUNT")]
    pub max_budget: Option<f64>,
    /// When spend starts again from zero, at 00:00 UTC (weekly: Mondays, monthly: the 1st);
    /// none: never (default at creation).
    #[arg(long, value_enum, value_name = "PERIOD")]
    pub budget_period: Option<BudgetPeriodArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BudgetPeriodArg {
    None,
    Daily,
    Weekly,
    Monthly,
}

impl From<BudgetPeriodArg> for pb::BudgetPeriod {
    fn from(period: BudgetPeriodArg) -> Self {
        match period {
            BudgetPeriodArg::None => pb::BudgetPeriod::Unspecified,
            BudgetPeriodArg::Daily => pb::BudgetPeriod::Daily,
            BudgetPeriodArg::Weekly => pb::BudgetPeriod::Weekly,
            BudgetPeriodArg::Monthly => pb::BudgetPeriod::Monthly,
        }
    }
}

/// `--expires` of `key update`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expiry {
    Never,
    At(SystemTime),
}

fn parse_expiry(text: &str) -> Result<Expiry, String> {
    if text.trim().eq_ignore_ascii_case("never") {
        Ok(Expiry::Never)
    } else {
        parse_time(text).map(Expiry::At)
    }
}

#[derive(Debug, Subcommand)]
pub enum CooldownCommand {
    /// List backends, and models at a backend, cooling down now.
    #[command(alias = "ls")]
    List,
    /// End a backend's cooldown, and its models', on every data plane.
    Reset {
        /// Backend id or name.
        backend: String,
        /// End only this model's cooldown at the backend (its name at the provider).
        #[arg(long)]
        model: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DataplaneCommand {
    /// List data plane replicas and the snapshot version each runs.
    #[command(alias = "ls")]
    List,
}

#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    /// Show the routing policy.
    Get,
    /// Change the given fields of the routing policy.
    Set(SettingsSetArgs),
    /// Sign Responses API ids with a new key; ids the previous key signed keep working,
    /// older ones stop (docs/responses.md).
    RotateAffinityKey,
}

/// Flags of `settings set`; durations like `2s`, `500ms`, `5m`.
#[derive(Debug, Args)]
pub struct SettingsSetArgs {
    /// Backends tried for one request, at least 1.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// A stream: time from sending a request to its head (its first event is waited for
    /// as long as a whole answer, or this, the longer).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub first_byte_timeout: Option<Duration>,
    /// A whole (non-streamed) answer: time from sending a request to its head, which comes
    /// once the whole answer is generated; a stream: to its first event. Given up only for
    /// another backend to be asked: the last one is waited for to the request's deadline.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub answer_timeout: Option<Duration>,
    /// Longest silence between two chunks of a stream (or of a whole answer's body).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_stream_timeout: Option<Duration>,
    /// Overall deadline of a client request, all attempts included, until its answer begins
    /// (a whole answer; a stream's head and first event).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub request_timeout: Option<Duration>,
    /// How long a stream may run from its request's arrival once it has begun (never less
    /// than --request-timeout); a stream still running then ends with an error event.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub stream_timeout: Option<Duration>,
    /// Cooldown after the first failure; doubles with each consecutive one.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub cooldown_base: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub cooldown_cap: Option<Duration>,
    /// Consecutive 5xx or connection failures that cool a backend down; 0 disables.
    #[arg(long)]
    pub failure_threshold: Option<u32>,
    #[arg(long, value_name = "BOOL")]
    pub retry_on_rate_limit: Option<bool>,
    #[arg(long, value_name = "BOOL")]
    pub retry_on_server_error: Option<bool>,
    #[arg(long, value_name = "BOOL")]
    pub retry_on_connect_error: Option<bool>,
    #[arg(long, value_name = "BOOL")]
    pub retry_on_timeout: Option<bool>,
    /// Days of hourly usage kept; 0 keeps all.
    #[arg(long)]
    pub usage_retention_days: Option<u32>,
    /// Days of daily usage and of each key's daily spend kept; 0 (the default) keeps all.
    /// At least 32 and at least --usage-retention-days (a key's lifetime spend is kept apart).
    #[arg(long)]
    pub usage_daily_retention_days: Option<u32>,
    /// Whether answers carry `x-sluice-backend`, the name of the backend that answered
    /// (off by default: it tells every client how the gateway routes).
    #[arg(long, value_name = "BOOL")]
    pub expose_backend_header: Option<bool>,
    /// The ISO 4217 code of the currency model prices are in (USD, EUR, ...), shown beside
    /// every cost.
    #[arg(long, value_name = "CODE")]
    pub currency: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum StatsCommand {
    /// Totals over a time range.
    Totals {
        /// Also the totals of each backend, model, client key or pool (one query).
        #[arg(long, value_enum)]
        by: Option<GroupByArg>,
        #[command(flatten)]
        range: RangeArgs,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Usage per hour or day, optionally per backend, model, key or pool.
    ///
    /// sluicectl asks the control plane for pages of at most 5,000 buckets (each under
    /// 4 MiB) and follows them to the end of the series or to --limit, so a series of
    /// any length is read; it does not rely on a larger message limit (it accepts
    /// answers up to 64 MiB all the same).
    #[command(verbatim_doc_comment)]
    Usage {
        /// One series per backend, model, client key or pool.
        #[arg(long, value_enum)]
        by: Option<GroupByArg>,
        #[arg(long, value_enum, default_value_t = GranularityArg::Hour)]
        granularity: GranularityArg,
        /// Newest time bucket first (the default is oldest first).
        #[arg(long)]
        newest_first: bool,
        /// Print at most N buckets (a bucket is one time and group): with --newest-first,
        /// the latest N.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        #[command(flatten)]
        range: RangeArgs,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

/// A time range; nothing given means all time. Usage is kept by the UTC hour: a range is
/// widened to whole hours at both ends.
#[derive(Debug, Args)]
pub struct RangeArgs {
    /// Only the last DURATION, e.g. 24h or 7d, widened to whole UTC hours (at 14:59, --since
    /// 1h sums 13:00 to 15:00).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with_all = ["start", "end"])]
    pub since: Option<Duration>,
    /// Start of the range, RFC 3339 (2025-01-31T00:00:00Z) or a date (2025-01-31, UTC).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub start: Option<SystemTime>,
    /// End of the range (exclusive), same forms as --start.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub end: Option<SystemTime>,
}

/// Filters on usage; none given matches everything.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only this backend (id or name).
    #[arg(long)]
    pub backend: Option<String>,
    /// Only this public model name.
    #[arg(long)]
    pub model: Option<String>,
    /// Only this client key (id or name).
    #[arg(long)]
    pub key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupByArg {
    Backend,
    Model,
    Key,
    Pool,
}

impl From<GroupByArg> for pb::GroupBy {
    fn from(by: GroupByArg) -> Self {
        match by {
            GroupByArg::Backend => pb::GroupBy::Backend,
            GroupByArg::Model => pb::GroupBy::Model,
            GroupByArg::Key => pb::GroupBy::ClientKey,
            GroupByArg::Pool => pb::GroupBy::Pool,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GranularityArg {
    Hour,
    Day,
}

impl From<GranularityArg> for pb::Granularity {
    fn from(granularity: GranularityArg) -> Self {
        match granularity {
            GranularityArg::Hour => pb::Granularity::Hour,
            GranularityArg::Day => pb::Granularity::Day,
        }
    }
}

const MODEL_FORMAT: &str =
    "expected NAME[:UPSTREAM[:IN_PRICE[/CACHED_PRICE[/CACHE_WRITE_PRICE]]:OUT_PRICE]]";

/// Parses `NAME[:UPSTREAM[:IN_PRICE:OUT_PRICE]]`, `IN_PRICE` possibly followed by the prices
/// of prompt tokens read from and written to the provider's cache (`3/0.3/3.75`; an empty
/// one, as in `3//3.75`, is the input price). An upstream name may contain
/// `:` (`llama3:8b`) only when both prices follow, so that a mistyped price is
/// an error rather than part of a model name.
pub fn parse_model_route(spec: &str) -> Result<pb::ModelRoute, String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (name, upstream, prices) = match parts.as_slice() {
        [name] => (*name, String::new(), None),
        [name, upstream] => (*name, (*upstream).to_owned(), None),
        [name, upstream @ .., input, output] if !upstream.is_empty() => {
            (*name, upstream.join(":"), Some((*input, *output)))
        }
        _ => {
            return Err(format!(
                "{MODEL_FORMAT} (an upstream name with ':' needs both prices, e.g. llama:llama3:8b:0:0)"
            ));
        }
    };
    let mut route = pb::ModelRoute {
        name: name.trim().to_owned(),
        upstream_name: upstream.trim().to_owned(),
        default_max_tokens: 0,
        max_output_tokens: 0,
        ..Default::default()
    };
    if let Some((input, output)) = prices {
        // IN_PRICE may be `IN/CACHED` or `IN/CACHED/WRITE`: the prices of prompt tokens read
        // from and written to the cache.
        let optional = |price: Option<&str>| match price {
            None | Some("") => Ok(None),
            Some(price) => parse_price(price).map(Some),
        };
        let mut prices = input.split('/');
        route.input_price_per_mtok = parse_price(prices.next().unwrap_or_default())?;
        route.cached_input_price_per_mtok = optional(prices.next())?;
        route.cache_write_price_per_mtok = optional(prices.next())?;
        if prices.next().is_some() {
            return Err(format!("too many prices before OUT_PRICE; {MODEL_FORMAT}"));
        }
        route.output_price_per_mtok = parse_price(output)?;
    }
    if route.name.is_empty() {
        return Err(format!("model name is empty; {MODEL_FORMAT}"));
    }
    if route.upstream_name.is_empty() {
        route.upstream_name = route.name.clone();
    }
    Ok(route)
}

/// A `--tier` of `backend add` and `backend update`: a price tier of one of the `--model`s.
#[derive(Debug, Clone, PartialEq)]
pub struct TierArg {
    pub model: String,
    pub tier: pb::TierMultiplier,
}

const TIER_FORMAT: &str = "expected MODEL:TIER=MULTIPLIER, e.g. gpt-5:priority=2";

/// Parses `MODEL:TIER=MULTIPLIER`; the model is what precedes the last `:` (a public name
/// may hold one, a tier's name does not). The control plane checks the tier's name.
pub fn parse_tier(spec: &str) -> Result<TierArg, String> {
    let (model, tier, multiplier) = parse_named(spec, "multiplier", TIER_FORMAT)?;
    Ok(TierArg {
        model,
        tier: pb::TierMultiplier { tier, multiplier },
    })
}

/// A `--call-price` of `backend add` and `backend update`: what one of the `--model`s pays
/// for a tool's calls.
#[derive(Debug, Clone, PartialEq)]
pub struct CallPriceArg {
    pub model: String,
    pub price: pb::CallPrice,
}

const CALL_PRICE_FORMAT: &str = "expected MODEL:TOOL=PRICE, e.g. claude-sonnet-4-5:web_search=10";

/// Parses `MODEL:TOOL=PRICE` as [`parse_tier`] does its tier.
pub fn parse_call_price(spec: &str) -> Result<CallPriceArg, String> {
    let (model, tool, price) = parse_named(spec, "price", CALL_PRICE_FORMAT)?;
    Ok(CallPriceArg {
        model,
        price: pb::CallPrice {
            tool,
            price_per_thousand_calls: price,
        },
    })
}

/// `MODEL:NAME=NUMBER`, the model being what precedes the last `:`, the number finite from 0.
fn parse_named(spec: &str, number: &str, format: &str) -> Result<(String, String, f64), String> {
    let (model, named) = spec.rsplit_once(':').ok_or(format)?;
    let (name, value) = named.split_once('=').ok_or(format)?;
    let value = match value.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => v,
        _ => return Err(format!("{number} {value:?} is not a number ≥ 0; {format}")),
    };
    let (model, name) = (model.trim(), name.trim());
    if model.is_empty() || name.is_empty() {
        return Err(format.to_owned());
    }
    Ok((model.to_owned(), name.to_owned(), value))
}

/// An `--audio-price` of `backend add` and `backend update`: a `--model`'s prices of audio
/// prompt and completion tokens per million, each `None` for the text's.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioPriceArg {
    pub model: String,
    pub input: Option<f64>,
    pub output: Option<f64>,
}

const AUDIO_PRICE_FORMAT: &str = "expected MODEL:IN/OUT (e.g. gpt-audio:32/64) or MODEL:none";

/// Parses `MODEL:IN/OUT` (either price may be empty: the text's) or `MODEL:none`; the model
/// is what precedes the last `:`.
pub fn parse_audio_price(spec: &str) -> Result<AudioPriceArg, String> {
    let (model, prices) = spec.rsplit_once(':').ok_or(AUDIO_PRICE_FORMAT)?;
    let model = model.trim();
    if model.is_empty() {
        return Err(AUDIO_PRICE_FORMAT.to_owned());
    }
    let (input, output) = match prices.trim() {
        "none" => (None, None),
        prices => {
            let (input, output) = prices.split_once('/').ok_or(AUDIO_PRICE_FORMAT)?;
            let price = |price: &str| match price.trim() {
                "" => Ok(None),
                price => match price.parse::<f64>() {
                    Ok(p) if p.is_finite() && p >= 0.0 => Ok(Some(p)),
                    _ => Err(format!(
                        "price {price:?} is not a number ≥ 0 (per million tokens); \
                         {AUDIO_PRICE_FORMAT}"
                    )),
                },
            };
            (price(input)?, price(output)?)
        }
    };
    Ok(AudioPriceArg {
        model: model.to_owned(),
        input,
        output,
    })
}

/// A `--long-context` of `backend add` and `backend update`: a `--model`'s long-context band,
/// or `None` to take it off.
#[derive(Debug, Clone, PartialEq)]
pub struct LongContextArg {
    pub model: String,
    pub band: Option<pb::LongContextPrices>,
}

const LONG_CONTEXT_FORMAT: &str =
    "expected MODEL:ABOVE:IN_MULTIPLIER:OUT_MULTIPLIER (e.g. gpt-5.4:272000:2:1.5) or MODEL:none";

/// Parses `MODEL:ABOVE:IN:OUT` or `MODEL:none`; the model is what precedes the last three
/// fields (or `none`), so a public name may hold a `:`.
pub fn parse_long_context(spec: &str) -> Result<LongContextArg, String> {
    if let Some(model) = spec.strip_suffix(":none") {
        let model = model.trim();
        return match model.is_empty() {
            true => Err(LONG_CONTEXT_FORMAT.to_owned()),
            false => Ok(LongContextArg {
                model: model.to_owned(),
                band: None,
            }),
        };
    }
    let mut fields = spec.rsplitn(4, ':');
    let (Some(output), Some(input), Some(above), Some(model)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(LONG_CONTEXT_FORMAT.to_owned());
    };
    let multiplier = |text: &str| match text.trim().parse::<f64>() {
        Ok(m) if m.is_finite() && m >= 0.0 => Ok(m),
        _ => Err(format!(
            "multiplier {text:?} is not a number ≥ 0; {LONG_CONTEXT_FORMAT}"
        )),
    };
    let above = above
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            format!("{above:?} is not a whole number of tokens ≥ 1; {LONG_CONTEXT_FORMAT}")
        })?;
    let model = model.trim();
    if model.is_empty() {
        return Err(LONG_CONTEXT_FORMAT.to_owned());
    }
    Ok(LongContextArg {
        model: model.to_owned(),
        band: Some(pb::LongContextPrices {
            above_prompt_tokens: above,
            input_multiplier: multiplier(input)?,
            output_multiplier: multiplier(output)?,
        }),
    })
}

/// `--responses-api` of `backend update`: `Some` to set it, `None` for its API's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponsesApi(pub Option<bool>);

fn parse_responses_api(text: &str) -> Result<ResponsesApi, String> {
    match text {
        "true" => Ok(ResponsesApi(Some(true))),
        "false" => Ok(ResponsesApi(Some(false))),
        "default" => Ok(ResponsesApi(None)),
        _ => Err("expected true, false or default".to_owned()),
    }
}

/// A `--model` of `backend update`: the route, and whether its upstream name and its prices
/// were given.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelUpdate {
    pub route: pb::ModelRoute,
    pub upstream_given: bool,
    pub priced: bool,
}

/// [`parse_model_route`], remembering whether the spec gave an upstream name (a non-empty
/// one: `NAME::IN:OUT` gives none) and prices.
pub fn parse_model_update(spec: &str) -> Result<ModelUpdate, String> {
    Ok(ModelUpdate {
        route: parse_model_route(spec)?,
        upstream_given: spec
            .split(':')
            .nth(1)
            .is_some_and(|upstream| !upstream.trim().is_empty()),
        priced: spec.split(':').count() >= 4,
    })
}

fn parse_price(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(price) if price.is_finite() && price >= 0.0 => Ok(price),
        _ => Err(format!(
            "price {text:?} is not a number ≥ 0 (per million tokens); {MODEL_FORMAT}"
        )),
    }
}

/// Accepts an `http://` or `https://` URL that tonic can connect to.
pub fn parse_endpoint(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err("must start with http:// or https://".to_owned());
    }
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|_| "not a valid URL".to_owned())?;
    Ok(url.to_owned())
}

/// Parses RFC 3339 (`2025-01-31T12:00:00Z`, `…+02:00`, fractional seconds)
/// or a bare date (`2025-01-31`, midnight UTC).
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    const INVALID: &str =
        "expected an RFC 3339 time such as 2025-01-31T00:00:00Z, or a date 2025-01-31";
    let text = text.trim();
    if text.len() == "2025-01-31".len() {
        return humantime::parse_rfc3339(&format!("{text}T00:00:00Z"))
            .map_err(|_| INVALID.to_owned());
    }
    if let Some(utc) = text.strip_suffix(['Z', 'z']) {
        return humantime::parse_rfc3339_weak(utc).map_err(|_| INVALID.to_owned());
    }
    // A numeric offset: local time = UTC + offset.
    let split = text.len().checked_sub("+00:00".len()).ok_or(INVALID)?;
    let (local, offset) = match (text.get(..split), text.get(split..)) {
        (Some(local), Some(offset)) => (local, offset),
        _ => return Err(INVALID.to_owned()),
    };
    let offset = parse_offset(offset).ok_or(INVALID)?;
    let local = humantime::parse_rfc3339_weak(local).map_err(|_| INVALID.to_owned())?;
    let utc = if offset >= 0 {
        local.checked_sub(Duration::from_secs(offset.unsigned_abs()))
    } else {
        local.checked_add(Duration::from_secs(offset.unsigned_abs()))
    };
    utc.ok_or_else(|| INVALID.to_owned())
}

/// `+HH:MM` or `-HH:MM` as seconds east of UTC.
fn parse_offset(offset: &str) -> Option<i64> {
    let (sign, rest) = match offset.split_at_checked(1)? {
        ("+", rest) => (1, rest),
        ("-", rest) => (-1, rest),
        _ => return None,
    };
    let (hours, minutes) = rest.split_once(':')?;
    if hours.len() != 2 || minutes.len() != 2 {
        return None;
    }
    let hours: i64 = hours.parse().ok()?;
    let minutes: i64 = minutes.parse().ok()?;
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some(sign * (hours * 3600 + minutes * 60))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn route(name: &str, upstream: &str, input: f64, output: f64) -> pb::ModelRoute {
        pb::ModelRoute {
            default_max_tokens: 0,
            max_output_tokens: 0,
            name: name.into(),
            upstream_name: upstream.into(),
            input_price_per_mtok: input,
            output_price_per_mtok: output,
            ..Default::default()
        }
    }

    #[test]
    fn model_route_forms() {
        assert_eq!(
            parse_model_route("gpt-4o-mini").unwrap(),
            route("gpt-4o-mini", "gpt-4o-mini", 0.0, 0.0)
        );
        assert_eq!(
            parse_model_route("fast:gpt-4o-mini").unwrap(),
            route("fast", "gpt-4o-mini", 0.0, 0.0)
        );
        assert_eq!(
            parse_model_route("gpt-4o-mini:gpt-4o-mini:0.15:0.60").unwrap(),
            route("gpt-4o-mini", "gpt-4o-mini", 0.15, 0.6)
        );
        assert_eq!(
            parse_model_route("gpt-4o-mini::0.15:0.6").unwrap(),
            route("gpt-4o-mini", "gpt-4o-mini", 0.15, 0.6)
        );
        assert_eq!(
            parse_model_route("llama:llama3:8b:0:0").unwrap(),
            route("llama", "llama3:8b", 0.0, 0.0)
        );
    }

    #[test]
    fn a_tier_names_its_model_before_the_last_colon() {
        let tier = parse_tier("gpt-5:priority=2").unwrap();
        assert_eq!(tier.model, "gpt-5");
        assert_eq!(tier.tier.tier, "priority");
        assert_eq!(tier.tier.multiplier, 2.0);
        let tier = parse_tier(" llama3:8b : flex = 0.5 ").unwrap();
        assert_eq!(
            (tier.model.as_str(), tier.tier.tier.as_str()),
            ("llama3:8b", "flex")
        );
        assert_eq!(tier.tier.multiplier, 0.5);
        for bad in [
            "gpt-5",
            "gpt-5:priority",
            ":fast=2",
            "gpt-5:=2",
            "gpt-5:fast=x",
            "m:fast=-1",
            "m:fast=inf",
        ] {
            assert!(parse_tier(bad).is_err(), "{bad}");
            assert!(parse_call_price(bad).is_err(), "{bad}");
        }
        let price = parse_call_price("claude-sonnet-4-5:web_search=10").unwrap();
        assert_eq!(
            (price.model.as_str(), price.price.tool.as_str()),
            ("claude-sonnet-4-5", "web_search")
        );
        assert_eq!(price.price.price_per_thousand_calls, 10.0);
        let error = parse_call_price("m:web_search=-1").unwrap_err();
        assert!(error.starts_with("price \"-1\" is not a number"), "{error}");
    }

    #[test]
    fn a_long_context_band_names_its_model_before_its_three_figures() {
        let arg = parse_long_context("gpt-5.4:272000:2:1.5").unwrap();
        assert_eq!(arg.model, "gpt-5.4");
        let band = arg.band.unwrap();
        assert_eq!(
            (
                band.above_prompt_tokens,
                band.input_multiplier,
                band.output_multiplier
            ),
            (272_000, 2.0, 1.5)
        );
        let arg = parse_long_context("llama3:8b:1000:2:1").unwrap();
        assert_eq!(arg.model, "llama3:8b");
        let off = parse_long_context("llama3:8b:none").unwrap();
        assert_eq!((off.model.as_str(), off.band), ("llama3:8b", None));
        for bad in [
            "m",
            "m:1:2",
            ":1:2:3",
            "m:0:2:1",
            "m:x:2:1",
            "m:1:-2:1",
            "m:1:2:nan",
            ":none",
        ] {
            assert!(parse_long_context(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cached_input_price_follows_the_input_price() {
        let route = parse_model_route("gpt-4o:gpt-4o:2.5/1.25:10").unwrap();
        assert_eq!(
            (
                route.input_price_per_mtok,
                route.cached_input_price_per_mtok,
                route.output_price_per_mtok
            ),
            (2.5, Some(1.25), 10.0)
        );
        assert_eq!(
            parse_model_route("gpt-4o:gpt-4o:2.5:10")
                .unwrap()
                .cached_input_price_per_mtok,
            None
        );
        assert!(parse_model_route("gpt-4o:gpt-4o:2.5/x:10").is_err());
    }

    #[test]
    fn an_audio_price_is_two_prices_either_left_to_the_texts() {
        let parsed = |spec| {
            let arg = parse_audio_price(spec).unwrap();
            (arg.model, arg.input, arg.output)
        };
        assert_eq!(
            parsed("gpt-audio:32/64"),
            ("gpt-audio".into(), Some(32.0), Some(64.0))
        );
        assert_eq!(parsed("m:/64"), ("m".into(), None, Some(64.0)));
        assert_eq!(parsed("llama:8b:1/"), ("llama:8b".into(), Some(1.0), None));
        assert_eq!(parsed("m:none"), ("m".into(), None, None));
        for bad in ["m", "m:32", ":1/2", "m:-1/2", "m:1/x", "m:NaN/1", "m:1/2/3"] {
            assert!(parse_audio_price(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cache_write_price_follows_the_cached_price() {
        let prices = |spec: &str| {
            let route = parse_model_route(spec).unwrap();
            (
                route.input_price_per_mtok,
                route.cached_input_price_per_mtok,
                route.cache_write_price_per_mtok,
                route.output_price_per_mtok,
            )
        };
        assert_eq!(
            prices("claude-sonnet-4-5::3/0.3/3.75:15"),
            (3.0, Some(0.3), Some(3.75), 15.0)
        );
        assert_eq!(
            prices("claude-sonnet-4-5::3//3.75:15"),
            (3.0, None, Some(3.75), 15.0)
        );
        assert_eq!(
            prices("claude-sonnet-4-5::3/0.3:15"),
            (3.0, Some(0.3), None, 15.0)
        );
        assert!(parse_model_route("c::3/0.3/3.75/9:15").is_err());
        assert!(parse_model_route("c::3/0.3/-1:15").is_err());
        assert!(parse_model_route("c::/0.3/3.75:15").is_err());
    }

    #[test]
    fn model_route_rejects_ambiguous_or_bad_prices() {
        // Three parts: a price without its partner, or an upstream with ':' and no prices.
        assert!(parse_model_route("gpt:gpt:0.15").is_err());
        assert!(parse_model_route("gpt:gpt:abc:1").is_err());
        assert!(parse_model_route("gpt:gpt:-1:1").is_err());
        assert!(parse_model_route("gpt:gpt:1:NaN").is_err());
        assert!(parse_model_route("").is_err());
        assert!(parse_model_route(":up").is_err());
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("http://127.0.0.1:50051/").unwrap(),
            "http://127.0.0.1:50051"
        );
        assert!(parse_endpoint("https://sluice.example:443").is_ok());
        assert!(parse_endpoint("127.0.0.1:50051").is_err());
        assert!(parse_endpoint("ftp://x").is_err());
    }

    #[test]
    fn times() {
        let base = humantime::parse_rfc3339("2025-01-31T00:00:00Z").unwrap();
        assert_eq!(parse_time("2025-01-31").unwrap(), base);
        assert_eq!(parse_time("2025-01-31T00:00:00Z").unwrap(), base);
        assert_eq!(parse_time("2025-01-31T02:00:00+02:00").unwrap(), base);
        assert_eq!(parse_time("2025-01-30T22:30:00-01:30").unwrap(), base);
        assert_eq!(
            parse_time("2025-01-31T00:00:00.5Z").unwrap(),
            base + Duration::from_millis(500)
        );
        for bad in [
            "yesterday",
            "2025-13-01",
            "2025-01-31T00:00:00+2",
            "2025-01-31T00:00:00+24:00",
            "é",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
