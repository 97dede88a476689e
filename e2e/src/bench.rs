//! The benchmark driver behind `sluice-bench`: open-loop and closed-loop HTTP load against any
//! OpenAI-compatible URL, concurrent SSE streams, propagation timing across replicas, and the
//! `BENCHMARKS.md` report.
//!
//! Every figure of the suite is measured against the mock provider called directly in the same
//! run, so the report shows overheads and ratios rather than absolute times that depend on the
//! machine.

pub mod client;
pub mod cluster;
pub mod hist;
pub mod load;
pub mod machine;
pub mod propagation;
pub mod report;
pub mod spinners;
pub mod stream;
pub mod suite;

use std::net::SocketAddr;

/// Errors of the benchmark driver.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bad target URL {url}: {why}")]
    Url { url: String, why: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building a request: {0}")]
    Request(#[from] http::Error),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("histogram: {0}")]
    Histogram(String),
    #[error("setting up the cluster: {0}")]
    Setup(String),
    #[error("gRPC call failed: {0}")]
    Grpc(#[from] tonic::Status),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
