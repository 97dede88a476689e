-- Sluice control plane schema, version 29: when an admin last reset a cooldown state (Unix ms;
-- 0: never), kept apart from when its last cooldown began (create_time), so that a 429 seen
-- before the reset and reported late (a replica cut off across it) starts or lengthens no
-- cooldown also after another cooldown ran since. A state reset before this version and not
-- cooled since (no until_time, a create_time) was reset then.
ALTER TABLE cooldowns ADD COLUMN reset_time INTEGER NOT NULL DEFAULT 0;
UPDATE cooldowns SET reset_time = create_time WHERE until_time = 0 AND create_time > 0;
