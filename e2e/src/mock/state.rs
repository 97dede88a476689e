//! The state every connection of one mock server shares: its configuration, counters,
//! injected faults and shutdown signal.

use std::sync::atomic::{AtomicU64, Ordering};

use http::header::HeaderValue;
use tokio_util::sync::CancellationToken;

use super::MockConfig;
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
            shutdown: CancellationToken::new(),
            ids: AtomicU64::new(rand::random::<u32>().into()),
        }
    }

    /// A new id for a completion or a request (unique within this server).
    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}
