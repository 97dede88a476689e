//! End to end: tokens per minute per client key and per backend, and a key's
//! `max_parallel_requests`, held across three replicas behind nginx (deploy/local/run.sh);
//! the official OpenAI Python SDK's class for a TPM refusal; and a stream whose client leaves
//! midway, charged what was streamed, with the real binaries.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Cluster, Gateway, LocalRun, Mock, eventually, mask};
use futures::StreamExt;
use serde_json::Value;
use sluice_proto::v1 as pb;

/// Prompt tokens of `Gateway::chat`'s message (the mock counts words) plus the completion
/// tokens of a mock started with `--chunk-count 50`.
const TOKENS_PER_REQUEST: u64 = 4 + 50;

async fn create_key(run: &LocalRun, name: &str, tpm_limit: u32, max_parallel: u32) -> String {
    run.admin()
        .await
        .create_client_key(pb::CreateClientKeyRequest {
            name: name.into(),
            tpm_limit,
            max_parallel_requests: max_parallel,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key
}

/// What the mock served so far, in tokens.
async fn served_tokens(mock: &Mock) -> u64 {
    let stats = mock.stats().await;
    stats.prompt_tokens + stats.completion_tokens
}

/// `workers` clients sending requests back to back through `front` for `run_for`; the
/// statuses they got, and the first TPM refusal's `Retry-After` and body.
async fn hammer(
    front: Arc<Gateway>,
    key: &str,
    workers: usize,
    run_for: Duration,
) -> (u64, u64, Option<(u64, Value)>) {
    let until = Instant::now() + run_for;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (front, key) = (Arc::clone(&front), key.to_owned());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut limited, mut refusal) = (0u64, 0u64, None);
            while Instant::now() < until {
                let r = front.chat(&key, "m").await;
                match r.status().as_u16() {
                    200 => {
                        r.bytes().await.unwrap();
                        ok += 1;
                    }
                    429 => {
                        limited += 1;
                        let wait: u64 = r.headers()["retry-after"]
                            .to_str()
                            .unwrap()
                            .parse()
                            .unwrap();
                        let body: Value = r.json().await.unwrap();
                        refusal.get_or_insert((wait, body));
                        // A client honouring Retry-After would wait; these keep pressing.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => panic!("unexpected status {other}"),
                }
            }
            (ok, limited, refusal)
        }));
    }
    let (mut ok, mut limited, mut refusal) = (0, 0, None);
    for task in tasks {
        let (o, l, r) = task.await.unwrap();
        ok += o;
        limited += l;
        if refusal.is_none() {
            refusal = r;
        }
    }
    (ok, limited, refusal)
}

const PYTHON_TPM: &str = r#"
import json, sys, openai
from openai import OpenAI
base, key = sys.argv[1], sys.argv[2]
try:
    OpenAI(base_url=base, api_key=key, max_retries=0).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "say hello to me"}])
    print(json.dumps("no error"))
except openai.APIStatusError as err:
    print(json.dumps([type(err).__name__, err.status_code, err.code,
                      err.response.headers.get("retry-after") is not None]))
"#;

#[tokio::test]
async fn token_limits_of_a_key_and_of_a_backend_hold_across_three_replicas_behind_nginx() {
    let run = LocalRun::start(3).await;
    let a = Mock::start_with("a", &["m"], &["--chunk-count", "50"]).await;
    let backend = run
        .add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    // Far under its limit (600,000 a minute: 20,000 tokens of burst per replica), a steady
    // client is never refused.
    let roomy = create_key(&run, "roomy", 600_000, 0).await;
    // 3,000 a minute: 1,000 per replica, a burst of 100 each.
    let tight = create_key(&run, "tight", 3_000, 0).await;
    // 3 a minute: one request on each replica leaves it in debt for most of an hour.
    let sdk = create_key(&run, "sdk", 3, 0).await;
    run.wait_replicas_current(3).await;
    let front = Arc::new(run.front());

    for _ in 0..30 {
        let r = front.chat(&roomy, "m").await;
        assert_eq!(r.status(), 200, "refused well under the limit");
        r.bytes().await.unwrap();
    }

    let workers = 6;
    let before = served_tokens(&a).await;
    let start = Instant::now();
    let (ok, limited, refusal) =
        hammer(Arc::clone(&front), &tight, workers, Duration::from_secs(4)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let served = served_tokens(&a).await - before;
    assert_eq!(served, ok * TOKENS_PER_REQUEST);
    // The bound of guarantees.md: the limit over the time, each replica's burst, and what
    // was in flight (at most one request per client at once).
    let bound =
        3_000.0 * elapsed / 60.0 + 3.0 * 100.0 + (workers as u64 * TOKENS_PER_REQUEST) as f64;
    eprintln!(
        "key TPM 3000: {ok} served ({served} tokens) and {limited} refused in {elapsed:.1} s; bound {bound:.0}"
    );
    assert!(
        served as f64 <= bound,
        "{served} tokens served; bound {bound:.0}"
    );
    assert!(limited > 0, "the limit was never reached");
    let (wait, body) = refusal.unwrap();
    assert!((1..=60).contains(&wait), "Retry-After: {wait}");
    assert_eq!(body["error"]["type"], "tokens", "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");

    // The official Python SDK raises RateLimitError for it (on a key that stays over its
    // limit while Python starts).
    for i in 0..3 {
        assert_eq!(run.replica(i).chat(&sdk, "m").await.status(), 200);
    }
    let out = common::python(PYTHON_TPM, &[&front.url("/v1"), &sdk]).await;
    assert_eq!(
        out,
        serde_json::json!(["RateLimitError", 429, "rate_limit_exceeded", true])
    );

    // The backend's own TPM: 3,000 a minute as well, for a key without a limit.
    run.admin()
        .await
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: backend.id,
                tpm_limit: 3_000,
                ..Default::default()
            }),
            update_mask: Some(mask(&["tpm_limit"])),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    run.wait_replicas_current(3).await;
    let before = served_tokens(&a).await;
    let start = Instant::now();
    let (ok, limited, refusal) =
        hammer(Arc::clone(&front), &roomy, workers, Duration::from_secs(4)).await;
    let elapsed = start.elapsed().as_secs_f64();
    let served = served_tokens(&a).await - before;
    let bound =
        3_000.0 * elapsed / 60.0 + 3.0 * 100.0 + (workers as u64 * TOKENS_PER_REQUEST) as f64;
    eprintln!(
        "backend TPM 3000: {ok} served ({served} tokens) and {limited} refused in {elapsed:.1} s; bound {bound:.0}"
    );
    assert!(
        served as f64 <= bound,
        "{served} tokens served; bound {bound:.0}"
    );
    assert!(limited > 0, "the backend's limit was never reached");
    let (wait, body) = refusal.unwrap();
    assert!((1..=60).contains(&wait), "Retry-After: {wait}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
}

/// Three replicas behind nginx, a backend whose streams are each in flight for about 2 s (20
/// events 100 ms apart), a key of `max_parallel` requests at once, and such a stream's body.
async fn three_replicas_streaming(max_parallel: u32) -> (LocalRun, Mock, String, Value) {
    let run = LocalRun::start(3).await;
    let a = Mock::start_with(
        "a",
        &["m"],
        &["--chunk-count", "20", "--chunk-interval", "100ms"],
    )
    .await;
    run.add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let key = create_key(&run, "k", 0, max_parallel).await;
    run.wait_replicas_current(3).await;
    let stream = serde_json::json!({
        "model": "m", "stream": true,
        "messages": [{"role": "user", "content": "say hello to me"}],
    });
    (run, a, key, stream)
}

#[tokio::test]
async fn max_parallel_requests_holds_across_three_replicas() {
    // 3 at once over 3 replicas: one each.
    let (run, _a, key, stream) = three_replicas_streaming(3).await;

    let mut open = Vec::new();
    for i in 0..3 {
        let r = run
            .replica(i)
            .post("/v1/chat/completions", &key, stream.clone())
            .await;
        assert_eq!(r.status(), 200, "replica {i}: its one place is free");
        open.push(r);
    }
    // Every replica's place is taken: a fourth request anywhere is refused.
    for i in 0..3 {
        let r = run.replica(i).chat(&key, "m").await;
        assert_eq!(r.status(), 429, "replica {i}");
        assert_eq!(r.headers()["retry-after"], "1");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("at most 3 at once"),
            "{body}"
        );
    }
    // A stream's end frees its place.
    let text = open.remove(0).text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(run.replica(0).chat(&key, "m").await.status(), 200);
    drop(open);
}

/// How many of `stream` each replica of `replicas` admits at once for `key` (of
/// `max_parallel` P): opened until one is refused, and held open (returned) so that each
/// counts.
async fn admitted_at_once(
    run: &LocalRun,
    replicas: std::ops::Range<usize>,
    key: &str,
    stream: &Value,
    max_parallel: usize,
) -> (Vec<usize>, Vec<reqwest::Response>) {
    let mut open = Vec::new();
    let mut admitted = Vec::new();
    for i in replicas {
        let mut here = 0;
        loop {
            let r = run
                .replica(i)
                .post("/v1/chat/completions", key, stream.clone())
                .await;
            if r.status() == 429 {
                break;
            }
            assert_eq!(r.status(), 200, "replica {i}");
            open.push(r);
            here += 1;
            assert!(
                here <= max_parallel,
                "replica {i} admitted more than the key's limit"
            );
        }
        admitted.push(here);
    }
    (admitted, open)
}

/// The remainder of P over n replicas is given out by rank: P = 5 on three replicas admits
/// 2, 2 and 1 at once, 5 in all, where each admitted ⌊5/3⌋ = 1 before (3 in all).
#[tokio::test]
async fn max_parallel_requests_are_all_given_out_across_replicas() {
    let (run, _a, key, stream) = three_replicas_streaming(5).await;
    // On each replica, streams until one is refused (each is in flight for about 2 s).
    let (mut admitted, open) = admitted_at_once(&run, 0..3, &key, &stream, 5).await;
    admitted.sort_unstable();
    assert_eq!(
        admitted,
        [1, 2, 2],
        "all five places, the remainder by rank"
    );
    drop(open);
}

/// A replica that stops hands its share of every limit to the others once it admits no more
/// requests, not a lease after its drain: P = 4 on three replicas is 2, 1 and 1; once the
/// first stops, the two left admit 2 each at once. A stopping replica kept its share for its
/// whole drain (minutes of streams, up to `--drain-timeout`) and 30 s more, so every rollout
/// and scale-down had the replicas serving enforce each limit as if the stopping ones served
/// too.
#[tokio::test]
async fn a_stopping_replica_hands_its_share_to_the_others_at_once() {
    let (run, _a, key, stream) = three_replicas_streaming(4).await;
    run.stop_replica(0).await;
    run.wait_replicas_current(2).await;
    // Well within the 30 s lease a replica gone from its stream otherwise keeps.
    let (admitted, open) = admitted_at_once(&run, 1..3, &key, &stream, 4).await;
    assert_eq!(
        admitted,
        [2, 2],
        "the stopped replica's places went to the others"
    );
    drop(open);
}

#[tokio::test]
async fn a_stream_its_client_leaves_midway_is_charged_what_was_streamed() {
    let cluster = Cluster::start().await;
    let a = Mock::start_with(
        "a",
        &["m"],
        &["--chunk-count", "200", "--chunk-interval", "20ms"],
    )
    .await;
    cluster
        .add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;
    cluster.wait_replicas_current(1).await;

    let r = proxy
        .post(
            "/v1/chat/completions",
            &key,
            serde_json::json!({
                "model": "m", "stream": true,
                "messages": [{"role": "user", "content": "say hello to me"}],
            }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut received = String::new();
    let deltas = |text: &str| {
        common::sse_data(text)
            .iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            })
            .count() as u64
    };
    while deltas(&received) < 20 {
        received.push_str(std::str::from_utf8(&body.next().await.unwrap().unwrap()).unwrap());
    }
    drop(body);
    let relayed = deltas(&received);

    // The replica's record says the tokens are estimated, and counts at least what reached
    // the client.
    let line = proxy
        .child
        .wait_for_line(
            "the cancelled request's line",
            Duration::from_secs(10),
            |l| {
                (l.contains("request finished") && l.contains("CLIENT_CANCELLED"))
                    .then(|| l.to_owned())
            },
        )
        .await
        .unwrap();
    assert!(line.contains("tokens_estimated=true"), "{line}");
    // The control plane counts it: tokens and spend (at $1 / $2 per million), not zero.
    eventually(Duration::from_secs(10), "the record is counted", || async {
        cluster.totals().await.request_count == 1
    })
    .await;
    let totals = cluster.totals().await;
    assert!(
        totals.completion_tokens >= relayed && totals.completion_tokens < 200,
        "{} completion tokens for {relayed} deltas relayed",
        totals.completion_tokens
    );
    assert!(totals.prompt_tokens > 0);
    // Counted apart as estimated, in the totals and in `sluicectl stats totals`.
    assert_eq!(totals.estimated_count, 1);
    let shown = cluster.sluicectl(&["stats", "totals"]).await;
    assert!(
        shown
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["requests", "estimated", "1"]),
        "{shown}"
    );
    let spend = cluster.client_key("k").await.spend;
    let expected = (totals.prompt_tokens * 1_000 + totals.completion_tokens * 2_000) as f64 / 1e9;
    assert!(
        (spend - expected).abs() < 1e-12,
        "spend {spend}, expected {expected}"
    );
}
