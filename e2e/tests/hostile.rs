//! Hostile input: a corpus of malformed requests, each answered with the right
//! 4xx status and an OpenAI-style JSON error, while the proxy keeps serving; and the
//! attacks at every other edge (`docs/security.md`), one module each.

use crate::common;
#[path = "hostile/connections.rs"]
mod connections;
#[path = "hostile/exposure.rs"]
mod exposure;
#[path = "hostile/keys.rs"]
mod keys;
#[path = "hostile/logs.rs"]
mod logs;
#[path = "hostile/names.rs"]
mod names;
#[path = "hostile/slow.rs"]
mod slow;
#[path = "hostile/snapshot.rs"]
mod snapshot;
#[path = "hostile/tokens.rs"]
mod tokens;

use common::Cluster;

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    auth: Option<String>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
}

#[tokio::test]
async fn every_malformed_request_gets_the_right_4xx_and_the_proxy_keeps_serving() {
    let (cluster, _mock, key) = Cluster::with_one_backend().await;
    let proxy = cluster.proxy().await;
    let bearer = Some(format!("Bearer {key}"));
    let chat = "/v1/chat/completions";
    let json = Some("application/json");
    let case = |name, method, path, auth: Option<String>, body: &[u8], status| Case {
        name,
        method,
        path,
        auth,
        content_type: json,
        body: body.to_vec(),
        status,
    };
    let cases = vec![
        case(
            "broken json",
            "POST",
            chat,
            bearer.clone(),
            b"{\"model\":",
            400,
        ),
        case(
            "not an object",
            "POST",
            chat,
            bearer.clone(),
            b"[1,2,3]",
            400,
        ),
        case("empty body", "POST", chat, bearer.clone(), b"", 400),
        case(
            "missing model",
            "POST",
            chat,
            bearer.clone(),
            br#"{"messages":[]}"#,
            400,
        ),
        case(
            "model is a number",
            "POST",
            chat,
            bearer.clone(),
            br#"{"model":42,"messages":[]}"#,
            400,
        ),
        case(
            "model is null",
            "POST",
            chat,
            bearer.clone(),
            br#"{"model":null,"messages":[]}"#,
            400,
        ),
        case(
            "empty model",
            "POST",
            chat,
            bearer.clone(),
            br#"{"model":"","messages":[]}"#,
            400,
        ),
        case(
            "stream is a string",
            "POST",
            chat,
            bearer.clone(),
            br#"{"model":"m","stream":"yes","messages":[]}"#,
            400,
        ),
        case(
            "stream_options is a list",
            "POST",
            chat,
            bearer.clone(),
            br#"{"model":"m","stream":true,"stream_options":[1],"messages":[]}"#,
            400,
        ),
        case(
            "invalid utf-8",
            "POST",
            chat,
            bearer.clone(),
            b"{\"model\":\"m\xff\xfe\",\"messages\":[]}",
            400,
        ),
        case(
            "absurd n",
            "POST",
            chat,
            bearer.clone(),
            br#"{"model":"m","n":1000000000,"messages":[{"role":"user","content":"x"}]}"#,
            400,
        ),
        case(
            "absurd max_tokens type",
            "POST",
            chat,
            bearer.clone(),
            br#"{"model":"m","max_tokens":"lots","messages":[{"role":"user","content":"x"}]}"#,
            400,
        ),
        case(
            "no auth",
            "POST",
            chat,
            None,
            br#"{"model":"m","messages":[]}"#,
            401,
        ),
        case(
            "basic auth",
            "POST",
            chat,
            Some("Basic dXNlcjpwYXNz".into()),
            br#"{"model":"m"}"#,
            401,
        ),
        case(
            "bearer without key",
            "POST",
            chat,
            Some("Bearer ".into()),
            br#"{"model":"m"}"#,
            401,
        ),
        case(
            "unknown key",
            "POST",
            chat,
            Some("Bearer sk-sluice-nope".into()),
            br#"{"model":"m"}"#,
            401,
        ),
        case(
            "key with junk",
            "POST",
            chat,
            Some(format!("Bearer {key} extra")),
            br#"{"model":"m"}"#,
            401,
        ),
        case(
            "unknown endpoint",
            "POST",
            "/v1/chat/complete",
            bearer.clone(),
            br#"{"model":"m"}"#,
            404,
        ),
        case(
            "no v1 prefix",
            "POST",
            "/chat/completionz",
            bearer.clone(),
            br#"{"model":"m"}"#,
            404,
        ),
        case(
            "path traversal",
            "GET",
            "/v1/../../etc/passwd",
            bearer.clone(),
            b"",
            404,
        ),
        case(
            "wrong method on chat",
            "GET",
            chat,
            bearer.clone(),
            b"",
            405,
        ),
        case(
            "wrong method on models",
            "DELETE",
            "/v1/models",
            bearer.clone(),
            b"",
            405,
        ),
        case(
            "unknown model",
            "POST",
            chat,
            bearer.clone(),
            br#"{"model":"nope","messages":[]}"#,
            404,
        ),
    ];
    let http = reqwest::Client::new();
    for c in cases {
        let method = reqwest::Method::from_bytes(c.method.as_bytes()).unwrap();
        let mut request = http.request(method, proxy.url(c.path)).body(c.body.clone());
        if let Some(auth) = &c.auth {
            request = request.header("authorization", auth);
        }
        if let Some(ct) = c.content_type {
            request = request.header("content-type", ct);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert_eq!(response.status().as_u16(), c.status, "{}", c.name);
        let text = response.text().await.unwrap();
        let body: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {text}", c.name));
        let error = &body["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}: {body}",
            c.name
        );
        assert!(error["type"].is_string(), "{}: {body}", c.name);
        assert!(
            error.get("param").is_some() && error.get("code").is_some(),
            "{}: {body}",
            c.name
        );
        assert!(
            !text.contains(&key),
            "{}: the key leaked into an error",
            c.name
        );
        // Still serving after each one.
        assert_eq!(
            proxy.chat(&key, "m").await.status(),
            200,
            "after {}",
            c.name
        );
    }

    // A body over the limit: the proxy answers 413 from the Content-Length alone and closes,
    // so the client must not insist on uploading all of it (as a browser or SDK with
    // `Expect: 100-continue` would not); send the head and read the answer.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{{\"model\":\"m\",",
        17 * 1024 * 1024
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");
    assert_eq!(
        proxy.chat(&key, "m").await.status(),
        200,
        "after the huge body"
    );
}
