-- Sluice control plane schema, version 22: a model route's price tiers, what its prices are
-- multiplied by when the answer says it was served at one (OpenAI's `service_tier`, such as
-- `priority` or `flex`; Anthropic's `usage.speed` `fast`, `usage.inference_geo` `us`). A JSON
-- array of [tier, multiplier] pairs in the order given; '[]' for none, as routes stored before
-- this version have.
ALTER TABLE backend_models ADD COLUMN tier_multipliers TEXT NOT NULL DEFAULT '[]';
