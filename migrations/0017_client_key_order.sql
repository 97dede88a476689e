-- Sluice control plane schema, version 17: client keys in the order ListClientKeys pages them
-- (oldest first), so that a page of keys reads its rows instead of sorting every key.
CREATE INDEX client_keys_by_create_time ON client_keys(create_time, id);
