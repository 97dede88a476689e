//! Backends: upstream providers speaking the OpenAI API or Anthropic's. The domain type
//! [`BackendSpec`] is what an operator configures, validated once at the edge.

use sha2::Digest as _;
use sluice_proto::limits::{
    MAX_CALL_PRICES, MAX_MODEL_NAME_BYTES, MAX_PRICE_TIERS, MAX_TIER_NAME_BYTES,
};
use sluice_proto::v1 as pb;

use crate::validation::{
    ValidationError, canonical_name, check_model_name, check_name, check_tpm_limit, check_visible,
    not_updatable,
};

pub use sluice_domain::pool::Pool;

fn pool(value: i32) -> Result<Pool, ValidationError> {
    Pool::try_from(value).map_err(|e| ValidationError::new("backend.pool", e.to_string()))
}

/// A model served by a backend: public name, upstream name, prices per million tokens.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelRoute {
    pub name: String,
    pub upstream_name: String,
    pub input_price_per_mtok: f64,
    pub output_price_per_mtok: f64,
    /// Prompt tokens read from the provider's cache; `None` charges the input price.
    pub cached_input_price_per_mtok: Option<f64>,
    /// Prompt tokens written to the provider's cache; `None` charges the input price.
    pub cache_write_price_per_mtok: Option<f64>,
    /// `max_tokens` for an Anthropic backend when the client gave none; 0: Sluice's default.
    pub default_max_tokens: u32,
    /// The most output tokens a request translated for this route asks for; 0: no cap.
    pub max_output_tokens: u32,
    /// The price tiers an answer may report, each with what it multiplies the prices by.
    pub tier_multipliers: Vec<(String, f64)>,
    /// The prices of a long request, if the provider bills one at a band of its own.
    pub long_context: Option<LongContextPrices>,
    /// The tools the provider bills by the call, each with its price per 1,000 calls.
    pub call_prices: Vec<(String, f64)>,
    /// Audio prompt and completion tokens; `None` charges the input or output price.
    pub audio_input_price_per_mtok: Option<f64>,
    pub audio_output_price_per_mtok: Option<f64>,
}

/// What a route's prices are multiplied by for a request whose prompt is more than
/// `above_prompt_tokens` (`ModelRoute.long_context`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LongContextPrices {
    pub above_prompt_tokens: u64,
    pub input_multiplier: f64,
    pub output_multiplier: f64,
}

/// The API a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiFormat {
    #[default]
    OpenAi,
    Anthropic,
}

impl ApiFormat {
    fn from_proto(value: i32) -> Result<Self, ValidationError> {
        match pb::ApiFormat::try_from(value) {
            Ok(pb::ApiFormat::Unspecified | pb::ApiFormat::Openai) => Ok(Self::OpenAi),
            Ok(pb::ApiFormat::Anthropic) => Ok(Self::Anthropic),
            Err(_) => Err(ValidationError::new(
                "backend.api_format",
                format!("unknown API format {value}"),
            )),
        }
    }

    pub fn to_proto(self) -> pb::ApiFormat {
        match self {
            Self::OpenAi => pb::ApiFormat::Openai,
            Self::Anthropic => pb::ApiFormat::Anthropic,
        }
    }

    /// The `backends.api_format` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
        }
    }

    pub fn from_db(value: &str) -> Self {
        if value == "anthropic" {
            Self::Anthropic
        } else {
            Self::OpenAi
        }
    }
}

/// The request header a backend's API key goes in ([`pb::KeyHeader`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyHeader {
    /// The API format's own: `Authorization: Bearer` (OpenAI), `x-api-key` (Anthropic).
    #[default]
    FormatsOwn,
    Bearer,
    XApiKey,
    /// Azure OpenAI's deployments.
    ApiKey,
}

impl KeyHeader {
    fn from_proto(value: i32) -> Result<Self, ValidationError> {
        match pb::KeyHeader::try_from(value) {
            Ok(pb::KeyHeader::Unspecified) => Ok(Self::FormatsOwn),
            Ok(pb::KeyHeader::Bearer) => Ok(Self::Bearer),
            Ok(pb::KeyHeader::XApiKey) => Ok(Self::XApiKey),
            Ok(pb::KeyHeader::ApiKey) => Ok(Self::ApiKey),
            Err(_) => Err(ValidationError::new(
                "backend.key_header",
                format!("unknown key header {value}"),
            )),
        }
    }

    pub fn to_proto(self) -> pb::KeyHeader {
        match self {
            Self::FormatsOwn => pb::KeyHeader::Unspecified,
            Self::Bearer => pb::KeyHeader::Bearer,
            Self::XApiKey => pb::KeyHeader::XApiKey,
            Self::ApiKey => pb::KeyHeader::ApiKey,
        }
    }

    /// The `backends.key_header` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FormatsOwn => "",
            Self::Bearer => "bearer",
            Self::XApiKey => "x-api-key",
            Self::ApiKey => "api-key",
        }
    }

    pub fn from_db(value: &str) -> Self {
        match value {
            "bearer" => Self::Bearer,
            "x-api-key" => Self::XApiKey,
            "api-key" => Self::ApiKey,
            _ => Self::FormatsOwn,
        }
    }
}

/// Largest per-route `default_max_tokens`.
const MAX_DEFAULT_MAX_TOKENS: u32 = 10_000_000;
/// Longest `anthropic_version` (real ones are dates, `2023-06-01`).
const MAX_ANTHROPIC_VERSION_BYTES: usize = 64;

/// Everything an operator sets on a backend except its API key.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSpec {
    pub name: String,
    pub base_url: String,
    pub pool: Pool,
    pub priority: i32,
    pub weight: u32,
    pub models: Vec<ModelRoute>,
    pub rpm_limit: u32,
    /// Prompt + completion tokens per minute across all replicas; 0 means no limit.
    pub tpm_limit: u32,
    pub enabled: bool,
    /// Whether it serves the Responses API; `None` is the default ([`BackendSpec::serves_responses`]).
    pub responses_api: Option<bool>,
    pub api_format: ApiFormat,
    /// Sent as `anthropic-version` to an Anthropic backend; empty: the data plane's default.
    pub anthropic_version: String,
    pub key_header: KeyHeader,
}

/// A stored backend as the admin API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub id: String,
    pub spec: BackendSpec,
    pub api_key_hint: String,
    pub create_time_ms: i64,
    pub update_time_ms: i64,
}

const MAX_WEIGHT: u32 = 1_000_000;
/// The highest price per million tokens: one unit of the currency a token, thousands of times
/// any model's. Far higher ones made a token's price in nano-units infinite, and a request
/// with no token of some kind (0 × ∞) cost nothing, its budget untouched.
pub const MAX_PRICE_PER_MTOK: f64 = 1e6;
const MAX_MODELS: usize = 1_000;
/// Longest `base_url`, once normalised.
pub const MAX_BASE_URL_BYTES: usize = 2048;
/// Longest provider API key. Real ones are under 200 bytes.
pub const MAX_API_KEY_BYTES: usize = 4096;

/// A provider API key as the data plane sends it (`Authorization: Bearer <key>`): at most
/// [`MAX_API_KEY_BYTES`] of printable ASCII without spaces. A key no header can carry would
/// make every replica refuse every snapshot. Empty means "no key".
pub fn check_api_key(field: &str, key: &str) -> Result<(), ValidationError> {
    if key.len() > MAX_API_KEY_BYTES {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_API_KEY_BYTES} bytes"),
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ValidationError::new(
            field,
            "must be printable ASCII without spaces (it is sent in an HTTP header)",
        ));
    }
    Ok(())
}

/// Fields of `Backend` that `UpdateBackend` may name in its mask.
pub const UPDATABLE_FIELDS: &[&str] = &[
    "name",
    "base_url",
    "pool",
    "priority",
    "weight",
    "models",
    "rpm_limit",
    "tpm_limit",
    "enabled",
    "responses_api",
    "api_format",
    "anthropic_version",
    "key_header",
];

impl BackendSpec {
    /// Whether the backend serves the Responses API: as set, else yes for an OpenAI-format
    /// backend and no for an Anthropic one (which has no Responses API).
    pub fn serves_responses(&self) -> bool {
        self.responses_api
            .unwrap_or(self.api_format == ApiFormat::OpenAi)
    }

    /// Applies the rules every stored backend obeys, normalising where the
    /// intent is plain (weight 0 → 1, empty upstream name → public name).
    pub fn validated(self) -> Result<Self, ValidationError> {
        self.validated_fields(|_| true)
    }

    /// `self` with the fields `paths` names (an update mask's) taken from `update`, checked:
    /// those fields against every rule, the others as they were when written. A rule added
    /// since a field was stored does not hold a change of another field hostage: a backend
    /// stored before it can still be disabled or changed, and the refusal of one of its
    /// named fields is the operator's to fix. A change that enables a disabled backend checks
    /// every field: the backend joins the snapshot, and each replica would take it as it is.
    pub fn updated(
        &self,
        update: &pb::Backend,
        paths: &[String],
    ) -> Result<BackendSpec, ValidationError> {
        let mut updated = self.clone();
        updated.apply_mask(update, paths)?;
        let joins = updated.enabled && !self.enabled;
        updated.validated_fields(|field| joins || paths.iter().any(|path| path == field))
    }

    /// Refuses `updated` (this backend, updated) when it sets a route's stored fields back to
    /// their default and the update did not say it `meant` to
    /// (`UpdateBackendRequest.clear_route_fields`): a client that does not know a newer field
    /// sends it unset (`sluice_domain::route`), and audio was then charged at the text price.
    pub fn check_clearing(
        &self,
        updated: &BackendSpec,
        meant: bool,
    ) -> Result<(), ValidationError> {
        if meant {
            return Ok(());
        }
        let stored: Vec<pb::ModelRoute> = self.models.iter().map(ModelRoute::to_proto).collect();
        let new: Vec<pb::ModelRoute> = updated.models.iter().map(ModelRoute::to_proto).collect();
        let clearing = sluice_domain::route::clearing(&stored, &new);
        if clearing.is_empty() {
            return Ok(());
        }
        // The first few are named, the rest counted: the message goes to a gRPC client in a
        // header, and a backend's thousand routes named whole passed the 16 KiB a client
        // accepts (it reported a transport error instead of this refusal).
        let mut routes: Vec<String> = clearing
            .iter()
            .take(ROUTES_NAMED)
            .map(|(i, name, fields)| {
                format!(
                    "backend.models[{i}] ({}): {}",
                    sluice_domain::text::quoted(name),
                    fields.join(", ")
                )
            })
            .collect();
        if clearing.len() > ROUTES_NAMED {
            routes.push(format!("and {} more routes", clearing.len() - ROUTES_NAMED));
        }
        Err(ValidationError::new(
            "clear_route_fields",
            format!(
                "the update would clear what these routes store: {}. A client that does not know \
                 a field drops it unknowingly: upgrade it (sluicectl with the control plane), or \
                 set clear_route_fields to clear them on purpose",
                routes.join("; ")
            ),
        ))
    }

    /// [`Self::validated`] of the fields `checks` says, by their mask path; the others are
    /// taken as they are.
    fn validated_fields(mut self, checks: impl Fn(&str) -> bool) -> Result<Self, ValidationError> {
        if checks("name") {
            self.name = canonical_name(&self.name);
            check_name("backend.name", &self.name)?;
            if RESERVED_LABELS.contains(&self.name.as_str()) {
                return Err(ValidationError::new(
                    "backend.name",
                    format!(
                        "{:?} is the name metrics give a request that reached no backend: a \
                         backend named so would be counted with them",
                        self.name
                    ),
                ));
            }
        }
        if checks("tpm_limit") {
            check_tpm_limit("backend.tpm_limit", self.tpm_limit)?;
        }
        if checks("base_url") {
            self.base_url = normalize_base_url(&self.base_url)?;
        }
        if self.weight == 0 {
            self.weight = 1;
        }
        if checks("weight") && self.weight > MAX_WEIGHT {
            return Err(ValidationError::new(
                "backend.weight",
                format!("must be at most {MAX_WEIGHT}"),
            ));
        }
        if checks("anthropic_version") {
            self.check_anthropic_version()?;
        }
        if checks("models") {
            self.check_models()?;
        }
        Ok(self)
    }

    fn check_anthropic_version(&mut self) -> Result<(), ValidationError> {
        self.anthropic_version = self.anthropic_version.trim().to_owned();
        if self.anthropic_version.len() > MAX_ANTHROPIC_VERSION_BYTES
            || !self.anthropic_version.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ValidationError::new(
                "backend.anthropic_version",
                format!(
                    "must be at most {MAX_ANTHROPIC_VERSION_BYTES} bytes of printable ASCII without spaces (it is sent in an HTTP header)"
                ),
            ));
        }
        Ok(())
    }

    fn check_models(&mut self) -> Result<(), ValidationError> {
        if self.models.is_empty() {
            return Err(ValidationError::new(
                "backend.models",
                "at least one model is required",
            ));
        }
        if self.models.len() > MAX_MODELS {
            return Err(ValidationError::new(
                "backend.models",
                format!("at most {MAX_MODELS} models"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, model) in self.models.iter_mut().enumerate() {
            if model.default_max_tokens > MAX_DEFAULT_MAX_TOKENS {
                return Err(ValidationError::new(
                    format!("backend.models[{i}].default_max_tokens"),
                    format!("must be at most {MAX_DEFAULT_MAX_TOKENS}"),
                ));
            }
            if model.max_output_tokens > MAX_DEFAULT_MAX_TOKENS {
                return Err(ValidationError::new(
                    format!("backend.models[{i}].max_output_tokens"),
                    format!("must be at most {MAX_DEFAULT_MAX_TOKENS}"),
                ));
            }
            let field = format!("backend.models[{i}]");
            model.name = model.name.trim().to_owned();
            model.upstream_name = model.upstream_name.trim().to_owned();
            check_model_name(&format!("{field}.name"), &model.name)?;
            if RESERVED_LABELS.contains(&model.name.as_str()) {
                return Err(ValidationError::new(
                    format!("{field}.name"),
                    format!(
                        "{:?} is the name metrics and statistics give a request no route \
                         serves: a route named so would be counted with them",
                        model.name
                    ),
                ));
            }
            if model.upstream_name.is_empty() {
                model.upstream_name = model.name.clone();
            }
            // Sent upstream as given: spaces are allowed (some providers name deployments
            // so), invisible characters are not.
            if model.upstream_name.len() > MAX_MODEL_NAME_BYTES {
                return Err(ValidationError::new(
                    format!("{field}.upstream_name"),
                    format!("model names must be at most {MAX_MODEL_NAME_BYTES} bytes"),
                ));
            }
            check_visible(&format!("{field}.upstream_name"), &model.upstream_name)?;
            // -0 is within the range and is stored as given: listed as a price of "-0".
            for price in [
                Some(&mut model.input_price_per_mtok),
                Some(&mut model.output_price_per_mtok),
                model.cached_input_price_per_mtok.as_mut(),
                model.cache_write_price_per_mtok.as_mut(),
                model.audio_input_price_per_mtok.as_mut(),
                model.audio_output_price_per_mtok.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                *price += 0.0;
            }
            for (price, what) in [
                (model.input_price_per_mtok, "input_price_per_mtok"),
                (model.output_price_per_mtok, "output_price_per_mtok"),
                (
                    model.cached_input_price_per_mtok.unwrap_or(0.0),
                    "cached_input_price_per_mtok",
                ),
                (
                    model.cache_write_price_per_mtok.unwrap_or(0.0),
                    "cache_write_price_per_mtok",
                ),
                (
                    model.audio_input_price_per_mtok.unwrap_or(0.0),
                    "audio_input_price_per_mtok",
                ),
                (
                    model.audio_output_price_per_mtok.unwrap_or(0.0),
                    "audio_output_price_per_mtok",
                ),
            ] {
                if !(0.0..=MAX_PRICE_PER_MTOK).contains(&price) {
                    return Err(ValidationError::new(
                        format!("{field}.{what}"),
                        format!("must be a number from 0 to {MAX_PRICE_PER_MTOK}"),
                    ));
                }
            }
            check_named(&field, &TIERS, &mut model.tier_multipliers)?;
            check_named(&field, &CALL_PRICES, &mut model.call_prices)?;
            if let Some(long) = &mut model.long_context {
                check_long_context(&field, long)?;
            }
            if !seen.insert(model.name.clone()) {
                return Err(ValidationError::new(
                    format!("{field}.name"),
                    format!("model {:?} is listed twice", model.name),
                ));
            }
        }
        Ok(())
    }

    /// Reads the operator-set fields of a proto `Backend` (id, hint and times are ignored).
    pub fn from_proto(backend: &pb::Backend) -> Result<Self, ValidationError> {
        Ok(Self {
            name: backend.name.clone(),
            base_url: backend.base_url.clone(),
            pool: pool(backend.pool)?,
            priority: backend.priority,
            weight: backend.weight,
            models: backend.models.iter().map(ModelRoute::from_proto).collect(),
            rpm_limit: backend.rpm_limit,
            tpm_limit: backend.tpm_limit,
            enabled: backend.enabled,
            responses_api: backend.responses_api,
            api_format: ApiFormat::from_proto(backend.api_format)?,
            anthropic_version: backend.anthropic_version.clone(),
            key_header: KeyHeader::from_proto(backend.key_header)?,
        })
    }

    /// Copies the fields named in `paths` from `update` onto `self`.
    pub fn apply_mask(
        &mut self,
        update: &pb::Backend,
        paths: &[String],
    ) -> Result<(), ValidationError> {
        for path in paths {
            match path.as_str() {
                "name" => self.name = update.name.clone(),
                "base_url" => self.base_url = update.base_url.clone(),
                "pool" => self.pool = pool(update.pool)?,
                "priority" => self.priority = update.priority,
                "weight" => self.weight = update.weight,
                "models" => {
                    self.models = update.models.iter().map(ModelRoute::from_proto).collect()
                }
                "rpm_limit" => self.rpm_limit = update.rpm_limit,
                "tpm_limit" => self.tpm_limit = update.tpm_limit,
                "enabled" => self.enabled = update.enabled,
                "responses_api" => self.responses_api = update.responses_api,
                "api_format" => self.api_format = ApiFormat::from_proto(update.api_format)?,
                "anthropic_version" => self.anthropic_version = update.anthropic_version.clone(),
                "key_header" => self.key_header = KeyHeader::from_proto(update.key_header)?,
                other => return Err(not_updatable(other, UPDATABLE_FIELDS)),
            }
        }
        Ok(())
    }
}

/// The most a price tier multiplies a route's prices by (Anthropic's fast mode is 6).
pub const MAX_TIER_MULTIPLIER: f64 = 100.0;

/// The most a tool's calls cost per 1,000 (web search is 10 to 25).
pub const MAX_PRICE_PER_THOUSAND_CALLS: f64 = 1_000_000.0;

/// What a route lists by name: its price tiers, or its priced tools ([`check_named`]).
struct Named {
    /// The list's field, and its items' two.
    list: &'static str,
    name: &'static str,
    value: &'static str,
    /// What an item's name is like, for the error.
    examples: &'static str,
    max_value: f64,
    /// The value an item costs nothing extra at, as one not listed does: dropped.
    neutral: f64,
    most: usize,
}

const TIERS: Named = Named {
    list: "tier_multipliers",
    name: "tier",
    value: "multiplier",
    examples: "as answers report it (priority, flex, fast, us)",
    max_value: MAX_TIER_MULTIPLIER,
    neutral: 1.0,
    most: MAX_PRICE_TIERS,
};

const CALL_PRICES: Named = Named {
    list: "call_prices",
    name: "tool",
    value: "price_per_thousand_calls",
    examples: "as answers count its calls (web_search, file_search)",
    max_value: MAX_PRICE_PER_THOUSAND_CALLS,
    neutral: 0.0,
    most: MAX_CALL_PRICES,
};

/// A route's price tiers or priced tools as stored: each named by 1 to [`MAX_TIER_NAME_BYTES`]
/// of `[a-z0-9_-]` (the words answers report are lowercase), once, with a value from 0 to the
/// list's most, at most the list's most of them. A tier at 1, or a tool at 0, costs what one not
/// listed does: it is dropped (so `priority=1` takes a tier off, `web_search=0` a tool).
fn check_named(
    field: &str,
    what: &Named,
    items: &mut Vec<(String, f64)>,
) -> Result<(), ValidationError> {
    let mut seen = std::collections::HashSet::new();
    let Named {
        list, name, value, ..
    } = what;
    for (i, (item, number)) in items.iter_mut().enumerate() {
        let field = format!("{field}.{list}[{i}]");
        *item = item.trim().to_owned();
        if item.is_empty()
            || item.len() > MAX_TIER_NAME_BYTES
            || !item
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(ValidationError::new(
                format!("{field}.{name}"),
                format!(
                    "a {name} is named by 1 to {MAX_TIER_NAME_BYTES} of a-z, 0-9, '_' and '-', {}",
                    what.examples
                ),
            ));
        }
        if !(0.0..=what.max_value).contains(number) {
            return Err(ValidationError::new(
                format!("{field}.{value}"),
                format!("must be a number from 0 to {}", what.max_value),
            ));
        }
        *number += 0.0;
        if !seen.insert(item.clone()) {
            return Err(ValidationError::new(
                format!("{field}.{name}"),
                format!("{name} {item:?} is listed twice"),
            ));
        }
    }
    items.retain(|(_, number)| *number != what.neutral);
    if items.len() > what.most {
        return Err(ValidationError::new(
            format!("{field}.{list}"),
            format!("at most {} {name}s", what.most),
        ));
    }
    Ok(())
}

/// The largest prompt a long-context band may start past: a thousand times the longest
/// context window of 2026.
pub const MAX_LONG_CONTEXT_ABOVE: u64 = 1_000_000_000;

/// A long-context band: a threshold from 1 to [`MAX_LONG_CONTEXT_ABOVE`] tokens, multipliers
/// from 0 to [`MAX_TIER_MULTIPLIER`].
fn check_long_context(field: &str, long: &mut LongContextPrices) -> Result<(), ValidationError> {
    if !(1..=MAX_LONG_CONTEXT_ABOVE).contains(&long.above_prompt_tokens) {
        return Err(ValidationError::new(
            format!("{field}.long_context.above_prompt_tokens"),
            format!("must be from 1 to {MAX_LONG_CONTEXT_ABOVE}"),
        ));
    }
    for (multiplier, what) in [
        (&mut long.input_multiplier, "input_multiplier"),
        (&mut long.output_multiplier, "output_multiplier"),
    ] {
        if !(0.0..=MAX_TIER_MULTIPLIER).contains(multiplier) {
            return Err(ValidationError::new(
                format!("{field}.long_context.{what}"),
                format!("must be a number from 0 to {MAX_TIER_MULTIPLIER}"),
            ));
        }
        *multiplier += 0.0;
    }
    Ok(())
}

impl ModelRoute {
    pub fn from_proto(model: &pb::ModelRoute) -> Self {
        Self {
            name: model.name.clone(),
            upstream_name: model.upstream_name.clone(),
            input_price_per_mtok: model.input_price_per_mtok,
            output_price_per_mtok: model.output_price_per_mtok,
            cached_input_price_per_mtok: model.cached_input_price_per_mtok,
            cache_write_price_per_mtok: model.cache_write_price_per_mtok,
            default_max_tokens: model.default_max_tokens,
            max_output_tokens: model.max_output_tokens,
            tier_multipliers: model
                .tier_multipliers
                .iter()
                .map(|t| (t.tier.clone(), t.multiplier))
                .collect(),
            long_context: model.long_context.map(|l| LongContextPrices {
                above_prompt_tokens: l.above_prompt_tokens,
                input_multiplier: l.input_multiplier,
                output_multiplier: l.output_multiplier,
            }),
            call_prices: model
                .call_prices
                .iter()
                .map(|c| (c.tool.clone(), c.price_per_thousand_calls))
                .collect(),
            audio_input_price_per_mtok: model.audio_input_price_per_mtok,
            audio_output_price_per_mtok: model.audio_output_price_per_mtok,
        }
    }

    pub fn to_proto(&self) -> pb::ModelRoute {
        pb::ModelRoute {
            name: self.name.clone(),
            upstream_name: self.upstream_name.clone(),
            input_price_per_mtok: self.input_price_per_mtok,
            output_price_per_mtok: self.output_price_per_mtok,
            cached_input_price_per_mtok: self.cached_input_price_per_mtok,
            cache_write_price_per_mtok: self.cache_write_price_per_mtok,
            default_max_tokens: self.default_max_tokens,
            max_output_tokens: self.max_output_tokens,
            tier_multipliers: self
                .tier_multipliers
                .iter()
                .map(|(tier, multiplier)| pb::TierMultiplier {
                    tier: tier.clone(),
                    multiplier: *multiplier,
                })
                .collect(),
            long_context: self.long_context.map(|l| pb::LongContextPrices {
                above_prompt_tokens: l.above_prompt_tokens,
                input_multiplier: l.input_multiplier,
                output_multiplier: l.output_multiplier,
            }),
            call_prices: self
                .call_prices
                .iter()
                .map(|(tool, price)| pb::CallPrice {
                    tool: tool.clone(),
                    price_per_thousand_calls: *price,
                })
                .collect(),
            audio_input_price_per_mtok: self.audio_input_price_per_mtok,
            audio_output_price_per_mtok: self.audio_output_price_per_mtok,
        }
    }
}

impl Backend {
    pub fn to_proto(&self) -> pb::Backend {
        let spec = &self.spec;
        let mut backend = pb::Backend {
            id: self.id.clone(),
            name: spec.name.clone(),
            base_url: spec.base_url.clone(),
            pool: pb::Pool::from(spec.pool) as i32,
            priority: spec.priority,
            weight: spec.weight,
            models: spec.models.iter().map(ModelRoute::to_proto).collect(),
            rpm_limit: spec.rpm_limit,
            tpm_limit: spec.tpm_limit,
            enabled: spec.enabled,
            api_key_hint: self.api_key_hint.clone(),
            create_time: Some(crate::time::timestamp(self.create_time_ms)),
            update_time: Some(crate::time::timestamp(self.update_time_ms)),
            responses_api: spec.responses_api,
            api_format: spec.api_format.to_proto() as i32,
            anthropic_version: spec.anthropic_version.clone(),
            key_header: spec.key_header.to_proto() as i32,
            etag: String::new(),
        };
        // What changes whenever anything else the API shows does: the first 128 bits of the
        // SHA-256 of the answer without it, in hex (prost writes a message's fields in one
        // order, so the same backend always gives the same bytes).
        let digest = sha2::Sha256::digest(prost::Message::encode_to_vec(&backend));
        backend.etag = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        backend
    }

    /// See [`pb::Backend::etag`].
    pub fn etag(&self) -> String {
        self.to_proto().etag
    }
}

/// Whether two base URLs have one origin: scheme, host and port (a default port written or
/// not). A provider key given for one origin is sent to no other without being given again.
pub fn same_origin(a: &str, b: &str) -> bool {
    match (url::Url::parse(a), url::Url::parse(b)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

/// The names the data planes' metrics (`backend`, `model` labels) and the usage statistics
/// give what no backend or route is: a request that reached no backend (`none`), a model no
/// route serves (`other`). A backend or route of such a name would be counted with them.
const RESERVED_LABELS: [&str; 2] = ["none", "other"];

/// How many routes a refusal of [`BackendSpec::check_clearing`] names before it counts the rest.
const ROUTES_NAMED: usize = 10;

/// Parts of query parameter names that carry a credential (compared lowercased, without `-`
/// and `_`): Google's `key`, Azure API Management's `subscription-key`, `access_token`, a
/// presigned URL's `X-Amz-Signature` or `X-Amz-Credential`, … A base URL is shown in every
/// listing and log line; the API key has its own, write-only field.
const CREDENTIAL_PARTS: [&str; 8] = [
    "key",
    "token",
    "secret",
    "password",
    "signature",
    "credential",
    "auth",
    "session",
];
/// Whole names of query parameters that carry a credential: a SAS's `sig`, OAuth's `code`.
const CREDENTIAL_NAMES: [&str; 3] = ["sig", "code", "pwd"];

/// Whether a query parameter named `name` may carry a credential.
fn names_a_credential(name: &str) -> bool {
    let name: String = name
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | '.'))
        .collect::<String>()
        .to_lowercase();
    CREDENTIAL_PARTS.iter().any(|part| name.contains(part)) || CREDENTIAL_NAMES.contains(&&*name)
}

/// An http(s) URL with a host, no fragment or credentials, not ending with an endpoint's
/// path; a trailing `/` is dropped. It may have a query (Azure OpenAI's `api-version`), which
/// the data planes keep after each endpoint's path, but none naming a credential.
fn normalize_base_url(raw: &str) -> Result<String, ValidationError> {
    let field = "backend.base_url";
    let bad = |why: &str| ValidationError::new(field, why.to_owned());
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(bad("must not be empty"));
    }
    let mut url = url::Url::parse(raw).map_err(|e| {
        bad(&format!(
            "not a valid URL ({e}); expected e.g. https://api.openai.com/v1"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("must use http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("must have a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "must not contain credentials; give the API key separately",
        ));
    }
    if url.fragment().is_some() {
        return Err(bad("must not have a fragment"));
    }
    // `;` separates pairs too for some servers: every pair either way is looked at.
    let pairs = url.query().unwrap_or_default().replace(';', "&");
    if let Some((name, _)) =
        url::form_urlencoded::parse(pairs.as_bytes()).find(|(name, _)| names_a_credential(name))
    {
        return Err(bad(&format!(
            "must not carry a credential in its query ({name:?}): a base URL is shown in \
             listings and logs; give the API key separately (--key-header picks its header)"
        )));
    }
    let query = url.query().filter(|q| !q.is_empty()).map(str::to_owned);
    url.set_query(None);
    let base = url.as_str().trim_end_matches('/');
    // The data planes append the endpoint's path: a URL copied with it already in place
    // (`…/v1/chat/completions`) sent every request to `…/chat/completions/chat/completions`,
    // whose 404 went to clients as it came, with no failover and no cooldown.
    if let Some(endpoint) = sluice_domain::endpoint::ALL
        .iter()
        .find(|p| base.ends_with(*p))
    {
        return Err(bad(&format!(
            "must be the API's base, without the endpoint's path ({endpoint}): the data planes \
             add it; e.g. https://api.openai.com/v1"
        )));
    }
    let normalized = match &query {
        Some(query) => format!("{base}?{query}"),
        None => base.to_owned(),
    };
    if normalized.len() > MAX_BASE_URL_BYTES {
        return Err(bad(&format!("must be at most {MAX_BASE_URL_BYTES} bytes")));
    }
    // The data planes write their upstream requests' URIs with `http`, which takes fewer
    // characters in a host than `url` does (`{`, `}`, `"`, a backtick): a URL it refuses
    // would make every replica refuse every snapshot from then on (snapshot.rs, `joined_uri`).
    let longest = match &query {
        Some(query) => format!("{base}/messages/count_tokens?{query}"),
        None => format!("{base}/messages/count_tokens"),
    };
    if http::Uri::try_from(longest).is_err() {
        return Err(bad(
            "has characters a request URI cannot carry (`{`, `}`, `\"`, a backtick in the \
             host: a placeholder such as {resource} left in it?)",
        ));
    }
    Ok(normalized)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// `none` and `other` are what the metrics and statistics call a request that reached no
    /// backend and a model no route serves: a backend or route named so was counted with them.
    #[test]
    fn the_names_metrics_give_nothing_are_refused() {
        for name in ["none", "other"] {
            let err = BackendSpec {
                name: name.into(),
                ..spec()
            }
            .validated()
            .unwrap_err();
            assert_eq!(err.field, "backend.name", "{err}");
            let mut route = spec();
            route.models[0].name = name.into();
            let err = route.validated().unwrap_err();
            assert_eq!(err.field, "backend.models[0].name", "{err}");
        }
        for name in ["None", "others", "none-eu"] {
            let mut spec = BackendSpec {
                name: name.into(),
                ..spec()
            };
            spec.models[0].name = name.into();
            assert!(spec.validated().is_ok(), "{name}");
        }
    }

    fn spec() -> BackendSpec {
        BackendSpec {
            anthropic_version: Default::default(),
            api_format: Default::default(),
            key_header: Default::default(),
            name: "openai-main".into(),
            base_url: "https://api.openai.com/v1/".into(),
            pool: Pool::Primary,
            priority: 10,
            weight: 0,
            models: vec![ModelRoute {
                default_max_tokens: Default::default(),
                max_output_tokens: Default::default(),
                name: "gpt-4o-mini".into(),
                upstream_name: String::new(),
                input_price_per_mtok: 0.15,
                output_price_per_mtok: 0.6,
                ..Default::default()
            }],
            rpm_limit: 500,
            tpm_limit: 0,
            enabled: true,
            responses_api: None,
        }
    }

    #[test]
    fn normalises_what_is_plain() {
        let s = spec().validated().unwrap();
        assert_eq!(s.base_url, "https://api.openai.com/v1");
        assert_eq!(s.weight, 1);
        assert_eq!(s.models[0].upstream_name, "gpt-4o-mini");
    }

    #[test]
    fn api_keys_must_fit_a_header() {
        assert!(check_api_key("api_key", "").is_ok());
        assert!(check_api_key("api_key", "sk-proj-AbC_123.x").is_ok());
        for bad in [
            "sk a",
            "sk\r\nx-evil: 1",
            "clé",
            &"k".repeat(MAX_API_KEY_BYTES + 1),
        ] {
            let err = check_api_key("api_key", bad).unwrap_err();
            assert_eq!(err.field, "api_key");
        }
        let long = format!("https://h/{}", "p".repeat(MAX_BASE_URL_BYTES));
        let err = BackendSpec {
            base_url: long,
            ..spec()
        }
        .validated()
        .unwrap_err();
        assert!(err.message.contains("at most"), "{err}");
    }

    #[test]
    fn refuses_bad_urls_with_the_field_named() {
        for url in [
            "",
            "ftp://x",
            "not a url",
            "https://user:pw@host/v1",
            "http://h/v1#x",
            "unix:/tmp/s",
            // A credential in the query would be shown in every listing and log line.
            "https://generativelanguage.googleapis.com/v1beta/openai?key=AIza",
            "https://apim.example/openai?api-version=1&subscription-key=s",
            "https://h/v1?API_KEY=k",
            "https://h/v1?access-token=t",
            "https://h/v1?api_token=t",
            "https://h/v1?X-Amz-Signature=abc&X-Amz-Credential=c",
            "https://h/v1?code=c",
            "https://h/v1?a=1;apikey=k",
            "https://h/v1?x;key=secret",
            "https://h/v1?x-api-key=k",
            "https://h/openai/deployments/d/chat/completions?api-version=2024-10-21",
            // `url` takes these hosts, `http` (the data planes' request URIs) does not.
            "https://{resource}.openai.azure.com/openai/v1",
            "https://a\"b.example/v1",
            "https://a%7Bb.example/v1",
            "https://a`b.example/v1",
            // The endpoint's path is the data planes' to add.
            "https://api.openai.com/v1/chat/completions",
            "https://api.anthropic.com/v1/messages/",
            "http://localhost:8000/v1/embeddings",
            "https://api.anthropic.com/v1/messages/count_tokens",
            "https://api.openai.com/v1/responses/compact",
            "https://api.openai.com/v1/responses/input_tokens",
        ] {
            let err = BackendSpec {
                base_url: url.into(),
                ..spec()
            }
            .validated()
            .unwrap_err();
            assert_eq!(err.field, "backend.base_url", "{url}: {err}");
        }
    }

    /// Azure OpenAI's deployments take their API version in the query: it is kept (the data
    /// planes put it after each endpoint's path), the path's trailing `/` dropped before it.
    #[test]
    fn a_query_is_kept_after_the_path() {
        for (given, kept) in [
            (
                "https://r.openai.azure.com/openai/deployments/gpt-4o/?api-version=2024-10-21",
                "https://r.openai.azure.com/openai/deployments/gpt-4o?api-version=2024-10-21",
            ),
            ("http://h:8000/v1?", "http://h:8000/v1"),
            // Azure AI Foundry's models inference endpoint: its path is the base.
            (
                "https://r.services.ai.azure.com/models/?api-version=2024-05-01-preview",
                "https://r.services.ai.azure.com/models?api-version=2024-05-01-preview",
            ),
            ("http://h/v1?a=1&b=x%20y", "http://h/v1?a=1&b=x%20y"),
        ] {
            let spec = BackendSpec {
                base_url: given.into(),
                ..spec()
            }
            .validated()
            .unwrap();
            assert_eq!(spec.base_url, kept);
        }
        let err = BackendSpec {
            base_url: "https://h/v1?Api-Key=sk-live".into(),
            ..spec()
        }
        .validated()
        .unwrap_err();
        assert!(!err.message.contains("sk-live"), "{err}");
    }

    #[test]
    fn refuses_bad_models() {
        let err = BackendSpec {
            models: vec![],
            ..spec()
        }
        .validated()
        .unwrap_err();
        assert_eq!(err.field, "backend.models");
        let mut dup = spec();
        dup.models.push(dup.models[0].clone());
        assert!(dup.validated().unwrap_err().message.contains("twice"));
        let mut negative = spec();
        negative.models[0].output_price_per_mtok = -1.0;
        assert_eq!(
            negative.validated().unwrap_err().field,
            "backend.models[0].output_price_per_mtok"
        );
        let mut nan = spec();
        nan.models[0].input_price_per_mtok = f64::NAN;
        assert!(nan.validated().is_err());
        // So large that a token's price in nano-units is infinite, and a request with none
        // of some kind of token (0 × ∞) would cost nothing.
        let mut absurd = spec();
        absurd.models[0].output_price_per_mtok = 1e306;
        assert_eq!(
            absurd.validated().unwrap_err().field,
            "backend.models[0].output_price_per_mtok"
        );
        let mut dearest = spec();
        dearest.models[0].output_price_per_mtok = MAX_PRICE_PER_MTOK;
        assert!(dearest.validated().is_ok());
        // -0 (`--model gpt::-0:1`) is stored as 0, not listed as a price of "-0".
        let mut signed = spec();
        signed.models[0].input_price_per_mtok = -0.0;
        signed.models[0].cache_write_price_per_mtok = Some(-0.0);
        let signed = signed.validated().unwrap();
        assert_eq!(signed.models[0].input_price_per_mtok.to_string(), "0");
        assert_eq!(
            signed.models[0]
                .cache_write_price_per_mtok
                .map(|p| p.to_string()),
            Some("0".into())
        );
        let mut cached = spec();
        cached.models[0].cached_input_price_per_mtok = Some(-0.5);
        assert_eq!(
            cached.clone().validated().unwrap_err().field,
            "backend.models[0].cached_input_price_per_mtok"
        );
        cached.models[0].cached_input_price_per_mtok = Some(0.075);
        assert!(cached.validated().is_ok());
        let mut writes = spec();
        writes.models[0].cache_write_price_per_mtok = Some(f64::NAN);
        assert_eq!(
            writes.clone().validated().unwrap_err().field,
            "backend.models[0].cache_write_price_per_mtok"
        );
        writes.models[0].cache_write_price_per_mtok = Some(3.75);
        assert!(writes.validated().is_ok());
        for (input, output, field) in [
            (Some(-1.0), None, "audio_input_price_per_mtok"),
            (None, Some(f64::NAN), "audio_output_price_per_mtok"),
            (None, Some(1e306), "audio_output_price_per_mtok"),
        ] {
            let mut audio = spec();
            audio.models[0].audio_input_price_per_mtok = input;
            audio.models[0].audio_output_price_per_mtok = output;
            assert_eq!(
                audio.validated().unwrap_err().field,
                format!("backend.models[0].{field}")
            );
        }
        let mut audio = spec();
        audio.models[0].audio_input_price_per_mtok = Some(-0.0);
        audio.models[0].audio_output_price_per_mtok = Some(64.0);
        let audio = audio.validated().unwrap();
        assert_eq!(
            audio.models[0]
                .audio_input_price_per_mtok
                .map(|p| p.to_string()),
            Some("0".into())
        );
    }

    #[test]
    fn a_long_context_band_starts_past_a_token_and_is_bounded() {
        let with = |above, input: f64, output: f64| {
            let mut spec = spec();
            spec.models[0].long_context = Some(LongContextPrices {
                above_prompt_tokens: above,
                input_multiplier: input,
                output_multiplier: output,
            });
            spec.validated()
        };
        let ok = with(200_000, 2.0, -0.0).unwrap();
        assert_eq!(
            ok.models[0]
                .long_context
                .map(|l| l.output_multiplier.to_string()),
            Some("0".into())
        );
        for (above, input, output, field) in [
            (0, 2.0, 1.5, "above_prompt_tokens"),
            (MAX_LONG_CONTEXT_ABOVE + 1, 2.0, 1.5, "above_prompt_tokens"),
            (1, f64::NAN, 1.5, "input_multiplier"),
            (1, 2.0, 101.0, "output_multiplier"),
            (1, -1.0, 1.5, "input_multiplier"),
        ] {
            assert_eq!(
                with(above, input, output).unwrap_err().field,
                format!("backend.models[0].long_context.{field}")
            );
        }
    }

    #[test]
    fn priced_tools_are_named_as_answers_count_them_and_bounded() {
        let with = |prices: &[(&str, f64)]| {
            let mut spec = spec();
            spec.models[0].call_prices =
                prices.iter().map(|(t, p)| ((*t).to_owned(), *p)).collect();
            spec.validated()
        };
        // Trimmed, and a tool at 0 (what a tool not listed costs) dropped.
        let ok = with(&[
            (" web_search ", 10.0),
            ("web_fetch", 0.0),
            ("file_search", 2.5),
        ])
        .unwrap();
        assert_eq!(
            ok.models[0].call_prices,
            [
                ("web_search".to_owned(), 10.0),
                ("file_search".to_owned(), 2.5)
            ]
        );
        for (prices, field, message) in [
            (
                &[("Web", 10.0)][..],
                "backend.models[0].call_prices[0].tool",
                "a tool is named by",
            ),
            (
                &[("web_search", 10.0), ("web_search", 25.0)],
                "backend.models[0].call_prices[1].tool",
                "listed twice",
            ),
            (
                &[("web_search", -1.0)],
                "backend.models[0].call_prices[0].price_per_thousand_calls",
                "from 0 to 1000000",
            ),
            (
                &[("web_search", f64::INFINITY)],
                "backend.models[0].call_prices[0].price_per_thousand_calls",
                "from 0 to 1000000",
            ),
        ] {
            let error = with(prices).unwrap_err();
            assert_eq!(error.field, field, "{prices:?}");
            assert!(error.message.contains(message), "{error:?}");
        }
        let names: Vec<String> = (0..=MAX_CALL_PRICES).map(|i| format!("t{i}")).collect();
        let many: Vec<(&str, f64)> = names.iter().map(|n| (n.as_str(), 1.0)).collect();
        assert!(with(&many[..MAX_CALL_PRICES]).is_ok());
        let error = with(&many).unwrap_err();
        assert_eq!(error.field, "backend.models[0].call_prices");
        assert!(error.message.contains("at most 8 tools"), "{error:?}");
    }

    #[test]
    fn price_tiers_are_named_as_answers_report_them_and_bounded() {
        let with = |tiers: &[(&str, f64)]| {
            let mut spec = spec();
            spec.models[0].tier_multipliers =
                tiers.iter().map(|(t, m)| ((*t).to_owned(), *m)).collect();
            spec.validated()
        };
        let ok = with(&[
            (" priority ", 2.0),
            ("flex", 0.5),
            ("us", 1.0),
            ("free", -0.0),
        ])
        .unwrap();
        // Trimmed, -0 stored as 0, and a tier at 1 (the route's prices) dropped.
        assert_eq!(
            ok.models[0].tier_multipliers,
            [
                ("priority".to_owned(), 2.0),
                ("flex".to_owned(), 0.5),
                ("free".to_owned(), 0.0)
            ]
        );
        assert_eq!(ok.models[0].tier_multipliers[2].1.to_string(), "0");
        for (tiers, field) in [
            (
                &[("Priority", 2.0)][..],
                "backend.models[0].tier_multipliers[0].tier",
            ),
            (&[("", 2.0)], "backend.models[0].tier_multipliers[0].tier"),
            (
                &[("a b", 2.0)],
                "backend.models[0].tier_multipliers[0].tier",
            ),
            (
                &[("fast", 2.0), ("fast", 3.0)],
                "backend.models[0].tier_multipliers[1].tier",
            ),
            (
                &[("fast", f64::NAN)],
                "backend.models[0].tier_multipliers[0].multiplier",
            ),
            (
                &[("fast", -1.0)],
                "backend.models[0].tier_multipliers[0].multiplier",
            ),
            (
                &[("fast", 101.0)],
                "backend.models[0].tier_multipliers[0].multiplier",
            ),
        ] {
            assert_eq!(with(tiers).unwrap_err().field, field, "{tiers:?}");
        }
        let long = "t".repeat(MAX_TIER_NAME_BYTES);
        assert!(with(&[(&long, 2.0)]).is_ok());
        let longer = "t".repeat(MAX_TIER_NAME_BYTES + 1);
        assert!(with(&[(&longer, 2.0)]).is_err());
        let names: Vec<String> = (0..=MAX_PRICE_TIERS).map(|i| format!("t{i}")).collect();
        let many: Vec<(&str, f64)> = names.iter().map(|n| (n.as_str(), 2.0)).collect();
        assert!(with(&many[..MAX_PRICE_TIERS]).is_ok());
        assert_eq!(
            with(&many).unwrap_err().field,
            "backend.models[0].tier_multipliers"
        );
    }

    #[test]
    fn names_allow_any_printable_text_but_not_control_characters() {
        let s = BackendSpec {
            name: "<img src=x onerror=alert(1)>".into(),
            ..spec()
        };
        assert!(s.validated().is_ok());
        assert!(
            BackendSpec {
                name: "a\nb".into(),
                ..spec()
            }
            .validated()
            .is_err()
        );
        assert!(
            BackendSpec {
                name: "  ".into(),
                ..spec()
            }
            .validated()
            .is_err()
        );
        assert!(
            BackendSpec {
                name: "x".repeat(65),
                ..spec()
            }
            .validated()
            .is_err()
        );
    }

    #[test]
    fn mask_changes_only_named_fields() {
        let mut s = spec();
        let update = pb::Backend {
            priority: 99,
            rpm_limit: 7,
            ..Default::default()
        };
        s.apply_mask(&update, &["priority".into()]).unwrap();
        assert_eq!(s.priority, 99);
        assert_eq!(s.rpm_limit, 500);
        assert!(s.apply_mask(&update, &["api_key_hint".into()]).is_err());
    }
}
