-- Sluice control plane schema, version 20: the keys a routing snapshot holds (active, and not
-- left out 30 days past their expiry), in its order, so that building a snapshot reads those
-- rows alone instead of every key ever issued (revoked keys are never deleted, and a CI run's
-- keys expire by the thousand).
CREATE INDEX IF NOT EXISTS client_keys_in_snapshot ON client_keys(create_time, id)
    WHERE revoked = 0 AND expiry_published < 2;
