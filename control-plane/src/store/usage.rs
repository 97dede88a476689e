//! Usage ingestion, retention and statistics.
//!
//! A batch of records and the sender's high-water sequence are applied in one
//! transaction, adding to hourly and daily rows per (pool, backend, model, client
//! key). Retention deletes old hourly rows, and with `usage_daily_retention_days` old daily
//! rows too, oldest first, in transactions of a bounded number of rows. Queries read whole
//! UTC days from the daily rows
//! and the hours at either end of a range from the hourly rows, so an answer is
//! the same whichever table gives it.

use std::collections::BTreeMap;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, params, params_from_iter};
use tokio_util::sync::CancellationToken;

use super::{Reader, Store, StoreError, WriteOp};
use crate::time::now_ms;
use crate::usage::UsageRow;
use crate::usage::histogram::{Histogram, encode_buckets, latency_bucket};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// Tokens counted for one record at most (an upstream's absurd figure counts this); the sums
/// of a row stop at `i64::MAX` (see [`ADD_ON_CONFLICT`]).
const MAX_TOKENS_PER_RECORD: u64 = 1 << 40;
/// The most hourly rows one retention transaction deletes.
const RETENTION_BATCH: usize = 10_000;

/// How often [`Store::run_usage_retention`] deletes expired hourly rows.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

fn floor_to(ms: i64, unit: i64) -> i64 {
    // The earliest times have no multiple of `unit` below them: they round to the earliest.
    ms.div_euclid(unit).saturating_mul(unit)
}

fn ceil_to(ms: i64, unit: i64) -> i64 {
    floor_to(ms, unit).saturating_add(if ms.rem_euclid(unit) == 0 { 0 } else { unit })
}

/// The records of one `ReportUsage` message and their sender.
#[derive(Debug, Clone, Default)]
pub struct UsageBatch {
    pub node_id: String,
    pub incarnation: String,
    pub rows: Vec<UsageRow>,
    /// The record the sender holds just before `rows` (0: none). The batch is applied only
    /// once the high-water mark has reached it, so records are never applied past an
    /// earlier batch whose commit failed.
    pub previous_sequence: u64,
}

/// A batch not applied because it follows records the store does not hold (an earlier
/// batch of its sender failed to commit, or has not arrived). Its sender resends from its
/// last ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "usage report out of order: it follows record {previous}, but only records up to {held} are stored"
)]
pub struct OutOfOrder {
    pub previous: u64,
    pub held: u64,
}

/// Which usage a query adds up. Ranges are matched at hour granularity: an hour
/// counts when it starts in `[start, end)`, i.e. the range is widened to whole
/// hours. Hours that retention has deleted count as empty; whole UTC days are
/// still answered from the daily rollup.
#[derive(Debug, Clone, Default)]
pub struct TotalsFilter {
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub backend_id: Option<String>,
    pub model: Option<String>,
    pub client_key_id: Option<String>,
}

/// Sums over the matched usage, with latency percentiles from the histogram.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub request_count: u64,
    pub error_count: u64,
    pub stream_count: u64,
    /// Requests whose tokens are the replica's estimate (cut off before the provider's usage,
    /// interrupted by a crash, a stream or an embeddings answer without usage).
    pub estimated_count: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Of `prompt_tokens`, read from the provider's prompt cache.
    pub cached_prompt_tokens: u64,
    /// Of `completion_tokens`, spent on reasoning.
    pub reasoning_tokens: u64,
    /// Of `prompt_tokens`, written to the provider's prompt cache.
    pub cache_write_prompt_tokens: u64,
    /// Of `prompt_tokens`, audio; of `completion_tokens`, audio.
    pub audio_prompt_tokens: u64,
    pub audio_completion_tokens: u64,
    pub cost: f64,
    pub latency_ms_sum: f64,
    /// Requests whose latency is known (the histogram's samples): the average's divisor.
    pub latency_count: u64,
    pub ttft_ms_sum: f64,
    pub ttft_count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Distinct backends among the matched rows (the empty id of requests that reached
    /// no backend not counted).
    pub backend_count: u64,
}

/// Time bucket width of [`Store::usage_series`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
}

/// What [`Store::usage_series`] splits each time bucket by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Nothing,
    Backend,
    Model,
    ClientKey,
    /// The backend's pool when the records were ingested: `primary`, `fallback`, or
    /// empty for requests that reached no backend.
    Pool,
}

/// The order of a usage series' time buckets; groups within a bucket ascend by key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    OldestFirst,
    NewestFirst,
}

/// Where a page of a usage series ends: its last (time bucket, group). The next page
/// starts just after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub start_ms: i64,
    pub group_key: String,
}

/// One page of a usage series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Page {
    pub points: Vec<SeriesPoint>,
    /// Set when more points follow.
    pub next: Option<Cursor>,
}

/// One (time bucket, group) of a usage series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeriesPoint {
    pub start_ms: i64,
    pub group_key: String,
    pub group_label: String,
    pub totals: Totals,
}

impl Store {
    /// Applies the records above the high-water mark of `(node_id, incarnation)`
    /// and advances it, atomically. Returns the new high-water mark (what may be acked).
    pub async fn ingest_usage(
        &self,
        node_id: String,
        incarnation: String,
        rows: Vec<UsageRow>,
    ) -> Result<u64, StoreError> {
        let acked = self
            .ingest_usage_batches(vec![UsageBatch {
                node_id,
                incarnation,
                rows,
                previous_sequence: 0,
            }])
            .await?;
        // Without a previous sequence a batch is never out of order.
        Ok(acked
            .first()
            .copied()
            .map_or(0, |outcome| outcome.unwrap_or_else(|gap| gap.held)))
    }

    /// Applies several batches in one transaction (one commit, one fsync), in
    /// order, each as [`Store::ingest_usage`] would. Returns each batch's new
    /// high-water mark, or [`OutOfOrder`] for a batch whose `previous_sequence` is above
    /// the mark (not applied; the other batches are). A caller holding several received
    /// batches saves a commit per batch and a row update per repeated (hour, backend,
    /// model, key).
    pub async fn ingest_usage_batches(
        &self,
        mut batches: Vec<UsageBatch>,
    ) -> Result<Vec<Result<u64, OutOfOrder>>, StoreError> {
        // No value past its bound is stored (see `UsageRow::clamp_to_bounds`).
        for batch in &mut batches {
            let clamped = batch
                .rows
                .iter_mut()
                .map(UsageRow::clamp_to_bounds)
                .filter(|&c| c)
                .count();
            if clamped > 0 {
                tracing::warn!(
                    node = %batch.node_id,
                    records = clamped,
                    "usage records with a value past its bound: stored with a placeholder"
                );
                self.usage_clamped(clamped as u64);
            }
        }
        let (acked, fresh) = self
            .write(WriteOp::usage_ingest, move |conn, _| ingest(conn, &batches))
            .await?;
        self.usage_committed(fresh);
        Ok(acked)
    }

    /// Sums and percentiles over everything `filter` matches.
    pub async fn totals(&self, filter: TotalsFilter) -> Result<Totals, StoreError> {
        self.read(Reader::Queries, move |conn, _| {
            // One read transaction: hourly and daily rows from the same commit.
            let tx = conn.transaction()?;
            totals(&tx, &filter, Sources::HourlyAndDaily)
        })
        .await
    }

    /// The start of the oldest hour the hourly rows keep when usage older than it is kept by
    /// the day alone: hours before it count nothing in an hour bucket or a range's partial
    /// first day. The later of `usage_retention_days`'s cutoff (counted as retention counts
    /// it at `now_ms`) and the one retention last deleted before (`HOURS_PRUNED_BEFORE`: a
    /// retention raised, or set to 0, brings no deleted hour back). `None` when the hourly
    /// rows keep every hour, or no usage is older.
    pub async fn hours_kept_since(&self, now_ms: i64) -> Result<Option<i64>, StoreError> {
        self.read(Reader::Queries, move |conn, _| {
            let days = super::load_settings_in(conn)?.usage_retention_days;
            let (table, time, _) = HOURLY_TABLE;
            let setting = retention_cutoff(conn, table, time, days, now_ms)?;
            let pruned: Option<i64> = conn
                .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row([HOURS_PRUNED_BEFORE], |r| r.get(0))
                .optional()?;
            let Some(cutoff) = setting.into_iter().chain(pruned).max() else {
                return Ok(None);
            };
            // The table's key starts with its day: one step down its B-tree.
            let older: Option<i64> = conn
                .query_row(
                    "SELECT 1 FROM usage_daily_by_backend WHERE day_start < ?1 LIMIT 1",
                    [cutoff],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(older.map(|_| cutoff))
        })
        .await
    }

    /// Sums and percentiles over everything `filter` matches, and the same for a page of
    /// the groups of `group_by` (in ascending order of group key), from one read
    /// transaction; the third value tells whether more groups follow the page.
    pub async fn grouped_totals(
        &self,
        filter: TotalsFilter,
        group_by: GroupBy,
        page: GroupPage,
    ) -> Result<(Totals, Vec<SeriesPoint>, bool), StoreError> {
        self.read(Reader::Queries, move |conn, _| {
            let tx = conn.transaction()?;
            let all = totals(&tx, &filter, Sources::HourlyAndDaily)?;
            let sums = aggregate(
                &tx,
                &filter,
                None,
                group_by,
                Sources::HourlyAndDaily,
                Some(&page),
            )?;
            let more = sums.len() > page.limit;
            // Past the page, a group's sums may lack a part's rows: never shown.
            let sums = sums.into_iter().take(page.limit);
            let groups = labelled(&tx, group_by, sums)?;
            Ok((all, groups, more))
        })
        .await
    }

    /// Usage per time bucket (and per group), buckets in `order`, then by group key.
    pub async fn usage_series(
        &self,
        filter: TotalsFilter,
        granularity: Granularity,
        group_by: GroupBy,
        order: Order,
    ) -> Result<Vec<SeriesPoint>, StoreError> {
        self.read(Reader::Queries, move |conn, _| {
            let tx = conn.transaction()?;
            let mut points = series(&tx, &filter, granularity, group_by, Sources::HourlyAndDaily)?;
            if order == Order::NewestFirst {
                sort_newest_first(&mut points);
            }
            Ok(points)
        })
        .await
    }

    /// At most `limit` (at least 1) points of [`Store::usage_series`], starting just after
    /// `after`. Reads only as many time buckets as the page needs (a window that doubles
    /// until it holds more than `limit` points), so each page of a long series costs about
    /// the same.
    pub async fn usage_page(
        &self,
        filter: TotalsFilter,
        granularity: Granularity,
        group_by: GroupBy,
        order: Order,
        after: Option<Cursor>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        self.read(Reader::Queries, move |conn, _| {
            let tx = conn.transaction()?;
            page(
                &tx,
                &filter,
                granularity,
                group_by,
                order,
                after.as_ref(),
                limit.max(1),
            )
        })
        .await
    }

    /// Deletes the hourly usage rows of UTC days that ended more than
    /// `Settings.usage_retention_days` before `now_ms` (0 keeps everything), and the daily
    /// rows and keys' daily spend past `Settings.usage_daily_retention_days` (0, the default,
    /// keeps them). Returns how many rows were deleted.
    pub async fn apply_usage_retention(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.apply_usage_retention_until(now_ms, &CancellationToken::new())
            .await
    }

    /// [`Store::apply_usage_retention`] in transactions of at most [`RETENTION_BATCH`] rows,
    /// oldest first: each holds the one writer (usage acks, cooldowns, admin changes wait
    /// behind it) for a bounded time however large the backlog. None starts once `stop` is
    /// cancelled, so a shutdown waits for one at most, not for the backlog.
    async fn apply_usage_retention_until(
        &self,
        now_ms: i64,
        stop: &CancellationToken,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0;
        while !stop.is_cancelled() {
            let n = self
                .write(WriteOp::retention, move |conn, _| {
                    delete_expired(conn, now_ms, RETENTION_BATCH)
                })
                .await?;
            if n == 0 {
                break;
            }
            deleted += n;
        }
        Ok(deleted)
    }

    /// Applies retention at once and then every [`RETENTION_INTERVAL`] until `stop`.
    pub async fn run_usage_retention(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(RETENTION_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // A stop wins over a due tick: no write starts after shutdown began.
                biased;
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.apply_usage_retention_until(now_ms(), &stop).await {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "expired usage rows deleted"),
                Err(err) => tracing::warn!(error = %err, "usage retention failed; will retry"),
            }
        }
    }
}

/// What one batch adds to one hourly or daily row.
#[derive(Debug, Default)]
struct Delta {
    request_count: i64,
    error_count: i64,
    stream_count: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost: f64,
    latency_ms_sum: f64,
    ttft_ms_sum: f64,
    ttft_count: i64,
    cached_prompt_tokens: i64,
    reasoning_tokens: i64,
    cache_write_prompt_tokens: i64,
    audio_prompt_tokens: i64,
    audio_completion_tokens: i64,
    estimated_count: i64,
    /// (bucket, count), unordered; a batch puts few buckets in one row.
    latency: Vec<(u32, u64)>,
    /// The costs the records carry ([`Delta::cost_at`] turns them into `cost`).
    cost_nanos: u64,
    /// Tokens of records that carry no cost (from a replica older than `cost_nanos`, or than
    /// `priced` and its cost 0), priced at ingestion instead.
    unpriced_prompt_tokens: u64,
    unpriced_completion_tokens: u64,
}

impl Delta {
    fn add_record(&mut self, r: &UsageRow) {
        let tokens = |n: u64| n.min(MAX_TOKENS_PER_RECORD) as i64;
        self.request_count = self.request_count.saturating_add(1);
        self.error_count = self.error_count.saturating_add(i64::from(r.is_error));
        self.stream_count = self.stream_count.saturating_add(i64::from(r.stream));
        self.estimated_count = self
            .estimated_count
            .saturating_add(i64::from(r.tokens_estimated));
        self.prompt_tokens = self.prompt_tokens.saturating_add(tokens(r.prompt_tokens));
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(tokens(r.completion_tokens));
        self.cached_prompt_tokens = self
            .cached_prompt_tokens
            .saturating_add(tokens(r.cached_prompt_tokens));
        self.reasoning_tokens = self
            .reasoning_tokens
            .saturating_add(tokens(r.reasoning_tokens));
        self.cache_write_prompt_tokens = self
            .cache_write_prompt_tokens
            .saturating_add(tokens(r.cache_write_prompt_tokens));
        self.audio_prompt_tokens = self
            .audio_prompt_tokens
            .saturating_add(tokens(r.audio_prompt_tokens));
        self.audio_completion_tokens = self
            .audio_completion_tokens
            .saturating_add(tokens(r.audio_completion_tokens));
        if r.cost_nanos > 0 || r.priced {
            self.cost_nanos = self.cost_nanos.saturating_add(r.cost_nanos);
        } else {
            self.unpriced_prompt_tokens = self
                .unpriced_prompt_tokens
                .saturating_add(r.prompt_tokens.min(MAX_TOKENS_PER_RECORD));
            self.unpriced_completion_tokens = self
                .unpriced_completion_tokens
                .saturating_add(r.completion_tokens.min(MAX_TOKENS_PER_RECORD));
        }
        if let Some(latency) = r.latency_ms {
            self.latency_ms_sum += latency;
            self.add_latency(latency_bucket(latency), 1);
        }
        if let Some(ttft) = r.ttft_ms {
            self.ttft_ms_sum += ttft;
            self.ttft_count = self.ttft_count.saturating_add(1);
        }
    }

    /// Sets `cost`: what the records cost as their replicas computed it (the same figure their
    /// keys' spend got: the prices of the snapshot each was served under, cached prompt
    /// tokens at the cached price, a reserve kept), and the tokens of records that carry no
    /// cost at `input` and `output` per million.
    fn cost_at(&mut self, input: f64, output: f64) {
        self.cost = self.cost_nanos as f64 / 1e9
            + (self.unpriced_prompt_tokens as f64 * input
                + self.unpriced_completion_tokens as f64 * output)
                / 1_000_000.0;
    }

    fn add_latency(&mut self, bucket: u32, n: u64) {
        match self.latency.iter_mut().find(|(b, _)| *b == bucket) {
            Some((_, count)) => *count += n,
            None => self.latency.push((bucket, n)),
        }
    }

    /// The values of [`SUM_COLUMNS`].
    fn sums(&self) -> [rusqlite::types::Value; 16] {
        use rusqlite::types::Value;
        [
            Value::Integer(self.request_count),
            Value::Integer(self.error_count),
            Value::Integer(self.stream_count),
            Value::Integer(self.prompt_tokens),
            Value::Integer(self.completion_tokens),
            Value::Real(self.cost),
            Value::Real(self.latency_ms_sum),
            Value::Real(self.ttft_ms_sum),
            Value::Integer(self.ttft_count),
            Value::Blob(self.encoded_latency()),
            Value::Integer(self.cached_prompt_tokens),
            Value::Integer(self.reasoning_tokens),
            Value::Integer(self.cache_write_prompt_tokens),
            Value::Integer(self.audio_prompt_tokens),
            Value::Integer(self.audio_completion_tokens),
            Value::Integer(self.estimated_count),
        ]
    }

    fn encoded_latency(&self) -> Vec<u8> {
        let mut buckets = self.latency.clone();
        buckets.sort_unstable();
        encode_buckets(buckets)
    }

    fn add(&mut self, other: &Delta) {
        self.request_count = self.request_count.saturating_add(other.request_count);
        self.error_count = self.error_count.saturating_add(other.error_count);
        self.stream_count = self.stream_count.saturating_add(other.stream_count);
        self.estimated_count = self.estimated_count.saturating_add(other.estimated_count);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
        self.cost += other.cost;
        self.latency_ms_sum += other.latency_ms_sum;
        self.ttft_ms_sum += other.ttft_ms_sum;
        self.ttft_count = self.ttft_count.saturating_add(other.ttft_count);
        self.cached_prompt_tokens = self
            .cached_prompt_tokens
            .saturating_add(other.cached_prompt_tokens);
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(other.reasoning_tokens);
        self.cache_write_prompt_tokens = self
            .cache_write_prompt_tokens
            .saturating_add(other.cache_write_prompt_tokens);
        self.audio_prompt_tokens = self
            .audio_prompt_tokens
            .saturating_add(other.audio_prompt_tokens);
        self.audio_completion_tokens = self
            .audio_completion_tokens
            .saturating_add(other.audio_completion_tokens);
        for &(b, n) in &other.latency {
            self.add_latency(b, n);
        }
    }
}

/// The stored-row columns both upserts add to, after the key columns. Integer sums stop at
/// `i64::MAX`: past it SQLite makes the sum a REAL, which the STRICT INTEGER column refuses,
/// and the whole group commit (every replica's reports) would fail on that row for good.
const ADD_ON_CONFLICT: &str = "
    request_count = sluice_saturating_add(request_count, excluded.request_count),
    error_count = sluice_saturating_add(error_count, excluded.error_count),
    stream_count = sluice_saturating_add(stream_count, excluded.stream_count),
    prompt_tokens = sluice_saturating_add(prompt_tokens, excluded.prompt_tokens),
    completion_tokens = sluice_saturating_add(completion_tokens, excluded.completion_tokens),
    cost = cost + excluded.cost,
    latency_ms_sum = latency_ms_sum + excluded.latency_ms_sum,
    ttft_ms_sum = ttft_ms_sum + excluded.ttft_ms_sum,
    ttft_count = sluice_saturating_add(ttft_count, excluded.ttft_count),
    latency_histogram = usage_histogram_add(latency_histogram, excluded.latency_histogram),
    cached_prompt_tokens = sluice_saturating_add(cached_prompt_tokens, excluded.cached_prompt_tokens),
    reasoning_tokens = sluice_saturating_add(reasoning_tokens, excluded.reasoning_tokens),
    cache_write_prompt_tokens =
        sluice_saturating_add(cache_write_prompt_tokens, excluded.cache_write_prompt_tokens),
    audio_prompt_tokens = sluice_saturating_add(audio_prompt_tokens, excluded.audio_prompt_tokens),
    audio_completion_tokens =
        sluice_saturating_add(audio_completion_tokens, excluded.audio_completion_tokens),
    estimated_count = sluice_saturating_add(estimated_count, excluded.estimated_count)";

/// The summed columns of every usage table, in the order [`Delta::sums`] gives them.
const SUM_COLUMNS: &str = "request_count, error_count, stream_count, prompt_tokens, \
    completion_tokens, cost, latency_ms_sum, ttft_ms_sum, ttft_count, latency_histogram, \
    cached_prompt_tokens, reasoning_tokens, cache_write_prompt_tokens, audio_prompt_tokens, \
    audio_completion_tokens, estimated_count";

/// Adds `delta` to the row of `keys` with a statement from [`upsert_sql`].
fn upsert_row(
    stmt: &mut rusqlite::CachedStatement<'_>,
    keys: &[&dyn rusqlite::ToSql],
    delta: &Delta,
) -> rusqlite::Result<usize> {
    let sums = delta.sums();
    stmt.execute(params_from_iter(
        keys.iter()
            .copied()
            .chain(sums.iter().map(|v| v as &dyn rusqlite::ToSql)),
    ))
}

/// An upsert into a usage table keyed by `keys`: the key values, then [`Delta::sums`].
fn upsert_sql(table: &str, keys: &str) -> String {
    let n = keys.split(',').count() + SUM_COLUMNS.split(',').count();
    let values: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT INTO {table} ({keys}, {SUM_COLUMNS}) VALUES ({})
         ON CONFLICT ({keys}) DO UPDATE SET {ADD_ON_CONFLICT}",
        values.join(", ")
    )
}

/// Each batch's high-water mark, or why it was refused.
type Outcomes = Vec<Result<u64, OutOfOrder>>;

/// Applies a batch: the records above the high-water mark are folded into one
/// delta per (hour, pool, backend, model, key) and per (day, pool, backend, model,
/// key), each added to its stored row by an upsert; then the high-water mark
/// moves, all in one transaction. Folding before SQL keeps the statements per
/// touched row rather than per record (see the ingestion benchmark).
/// Returns each batch's high-water mark and how many records were new.
fn ingest(conn: &mut Connection, batches: &[UsageBatch]) -> Result<(Outcomes, u64), StoreError> {
    let tx = conn.transaction()?;
    // (node, incarnation) → (stored high-water mark, high-water mark so far).
    let mut marks: std::collections::HashMap<(&str, &str), (u64, u64)> = Default::default();
    let mut acked = Vec::with_capacity(batches.len());
    let mut fresh = 0u64;
    let mut hourly: BTreeMap<(i64, &str, &str, &str), Delta> = BTreeMap::new();
    // (key, the record's day, the budget period that paid) → cost: `key_spend::add` files it.
    let mut spent: BTreeMap<(&str, i64, i64), u64> = BTreeMap::new();
    for batch in batches {
        let sender = (batch.node_id.as_str(), batch.incarnation.as_str());
        let mark = match marks.get_mut(&sender) {
            Some(mark) => mark,
            None => {
                let stored: u64 = tx
                    .prepare_cached(
                        "SELECT sequence FROM usage_high_water WHERE node_id = ?1 AND incarnation = ?2",
                    )?
                    .query_row(params![sender.0, sender.1], |r| r.get::<_, i64>(0))
                    .map(|v| v.max(0) as u64)
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(0),
                        e => Err(e),
                    })?;
                marks.entry(sender).or_insert((stored, stored))
            }
        };
        let high_water = mark.1;
        if batch.previous_sequence > high_water {
            acked.push(Err(OutOfOrder {
                previous: batch.previous_sequence,
                held: high_water,
            }));
            continue;
        }
        for r in batch.rows.iter().filter(|r| r.sequence > high_water) {
            fresh += 1;
            mark.1 = mark.1.max(r.sequence);
            let hour = floor_to(r.time_ms, HOUR_MS);
            hourly
                .entry((hour, &r.backend_id, &r.model, &r.client_key_id))
                .or_default()
                .add_record(r);
            if !r.client_key_id.is_empty() && r.cost_nanos > 0 {
                let day = spent
                    .entry((
                        &r.client_key_id,
                        crate::budget::day_start(r.time_ms),
                        r.budget_period_start_ms,
                    ))
                    .or_default();
                *day = day.saturating_add(r.cost_nanos);
            }
        }
        acked.push(Ok(mark.1));
    }
    if hourly.is_empty() {
        return Ok((acked, 0));
    }

    // Cost uses the model route's prices as they are now, and the daily rows the
    // backend's pool as it is now; later changes do not rewrite history.
    let mut prices: std::collections::HashMap<(&str, &str), (f64, f64)> = Default::default();
    let mut pools: std::collections::HashMap<&str, i64> = Default::default();
    let mut daily: BTreeMap<(i64, &str, &str, &str, i64), Delta> = BTreeMap::new();
    {
        let mut price_of = tx.prepare_cached(
            "SELECT input_price_per_mtok, output_price_per_mtok FROM backend_models
             WHERE backend_id = ?1 AND name = ?2",
        )?;
        // A deleted backend's records (a spool replayed, requests that were in flight) keep
        // its pool.
        let mut pool_of = tx.prepare_cached(
            "SELECT pool FROM backends WHERE id = ?1
             UNION ALL SELECT pool FROM deleted_backends WHERE id = ?1 LIMIT 1",
        )?;
        let mut upsert = tx.prepare_cached(&upsert_sql(
            "usage_hourly",
            "hour_start, backend_id, model, client_key_id, pool",
        ))?;
        for (&(hour, backend_id, model, client_key_id), delta) in &mut hourly {
            let (input, output) = match prices.get(&(backend_id, model)) {
                Some(&p) => p,
                None => {
                    let p = price_of
                        .query_row(params![backend_id, model], |r| Ok((r.get(0)?, r.get(1)?)))
                        .or_else(|e| match e {
                            rusqlite::Error::QueryReturnedNoRows => Ok((0.0, 0.0)),
                            e => Err(e),
                        })?;
                    *prices.entry((backend_id, model)).or_insert(p)
                }
            };
            delta.cost_at(input, output);
            let pool = match pools.get(backend_id) {
                Some(&p) => p,
                None => {
                    let p = pool_of
                        .query_row(params![backend_id], |r| r.get(0))
                        .or_else(|e| match e {
                            rusqlite::Error::QueryReturnedNoRows => Ok(0),
                            e => Err(e),
                        })?;
                    *pools.entry(backend_id).or_insert(p)
                }
            };
            upsert_row(
                &mut upsert,
                params![hour, backend_id, model, client_key_id, pool],
                delta,
            )?;
            daily
                .entry((
                    floor_to(hour, DAY_MS),
                    backend_id,
                    model,
                    client_key_id,
                    pool,
                ))
                .or_default()
                .add(delta);
        }
    }
    if super::key_spend::add(&tx, &spent, now_ms())? {
        super::bump_version(&tx)?;
    }
    let mut by_backend: BTreeMap<(i64, &str, i64), Delta> = BTreeMap::new();
    for (&(day, backend_id, _, _, pool), delta) in &daily {
        by_backend
            .entry((day, backend_id, pool))
            .or_default()
            .add(delta);
    }
    {
        let mut upsert = tx.prepare_cached(&upsert_sql(
            "usage_daily_by_backend",
            "day_start, backend_id, pool",
        ))?;
        for ((day, backend_id, pool), delta) in &by_backend {
            upsert_row(&mut upsert, params![day, backend_id, pool], delta)?;
        }
    }
    {
        let mut upsert = tx.prepare_cached(&upsert_sql(
            "usage_daily",
            "day_start, backend_id, model, client_key_id, pool",
        ))?;
        for ((day, backend_id, model, client_key_id, pool), delta) in &daily {
            upsert_row(
                &mut upsert,
                params![day, backend_id, model, client_key_id, pool],
                delta,
            )?;
        }
    }
    {
        let mut advance = tx.prepare_cached(
            "INSERT INTO usage_high_water (node_id, incarnation, sequence, update_time) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (node_id, incarnation) DO UPDATE SET sequence = excluded.sequence,
                 update_time = excluded.update_time",
        )?;
        let now = now_ms();
        for ((node_id, incarnation), (stored, mark)) in &marks {
            if mark > stored {
                advance.execute(params![node_id, incarnation, *mark as i64, now])?;
            }
        }
    }
    tx.commit()?;
    Ok((acked, fresh))
}

/// A table retention deletes from: its name, its time column and its key.
type RetainedTable = (&'static str, &'static str, &'static str);

const HOURLY_TABLE: RetainedTable = (
    "usage_hourly",
    "hour_start",
    "hour_start, backend_id, model, client_key_id, pool",
);

const DAILY_TABLES: [RetainedTable; 3] = [
    (
        "usage_daily",
        "day_start",
        "day_start, backend_id, model, client_key_id, pool",
    ),
    (
        "usage_daily_by_backend",
        "day_start",
        "day_start, backend_id, pool",
    ),
    ("key_spend", "day_start", "client_key_id, day_start"),
];

/// Deletes at most `limit` of the oldest expired usage rows (see
/// [`Store::apply_usage_retention`]): hourly rows past `usage_retention_days` first, then the
/// daily rows (by day, by day and backend) and keys' daily spend past
/// `usage_daily_retention_days`. A key's lifetime spend is kept apart (`key_spend_total`), and
/// the days of any budget period are younger than the shortest daily retention allowed
/// ([`crate::settings::MIN_DAILY_RETENTION_DAYS`]).
fn delete_expired(conn: &Connection, now_ms: i64, limit: usize) -> Result<u64, StoreError> {
    let settings = super::load_settings_in(conn)?;
    let mut deleted = 0u64;
    for (days, tables) in [
        (settings.usage_retention_days, &[HOURLY_TABLE][..]),
        (settings.usage_daily_retention_days, &DAILY_TABLES[..]),
    ] {
        // The days count back from the first table's newest row.
        let (anchor, time, _) = tables[0];
        let Some(cutoff) = retention_cutoff(conn, anchor, time, days, now_ms)? else {
            continue;
        };
        for &table in tables {
            let room = limit.saturating_sub(deleted as usize);
            if room == 0 {
                return Ok(deleted);
            }
            let here = delete_before(conn, table, cutoff, room)?;
            if here > 0 && table == HOURLY_TABLE {
                // Where the hours now begin, whatever the setting says later.
                conn.prepare_cached(
                    "INSERT INTO meta (key, value) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
                )?
                .execute(params![HOURS_PRUNED_BEFORE, cutoff])?;
            }
            deleted += here;
        }
    }
    Ok(deleted)
}

/// The `meta` key of the cutoff hourly retention last deleted rows before: hours older are
/// gone whatever `usage_retention_days` says now.
const HOURS_PRUNED_BEFORE: &str = "hours_pruned_before";

/// The start of the oldest day a retention of `days` keeps (`None`: keep everything, or
/// nothing is stored). Days count back from today or from the newest `time` in `table`,
/// whichever is earlier: a control plane started with its clock ahead (a year, by a bad time
/// source) then deletes nothing the stored history itself does not call old, where counting
/// from its clock alone deleted every hourly row, for good, before the clock was corrected.
fn retention_cutoff(
    conn: &Connection,
    table: &str,
    time: &str,
    days: u32,
    now_ms: i64,
) -> Result<Option<i64>, StoreError> {
    if days == 0 {
        return Ok(None);
    }
    // Each table's key (or an index) starts with its time: one step down a B-tree.
    let newest: Option<i64> =
        conn.query_row(&format!("SELECT max({time}) FROM {table}"), [], |r| {
            r.get(0)
        })?;
    Ok(newest.map(|newest| {
        floor_to(now_ms.min(newest), DAY_MS).saturating_sub(i64::from(days) * DAY_MS)
    }))
}

/// Deletes at most `limit` of the rows of `table` whose `time` is before `cutoff`, oldest
/// first, by their `key` (the usage tables have no rowid).
fn delete_before(
    conn: &Connection,
    (table, time, key): (&str, &str, &str),
    cutoff: i64,
    limit: usize,
) -> Result<u64, StoreError> {
    let deleted = conn.execute(
        &format!(
            "DELETE FROM {table} WHERE ({key}) IN (
                 SELECT {key} FROM {table} WHERE {time} < ?1 ORDER BY {time} LIMIT ?2)"
        ),
        params![cutoff, limit as i64],
    )?;
    Ok(deleted as u64)
}

/// Which tables a query may read; only tests compare the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sources {
    HourlyAndDaily,
    #[cfg_attr(not(test), allow(dead_code))]
    HourlyOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Hourly,
    /// Per (day, pool, backend, model, client key).
    Daily,
    /// Per (day, pool, backend): for queries that neither filter nor group by
    /// model or client key.
    DailyByBackend,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Hourly => "usage_hourly",
            Table::Daily => "usage_daily",
            Table::DailyByBackend => "usage_daily_by_backend",
        }
    }

    fn time_column(self) -> &'static str {
        match self {
            Table::Hourly => "hour_start",
            Table::Daily | Table::DailyByBackend => "day_start",
        }
    }
}

/// A time range `[start, end)` (unbounded where `None`) answered by one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part {
    table: Table,
    start: Option<i64>,
    end: Option<i64>,
}

/// Splits a filter's range (widened to whole hours) into parts: whole UTC days
/// from the daily table when `whole_days` allows, the hours before the first
/// and after the last whole day from the hourly table.
fn plan(filter: &TotalsFilter, whole_days: bool) -> Vec<Part> {
    let start = filter.start_ms.map(|s| floor_to(s, HOUR_MS));
    let end = filter.end_ms.map(|e| ceil_to(e, HOUR_MS));
    if let (Some(s), Some(e)) = (start, end)
        && s >= e
    {
        return Vec::new();
    }
    let hourly = |start, end| Part {
        table: Table::Hourly,
        start,
        end,
    };
    if !whole_days {
        return vec![hourly(start, end)];
    }
    let first_day = start.map(|s| ceil_to(s, DAY_MS));
    let last_day = end.map(|e| floor_to(e, DAY_MS));
    if let (Some(first), Some(last)) = (first_day, last_day)
        && first >= last
    {
        return vec![hourly(start, end)];
    }
    let mut parts = Vec::new();
    if start != first_day {
        parts.push(hourly(start, first_day));
    }
    parts.push(Part {
        table: Table::Daily,
        start: first_day,
        end: last_day,
    });
    if end != last_day {
        parts.push(hourly(last_day, end));
    }
    parts
}

/// The groups a query reads: keys after the first (when given) up to and with the second
/// (when given).
type GroupRange<'a> = (Option<&'a str>, Option<&'a str>);

/// The WHERE clause of a part: its time range, the filter, and the `groups` of `group_by`
/// (rows of other groups are skipped before they are grouped).
fn where_clause(
    part: &Part,
    filter: &TotalsFilter,
    group_by: GroupBy,
    groups: GroupRange<'_>,
) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let time = part.table.time_column();
    let mut clauses = Vec::new();
    let mut values = Vec::new();
    if let Some(start) = part.start {
        clauses.push(format!("{time} >= ?"));
        values.push(Value::Integer(start));
    }
    if let Some(end) = part.end {
        clauses.push(format!("{time} < ?"));
        values.push(Value::Integer(end));
    }
    for (column, value) in [
        ("backend_id", &filter.backend_id),
        ("model", &filter.model),
        ("client_key_id", &filter.client_key_id),
    ] {
        if let Some(v) = value {
            clauses.push(format!("{column} = ?"));
            values.push(Value::Text(v.clone()));
        }
    }
    for (bound, op) in [(groups.0, ">"), (groups.1, "<=")] {
        if let Some(key) = bound {
            clauses.push(format!("{} {op} ?", group_expr(group_by)));
            values.push(Value::Text(key.to_owned()));
        }
    }
    let sql = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    (sql, values)
}

/// Sums of one (time bucket, group) before percentiles are taken.
#[derive(Debug, Clone, Default)]
struct Sums {
    totals: Totals,
    histogram: Histogram,
}

impl Sums {
    fn add(&mut self, other: &Sums) {
        let (t, o) = (&mut self.totals, &other.totals);
        // Saturating, as each part's own sums are (SQLite's `total()` read into a u64 stops
        // at its largest): a range with partial days at both ends adds three parts.
        for (sum, part) in [
            (&mut t.request_count, o.request_count),
            (&mut t.error_count, o.error_count),
            (&mut t.stream_count, o.stream_count),
            (&mut t.estimated_count, o.estimated_count),
            (&mut t.prompt_tokens, o.prompt_tokens),
            (&mut t.completion_tokens, o.completion_tokens),
            (&mut t.cached_prompt_tokens, o.cached_prompt_tokens),
            (&mut t.reasoning_tokens, o.reasoning_tokens),
            (
                &mut t.cache_write_prompt_tokens,
                o.cache_write_prompt_tokens,
            ),
            (&mut t.audio_prompt_tokens, o.audio_prompt_tokens),
            (&mut t.audio_completion_tokens, o.audio_completion_tokens),
            (&mut t.ttft_count, o.ttft_count),
        ] {
            *sum = sum.saturating_add(part);
        }
        t.cost += o.cost;
        t.latency_ms_sum += o.latency_ms_sum;
        t.ttft_ms_sum += o.ttft_ms_sum;
        // A (time bucket, group) lies within one part of a plan, so this only ever meets
        // a zero; totals over several parts count their backends in one query instead.
        t.backend_count = t.backend_count.max(o.backend_count);
        for (b, n) in other.histogram.buckets() {
            self.histogram.add(b, n);
        }
    }

    fn finish(mut self) -> Totals {
        self.totals.latency_count = self.histogram.count();
        self.totals.p50_ms = self.histogram.quantile(0.50);
        self.totals.p95_ms = self.histogram.quantile(0.95);
        self.totals.p99_ms = self.histogram.quantile(0.99);
        self.totals
    }
}

/// The SQL expression a part groups by.
fn group_expr(group_by: GroupBy) -> &'static str {
    match group_by {
        GroupBy::Nothing => "''",
        GroupBy::Backend => "+backend_id",
        GroupBy::Model => "+model",
        GroupBy::ClientKey => "+client_key_id",
        GroupBy::Pool => "CASE pool WHEN 1 THEN 'primary' WHEN 2 THEN 'fallback' ELSE '' END",
    }
}

/// The SQL of one part: sums per (time bucket `b`, group `g`). A time bucket never spans
/// two parts (they split at day boundaries), so its distinct backends are counted here;
/// without time buckets (`None`) the count is left to [`count_backends`].
fn part_sql(part: &Part, clause: &str, bucket: Option<Granularity>, group_by: GroupBy) -> String {
    // The unary `+` (a no-op) keeps SQLite from walking a whole index to get the
    // GROUP BY order for free instead of searching the filter's range.
    let time = part.table.time_column();
    let (bucket, backends) = match bucket {
        None => ("0".to_owned(), "0"),
        Some(Granularity::Hour) => (format!("+{time}"), "count(DISTINCT nullif(backend_id, ''))"),
        Some(Granularity::Day) => (
            format!("{time} - (({time} % {DAY_MS}) + {DAY_MS}) % {DAY_MS}"),
            "count(DISTINCT nullif(backend_id, ''))",
        ),
    };
    format!(
        "SELECT {bucket} AS b, {group} AS g, total(request_count), total(error_count),
                total(stream_count), total(prompt_tokens), total(completion_tokens), total(cost),
                total(latency_ms_sum), total(ttft_ms_sum), total(ttft_count),
                usage_histogram(latency_histogram), {backends}, total(cached_prompt_tokens),
                total(reasoning_tokens), total(cache_write_prompt_tokens),
                total(audio_prompt_tokens), total(audio_completion_tokens),
                total(estimated_count)
         FROM {table} {clause} GROUP BY b, g",
        group = group_expr(group_by),
        table = part.table.name(),
    )
}

/// A page of groups: those whose key comes after `after` (all when `None`), at most `limit`
/// of them, in ascending order of key.
#[derive(Debug, Clone)]
pub struct GroupPage {
    pub after: Option<String>,
    pub limit: usize,
}

/// The tables a filter's range is read from: [`plan`], with whole days from the
/// per-backend rollup when the query needs neither model nor client key.
fn parts(
    filter: &TotalsFilter,
    bucket: Option<Granularity>,
    group_by: GroupBy,
    sources: Sources,
) -> Vec<Part> {
    // Hour buckets need hourly rows; everything else may read whole days.
    let whole_days = sources == Sources::HourlyAndDaily && bucket != Some(Granularity::Hour);
    // Whole days that need neither model nor client key come from the per-backend
    // rollup: the same sums, from models × client keys times fewer rows.
    let by_backend = filter.model.is_none()
        && filter.client_key_id.is_none()
        && matches!(
            group_by,
            GroupBy::Nothing | GroupBy::Backend | GroupBy::Pool
        );
    let mut parts = plan(filter, whole_days);
    for part in &mut parts {
        if part.table == Table::Daily && by_backend {
            part.table = Table::DailyByBackend;
        }
    }
    parts
}

/// Sums per (time bucket, group) over every part of the filter's range.
fn aggregate(
    conn: &Connection,
    filter: &TotalsFilter,
    bucket: Option<Granularity>,
    group_by: GroupBy,
    sources: Sources,
    page: Option<&GroupPage>,
) -> Result<BTreeMap<(i64, String), Sums>, StoreError> {
    let mut out: BTreeMap<(i64, String), Sums> = BTreeMap::new();
    let parts = parts(filter, bucket, group_by, sources);
    // Of a page, its groups first, so that only their rows are summed and their backends
    // counted: summing every group after the cursor, and counting every group's backends,
    // made each page cost most of what the whole answer did.
    let end = match page {
        None => None,
        Some(page) => match page_end(conn, filter, &parts, group_by, page)? {
            Some(end) => Some(end),
            None => return Ok(out),
        },
    };
    let groups = (page.and_then(|p| p.after.as_deref()), end.as_deref());
    for part in &parts {
        let (clause, values) = where_clause(part, filter, group_by, groups);
        let mut stmt = conn.prepare_cached(&part_sql(part, &clause, bucket, group_by))?;
        let mut rows = stmt.query(params_from_iter(values.iter()))?;
        while let Some(r) = rows.next()? {
            let n = |i: usize| r.get::<_, f64>(i).map(|v| v.max(0.0) as u64);
            let mut histogram = Histogram::default();
            histogram
                .merge_encoded(&r.get::<_, Vec<u8>>(11)?)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let sums = Sums {
                totals: Totals {
                    request_count: n(2)?,
                    error_count: n(3)?,
                    stream_count: n(4)?,
                    prompt_tokens: n(5)?,
                    completion_tokens: n(6)?,
                    cost: r.get(7)?,
                    latency_ms_sum: r.get(8)?,
                    ttft_ms_sum: r.get(9)?,
                    ttft_count: n(10)?,
                    backend_count: r.get::<_, i64>(12)?.max(0) as u64,
                    cached_prompt_tokens: n(13)?,
                    reasoning_tokens: n(14)?,
                    cache_write_prompt_tokens: n(15)?,
                    audio_prompt_tokens: n(16)?,
                    audio_completion_tokens: n(17)?,
                    estimated_count: n(18)?,
                    ..Totals::default()
                },
                histogram,
            };
            out.entry((r.get(0)?, r.get(1)?)).or_default().add(&sums);
        }
    }
    if bucket.is_none() {
        for (group, count) in count_backends(conn, filter, &parts, group_by, groups)? {
            if let Some(sums) = out.get_mut(&(0, group)) {
                sums.totals.backend_count = count;
            }
        }
    }
    Ok(out)
}

/// The last group a page reads: the first after its cursor past its `limit` (which tells
/// that more follow; the caller cuts it off), or the last there is; `None` when no group
/// follows the cursor. Each part's first `limit + 1` groups hold those of all parts (a group
/// among the first n of all parts is among the first n of each part it is in).
fn page_end(
    conn: &Connection,
    filter: &TotalsFilter,
    parts: &[Part],
    group_by: GroupBy,
    page: &GroupPage,
) -> Result<Option<String>, StoreError> {
    let mut keys = std::collections::BTreeSet::new();
    for part in parts {
        let (clause, values) = where_clause(part, filter, group_by, (page.after.as_deref(), None));
        let sql = format!(
            "SELECT DISTINCT {} AS g FROM {} {clause} ORDER BY g LIMIT {}",
            group_expr(group_by),
            part.table.name(),
            page.limit.saturating_add(1),
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(values.iter()), |r| r.get::<_, String>(0))?;
        for key in rows {
            keys.insert(key?);
        }
    }
    if keys.len() > page.limit {
        Ok(keys.into_iter().nth(page.limit))
    } else {
        Ok(keys.pop_last())
    }
}

/// Distinct backends per group over all `parts` together: a backend seen in the hourly
/// edges and in the whole days counts once.
fn count_backends(
    conn: &Connection,
    filter: &TotalsFilter,
    parts: &[Part],
    group_by: GroupBy,
    groups: GroupRange<'_>,
) -> Result<Vec<(String, u64)>, StoreError> {
    if parts.is_empty() {
        return Ok(Vec::new());
    }
    let mut selects = Vec::new();
    let mut values = Vec::new();
    for part in parts {
        let (clause, v) = where_clause(part, filter, group_by, groups);
        selects.push(format!(
            "SELECT {} AS g, backend_id FROM {} {clause}",
            group_expr(group_by),
            part.table.name()
        ));
        values.extend(v);
    }
    let sql = format!(
        "SELECT g, count(DISTINCT nullif(backend_id, '')) FROM ({}) GROUP BY g",
        selects.join(" UNION ALL ")
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params_from_iter(values.iter()), |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn totals(
    conn: &Connection,
    filter: &TotalsFilter,
    sources: Sources,
) -> Result<Totals, StoreError> {
    let mut all = Sums::default();
    for sums in aggregate(conn, filter, None, GroupBy::Nothing, sources, None)?.values() {
        all.add(sums);
    }
    Ok(all.finish())
}

fn series(
    conn: &Connection,
    filter: &TotalsFilter,
    granularity: Granularity,
    group_by: GroupBy,
    sources: Sources,
) -> Result<Vec<SeriesPoint>, StoreError> {
    grouped(conn, filter, Some(granularity), group_by, sources)
}

/// Points per (time bucket, group), oldest first, then by group key; one time bucket
/// (start 0) when `bucket` is `None`.
fn grouped(
    conn: &Connection,
    filter: &TotalsFilter,
    bucket: Option<Granularity>,
    group_by: GroupBy,
    sources: Sources,
) -> Result<Vec<SeriesPoint>, StoreError> {
    let sums = aggregate(conn, filter, bucket, group_by, sources, None)?;
    labelled(conn, group_by, sums)
}

/// Points from sums per (time bucket, group), in the order given, each with its group's
/// readable name.
fn labelled(
    conn: &Connection,
    group_by: GroupBy,
    sums: impl IntoIterator<Item = ((i64, String), Sums)>,
) -> Result<Vec<SeriesPoint>, StoreError> {
    let labels = group_labels(conn, group_by)?;
    Ok(sums
        .into_iter()
        .map(|((start_ms, group_key), sums)| SeriesPoint {
            start_ms,
            group_label: labels
                .get(&group_key)
                .cloned()
                .unwrap_or_else(|| group_key.clone()),
            group_key,
            totals: sums.finish(),
        })
        .collect())
}

/// Newest time bucket first, groups within a bucket still ascending.
fn sort_newest_first(points: &mut [SeriesPoint]) {
    points.sort_by(|a, b| {
        b.start_ms
            .cmp(&a.start_ms)
            .then_with(|| a.group_key.cmp(&b.group_key))
    });
}

/// Whether the point of time bucket `start_ms` and group `group_key` comes after `cursor`
/// in `order`.
fn is_after(start_ms: i64, group_key: &str, cursor: &Cursor, order: Order) -> bool {
    let later = match order {
        Order::OldestFirst => start_ms > cursor.start_ms,
        Order::NewestFirst => start_ms < cursor.start_ms,
    };
    later || (start_ms == cursor.start_ms && group_key > cursor.group_key.as_str())
}

/// The first and the last day any usage was stored (daily rows outlive their hours: daily retention is at least the hourly one), as
/// `[first day, day after the last)`; `None` when nothing is stored.
fn stored_days(conn: &Connection) -> Result<Option<(i64, i64)>, StoreError> {
    let (first, last): (Option<i64>, Option<i64>) = conn.query_row(
        "SELECT min(day_start), max(day_start) FROM usage_daily_by_backend",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(first.zip(last).map(|(f, l)| (f, l.saturating_add(DAY_MS))))
}

/// Time buckets the first window of a page reads; later windows are sized from the
/// density seen so far.
const FIRST_WINDOW_BUCKETS: i64 = 64;

/// One page of a series: windows of whole time buckets are read one after another in
/// `order` until more than `limit` points are in hand or the range is exhausted. The first
/// window is small; each next one is sized from the points per bucket seen so far, and at
/// least doubles after a window that found less than half of what was still needed, so a
/// page reads about the buckets it returns, and a sparse series costs a few windows more.
/// Every window is a range of whole buckets (only the range's own ends may cut one), so no
/// bucket is split between two windows.
fn page(
    conn: &Connection,
    filter: &TotalsFilter,
    granularity: Granularity,
    group_by: GroupBy,
    order: Order,
    after: Option<&Cursor>,
    limit: usize,
) -> Result<Page, StoreError> {
    let width = match granularity {
        Granularity::Hour => HOUR_MS,
        Granularity::Day => DAY_MS,
    };
    let Some((first, last)) = stored_days(conn)? else {
        return Ok(Page::default());
    };
    // The range to read: the filter's widened to whole hours, as `plan` widens it for the
    // sums (a start equal to its end inside an hour reads that hour), bounded by what is
    // stored, and past the cursor.
    let mut lo = filter
        .start_ms
        .map_or(first, |s| floor_to(s, HOUR_MS).max(first));
    let mut hi = filter
        .end_ms
        .map_or(last, |e| ceil_to(e, HOUR_MS).min(last));
    if let Some(cursor) = after {
        match order {
            Order::OldestFirst => lo = lo.max(cursor.start_ms),
            Order::NewestFirst => hi = hi.min(cursor.start_ms.saturating_add(width)),
        }
    }
    let wanted = limit.saturating_add(1);
    let mut found: Vec<((i64, String), Sums)> = Vec::new();
    let mut buckets = FIRST_WINDOW_BUCKETS.min(wanted as i64);
    let (mut scanned, mut seen) = (0i64, 0usize);
    while lo < hi && found.len() < wanted {
        let span = width.saturating_mul(buckets);
        let (start, end) = match order {
            Order::OldestFirst => (lo, hi.min(ceil_to(lo, width).saturating_add(span))),
            Order::NewestFirst => (lo.max(floor_to(hi, width).saturating_sub(span)), hi),
        };
        let window = TotalsFilter {
            start_ms: Some(start),
            end_ms: Some(end),
            ..filter.clone()
        };
        let mut sums: Vec<_> = aggregate(
            conn,
            &window,
            Some(granularity),
            group_by,
            Sources::HourlyAndDaily,
            None,
        )?
        .into_iter()
        .filter(|((b, g), _)| after.is_none_or(|c| is_after(*b, g, c, order)))
        .collect();
        if order == Order::NewestFirst {
            sums.sort_by(|((a, g), _), ((b, h), _)| b.cmp(a).then_with(|| g.cmp(h)));
        }
        let needed = wanted - found.len();
        let here = sums.len();
        found.extend(sums);
        scanned += (end - start).div_euclid(width).max(1);
        seen += here;
        let estimate = if seen == 0 {
            buckets.saturating_mul(2)
        } else {
            // The buckets the rest needs at the density seen so far, and a quarter more.
            let per_bucket = seen as f64 / scanned as f64;
            ((wanted - found.len().min(wanted)) as f64 / per_bucket * 1.25).ceil() as i64 + 1
        };
        buckets = if here * 2 < needed {
            estimate.max(buckets.saturating_mul(2))
        } else {
            estimate
        };
        match order {
            Order::OldestFirst => lo = end,
            Order::NewestFirst => hi = start,
        }
    }
    let more = found.len() > limit;
    found.truncate(limit);
    let next = more
        .then(|| found.last())
        .flatten()
        .map(|((start_ms, group_key), _)| Cursor {
            start_ms: *start_ms,
            group_key: group_key.clone(),
        });
    Ok(Page {
        points: labelled(conn, group_by, found)?,
        next,
    })
}

/// Readable names of grouped ids: backend and client key names (models are their own label).
fn group_labels(
    conn: &Connection,
    group_by: GroupBy,
) -> Result<std::collections::HashMap<String, String>, StoreError> {
    let sql = match group_by {
        GroupBy::Backend => {
            "SELECT id, name FROM backends
             UNION ALL SELECT id, name || ' (deleted)' FROM deleted_backends
                 WHERE id NOT IN (SELECT id FROM backends)"
        }
        // A revoked key's name may have been given to a new key since: said apart.
        GroupBy::ClientKey => {
            "SELECT id, CASE WHEN revoked = 0 THEN name ELSE name || ' (revoked)' END FROM client_keys"
        }
        GroupBy::Nothing | GroupBy::Model | GroupBy::Pool => return Ok(Default::default()),
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(
            &dir.path().join("t.db"),
            crate::crypto::MasterKey::generate(),
        )
        .unwrap();
        (dir, store)
    }

    fn row(
        sequence: u64,
        backend: &str,
        model: &str,
        key: &str,
        time_ms: i64,
        latency_ms: f64,
    ) -> UsageRow {
        UsageRow {
            sequence,
            backend_id: backend.into(),
            model: model.into(),
            client_key_id: key.into(),
            prompt_tokens: 1000 + sequence % 7,
            completion_tokens: 10 * (sequence % 5),
            cached_prompt_tokens: 100 * (sequence % 2),
            reasoning_tokens: 3 * (sequence % 5),
            latency_ms: Some(latency_ms),
            ttft_ms: sequence.is_multiple_of(3).then_some(latency_ms / 3.0),
            is_error: sequence.is_multiple_of(11),
            stream: sequence.is_multiple_of(3),
            time_ms,
            ..Default::default()
        }
    }

    const DAY0: i64 = 1_764_028_800_000; // 2025-11-25T00:00:00Z
    const HOUR: i64 = HOUR_MS;
    const DAY: i64 = DAY_MS;

    #[test]
    fn plans_read_whole_days_from_daily_rows_and_the_edges_from_hourly_rows() {
        let part = |table, start, end| Part { table, start, end };
        let filter = |start, end| TotalsFilter {
            start_ms: start,
            end_ms: end,
            ..Default::default()
        };
        use Table::{Daily, Hourly};
        assert_eq!(
            plan(&filter(None, None), true),
            vec![part(Daily, None, None)]
        );
        assert_eq!(
            plan(&filter(None, None), false),
            vec![part(Hourly, None, None)]
        );
        // Mid-hour edges widen to whole hours.
        assert_eq!(
            plan(
                &filter(Some(DAY0 + 90 * 60_000), Some(DAY0 + 2 * DAY + 1)),
                true
            ),
            vec![
                part(Hourly, Some(DAY0 + HOUR), Some(DAY0 + DAY)),
                part(Daily, Some(DAY0 + DAY), Some(DAY0 + 2 * DAY)),
                part(Hourly, Some(DAY0 + 2 * DAY), Some(DAY0 + 2 * DAY + HOUR)),
            ]
        );
        assert_eq!(
            plan(&filter(Some(DAY0), Some(DAY0 + DAY)), true),
            vec![part(Daily, Some(DAY0), Some(DAY0 + DAY))]
        );
        // No whole day inside: hourly rows only.
        assert_eq!(
            plan(&filter(Some(DAY0 + HOUR), Some(DAY0 + DAY + HOUR)), true),
            vec![part(Hourly, Some(DAY0 + HOUR), Some(DAY0 + DAY + HOUR))]
        );
        assert_eq!(
            plan(&filter(None, Some(DAY0 + HOUR)), true),
            vec![
                part(Daily, None, Some(DAY0)),
                part(Hourly, Some(DAY0), Some(DAY0 + HOUR))
            ]
        );
        // An empty range reads nothing, but inside an hour it widens to that hour.
        assert!(plan(&filter(Some(DAY0), Some(DAY0)), true).is_empty());
        assert_eq!(
            plan(&filter(Some(DAY0 + 5), Some(DAY0 + 5)), true),
            vec![part(Hourly, Some(DAY0), Some(DAY0 + HOUR))]
        );
    }

    /// Integers and percentiles exactly, float sums up to rounding.
    fn assert_same_totals(a: &Totals, b: &Totals, context: &str) {
        let ints = |t: &Totals| {
            (
                t.request_count,
                t.error_count,
                t.stream_count,
                t.prompt_tokens,
                t.completion_tokens,
                t.cached_prompt_tokens,
                t.reasoning_tokens,
                t.ttft_count,
                t.p50_ms.to_bits(),
                t.p95_ms.to_bits(),
                t.p99_ms.to_bits(),
                t.backend_count,
            )
        };
        assert_eq!(ints(a), ints(b), "{context}");
        for (x, y) in [
            (a.cost, b.cost),
            (a.latency_ms_sum, b.latency_ms_sum),
            (a.ttft_ms_sum, b.ttft_ms_sum),
        ] {
            assert!(
                (x - y).abs() <= 1e-9 * x.abs().max(y.abs()),
                "{context}: {x} != {y}"
            );
        }
    }

    #[tokio::test]
    async fn every_query_answers_alike_from_daily_rows_and_from_hourly_rows() {
        use rand::{Rng as _, SeedableRng as _};
        let (_dir, store) = open();
        let mut backends = Vec::new();
        for i in 0..3 {
            let spec = crate::backend::BackendSpec {
                anthropic_version: Default::default(),
                api_format: Default::default(),
                key_header: Default::default(),
                name: format!("b{i}"),
                base_url: "https://api.example.com/v1".into(),
                pool: if i == 2 {
                    crate::backend::Pool::Fallback
                } else {
                    crate::backend::Pool::Primary
                },
                priority: 1,
                weight: 1,
                models: vec![crate::backend::ModelRoute {
                    default_max_tokens: Default::default(),
                    max_output_tokens: Default::default(),
                    name: "m1".into(),
                    upstream_name: "m1".into(),
                    input_price_per_mtok: 0.1 + f64::from(i),
                    output_price_per_mtok: 0.3,
                    ..Default::default()
                }],
                rpm_limit: 0,
                tpm_limit: 0,
                enabled: true,
                responses_api: None,
            };
            backends.push(
                store
                    .create_backend(spec, String::new())
                    .await
                    .unwrap()
                    .0
                    .id,
            );
        }
        backends.push(String::new());
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let rows: Vec<UsageRow> = (1..=4000)
            .map(|seq| {
                row(
                    seq,
                    &backends[rng.random_range(0..backends.len())],
                    ["m1", "m2"][rng.random_range(0..2)],
                    ["k1", "k2", "k3"][rng.random_range(0..3)],
                    DAY0 - 2 * DAY + rng.random_range(0..5 * DAY),
                    rng.random_range(0.05..30_000.0),
                )
            })
            .collect();
        for chunk in rows.chunks(333) {
            store
                .ingest_usage("n".into(), "i".into(), chunk.to_vec())
                .await
                .unwrap();
        }
        let mut filters = vec![TotalsFilter::default()];
        for _ in 0..60 {
            let mut at = || match rng.random_range(0..4) {
                0 => None,
                1 => Some(DAY0 + rng.random_range(-3..4) * DAY),
                2 => Some(DAY0 + rng.random_range(-60..90) * HOUR),
                _ => Some(DAY0 + rng.random_range(-3 * DAY..4 * DAY)),
            };
            let (mut start, mut end) = (at(), at());
            if let (Some(s), Some(e)) = (start, end)
                && e < s
            {
                (start, end) = (end, start);
            }
            filters.push(TotalsFilter {
                start_ms: start,
                end_ms: end,
                backend_id: rng.random_bool(0.2).then(|| backends[0].clone()),
                model: rng.random_bool(0.2).then(|| "m2".to_owned()),
                client_key_id: rng.random_bool(0.2).then(|| "k3".to_owned()),
            });
        }
        let mut compared = 0;
        for filter in filters {
            let f = filter.clone();
            let (a, b) = store
                .call(move |conn, _| {
                    Ok((
                        totals(conn, &f, Sources::HourlyAndDaily)?,
                        totals(conn, &f, Sources::HourlyOnly)?,
                    ))
                })
                .await
                .unwrap();
            assert_same_totals(&a, &b, &format!("{filter:?}"));
            compared += a.request_count;
            for group_by in [
                GroupBy::Nothing,
                GroupBy::Backend,
                GroupBy::Model,
                GroupBy::ClientKey,
                GroupBy::Pool,
            ] {
                let f = filter.clone();
                let (a, b) = store
                    .call(move |conn, _| {
                        Ok((
                            series(
                                conn,
                                &f,
                                Granularity::Day,
                                group_by,
                                Sources::HourlyAndDaily,
                            )?,
                            series(conn, &f, Granularity::Day, group_by, Sources::HourlyOnly)?,
                        ))
                    })
                    .await
                    .unwrap();
                assert_eq!(a.len(), b.len(), "{filter:?} {group_by:?}");
                for (x, y) in a.iter().zip(&b) {
                    assert_eq!(
                        (x.start_ms, &x.group_key, &x.group_label),
                        (y.start_ms, &y.group_key, &y.group_label)
                    );
                    assert_same_totals(&x.totals, &y.totals, &format!("{filter:?} {group_by:?}"));
                }
            }
        }
        assert!(compared > 4000, "the filters matched records");
    }

    #[tokio::test]
    async fn pages_joined_are_the_whole_series_in_either_order() {
        use rand::{Rng as _, SeedableRng as _};
        let (_dir, store) = open();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // Sparse traffic over ten days with an empty day in the middle, so windows must
        // grow past gaps.
        let rows: Vec<UsageRow> = (1..=600)
            .map(|seq| {
                let mut day = rng.random_range(0..10);
                if day == 4 {
                    day = 5;
                }
                row(
                    seq,
                    ["b1", "b2", ""][rng.random_range(0..3)],
                    ["m1", "m2", "m3"][rng.random_range(0..3)],
                    "k",
                    DAY0 + day * DAY + rng.random_range(0..DAY),
                    5.0,
                )
            })
            .collect();
        store
            .ingest_usage("n".into(), "i".into(), rows)
            .await
            .unwrap();
        let filters = [
            TotalsFilter::default(),
            TotalsFilter {
                start_ms: Some(DAY0 + 30 * HOUR + 600_000),
                end_ms: Some(DAY0 + 8 * DAY + 5 * HOUR + 1),
                ..Default::default()
            },
            TotalsFilter {
                model: Some("m2".into()),
                ..Default::default()
            },
        ];
        for filter in filters {
            for granularity in [Granularity::Hour, Granularity::Day] {
                for group_by in [GroupBy::Nothing, GroupBy::Model, GroupBy::Backend] {
                    for order in [Order::OldestFirst, Order::NewestFirst] {
                        let whole = store
                            .usage_series(filter.clone(), granularity, group_by, order)
                            .await
                            .unwrap();
                        assert!(!whole.is_empty());
                        for limit in [1, 7, 100, whole.len(), whole.len() + 1] {
                            let mut joined = Vec::new();
                            let mut after = None;
                            loop {
                                let page = store
                                    .usage_page(
                                        filter.clone(),
                                        granularity,
                                        group_by,
                                        order,
                                        after,
                                        limit,
                                    )
                                    .await
                                    .unwrap();
                                assert!(page.points.len() <= limit);
                                joined.extend(page.points);
                                match page.next {
                                    Some(cursor) => after = Some(cursor),
                                    None => break,
                                }
                            }
                            let context = format!(
                                "{filter:?} {granularity:?} {group_by:?} {order:?} {limit}"
                            );
                            assert_eq!(joined.len(), whole.len(), "{context}");
                            for (a, b) in joined.iter().zip(&whole) {
                                assert_eq!(
                                    (a.start_ms, &a.group_key),
                                    (b.start_ms, &b.group_key),
                                    "{context}"
                                );
                                assert_same_totals(&a.totals, &b.totals, &context);
                            }
                        }
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn filtered_queries_search_an_index() {
        let (_dir, store) = open();
        let plans = store
            .call(|conn, _| {
                let mut plans = Vec::new();
                let some = |s: &str| Some(s.to_owned());
                let filters = [
                    TotalsFilter {
                        start_ms: Some(DAY0),
                        end_ms: Some(DAY0 + DAY),
                        ..Default::default()
                    },
                    TotalsFilter {
                        start_ms: Some(DAY0),
                        ..Default::default()
                    },
                    TotalsFilter {
                        backend_id: some("b"),
                        ..Default::default()
                    },
                    TotalsFilter {
                        model: some("m"),
                        ..Default::default()
                    },
                    TotalsFilter {
                        client_key_id: some("k"),
                        ..Default::default()
                    },
                    TotalsFilter {
                        start_ms: Some(DAY0),
                        backend_id: some("b"),
                        model: some("m"),
                        client_key_id: some("k"),
                        ..Default::default()
                    },
                ];
                for filter in &filters {
                    for table in [Table::Hourly, Table::Daily, Table::DailyByBackend] {
                        let needs_model_or_key =
                            filter.model.is_some() || filter.client_key_id.is_some();
                        if table == Table::DailyByBackend && needs_model_or_key {
                            continue;
                        }
                        let part = Part {
                            table,
                            start: filter.start_ms,
                            end: filter.end_ms,
                        };
                        let (clause, values) =
                            where_clause(&part, filter, GroupBy::Nothing, (None, None));
                        for bucket in [None, Some(Granularity::Hour), Some(Granularity::Day)] {
                            for group_by in [
                                GroupBy::Nothing,
                                GroupBy::Backend,
                                GroupBy::Model,
                                GroupBy::ClientKey,
                            ] {
                                if table != Table::Hourly && bucket == Some(Granularity::Hour) {
                                    continue;
                                }
                                if table == Table::DailyByBackend
                                    && !matches!(group_by, GroupBy::Nothing | GroupBy::Backend)
                                {
                                    continue;
                                }
                                let sql = format!(
                                    "EXPLAIN QUERY PLAN {}",
                                    part_sql(&part, &clause, bucket, group_by)
                                );
                                let mut stmt = conn.prepare(&sql)?;
                                let detail: Vec<String> = stmt
                                    .query_map(params_from_iter(values.iter()), |r| r.get(3))?
                                    .collect::<Result<_, _>>()?;
                                plans.push((sql, detail.join("; ")));
                            }
                        }
                    }
                }
                Ok(plans)
            })
            .await
            .unwrap();
        // Hourly: 6 filters × 3 buckets × 4 groupings; daily: 6 × 2 × 4; by backend:
        // the 3 filters without model or key × 2 × 2.
        assert_eq!(plans.len(), 6 * 3 * 4 + 6 * 2 * 4 + 3 * 2 * 2);
        for (sql, plan) in plans {
            assert!(
                plan.contains("SEARCH usage_") && !plan.contains("SCAN usage_"),
                "{plan}\n{sql}"
            );
        }
    }

    #[tokio::test]
    async fn batches_in_one_transaction_count_each_record_once() {
        let (_dir, store) = open();
        let batch = |node: &str, inc: &str, seqs: std::ops::RangeInclusive<u64>| UsageBatch {
            node_id: node.into(),
            incarnation: inc.into(),
            rows: seqs
                .map(|s| row(s, "b", "m", "k", DAY0 + s as i64, 10.0))
                .collect(),
            previous_sequence: 0,
        };
        let acked = store
            .ingest_usage_batches(vec![
                batch("a", "1", 1..=10),
                batch("a", "1", 5..=12),
                batch("b", "1", 1..=3),
                batch("a", "2", 1..=4),
                batch("a", "1", 1..=2),
            ])
            .await
            .unwrap();
        assert_eq!(acked, vec![Ok(10), Ok(12), Ok(3), Ok(4), Ok(12)]);
        assert_eq!(
            store
                .ingest_usage_batches(vec![batch("a", "1", 1..=13), batch("b", "1", 1..=3)])
                .await
                .unwrap(),
            vec![Ok(13), Ok(3)]
        );
        let t = store.totals(TotalsFilter::default()).await.unwrap();
        assert_eq!(t.request_count, 13 + 3 + 4);
        let want: u64 = (1..=13)
            .chain(1..=3)
            .chain(1..=4)
            .map(|s| 1000 + s % 7)
            .sum();
        assert_eq!(t.prompt_tokens, want);
        // The cached and reasoning parts are counted once too.
        let seqs = || (1..=13u64).chain(1..=3).chain(1..=4);
        assert_eq!(
            t.cached_prompt_tokens,
            seqs().map(|s| 100 * (s % 2)).sum::<u64>()
        );
        assert_eq!(t.reasoning_tokens, seqs().map(|s| 3 * (s % 5)).sum::<u64>());
    }

    #[tokio::test]
    async fn a_batch_past_one_not_stored_waits_for_it() {
        let (_dir, store) = open();
        let batch = |seqs: std::ops::RangeInclusive<u64>, previous_sequence| UsageBatch {
            node_id: "a".into(),
            incarnation: "1".into(),
            rows: seqs
                .map(|s| row(s, "b", "m", "k", DAY0 + s as i64, 10.0))
                .collect(),
            previous_sequence,
        };
        // 11..=20 follows 10, which is not stored: refused, while 1..=5 in the same commit
        // (and the batches after it, once 10 is in) go through.
        let outcomes = store
            .ingest_usage_batches(vec![batch(11..=20, 10), batch(1..=5, 0)])
            .await
            .unwrap();
        assert_eq!(
            outcomes,
            vec![
                Err(OutOfOrder {
                    previous: 10,
                    held: 0
                }),
                Ok(5)
            ]
        );
        let outcomes = store
            .ingest_usage_batches(vec![
                batch(6..=10, 5),
                batch(11..=20, 10),
                batch(11..=20, 10),
            ])
            .await
            .unwrap();
        assert_eq!(outcomes, vec![Ok(10), Ok(20), Ok(20)]);
        let t = store.totals(TotalsFilter::default()).await.unwrap();
        assert_eq!(t.request_count, 20);
    }

    /// An upstream reporting absurd usage fills a row's sums: they stop at the largest integer
    /// SQLite stores, and reports keep committing (past it SQLite's sum is a REAL, which the
    /// STRICT column refused: every replica's reports failed on that row for good).
    #[tokio::test]
    async fn sums_past_the_largest_integer_stop_there_and_reports_still_commit() {
        let (dir, store) = open();
        let batch = |sequence: u64, prompt_tokens| UsageBatch {
            node_id: "a".into(),
            incarnation: "1".into(),
            rows: vec![UsageRow {
                prompt_tokens,
                ..row(sequence, "b", "m", "k", DAY0 + 10, 5.0)
            }],
            previous_sequence: sequence - 1,
        };
        let ingest = |b| {
            let store = store.clone();
            async move { store.ingest_usage_batches(vec![b]).await.unwrap() }
        };
        assert_eq!(ingest(batch(1, 1)).await, vec![Ok(1)]);
        let db = Connection::open(dir.path().join("t.db")).unwrap();
        for table in ["usage_hourly", "usage_daily", "usage_daily_by_backend"] {
            let changed = db
                .execute(
                    &format!("UPDATE {table} SET prompt_tokens = ?1"),
                    [i64::MAX - 5],
                )
                .unwrap();
            assert_eq!(changed, 1, "{table}");
        }
        assert_eq!(ingest(batch(2, 1 << 40)).await, vec![Ok(2)]);
        assert_eq!(ingest(batch(3, 7)).await, vec![Ok(3)]);
        for table in ["usage_hourly", "usage_daily", "usage_daily_by_backend"] {
            let stored: i64 = db
                .query_row(&format!("SELECT prompt_tokens FROM {table}"), [], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(stored, i64::MAX, "{table}");
        }
        let t = store.totals(TotalsFilter::default()).await.unwrap();
        assert_eq!(t.request_count, 3);
        assert!(t.prompt_tokens >= i64::MAX as u64, "{}", t.prompt_tokens);
    }

    #[tokio::test]
    async fn totals_over_three_parts_past_the_largest_integer_stop_there() {
        let (dir, store) = open();
        // One record in each part of a range with partial days at both ends: day 0 from
        // 01:00 (hourly rows), day 1 (a daily row), day 2 until 01:00 (hourly rows).
        for (sequence, time_ms) in [
            (1, DAY0 + 10 * HOUR),
            (2, DAY0 + DAY + 10 * HOUR),
            (3, DAY0 + 2 * DAY + 1),
        ] {
            let batch = UsageBatch {
                node_id: "a".into(),
                incarnation: "1".into(),
                rows: vec![row(sequence, "b", "m", "k", time_ms, 5.0)],
                previous_sequence: sequence - 1,
            };
            store.ingest_usage_batches(vec![batch]).await.unwrap();
        }
        let db = Connection::open(dir.path().join("t.db")).unwrap();
        for table in ["usage_hourly", "usage_daily", "usage_daily_by_backend"] {
            db.execute(
                &format!("UPDATE {table} SET prompt_tokens = ?1"),
                [i64::MAX],
            )
            .unwrap();
        }
        let t = store
            .totals(TotalsFilter {
                start_ms: Some(DAY0 + HOUR),
                end_ms: Some(DAY0 + 2 * DAY + HOUR),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(t.request_count, 3);
        assert_eq!(t.prompt_tokens, u64::MAX);
    }

    /// Migrations that rebuild the usage tables write about their size into the WAL: opening
    /// the store gives that space back (a checkpoint that truncates the WAL) instead of
    /// keeping it until the control plane stops.
    #[test]
    fn a_migration_that_rebuilds_the_usage_tables_leaves_no_large_wal() {
        use rusqlite_migration::{M, Migrations};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            crate::store::sql_functions::register(&conn).unwrap();
            Migrations::new(
                super::super::MIGRATIONS
                    .iter()
                    .map(|sql| M::up(sql))
                    .collect(),
            )
            .to_version(&mut conn, 1)
            .unwrap();
            // 100,000 hourly rows of version 1 (11 years of one backend, model and key).
            conn.execute_batch(&format!(
                "INSERT INTO backends VALUES ('b1', 'one', 'u', 2, 1, 1, 0, 1, NULL, '', 0, 0);
                 WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 99999)
                 INSERT INTO usage_hourly
                 SELECT {DAY0} + i * {HOUR}, 'b1', 'model-with-a-longer-name', 'key-' || (i % 7),
                        3, 1, 0, 30, 20, 0.5, 60.0, 0.0, 0 FROM n;"
            ))
            .unwrap();
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        let database = std::fs::metadata(&path).unwrap().len();
        assert!(database > 5_000_000, "{database} bytes");
        let (store, _) = Store::open(&path, crate::crypto::MasterKey::generate()).unwrap();
        let wal = std::fs::metadata(dir.path().join("m.db-wal")).map_or(0, |m| m.len());
        assert!(wal < 1_000_000, "the WAL holds {wal} bytes");
        drop(store);
    }

    #[test]
    fn migration_2_moves_histograms_into_rows_and_rolls_up_days() {
        use rusqlite_migration::{M, Migrations};
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("m.db")).unwrap();
        crate::store::sql_functions::register(&conn).unwrap();
        let migrations = Migrations::new(
            super::super::MIGRATIONS
                .iter()
                .map(|sql| M::up(sql))
                .collect(),
        );
        migrations.to_version(&mut conn, 1).unwrap();
        conn.execute_batch(&format!(
            "INSERT INTO backends VALUES ('b1', 'one', 'u', 2, 1, 1, 0, 1, NULL, '', 0, 0);
             INSERT INTO usage_hourly VALUES
                 ({h0}, 'b1', 'm', 'k', 3, 1, 0, 30, 20, 0.5, 60.0, 0.0, 0),
                 ({h1}, 'b1', 'm', 'k', 2, 0, 1, 10, 10, 0.25, 40.0, 5.0, 1),
                 ({h1}, '', 'm', 'k', 1, 1, 0, 0, 0, 0.0, 1.0, 0.0, 0);
             INSERT INTO usage_hourly_latency VALUES
                 ({h0}, 'b1', 'm', 'k', 40, 2), ({h0}, 'b1', 'm', 'k', 7, 1),
                 ({h1}, 'b1', 'm', 'k', 40, 2),
                 ({h1}, '', 'm', 'k', 3, 1);",
            h0 = DAY0,
            h1 = DAY0 + 5 * HOUR,
        ))
        .unwrap();
        migrations.to_latest(&mut conn).unwrap();
        let histogram = |sql: &str| -> Vec<(u32, u64)> {
            let blob: Vec<u8> = conn.query_row(sql, [], |r| r.get(0)).unwrap();
            let mut h = Histogram::default();
            h.merge_encoded(&blob).unwrap();
            h.buckets()
        };
        assert_eq!(
            histogram(&format!(
                "SELECT latency_histogram FROM usage_hourly WHERE hour_start = {DAY0} AND backend_id = 'b1'"
            )),
            vec![(7, 1), (40, 2)]
        );
        assert_eq!(
            histogram("SELECT latency_histogram FROM usage_daily WHERE backend_id = 'b1'"),
            vec![(7, 1), (40, 4)]
        );
        let daily: Vec<(i64, String, i64, i64, f64)> = conn
            .prepare("SELECT day_start, backend_id, pool, request_count, cost FROM usage_daily ORDER BY backend_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            daily,
            vec![
                (DAY0, String::new(), 0, 1, 0.0),
                (DAY0, "b1".into(), 2, 5, 0.75)
            ]
        );
        // Migration 3 rolls the daily rows up per (day, backend, pool).
        let by_backend: Vec<(i64, String, i64, i64, f64)> = conn
            .prepare("SELECT day_start, backend_id, pool, request_count, cost FROM usage_daily_by_backend ORDER BY backend_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(by_backend, daily);
        assert_eq!(
            histogram(
                "SELECT latency_histogram FROM usage_daily_by_backend WHERE backend_id = 'b1'"
            ),
            vec![(7, 1), (40, 4)]
        );
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'usage_hourly_latency'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0);
        // Migration 7 files each hour under the pool of its day's row.
        let hourly_pools: Vec<(String, i64)> = conn
            .prepare("SELECT backend_id, pool FROM usage_hourly ORDER BY backend_id, hour_start")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            hourly_pools,
            vec![(String::new(), 0), ("b1".into(), 2), ("b1".into(), 2)]
        );
    }

    /// 25,000 hourly rows of one expired day: deleted in transactions of 10,000 at most (a
    /// day's rows in one held the only writer, usage acks and cooldowns behind it, for
    /// seconds on a large deployment), and none starts once the store is stopping.
    #[tokio::test]
    async fn retention_deletes_in_bounded_transactions_and_stops_between_them() {
        struct StopAtRetention(CancellationToken);
        impl crate::store::StoreObserver for StopAtRetention {
            fn write(&self, op: WriteOp, _: Duration) {
                if op == WriteOp::retention {
                    self.0.cancel();
                }
            }
            fn write_failed(&self, _: WriteOp) {}
            fn usage_committed(&self, _: u64) {}
            fn usage_clamped(&self, _: u64) {}
        }
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let (store, _) = Store::open_observed(
            &dir.path().join("t.db"),
            crate::crypto::MasterKey::generate(),
            std::sync::Arc::new(StopAtRetention(stop.clone())),
        )
        .unwrap();
        // And one of today, which retention counts back from.
        let rows: Vec<UsageRow> = (0..25_000)
            .map(|n| row(n + 1, "b", "m", &format!("k{n}"), DAY0 - 10 * DAY, 5.0))
            .chain([row(25_001, "b", "m", "k", DAY0 + HOUR, 5.0)])
            .collect();
        store
            .ingest_usage("n".into(), "i".into(), rows)
            .await
            .unwrap();
        let mut settings = store.get_settings().await.unwrap();
        settings.usage_retention_days = 3;
        store.put_settings(settings).await.unwrap();
        let now = DAY0 + 12 * HOUR;
        assert_eq!(
            store.apply_usage_retention_until(now, &stop).await.unwrap(),
            10_000,
            "stopped after one transaction"
        );
        assert_eq!(store.apply_usage_retention(now).await.unwrap(), 15_000);
        let t = store.totals(TotalsFilter::default()).await.unwrap();
        assert_eq!(t.request_count, 25_001, "the daily rows keep the day");
    }

    /// A store holding one hourly row on each of the `days` days up to DAY0, with a retention
    /// of 3 days applied at `now`: what it deleted, the hours left and the requests counted.
    async fn retained(days: i64, now: i64) -> (u64, Vec<i64>, u64) {
        let (_dir, store) = open();
        let rows: Vec<UsageRow> = (0..days)
            .map(|d| row(d as u64 + 1, "b", "m", "k", DAY0 - d * DAY + 3 * HOUR, 5.0))
            .collect();
        store
            .ingest_usage("n".into(), "i".into(), rows)
            .await
            .unwrap();
        let mut settings = store.get_settings().await.unwrap();
        assert_eq!(settings.usage_retention_days, 90);
        settings.usage_retention_days = 3;
        store.put_settings(settings).await.unwrap();
        let deleted = store.apply_usage_retention(now).await.unwrap();
        let hours = store
            .usage_series(
                TotalsFilter::default(),
                Granularity::Hour,
                GroupBy::Nothing,
                Order::OldestFirst,
            )
            .await
            .unwrap();
        let requests = store.totals(TotalsFilter::default()).await.unwrap();
        (
            deleted,
            hours.iter().map(|p| p.start_ms).collect(),
            requests.request_count,
        )
    }

    #[tokio::test]
    async fn retention_deletes_whole_days_of_hourly_rows_only() {
        // At DAY0 + 12 h the hours of DAY0 and the 3 days before stay; the daily rows keep
        // every request.
        let kept: Vec<i64> = (0..4).map(|d| DAY0 - (3 - d) * DAY + 3 * HOUR).collect();
        assert_eq!(retained(10, DAY0 + 12 * HOUR).await, (6, kept, 10));
    }

    #[tokio::test]
    async fn a_clock_ahead_deletes_no_hour_the_stored_history_keeps() {
        // A clock a year ahead: the days are counted from the newest stored hour (DAY0), so
        // only what is older than its three days goes, as at DAY0 + 12 h.
        let kept: Vec<i64> = (0..4).map(|d| DAY0 - (3 - d) * DAY + 3 * HOUR).collect();
        assert_eq!(retained(5, DAY0 + 365 * DAY).await, (1, kept, 5));
    }

    /// A page of a grouped total costs a fraction of the unpaged answer: each page summed
    /// every group after its cursor and counted every group's backends, so reading the ten
    /// pages below cost 6.1 unpaged answers (now 2.1: each page still looks at the range's
    /// rows to find its groups, but sums and counts only theirs).
    #[tokio::test]
    async fn the_pages_of_grouped_totals_read_their_own_groups() {
        const KEYS: u64 = 600;
        const PAGE: usize = 60;
        let (dir, store) = open();
        // Each key on two backends, on three days and in two hours of the last.
        let rows: Vec<UsageRow> = (0..KEYS * 4)
            .map(|n| {
                let (key, slot) = (n % KEYS, n / KEYS);
                let backend = if slot % 2 == 0 { "b1" } else { "b2" };
                let time = DAY0 - (slot as i64 % 3) * DAY + (slot as i64) * HOUR;
                row(n + 1, backend, "m", &format!("k{key:04}"), time, 5.0)
            })
            .collect();
        store
            .ingest_usage("n".into(), "i".into(), rows)
            .await
            .unwrap();
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        crate::store::sql_functions::register(&conn).unwrap();
        let filter = TotalsFilter {
            start_ms: Some(DAY0 - 2 * DAY + 2 * HOUR),
            end_ms: Some(DAY0 + 4 * HOUR),
            ..TotalsFilter::default()
        };
        let steps = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = std::sync::Arc::clone(&steps);
        conn.progress_handler(
            1,
            Some(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }),
        );
        let read = |page: &GroupPage| {
            let steps_now = || steps.load(std::sync::atomic::Ordering::Relaxed);
            let before = steps_now();
            let sums = aggregate(
                &conn,
                &filter,
                None,
                GroupBy::ClientKey,
                Sources::HourlyAndDaily,
                Some(page),
            )
            .unwrap();
            let groups: Vec<(String, u64)> = sums
                .into_iter()
                .take(page.limit)
                .map(|((_, key), sums)| (key, sums.totals.backend_count))
                .collect();
            (groups, steps_now() - before)
        };
        let (whole, unpaged) = read(&GroupPage {
            after: None,
            limit: 1_000_000,
        });
        assert_eq!(whole.len(), KEYS as usize);
        let (mut paged, mut after, mut cost) = (Vec::new(), None, 0);
        loop {
            let (groups, steps) = read(&GroupPage {
                after: after.clone(),
                limit: PAGE,
            });
            cost += steps;
            after = groups.last().map(|(key, _)| key.clone());
            paged.extend(groups);
            if paged.len() >= whole.len() {
                break;
            }
        }
        assert_eq!(
            paged, whole,
            "the pages hold the groups and backends of the whole"
        );
        let pages = KEYS / PAGE as u64;
        assert!(
            cost < 3 * unpaged,
            "{pages} pages took {cost} steps, {} times the unpaged answer ({unpaged})",
            cost as f64 / unpaged as f64
        );
    }

    /// With a daily retention, the daily rows and the keys' daily spend of days past it go
    /// too, in the same bounded transactions; a key's lifetime spend and its current
    /// period's stay.
    #[tokio::test]
    async fn daily_retention_deletes_old_days_and_keeps_the_keys_spend() {
        use crate::budget::BudgetPeriod;
        use crate::client_key::NewClientKey;
        let (dir, store) = open();
        let key = |name: &str, budget_period| NewClientKey {
            name: name.into(),
            max_budget_nanos: 1_000_000_000_000,
            budget_period,
            ..NewClientKey::default()
        };
        let lifetime = store
            .create_client_key(key("lifetime", BudgetPeriod::Lifetime))
            .await
            .unwrap()
            .0;
        let monthly = store
            .create_client_key(key("monthly", BudgetPeriod::Monthly))
            .await
            .unwrap()
            .0;
        // 400 days of one request a day for each key, 7 nano-units each.
        let rows: Vec<UsageRow> = (0..400)
            .flat_map(|d| [(2 * d, &lifetime.id), (2 * d + 1, &monthly.id)])
            .map(|(n, id)| UsageRow {
                cost_nanos: 7,
                ..row(
                    n as u64 + 1,
                    "b",
                    "m",
                    id,
                    DAY0 - (n / 2) * DAY + 3 * HOUR,
                    5.0,
                )
            })
            .collect();
        store
            .ingest_usage("n".into(), "i".into(), rows)
            .await
            .unwrap();
        let now = DAY0 + 12 * HOUR;
        let spends = || store.key_spends(vec![lifetime.clone(), monthly.clone()], now);
        let before = spends().await.unwrap();
        assert_eq!(before[0], 400 * 7);
        let mut settings = store.get_settings().await.unwrap();
        settings.usage_daily_retention_days = 365;
        store.put_settings(settings).await.unwrap();
        // Hours (90 days kept): days 91 to 399 back, two keys' rows each (618); days (365
        // kept): 366 to 399 back, two keys' daily rows (68), one by backend (34), two keys'
        // spend (68).
        assert_eq!(
            store.apply_usage_retention(now).await.unwrap(),
            618 + 68 + 34 + 68
        );
        let db = Connection::open(dir.path().join("t.db")).unwrap();
        let count = |table: &str| -> (i64, i64) {
            db.query_row(
                &format!("SELECT count(*), min(day_start) FROM {table}"),
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
        };
        let oldest = DAY0 - 365 * DAY;
        assert_eq!(count("usage_daily"), (2 * 366, oldest));
        assert_eq!(count("usage_daily_by_backend"), (366, oldest));
        assert_eq!(count("key_spend"), (2 * 366, oldest));
        assert_eq!(
            spends().await.unwrap(),
            before,
            "lifetime and monthly spend"
        );
        let totals = store.totals(TotalsFilter::default()).await.unwrap();
        assert_eq!(totals.request_count, 2 * 366);
        assert_eq!(store.apply_usage_retention(now).await.unwrap(), 0);
    }
}
