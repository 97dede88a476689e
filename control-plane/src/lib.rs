//! Sluice control plane: stores backends, encrypted provider keys, client keys,
//! cooldowns, settings and usage in SQLite; serves the admin and stats APIs over
//! gRPC; streams routing snapshots to data planes and takes their usage reports.
//!
//! The modules form layers, each using only the ones below it (a test keeps it so):
//!
//! - [`server`] wires the parts and runs the listeners; `main.rs` parses options and starts it,
//!   or runs an offline subcommand: [`master_key`] (`rotate-master-key`, which takes the data
//!   directory's lock as the server does) or `backup` ([`store::backup`]).
//! - [`http`] (health, readiness, `/metrics`) and [`dashboard`] (the web UI and its JSON API,
//!   which calls the gRPC services in-process).
//! - [`api`]: the gRPC services, the token check in front of them, and the one mapping of
//!   inner errors to gRPC statuses.
//! - [`snapshot`] rebuilds and publishes the routing snapshot after every commit the store
//!   announces; [`ingest`] group-commits usage reports; [`membership`] keeps who is
//!   connected and who holds a share of the RPM limits; [`expiry`] publishes client keys'
//!   expiries as they pass; [`metrics`] counts calls and store
//!   writes (it observes the store; the store does not know it).
//! - [`store`]: SQLite only, returning domain types and [`store::StoreError`].
//! - Domain types and rules: [`backend`], [`client_key`], [`settings`], [`usage`],
//!   [`validation`], [`time`], [`grpc_code`]; secrets: [`crypto`], [`secrets`].

pub mod allowance;
pub mod api;
pub mod backend;
pub mod budget;
pub mod budget_resets;
pub mod client_key;
pub mod crypto;
pub mod dashboard;
pub mod expiry;
pub mod grpc_code;
pub mod grpc_incoming;
pub mod http;
pub mod ingest;
pub mod master_key;
pub mod membership;
pub mod metrics;
pub mod secrets;
pub mod server;
pub mod settings;
pub mod snapshot;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;
pub mod usage;
pub mod validation;
