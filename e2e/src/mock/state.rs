//! The state every connection of one mock server shares: its configuration, counters,
//! injected faults and shutdown signal.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::HeaderValue;
use tokio_util::sync::CancellationToken;

use super::MockConfig;
use super::anthropic::MessagesExchange;
use super::fault::FaultPlan;
use super::responses::ResponseStore;
use super::stats::Counters;

/// State shared by every connection of one mock server.
pub(crate) struct Shared {
    pub(crate) config: MockConfig,
    pub(crate) counters: Counters,
    pub(crate) faults: FaultPlan,
    pub(crate) shutdown: CancellationToken,
    pub(crate) expected_auth: Option<String>,
    pub(crate) name_header: Option<HeaderValue>,
    /// The Responses API's stored responses.
    pub(crate) responses: ResponseStore,
    /// The last exchange on a Messages route.
    pub(crate) last_messages: Mutex<Option<MessagesExchange>>,
    /// The path and headers of the last request to a Responses API route.
    pub(crate) last_responses: Mutex<Option<MessagesExchange>>,
    /// The Messages API's prompt cache: the prompt prefixes written to it (hashes).
    prompt_cache: Mutex<std::collections::HashSet<u64>>,
    ids: AtomicU64,
}

impl Shared {
    pub(crate) fn new(config: MockConfig) -> Self {
        Self {
            expected_auth: config.api_key.as_ref().map(|k| format!("Bearer {k}")),
            name_header: HeaderValue::from_str(&config.name).ok(),
            config,
            counters: Counters::new(),
            faults: FaultPlan::new(),
            responses: ResponseStore::default(),
            last_messages: Mutex::new(None),
            last_responses: Mutex::new(None),
            prompt_cache: Mutex::new(std::collections::HashSet::new()),
            shutdown: CancellationToken::new(),
            ids: AtomicU64::new(rand::random::<u32>().into()),
        }
    }

    /// Records a request to a Messages route (its answer follows in [`Shared::messages_answer`]).
    pub(crate) fn messages_request(&self, exchange: MessagesExchange) {
        if let Ok(mut last) = self.last_messages.lock() {
            *last = Some(exchange);
        }
    }

    /// The tokens of `prefix` the prompt cache holds (all of it, or the longest of its
    /// earlier prefixes it holds: Anthropic's lookback), and writes it there.
    pub(crate) fn prompt_cache_read(&self, prefix: &super::anthropic::CachePrefix) -> u64 {
        let Ok(mut cache) = self.prompt_cache.lock() else {
            return 0;
        };
        let read = if cache.contains(&prefix.hash) {
            prefix.tokens
        } else {
            prefix
                .earlier
                .iter()
                .rev()
                .find(|(_, hash)| cache.contains(hash))
                .map_or(0, |&(tokens, _)| tokens)
        };
        cache.insert(prefix.hash);
        read
    }

    /// The tokens of a chat prompt OpenAI's prompt cache holds, and those written to it now:
    /// of `prefixes` (the prompt to each message before the last, shortest first, hashed with
    /// the request's `prompt_cache_key`), the longest one written before is read; every one
    /// is written now, so the longest's tokens past those read are new in the cache (as the
    /// Anthropic side counts a cache creation).
    pub(crate) fn chat_cache_read(&self, prefixes: &[(u64, u64)]) -> (u64, u64) {
        let longest = prefixes.last().map_or(0, |&(tokens, _)| tokens);
        let Ok(mut cache) = self.prompt_cache.lock() else {
            return (0, 0);
        };
        let read = prefixes
            .iter()
            .rev()
            .find(|(_, hash)| cache.contains(hash))
            .map_or(0, |&(tokens, _)| tokens);
        cache.extend(prefixes.iter().map(|&(_, hash)| hash));
        (read, longest.saturating_sub(read))
    }

    /// Records what the last request to a Messages route was answered with.
    pub(crate) fn messages_answer(&self, parts: &[bytes::Bytes]) {
        if let Ok(mut last) = self.last_messages.lock()
            && let Some(exchange) = last.as_mut()
        {
            exchange.answer = parts.iter().map(|p| String::from_utf8_lossy(p)).collect();
        }
    }

    /// A new id for a completion or a request (unique within this server).
    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}
