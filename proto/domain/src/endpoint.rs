//! The paths a data plane appends to a backend's base URL (`https://api.openai.com/v1`), one
//! for each endpoint it serves: the data plane builds its upstream URLs from them and the
//! control plane refuses a base URL that already ends with one (a URL copied with the endpoint
//! in place sent every request to `…/chat/completions/chat/completions`).
//!
//! Not `/models`: the data planes answer `GET /v1/models` themselves and append it to no base
//! URL, and Azure AI Foundry's inference endpoint is `https://<resource>.services.ai.azure.com/models`.

pub const CHAT_COMPLETIONS: &str = "/chat/completions";
pub const COMPLETIONS: &str = "/completions";
pub const EMBEDDINGS: &str = "/embeddings";
pub const RESPONSES: &str = "/responses";
pub const RESPONSES_COMPACT: &str = "/responses/compact";
pub const RESPONSES_INPUT_TOKENS: &str = "/responses/input_tokens";
pub const MESSAGES: &str = "/messages";
pub const COUNT_TOKENS: &str = "/messages/count_tokens";

/// Every path above (a data-plane test checks that each endpoint's path is one of them).
pub const ALL: [&str; 8] = [
    CHAT_COMPLETIONS,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    RESPONSES_COMPACT,
    RESPONSES_INPUT_TOKENS,
    MESSAGES,
    COUNT_TOKENS,
];
