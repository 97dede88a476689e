-- Sluice control plane schema, version 26: usage rows count the audio among their prompt
-- and completion tokens (UsageRecord.audio_prompt_tokens, .audio_completion_tokens: a
-- recording heard and a spoken answer, which a route may price apart since version 25).
-- Rows stored before this version count none.
ALTER TABLE usage_hourly ADD COLUMN audio_prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN audio_completion_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN audio_prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN audio_completion_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily_by_backend ADD COLUMN audio_prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily_by_backend ADD COLUMN audio_completion_tokens INTEGER NOT NULL DEFAULT 0;
