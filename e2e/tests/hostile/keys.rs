//! A backend's key echoed by its upstream: a provider that quotes the key it received in an
//! error ("Incorrect API key provided: sk-…") must not hand it to Sluice's clients, whether
//! the error is passed on as the answer (a 4xx) or as the last failure (429, 5xx), streamed
//! or not; nor may it reach the data plane's log.

use sluice_e2e::mock::Fault;
use sluice_proto::v1 as pb;

use crate::common::{Cluster, Mock};

#[tokio::test]
async fn a_key_the_upstream_echoes_never_reaches_the_client() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    let upstream_key = mock.api_key.clone().unwrap();
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;

    // First (before the 429 below cools the backend down).
    mock.set_faults(vec![Fault::EchoKey { code: 401 }.always()])
        .await;
    let refused = proxy
        .post(
            "/v1/chat/completions",
            &key,
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(refused.status().as_u16(), 502);
    let body = refused.text().await.unwrap();
    assert!(!body.contains(&upstream_key[..12]), "{body}");
    assert!(body.contains("upstream_auth_failed"), "{body}");
    // 400 is passed on as it came, 503 and 429 as the last failure; a 401 (the provider
    // refusing the key, here echoing it) is Sluice's own 502, with no provider text at all.
    for (code, stream) in [(400, false), (400, true), (503, false), (429, true)] {
        mock.set_faults(vec![Fault::EchoKey { code }.always()])
            .await;
        let response = proxy
            .post(
                "/v1/chat/completions",
                &key,
                serde_json::json!({"model": "m", "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(response.status().as_u16(), code, "{code} stream={stream}");
        let body = response.text().await.unwrap();
        assert!(
            !body.contains(&upstream_key) && !body.contains(&upstream_key[..12]),
            "{code} stream={stream}: the backend's key reached the client: {body}"
        );
        // Still the upstream's own error, less the key.
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .split(". ")
                .next(),
            Some("Incorrect API key provided: [REDACTED]"),
            "{body}"
        );
    }
    let log = proxy.child.output().join("\n");
    assert!(!log.contains(&upstream_key), "the key is in the log");
}
