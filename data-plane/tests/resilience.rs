//! Failover, cooldowns, rate limits, broken streams, cancelled clients, hot swaps and
//! graceful shutdown, over real HTTP against the mock provider.

use crate::support;

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use serde_json::Value;
use sluice_e2e::mock::{Fault, MockConfig, MockServer, RetryAfter};
use sluice_proto::v1::{self as proto, BackendEventKind, ErrorKind};
use sluice_proxy::clock::{proto_duration, system_time};
use support::harness::*;

fn mock(name: &str) -> MockServer {
    MockServer::start_local(MockConfig::named(name)).unwrap()
}

fn slow_mock(name: &str, chunks: usize, interval_ms: u64) -> MockServer {
    MockServer::start_local(
        MockConfig::named(name)
            .with_chunk_count(chunks)
            .with_chunk_interval(Duration::from_millis(interval_ms)),
    )
    .unwrap()
}

/// A snapshot of one primary backend, `primary`, with streams cut after `idle_ms` of silence.
fn one_primary_with_idle_timeout(primary: &MockServer, idle_ms: u64) -> proto::Snapshot {
    let mut message = one_primary_snapshot(&primary.base_url());
    message.settings.as_mut().unwrap().idle_stream_timeout = Some(
        sluice_proxy::clock::proto_duration(Duration::from_millis(idle_ms)),
    );
    message
}

fn pair(primary: &MockServer, fallback: &MockServer) -> Vec<proto::SnapshotBackend> {
    vec![
        backend("primary", &primary.base_url(), proto::Pool::Primary, 0),
        backend("fallback", &fallback.base_url(), proto::Pool::Fallback, 0),
    ]
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers()[name].to_str().unwrap().to_owned()
}

/// A flex request's 429 (the provider's flex capacity short, billed nothing) is passed on or
/// failed over, and cools nothing: standard-tier requests for the model, which the provider
/// serves, were kept from the backend while it cooled. A standard request's 429 still cools.
#[tokio::test]
async fn a_flex_requests_429_leaves_the_standard_tier_served() {
    let primary = mock("primary");
    let h = Harness::start(snapshot(
        1,
        vec![backend(
            "primary",
            &primary.base_url(),
            proto::Pool::Primary,
            0,
        )],
    ))
    .await;
    let mut flex = chat_body(false);
    flex["service_tier"] = "flex".into();
    primary.set_fault(Fault::status(429).times(1));
    assert_eq!(h.chat(flex).await.status(), 429);
    let standard = h.chat(chat_body(false)).await;
    assert_eq!(standard.status(), 200, "the model is not cooling down");
    primary.set_fault(Fault::status(429).times(1));
    assert_eq!(h.chat(chat_body(false)).await.status(), 429);
    assert_eq!(h.chat(chat_body(false)).await.status(), 429, "cooling down");
}

/// Three primaries (`p1`, `p2`, `p3`, in that order of priority) and a fallback serving the
/// model, the fallback as `fallback` makes it; no backend cools down for its failures (every
/// request asks the primaries).
async fn three_primaries_and_a_fallback(
    fallback: impl FnOnce(&mut proto::SnapshotBackend),
) -> (Vec<MockServer>, MockServer, Harness) {
    let primaries: Vec<MockServer> = ["p1", "p2", "p3"].into_iter().map(mock).collect();
    let fallback_mock = mock("fallback");
    let mut backends: Vec<proto::SnapshotBackend> = primaries
        .iter()
        .enumerate()
        .map(|(i, m)| {
            backend(
                &format!("p{}", i + 1),
                &m.base_url(),
                proto::Pool::Primary,
                i as i32,
            )
        })
        .collect();
    let mut last = backend(
        "fallback",
        &fallback_mock.base_url(),
        proto::Pool::Fallback,
        0,
    );
    fallback(&mut last);
    backends.push(last);
    let mut message = snapshot(1, backends);
    message.settings.as_mut().unwrap().failure_threshold = 100;
    (primaries, fallback_mock, Harness::start(message).await)
}

/// With as many primaries as `max_attempts` (3), all failing, the last attempt goes to the
/// fallback pool: it spent every attempt on the primaries, and a healthy fallback was asked only
/// once they had cooled, `failure_threshold` (5) requests later, each of them a 502 meanwhile.
/// With the fallback cooling too, the primaries keep every attempt.
#[tokio::test]
async fn the_last_attempt_goes_to_the_fallback_pool_when_the_primaries_fail() {
    let (primaries, fallback, h) = three_primaries_and_a_fallback(|_| {}).await;
    for primary in &primaries {
        primary.set_fault(Fault::status(502));
    }
    for _ in 0..3 {
        let response = h.chat(chat_body(false)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
        assert_eq!(header(&response, "x-sluice-attempts"), "3");
    }
    // p1 and p2 were asked each time; p3, the third primary, never.
    let asked: Vec<u64> = primaries
        .iter()
        .map(|m| m.stats().requests.chat_completions)
        .collect();
    assert_eq!(asked, [3, 3, 0]);

    // The fallback cooling too: the primaries keep the last attempt.
    fallback.set_fault(Fault::rate_limited(30).times(1));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 429, "the fallback's, which cools it");
    assert_eq!(header(&response, "x-sluice-attempts"), "3");
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 502);
    assert_eq!(header(&response, "x-sluice-attempts"), "3");
    assert_eq!(primaries[2].stats().requests.chat_completions, 1);
}

/// The last attempt goes to the fallback only when the fallback could take it: one at its RPM
/// limit leaves it to the primary pool's next candidate, which serves the request. (Asked only
/// whether the fallback was cooling, the healthy third primary was skipped, the fallback then
/// passed over for its limit, and the client got the second primary's 502.)
#[tokio::test]
async fn the_last_attempt_stays_with_the_primaries_when_the_fallback_cannot_take_it() {
    let (primaries, _fallback, h) = three_primaries_and_a_fallback(|fallback| {
        fallback.rpm_limit = 1;
    })
    .await;
    primaries[0].set_fault(Fault::status(502));
    primaries[1].set_fault(Fault::status(502));
    // The fallback takes the first request's last attempt, and with it its one request a
    // minute.
    let first = h.chat(chat_body(false)).await;
    assert_eq!(header(&first, "x-sluice-backend"), "fallback-name");
    // The second's last attempt goes to the third primary, which answers.
    let second = h.chat(chat_body(false)).await;
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-sluice-backend"), "p3-name");
    assert_eq!(header(&second, "x-sluice-attempts"), "3");
}

#[tokio::test]
async fn a_429_fails_over_and_cools_the_backend_for_its_retry_after() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::rate_limited(30).times(1));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;

    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "2");

    // The event reached the control plane with the upstream's Retry-After as the floor.
    let event = h.first_cooldown_event().await;
    assert_eq!(event.backend_id, "primary");
    assert_eq!(event.kind, BackendEventKind::RateLimited as i32);
    assert_eq!(event.consecutive_failures, 1);
    let until = system_time(event.cooldown_until.as_ref().unwrap()).unwrap();
    let left = until.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(25) && left <= Duration::from_secs(30),
        "{left:?}"
    );

    // The next requests skip the primary without asking it.
    for _ in 0..3 {
        let response = h.chat(chat_body(false)).await;
        assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
        assert_eq!(header(&response, "x-sluice-attempts"), "1");
    }
    assert_eq!(primary.stats().requests.chat_completions, 1);
    let records = h.records(4).await;
    assert_eq!(records[0].attempts, 2);
    assert_eq!(records[0].backend_id, "fallback");
}

#[tokio::test]
async fn server_errors_and_refused_connections_fail_over() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::status(500).times(1));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let mut backends = pair(&primary, &fallback);
    backends.insert(0, backend("dead", &dead_url, proto::Pool::Primary, -1));
    let h = Harness::start(snapshot(1, backends)).await;

    // dead (refused) → primary (500) → fallback.
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "3");
    assert!(response.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    assert_eq!(primary.stats().responses_with(500), 1);
}

/// A whole answer whose head came and whose body then broke (half the JSON, then the
/// connection closed) was generated, and billed, by the provider: it is not asked of the
/// fallback (no retry after the first byte) nor by the client's SDK (`x-should-retry: false`:
/// each try would be billed). The client gets a 502; the record keeps the
/// request's reserve, as the provider may have billed it.
#[tokio::test]
async fn a_whole_answer_cut_after_its_head_is_not_asked_again_of_another_backend() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::CutAfterChunks(1).times(1));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 502);
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    // Nor by the client's SDK, which sends a 5xx again unless told not to.
    assert_eq!(header(&response, "x-should-retry"), "false");
    assert_eq!(fallback.stats().requests.total(), 0);
    let record = h.records(1).await.remove(0);
    assert_eq!(record.attempts, 1);
    assert_eq!(record.backend_id, "primary");
    assert_eq!(record.error_kind, ErrorKind::UpstreamInvalid as i32);
}

/// A connection that breaks after the request was written (a load balancer's idle timeout,
/// a pod's restart in the middle of a generation) is not a backend that could not be
/// reached: the provider may be generating, and billing, the answer. The next backend is
/// still tried, but the request keeps its reserve (charged its estimate when nothing else
/// answers) and the client is told not to send it again; a connection refused before
/// anything was sent keeps none, as before.
#[tokio::test]
async fn a_connection_lost_after_the_request_was_sent_keeps_its_reserve() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::Reset.times(1));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");

    let alone = Harness::start(one_primary_snapshot(&primary.base_url())).await;
    primary.set_fault(Fault::Reset.times(1));
    assert_connection_lost(alone.chat(chat_body(false)).await).await;
    let record = alone.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::UpstreamConnect as i32);
    // (The reserve a budget keeps for it: e2e/tests/budgets.rs
    // `a_connection_lost_after_sending_keeps_its_reserve_spent`.)

    // Refused before anything was sent: nothing to charge, and the SDK may try again.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let dead = Harness::start(one_primary_snapshot(&dead_url)).await;
    let response = dead.chat(chat_body(false)).await;
    assert_eq!(response.status(), 502);
    assert!(response.headers().get("x-should-retry").is_none());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unreachable", "{body}");
    let record = dead.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::UpstreamConnect as i32);
}

/// A route's fee for the request itself (`call_prices`' `request`: a search model's) is
/// charged where a provider may have billed it: an attempt that lost its connection after the
/// request was sent, whatever the backend after it answered (a 503 here, which bills
/// nothing); never a backend that refused, nor a count of tokens, which no provider bills.
#[tokio::test]
async fn a_request_fee_follows_the_attempt_that_may_have_been_billed_it() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::Reset.always());
    fallback.set_fault(Fault::status(503).always());
    let priced = |fee_at: &str| {
        let mut backends = pair(&primary, &fallback);
        for b in &mut backends {
            if b.id == fee_at {
                b.models[0].call_prices = vec![proto::CallPrice {
                    tool: "request".into(),
                    price_per_thousand_calls: 30.0,
                }];
            }
        }
        snapshot(1, backends)
    };
    // The primary, which may have billed it, has the fee: charged, though the fallback
    // answered last.
    let h = Harness::start(priced("primary")).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    let record = h.records(1).await.remove(0);
    assert_eq!(record.backend_id, "fallback");
    assert_eq!(record.cost_nanos, 30_000_000, "{record:?}");
    // The fallback, which refused, has it: none.
    let h = Harness::start(priced("fallback")).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    let record = h.records(1).await.remove(0);
    assert_eq!(record.cost_nanos, 0, "{record:?}");
    // A count of a prompt's tokens, answered: none.
    primary.clear_faults();
    let h = Harness::start(priced("primary")).await;
    let response = h
        .post(
            "/v1/responses/input_tokens",
            KEY,
            &serde_json::json!({"model": MODEL, "input": "how many tokens is this"}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let record = h.records(1).await.remove(0);
    assert_eq!(record.cost_nanos, 0, "{record:?}");
}

/// A whole answer's head comes only once the whole answer is generated: a reasoning model
/// may take minutes. Its wait is `answer_timeout`, not a stream's `first_byte_timeout` (one
/// minute by default, which cut such answers off and asked, and billed, the next backend for
/// the same generation). Past `answer_timeout` the next backend is asked as before.
#[tokio::test]
async fn a_whole_answer_slower_than_a_streams_first_byte_timeout_is_waited_for() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let mut message = snapshot(1, pair(&primary, &fallback));
    let settings = message.settings.as_mut().unwrap();
    settings.first_byte_timeout = Some(proto_duration(Duration::from_millis(300)));
    settings.answer_timeout = Some(proto_duration(Duration::from_millis(3000)));
    let h = Harness::start(message).await;

    primary.set_fault(Fault::DelayMs(1000).times(1));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "1");

    // A stream is held to its first-byte timeout.
    primary.set_fault(Fault::DelayMs(1000).times(1));
    let response = h.chat(chat_body(true)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");

    primary.set_fault(Fault::DelayMs(5000).times(1));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
}

/// A backend that refuses Sluice's credentials for it (401, 403: a revoked provider key) is a
/// backend failure, not the client's: the next backend answers. When none is left, the client
/// gets 502 `upstream_auth_failed`, not the provider's 401 (which the SDKs report as the
/// client's own key being wrong) nor its body.
#[tokio::test]
async fn a_backend_that_refuses_its_credentials_fails_over() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::status(401).times(1));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "2");

    primary.set_fault(Fault::status(403).always());
    let alone = Harness::start(snapshot(
        1,
        vec![backend(
            "primary",
            &primary.base_url(),
            proto::Pool::Primary,
            0,
        )],
    ))
    .await;
    let response = alone.chat(chat_body(true)).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_auth_failed", "{body}");
    let record = alone.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::UpstreamStatus as i32);
    assert_eq!(record.status_code, 502);
    assert!(
        alone
            .metrics()
            .await
            .lines()
            .any(|l| l.starts_with("sluice_upstream_attempts_total{")
                && l.contains("outcome=\"auth_error\"")),
        "counted as an auth error"
    );
}

/// Google refuses a revoked, expired or mistyped key with 400 `API_KEY_INVALID`, and xAI
/// with 400 "Incorrect API key provided: xa***Ju…", not 401: it is the backend's credentials
/// failing, not the client's request. Passed on, the client was told its own API key was not
/// valid (xAI's words showing four characters of the provider's key), and nothing failed over
/// or counted it.
#[tokio::test]
async fn a_key_refused_with_a_400_is_the_backends_credentials() {
    for (refusal, words) in [
        (Fault::KeyInvalid, "API key not valid"),
        (Fault::XaiKeyInvalid, "Incorrect API key"),
    ] {
        let (primary, fallback) = (mock("primary"), mock("fallback"));
        primary.set_fault(refusal.clone().times(1));
        let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
        let response = h.chat(chat_body(false)).await;
        assert_eq!(response.status(), 200, "{refusal:?}");
        assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
        assert_eq!(header(&response, "x-sluice-attempts"), "2");

        primary.set_fault(refusal.clone().always());
        fallback.set_fault(refusal.clone().always());
        let response = h.chat(chat_body(false)).await;
        assert_eq!(response.status(), 502, "{refusal:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "upstream_auth_failed", "{body}");
        assert!(!body.to_string().contains(words), "{body}");
        assert!(!body.to_string().contains("***"), "{body}");
        assert!(
            h.metrics()
                .await
                .lines()
                .any(|l| l.starts_with("sluice_upstream_attempts_total{")
                    && l.contains("outcome=\"auth_error\"")),
            "{refusal:?} counted as an auth error"
        );
    }
}

/// Something other than the backend's API answering is the backend's failure, never the
/// client's answer: a redirect (a base URL on `http://` behind an https redirect, a moved
/// host: the client follows none, it would carry the key elsewhere) or a web page as a 200
/// (a TLS-intercepting proxy's login page). Passed on, the client got a bare 301 or an HTML
/// page (an empty stream to openai-python), the attempt counted as the backend's success,
/// and nothing failed over.
#[tokio::test]
async fn a_redirect_or_a_web_page_is_not_the_api_and_fails_over() {
    for code in [301, 308, 200] {
        for stream in [false, true] {
            let (primary, fallback) = (mock("primary"), mock("fallback"));
            primary.set_fault(Fault::Page { code }.always());
            let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
            let response = h.chat(chat_body(stream)).await;
            assert_eq!(response.status(), 200, "{code} stream {stream}");
            assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
            assert_eq!(header(&response, "x-sluice-attempts"), "2");
            let text = response.text().await.unwrap();
            assert!(!text.contains("Please log in"), "{text}");
            let metrics = h.metrics().await;
            let primary_attempts = |outcome: &str| {
                metrics.lines().any(|l| {
                    l.starts_with("sluice_upstream_attempts_total{")
                        && l.contains("backend=\"primary-name\"")
                        && l.contains(&format!("outcome=\"{outcome}\""))
                })
            };
            assert!(primary_attempts("invalid_response"), "{metrics}");
            assert!(!primary_attempts("ok"), "{metrics}");
        }
    }

    // With no other backend: Sluice's 502, neither the page nor where it redirected.
    let lone = mock("lone");
    let h = Harness::one_primary(&lone.base_url()).await;
    lone.set_fault(Fault::Page { code: 302 }.always());
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 502);
    assert!(response.headers().get("location").is_none());
    let body: Value = response.json().await.unwrap();
    assert!(!body.to_string().contains("llm.example"), "{body}");
}

/// An error body trickled out a byte at a time, never silent for the pause an error body is
/// allowed (a broken server, a proxy's page), is given up after three pauses: it held the
/// request to its deadline, the next backend never asked and the client answered an empty
/// 503 after up to ten minutes.
#[tokio::test]
async fn a_trickled_error_body_does_not_hold_the_next_backend_back() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let mut snap = snapshot(1, pair(&primary, &fallback));
    // The pause: 1 s; the whole error body: 3 s. The deadline: 20 s.
    snap.settings.as_mut().unwrap().idle_stream_timeout =
        Some(proto_duration(Duration::from_secs(1)));
    let h = Harness::start(snap).await;
    primary.set_fault(
        Fault::Trickle {
            code: 503,
            every_ms: 200,
        }
        .always(),
    );
    let started = std::time::Instant::now();
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// A provider account out of credit answers every request 402 (DeepSeek, OpenRouter,
/// Mistral) or, at Anthropic, 400 "Your credit balance is too low": the backend cannot serve
/// anyone, which is not the client's mistake. Passed on as a client error, half the requests
/// of two equal backends failed, the fallback was never asked, and the backend looked healthy.
/// It fails over, counts towards the backend's cooldown, and a client no backend could serve
/// gets 502 `upstream_account_unfunded`, without the provider's billing text.
#[tokio::test]
async fn a_backend_whose_account_is_out_of_credit_fails_over_and_cools_down() {
    for unfunded in [Fault::status(402), Fault::OutOfCredit] {
        let (primary, fallback) = (mock("primary"), mock("fallback"));
        primary.set_fault(unfunded.clone().always());
        let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
        // Three failures (the threshold) cool the primary down: the fourth goes straight
        // to the fallback.
        for attempts in ["2", "2", "2", "1"] {
            let response = h.chat(chat_body(false)).await;
            assert_eq!(response.status(), 200, "{unfunded:?}");
            assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
            assert_eq!(
                header(&response, "x-sluice-attempts"),
                attempts,
                "{unfunded:?}"
            );
        }
        assert_eq!(primary.stats().requests.total(), 3);

        let alone = Harness::start(one_primary_snapshot(&primary.base_url())).await;
        let response = alone.chat(chat_body(false)).await;
        assert_eq!(response.status(), 502, "{unfunded:?}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "upstream_account_unfunded", "{body}");
        assert!(!body.to_string().contains("credit balance"), "{body}");
    }
    // OpenRouter's 402 for a request the account could pay with fewer `max_tokens` is the
    // client's to fix: passed on as it came, nothing failed over or counted.
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::Unaffordable.always());
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    for _ in 0..4 {
        let response = h.chat(chat_body(false)).await;
        assert_eq!(response.status(), 402);
        assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
        let body: Value = response.json().await.unwrap();
        assert!(body.to_string().contains("fewer max_tokens"), "{body}");
    }
    assert_eq!(fallback.stats().requests.total(), 0);
}

/// The primary and the fallback, each serving a second model, `other`, beside [`MODEL`].
fn pair_of_two_models(primary: &MockServer, fallback: &MockServer) -> Vec<proto::SnapshotBackend> {
    let mut backends = pair(primary, fallback);
    for b in &mut backends {
        b.models.push(proto::ModelRoute {
            name: "other".into(),
            upstream_name: format!("other-at-{}", b.id),
            ..Default::default()
        });
    }
    backends
}

fn chat_for(model: &str) -> Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// [`chat_for`], streamed.
fn stream_for(model: &str) -> Value {
    let mut body = chat_for(model);
    body["stream"] = Value::Bool(true);
    body
}

/// An OpenAI-compatible server without the legacy completions or the embeddings endpoint
/// (Groq's 404 "Unknown request URL", a TGI node's, a FastAPI server's 405) answers its own
/// 404 or 405: another backend of the model serves the call, and the backend is counted as
/// answering (nothing cools). With none left, its answer is the client's, as before. Before,
/// the 404 went to the client, whenever that backend came first (half the requests at equal
/// weights, every failover from a busy primary).
#[tokio::test]
async fn a_backend_without_the_endpoint_called_leaves_it_to_another() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let unknown = r#"{"error":{"message":"Unknown request URL: POST /openai/v1/completions. Please check the URL for typos","type":"invalid_request_error","code":"unknown_url"}}"#;
    primary.set_fault(
        Fault::Body {
            code: 404,
            body: unknown.into(),
        }
        .always(),
    );
    let mut message = snapshot(1, pair(&primary, &fallback));
    message.settings.as_mut().unwrap().failure_threshold = 1;
    let h = Harness::start(message).await;
    let calls = [
        (
            "/v1/completions",
            serde_json::json!({"model": MODEL, "prompt": "hi"}),
        ),
        (
            "/v1/embeddings",
            serde_json::json!({"model": MODEL, "input": ["a", "b"]}),
        ),
    ];
    for (path, body) in &calls {
        for _ in 0..3 {
            let response = h.post(path, KEY, body).await;
            assert_eq!(response.status(), 200, "{path}");
            assert_eq!(
                header(&response, "x-sluice-backend"),
                "fallback-name",
                "{path}"
            );
            // Asked of the primary each time: it answered, nothing cools.
            assert_eq!(header(&response, "x-sluice-attempts"), "2", "{path}");
        }
    }
    // Counted apart, for the operator to route the calls elsewhere (each costs an attempt).
    let attempts = h.metrics().await;
    assert!(
        attempts
            .lines()
            .any(|l| l.starts_with("sluice_upstream_attempts_total{")
                && l.contains("backend=\"primary-name\"")
                && l.contains("outcome=\"not_served\"")
                && l.ends_with(" 6")),
        "{attempts}"
    );
    // A busy primary's 429 is the answer, not the fallback's 404: the client may come back.
    let (busy, without) = (mock("busy"), mock("without"));
    busy.set_fault(Fault::rate_limited(5).always());
    without.set_fault(
        Fault::Body {
            code: 404,
            body: unknown.into(),
        }
        .always(),
    );
    let h = Harness::start(snapshot(1, pair(&busy, &without))).await;
    let response = h.post(calls[1].0, KEY, &calls[1].1).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    // The only backend: its answer is the client's.
    let alone = Harness::start(one_primary_snapshot(&primary.base_url())).await;
    let response = alone.post(calls[0].0, KEY, &calls[0].1).await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unknown_url", "{body}");
}

/// Providers limit each model apart (OpenAI's 429s name the model, Anthropic's limits are
/// per model, an Azure deployment is one model): a 429 for one model cools that model at the
/// backend, and the backend's other models are still served there. The cooldown reaches the
/// control plane as the model's.
#[tokio::test]
async fn a_429_for_one_model_cools_that_model_alone_at_its_backend() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let limited = format!("{MODEL}-at-primary");
    primary.set_fault(Fault::rate_limited(30).always().for_model(&limited));
    let h = Harness::start(snapshot(1, pair_of_two_models(&primary, &fallback))).await;

    let response = h.chat(chat_for(MODEL)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    // The model cools at the primary: not asked again.
    let response = h.chat(chat_for(MODEL)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    // The primary's other model is served there, as before.
    for _ in 0..3 {
        let response = h.chat(chat_for("other")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
        assert_eq!(header(&response, "x-sluice-attempts"), "1");
    }
    let event = h.first_cooldown_event().await;
    assert_eq!(
        (event.backend_id.as_str(), event.model.as_str()),
        ("primary", limited.as_str())
    );
    assert_eq!(event.kind, BackendEventKind::RateLimited as i32);
    assert_eq!(primary.stats().requests.chat_completions, 4);
}

/// A provider refusing one model to the backend's account (OpenAI's 403 "Project … does not
/// have access to model …", a 404 `model_not_found`) is not the backend's key refused: the
/// request fails over, the refusals cool that model alone at the backend (a client asking for
/// it again and again cannot take the backend's other models out), and a client no backend
/// can serve gets 502 `upstream_model_unavailable`, without the provider's project id.
#[tokio::test]
async fn a_model_refused_to_the_backends_account_fails_over_and_cools_that_model_alone() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let refused = format!("{MODEL}-at-primary");
    primary.set_fault(Fault::ModelAccessDenied.always().for_model(&refused));
    let h = Harness::start(snapshot(1, pair_of_two_models(&primary, &fallback))).await;
    // Three refusals (the failure threshold) cool the model at the primary.
    for attempts in ["2", "2", "2", "1"] {
        let response = h.chat(chat_for(MODEL)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
        assert_eq!(header(&response, "x-sluice-attempts"), attempts);
    }
    let response = h.chat(chat_for("other")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "1");

    let alone = Harness::start(one_primary_snapshot(&primary.base_url())).await;
    let response = alone.chat(chat_body(false)).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"]["code"], "upstream_model_unavailable",
        "{body}"
    );
    assert!(!body.to_string().contains("proj_"), "{body}");

    // A 404 `model_not_found`: the backend does not know the model it was given.
    let unknown = MockServer::start_local(
        MockConfig::named("primary").with_models(["other-at-primary".to_owned()]),
    )
    .unwrap();
    let h = Harness::start(snapshot(1, pair_of_two_models(&unknown, &fallback))).await;
    let response = h.chat(chat_for(MODEL)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
}

#[tokio::test]
async fn client_errors_from_upstream_pass_through_without_failover() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::status(400).times(1));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 400);
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].is_string());
    assert_eq!(fallback.stats().requests.total(), 0);
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::UpstreamStatus as i32);
}

#[tokio::test]
async fn when_everything_cools_the_client_gets_429_with_the_soonest_retry_after() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::rate_limited(20).always());
    fallback.set_fault(
        Fault::Status {
            code: 429,
            retry_after: Some(RetryAfter::millis(7000)),
        }
        .always(),
    );
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;

    // Both tried: the last upstream 429 is passed on as it came.
    let first = h.chat(chat_body(false)).await;
    assert_eq!(first.status(), 429);
    assert_eq!(header(&first, "x-sluice-attempts"), "2");

    // Both cooling: Sluice answers itself, with the soonest availability.
    let second = h.chat(chat_body(false)).await;
    assert_eq!(second.status(), 429);
    assert_eq!(header(&second, "x-sluice-attempts"), "0");
    let retry_after: u64 = header(&second, "retry-after").parse().unwrap();
    assert!((6..=7).contains(&retry_after), "{retry_after}");
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(primary.stats().requests.chat_completions, 1);
    assert_eq!(fallback.stats().requests.chat_completions, 1);
    let records = h.records(2).await;
    assert_eq!(records[1].error_kind, ErrorKind::RateLimited as i32);
}

/// OpenAI answers 429 "Request too large … Limit 30000, Requested 61337" to a request whose
/// tokens alone pass the organization's tokens per minute: the request's fault, not an
/// overload. Counted as one, a client resending it kept every backend it was tried on
/// cooling down, fleet-wide, for every other client. It is passed on, and another backend
/// (another organization may have room) is tried, but no backend cools down.
#[tokio::test]
async fn a_429_for_a_request_too_large_cools_no_backend_down() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    for _ in 0..3 {
        primary.set_fault(Fault::RequestTooLarge.times(1));
        fallback.set_fault(Fault::RequestTooLarge.times(1));
        let refused = h.chat(chat_body(false)).await;
        assert_eq!(refused.status(), 429);
        assert_eq!(header(&refused, "x-sluice-attempts"), "2");
        let body: Value = refused.json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Request too large"),
            "{body}"
        );
        // What the client needs is kept; the provider's account is not its business.
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("Limit 30000, Requested 61337"), "{body}");
        assert!(!message.contains("org-Mk7vQ2xR9pLw4ZtB8nYc3HdF"), "{body}");
    }
    let served = h.chat(chat_body(false)).await;
    assert_eq!(served.status(), 200);
    assert_eq!(header(&served, "x-sluice-backend"), "primary-name");
    // The events ride the usage stream ahead of the records that followed them.
    h.records(4).await;
    h.cp.with(|r| assert!(r.events.is_empty(), "{:?}", r.events));
}

#[tokio::test]
async fn a_cooldown_from_the_snapshot_is_skipped_and_a_reset_clears_it() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let mut backends = pair(&primary, &fallback);
    backends[0].cooldown_until = Some(sluice_proxy::clock::timestamp(
        SystemTime::now() + Duration::from_secs(60),
    ));
    backends[0].consecutive_failures = 2;
    let h = Harness::start(snapshot(1, backends)).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");

    // Another replica's cooldown cleared by the admin: the next snapshot lacks it.
    h.publish(snapshot(2, pair(&primary, &fallback))).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
}

#[tokio::test]
async fn a_local_cooldown_survives_an_older_snapshot_and_yields_to_a_reset() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::rate_limited(60).times(1));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    h.chat(chat_body(false)).await;
    let event = h.first_cooldown_event().await;
    assert_eq!(event.cooldown_epoch, Some(0));
    // A 429 is its model's: the control plane's state of the model, in the snapshot.
    let model = format!("{MODEL}-at-primary");
    assert_eq!(event.model, model);
    let cooling = |epoch: u64, left: Option<Duration>| proto::ModelCooldown {
        model: model.clone(),
        cooldown_epoch: epoch,
        consecutive_failures: u32::from(left.is_some()),
        cooldown_remaining: left.map(proto_duration),
        ..Default::default()
    };

    // A snapshot built before the control plane saw the event (still epoch 0) does not
    // clear it.
    h.publish(snapshot(2, pair(&primary, &fallback))).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");

    // The control plane counts it (epoch 1), then an admin resets it (epoch 2).
    let mut backends = pair(&primary, &fallback);
    backends[0].model_cooldowns = vec![cooling(1, Some(Duration::from_secs(59)))];
    h.publish(snapshot(3, backends)).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    let mut backends = pair(&primary, &fallback);
    backends[0].model_cooldowns = vec![cooling(2, None)];
    h.publish(snapshot(4, backends)).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
}

#[tokio::test]
async fn replicas_with_skewed_clocks_cool_for_the_time_left_as_sent() {
    let primary = mock("primary");
    // The control plane's clock is right; it says 1 s is left of a cooldown.
    let cooling = || {
        let mut b = backend("primary", &primary.base_url(), proto::Pool::Primary, 0);
        b.cooldown_until = Some(sluice_proxy::clock::timestamp(
            SystemTime::now() + Duration::from_secs(1),
        ));
        b.cooldown_remaining = Some(proto_duration(Duration::from_secs(1)));
        b.cooldown_epoch = 1;
        b.consecutive_failures = 1;
        vec![b]
    };
    for offset in ["2s", "-2s"] {
        let h = Harness::start_with(snapshot(1, cooling()), |c| {
            c.wall_clock_offset = Some(offset.parse().unwrap());
        })
        .await;
        let response = h.chat(chat_body(false)).await;
        // Neither ignored (the primary would answer 200) nor lengthened (3 s).
        assert_eq!(response.status(), 429, "clock {offset}");
        assert_eq!(header(&response, "retry-after"), "1", "clock {offset}");
    }
    assert_eq!(primary.stats().requests.chat_completions, 0);
}

#[tokio::test]
async fn consecutive_failures_cool_a_backend_down() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::status(503).always());
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    // failure_threshold is 3 in the test settings.
    for _ in 0..3 {
        assert_eq!(h.chat(chat_body(false)).await.status(), 200);
    }
    h.cp.wait_for("failing event", |r| !r.events.is_empty())
        .await;
    let event = h.cp.with(|r| r.events[0].clone());
    assert_eq!(event.kind, BackendEventKind::Failing as i32);
    assert_eq!(event.reason, "3 consecutive failures");
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    assert_eq!(primary.stats().requests.chat_completions, 3);
}

/// A 503 that says when to come back (`Retry-After: 30`, as a backend restarting says it)
/// cools the backend that long once its failures count, as a 429 does; the backoff alone
/// gave it a second, then two, four…
#[tokio::test]
async fn failures_that_say_when_to_come_back_cool_the_backend_that_long() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(
        Fault::Status {
            code: 503,
            retry_after: Some(RetryAfter::seconds(30)),
        }
        .always(),
    );
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    // failure_threshold is 3 in the test settings.
    for _ in 0..3 {
        assert_eq!(h.chat(chat_body(false)).await.status(), 200);
    }
    h.cp.wait_for("failing event", |r| !r.events.is_empty())
        .await;
    let event = h.cp.with(|r| r.events[0].clone());
    assert_eq!(event.kind, BackendEventKind::Failing as i32);
    let until = system_time(event.cooldown_until.as_ref().unwrap()).unwrap();
    let left = until.duration_since(SystemTime::now()).unwrap();
    assert!(
        left > Duration::from_secs(25) && left <= Duration::from_secs(30),
        "{left:?}"
    );
    assert_eq!(
        event.retry_after,
        Some(proto_duration(Duration::from_secs(30)))
    );
    // Three seconds on (past a backoff of one), the backend is still left alone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    assert_eq!(primary.stats().requests.chat_completions, 3);
}

/// A request's failure says `x-should-retry: false` when any of its attempts may have been
/// billed (one timed out after it was sent), whatever the last attempt's failure: decided by
/// the last alone, a timeout then a 500 let the SDKs send it through every backend twice more.
/// A request no provider may have billed (only 500s) leaves the SDKs their retries.
#[tokio::test]
async fn the_retry_hint_follows_any_attempt_that_may_have_been_billed() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let mut snap = snapshot(1, pair(&primary, &fallback));
    let settings = snap.settings.as_mut().unwrap();
    settings.answer_timeout = Some(proto_duration(Duration::from_millis(300)));
    let h = Harness::start(snap).await;
    primary.set_fault(Fault::Stall.times(1));
    fallback.set_fault(Fault::status(500).times(1));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 500);
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    assert_eq!(header(&response, "x-should-retry"), "false");

    primary.set_fault(Fault::status(500).times(1));
    fallback.set_fault(Fault::status(500).times(1));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 500);
    assert!(response.headers().get("x-should-retry").is_none());

    // A fallback's 429 after the primary's timeout: the SDK's retry, after the 429's wait,
    // went to the primary first, which generated (and billed) the answer again.
    primary.set_fault(Fault::Stall.times(1));
    fallback.set_fault(Fault::rate_limited(5).times(1));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "x-should-retry"), "false");

    // A fallback's 409 after the primary's timeout, passed on as the answer: the SDKs send a
    // 409 again too, to the primary first (a new pair: this one's primary now cools down).
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let mut snap = snapshot(1, pair(&primary, &fallback));
    let settings = snap.settings.as_mut().unwrap();
    settings.answer_timeout = Some(proto_duration(Duration::from_millis(300)));
    let h = Harness::start(snap).await;
    primary.set_fault(Fault::Stall.times(1));
    fallback.set_fault(Fault::status(409).times(1));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 409);
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    assert_eq!(header(&response, "x-should-retry"), "false");
}

/// One chat request to a primary that answers `first` and a fallback that answers `then` (once
/// each); its answer, with the harness that served it (dropped, it stops serving).
async fn after_faults(first: Fault, then: Fault) -> (Harness, reqwest::Response) {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    primary.set_fault(first.times(1));
    fallback.set_fault(then.times(1));
    let response = h.chat(chat_body(false)).await;
    (h, response)
}

/// A passed-on 429 says to come back when its backend is free again, but no later than another
/// candidate is: the primary cooling for a second after its own 429, the fallback's "retry
/// after a day" (Azure's S0 tier) is not the client's wait (openai-python gave up at once on
/// it, anthropic's 2.x slept through it). A lone backend's wait is passed on as it came.
#[tokio::test]
async fn a_429s_wait_is_no_later_than_another_candidates() {
    let (_h, response) = after_faults(Fault::status(429), Fault::rate_limited(86_400)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    assert_eq!(header(&response, "retry-after"), "1");

    let lone = mock("lone");
    let h = Harness::one_primary(&lone.base_url()).await;
    lone.set_fault(Fault::rate_limited(600).times(1));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "retry-after"), "600");
}

/// A 429 that named no wait (vLLM's, TGI's, Ollama's; OpenAI's header is optional) is passed
/// on saying the one Sluice knows: when the backend's cooldown, which that 429 just started,
/// ends. Without it the SDKs came back within a second, to Sluice's own 429, a retry spent.
#[tokio::test]
async fn a_429_that_named_no_wait_says_when_its_backend_frees_up() {
    let (_h, response) = after_faults(Fault::status(429), Fault::status(429)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    // The test settings' cooldown_base: 1 s.
    assert_eq!(header(&response, "retry-after"), "1");

    // A streak lengthens the cooldown, and the wait with it.
    let lone = mock("lone");
    let h = Harness::one_primary(&lone.base_url()).await;
    lone.set_fault(Fault::status(429).always());
    let first = h.chat(chat_body(false)).await;
    assert_eq!(first.status(), 429);
    assert_eq!(header(&first, "retry-after"), "1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = h.chat(chat_body(false)).await;
    assert_eq!(second.status(), 429);
    assert_eq!(
        header(&second, "retry-after"),
        "2",
        "the second of a streak"
    );

    // A 500 says nothing of when its backend is free, and gets no wait.
    let (_h, response) = after_faults(Fault::status(500), Fault::status(500)).await;
    assert_eq!(response.status(), 500);
    assert!(response.headers().get("retry-after").is_none());
}

/// Only a candidate that said when it frees up (rate limited, cooling) shortens the wait: a
/// primary that failed otherwise (a 500, its account out of credit) is not free in a second,
/// and the fallback's own wait is the client's.
#[tokio::test]
async fn a_candidate_that_failed_otherwise_does_not_shorten_the_wait() {
    let out_of_credit = Fault::Body {
        code: 429,
        body: r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#.into(),
    };
    for failed in [Fault::status(500), out_of_credit] {
        let (_h, response) = after_faults(failed.clone(), Fault::rate_limited(3)).await;
        assert_eq!(response.status(), 429, "{failed:?}");
        assert_eq!(header(&response, "retry-after"), "3", "{failed:?}");
    }

    // Nor a primary passed over for the cooldown its failures began: it frees up to fail
    // again (failure_threshold is 3 in the test settings).
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    primary.set_fault(Fault::status(500).times(3));
    for _ in 0..3 {
        assert_eq!(h.chat(chat_body(false)).await.status(), 200);
    }
    fallback.set_fault(Fault::rate_limited(20).times(1));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    assert_eq!(header(&response, "retry-after"), "20");
}

/// What only the operator can fix, when it was the last backend's and another is only busy
/// (rate limited for a second): the client may come back when that one frees up, not never.
#[tokio::test]
async fn the_last_backends_refused_key_with_another_busy_says_when_to_come_back() {
    let (_h, response) = after_faults(Fault::status(429), Fault::status(401)).await;
    assert_eq!(response.status(), 502);
    assert!(response.headers().get("x-should-retry").is_none());
    assert_eq!(header(&response, "retry-after"), "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_auth_failed", "{body}");

    // Busy for longer than the SDKs wait: never, as when every backend refused.
    let (_h, response) = after_faults(Fault::rate_limited(600), Fault::status(401)).await;
    assert_eq!(response.status(), 502);
    assert_eq!(header(&response, "x-should-retry"), "false");
    assert!(response.headers().get("retry-after").is_none());
}

/// A 200 stream that ends before its first event was answered, and may have been billed:
/// the request keeps its reserve, and the SDKs are told not to send it again (each retry
/// kept another reserve of a budgeted key, for a server that answers every stream so).
#[tokio::test]
async fn a_stream_ended_before_its_first_event_is_not_to_be_sent_again() {
    use sluice_e2e::mock::GarbageKind;
    let primary = mock("primary");
    let h = Harness::one_primary(&primary.base_url()).await;
    primary.set_fault(Fault::Garbage(GarbageKind::EmptyStream).times(1));
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 502);
    assert_eq!(header(&response, "x-should-retry"), "false");
}

/// A provider key refused, an account without credit, a model the provider does not serve:
/// only the operator can fix them, and every retry of the SDKs went through every backend
/// again to the same answer. The SDKs are told not to send it again.
#[tokio::test]
async fn what_only_the_operator_can_fix_is_not_to_be_sent_again() {
    let primary = mock("primary");
    let h = Harness::one_primary(&primary.base_url()).await;
    // OpenAI's account out of credit: a 429 `insufficient_quota`, which clients read as
    // their own key's budget spent (Sluice's own answer, in the same words).
    let quota = Fault::Body {
        code: 429,
        body: r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#.into(),
    };
    for (fault, code) in [
        (Fault::status(401), "upstream_auth_failed"),
        (Fault::status(402), "upstream_account_unfunded"),
        (quota, "upstream_account_unfunded"),
    ] {
        primary.set_fault(fault.times(1));
        let response = h.chat(chat_body(false)).await;
        assert_eq!(response.status(), 502);
        assert_eq!(header(&response, "x-should-retry"), "false");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
    }
}

/// The official SDKs announce how long they wait for an answer (`x-stainless-read-timeout`,
/// seconds) and, timed out, send the request again, twice. A request whose attempts stall is
/// answered within that wait, with 504 and `x-should-retry: false`, which the SDK reads and
/// does not retry: at the request's own deadline (past the client's wait here; by default
/// equal to it, 600 s, with the client's clock started first) the answer came after the
/// client had given up, and each retry ran every attempt again, billed.
#[tokio::test]
async fn a_request_is_answered_within_the_wait_its_client_announces() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::Stall.always());
    fallback.set_fault(Fault::Stall.always());
    let mut snap = snapshot(1, pair(&primary, &fallback));
    let settings = snap.settings.as_mut().unwrap();
    // Past the client's wait: as an operator sets it for slow reasoning models (at the
    // defaults both are 600 s, and the client's clock starts first).
    settings.request_timeout = Some(proto_duration(Duration::from_secs(6)));
    settings.answer_timeout = Some(proto_duration(Duration::from_millis(1_500)));
    let h = Harness::start(snap).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let response = client
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-stainless-read-timeout", "3.0")
        .json(&chat_body(false))
        .send()
        .await
        .expect("answered before the client's own timeout");
    assert_eq!(response.status(), 504);
    assert_eq!(header(&response, "x-should-retry"), "false");
    assert_eq!(header(&response, "x-sluice-attempts"), "2");

    // A wait past any clock (added to the request's start, it overflowed and the request's
    // task panicked): the request's own deadline holds.
    primary.clear_faults();
    fallback.clear_faults();
    let response = client
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("x-stainless-read-timeout", "1e19")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// An attempt made after slow failures gets only what is left of the request's deadline; cut
/// off by that deadline, it is not its backend's failure: a healthy backend that would have
/// answered in a second is not cooled down for having been given half of one (three such
/// requests made the fallback "failing" at the third).
#[tokio::test]
async fn an_attempt_cut_by_the_requests_deadline_is_not_its_backends_failure() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::Stall.always());
    fallback.set_fault(Fault::DelayMs(1_000).always());
    let mut snap = snapshot(1, pair(&primary, &fallback));
    let settings = snap.settings.as_mut().unwrap();
    settings.request_timeout = Some(proto_duration(Duration::from_millis(1_500)));
    settings.answer_timeout = Some(proto_duration(Duration::from_millis(1_000)));
    let h = Harness::start(snap).await;
    // failure_threshold is 3 in the test settings.
    for _ in 0..3 {
        let response = h.chat(chat_body(false)).await;
        assert_eq!(response.status(), 504);
        // Each attempt was sent and may be generating, and billed: the SDKs, which send a
        // 5xx again twice, are told not to (three more rounds of billed attempts).
        assert_eq!(header(&response, "x-should-retry"), "false");
    }
    // The primary, silent for its whole answer timeout, is failing; the fallback is not. A
    // report carries the events queued before its records, so once the third request's
    // record has come, so has any event its attempts made.
    h.records(3).await;
    let events = h.cp.with(|r| r.events.clone());
    assert!(
        events.iter().any(|e| e.backend_id == "primary"),
        "{events:?}"
    );
    assert!(
        events.iter().all(|e| e.backend_id != "fallback"),
        "{events:?}"
    );
    assert_eq!(fallback.stats().requests.chat_completions, 3);
}

#[tokio::test]
async fn a_cut_stream_ends_with_an_error_event() {
    let primary = mock("primary");
    primary.set_fault(Fault::CutAfterChunks(3).times(1));
    let h = Harness::one_primary(&primary.base_url()).await;
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 4, "{body}");
    let last: Value = serde_json::from_str(events[3].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted");
    assert!(!body.contains("[DONE]"));
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::StreamInterrupted as i32);
    assert_eq!(record.status_code, 200);
    // The usage chunk never came: charged what was streamed, and marked so.
    assert!(record.tokens_estimated);
    assert!(record.prompt_tokens > 0);
    assert!(
        record.completion_tokens >= content_deltas(&body),
        "{record:?}"
    );
    // The attempt and the request were counted a success at the first event; the break is
    // counted on its own, for the backend (nothing else showed a backend breaking streams).
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("sluice_streams_interrupted_total{backend=\"primary-name\"} 1\n"),
        "{metrics}"
    );
    // A whole stream counts none.
    let whole = h.chat(chat_body(true)).await.text().await.unwrap();
    assert!(whole.ends_with("data: [DONE]\n\n"), "{whole}");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("sluice_streams_interrupted_total{backend=\"primary-name\"} 1\n"),
        "{metrics}"
    );
}

/// The chat chunks in a streamed body whose delta carries text.
fn content_deltas(body: &str) -> u64 {
    body.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|text| !text.is_empty())
        })
        .count() as u64
}

#[tokio::test]
async fn a_stream_cut_short_by_its_client_is_charged_what_was_streamed() {
    let primary = slow_mock("primary", 200, 20);
    let mut backends = vec![backend(
        "primary",
        &primary.base_url(),
        proto::Pool::Primary,
        0,
    )];
    // $1 per million prompt tokens, $2 per million completion tokens.
    backends[0].models[0].input_price_per_mtok = 1.0;
    backends[0].models[0].output_price_per_mtok = 2.0;
    let h = Harness::start(snapshot(1, backends)).await;
    let body = chat_body(true);
    let estimate = serde_json::to_vec(&body).unwrap().len().div_ceil(4) as u64;

    let response = h.chat(body).await;
    let mut stream = response.bytes_stream();
    let mut received = String::new();
    while content_deltas(&received) < 10 {
        received.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    }
    drop(stream);
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::ClientCancelled as i32);
    assert!(record.tokens_estimated);
    assert_eq!(record.prompt_tokens, estimate);
    let relayed = content_deltas(&received);
    assert!(
        record.completion_tokens >= relayed,
        "{} completion tokens for {relayed} deltas relayed",
        record.completion_tokens
    );
    // Less than the whole answer: the cancel came well before its 200 chunks.
    assert!(record.completion_tokens < 200, "{record:?}");
    assert_eq!(
        record.cost_nanos,
        record.prompt_tokens * 1_000 + record.completion_tokens * 2_000
    );
}

#[tokio::test]
async fn a_stream_that_goes_silent_ends_with_an_error_event_at_the_idle_timeout() {
    // The first event comes at once, the next 3 s later; the idle timeout is 300 ms.
    let primary = slow_mock("primary", 3, 3000);
    let h = Harness::start(one_primary_with_idle_timeout(&primary, 300)).await;
    let started = std::time::Instant::now();
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "the stream ended after {:?}",
        started.elapsed()
    );
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 2, "{body}");
    let last: Value = serde_json::from_str(events[1].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("went silent"),
        "{last}"
    );
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::StreamInterrupted as i32);
    assert_eq!(record.status_code, 200);
}

#[tokio::test]
async fn a_stream_that_keeps_speaking_outlives_its_idle_timeout() {
    // Events 120 ms apart for about 1.5 s, under an idle timeout of 300 ms: the timeout counts
    // silence since the last event, not time since the stream began.
    let primary = slow_mock("primary", 10, 120);
    let h = Harness::start(one_primary_with_idle_timeout(&primary, 300)).await;
    let started = std::time::Instant::now();
    let body = h.chat(chat_body(true)).await.text().await.unwrap();
    assert!(
        started.elapsed() > Duration::from_millis(900),
        "the stream took {:?}",
        started.elapsed()
    );
    assert!(!body.contains("stream_interrupted"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::Unspecified as i32);
    assert_eq!(record.completion_tokens, 10);
}

#[tokio::test]
async fn upstream_garbage_never_hangs_or_crashes_the_proxy() {
    use sluice_e2e::mock::GarbageKind;
    let primary = mock("primary");
    let h = Harness::one_primary(&primary.base_url()).await;
    primary.set_fault(Fault::Garbage(GarbageKind::GiantLine).times(1));
    let body = h.chat(chat_body(true)).await.text().await.unwrap();
    assert!(
        body.contains("stream_interrupted"),
        "{}",
        &body[..body.len().min(300)]
    );
    assert!(body.len() < 4096);
    // Cut at a chat stream's event bound (4 MiB), not read to its 8 MiB: a stream holds no
    // more than that while it reads one event.
    assert!(body.contains("longer than 4194304 bytes"), "{body}");

    primary.set_fault(Fault::Garbage(GarbageKind::InvalidSse).times(1));
    let body = h.chat(chat_body(true)).await.text().await.unwrap();
    assert!(body.trim_end().ends_with("}"), "{body}");
    assert!(body.contains("stream_interrupted"));

    primary.set_fault(Fault::Garbage(GarbageKind::NotJson).times(1));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 200);

    assert_eq!(h.chat(chat_body(true)).await.status(), 200);
}

#[tokio::test]
async fn a_client_that_leaves_cancels_the_upstream_and_is_recorded() {
    let primary = slow_mock("primary", 200, 50);
    let h = Harness::one_primary(&primary.base_url()).await;
    let response = h.chat(chat_body(true)).await;
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(body);

    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::ClientCancelled as i32);
    assert_eq!(record.status_code, 200);
    // The upstream request was dropped too, long before its 10 s of chunks.
    wait_for_an_aborted_stream(&primary).await;
    assert_eq!(primary.stats().streams_completed, 0);
}

/// A client that closes its connection while it uploads its body left, as one that leaves
/// at any later moment: 499 `client_cancelled`, not 400 `invalid_request_body`, which told
/// dashboards its bodies were broken.
#[tokio::test]
async fn a_client_that_leaves_while_uploading_is_recorded_as_leaving() {
    use tokio::io::AsyncWriteExt as _;
    let primary = mock("primary");
    let h = Harness::one_primary(&primary.base_url()).await;
    let body = chat_body(false).to_string();
    let mut connection = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: sluice\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len() + 100
    );
    connection.write_all(head.as_bytes()).await.unwrap();
    connection.write_all(body.as_bytes()).await.unwrap();
    connection.flush().await.unwrap();
    drop(connection);
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::ClientCancelled as i32);
    assert_eq!(record.status_code, 499);
    assert_eq!((record.attempts, record.prompt_tokens), (0, 0));
    assert_eq!(primary.stats().requests.total(), 0);
}

#[tokio::test]
async fn a_client_that_leaves_before_the_answer_is_recorded() {
    let primary =
        MockServer::start_local(MockConfig::named("primary").with_latency(Duration::from_secs(5)))
            .unwrap();
    let h = Harness::one_primary(&primary.base_url()).await;
    let request = h.chat(chat_body(false));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), request)
            .await
            .is_err()
    );
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::ClientCancelled as i32);
    assert_eq!(record.status_code, 499);
    // The provider had the prompt: its estimate is charged.
    assert!(record.tokens_estimated);
    assert!(record.prompt_tokens > 0);
    assert_eq!(record.completion_tokens, 0);
}

#[tokio::test]
async fn a_snapshot_swap_does_not_disturb_running_requests() {
    let old = slow_mock("old", 20, 25);
    let new = mock("new");
    let h = Harness::start(snapshot(
        1,
        vec![backend("old", &old.base_url(), proto::Pool::Primary, 0)],
    ))
    .await;
    let running = h.chat(chat_body(true)).await;
    assert_eq!(header(&running, "x-sluice-backend"), "old-name");
    let mut stream = running.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();

    h.publish(snapshot(
        2,
        vec![backend("new", &new.base_url(), proto::Pool::Primary, 0)],
    ))
    .await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "new-name");

    let mut rest = first.to_vec();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(rest).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(old.stats().streams_completed, 1);
    h.cp.wait_for("ack of v2", |r| r.acked(2)).await;
}

#[tokio::test]
async fn client_key_limits_answer_429_with_retry_after() {
    let primary = mock("primary");
    let mut snap = one_primary_snapshot(&primary.base_url());
    // 60 rpm on one replica: a burst of 6, then one per second.
    snap.client_keys[0].rpm_limit = 60;
    let h = Harness::start(snap).await;
    for _ in 0..6 {
        assert_eq!(h.chat(chat_body(false)).await.status(), 200);
    }
    let limited = h.chat(chat_body(false)).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(header(&limited, "retry-after"), "1");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(primary.stats().requests.chat_completions, 6);
}

/// A key's checks run in order (budget, `max_parallel_requests`, tokens per minute, requests
/// per minute), and a request refused by a later one gives back what the earlier ones took:
/// refused for its requests per minute again and again, it keeps its key's place in flight
/// and its tokens (had they been kept, the tenth refusal would be for tokens or for the place,
/// and the key short of both once its minute is over).
#[tokio::test]
async fn a_request_refused_by_a_later_key_check_gives_back_what_the_earlier_took() {
    let primary = mock("primary");
    let mut snap = one_primary_snapshot(&primary.base_url());
    // 10 requests a minute (a burst of 1), 600 tokens (a burst of 60), one at a time.
    snap.client_keys[0].rpm_limit = 10;
    snap.client_keys[0].tpm_limit = 600;
    snap.client_keys[0].max_parallel_requests = 1;
    let h = Harness::start(snap).await;
    // About 30 tokens of prompt estimate a request: two kept would pass the burst of 60.
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "x".repeat(80)}],
    });
    assert_eq!(h.chat(body.clone()).await.status(), 200);
    for attempt in 0..10 {
        let refused = h.chat(body.clone()).await;
        assert_eq!(refused.status(), 429, "attempt {attempt}");
        let answer: Value = refused.json().await.unwrap();
        assert_eq!(
            answer["error"]["type"], "requests",
            "attempt {attempt}: {answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("Rate limit reached for this API key. "),
            "attempt {attempt}: {answer}"
        );
    }
}

#[tokio::test]
async fn a_key_over_its_tokens_per_minute_gets_429_tokens_with_retry_after() {
    // 51 tokens a request (1 prompt word, 50 completion tokens).
    let primary =
        MockServer::start_local(MockConfig::named("primary").with_chunk_count(50)).unwrap();
    let mut snap = one_primary_snapshot(&primary.base_url());
    // 600 TPM on one replica: 10 a second, a burst of 60.
    snap.client_keys[0].tpm_limit = 600;
    let h = Harness::start(snap).await;
    // The first takes 51 of 60; the second is admitted on the 9 left and leaves a debt of
    // 42 (4.2 s at 10 a second); the third waits it out.
    for _ in 0..2 {
        assert_eq!(h.chat(chat_body(false)).await.status(), 200);
    }
    let limited = h.chat(chat_body(false)).await;
    assert_eq!(limited.status(), 429);
    let wait: u64 = header(&limited, "retry-after").parse().unwrap();
    assert!((4..=5).contains(&wait), "Retry-After: {wait}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["type"], "tokens");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens per min (TPM): Limit 600"),
        "{body}"
    );
    let served = primary.stats();
    assert_eq!(served.requests.chat_completions, 2);
    assert_eq!(served.prompt_tokens + served.completion_tokens, 102);
    let records = h.records(3).await;
    assert_eq!(records[2].error_kind, ErrorKind::RateLimited as i32);
    assert_eq!(records[2].status_code, 429);
}

/// An answer that tells no usage (here one Sluice cannot read; a server that omits `usage`
/// alike) may have been counted by the provider: the request's estimate stays charged to the
/// key's tokens per minute, as a budget keeps its reserve. Handed back, a key whose backend
/// never reported usage had no token limit at all.
#[tokio::test]
async fn an_answer_without_usage_keeps_its_estimate_charged_to_the_tokens_per_minute() {
    use sluice_e2e::mock::GarbageKind;
    let primary = mock("primary");
    let mut snap = one_primary_snapshot(&primary.base_url());
    // 600 TPM on one replica: a burst of 60.
    snap.client_keys[0].tpm_limit = 600;
    let h = Harness::start(snap).await;
    // A prompt estimated at far more than the burst: admitted on the burst, into debt.
    let long = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "word ".repeat(400)}],
    });
    primary.set_fault(Fault::Garbage(GarbageKind::NotJson).times(1));
    let first = h.chat(long.clone()).await;
    assert_eq!(first.status(), 200);
    let next = h.chat(long).await;
    assert_eq!(next.status(), 429);
    let body: Value = next.json().await.unwrap();
    assert_eq!(body["error"]["type"], "tokens");
}

/// A chat stream from a server that ignores `stream_options.include_usage` ends with
/// `[DONE]` and no usage: it is charged its prompt estimate and a token per content delta, as
/// a stream cut one event earlier would be, not its prompt alone.
#[tokio::test]
async fn a_stream_that_ends_without_usage_is_charged_what_was_streamed() {
    let chunk = |content: &str| {
        format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}]}}\n\n"
        )
    };
    let events: String = ["a", "b", "c", "d", "e"].map(chunk).concat() + "data: [DONE]\n\n";
    let h = Harness::one_primary(&sse_upstream(events).await).await;
    let text = h.chat(chat_body(true)).await.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let record = h.records(1).await.remove(0);
    assert!(record.tokens_estimated, "{record:?}");
    assert_eq!(record.completion_tokens, 5);
    assert_eq!(
        record.prompt_tokens,
        (chat_body(true).to_string().len() as u64).div_ceil(4)
    );
}

/// A screenshot sent inline counts what a provider bills for an image (about a thousand
/// tokens), not its bytes: counted as text, its 3 MiB of base64 (786,432 tokens) emptied its
/// backend's tokens per minute for every other request while it ran, and its client leaving
/// had it charged (and billed to the key) as 786,432 prompt tokens.
#[tokio::test]
async fn an_image_in_flight_leaves_its_backend_tokens_for_other_requests() {
    let primary = slow_mock("primary", 10, 100);
    let mut snap = one_primary_snapshot(&primary.base_url());
    // 600,000 TPM on one replica: a burst of 60,000.
    snap.backends[0].tpm_limit = 600_000;
    let h = Harness::start(snap).await;
    let image = format!("data:image/png;base64,iVBORw0KGgo{}", "A".repeat(3 << 20));
    let body = serde_json::json!({"model": MODEL, "stream": true, "messages": [{"role": "user",
        "content": [{"type": "text", "text": "what is in this picture?"},
                    {"type": "image_url", "image_url": {"url": image}}]}]});
    let streaming = h.chat(body).await;
    assert_eq!(streaming.status(), 200);
    let other = h.chat(chat_body(false)).await;
    assert_eq!(
        other.status(),
        200,
        "while the image streams: {}",
        other.text().await.unwrap()
    );
    // Its client leaves: it is charged what is known, the image at an image's tokens.
    drop(streaming);
    let records = h.records(2).await;
    let left = records.iter().find(|r| r.stream).unwrap();
    assert!(left.tokens_estimated, "{left:?}");
    assert!(left.prompt_tokens < 2_000, "{}", left.prompt_tokens);
}

#[tokio::test]
async fn a_key_at_its_max_parallel_requests_gets_429_until_one_ends() {
    let primary = slow_mock("primary", 10, 100);
    let mut snap = one_primary_snapshot(&primary.base_url());
    snap.client_keys[0].max_parallel_requests = 1;
    let h = Harness::start(snap).await;
    let streaming = h.chat(chat_body(true)).await;
    assert_eq!(streaming.status(), 200);
    let refused = h.chat(chat_body(false)).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "retry-after"), "1");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 1 at once"),
        "{body}"
    );
    // The stream's end frees its place.
    let text = streaming.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(h.chat(chat_body(false)).await.status(), 200);
    assert_eq!(primary.stats().requests.chat_completions, 2);
}

/// A key over its limits (its budget spent, its requests per minute used up, its places in
/// flight all taken) is refused before its body is read: its 429 while it uploads, the
/// memory for bodies not held by it. Read first, its uploads filled that memory, every other
/// key's bodies refused meanwhile, and a body past it got 503 `server_busy`, not its 429.
#[tokio::test]
async fn a_key_over_its_limits_is_refused_before_its_body_is_read() {
    let primary = slow_mock("primary", 10, 100);
    let mut snap = one_primary_snapshot(&primary.base_url());
    let mut spent = client_key("spent", "sk-sluice-spent", &[], 0);
    spent.budget_spent = true;
    spent.max_budget = 5.0;
    let mut rated = client_key("rated", "sk-sluice-rated", &[], 0);
    rated.rpm_limit = 1;
    let mut parallel = client_key("parallel", "sk-sluice-parallel", &[], 0);
    parallel.max_parallel_requests = 1;
    snap.client_keys.extend([spent, rated, parallel]);
    let h = Harness::start_with(snap, |c| c.max_buffered_body_bytes = 1 << 20).await;
    assert_eq!(
        h.post("/v1/chat/completions", "sk-sluice-rated", &chat_body(false))
            .await
            .status(),
        200
    );
    let streaming = h
        .post(
            "/v1/chat/completions",
            "sk-sluice-parallel",
            &chat_body(true),
        )
        .await;
    assert_eq!(streaming.status(), 200);
    for (key, kind) in [
        ("sk-sluice-spent", "insufficient_quota"),
        ("sk-sluice-rated", "requests"),
        ("sk-sluice-parallel", "requests"),
    ] {
        // Larger than the memory for bodies, and than the sockets' buffers take meanwhile.
        let refused = h
            .http
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(key)
            .body(vec![b' '; 12 << 20])
            .send()
            .await
            .expect("the 429, not a reset connection");
        assert_eq!(refused.status(), 429, "{key}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["type"], kind, "{key}: {body}");
    }
    drop(streaming);
}

#[tokio::test]
async fn a_backend_out_of_tokens_is_skipped_like_one_out_of_requests() {
    let primary =
        MockServer::start_local(MockConfig::named("primary").with_chunk_count(50)).unwrap();
    let fallback = mock("fallback");
    let mut backends = pair(&primary, &fallback);
    // 1,200 TPM over 2 replicas: 600 each, a burst of 60: one request of 51, then one more
    // on the 9 left.
    backends[0].tpm_limit = 1_200;
    let mut snap = snapshot(1, backends.clone());
    snap.replica_count = 2;
    let h = Harness::start(snap).await;
    for _ in 0..2 {
        let r = h.chat(chat_body(false)).await;
        assert_eq!(header(&r, "x-sluice-backend"), "primary-name");
    }
    let r = h.chat(chat_body(false)).await;
    assert_eq!(header(&r, "x-sluice-backend"), "fallback-name");
    assert_eq!(primary.stats().requests.chat_completions, 2);

    // Without a fallback it is the client's 429, with the wait for the debt of 42 tokens.
    let mut only = snapshot(2, vec![backends.remove(0)]);
    only.replica_count = 2;
    h.publish(only).await;
    let r = h.chat(chat_body(false)).await;
    assert_eq!(r.status(), 429);
    let wait: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((4..=5).contains(&wait), "Retry-After: {wait}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
}

/// An attempt that fails before any answer gives its backend's tokens back when the provider
/// counted none (a 5xx), and keeps them charged when it timed out (it may have been
/// generating): after a 5xx the backend still has room for two requests of its own, after a
/// timeout the tokens the failed attempt kept leave it room for one.
#[tokio::test]
async fn a_failed_attempt_gives_its_backends_tokens_back_unless_it_timed_out() {
    // About 45 tokens of prompt estimate.
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "x".repeat(170)}],
    });
    for (fault, kept) in [(Fault::status(500), false), (Fault::DelayMs(1_500), true)] {
        let (primary, fallback) = (mock("primary"), mock("fallback"));
        let mut backends = pair(&primary, &fallback);
        // 1,200 TPM over 2 replicas: 600 a minute here, a burst of 60.
        backends[0].tpm_limit = 1_200;
        let mut snap = snapshot(1, backends);
        snap.replica_count = 2;
        snap.settings = with_timeouts(200, 300, 20_000);
        let h = Harness::start(snap).await;
        primary.set_fault(fault.clone().times(1));
        let failed = h.chat(body.clone()).await;
        assert_eq!(
            header(&failed, "x-sluice-backend"),
            "fallback-name",
            "{fault:?}"
        );
        let mut at_primary = 0;
        for _ in 0..2 {
            let r = h.chat(body.clone()).await;
            if header(&r, "x-sluice-backend") == "primary-name" {
                at_primary += 1;
            }
        }
        let expected = if kept { 1 } else { 2 };
        assert_eq!(at_primary, expected, "{fault:?}");
    }
}

#[tokio::test]
async fn backend_limits_move_traffic_to_the_next_backend_and_then_answer_429() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let mut backends = pair(&primary, &fallback);
    // 120 rpm over 2 replicas: 60 each, a burst of 6.
    backends[0].rpm_limit = 120;
    let mut snap = snapshot(1, backends.clone());
    snap.replica_count = 2;
    let h = Harness::start(snap).await;
    for _ in 0..6 {
        let r = h.chat(chat_body(false)).await;
        assert_eq!(header(&r, "x-sluice-backend"), "primary-name");
    }
    let r = h.chat(chat_body(false)).await;
    assert_eq!(header(&r, "x-sluice-backend"), "fallback-name");
    assert_eq!(primary.stats().requests.chat_completions, 6);

    // Without a fallback the limit is the client's 429; the bucket kept its state over the swap.
    let mut only = snapshot(2, vec![backends.remove(0)]);
    only.replica_count = 2;
    h.publish(only).await;
    let r = h.chat(chat_body(false)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), "1");
}

/// Asks for a stream, starts the data plane's stop once its first chunk came, and reads the
/// rest: the whole body's text (a body cut short fails the test).
async fn stream_across_the_stop(h: &mut Harness) -> String {
    let response = h.chat(chat_body(true)).await;
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    h.begin_shutdown();
    let mut text = first.to_vec();
    while let Some(chunk) = stream.next().await {
        text.extend_from_slice(&chunk.expect("the body ends whole, not cut"));
    }
    String::from_utf8(text).unwrap()
}

#[tokio::test]
async fn shutdown_drains_streams_and_flushes_usage() {
    let primary = slow_mock("primary", 10, 50);
    let mut h = Harness::one_primary(&primary.base_url()).await;
    let text = stream_across_the_stop(&mut h).await;
    assert!(text.ends_with("data: [DONE]\n\n"));
    let cp_records = {
        let cp = &h.cp;
        cp.wait_for("the stream's record", |r| r.records().len() == 1)
            .await;
        cp.with(|r| r.records()[0].error_kind)
    };
    assert_eq!(cp_records, ErrorKind::Unspecified as i32);
    let usage = h.usage.clone();
    h.join().await.unwrap();
    assert_eq!(usage.pending(), 0);
}

/// A stream still running when the drain timeout is about to run out ends with an error
/// event its client reads, and is recorded as interrupted: not cut mid-chunk (a transport
/// error an SDK cannot tell from a network fault) and filed as the client's cancel.
#[tokio::test]
async fn a_stream_outlasting_the_drain_ends_with_an_error_event() {
    let primary = slow_mock("primary", 40, 250);
    let mut h = Harness::start_with(one_primary_snapshot(&primary.base_url()), |config| {
        config.drain_timeout = Duration::from_secs(2);
    })
    .await;
    let text = stream_across_the_stop(&mut h).await;
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let error: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "stream_interrupted", "{last}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{last}"
    );
    assert!(!text.contains("[DONE]"));
    h.cp.wait_for("the stream's record", |r| r.records().len() == 1)
        .await;
    let kind = h.cp.with(|r| r.records()[0].error_kind);
    assert_eq!(kind, ErrorKind::StreamInterrupted as i32);
    h.join().await.unwrap();
}

/// A whole request still waiting on its provider when the drain runs out is cut (its client's
/// connection closed) and recorded as the stop's doing, `DATA_PLANE_STOPPED` with no status:
/// it was recorded as its client leaving (499 `client_cancelled`), which the statistics count
/// against the backend as one that hung, at every redeploy with slow requests in flight.
#[tokio::test]
async fn a_whole_request_outlasting_the_drain_is_recorded_as_cut_by_the_stop() {
    let primary = mock("primary");
    primary.set_fault(Fault::DelayMs(10_000).times(1));
    let mut h = Harness::start_with(one_primary_snapshot(&primary.base_url()), |config| {
        config.drain_timeout = Duration::from_secs(2);
    })
    .await;
    let request = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat_body(false))
        .send();
    let request = tokio::spawn(request);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while primary.stats().requests.chat_completions == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.begin_shutdown();
    assert!(
        request.await.unwrap().is_err(),
        "the connection is closed without an answer"
    );
    h.cp.wait_for("the request's record", |r| r.records().len() == 1)
        .await;
    let record = h.cp.with(|r| r.records()[0].clone());
    assert_eq!(
        record.error_kind,
        ErrorKind::DataPlaneStopped as i32,
        "{record:?}"
    );
    assert_eq!(record.status_code, 0);
    // Charged what is known, as a request cut short is: never a record of no tokens.
    assert!(
        record.tokens_estimated && record.prompt_tokens > 0,
        "{record:?}"
    );
    h.join().await.unwrap();
}

/// On SIGTERM a replica first serves as a lame duck for `--drain-delay`: not ready, so that
/// load balancers stop sending, and every HTTP/1 answer closes its connection, so that
/// clients retire their kept-alive connections themselves; then it drains.
#[tokio::test]
async fn a_stopping_replica_serves_as_a_lame_duck_first() {
    let primary = mock("primary");
    let delay = Duration::from_secs(2);
    let mut h = Harness::start_with(one_primary_snapshot(&primary.base_url()), |config| {
        config.drain_delay = delay;
    })
    .await;
    let before = h.chat(chat_body(false)).await;
    assert_eq!(before.status(), 200);
    assert!(before.headers().get("connection").is_none());
    assert_eq!(
        h.http.get(h.url("/readyz")).send().await.unwrap().status(),
        200
    );
    let stopping = tokio::time::Instant::now();
    h.begin_shutdown();
    let deadline = stopping + delay;
    loop {
        let ready = h.http.get(h.url("/readyz")).send().await.unwrap();
        if ready.status() == 503 {
            assert_eq!(ready.text().await.unwrap(), "not ready: shutting down\n");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still ready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        h.http.get(h.url("/healthz")).send().await.unwrap().status(),
        200
    );
    let during = h.chat(chat_body(false)).await;
    assert_eq!(during.status(), 200);
    assert_eq!(during.headers()["connection"], "close");
    h.join().await.unwrap();
    assert!(stopping.elapsed() >= delay, "drained before the delay");
}

#[tokio::test]
async fn usage_queued_while_the_control_plane_drops_the_stream_arrives_once() {
    let primary = mock("primary");
    let h = Harness::one_primary(&primary.base_url()).await;
    h.cp.set_ack_usage(false);
    for _ in 0..20 {
        assert_eq!(h.chat(chat_body(false)).await.status(), 200);
    }
    h.cp.wait_for("unacked records received", |r| {
        r.received_sequences.len() >= 20
    })
    .await;
    h.cp.set_ack_usage(true);
    h.cp.kill_streams();
    let records = h.records(20).await;
    let sequences: Vec<u64> = records.iter().map(|r| r.sequence).collect();
    assert_eq!(sequences, (1..=20).collect::<Vec<_>>());
    // The ack follows the stored records.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while h.usage.pending() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never acked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The proxy kept serving on its snapshot meanwhile.
    assert_eq!(h.chat(chat_body(false)).await.status(), 200);
}

/// A provider keeping a streamed request in its queue answers its head at once, then only
/// comments (DeepSeek's `: keep-alive`, for up to ten minutes; OpenRouter's `: OPENROUTER
/// PROCESSING`): no event, no token. A stream is committed to a backend at its first event,
/// not its first byte, so past the wait for its first event (`answer_timeout`, as a whole
/// answer's) the next backend is asked, as for one that sends nothing; and a 200 stream that
/// ends before any event is a failure the next backend answers. Comments before a first event
/// that comes in time go to the client with it.
#[tokio::test]
async fn a_stream_of_only_comments_or_nothing_fails_over_at_its_answer_timeout() {
    use sluice_e2e::mock::GarbageKind;
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let mut message = snapshot(1, pair(&primary, &fallback));
    message.settings = with_timeouts(200, 300, 20_000);
    let h = Harness::start(message).await;
    for fault in [
        Fault::QueuedMs(3_000),
        Fault::Garbage(GarbageKind::EmptyStream),
    ] {
        primary.set_fault(fault.clone().times(1));
        let response = h.chat(chat_body(true)).await;
        assert_eq!(response.status(), 200, "{fault:?}");
        assert_eq!(
            header(&response, "x-sluice-backend"),
            "fallback-name",
            "{fault:?}"
        );
        assert_eq!(header(&response, "x-sluice-attempts"), "2", "{fault:?}");
        let body = response.text().await.unwrap();
        assert!(body.ends_with("data: [DONE]\n\n"), "{fault:?}: {body}");
        assert!(!body.contains("keep-alive"), "{body}");
    }
    primary.set_fault(Fault::QueuedMs(100).times(1));
    let response = h.chat(chat_body(true)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    let body = response.text().await.unwrap();
    // The provider's comments in a row, as one run of comment lines.
    assert!(body.starts_with(": keep-alive\n"), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");

    let records = h.records(3).await;
    let served: Vec<(&str, u32)> = records
        .iter()
        .map(|r| (r.backend_id.as_str(), r.attempts))
        .collect();
    assert_eq!(served, [("fallback", 2), ("fallback", 2), ("primary", 1)]);
}

/// A reasoning model answers a streamed chat request's head at once, and its first chunk only
/// with the answer's first token, once it has thought: minutes, at a high effort. The first
/// event is waited for as long as a whole answer (`answer_timeout`), not the head's
/// `first_byte_timeout`: cut off there, every attempt failed over, each one billed for the
/// thinking it had done, and no backend ever answered. A head that does not come is still
/// given up at `first_byte_timeout`, and a model thinking past `answer_timeout` too.
#[tokio::test]
async fn a_stream_whose_model_thinks_before_its_first_event_is_waited_for() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let mut message = snapshot(1, pair(&primary, &fallback));
    message.settings = with_timeouts(200, 2_000, 20_000);
    let h = Harness::start(message).await;

    primary.set_fault(Fault::ThinkingMs(800).times(1));
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    let body = response.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");

    for fault in [Fault::DelayMs(800), Fault::ThinkingMs(3_000)] {
        primary.set_fault(fault.clone().times(1));
        let response = h.chat(chat_body(true)).await;
        assert_eq!(response.status(), 200, "{fault:?}");
        assert_eq!(
            header(&response, "x-sluice-backend"),
            "fallback-name",
            "{fault:?}"
        );
        assert_eq!(header(&response, "x-sluice-attempts"), "2", "{fault:?}");
    }
    let records = h.records(3).await;
    let served: Vec<(&str, u32)> = records
        .iter()
        .map(|r| (r.backend_id.as_str(), r.attempts))
        .collect();
    assert_eq!(served, [("primary", 1), ("fallback", 2), ("fallback", 2)]);
}

/// An answer is given up at `answer_timeout` only for another backend to be asked. The last
/// candidate (the only backend of its model here) waits for it to the request's deadline: a
/// model thinking past `answer_timeout` was cut off, billed, and never answered, with nothing
/// gained. A head that does not come is given up at `first_byte_timeout` all the same.
#[tokio::test]
async fn the_last_candidate_is_waited_for_past_answer_timeout() {
    let primary = mock("primary");
    let mut message = one_primary_snapshot(&primary.base_url());
    message.settings = with_timeouts(200, 400, 5_000);
    let h = Harness::start(message).await;

    for (fault, stream) in [
        (Fault::ThinkingMs(1_200), true),
        (Fault::DelayMs(1_200), false),
    ] {
        primary.set_fault(fault.clone().times(1));
        let response = h.chat(chat_body(stream)).await;
        assert_eq!(response.status(), 200, "{fault:?}");
        assert_eq!(header(&response, "x-sluice-attempts"), "1", "{fault:?}");
        let body = response.text().await.unwrap();
        assert!(body.contains("primary"), "{fault:?}: {body}");
    }
    // A stream's head is still due within `first_byte_timeout`.
    primary.set_fault(Fault::DelayMs(1_200).times(1));
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 504);

    // A later route that could not be tried (cooling down) leaves this one the last.
    let fallback = mock("fallback");
    let mut backends = pair(&primary, &fallback);
    backends[1].cooldown_remaining = Some(proto_duration(Duration::from_secs(60)));
    let mut message = snapshot(2, backends);
    message.settings = with_timeouts(200, 400, 5_000);
    h.publish(message).await;
    primary.set_fault(Fault::ThinkingMs(1_200).times(1));
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    assert_eq!(fallback.stats().requests.total(), 0);

    // So does one the request cannot be written for: an Anthropic fallback, for a chat
    // request asking for two choices.
    let claude = mock("claude");
    let mut backends = pair(&primary, &claude);
    backends[1].api_format = proto::ApiFormat::Anthropic as i32;
    let mut message = snapshot(3, backends);
    message.settings = with_timeouts(200, 400, 5_000);
    h.publish(message).await;
    primary.set_fault(Fault::ThinkingMs(1_200).times(1));
    let mut body = chat_body(true);
    body["n"] = 2.into();
    let response = h.chat(body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    assert_eq!(claude.stats().requests.total(), 0);

    // And one at its request limit: a fallback allowed a request a minute, which it served.
    let limited = mock("limited");
    let mut backends = pair(&primary, &limited);
    backends[1].rpm_limit = 1;
    let mut message = snapshot(4, backends);
    message.settings = with_timeouts(200, 400, 5_000);
    h.publish(message).await;
    primary.set_fault(Fault::status(500).times(1));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    primary.set_fault(Fault::ThinkingMs(1_200).times(1));
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    assert_eq!(limited.stats().requests.total(), 1);
}

/// The test settings with these first-byte, answer and request timeouts, in milliseconds.
fn with_timeouts(first_byte: u64, answer: u64, request: u64) -> Option<proto::Settings> {
    let mut settings = settings();
    settings.first_byte_timeout = Some(proto_duration(Duration::from_millis(first_byte)));
    settings.answer_timeout = Some(proto_duration(Duration::from_millis(answer)));
    settings.request_timeout = Some(proto_duration(Duration::from_millis(request)));
    Some(settings)
}

/// A stream runs to the end the settings it arrived under give it, on its connection too: a
/// `stream_timeout` lowered while its head was awaited does not cut its connection before
/// its relay's end, without the stream's end or an error event (the connection read the
/// setting again when the head went out: findings-39-stream-timeout L-5).
#[tokio::test]
async fn a_stream_keeps_the_run_it_arrived_under_when_the_setting_changes() {
    let settings = |stream_ms: u64, request_ms: u64| {
        let mut settings = with_timeouts(5_000, 5_000, request_ms);
        settings.as_mut().unwrap().stream_timeout =
            Some(proto_duration(Duration::from_millis(stream_ms)));
        settings
    };
    // Twelve words 250 ms apart, after a head held 1.5 s (the new settings reach the replica
    // well before it): 4.5 s.
    let primary = slow_mock("primary", 12, 250);
    primary.set_fault(Fault::DelayMs(1_500).times(1));
    let mut message = one_primary_snapshot(&primary.base_url());
    message.settings = settings(30_000, 10_000);
    let h = Harness::start(message).await;
    let url = h.url("/v1/chat/completions");
    let http = h.http.clone();
    let stream = tokio::spawn(async move {
        let response = http
            .post(url)
            .bearer_auth(KEY)
            .json(&chat_body(true))
            .send()
            .await
            .unwrap();
        response.text().await
    });
    // While its head is awaited, the runs are lowered to a second.
    for _ in 0..500 {
        if primary.stats().faults_applied > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut lowered = one_primary_snapshot(&primary.base_url());
    lowered.version = 2;
    lowered.settings = settings(1_000, 1_000);
    h.publish(lowered).await;
    let body = stream
        .await
        .unwrap()
        .expect("the stream is read to its end");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let record = h.records(1).await.remove(0);
    assert_eq!(
        (record.completion_tokens, record.error_kind),
        (12, ErrorKind::Unspecified as i32)
    );
}

/// The last candidate waited for past `answer_timeout` and still silent at the request's
/// deadline was given its wait and more: its model's failure (the deadline cuts short only an
/// attempt it leaves less than its wait), so a model hung at its only backend cools down and
/// the next requests are told at once to come back later, rather than each held to the
/// deadline.
#[tokio::test]
async fn the_last_candidate_silent_to_the_deadline_cools_its_model() {
    let primary = mock("primary");
    primary.set_fault(Fault::Stall.always());
    let mut message = one_primary_snapshot(&primary.base_url());
    message.settings = with_timeouts(200, 300, 800);
    message.settings.as_mut().unwrap().failure_threshold = 1;
    let h = Harness::start(message).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 504);
    let event = h.first_cooldown_event().await;
    assert_eq!(event.model, format!("{MODEL}-at-primary"));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(primary.stats().requests.total(), 1);
}

/// An upstream that answers every request with a whole answer's head and the first bytes of
/// its body, then nothing more for a minute.
async fn upstream_trickling_its_answer() -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0; 8192];
                let _ = tcp.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":";
                let _ = tcp.write_all(head.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    format!("http://{addr}/v1")
}

/// A whole answer whose body the request's deadline cuts off was cut by the request, not by
/// its backend (as a stream's is): it ends the request with 504 and counts nothing against the
/// backend, which serves the next request as before (it counted as the backend's failure, and
/// at `failure_threshold` 1 the next request found every backend cooling: 429).
#[tokio::test]
async fn a_whole_answer_cut_by_the_requests_deadline_is_not_its_backends_failure() {
    let mut message = one_primary_snapshot(&upstream_trickling_its_answer().await);
    let settings = message.settings.as_mut().unwrap();
    settings.failure_threshold = 1;
    settings.request_timeout = Some(proto_duration(Duration::from_millis(500)));
    let h = Harness::start(message).await;
    for _ in 0..2 {
        let response = h.chat(chat_body(false)).await;
        assert_eq!(response.status(), 504);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "upstream_timeout", "{body}");
    }
}

/// A stream whose first event does not come in time was taken by its backend: the slowness
/// is its model's (a reasoning model thinking, a model's queue), and cools that model alone
/// at the backend, as a 429 does; the backend's other models are still served there. (A whole
/// answer's head is waited for alike, and a stream's silence after its first event counts so
/// too: `a_backend_whose_streams_break_after_their_first_event_cools_down`.) A stream's head
/// that does not come is the backend's.
#[tokio::test]
async fn a_model_too_slow_to_answer_cools_that_model_alone_at_its_backend() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let slow = format!("{MODEL}-at-primary");
    primary.set_fault(Fault::ThinkingMs(3_000).always().for_model(&slow));
    let mut message = snapshot(1, pair_of_two_models(&primary, &fallback));
    message.settings = with_timeouts(200, 400, 20_000);
    message.settings.as_mut().unwrap().failure_threshold = 1;
    let h = Harness::start(message).await;

    let response = h.chat(stream_for(MODEL)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    // The model cools at the primary: not asked there again.
    let response = h.chat(stream_for(MODEL)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    // The primary's other model is served there, as before.
    for _ in 0..3 {
        let response = h.chat(stream_for("other")).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    }
    let event = h.first_cooldown_event().await;
    assert_eq!(
        (event.backend_id.as_str(), event.model.as_str()),
        ("primary", slow.as_str())
    );

    // A stream whose head does not come is the backend's: a provider sends it once it has
    // taken the request, whatever the model.
    primary.set_fault(Fault::DelayMs(3_000).always().for_model("other-at-primary"));
    let response = h.chat(stream_for("other")).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    h.cp.wait_for("the backend's own cooldown", |r| {
        r.events
            .iter()
            .any(|e| e.backend_id == "primary" && e.model.is_empty())
    })
    .await;
}

/// A stream its provider ends with its own error event after its first (OpenRouter's error
/// chunk, Anthropic's `overloaded_error`) is that model's failure at the backend, which
/// answered with it: a gateway serving many models (OpenRouter) is not taken out for them
/// all by one provider's failures. The model cools there; the backend's other models are
/// still served by it.
#[tokio::test]
async fn a_streams_own_error_event_cools_its_model_alone() {
    let chunk = |rest: &str| {
        format!(
            r#"data: {{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",{rest}}}"#
        )
    };
    let openrouters = chunk(
        r#""provider":"x","error":{"code":"server_error","message":"Provider disconnected"},"choices":[{"index":0,"delta":{"content":""},"finish_reason":"error"}]"#,
    );
    // OpenAI's: the error alone, and the body closed after it, with no `[DONE]`.
    let openais = r#"data: {"error":{"message":"Provider disconnected","type":"server_error","param":null,"code":null}}"#;
    for (error, done) in [
        (openrouters.as_str(), true),
        (openrouters.as_str(), false),
        (openais, false),
    ] {
        let (primary, fallback) = (mock("primary"), mock("fallback"));
        let failing = format!("{MODEL}-at-primary");
        let mut events = vec![
            chunk(r#""choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]"#),
            error.to_owned(),
        ];
        if done {
            events.push("data: [DONE]".to_owned());
        }
        let body = events.into_iter().map(|event| event + "\n\n").collect();
        primary.set_fault(Fault::Body { code: 200, body }.always().for_model(&failing));
        let mut message = snapshot(1, pair_of_two_models(&primary, &fallback));
        message.settings.as_mut().unwrap().failure_threshold = 1;
        let h = Harness::start(message).await;
        let response = h.chat(stream_for(MODEL)).await;
        assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
        let text = response.text().await.unwrap();
        // The provider's error, once: no second one of Sluice's saying the stream was cut.
        assert!(text.contains("Provider disconnected"), "{text}");
        assert!(!text.contains("interrupted"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        let event = h.first_cooldown_event().await;
        assert_eq!(
            (event.backend_id.as_str(), event.model.as_str()),
            ("primary", failing.as_str()),
            "{error} (done: {done})"
        );
        // The model is asked of the fallback; the primary's other model is served there still.
        let response = h.chat(stream_for(MODEL)).await;
        assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
        for _ in 0..3 {
            let response = h.chat(stream_for("other")).await;
            assert_eq!(response.status(), 200);
            assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
        }
    }
}

/// OpenAI's own failure as a chat stream's first event (`server_error`) fails over, as
/// Anthropic's `api_error` does: nothing has reached the client yet.
#[tokio::test]
async fn a_first_chunk_server_error_fails_over() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let body = "data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n";
    primary.set_fault(
        Fault::Body {
            code: 200,
            body: body.into(),
        }
        .times(1),
    );
    let h = Harness::start(snapshot(1, pair(&primary, &fallback))).await;
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    let text = response.text().await.unwrap();
    assert!(!text.contains("server_error"), "{text}");
}

/// A backend on a streak (after a 429) ends it when a stream sent to it answers, at its first
/// event: counted only at the stream's end, tens of seconds later, every fast failure
/// meanwhile (a 500, an overload) counted on the streak and doubled the cooldown, and a
/// backend serving streams hardly ever left its streak. A single 500 after that is one
/// failure under the threshold, not a cooldown.
#[tokio::test]
async fn a_stream_answering_ends_its_backends_streak_at_its_first_event() {
    let primary = slow_mock("primary", 20, 100);
    let fallback = mock("fallback");
    // The primary on a streak whose cooldown is over (a 500 now would count at once).
    let mut backends = pair(&primary, &fallback);
    backends[0].cooldown_epoch = 1;
    backends[0].consecutive_failures = 1;
    let h = Harness::start(snapshot(1, backends)).await;
    // A stream goes to the primary: about 2 s long. Its head comes with its first event,
    // recorded before.
    let stream = h.chat(chat_body(true)).await;
    assert_eq!(header(&stream, "x-sluice-backend"), "primary-name");
    let reading = tokio::spawn(stream.text());
    primary.set_fault(Fault::status(500).times(1));
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    let response = h.chat(chat_body(false)).await;
    assert_eq!(
        header(&response, "x-sluice-backend"),
        "primary-name",
        "one 500 after the streak ended is no cooldown"
    );
    assert!(
        reading
            .await
            .unwrap()
            .unwrap()
            .ends_with("data: [DONE]\n\n")
    );
    let events = h.cp.with(|r| r.events.clone());
    assert!(
        events.iter().all(|e| e.consecutive_failures <= 1),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == BackendEventKind::Recovered as i32),
        "{events:?}"
    );
}

/// A backend whose streams break after their first event (here: silent past the idle
/// timeout, which counts on its model's streak) cools down as one that fails before it does:
/// each such stream is its failure,
/// recorded when the stream breaks. Counted a success at its first event, each such stream
/// ended the backend's failure streak, so it never cooled and kept its share of streams.
/// A stream that ends normally, or that its client leaves, is an answer.
#[tokio::test]
async fn a_backend_whose_streams_break_after_their_first_event_cools_down() {
    let primary = slow_mock("primary", 5, 1_000);
    let fallback = mock("fallback");
    let mut message = snapshot(1, pair_of_two_models(&primary, &fallback));
    let settings = message.settings.as_mut().unwrap();
    settings.idle_stream_timeout = Some(proto_duration(Duration::from_millis(200)));
    settings.failure_threshold = 2;
    let h = Harness::start(message).await;
    // A stream the primary takes and breaks after its first event.
    let broken = async || {
        let response = h.chat(chat_body(true)).await;
        assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
        let body = response.text().await.unwrap();
        assert!(body.contains("stream_interrupted"), "{body}");
    };
    broken().await;
    broken().await;
    let response = h.chat(chat_body(true)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert!(response.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    h.cp.wait_for("failing event", |r| !r.events.is_empty())
        .await;
    let event = h.cp.with(|r| r.events[0].clone());
    assert_eq!(event.kind, BackendEventKind::Failing as i32);
    assert_eq!(event.reason, "2 consecutive failures");
    // Silence is its model's: the backend's other model is still served there.
    assert_eq!(event.model, format!("{MODEL}-at-primary"));
    let response = h.chat(chat_for("other")).await;
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");

    // Its cooldown over, the next stream's first event ends the streak; its break after that
    // is a failure of the backend as it is now (judged at the state before, it was dropped,
    // and a third broken stream was needed): two more cool it down again.
    until_not_cooling(&h, "primary").await;
    broken().await;
    broken().await;
    let response = h.chat(chat_body(true)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
}

/// A stream its upstream cuts after its first event (its connection closed mid-stream) is
/// the backend's failure, not its model's (as silence is): two such cuts cool the whole
/// backend, its other model's requests go to the fallback too.
#[tokio::test]
async fn a_stream_cut_after_its_first_event_counts_against_its_backend() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    primary.set_fault(Fault::CutAfterChunks(1).always());
    let mut message = snapshot(1, pair_of_two_models(&primary, &fallback));
    message.settings.as_mut().unwrap().failure_threshold = 2;
    let h = Harness::start(message).await;
    for _ in 0..2 {
        let response = h.chat(chat_body(true)).await;
        assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
        let body = response.text().await.unwrap();
        assert!(body.contains("stream_interrupted"), "{body}");
    }
    let event = h.first_cooldown_event().await;
    assert_eq!(event.kind, BackendEventKind::Failing as i32);
    assert_eq!(
        (event.backend_id.as_str(), event.model.as_str()),
        ("primary", "")
    );
    let response = h.chat(chat_for("other")).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
}

/// Waits until this replica no longer skips `backend` for a cooldown, its own or that of
/// [`MODEL`] at it.
async fn until_not_cooling(h: &Harness, backend: &str) {
    let cooldowns = h.store.cooldowns();
    let model = format!("{MODEL}-at-{backend}");
    while let Err(until) = cooldowns.check(backend, &model, tokio::time::Instant::now()) {
        tokio::time::sleep_until(until).await;
    }
}

/// The content of a chat stream's chunks, in order, and how many keep-alive comments came
/// before its first event and after it.
fn stream_parts(body: &str) -> (String, usize, usize) {
    let (mut content, mut before, mut after) = (String::new(), 0, 0);
    let mut begun = false;
    for event in body.split("\n\n").filter(|e| !e.is_empty()) {
        if event == ": keep-alive" {
            if begun {
                after += 1
            } else {
                before += 1
            }
            continue;
        }
        begun = true;
        let data = event
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("{event:?}"));
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            content.push_str(text);
        }
    }
    (content, before, after)
}

/// A model that thinks before its first event, behind a front that cuts an answer silent for
/// a minute (AWS's load balancers, ingress-nginx): once the client has heard nothing for
/// `--stream-keepalive`, the stream is committed to (its head sent, with a comment) and kept
/// alive until the model speaks, from the backend it was sent to, however long past
/// `answer_timeout` it thinks; what the client was sent before its first event is comments
/// alone, and its first token is timed from that event.
#[tokio::test]
async fn a_stream_is_kept_alive_while_its_model_thinks() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let mut message = snapshot(1, pair(&primary, &fallback));
    // A model silent past `answer_timeout` (300 ms) would have been failed over.
    message.settings = with_timeouts(200, 300, 20_000);
    let h = Harness::start_with(message, |c| {
        c.stream_keepalive = Duration::from_millis(100);
    })
    .await;
    let whole = h.chat(chat_body(true)).await.text().await.unwrap();
    let (answer, _, _) = stream_parts(&whole);
    assert!(!answer.is_empty(), "{whole}");

    primary.set_fault(Fault::ThinkingMs(1_500).times(1));
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "1");
    assert_eq!(header(&response, "content-type"), "text/event-stream");
    let mut chunks = response.bytes_stream();
    let first = chunks.next().await.unwrap().unwrap();
    assert_eq!(
        &first[..],
        b": keep-alive\n\n",
        "the head came with a comment"
    );
    let mut body = first.to_vec();
    while let Some(chunk) = chunks.next().await {
        body.extend_from_slice(&chunk.unwrap());
    }
    let body = String::from_utf8(body).unwrap();
    let (content, before, _) = stream_parts(&body);
    assert_eq!(content, answer, "{body}");
    assert!(
        before >= 3,
        "{before} keep-alives in 1.5 s at 100 ms: {body}"
    );
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert_eq!(fallback.stats().requests.total(), 0);
    // Counted, once (the first stream's event came at once).
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("sluice_streams_committed_early_total{backend=\"primary-name\"} 1\n"),
        "{metrics}"
    );

    let records = h.records(2).await;
    let thinking = &records[1];
    assert_eq!(thinking.error_kind, ErrorKind::Unspecified as i32);
    assert_eq!(thinking.completion_tokens, records[0].completion_tokens);
    let first_token = thinking.time_to_first_token.as_ref().unwrap();
    let first_token = Duration::new(first_token.seconds as u64, first_token.nanos as u32);
    assert!(
        first_token >= Duration::from_millis(1_400),
        "timed from the first event, not the comments: {first_token:?}"
    );
}

/// Between events too: a model silent mid-stream keeps its client hearing a comment every
/// `--stream-keepalive`, but the comments are not the upstream speaking: a stream silent past
/// `idle_stream_timeout` still ends with its error event then.
#[tokio::test]
async fn keep_alives_fill_a_silence_but_never_hide_a_stalled_upstream() {
    // Three events 600 ms apart, under an idle timeout of 2 s.
    let primary = slow_mock("primary", 3, 600);
    let h = Harness::start_with(one_primary_with_idle_timeout(&primary, 2_000), |c| {
        c.stream_keepalive = Duration::from_millis(100);
    })
    .await;
    let body = h.chat(chat_body(true)).await.text().await.unwrap();
    let (_, _, after) = stream_parts(&body);
    assert!(
        after >= 4,
        "{after} keep-alives in two 600 ms silences: {body}"
    );
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::Unspecified as i32);
    assert_eq!(record.completion_tokens, 3);

    // The next event 3 s later, under an idle timeout of 500 ms.
    let primary = slow_mock("primary", 3, 3_000);
    let h = Harness::start_with(one_primary_with_idle_timeout(&primary, 500), |c| {
        c.stream_keepalive = Duration::from_millis(100);
    })
    .await;
    let started = std::time::Instant::now();
    let body = h.chat(chat_body(true)).await.text().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "the stream ended after {:?}: {body}",
        started.elapsed()
    );
    let (_, _, after) = stream_parts(body.rsplit_once("\n\ndata: {\"error\"").unwrap().0);
    assert!(after >= 2, "{body}");
    assert!(body.contains("went silent"), "{body}");
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::StreamInterrupted as i32);
}

/// `--stream-keepalive 0`: no comment, and a stream is committed only at its first event, so
/// that a model silent past `answer_timeout` is still failed over.
#[tokio::test]
async fn without_keep_alives_a_silent_model_is_failed_over() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let mut message = snapshot(1, pair(&primary, &fallback));
    message.settings = with_timeouts(200, 300, 20_000);
    let h = Harness::start_with(message, |c| c.stream_keepalive = Duration::ZERO).await;
    primary.set_fault(Fault::ThinkingMs(1_500).times(1));
    let response = h.chat(chat_body(true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "2");
    let body = response.text().await.unwrap();
    assert!(!body.contains("keep-alive"), "{body}");
    assert!(body.starts_with("data: {"), "{body}");
}

/// Once committed before its first event, a stream has no other backend to fail over to: its
/// first event is waited for to the request's deadline, as the last candidate's is, not cut
/// at `idle_stream_timeout` of silence, and a provider's own comments (its queue's
/// keep-alives) do not extend that wait. No event by the deadline is its model's failure.
#[tokio::test]
async fn a_committed_stream_waits_for_its_first_event_to_the_deadline() {
    let (primary, fallback) = (mock("primary"), mock("fallback"));
    let mut message = snapshot(1, pair(&primary, &fallback));
    message.settings = with_timeouts(200, 300, 2_500);
    let settings = message.settings.as_mut().unwrap();
    settings.idle_stream_timeout = Some(proto_duration(Duration::from_millis(400)));
    settings.failure_threshold = 1;
    let h = Harness::start_with(message, |c| {
        c.stream_keepalive = Duration::from_millis(100);
    })
    .await;

    // Thinking past both `answer_timeout` and `idle_stream_timeout`, answered.
    primary.set_fault(Fault::ThinkingMs(1_200).times(1));
    let response = h.chat(chat_body(true)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    let body = response.text().await.unwrap();
    let (content, before, _) = stream_parts(&body);
    assert!(!content.is_empty() && before >= 3, "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");

    // Queued, its provider sending comments, past the deadline (2.5 s).
    primary.set_fault(Fault::QueuedMs(5_000).times(1));
    let started = std::time::Instant::now();
    let response = h.chat(chat_body(true)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    let body = response.text().await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2_400) && took < Duration::from_millis(4_500),
        "ended after {took:?}: {body}"
    );
    assert!(body.contains("no first event came"), "{body}");
    assert!(!body.contains("data: {\"id\""), "no event: {body}");
    let records = h.records(2).await;
    assert_eq!(records[1].error_kind, ErrorKind::StreamInterrupted as i32);
    // Its model's failure at the backend: it cools, and the next request goes to the
    // fallback.
    let event = h.first_cooldown_event().await;
    assert_eq!(event.backend_id, "primary");
    assert_eq!(event.model, format!("{MODEL}-at-primary"));
    let response = h.chat(chat_body(true)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
}

/// A stream committed before its first event whose client leaves says nothing of its backend
/// while that event is not yet overdue: a backend on a streak is still on it (recorded as
/// answering, every client that gave up on a backend sending its head and then nothing ended
/// its streak, and it never cooled down). Left after the wait an attempt gives a first event
/// (`answer_timeout`), it is its model's failure, as at an attempt.
#[tokio::test]
async fn a_committed_stream_left_before_its_first_event_ends_no_streak() {
    let leave_after = |response: reqwest::Response, ms: u64| async move {
        let mut response = response;
        let read = async { while let Ok(Some(_)) = response.chunk().await {} };
        assert!(
            tokio::time::timeout(Duration::from_millis(ms), read)
                .await
                .is_err(),
            "the stream ended before its client left"
        );
    };
    for (answer_ms, overdue) in [(3_000, false), (300, true)] {
        let (primary, fallback) = (mock("primary"), mock("fallback"));
        let mut backends = pair(&primary, &fallback);
        // On a streak, its cooldown over: a 500 now is a failure at once.
        backends[0].cooldown_epoch = 1;
        backends[0].consecutive_failures = 1;
        let mut message = snapshot(1, backends);
        message.settings = with_timeouts(200, answer_ms, 20_000);
        message.settings.as_mut().unwrap().failure_threshold = 1;
        let h = Harness::start_with(message, |c| {
            c.stream_keepalive = Duration::from_millis(100);
        })
        .await;
        primary.set_fault(Fault::ThinkingMs(5_000).times(1));
        let response = h.chat(chat_body(true)).await;
        assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
        leave_after(response, 600).await;
        if overdue {
            let event = h.first_cooldown_event().await;
            assert_eq!(event.backend_id, "primary");
            assert_eq!(event.model, format!("{MODEL}-at-primary"));
            continue;
        }
        primary.set_fault(Fault::status(500).times(1));
        a_failure_goes_on_its_streak(&h).await;
    }
}

/// A request failed over from the primary, whose failure (its answer a 500) is the second of
/// its streak: what had come before did not end the streak.
async fn a_failure_goes_on_its_streak(h: &Harness) {
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    h.cp.wait_for("a cooldown", |r| !r.events.is_empty()).await;
    let streaks: Vec<u32> =
        h.cp.with(|r| r.events.iter().map(|e| e.consecutive_failures).collect());
    assert_eq!(streaks, [2], "the streak goes on");
}

/// An error as a committed stream's first event (an overload come after the stream was
/// committed, passed on) is no answer: its backend's streak goes on, as it does for an error
/// that is an uncommitted stream's first event.
#[tokio::test]
async fn an_error_as_a_committed_streams_first_event_ends_no_streak() {
    // Its first stream: its head, then an overload as its first event (TGI's); every later
    // call a 500.
    let upstream = timed_stream_upstream(|call| call == 0, Duration::from_millis(600), || {
        Ok(bytes::Bytes::from_static(
            b"data: {\"error\":{\"message\":\"Model is overloaded\",\"http_status_code\":422}}\n\ndata: [DONE]\n\n",
        ))
    })
    .await;
    let fallback = mock("fallback");
    let mut primary = backend("primary", &upstream, proto::Pool::Primary, 0);
    // On a streak, its cooldown over: a 500 now is a failure at once.
    primary.cooldown_epoch = 1;
    primary.consecutive_failures = 1;
    let mut message = snapshot(
        1,
        vec![
            primary,
            backend("fallback", &fallback.base_url(), proto::Pool::Fallback, 0),
        ],
    );
    message.settings.as_mut().unwrap().failure_threshold = 1;
    let h = Harness::start_with(message, |c| {
        c.stream_keepalive = Duration::from_millis(100);
    })
    .await;
    let response = h.chat(chat_body(true)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    let body = response.text().await.unwrap();
    assert!(body.starts_with(": keep-alive"), "committed early: {body}");
    assert!(body.contains("Model is overloaded"), "{body}");
    a_failure_goes_on_its_streak(&h).await;
}

/// An OpenAI-format upstream streaming a reasoning model's chunks: its role, then `reasoning`
/// chunks `gap` apart (`count` of them), then its answer and usage.
async fn reasoning_upstream(count: usize, gap: Duration) -> String {
    let app = axum::Router::new().fallback(move || async move {
        let chunk = |delta: Value| {
            let chunk = serde_json::json!({
                "id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 0,
                "model": MODEL, "choices": [{"index": 0, "delta": delta, "finish_reason": null}],
            });
            bytes::Bytes::from(format!("data: {chunk}\n\n"))
        };
        let mut chunks = vec![(
            Duration::ZERO,
            chunk(serde_json::json!({"role": "assistant"})),
        )];
        for _ in 0..count {
            chunks.push((gap, chunk(serde_json::json!({"reasoning_content": "hmm"}))));
        }
        chunks.push((
            Duration::ZERO,
            chunk(serde_json::json!({"content": "Hello"})),
        ));
        let end = serde_json::json!({
            "id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
        });
        chunks.push((
            Duration::ZERO,
            bytes::Bytes::from(format!("data: {end}\n\ndata: [DONE]\n\n")),
        ));
        let body = futures::stream::iter(chunks).then(|(wait, bytes)| async move {
            tokio::time::sleep(wait).await;
            Ok::<_, std::convert::Infallible>(bytes)
        });
        (
            [(http::header::CONTENT_TYPE, "text/event-stream")],
            axum::body::Body::from_stream(body),
        )
    });
    format!("http://{}/v1", serve_locally(app).await)
}

/// The keep-alives follow what the client hears, not what the upstream says: a reasoning
/// model's chunks have no place in a Messages client's stream (no `thinking` block is made of
/// them), so while the upstream speaks every 100 ms its client hears nothing, and is sent a
/// comment every `--stream-keepalive`.
#[tokio::test]
async fn keep_alives_follow_what_the_client_hears() {
    let upstream = reasoning_upstream(15, Duration::from_millis(100)).await;
    let h = Harness::start_with(one_primary_snapshot(&upstream), |c| {
        c.stream_keepalive = Duration::from_millis(300);
    })
    .await;
    let body = serde_json::json!({
        "model": MODEL, "max_tokens": 64, "stream": true,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let response = h.post("/v1/messages", KEY, &body).await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    let thinking = body
        .split_once("event: content_block_start")
        .map_or(body.as_str(), |(before, _)| before);
    let comments = thinking.matches(": keep-alive\n\n").count();
    assert!(comments >= 2, "{comments} in 1.5 s of reasoning: {body}");
    assert!(body.contains("\"text\":\"Hello\""), "{body}");
    assert!(body.contains("event: message_stop"), "{body}");
}

/// An upstream that answers the calls `streams` picks (by their number, from 0) with a
/// stream's head, then, `wait` later, what `then` gives (a chunk, or the connection broken),
/// and every other call 500.
async fn timed_stream_upstream(
    streams: fn(usize) -> bool,
    wait: Duration,
    then: fn() -> Result<bytes::Bytes, std::io::Error>,
) -> String {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().fallback(move || {
        let calls = std::sync::Arc::clone(&calls);
        async move {
            use axum::response::IntoResponse as _;
            if !streams(calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst)) {
                return (http::StatusCode::INTERNAL_SERVER_ERROR, "{}").into_response();
            }
            let body = futures::stream::once(async move {
                tokio::time::sleep(wait).await;
                then()
            });
            (
                [(http::header::CONTENT_TYPE, "text/event-stream")],
                axum::body::Body::from_stream(body),
            )
                .into_response()
        }
    });
    format!("http://{}/v1", serve_locally(app).await)
}

/// An upstream that answers its first request 500, and every later one with a stream's head,
/// then, `silence` later and before any event, breaks the connection.
async fn failing_then_breaking_upstream(silence: Duration) -> String {
    timed_stream_upstream(
        |call| call > 0,
        silence,
        || Err(std::io::Error::other("broken")),
    )
    .await
}

/// A stream committed before its first event has not answered yet: its backend's streak is
/// ended by that event, not by the commitment. A backend cooled once, its cooldown over, that
/// commits a stream and breaks it before any event has failed again on its streak: it cools
/// for twice as long (had the commitment ended the streak, the break would start a new one at
/// the base cooldown, and a backend failing so would never cool for longer).
#[tokio::test]
async fn a_committed_stream_ends_no_streak_before_its_first_event() {
    let upstream = failing_then_breaking_upstream(Duration::from_millis(600)).await;
    let fallback = mock("fallback");
    let mut message = snapshot(
        1,
        vec![
            backend("primary", &upstream, proto::Pool::Primary, 0),
            backend("fallback", &fallback.base_url(), proto::Pool::Fallback, 0),
        ],
    );
    let settings = message.settings.as_mut().unwrap();
    settings.failure_threshold = 1;
    settings.cooldown_base = Some(proto_duration(Duration::from_millis(500)));
    let h = Harness::start_with(message, |c| {
        c.stream_keepalive = Duration::from_millis(100);
    })
    .await;
    // A 500: the backend cools (its streak's first cooldown), the request failed over.
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    // Waits for the cooldown the event announces to end.
    let cooled = h.first_cooldown_event().await;
    let until = system_time(cooled.cooldown_until.as_ref().unwrap()).unwrap();
    let left = until.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(200)).await;
    // Its cooldown over: a stream committed, then broken before its first event.
    let response = h.chat(chat_body(true)).await;
    assert_eq!(header(&response, "x-sluice-backend"), "primary-name");
    let body = response.text().await.unwrap();
    assert!(body.starts_with(": keep-alive"), "{body}");
    assert!(body.contains("stream_interrupted"), "{body}");
    h.cp.wait_for("the second cooldown", |r| r.events.len() >= 2)
        .await;
    let streaks: Vec<u32> =
        h.cp.with(|r| r.events.iter().map(|e| e.consecutive_failures).collect());
    assert_eq!(streaks, [1, 2], "the streak goes on");
}

/// A stream that has begun runs to `stream_timeout` from its request's arrival, not to
/// `request_timeout`, which bounds its beginning: a long answer streamed for longer than the
/// request's deadline is relayed whole (it was cut there, however healthy: 64,000 tokens at
/// 50 a second stream for 21 minutes, past the 10 of the default `request_timeout`). One still
/// running at `stream_timeout` ends with an error event, its backend not blamed.
#[tokio::test]
async fn a_stream_runs_to_its_stream_timeout_past_the_requests_deadline() {
    let settings = |stream_ms: u64| {
        let mut settings = with_timeouts(200, 300, 800);
        settings.as_mut().unwrap().stream_timeout =
            Some(proto_duration(Duration::from_millis(stream_ms)));
        settings
    };
    // Eight words 250 ms apart: 2 s, past the 800 ms deadline, within a 5 s run.
    let primary = slow_mock("primary", 8, 250);
    let mut message = one_primary_snapshot(&primary.base_url());
    message.settings = settings(5_000);
    let h = Harness::start(message).await;
    let body = h.chat(chat_body(true)).await.text().await.unwrap();
    assert!(!body.contains("stream_interrupted"), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert_eq!(h.records(1).await[0].completion_tokens, 8);

    // Twenty words 250 ms apart: 5 s, past a 1.5 s run.
    let primary = slow_mock("primary", 20, 250);
    let mut message = one_primary_snapshot(&primary.base_url());
    message.settings = settings(1_500);
    let h = Harness::start(message).await;
    let started = std::time::Instant::now();
    let body = h.chat(chat_body(true)).await.text().await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1_400) && took < Duration::from_millis(4_000),
        "ended after {took:?}: {body}"
    );
    assert!(body.contains("stream_timeout"), "{body}");
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::StreamInterrupted as i32);
    // Not the backend's failure: nothing cools.
    assert!(h.cp.with(|r| r.events.is_empty()));
}
