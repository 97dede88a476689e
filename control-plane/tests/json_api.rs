//! The JSON API the dashboard speaks (`POST /api/sluice.v1.<Service>/<Method>`), driven
//! over real HTTP: the same auth, validation and data as gRPC, proto3 JSON both ways,
//! one error shape, and the security headers on every answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use prost::Message as _;
use serde_json::{Value, json};
use sluice_control::testing::{Bearer, TestControlPlane};
use sluice_proto::v1 as pb;
use sluice_proto::v1::admin_service_client::AdminServiceClient;
use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;
use tonic::transport::Channel;

const XSS: &str = "<img src=x onerror=alert(1)>";

struct Api {
    cp: TestControlPlane,
    http: reqwest::Client,
}

impl Api {
    async fn start(dir: &tempfile::TempDir) -> Self {
        Self {
            cp: TestControlPlane::start(dir.path()).await.unwrap(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.cp.http_url)
    }

    /// POSTs `body` with the admin token; returns the status and the JSON answer.
    async fn call(&self, method: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(&format!("/api/sluice.v1.{method}")))
            .bearer_auth(&self.cp.admin_token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(
            r.headers()["content-type"],
            "application/json",
            "{method} answers JSON"
        );
        (status, r.json().await.unwrap())
    }

    async fn ok(&self, method: &str, body: Value) -> Value {
        let (status, answer) = self.call(method, body).await;
        assert_eq!(status, 200, "{method}: {answer}");
        answer
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.cp.grpc_url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

fn backend_json(name: &str) -> Value {
    json!({
        "name": name,
        "baseUrl": "https://api.example.com/v1",
        "pool": "POOL_PRIMARY",
        "priority": 10,
        "weight": 2,
        "rpmLimit": 500,
        "enabled": true,
        "models": [{"name": "gpt-4o-mini", "upstreamName": "gpt-4o-mini-2024",
                    "inputPricePerMtok": 0.15, "outputPricePerMtok": 0.6}],
    })
}

#[tokio::test]
async fn every_call_needs_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir).await;
    let url = api.url("/api/sluice.v1.AdminService/ListBackends");
    for auth in [
        None,
        Some("Bearer wrong-token"),
        Some("test-admin-token-0123456789abcdef0123456789"),
    ] {
        let mut request = api.http.post(&url).body("{}");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "UNAUTHENTICATED");
        assert!(body["message"].as_str().unwrap().contains("admin token"));
    }
    // The data-plane token is not the admin token.
    let r = api
        .http
        .post(api.url("/api/sluice.v1.StatsService/GetTotals"))
        .bearer_auth(&api.cp.dataplane_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Auth is checked before the body is read.
    let r = api.http.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn validation_errors_are_the_grpc_ones() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir).await;
    let mut grpc = AdminServiceClient::with_interceptor(
        api.channel().await,
        Bearer(api.cp.admin_token.clone()),
    );

    let mut bad_url = backend_json("bad-url");
    bad_url["baseUrl"] = json!("ftp://example.com/v1");
    let mut bad_price = backend_json("bad-price");
    bad_price["models"][0]["outputPricePerMtok"] = json!(-1.0);
    let mut no_name = backend_json("");
    no_name["name"] = json!("  ");
    for (what, body) in [
        ("bad url", json!({"backend": bad_url})),
        ("negative price", json!({"backend": bad_price})),
        ("blank name", json!({"backend": no_name})),
        ("no backend", json!({})),
    ] {
        let request: pb::CreateBackendRequest = serde_json::from_value(body.clone()).unwrap();
        let status = grpc.create_backend(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{what}");
        let (http, answer) = api.call("AdminService/CreateBackend", body).await;
        assert_eq!(http, 400, "{what}");
        assert_eq!(answer["code"], "INVALID_ARGUMENT", "{what}");
        assert_eq!(answer["message"], status.message(), "{what}");
    }
    let (_, answer) = api
        .call("AdminService/CreateBackend", json!({"backend": bad_url}))
        .await;
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .starts_with("backend.base_url: "),
        "the message names the field first: {answer}"
    );

    // Stats validation too.
    let (http, answer) = api
        .call(
            "StatsService/GetTotals",
            json!({"startTime": "2025-01-02T00:00:00Z", "endTime": "2025-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(http, 400);
    assert_eq!(answer["message"], "end_time: must not be before start_time");
}

#[tokio::test]
async fn backends_are_created_listed_updated_and_deleted_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir).await;

    let created = api
        .ok(
            "AdminService/CreateBackend",
            json!({"backend": backend_json("openai-main"), "apiKey": "sk-provider-secret-9876"}),
        )
        .await;
    let b = &created["backend"];
    let id = b["id"].as_str().unwrap().to_owned();
    assert_eq!(b["name"], "openai-main");
    assert_eq!(b["baseUrl"], "https://api.example.com/v1");
    assert_eq!(b["pool"], "POOL_PRIMARY");
    assert_eq!(b["weight"], 2);
    assert_eq!(b["rpmLimit"], 500);
    assert_eq!(b["enabled"], true);
    assert_eq!(b["apiKeyHint"], "9876");
    assert_eq!(b["models"][0]["upstreamName"], "gpt-4o-mini-2024");
    assert_eq!(b["models"][0]["outputPricePerMtok"], 0.6);
    chrono_like(b["createTime"].as_str().unwrap());
    assert!(!created.to_string().contains("sk-provider-secret"));

    // Same name again: 409.
    let (http, answer) = api
        .call(
            "AdminService/CreateBackend",
            json!({"backend": backend_json("openai-main")}),
        )
        .await;
    assert_eq!(
        (http, answer["code"].as_str()),
        (409, Some("ALREADY_EXISTS"))
    );

    // An empty body is `{}`.
    let r = api
        .http
        .post(api.url("/api/sluice.v1.AdminService/ListBackends"))
        .bearer_auth(&api.cp.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let listed: Value = r.json().await.unwrap();
    assert_eq!(listed["backends"].as_array().unwrap().len(), 1);
    assert_eq!(listed["backends"][0]["id"], id.as_str());

    // Update through a field mask in its JSON form (comma-separated camelCase paths). To
    // another host, the provider key is given again.
    let update = json!({
        "backend": {"id": "openai-main", "priority": 3, "baseUrl": "http://10.0.0.1:8000/v1",
                    "enabled": false, "rpmLimit": 9999},
        "updateMask": "priority,baseUrl,enabled",
    });
    let (status, body) = api.call("AdminService/UpdateBackend", update.clone()).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().starts_with("api_key:"),
        "{body}"
    );
    let mut update = update;
    update["apiKey"] = json!("sk-provider-secret-5678");
    let updated = api.ok("AdminService/UpdateBackend", update).await;
    let b = &updated["backend"];
    assert_eq!(b["priority"], 3);
    assert_eq!(b["baseUrl"], "http://10.0.0.1:8000/v1");
    assert_eq!(b.get("enabled"), None, "false is the default and omitted");
    assert_eq!(b["rpmLimit"], 500, "not in the mask, not changed");

    let got = api.ok("AdminService/GetBackend", json!({"id": id})).await;
    assert_eq!(got["backend"]["priority"], 3);

    api.ok("AdminService/DeleteBackend", json!({"id": "openai-main"}))
        .await;
    let (http, answer) = api.call("AdminService/GetBackend", json!({"id": id})).await;
    assert_eq!((http, answer["code"].as_str()), (404, Some("NOT_FOUND")));
    let listed = api.ok("AdminService/ListBackends", json!({})).await;
    assert_eq!(listed, json!({}), "an empty list is omitted: {listed}");
}

/// An RFC 3339 time in UTC (pbjson writes `+00:00` rather than `Z`; both parse).
fn chrono_like(s: &str) {
    assert!(
        s.len() >= 20 && (s.ends_with('Z') || s.ends_with("+00:00")) && s.as_bytes()[10] == b'T',
        "not an RFC 3339 time: {s}"
    );
}

#[tokio::test]
async fn names_are_stored_and_returned_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir).await;
    api.ok(
        "AdminService/CreateBackend",
        json!({"backend": backend_json(XSS)}),
    )
    .await;
    let r = api
        .http
        .post(api.url("/api/sluice.v1.AdminService/ListBackends"))
        .bearer_auth(&api.cp.admin_token)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let listed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(listed["backends"][0]["name"], XSS);
    // Served as JSON, never as HTML.
    assert!(
        text.contains(r#""name":"<img src=x onerror=alert(1)>""#),
        "{text}"
    );
    let got = api.ok("AdminService/GetBackend", json!({"id": XSS})).await;
    assert_eq!(got["backend"]["name"], XSS);
}

#[tokio::test]
async fn client_keys_cooldowns_replicas_and_settings_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir).await;
    let created = api
        .ok(
            "AdminService/CreateClientKey",
            json!({"name": "team-a", "allowedModels": ["gpt-4o-mini"], "rpmLimit": 60}),
        )
        .await;
    let key = created["key"].as_str().unwrap();
    assert!(key.starts_with("sk-sluice-"), "{key}");
    let listed = api.ok("AdminService/ListClientKeys", json!({})).await;
    assert_eq!(listed["clientKeys"][0]["name"], "team-a");
    assert!(!listed.to_string().contains(key), "the key is shown once");
    api.ok("AdminService/RevokeClientKey", json!({"id": "team-a"}))
        .await;
    let listed = api.ok("AdminService/ListClientKeys", json!({})).await;
    assert_eq!(listed["clientKeys"][0]["revoked"], true);
    chrono_like(listed["clientKeys"][0]["revokeTime"].as_str().unwrap());

    let settings = api.ok("AdminService/GetSettings", json!({})).await;
    assert!(
        settings["settings"]["cooldownBase"]
            .as_str()
            .unwrap()
            .ends_with('s'),
        "Durations are strings like \"1.5s\": {settings}"
    );
    let updated = api
        .ok(
            "AdminService/UpdateSettings",
            json!({"settings": {"maxAttempts": 5, "cooldownCap": "90s"},
                   "updateMask": "maxAttempts,cooldownCap"}),
        )
        .await;
    assert_eq!(updated["settings"]["maxAttempts"], 5);
    assert_eq!(updated["settings"]["cooldownCap"], "90s");

    assert_eq!(
        api.ok("AdminService/ListDataPlanes", json!({})).await,
        json!({})
    );
    assert_eq!(
        api.ok("AdminService/ListCooldowns", json!({})).await,
        json!({})
    );
    let (http, answer) = api
        .call("AdminService/ResetCooldown", json!({"backendId": "nope"}))
        .await;
    assert_eq!(http, 404, "{answer}");
}

/// Reports usage the way a data plane does and waits for the ack.
async fn report_usage(api: &Api, backend_id: &str, records: u64) {
    let mut client = DataPlaneServiceClient::with_interceptor(
        api.channel().await,
        Bearer(api.cp.dataplane_token.clone()),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let batch = pb::ReportUsageRequest {
        node_id: "replica-1".into(),
        incarnation: "inc-1".into(),
        records: (1..=records)
            .map(|seq| pb::UsageRecord {
                sequence: seq,
                request_id: format!("r{seq}"),
                backend_id: backend_id.into(),
                model: "gpt-4o-mini".into(),
                prompt_tokens: 1000,
                completion_tokens: 500,
                latency: Some(sluice_proto::wkt::Duration {
                    seconds: 0,
                    nanos: 120_000_000,
                }),
                status_code: if seq == 1 { 502 } else { 200 },
                time: Some(sluice_proto::wkt::Timestamp {
                    seconds: now - 60,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .collect(),
        events: vec![],
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(batch).await.unwrap();
    let mut acks = client
        .report_usage(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let ack = acks.message().await.unwrap().unwrap();
    assert_eq!(ack.acked_sequence, records);
}

#[tokio::test]
async fn totals_and_usage_have_the_proto3_json_shape() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir).await;
    // Zero figures are omitted; the currency of the (empty) cost is not.
    assert_eq!(
        api.ok("StatsService/GetTotals", json!({})).await,
        json!({"currency": "USD"})
    );

    let created = api
        .ok(
            "AdminService/CreateBackend",
            json!({"backend": backend_json("alpha")}),
        )
        .await;
    let id = created["backend"]["id"].as_str().unwrap().to_owned();
    report_usage(&api, &id, 4).await;

    let since = json!({"startTime": "2000-01-01T00:00:00Z"});
    let totals = api.ok("StatsService/GetTotals", since.clone()).await;
    // 64-bit integers are strings in proto3 JSON; doubles are numbers.
    assert_eq!(totals["requestCount"], "4");
    assert_eq!(totals["errorCount"], "1");
    assert_eq!(totals["promptTokens"], "4000");
    assert_eq!(totals["totalTokens"], "6000");
    assert_eq!(totals["errorRate"], 0.25);
    let cost = totals["cost"].as_f64().unwrap();
    assert!(
        (cost - 4.0 * (1000.0 * 0.15 + 500.0 * 0.6) / 1e6).abs() < 1e-9,
        "{cost}"
    );
    assert!(totals["p95LatencyMs"].as_f64().unwrap() > 0.0);

    let usage = api
        .ok(
            "StatsService/GetUsage",
            json!({"startTime": "2000-01-01T00:00:00Z", "granularity": "GRANULARITY_HOUR",
                   "groupBy": "GROUP_BY_BACKEND"}),
        )
        .await;
    let buckets = usage["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 1, "{usage}");
    let bucket = &buckets[0];
    assert_eq!(bucket["groupKey"], id.as_str());
    assert_eq!(bucket["groupLabel"], "alpha");
    assert_eq!(bucket["requestCount"], "4");
    assert_eq!(bucket["backendCount"], "1");
    assert_eq!(bucket["currency"], "USD");
    let start = bucket["startTime"].as_str().unwrap();
    chrono_like(start);
    assert_eq!(&start[13..19], ":00:00", "an hour's start: {start}");

    // Enum values may also be given as numbers, field names in snake_case.
    let daily = api
        .ok(
            "StatsService/GetUsage",
            json!({"start_time": "2000-01-01T00:00:00Z", "granularity": 2}),
        )
        .await;
    let day = daily["buckets"][0]["startTime"].as_str().unwrap();
    assert_eq!(&day[10..19], "T00:00:00", "a day's start: {day}");
    let (http, answer) = api
        .call(
            "StatsService/GetUsage",
            json!({"groupBy": "GROUP_BY_COLOR"}),
        )
        .await;
    assert_eq!(
        (http, answer["code"].as_str()),
        (400, Some("INVALID_ARGUMENT"))
    );
}

#[tokio::test]
async fn http_level_errors_are_json_too() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir).await;

    let r = api
        .http
        .get(api.url("/api/sluice.v1.AdminService/ListBackends"))
        .bearer_auth(&api.cp.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let body: Value = r.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("POST"));

    for path in [
        "AdminService/DropDatabase",
        "StatsService/ListBackends",
        "DataPlaneService/StreamSnapshots",
    ] {
        let (http, answer) = api.call(path, json!({})).await;
        assert_eq!(http, 404, "{path}");
        assert_eq!(answer["code"], "NOT_FOUND", "{path}");
    }

    let r = api
        .http
        .post(api.url("/api/sluice.v1.AdminService/CreateBackend"))
        .bearer_auth(&api.cp.admin_token)
        .body("{\"backend\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "INVALID_ARGUMENT");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("request body: ")
    );

    let (http, answer) = api
        .call(
            "AdminService/CreateBackend",
            json!({"backend": {"pool": "POOL_DEEP"}}),
        )
        .await;
    assert_eq!(http, 400, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .starts_with("request body: backend.pool: "),
        "{answer}"
    );

    // A number its field cannot hold is refused naming the field, not "data did not match any
    // variant of untagged enum Content".
    for (path, body, field) in [
        (
            "AdminService/CreateBackend",
            json!({"backend": {"name": "b", "rpmLimit": 5_000_000_000_u64}}),
            "backend.rpmLimit",
        ),
        (
            "AdminService/CreateBackend",
            json!({"backend": {"name": "b", "priority": 3_000_000_000_u64}}),
            "backend.priority",
        ),
        (
            "AdminService/CreateClientKey",
            json!({"name": "k", "rpmLimit": -1}),
            "rpmLimit",
        ),
    ] {
        let (http, answer) = api.call(path, body).await;
        assert_eq!(http, 400, "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert_eq!(
            message,
            format!(
                "request body: {field}: must be a number of the field's type within its range \
                 (limits and counts are whole numbers of 32 bits)"
            ),
        );
    }

    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(1024 * 1024 + 1));
    let r = api
        .http
        .post(api.url("/api/sluice.v1.AdminService/CreateClientKey"))
        .bearer_auth(&api.cp.admin_token)
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "RESOURCE_EXHAUSTED");
}

#[tokio::test]
async fn every_admin_and_stats_rpc_is_reachable_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir).await;
    let set = prost_types::FileDescriptorSet::decode(sluice_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut seen = 0;
    for service in set.file.iter().flat_map(|f| &f.service) {
        let name = service.name();
        if name != "AdminService" && name != "StatsService" {
            continue;
        }
        for method in &service.method {
            let path = format!("{name}/{}", method.name());
            let (http, answer) = api.call(&path, json!({})).await;
            let message = answer["message"].as_str().unwrap_or("");
            assert!(
                !message.starts_with("unknown"),
                "{path} is not dispatched: {http} {answer}"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 18, "16 admin and 2 stats methods");
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir).await;
    for (method, path, status) in [
        ("GET", "/", 200),
        ("GET", "/ui/app.js", 200),
        ("GET", "/ui/app.css", 200),
        ("GET", "/healthz", 200),
        ("GET", "/metrics", 200),
        ("GET", "/no/such/page", 404),
        ("POST", "/api/sluice.v1.AdminService/ListBackends", 200),
        ("POST", "/api/sluice.v1.StatsService/GetTotals", 401),
        ("POST", "/api/nothing", 404),
    ] {
        let mut request = api.http.request(method.parse().unwrap(), api.url(path));
        if path.ends_with("ListBackends") {
            request = request.bearer_auth(&api.cp.admin_token);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
        let h = r.headers();
        assert_eq!(
            h["content-security-policy"],
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            "{path}"
        );
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
        if path.starts_with("/api/") {
            assert_eq!(h["cache-control"], "no-store", "{path}");
        }
    }
    let r = api.http.get(api.url("/")).send().await.unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = r.text().await.unwrap();
    assert!(html.contains("/ui/app.js") && html.contains("/ui/app.css"));
    let js = api.http.get(api.url("/ui/app.js")).send().await.unwrap();
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
}

/// Writes a request head declaring a megabyte of body and one byte of it, then sends no
/// more; returns the status line of the answer, or `None` if none came within `wait`.
async fn status_of_a_stalled_body(
    http_url: &str,
    authorization: Option<&str>,
    wait: Duration,
) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = http_url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let authorization = authorization
        .map(|token| format!("authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST /api/sluice.v1.AdminService/ListBackends HTTP/1.1\r\nhost: localhost\r\n\
         {authorization}content-type: application/json\r\ncontent-length: 1048576\r\n\r\n{{"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(wait, tcp.read(&mut answer))
        .await
        .ok()?;
    let read = read.unwrap();
    Some(
        String::from_utf8_lossy(&answer[..read])
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// Without the token, the body is not read at all: the answer comes at once, whatever the
/// body does. (Read first, a client without the token could hold a megabyte of memory on
/// every connection and h2 stream for as long as it liked.)
#[tokio::test]
async fn a_request_without_the_token_is_refused_before_its_body_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let api = Api::start(&dir).await;
    let status = status_of_a_stalled_body(&api.cp.http_url, None, Duration::from_secs(10))
        .await
        .expect("answered without waiting for the body");
    assert!(status.contains(" 401 "), "{status}");
}

/// With the token, a body that stops arriving is answered 408 once the body read timeout
/// (the listener's header read timeout) passes.
#[tokio::test]
async fn a_body_that_stops_arriving_is_answered_408() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start_with_http(
        dir.path(),
        sluice_control::server::HttpOptions {
            header_read_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let status =
        status_of_a_stalled_body(&cp.http_url, Some(&cp.admin_token), Duration::from_secs(20))
            .await
            .expect("answered once the body read timeout passed");
    assert!(status.contains(" 408 "), "{status}");
}
