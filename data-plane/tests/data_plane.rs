//! The data plane's integration tests, one module per file of `data-plane/tests/`, in one test
//! binary: `cargo test -p sluice-proxy --test data_plane` runs them all, side by side, and
//! `cargo test -p sluice-proxy --test data_plane resilience::` the tests of one file. The package
//! lists this binary alone (`autotests = false`), so a file that is not a module here would
//! never be compiled: the end-to-end test `every_file_of_a_tests_directory_is_one_of_its_modules`
//! (`e2e/tests/e2e.rs`) fails for one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod anthropic;
mod compatible_servers;
mod cooldown_fleet;
mod http2_upstream;
mod https_upstream;
mod messages;
mod proxy;
mod resilience;
mod responses;
mod snapshot_stream;
mod spool;
mod support;
mod usage_report;
