-- Sluice control plane schema, version 23: a model route's long-context band, the prices of a
-- request whose prompt (read from and written to the cache included) is more than
-- long_context_above tokens, as multipliers of the route's input and output prices; NULL for
-- none, as routes stored before this version have.
ALTER TABLE backend_models ADD COLUMN long_context_above INTEGER;
ALTER TABLE backend_models ADD COLUMN long_context_input_multiplier REAL;
ALTER TABLE backend_models ADD COLUMN long_context_output_multiplier REAL;
