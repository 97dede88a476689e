//! Usage survives a data plane that dies, with the real processes: a replica killed with
//! SIGKILL under load behind nginx and restarted on its data directory, a spool torn in the
//! middle of a write, and two replicas pointed at one directory. And an idle replica, whose
//! reporter and spool sleep, still counts the next request.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Cluster, Gateway, LocalRun, Mock, eventually};
use serde_json::json;
use sluice_control::testing::metric_samples;
use sluice_e2e::mock::Fault;
use sluice_proto::v1 as pb;
use sluice_proxy::spool::{entry, frame};

/// Closed-loop clients through one gateway: every third request streamed. Counts what they
/// sent, what is in flight, and what failed; can pause between requests.
struct Load {
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    outstanding: Arc<AtomicU64>,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(gateway: Gateway, key: String, workers: u64) -> Self {
        let gateway = Arc::new(gateway);
        let load = Self {
            done: Arc::default(),
            failed: Arc::default(),
            outstanding: Arc::default(),
            paused: Arc::default(),
            stop: Arc::default(),
            workers: Vec::new(),
        };
        let workers = (0..workers)
            .map(|w| {
                let (gateway, key) = (gateway.clone(), key.clone());
                let (done, failed, outstanding, paused, stop) = (
                    load.done.clone(),
                    load.failed.clone(),
                    load.outstanding.clone(),
                    load.paused.clone(),
                    load.stop.clone(),
                );
                tokio::spawn(async move {
                    let mut i = w;
                    while !stop.load(Ordering::SeqCst) {
                        if paused.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                        let stream = i % 3 == 0;
                        i += 1;
                        outstanding.fetch_add(1, Ordering::SeqCst);
                        let ok = match gateway
                            .http
                            .post(gateway.url("/v1/chat/completions"))
                            .bearer_auth(&key)
                            .json(&json!({"model": "m", "stream": stream,
                                "messages": [{"role": "user", "content": "count these five words"}]}))
                            .send()
                            .await
                        {
                            Ok(r) if r.status() == 200 => r
                                .text()
                                .await
                                .is_ok_and(|t| !stream || t.ends_with("data: [DONE]\n\n")),
                            Ok(r) => {
                                let _ = r.bytes().await;
                                false
                            }
                            Err(_) => false,
                        };
                        if !ok {
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                        outstanding.fetch_sub(1, Ordering::SeqCst);
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Self { workers, ..load }
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    async fn run_for(&self, requests: u64, what: &str) {
        let target = self.done() + requests;
        eventually(Duration::from_secs(60), what, || async {
            self.done() >= target
        })
        .await;
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        for worker in self.workers {
            worker.await.unwrap();
        }
        self.failed.load(Ordering::SeqCst)
    }
}

async fn gauge(gateway: &Gateway, name: &str) -> f64 {
    metric_samples(&gateway.metrics().await)
        .get(name)
        .copied()
        .unwrap_or_else(|| panic!("{name} missing"))
}

#[tokio::test]
async fn a_replica_killed_under_load_and_restarted_on_its_data_directory_loses_and_doubles_nothing()
{
    // Segments of 4 KiB (about a dozen requests): the replicas go through many segments under
    // load and write most of them over acked ones' files (docs/guarantees.md, "On disk"),
    // the victim too before it dies.
    let run = LocalRun::start_with_env(3, &[("SLUICE_USAGE_SPOOL_SEGMENT_BYTES", "4096")]).await;
    let mock = Mock::start_with(
        "a",
        &["m"],
        &["--chunk-count", "4", "--chunk-interval", "2ms"],
    )
    .await;
    let mut backend = run
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    // A prompt token a micro-unit, 1,000 nano-units; a completion token 2,000.
    backend.models[0].input_price_per_mtok = 1.0;
    backend.models[0].output_price_per_mtok = 2.0;
    run.update_backend(backend, &["models"]).await;
    let (_, key) = run.create_key("k", &[]).await;
    run.wait_replicas_current(3).await;
    let load = Load::start(run.front(), key, 6);

    // Steady load with the control plane acking as usual.
    load.run_for(150, "load with acks").await;
    // Every replica keeps an acked segment's file as a spare before the acks stop, so the
    // victim writes a segment over one while its records go unacked.
    eventually(
        Duration::from_secs(30),
        "a spare on every replica",
        || async { (0..3).all(|i| has_spare(&run.replica_data_dir(i))) },
    )
    .await;
    // The control plane stops answering: every replica piles up unacked usage.
    run.signal_control("STOP");
    load.run_for(300, "load without acks").await;

    // The provider holds whatever arrives from now on; once no client starts a new request,
    // every request in flight is one the provider holds, not yet answered.
    let held_before = mock.stats().await.faults_applied;
    mock.set_faults(vec![Fault::DelayMs(6_000).always()]).await;
    let held = || async { mock.stats().await.faults_applied - held_before };
    eventually(Duration::from_secs(20), "some requests held", || async {
        held().await >= 3
    })
    .await;
    load.paused.store(true, Ordering::SeqCst);
    eventually(
        Duration::from_secs(20),
        "every request in flight held by the provider",
        || async { load.outstanding.load(Ordering::SeqCst) == held().await },
    )
    .await;
    // Kill the replica holding the most of them.
    let mut in_flight = Vec::new();
    for i in 0..3 {
        in_flight.push(gauge(&run.replica(i), "sluice_requests_in_flight").await as u64);
    }
    let victim = (0..3).max_by_key(|&i| in_flight[i]).unwrap();
    let interrupted = in_flight[victim];
    assert!(interrupted > 0, "{in_flight:?}");
    run.kill_replica(victim).await;
    eprintln!("killed replica {victim} with {interrupted} requests in flight ({in_flight:?})");
    let reused = segment_files(&run.replica_data_dir(victim))
        .iter()
        .filter(|path| entry::decode_segment(&std::fs::read(path).unwrap()).reused_file)
        .count();
    assert!(
        reused > 0,
        "the victim wrote a segment over an acked one's file"
    );

    // Acks again, answers again, new requests again; the replica comes back on its directory.
    run.signal_control("CONT");
    mock.clear_faults().await;
    load.paused.store(false, Ordering::SeqCst);
    let restarted = run.restart_replica(victim).await;
    let left = restarted
        .wait_for_line("the earlier run's records", Duration::from_secs(10), |l| {
            l.contains("an earlier run left records")
                .then(|| l.to_owned())
        })
        .await
        .unwrap();
    assert!(
        left.contains(&format!("interrupted={interrupted}")),
        "every request in flight comes back as interrupted: {left}"
    );
    let finished: u64 = left
        .split("finished=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no finished= in {left}"));
    assert!(
        finished > 0,
        "the records served while the control plane was away are resent: {left}"
    );
    load.run_for(300, "load after the restart").await;
    let failed = load.finish().await;

    // Everything acked everywhere, then the control plane's totals are the provider's.
    for i in 0..3 {
        let replica = run.replica(i);
        eventually(Duration::from_secs(30), "every spool drained", || async {
            gauge(&replica, "sluice_usage_spool_records").await == 0.0
        })
        .await;
    }
    let served = mock.stats().await;
    eventually(
        Duration::from_secs(30),
        "the control plane counted every request",
        || async { run.totals().await.request_count >= served.requests.chat_completions },
    )
    .await;
    let totals = run.totals().await;
    eprintln!(
        "served {} requests; {failed} failed at the client; totals {totals:?}",
        served.requests.chat_completions
    );
    assert_eq!(
        totals.request_count, served.requests.chat_completions,
        "request for request"
    );
    // The killed replica's requests in flight are the only errors: counted once each, at
    // their prompt's estimate (the provider may have billed them; a token per 4 bytes of a
    // body, streamed or not), nothing generated; their clients saw them fail.
    let estimates: Vec<u64> = [false, true]
        .map(|stream| {
            let body = json!({"model": "m", "stream": stream,
                "messages": [{"role": "user", "content": "count these five words"}]});
            (serde_json::to_vec(&body).unwrap().len() as u64).div_ceil(4)
        })
        .to_vec();
    let estimated = totals.prompt_tokens - served.prompt_tokens;
    assert!(
        (interrupted * estimates.iter().min().unwrap()
            ..=interrupted * estimates.iter().max().unwrap())
            .contains(&estimated),
        "{interrupted} requests interrupted, estimated at {estimated} prompt tokens ({estimates:?} each)"
    );
    assert_eq!(
        totals.completion_tokens, served.completion_tokens,
        "completion tokens"
    );
    assert_eq!(totals.error_count, interrupted);
    // And the money: every token, estimated or not, at its price, in the statistics and in
    // the key's spend.
    let cost = totals.prompt_tokens * 1_000 + totals.completion_tokens * 2_000;
    assert_eq!((totals.cost * 1e9).round() as u64, cost, "{totals:?}");
    let spent = (run.client_key("k").await.spend * 1e9).round() as u64;
    assert_eq!(spent, cost, "the key's spend");
    assert!(failed >= interrupted, "{failed} < {interrupted}");
    let resent = gauge(
        &run.replica(victim),
        "sluice_usage_spool_resent_records_total",
    )
    .await;
    assert!(resent >= interrupted as f64, "{resent}");
    drop(restarted);
}

/// Context switches so far of every thread of process `pid` (each one a wake-up of a thread
/// that had slept or was preempted), from `/proc`.
fn switches(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .map(|task| {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            status
                .lines()
                .filter(|l| {
                    l.starts_with("voluntary_ctxt_switches")
                        || l.starts_with("nonvoluntary_ctxt_switches")
                })
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

#[tokio::test]
async fn an_idle_replica_sleeps_and_still_counts_the_next_request() {
    let run = LocalRun::start(1).await;
    let mock = Mock::start("a", &["m"]).await;
    run.add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = run.create_key("k", &[]).await;
    run.wait_replicas_current(1).await;
    let replica = run.replica(0);
    let counted = |n: u64| {
        let run = &run;
        move || async move { run.totals().await.request_count == n }
    };

    assert_eq!(replica.chat(&key, "m").await.status(), 200);
    eventually(
        Duration::from_secs(30),
        "the first request counted",
        counted(1),
    )
    .await;
    // Idle: the log writer, the usage reporter and the spool's sync thread wait for work
    // rather than polling it (they woke about 30 times a second in all before; now the
    // spool's one-second check and the control-plane streams' keep-alives remain). Counted
    // over 3 s windows until one is quiet, as the replica settles first (the spool sleeps
    // after a round with nothing new).
    let pid = run.proxy_pids[0];
    let mut woke = u64::MAX;
    for _ in 0..5 {
        let before = switches(pid);
        tokio::time::sleep(Duration::from_secs(3)).await;
        woke = switches(pid) - before;
        if woke <= 20 {
            break;
        }
    }
    assert!(woke <= 20, "an idle replica woke {woke} times in 3 s");

    // The next request wakes what sleeps: its usage is spooled, flushed, sent and counted.
    assert_eq!(replica.chat(&key, "m").await.status(), 200);
    eventually(
        Duration::from_secs(30),
        "the request after the idle spell counted",
        counted(2),
    )
    .await;
}

/// Whether a serving thread of the replica on `data_dir` keeps a spare segment file.
fn has_spare(data_dir: &std::path::Path) -> bool {
    let Ok(runs) = std::fs::read_dir(data_dir.join("usage-spool")) else {
        return false;
    };
    runs.flatten().any(|run| {
        std::fs::read_dir(run.path()).is_ok_and(|files| {
            files
                .flatten()
                .any(|f| f.path().extension().is_some_and(|e| e == "spare"))
        })
    })
}

/// The segment files of every run under a data directory.
fn segment_files(data_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for run in std::fs::read_dir(data_dir.join("usage-spool")).unwrap() {
        for file in std::fs::read_dir(run.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|e| e == "spool") {
                files.push(path);
            }
        }
    }
    files
}

/// Frames of the only spool segment under `data_dir`: the file, its bytes and each frame's
/// (offset, length, entry).
fn spool_frames(
    data_dir: &std::path::Path,
) -> (
    std::path::PathBuf,
    Vec<u8>,
    Vec<(usize, usize, entry::Entry)>,
) {
    let spool = data_dir.join("usage-spool");
    let runs: Vec<_> = std::fs::read_dir(&spool).unwrap().collect();
    assert_eq!(runs.len(), 1);
    let run = runs.into_iter().next().unwrap().unwrap().path();
    // Segments alone (anything later kept beside them is not this test's).
    let segments: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .map(|f| f.unwrap().path())
        .filter(|f| f.extension().is_some_and(|e| e == "spool"))
        .collect();
    assert_eq!(segments.len(), 1, "one serving thread, one segment");
    let file = segments.into_iter().next().unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let decoded = entry::decode_segment(&bytes).frames;
    assert_eq!(decoded.stop, None);
    let mut at = 0;
    let frames = decoded
        .payloads
        .iter()
        .map(|payload| {
            let len = frame::HEADER_BYTES + payload.len();
            let entry = entry::decode(payload).unwrap();
            at += len;
            (at - len, len, entry)
        })
        .collect();
    (file, bytes, frames)
}

#[tokio::test]
async fn a_replica_killed_mid_write_of_its_spool_counts_every_whole_record_once() {
    let mut cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let data = cluster.dir.path().join("proxy");
    let args = [
        "--data-dir",
        data.to_str().unwrap(),
        "--serving-threads",
        "1",
        "--node-id",
        "dp-torn",
    ];
    let mut proxy = cluster.proxy_with(&args).await;

    // Ten requests the control plane commits.
    const ACKED: u64 = 10;
    for _ in 0..ACKED {
        assert_eq!(proxy.chat(&key, "m").await.status(), 200);
    }
    eventually(Duration::from_secs(10), "10 committed", || async {
        cluster.totals().await.request_count == ACKED
    })
    .await;
    let per_request = cluster.totals().await;
    let (prompt, completion) = (
        per_request.prompt_tokens / ACKED,
        per_request.completion_tokens / ACKED,
    );
    // The control plane goes away; eight more are served and stay in the spool.
    cluster.kill_control().await;
    const UNACKED: u64 = 8;
    for _ in 0..UNACKED {
        assert_eq!(proxy.chat(&key, "m").await.status(), 200);
    }
    proxy.child.kill().await.unwrap();

    // The process died in the middle of a write: the file ends inside one of the unacked
    // requests' frames. Frames: the header, then a start and a finish per request.
    let (file, bytes, frames) = spool_frames(&data);
    assert_eq!(frames.len() as u64, 1 + 2 * (ACKED + UNACKED));
    assert!(matches!(frames[0].2.kind, Some(entry::Kind::Header(_))));
    // Every start carries what its request is charged should the process die during it: the
    // prompt's estimate at the route's price ($1 a million: 1,000 nano-units a token), priced
    // by the replica; every finish the provider's count and its cost, none of the start's.
    for (_, _, frame) in &frames[1..] {
        match &frame.kind {
            Some(entry::Kind::Start(mark)) => {
                let r = mark.record.as_ref().unwrap();
                assert!(
                    r.prompt_tokens > 0 && r.tokens_estimated && r.priced,
                    "{r:?}"
                );
                assert_eq!(r.cost_nanos, r.prompt_tokens * 1_000, "{r:?}");
            }
            Some(entry::Kind::Finish(mark)) => {
                let r = mark.record.as_ref().unwrap();
                assert!(!r.tokens_estimated, "{r:?}");
                assert_eq!((r.prompt_tokens, r.completion_tokens), (prompt, completion));
                assert_eq!(r.cost_nanos, prompt * 1_000 + completion * 2_000, "{r:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    let first_unacked = 1 + 2 * ACKED as usize;
    let torn = rand::random_range(first_unacked..frames.len());
    let (offset, len, _) = frames[torn];
    let cut = offset + rand::random_range(1..len);
    std::fs::write(&file, &bytes[..cut]).unwrap();
    // Unacked requests whose finish is whole are counted with their tokens; the one whose
    // finish is torn (start whole) is counted as interrupted; a request whose start is torn
    // was never recorded (the process died before its upstream call).
    let finished = ((torn - first_unacked) / 2) as u64;
    let interrupted = u64::from(matches!(frames[torn].2.kind, Some(entry::Kind::Finish(_))));
    // What the interrupted one's start says it is charged: its prompt's estimate.
    let estimate = match &frames[torn - 1].2.kind {
        Some(entry::Kind::Start(mark)) if interrupted == 1 => {
            mark.record.as_ref().unwrap().prompt_tokens
        }
        _ => 0,
    };
    assert_eq!(estimate > 0, interrupted == 1, "{estimate}");
    eprintln!(
        "cut at byte {cut} inside frame {torn}: {finished} finished, {interrupted} interrupted"
    );

    cluster.start_control().await;
    let proxy = cluster.proxy_with(&args).await;
    proxy
        .child
        .wait_for_line("the torn-record warning", Duration::from_secs(10), |l| {
            l.contains("torn or damaged record").then_some(())
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the spool drained", || async {
        gauge(&proxy, "sluice_usage_spool_records").await == 0.0
    })
    .await;
    let samples = metric_samples(&proxy.metrics().await);
    assert_eq!(samples["sluice_usage_spool_torn_records_total"], 1.0);
    let totals = cluster.totals().await;
    assert_eq!(totals.request_count, ACKED + finished + interrupted);
    // The interrupted request at its prompt's estimate, nothing generated.
    assert_eq!(
        totals.prompt_tokens,
        (ACKED + finished) * prompt + interrupted * estimate
    );
    assert_eq!(totals.completion_tokens, (ACKED + finished) * completion);
    assert_eq!(totals.error_count, interrupted);
}

#[tokio::test]
async fn two_replicas_on_one_data_directory_are_refused_with_a_clear_error() {
    let cluster = Cluster::start().await;
    let data = cluster.dir.path().join("shared-proxy-dir");
    let args = ["--data-dir", data.to_str().unwrap()];
    let first = cluster.proxy_with(&args).await;
    let mut second = sluice_e2e::process::spawn(
        sluice_e2e::process::workspace_bin("sluice-proxy"),
        [
            "--control-plane",
            &cluster.control_url(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        [("SLUICE_DATAPLANE_TOKEN", common::DATAPLANE_TOKEN)],
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), second.wait())
        .await
        .expect("the second replica exits")
        .unwrap();
    assert!(!status.success());
    let pid = first.child.id().unwrap();
    // The process has exited; its last lines may still be on their way from the pipe.
    let expected = format!(
        "is in use by another sluice-proxy (pid {pid}): every replica needs a data directory of its own"
    );
    second
        .wait_for_line(&expected, Duration::from_secs(10), |line| {
            line.contains(&expected).then_some(())
        })
        .await
        .unwrap();
    // The first one is unharmed.
    assert_eq!(
        first
            .http
            .get(first.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// Sends a burst of 20 requests through the first replica of `run` (`replicas` of them), stops
/// the gateway with `stop`, and checks that it stopped within 8 s with every replica's spool
/// empty and the 20 requests counted. The last of them is sent within the report interval
/// (100 ms) of the stop: not acked yet when it begins.
async fn a_burst_is_reported_when_the_gateway_stops(
    mut run: LocalRun,
    replicas: usize,
    stop: impl FnOnce(&mut LocalRun),
) {
    let mock = Mock::start("a", &["m"]).await;
    run.add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = run.create_key("k", &[]).await;
    run.wait_replicas_current(replicas).await;
    let replica = run.replica(0);
    for _ in 0..20 {
        assert_eq!(replica.chat(&key, "m").await.status(), 200);
    }

    let started = std::time::Instant::now();
    stop(&mut run);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "the gateway took {took:?} to stop"
    );
    for i in 0..replicas {
        let spooled = segment_files(&run.replica_data_dir(i));
        assert!(
            spooled.is_empty(),
            "left in replica {i}'s spool: {spooled:?}"
        );
    }
    let db = rusqlite::Connection::open(run.dir.path().join("data/sluice.db")).unwrap();
    let counted: i64 = db
        .query_row("SELECT SUM(request_count) FROM usage_hourly", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(counted, 20);
}

/// SIGTERM to `deploy/local/run.sh` right after a burst of requests: the replica stops before
/// the control plane, so its last usage is reported and acked rather than left in its spool
/// (stopped together, the replica waited its whole `--usage-flush-timeout` for acks from a
/// control plane already gone, and its records stayed on disk until its next start).
#[tokio::test]
async fn stopping_the_local_gateway_reports_the_replicas_last_usage_first() {
    let run = LocalRun::start(1).await;
    a_burst_is_reported_when_the_gateway_stops(run, 1, LocalRun::stop).await;
}

/// Ctrl-C in the terminal sends SIGINT to the script's whole process group (here three data
/// planes behind nginx). Everything the script started shared its group, so the control
/// plane stopped at once with the data planes, which then each waited --usage-flush-timeout
/// (10 s) for an ack that could not come and left their last usage in their spools. The
/// script starts each in a session of its own: only its trap stops them, in its order, as
/// for SIGTERM above.
#[tokio::test]
async fn ctrl_c_in_the_terminal_stops_the_local_gateway_in_its_order() {
    let run = LocalRun::start_as_a_job(3).await;
    a_burst_is_reported_when_the_gateway_stops(run, 3, LocalRun::interrupt_group).await;
}
