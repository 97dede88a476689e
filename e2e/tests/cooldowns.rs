//! Cooldown semantics across replicas, with the real binaries: how a streak of 429s grows
//! and ends (docs/guarantees.md, "Cooldowns"), and that replicas whose clocks are off
//! neither ignore nor lengthen a cooldown.

use crate::common;

use std::time::{Duration, Instant};

use common::{Cluster, Gateway, Mock, Proxy, eventually};
use sluice_e2e::mock::Fault;
use sluice_proto::v1 as pb;

/// A control plane, one backend `a` serving model `m`, a client key, and `base` as the
/// cooldown base (cap 60 s).
async fn setup(base: Duration) -> (Cluster, Mock, String) {
    setup_with(base, &[]).await
}

/// [`setup`] with the mock started with `mock_args`.
async fn setup_with(base: Duration, mock_args: &[&str]) -> (Cluster, Mock, String) {
    let cluster = Cluster::start().await;
    let a = Mock::start_with("a", &["m"], mock_args).await;
    cluster
        .add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    cluster
        .set_settings(
            pb::Settings {
                cooldown_base: Some(base.into()),
                cooldown_cap: Some(Duration::from_secs(60).into()),
                ..Default::default()
            },
            &["cooldown_base", "cooldown_cap"],
        )
        .await;
    (cluster, a, key)
}

/// The control plane's cooldown of backend `a`, if one is running: (streak, length).
async fn cooldown(cluster: &Cluster) -> Option<(u32, Duration)> {
    let c = cluster
        .cooldowns()
        .await
        .into_iter()
        .find(|c| c.backend_name == "a")?;
    let ms = |t: &sluice_proto::wkt::Timestamp| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000;
    let length = ms(c.until.as_ref().unwrap()) - ms(c.create_time.as_ref().unwrap());
    Some((
        c.consecutive_failures,
        Duration::from_millis(length.try_into().unwrap()),
    ))
}

/// Waits for the control plane to show a cooldown of `a` and returns it.
async fn wait_cooldown(cluster: &Cluster) -> (u32, Duration) {
    wait_streak(cluster, 1).await
}

/// Waits for the control plane to show a cooldown of `a` with a streak of at least `streak`
/// (the last report may still be on its way) and returns it.
async fn wait_streak(cluster: &Cluster, streak: u32) -> (u32, Duration) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(c) = cooldown(cluster).await.filter(|c| c.0 >= streak) {
            return c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cooldown of a within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts a cooldown's streak and, within 100 ms, its length (the control plane stamps both
/// ends with its own clock; the tolerance is for older peers that stamp with theirs).
fn assert_cooldown(got: (u32, Duration), streak: u32, length: Duration) {
    let off = got.1.abs_diff(length);
    assert!(
        got.0 == streak && off <= Duration::from_millis(100),
        "cooldown {got:?}, expected streak {streak} for {length:?}"
    );
}

/// Sends requests through `gateway` (each either reaches `a` or is refused while `a` cools)
/// until `a` has received `n` chat requests in all.
async fn until_a_has_seen(gateway: &Gateway, key: &str, a: &Mock, n: u64) {
    eventually(Duration::from_secs(30), "requests reach a", || async {
        if a.stats().await.requests.chat_completions >= n {
            return true;
        }
        let _ = gateway.chat(key, "m").await;
        a.stats().await.requests.chat_completions >= n
    })
    .await;
    assert_eq!(a.stats().await.requests.chat_completions, n);
}

#[tokio::test]
async fn a_success_at_one_replica_ends_the_streak_at_every_replica() {
    let base = Duration::from_millis(300);
    let (cluster, a, key) = setup(base).await;
    let p = cluster.proxy().await;
    let q = cluster.proxy().await;
    cluster.wait_replicas_current(2).await;

    // Three 429s in a row through p, each after the previous cooldown: a streak of 3.
    a.set_faults(vec![Fault::status(429).always()]).await;
    until_a_has_seen(&p, &key, &a, 3).await;
    assert_cooldown(wait_streak(&cluster, 3).await, 3, base * 4);

    // a recovers; p's next request succeeds, which ends the streak for everyone.
    a.clear_faults().await;
    let before = cluster.latest_version().await;
    eventually(
        Duration::from_secs(10),
        "p is served by a again",
        || async { p.chat(&key, "m").await.status() == 200 },
    )
    .await;
    // The end of the streak reaches every replica.
    cluster.wait_replicas_past(2, before).await;

    // One 429 at q is the first of a new streak: the base cooldown, not 2^3 times it.
    a.set_faults(vec![Fault::status(429).times(1)]).await;
    assert_eq!(q.chat(&key, "m").await.status(), 429);
    assert_cooldown(wait_cooldown(&cluster).await, 1, base);
}

#[tokio::test]
async fn a_streak_outlives_its_cooldown_until_a_success() {
    let base = Duration::from_millis(300);
    let (cluster, a, key) = setup(base).await;
    let p = cluster.proxy().await;
    cluster.wait_replicas_current(1).await;

    a.set_faults(vec![Fault::status(429).always()]).await;
    until_a_has_seen(&p, &key, &a, 1).await;
    assert_cooldown(wait_cooldown(&cluster).await, 1, base);
    eventually(Duration::from_secs(10), "the cooldown ends", || async {
        cooldown(&cluster).await.is_none()
    })
    .await;
    // Any change after the cooldown ended: p gets a snapshot without a running cooldown.
    cluster.create_key("other", &[]).await;
    cluster.wait_replicas_current(1).await;

    // No success in between: the next 429 doubles.
    until_a_has_seen(&p, &key, &a, 2).await;
    assert_cooldown(wait_cooldown(&cluster).await, 2, base * 2);
}

#[tokio::test]
async fn one_burst_seen_by_two_replicas_counts_once() {
    let base = Duration::from_millis(500);
    // The provider takes 300 ms to answer: both requests are there before either 429 is.
    let (cluster, a, key) = setup_with(base, &["--latency", "300ms"]).await;
    let p = cluster.proxy().await;
    let q = cluster.proxy().await;
    cluster.wait_replicas_current(2).await;

    let counted = cluster.totals().await.request_count;
    let reached = a.stats().await.requests.chat_completions;
    a.set_faults(vec![Fault::status(429).times(2)]).await;
    let (rp, rq) = tokio::join!(p.chat(&key, "m"), q.chat(&key, "m"));
    assert_eq!((rp.status().as_u16(), rq.status().as_u16()), (429, 429));
    // Both replicas saw the provider's 429 (neither answered from a cooldown the other's had
    // already started), so there are two reports of one burst.
    assert_eq!(
        a.stats().await.requests.chat_completions - reached,
        2,
        "the burst reached the provider from both replicas"
    );
    let first = wait_cooldown(&cluster).await;
    // Both reports are in: they ride the usage stream ahead of their requests' records.
    eventually(Duration::from_secs(10), "both requests counted", || async {
        cluster.totals().await.request_count >= counted + 2
    })
    .await;
    cluster.wait_replicas_current(2).await;
    assert_cooldown(first, 1, base);
    assert_eq!(cooldown(&cluster).await.map(|c| c.0), Some(1));
}

/// Asserts that `gateway` refuses the model because `a` cools down, with a `Retry-After`
/// that is what is left of a cooldown of `length` begun after `start`: never more than
/// `length` (not lengthened), never less than what is left (not shortened or ignored).
async fn cools_for_what_is_left(gateway: &Proxy, key: &str, start: Instant, length: Duration) {
    let r = gateway.chat(key, "m").await;
    let elapsed = start.elapsed();
    assert_eq!(r.status(), 429, "the cooldown is not ignored");
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    let left = length.saturating_sub(elapsed).as_secs_f64().ceil() as u64;
    assert!(
        retry_after <= length.as_secs() && retry_after >= left.max(1),
        "Retry-After {retry_after} s, {elapsed:?} into a cooldown of {length:?}"
    );
}

#[tokio::test]
async fn replicas_with_skewed_clocks_neither_ignore_nor_lengthen_a_cooldown() {
    // Long enough that the checks below finish well within it on a loaded machine.
    let length = Duration::from_secs(6);
    let (cluster, a, key) = setup(length).await;
    let p = cluster.proxy().await;
    let ahead = cluster
        .proxy_with_env(&[], &[("SLUICE_WALL_CLOCK_OFFSET", "2s")])
        .await;
    let behind = cluster
        .proxy_with_env(&[], &[("SLUICE_WALL_CLOCK_OFFSET", "-2s")])
        .await;
    cluster.wait_replicas_current(3).await;

    // A 429 at the replica with the right time reaches both skewed ones.
    a.set_faults(vec![Fault::status(429).times(1)]).await;
    let before = cluster.latest_version().await;
    let start = Instant::now();
    assert_eq!(p.chat(&key, "m").await.status(), 429);
    wait_cooldown(&cluster).await;
    cluster.wait_replicas_past(3, before).await;
    cools_for_what_is_left(&ahead, &key, start, length).await;
    cools_for_what_is_left(&behind, &key, start, length).await;

    // A 429 at a replica whose clock is ahead reaches the others.
    cluster
        .admin()
        .await
        .reset_cooldown(pb::ResetCooldownRequest {
            model: String::new(),
            backend_id: "a".into(),
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the reset reaches p", || async {
        p.chat(&key, "m").await.status() == 200
    })
    .await;
    cluster.wait_replicas_current(3).await;
    a.set_faults(vec![Fault::status(429).times(1)]).await;
    let before = cluster.latest_version().await;
    let start = Instant::now();
    assert_eq!(ahead.chat(&key, "m").await.status(), 429);
    wait_cooldown(&cluster).await;
    cluster.wait_replicas_past(3, before).await;
    cools_for_what_is_left(&p, &key, start, length).await;
    cools_for_what_is_left(&behind, &key, start, length).await;
}

/// Providers limit each model apart: a 429 for model `m` at one replica cools `m` at backend
/// `a` on every replica (the next replica answers from the cooldown without asking `a`), while
/// `a`'s other model `n` is served everywhere.
#[tokio::test]
async fn one_models_429_cools_that_model_alone_at_every_replica() {
    let cluster = Cluster::start().await;
    let a = Mock::start_with("a", &["m", "n"], &[]).await;
    cluster
        .add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m"), ("n", "n")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let p = cluster.proxy().await;
    let q = cluster.proxy().await;
    cluster.wait_replicas_current(2).await;

    a.set_faults(vec![Fault::rate_limited(30).always().for_model("m")])
        .await;
    let before = cluster.latest_version().await;
    assert_eq!(p.chat(&key, "m").await.status(), 429);
    let of_a = || async {
        cluster
            .cooldowns()
            .await
            .into_iter()
            .find(|c| c.backend_name == "a")
    };
    eventually(Duration::from_secs(10), "a's cooldown listed", || async {
        of_a().await.is_some()
    })
    .await;
    let listed = of_a().await.unwrap();
    assert_eq!(listed.model, "m", "{listed:?}");
    cluster.wait_replicas_past(2, before).await;

    let reached = a.stats().await.requests.chat_completions;
    let refused = q.chat(&key, "m").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-sluice-attempts"], "0");
    for gateway in [&p, &q] {
        assert_eq!(gateway.chat(&key, "n").await.status(), 200);
    }
    assert_eq!(a.stats().await.requests.chat_completions, reached + 2);
}
