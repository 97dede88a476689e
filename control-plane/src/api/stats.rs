//! `StatsService`: usage totals and time series from the hourly aggregates.

use prost::Message as _;
use sluice_proto::limits::{MAX_ADMIN_RESPONSE_BYTES, MAX_USAGE_PAGE_SIZE};
use sluice_proto::v1 as pb;
use sluice_proto::v1::stats_service_server::StatsService;
use tonic::{Request, Response, Status};

use super::paging::{decode_token, encode_token, page_size};
use crate::store::{
    Cursor, Granularity, GroupBy, GroupPage, Order, SeriesPoint, Store, Totals, TotalsFilter,
};
use crate::time::timestamp_ms;

#[derive(Clone)]
pub struct Stats {
    store: Store,
}

impl Stats {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Where the hourly statistics begin, for an answer to say what its hours could not count.
    async fn hours_kept_since(&self) -> Result<Option<pbjson_types::Timestamp>, Status> {
        let since = self.store.hours_kept_since(crate::time::now_ms()).await?;
        Ok(since.map(crate::time::timestamp))
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
            // The sums stop at their largest value; so does theirs.
            total_tokens: t.prompt_tokens.saturating_add(t.completion_tokens),
            cost: t.cost,
            error_rate: ratio(t.error_count as f64, t.request_count),
            // Over the requests whose latency is known: one its replica's crash cut off has
            // none, and counted as 0 ms made a backend look faster exactly when it had trouble.
            avg_latency_ms: ratio(t.latency_ms_sum, t.latency_count),
            p50_latency_ms: t.p50_ms,
            p95_latency_ms: t.p95_ms,
            p99_latency_ms: t.p99_ms,
            avg_ttft_ms: ratio(t.ttft_ms_sum, t.ttft_count),
            stream_count: t.stream_count,
            estimated_count: t.estimated_count,
            backend_count: t.backend_count,
            cached_prompt_tokens: t.cached_prompt_tokens,
            reasoning_tokens: t.reasoning_tokens,
            cache_write_prompt_tokens: t.cache_write_prompt_tokens,
            audio_prompt_tokens: t.audio_prompt_tokens,
            audio_completion_tokens: t.audio_completion_tokens,
        }
    }};
}

fn group_by(value: i32) -> Result<GroupBy, Status> {
    match pb::GroupBy::try_from(value) {
        Ok(pb::GroupBy::Unspecified) => Ok(GroupBy::Nothing),
        Ok(pb::GroupBy::Backend) => Ok(GroupBy::Backend),
        Ok(pb::GroupBy::Model) => Ok(GroupBy::Model),
        Ok(pb::GroupBy::ClientKey) => Ok(GroupBy::ClientKey),
        Ok(pb::GroupBy::Pool) => Ok(GroupBy::Pool),
        Err(_) => Err(Status::invalid_argument("group_by: unknown value")),
    }
}

/// A bucket of a series (or of grouped totals, without a start time).
fn bucket(p: SeriesPoint, start: bool, currency: &str) -> pb::UsageBucket {
    usage_figures!(pb::UsageBucket, &p.totals, {
        start_time: start.then(|| crate::time::timestamp(p.start_ms)),
        group_key: p.group_key,
        group_label: p.group_label,
        currency: currency.to_owned(),
    })
}

/// The most buckets an unpaged `GetUsage` (`page_size` 0, no token) answers; past it,
/// RESOURCE_EXHAUSTED asking for pages. With every key and label at its longest, 100,000
/// buckets encode to about 65 MB, within [`MAX_ADMIN_RESPONSE_BYTES`].
pub const MAX_UNPAGED_BUCKETS: usize = 100_000;

/// `response`, or RESOURCE_EXHAUSTED naming the way out when it encodes to more than
/// `limit` bytes (an unpaged series too long to send).
fn within(response: pb::GetUsageResponse, limit: usize) -> Result<pb::GetUsageResponse, Status> {
    let len = response.encoded_len();
    if len <= limit {
        return Ok(response);
    }
    Err(too_large(response.buckets.len(), "buckets", len, limit))
}

/// RESOURCE_EXHAUSTED for an answer of `count` `what` encoding to `len` bytes, past `limit`.
pub(super) fn too_large(count: usize, what: &str, len: usize, limit: usize) -> Status {
    const MIB: f64 = 1024.0 * 1024.0;
    Status::resource_exhausted(format!(
        "the answer holds {count} {what} ({:.1} MiB), over the {:.0} MiB response limit; \
         ask for pages with page_size",
        len as f64 / MIB,
        limit as f64 / MIB
    ))
}

#[tonic::async_trait]
impl StatsService for Stats {
    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let r = request.into_inner();
        let after = decode_token(&r)?;
        let page_size = page_size(r.page_size, MAX_USAGE_PAGE_SIZE)?;
        let order = match pb::UsageOrder::try_from(r.order) {
            Ok(pb::UsageOrder::Unspecified | pb::UsageOrder::OldestFirst) => Order::OldestFirst,
            Ok(pb::UsageOrder::NewestFirst) => Order::NewestFirst,
            Err(_) => return Err(Status::invalid_argument("order: unknown value")),
        };
        let granularity = match pb::Granularity::try_from(r.granularity) {
            Ok(pb::Granularity::Unspecified | pb::Granularity::Hour) => Granularity::Hour,
            Ok(pb::Granularity::Day) => Granularity::Day,
            Err(_) => return Err(Status::invalid_argument("granularity: unknown value")),
        };
        let group_by = group_by(r.group_by)?;
        let filter = filter_of!(r.clone())?;
        let currency = self.store.get_settings().await?.currency;
        let (points, next) = if page_size == 0 && after.is_none() {
            // Read as one page of the most an unpaged answer holds: a larger one is refused
            // before it is built, not after (each bucket about 1 KB while it is).
            let page = self
                .store
                .usage_page(
                    filter,
                    granularity,
                    group_by,
                    order,
                    None,
                    MAX_UNPAGED_BUCKETS,
                )
                .await?;
            if page.next.is_some() {
                return Err(Status::resource_exhausted(format!(
                    "the answer holds more than {MAX_UNPAGED_BUCKETS} buckets; ask for pages \
                     with page_size"
                )));
            }
            (page.points, None)
        } else {
            // A token with page_size 0 continues at the largest page.
            let limit = if page_size == 0 {
                MAX_USAGE_PAGE_SIZE
            } else {
                page_size
            };
            let page = self
                .store
                .usage_page(filter, granularity, group_by, order, after, limit)
                .await?;
            (page.points, page.next)
        };
        let response = pb::GetUsageResponse {
            buckets: points
                .into_iter()
                .map(|p| bucket(p, true, &currency))
                .collect(),
            next_page_token: next.map(|c| encode_token(&r, c)).unwrap_or_default(),
            hours_kept_since: self.hours_kept_since().await?,
        };
        within(response, MAX_ADMIN_RESPONSE_BYTES).map(Response::new)
    }

    async fn get_totals(
        &self,
        request: Request<pb::GetTotalsRequest>,
    ) -> Result<Response<pb::GetTotalsResponse>, Status> {
        let r = request.into_inner();
        let group_by = group_by(r.group_by)?;
        let after = decode_token(&r)?;
        let page_size = page_size(r.page_size, MAX_USAGE_PAGE_SIZE)?;
        let filter = filter_of!(r.clone())?;
        let currency = self.store.get_settings().await?.currency;
        let (totals, groups, next) = if group_by == GroupBy::Nothing {
            (self.store.totals(filter).await?, Vec::new(), None)
        } else {
            let unpaged = page_size == 0 && after.is_none();
            let page = GroupPage {
                after: after.map(|cursor| cursor.group_key),
                // A token with page_size 0 continues at the largest page.
                limit: match page_size {
                    0 if unpaged => MAX_UNPAGED_BUCKETS,
                    0 => MAX_USAGE_PAGE_SIZE,
                    n => n,
                },
            };
            let (totals, groups, more) = self.store.grouped_totals(filter, group_by, page).await?;
            if more && unpaged {
                return Err(Status::resource_exhausted(format!(
                    "the answer holds more than {MAX_UNPAGED_BUCKETS} groups; ask for pages \
                     with page_size"
                )));
            }
            let next = groups.last().filter(|_| more).map(|last| Cursor {
                start_ms: 0,
                group_key: last.group_key.clone(),
            });
            (totals, groups, next)
        };
        let response = usage_figures!(pb::GetTotalsResponse, &totals, {
            groups: groups
                .into_iter()
                .map(|p| bucket(p, false, &currency))
                .collect(),
            currency,
            next_page_token: next.map(|c| encode_token(&r, c)).unwrap_or_default(),
            hours_kept_since: self.hours_kept_since().await?,
        });
        let len = response.encoded_len();
        if len > MAX_ADMIN_RESPONSE_BYTES {
            return Err(too_large(
                response.groups.len(),
                "groups",
                len,
                MAX_ADMIN_RESPONSE_BYTES,
            ));
        }
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn an_answer_past_the_limit_is_refused_with_the_way_out() {
        let response = pb::GetUsageResponse {
            buckets: vec![
                pb::UsageBucket {
                    group_key: "m".repeat(1000),
                    ..Default::default()
                };
                3
            ],
            ..Default::default()
        };
        let len = response.encoded_len();
        assert_eq!(within(response.clone(), len).unwrap(), response);
        let refused = within(response, len - 1).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("3 buckets"),
            "{}",
            refused.message()
        );
        assert!(
            refused.message().contains("page_size"),
            "{}",
            refused.message()
        );
    }

    /// Sums stopped at their largest value (an upstream reporting absurd token counts) add up
    /// to the largest value, not to a small number (release) or a panic (debug).
    #[test]
    fn total_tokens_stop_at_the_largest_value_with_their_parts() {
        let totals = Totals {
            prompt_tokens: u64::MAX,
            completion_tokens: 19,
            ..Default::default()
        };
        let point = SeriesPoint {
            totals,
            ..Default::default()
        };
        assert_eq!(bucket(point, false, "USD").total_tokens, u64::MAX);
    }

    #[test]
    fn a_token_belongs_to_its_query() {
        let request = pb::GetUsageRequest {
            group_by: pb::GroupBy::Pool as i32,
            page_size: 10,
            ..Default::default()
        };
        let cursor = Cursor {
            start_ms: 1_764_028_800_000,
            group_key: "a:b/c".into(),
        };
        let next = pb::GetUsageRequest {
            page_token: encode_token(&request, cursor.clone()),
            // The page size may change between pages.
            page_size: 500,
            ..request.clone()
        };
        assert_eq!(decode_token(&next).unwrap(), Some(cursor));
        let other = pb::GetUsageRequest {
            model: "m".into(),
            ..next.clone()
        };
        assert_eq!(
            decode_token(&other).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
