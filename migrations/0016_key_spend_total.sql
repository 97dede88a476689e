-- Sluice control plane schema, version 16: each key's lifetime spend, kept beside its daily
-- spend by the transaction that ingests the cost (so exactly once, like key_spend), so that a
-- lifetime budget reads one row instead of summing every day the key ever spent (a key list,
-- a snapshot build and each ingest did that for every listed or budgeted key), and so that
-- the daily spend of days past Settings.usage_daily_retention_days can be deleted (by day:
-- key_spend_day).
CREATE TABLE key_spend_total (
    client_key_id TEXT PRIMARY KEY,
    spent_nanos   INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- The sum of each key's days, saturating at the largest integer as every spend sum does:
-- SQLite's sum() fails past it, so whole units (10^9 nano-units) and their remainders are
-- summed apart, neither of which a key's days can carry past it.
INSERT INTO key_spend_total (client_key_id, spent_nanos)
SELECT client_key_id,
       CASE WHEN units > (9223372036854775807 - rest) / 1000000000
            THEN 9223372036854775807
            ELSE units * 1000000000 + rest END
FROM (SELECT client_key_id,
             sum(max(spent_nanos, 0) / 1000000000) AS units,
             sum(max(spent_nanos, 0) % 1000000000) AS rest
      FROM key_spend GROUP BY client_key_id);

CREATE INDEX key_spend_day ON key_spend(day_start);
