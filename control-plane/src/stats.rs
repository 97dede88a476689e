//! `StatsService`: usage totals and time series from the hourly aggregates.

use sluice_proto::v1 as pb;
use sluice_proto::v1::stats_service_server::StatsService;
use tonic::{Request, Response, Status};

use crate::store::{Store, Totals, TotalsFilter};
use crate::time::timestamp_ms;

#[derive(Clone)]
pub struct Stats {
    store: Store,
}

impl Stats {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn non_empty(s: String) -> Option<String> {
    let s = s.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn ratio(part: f64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part / whole as f64 }
}

#[tonic::async_trait]
impl StatsService for Stats {
    async fn get_usage(
        &self,
        _request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        Err(Status::unimplemented(
            "GetUsage (time buckets) is not implemented yet; use GetTotals",
        ))
    }

    async fn get_totals(
        &self,
        request: Request<pb::GetTotalsRequest>,
    ) -> Result<Response<pb::GetTotalsResponse>, Status> {
        let r = request.into_inner();
        let filter = TotalsFilter {
            start_ms: r.start_time.as_ref().map(timestamp_ms),
            end_ms: r.end_time.as_ref().map(timestamp_ms),
            backend_id: non_empty(r.backend_id),
            model: non_empty(r.model),
            client_key_id: non_empty(r.client_key_id),
        };
        if let (Some(start), Some(end)) = (filter.start_ms, filter.end_ms)
            && end < start
        {
            return Err(Status::invalid_argument(
                "end_time: must not be before start_time",
            ));
        }
        let t: Totals = self.store.totals(filter).await?;
        Ok(Response::new(pb::GetTotalsResponse {
            request_count: t.request_count,
            error_count: t.error_count,
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
            cost: t.cost,
            total_tokens: t.prompt_tokens + t.completion_tokens,
            error_rate: ratio(t.error_count as f64, t.request_count),
            avg_latency_ms: ratio(t.latency_ms_sum, t.request_count),
            p50_latency_ms: t.p50_ms,
            p95_latency_ms: t.p95_ms,
            p99_latency_ms: t.p99_ms,
            avg_ttft_ms: ratio(t.ttft_ms_sum, t.ttft_count),
            stream_count: t.stream_count,
        }))
    }
}
