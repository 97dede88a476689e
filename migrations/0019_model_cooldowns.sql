-- Sluice control plane schema, version 19: cooldowns of single models at a backend.
-- Providers limit each model apart (OpenAI, Anthropic, an Azure deployment per model), so
-- a 429 for one model cools that model alone at the backend, not the backend's other
-- models. A row is the backend's own cooldown (model '') or one model's (its name at the
-- provider, backend_models.upstream_name); each by the rules of version 5. The table is
-- rebuilt for its new primary key.
CREATE TABLE cooldowns_by_model (
    backend_id           TEXT NOT NULL REFERENCES backends(id) ON DELETE CASCADE,
    model                TEXT NOT NULL,
    until_time           INTEGER NOT NULL,
    consecutive_failures INTEGER NOT NULL,
    reason               TEXT NOT NULL,
    reported_by          TEXT NOT NULL,
    create_time          INTEGER NOT NULL,
    epoch                INTEGER NOT NULL DEFAULT 0,
    changed_by           TEXT NOT NULL DEFAULT '',
    run_basis            INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (backend_id, model)
) STRICT;

INSERT INTO cooldowns_by_model (backend_id, model, until_time, consecutive_failures, reason,
                                reported_by, create_time, epoch, changed_by, run_basis)
SELECT backend_id, '', until_time, consecutive_failures, reason, reported_by, create_time,
       epoch, changed_by, run_basis
FROM cooldowns;

DROP TABLE cooldowns;
ALTER TABLE cooldowns_by_model RENAME TO cooldowns;
