//! How fast a change reaches every replica, observed the way a client sees it: each replica is
//! polled with requests until its answers show the change.
//!
//! - Admin write: `UpdateBackend` gives a backend a model name no replica has seen; a replica
//!   serves the new snapshot once a request for that model succeeds.
//! - Cooldown: the mock answers one request with 429 (`Retry-After: 30`) through replica 1; the
//!   other replicas have the cooldown once they route to the second backend.
//!
//! The resolution is the poll interval plus one request (about 1–2 ms).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;

use super::BenchError;
use super::client::{Answer, Pool, chat_body};
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
        result.rounds += 1;
        match all_show(replicas, &body, polling, |a| a.status.is_success()).await {
            Some(served) => {
                result.from_send.record(served - sent);
                result
                    .from_return
                    .record(served.saturating_duration_since(returned));
            }
            None => result.fail(format!(
                "round {round}: a replica did not serve model {model} within {:?}",
                polling.timeout
            )),
        }
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
