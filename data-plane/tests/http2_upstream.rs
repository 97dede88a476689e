//! `--upstream-http2`: an `https://` provider that settles on HTTP/2 by ALPN (as Cloudflare,
//! in front of OpenAI and Anthropic, does) is spoken to over HTTP/2, and HTTP/2's own ways of
//! failing a request are told apart: a stream the server says it never processed
//! (`REFUSED_STREAM`, or left out of a graceful `GOAWAY`) is tried elsewhere at no cost, as
//! a refused connection is; a stream reset after the request went out may have been
//! generated, and billed, as a connection lost after sending is. Against the mock provider,
//! which serves HTTP/2 with hyper's server and sends the `GOAWAY` in raw frames.

use crate::support;

use serde_json::Value;
use sluice_e2e::mock::{Fault, MockConfig, MockServer};
use sluice_proto::v1::{self as proto, ErrorKind};
use support::harness::*;

/// HTTP/2's error codes (RFC 9113 §7).
const INTERNAL_ERROR: u32 = 0x2;
const REFUSED_STREAM: u32 = 0x7;

/// A mock provider of `config` serving `https://`, and the directory of the CA it uses.
fn tls_mock(name: &str) -> (MockServer, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    let mock = MockServer::start_tls_in(MockConfig::named(name), certs.path()).unwrap();
    (mock, certs)
}

/// A data plane that trusts the CA in `certs` and offers HTTP/2 upstream when `http2`.
async fn trusting(certs: &tempfile::TempDir, snapshot: proto::Snapshot, http2: bool) -> Harness {
    let ca = certs.path().join("ca.pem");
    Harness::start_with(snapshot, |c| {
        c.upstream_ca = Some(ca);
        c.upstream_http2 = http2;
    })
    .await
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// The TLS `primary` first, with a fee for the request itself (which a provider that may have
/// generated it may have billed), and a plain-HTTP `fallback` answering 503 (which bills
/// nothing): a record's cost is the primary's fee exactly when its attempt counts as billed.
fn priced_pair(primary: &MockServer, fallback: &MockServer) -> proto::Snapshot {
    let mut first = backend("primary", &primary.base_url(), proto::Pool::Primary, 0);
    first.models[0].call_prices = vec![proto::CallPrice {
        tool: "request".into(),
        price_per_thousand_calls: 30.0,
    }];
    let second = backend("fallback", &fallback.base_url(), proto::Pool::Fallback, 0);
    fallback.set_fault(Fault::status(503).always());
    snapshot(1, vec![first, second])
}

#[tokio::test]
async fn whole_answers_and_streams_go_over_http2_when_it_is_offered() {
    let (primary, certs) = tls_mock("primary");
    let h = trusting(&certs, one_primary_snapshot(&primary.base_url()), true).await;
    for stream in [false, true] {
        let response = h.chat(chat_body(stream)).await;
        assert_eq!(response.status(), 200, "stream {stream}");
        let body = response.text().await.unwrap();
        assert!(body.contains("[primary]"), "{body}");
        if stream {
            assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
        }
    }
    for record in h.records(2).await {
        assert_eq!(
            record.error_kind,
            ErrorKind::Unspecified as i32,
            "{record:?}"
        );
        assert!(!record.tokens_estimated, "the provider's usage, {record:?}");
        assert!(record.prompt_tokens > 0 && record.completion_tokens > 0);
    }
    let stats = primary.stats();
    assert_eq!(stats.requests.chat_completions, 2);
    assert_eq!(stats.http2_requests, 2, "{stats:?}");
    // One connection carries both.
    assert_eq!(stats.connections, 1, "{stats:?}");

    // Not offered (the default): HTTP/1.1, though the provider speaks HTTP/2.
    let h1 = trusting(&certs, one_primary_snapshot(&primary.base_url()), false).await;
    assert_eq!(h1.chat(chat_body(true)).await.status(), 200);
    h1.records(1).await;
    assert_eq!(primary.stats().http2_requests, 2);
    assert_eq!(primary.stats().requests.chat_completions, 3);
}

/// `REFUSED_STREAM`: the server says it did not process the request (RFC 9113 §8.7), so it
/// is sent to the next backend with no fee kept, and alone answered as a backend that could
/// not be reached: a 502 the client may send again.
#[tokio::test]
async fn a_refused_stream_was_never_sent_and_is_not_billed() {
    let (primary, certs) = tls_mock("primary");
    let fallback = MockServer::start_local(MockConfig::named("fallback")).unwrap();
    primary.set_fault(Fault::StreamReset(REFUSED_STREAM).times(1));
    let h = trusting(&certs, priced_pair(&primary, &fallback), true).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-attempts").unwrap(), "2");
    let record = h.records(1).await.remove(0);
    assert_eq!(record.backend_id, "fallback");
    assert_eq!(record.cost_nanos, 0, "not billed, {record:?}");
    let stats = primary.stats();
    assert_eq!(
        (stats.stream_resets, stats.http2_requests),
        (1, 1),
        "{stats:?}"
    );

    let alone = trusting(&certs, one_primary_snapshot(&primary.base_url()), true).await;
    primary.set_fault(Fault::StreamReset(REFUSED_STREAM).times(1));
    assert_never_sent(&alone).await;
}

/// A graceful `GOAWAY` whose last stream id leaves the request out: not processed either
/// (RFC 9113 §6.8), as nginx, Envoy and Go servers send when they recycle a connection.
#[tokio::test]
async fn a_request_a_graceful_goaway_left_out_was_never_sent_and_is_not_billed() {
    let (primary, certs) = tls_mock("primary");
    let fallback = MockServer::start_local(MockConfig::named("fallback")).unwrap();
    primary.set_fault(Fault::GoAway.times(1));
    let h = trusting(&certs, priced_pair(&primary, &fallback), true).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-attempts").unwrap(), "2");
    let record = h.records(1).await.remove(0);
    assert_eq!(record.backend_id, "fallback");
    assert_eq!(record.cost_nanos, 0, "not billed, {record:?}");
    let stats = primary.stats();
    assert_eq!(stats.go_aways, 1, "{stats:?}");
    assert_eq!(stats.requests.total(), 0, "never processed, {stats:?}");

    let alone = trusting(&certs, one_primary_snapshot(&primary.base_url()), true).await;
    primary.set_fault(Fault::GoAway.times(1));
    assert_never_sent(&alone).await;
    // The next request gets a new connection, and its answer.
    assert_eq!(alone.chat(chat_body(false)).await.status(), 200);
    assert_eq!(primary.stats().http2_requests, 1);
}

/// A stream reset with any other code once the request was sent says nothing of whether it
/// was processed: the provider may be generating it, and bill it. Failed over with the fee
/// kept, and alone a 502 the client is told not to send again.
#[tokio::test]
async fn a_stream_reset_after_the_request_was_sent_may_have_been_billed() {
    let (primary, certs) = tls_mock("primary");
    let fallback = MockServer::start_local(MockConfig::named("fallback")).unwrap();
    primary.set_fault(Fault::StreamReset(INTERNAL_ERROR).times(1));
    let h = trusting(&certs, priced_pair(&primary, &fallback), true).await;
    let response = h.chat(chat_body(false)).await;
    assert_eq!(header(&response, "x-sluice-attempts").unwrap(), "2");
    let record = h.records(1).await.remove(0);
    assert_eq!(record.backend_id, "fallback");
    assert_eq!(record.cost_nanos, 30_000_000, "billed, {record:?}");
    assert_eq!(primary.stats().stream_resets, 1);

    let alone = trusting(&certs, one_primary_snapshot(&primary.base_url()), true).await;
    primary.set_fault(Fault::StreamReset(INTERNAL_ERROR).times(1));
    assert_connection_lost(alone.chat(chat_body(false)).await).await;
    let record = alone.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::UpstreamConnect as i32);
}

/// A stream whose HTTP/2 stream is reset after some events (hyper's server resets it with
/// `INTERNAL_ERROR` when the answer's body fails) ends with Sluice's error event and is
/// charged what was streamed, as a TCP cut over HTTP/1.1 is.
#[tokio::test]
async fn a_stream_reset_midway_over_http2_ends_with_an_error_event_and_is_charged() {
    let (primary, certs) = tls_mock("primary");
    primary.set_fault(Fault::CutAfterChunks(3).times(1));
    let h = trusting(&certs, one_primary_snapshot(&primary.base_url()), true).await;
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
    assert_eq!(primary.stats().http2_requests, 1);
}

/// The request was answered as one no backend could be sent: a 502 `upstream_unreachable`
/// without `x-should-retry: false`.
async fn assert_never_sent(h: &Harness) {
    let response = h.chat(chat_body(false)).await;
    assert_eq!(response.status(), 502);
    assert_eq!(header(&response, "x-should-retry"), None);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_unreachable", "{body}");
    let record = h.records(1).await.remove(0);
    assert_eq!(record.error_kind, ErrorKind::UpstreamConnect as i32);
}
