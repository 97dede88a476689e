-- Sluice control plane schema, version 9: usage rows count, of their prompt tokens,
-- those the provider read from its prompt cache, and of their completion tokens,
-- those spent on reasoning (UsageRecord.cached_prompt_tokens, .reasoning_tokens).
-- Rows stored before this version count none.
ALTER TABLE usage_hourly ADD COLUMN cached_prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN cached_prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily_by_backend ADD COLUMN cached_prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily_by_backend ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
