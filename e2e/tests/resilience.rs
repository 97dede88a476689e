//! Resilience end to end: cooldowns shared across replicas, global RPM limits,
//! replicas and the control plane going away under load, graceful drain, and
//! upstream faults, with the real binaries (and nginx, through deploy/local/run.sh).

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, LocalRun, Mock, eventually, mask, sse_data};
use serde_json::json;
use sluice_e2e::mock::{Fault, RetryAfter};
use sluice_proto::v1 as pb;

#[tokio::test]
async fn a_429_at_one_replica_cools_the_backend_at_all_three() {
    let run = LocalRun::start(3).await;
    // run.sh names the dashboard, and it is there.
    let page = reqwest::get(&run.dashboard_url).await.unwrap();
    assert_eq!(page.status(), 200, "{}", run.dashboard_url);
    assert!(page.text().await.unwrap().contains("<title>Sluice</title>"));
    run.expose_backend_header(true).await;
    let a = Mock::start("a", &["m"]).await;
    let b = Mock::start("b", &["m"]).await;
    run.add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    run.add_backend("b", &b, pb::Pool::Primary, 1, &[("m", "m")])
        .await;
    let (_, key) = run.create_key("k", &[]).await;
    for i in 0..3 {
        let replica = run.replica(i);
        eventually(Duration::from_secs(5), "replica routes to a", || async {
            replica
                .chat(&key, "m")
                .await
                .headers()
                .get("x-sluice-backend")
                .is_some_and(|v| v == "a")
        })
        .await;
    }

    // One 429 (Retry-After 30 s), seen by replica 0 only.
    a.set_faults(vec![
        Fault::Status {
            code: 429,
            retry_after: Some(RetryAfter::seconds(30)),
        }
        .times(1),
    ])
    .await;
    let r = run.replica(0).chat(&key, "m").await;
    let seen = Instant::now();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-sluice-backend"],
        "b",
        "replica 0 fails over at once"
    );
    assert_eq!(r.headers()["x-sluice-attempts"], "2");

    // The other replicas skip a (healthy again) because the control plane told them.
    for i in [1, 2] {
        let replica = run.replica(i);
        eventually(
            Duration::from_secs(2),
            "the cooldown reaches every replica",
            || async { replica.chat(&key, "m").await.headers()["x-sluice-backend"] == "b" },
        )
        .await;
    }
    eprintln!(
        "cooldown seen at replicas 1 and 2 within {:?} of the 429's answer",
        seen.elapsed()
    );
    // Once it has arrived, a is skipped everywhere.
    let served_by_a = a.stats().await.requests.chat_completions;
    for i in 0..3 {
        for _ in 0..5 {
            assert_eq!(
                run.replica(i).chat(&key, "m").await.headers()["x-sluice-backend"],
                "b"
            );
        }
    }
    let cooldowns = run.cooldowns().await;
    assert_eq!(cooldowns.len(), 1);
    assert_eq!(cooldowns[0].backend_name, "a");
    assert!(cooldowns[0].reason.contains("429"), "{:?}", cooldowns[0]);
    assert!(
        a.stats().await.requests.chat_completions == served_by_a,
        "a was not skipped"
    );

    // Reset clears it everywhere.
    run.admin()
        .await
        .reset_cooldown(pb::ResetCooldownRequest {
            model: String::new(),
            backend_id: "a".into(),
        })
        .await
        .unwrap();
    for i in 0..3 {
        let replica = run.replica(i);
        eventually(
            Duration::from_secs(2),
            "the reset reaches every replica",
            || async { replica.chat(&key, "m").await.headers()["x-sluice-backend"] == "a" },
        )
        .await;
    }
}

#[tokio::test]
async fn the_rpm_limit_holds_across_three_replicas_behind_nginx() {
    let run = LocalRun::start(3).await;
    let a = Mock::start("a", &["m"]).await;
    let backend = run
        .add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    run.admin()
        .await
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: backend.id,
                rpm_limit: 60,
                ..Default::default()
            }),
            update_mask: Some(mask(&["rpm_limit"])),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (_, key) = run.create_key("k", &[]).await;
    let front = run.front();
    // Every replica runs the limit at a third of it: share 20/min each, burst 2 each.
    run.wait_replicas_current(3).await;

    let start = Instant::now();
    let (mut ok, mut limited) = (0u64, 0u64);
    for _ in 0..60 {
        let r = front.chat(&key, "m").await;
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                let retry_after: u64 = r.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=60).contains(&retry_after));
                let body: serde_json::Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "rate_limit_exceeded");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let served = a.stats().await.requests.chat_completions;
    assert_eq!(served, ok);
    // Documented bound: limit · T / 60 + Σ burst (2 per replica at a 20/min share).
    let bound = (60.0 * elapsed / 60.0).ceil() as u64 + 6;
    assert!(
        served <= bound,
        "{served} requests reached the backend in {elapsed:.1}s; bound {bound}"
    );
    assert!(served >= 3, "each replica admits its burst");
    assert_eq!(ok + limited, 60);
}

/// Asks `front` for a chat completion of model `m`: what went wrong, if anything did (a
/// status other than 200 with its body, or the transport's error).
async fn chat_failure(front: &common::Gateway, key: &str) -> Option<String> {
    match front
        .http
        .post(front.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
    {
        Ok(r) if r.status() == 200 => r.bytes().await.err().map(|e| e.to_string()),
        Ok(r) => Some(format!(
            "{}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        )),
        Err(e) => Some(e.to_string()),
    }
}

#[tokio::test]
async fn killing_a_replica_fails_only_what_it_had_in_flight() {
    let run = LocalRun::start(3).await;
    let a = Mock::start_with("a", &["m"], &["--latency", "20ms"]).await;
    run.add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = run.create_key("k", &[]).await;
    // The key must have reached every replica: a failure here is the kill's, not a 401
    // from a replica that had not applied the key's snapshot yet.
    run.wait_replicas_current(3).await;
    let front = Arc::new(run.front());
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    const WORKERS: u64 = 8;
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (front, key, failures, done) =
            (front.clone(), key.clone(), failures.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..60 {
                if chat_failure(&front, &key).await.is_some() {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    eventually(Duration::from_secs(20), "load running", || async {
        done.load(Ordering::SeqCst) >= 80
    })
    .await;
    run.kill_replica(1).await;
    for t in tasks {
        t.await.unwrap();
    }
    let failed = failures.load(Ordering::SeqCst);
    eprintln!(
        "{failed} of {} requests failed when a replica was killed",
        WORKERS * 60
    );
    // At most what the killed replica had in flight: one per worker at most.
    assert!(failed <= WORKERS, "{failed} failures");
}

/// SIGTERM to one of three replicas behind nginx (`deploy/local/run.sh`, the default
/// `--drain-delay`) under a steady load of `POST`s: no client sees an error. nginx resends a
/// request only when it could not reach a replica, never a `POST` a replica took: a replica
/// that closed kept-alive connections under requests already sent, or reset connections
/// it had not yet accepted, failed them with 502.
#[tokio::test]
async fn stopping_a_replica_behind_nginx_fails_no_request() {
    let run = LocalRun::start(3).await;
    let a = Mock::start_with("a", &["m"], &["--latency", "2ms"]).await;
    run.add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = run.create_key("k", &[]).await;
    run.wait_replicas_current(3).await;
    let front = Arc::new(run.front());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (front, key, stop, done, failures) = (
            front.clone(),
            key.clone(),
            stop.clone(),
            done.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if let Some(failed) = chat_failure(&front, &key).await {
                    failures.lock().unwrap().push(failed);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    eventually(Duration::from_secs(20), "load running", || async {
        done.load(Ordering::SeqCst) >= 300
    })
    .await;
    let pid = run.proxy_pids[1];
    let before = done.load(Ordering::SeqCst);
    common::signal(pid, "TERM");
    eventually(Duration::from_secs(30), "the replica stopped", || async {
        common::exited(pid)
    })
    .await;
    let stopped = done.load(Ordering::SeqCst);
    // And a while after it, on the two replicas left.
    eventually(Duration::from_secs(20), "load after the stop", || async {
        done.load(Ordering::SeqCst) >= stopped + 300
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap();
    eprintln!(
        "{} requests while the replica stopped, {} after; {} failed",
        stopped - before,
        done.load(Ordering::SeqCst) - stopped,
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
}

#[tokio::test]
async fn data_planes_keep_serving_without_the_control_plane_and_usage_arrives_later() {
    let mut cluster = Cluster::start().await;
    let a = Mock::start("a", &["m"]).await;
    cluster
        .add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = Arc::new(cluster.proxy().await);

    let errors = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let (proxy, key, errors, sent, stop) = (
            proxy.clone(),
            key.clone(),
            errors.clone(),
            sent.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) && i < 2000 {
                let stream = (i + w).is_multiple_of(3);
                let r = proxy
                    .post(
                        "/v1/chat/completions",
                        &key,
                        json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "a b"}]}),
                    )
                    .await;
                let ok = r.status() == 200 && r.text().await.is_ok_and(|t| !stream || t.ends_with("data: [DONE]\n\n"));
                if !ok {
                    errors.fetch_add(1, Ordering::SeqCst);
                }
                sent.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        }));
    }
    eventually(Duration::from_secs(20), "load running", || async {
        sent.load(Ordering::SeqCst) >= 50
    })
    .await;
    cluster.stop_control().await;
    let during = sent.load(Ordering::SeqCst);
    // Requests go on being answered while it is down (`errors` counts any that failed).
    eventually(
        Duration::from_secs(30),
        "the data plane kept serving",
        || async { sent.load(Ordering::SeqCst) > during + 20 },
    )
    .await;
    cluster.start_control().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(errors.load(Ordering::SeqCst), 0, "no client saw an error");
    let total = sent.load(Ordering::SeqCst);
    let served = a.stats().await;
    assert_eq!(served.requests.chat_completions, total);
    eventually(
        Duration::from_secs(15),
        "usage queued during the outage arrives",
        || async {
            let t = cluster.totals().await;
            t.request_count == total
                && t.prompt_tokens == served.prompt_tokens
                && t.completion_tokens == served.completion_tokens
        },
    )
    .await;
}

#[tokio::test]
async fn sigterm_drains_in_flight_streams_flushes_usage_and_exits_0() {
    let cluster = Cluster::start().await;
    // Streams of 20 chunks at 100 ms: about two seconds each.
    let a = Mock::start_with(
        "a",
        &["m"],
        &["--chunk-count", "20", "--chunk-interval", "100ms"],
    )
    .await;
    cluster
        .add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let mut proxy = cluster.proxy().await;

    let mut streams = Vec::new();
    for _ in 0..10 {
        let http = proxy.http.clone();
        let url = proxy.url("/v1/chat/completions");
        let key = key.clone();
        streams.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "tell a story"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }));
    }
    eventually(Duration::from_secs(5), "streams started", || async {
        a.stats().await.streams_started == 10
    })
    .await;
    proxy.child.terminate().await.unwrap();
    // New connections are refused while draining.
    eventually(
        Duration::from_secs(5),
        "a draining proxy takes no new requests",
        || async {
            match proxy.http.get(proxy.url("/healthz")).send().await {
                Err(_) => true,
                Ok(r) => r.status() == 503,
            }
        },
    )
    .await;

    for s in streams {
        let body = s.await.unwrap();
        let events = sse_data(&body);
        assert_eq!(
            events.last().unwrap(),
            "[DONE]",
            "every in-flight stream finishes"
        );
        let content: usize = events
            .iter()
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .filter(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            })
            .count();
        assert_eq!(content, 20);
    }
    let status = tokio::time::timeout(Duration::from_secs(20), proxy.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    // Usage was flushed before exit: the control plane has all ten.
    let t = cluster.totals().await;
    assert_eq!(t.request_count, 10);
    assert_eq!(t.stream_count, 10);
    assert_eq!(t.completion_tokens, 200);
}

#[tokio::test]
async fn with_one_healthy_backend_left_every_servable_request_is_served() {
    let cluster = Cluster::start().await;
    cluster.expose_backend_header(true).await;
    cluster
        .set_settings(
            pb::Settings {
                max_attempts: 10,
                first_byte_timeout: Some(sluice_proto::wkt::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                answer_timeout: Some(sluice_proto::wkt::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                failure_threshold: 2,
                ..Default::default()
            },
            &[
                "max_attempts",
                "first_byte_timeout",
                "answer_timeout",
                "failure_threshold",
            ],
        )
        .await;
    let faults = [
        (
            "storm",
            Fault::Status {
                code: 429,
                retry_after: Some(RetryAfter::seconds(1)),
            },
        ),
        ("errors", Fault::status(500)),
        ("resets", Fault::Reset),
        ("stalls", Fault::Stall),
    ];
    let mut mocks = Vec::new();
    for (i, (name, fault)) in faults.iter().enumerate() {
        let mock = Mock::start(name, &["m"]).await;
        mock.set_faults(vec![fault.clone().always()]).await;
        cluster
            .add_backend(name, &mock, pb::Pool::Primary, i as i32, &[("m", "m")])
            .await;
        mocks.push(mock);
    }
    let healthy = Mock::start("healthy", &["m"]).await;
    cluster
        .add_backend("healthy", &healthy, pb::Pool::Fallback, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;

    let mut served = 0;
    for i in 0..40 {
        let stream = i % 2 == 0;
        let r = proxy
            .post(
                "/v1/chat/completions",
                &key,
                json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "x"}]}),
            )
            .await;
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.headers()["x-sluice-backend"], "healthy");
        let body = r.text().await.unwrap();
        if stream {
            assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
        } else {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .starts_with("[healthy]")
            );
        }
        served += 1;
    }
    assert_eq!(served, 40);
    assert_eq!(healthy.stats().await.requests.chat_completions, 40);

    // A cut after the first bytes cannot be retried: the stream ends with an error event,
    // never silently.
    let cutter = Mock::start("cutter", &["c"]).await;
    cutter
        .set_faults(vec![Fault::CutAfterChunks(3).always()])
        .await;
    cluster
        .add_backend("cutter", &cutter, pb::Pool::Primary, 0, &[("c", "c")])
        .await;
    eventually(Duration::from_secs(5), "cutter routed", || async {
        proxy.chat(&key, "c").await.status() != 404
    })
    .await;
    let r = proxy
        .post(
            "/v1/chat/completions",
            &key,
            json!({"model": "c", "stream": true, "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    let events = sse_data(&r.text().await.unwrap());
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(
        last["error"]["message"].is_string(),
        "the stream ends with an error event: {events:?}"
    );
}

#[tokio::test]
async fn upstream_garbage_never_crashes_or_hangs_the_proxy() {
    use sluice_e2e::mock::GarbageKind;
    let cluster = Cluster::start().await;
    let bad = Mock::start("bad", &["m"]).await;
    cluster
        .add_backend("bad", &bad, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let good = Mock::start("good", &["ok"]).await;
    cluster
        .add_backend("good", &good, pb::Pool::Primary, 0, &[("ok", "ok")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;
    for kind in [
        GarbageKind::NotJson,
        GarbageKind::InvalidSse,
        GarbageKind::GiantLine,
    ] {
        bad.set_faults(vec![Fault::Garbage(kind).always()]).await;
        for stream in [false, true] {
            let r = tokio::time::timeout(
                Duration::from_secs(20),
                proxy.http
                    .post(proxy.url("/v1/chat/completions"))
                    .bearer_auth(&key)
                    .json(&json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "x"}]}))
                    .send(),
            )
            .await
            .unwrap_or_else(|_| panic!("{kind:?} stream={stream}: the proxy hung"));
            // An answer, never a dropped connection (a request task that panicked): the
            // upstream's 200 passed on, a stream that cannot be read ending with Sluice's error
            // event.
            let r = r.unwrap_or_else(|e| panic!("{kind:?} stream={stream}: no answer: {e}"));
            assert_eq!(r.status(), 200, "{kind:?} stream={stream}");
            let body = tokio::time::timeout(Duration::from_secs(20), r.text())
                .await
                .unwrap_or_else(|_| panic!("{kind:?} stream={stream}: the body never ended"))
                .unwrap_or_else(|e| panic!("{kind:?} stream={stream}: the body broke: {e}"));
            if stream && kind != GarbageKind::NotJson {
                let events = sse_data(&body);
                let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
                assert_eq!(
                    last["error"]["code"], "stream_interrupted",
                    "{kind:?}: the stream ends with an error event: {events:?}"
                );
            } else {
                assert!(!body.is_empty(), "{kind:?} stream={stream}: passed on");
            }
            // And the proxy still serves.
            assert_eq!(
                proxy.chat(&key, "ok").await.status(),
                200,
                "{kind:?} stream={stream}"
            );
        }
    }
    // Every request recorded, the two streams that could not be read as errors; no request
    // task panicked.
    eventually(Duration::from_secs(10), "12 requests recorded", || async {
        cluster.totals().await.request_count == 12
    })
    .await;
    assert_eq!(cluster.totals().await.error_count, 2);
    let output = proxy.child.output();
    assert!(output.iter().all(|l| !l.contains("panicked")), "{output:?}");
}

#[tokio::test]
async fn a_control_plane_stops_within_its_grace_while_a_replica_is_frozen() {
    let run = LocalRun::start(1).await;
    run.wait_replicas_current(1).await;
    // The replica stops answering (SIGSTOP): its connection stays open and its kernel acks,
    // but nothing answers the HTTP/2 shutdown, as with a partitioned or hung replica.
    struct Frozen(u32);
    impl Drop for Frozen {
        // Thawed however the test ends, so that the cluster can stop.
        fn drop(&mut self) {
            common::signal(self.0, "CONT");
        }
    }
    let replica = run.proxy_pids[0];
    common::signal(replica, "STOP");
    let frozen = Frozen(replica);
    let began = Instant::now();
    run.signal_control("TERM");
    let grace = sluice_control::server::SHUTDOWN_GRACE;
    while !common::exited(run.control_pid) {
        assert!(
            began.elapsed() < grace * 3,
            "the control plane was still running {:?} after SIGTERM",
            began.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped_in = began.elapsed();
    drop(frozen);
    let log = std::fs::read_to_string(run.dir.path().join("data/run/control.log")).unwrap();
    assert!(
        log.contains("connections still open after the shutdown grace"),
        "stopped in {stopped_in:?} without closing what was left: {log}"
    );
    assert!(
        stopped_in >= grace,
        "{stopped_in:?}: the grace was not given"
    );
}

/// A reasoning model thinks before its first event; the front (nginx, as a cloud load
/// balancer: AWS's and ingress-nginx's cut an answer silent for 60 s) cuts what it hears
/// nothing of for 1 s here. With `--stream-keepalive`, the official SDKs' streams, OpenAI's and
/// Anthropic's (translated from the OpenAI-format backend), are kept alive through it and
/// answered whole, each sent once; a whole answer, which nothing can keep alive, is cut by
/// the front (the SDKs would send it again, billed twice: raise the front's timeout for them).
#[tokio::test]
async fn a_thinking_models_streams_are_kept_alive_through_the_fronts_read_timeout() {
    let run = LocalRun::start_with_env(
        2,
        &[
            ("SLUICE_STREAM_KEEPALIVE", "250ms"),
            ("SLUICE_NGINX_READ_TIMEOUT", "1s"),
        ],
    )
    .await;
    let mock = Mock::start("a", &["m"]).await;
    run.add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = run.create_key("k", &[]).await;
    run.wait_replicas_current(2).await;
    let front = run.front();
    let sent = mock.stats().await.requests.total();

    mock.set_faults(vec![Fault::ThinkingMs(2_500).times(2)])
        .await;
    let out = common::python(
        r#"
import json, sys, openai, anthropic
base, key = sys.argv[1], sys.argv[2]
timeout = 30.0
chat = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=timeout)
stream = chat.chat.completions.create(
    model="m", messages=[{"role": "user", "content": "x"}], stream=True)
gpt = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
claude = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=timeout)
with claude.messages.stream(
        model="m", max_tokens=64, messages=[{"role": "user", "content": "x"}]) as s:
    text = "".join(s.text_stream)
print(json.dumps([gpt, text]))
"#,
        &[&front.url(""), &key],
    )
    .await;
    let [gpt, claude] = [&out[0], &out[1]].map(|v| v.as_str().unwrap().to_owned());
    assert!(!gpt.is_empty() && gpt == claude, "{out}");
    assert_eq!(
        mock.stats().await.requests.total(),
        sent + 2,
        "each sent once"
    );

    mock.set_faults(vec![Fault::DelayMs(2_500).times(1)]).await;
    assert_eq!(front.chat(&key, "m").await.status(), 504, "the front cuts");
}
