//! What the data plane's integration tests share: a fake control plane speaking the real gRPC
//! API ([`control_plane`]) and an in-process data plane with snapshot builders ([`harness`]).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod control_plane;
pub mod harness;
