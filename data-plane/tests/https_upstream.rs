//! What happens to requests when the provider is reached over TLS, as every hosted provider
//! is: an `https://` backend goes through hyper-util's pooled client, not the thread's own
//! connections that `http://` backends (and so every other test) use. Against the mock
//! provider serving TLS with a CA of the test's own (`--upstream-ca`).

use crate::support;

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use sluice_e2e::mock::{Fault, MockConfig, MockServer};
use sluice_proto::v1::{self as proto, ErrorKind};
use support::harness::*;

/// A mock provider of `config` serving `https://`, and the directory of the CA it uses.
fn tls_mock(config: MockConfig) -> (MockServer, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    let mock = MockServer::start_tls_in(config, certs.path()).unwrap();
    assert!(mock.base_url().starts_with("https://"));
    (mock, certs)
}

/// A data plane that trusts the CA in `certs`, holding `snapshot`.
async fn trusting(certs: &tempfile::TempDir, snapshot: proto::Snapshot) -> Harness {
    let ca = certs.path().join("ca.pem");
    Harness::start_with(snapshot, |c| c.upstream_ca = Some(ca)).await
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers()[name].to_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_whole_answer_and_a_stream_over_https_are_relayed_and_charged() {
    let (primary, certs) = tls_mock(MockConfig::named("primary"));
    let h = trusting(&certs, one_primary_snapshot(&primary.base_url())).await;
    for stream in [false, true] {
        let response = h.chat(chat_body(stream)).await;
        assert_eq!(response.status(), 200, "stream {stream}");
        let body = response.text().await.unwrap();
        assert!(body.contains("[primary]"), "{body}");
    }
    let records = h.records(2).await;
    for record in &records {
        assert_eq!(
            record.error_kind,
            ErrorKind::Unspecified as i32,
            "{record:?}"
        );
        assert!(!record.tokens_estimated, "the provider's usage, {record:?}");
        assert!(record.prompt_tokens > 0 && record.completion_tokens > 0);
    }
    assert_eq!(primary.stats().requests.chat_completions, 2);
}

/// A 429 over TLS fails over and cools the backend, as over plain HTTP.
#[tokio::test]
async fn a_429_over_https_fails_over_and_cools_the_backend() {
    let (primary, certs) = tls_mock(MockConfig::named("primary"));
    let fallback = MockServer::start_local(MockConfig::named("fallback")).unwrap();
    primary.set_fault(Fault::rate_limited(30).always());
    let backends = vec![
        backend("primary", &primary.base_url(), proto::Pool::Primary, 0),
        backend("fallback", &fallback.base_url(), proto::Pool::Fallback, 0),
    ];
    let h = trusting(&certs, snapshot(1, backends)).await;
    for attempts in ["2", "1"] {
        let response = h.chat(chat_body(false)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
        assert_eq!(header(&response, "x-sluice-attempts"), attempts);
    }
    assert_eq!(primary.stats().requests.chat_completions, 1);
}

/// A stream the TLS provider cuts midway ends with Sluice's error event and is charged what
/// was streamed.
#[tokio::test]
async fn a_stream_cut_over_https_ends_with_an_error_event_and_is_charged() {
    let (primary, certs) = tls_mock(MockConfig::named("primary"));
    primary.set_fault(Fault::CutAfterChunks(3).times(1));
    let h = trusting(&certs, one_primary_snapshot(&primary.base_url())).await;
    let body = h.chat(chat_body(true)).await.text().await.unwrap();
    let last = body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .last()
        .unwrap();
    let last: Value = serde_json::from_str(last).unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted", "{body}");
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::StreamInterrupted as i32);
    assert!(
        record.tokens_estimated && record.completion_tokens >= 2,
        "{record:?}"
    );
}

/// A client that leaves a stream over TLS cancels the provider's generation and is recorded.
#[tokio::test]
async fn a_client_leaving_a_stream_over_https_cancels_the_upstream() {
    let slow = MockConfig::named("primary")
        .with_chunk_count(200)
        .with_chunk_interval(Duration::from_millis(50));
    let (primary, certs) = tls_mock(slow);
    let h = trusting(&certs, one_primary_snapshot(&primary.base_url())).await;
    let mut body = h.chat(chat_body(true)).await.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(body);
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::ClientCancelled as i32);
    wait_for_an_aborted_stream(&primary).await;
}

/// A provider that resets the connection after reading the request: over TLS, on hyper-util's
/// pool, a connection lost after sending: failed over, and alone a 502 the client is told not
/// to retry (the provider may be generating it).
#[tokio::test]
async fn a_connection_reset_after_the_request_over_https_is_lost_after_sending() {
    let (primary, certs) = tls_mock(MockConfig::named("primary"));
    let fallback = MockServer::start_local(MockConfig::named("fallback")).unwrap();
    primary.set_fault(Fault::Reset.times(1));
    let backends = vec![
        backend("primary", &primary.base_url(), proto::Pool::Primary, 0),
        backend("fallback", &fallback.base_url(), proto::Pool::Fallback, 0),
    ];
    let h = trusting(&certs, snapshot(1, backends)).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-sluice-backend"), "fallback-name");
    assert_eq!(header(&response, "x-sluice-attempts"), "2");

    let alone = trusting(&certs, one_primary_snapshot(&primary.base_url())).await;
    primary.set_fault(Fault::Reset.times(1));
    assert_connection_lost(alone.chat(chat_body(false)).await).await;
}
