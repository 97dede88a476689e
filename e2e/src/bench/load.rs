//! Non-streamed load: open loop at a fixed rate (latency corrected for coordinated omission)
//! and closed loop at saturation.
//!
//! Open loop: request `i` has the intended start `t0 + i / rate`. A pacing thread (OS sleeps
//! are finer than tokio's 1 ms timer) hands each request to the runtime at its intended time
//! and never waits for answers; latency is completion − intended start, so a stalled server or
//! a late generator shows up in the figures instead of hiding behind fewer requests.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::BenchError;
use super::client::{Conn, Pool, Target, read_answer};
use super::hist::Latencies;

/// One path to compare: a label for the tables, a connection pool and the request body.
#[derive(Clone)]
pub struct Side {
    pub label: String,
    pub pool: Arc<Pool>,
    pub body: Bytes,
}

impl Side {
    pub fn new(label: impl Into<String>, target: Arc<Target>, body: Bytes) -> Self {
        Self {
            label: label.into(),
            pool: Arc::new(Pool::new(target)),
            body,
        }
    }
}

/// What open-loop runs at one rate measured on one side.
#[derive(Clone, Debug)]
pub struct OpenLoopResult {
    /// Requests scheduled (and sent).
    pub sent: u64,
    /// Answers with a 2xx status.
    pub ok: u64,
    /// Transport errors, timeouts and non-2xx answers.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Completion − intended start, successful requests only.
    pub latency: Latencies,
    /// Completion − actual send.
    pub service: Latencies,
    /// Actual send − intended start: how late the generator was.
    pub lag: Latencies,
    /// Time the schedule covered.
    pub scheduled: Duration,
    /// Latency percentiles of each slice of the schedule, in order.
    pub slices: Vec<SliceSummary>,
}

/// Latency percentiles of one slice of an open-loop run.
#[derive(Clone, Copy, Debug)]
pub struct SliceSummary {
    pub p50: Duration,
    pub p99: Duration,
}

impl OpenLoopResult {
    fn new() -> Result<Self, BenchError> {
        Ok(Self {
            sent: 0,
            ok: 0,
            errors: 0,
            first_error: None,
            latency: Latencies::new()?,
            service: Latencies::new()?,
            lag: Latencies::new()?,
            scheduled: Duration::ZERO,
            slices: Vec::new(),
        })
    }

    fn merge(&mut self, other: &OpenLoopResult) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.latency.merge(&other.latency);
        self.service.merge(&other.service);
        self.lag.merge(&other.lag);
        self.scheduled += other.scheduled;
        self.slices.extend_from_slice(&other.slices);
    }

    /// Successful answers per second of schedule.
    pub fn achieved_rate(&self) -> f64 {
        per_second(self.ok, self.scheduled)
    }
}

fn per_second(count: u64, over: Duration) -> f64 {
    if over.is_zero() {
        return 0.0;
    }
    count as f64 / over.as_secs_f64()
}

/// Sends `rate` requests per second for `duration` from `side`, each bounded by `timeout`.
pub async fn open_loop(
    side: &Side,
    rate: f64,
    duration: Duration,
    timeout: Duration,
) -> Result<OpenLoopResult, BenchError> {
    let result = Arc::new(Mutex::new(OpenLoopResult::new()?));
    let count = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let runtime = tokio::runtime::Handle::current();
    let start = Instant::now() + Duration::from_millis(2);
    let pacer = {
        let (side, result) = (side.clone(), Arc::clone(&result));
        tokio::task::spawn_blocking(move || {
            let mut handles = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            for i in 0..count {
                let intended = start + Duration::from_secs_f64(i as f64 / rate);
                let now = Instant::now();
                if intended > now {
                    std::thread::sleep(intended - now);
                }
                handles.push(runtime.spawn(one_request(
                    Arc::clone(&side.pool),
                    side.body.clone(),
                    Arc::clone(&result),
                    intended,
                    timeout,
                )));
            }
            handles
        })
    };
    let handles = pacer
        .await
        .map_err(|e| BenchError::Setup(format!("the pacing thread failed: {e}")))?;
    for handle in handles {
        // Each request is bounded by `timeout`; a panicked task cannot happen here.
        let _ = handle.await;
    }
    let mut result = result
        .lock()
        .map_err(|_| BenchError::Setup("a request task panicked".into()))?
        .clone();
    result.sent = count;
    result.scheduled = duration;
    result.slices = vec![SliceSummary {
        p50: result.latency.p50(),
        p99: result.latency.p99(),
    }];
    Ok(result)
}

async fn one_request(
    pool: Arc<Pool>,
    body: Bytes,
    result: Arc<Mutex<OpenLoopResult>>,
    intended: Instant,
    timeout: Duration,
) {
    let sent = Instant::now();
    let outcome = tokio::time::timeout(timeout, pool.call(body)).await;
    let done = Instant::now();
    let Ok(mut r) = result.lock() else { return };
    r.lag.record(sent.saturating_duration_since(intended));
    let error = match outcome {
        Ok(Ok(answer)) if answer.status.is_success() => {
            r.ok += 1;
            r.latency.record(done.saturating_duration_since(intended));
            r.service.record(done.saturating_duration_since(sent));
            return;
        }
        Ok(Ok(answer)) => format!("HTTP {}", answer.status),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {timeout:?}"),
    };
    r.errors += 1;
    if r.first_error.is_none() {
        r.first_error = Some(error);
    }
}

/// How to split one rate's run between the sides.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub rate: f64,
    /// Measured time per side.
    pub duration: Duration,
    /// Slices per side; the sides alternate A B B A … so changes in the machine's load hit
    /// them alike (short slices pair them closely).
    pub segments: usize,
    /// Unmeasured run at the same rate per side first (fills connection pools, warms caches).
    pub warmup: Duration,
    pub timeout: Duration,
}

/// Open-loop runs of `schedule` on every side, interleaved; one result per side, in order.
pub async fn compare_open_loop(
    sides: &[Side],
    schedule: Schedule,
) -> Result<Vec<OpenLoopResult>, BenchError> {
    let segments = schedule.segments.max(1);
    let slice = schedule.duration / u32::try_from(segments).unwrap_or(1);
    for side in sides {
        if !schedule.warmup.is_zero() {
            open_loop(side, schedule.rate, schedule.warmup, schedule.timeout).await?;
        }
    }
    let mut results = sides
        .iter()
        .map(|_| OpenLoopResult::new())
        .collect::<Result<Vec<_>, _>>()?;
    for segment in 0..segments {
        for k in interleaved(sides.len(), segment) {
            let r = open_loop(&sides[k], schedule.rate, slice, schedule.timeout).await?;
            results[k].merge(&r);
        }
    }
    Ok(results)
}

/// The order of the sides in segment `segment`: forward, then backward (A B, B A, A B …).
fn interleaved(sides: usize, segment: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sides).collect();
    if segment % 2 == 1 {
        order.reverse();
    }
    order
}

/// What a closed-loop run measured on one side.
#[derive(Clone, Debug)]
pub struct ClosedLoopResult {
    pub connections: usize,
    /// 2xx answers completed within the measured time.
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Per-request latency (send → end of body); closed-loop, so not corrected.
    pub latency: Latencies,
}

impl ClosedLoopResult {
    pub fn throughput(&self) -> f64 {
        per_second(self.ok, self.elapsed)
    }

    fn merge(&mut self, other: &ClosedLoopResult) {
        self.ok += other.ok;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.elapsed += other.elapsed;
        self.latency.merge(&other.latency);
    }
}

/// `connections` connections each sending the next request as soon as the previous answer
/// ended, for `duration`.
pub async fn closed_loop(
    side: &Side,
    connections: usize,
    duration: Duration,
    timeout: Duration,
) -> Result<ClosedLoopResult, BenchError> {
    let target = Arc::clone(side.pool.target());
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(Conn::open(target.addr()).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in conns {
        let (target, body) = (Arc::clone(&target), side.body.clone());
        tasks.spawn(async move {
            let mut latency = Latencies::new()?;
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            while Instant::now() < deadline {
                let sent = Instant::now();
                let request = target.request(body.clone())?;
                let call = async { read_answer(conn.send(request).await?).await };
                let error = match tokio::time::timeout(timeout, call).await {
                    Ok(Ok(answer)) if answer.status.is_success() => {
                        let done = Instant::now();
                        if done <= deadline {
                            ok += 1;
                            latency.record(done - sent);
                        }
                        continue;
                    }
                    Ok(Ok(answer)) => format!("HTTP {}", answer.status),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {timeout:?}"),
                };
                errors += 1;
                first_error.get_or_insert(error);
                // The connection may hold half an answer: start afresh.
                conn = Conn::open(target.addr()).await?;
            }
            Ok::<_, BenchError>((ok, errors, first_error, latency))
        });
    }
    let mut result = ClosedLoopResult {
        connections,
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: duration,
        latency: Latencies::new()?,
    };
    while let Some(joined) = tasks.join_next().await {
        let (ok, errors, first_error, latency) =
            joined.map_err(|e| BenchError::Setup(format!("a load task failed: {e}")))??;
        result.ok += ok;
        result.errors += errors;
        if result.first_error.is_none() {
            result.first_error = first_error;
        }
        result.latency.merge(&latency);
    }
    Ok(result)
}

/// Closed-loop runs on every side, interleaved in `segments` slices of `duration / segments`
/// per side, after an unmeasured `warmup` per side.
pub async fn compare_closed_loop(
    sides: &[Side],
    connections: usize,
    duration: Duration,
    segments: usize,
    warmup: Duration,
    timeout: Duration,
) -> Result<Vec<ClosedLoopResult>, BenchError> {
    let segments = segments.max(1);
    let slice = duration / u32::try_from(segments).unwrap_or(1);
    for side in sides {
        if !warmup.is_zero() {
            closed_loop(side, connections, warmup, timeout).await?;
        }
    }
    let mut results: Vec<Option<ClosedLoopResult>> = sides.iter().map(|_| None).collect();
    for segment in 0..segments {
        for k in interleaved(sides.len(), segment) {
            let r = closed_loop(&sides[k], connections, slice, timeout).await?;
            match &mut results[k] {
                Some(total) => total.merge(&r),
                slot @ None => *slot = Some(r),
            }
        }
    }
    Ok(results.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::bench::client::chat_body;
    use crate::mock::{MockConfig, MockServer};

    fn side(mock: &MockServer) -> Side {
        let target = Target::new(&mock.base_url(), None, "m", false).unwrap();
        Side::new("direct", Arc::new(target), chat_body("m", false))
    }

    #[test]
    fn sides_alternate_between_segments() {
        assert_eq!(interleaved(2, 0), vec![0, 1]);
        assert_eq!(interleaved(2, 1), vec![1, 0]);
        assert_eq!(interleaved(1, 1), vec![0]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_sends_the_schedule_and_counts_every_answer() {
        let mock = MockServer::start_local(MockConfig::default()).unwrap();
        let side = side(&mock);
        let r = open_loop(
            &side,
            200.0,
            Duration::from_millis(500),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(r.sent, 100);
        assert_eq!(r.ok, 100, "{:?}", r.first_error);
        assert_eq!(r.latency.count(), 100);
        assert_eq!(mock.stats().requests.chat_completions, 100);
        // Latency runs from the intended start, so it is never below the service time.
        assert!(r.latency.max() >= r.service.max());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_server_shows_in_the_corrected_latency() {
        let mock =
            MockServer::start_local(MockConfig::default().with_latency(Duration::from_millis(50)))
                .unwrap();
        let r = open_loop(
            &side(&mock),
            100.0,
            Duration::from_millis(300),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(r.ok, 30);
        assert!(r.latency.p50() >= Duration::from_millis(50));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn errors_are_counted_not_timed() {
        let mock = MockServer::start_local(MockConfig::default().with_api_key("right")).unwrap();
        let r = open_loop(
            &side(&mock),
            100.0,
            Duration::from_millis(100),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!((r.ok, r.errors), (0, 10));
        assert_eq!(r.first_error.as_deref(), Some("HTTP 401 Unauthorized"));
        assert_eq!(r.latency.count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_counts_completed_requests() {
        let mock = MockServer::start_local(MockConfig::default()).unwrap();
        let r = closed_loop(
            &side(&mock),
            4,
            Duration::from_millis(300),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(r.ok > 10, "{r:?}");
        assert_eq!(r.errors, 0);
        // Requests still in flight at the deadline are served but not counted.
        assert!(mock.stats().requests.chat_completions >= r.ok);
        assert!(r.throughput() > 0.0);
    }
}
