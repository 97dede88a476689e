//! A data plane running in-process against the fake control plane, with snapshot builders
//! and an echo upstream that shows what the proxy sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use sluice_proto::v1 as proto;
use sluice_proxy::config::Secret;
use sluice_proxy::snapshot::SnapshotStore;
use sluice_proxy::usage::UsageSink;
use sluice_proxy::{Config, Proxy, RunError};
use tokio::sync::oneshot;

use super::control_plane::{FakeControlPlane, TOKEN};

pub const KEY: &str = "sk-sluice-test-key";
pub const KEY_ID: &str = "key-1";
pub const MODEL: &str = "gpt-4o-mini";

pub fn backend(
    id: &str,
    base_url: &str,
    pool: proto::Pool,
    priority: i32,
) -> proto::SnapshotBackend {
    proto::SnapshotBackend {
        id: id.into(),
        name: format!("{id}-name"),
        base_url: base_url.into(),
        pool: pool as i32,
        priority,
        weight: 1,
        models: vec![proto::ModelRoute {
            name: MODEL.into(),
            upstream_name: format!("{MODEL}-at-{id}"),
            ..Default::default()
        }],
        api_key: format!("sk-upstream-{id}"),
        ..Default::default()
    }
}

pub fn client_key(
    id: &str,
    plaintext: &str,
    allowed: &[&str],
    rpm: u32,
) -> proto::SnapshotClientKey {
    proto::SnapshotClientKey {
        id: id.into(),
        name: format!("{id}-name"),
        key_sha256: Sha256::digest(plaintext.as_bytes()).to_vec(),
        allowed_models: allowed.iter().map(|s| (*s).to_owned()).collect(),
        rpm_limit: rpm,
        expired: false,
        ..Default::default()
    }
}

/// Fast, deterministic retry policy for tests.
pub fn settings() -> proto::Settings {
    let d = |ms: u64| {
        Some(sluice_proxy::clock::proto_duration(Duration::from_millis(
            ms,
        )))
    };
    proto::Settings {
        max_attempts: 3,
        connect_timeout: d(1000),
        first_byte_timeout: d(5000),
        answer_timeout: d(5000),
        idle_stream_timeout: d(5000),
        request_timeout: d(20_000),
        cooldown_base: d(1000),
        cooldown_cap: d(60_000),
        failure_threshold: 3,
        retry_on_rate_limit: true,
        retry_on_server_error: true,
        retry_on_connect_error: true,
        retry_on_timeout: true,
        usage_retention_days: 0,
        // The tests tell which backend answered by `x-sluice-backend`.
        expose_backend_header: true,
        ..Default::default()
    }
}

pub fn snapshot(version: u64, backends: Vec<proto::SnapshotBackend>) -> proto::Snapshot {
    proto::Snapshot {
        version,
        nonce: format!("nonce-{version}"),
        create_time: None,
        backends,
        client_keys: vec![client_key(KEY_ID, KEY, &[], 0)],
        settings: Some(settings()),
        replica_count: 1,
        share_holders: Vec::new(),
        database_id: "database-1".into(),
        // A control plane that keeps a cooldown per model, as every current one does.
        model_cooldowns: true,
        epoch: "epoch-1".into(),
        affinity_keys: vec![proto::AffinityKey {
            id: 1,
            secret: vec![42; 32],
        }],
    }
}

pub struct Harness {
    pub cp: FakeControlPlane,
    pub addr: SocketAddr,
    pub store: Arc<SnapshotStore>,
    pub usage: UsageSink,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), RunError>>,
}

/// A snapshot (version 1) that routes to one primary backend, `primary`, at `base_url`.
pub fn one_primary_snapshot(base_url: &str) -> proto::Snapshot {
    snapshot(
        1,
        vec![backend("primary", base_url, proto::Pool::Primary, 0)],
    )
}

impl Harness {
    /// A data plane holding [`one_primary_snapshot`].
    pub async fn one_primary(base_url: &str) -> Self {
        Self::start(one_primary_snapshot(base_url)).await
    }

    /// A data plane that holds `snapshot` (waited for).
    pub async fn start(snapshot: proto::Snapshot) -> Self {
        Self::start_with(snapshot, |_| {}).await
    }

    pub async fn start_with(snapshot: proto::Snapshot, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_on(FakeControlPlane::start().await, snapshot, tweak).await
    }

    /// [`Harness::start_with`] against a control plane the test started.
    pub async fn start_on(
        cp: FakeControlPlane,
        snapshot: proto::Snapshot,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let version = snapshot.version;
        cp.publish(snapshot);
        let mut config = Config::new(cp.url(), "127.0.0.1:0".parse().unwrap());
        config.dataplane_token = Some(Secret(TOKEN.into()));
        config.node_id = Some("test-node".into());
        // Straight to the drain: the lame duck's tests set a delay.
        config.drain_delay = Duration::ZERO;
        tweak(&mut config);
        let proxy = Proxy::bind(config).await.unwrap();
        let addr = proxy.local_addr();
        let store = proxy.store();
        let usage = proxy.usage();
        let (tx, rx) = oneshot::channel();
        let server = tokio::spawn(proxy.serve(async move {
            let _ = rx.await;
        }));
        let harness = Self {
            cp,
            addr,
            store,
            usage,
            http: reqwest::Client::new(),
            shutdown: Some(tx),
            server,
        };
        harness.wait_version(version).await;
        harness
    }

    pub async fn wait_version(&self, version: u64) {
        let mut watch = self.store.watch();
        tokio::time::timeout(Duration::from_secs(10), watch.wait_for(|v| *v >= version))
            .await
            .unwrap_or_else(|_| panic!("snapshot {version} never applied"))
            .unwrap();
    }

    pub async fn publish(&self, snapshot: proto::Snapshot) {
        let version = snapshot.version;
        self.cp.publish(snapshot);
        self.wait_version(version).await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    pub async fn post(&self, path: &str, key: &str, body: &serde_json::Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn chat(&self, body: serde_json::Value) -> reqwest::Response {
        self.post("/v1/chat/completions", KEY, &body).await
    }

    /// Waits until the control plane has `n` usage records and returns them by sequence.
    pub async fn records(&self, n: usize) -> Vec<proto::UsageRecord> {
        self.cp
            .wait_for(&format!("{n} usage records"), |r| r.records().len() >= n)
            .await;
        self.cp.with(|r| r.records().into_iter().cloned().collect())
    }

    /// Waits until the control plane has a cooldown event and returns the first.
    pub async fn first_cooldown_event(&self) -> proto::BackendEvent {
        self.cp
            .wait_for("cooldown event", |r| !r.events.is_empty())
            .await;
        self.cp.with(|r| r.events[0].clone())
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn shutdown(mut self) -> Result<(), RunError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.server)
            .await
            .expect("shutdown took too long")
            .unwrap()
    }

    /// Starts shutting down without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn join(self) -> Result<(), RunError> {
        tokio::time::timeout(Duration::from_secs(30), self.server)
            .await
            .expect("shutdown took too long")
            .unwrap()
    }
}

/// The name of the backend that answered (`x-sluice-backend`, which the harness's
/// snapshots expose).
pub fn backend_name(response: &reqwest::Response) -> String {
    response.headers()["x-sluice-backend"]
        .to_str()
        .unwrap()
        .to_owned()
}

pub fn chat_body(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
    })
}

/// What the echo upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    /// Every header's name, in the order received.
    pub header_names: Vec<String>,
    pub body: Bytes,
}

/// Serves `app` on a port of its own on the loopback interface, for the rest of the test.
pub async fn serve_locally(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

/// An upstream that answers every request 200 with `events` as its event stream, whole, then
/// ends it: what a provider sends, event by event, with nothing Sluice's mock would add.
pub async fn sse_upstream(events: String) -> String {
    let app = axum::Router::new().fallback(move || {
        let events = events.clone();
        async move { ([(http::header::CONTENT_TYPE, "text/event-stream")], events) }
    });
    format!("http://{}/v1", serve_locally(app).await)
}

/// An upstream that records each request and answers with a fixed chat completion.
pub struct EchoUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl EchoUpstream {
    pub async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .fallback(echo)
            .with_state(Arc::clone(&seen));
        Self {
            addr: serve_locally(app).await,
            seen,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn echo(
    State(seen): State<Arc<Mutex<Vec<Seen>>>>,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    seen.lock().unwrap().push(Seen {
        path: uri.path().to_owned(),
        authorization: header("authorization"),
        content_type: header("content-type"),
        header_names: headers.keys().map(|name| name.to_string()).collect(),
        body,
    });
    axum::Json(serde_json::json!({
        "id": "chatcmpl-echo",
        "object": "chat.completion",
        "created": 0,
        "model": "echo",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "echo"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33}
    }))
}

/// An upstream that answers every request with a stream of these chunks, each its own chunk
/// of the chunked body (so each reaches the proxy as one piece or less): how an upstream
/// frames its events, which the proxy must read alike whatever it is.
pub struct SseUpstream {
    pub addr: SocketAddr,
}

impl SseUpstream {
    pub async fn start(chunks: Vec<Vec<u8>>) -> Self {
        let app = axum::Router::new().fallback(move || {
            let chunks = chunks.clone();
            async move {
                let frames = chunks
                    .into_iter()
                    .map(|chunk| Ok::<_, std::convert::Infallible>(Bytes::from(chunk)));
                (
                    [(http::header::CONTENT_TYPE, "text/event-stream")],
                    axum::body::Body::from_stream(futures::stream::iter(frames)),
                )
            }
        });
        Self {
            addr: serve_locally(app).await,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// Waits (up to 5 s) until `mock` has seen a stream of its aborted: the data plane dropped its
/// upstream call.
pub async fn wait_for_an_aborted_stream(mock: &sluice_e2e::mock::MockServer) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while mock.stats().streams_aborted == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream stream was never cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts `response` is the 502 of a connection lost after the request was sent: not to be
/// retried by the client (the provider may be generating it).
pub async fn assert_connection_lost(response: reqwest::Response) {
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-should-retry"], "false");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_connection_lost", "{body}");
}

/// An upstream that answers raw HTTP/1.1, each request with `answer` of its head, then closes
/// the connection (a stream ends without its last event).
pub async fn raw_upstream(answer: fn(&str) -> String) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = tcp.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let answer = answer(&String::from_utf8_lossy(&head));
                let _ = tcp.write_all(answer.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    format!("http://{addr}/v1")
}

/// A whole JSON answer of `body`.
pub fn json_answer(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}
