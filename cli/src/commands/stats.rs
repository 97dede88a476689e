//! `stats totals|usage`.

use std::time::SystemTime;

use sluice_proto::limits::MAX_USAGE_PAGE_SIZE;
use sluice_proto::v1 as pb;
use sluice_proto::wkt::Timestamp;

use crate::args::{FilterArgs, RangeArgs, StatsCommand};
use crate::connection::Connection;
use crate::error::Error;
use crate::render::{self, Output};
use crate::time::to_timestamp;

pub async fn run(
    command: StatsCommand,
    connection: &Connection,
    out: &Output,
) -> Result<(), Error> {
    match command {
        StatsCommand::Totals { by, range, filter } => {
            let filter = resolve(filter, connection).await?;
            let (start_time, end_time) = time_range(&range, SystemTime::now());
            let grouped = by.is_some();
            let mut request = pb::GetTotalsRequest {
                start_time,
                end_time,
                backend_id: filter.backend.unwrap_or_default(),
                model: filter.model.unwrap_or_default(),
                client_key_id: filter.key.unwrap_or_default(),
                group_by: by
                    .map_or(pb::GroupBy::Unspecified, pb::GroupBy::from)
                    .into(),
                page_size: MAX_USAGE_PAGE_SIZE as i32,
                page_token: String::new(),
            };
            let (start, end) = (request.start_time, request.end_time);
            let mut stats = connection.stats().await?;
            // Every group, page by page; the totals are those of the last page's read.
            let mut groups = Vec::new();
            let response = loop {
                let mut page = connection.call(stats.get_totals(request.clone())).await?;
                groups.append(&mut page.groups);
                if page.next_page_token.is_empty() {
                    break pb::GetTotalsResponse { groups, ..page };
                }
                request.page_token = std::mem::take(&mut page.next_page_token);
            };
            if let Some(note) = hours_note(response.hours_kept_since, start, end, false) {
                eprintln!("{note}");
            }
            // Each page is read as of its moment: usage that arrived between the pages of a
            // range reaching now is in the totals (the last page's) and not in every group.
            let in_groups: u64 = response.groups.iter().map(|g| g.request_count).sum();
            if grouped && in_groups != response.request_count {
                eprintln!(
                    "sluicectl: note: usage arrived while the groups were read: the groups add \
                     up to {in_groups} requests, the totals (read last) {}",
                    response.request_count
                );
            }
            out.print(&response, render::totals)
        }
        StatsCommand::Usage {
            by,
            granularity,
            newest_first,
            limit,
            range,
            filter,
        } => {
            let filter = resolve(filter, connection).await?;
            let mut request = usage_request(by, granularity, &range, filter, SystemTime::now());
            if newest_first {
                request.order = pb::UsageOrder::NewestFirst.into();
            }
            let (start, end) = (request.start_time, request.end_time);
            let hour_buckets = request.granularity != i32::from(pb::Granularity::Day);
            let stats = connection.stats().await?;
            let response = read_pages(request, limit, |request| {
                let mut stats = stats.clone();
                async move { connection.call(stats.get_usage(request)).await }
            })
            .await?;
            if let Some(note) = hours_note(response.hours_kept_since, start, end, hour_buckets) {
                eprintln!("{note}");
            }
            out.print(&response, render::usage)
        }
    }
}

/// Every bucket of `request` (or the first `limit`), read page by page; the answer's
/// `next_page_token` is set when `limit` left buckets unread.
async fn read_pages<F, Fut>(
    mut request: pb::GetUsageRequest,
    limit: Option<u64>,
    mut call: F,
) -> Result<pb::GetUsageResponse, Error>
where
    F: FnMut(pb::GetUsageRequest) -> Fut,
    Fut: std::future::Future<Output = Result<pb::GetUsageResponse, Error>>,
{
    let mut all = pb::GetUsageResponse::default();
    loop {
        let wanted = limit.map_or(u64::MAX, |l| l - all.buckets.len() as u64);
        request.page_size = wanted.min(MAX_USAGE_PAGE_SIZE as u64) as i32;
        let page = call(request.clone()).await?;
        all.buckets.extend(page.buckets);
        all.next_page_token = page.next_page_token;
        all.hours_kept_since = page.hours_kept_since;
        if all.next_page_token.is_empty() || limit.is_some_and(|l| all.buckets.len() as u64 >= l) {
            return Ok(all);
        }
        request.page_token = all.next_page_token.clone();
    }
}

/// Says which deleted backends had the name `name` and kept usage under their ids: a
/// backend deleted and added again under its name (to start over with a new key) splits its
/// history, and `--backend NAME` asks for the current one's alone, which a reconciliation
/// against a provider's invoice read as the whole without a word.
async fn deleted_namesakes(name: &str, connection: &Connection) -> Result<(), Error> {
    let deleted = format!("{name} (deleted)");
    let mut stats = connection.stats().await?;
    let mut request = pb::GetTotalsRequest {
        group_by: pb::GroupBy::Backend.into(),
        page_size: MAX_USAGE_PAGE_SIZE as i32,
        ..Default::default()
    };
    let mut ids = Vec::new();
    loop {
        let page = connection.call(stats.get_totals(request.clone())).await?;
        ids.extend(
            page.groups
                .into_iter()
                .filter(|group| group.group_label == deleted)
                .map(|group| group.group_key),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    if !ids.is_empty() {
        eprintln!(
            "note: these are the figures of the backend named \"{}\" now; {} deleted backend{} \
             had that name ({}): ask for each with --backend ID",
            sluice_domain::text::escape_control(name),
            ids.len(),
            if ids.len() == 1 { "" } else { "s" },
            ids.join(", "),
        );
    }
    Ok(())
}

/// Usage is keyed by ids, while operators think in names: a backend or client
/// key filter that names one is replaced by its id. Anything else is passed on
/// as an id, since usage outlives deleted backends.
async fn resolve(mut filter: FilterArgs, connection: &Connection) -> Result<FilterArgs, Error> {
    if filter.backend.is_none() && filter.key.is_none() && filter.model.is_none() {
        return Ok(filter);
    }
    let mut admin = connection.admin().await?;
    if let Some(model) = &filter.model {
        // A model no backend serves (a typo) gave zeros with no word, where a backend's or a
        // key's name said so. (A model served no more keeps its usage under its name.)
        let backends = connection
            .call(admin.list_backends(pb::ListBackendsRequest {}))
            .await?
            .backends;
        let served = backends
            .iter()
            .any(|backend| backend.models.iter().any(|route| route.name == *model));
        if !served {
            eprintln!(
                "note: no backend serves a model named \"{}\" now; the usage of a model served \
                 no more is kept under its name (`sluicectl stats totals --by model` lists them)",
                sluice_domain::text::escape_control(model)
            );
        }
    }
    // Names compared here are composed as the control plane stores them (NFC).
    for name in [&mut filter.backend, &mut filter.key].into_iter().flatten() {
        *name = sluice_domain::text::canonical_name(name);
    }
    if let Some(backend) = &mut filter.backend {
        let request = pb::GetBackendRequest {
            id: backend.clone(),
        };
        match connection.find(admin.get_backend(request)).await? {
            Some(pb::GetBackendResponse {
                backend: Some(found),
            }) => {
                if found.id != *backend {
                    deleted_namesakes(backend, connection).await?;
                }
                *backend = found.id;
            }
            // Asked by the name of a deleted backend, the totals would be zeros that look
            // like a backend that served nothing. (A deleted backend's id, which is how its
            // usage is kept, is asked for as it is.)
            _ if looks_like_an_id(backend) => {}
            _ => eprintln!(
                "note: no backend is named or has the id \"{}\" now; the usage of a deleted \
                 backend is kept under its id (`sluicectl stats totals --by backend` lists them)",
                sluice_domain::text::escape_control(backend)
            ),
        }
    }
    if let Some(key) = &mut filter.key {
        let keys = super::key::all_keys(connection, false).await?;
        let by_name = keys
            .iter()
            .filter(|candidate| candidate.name == *key)
            .min_by_key(|candidate| candidate.revoked);
        let is_an_id = keys.iter().any(|candidate| candidate.id == *key);
        match by_name {
            Some(found) if !is_an_id => {
                // A key rotated by revoking it and creating another of its name: the usage
                // of each is under its own id, and summed under one name a chargeback
                // counted only one of them without a word.
                let others: Vec<&str> = keys
                    .iter()
                    .filter(|other| other.name == *key && other.id != found.id)
                    .map(|other| other.id.as_str())
                    .collect();
                if !others.is_empty() {
                    eprintln!(
                        "note: these are the figures of key {} (\"{}\"{}); {} other key{} had \
                         that name ({}): ask for each with --key ID",
                        found.id,
                        sluice_domain::text::escape_control(key),
                        if found.revoked { ", revoked" } else { "" },
                        others.len(),
                        if others.len() == 1 { "" } else { "s" },
                        others.join(", "),
                    );
                }
                *key = found.id.clone();
            }
            // A name no key has (a typo) gave zeros that a chargeback script reads as a key
            // that spent nothing. (A deleted key's id is asked for as it is.)
            None if !is_an_id && !looks_like_an_id(key) => eprintln!(
                "note: no client key is named or has the id \"{}\"; the usage of a deleted key \
                 is kept under its id (`sluicectl stats totals --by key` lists them)",
                sluice_domain::text::escape_control(key)
            ),
            _ => {}
        }
    }
    Ok(filter)
}

/// Whether `text` is written as Sluice's ids are (UUIDs: 36 characters, hyphens at 8, 13,
/// 18 and 23, hexadecimal digits between).
fn looks_like_an_id(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

fn usage_request(
    by: Option<crate::args::GroupByArg>,
    granularity: crate::args::GranularityArg,
    range: &RangeArgs,
    filter: FilterArgs,
    now: SystemTime,
) -> pb::GetUsageRequest {
    let (start_time, end_time) = time_range(range, now);
    pb::GetUsageRequest {
        granularity: pb::Granularity::from(granularity).into(),
        start_time,
        end_time,
        backend_id: filter.backend.unwrap_or_default(),
        model: filter.model.unwrap_or_default(),
        client_key_id: filter.key.unwrap_or_default(),
        group_by: by
            .map_or(pb::GroupBy::Unspecified, pb::GroupBy::from)
            .into(),
        ..Default::default()
    }
}

/// What an answer could not count by the hour, said on stderr (stdout stays the API's): hours
/// before `kept` (the hourly retention's cutoff) are kept by the whole UTC day alone, so hour
/// buckets there, and a range's first or last partial day there, count nothing. `None` when
/// the question reaches no such hour.
fn hours_note(
    kept: Option<Timestamp>,
    start: Option<Timestamp>,
    end: Option<Timestamp>,
    hour_buckets: bool,
) -> Option<String> {
    const DAY_SECONDS: i64 = 86_400;
    let kept = kept?;
    let before_kept = |t: &Timestamp| (t.seconds, t.nanos) < (kept.seconds, kept.nanos);
    let partial_day = |t: &Timestamp| t.seconds.rem_euclid(DAY_SECONDS) != 0 || t.nanos != 0;
    let since = crate::time::absolute(Some(&kept));
    if hour_buckets {
        return start.as_ref().is_none_or(before_kept).then(|| {
            format!(
                "sluicectl: note: usage before {since} is kept by the whole UTC day only, not \
                 in hour buckets (its hours count nothing here): ask with --granularity day"
            )
        });
    }
    let cut = [start, end]
        .into_iter()
        .flatten()
        .find(|t| before_kept(t) && partial_day(t))?;
    Some(format!(
        "sluicectl: note: usage before {since} is kept by the whole UTC day only: the hours of \
         the range's partial day at {} count nothing; give the range whole UTC days to count \
         that day",
        crate::time::absolute(Some(&cut))
    ))
}

/// `--since D` is `[now - D, now)`; `--start`/`--end` as given; nothing is all time.
fn time_range(range: &RangeArgs, now: SystemTime) -> (Option<Timestamp>, Option<Timestamp>) {
    match range.since {
        Some(since) => (
            Some(to_timestamp(
                now.checked_sub(since).unwrap_or(SystemTime::UNIX_EPOCH),
            )),
            Some(to_timestamp(now)),
        ),
        None => (range.start.map(to_timestamp), range.end.map(to_timestamp)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::args::{GranularityArg, GroupByArg};

    #[test]
    fn since_ends_now() {
        let now = UNIX_EPOCH + Duration::from_secs(200_000);
        let range = RangeArgs {
            since: Some(Duration::from_secs(86_400)),
            start: None,
            end: None,
        };
        let filter = FilterArgs {
            backend: Some("b".into()),
            model: None,
            key: None,
        };
        let request = usage_request(
            Some(GroupByArg::Key),
            GranularityArg::Day,
            &range,
            filter,
            now,
        );
        assert_eq!(request.start_time.unwrap().seconds, 200_000 - 86_400);
        assert_eq!(request.end_time.unwrap().seconds, 200_000);
        assert_eq!(request.group_by, pb::GroupBy::ClientKey as i32);
        assert_eq!(request.granularity, pb::Granularity::Day as i32);
        assert_eq!(request.backend_id, "b");
    }

    /// An answer whose hours are partly past the hourly retention is noted: hour buckets
    /// reaching before it, and a range's partial day before it; whole days, and a range
    /// inside the hours kept, are not.
    #[test]
    fn hours_past_the_hourly_retention_are_noted() {
        let at = |seconds: i64| Some(Timestamp { seconds, nanos: 0 });
        let day = 86_400;
        let kept = at(100 * day);
        assert!(hours_note(None, None, None, true).is_none());
        // Hour buckets: all time, or a start before the cutoff.
        let note = hours_note(kept, None, None, true).unwrap();
        assert!(note.contains("--granularity day"), "{note}");
        assert!(hours_note(kept, at(99 * day), None, true).is_some());
        assert!(hours_note(kept, at(100 * day), None, true).is_none());
        // Totals and day buckets: a partial first day before the cutoff, not a whole one.
        let note = hours_note(kept, at(95 * day + 14 * 3_600), at(120 * day), false).unwrap();
        assert!(note.contains("1970-04-06T14:00:00Z"), "{note}");
        assert!(hours_note(kept, at(95 * day), at(120 * day), false).is_none());
        assert!(hours_note(kept, None, None, false).is_none());
        assert!(hours_note(kept, at(101 * day + 5), None, false).is_none());
    }

    #[test]
    fn no_range_is_all_time() {
        let range = RangeArgs {
            since: None,
            start: None,
            end: None,
        };
        assert_eq!(time_range(&range, SystemTime::now()), (None, None));
    }
}
