//! Sluice data plane: a stateless OpenAI-compatible HTTP proxy that routes by the control
//! plane's snapshot, cools down and rate-limits backends, and reports usage exactly once.
//!
//! Entry points: [`run`] (bind and serve until a shutdown future completes), or
//! [`Proxy::bind`] then [`Proxy::serve`] when the caller needs the bound address, the
//! [`snapshot::SnapshotStore`] or the [`usage::UsageSink`] first (tests do).
//!
//! How a request flows: [`proxy`] authenticates the client key against the current
//! [`snapshot::Snapshot`], [`request`] reads `model`/`stream` and rewrites the body,
//! [`router`] orders the candidates, [`cooldown`] and [`ratelimit`] skip backends that must
//! rest, [`upstream`] sends to the backend, [`sse`] parses streamed answers, and [`usage`] ships one record per request to the
//! control plane, kept on disk by the [`spool`] until acked. [`subscribe`] keeps the snapshot current
//! and carries the [`allowance`]s of budget each key's requests spend.

pub mod affinity;
pub mod allowance;
pub mod answer_memory;
pub mod anthropic;
pub mod auth;
pub mod backoff;
pub mod calls;
pub mod clock;
pub mod config;
pub mod control;
pub mod cooldown;
pub mod deadline;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod redact;
pub mod request;
pub mod responses;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod spool;
pub mod sse;
pub mod stopping;
pub mod subscribe;
#[cfg(test)]
mod testing;
pub mod tiers;
pub mod upstream;
pub mod usage;
pub mod utf8;

pub use config::Config;
pub use server::{Proxy, RunError, run};
