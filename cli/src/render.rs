//! How responses are printed: tables for people, the proto3 JSON mapping of
//! the whole response for scripts (`-o json`).

use std::io::Write;
use std::time::SystemTime;

use comfy_table::{CellAlignment, Table, presets};
use serde::Serialize;
use sluice_proto::v1 as pb;

use crate::args::OutputFormat;
use crate::error::Error;
use crate::time;

/// Prints responses in the format the user chose.
pub struct Output {
    format: OutputFormat,
}

impl Output {
    pub fn new(format: OutputFormat) -> Self {
        Self { format }
    }

    /// Whether the response is printed as JSON (not a table).
    pub fn is_json(&self) -> bool {
        self.format == OutputFormat::Json
    }

    /// Prints `response` as JSON, or what `table` makes of it.
    pub fn print<T: Serialize>(
        &self,
        response: &T,
        table: impl FnOnce(&T) -> String,
    ) -> Result<(), Error> {
        let text = match self.format {
            OutputFormat::Json => serde_json::to_string_pretty(response)
                .map_err(|err| Error::Output(err.to_string()))?,
            OutputFormat::Table => table(response),
        };
        write_stdout(&text)
    }
}

fn write_stdout(text: &str) -> Result<(), Error> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{}", text.trim_end()).and_then(|()| stdout.flush()) {
        // `sluicectl backend list | head -1` is not an error.
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::Output(err.to_string()))
        }
        _ => Ok(()),
    }
}

/// Text from the server as it may be shown: a name, model or error a client or replica
/// sent can hold control characters (a newline, an ANSI escape that repaints the
/// terminal); they are shown escaped.
fn shown(text: String) -> String {
    match sluice_domain::text::escape_control(&text) {
        std::borrow::Cow::Borrowed(_) => text,
        std::borrow::Cow::Owned(escaped) => escaped,
    }
}

/// Columns separated by spaces under upper-case headers, like `kubectl get`.
fn grid(header: &[&str], rows: Vec<Vec<String>>, right_aligned: &[usize]) -> String {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(header.to_vec());
    table.add_rows(
        rows.into_iter()
            .map(|row| row.into_iter().map(shown).collect::<Vec<_>>()),
    );
    for (index, column) in table.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        if right_aligned.contains(&index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    table.trim_fmt()
}

/// One `label  value` line per field.
fn fields(rows: Vec<(&str, String)>) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING);
    table.add_rows(
        rows.into_iter()
            .map(|(label, value)| vec![label.to_owned(), shown(value)]),
    );
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table.trim_fmt()
}

fn pool(pool: i32) -> String {
    match pb::Pool::try_from(pool) {
        Ok(pb::Pool::Primary) => "primary".to_owned(),
        Ok(pb::Pool::Fallback) => "fallback".to_owned(),
        Ok(pb::Pool::Unspecified) => "-".to_owned(),
        Err(_) => pool.to_string(),
    }
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

/// A limit, `-` for none (0).
fn limit(value: u32) -> String {
    if value == 0 {
        "-".to_owned()
    } else {
        value.to_string()
    }
}

fn key_hint(hint: &str) -> String {
    if hint.is_empty() {
        "-".to_owned()
    } else {
        format!("…{hint}")
    }
}

/// `2025-01-31T12:00:00Z (3m ago)`.
fn when(timestamp: Option<&sluice_proto::wkt::Timestamp>, now: SystemTime) -> String {
    match timestamp {
        Some(_) => format!(
            "{} ({})",
            time::absolute(timestamp),
            time::relative(timestamp, now)
        ),
        None => "-".to_owned(),
    }
}

/// A cost with its currency: `1.2345 USD`; money too small for four decimals with three
/// significant digits (`0.0000300 USD`), not as none.
fn cost(value: f64, currency: &str) -> String {
    let decimals = match value {
        v if v > 0.0 && v < 0.0001 => (-v.log10()).ceil() as usize + 2,
        _ => 4,
    };
    with_currency(format!("{value:.decimals$}"), currency)
}

fn millis(value: f64) -> String {
    if value > 0.0 {
        format!("{value:.0}ms")
    } else {
        "-".to_owned()
    }
}

fn percent(value: f64) -> String {
    format!("{:.1}%", value * 100.0)
}

/// `backend list`.
pub fn backends(response: &pb::ListBackendsResponse) -> String {
    if response.backends.is_empty() {
        return "No backends.".to_owned();
    }
    let rows = response
        .backends
        .iter()
        .map(|backend| {
            vec![
                backend.name.clone(),
                backend.id.clone(),
                pool(backend.pool),
                backend.priority.to_string(),
                backend.weight.to_string(),
                backend
                    .models
                    .iter()
                    .map(|model| model.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                limit(backend.rpm_limit),
                limit(backend.tpm_limit),
                yes_no(backend.enabled),
                key_hint(&backend.api_key_hint),
            ]
        })
        .collect();
    grid(
        &[
            "NAME", "ID", "POOL", "PRIORITY", "WEIGHT", "MODELS", "RPM", "TPM", "ENABLED", "KEY",
        ],
        rows,
        &[3, 4, 6, 7],
    )
}

/// The API a backend speaks, with its `anthropic-version` when it is Anthropic's.
fn api_format(backend: &pb::Backend) -> String {
    match pb::ApiFormat::try_from(backend.api_format) {
        Ok(pb::ApiFormat::Anthropic) if backend.anthropic_version.is_empty() => {
            "anthropic (default anthropic-version)".to_owned()
        }
        Ok(pb::ApiFormat::Anthropic) => {
            format!(
                "anthropic (anthropic-version {})",
                backend.anthropic_version
            )
        }
        Ok(pb::ApiFormat::Unspecified | pb::ApiFormat::Openai) => "openai".to_owned(),
        // Newer than this sluicectl: not OpenAI's.
        Err(_) => format!("unknown ({})", backend.api_format),
    }
}

/// The header a backend's API key goes in, and whether that is its API format's own.
fn key_header(backend: &pb::Backend) -> String {
    match pb::KeyHeader::try_from(backend.key_header) {
        Ok(pb::KeyHeader::Unspecified) => {
            if backend.api_format == pb::ApiFormat::Anthropic as i32 {
                "x-api-key (default)".to_owned()
            } else {
                "Authorization: Bearer (default)".to_owned()
            }
        }
        Ok(pb::KeyHeader::Bearer) => "Authorization: Bearer".to_owned(),
        Ok(pb::KeyHeader::XApiKey) => "x-api-key".to_owned(),
        Ok(pb::KeyHeader::ApiKey) => "api-key".to_owned(),
        Err(_) => format!("unknown ({})", backend.key_header),
    }
}

/// `backend get`, `add`, `update`, `enable`, `disable`: the fields, then the models.
pub fn backend(backend: Option<&pb::Backend>) -> String {
    let Some(backend) = backend else {
        return "The control plane returned no backend.".to_owned();
    };
    let now = SystemTime::now();
    let summary = fields(vec![
        ("name", backend.name.clone()),
        ("id", backend.id.clone()),
        ("base url", backend.base_url.clone()),
        ("pool", pool(backend.pool)),
        ("priority", backend.priority.to_string()),
        ("weight", backend.weight.to_string()),
        ("rpm limit", limit(backend.rpm_limit)),
        ("tpm limit", limit(backend.tpm_limit)),
        ("enabled", yes_no(backend.enabled)),
        ("api format", api_format(backend)),
        (
            "responses api",
            match backend.responses_api {
                Some(on) => yes_no(on),
                // An Anthropic backend has no Responses API.
                None => format!(
                    "{} (default)",
                    yes_no(backend.api_format != pb::ApiFormat::Anthropic as i32)
                ),
            },
        ),
        ("api key", key_hint(&backend.api_key_hint)),
        ("key header", key_header(backend)),
        ("created", when(backend.create_time.as_ref(), now)),
        ("updated", when(backend.update_time.as_ref(), now)),
    ]);
    // The max_tokens sent when a client gives none matters only to an Anthropic backend
    // (`backend update --model NAME` keeps it, so it is shown where it applies).
    let anthropic = backend.api_format == pb::ApiFormat::Anthropic as i32;
    let mut header = vec![
        "MODEL",
        "UPSTREAM",
        "INPUT /MTOK",
        "CACHED /MTOK",
        "CACHE WRITE /MTOK",
        "OUTPUT /MTOK",
    ];
    if anthropic {
        header.push("DEFAULT MAX TOKENS");
    }
    // Price tiers are shown when a route has any (`--tier`'s form: `priority=2,flex=0.5`).
    let tiered = backend
        .models
        .iter()
        .any(|model| !model.tier_multipliers.is_empty());
    if tiered {
        header.push("PRICE TIERS");
    }
    // A long-context band likewise (`--long-context`'s form without the model:
    // `272000:2:1.5`, past 272,000 prompt tokens at 2 times the input and 1.5 the output).
    let banded = backend
        .models
        .iter()
        .any(|model| model.long_context.is_some());
    if banded {
        header.push("LONG CONTEXT");
    }
    // Tools' prices likewise (`--call-price`'s form: `web_search=10`, per 1,000 calls).
    let calls_priced = backend
        .models
        .iter()
        .any(|model| !model.call_prices.is_empty());
    if calls_priced {
        header.push("CALL PRICES /1K");
    }
    // Audio's prices likewise (`--audio-price`'s form: `32/64`, the text's where unset).
    let audio_priced = backend.models.iter().any(|model| {
        model.audio_input_price_per_mtok.is_some() || model.audio_output_price_per_mtok.is_some()
    });
    if audio_priced {
        header.push("AUDIO IN/OUT");
    }
    // The cap of translated requests' output likewise (`--max-output-tokens`).
    let output_capped = backend
        .models
        .iter()
        .any(|model| model.max_output_tokens > 0);
    if output_capped {
        header.push("MAX OUTPUT");
    }
    let models = grid(
        &header,
        backend
            .models
            .iter()
            .map(|model| {
                let mut row = vec![
                    model.name.clone(),
                    model.upstream_name.clone(),
                    model.input_price_per_mtok.to_string(),
                    model
                        .cached_input_price_per_mtok
                        .unwrap_or(model.input_price_per_mtok)
                        .to_string(),
                    model
                        .cache_write_price_per_mtok
                        .unwrap_or(model.input_price_per_mtok)
                        .to_string(),
                    model.output_price_per_mtok.to_string(),
                ];
                if anthropic {
                    row.push(match model.default_max_tokens {
                        0 => "default".to_owned(),
                        n => n.to_string(),
                    });
                }
                if tiered {
                    row.push(named_list(
                        model
                            .tier_multipliers
                            .iter()
                            .map(|t| (&*t.tier, t.multiplier)),
                    ));
                }
                if banded {
                    row.push(model.long_context.map_or("-".to_owned(), |l| {
                        format!(
                            "{}:{}:{}",
                            l.above_prompt_tokens, l.input_multiplier, l.output_multiplier
                        )
                    }));
                }
                if calls_priced {
                    row.push(named_list(
                        model
                            .call_prices
                            .iter()
                            .map(|c| (&*c.tool, c.price_per_thousand_calls)),
                    ));
                }
                if audio_priced {
                    row.push(format!(
                        "{}/{}",
                        model
                            .audio_input_price_per_mtok
                            .unwrap_or(model.input_price_per_mtok),
                        model
                            .audio_output_price_per_mtok
                            .unwrap_or(model.output_price_per_mtok)
                    ));
                }
                if output_capped {
                    row.push(match model.max_output_tokens {
                        0 => "-".to_owned(),
                        n => n.to_string(),
                    });
                }
                row
            })
            .collect(),
        // The prices, and the default max tokens when shown; not the tiers' text.
        &[2, 3, 4, 5, 6][..if anthropic { 5 } else { 4 }],
    );
    format!("{summary}\n\n{models}")
}

/// `name=value` pairs as the flags take them (`priority=2,flex=0.5`); `-` for none.
fn named_list<'a>(pairs: impl Iterator<Item = (&'a str, f64)>) -> String {
    let pairs: Vec<String> = pairs
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    match pairs.is_empty() {
        true => "-".to_owned(),
        false => pairs.join(","),
    }
}

/// `key list`; spend in `currency`, the settings' currency of every cost.
pub fn client_keys(response: &pb::ListClientKeysResponse, currency: &str) -> String {
    if response.client_keys.is_empty() {
        return "No client keys.".to_owned();
    }
    let now = SystemTime::now();
    let rows = response
        .client_keys
        .iter()
        .map(|key| {
            vec![
                key.name.clone(),
                key.id.clone(),
                format!("{}…", key.key_prefix),
                allowed_models(&key.allowed_models),
                limit(key.rpm_limit),
                limit(key.tpm_limit),
                limit(key.max_parallel_requests),
                spend_of(key, currency),
                key_status(key, now),
                time::relative(key.create_time.as_ref(), now),
            ]
        })
        .collect();
    grid(
        &[
            "NAME", "ID", "PREFIX", "MODELS", "RPM", "TPM", "PARALLEL", "SPEND", "STATUS",
            "CREATED",
        ],
        rows,
        &[4, 5, 6, 7],
    )
}

/// Active, revoked, expired, or when it will expire.
fn key_status(key: &pb::ClientKey, now: SystemTime) -> String {
    if key.revoked {
        format!("revoked {}", time::relative(key.revoke_time.as_ref(), now))
    } else if key.expired {
        format!("expired {}", time::relative(key.expire_time.as_ref(), now))
    } else if key.expire_time.is_some() {
        format!("expires {}", time::relative(key.expire_time.as_ref(), now))
    } else {
        "active".to_owned()
    }
}

/// A key's budget period as a word.
/// A budget's period; one newer than this sluicectl by its number (it is not a lifetime).
fn budget_period(period: i32) -> String {
    match pb::BudgetPeriod::try_from(period) {
        Ok(pb::BudgetPeriod::Daily) => "daily".to_owned(),
        Ok(pb::BudgetPeriod::Weekly) => "weekly".to_owned(),
        Ok(pb::BudgetPeriod::Monthly) => "monthly".to_owned(),
        Ok(pb::BudgetPeriod::Unspecified) => "lifetime".to_owned(),
        Err(_) => format!("unknown ({period})"),
    }
}

/// `0.1234 / 50 USD monthly`, or the spend alone when the key has no budget.
fn spend_of(key: &pb::ClientKey, currency: &str) -> String {
    if key.max_budget > 0.0 {
        format!(
            "{} / {} {}",
            cost(key.spend, ""),
            with_currency(key.max_budget.to_string(), currency),
            budget_period(key.budget_period)
        )
    } else {
        cost(key.spend, currency)
    }
}

/// `value` followed by `currency`, if there is one.
fn with_currency(value: String, currency: &str) -> String {
    if currency.is_empty() {
        value
    } else {
        format!("{value} {currency}")
    }
}

/// `key get` and `key update`: one field a line; money in `currency`.
pub fn client_key(key: Option<&pb::ClientKey>, currency: &str) -> String {
    let Some(key) = key else {
        return "The control plane returned no client key.".to_owned();
    };
    let now = SystemTime::now();
    fields(vec![
        ("name", key.name.clone()),
        ("id", key.id.clone()),
        ("prefix", format!("{}…", key.key_prefix)),
        ("models", allowed_models(&key.allowed_models)),
        ("rpm limit", limit(key.rpm_limit)),
        ("tpm limit", limit(key.tpm_limit)),
        ("max parallel", limit(key.max_parallel_requests)),
        ("status", key_status(key, now)),
        ("expires", when(key.expire_time.as_ref(), now)),
        (
            "budget",
            if key.max_budget > 0.0 {
                format!(
                    "{} {}",
                    with_currency(key.max_budget.to_string(), currency),
                    budget_period(key.budget_period)
                )
            } else {
                "-".to_owned()
            },
        ),
        (
            "spend",
            format!(
                "{} ({} period)",
                cost(key.spend, currency),
                budget_period(key.budget_period)
            ),
        ),
        (
            "remaining",
            if key.max_budget > 0.0 {
                cost(key.remaining_budget, currency)
            } else {
                "-".to_owned()
            },
        ),
        // Of the remaining, granted to data planes and not yet seen spent: not available to
        // a replica that asks for more.
        (
            "held by data planes",
            if key.max_budget > 0.0 {
                cost(key.held_by_data_planes, currency)
            } else {
                "-".to_owned()
            },
        ),
        ("resets", when(key.budget_reset_time.as_ref(), now)),
        ("created", when(key.create_time.as_ref(), now)),
    ])
}

fn allowed_models(models: &[String]) -> String {
    if models.is_empty() {
        "all".to_owned()
    } else {
        models.join(",")
    }
}

/// `key create`: the key on a line of its own, and that it will not be shown again.
pub fn created_client_key(response: &pb::CreateClientKeyResponse) -> String {
    let (name, id, models, rpm) = match &response.client_key {
        Some(key) => (
            key.name.as_str(),
            key.id.as_str(),
            shown(allowed_models(&key.allowed_models)),
            limit(key.rpm_limit),
        ),
        None => ("", "", "-".to_owned(), "-".to_owned()),
    };
    format!(
        "Created client key {name:?} (id {id}, models {models}, rpm {rpm}).\n\n\
         {key}\n\n\
         This is the only time the key is shown: store it now. It cannot be shown again.",
        key = response.key,
    )
}

/// `cooldown list`.
pub fn cooldowns(response: &pb::ListCooldownsResponse) -> String {
    if response.cooldowns.is_empty() {
        return "No backend is cooling down.".to_owned();
    }
    let now = SystemTime::now();
    let rows = response
        .cooldowns
        .iter()
        .map(|cooldown| {
            vec![
                cooldown.backend_name.clone(),
                cooldown.backend_id.clone(),
                match cooldown.model.as_str() {
                    "" => "(every model)".to_owned(),
                    model => model.to_owned(),
                },
                when(cooldown.until.as_ref(), now),
                cooldown.consecutive_failures.to_string(),
                cooldown.reason.clone(),
                cooldown.reported_by.clone(),
            ]
        })
        .collect();
    grid(
        &[
            "BACKEND",
            "ID",
            "MODEL",
            "UNTIL",
            "FAILURES",
            "REASON",
            "REPORTED BY",
        ],
        rows,
        &[4],
    )
}

/// `dataplane list`.
pub fn data_planes(response: &pb::ListDataPlanesResponse) -> String {
    if response.data_planes.is_empty() {
        return "No data plane has connected.".to_owned();
    }
    let now = SystemTime::now();
    let rows = response
        .data_planes
        .iter()
        .map(|node| {
            vec![
                node.node_id.clone(),
                node.hostname.clone(),
                node.peer_address.clone(),
                format!("{}/{}", node.acked_version, node.latest_version),
                if node.connected {
                    "connected"
                } else {
                    "disconnected"
                }
                .to_owned(),
                time::relative(node.last_seen_time.as_ref(), now),
                node.build_version.clone(),
                if node.last_error.is_empty() {
                    "-".to_owned()
                } else {
                    node.last_error.clone()
                },
            ]
        })
        .collect();
    grid(
        &[
            "NODE",
            "HOSTNAME",
            "PEER",
            "ACKED/LATEST",
            "STATUS",
            "LAST SEEN",
            "BUILD",
            "LAST ERROR",
        ],
        rows,
        &[3],
    )
}

/// `stream-timeout` as set, and what applies when that is below `request-timeout`: a stream
/// runs at least as long as its request may (`Policy::stream_run` in the data plane).
fn stream_timeout(s: &pb::Settings) -> String {
    let shown = time::duration(s.stream_timeout.as_ref());
    let seconds = |d: Option<&sluice_proto::wkt::Duration>| d.map(|d| (d.seconds, d.nanos));
    match (
        seconds(s.stream_timeout.as_ref()),
        seconds(s.request_timeout.as_ref()),
    ) {
        (Some(stream), Some(request)) if stream < request => format!(
            "{shown} (below request-timeout: {} applies)",
            time::duration(s.request_timeout.as_ref())
        ),
        _ => shown,
    }
}

/// `settings get` and `set`, labelled with the flag names of `settings set`.
pub fn settings(settings: Option<&pb::Settings>) -> String {
    let Some(s) = settings else {
        return "The control plane returned no settings.".to_owned();
    };
    fields(vec![
        ("max-attempts", s.max_attempts.to_string()),
        (
            "connect-timeout",
            time::duration(s.connect_timeout.as_ref()),
        ),
        (
            "first-byte-timeout",
            time::duration(s.first_byte_timeout.as_ref()),
        ),
        ("answer-timeout", time::duration(s.answer_timeout.as_ref())),
        (
            "idle-stream-timeout",
            time::duration(s.idle_stream_timeout.as_ref()),
        ),
        (
            "request-timeout",
            time::duration(s.request_timeout.as_ref()),
        ),
        ("stream-timeout", stream_timeout(s)),
        ("cooldown-base", time::duration(s.cooldown_base.as_ref())),
        ("cooldown-cap", time::duration(s.cooldown_cap.as_ref())),
        ("failure-threshold", s.failure_threshold.to_string()),
        ("retry-on-rate-limit", s.retry_on_rate_limit.to_string()),
        ("retry-on-server-error", s.retry_on_server_error.to_string()),
        (
            "retry-on-connect-error",
            s.retry_on_connect_error.to_string(),
        ),
        ("retry-on-timeout", s.retry_on_timeout.to_string()),
        ("usage-retention-days", s.usage_retention_days.to_string()),
        (
            "usage-daily-retention-days",
            s.usage_daily_retention_days.to_string(),
        ),
        ("expose-backend-header", s.expose_backend_header.to_string()),
        ("currency", s.currency.clone()),
    ])
}

/// `stats totals`, and with `--by` a table of the groups below.
pub fn totals(t: &pb::GetTotalsResponse) -> String {
    // Audio only where there was some: most gateways serve no audio model.
    let audio = t.audio_prompt_tokens > 0 || t.audio_completion_tokens > 0;
    let mut rows = vec![
        ("requests", t.request_count.to_string()),
        ("errors", t.error_count.to_string()),
        ("error rate", percent(t.error_rate)),
        ("streamed", t.stream_count.to_string()),
        ("requests estimated", t.estimated_count.to_string()),
        ("prompt tokens", t.prompt_tokens.to_string()),
        ("  of them cached", t.cached_prompt_tokens.to_string()),
        (
            "  of them written to the cache",
            t.cache_write_prompt_tokens.to_string(),
        ),
    ];
    if audio {
        rows.push(("  of them audio", t.audio_prompt_tokens.to_string()));
    }
    rows.extend([
        ("completion tokens", t.completion_tokens.to_string()),
        ("  of them reasoning", t.reasoning_tokens.to_string()),
    ]);
    if audio {
        rows.push(("  of them audio", t.audio_completion_tokens.to_string()));
    }
    rows.extend([
        ("total tokens", t.total_tokens.to_string()),
        ("cost", cost(t.cost, &t.currency)),
        ("backends", t.backend_count.to_string()),
        ("avg latency", millis(t.avg_latency_ms)),
        ("p50 latency", millis(t.p50_latency_ms)),
        ("p95 latency", millis(t.p95_latency_ms)),
        ("p99 latency", millis(t.p99_latency_ms)),
        ("avg ttft", millis(t.avg_ttft_ms)),
    ]);
    let summary = fields(rows);
    if t.groups.is_empty() {
        return summary;
    }
    format!("{summary}\n\n{}", buckets(&t.groups, false))
}

/// `stats usage`: one row per bucket (and group).
pub fn usage(response: &pb::GetUsageResponse) -> String {
    if response.buckets.is_empty() {
        return "No usage in this range.".to_owned();
    }
    let table = buckets(&response.buckets, true);
    if response.next_page_token.is_empty() {
        table
    } else {
        format!("{table}\n(more buckets follow: raise --limit to see them)")
    }
}

/// A row per bucket: its start (when `timed`), its group, its figures.
fn buckets(buckets: &[pb::UsageBucket], timed: bool) -> String {
    let grouped = !timed || buckets.iter().any(|bucket| !bucket.group_key.is_empty());
    // Grouped by backend or key: the id beside the name, the one a deleted backend's usage is
    // filtered by, and which tells a revoked key from its namesake.
    let ids = grouped
        && buckets
            .iter()
            .any(|bucket| !bucket.group_label.is_empty() && bucket.group_label != bucket.group_key);
    let rows = buckets
        .iter()
        .map(|bucket| {
            let mut row = Vec::new();
            if timed {
                row.push(time::absolute(bucket.start_time.as_ref()));
            }
            // The group of requests that had none (reached no backend: Sluice's own 429s,
            // refusals) is named so, not left blank, which shifts a reader's columns.
            let or_none = |text: &str, none: &str| match text {
                "" => none.to_owned(),
                text => text.to_owned(),
            };
            if grouped {
                row.push(match bucket.group_label.as_str() {
                    "" => or_none(&bucket.group_key, "(none)"),
                    label => label.to_owned(),
                });
            }
            if ids {
                row.push(or_none(&bucket.group_key, "-"));
            }
            row.extend([
                bucket.request_count.to_string(),
                bucket.error_count.to_string(),
                bucket.prompt_tokens.to_string(),
                bucket.completion_tokens.to_string(),
                cost(bucket.cost, &bucket.currency),
                bucket.backend_count.to_string(),
                millis(bucket.p50_latency_ms),
                millis(bucket.p95_latency_ms),
                millis(bucket.avg_ttft_ms),
            ]);
            row
        })
        .collect();
    let mut header = Vec::new();
    if timed {
        header.push("START");
    }
    if grouped {
        header.push("GROUP");
    }
    if ids {
        header.push("ID");
    }
    header.extend([
        "REQUESTS",
        "ERRORS",
        "PROMPT",
        "COMPLETION",
        "COST",
        "BACKENDS",
        "P50",
        "P95",
        "AVG TTFT",
    ]);
    let first_number = header.len() - 9;
    let right: Vec<usize> = (first_number..header.len()).collect();
    grid(&header, rows, &right)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// An enum value newer than this sluicectl is shown as unknown, by its number: a key's
    /// budget period read as "lifetime", and a backend's API as "openai", misled.
    #[test]
    fn values_newer_than_this_build_are_shown_as_unknown() {
        assert_eq!(budget_period(pb::BudgetPeriod::Monthly as i32), "monthly");
        assert_eq!(budget_period(0), "lifetime");
        assert_eq!(budget_period(9), "unknown (9)");
        let backend = |api_format| pb::Backend {
            api_format,
            ..Default::default()
        };
        assert_eq!(api_format(&backend(0)), "openai");
        assert_eq!(api_format(&backend(7)), "unknown (7)");
    }

    fn sample_backend() -> pb::Backend {
        pb::Backend {
            anthropic_version: Default::default(),
            api_format: Default::default(),
            key_header: Default::default(),
            id: "b-1".into(),
            name: "openai-main".into(),
            base_url: "https://api.openai.com/v1".into(),
            pool: pb::Pool::Primary as i32,
            priority: 10,
            weight: 1,
            models: vec![pb::ModelRoute {
                default_max_tokens: Default::default(),
                max_output_tokens: Default::default(),
                name: "gpt-4o-mini".into(),
                upstream_name: "gpt-4o-mini-2024".into(),
                input_price_per_mtok: 0.15,
                output_price_per_mtok: 0.6,
                ..Default::default()
            }],
            rpm_limit: 500,
            tpm_limit: 0,
            enabled: true,
            api_key_hint: "abcd".into(),
            create_time: None,
            update_time: None,
            responses_api: None,
            etag: String::new(),
        }
    }

    /// A stream timeout below the request timeout is shown with the one that applies.
    /// A cost too small for four decimals keeps three significant digits, not "0.0000".
    /// The group of requests that reached no backend is named, and its id cell holds a dash:
    /// a blank cell shifted the columns of a reader splitting on whitespace.
    #[test]
    fn the_group_of_none_is_named_not_blank() {
        let bucket = |key: &str, label: &str| pb::UsageBucket {
            group_key: key.into(),
            group_label: label.into(),
            request_count: 1,
            ..Default::default()
        };
        let table = buckets(&[bucket("b-1", "openai"), bucket("", "")], false);
        let none = table.lines().last().unwrap();
        let cells: Vec<&str> = none.split_whitespace().collect();
        assert_eq!(cells[..3], ["(none)", "-", "1"], "{table}");
    }

    #[test]
    fn a_small_cost_is_not_shown_as_none() {
        assert_eq!(cost(1.23456, "USD"), "1.2346 USD");
        assert_eq!(cost(0.00003, "USD"), "0.0000300 USD");
        assert_eq!(cost(0.0, "USD"), "0.0000 USD");
    }

    #[test]
    fn a_stream_timeout_below_the_request_timeout_says_which_applies() {
        let d = |seconds: i64| Some(sluice_proto::wkt::Duration { seconds, nanos: 0 });
        let line = |stream: i64| {
            let shown = settings(Some(&pb::Settings {
                request_timeout: d(600),
                stream_timeout: d(stream),
                ..Default::default()
            }));
            let line = shown
                .lines()
                .find(|l| l.starts_with("stream-timeout"))
                .unwrap();
            line.split_whitespace().collect::<Vec<_>>().join(" ")
        };
        assert_eq!(
            line(300),
            "stream-timeout 5m (below request-timeout: 10m applies)"
        );
        assert_eq!(line(3600), "stream-timeout 1h");
        assert_eq!(line(600), "stream-timeout 10m");
    }

    /// Audio lines stand under the counts they are part of, and only where there was audio.
    #[test]
    fn totals_show_audio_only_where_there_was_some() {
        let plain = pb::GetTotalsResponse {
            prompt_tokens: 10,
            completion_tokens: 5,
            ..Default::default()
        };
        assert!(!totals(&plain).contains("audio"), "{}", totals(&plain));
        let heard = pb::GetTotalsResponse {
            audio_prompt_tokens: 7,
            ..plain
        };
        let shown = totals(&heard);
        let labels: Vec<String> = shown
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|line| line.contains("tokens") || line.starts_with("of them"))
            .collect();
        assert_eq!(
            labels,
            [
                "prompt tokens 10",
                "of them cached 0",
                "of them written to the cache 0",
                "of them audio 7",
                "completion tokens 5",
                "of them reasoning 0",
                "of them audio 0",
                "total tokens 0",
            ],
            "{shown}"
        );
    }

    #[test]
    fn backend_list_has_a_row_per_backend() {
        let text = backends(&pb::ListBackendsResponse {
            backends: vec![sample_backend()],
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("NAME"), "{text}");
        for cell in [
            "openai-main",
            "b-1",
            "primary",
            "10",
            "gpt-4o-mini",
            "500",
            "yes",
            "…abcd",
        ] {
            assert!(lines[1].contains(cell), "{cell} missing in {text}");
        }
        assert_eq!(text.lines().filter(|l| l.ends_with(' ')).count(), 0);
    }

    #[test]
    fn backend_detail_shows_upstream_names_and_prices() {
        let text = backend(Some(&sample_backend()));
        assert!(text.contains("https://api.openai.com/v1"), "{text}");
        assert!(text.contains("gpt-4o-mini-2024"), "{text}");
        assert!(text.contains("0.15") && text.contains("0.6"), "{text}");
        assert!(text.contains("openai"), "{text}");
        assert!(!text.contains("PRICE TIERS"), "{text}");
        assert!(!text.contains("LONG CONTEXT"), "{text}");
    }

    #[test]
    fn a_routes_price_tiers_and_long_context_band_are_shown_as_given() {
        let mut b = sample_backend();
        let mut plain = b.models[0].clone();
        plain.name = "plain".into();
        b.models[0].tier_multipliers = vec![
            pb::TierMultiplier {
                tier: "priority".into(),
                multiplier: 2.0,
            },
            pb::TierMultiplier {
                tier: "flex".into(),
                multiplier: 0.5,
            },
        ];
        b.models[0].long_context = Some(pb::LongContextPrices {
            above_prompt_tokens: 272_000,
            input_multiplier: 2.0,
            output_multiplier: 1.5,
        });
        b.models[0].call_prices = vec![pb::CallPrice {
            tool: "web_search".into(),
            price_per_thousand_calls: 10.0,
        }];
        b.models.push(plain);
        let text = backend(Some(&b));
        assert!(
            text.contains("PRICE TIERS")
                && text.contains("LONG CONTEXT")
                && text.contains("CALL PRICES /1K"),
            "{text}"
        );
        let cells = |name: &str| {
            let line = text
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_default();
            let cells: Vec<&str> = line.split_whitespace().collect();
            cells[cells.len() - 3..].join(" ")
        };
        assert_eq!(
            cells("gpt-4o-mini "),
            "priority=2,flex=0.5 272000:2:1.5 web_search=10",
            "{text}"
        );
        assert_eq!(cells("plain "), "- - -", "{text}");
    }

    #[test]
    fn an_anthropic_backend_shows_its_format_and_no_responses_api() {
        let mut b = sample_backend();
        b.api_format = pb::ApiFormat::Anthropic as i32;
        b.anthropic_version = "2023-06-01".into();
        b.responses_api = None;
        let text = backend(Some(&b));
        assert!(
            text.contains("anthropic (anthropic-version 2023-06-01)"),
            "{text}"
        );
        assert!(text.contains("no (default)"), "{text}");
        assert!(text.contains("x-api-key (default)"), "{text}");
        b.key_header = pb::KeyHeader::Bearer as i32;
        assert!(
            backend(Some(&b)).contains("key header     Authorization: Bearer\n"),
            "{}",
            backend(Some(&b))
        );
        // Its routes' default max_tokens, which an OpenAI backend's rows do not show.
        assert!(!backend(Some(&sample_backend())).contains("MAX TOKENS"));
        assert!(text.contains("DEFAULT MAX TOKENS"), "{text}");
        let route = text
            .lines()
            .find(|l| l.starts_with("gpt-4o-mini "))
            .unwrap();
        assert!(route.trim_end().ends_with("default"), "{text}");
        b.models[0].default_max_tokens = 8192;
        let text = backend(Some(&b));
        let route = text
            .lines()
            .find(|l| l.starts_with("gpt-4o-mini "))
            .unwrap();
        assert!(route.trim_end().ends_with("8192"), "{text}");
        // A cap of translated requests' output, only where a route has one.
        assert!(!text.contains("MAX OUTPUT"), "{text}");
        b.models[0].max_output_tokens = 16_384;
        let text = backend(Some(&b));
        assert!(text.contains("MAX OUTPUT"), "{text}");
        let route = text
            .lines()
            .find(|l| l.starts_with("gpt-4o-mini "))
            .unwrap();
        assert!(route.trim_end().ends_with("16384"), "{text}");
    }

    #[test]
    fn created_key_says_it_is_shown_once() {
        let text = created_client_key(&pb::CreateClientKeyResponse {
            client_key: None,
            key: "sk-sluice-abc".into(),
        });
        assert!(text.lines().any(|line| line == "sk-sluice-abc"), "{text}");
        assert!(text.contains("cannot be shown again"), "{text}");
    }

    #[test]
    fn empty_lists_say_so() {
        assert_eq!(
            backends(&pb::ListBackendsResponse::default()),
            "No backends."
        );
        assert_eq!(
            usage(&pb::GetUsageResponse::default()),
            "No usage in this range."
        );
    }
}
