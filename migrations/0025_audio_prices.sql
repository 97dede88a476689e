-- Sluice control plane schema, version 25: a model route's prices of audio tokens (OpenAI's
-- `prompt_tokens_details.audio_tokens` and `completion_tokens_details.audio_tokens`, which its
-- audio models bill at many times their text). NULL: at the route's input and output prices,
-- as routes stored before this version are.
ALTER TABLE backend_models ADD COLUMN audio_input_price_per_mtok REAL;
ALTER TABLE backend_models ADD COLUMN audio_output_price_per_mtok REAL;
