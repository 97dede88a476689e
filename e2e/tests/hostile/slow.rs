//! Slow clients on the data plane: an upload that stalls is answered 408 once
//! `--body-read-timeout` passes, and uploads together cannot hold more than
//! `--max-buffered-body-bytes` of memory: past it a request gets 503 with `Retry-After`,
//! and once the stalled ones are gone requests are served again.

use std::time::Duration;

use sluice_control::testing::metric_samples;
use sluice_proto::v1 as pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::common::{Cluster, Mock};

/// Sends a chat request's head declaring `declared` bytes of body, then `sent` bytes of it,
/// and keeps the connection open without sending more.
async fn stalled_upload(
    addr: std::net::SocketAddr,
    key: &str,
    declared: usize,
    sent: usize,
) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&vec![b' '; sent]).await.unwrap();
    tcp
}

/// The status line of what comes back on `tcp`, waiting up to 60 s.
async fn status_of(tcp: &mut TcpStream) -> String {
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(60), tcp.read(&mut answer))
        .await
        .expect("no answer within 60 s")
        .unwrap();
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn stalled_uploads_are_cut_off_and_cannot_pile_up_memory() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster
        .proxy_with(&[
            "--body-read-timeout",
            "3s",
            "--max-buffered-body-bytes",
            "3000000",
        ])
        .await;

    // 2.5 MB of a declared 4 MB, then nothing: it holds 2.5 MB of the 3 MB.
    let mut first = stalled_upload(proxy.addr, &key, 4_000_000, 2_500_000).await;
    // Give the proxy time to take in what was sent before the second comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 1 MB more would pass the 3 MB: refused at once, with Retry-After.
    let mut second = stalled_upload(proxy.addr, &key, 2_000_000, 1_000_000).await;
    let status = status_of(&mut second).await;
    assert!(status.contains(" 503 "), "{status}");

    // The first is cut off by the body timeout.
    let status = status_of(&mut first).await;
    assert!(status.contains(" 408 "), "{status}");
    drop((first, second));

    // Its memory is back: a request is served.
    assert_eq!(proxy.chat(&key, "m").await.status(), 200);
    let text = proxy
        .http
        .get(proxy.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = metric_samples(&text);
    assert_eq!(
        samples.get("sluice_request_bodies_refused_total{reason=\"memory\"}"),
        Some(&1.0),
        "{text}"
    );
    assert_eq!(
        samples.get("sluice_request_bodies_refused_total{reason=\"timeout\"}"),
        Some(&1.0),
        "{text}"
    );
}
