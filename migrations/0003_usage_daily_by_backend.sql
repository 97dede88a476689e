-- Sluice control plane schema, version 3: daily usage per (backend, pool), the
-- rollup that whole-day queries without a model or client-key filter or grouping
-- read (all-time totals, the dashboard's overview, usage by backend). It has
-- models × client keys times fewer rows than usage_daily, which stays for the
-- model and client-key queries. Kept like usage_daily: retention never deletes it.
-- Columns mean what they mean in usage_hourly.
CREATE TABLE usage_daily_by_backend (
    day_start         INTEGER NOT NULL,
    backend_id        TEXT NOT NULL,
    pool              INTEGER NOT NULL,
    request_count     INTEGER NOT NULL,
    error_count       INTEGER NOT NULL,
    stream_count      INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost              REAL NOT NULL,
    latency_ms_sum    REAL NOT NULL,
    ttft_ms_sum       REAL NOT NULL,
    ttft_count        INTEGER NOT NULL,
    latency_histogram BLOB NOT NULL,
    PRIMARY KEY (day_start, backend_id, pool)
) STRICT, WITHOUT ROWID;

CREATE INDEX usage_daily_by_backend_backend ON usage_daily_by_backend(backend_id, day_start);

-- usage_histogram is the control plane's own aggregate (registered before migrations run).
INSERT INTO usage_daily_by_backend (day_start, backend_id, pool, request_count, error_count,
                                    stream_count, prompt_tokens, completion_tokens, cost,
                                    latency_ms_sum, ttft_ms_sum, ttft_count, latency_histogram)
SELECT day_start, backend_id, pool, sum(request_count), sum(error_count), sum(stream_count),
       sum(prompt_tokens), sum(completion_tokens), total(cost), total(latency_ms_sum),
       total(ttft_ms_sum), sum(ttft_count), coalesce(usage_histogram(latency_histogram), x'')
FROM usage_daily
GROUP BY day_start, backend_id, pool;
