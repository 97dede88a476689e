-- Sluice control plane schema, version 5: cooldown epochs. A backend's row now
-- holds its cooldown state for as long as the backend exists (an admin's reset
-- zeroes it instead of deleting it), so that the epoch, which moves on with every
-- change of the streak, never goes back. consecutive_failures is the streak:
-- overloads counted since the backend's last success. until_time and create_time
-- are 0 when no cooldown has run since the reset. changed_by names the replica
-- (node id/incarnation) whose reports made the last changes, run_basis the epoch
-- they were based on ('' and 0 after a reset).
ALTER TABLE cooldowns ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE cooldowns ADD COLUMN changed_by TEXT NOT NULL DEFAULT '';
ALTER TABLE cooldowns ADD COLUMN run_basis INTEGER NOT NULL DEFAULT 0;
