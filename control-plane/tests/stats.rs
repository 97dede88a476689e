//! Usage statistics end to end over real gRPC: records go in through
//! `DataPlaneService.ReportUsage` with the data-plane token, numbers come out of
//! `StatsService` with the admin token, and every number is checked against what
//! was sent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use sluice_control::testing::{Bearer, TestControlPlane};
use sluice_control::usage::histogram::{bucket_upper_ms, latency_bucket};
use sluice_proto::v1 as pb;
use sluice_proto::v1::admin_service_client::AdminServiceClient;
use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;
use sluice_proto::v1::stats_service_client::StatsServiceClient;
use sluice_proto::wkt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
/// 2025-11-25T00:00:00Z.
const DAY0: i64 = 1_764_028_800_000;

type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;
type Stats = StatsServiceClient<InterceptedService<Channel, Bearer>>;
type DataPlane = DataPlaneServiceClient<InterceptedService<Channel, Bearer>>;

struct Harness {
    cp: TestControlPlane,
    admin: Admin,
    stats: Stats,
    _dir: tempfile::TempDir,
}

impl Harness {
    /// A control plane that keeps every hourly row: the tests report records at fixed dates
    /// (`DAY0`, 2025-11-25) now long past the default retention of 90 days, and the retention
    /// pass the control plane runs at start may come after a test's first report, which then
    /// lost its hourly rows (its daily ones stay) whenever that pass was late. Retention is
    /// tested by the tests that set it.
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cp = TestControlPlane::start(dir.path()).await.unwrap();
        let channel = channel(&cp).await;
        let mut harness = Self {
            admin: AdminServiceClient::with_interceptor(
                channel.clone(),
                Bearer(cp.admin_token.clone()),
            ),
            stats: StatsServiceClient::with_interceptor(channel, Bearer(cp.admin_token.clone())),
            cp,
            _dir: dir,
        };
        harness.set_retention_days(0).await;
        harness
    }

    async fn data_plane(&self) -> DataPlane {
        DataPlaneServiceClient::with_interceptor(
            channel(&self.cp).await,
            Bearer(self.cp.dataplane_token.clone()),
        )
    }

    /// A backend serving each `(model, input price, output price)`.
    async fn backend(&mut self, name: &str, pool: pb::Pool, models: &[(&str, f64, f64)]) -> String {
        self.admin
            .create_backend(pb::CreateBackendRequest {
                backend: Some(pb::Backend {
                    name: name.into(),
                    base_url: "https://api.example.com/v1".into(),
                    pool: pool as i32,
                    priority: 10,
                    weight: 1,
                    enabled: true,
                    models: models
                        .iter()
                        .map(|&(model, input, output)| pb::ModelRoute {
                            default_max_tokens: Default::default(),
                            max_output_tokens: Default::default(),
                            name: model.into(),
                            upstream_name: model.into(),
                            input_price_per_mtok: input,
                            output_price_per_mtok: output,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                api_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .backend
            .unwrap()
            .id
    }

    /// Reports `records` in one batch as (`node`, `incarnation`) and returns the ack.
    async fn report(&self, node: &str, incarnation: &str, records: Vec<pb::UsageRecord>) -> u64 {
        let mut dp = self.data_plane().await;
        let mut acks = dp
            .report_usage(tokio_stream::iter(vec![batch(node, incarnation, records)]))
            .await
            .unwrap()
            .into_inner();
        acks.message().await.unwrap().unwrap().acked_sequence
    }

    async fn totals(&mut self, request: pb::GetTotalsRequest) -> pb::GetTotalsResponse {
        self.stats.get_totals(request).await.unwrap().into_inner()
    }

    async fn usage(&mut self, request: pb::GetUsageRequest) -> Vec<pb::UsageBucket> {
        self.stats
            .get_usage(request)
            .await
            .unwrap()
            .into_inner()
            .buckets
    }

    /// Every bucket of `granularity`, ungrouped, over all time.
    async fn buckets(&mut self, granularity: pb::Granularity) -> Vec<pb::UsageBucket> {
        self.usage(pb::GetUsageRequest {
            granularity: granularity as i32,
            ..Default::default()
        })
        .await
    }

    async fn set_retention_days(&mut self, days: u32) {
        self.admin
            .update_settings(pb::UpdateSettingsRequest {
                settings: Some(pb::Settings {
                    usage_retention_days: days,
                    ..Default::default()
                }),
                update_mask: Some(wkt::FieldMask {
                    paths: vec!["usage_retention_days".into()],
                }),
            })
            .await
            .unwrap();
    }
}

async fn channel(cp: &TestControlPlane) -> Channel {
    Channel::from_shared(cp.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn batch(node: &str, incarnation: &str, records: Vec<pb::UsageRecord>) -> pb::ReportUsageRequest {
    pb::ReportUsageRequest {
        node_id: node.into(),
        incarnation: incarnation.into(),
        records,
        events: vec![],
        ..Default::default()
    }
}

fn ts(ms: i64) -> Option<wkt::Timestamp> {
    Some(wkt::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

fn ms_of(t: &Option<wkt::Timestamp>) -> i64 {
    let t = t.unwrap();
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

fn dur(ms: f64) -> Option<wkt::Duration> {
    let ns = (ms * 1e6).round() as i64;
    Some(wkt::Duration {
        seconds: ns / 1_000_000_000,
        nanos: (ns % 1_000_000_000) as i32,
    })
}

/// One record as a data plane sends it.
#[derive(Clone, Debug)]
struct Rec {
    backend: String,
    model: &'static str,
    key: &'static str,
    prompt: u64,
    completion: u64,
    latency_ms: f64,
    ttft_ms: Option<f64>,
    error: bool,
    time_ms: i64,
    /// What the replica computed the request cost (0: a replica too old to say, unless
    /// `priced`).
    cost_nanos: u64,
    priced: bool,
}

impl Rec {
    fn new(backend: &str, time_ms: i64) -> Self {
        Self {
            backend: backend.into(),
            model: "m1",
            key: "key-a",
            prompt: 100,
            completion: 50,
            latency_ms: 100.0,
            ttft_ms: None,
            error: false,
            time_ms,
            cost_nanos: 0,
            priced: false,
        }
    }

    fn to_proto(&self, sequence: u64) -> pb::UsageRecord {
        pb::UsageRecord {
            sequence,
            request_id: format!("req-{sequence}"),
            backend_id: self.backend.clone(),
            model: self.model.into(),
            client_key_id: self.key.into(),
            prompt_tokens: self.prompt,
            completion_tokens: self.completion,
            latency: dur(self.latency_ms),
            time_to_first_token: self.ttft_ms.and_then(dur),
            status_code: if self.error { 502 } else { 200 },
            error_kind: if self.error {
                pb::ErrorKind::UpstreamStatus as i32
            } else {
                0
            },
            stream: self.ttft_ms.is_some(),
            time: ts(self.time_ms),
            attempts: 1,
            endpoint: 0,
            cached_prompt_tokens: self.prompt / 4,
            reasoning_tokens: self.completion / 5,
            cache_write_prompt_tokens: self.prompt / 8,
            cost_nanos: self.cost_nanos,
            tokens_estimated: estimated(self),
            priced: self.priced,
            unbudgeted: false,
            budget_period_start_ms: 0,
            audio_prompt_tokens: self.prompt / 3,
            audio_completion_tokens: self.completion / 2,
        }
    }
}

/// Whether a record's tokens are estimated: those whose prompt is a multiple of 3.
fn estimated(r: &Rec) -> bool {
    r.prompt.is_multiple_of(3)
}

/// Records numbered 1.. in order.
fn numbered(recs: &[Rec]) -> Vec<pb::UsageRecord> {
    recs.iter()
        .enumerate()
        .map(|(i, r)| r.to_proto(i as u64 + 1))
        .collect()
}

/// What GetTotals must say about `recs`, prices per (backend, model) per million tokens.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    requests: u64,
    errors: u64,
    streams: u64,
    estimated: u64,
    prompt: u64,
    completion: u64,
    /// Of `prompt`: read from the cache (a quarter of each record's), written to it (an eighth).
    cached: u64,
    cache_write: u64,
    /// Of `prompt`, audio (a third of each record's); of `completion`, audio (a half).
    audio_prompt: u64,
    audio_completion: u64,
    cost: f64,
    latency_sum: f64,
    ttft_sum: f64,
    ttft_count: u64,
}

fn expected<'a>(
    recs: impl IntoIterator<Item = &'a Rec>,
    price: &dyn Fn(&str, &str) -> (f64, f64),
) -> Expected {
    let mut e = Expected::default();
    for r in recs {
        let (input, output) = price(&r.backend, r.model);
        e.requests += 1;
        e.errors += u64::from(r.error);
        e.streams += u64::from(r.ttft_ms.is_some());
        e.estimated += u64::from(estimated(r));
        e.prompt += r.prompt;
        e.completion += r.completion;
        e.cached += r.prompt / 4;
        e.cache_write += r.prompt / 8;
        e.audio_prompt += r.prompt / 3;
        e.audio_completion += r.completion / 2;
        e.cost += if r.cost_nanos > 0 {
            r.cost_nanos as f64 / 1e9
        } else {
            (r.prompt as f64 * input + r.completion as f64 * output) / 1e6
        };
        e.latency_sum += r.latency_ms;
        if let Some(t) = r.ttft_ms {
            e.ttft_sum += t;
            e.ttft_count += 1;
        }
    }
    e
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-12)
}

#[track_caller]
fn assert_totals(t: &pb::GetTotalsResponse, e: &Expected) {
    assert_eq!(t.request_count, e.requests, "requests");
    assert_eq!(t.error_count, e.errors, "errors");
    assert_eq!(t.stream_count, e.streams, "streams");
    assert_eq!(t.estimated_count, e.estimated, "requests estimated");
    assert_eq!(t.prompt_tokens, e.prompt, "prompt tokens");
    assert_eq!(t.completion_tokens, e.completion, "completion tokens");
    assert_eq!(t.total_tokens, e.prompt + e.completion, "total tokens");
    assert_eq!(t.cached_prompt_tokens, e.cached, "cached prompt tokens");
    assert_eq!(
        t.cache_write_prompt_tokens, e.cache_write,
        "prompt tokens written to the cache"
    );
    assert_eq!(
        (t.audio_prompt_tokens, t.audio_completion_tokens),
        (e.audio_prompt, e.audio_completion),
        "audio tokens"
    );
    assert!(close(t.cost, e.cost), "cost {} != {}", t.cost, e.cost);
    if e.requests > 0 {
        let avg = e.latency_sum / e.requests as f64;
        assert!(
            close(t.avg_latency_ms, avg),
            "avg latency {} != {avg}",
            t.avg_latency_ms
        );
        let rate = e.errors as f64 / e.requests as f64;
        assert!(
            close(t.error_rate, rate),
            "error rate {} != {rate}",
            t.error_rate
        );
    }
    if e.ttft_count > 0 {
        let avg = e.ttft_sum / e.ttft_count as f64;
        assert!(
            close(t.avg_ttft_ms, avg),
            "avg ttft {} != {avg}",
            t.avg_ttft_ms
        );
    }
}

/// A bucket's numbers in the shape of GetTotals, to compare and to add up.
fn as_totals(b: &pb::UsageBucket) -> pb::GetTotalsResponse {
    pb::GetTotalsResponse {
        request_count: b.request_count,
        error_count: b.error_count,
        prompt_tokens: b.prompt_tokens,
        completion_tokens: b.completion_tokens,
        cost: b.cost,
        total_tokens: b.total_tokens,
        error_rate: b.error_rate,
        avg_latency_ms: b.avg_latency_ms,
        p50_latency_ms: b.p50_latency_ms,
        p95_latency_ms: b.p95_latency_ms,
        p99_latency_ms: b.p99_latency_ms,
        avg_ttft_ms: b.avg_ttft_ms,
        stream_count: b.stream_count,
        estimated_count: b.estimated_count,
        backend_count: b.backend_count,
        currency: b.currency.clone(),
        groups: Vec::new(),
        cached_prompt_tokens: b.cached_prompt_tokens,
        reasoning_tokens: b.reasoning_tokens,
        cache_write_prompt_tokens: b.cache_write_prompt_tokens,
        audio_prompt_tokens: b.audio_prompt_tokens,
        audio_completion_tokens: b.audio_completion_tokens,
        next_page_token: String::new(),
        hours_kept_since: None,
    }
}

/// Equal counts and percentiles; sums of money and milliseconds equal up to rounding.
#[track_caller]
fn assert_same(a: &pb::GetTotalsResponse, b: &pb::GetTotalsResponse) {
    assert_eq!(
        (
            a.request_count,
            a.error_count,
            a.stream_count,
            a.estimated_count,
            a.prompt_tokens,
            a.completion_tokens,
            a.total_tokens,
            a.cached_prompt_tokens,
            a.reasoning_tokens,
            a.cache_write_prompt_tokens,
            a.audio_prompt_tokens,
            a.audio_completion_tokens
        ),
        (
            b.request_count,
            b.error_count,
            b.stream_count,
            b.estimated_count,
            b.prompt_tokens,
            b.completion_tokens,
            b.total_tokens,
            b.cached_prompt_tokens,
            b.reasoning_tokens,
            b.cache_write_prompt_tokens,
            b.audio_prompt_tokens,
            b.audio_completion_tokens
        )
    );
    assert_eq!(
        (a.p50_latency_ms, a.p95_latency_ms, a.p99_latency_ms),
        (b.p50_latency_ms, b.p95_latency_ms, b.p99_latency_ms)
    );
    for (x, y) in [
        (a.cost, b.cost),
        (a.avg_latency_ms, b.avg_latency_ms),
        (a.avg_ttft_ms, b.avg_ttft_ms),
        (a.error_rate, b.error_rate),
    ] {
        assert!(close(x, y), "{x} != {y}\n{a:?}\n{b:?}");
    }
}

const GROUPINGS: [pb::GroupBy; 4] = [
    pb::GroupBy::Unspecified,
    pb::GroupBy::Backend,
    pb::GroupBy::Model,
    pb::GroupBy::ClientKey,
];
const GRANULARITIES: [pb::Granularity; 2] = [pb::Granularity::Hour, pb::Granularity::Day];

fn group_of(r: &Rec, by: pb::GroupBy) -> String {
    match by {
        pb::GroupBy::Backend => r.backend.clone(),
        pb::GroupBy::Model => r.model.into(),
        pb::GroupBy::ClientKey => r.key.into(),
        pb::GroupBy::Unspecified => String::new(),
        pb::GroupBy::Pool => panic!("pools are checked against hand-computed values"),
    }
}

/// Three days of varied traffic over three backends, two models, three keys.
fn varied_traffic(backends: &[String], n: usize, seed: u64) -> Vec<Rec> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let streamed = rng.random_bool(0.4);
            let latency_ms = f64::from(rng.random_range(1..40_000u32)) / 8.0;
            Rec {
                backend: backends[rng.random_range(0..backends.len())].clone(),
                model: ["m1", "m2"][rng.random_range(0..2)],
                key: ["key-a", "key-b", "key-c"][rng.random_range(0..3)],
                prompt: rng.random_range(0..5000),
                completion: rng.random_range(0..2000),
                latency_ms,
                ttft_ms: streamed.then(|| latency_ms / 4.0),
                error: rng.random_bool(0.1),
                time_ms: DAY0 - DAY + rng.random_range(0..3 * DAY),
                // Half from replicas that say what the request cost, half from older ones.
                cost_nanos: if rng.random_bool(0.5) {
                    rng.random_range(1..10_000_000)
                } else {
                    0
                },
                priced: false,
            }
        })
        .collect()
}

fn prices(backends: &[String]) -> impl Fn(&str, &str) -> (f64, f64) + '_ {
    move |backend, model| {
        let i = backends.iter().position(|b| b == backend).unwrap() as f64;
        match model {
            "m1" => (0.15 + i, 0.60 + i),
            _ => (2.50 + i, 10.0 + i),
        }
    }
}

async fn three_backends(h: &mut Harness) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..3 {
        let f = i as f64;
        let pool = if i == 2 {
            pb::Pool::Fallback
        } else {
            pb::Pool::Primary
        };
        ids.push(
            h.backend(
                &format!("b{i}"),
                pool,
                &[("m1", 0.15 + f, 0.60 + f), ("m2", 2.50 + f, 10.0 + f)],
            )
            .await,
        );
    }
    ids
}

#[tokio::test]
async fn sums_over_buckets_equal_totals_for_every_grouping_and_granularity() {
    let mut h = Harness::start().await;
    let backends = three_backends(&mut h).await;
    let recs = varied_traffic(&backends, 3000, 1);
    let records = numbered(&recs);
    for (i, chunk) in records.chunks(500).enumerate() {
        let acked = h.report("r1", "i1", chunk.to_vec()).await;
        assert_eq!(acked, (i as u64 + 1) * 500);
    }
    let price = prices(&backends);
    let all = expected(&recs, &price);
    let totals = h.totals(Default::default()).await;
    assert_totals(&totals, &all);

    for granularity in GRANULARITIES {
        let width = if granularity == pb::Granularity::Hour {
            HOUR
        } else {
            DAY
        };
        for by in GROUPINGS {
            let buckets = h
                .usage(pb::GetUsageRequest {
                    granularity: granularity as i32,
                    group_by: by as i32,
                    ..Default::default()
                })
                .await;
            // Every bucket matches the records of its (time, group), and nothing else is there.
            let mut want: BTreeMap<(i64, String), Vec<&Rec>> = BTreeMap::new();
            for r in &recs {
                want.entry((r.time_ms.div_euclid(width) * width, group_of(r, by)))
                    .or_default()
                    .push(r);
            }
            let got: Vec<(i64, String)> = buckets
                .iter()
                .map(|b| (ms_of(&b.start_time), b.group_key.clone()))
                .collect();
            assert_eq!(
                got,
                want.keys().cloned().collect::<Vec<_>>(),
                "{granularity:?} {by:?}"
            );
            for (b, recs) in buckets.iter().zip(want.values()) {
                assert_totals(&as_totals(b), &expected(recs.iter().copied(), &price));
            }
            // Sums over the buckets are the totals.
            let sum = |f: fn(&pb::UsageBucket) -> u64| buckets.iter().map(f).sum::<u64>();
            assert_eq!(sum(|b| b.request_count), totals.request_count);
            assert_eq!(sum(|b| b.error_count), totals.error_count);
            assert_eq!(sum(|b| b.stream_count), totals.stream_count);
            assert_eq!(sum(|b| b.prompt_tokens), totals.prompt_tokens);
            assert_eq!(sum(|b| b.completion_tokens), totals.completion_tokens);
            assert_eq!(sum(|b| b.total_tokens), totals.total_tokens);
            let cost: f64 = buckets.iter().map(|b| b.cost).sum();
            assert!(close(cost, totals.cost), "{cost} != {}", totals.cost);
        }
    }
}

/// A record's cost is what its replica computed (the figure its key's spend got: cached
/// prompt tokens at the cached price, a reserve kept for a request the provider may have
/// billed), not its tokens at the route's prices: the statistics and the keys' spend add up
/// to the same money. A record that carries no cost (a replica too old to compute one) is
/// priced at ingestion as before.
#[tokio::test]
async fn a_records_own_cost_is_its_cost_in_the_statistics() {
    let mut h = Harness::start().await;
    let b = h
        .backend("priced", pb::Pool::Primary, &[("m1", 2.0, 8.0)])
        .await;
    let recs = [
        // 1000 prompt tokens, 800 of them cached at a tenth of the price, 500 completion:
        // 200 × 2 + 800 × 0.2 + 500 × 8 per million.
        Rec {
            prompt: 1000,
            completion: 500,
            cost_nanos: 4_560_000,
            ..Rec::new(&b, DAY0 + 10)
        },
        // No usage from the provider: the reserve it kept.
        Rec {
            prompt: 0,
            completion: 0,
            cost_nanos: 70_000,
            ..Rec::new(&b, DAY0 + 20)
        },
        // From an old replica: priced here, (100 × 2 + 50 × 8) per million.
        Rec::new(&b, DAY0 + 30),
        // Priced by its replica at 0 (the route was free when it was served, or the prompt
        // read whole from the cache at a cached price of 0): free, whatever the route's prices
        // are when it arrives (it was priced here before).
        Rec {
            priced: true,
            ..Rec::new(&b, DAY0 + 40)
        },
    ];
    assert_eq!(h.report("r", "i", numbered(&recs)).await, 4);
    let want = 0.00456 + 0.00007 + 0.0006;
    let t = h.totals(Default::default()).await;
    assert!(close(t.cost, want), "{} != {want}", t.cost);
    for granularity in GRANULARITIES {
        let buckets = h.buckets(granularity).await;
        let cost: f64 = buckets.iter().map(|b| b.cost).sum();
        assert!(close(cost, want), "{granularity:?}: {cost} != {want}");
    }
}

/// A request its replica's crash cut off has no latency (its replay says so): it counts as a
/// request and an error, not in the latency figures. Filed as 0 ms, it lowered the average
/// and the percentiles of its backend exactly when the backend had trouble.
#[tokio::test]
async fn a_crashed_requests_unknown_latency_is_not_counted_as_zero() {
    let mut h = Harness::start().await;
    let b = h.backend("b", pb::Pool::Primary, &[("m1", 1.0, 1.0)]).await;
    let served = Rec {
        latency_ms: 2_000.0,
        ..Rec::new(&b, DAY0 + 10)
    };
    let crashed = pb::UsageRecord {
        latency: None,
        time_to_first_token: None,
        status_code: 0,
        error_kind: pb::ErrorKind::DataPlaneCrashed as i32,
        prompt_tokens: 0,
        completion_tokens: 0,
        ..Rec::new(&b, DAY0 + 20).to_proto(2)
    };
    assert_eq!(
        h.report("r", "i", vec![served.to_proto(1), crashed]).await,
        2
    );
    let t = h.totals(Default::default()).await;
    assert_eq!((t.request_count, t.error_count), (2, 1));
    assert!(close(t.avg_latency_ms, 2_000.0), "{t:?}");
    assert!(t.p50_latency_ms >= 1_500.0, "{t:?}");
    for granularity in GRANULARITIES {
        let buckets = h.buckets(granularity).await;
        assert_eq!(buckets.len(), 1);
        assert!(close(buckets[0].avg_latency_ms, 2_000.0), "{granularity:?}");
    }
}

/// Times at the ends of what a timestamp can say: a range starting at the earliest (a
/// "from the beginning" a client may send) answers the all-time totals, and a record stamped
/// there (a replica's clock gone wrong) is stored, not a report failing for ever. Rounded down
/// to its hour, the earliest time overflowed: a panic in the store's task, zeros in release.
#[tokio::test]
async fn the_earliest_time_there_is_rounds_down_without_overflow() {
    let mut h = Harness::start().await;
    let b = h
        .backend("priced", pb::Pool::Primary, &[("m1", 2.0, 8.0)])
        .await;
    let recs = [Rec::new(&b, DAY0 + 10), Rec::new(&b, i64::MIN)];
    assert_eq!(h.report("r", "i", numbered(&recs)).await, 2);
    // (0001-01-01, the earliest a protobuf timestamp may say, is after the stamped one.)
    for (seconds, count) in [(i64::MIN, 2), (i64::MIN / 1000, 2), (-62_135_596_800, 1)] {
        let t = h
            .totals(pb::GetTotalsRequest {
                start_time: Some(wkt::Timestamp { seconds, nanos: 0 }),
                ..Default::default()
            })
            .await;
        assert_eq!(t.request_count, count, "from {seconds} s");
    }
}

#[tokio::test]
async fn cost_is_prompt_times_input_plus_completion_times_output_at_ingestion() {
    let mut h = Harness::start().await;
    let b = h
        .backend("priced", pb::Pool::Primary, &[("m1", 2.0, 8.0)])
        .await;
    let mut recs = Vec::new();
    for _ in 0..3 {
        recs.push(Rec {
            prompt: 1000,
            completion: 500,
            ..Rec::new(&b, DAY0 + 10)
        });
    }
    recs.push(Rec {
        prompt: 250_000,
        completion: 0,
        ..Rec::new(&b, DAY0 + 20)
    });
    // A model the backend does not price costs nothing.
    recs.push(Rec {
        model: "m2",
        prompt: 1_000_000,
        completion: 1_000_000,
        ..Rec::new(&b, DAY0 + 30)
    });
    assert_eq!(h.report("r", "i", numbered(&recs)).await, 5);
    // 3 × (1000 × 2 + 500 × 8) / 1M + 250,000 × 2 / 1M
    let first = 3.0 * 0.006 + 0.5;
    let cost = h.totals(Default::default()).await.cost;
    assert!(close(cost, first), "{cost}");

    // New prices apply to what is ingested from now on only.
    h.admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: b.clone(),
                models: vec![pb::ModelRoute {
                    default_max_tokens: Default::default(),
                    max_output_tokens: Default::default(),
                    name: "m1".into(),
                    upstream_name: "m1".into(),
                    input_price_per_mtok: 100.0,
                    output_price_per_mtok: 200.0,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            update_mask: Some(wkt::FieldMask {
                paths: vec!["models".into()],
            }),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    let cost = h.totals(Default::default()).await.cost;
    assert!(close(cost, first), "a price change rewrote history: {cost}");
    let later = Rec {
        prompt: 1000,
        completion: 1000,
        ..Rec::new(&b, DAY0 + 40)
    };
    assert_eq!(h.report("r", "i", vec![later.to_proto(6)]).await, 6);
    // + (1000 × 100 + 1000 × 200) / 1M
    let want = first + 0.3;
    let t = h.totals(Default::default()).await;
    assert!(close(t.cost, want), "{}", t.cost);
    for granularity in GRANULARITIES {
        let buckets = h
            .usage(pb::GetUsageRequest {
                granularity: granularity as i32,
                group_by: pb::GroupBy::Model as i32,
                ..Default::default()
            })
            .await;
        let by_model: Vec<(String, f64)> = buckets
            .iter()
            .map(|b| (b.group_key.clone(), b.cost))
            .collect();
        assert_eq!(by_model.len(), 2);
        assert_eq!(by_model[0].0, "m1");
        assert!(close(by_model[0].1, want), "{by_model:?}");
        assert_eq!(by_model[1], ("m2".to_owned(), 0.0));
    }
}

#[tokio::test]
async fn percentiles_land_in_the_bucket_of_the_known_distribution() {
    let mut h = Harness::start().await;
    let b = h.backend("b", pb::Pool::Primary, &[("m1", 1.0, 1.0)]).await;
    // 50 at 20 ms, 45 at 200 ms, 4 at 2 s, 1 at 20 s, spread over two hours.
    let mut recs = Vec::new();
    for (ms, n) in [(20.0, 50), (200.0, 45), (2000.0, 4), (20_000.0, 1)] {
        for i in 0..n {
            recs.push(Rec {
                latency_ms: ms,
                ..Rec::new(&b, DAY0 + (i % 2) * HOUR + i)
            });
        }
    }
    assert_eq!(h.report("r", "i", numbered(&recs)).await, 100);
    let upper = |ms: f64| bucket_upper_ms(latency_bucket(ms));
    let t = h.totals(Default::default()).await;
    assert_eq!(t.p50_latency_ms, upper(20.0));
    assert_eq!(t.p95_latency_ms, upper(200.0));
    assert_eq!(t.p99_latency_ms, upper(2000.0));
    // The bucket's upper bound is within one bucket (~19 %) above the true value.
    for (p, ms) in [
        (t.p50_latency_ms, 20.0),
        (t.p95_latency_ms, 200.0),
        (t.p99_latency_ms, 2000.0),
    ] {
        assert!(p >= ms && p < ms * 1.19, "{p} for {ms}");
    }
    let days = h
        .usage(pb::GetUsageRequest {
            granularity: pb::Granularity::Day as i32,
            ..Default::default()
        })
        .await;
    assert_eq!(days.len(), 1);
    assert_same(&as_totals(&days[0]), &t);
    // Hour 0: 25 × 20 ms, 23 × 200 ms, 2 × 2 s, 1 × 20 s (51); hour 1: 25, 22, 2, 0 (49).
    let hours = h
        .usage(pb::GetUsageRequest {
            granularity: pb::Granularity::Hour as i32,
            ..Default::default()
        })
        .await;
    assert_eq!(hours.len(), 2);
    let pcts = |b: &pb::UsageBucket| {
        (
            b.request_count,
            b.p50_latency_ms,
            b.p95_latency_ms,
            b.p99_latency_ms,
        )
    };
    // Ranks 26, 49, 51 of 51; ranks 25, 47, 49 of 49.
    assert_eq!(
        pcts(&hours[0]),
        (51, upper(200.0), upper(2000.0), upper(20_000.0))
    );
    assert_eq!(
        pcts(&hours[1]),
        (49, upper(20.0), upper(200.0), upper(2000.0))
    );
}

#[tokio::test]
async fn buckets_split_at_utc_hour_and_day_boundaries() {
    let mut h = Harness::start().await;
    let b = h.backend("b", pb::Pool::Primary, &[("m1", 1.0, 1.0)]).await;
    let times = [
        DAY0 - 1,        // 23:59:59.999 the day before
        DAY0,            // 00:00:00.000
        DAY0 + HOUR - 1, // 00:59:59.999
        DAY0 + HOUR,     // 01:00:00.000
        DAY0 + DAY - 1,  // 23:59:59.999
        DAY0 + DAY,      // next day 00:00
    ];
    let recs: Vec<Rec> = times.iter().map(|&t| Rec::new(&b, t)).collect();
    assert_eq!(h.report("r", "i", numbered(&recs)).await, 6);
    let starts = |buckets: Vec<pb::UsageBucket>| -> Vec<(i64, u64)> {
        buckets
            .iter()
            .map(|b| (ms_of(&b.start_time), b.request_count))
            .collect()
    };
    let hours = starts(
        h.usage(pb::GetUsageRequest {
            granularity: pb::Granularity::Hour as i32,
            ..Default::default()
        })
        .await,
    );
    assert_eq!(
        hours,
        vec![
            (DAY0 - HOUR, 1),
            (DAY0, 2),
            (DAY0 + HOUR, 1),
            (DAY0 + DAY - HOUR, 1),
            (DAY0 + DAY, 1)
        ]
    );
    let days = starts(
        h.usage(pb::GetUsageRequest {
            granularity: pb::Granularity::Day as i32,
            ..Default::default()
        })
        .await,
    );
    assert_eq!(days, vec![(DAY0 - DAY, 1), (DAY0, 4), (DAY0 + DAY, 1)]);
    // A day-aligned range takes whole days; one ending a millisecond into an hour takes that hour.
    let in_range = |h: &mut Harness, start: i64, end: i64| {
        let request = pb::GetTotalsRequest {
            start_time: ts(start),
            end_time: ts(end),
            ..Default::default()
        };
        let stats = h.stats.clone();
        async move {
            let mut stats = stats;
            stats
                .get_totals(request)
                .await
                .unwrap()
                .into_inner()
                .request_count
        }
    };
    assert_eq!(in_range(&mut h, DAY0, DAY0 + DAY).await, 4);
    assert_eq!(in_range(&mut h, DAY0 - DAY, DAY0).await, 1);
    assert_eq!(in_range(&mut h, DAY0, DAY0 + HOUR).await, 2);
    assert_eq!(in_range(&mut h, DAY0, DAY0 + HOUR + 1).await, 3);
    assert_eq!(in_range(&mut h, DAY0 + HOUR - 1, DAY0 + DAY + 1).await, 5);
}

#[tokio::test]
async fn each_filter_excludes_what_it_should() {
    let mut h = Harness::start().await;
    let backends = three_backends(&mut h).await;
    let recs = varied_traffic(&backends, 1500, 2);
    assert_eq!(h.report("r", "i", numbered(&recs)).await, 1500);
    let price = prices(&backends);
    let start = DAY0 - DAY + 5 * HOUR + 30 * 60_000; // mid-hour: the whole hour counts
    let end = DAY0 + DAY + 7 * HOUR; // on the hour: that hour does not count
    let in_range = move |r: &Rec| r.time_ms >= start - 30 * 60_000 && r.time_ms < end;
    type Case = (pb::GetTotalsRequest, Box<dyn Fn(&Rec) -> bool>);
    let b1 = backends[1].clone();
    let b1_ = b1.clone();
    let cases: Vec<Case> = vec![
        (
            pb::GetTotalsRequest {
                backend_id: b1.clone(),
                ..Default::default()
            },
            Box::new(move |r| r.backend == b1_),
        ),
        (
            pb::GetTotalsRequest {
                model: "m2".into(),
                ..Default::default()
            },
            Box::new(|r| r.model == "m2"),
        ),
        (
            pb::GetTotalsRequest {
                client_key_id: "key-c".into(),
                ..Default::default()
            },
            Box::new(|r| r.key == "key-c"),
        ),
        (
            pb::GetTotalsRequest {
                start_time: ts(start),
                end_time: ts(end),
                ..Default::default()
            },
            Box::new(in_range),
        ),
        (
            pb::GetTotalsRequest {
                start_time: ts(start),
                end_time: ts(end),
                backend_id: b1.clone(),
                model: "m1".into(),
                client_key_id: "key-a".into(),
                ..Default::default()
            },
            Box::new(move |r| {
                r.backend == b1 && r.model == "m1" && r.key == "key-a" && in_range(r)
            }),
        ),
        (
            pb::GetTotalsRequest {
                backend_id: "no-such-backend".into(),
                ..Default::default()
            },
            Box::new(|_| false),
        ),
    ];
    for (request, keep) in cases {
        let want = expected(recs.iter().filter(|r| keep(r)), &price);
        assert!(
            want.requests < recs.len() as u64,
            "the filter excludes something"
        );
        let t = h.totals(request.clone()).await;
        assert_totals(&t, &want);
        // GetUsage applies the same filter.
        for granularity in GRANULARITIES {
            let buckets = h
                .usage(pb::GetUsageRequest {
                    granularity: granularity as i32,
                    start_time: request.start_time,
                    end_time: request.end_time,
                    backend_id: request.backend_id.clone(),
                    model: request.model.clone(),
                    client_key_id: request.client_key_id.clone(),
                    group_by: pb::GroupBy::ClientKey as i32,
                    ..Default::default()
                })
                .await;
            let n: u64 = buckets.iter().map(|b| b.request_count).sum();
            assert_eq!(n, want.requests, "{granularity:?} {request:?}");
        }
    }
    // An end before the start is refused.
    let err = h
        .stats
        .get_totals(pb::GetTotalsRequest {
            start_time: ts(end),
            end_time: ts(start),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn whole_days_from_the_daily_rollup_equal_the_same_hours_from_hourly_rows() {
    let mut h = Harness::start().await;
    let backends = three_backends(&mut h).await;
    // Traffic only between 02:00 and 22:00 of each day, so [day, day + 24 h) (whole days,
    // daily rows) and [day + 1 h, day + 23 h) (hourly rows) hold the same records.
    let recs: Vec<Rec> = varied_traffic(&backends, 4000, 3)
        .into_iter()
        .filter(|r| (2 * HOUR..22 * HOUR).contains(&r.time_ms.rem_euclid(DAY)))
        .collect();
    assert_eq!(h.report("r", "i", numbered(&recs)).await, recs.len() as u64);
    for (whole, hours) in [
        ((DAY0, DAY0 + DAY), (DAY0 + HOUR, DAY0 + 23 * HOUR)),
        (
            (DAY0 - DAY, DAY0 + 2 * DAY),
            (DAY0 - DAY + HOUR, DAY0 + DAY + 23 * HOUR),
        ),
    ] {
        for (backend, model, key) in [
            ("", "", ""),
            (backends[0].as_str(), "", ""),
            ("", "m2", ""),
            ("", "", "key-b"),
        ] {
            let totals = |(start, end): (i64, i64)| pb::GetTotalsRequest {
                start_time: ts(start),
                end_time: ts(end),
                backend_id: backend.into(),
                model: model.into(),
                client_key_id: key.into(),
                ..Default::default()
            };
            let a = h.totals(totals(whole)).await;
            let b = h.totals(totals(hours)).await;
            assert!(a.request_count > 0);
            assert_same(&a, &b);
            for by in GROUPINGS {
                let usage = |(start, end): (i64, i64)| pb::GetUsageRequest {
                    granularity: pb::Granularity::Day as i32,
                    start_time: ts(start),
                    end_time: ts(end),
                    backend_id: backend.into(),
                    model: model.into(),
                    client_key_id: key.into(),
                    group_by: by as i32,
                    ..Default::default()
                };
                let a = h.usage(usage(whole)).await;
                let b = h.usage(usage(hours)).await;
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(&b) {
                    assert_eq!(
                        (&x.start_time, &x.group_key, &x.group_label),
                        (&y.start_time, &y.group_key, &y.group_label)
                    );
                    assert_same(&as_totals(x), &as_totals(y));
                }
            }
        }
    }
}

/// One replica's reporter: sends `records` in batches of `batch` over streams that are cut
/// after `per_stream` batches, without reading every ack, and on each reconnect resends
/// everything after the last ack it read (as the data plane does).
async fn replica(
    dp: DataPlane,
    node: String,
    incarnation: String,
    records: Vec<pb::UsageRecord>,
    batch_len: usize,
    per_stream: usize,
) -> u64 {
    let mut acked = 0u64;
    let last = records.last().map_or(0, |r| r.sequence);
    let mut streams = 0;
    while acked < last {
        streams += 1;
        let pending: Vec<pb::UsageRecord> = records
            .iter()
            .filter(|r| r.sequence > acked)
            .cloned()
            .collect();
        let batches: Vec<pb::ReportUsageRequest> = pending
            .chunks(batch_len)
            .take(per_stream)
            .map(|c| batch(&node, &incarnation, c.to_vec()))
            .collect();
        let sent = batches.len();
        let (tx, rx) = tokio::sync::mpsc::channel(sent.max(1));
        for b in batches {
            tx.send(b).await.unwrap();
        }
        let mut dp = dp.clone();
        let mut acks = dp
            .report_usage(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        // Read only the first ack, then cut the stream: the later batches may or may not
        // have been applied, and are resent.
        let ack = tokio::time::timeout(Duration::from_secs(10), acks.message())
            .await
            .expect("an ack within 10 s")
            .unwrap()
            .unwrap();
        assert!(ack.acked_sequence >= acked, "acks never go backwards");
        acked = ack.acked_sequence;
        if sent == 1 {
            // Let the last stream close cleanly.
            drop(tx);
        }
    }
    assert!(streams > 1, "the replica reconnected");
    acked
}

#[tokio::test]
async fn two_replicas_reporting_concurrently_with_reconnects_count_every_record_once() {
    let mut h = Harness::start().await;
    let backends = three_backends(&mut h).await;
    let recs = varied_traffic(&backends, 6000, 4);
    let (first, second) = recs.split_at(2000);
    let (second, third) = second.split_at(2000);
    // Replica 1 runs throughout; replica 2 restarts (a new incarnation numbering from 1 again).
    let r1 = tokio::spawn(replica(
        h.data_plane().await,
        "replica-1".into(),
        "inc-1".into(),
        numbered(first),
        70,
        4,
    ));
    let r2 = {
        let dp = h.data_plane().await;
        let (second, third) = (numbered(second), numbered(third));
        tokio::spawn(async move {
            let a = replica(
                dp.clone(),
                "replica-2".into(),
                "inc-a".into(),
                second,
                50,
                3,
            )
            .await;
            let b = replica(dp, "replica-2".into(), "inc-b".into(), third, 120, 2).await;
            (a, b)
        })
    };
    assert_eq!(r1.await.unwrap(), 2000);
    assert_eq!(r2.await.unwrap(), (2000, 2000));
    let price = prices(&backends);
    assert_totals(
        &h.totals(Default::default()).await,
        &expected(&recs, &price),
    );
    // Resending everything once more changes nothing.
    assert_eq!(h.report("replica-1", "inc-1", numbered(first)).await, 2000);
    assert_eq!(h.report("replica-2", "inc-b", numbered(third)).await, 2000);
    assert_totals(
        &h.totals(Default::default()).await,
        &expected(&recs, &price),
    );
}

/// Batches sent without waiting are committed together (group commit), yet every batch
/// gets its own ack, in order; a bad batch ends the stream only after the acks owed for
/// the batches before it.
#[tokio::test]
async fn pipelined_batches_are_acked_in_order_and_an_error_comes_after_the_owed_acks() {
    let mut h = Harness::start().await;
    let backends = three_backends(&mut h).await;
    let recs = numbered(&varied_traffic(&backends, 3000, 9));
    let mut batches: Vec<pb::ReportUsageRequest> = recs
        .chunks(100)
        .map(|c| batch("replica-1", "inc-1", c.to_vec()))
        .collect();
    let bad = batch("replica-1", "", recs[..1].to_vec());
    batches.push(bad);
    let mut dp = h.data_plane().await;
    let mut acks = dp
        .report_usage(tokio_stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let status = loop {
        match acks.message().await {
            Ok(Some(ack)) => seen.push(ack.acked_sequence),
            Ok(None) => panic!("the stream ended without the error"),
            Err(status) => break status,
        }
    };
    let want: Vec<u64> = (1..=30).map(|i| i * 100).collect();
    assert_eq!(seen, want, "one ack per batch, in order");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let price = prices(&backends);
    let all: Vec<Rec> = varied_traffic(&backends, 3000, 9);
    assert_totals(&h.totals(Default::default()).await, &expected(&all, &price));
}

#[tokio::test]
async fn retention_deletes_old_hourly_rows_and_keeps_day_totals() {
    // The harness keeps everything until this test runs the pass itself (the pass at start
    // may still be on its way).
    let mut h = Harness::start().await;
    let b = h.backend("b", pb::Pool::Primary, &[("m1", 1.0, 2.0)]).await;
    let now = chrono_now_ms();
    let today = now.div_euclid(DAY) * DAY;
    let old_day = today - 100 * DAY;
    let recent_day = today - 3 * DAY;
    let recs: Vec<Rec> = [
        old_day + 5 * HOUR,
        old_day + 9 * HOUR,
        recent_day + 5 * HOUR,
    ]
    .iter()
    .flat_map(|&t| (0..3).map(move |i| (t, i)))
    .map(|(t, i)| Rec {
        latency_ms: 10.0 * f64::from(i + 1),
        ..Rec::new(&b, t)
    })
    .collect();
    assert_eq!(h.report("r", "i", numbered(&recs)).await, 9);
    let days_request = pb::GetUsageRequest {
        granularity: pb::Granularity::Day as i32,
        ..Default::default()
    };
    let hours_request = pb::GetUsageRequest {
        granularity: pb::Granularity::Hour as i32,
        ..Default::default()
    };
    let days_before = h.usage(days_request.clone()).await;
    let totals_before = h.totals(Default::default()).await;
    assert_eq!(totals_before.hours_kept_since, None, "every hour kept");
    assert_eq!(h.usage(hours_request.clone()).await.len(), 3);
    // A start equal to its end inside an hour reads that hour, as the totals do.
    let instant = ts(recent_day + 5 * HOUR + 30 * 60_000);
    let one_hour = h
        .usage(pb::GetUsageRequest {
            start_time: instant,
            end_time: instant,
            ..hours_request.clone()
        })
        .await;
    assert_eq!(one_hour.len(), 1);
    assert_eq!(ms_of(&one_hour[0].start_time), recent_day + 5 * HOUR);
    assert_eq!(one_hour[0].request_count, 3);

    let store = h.cp.store().unwrap().clone();
    assert_eq!(store.apply_usage_retention(now).await.unwrap(), 0);
    h.set_retention_days(90).await;
    assert_eq!(store.apply_usage_retention(now).await.unwrap(), 2);
    let hours: Vec<i64> = h
        .usage(hours_request.clone())
        .await
        .iter()
        .map(|b| ms_of(&b.start_time))
        .collect();
    assert_eq!(hours, vec![recent_day + 5 * HOUR]);
    let days_after = h.usage(days_request.clone()).await;
    assert_eq!(days_after.len(), 2);
    for (x, y) in days_before.iter().zip(&days_after) {
        assert_eq!(x.start_time, y.start_time);
        assert_same(&as_totals(x), &as_totals(y));
    }
    assert_same(&h.totals(Default::default()).await, &totals_before);
    // A whole old day still answers; its hours are gone.
    let old = h
        .totals(pb::GetTotalsRequest {
            start_time: ts(old_day),
            end_time: ts(old_day + DAY),
            ..Default::default()
        })
        .await;
    assert_eq!(old.request_count, 6);
    let old_half_day = pb::GetTotalsRequest {
        start_time: ts(old_day),
        end_time: ts(old_day + 12 * HOUR),
        ..Default::default()
    };
    let old_hours = h.totals(old_half_day.clone()).await;
    assert_eq!(old_hours.request_count, 0);
    // The answers say so: hours before the retention's cutoff (90 days before the newest
    // stored hour's day) are kept by the day alone.
    assert_eq!(old_hours.hours_kept_since, ts(recent_day - 90 * DAY));
    let hours_page = h
        .stats
        .get_usage(hours_request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hours_page.hours_kept_since, ts(recent_day - 90 * DAY));
    assert_eq!(store.apply_usage_retention(now).await.unwrap(), 0);

    // 0 keeps everything; 2 days drops the recent day's hours too, once today has usage
    // (the days count back from the newest stored hour when it is older than today).
    h.set_retention_days(0).await;
    // A retention raised, or set to 0, brings no deleted hour back: the answers still say
    // where the hours begin (they said every hour was kept).
    let old_hours = h.totals(old_half_day).await;
    assert_eq!(old_hours.hours_kept_since, ts(recent_day - 90 * DAY));
    let recent = Rec::new(&b, recent_day + 6 * HOUR);
    assert_eq!(h.report("r", "i", vec![recent.to_proto(10)]).await, 10);
    assert_eq!(store.apply_usage_retention(now).await.unwrap(), 0);
    h.set_retention_days(2).await;
    assert_eq!(store.apply_usage_retention(now).await.unwrap(), 0);
    let current = Rec::new(&b, today);
    assert_eq!(h.report("r", "i", vec![current.to_proto(11)]).await, 11);
    assert_eq!(store.apply_usage_retention(now).await.unwrap(), 2);
    let hours: Vec<i64> = h
        .usage(hours_request)
        .await
        .iter()
        .map(|b| ms_of(&b.start_time))
        .collect();
    assert_eq!(hours, vec![today]);
    assert_eq!(h.totals(Default::default()).await.request_count, 11);
}

#[tokio::test]
async fn the_control_plane_applies_retention_when_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin =
        AdminServiceClient::with_interceptor(channel(&cp).await, Bearer(cp.admin_token.clone()));
    admin
        .update_settings(pb::UpdateSettingsRequest {
            settings: Some(pb::Settings {
                usage_retention_days: 30,
                ..Default::default()
            }),
            update_mask: Some(wkt::FieldMask {
                paths: vec!["usage_retention_days".into()],
            }),
        })
        .await
        .unwrap();
    // An old record and one of now (retention counts back from the newest stored hour).
    let old = Rec::new("b", chrono_now_ms() - 40 * DAY);
    let current = Rec::new("b", chrono_now_ms());
    let mut dp = DataPlaneServiceClient::with_interceptor(
        channel(&cp).await,
        Bearer(cp.dataplane_token.clone()),
    );
    let mut acks = dp
        .report_usage(tokio_stream::iter(vec![batch(
            "r",
            "i",
            vec![old.to_proto(1), current.to_proto(2)],
        )]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.message().await.unwrap().unwrap().acked_sequence, 2);
    drop(acks);
    cp.shutdown().await;

    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut stats =
        StatsServiceClient::with_interceptor(channel(&cp).await, Bearer(cp.admin_token.clone()));
    let hourly = || {
        let mut stats = stats.clone();
        async move {
            stats
                .get_usage(pb::GetUsageRequest {
                    granularity: pb::Granularity::Hour as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .buckets
                .len()
        }
    };
    // The pass at start runs beside the server; wait for it.
    tokio::time::timeout(Duration::from_secs(10), async {
        while hourly().await > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the old hourly row is deleted at start");
    let totals = stats
        .get_totals(pb::GetTotalsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(totals.request_count, 2);
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// (group key, requests, distinct backends) of each bucket, in the order given.
fn pool_rows(buckets: &[pb::UsageBucket]) -> Vec<(i64, String, u64, u64)> {
    buckets
        .iter()
        .map(|b| {
            (
                b.start_time.map_or(-1, |_| ms_of(&b.start_time)),
                b.group_key.clone(),
                b.request_count,
                b.backend_count,
            )
        })
        .collect()
}

/// Traffic over three days and both pools, with a backend moved from one pool to the other
/// on the last day; every figure below is counted by hand from this list.
async fn traffic_over_three_days_and_two_pools(h: &mut Harness) {
    let a = h.backend("a", pb::Pool::Primary, &[("m1", 1.0, 2.0)]).await;
    let b = h.backend("b", pb::Pool::Primary, &[("m1", 1.0, 2.0)]).await;
    let c = h
        .backend("c", pb::Pool::Fallback, &[("m2", 1.0, 2.0)])
        .await;
    let at = |backend: &str, model: &'static str, ms: i64, n: usize| {
        let one = Rec {
            model,
            ..Rec::new(backend, ms)
        };
        vec![one; n].into_iter()
    };
    let before_move: Vec<Rec> = at(&a, "m1", DAY0 + 10 * HOUR, 2)
        .chain(at(&b, "m1", DAY0 + 10 * HOUR, 1))
        .chain(at(&c, "m2", DAY0 + 10 * HOUR, 1))
        .chain(at(&a, "m1", DAY0 + DAY + 10 * HOUR, 1))
        .chain(at(&c, "m2", DAY0 + DAY + 10 * HOUR, 2))
        .chain(at("", "m1", DAY0 + DAY + 10 * HOUR, 1))
        .chain(at(&c, "m2", DAY0 + 2 * DAY + 5 * HOUR, 1))
        .chain(at(&b, "m1", DAY0 + 2 * DAY + 10 * HOUR, 3))
        .collect();
    assert_eq!(h.report("r", "i", numbered(&before_move)).await, 12);
    h.admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: b.clone(),
                pool: pb::Pool::Fallback as i32,
                ..Default::default()
            }),
            update_mask: Some(wkt::FieldMask {
                paths: vec!["pool".into()],
            }),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    let after_move = Rec::new(&b, DAY0 + 2 * DAY + 20 * HOUR).to_proto(13);
    assert_eq!(h.report("r", "i", vec![after_move]).await, 13);
}

#[tokio::test]
async fn usage_by_pool_counts_the_distinct_backends_of_each_bucket() {
    let mut h = Harness::start().await;
    traffic_over_three_days_and_two_pools(&mut h).await;
    let (d0, d1, d2) = (DAY0, DAY0 + DAY, DAY0 + 2 * DAY);
    let row = |t: i64, g: &str, n: u64, b: u64| (t, g.to_owned(), n, b);

    // Daily, by pool: the pool is the one a backend had when its records arrived (b is
    // primary at 10:00 on the third day and fallback at 20:00); requests that reached no
    // backend form the empty group and count no backend.
    let days_by_pool = h
        .usage(pb::GetUsageRequest {
            granularity: pb::Granularity::Day as i32,
            group_by: pb::GroupBy::Pool as i32,
            ..Default::default()
        })
        .await;
    assert_eq!(
        pool_rows(&days_by_pool),
        vec![
            row(d0, "fallback", 1, 1),
            row(d0, "primary", 3, 2),
            row(d1, "", 1, 0),
            row(d1, "fallback", 2, 1),
            row(d1, "primary", 1, 1),
            row(d2, "fallback", 2, 2),
            row(d2, "primary", 3, 1),
        ]
    );
    assert!(days_by_pool.iter().all(|b| b.group_label == b.group_key));

    // Daily, not grouped: every backend of the day, each once.
    let days = h
        .usage(pb::GetUsageRequest {
            granularity: pb::Granularity::Day as i32,
            ..Default::default()
        })
        .await;
    assert_eq!(
        pool_rows(&days),
        vec![row(d0, "", 4, 3), row(d1, "", 4, 2), row(d2, "", 5, 2)]
    );

    // Hourly, by pool, on the third day.
    let hours = h
        .usage(pb::GetUsageRequest {
            granularity: pb::Granularity::Hour as i32,
            group_by: pb::GroupBy::Pool as i32,
            start_time: ts(d2),
            ..Default::default()
        })
        .await;
    assert_eq!(
        pool_rows(&hours),
        vec![
            row(d2 + 5 * HOUR, "fallback", 1, 1),
            row(d2 + 10 * HOUR, "primary", 3, 1),
            row(d2 + 20 * HOUR, "fallback", 1, 1),
        ]
    );

    // Totals, all time and per pool, in one call.
    let all = h
        .totals(pb::GetTotalsRequest {
            group_by: pb::GroupBy::Pool as i32,
            ..Default::default()
        })
        .await;
    assert_eq!((all.request_count, all.backend_count), (13, 3));
    assert_eq!(
        pool_rows(&all.groups),
        vec![
            row(-1, "", 1, 0),
            row(-1, "fallback", 5, 2),
            row(-1, "primary", 7, 2)
        ]
    );

    // A range with hourly edges around a whole day: c served in the whole day (daily rows)
    // and on the last morning (hourly rows) and counts once.
    let range = h
        .totals(pb::GetTotalsRequest {
            start_time: ts(d0 + 11 * HOUR),
            end_time: ts(d2 + 21 * HOUR),
            group_by: pb::GroupBy::Pool as i32,
            ..Default::default()
        })
        .await;
    assert_eq!((range.request_count, range.backend_count), (9, 3));
    assert_eq!(
        pool_rows(&range.groups),
        vec![
            row(-1, "", 1, 0),
            row(-1, "fallback", 4, 2),
            row(-1, "primary", 4, 2)
        ]
    );
    // The groups add up to the totals.
    let sum: u64 = range.groups.iter().map(|g| g.request_count).sum();
    assert_eq!(sum, range.request_count);

    // Grouped by backend, each group is one backend.
    let by_backend = h
        .totals(pb::GetTotalsRequest {
            group_by: pb::GroupBy::Backend as i32,
            ..Default::default()
        })
        .await;
    let labels: Vec<(&str, u64, u64)> = by_backend
        .groups
        .iter()
        .map(|g| (g.group_label.as_str(), g.request_count, g.backend_count))
        .collect();
    let mut sorted = labels.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![("", 1, 0), ("a", 3, 1), ("b", 5, 1), ("c", 4, 1)]
    );
}

/// A deleted backend's usage stays under its id. Records of it ingested after the delete (a
/// replica's spool replayed, requests that were in flight) were filed under no pool, as if
/// they had reached no backend, and grouped by backend they showed a bare id: they keep its
/// pool now, and its name, marked deleted.
#[tokio::test]
async fn a_deleted_backends_usage_keeps_its_pool_and_its_name() {
    let mut h = Harness::start().await;
    let b = h
        .backend("gone-soon", pb::Pool::Fallback, &[("m1", 1.0, 1.0)])
        .await;
    assert_eq!(
        h.report("r", "i", numbered(&[Rec::new(&b, DAY0 + 10)]))
            .await,
        1
    );
    h.admin
        .delete_backend(pb::DeleteBackendRequest { id: b.clone() })
        .await
        .unwrap();
    let after = Rec::new(&b, DAY0 + 20).to_proto(2);
    assert_eq!(h.report("r", "i", vec![after]).await, 2);
    let by_pool = h
        .totals(pb::GetTotalsRequest {
            group_by: pb::GroupBy::Pool as i32,
            ..Default::default()
        })
        .await;
    let pools: Vec<(&str, u64)> = by_pool
        .groups
        .iter()
        .map(|g| (g.group_key.as_str(), g.request_count))
        .collect();
    assert_eq!(pools, vec![("fallback", 2)]);
    let by_backend = h
        .totals(pb::GetTotalsRequest {
            group_by: pb::GroupBy::Backend as i32,
            ..Default::default()
        })
        .await;
    let labels: Vec<(&str, &str, u64)> = by_backend
        .groups
        .iter()
        .map(|g| {
            (
                g.group_key.as_str(),
                g.group_label.as_str(),
                g.request_count,
            )
        })
        .collect();
    assert_eq!(labels, vec![(b.as_str(), "gone-soon (deleted)", 2)]);
}

#[tokio::test]
async fn cost_comes_with_the_currency_of_the_settings() {
    let mut h = Harness::start().await;
    traffic_over_three_days_and_two_pools(&mut h).await;
    let totals = h.totals(Default::default()).await;
    assert_eq!(totals.currency, "USD");
    // 12 records served by a backend, of 100 prompt and 50 completion tokens at 1 and 2
    // per million (the one that reached no backend costs nothing).
    assert!(
        close(totals.cost, 12.0 * (100.0 + 100.0) / 1e6),
        "{}",
        totals.cost
    );
    h.admin
        .update_settings(pb::UpdateSettingsRequest {
            settings: Some(pb::Settings {
                currency: "EUR".into(),
                ..Default::default()
            }),
            update_mask: Some(wkt::FieldMask {
                paths: vec!["currency".into()],
            }),
        })
        .await
        .unwrap();
    let totals = h
        .totals(pb::GetTotalsRequest {
            group_by: pb::GroupBy::Model as i32,
            ..Default::default()
        })
        .await;
    assert_eq!(totals.currency, "EUR");
    assert!(totals.groups.iter().all(|g| g.currency == "EUR"));
    let buckets = h.usage(Default::default()).await;
    assert!(!buckets.is_empty() && buckets.iter().all(|b| b.currency == "EUR"));
    let refused = h
        .admin
        .update_settings(pb::UpdateSettingsRequest {
            settings: Some(pb::Settings {
                currency: "euro".into(),
                ..Default::default()
            }),
            update_mask: Some(wkt::FieldMask {
                paths: vec!["currency".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("settings.currency"),
        "{}",
        refused.message()
    );
}

#[tokio::test]
async fn pages_follow_each_other_newest_first_across_a_day_boundary() {
    let mut h = Harness::start().await;
    traffic_over_three_days_and_two_pools(&mut h).await;
    let (d0, d1, d2) = (DAY0, DAY0 + DAY, DAY0 + 2 * DAY);
    let row = |t: i64, g: &str, n: u64, b: u64| (t, g.to_owned(), n, b);
    let request = |token: String| pb::GetUsageRequest {
        granularity: pb::Granularity::Day as i32,
        group_by: pb::GroupBy::Pool as i32,
        order: pb::UsageOrder::NewestFirst as i32,
        page_size: 2,
        page_token: token,
        ..Default::default()
    };
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .stats
            .get_usage(request(token))
            .await
            .unwrap()
            .into_inner();
        pages.push(pool_rows(&page.buckets));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
        assert!(pages.len() < 10, "the pages never end");
    }
    // Newest day first, the groups of a day in key order; the second and third pages
    // split the middle day.
    assert_eq!(
        pages,
        vec![
            vec![row(d2, "fallback", 2, 2), row(d2, "primary", 3, 1)],
            vec![row(d1, "", 1, 0), row(d1, "fallback", 2, 1)],
            vec![row(d1, "primary", 1, 1), row(d0, "fallback", 1, 1)],
            vec![row(d0, "primary", 3, 2)],
        ]
    );

    // A token belongs to its query: another grouping or filter refuses it.
    let first = h.stats.get_usage(request(String::new())).await.unwrap();
    let token = first.into_inner().next_page_token;
    let other = pb::GetUsageRequest {
        group_by: pb::GroupBy::Backend as i32,
        ..request(token.clone())
    };
    let refused = h.stats.get_usage(other).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("page_token"),
        "{}",
        refused.message()
    );
    let garbage = h.stats.get_usage(request("x!".into())).await.unwrap_err();
    assert_eq!(garbage.code(), tonic::Code::InvalidArgument);
    let negative = pb::GetUsageRequest {
        page_size: -1,
        ..request(String::new())
    };
    let refused = h.stats.get_usage(negative).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // An old client sends neither page_size nor order: every bucket, oldest first, no token.
    let old = h
        .stats
        .get_usage(pb::GetUsageRequest {
            granularity: pb::Granularity::Day as i32,
            group_by: pb::GroupBy::Pool as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(old.next_page_token.is_empty());
    let mut newest_first: Vec<_> = pages.concat();
    newest_first.sort_by_key(|(t, g, _, _)| (*t, g.clone()));
    assert_eq!(pool_rows(&old.buckets), newest_first);
}

/// A year of hourly rows for many models would answer in more than the 4 MiB a default
/// gRPC client accepts. Paged, a default client reads all of it, and the pages joined are
/// the one large answer.
#[tokio::test]
async fn an_answer_past_four_mib_is_read_in_pages_by_a_default_client() {
    use sluice_proto::limits::{DEFAULT_CLIENT_DECODE_BYTES, MAX_ADMIN_RESPONSE_BYTES};
    let h = Harness::start().await;
    // 30 models with names at the 256-byte limit, each used in 250 hours: 7,500 buckets.
    let models: Vec<String> = (0..30)
        .map(|m| format!("{m:03}{}", "x".repeat(253)))
        .collect();
    let mut records = Vec::new();
    for hour in 0..250 {
        for model in &models {
            let mut r = Rec::new("", DAY0 + hour * HOUR).to_proto(records.len() as u64 + 1);
            r.model = model.clone();
            records.push(r);
        }
    }
    let total = records.len();
    for chunk in records.chunks(2500) {
        h.report("r", "i", chunk.to_vec()).await;
    }
    let request = |token: String, page_size: i32| pb::GetUsageRequest {
        granularity: pb::Granularity::Hour as i32,
        group_by: pb::GroupBy::Model as i32,
        page_size,
        page_token: token,
        ..Default::default()
    };
    let large = StatsServiceClient::with_interceptor(
        channel(&h.cp).await,
        Bearer(h.cp.admin_token.clone()),
    )
    .max_decoding_message_size(MAX_ADMIN_RESPONSE_BYTES);
    let whole = large
        .clone()
        .get_usage(request(String::new(), 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(whole.buckets.len(), total);
    let size = prost::Message::encoded_len(&whole);
    assert!(size > DEFAULT_CLIENT_DECODE_BYTES, "{size} bytes");

    // A client with tonic's default limit cannot take it whole...
    let mut default = StatsServiceClient::with_interceptor(
        channel(&h.cp).await,
        Bearer(h.cp.admin_token.clone()),
    );
    let refused = default
        .get_usage(request(String::new(), 0))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    // ...but reads it in pages of the largest size (a larger page_size is capped).
    let mut joined = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = default
            .get_usage(request(token, i32::MAX))
            .await
            .unwrap()
            .into_inner();
        assert!(page.buckets.len() <= sluice_proto::limits::MAX_USAGE_PAGE_SIZE);
        pages += 1;
        joined.extend(page.buckets);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 2);
    assert_eq!(joined, whole.buckets);
}

/// An unpaged `GetUsage` past the most buckets it answers is refused, asking for pages,
/// before the answer is built (a script grouping by key over all time made the control plane
/// build every bucket, about 1 KB each, before the size check refused it); the same query
/// paged still reads it all.
#[tokio::test]
async fn an_unpaged_answer_past_its_most_buckets_is_refused_before_it_is_built() {
    use sluice_control::api::stats::MAX_UNPAGED_BUCKETS;
    use sluice_proto::limits::MAX_ADMIN_RESPONSE_BYTES;
    let h = Harness::start().await;
    let models = 101;
    let hours = MAX_UNPAGED_BUCKETS as i64 / models + 1;
    let mut records = Vec::new();
    for hour in 0..hours {
        for m in 0..models {
            let mut r = Rec::new("", DAY0 + hour * HOUR).to_proto(records.len() as u64 + 1);
            r.model = format!("m{m}");
            records.push(r);
        }
    }
    assert!(records.len() > MAX_UNPAGED_BUCKETS);
    for chunk in records.chunks(5000) {
        h.report("r", "i", chunk.to_vec()).await;
    }
    let request = |page_size: i32, token: String| pb::GetUsageRequest {
        granularity: pb::Granularity::Hour as i32,
        group_by: pb::GroupBy::Model as i32,
        page_size,
        page_token: token,
        ..Default::default()
    };
    let mut stats = StatsServiceClient::with_interceptor(
        channel(&h.cp).await,
        Bearer(h.cp.admin_token.clone()),
    )
    .max_decoding_message_size(MAX_ADMIN_RESPONSE_BYTES);
    let refused = match stats.get_usage(request(0, String::new())).await {
        Ok(answer) => panic!(
            "served {} buckets unpaged",
            answer.into_inner().buckets.len()
        ),
        Err(refused) => refused,
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("page_size"), "{refused:?}");
    let (mut read, mut token) = (0, String::new());
    loop {
        let page = stats
            .get_usage(request(i32::MAX, token))
            .await
            .unwrap()
            .into_inner();
        read += page.buckets.len();
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(read, records.len());
}

/// A sequence past what SQLite's signed integers hold is refused with the whole report: stored,
/// its high-water mark would read back as 0, and every record of the replica could then be
/// counted again.
#[tokio::test]
async fn a_report_numbered_past_the_largest_stored_sequence_is_refused() {
    let mut h = Harness::start().await;
    let b = h.backend("b", pb::Pool::Primary, &[("m1", 1.0, 1.0)]).await;
    let rec = Rec::new(&b, DAY0 + 10);
    let mut dp = h.data_plane().await;
    let mut acks = dp
        .report_usage(tokio_stream::iter(vec![batch(
            "r",
            "i",
            vec![rec.to_proto(1 << 63)],
        )]))
        .await
        .unwrap()
        .into_inner();
    let refused = acks.message().await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("sequences"), "{refused:?}");
    assert_eq!(h.totals(Default::default()).await.request_count, 0);
    // The replica's records numbered as data planes number them are counted, once.
    assert_eq!(h.report("r", "i", vec![rec.to_proto(1)]).await, 1);
    assert_eq!(h.report("r", "i", vec![rec.to_proto(1)]).await, 1);
    assert_eq!(h.totals(Default::default()).await.request_count, 1);
}

/// Grouped totals in pages (`page_size`, `next_page_token`): every group once, each with the
/// figures of the unpaged answer, the totals the same on every page, over a range read from
/// hourly edges and whole days; a token belongs to its query.
#[tokio::test]
async fn grouped_totals_come_in_pages_that_add_up_to_the_whole() {
    const KEYS: [&str; 7] = ["k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    let mut h = Harness::start().await;
    let backends = three_backends(&mut h).await;
    let mut recs = varied_traffic(&backends, 3000, 5);
    for (i, r) in recs.iter_mut().enumerate() {
        r.key = KEYS[i % KEYS.len()];
    }
    assert_eq!(h.report("r", "i", numbered(&recs)).await, recs.len() as u64);
    let range = |by: pb::GroupBy, page_size: i32, page_token: String| pb::GetTotalsRequest {
        start_time: ts(DAY0 - DAY + 5 * HOUR),
        end_time: ts(DAY0 + DAY + 7 * HOUR),
        group_by: by as i32,
        page_size,
        page_token,
        ..Default::default()
    };
    for by in [
        pb::GroupBy::ClientKey,
        pb::GroupBy::Model,
        pb::GroupBy::Backend,
        pb::GroupBy::Pool,
    ] {
        let whole = h.totals(range(by, 0, String::new())).await;
        assert!(whole.next_page_token.is_empty());
        let (mut groups, mut token, mut pages) = (Vec::new(), String::new(), 0);
        loop {
            let page = h.totals(range(by, 2, token)).await;
            assert!(page.groups.len() <= 2, "{by:?}");
            assert_same(&page, &whole);
            pages += 1;
            groups.extend(page.groups);
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        assert_eq!(pages, whole.groups.len().div_ceil(2).max(1), "{by:?}");
        let keys = |groups: &[pb::UsageBucket]| {
            groups
                .iter()
                .map(|g| g.group_key.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&groups), keys(&whole.groups), "{by:?}");
        for (paged, unpaged) in groups.iter().zip(&whole.groups) {
            assert_same(&as_totals(paged), &as_totals(unpaged));
            assert_eq!(paged.group_label, unpaged.group_label);
        }
    }
    assert_eq!(
        h.totals(range(pb::GroupBy::ClientKey, 0, String::new()))
            .await
            .groups
            .len(),
        KEYS.len()
    );
    // A token of another query, and a negative page size, are refused.
    let first = h
        .totals(range(pb::GroupBy::ClientKey, 3, String::new()))
        .await;
    let other = pb::GetTotalsRequest {
        model: "m1".into(),
        ..range(pb::GroupBy::ClientKey, 3, first.next_page_token)
    };
    for refused in [other, range(pb::GroupBy::ClientKey, -1, String::new())] {
        let status = h.stats.get_totals(refused).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
}

/// More groups than an unpaged answer holds (100,000 client keys and one): refused before it
/// is built, with the way out, and read whole in pages.
#[tokio::test]
async fn unpaged_totals_past_the_most_groups_are_refused_and_read_in_pages() {
    use sluice_control::api::stats::MAX_UNPAGED_BUCKETS;
    let h = Harness::start().await;
    let keys: Vec<String> = (0..=MAX_UNPAGED_BUCKETS)
        .map(|k| format!("key-{k}"))
        .collect();
    let mut records = Vec::new();
    for key in &keys {
        let mut r = Rec::new("", DAY0).to_proto(records.len() as u64 + 1);
        r.client_key_id = key.clone();
        records.push(r);
    }
    for chunk in records.chunks(5000) {
        h.report("r", "i", chunk.to_vec()).await;
    }
    let request = |page_size: i32, page_token: String| pb::GetTotalsRequest {
        group_by: pb::GroupBy::ClientKey as i32,
        page_size,
        page_token,
        ..Default::default()
    };
    let mut stats = StatsServiceClient::with_interceptor(
        channel(&h.cp).await,
        Bearer(h.cp.admin_token.clone()),
    );
    let refused = stats
        .get_totals(request(0, String::new()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.message().contains("page_size"), "{refused:?}");
    // Full pages fit what a client decodes by default.
    let (mut read, mut token) = (Vec::new(), String::new());
    loop {
        let page = stats
            .get_totals(request(i32::MAX, token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.request_count, keys.len() as u64);
        read.extend(page.groups.into_iter().map(|g| g.group_key));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let mut keys = keys;
    keys.sort();
    assert_eq!(read, keys);
}
