-- Sluice control plane schema: which replicas hold a share of every RPM limit.
-- share_until is NULL for a replica that holds none; 9223372036854775807 (i64::MAX) while
-- it is connected; otherwise the time (Unix ms) its share lapses: a replica keeps its
-- share for a lease after its stream closes (and after a control-plane restart), so that
-- the shares are not re-divided while it may still be serving on its last snapshot.
ALTER TABLE data_planes ADD COLUMN share_until INTEGER;
