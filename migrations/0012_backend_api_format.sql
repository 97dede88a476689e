-- Sluice control plane schema, version 12: a backend speaks the OpenAI API or
-- Anthropic's Messages API. Existing backends are OpenAI-format. An empty
-- anthropic_version means the data plane's default (the version the current
-- official SDK sends). default_max_tokens (0: Sluice's default, 4096) is the
-- max_tokens an Anthropic backend gets when the client sent none.
ALTER TABLE backends ADD COLUMN api_format TEXT NOT NULL DEFAULT 'openai'
    CHECK (api_format IN ('openai', 'anthropic'));
ALTER TABLE backends ADD COLUMN anthropic_version TEXT NOT NULL DEFAULT '';
ALTER TABLE backend_models ADD COLUMN default_max_tokens INTEGER NOT NULL DEFAULT 0;
