-- Sluice control plane schema, version 2: daily usage rollups that outlive the
-- hourly rows, latency histograms stored in the usage row itself, and indexes
-- for every StatsService filter.

-- usage_hourly is rebuilt WITHOUT ROWID (an upsert is one B-tree search, not
-- an index search and a table search), and the latency histogram of each row
-- moves into the row: a BLOB of 9-byte entries, bucket (1 byte) then count
-- (8 bytes, big-endian), ascending by bucket (see usage.rs). One row per (hour,
-- backend, model, key) instead of one per bucket, and the row's indexes serve
-- the percentile queries too.
CREATE TABLE usage_hourly_v2 (
    hour_start        INTEGER NOT NULL,
    backend_id        TEXT NOT NULL,
    model             TEXT NOT NULL,
    client_key_id     TEXT NOT NULL,
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
    PRIMARY KEY (hour_start, backend_id, model, client_key_id)
) STRICT, WITHOUT ROWID;

INSERT INTO usage_hourly_v2
SELECT h.hour_start, h.backend_id, h.model, h.client_key_id, h.request_count, h.error_count,
       h.stream_count, h.prompt_tokens, h.completion_tokens, h.cost, h.latency_ms_sum,
       h.ttft_ms_sum, h.ttft_count, coalesce(l.histogram, x'')
FROM usage_hourly h
LEFT JOIN (
    SELECT hour_start, backend_id, model, client_key_id,
           unhex(group_concat(printf('%02X%016X', bucket, count), '' ORDER BY bucket)) AS histogram
    FROM usage_hourly_latency
    GROUP BY hour_start, backend_id, model, client_key_id
) AS l USING (hour_start, backend_id, model, client_key_id);

-- Daily usage per (pool, backend, model, client key); the retention setting
-- deletes old hourly rows, never these. pool is the backend's pool when the
-- records were ingested (1 primary, 2 fallback), 0 when the request reached no
-- backend or the backend is unknown. Columns mean what they mean in usage_hourly.
CREATE TABLE usage_daily (
    day_start         INTEGER NOT NULL,
    backend_id        TEXT NOT NULL,
    model             TEXT NOT NULL,
    client_key_id     TEXT NOT NULL,
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
    PRIMARY KEY (day_start, backend_id, model, client_key_id, pool)
) STRICT, WITHOUT ROWID;

CREATE INDEX usage_daily_backend ON usage_daily(backend_id, day_start);
CREATE INDEX usage_daily_model ON usage_daily(model, day_start);
CREATE INDEX usage_daily_client_key ON usage_daily(client_key_id, day_start);

-- Every hour already stored, rolled up (with the backend's pool as it is now).
INSERT INTO usage_daily (day_start, backend_id, model, client_key_id, pool, request_count, error_count,
                         stream_count, prompt_tokens, completion_tokens, cost, latency_ms_sum,
                         ttft_ms_sum, ttft_count, latency_histogram)
SELECT d.day_start, d.backend_id, d.model, d.client_key_id, coalesce(b.pool, 0),
       d.request_count, d.error_count, d.stream_count, d.prompt_tokens, d.completion_tokens, d.cost,
       d.latency_ms_sum, d.ttft_ms_sum, d.ttft_count, coalesce(l.histogram, x'')
FROM (
    SELECT hour_start - ((hour_start % 86400000) + 86400000) % 86400000 AS day_start,
           backend_id, model, client_key_id,
           sum(request_count) AS request_count, sum(error_count) AS error_count,
           sum(stream_count) AS stream_count, sum(prompt_tokens) AS prompt_tokens,
           sum(completion_tokens) AS completion_tokens, sum(cost) AS cost,
           sum(latency_ms_sum) AS latency_ms_sum, sum(ttft_ms_sum) AS ttft_ms_sum,
           sum(ttft_count) AS ttft_count
    FROM usage_hourly
    GROUP BY day_start, backend_id, model, client_key_id
) AS d
LEFT JOIN (
    SELECT day_start, backend_id, model, client_key_id,
           unhex(group_concat(printf('%02X%016X', bucket, count), '' ORDER BY bucket)) AS histogram
    FROM (
        SELECT hour_start - ((hour_start % 86400000) + 86400000) % 86400000 AS day_start,
               backend_id, model, client_key_id, bucket, sum(count) AS count
        FROM usage_hourly_latency
        GROUP BY day_start, backend_id, model, client_key_id, bucket
    )
    GROUP BY day_start, backend_id, model, client_key_id
) AS l USING (day_start, backend_id, model, client_key_id)
LEFT JOIN backends b ON b.id = d.backend_id;

DROP TABLE usage_hourly_latency;
DROP TABLE usage_hourly;
ALTER TABLE usage_hourly_v2 RENAME TO usage_hourly;
CREATE INDEX usage_hourly_backend ON usage_hourly(backend_id, hour_start);
CREATE INDEX usage_hourly_model ON usage_hourly(model, hour_start);
CREATE INDEX usage_hourly_client_key ON usage_hourly(client_key_id, hour_start);
