-- Sluice control plane schema, version 10: prices of cached prompt tokens, key budgets,
-- and what each key spent.

-- Price per million prompt tokens read from the provider's cache; NULL charges them at
-- input_price_per_mtok (as before this column existed).
ALTER TABLE backend_models ADD COLUMN cached_input_price_per_mtok REAL;

-- Spend allowed per period in nano-units (10^-9) of the currency of the route prices;
-- 0 means no budget. budget_period: 0 the key's lifetime, 1 daily, 2 weekly (from
-- Monday), 3 monthly (from the 1st), periods starting at 00:00 UTC.
ALTER TABLE client_keys ADD COLUMN max_budget_nanos INTEGER NOT NULL DEFAULT 0;
ALTER TABLE client_keys ADD COLUMN budget_period INTEGER NOT NULL DEFAULT 0;

-- What each key spent per UTC day (by the time each request arrived), the sum of the
-- cost_nanos of its usage records, added in the transaction that ingests them (so
-- exactly once, like all usage). A period's spend is the sum over its days, so a
-- changed budget_period needs no rewrite.
CREATE TABLE key_spend (
    client_key_id TEXT NOT NULL,
    day_start     INTEGER NOT NULL,
    spent_nanos   INTEGER NOT NULL,
    PRIMARY KEY (client_key_id, day_start)
) STRICT, WITHOUT ROWID;
