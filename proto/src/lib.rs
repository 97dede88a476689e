//! Generated code for the Sluice public API, package `sluice.v1`: conversions to domain
//! types live in the crates that own them.

/// Package `sluice.v1`: messages, `*_client` and `*_server` modules, and serde impls
/// following the proto3 JSON mapping.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("sluice.v1");
    include!(concat!(env!("OUT_DIR"), "/sluice.v1.serde.rs"));
    include!(concat!(env!("OUT_DIR"), "/sluice.v1.sides.rs"));
}

/// Encoded `FileDescriptorSet` of the API, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sluice_descriptor");

pub use pbjson_types as wkt;

/// `UsageRecord.budget_period_start_ms` of a request a lifetime budget's allowance paid for
/// (0 there means none did).
pub const LIFETIME_BUDGET_PERIOD: i64 = -1;

pub mod codec;
pub mod limits;
mod usage_record;
