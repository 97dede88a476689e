//! The supported configuration fits the message limits, with room to spare: a snapshot of
//! 100,000 client keys and 1,000 backends (names, URLs, keys and allow-lists at realistic
//! lengths) and the `ListClientKeys` answer for the same keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use prost::Message as _;
use sluice_proto::limits::{
    MAX_ADMIN_RESPONSE_BYTES, MAX_MODEL_NAME_BYTES, MAX_SNAPSHOT_BYTES, MAX_USAGE_REPORT_BYTES,
};
use sluice_proto::v1 as pb;

const KEYS: usize = 100_000;
const BACKENDS: usize = 1_000;
const MODELS_PER_BACKEND: usize = 10;

fn id(i: usize) -> String {
    format!("0197a5c2-7f3e-7000-8000-{i:012}")
}

/// A 64-character name (the longest allowed) ending in `i`.
fn name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:0>width$}", width = 63 - prefix.len())
}

fn snapshot() -> pb::Snapshot {
    let backends = (0..BACKENDS)
        .map(|b| pb::SnapshotBackend {
            anthropic_version: Default::default(),
            api_format: Default::default(),
            // The largest value's.
            key_header: pb::KeyHeader::ApiKey as i32,
            id: id(b),
            name: name("backend", b),
            base_url: format!("https://api-{b}.provider.example.com/v1"),
            pool: pb::Pool::Primary as i32,
            priority: 10,
            weight: 100,
            models: (0..MODELS_PER_BACKEND)
                .map(|m| pb::ModelRoute {
                    default_max_tokens: Default::default(),
                    max_output_tokens: Default::default(),
                    name: format!("provider-model-{m}-2025-01-01"),
                    upstream_name: format!("provider/model-{m}-2025-01-01-preview"),
                    input_price_per_mtok: 2.5,
                    output_price_per_mtok: 10.0,
                    cached_input_price_per_mtok: Some(1.25),
                    cache_write_price_per_mtok: Some(3.125),
                    long_context: None,
                    // The supported configuration prices no tool's calls (a route that does
                    // is rare: the snapshot's sizes above hold without them).
                    call_prices: Vec::new(),
                    // Voice models alone price audio apart.
                    audio_input_price_per_mtok: None,
                    audio_output_price_per_mtok: None,
                    // OpenAI's two: priority and flex.
                    tier_multipliers: vec![
                        pb::TierMultiplier {
                            tier: "priority".into(),
                            multiplier: 2.0,
                        },
                        pb::TierMultiplier {
                            tier: "flex".into(),
                            multiplier: 0.5,
                        },
                    ],
                })
                .collect(),
            api_key: format!("sk-proj-{}", "x".repeat(156)),
            rpm_limit: 10_000,
            // Every backend cooling down, at the largest values.
            cooldown_until: Some(pbjson_types::Timestamp {
                seconds: i64::MAX,
                nanos: 999_999_999,
            }),
            consecutive_failures: u32::MAX,
            cooldown_remaining: Some(pbjson_types::Duration {
                seconds: i64::MAX,
                nanos: 999_999_999,
            }),
            cooldown_epoch: u64::MAX,
            // The longest author: a node id at its bound, `/`, an incarnation of 64.
            cooldown_changed_by: format!(
                "{}/{}",
                "n".repeat(sluice_proto::limits::MAX_ID_BYTES),
                "i".repeat(64)
            ),
            cooldown_run_basis: u64::MAX,
            responses_api: Some(true),
            tpm_limit: 1_000_000_000,
            // And every one of its models, at the largest values.
            model_cooldowns: (0..MODELS_PER_BACKEND)
                .map(|m| pb::ModelCooldown {
                    model: format!("provider/model-{m}-2025-01-01-preview"),
                    cooldown_until: Some(pbjson_types::Timestamp {
                        seconds: i64::MAX,
                        nanos: 999_999_999,
                    }),
                    consecutive_failures: u32::MAX,
                    cooldown_remaining: Some(pbjson_types::Duration {
                        seconds: i64::MAX,
                        nanos: 999_999_999,
                    }),
                    cooldown_epoch: u64::MAX,
                    cooldown_changed_by: format!(
                        "{}/{}",
                        "n".repeat(sluice_proto::limits::MAX_ID_BYTES),
                        "i".repeat(64)
                    ),
                    cooldown_run_basis: u64::MAX,
                })
                .collect(),
        })
        .collect();
    let client_keys = (0..KEYS)
        .map(|k| pb::SnapshotClientKey {
            id: id(k),
            name: name("key", k),
            key_sha256: vec![0xab; 32],
            allowed_models: (0..3)
                .map(|m| format!("provider-model-{m}-2025-01-01"))
                .collect(),
            rpm_limit: 6_000,
            // Expired keys stay in the snapshot, so the largest one counts them too.
            expired: true,
            budget_spent: true,
            max_budget: 1e9,
            budget_reset_time: Some(pbjson_types::Timestamp {
                seconds: 4_102_444_800,
                nanos: 0,
            }),
            tpm_limit: 1_000_000_000,
            max_parallel_requests: 1_000_000,
            budget_period_start: Some(pbjson_types::Timestamp {
                seconds: 4_102_358_400,
                nanos: 0,
            }),
            expire_time: Some(pbjson_types::Timestamp {
                seconds: 4_102_444_800,
                nanos: 999_999_999,
            }),
        })
        .collect();
    pb::Snapshot {
        version: u64::MAX,
        nonce: "0".repeat(32),
        create_time: Some(pbjson_types::Timestamp::default()),
        backends,
        client_keys,
        settings: Some(pb::Settings::default()),
        replica_count: 1_000,
        // Every replica counted, named by the longest node id.
        share_holders: (0..1_000)
            .map(|i| format!("{i:0>width$}", width = sluice_proto::limits::MAX_ID_BYTES))
            .collect(),
        epoch: "0".repeat(32),
        database_id: "0".repeat(32),
        model_cooldowns: true,
        // More affinity keys than rotation ever keeps active.
        affinity_keys: (0..16)
            .map(|id| pb::AffinityKey {
                id,
                secret: vec![0xcd; 32],
            })
            .collect(),
    }
}

#[test]
fn the_supported_configuration_fits_every_message_limit() {
    let snapshot = snapshot();
    let bytes = pb::StreamSnapshotsResponse {
        snapshot: Some(snapshot.clone()),
        allowances: None,
    }
    .encoded_len();
    eprintln!(
        "snapshot of {KEYS} keys and {BACKENDS} backends: {bytes} bytes ({:.1} MiB), limit {} MiB",
        bytes as f64 / 1048576.0,
        MAX_SNAPSHOT_BYTES >> 20
    );
    // Every model of every backend cooling down at once too, each with the longest author
    // (a provider's outage answering 429 for every model): still well inside the limit.
    assert!(bytes * 19 / 10 < MAX_SNAPSHOT_BYTES, "{bytes}");
    // At least twice the room with the backends cooling down, so the allow-lists and names can
    // grow.
    let backends_alone = pb::StreamSnapshotsResponse {
        snapshot: Some(pb::Snapshot {
            backends: snapshot
                .backends
                .iter()
                .map(|b| pb::SnapshotBackend {
                    model_cooldowns: Vec::new(),
                    ..b.clone()
                })
                .collect(),
            ..snapshot.clone()
        }),
        allowances: None,
    }
    .encoded_len();
    eprintln!(
        "the same with no model cooling down: {backends_alone} bytes ({:.1} MiB)",
        backends_alone as f64 / 1048576.0
    );
    assert!(backends_alone * 2 < MAX_SNAPSHOT_BYTES, "{backends_alone}");

    let keys = pb::ListClientKeysResponse {
        client_keys: snapshot
            .client_keys
            .iter()
            .map(|k| pb::ClientKey {
                id: k.id.clone(),
                name: k.name.clone(),
                key_prefix: "sk-sluice-0123".into(),
                allowed_models: k.allowed_models.clone(),
                rpm_limit: k.rpm_limit,
                revoked: false,
                create_time: Some(pbjson_types::Timestamp::default()),
                revoke_time: None,
                expire_time: Some(pbjson_types::Timestamp::default()),
                expired: true,
                max_budget: 1e9,
                budget_period: pb::BudgetPeriod::Monthly as i32,
                spend: 1e9,
                remaining_budget: 1e9,
                budget_reset_time: Some(pbjson_types::Timestamp::default()),
                tpm_limit: 1_000_000_000,
                max_parallel_requests: 1_000_000,
                held_by_data_planes: 1e9,
            })
            .collect(),
        next_page_token: String::new(),
    };
    // A page of keys as large as a page may be: within what any client decodes by default.
    let page = pb::ListClientKeysResponse {
        client_keys: keys.client_keys[..sluice_proto::limits::MAX_KEY_PAGE_SIZE].to_vec(),
        next_page_token: "t".repeat(200),
    };
    let page_bytes = page.encoded_len();
    assert!(
        page_bytes * 2 < sluice_proto::limits::DEFAULT_CLIENT_DECODE_BYTES,
        "{page_bytes}"
    );
    let bytes = keys.encoded_len();
    eprintln!(
        "ListClientKeys of {KEYS} keys: {bytes} bytes ({:.1} MiB), limit {} MiB",
        bytes as f64 / 1048576.0,
        MAX_ADMIN_RESPONSE_BYTES >> 20
    );
    assert!(bytes * 2 < MAX_ADMIN_RESPONSE_BYTES, "{bytes}");
}

#[test]
fn a_full_usage_batch_of_bounded_records_fits_the_report_limit() {
    use sluice_proto::limits::{MAX_ID_BYTES, MAX_MODEL_NAME_BYTES, MAX_REQUEST_ID_BYTES};
    // The largest record the bounds allow.
    let record = pb::UsageRecord {
        sequence: u64::MAX,
        request_id: "r".repeat(MAX_REQUEST_ID_BYTES),
        backend_id: "b".repeat(MAX_ID_BYTES),
        model: "m".repeat(MAX_MODEL_NAME_BYTES),
        client_key_id: "k".repeat(MAX_ID_BYTES),
        prompt_tokens: u64::MAX,
        completion_tokens: u64::MAX,
        latency: Some(pbjson_types::Duration {
            seconds: i64::MAX,
            nanos: 999_999_999,
        }),
        time_to_first_token: Some(pbjson_types::Duration {
            seconds: i64::MAX,
            nanos: 999_999_999,
        }),
        status_code: 599,
        error_kind: pb::ErrorKind::Internal as i32,
        stream: true,
        time: Some(pbjson_types::Timestamp {
            seconds: i64::MAX,
            nanos: 999_999_999,
        }),
        attempts: u32::MAX,
        endpoint: pb::Endpoint::Responses as i32,
        cached_prompt_tokens: u64::MAX,
        reasoning_tokens: u64::MAX,
        cost_nanos: u64::MAX,
        tokens_estimated: true,
        priced: true,
        cache_write_prompt_tokens: u64::MAX,
        unbudgeted: true,
        // A negative one takes the most bytes, ten.
        budget_period_start_ms: i64::MIN,
        audio_prompt_tokens: u64::MAX,
        audio_completion_tokens: u64::MAX,
    };
    let one = record.encoded_len();
    eprintln!("largest usage record: {one} bytes");
    // Thousands of the largest records fit one report.
    assert!(MAX_USAGE_REPORT_BYTES / one > 3_000, "{one}");
}

/// A full `GetUsage` page of the largest buckets (group keys and labels at their longest:
/// a model name of 256 bytes, a 64-character name of 4-byte characters) fits what every gRPC
/// client decodes by default.
#[test]
fn a_full_usage_page_fits_a_default_client() {
    use sluice_proto::limits::{DEFAULT_CLIENT_DECODE_BYTES, MAX_USAGE_PAGE_SIZE};
    let bucket = pb::UsageBucket {
        start_time: Some(pbjson_types::Timestamp {
            seconds: i64::MAX,
            nanos: 999_999_999,
        }),
        group_key: "m".repeat(MAX_MODEL_NAME_BYTES),
        group_label: "\u{1F600}".repeat(64),
        request_count: u64::MAX,
        error_count: u64::MAX,
        prompt_tokens: u64::MAX,
        completion_tokens: u64::MAX,
        total_tokens: u64::MAX,
        cost: f64::MAX,
        error_rate: 1.0,
        avg_latency_ms: f64::MAX,
        p50_latency_ms: f64::MAX,
        p95_latency_ms: f64::MAX,
        p99_latency_ms: f64::MAX,
        avg_ttft_ms: f64::MAX,
        stream_count: u64::MAX,
        backend_count: u64::MAX,
        currency: "XXX".into(),
        cached_prompt_tokens: u64::MAX,
        reasoning_tokens: u64::MAX,
        cache_write_prompt_tokens: u64::MAX,
        audio_prompt_tokens: u64::MAX,
        audio_completion_tokens: u64::MAX,
        estimated_count: u64::MAX,
    };
    let page = pb::GetUsageResponse {
        buckets: vec![bucket; MAX_USAGE_PAGE_SIZE],
        next_page_token: "t".repeat(1024),
        hours_kept_since: Some(pbjson_types::Timestamp {
            seconds: i64::MAX,
            nanos: i32::MAX,
        }),
    };
    let len = page.encoded_len();
    eprintln!("largest usage page: {len} bytes");
    assert!(len < DEFAULT_CLIENT_DECODE_BYTES, "{len}");
}
