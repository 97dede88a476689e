//! End to end: budgets enforced by the real control plane and data planes, which spend
//! allowances the control plane grants them (docs/guarantees.md, Budgets). A key is refused
//! with 429 `insufficient_quota` once what remains of its budget (by the control plane's
//! accounting of what each replica computed from the usage the mock provider reported), less
//! what other replicas hold, no longer covers a request; never before 95 % of it is spent; it
//! overshoots by at most the requests in flight; and it is served again when the budget is
//! raised. With the control plane killed, replicas spend what they hold for their lease, then
//! refuse (the default) or serve and are counted later.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, Gateway, LocalRun, Mock, eventually, sse_data};
use serde_json::{Value, json};
use sluice_e2e::mock::{Fault, GarbageKind};
use sluice_proto::v1 as pb;

/// Route prices of the harness's `add_backend`: $1 in, $2 out per million tokens.
const INPUT_NANOS_PER_TOKEN: u64 = 1_000;
const OUTPUT_NANOS_PER_TOKEN: u64 = 2_000;

fn cost_of(usage: &Value) -> u64 {
    usage["prompt_tokens"].as_u64().unwrap() * INPUT_NANOS_PER_TOKEN
        + usage["completion_tokens"].as_u64().unwrap() * OUTPUT_NANOS_PER_TOKEN
}

/// What the mock provider has served, in nano-units at the route's prices.
async fn mock_nanos(mock: &Mock) -> u64 {
    let served = mock.stats().await;
    served.prompt_tokens * INPUT_NANOS_PER_TOKEN + served.completion_tokens * OUTPUT_NANOS_PER_TOKEN
}

async fn create_budgeted_key(run: &LocalRun, name: &str, max_budget: f64) -> String {
    run.admin()
        .await
        .create_client_key(pb::CreateClientKeyRequest {
            name: name.into(),
            max_budget,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
}

/// One chat completion through `gateway`, streamed (with the usage chunk asked for) or not:
/// its status, and its cost from the usage the answer carried when it was a 200.
async fn chat_costing(gateway: &Gateway, key: &str, stream: bool) -> (u16, u64, Value) {
    let mut body = json!({"model": "m", "stream": stream,
        "messages": [{"role": "user", "content": "count these five words"}]});
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let r = gateway.post("/v1/chat/completions", key, body).await;
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    if status != 200 {
        let error: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        return (status, 0, error);
    }
    let usage = if stream {
        sse_data(&text)
            .iter()
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .find(|chunk| chunk["usage"].is_object())
            .map(|chunk| chunk["usage"].clone())
            .expect("a usage chunk")
    } else {
        serde_json::from_str::<Value>(&text).unwrap()["usage"].clone()
    };
    (200, cost_of(&usage), Value::Null)
}

const PYTHON_SPENT: &str = r#"
import json, sys, openai
from openai import OpenAI
base, key = sys.argv[1], sys.argv[2]
try:
    OpenAI(base_url=base, api_key=key, max_retries=2).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x" * 4000}])
    print(json.dumps("no error"))
except openai.APIStatusError as err:
    print(json.dumps([type(err).__name__, err.status_code, err.code]))
"#;

async fn key_state(cluster: &Cluster, name: &str) -> pb::ClientKey {
    cluster
        .admin()
        .await
        .get_client_key(pb::GetClientKeyRequest { id: name.into() })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap()
}

#[tokio::test]
async fn a_key_is_refused_once_its_budget_is_spent_and_served_again_when_raised() {
    let (cluster, mock, _) = Cluster::with_one_backend().await;
    // A busy test machine must not turn a slow answer to an ask into a 503.
    let proxy = cluster.proxy_with(&["--allowance-wait=5s"]).await;
    // Route prices: $1 in, $2 out per million tokens. A mock answer costs a few hundredths
    // of a thousandth: the budget lasts a handful of requests.
    let max_budget = 0.000_2;
    let created = cluster
        .admin()
        .await
        .create_client_key(pb::CreateClientKeyRequest {
            name: "capped".into(),
            max_budget,
            budget_period: pb::BudgetPeriod::Monthly as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = created.key;

    let mut served = 0;
    let refused = loop {
        let r = proxy.chat(&key, "m").await;
        if r.status() == 429 {
            break r;
        }
        // Until the replica has the snapshot with the new key, it does not know it.
        if r.status() == 401 && served == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        r.bytes().await.unwrap();
        served += 1;
        assert!(served < 500, "never refused");
    };
    assert!(refused.headers().get("retry-after").is_none());
    assert_eq!(refused.headers()["x-should-retry"], "false");
    // An operator sees the refusal, and the asks it took, on the replica's metrics.
    let metrics = proxy.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"sluice_budget_refusals_total{reason="spent"} 1"#),
        "{metrics}"
    );
    let asks: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_allowance_asks_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(asks >= 1.0, "{metrics}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("capped") && message.contains("0.00"),
        "{message}"
    );
    assert!(
        message.contains("resets at") && message.ends_with("-01T00:00:00Z."),
        "{message}"
    );

    // What the mock served, at the route's prices, is what the key spent, once every
    // served request is counted.
    let mock_served = mock.stats().await;
    let mock_nanos = mock_served.prompt_tokens * 1_000 + mock_served.completion_tokens * 2_000;
    eventually(
        Duration::from_secs(10),
        "every served request is counted",
        || async { (key_state(&cluster, "capped").await.spend * 1e9).round() as u64 == mock_nanos },
    )
    .await;
    let budget_nanos = (max_budget * 1e9).round() as u64;
    let per_request = mock_nanos / served;
    eprintln!(
        "budget {max_budget}, served {served} requests, spend {} ({:.1} % of the budget)",
        mock_nanos as f64 / 1e9,
        mock_nanos as f64 * 100.0 / budget_nanos as f64
    );
    // Refused only when what remains, less what this replica still holds, no longer covers
    // the next request's reserve (its prompt's estimated cost, about one request here): no
    // false rejection, and no overshoot past the completion of the last request admitted.
    assert!(
        budget_nanos.saturating_sub(mock_nanos) < 3 * per_request,
        "refused with {mock_nanos} of {budget_nanos} spent"
    );
    assert!(
        mock_nanos <= budget_nanos + per_request,
        "spent {mock_nanos} of {budget_nanos}"
    );
    let state = key_state(&cluster, "capped").await;
    assert!(state.remaining_budget < 3.0 * per_request as f64 / 1e9);

    // The official Python SDK raises its usual class for a spent quota (and, with retries
    // allowed, does not retry it: `x-should-retry: false`). Its prompt alone is estimated
    // to cost more than what remains: refused without being sent.
    let out = common::python(PYTHON_SPENT, &[&proxy.url("/v1"), &key]).await;
    assert_eq!(
        out,
        serde_json::json!(["RateLimitError", 429, "insufficient_quota"])
    );

    // Raised, the same key is served again.
    cluster
        .admin()
        .await
        .update_client_key(pb::UpdateClientKeyRequest {
            client_key: Some(pb::ClientKey {
                id: "capped".into(),
                max_budget: 1.0,
                ..Default::default()
            }),
            update_mask: Some(sluice_proto::wkt::FieldMask {
                paths: vec!["max_budget".into()],
            }),
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "served again", || async {
        proxy.chat(&key, "m").await.status() == 200
    })
    .await;
}

/// What a budgeted request is charged when it learns no tokens, as the replica's pool and the
/// control plane's ledger both count it. Requests the provider refuses (an error status) were
/// billed nothing and take nothing: forty of them, whose reserves add up to three times the
/// budget, leave it whole. An answer that says nothing of usage may have been billed: it keeps
/// its reserve spent, and the key's spend says so. (Each used to keep its reserve spent without
/// its record saying so: the control plane counted that money as still held by the replica,
/// the pool and the ledger drifted apart, and the key was refused with nothing spent.)
#[tokio::test]
async fn a_request_without_tokens_is_charged_its_reserve_only_if_the_provider_may_have_billed_it() {
    let (cluster, mock, _) = Cluster::with_one_backend().await;
    let proxy = cluster.proxy_with(&["--allowance-wait=5s"]).await;
    // About thirteen requests' reserves (a reserve: a token per 4 bytes of body at $1 per
    // million input tokens).
    let max_budget = 0.000_2;
    let key = cluster
        .admin()
        .await
        .create_client_key(pb::CreateClientKeyRequest {
            name: "refused-upstream".into(),
            max_budget,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key;
    mock.set_faults(vec![
        Fault::Status {
            code: 400,
            retry_after: None,
        }
        .always(),
    ])
    .await;
    let mut refused = 0;
    while refused < 40 {
        let r = proxy.chat(&key, "m").await;
        // Until the replica has the snapshot with the new key, it does not know it.
        if r.status() == 401 && refused == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
        refused += 1;
    }
    mock.clear_faults().await;
    assert_eq!(proxy.chat(&key, "m").await.status(), 200);
    let served = mock_nanos(&mock).await;
    eventually(
        Duration::from_secs(10),
        "the one answered request counted, and nothing else",
        || async {
            (key_state(&cluster, "refused-upstream").await.spend * 1e9).round() as u64 == served
        },
    )
    .await;

    // A 200 whose body is not JSON: no usage to read, perhaps billed.
    mock.set_faults(vec![Fault::Garbage(GarbageKind::NotJson).times(1)])
        .await;
    let r = proxy.chat(&key, "m").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "say hello to me"}]});
    let reserve =
        (serde_json::to_vec(&body).unwrap().len() as u64).div_ceil(4) * INPUT_NANOS_PER_TOKEN;
    eventually(
        Duration::from_secs(10),
        "its reserve counted as spent",
        || async {
            (key_state(&cluster, "refused-upstream").await.spend * 1e9).round() as u64
                == served + reserve
        },
    )
    .await;
}

/// A request whose first attempt timed out keeps its reserve spent though the next backend
/// answered an error: the first provider may have generated, and billed, an answer nobody
/// read. (It was given back, as for a request no provider had billed.)
#[tokio::test]
async fn a_timed_out_attempt_keeps_its_reserve_whatever_the_next_backend_answers() {
    let cluster = Cluster::start().await;
    let second = sluice_proto::wkt::Duration {
        seconds: 1,
        nanos: 0,
    };
    cluster
        .set_settings(
            pb::Settings {
                max_attempts: 2,
                first_byte_timeout: Some(second),
                answer_timeout: Some(second),
                ..Default::default()
            },
            &["max_attempts", "first_byte_timeout", "answer_timeout"],
        )
        .await;
    let (stalls, errors) = (
        Mock::start("stalls", &["m"]).await,
        Mock::start("errors", &["m"]).await,
    );
    stalls.set_faults(vec![Fault::Stall.always()]).await;
    errors.set_faults(vec![Fault::status(500).always()]).await;
    cluster
        .add_backend("stalls", &stalls, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    cluster
        .add_backend("errors", &errors, pb::Pool::Primary, 1, &[("m", "m")])
        .await;
    let (_proxy, answer) = first_answer_to_a_budgeted_key(&cluster, "timed-out").await;
    assert!(answer.status().is_server_error(), "{answer:?}");
    assert_eq!(
        (
            stalls.stats().await.requests.chat_completions,
            errors.stats().await.requests.chat_completions
        ),
        (1, 1)
    );
    reserve_is_spent(&cluster, "timed-out").await;
}

/// The answer a replica gives a new key named `name` with a budget of 10, once it knows it,
/// to a chat for `m` ("say hello to me"); with the replica, which reports its usage while it
/// runs.
async fn first_answer_to_a_budgeted_key(
    cluster: &Cluster,
    name: &str,
) -> (common::Proxy, reqwest::Response) {
    let proxy = cluster.proxy_with(&["--allowance-wait=5s"]).await;
    let key = cluster
        .admin()
        .await
        .create_client_key(pb::CreateClientKeyRequest {
            name: name.into(),
            max_budget: 10.0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key;
    let answer = loop {
        let r = proxy.chat(&key, "m").await;
        // Until the replica has the snapshot with the new key, it does not know it.
        if r.status() != 401 {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    (proxy, answer)
}

/// Waits until the key named `name` has spent the reserve of that chat.
async fn reserve_is_spent(cluster: &Cluster, name: &str) {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "say hello to me"}]});
    let reserve =
        (serde_json::to_vec(&body).unwrap().len() as u64).div_ceil(4) * INPUT_NANOS_PER_TOKEN;
    eventually(
        Duration::from_secs(10),
        "its reserve counted as spent",
        || async { (key_state(cluster, name).await.spend * 1e9).round() as u64 == reserve },
    )
    .await;
}

/// A connection that breaks after the request was written (the provider may be generating,
/// and billing, the answer) keeps the request's reserve spent, as a timeout does; the client is
/// told not to send it again. Its route's price tiers made the reserve held six times as
/// much (an answer might have reported fast mode): what is kept is the prompt at the route's
/// own prices, no answer having said it ran at a dearer tier.
#[tokio::test]
async fn a_connection_lost_after_sending_keeps_its_reserve_spent() {
    let cluster = Cluster::start().await;
    let resets = Mock::start("resets", &["m"]).await;
    resets.set_faults(vec![Fault::Reset.always()]).await;
    let mut backend = cluster
        .add_backend("resets", &resets, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    backend.models[0].tier_multipliers = vec![pb::TierMultiplier {
        tier: "fast".into(),
        multiplier: 6.0,
    }];
    cluster.update_backend(backend, &["models"]).await;
    let (_proxy, answer) = first_answer_to_a_budgeted_key(&cluster, "lost").await;
    assert_eq!(answer.status(), 502);
    assert_eq!(answer.headers()["x-should-retry"], "false");
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_connection_lost", "{body}");
    reserve_is_spent(&cluster, "lost").await;
}

/// A background response spends its tokens after its create returned, and a retrieve is
/// not charged (it would be on every poll): a budgeted key would spend without limit. It gets
/// a clear 400 instead, before the provider is called; its foreground responses are served and
/// charged.
#[tokio::test]
async fn a_budgeted_key_is_refused_background_responses() {
    let (cluster, mock, unbudgeted) = Cluster::with_one_backend().await;
    let proxy = cluster.proxy_with(&["--allowance-wait=5s"]).await;
    let key = cluster
        .admin()
        .await
        .create_client_key(pb::CreateClientKeyRequest {
            name: "budgeted".into(),
            max_budget: 10.0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key;
    let create = |key: String, background: bool| {
        let proxy = &proxy;
        async move {
            proxy
                .post(
                    "/v1/responses",
                    &key,
                    json!({"model": "m", "input": "later", "background": background}),
                )
                .await
        }
    };
    // The replica runs the snapshot with the new key.
    cluster.wait_replicas_current(1).await;
    let refused = create(key.clone(), true).await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "background_not_allowed", "{body}");
    assert_eq!(mock.stats().await.requests.total(), 0);

    assert_eq!(create(key.clone(), false).await.status(), 200);
    assert_eq!(
        create(unbudgeted, true).await.status(),
        200,
        "a key without a budget"
    );
    assert_eq!(mock.stats().await.requests.total(), 2);
    eventually(
        Duration::from_secs(10),
        "the foreground response charged",
        || async { key_state(&cluster, "budgeted").await.spend > 0.0 },
    )
    .await;
}

/// The issue's two bounds, with real processes: a key with a budget driven as hard as a dozen
/// closed-loop clients can through nginx and three replicas (every third request streamed).
/// Overshoot: what the mock provider served, at the route's prices, is at most the budget
/// plus the requests in flight when it ran out (F·C: the clients, times the largest single
/// request's cost). No false rejection: when the first `insufficient_quota` arrives the
/// provider has served at least 95 % of the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_spend_a_budget_to_within_the_requests_in_flight_and_refuse_none_before_95_percent()
 {
    const CLIENTS: u64 = 12;
    // The bounds, not the latency: on a loaded test machine the control plane may take longer
    // than the default wait (1 s) to answer an ask, which would be a 503 under `refuse`.
    let run = LocalRun::start_with_env(3, &[("SLUICE_ALLOWANCE_WAIT", "5s")]).await;
    let mock = Mock::start("a", &["m"]).await;
    run.add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    // About 700 requests' worth.
    let max_budget = 0.01;
    let budget_nanos = 10_000_000u64;
    let key = create_budgeted_key(&run, "driven", max_budget).await;
    run.wait_replicas_current(3).await;

    let first_refusal = Arc::new(AtomicBool::new(false));
    let served_at_first_refusal = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicU64::new(0));
    let in_flight_at_first_refusal = Arc::new(AtomicU64::new(0));
    let largest = Arc::new(AtomicU64::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let mock = Arc::new(mock);
    let started = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let (gateway, key, mock) = (run.front(), key.clone(), Arc::clone(&mock));
            let (first_refusal, served_at_first_refusal, in_flight, in_flight_at_first_refusal) = (
                Arc::clone(&first_refusal),
                Arc::clone(&served_at_first_refusal),
                Arc::clone(&in_flight),
                Arc::clone(&in_flight_at_first_refusal),
            );
            let (largest, served) = (Arc::clone(&largest), Arc::clone(&served));
            tokio::spawn(async move {
                let mut refused_in_a_row = 0;
                let mut i = w;
                // Until this client is refused ten times in a row: every replica is then
                // refusing the key.
                while refused_in_a_row < 10 {
                    assert!(
                        started.elapsed() < Duration::from_secs(120),
                        "never refused"
                    );
                    i += 1;
                    in_flight.fetch_add(1, Ordering::SeqCst);
                    let (status, cost, error) = chat_costing(&gateway, &key, i % 3 == 0).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    match status {
                        200 => {
                            refused_in_a_row = 0;
                            largest.fetch_max(cost, Ordering::SeqCst);
                            served.fetch_add(1, Ordering::SeqCst);
                        }
                        429 => {
                            assert_eq!(error["error"]["code"], "insufficient_quota", "{error}");
                            refused_in_a_row += 1;
                            if !first_refusal.swap(true, Ordering::SeqCst) {
                                in_flight_at_first_refusal
                                    .store(in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
                                served_at_first_refusal
                                    .store(mock_nanos(&mock).await, Ordering::SeqCst);
                            }
                        }
                        other => panic!("answered {other}: {error}"),
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let elapsed = started.elapsed();
    let total = mock_nanos(&mock).await;
    eventually(
        Duration::from_secs(30),
        "the control plane counted every served request",
        || async { (run.client_key("driven").await.spend * 1e9).round() as u64 == total },
    )
    .await;
    let largest = largest.load(Ordering::SeqCst);
    let at_first_refusal = served_at_first_refusal.load(Ordering::SeqCst);
    let overshoot = total as i64 - budget_nanos as i64;
    eprintln!(
        "budget {budget_nanos} nano-units, {} requests served in {elapsed:?} by {CLIENTS} clients; \
         first refusal with {at_first_refusal} served ({:.2} % of the budget, {} requests in \
         flight); in the end {total} served ({:+.2} % of the budget, {:+.1} requests of the \
         largest, {largest})",
        served.load(Ordering::SeqCst),
        at_first_refusal as f64 * 100.0 / budget_nanos as f64,
        in_flight_at_first_refusal.load(Ordering::SeqCst),
        overshoot as f64 * 100.0 / budget_nanos as f64,
        overshoot as f64 / largest as f64,
    );
    assert!(
        total <= budget_nanos + CLIENTS * largest,
        "overshoot {overshoot} past the bound F·C = {CLIENTS} × {largest}"
    );
    assert!(
        at_first_refusal * 100 >= budget_nanos * 95,
        "first refusal with only {at_first_refusal} of {budget_nanos} served"
    );
}

/// Budgets with the control plane killed mid-run, three replicas behind nginx and a lease of
/// 5 s: each replica keeps serving a budgeted key from the allowance it holds; once its
/// lease has passed, `when_away` decides. Returns the run, the mock and the keys.
async fn control_plane_killed(when_away: Option<&str>) -> (LocalRun, Mock, String, String) {
    let mut env = vec![
        ("SLUICE_ALLOWANCE_LEASE", "5s"),
        ("SLUICE_ALLOWANCE_WAIT", "5s"),
    ];
    if let Some(mode) = when_away {
        env.push(("SLUICE_BUDGET_WHEN_AWAY", mode));
    }
    let run = LocalRun::start_with_env(3, &env).await;
    let mock = Mock::start("a", &["m"]).await;
    run.add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let budgeted = create_budgeted_key(&run, "budgeted", 1.0).await;
    let (_, free) = run.create_key("free", &[]).await;
    run.wait_replicas_current(3).await;
    // Every replica asks for, and holds, an allowance of the key.
    for i in 0..3 {
        let replica = run.replica(i);
        for _ in 0..5 {
            assert_eq!(chat_costing(&replica, &budgeted, false).await.0, 200);
        }
    }
    run.signal_control("KILL");
    // Within the lease: served from what each replica holds.
    for i in 0..3 {
        assert_eq!(
            chat_costing(&run.replica(i), &budgeted, i == 1).await.0,
            200
        );
    }
    (run, mock, budgeted, free)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_control_plane_killed_budgeted_keys_are_refused_once_the_lease_runs_out_by_default()
 {
    let (run, _mock, budgeted, free) = control_plane_killed(None).await;
    for i in 0..3 {
        let replica = run.replica(i);
        let deadline = Instant::now() + Duration::from_secs(20);
        let error = loop {
            let r = replica.chat(&budgeted, "m").await;
            if r.status() == 503 {
                assert_eq!(r.headers()["retry-after"], "1");
                break r.json::<Value>().await.unwrap();
            }
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
            assert!(Instant::now() < deadline, "still served past the lease");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(error["error"]["code"], "budget_unavailable", "{error}");
        assert_eq!(error["error"]["type"], "server_error", "{error}");
        // A key without a budget is served as always.
        assert_eq!(replica.chat(&free, "m").await.status(), 200);
    }
    // Back, the control plane grants again.
    let _control = run.restart_control().await;
    for i in 0..3 {
        let replica = run.replica(i);
        eventually(Duration::from_secs(30), "served again", || async {
            replica.chat(&budgeted, "m").await.status() == 200
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_control_plane_killed_and_budget_when_away_serve_requests_are_served_and_counted_later()
 {
    let (run, mock, budgeted, free) = control_plane_killed(Some("serve")).await;
    // Past the lease (5 s from the last message, which came before the kill): what the
    // replicas held is void, and they serve anyway.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for i in 0..3 {
        let replica = run.replica(i);
        for stream in [false, true, false] {
            assert_eq!(chat_costing(&replica, &budgeted, stream).await.0, 200);
        }
        assert_eq!(replica.chat(&free, "m").await.status(), 200);
    }
    // Back, the control plane counts everything that was served, exactly once.
    let _control = run.restart_control().await;
    let served = mock_nanos(&mock).await;
    eventually(
        Duration::from_secs(30),
        "the spend served while away is counted",
        || async {
            let budgeted = (run.client_key("budgeted").await.spend * 1e9).round() as u64;
            let free = (run.client_key("free").await.spend * 1e9).round() as u64;
            budgeted + free == served
        },
    )
    .await;
}
