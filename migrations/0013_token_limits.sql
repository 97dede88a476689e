-- Sluice control plane schema, version 13: tokens per minute for client keys and
-- backends, and how many requests a client key may have in flight at once. 0 means no
-- limit, as for rpm_limit; existing keys and backends get none.
ALTER TABLE client_keys ADD COLUMN tpm_limit INTEGER NOT NULL DEFAULT 0;
ALTER TABLE client_keys ADD COLUMN max_parallel_requests INTEGER NOT NULL DEFAULT 0;
ALTER TABLE backends ADD COLUMN tpm_limit INTEGER NOT NULL DEFAULT 0;
