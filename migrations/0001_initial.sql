-- Sluice control plane schema, version 1.
-- Times are Unix milliseconds (UTC). Money is in the account's currency.

-- snapshot_version (integer), master_key_check (blob).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value ANY NOT NULL
) STRICT;

INSERT INTO meta (key, value) VALUES ('snapshot_version', 0);

CREATE TABLE backends (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL UNIQUE,
    base_url           TEXT NOT NULL,
    pool               INTEGER NOT NULL,
    priority           INTEGER NOT NULL,
    weight             INTEGER NOT NULL,
    rpm_limit          INTEGER NOT NULL,
    enabled            INTEGER NOT NULL,
    -- nonce || XChaCha20-Poly1305 ciphertext, associated data = id; NULL = no key.
    api_key_ciphertext BLOB,
    api_key_hint       TEXT NOT NULL,
    create_time        INTEGER NOT NULL,
    update_time        INTEGER NOT NULL
) STRICT;

CREATE TABLE backend_models (
    backend_id            TEXT NOT NULL REFERENCES backends(id) ON DELETE CASCADE,
    position              INTEGER NOT NULL,
    name                  TEXT NOT NULL,
    upstream_name         TEXT NOT NULL,
    input_price_per_mtok  REAL NOT NULL,
    output_price_per_mtok REAL NOT NULL,
    PRIMARY KEY (backend_id, name)
) STRICT;

CREATE TABLE client_keys (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    key_prefix     TEXT NOT NULL,
    key_sha256     BLOB NOT NULL UNIQUE,
    -- JSON array of model names; empty allows every model.
    allowed_models TEXT NOT NULL,
    rpm_limit      INTEGER NOT NULL,
    revoked        INTEGER NOT NULL DEFAULT 0,
    create_time    INTEGER NOT NULL,
    revoke_time    INTEGER
) STRICT;

-- Names are unique among keys in use; a revoked key's name may be reused.
CREATE UNIQUE INDEX client_keys_active_name ON client_keys(name) WHERE revoked = 0;

CREATE TABLE cooldowns (
    backend_id           TEXT PRIMARY KEY REFERENCES backends(id) ON DELETE CASCADE,
    until_time           INTEGER NOT NULL,
    consecutive_failures INTEGER NOT NULL,
    reason               TEXT NOT NULL,
    reported_by          TEXT NOT NULL,
    create_time          INTEGER NOT NULL
) STRICT;

CREATE TABLE settings (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    -- proto3 JSON of sluice.v1.Settings
    body TEXT NOT NULL
) STRICT;

CREATE TABLE data_planes (
    node_id        TEXT PRIMARY KEY,
    hostname       TEXT NOT NULL,
    peer_address   TEXT NOT NULL,
    build_version  TEXT NOT NULL,
    acked_version  INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT NOT NULL DEFAULT '',
    connect_time   INTEGER NOT NULL,
    last_seen_time INTEGER NOT NULL
) STRICT;

-- The highest usage sequence applied per data-plane process; advanced in the same
-- transaction as the records, so a resent record is recognised and skipped.
CREATE TABLE usage_high_water (
    node_id     TEXT NOT NULL,
    incarnation TEXT NOT NULL,
    sequence    INTEGER NOT NULL,
    update_time INTEGER NOT NULL,
    PRIMARY KEY (node_id, incarnation)
) STRICT;

-- Hourly usage per (backend, model, client key). backend_id is '' for requests
-- that reached no backend.
CREATE TABLE usage_hourly (
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
    PRIMARY KEY (hour_start, backend_id, model, client_key_id)
) STRICT;

CREATE INDEX usage_hourly_backend ON usage_hourly(backend_id, hour_start);
CREATE INDEX usage_hourly_model ON usage_hourly(model, hour_start);
CREATE INDEX usage_hourly_client_key ON usage_hourly(client_key_id, hour_start);

-- Latency histogram of each hourly row: bucket b counts requests whose latency
-- falls in the log-spaced bucket b (see usage.rs).
CREATE TABLE usage_hourly_latency (
    hour_start    INTEGER NOT NULL,
    backend_id    TEXT NOT NULL,
    model         TEXT NOT NULL,
    client_key_id TEXT NOT NULL,
    bucket        INTEGER NOT NULL,
    count         INTEGER NOT NULL,
    PRIMARY KEY (hour_start, backend_id, model, client_key_id, bucket)
) STRICT;
