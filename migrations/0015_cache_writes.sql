-- Sluice control plane schema, version 15: prompt tokens written to a provider's prompt cache
-- (Anthropic's cache_creation_input_tokens). A model route may price them apart
-- (NULL: at its input price), and usage rows count them beside the tokens read from the
-- cache (UsageRecord.cache_write_prompt_tokens). Rows stored before this version count none.
ALTER TABLE backend_models ADD COLUMN cache_write_price_per_mtok REAL;
ALTER TABLE usage_hourly ADD COLUMN cache_write_prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN cache_write_prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily_by_backend ADD COLUMN cache_write_prompt_tokens INTEGER NOT NULL DEFAULT 0;
