-- Sluice control plane schema, version 6: client keys may expire. expire_time is
-- Unix milliseconds by the control plane's clock; NULL means the key never
-- expires. An expired key is kept (and still sent to data planes, marked expired)
-- so that a client presenting it is told it expired rather than that it is unknown.
ALTER TABLE client_keys ADD COLUMN expire_time INTEGER;
-- 1 once the control plane has published a snapshot version after the key's
-- expiry (the sweep bumps the version once per expiring key, and never again).
ALTER TABLE client_keys ADD COLUMN expiry_published INTEGER NOT NULL DEFAULT 0;
