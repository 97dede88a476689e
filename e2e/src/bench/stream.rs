//! Many concurrent SSE streams: time to first event, every gap between events, and the events
//! that arrived, per stream.
//!
//! Each stream has its own keep-alive connection (HTTP/1.1 carries one stream at a time), kept
//! across rounds so a measured round does not pay for connecting. Starts are spread evenly over a
//! ramp so the figures show the gateway, not a thundering herd of simultaneous requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;

use super::BenchError;
use super::client::{Conn, Target};
use super::hist::Latencies;

/// How one round of streams runs.
#[derive(Clone, Copy, Debug)]
pub struct StreamPlan {
    pub streams: usize,
    /// Starts are spread evenly over this time.
    pub ramp: Duration,
    /// SSE events every stream should deliver (its last, `[DONE]` or `message_stop`,
    /// included), when known.
    pub expected_events: Option<u64>,
    /// Bound on one whole stream.
    pub timeout: Duration,
}

/// What a round (or several, merged) of streams measured.
#[derive(Clone, Debug)]
pub struct StreamResult {
    pub streams: usize,
    /// Streams that answered 200 and ended after `data: [DONE]` (`message_stop` for Messages).
    pub completed: usize,
    pub first_error: Option<String>,
    /// Request sent → first complete SSE event.
    pub ttft: Latencies,
    /// Between consecutive events of one stream.
    pub gaps: Latencies,
    pub events: u64,
    pub expected_events: Option<u64>,
    /// Σ over streams of the expected events that did not arrive.
    pub events_lost: u64,
    pub min_events: u64,
    pub max_events: u64,
    /// Most streams open at once.
    pub peak_concurrency: usize,
}

impl StreamResult {
    fn new(expected_events: Option<u64>) -> Result<Self, BenchError> {
        Ok(Self {
            streams: 0,
            completed: 0,
            first_error: None,
            ttft: Latencies::new()?,
            gaps: Latencies::new()?,
            events: 0,
            expected_events,
            events_lost: 0,
            min_events: u64::MAX,
            max_events: 0,
            peak_concurrency: 0,
        })
    }

    /// Adds the streams of another round.
    pub fn merge(&mut self, other: &StreamResult) {
        self.streams += other.streams;
        self.completed += other.completed;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.ttft.merge(&other.ttft);
        self.gaps.merge(&other.gaps);
        self.events += other.events;
        self.events_lost += other.events_lost;
        self.min_events = self.min_events.min(other.min_events);
        self.max_events = self.max_events.max(other.max_events);
        self.peak_concurrency = self.peak_concurrency.max(other.peak_concurrency);
    }

    pub fn failed(&self) -> usize {
        self.streams - self.completed
    }
}

/// Counts SSE events (blocks ended by an empty line) in a byte stream, and notices the end of
/// a stream: `data: [DONE]`, or Anthropic's `event: message_stop`.
#[derive(Default)]
struct SseCounter {
    /// The start of the current line (enough to recognise either end).
    head: Vec<u8>,
    line_len: usize,
    in_event: bool,
    done: bool,
}

impl SseCounter {
    /// Feeds bytes; returns how many events they completed.
    fn feed(&mut self, bytes: &[u8]) -> u64 {
        let mut events = 0;
        for &b in bytes {
            if b != b'\n' {
                self.line_len += 1;
                if self.head.len() < 20 {
                    self.head.push(b);
                }
                continue;
            }
            let mut line: &[u8] = &self.head;
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let empty = self.line_len == 0 || (self.line_len == 1 && self.head == b"\r");
            if empty {
                if self.in_event {
                    events += 1;
                    self.in_event = false;
                }
            } else {
                self.in_event = true;
                if self.line_len <= 20
                    && matches!(
                        line,
                        b"data: [DONE]"
                            | b"data:[DONE]"
                            | b"event: message_stop"
                            | b"event:message_stop"
                    )
                {
                    self.done = true;
                }
            }
            self.head.clear();
            self.line_len = 0;
        }
        events
    }
}

/// One stream's measurements.
struct Outcome {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    events: u64,
    done: bool,
    error: Option<String>,
}

/// Keeps one connection per stream slot between rounds.
pub struct StreamRunner {
    target: Arc<Target>,
    body: Bytes,
    slots: Vec<Option<Conn>>,
}

impl StreamRunner {
    pub fn new(target: Arc<Target>, body: Bytes) -> Self {
        Self {
            target,
            body,
            slots: Vec::new(),
        }
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// Runs `plan.streams` streams once.
    pub async fn round(&mut self, plan: StreamPlan) -> Result<StreamResult, BenchError> {
        self.slots
            .resize_with(plan.streams.max(self.slots.len()), || None);
        let active = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let start = Instant::now() + Duration::from_millis(5);
        let step = plan.ramp.as_secs_f64() / plan.streams.max(1) as f64;
        let mut tasks = tokio::task::JoinSet::new();
        for (i, slot) in self.slots.iter_mut().take(plan.streams).enumerate() {
            let conn = slot.take();
            let at = start + Duration::from_secs_f64(step * i as f64);
            let (target, body) = (Arc::clone(&self.target), self.body.clone());
            let (active, peak) = (Arc::clone(&active), Arc::clone(&peak));
            tasks.spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                let now_active = active.fetch_add(1, Ordering::Relaxed) + 1;
                peak.fetch_max(now_active, Ordering::Relaxed);
                let run = one_stream(&target, conn, body);
                let (conn, outcome) = match tokio::time::timeout(plan.timeout, run).await {
                    Ok(r) => r,
                    Err(_) => (
                        None,
                        Outcome::failed(format!("stream not done within {:?}", plan.timeout)),
                    ),
                };
                active.fetch_sub(1, Ordering::Relaxed);
                (i, conn, outcome)
            });
        }
        let mut result = StreamResult::new(plan.expected_events)?;
        while let Some(joined) = tasks.join_next().await {
            let (i, conn, outcome) =
                joined.map_err(|e| BenchError::Setup(format!("a stream task failed: {e}")))?;
            self.slots[i] = conn;
            result.add(&outcome);
        }
        result.peak_concurrency = peak.load(Ordering::Relaxed);
        Ok(result)
    }
}

impl StreamResult {
    fn add(&mut self, o: &Outcome) {
        self.streams += 1;
        if o.done && o.error.is_none() {
            self.completed += 1;
        }
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.error);
            if self.first_error.is_none() && !o.done {
                self.first_error =
                    Some("a stream ended without its last event ([DONE], message_stop)".into());
            }
        }
        if let Some(ttft) = o.ttft {
            self.ttft.record(ttft);
        }
        for gap in &o.gaps {
            self.gaps.record(*gap);
        }
        self.events += o.events;
        if let Some(expected) = self.expected_events {
            self.events_lost += expected.saturating_sub(o.events);
        }
        self.min_events = self.min_events.min(o.events);
        self.max_events = self.max_events.max(o.events);
    }
}

impl Outcome {
    fn failed(error: String) -> Self {
        Self {
            ttft: None,
            gaps: Vec::new(),
            events: 0,
            done: false,
            error: Some(error),
        }
    }
}

/// Sends one streamed request on `conn` (or a new connection) and reads it to the end.
/// Returns the connection when it can carry another request.
async fn one_stream(target: &Target, conn: Option<Conn>, body: Bytes) -> (Option<Conn>, Outcome) {
    let mut conn = match conn {
        Some(c) if !c.is_closed() => c,
        _ => match Conn::open(target.addr()).await {
            Ok(c) => c,
            Err(e) => return (None, Outcome::failed(e.to_string())),
        },
    };
    let request = match target.request(body) {
        Ok(r) => r,
        Err(e) => return (Some(conn), Outcome::failed(e.to_string())),
    };
    let sent = Instant::now();
    let response = match conn.send(request).await {
        Ok(r) => r,
        Err(e) => return (None, Outcome::failed(e.to_string())),
    };
    let status = response.status();
    let mut body = response.into_body();
    let mut counter = SseCounter::default();
    let mut outcome = Outcome {
        ttft: None,
        gaps: Vec::with_capacity(32),
        events: 0,
        done: false,
        error: (!status.is_success()).then(|| format!("HTTP {status}")),
    };
    let mut last = sent;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                outcome.error.get_or_insert(e.to_string());
                return (None, outcome);
            }
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let events = counter.feed(data);
        if events == 0 {
            continue;
        }
        let now = Instant::now();
        if outcome.events == 0 {
            outcome.ttft = Some(now - sent);
        } else {
            outcome.gaps.push(now - last);
        }
        // Events that arrived in one read arrived together.
        let together = usize::try_from(events - 1).unwrap_or(0);
        outcome
            .gaps
            .extend(std::iter::repeat_n(Duration::ZERO, together));
        outcome.events += events;
        last = now;
    }
    outcome.done = counter.done;
    (Some(conn), outcome)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::bench::client::chat_body;
    use crate::mock::{Fault, MockConfig, MockServer};

    #[test]
    fn counts_events_across_reads_and_line_endings() {
        let mut c = SseCounter::default();
        assert_eq!(c.feed(b"data: {\"a\":1}\n\ndata: {\"b\""), 1);
        assert_eq!(c.feed(b":2}\n"), 0);
        assert_eq!(c.feed(b"\n: comment\r\n\r\n"), 2);
        assert!(!c.done);
        assert_eq!(c.feed(b"data: [DONE]\n\n"), 1);
        assert!(c.done);
        // Anthropic's end, and not an event that merely begins like it.
        let mut c = SseCounter::default();
        assert_eq!(c.feed(b"event: message_stopped\ndata: {}\n\n"), 1);
        assert!(!c.done);
        assert_eq!(
            c.feed(b"event: message_stop\r\ndata: {\"type\":\"message_stop\"}\n\n"),
            1
        );
        assert!(c.done);
        // Blank lines between events are not events.
        let mut c = SseCounter::default();
        assert_eq!(c.feed(b"\n\n\ndata: x\n\n\n"), 1);
    }

    fn runner(mock: &MockServer) -> StreamRunner {
        let target = Target::new(&mock.base_url(), None, "m", false).unwrap();
        StreamRunner::new(Arc::new(target), chat_body("m", true))
    }

    fn plan(streams: usize) -> StreamPlan {
        StreamPlan {
            streams,
            ramp: Duration::from_millis(50),
            expected_events: Some(3 + 4),
            timeout: Duration::from_secs(10),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn measures_every_event_of_every_stream() {
        let mock = MockServer::start_local(
            MockConfig::default()
                .with_chunk_count(3)
                .with_chunk_interval(Duration::from_millis(20)),
        )
        .unwrap();
        let mut runner = runner(&mock);
        for _ in 0..2 {
            let r = runner.round(plan(20)).await.unwrap();
            assert_eq!(r.completed, 20, "{:?}", r.first_error);
            // role, 3 content chunks, finish, usage, [DONE]
            assert_eq!((r.min_events, r.max_events, r.events_lost), (7, 7, 0));
            assert_eq!(r.ttft.count(), 20);
            assert_eq!(r.gaps.count(), 20 * 6);
            assert!(
                r.gaps.p50() >= Duration::from_millis(15),
                "{:?}",
                r.gaps.p50()
            );
            assert!(r.peak_concurrency > 1);
        }
        // The second round reused the first round's connections.
        assert_eq!(mock.stats().requests.chat_completions, 40);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cut_streams_count_as_lost_events() {
        let mock = MockServer::start_local(MockConfig::default().with_chunk_count(3)).unwrap();
        mock.set_fault(Fault::CutAfterChunks(2).times(1));
        let r = runner(&mock).round(plan(5)).await.unwrap();
        assert_eq!(r.completed, 4);
        assert_eq!(r.events_lost, 5);
        assert!(r.first_error.is_some());
    }
}
