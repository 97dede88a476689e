//! Anthropic's Messages API, both ways, as pure translations over JSON values: a chat
//! completions request for an Anthropic backend and its answer back ([`request`],
//! [`response`], [`stream`]), and a Messages request for an OpenAI-format backend and its
//! answer back. The proxy only drives them; nothing here does I/O. Every mapping, and what a
//! client gets for what cannot be translated, is listed in `docs/anthropic.md`.

pub mod error;
pub mod request;
pub mod response;
pub mod stream;

/// The `anthropic-version` sent to an Anthropic backend that names none: the one the current
/// official SDK sends.
pub const DEFAULT_VERSION: &str = "2026-10-21";

/// A request that cannot be translated: the client gets a 400 naming the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Untranslatable {
    /// The request parameter at fault, e.g. `messages[2].tool_calls[0].function.arguments`.
    pub param: String,
    pub message: String,
}

impl Untranslatable {
    pub(crate) fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: param.into(),
            message: message.into(),
        }
    }
}

/// Token counts read from either API's `usage`, as the usage record wants them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Every input token, cached or not.
    pub input: u64,
    pub output: u64,
    /// Input tokens read from the prompt cache (part of `input`).
    pub cache_read: u64,
    /// Input tokens written to the prompt cache (part of `input`).
    pub cache_creation: u64,
}
