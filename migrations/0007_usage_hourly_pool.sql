-- Sluice control plane schema: hourly usage rows carry the backend's pool, as the
-- daily rows do, so usage grouped by pool is answered at hour granularity and at
-- the hourly edges of a day range. pool is the backend's pool when the records were
-- ingested (1 primary, 2 fallback, 0 no backend); it is part of the key, as in
-- usage_daily, so a backend moved to another pool mid-hour starts a new row.
CREATE TABLE usage_hourly_v3 (
    hour_start        INTEGER NOT NULL,
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
    PRIMARY KEY (hour_start, backend_id, model, client_key_id, pool)
) STRICT, WITHOUT ROWID;

-- An hour stored before this version takes the pool its day's row was filed under
-- (the highest, if the backend changed pool that day), else the backend's pool now.
INSERT INTO usage_hourly_v3
SELECT h.hour_start, h.backend_id, h.model, h.client_key_id,
       coalesce(
           (SELECT max(d.pool) FROM usage_daily d
            WHERE d.day_start = h.hour_start - ((h.hour_start % 86400000) + 86400000) % 86400000
              AND d.backend_id = h.backend_id AND d.model = h.model
              AND d.client_key_id = h.client_key_id),
           (SELECT b.pool FROM backends b WHERE b.id = h.backend_id),
           0),
       h.request_count, h.error_count, h.stream_count, h.prompt_tokens, h.completion_tokens,
       h.cost, h.latency_ms_sum, h.ttft_ms_sum, h.ttft_count, h.latency_histogram
FROM usage_hourly h;

DROP TABLE usage_hourly;
ALTER TABLE usage_hourly_v3 RENAME TO usage_hourly;
CREATE INDEX usage_hourly_backend ON usage_hourly(backend_id, hour_start);
CREATE INDEX usage_hourly_model ON usage_hourly(model, hour_start);
CREATE INDEX usage_hourly_client_key ON usage_hourly(client_key_id, hour_start);
