//! How fast a change reaches every replica, observed the way a client sees it: each replica is
//! polled with requests until its answers show the change.
//!
//! - Admin write: `UpdateBackend` gives a backend a model name no replica has seen; a replica
//!   serves the new snapshot once a request for that model succeeds.
//! - Cooldown: the mock answers one request with 429 (`Retry-After: 30`) through replica 1; the
//!   other replicas have the cooldown once they route to the second backend.
//!
//! - Client keys: a budget raised for a key refused as spent; a key revoked; a key's
//!   `expire_time` passing; a daily budget's period ending (periods shortened by the control
//!   plane's hidden `--budget-period-length`). Timed until every replica answers as the change
//!   says (served, or 401); expiry and period end from the instant they fall due.
//!
//! The resolution is the poll interval plus one request (about 1–2 ms).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::join_all;
use http::StatusCode;
use sluice_proto::v1 as pb;

use super::BenchError;
use super::client::{Answer, Pool, Target, chat_body};
use super::cluster::{Cluster, MockProcess};
use super::hist::Latencies;

/// Timings of repeated propagation rounds.
#[derive(Clone, Debug)]
pub struct PropagationResult {
    pub rounds: usize,
    /// Until every replica showed the change, from when the trigger was sent.
    pub from_send: Latencies,
    /// Until every replica showed the change, from when the trigger's call returned.
    pub from_return: Latencies,
    /// Rounds in which some replica never showed the change in time.
    pub failures: usize,
    pub first_error: Option<String>,
}

impl PropagationResult {
    fn new() -> Result<Self, BenchError> {
        Ok(Self {
            rounds: 0,
            from_send: Latencies::new()?,
            from_return: Latencies::new()?,
            failures: 0,
            first_error: None,
        })
    }

    fn fail(&mut self, why: String) {
        self.failures += 1;
        self.first_error.get_or_insert(why);
    }

    /// A round triggered by a call sent at `sent` that returned at `returned` (or a change due
    /// at `sent` = `returned`), seen at every replica at `seen`; never seen, it fails with `why`.
    fn round(
        &mut self,
        seen: Option<Instant>,
        sent: Instant,
        returned: Instant,
        why: impl FnOnce() -> String,
    ) {
        self.rounds += 1;
        match seen {
            Some(at) => {
                self.from_send.record(at.saturating_duration_since(sent));
                self.from_return
                    .record(at.saturating_duration_since(returned));
            }
            None => self.fail(why()),
        }
    }
}

/// How rounds poll and give up.
#[derive(Clone, Copy, Debug)]
pub struct Polling {
    pub interval: Duration,
    /// A replica that shows nothing within this fails the round.
    pub timeout: Duration,
}

/// Polls `pool` with `body` until `done` holds for an answer; the time that answer arrived.
async fn poll_until(
    pool: &Pool,
    body: &Bytes,
    polling: Polling,
    done: impl Fn(&Answer) -> bool,
) -> Option<Instant> {
    let deadline = Instant::now() + polling.timeout;
    loop {
        if let Ok(answer) = pool.call(body.clone()).await
            && done(&answer)
        {
            return Some(Instant::now());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(polling.interval).await;
    }
}

/// The latest of the times every replica showed the change, if they all did.
async fn all_show(
    replicas: &[Arc<Pool>],
    body: &Bytes,
    polling: Polling,
    done: impl Fn(&Answer) -> bool + Copy,
) -> Option<Instant> {
    let seen = join_all(replicas.iter().map(|p| poll_until(p, body, polling, done))).await;
    let mut latest: Option<Instant> = None;
    for t in seen {
        let t = t?;
        latest = Some(latest.map_or(t, |l| l.max(t)));
    }
    latest
}

/// `rounds` times: give `backend_id` a new model and time until every replica serves it.
pub async fn admin_write(
    cluster: &Cluster,
    backend_id: &str,
    replicas: &[Arc<Pool>],
    rounds: usize,
    polling: Polling,
) -> Result<PropagationResult, BenchError> {
    let mut result = PropagationResult::new()?;
    for round in 0..rounds {
        let model = format!("propagation-{round}");
        let body = chat_body(&model, false);
        let sent = Instant::now();
        cluster.set_models(backend_id, &[&model]).await?;
        let returned = Instant::now();
        let seen = all_show(replicas, &body, polling, served).await;
        result.round(seen, sent, returned, || {
            format!(
                "round {round}: a replica did not serve model {model} within {:?}",
                polling.timeout
            )
        });
    }
    Ok(result)
}

/// Which backend answered (`x-sluice-backend`).
fn backend_of(answer: &Answer) -> Option<&str> {
    answer
        .headers
        .get("x-sluice-backend")
        .and_then(|v| v.to_str().ok())
}

/// The backends a 429 round uses: `first` (preferred, on `first_mock`) and `second`.
pub struct CooldownPair<'a> {
    pub first_mock: &'a MockProcess,
    pub first_id: &'a str,
    pub first_name: &'a str,
    pub second_name: &'a str,
    /// A model both serve.
    pub model: &'a str,
}

/// `rounds` times: one 429 from `first` through replica 0; time until every other replica
/// routes to `second`. The cooldown is reset between rounds and every replica is seen routing
/// to `first` again before the next one.
pub async fn cooldown(
    cluster: &Cluster,
    pair: &CooldownPair<'_>,
    replicas: &[Arc<Pool>],
    rounds: usize,
    polling: Polling,
) -> Result<PropagationResult, BenchError> {
    let mut result = PropagationResult::new()?;
    let (Some(hit), Some(others)) = (replicas.first(), replicas.get(1..)) else {
        return Err(BenchError::Setup("cooldown rounds need replicas".into()));
    };
    let body = chat_body(pair.model, false);
    let fault = serde_json::json!({
        "fault": {"status": {"code": 429, "retry_after": {"seconds": 30}}},
        "count": 1,
    });
    for round in 0..rounds {
        let on_first = |a: &Answer| a.status.is_success() && backend_of(a) == Some(pair.first_name);
        if all_show(replicas, &body, polling, on_first).await.is_none() {
            return Err(BenchError::Setup(format!(
                "round {round}: not every replica routes to {} again after ResetCooldown",
                pair.first_name
            )));
        }
        pair.first_mock
            .set_faults(cluster.http(), fault.clone())
            .await?;
        let sent = Instant::now();
        let answer = hit.call(body.clone()).await?;
        let answered = Instant::now();
        result.rounds += 1;
        if !answer.status.is_success() || backend_of(&answer) != Some(pair.second_name) {
            result.fail(format!(
                "round {round}: replica 1 answered {} from {:?} after the 429",
                answer.status,
                backend_of(&answer)
            ));
        } else {
            let on_second =
                |a: &Answer| a.status.is_success() && backend_of(a) == Some(pair.second_name);
            match all_show(others, &body, polling, on_second).await {
                Some(cooled) => {
                    result.from_send.record(cooled - sent);
                    result
                        .from_return
                        .record(cooled.saturating_duration_since(answered));
                }
                None => result.fail(format!(
                    "round {round}: a replica still routed to {} after {:?}",
                    pair.first_name, polling.timeout
                )),
            }
        }
        cluster.reset_cooldown(pair.first_id).await?;
    }
    Ok(result)
}

/// The replicas a key is tried at, and the model it asks for.
pub struct KeyRounds<'a> {
    pub cluster: &'a Cluster,
    /// Each replica's base URL (`http://…/v1`).
    pub urls: &'a [String],
    pub model: &'a str,
    pub rounds: usize,
    pub polling: Polling,
}

impl KeyRounds<'_> {
    /// A client of every replica presenting `key`.
    fn pools(&self, key: &str) -> Result<Vec<Arc<Pool>>, BenchError> {
        self.urls
            .iter()
            .map(|url| {
                Target::new(url, Some(key), self.model, false)
                    .map(|t| Arc::new(Pool::new(Arc::new(t))))
            })
            .collect()
    }

    /// Creates a key for every model; its id and secret.
    async fn create_key(
        &self,
        request: pb::CreateClientKeyRequest,
    ) -> Result<(String, String), BenchError> {
        let created = self
            .cluster
            .admin()
            .create_client_key(request)
            .await?
            .into_inner();
        let id = created
            .client_key
            .map(|k| k.id)
            .ok_or_else(|| BenchError::Setup("CreateClientKey returned no key".into()))?;
        Ok((id, created.key))
    }

    async fn set_budget(&self, id: &str, max_budget: f64) -> Result<(), BenchError> {
        self.cluster
            .admin()
            .update_client_key(pb::UpdateClientKeyRequest {
                client_key: Some(pb::ClientKey {
                    id: id.into(),
                    max_budget,
                    ..Default::default()
                }),
                update_mask: Some(sluice_proto::wkt::FieldMask {
                    paths: vec!["max_budget".into()],
                }),
            })
            .await?;
        Ok(())
    }

    /// Waits until every replica answers as `state` says, before a round is timed.
    async fn settle(
        &self,
        pools: &[Arc<Pool>],
        body: &Bytes,
        what: &str,
        state: impl Fn(&Answer) -> bool + Copy,
    ) -> Result<(), BenchError> {
        match all_show(pools, body, self.polling, state).await {
            Some(_) => Ok(()),
            None => Err(BenchError::Setup(format!(
                "not every replica {what} within {:?}",
                self.polling.timeout
            ))),
        }
    }
}

fn served(a: &Answer) -> bool {
    a.status.is_success()
}

fn refused_for_budget(a: &Answer) -> bool {
    a.status == StatusCode::TOO_MANY_REQUESTS
}

fn unauthorized(a: &Answer) -> bool {
    a.status == StatusCode::UNAUTHORIZED
}

/// `rounds` times: a key refused for its spent budget gets a budget well above its spend
/// (`UpdateClientKey`); time until every replica serves it. Between rounds the budget is
/// lowered below the spend again and every replica is seen refusing the key.
pub async fn budget_raise(r: &KeyRounds<'_>) -> Result<PropagationResult, BenchError> {
    let mut result = PropagationResult::new()?;
    let (id, key) = r
        .create_key(pb::CreateClientKeyRequest {
            name: "propagation-budget".into(),
            max_budget: 1_000.0,
            ..Default::default()
        })
        .await?;
    let pools = r.pools(&key)?;
    let body = chat_body(r.model, false);
    // Spend something, so that the smallest budget is below it.
    r.settle(&pools, &body, "served the new key", served)
        .await?;
    for round in 0..r.rounds {
        r.set_budget(&id, 1e-9).await?;
        r.settle(&pools, &body, "refused the spent key", refused_for_budget)
            .await?;
        let sent = Instant::now();
        r.set_budget(&id, 1_000.0).await?;
        let returned = Instant::now();
        let seen = all_show(&pools, &body, r.polling, served).await;
        result.round(seen, sent, returned, || {
            format!(
                "round {round}: a replica still refused the key {:?} after its budget was raised",
                r.polling.timeout
            )
        });
    }
    Ok(result)
}

/// `rounds` times: a new key, served by every replica, is revoked (`RevokeClientKey`); time
/// until every replica answers 401.
pub async fn revocation(r: &KeyRounds<'_>) -> Result<PropagationResult, BenchError> {
    let mut result = PropagationResult::new()?;
    let body = chat_body(r.model, false);
    for round in 0..r.rounds {
        let (id, key) = r
            .create_key(pb::CreateClientKeyRequest {
                name: format!("propagation-revoke-{round}"),
                ..Default::default()
            })
            .await?;
        let pools = r.pools(&key)?;
        r.settle(&pools, &body, "served the new key", served)
            .await?;
        let sent = Instant::now();
        r.cluster
            .admin()
            .revoke_client_key(pb::RevokeClientKeyRequest { id })
            .await?;
        let returned = Instant::now();
        let seen = all_show(&pools, &body, r.polling, unauthorized).await;
        result.round(seen, sent, returned, || {
            format!(
                "round {round}: a replica still served the revoked key after {:?}",
                r.polling.timeout
            )
        });
    }
    Ok(result)
}

/// `rounds` times: a new key expiring `lead` after its creation, served by every replica
/// first; time from its `expire_time` (by the clock the control plane reads) until every
/// replica answers 401. Both measures are from the expiry.
pub async fn expiry(r: &KeyRounds<'_>, lead: Duration) -> Result<PropagationResult, BenchError> {
    let mut result = PropagationResult::new()?;
    let body = chat_body(r.model, false);
    for round in 0..r.rounds {
        let expire = SystemTime::now() + lead;
        let expires_at = Instant::now() + lead;
        let (_, key) = r
            .create_key(pb::CreateClientKeyRequest {
                name: format!("propagation-expiry-{round}"),
                expire_time: Some(timestamp(expire)),
                ..Default::default()
            })
            .await?;
        let pools = r.pools(&key)?;
        if all_show(&pools, &body, r.polling, served)
            .await
            .is_none_or(|t| t >= expires_at)
        {
            result.round(None, expires_at, expires_at, || {
                format!(
                    "round {round}: not every replica served the key within the {lead:?} \
                     before it expired"
                )
            });
            continue;
        }
        let seen = all_show(&pools, &body, r.polling, unauthorized).await;
        result.round(seen, expires_at, expires_at, || {
            format!(
                "round {round}: a replica still served the key {:?} after it expired",
                r.polling.timeout
            )
        });
    }
    Ok(result)
}

/// `rounds` times: a key with a daily budget of a few requests is spent and refused by every
/// replica (a budget below one request's reserve would never be granted again under
/// allowances); time from the end of its period (periods last `period`, the control plane's
/// `--budget-period-length`) until every replica serves it again. The next round spends the
/// new period's budget first; a round whose refusal has
/// not reached every replica before the next boundary waits for the one after.
pub async fn period_reset(
    r: &KeyRounds<'_>,
    period: Duration,
) -> Result<PropagationResult, BenchError> {
    let mut result = PropagationResult::new()?;
    let (_, key) = r
        .create_key(pb::CreateClientKeyRequest {
            name: "propagation-period".into(),
            // About seven of the benchmark's requests: the three that show a reset fit in it.
            max_budget: 1e-4,
            budget_period: pb::BudgetPeriod::Daily as i32,
            ..Default::default()
        })
        .await?;
    let pools = r.pools(&key)?;
    let body = chat_body(r.model, false);
    let period_ms = period.as_millis().max(1);
    let since_epoch_ms = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    };
    for round in 0..r.rounds {
        // Refused everywhere, and not just after a boundary whose reset may still be on its
        // way (it would then be served before the boundary this round waits for).
        let now_ms = loop {
            r.settle(&pools, &body, "refused the spent key", refused_for_budget)
                .await?;
            let now_ms = since_epoch_ms();
            if now_ms % period_ms >= 100 {
                break now_ms;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let until = Duration::from_millis((period_ms - now_ms % period_ms) as u64);
        let boundary = Instant::now() + until;
        let seen = all_show(&pools, &body, r.polling, served).await;
        if let Some(at) = seen.filter(|&at| at + Duration::from_millis(5) < boundary) {
            result.round(None, boundary, boundary, || {
                format!(
                    "round {round}: a replica served the key {:?} before its period ended",
                    boundary - at
                )
            });
            continue;
        }
        result.round(seen, boundary, boundary, || {
            format!(
                "round {round}: a replica still refused the key {:?} after its period ended",
                r.polling.timeout
            )
        });
    }
    Ok(result)
}

fn timestamp(at: SystemTime) -> sluice_proto::wkt::Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    sluice_proto::wkt::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}
