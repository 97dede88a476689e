//! Prometheus metrics of the control plane, served at `GET /metrics` on the HTTP listener in
//! the OpenMetrics text format. Labels come from fixed sets: gRPC methods the server
//! implements (from the proto descriptors; anything else is `unknown`), gRPC status codes, and
//! the kinds of SQLite write.
//!
//! gRPC calls are counted by [`GrpcMetricsLayer`]; a streaming call counts once, when it ends
//! (with its final status), and only unary calls are timed. The dashboard's JSON API counts in
//! its own family ([`count_json_api`]) with the same method and code labels.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use prost::Message as _;

use crate::grpc_code;
use crate::store::{StoreObserver, WriteOp};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// 50 µs to about 1.6 s.
#[derive(Clone, Copy)]
struct WriteBuckets;

impl MetricConstructor<Histogram> for WriteBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
    }
}

/// 100 µs to about 3 s (streaming calls count when they end and are not timed).
#[derive(Clone, Copy)]
struct CallBuckets;

impl MetricConstructor<Histogram> for CallBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
    }
}

/// Every metric of the control plane. Cheap to share behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    snapshot_version: Gauge,
    data_planes: Gauge,
    records_ingested: Counter,
    records_clamped: Counter,
    usage_commits: Counter,
    http_connections_refused: Counter,
    grpc_connections_refused: Counter,
    http_write_timeouts: Counter,
    writes: Family<OpLabels, Histogram, WriteBuckets>,
    write_failures: Family<OpLabels, Counter>,
    grpc_calls: Family<CallLabels, Counter>,
    grpc_seconds: Family<MethodLabels, Histogram, CallBuckets>,
    json_api_calls: Family<CallLabels, Counter>,
    json_api_seconds: Family<MethodLabels, Histogram, CallBuckets>,
    /// `/package.Service/Method` of every RPC the server implements.
    methods: HashSet<String>,
    /// Of those, the streaming ones (a replica's snapshot and usage streams, health watches,
    /// reflection): counted when they end, not timed (one open for a day would land in the
    /// duration histogram's `+Inf`).
    streaming: HashSet<String>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let snapshot_version = Gauge::default();
        registry.register(
            "snapshot_version",
            "The newest published routing snapshot version",
            snapshot_version.clone(),
        );
        let data_planes = Gauge::default();
        registry.register(
            "data_planes_connected",
            "Data planes with an open snapshot stream",
            data_planes.clone(),
        );
        let records_ingested = Counter::default();
        registry.register(
            "usage_records_ingested",
            "Usage records committed (resent duplicates not counted)",
            records_ingested.clone(),
        );
        let records_clamped = Counter::default();
        registry.register(
            "usage_records_clamped",
            "Usage records received with a value past its bound, stored with a placeholder instead (a model name as `other`, an id as empty)",
            records_clamped.clone(),
        );
        let usage_commits = Counter::default();
        registry.register(
            "usage_commits",
            "Transactions that committed usage batches (each holds every batch waiting at the time)",
            usage_commits.clone(),
        );
        let http_connections_refused = Counter::default();
        registry.register(
            "http_connections_refused",
            "Connections to the HTTP listener refused (503, closed) because --http-max-connections were open",
            http_connections_refused.clone(),
        );
        let grpc_connections_refused = Counter::default();
        registry.register(
            "grpc_connections_refused",
            "Connections to the gRPC listener refused (GOAWAY, closed) because --grpc-max-connections were open",
            grpc_connections_refused.clone(),
        );
        let http_write_timeouts = Counter::default();
        registry.register(
            "http_write_timeouts",
            "Connections to the HTTP listener closed because the client accepted none of an answer for --http-write-timeout",
            http_write_timeouts.clone(),
        );
        let writes = Family::new_with_constructor(WriteBuckets);
        registry.register_with_unit(
            "sqlite_write",
            "SQLite write transactions, from taking the connection to the commit (fsync included)",
            Unit::Seconds,
            writes.clone(),
        );
        let write_failures = Family::default();
        registry.register(
            "sqlite_write_failures",
            "SQLite write transactions that failed (a full volume, a failing disk): nothing of them stored",
            write_failures.clone(),
        );
        // Each kind at 0 from the start: docs/operating.md says to alert on any, and
        // `increase(…) > 0` cannot see the first sample of a series, so a kind's first failure
        // went unseen.
        for op in WriteOp::ALL {
            let _ = write_failures.get_or_create(&OpLabels { op: op.as_str() });
        }
        let grpc_calls = Family::default();
        registry.register(
            "grpc_requests",
            "gRPC calls by method and status code (streams count when they end)",
            grpc_calls.clone(),
        );
        let grpc_seconds = Family::new_with_constructor(CallBuckets);
        registry.register_with_unit(
            "grpc_request_duration",
            "gRPC unary calls: request received to response sent",
            Unit::Seconds,
            grpc_seconds.clone(),
        );
        let json_api_calls = Family::default();
        registry.register(
            "json_api_requests",
            "Dashboard JSON API calls (/api/…) by method and the gRPC status code of the answer",
            json_api_calls.clone(),
        );
        let json_api_seconds = Family::new_with_constructor(CallBuckets);
        registry.register_with_unit(
            "json_api_request_duration",
            "Dashboard JSON API calls: request received to response ready",
            Unit::Seconds,
            json_api_seconds.clone(),
        );
        let (mut methods, mut streaming) = (HashSet::new(), HashSet::new());
        for set in [
            sluice_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            add_methods(set, &mut methods, &mut streaming);
        }
        let reflection = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        methods.insert(reflection.to_owned());
        streaming.insert(reflection.to_owned());
        Self {
            registry,
            snapshot_version,
            data_planes,
            records_ingested,
            records_clamped,
            usage_commits,
            http_connections_refused,
            grpc_connections_refused,
            http_write_timeouts,
            writes,
            write_failures,
            grpc_calls,
            grpc_seconds,
            json_api_calls,
            json_api_seconds,
            methods,
            streaming,
        }
    }

    /// `sluice_http_connections_refused_total`, for the HTTP listener to count its refusals in.
    pub fn http_connections_refused(&self) -> Counter {
        self.http_connections_refused.clone()
    }

    /// `sluice_grpc_connections_refused_total`, for the gRPC listener to count its refusals in.
    pub fn grpc_connections_refused(&self) -> Counter {
        self.grpc_connections_refused.clone()
    }

    /// `sluice_http_write_timeouts_total`, for the HTTP listener to count the connections its
    /// write timeout closed in.
    pub fn http_write_timeouts(&self) -> Counter {
        self.http_write_timeouts.clone()
    }

    /// The method label of a request path: itself if the server implements it.
    fn method_label(&self, path: &str) -> String {
        if self.methods.contains(path) {
            path.trim_start_matches('/').to_owned()
        } else {
            "unknown".to_owned()
        }
    }

    /// The method label of a JSON API path (`/api/sluice.v1.AdminService/CreateBackend`):
    /// only the services the JSON API serves, anything else is `unknown`.
    fn json_api_method_label(&self, path: &str) -> String {
        match path.strip_prefix("/api") {
            Some(rpc)
                if rpc.starts_with("/sluice.v1.AdminService/")
                    || rpc.starts_with("/sluice.v1.StatsService/") =>
            {
                self.method_label(rpc)
            }
            _ => "unknown".to_owned(),
        }
    }

    fn call(&self, method: &str, code: &str, took: Option<Duration>) {
        self.grpc_calls
            .get_or_create(&CallLabels {
                method: method.to_owned(),
                code: code_name(code),
            })
            .inc();
        if let Some(took) = took {
            self.grpc_seconds
                .get_or_create(&MethodLabels {
                    method: method.to_owned(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// The exposition text, with the gauges read now.
    pub fn render(&self, snapshot_version: u64, data_planes: usize) -> String {
        self.snapshot_version
            .set(i64::try_from(snapshot_version).unwrap_or(i64::MAX));
        self.data_planes
            .set(i64::try_from(data_planes).unwrap_or(i64::MAX));
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The store's writes in `sluice_sqlite_write_seconds{op}`, its usage commits in
/// `sluice_usage_commits_total` and `sluice_usage_records_ingested_total`.
impl StoreObserver for Metrics {
    fn write(&self, op: WriteOp, took: Duration) {
        self.writes
            .get_or_create(&OpLabels { op: op.as_str() })
            .observe(took.as_secs_f64());
    }

    fn write_failed(&self, op: WriteOp) {
        self.write_failures
            .get_or_create(&OpLabels { op: op.as_str() })
            .inc();
    }

    fn usage_committed(&self, records: u64) {
        self.usage_commits.inc();
        self.records_ingested.inc_by(records);
    }

    fn usage_clamped(&self, records: u64) {
        self.records_clamped.inc_by(records);
    }
}

fn add_methods(encoded: &[u8], methods: &mut HashSet<String>, streaming: &mut HashSet<String>) {
    let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
        return;
    };
    for file in set.file {
        let package = file.package.unwrap_or_default();
        for service in file.service {
            let service_name = service.name.unwrap_or_default();
            for method in service.method {
                let path = format!(
                    "/{package}.{service_name}/{}",
                    method.name.as_deref().unwrap_or_default()
                );
                if method.client_streaming() || method.server_streaming() {
                    streaming.insert(path.clone());
                }
                methods.insert(path);
            }
        }
    }
}

/// The gRPC status code name of a `grpc-status` value (`UNKNOWN` for anything unreadable).
fn code_name(value: &str) -> &'static str {
    value
        .parse::<i32>()
        .map_or("UNKNOWN", |code| grpc_code::name(tonic::Code::from(code)))
}

/// Axum middleware for the JSON API router: counts and times each call by method and the
/// gRPC code its answer carries (an answer without one counts as `UNKNOWN`).
pub async fn count_json_api(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let method = metrics.json_api_method_label(request.uri().path());
    let started = Instant::now();
    let response = next.run(request).await;
    let code = response
        .extensions()
        .get::<tonic::Code>()
        .map_or("UNKNOWN", |code| grpc_code::name(*code));
    let labels = CallLabels {
        method: method.clone(),
        code,
    };
    metrics.json_api_calls.get_or_create(&labels).inc();
    metrics
        .json_api_seconds
        .get_or_create(&MethodLabels { method })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// A tower layer for the gRPC server that counts every call by method and status code.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = self.metrics.method_label(request.uri().path());
        // A stream's length is its client's, not the server's latency.
        let started = (!self.metrics.streaming.contains(request.uri().path())).then(Instant::now);
        let metrics = Arc::clone(&self.metrics);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let (parts, body) = response.into_parts();
            let mut call = Some(Call {
                metrics,
                method,
                started,
            });
            // A trailers-only answer (errors, mostly) carries the status in its headers.
            if let Some(status) = parts.headers.get("grpc-status")
                && let Some(call) = call.take()
            {
                call.finish(status.to_str().unwrap_or(""));
            }
            Ok(http::Response::from_parts(
                parts,
                CountedBody { inner: body, call },
            ))
        })
    }
}

/// A call waiting for its status in the response trailers.
struct Call {
    metrics: Arc<Metrics>,
    method: String,
    /// When a unary call came; `None` for a stream (not timed).
    started: Option<Instant>,
}

impl Call {
    fn finish(self, code: &str) {
        self.metrics
            .call(&self.method, code, self.started.map(|s| s.elapsed()));
    }
}

/// A response body that records its call when the trailers pass, or as `CANCELLED` when it
/// is dropped first (the client went away mid-stream).
pub struct CountedBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.metrics.call(&call.method, "1", None);
        }
    }
}

impl<B> Body for CountedBody<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(call) = self.call.take()
        {
            let code = trailers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            call.finish(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn methods_come_from_the_descriptors_and_anything_else_is_unknown() {
        let m = Metrics::new();
        assert_eq!(
            m.method_label("/sluice.v1.AdminService/CreateBackend"),
            "sluice.v1.AdminService/CreateBackend"
        );
        assert_eq!(
            m.method_label("/sluice.v1.DataPlaneService/ReportUsage"),
            "sluice.v1.DataPlaneService/ReportUsage"
        );
        assert_eq!(
            m.method_label("/grpc.health.v1.Health/Check"),
            "grpc.health.v1.Health/Check"
        );
        assert_eq!(m.method_label("/sluice.v1.AdminService/Nope"), "unknown");
        assert_eq!(m.method_label("/x"), "unknown");
        assert_eq!(
            m.json_api_method_label("/api/sluice.v1.StatsService/GetTotals"),
            "sluice.v1.StatsService/GetTotals"
        );
        for not_served in [
            "/api/sluice.v1.DataPlaneService/ReportUsage",
            "/api/grpc.health.v1.Health/Check",
            "/api/sluice.v1.AdminService/Nope",
            "/healthz",
        ] {
            assert_eq!(
                m.json_api_method_label(not_served),
                "unknown",
                "{not_served}"
            );
        }
        // Streams are counted when they end, not timed.
        for stream in [
            "/sluice.v1.DataPlaneService/ReportUsage",
            "/sluice.v1.DataPlaneService/StreamSnapshots",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(m.streaming.contains(stream), "{stream}");
        }
        for unary in [
            "/sluice.v1.AdminService/CreateBackend",
            "/grpc.health.v1.Health/Check",
        ] {
            assert!(!m.streaming.contains(unary), "{unary}");
        }
        assert_eq!(code_name("0"), "OK");
        assert_eq!(code_name("16"), "UNAUTHENTICATED");
        assert_eq!(code_name("garbage"), "UNKNOWN");
    }
}
