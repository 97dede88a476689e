//! The gRPC services the control plane serves: `AdminService` ([`admin`]), `StatsService`
//! ([`stats`]) and `DataPlaneService` ([`dataplane`]), the bearer-token check in front of them
//! ([`auth`]), and the one mapping of inner errors to gRPC statuses ([`status`]). The
//! dashboard's JSON API calls these same services.

pub mod admin;
pub mod auth;
pub mod dataplane;
mod paging;
pub mod stats;
pub mod status;
