-- Sluice control plane schema, version 18: the database's identity, random, written once and
-- kept by every backup (VACUUM INTO copies it). Snapshots carry it: a data plane holding a
-- snapshot of one database refuses a snapshot of another, so that a control plane started on
-- an empty or wrong database (a restore copied to the wrong path, a volume not mounted) cannot
-- take every backend and key from every replica at once.
INSERT INTO meta (key, value) VALUES ('database_id', lower(hex(randomblob(16))));
