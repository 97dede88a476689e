//! Sluice data plane: a stateless OpenAI-compatible HTTP proxy that routes by the control
//! plane's snapshot, cools down and rate-limits backends, and reports usage exactly once.

pub mod backoff;
pub mod clock;
pub mod control;
pub mod cooldown;
pub mod ratelimit;
pub mod snapshot;
pub mod subscribe;
pub mod usage;
