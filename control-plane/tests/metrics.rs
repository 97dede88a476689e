//! The dashboard's JSON API calls count in their own metric family, labelled like gRPC calls
//! (method from a fixed set, the gRPC code of the answer), driven over real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use sluice_control::testing::{TestControlPlane, metric_samples};

#[tokio::test]
async fn json_api_calls_count_by_method_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let http = reqwest::Client::new();
    let post = |path: &str, token: &str, body: serde_json::Value| {
        http.post(format!("{}/api/{path}", cp.http_url))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let admin = cp.admin_token.as_str();
    let backend = json!({
        "backend": {
            "name": "b1",
            "baseUrl": "https://api.example.com/v1",
            "pool": "POOL_PRIMARY",
            "weight": 1,
            "enabled": true,
            "models": [{"name": "m", "upstreamName": "m"}],
        },
        "apiKey": "sk-provider-secret-5555",
    });
    let status = |r: reqwest::Response| r.status().as_u16();
    let create = "sluice.v1.AdminService/CreateBackend";
    assert_eq!(status(post(create, admin, backend).await.unwrap()), 200);
    let bad = json!({"backend": {"name": "b2", "baseUrl": "not a url"}});
    assert_eq!(status(post(create, admin, bad).await.unwrap()), 400);
    let list = "sluice.v1.AdminService/ListBackends";
    assert_eq!(
        status(post(list, "wrong-token", json!({})).await.unwrap()),
        401
    );
    let totals = "sluice.v1.StatsService/GetTotals";
    assert_eq!(status(post(totals, admin, json!({})).await.unwrap()), 200);
    let get = http
        .get(format!("{}/api/{list}", cp.http_url))
        .send()
        .await
        .unwrap();
    assert_eq!(status(get), 405);
    for path in [
        "sluice.v1.AdminService/NoSuchMethod",
        "sluice.v1.DataPlaneService/ReportUsage",
        "made/up/path",
    ] {
        assert_eq!(status(post(path, admin, json!({})).await.unwrap()), 404);
    }

    let text = reqwest::get(format!("{}/metrics", cp.http_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m = metric_samples(&text);
    let calls = |method: &str, code: &str| {
        let name = format!(r#"sluice_json_api_requests_total{{method="{method}",code="{code}"}}"#);
        *m.get(&name)
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
    };
    assert_eq!(calls(create, "OK"), 1.0);
    assert_eq!(calls(create, "INVALID_ARGUMENT"), 1.0);
    assert_eq!(calls(list, "UNAUTHENTICATED"), 1.0);
    assert_eq!(calls(list, "UNIMPLEMENTED"), 1.0, "GET is refused");
    assert_eq!(calls(totals, "OK"), 1.0);
    assert_eq!(calls("unknown", "NOT_FOUND"), 3.0);
    assert_eq!(
        m[&format!(r#"sluice_json_api_request_duration_seconds_count{{method="{create}"}}"#)],
        2.0
    );
    assert!(!text.contains("NoSuchMethod") && !text.contains("made/up"));
    assert!(
        !text.contains(r#"sluice_grpc_requests_total{method="sluice.v1.AdminService"#),
        "JSON calls are not counted as gRPC calls"
    );
    assert!(
        m[r#"sluice_sqlite_write_seconds_count{op="admin"}"#] >= 1.0,
        "the backend write was timed"
    );
    assert!(!text.contains("sk-provider-secret-5555"));
    assert!(!text.contains(&cp.admin_token));
}
