-- Sluice control plane schema, version 8: the secrets that authenticate the
-- response ids data planes hand out for the Responses API (docs/responses.md).
-- secret_ciphertext is nonce || XChaCha20-Poly1305 ciphertext of 32 random
-- bytes under the master key, associated data 'sluice:affinity-key:' || id.
-- Every key without a retire_time verifies ids; the newest of them signs new
-- ones. The control plane creates the first key when it opens a database that
-- has none.
CREATE TABLE affinity_keys (
    id                INTEGER PRIMARY KEY,
    secret_ciphertext BLOB NOT NULL,
    create_time       INTEGER NOT NULL,
    retire_time       INTEGER
) STRICT;
