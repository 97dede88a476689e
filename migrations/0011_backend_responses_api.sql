-- Sluice control plane schema, version 11: whether a backend serves the Responses
-- API (/v1/responses). NULL is the default (yes, for a backend speaking the OpenAI
-- API); 0 and 1 are what an operator set.
ALTER TABLE backends ADD COLUMN responses_api INTEGER CHECK (responses_api IN (0, 1));
