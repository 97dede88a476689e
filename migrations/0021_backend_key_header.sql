-- Sluice control plane schema, version 21: the header a backend's API key goes in. Empty is
-- the API format's own (`Authorization: Bearer` for the OpenAI API, `x-api-key` for
-- Anthropic's); 'api-key' is Azure OpenAI's deployments'; 'bearer' also serves gateways in
-- front of Anthropic's API that take a bearer token only.
ALTER TABLE backends ADD COLUMN key_header TEXT NOT NULL DEFAULT ''
    CHECK (key_header IN ('', 'bearer', 'x-api-key', 'api-key'));
