//! `sluice-bench-ingest`: how many usage records per second the control plane ingests, and how
//! fast the statistics queries answer over a year of usage.
//!
//! 1. Starts the real `sluice-control` on a fresh data directory, creates 100 backends, and
//!    streams `--records` usage records over `DataPlaneService.ReportUsage` in batches of
//!    `--batch`; the rate runs from the first send to the ack of the last record.
//! 2. Writes `--per-record` of the same records into another database one transaction per
//!    record, through the same store code (`Store::ingest_usage` with one record per call).
//! 3. Adds a generated year of hourly usage (100 backends × 3 models × 5 client keys) to the
//!    first database, restarts `sluice-control` on it and times every kind of `GetTotals` and
//!    `GetUsage` query over gRPC; then times the retention pass that deletes the hourly rows
//!    older than 90 days and checks that whole-day totals did not change.
//!
//! Prints Markdown tables on stdout (progress goes to stderr). Build with
//! `cargo build --release --bins && target/release/sluice-bench-ingest`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng as _};
use sluice_control::backend::BackendSpec;
use sluice_control::crypto::MasterKey;
use sluice_control::store::{Store, TotalsFilter, UsageRow};
use sluice_control::usage::histogram::{Histogram, latency_bucket};
use sluice_e2e::logs::{self, LogFormat};
use sluice_e2e::process::{self, Child};
use sluice_proto::v1 as pb;
use sluice_proto::v1::admin_service_client::AdminServiceClient;
use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;
use sluice_proto::v1::stats_service_client::StatsServiceClient;
use sluice_proto::wkt::{Duration, Timestamp};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::Channel;

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef0123456789";
const DATAPLANE_TOKEN: &str = "bench-dataplane-token-0123456789abcdef01234567";
const BACKENDS: usize = 100;
const MODELS: [(&str, f64, f64); 3] = [
    ("gpt-4o-mini", 0.15, 0.60),
    ("gpt-4o", 2.50, 10.00),
    ("claude-sonnet", 3.00, 15.00),
];
const KEYS: usize = 5;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Usage ingestion and statistics query benchmark for the Sluice control plane.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Records streamed over gRPC.
    #[arg(long, default_value_t = 500_000)]
    records: u64,
    /// Records per ReportUsage message.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Records written one transaction per record.
    #[arg(long, default_value_t = 20_000)]
    per_record: u64,
    /// Days of generated hourly history for the query timings (0 skips the queries).
    #[arg(long, default_value_t = 365)]
    history_days: u32,
    /// Share of (hour, backend, model, key) combinations that saw traffic in the history.
    #[arg(long, default_value_t = 0.2)]
    history_density: f64,
    /// Directory holding sluice-control (default: this binary's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep the data directories here (default: a temporary directory, removed at the end).
    #[arg(long)]
    keep_dir: Option<PathBuf>,
    /// Format of the progress log on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logs::init(cli.log_format);
    ensure!(cli.batch > 0, "--batch must be at least 1");
    ensure!(
        (0.0..=1.0).contains(&cli.history_density),
        "--history-density must be between 0 and 1"
    );
    tokio::runtime::Runtime::new()
        .context("starting the tokio runtime")?
        .block_on(run(cli))
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    fn new(token: &str) -> anyhow::Result<Self> {
        Ok(Self(format!("Bearer {token}").parse()?))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// A running `sluice-control` on a data directory.
struct Control {
    child: Child,
    channel: Channel,
}

impl Control {
    async fn start(bin: &Path, data_dir: &Path, master_key: &str) -> anyhow::Result<Self> {
        let child = process::spawn(
            bin,
            [
                "--data-dir",
                &data_dir.display().to_string(),
                "--grpc-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ],
            [
                ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN),
                ("SLUICE_DATAPLANE_TOKEN", DATAPLANE_TOKEN),
                ("SLUICE_MASTER_KEY", master_key),
                ("RUST_LOG", "warn,sluice_control=info"),
            ],
        )?;
        let addr = child.wait_for_listening("grpc", START_TIMEOUT).await?;
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        Ok(Self { child, channel })
    }

    fn admin(
        &self,
    ) -> anyhow::Result<
        AdminServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>,
    > {
        Ok(AdminServiceClient::with_interceptor(
            self.channel.clone(),
            Bearer::new(ADMIN_TOKEN)?,
        ))
    }

    fn stats(
        &self,
    ) -> anyhow::Result<
        StatsServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>,
    > {
        // A year of days by backend is more than the default 4 MiB.
        Ok(
            StatsServiceClient::with_interceptor(self.channel.clone(), Bearer::new(ADMIN_TOKEN)?)
                .max_decoding_message_size(256 << 20),
        )
    }

    /// SIGTERM, then waits for a clean exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        self.child.terminate().await?;
        let status = tokio::time::timeout(std::time::Duration::from_secs(30), self.child.wait())
            .await
            .context("sluice-control did not stop within 30 s")??;
        ensure!(status.success(), "sluice-control exited with {status}");
        Ok(())
    }
}

fn backend_proto(i: usize) -> pb::Backend {
    pb::Backend {
        name: format!("backend-{i:03}"),
        base_url: format!("https://provider-{i:03}.example.com/v1"),
        // A fifth of the backends are fallbacks.
        pool: if i % 5 == 4 {
            pb::Pool::Fallback
        } else {
            pb::Pool::Primary
        } as i32,
        priority: 10,
        weight: 1,
        enabled: true,
        models: MODELS
            .iter()
            .map(|&(name, input, output)| pb::ModelRoute {
                default_max_tokens: Default::default(),
                max_output_tokens: Default::default(),
                name: name.into(),
                upstream_name: name.into(),
                input_price_per_mtok: input,
                output_price_per_mtok: output,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A latency drawn log-uniformly between 50 ms and ~13 s.
fn latency_ms(rng: &mut SmallRng) -> f64 {
    50.0 * 2f64.powf(rng.random_range(0.0..8.0))
}

fn duration(ms: f64) -> Duration {
    let ns = (ms * 1e6) as i64;
    Duration {
        seconds: ns / 1_000_000_000,
        nanos: (ns % 1_000_000_000) as i32,
    }
}

/// How the records spread over backends, models and client keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mix {
    /// As a gateway sees it: traffic falls off with rank (weight 1/rank) over backends,
    /// models and keys, so a few combinations carry most requests.
    Skewed,
    /// Every (backend, model, key) equally likely: a batch touches as many stored rows as it
    /// can, the worst case for the store.
    Uniform,
}

/// Picks an index in `0..n`, uniformly or with weight 1/(index + 1).
fn pick(rng: &mut SmallRng, n: usize, mix: Mix) -> usize {
    if mix == Mix::Uniform {
        return rng.random_range(0..n);
    }
    let total: f64 = (1..=n).map(|r| 1.0 / r as f64).sum();
    let mut x = rng.random_range(0.0..total);
    for r in 1..=n {
        x -= 1.0 / r as f64;
        if x < 0.0 {
            return r - 1;
        }
    }
    n - 1
}

/// Usage records as a data plane sends them: sequences 1..=n over every backend, model and
/// client key as `mix` says, timed within the last hour.
fn records(
    n: u64,
    backend_ids: &[String],
    now_ms: i64,
    mix: Mix,
    seed: u64,
) -> Vec<pb::UsageRecord> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (1..=n)
        .map(|sequence| {
            let stream = rng.random_bool(0.3);
            let error = rng.random_bool(0.05);
            let latency = latency_ms(&mut rng);
            let time_ms = now_ms - rng.random_range(0..HOUR_MS);
            pb::UsageRecord {
                sequence,
                request_id: format!("bench-{sequence}"),
                backend_id: backend_ids[pick(&mut rng, backend_ids.len(), mix)].clone(),
                model: MODELS[pick(&mut rng, MODELS.len(), mix)].0.into(),
                client_key_id: format!("key-{}", pick(&mut rng, KEYS, mix)),
                prompt_tokens: rng.random_range(10..4000),
                completion_tokens: if error { 0 } else { rng.random_range(1..1000) },
                latency: Some(duration(latency)),
                time_to_first_token: stream.then(|| duration(latency / 10.0)),
                status_code: if error { 502 } else { 200 },
                error_kind: if error {
                    pb::ErrorKind::UpstreamStatus as i32
                } else {
                    0
                },
                stream,
                time: Some(Timestamp {
                    seconds: time_ms.div_euclid(1000),
                    nanos: (time_ms.rem_euclid(1000) * 1_000_000) as i32,
                }),
                attempts: 1,
                ..Default::default()
            }
        })
        .collect()
}

/// Streams every record in batches over one ReportUsage call; returns the seconds from the
/// first send to the ack of the last sequence.
async fn stream_records(
    control: &Control,
    incarnation: &str,
    records: Vec<pb::UsageRecord>,
    batch: usize,
) -> anyhow::Result<f64> {
    let last = records.last().map_or(0, |r| r.sequence);
    let batches: Vec<pb::ReportUsageRequest> = records
        .chunks(batch)
        .map(|chunk| pb::ReportUsageRequest {
            node_id: "bench-replica".into(),
            incarnation: incarnation.into(),
            records: chunk.to_vec(),
            events: vec![],
            ..Default::default()
        })
        .collect();
    drop(records);
    let mut client = DataPlaneServiceClient::with_interceptor(
        control.channel.clone(),
        Bearer::new(DATAPLANE_TOKEN)?,
    )
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        for b in batches {
            if tx.send(b).await.is_err() {
                break;
            }
        }
        // Keep the stream open until the last ack has been read.
        tx.closed().await;
    });
    let mut acks = client
        .report_usage(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut acked = 0;
    while acked < last {
        match acks.message().await? {
            Some(ack) => acked = ack.acked_sequence,
            None => bail!("the usage stream ended at sequence {acked} of {last}"),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(acks);
    sender.abort();
    Ok(seconds)
}

/// The same records, one transaction each, through the store library.
async fn per_record(
    dir: &Path,
    grpc_backend_ids: &[String],
    records: &[pb::UsageRecord],
) -> anyhow::Result<f64> {
    let (store, _) = Store::open(&dir.join("sluice.db"), MasterKey::generate())?;
    // The same backends under this database's ids.
    let mut ids = std::collections::HashMap::new();
    for (i, grpc_id) in grpc_backend_ids.iter().enumerate() {
        let (backend, _) = store
            .create_backend(BackendSpec::from_proto(&backend_proto(i))?, String::new())
            .await?;
        ids.insert(grpc_id.clone(), backend.id);
    }
    let started = Instant::now();
    for r in records {
        let backend_id = ids.get(&r.backend_id).cloned().unwrap_or_default();
        let row = UsageRow {
            backend_id,
            ..UsageRow::from(r.clone())
        };
        store
            .ingest_usage("bench-replica".into(), "per-record".into(), vec![row])
            .await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn rate(n: u64, seconds: f64) -> f64 {
    n as f64 / seconds.max(1e-9)
}

fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let bin_dir = match cli.bin_dir.clone() {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let control_bin = bin_dir.join(format!("sluice-control{}", std::env::consts::EXE_SUFFIX));
    ensure!(
        control_bin.is_file(),
        "{} is missing: run `cargo build --release --bins` first",
        control_bin.display()
    );
    let profile = if bin_dir.ends_with("release") {
        "release"
    } else {
        "debug (figures are not representative)"
    };
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let master_key = MasterKey::generate().to_base64();
    let temp = tempfile::tempdir()?;
    let root = match &cli.keep_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            ensure!(
                std::fs::read_dir(dir)?.next().is_none(),
                "--keep-dir {} is not empty",
                dir.display()
            );
            dir.clone()
        }
        None => temp.path().to_path_buf(),
    };
    let data_dir = root.join("grpc");
    let now_ms = chrono::Utc::now().timestamp_millis();

    tracing::info!("starting sluice-control and creating {BACKENDS} backends");
    let control = Control::start(&control_bin, &data_dir, &master_key).await?;
    let mut admin = control.admin()?;
    let mut backend_ids = Vec::new();
    for i in 0..BACKENDS {
        let created = admin
            .create_backend(pb::CreateBackendRequest {
                backend: Some(backend_proto(i)),
                api_key: format!("sk-bench-{i}"),
            })
            .await?
            .into_inner();
        backend_ids.push(created.backend.context("no backend returned")?.id);
    }
    // Keep a year of hourly rows for the query timings.
    admin
        .update_settings(pb::UpdateSettingsRequest {
            settings: Some(pb::Settings {
                usage_retention_days: 0,
                ..Default::default()
            }),
            update_mask: Some(sluice_proto::wkt::FieldMask {
                paths: vec!["usage_retention_days".into()],
            }),
        })
        .await?;

    tracing::info!(
        records = cli.records,
        batch = cli.batch,
        "streaming usage over gRPC"
    );
    let skewed = records(cli.records, &backend_ids, now_ms, Mix::Skewed, 1);
    let per_record_sample: Vec<pb::UsageRecord> = skewed
        .iter()
        .take(cli.per_record.min(cli.records) as usize)
        .cloned()
        .collect();
    let skewed_seconds = stream_records(&control, "skewed", skewed, cli.batch).await?;
    let uniform_n = cli.records / 2;
    let uniform = records(uniform_n, &backend_ids, now_ms, Mix::Uniform, 2);
    tracing::info!(records = uniform_n, "streaming the uniform mix");
    let uniform_seconds = stream_records(&control, "uniform", uniform, cli.batch).await?;
    let totals = control
        .stats()?
        .get_totals(pb::GetTotalsRequest::default())
        .await?
        .into_inner();
    ensure!(
        totals.request_count == cli.records + uniform_n,
        "GetTotals counts {} requests, {} were sent",
        totals.request_count,
        cli.records + uniform_n
    );

    tracing::info!(
        records = per_record_sample.len(),
        "writing one transaction per record"
    );
    let per_record_dir = root.join("per-record");
    std::fs::create_dir_all(&per_record_dir)?;
    let per_record_seconds = per_record(&per_record_dir, &backend_ids, &per_record_sample).await?;

    let skewed_rate = rate(cli.records, skewed_seconds);
    let uniform_rate = rate(uniform_n, uniform_seconds);
    let single_rate = rate(per_record_sample.len() as u64, per_record_seconds);
    let ratio = |r: f64| r / single_rate.max(1e-9);
    println!(
        "Build: {profile}; load average before: {}. Database: SQLite in WAL mode, \
         `synchronous=FULL` (an fsync per commit). {BACKENDS} backends × {} models × {KEYS} client \
         keys; records timed within the last hour. Skewed mix: backend, model and key each drawn \
         with weight 1/rank, as routing by priority and a few heavy clients make it. Uniform mix: \
         every combination equally likely, so each batch touches as many stored rows as it can.\n",
        loadavg,
        MODELS.len(),
    );
    println!("| path | records | seconds | records/s | × per-record |");
    println!("|---|---:|---:|---:|---:|");
    for (what, n, seconds, r) in [
        ("skewed mix", cli.records, skewed_seconds, skewed_rate),
        ("uniform mix", uniform_n, uniform_seconds, uniform_rate),
    ] {
        println!(
            "| gRPC `ReportUsage` to `sluice-control`, {} per batch, {what}, first send → last ack | {} | {:.2} | {} | {:.0}× |",
            cli.batch,
            n,
            seconds,
            thousands(r),
            ratio(r)
        );
    }
    println!(
        "| one transaction per record (`Store::ingest_usage`, same code), skewed mix | {} | {:.2} | {} | 1× |",
        per_record_sample.len(),
        per_record_seconds,
        thousands(single_rate)
    );
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    println!(
        "Targets (skewed / uniform): ≥ 100,000 records/s: {} / {}; ≥ 20× one transaction per \
         record: {} / {}. `GetTotals` afterwards counts exactly the {} requests sent.\n",
        verdict(skewed_rate >= 100_000.0),
        verdict(uniform_rate >= 100_000.0),
        verdict(ratio(skewed_rate) >= 20.0),
        verdict(ratio(uniform_rate) >= 20.0),
        thousands(totals.request_count as f64)
    );
    control.stop().await?;

    if cli.history_days > 0 {
        queries(
            &cli,
            &control_bin,
            &data_dir,
            &master_key,
            &backend_ids,
            now_ms,
        )
        .await?;
    }
    Ok(())
}

/// What the generated history holds.
struct History {
    hourly_rows: u64,
    daily_rows: u64,
    requests: u64,
    seconds: f64,
}

/// One day of one (backend, model, key): [requests, errors, streams, prompt, completion, ttft
/// count], [cost, latency sum, ttft sum], latency histogram.
type DaySums = ([i64; 6], [f64; 3], Histogram);

/// Writes `days` of hourly and daily usage before today (UTC) straight into the database, as
/// ingestion would have left it.
fn generate_history(
    db: &Path,
    backend_ids: &[String],
    pools: &[i64],
    days: u32,
    density: f64,
    today_ms: i64,
) -> anyhow::Result<History> {
    let started = Instant::now();
    let mut conn = rusqlite::Connection::open(db)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    sluice_control::store::sql_functions::register(&conn)?;
    let mut rng = SmallRng::seed_from_u64(7);
    let mut history = History {
        hourly_rows: 0,
        daily_rows: 0,
        requests: 0,
        seconds: 0.0,
    };
    let combos = backend_ids.len() * MODELS.len() * KEYS;
    for day in (1..=i64::from(days)).rev() {
        let day_start = today_ms - day * DAY_MS;
        let tx = conn.transaction()?;
        {
            let mut hourly = tx.prepare(
                "INSERT INTO usage_hourly (hour_start, backend_id, model, client_key_id, pool,
                     request_count, error_count, stream_count, prompt_tokens, completion_tokens, cost,
                     latency_ms_sum, ttft_ms_sum, ttft_count, latency_histogram)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?;
            let mut daily = tx.prepare(
                "INSERT INTO usage_daily (day_start, backend_id, model, client_key_id, pool, request_count,
                     error_count, stream_count, prompt_tokens, completion_tokens, cost, latency_ms_sum,
                     ttft_ms_sum, ttft_count, latency_histogram)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?;
            let mut day_sums: Vec<Option<DaySums>> = vec![None; combos];
            for hour in 0..24 {
                let hour_start = day_start + hour * HOUR_MS;
                for (c, sums) in day_sums.iter_mut().enumerate() {
                    if !rng.random_bool(density) {
                        continue;
                    }
                    let (b, m, k) = (
                        c / (MODELS.len() * KEYS),
                        (c / KEYS) % MODELS.len(),
                        c % KEYS,
                    );
                    let requests: i64 = rng.random_range(1..200);
                    let mut h = Histogram::default();
                    let mut latency_sum = 0.0;
                    for _ in 0..requests.min(20) {
                        let ms = latency_ms(&mut rng);
                        h.add(latency_bucket(ms), 1);
                        latency_sum += ms;
                    }
                    if requests > 20 {
                        let ms = latency_ms(&mut rng);
                        h.add(latency_bucket(ms), (requests - 20) as u64);
                        latency_sum += ms * (requests - 20) as f64;
                    }
                    let errors = rng.random_range(0..=requests / 10);
                    let streams = rng.random_range(0..=requests);
                    let prompt = requests * rng.random_range(10..4000);
                    let completion = requests * rng.random_range(1..1000);
                    let (_, input, output) = MODELS[m];
                    let cost = (prompt as f64 * input + completion as f64 * output) / 1e6;
                    let ttft = latency_sum / 10.0 * streams as f64 / requests as f64;
                    let key = format!("key-{k}");
                    hourly.execute(rusqlite::params![
                        hour_start,
                        backend_ids[b],
                        MODELS[m].0,
                        key,
                        pools[b],
                        requests,
                        errors,
                        streams,
                        prompt,
                        completion,
                        cost,
                        latency_sum,
                        ttft,
                        streams,
                        h.encode(),
                    ])?;
                    history.hourly_rows += 1;
                    history.requests += requests as u64;
                    let entry = sums.get_or_insert_with(Default::default);
                    for (sum, v) in entry
                        .0
                        .iter_mut()
                        .zip([requests, errors, streams, prompt, completion, streams])
                    {
                        *sum += v;
                    }
                    for (sum, v) in entry.1.iter_mut().zip([cost, latency_sum, ttft]) {
                        *sum += v;
                    }
                    for (bucket, n) in h.buckets() {
                        entry.2.add(bucket, n);
                    }
                }
            }
            for (c, sums) in day_sums.into_iter().enumerate() {
                let Some((n, f, h)) = sums else { continue };
                let (b, m, k) = (
                    c / (MODELS.len() * KEYS),
                    (c / KEYS) % MODELS.len(),
                    c % KEYS,
                );
                daily.execute(rusqlite::params![
                    day_start,
                    backend_ids[b],
                    MODELS[m].0,
                    format!("key-{k}"),
                    pools[b],
                    n[0],
                    n[1],
                    n[2],
                    n[3],
                    n[4],
                    f[0],
                    f[1],
                    f[2],
                    n[5],
                    h.encode(),
                ])?;
                history.daily_rows += 1;
            }
        }
        // The per-backend rollup, as ingestion keeps it beside the daily rows.
        tx.execute(
            "INSERT INTO usage_daily_by_backend (day_start, backend_id, pool, request_count,
                 error_count, stream_count, prompt_tokens, completion_tokens, cost, latency_ms_sum,
                 ttft_ms_sum, ttft_count, latency_histogram)
             SELECT day_start, backend_id, pool, sum(request_count), sum(error_count),
                 sum(stream_count), sum(prompt_tokens), sum(completion_tokens), total(cost),
                 total(latency_ms_sum), total(ttft_ms_sum), sum(ttft_count),
                 usage_histogram(latency_histogram)
             FROM usage_daily WHERE day_start = ?1 GROUP BY day_start, backend_id, pool",
            [day_start],
        )?;
        tx.commit()?;
    }
    history.seconds = started.elapsed().as_secs_f64();
    Ok(history)
}

/// One timed statistics query.
struct Query {
    name: &'static str,
    call: Call,
}

enum Call {
    Totals(pb::GetTotalsRequest),
    Usage(pb::GetUsageRequest),
}

fn ts(ms: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: 0,
    })
}

async fn queries(
    cli: &Cli,
    control_bin: &Path,
    data_dir: &Path,
    master_key: &str,
    backend_ids: &[String],
    now_ms: i64,
) -> anyhow::Result<()> {
    let db = data_dir.join("sluice.db");
    // History ends where the streamed records (the last hour) begin.
    let today_ms = (now_ms - HOUR_MS).div_euclid(DAY_MS) * DAY_MS;
    let pools: Vec<i64> = (0..backend_ids.len())
        .map(|i| if i % 5 == 4 { 2 } else { 1 })
        .collect();
    tracing::info!(days = cli.history_days, "generating usage history");
    let history = {
        let (ids, pools, days, density) = (
            backend_ids.to_vec(),
            pools.clone(),
            cli.history_days,
            cli.history_density,
        );
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            generate_history(&db, &ids, &pools, days, density, today_ms)
        })
        .await??
    };
    let db_mib = std::fs::metadata(&db)?.len() as f64 / (1 << 20) as f64;
    println!(
        "Statistics queries over {} days of generated usage: {} backends × {} models × {} client \
         keys, {:.0} % of (hour, backend, model, key) combinations active: {} hourly rows, {} \
         daily rows, {} requests (written in {:.0} s; database {:.0} MiB). Each query runs 5 \
         times over gRPC against `sluice-control`; the table shows the first and the median run.\n",
        cli.history_days,
        BACKENDS,
        MODELS.len(),
        KEYS,
        cli.history_density * 100.0,
        thousands(history.hourly_rows as f64),
        thousands(history.daily_rows as f64),
        thousands(history.requests as f64),
        history.seconds,
        db_mib,
    );

    let control = Control::start(control_bin, data_dir, master_key).await?;
    let mut stats = control.stats()?;
    let b = backend_ids.first().cloned().unwrap_or_default();
    let day = |n: i64| now_ms - n * DAY_MS;
    let usage = |g: pb::Granularity, by: pb::GroupBy, start: Option<i64>| pb::GetUsageRequest {
        granularity: g as i32,
        group_by: by as i32,
        start_time: start.and_then(ts),
        ..Default::default()
    };
    use pb::{Granularity as G, GroupBy as By};
    let list = vec![
        Query {
            name: "GetTotals, all time",
            call: Call::Totals(Default::default()),
        },
        Query {
            name: "GetTotals, last 24 h",
            call: Call::Totals(pb::GetTotalsRequest {
                start_time: ts(day(1)),
                ..Default::default()
            }),
        },
        Query {
            name: "GetTotals, last 30 days, one backend",
            call: Call::Totals(pb::GetTotalsRequest {
                start_time: ts(day(30)),
                backend_id: b.clone(),
                ..Default::default()
            }),
        },
        Query {
            name: "GetTotals, all time, one backend",
            call: Call::Totals(pb::GetTotalsRequest {
                backend_id: b.clone(),
                ..Default::default()
            }),
        },
        Query {
            name: "GetTotals, last 7 days, one model",
            call: Call::Totals(pb::GetTotalsRequest {
                start_time: ts(day(7)),
                model: MODELS[1].0.into(),
                ..Default::default()
            }),
        },
        Query {
            name: "GetTotals, all time, one client key",
            call: Call::Totals(pb::GetTotalsRequest {
                client_key_id: "key-3".into(),
                ..Default::default()
            }),
        },
        Query {
            name: "GetUsage hour, last 24 h",
            call: Call::Usage(usage(G::Hour, By::Unspecified, Some(day(1)))),
        },
        Query {
            name: "GetUsage hour, last 24 h, by backend",
            call: Call::Usage(usage(G::Hour, By::Backend, Some(day(1)))),
        },
        Query {
            name: "GetUsage hour, last 7 days, one backend, by model",
            call: Call::Usage(pb::GetUsageRequest {
                backend_id: b.clone(),
                ..usage(G::Hour, By::Model, Some(day(7)))
            }),
        },
        Query {
            name: "GetUsage hour, all time, one backend",
            call: Call::Usage(pb::GetUsageRequest {
                backend_id: b.clone(),
                ..usage(G::Hour, By::Unspecified, None)
            }),
        },
        Query {
            name: "GetUsage day, last 30 days, by model",
            call: Call::Usage(usage(G::Day, By::Model, Some(day(30)))),
        },
        Query {
            name: "GetUsage day, last 30 days, by client key",
            call: Call::Usage(usage(G::Day, By::ClientKey, Some(day(30)))),
        },
        Query {
            name: "GetUsage day, all time, by backend",
            call: Call::Usage(usage(G::Day, By::Backend, None)),
        },
        Query {
            name: "GetUsage day, all time, one client key",
            call: Call::Usage(pb::GetUsageRequest {
                client_key_id: "key-3".into(),
                ..usage(G::Day, By::Unspecified, None)
            }),
        },
        Query {
            name: "GetTotals, last 7 days, by backend (the dashboard's overview)",
            call: Call::Totals(pb::GetTotalsRequest {
                start_time: ts(day(7)),
                group_by: By::Backend as i32,
                ..Default::default()
            }),
        },
        Query {
            name: "GetUsage day, all time, by pool",
            call: Call::Usage(usage(G::Day, By::Pool, None)),
        },
        Query {
            name: "GetUsage hour, all time, by client key, newest page of 1,000",
            call: Call::Usage(pb::GetUsageRequest {
                page_size: 1000,
                order: pb::UsageOrder::NewestFirst as i32,
                ..usage(G::Hour, By::ClientKey, None)
            }),
        },
    ];
    println!("| query | buckets | first ms | median ms |");
    println!("|---|---:|---:|---:|");
    let mut all_time_before = None;
    for q in &list {
        let mut times = Vec::new();
        let mut buckets = 0;
        for _ in 0..5 {
            let started = Instant::now();
            buckets = match &q.call {
                Call::Totals(r) => {
                    let t = stats.get_totals(r.clone()).await?.into_inner();
                    if all_time_before.is_none() {
                        all_time_before = Some(t);
                    }
                    1
                }
                Call::Usage(r) => stats.get_usage(r.clone()).await?.into_inner().buckets.len(),
            };
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let first = times[0];
        times.sort_by(f64::total_cmp);
        println!(
            "| {} | {} | {:.1} | {:.1} |",
            q.name,
            thousands(buckets as f64),
            first,
            times[times.len() / 2]
        );
    }
    println!();

    // Every page of the longest series: all hourly rows by client key.
    let started = Instant::now();
    let (mut pages, mut buckets, mut largest) = (0, 0, 0);
    let mut request = pb::GetUsageRequest {
        page_size: sluice_proto::limits::MAX_USAGE_PAGE_SIZE as i32,
        ..usage(G::Hour, By::ClientKey, None)
    };
    loop {
        let page = stats.get_usage(request.clone()).await?.into_inner();
        pages += 1;
        buckets += page.buckets.len();
        largest = largest.max(prost::Message::encoded_len(&page));
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    println!(
        "All {} hourly buckets by client key, in {} pages of at most {}: {:.1} s in all, the \
         largest page {:.1} MiB.\n",
        thousands(buckets as f64),
        pages,
        sluice_proto::limits::MAX_USAGE_PAGE_SIZE,
        started.elapsed().as_secs_f64(),
        largest as f64 / (1 << 20) as f64,
    );
    control.stop().await?;

    // Retention: delete the hourly rows older than 90 days; whole-day totals stay.
    let (store, _) = Store::open(&db, MasterKey::from_base64(master_key)?)?;
    let mut settings = store.get_settings().await?;
    settings.usage_retention_days = 90;
    store.put_settings(settings).await?;
    let started = Instant::now();
    let deleted = store.apply_usage_retention(now_ms).await?;
    let seconds = started.elapsed().as_secs_f64();
    let after = store.totals(TotalsFilter::default()).await?;
    let before = all_time_before.context("no all-time totals")?;
    ensure!(
        after.request_count == before.request_count
            && after.prompt_tokens == before.prompt_tokens
            && after.completion_tokens == before.completion_tokens,
        "all-time totals changed with retention: {} → {} requests",
        before.request_count,
        after.request_count
    );
    println!(
        "Retention at 90 days deleted {} hourly rows in {:.1} s (in transactions of 10,000 rows); \
         all-time totals were unchanged ({} requests).\n",
        thousands(deleted as f64),
        seconds,
        thousands(after.request_count as f64)
    );
    Ok(())
}
