//! Usage ingestion and totals. A batch and the sender's high-water sequence are
//! applied in one transaction; aggregation into hourly rows happens in SQL.

use rusqlite::{Connection, params, params_from_iter};

use super::{Store, StoreError};
use crate::time::now_ms;
use crate::usage::{UsageRow, latency_bucket, quantile};

const HOUR_MS: i64 = 3_600_000;

/// Which usage [`Store::totals`] adds up. Ranges are matched at hour granularity:
/// an hourly row counts when its hour starts in `[start, end)`.
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
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
    pub latency_ms_sum: f64,
    pub ttft_ms_sum: f64,
    pub ttft_count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
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
        self.call(move |conn, _| ingest(conn, &node_id, &incarnation, &rows))
            .await
    }

    pub async fn totals(&self, filter: TotalsFilter) -> Result<Totals, StoreError> {
        self.call(move |conn, _| totals(conn, &filter)).await
    }
}

fn ingest(
    conn: &mut Connection,
    node_id: &str,
    incarnation: &str,
    rows: &[UsageRow],
) -> Result<u64, StoreError> {
    let tx = conn.transaction()?;
    let high_water: u64 = tx
        .query_row(
            "SELECT sequence FROM usage_high_water WHERE node_id = ?1 AND incarnation = ?2",
            params![node_id, incarnation],
            |r| r.get::<_, i64>(0),
        )
        .map(|v| v.max(0) as u64)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(0),
            e => Err(e),
        })?;
    let fresh: Vec<&UsageRow> = rows.iter().filter(|r| r.sequence > high_water).collect();
    let Some(new_high_water) = fresh.iter().map(|r| r.sequence).max() else {
        return Ok(high_water);
    };
    tx.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS usage_batch (
             hour_start INTEGER, backend_id TEXT, model TEXT, client_key_id TEXT,
             prompt_tokens INTEGER, completion_tokens INTEGER, latency_ms REAL, ttft_ms REAL,
             is_error INTEGER, stream INTEGER, bucket INTEGER);
         DELETE FROM temp.usage_batch;",
    )?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO temp.usage_batch VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for r in &fresh {
            insert.execute(params![
                r.time_ms.div_euclid(HOUR_MS) * HOUR_MS,
                r.backend_id,
                r.model,
                r.client_key_id,
                r.prompt_tokens.min(i64::MAX as u64) as i64,
                r.completion_tokens.min(i64::MAX as u64) as i64,
                r.latency_ms,
                r.ttft_ms,
                r.is_error,
                r.stream,
                latency_bucket(r.latency_ms),
            ])?;
        }
    }
    // Cost uses the model route's prices as they are now; later price changes do
    // not rewrite history.
    tx.execute(
        "INSERT INTO usage_hourly (hour_start, backend_id, model, client_key_id, request_count, error_count,
                                   stream_count, prompt_tokens, completion_tokens, cost, latency_ms_sum,
                                   ttft_ms_sum, ttft_count)
         SELECT b.hour_start, b.backend_id, b.model, b.client_key_id, count(*), sum(b.is_error), sum(b.stream),
                sum(b.prompt_tokens), sum(b.completion_tokens),
                sum(b.prompt_tokens * coalesce(m.input_price_per_mtok, 0.0)
                    + b.completion_tokens * coalesce(m.output_price_per_mtok, 0.0)) / 1000000.0,
                sum(b.latency_ms), total(b.ttft_ms), count(b.ttft_ms)
         FROM temp.usage_batch b
         LEFT JOIN backend_models m ON m.backend_id = b.backend_id AND m.name = b.model
         GROUP BY b.hour_start, b.backend_id, b.model, b.client_key_id
         ON CONFLICT (hour_start, backend_id, model, client_key_id) DO UPDATE SET
             request_count = request_count + excluded.request_count,
             error_count = error_count + excluded.error_count,
             stream_count = stream_count + excluded.stream_count,
             prompt_tokens = prompt_tokens + excluded.prompt_tokens,
             completion_tokens = completion_tokens + excluded.completion_tokens,
             cost = cost + excluded.cost,
             latency_ms_sum = latency_ms_sum + excluded.latency_ms_sum,
             ttft_ms_sum = ttft_ms_sum + excluded.ttft_ms_sum,
             ttft_count = ttft_count + excluded.ttft_count",
        [],
    )?;
    tx.execute(
        "INSERT INTO usage_hourly_latency (hour_start, backend_id, model, client_key_id, bucket, count)
         SELECT hour_start, backend_id, model, client_key_id, bucket, count(*)
         FROM temp.usage_batch GROUP BY hour_start, backend_id, model, client_key_id, bucket
         ON CONFLICT (hour_start, backend_id, model, client_key_id, bucket) DO UPDATE SET
             count = count + excluded.count",
        [],
    )?;
    tx.execute("DELETE FROM temp.usage_batch", [])?;
    tx.execute(
        "INSERT INTO usage_high_water (node_id, incarnation, sequence, update_time) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (node_id, incarnation) DO UPDATE SET sequence = excluded.sequence,
             update_time = excluded.update_time",
        params![node_id, incarnation, new_high_water as i64, now_ms()],
    )?;
    tx.commit()?;
    Ok(new_high_water)
}

/// The WHERE clause and its parameters for a filter over usage tables.
pub(crate) fn filter_clause(filter: &TotalsFilter) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut clauses = Vec::new();
    let mut values = Vec::new();
    if let Some(start) = filter.start_ms {
        clauses.push("hour_start >= ?");
        values.push(Value::Integer(start.div_euclid(HOUR_MS) * HOUR_MS));
    }
    if let Some(end) = filter.end_ms {
        clauses.push("hour_start < ?");
        values.push(Value::Integer(end));
    }
    for (column, value) in [
        ("backend_id = ?", &filter.backend_id),
        ("model = ?", &filter.model),
        ("client_key_id = ?", &filter.client_key_id),
    ] {
        if let Some(v) = value {
            clauses.push(column);
            values.push(Value::Text(v.clone()));
        }
    }
    let sql = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    (sql, values)
}

fn totals(conn: &Connection, filter: &TotalsFilter) -> Result<Totals, StoreError> {
    let (clause, values) = filter_clause(filter);
    let mut t = conn.query_row(
        &format!(
            "SELECT total(request_count), total(error_count), total(stream_count), total(prompt_tokens),
                    total(completion_tokens), total(cost), total(latency_ms_sum), total(ttft_ms_sum),
                    total(ttft_count)
             FROM usage_hourly {clause}"
        ),
        params_from_iter(values.iter()),
        |r| {
            let n = |i: usize| r.get::<_, f64>(i).map(|v| v.max(0.0) as u64);
            Ok(Totals {
                request_count: n(0)?,
                error_count: n(1)?,
                stream_count: n(2)?,
                prompt_tokens: n(3)?,
                completion_tokens: n(4)?,
                cost: r.get(5)?,
                latency_ms_sum: r.get(6)?,
                ttft_ms_sum: r.get(7)?,
                ttft_count: n(8)?,
                ..Totals::default()
            })
        },
    )?;
    let mut stmt = conn.prepare(&format!(
        "SELECT bucket, sum(count) FROM usage_hourly_latency {clause} GROUP BY bucket ORDER BY bucket"
    ))?;
    let histogram: Vec<(u32, u64)> = stmt
        .query_map(params_from_iter(values.iter()), |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
        })?
        .collect::<Result<_, _>>()?;
    t.p50_ms = quantile(&histogram, 0.50);
    t.p95_ms = quantile(&histogram, 0.95);
    t.p99_ms = quantile(&histogram, 0.99);
    Ok(t)
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
    /// Usage per time bucket (and per group), oldest first.
    pub async fn usage_series(
        &self,
        filter: TotalsFilter,
        granularity: Granularity,
        group_by: GroupBy,
    ) -> Result<Vec<SeriesPoint>, StoreError> {
        self.call(move |conn, _| series(conn, &filter, granularity, group_by))
            .await
    }
}

fn series(
    conn: &Connection,
    filter: &TotalsFilter,
    granularity: Granularity,
    group_by: GroupBy,
) -> Result<Vec<SeriesPoint>, StoreError> {
    let bucket = match granularity {
        Granularity::Hour => "hour_start",
        Granularity::Day => "(hour_start / 86400000) * 86400000",
    };
    let group = match group_by {
        GroupBy::Nothing => "''",
        GroupBy::Backend => "backend_id",
        GroupBy::Model => "model",
        GroupBy::ClientKey => "client_key_id",
    };
    let (clause, values) = filter_clause(filter);
    let mut points: Vec<SeriesPoint> = {
        let mut stmt = conn.prepare(&format!(
            "SELECT {bucket} AS b, {group} AS g, total(request_count), total(error_count), total(stream_count),
                    total(prompt_tokens), total(completion_tokens), total(cost), total(latency_ms_sum),
                    total(ttft_ms_sum), total(ttft_count)
             FROM usage_hourly {clause} GROUP BY b, g ORDER BY b, g"
        ))?;
        stmt.query_map(params_from_iter(values.iter()), |r| {
            let n = |i: usize| r.get::<_, f64>(i).map(|v| v.max(0.0) as u64);
            Ok(SeriesPoint {
                start_ms: r.get(0)?,
                group_key: r.get(1)?,
                group_label: String::new(),
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
                    ..Totals::default()
                },
            })
        })?
        .collect::<Result<_, _>>()?
    };
    let mut histograms: std::collections::HashMap<(i64, String), Vec<(u32, u64)>> =
        std::collections::HashMap::new();
    {
        let mut stmt = conn.prepare(&format!(
            "SELECT {bucket} AS b, {group} AS g, bucket, sum(count)
             FROM usage_hourly_latency {clause} GROUP BY b, g, bucket ORDER BY b, g, bucket"
        ))?;
        let rows = stmt.query_map(params_from_iter(values.iter()), |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, i64>(3)?.max(0) as u64,
            ))
        })?;
        for row in rows {
            let (b, g, bucket, count) = row?;
            histograms.entry((b, g)).or_default().push((bucket, count));
        }
    }
    let labels = group_labels(conn, group_by)?;
    for point in &mut points {
        if let Some(h) = histograms.get(&(point.start_ms, point.group_key.clone())) {
            point.totals.p50_ms = quantile(h, 0.50);
            point.totals.p95_ms = quantile(h, 0.95);
            point.totals.p99_ms = quantile(h, 0.99);
        }
        point.group_label = labels
            .get(&point.group_key)
            .cloned()
            .unwrap_or_else(|| point.group_key.clone());
    }
    Ok(points)
}

/// Readable names of grouped ids: backend and client key names (models are their own label).
fn group_labels(
    conn: &Connection,
    group_by: GroupBy,
) -> Result<std::collections::HashMap<String, String>, StoreError> {
    let sql = match group_by {
        GroupBy::Backend => "SELECT id, name FROM backends",
        GroupBy::ClientKey => "SELECT id, name FROM client_keys",
        GroupBy::Nothing | GroupBy::Model => return Ok(Default::default()),
    };
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}
