-- Sluice control plane schema, version 28: the most output tokens a request Sluice translates
-- for a model route asks for (a Messages client's `max_tokens` sent to an OpenAI-format backend,
-- a chat client's to an Anthropic one). 0: as the client asks, as routes stored before this
-- version are.
ALTER TABLE backend_models ADD COLUMN max_output_tokens INTEGER NOT NULL DEFAULT 0;
