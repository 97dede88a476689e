//! Sluice data plane: a stateless OpenAI-compatible HTTP proxy that routes by the control
//! plane's snapshot, cools down and rate-limits backends, and reports usage exactly once.

pub mod backoff;
pub mod clock;
pub mod config;
pub mod control;
pub mod cooldown;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod request;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod sse;
pub mod subscribe;
pub mod usage;

pub use config::Config;
pub use server::{Proxy, RunError, run};
