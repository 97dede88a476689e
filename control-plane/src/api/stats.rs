//! `StatsService`: usage totals and time series from the hourly aggregates.

use sluice_proto::v1 as pb;
use sluice_proto::v1::stats_service_server::StatsService;
use tonic::{Request, Response, Status};

use crate::store::{Granularity, GroupBy, Store, Totals, TotalsFilter};
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

fn filter(
    start: Option<pbjson_types::Timestamp>,
    end: Option<pbjson_types::Timestamp>,
    backend_id: String,
    model: String,
    client_key_id: String,
) -> Result<TotalsFilter, Status> {
    let filter = TotalsFilter {
        start_ms: start.as_ref().map(timestamp_ms),
        end_ms: end.as_ref().map(timestamp_ms),
        backend_id: non_empty(backend_id),
        model: non_empty(model),
        client_key_id: non_empty(client_key_id),
    };
    if let (Some(start), Some(end)) = (filter.start_ms, filter.end_ms)
        && end < start
    {
        return Err(Status::invalid_argument(
            "end_time: must not be before start_time",
        ));
    }
    Ok(filter)
}

/// The [`filter`] of a usage request (`GetUsage` and `GetTotals` carry the same fields).
macro_rules! filter_of {
    ($request:expr) => {
        filter(
            $request.start_time,
            $request.end_time,
            $request.backend_id,
            $request.model,
            $request.client_key_id,
        )
    };
}

fn ratio(part: f64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part / whole as f64 }
}

/// A `$message` (a usage bucket or the totals: both carry the same figures) from
/// [`Totals`], with the `$extra` fields given.
macro_rules! usage_figures {
    ($message:path, $totals:expr, { $($extra:tt)* }) => {{
        let t: &Totals = $totals;
        $message {
            $($extra)*
            request_count: t.request_count,
            error_count: t.error_count,
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
            total_tokens: t.prompt_tokens + t.completion_tokens,
            cost: t.cost,
            error_rate: ratio(t.error_count as f64, t.request_count),
            avg_latency_ms: ratio(t.latency_ms_sum, t.request_count),
            p50_latency_ms: t.p50_ms,
            p95_latency_ms: t.p95_ms,
            p99_latency_ms: t.p99_ms,
            avg_ttft_ms: ratio(t.ttft_ms_sum, t.ttft_count),
            stream_count: t.stream_count,
        }
    }};
}

#[tonic::async_trait]
impl StatsService for Stats {
    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let r = request.into_inner();
        let filter = filter_of!(r)?;
        let granularity = match pb::Granularity::try_from(r.granularity) {
            Ok(pb::Granularity::Unspecified | pb::Granularity::Hour) => Granularity::Hour,
            Ok(pb::Granularity::Day) => Granularity::Day,
            Err(_) => return Err(Status::invalid_argument("granularity: unknown value")),
        };
        let group_by = match pb::GroupBy::try_from(r.group_by) {
            Ok(pb::GroupBy::Unspecified) => GroupBy::Nothing,
            Ok(pb::GroupBy::Backend) => GroupBy::Backend,
            Ok(pb::GroupBy::Model) => GroupBy::Model,
            Ok(pb::GroupBy::ClientKey) => GroupBy::ClientKey,
            Err(_) => return Err(Status::invalid_argument("group_by: unknown value")),
        };
        let points = self
            .store
            .usage_series(filter, granularity, group_by)
            .await?;
        let buckets = points
            .into_iter()
            .map(|p| {
                usage_figures!(pb::UsageBucket, &p.totals, {
                    start_time: Some(crate::time::timestamp(p.start_ms)),
                    group_key: p.group_key,
                    group_label: p.group_label,
                })
            })
            .collect();
        Ok(Response::new(pb::GetUsageResponse { buckets }))
    }

    async fn get_totals(
        &self,
        request: Request<pb::GetTotalsRequest>,
    ) -> Result<Response<pb::GetTotalsResponse>, Status> {
        let r = request.into_inner();
        let filter = filter_of!(r)?;
        let totals: Totals = self.store.totals(filter).await?;
        Ok(Response::new(usage_figures!(
            pb::GetTotalsResponse,
            &totals,
            {}
        )))
    }
}
