-- Sluice control plane schema, version 14: the name and pool of each deleted backend. Its
-- usage stays stored under its id; records of it ingested after the delete (a replica's
-- spool, requests that were in flight) keep its pool rather than "no backend", and
-- statistics grouped by backend still name it.
CREATE TABLE deleted_backends (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    pool        INTEGER NOT NULL,
    delete_time INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
