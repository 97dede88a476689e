//! Sluice control plane: stores backends, encrypted provider keys, client keys,
//! cooldowns, settings and usage in SQLite; serves the admin and stats APIs over
//! gRPC; streams routing snapshots to data planes and takes their usage reports.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod client_key;
pub mod crypto;
pub mod dashboard;
pub mod dataplane;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod secrets;
pub mod server;
pub mod settings;
pub mod snapshot;
pub mod stats;
pub mod store;
pub mod testing;
pub mod time;
pub mod usage;
pub mod validation;
