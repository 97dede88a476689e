-- Sluice control plane schema, version 24: a model route's priced tools, what each call of a
-- tool the provider runs costs on top of the tokens (Anthropic's web search, counted in
-- `usage.server_tool_use`; the Responses API's web and file search, one output item a call).
-- A JSON array of [tool, price per 1,000 calls] pairs in the order given; '[]' for none, as
-- routes stored before this version have.
ALTER TABLE backend_models ADD COLUMN call_prices TEXT NOT NULL DEFAULT '[]';
