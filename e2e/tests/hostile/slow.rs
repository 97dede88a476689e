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

/// A non-streamed chat request for model `m` with `key`, as written on the wire, with
/// `extra` header lines (each ending `\r\n`).
fn chat_request(key: &str, extra: &str) -> String {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n{extra}\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
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

/// Sets the gateway's `request_timeout`, and how long a stream may run (`stream_timeout`),
/// to `seconds`.
async fn request_timeout_of(cluster: &Cluster, seconds: i64) {
    cluster
        .set_settings(
            pb::Settings {
                request_timeout: Some(crate::common::seconds(seconds)),
                stream_timeout: Some(crate::common::seconds(seconds)),
                ..Default::default()
            },
            &["request_timeout", "stream_timeout"],
        )
        .await;
}

#[tokio::test]
async fn stalled_uploads_are_cut_off_and_cannot_pile_up_memory() {
    let (cluster, _mock, key) = Cluster::with_one_backend().await;
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
    // Once the proxy has taken in what was sent (a sleep here made the test depend on the
    // machine's speed), the second comes.
    crate::common::eventually(Duration::from_secs(10), "2.5 MB of body held", || async {
        metric_samples(&proxy.metrics().await)
            .get("sluice_request_body_buffered_bytes")
            .is_some_and(|held| *held >= 2_500_000.0)
    })
    .await;
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
    let text = proxy.metrics().await;
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

/// With `request_timeout` and `stream_timeout` at 3 s, streams whose clients send the request and never read a
/// byte: once the client's socket is full the relay is no longer polled, so only the
/// connection's deadline ends them. The upstream (a mock streaming 200,000 chunks as fast as
/// it can) must see its streams abandoned, and the client connections closed, within the
/// deadline and a margin; usage records them.
#[tokio::test]
async fn streams_whose_clients_stop_reading_end_at_the_request_deadline() {
    let cluster = Cluster::start().await;
    let mock = Mock::start_with("a", &["m"], &["--chunk-count", "200000"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    request_timeout_of(&cluster, 3).await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;
    // The proxy holds the setting once a snapshot after the update arrived.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        clients.push(tcp);
    }
    let started = tokio::time::Instant::now();
    let abandoned = async {
        while mock.stats().await.streams_aborted < 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), abandoned)
        .await
        .expect("the upstream streams were still open 20 s after a 3 s deadline");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "cut before the deadline"
    );
    // Each answer has ended too: reading now drains what was buffered, then ends instead of
    // waiting. A stream whose socket was full is cut with its connection (EOF or reset); one
    // whose relay was still polled at the deadline (the mock is slower on a loaded machine,
    // so the client's buffers may not have filled) ends with its error event and the last
    // chunk, and the connection may stay open for another request.
    for mut tcp in clients {
        let mut read = vec![0; 1 << 16];
        let mut tail = Vec::new();
        let drained = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match tcp.read(&mut read).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        tail.extend_from_slice(&read[..n]);
                        tail.drain(..tail.len().saturating_sub(5));
                        if tail == b"0\r\n\r\n" {
                            return;
                        }
                    }
                }
            }
        })
        .await;
        assert!(
            drained.is_ok(),
            "a client's answer neither ended nor was cut"
        );
    }
    crate::common::eventually(
        Duration::from_secs(20),
        "the three streams recorded in usage",
        || async { cluster.totals().await.stream_count >= 3 },
    )
    .await;
}

/// A client with a key that asks for a large non-streamed answer and reads none of it:
/// hyper holds the whole answer for the socket, with no deadline of its own, so only the
/// write timeout closes the connection (and frees its slot). The client then finds a cut
/// answer, not the whole one.
#[tokio::test]
async fn a_client_that_reads_none_of_a_large_answer_is_closed_at_the_write_timeout() {
    let cluster = Cluster::start().await;
    // About 17 MB of answer: far more than the sockets' buffers on both ends.
    let mock = Mock::start_with("a", &["m"], &["--chunk-count", "2000000"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy_with(&["--write-timeout", "2s"]).await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(proxy.addr).await.unwrap();
    tcp.write_all(chat_request(&key, "").as_bytes())
        .await
        .unwrap();

    crate::common::eventually(
        Duration::from_secs(60),
        "the connection closed by the write timeout",
        || async {
            metric_samples(&proxy.metrics().await).get("sluice_write_timeouts_total") == Some(&1.0)
        },
    )
    .await;
    // Reading now drains what the sockets held, then ends: far short of the answer.
    let mut received = 0;
    let mut buf = vec![0; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the answer neither ended nor was cut");
    assert!(received < 17_000_000, "received {received} bytes");
    // The upstream answered in full: the request is accounted.
    crate::common::eventually(
        Duration::from_secs(20),
        "the request recorded in usage",
        || async { cluster.totals().await.request_count >= 1 },
    )
    .await;
}

/// A gateway whose one backend answers `chunks` words a completion (about 10 bytes each),
/// with `request_timeout` in seconds if given, a key for it, and a proxy holding at most
/// `answers` bytes of answers (the largest answer the same).
async fn answering(
    chunks: &str,
    request_timeout: Option<i64>,
    answers: &str,
    more: &[&str],
) -> (Cluster, Mock, String, crate::common::Proxy) {
    let cluster = Cluster::start().await;
    let mock = Mock::start_with("a", &["m"], &["--chunk-count", chunks]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    if let Some(seconds) = request_timeout {
        request_timeout_of(&cluster, seconds).await;
    }
    let (_, key) = cluster.create_key("k", &[]).await;
    let mut flags = vec![
        "--max-response-bytes",
        answers,
        "--max-buffered-answer-bytes",
        answers,
    ];
    flags.extend_from_slice(more);
    let proxy = cluster.proxy_with(&flags).await;
    (cluster, mock, key, proxy)
}

/// Whole answers are held in memory until their clients have taken them, and a client can
/// take its time: they count against `--max-buffered-answer-bytes`, and an answer that would
/// pass it gets 503 `server_busy` (the backend is not blamed, nor asked again, and SDKs are
/// told not to send it again on their own: it was generated). Without that a few clients
/// asking for large answers and reading none of them (or a batch job's large embeddings)
/// took the replica's memory without bound.
#[tokio::test]
async fn answers_held_for_clients_that_do_not_read_them_are_bounded_in_memory() {
    // About 15 MB an answer.
    let (cluster, _mock, key, proxy) = answering("1500000", None, "20000000", &[]).await;

    // A client that asks and reads nothing: its answer stays in the proxy.
    let mut unread = asked_and_unread(&proxy, &key, 1.0).await;

    // Another as large does not fit.
    let answer = proxy.chat(&key, "m").await;
    assert_eq!(
        answer.status(),
        503,
        "a second large answer held while the first is"
    );
    assert_eq!(answer.headers()["x-should-retry"], "false");
    assert!(answer.headers().get("retry-after").is_none());
    let refused: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(refused["error"]["code"], "server_busy", "{refused}");

    // The provider generated and billed the refused answer: its `usage`, read from the rest
    // of it as it was thrown away, is charged as the held one's is.
    crate::common::eventually(
        Duration::from_secs(20),
        "both requests recorded in usage",
        || async { cluster.totals().await.request_count >= 2 },
    )
    .await;
    let totals = cluster.totals().await;
    assert_eq!((totals.request_count, totals.error_count), (2, 1));
    assert_eq!(
        totals.completion_tokens,
        2 * 1_500_000,
        "the refused answer's completion is charged"
    );

    // The client that did not read gets its whole answer when it does.
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), unread.read_to_end(&mut answer))
        .await
        .expect("the held answer within 60 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..100.min(text.len())]
    );
    assert!(text.trim_end().ends_with('}'), "whole");

    // Its memory is back: an answer as large is served.
    assert_eq!(proxy.chat(&key, "m").await.status(), 200);
    let samples = metric_samples(&proxy.metrics().await);
    assert!(
        samples
            .get("sluice_answers_refused_total")
            .is_some_and(|n| *n >= 1.0),
        "counted"
    );
}

/// A connection on which a chat request was sent with `key` and none of its answer read: the
/// proxy has read the answer whole (its `answers_read`th answer from backend `a` with a
/// status, counted once it has) and holds it.
async fn asked_and_unread(proxy: &crate::common::Proxy, key: &str, answers_read: f64) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut unread = socket.connect(proxy.addr).await.unwrap();
    unread
        .write_all(chat_request(key, "connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let read = "sluice_upstream_attempts_total{backend=\"a\",outcome=\"ok\"}";
    for _ in 0..100 {
        if metric_samples(&proxy.metrics().await).get(read) == Some(&answers_read) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric_samples(&proxy.metrics().await).get(read),
        Some(&answers_read)
    );
    unread
}

/// One key's clients slow to read their large answers hold at most its share of the answers'
/// memory (`--max-buffered-answer-bytes-per-key`, half of it by default): past it that key's
/// next answer gets 503 `server_busy`, and another key's large answer is still served. Before,
/// one key could hold the whole of it, and every other key's large answers were refused after
/// the provider had generated them.
#[tokio::test]
async fn one_keys_unread_answers_leave_room_for_other_keys() {
    let cluster = Cluster::start().await;
    // About 15 MB an answer.
    let mock = Mock::start_with("a", &["m"], &["--chunk-count", "1500000"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, greedy) = cluster.create_key("greedy", &[]).await;
    let (_, other) = cluster.create_key("other", &[]).await;
    // Room for five such answers; a key's share, half, for two.
    let proxy = cluster
        .proxy_with(&[
            "--max-response-bytes",
            "20000000",
            "--max-buffered-answer-bytes",
            "80000000",
        ])
        .await;

    let _held = [
        asked_and_unread(&proxy, &greedy, 1.0).await,
        asked_and_unread(&proxy, &greedy, 2.0).await,
    ];
    // The same key's third answer, which the replica would have room for, passes its share.
    let mut third = asked_and_unread(&proxy, &greedy, 3.0).await;
    let mut refused = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), third.read_to_end(&mut refused))
        .await
        .expect("the refusal within 30 s")
        .unwrap();
    let refused = String::from_utf8_lossy(&refused);
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("server_busy"), "{refused}");
    assert!(refused.contains("This API key's answers"), "{refused}");

    // Another key's is served.
    let answer = proxy.chat(&other, "m").await;
    assert_eq!(answer.status(), 200);
    assert!(answer.bytes().await.unwrap().len() > 10_000_000);
}

/// A large whole answer holds `--max-buffered-answer-bytes` until its client has taken it.
/// A client that reads steadily but slowly never lets the write timeout end it, so on HTTP/1
/// too a large answer holds its request's deadline (or the write timeout from its head, the
/// later) on the connection: past it the connection is closed and the memory given back,
/// for the next large answer.
#[tokio::test]
async fn a_large_answer_read_slowly_lets_go_of_its_memory_at_its_deadline() {
    // About 15 MB an answer.
    let (_cluster, _mock, key, proxy) =
        answering("1500000", Some(3), "20000000", &["--write-timeout", "5s"]).await;

    let started = tokio::time::Instant::now();
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(chat_request(&key, "").as_bytes())
        .await
        .unwrap();
    // 64 KB every 100 ms, the whole answer in about 25 s: often enough for the write
    // timeout to see progress.
    let reader = tokio::spawn(async move {
        let mut chunk = vec![0; 65_536];
        let mut taken = 0;
        loop {
            match slow.read(&mut chunk).await {
                Ok(0) | Err(_) => return taken,
                Ok(n) => taken += n,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Another answer as large fits once the slow one's memory is back.
    let served_again = loop {
        let answer = proxy.chat(&key, "m").await;
        if answer.status() == 200 {
            break started.elapsed();
        }
        assert_eq!(answer.status(), 503);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the slow reader's answer held its memory for a minute"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        served_again < Duration::from_secs(15),
        "served again only after {served_again:?}: its deadline is 3 s, the write timeout 5 s"
    );
    let taken = reader.await.unwrap();
    assert!(
        taken < 15_000_000,
        "read whole ({taken} bytes): the test proves nothing"
    );
}

/// On HTTP/2 one connection carries up to 200 requests, and a client that grants them no
/// flow-control window holds every answer in the proxy until its deadline: there, small
/// answers (which HTTP/1's connection limit bounds, one at a time each) count against
/// `--max-buffered-answer-bytes` too, and past it get 503 `server_busy`.
#[tokio::test]
async fn small_answers_on_h2_connections_that_read_nothing_are_bounded_too() {
    // About 45 KB an answer: under the 64 KiB an HTTP/1 answer needs to be counted.
    let (_cluster, _mock, key, proxy) = answering("6000", None, "1000000", &[]).await;

    // An h2c client that gives its streams no window: no answer's body can be sent.
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut send, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let body =
        bytes::Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
    let mut heads = Vec::new();
    for _ in 0..60 {
        send = send.ready().await.unwrap();
        let request = http::Request::post(format!("http://{}/v1/chat/completions", proxy.addr))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        let (answer, mut stream) = send.send_request(request, false).unwrap();
        stream.send_data(body.clone(), true).unwrap();
        heads.push(answer);
    }
    // Each answer is kept: h2 resets a stream whose handles are all dropped, and the proxy
    // then lets go of its answer, so that later ones would fit.
    let mut answers = Vec::new();
    for head in heads {
        let head = tokio::time::timeout(Duration::from_secs(30), head)
            .await
            .expect("a head within 30 s")
            .unwrap();
        answers.push(head);
    }
    let statuses: Vec<u16> = answers.iter().map(|a| a.status().as_u16()).collect();
    let busy = statuses.iter().filter(|s| **s == 503).count();
    // 60 answers of about 45 KB held at once: about 2.7 MB against 1 MB.
    assert!(busy > 0, "every answer held: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    // An HTTP/1 client is served alongside.
    assert_eq!(proxy.chat(&key, "m").await.status(), 200);
}
