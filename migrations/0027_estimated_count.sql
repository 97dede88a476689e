-- Sluice control plane schema, version 27: usage rows count the requests whose tokens are the
-- replica's estimate rather than the provider's count (UsageRecord.tokens_estimated: cut off
-- before the provider's usage, interrupted by a crash, answered without usage), so that the
-- statistics say how much of their tokens is estimated. Rows stored before this version
-- count none.
ALTER TABLE usage_hourly ADD COLUMN estimated_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN estimated_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily_by_backend ADD COLUMN estimated_count INTEGER NOT NULL DEFAULT 0;
