//! Connections held open on purpose, on the data plane and on the control plane's HTTP
//! listener: a client that trickles its headers a line at a time, or sends nothing, is
//! disconnected at the header read timeout; past the connection limit a new connection is
//! refused at once (503, counted, logged) and the listener serves again once some close.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::common::{Cluster, control_plane, eventually};

/// Waits up to 30 s for the server to close `tcp` (EOF or reset), reading whatever comes.
async fn closed_by_server(mut tcp: tokio::net::tcp::OwnedReadHalf) -> bool {
    let mut sink = [0; 1024];
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// One connection that sends nothing and one that sends a request line and then a header
/// line every 300 ms without ever ending its headers: both must be closed by the server.
async fn assert_slow_headers_are_cut_off(addr: SocketAddr) {
    let (silent, _silent_writer) = TcpStream::connect(addr).await.unwrap().into_split();
    let (trickling, mut writer) = TcpStream::connect(addr).await.unwrap().into_split();
    let trickle = tokio::spawn(async move {
        writer
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n")
            .await?;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            writer.write_all(b"x-slow: still here\r\n").await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    });
    assert!(
        closed_by_server(trickling).await,
        "a client trickling its headers was still connected after 30 s"
    );
    assert!(
        closed_by_server(silent).await,
        "a client sending nothing was still connected after 30 s"
    );
    trickle.abort();
}

#[tokio::test]
async fn headers_sent_too_slowly_close_the_connection_on_both_planes() {
    let dir = tempfile::tempdir().unwrap();
    let (_control, _api, http) = control_plane(&dir, &["--http-header-read-timeout", "2s"]).await;
    let http: SocketAddr = http.trim_start_matches("http://").parse().unwrap();
    assert_slow_headers_are_cut_off(http).await;

    let cluster = Cluster::start().await;
    let proxy = cluster.proxy_with(&["--header-read-timeout", "2s"]).await;
    assert_slow_headers_are_cut_off(proxy.addr).await;
    // A request that keeps to the timeout is served as before.
    let ok = proxy.http.get(proxy.url("/healthz")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

/// A kept-alive connection idle for longer than the header read timeout but within the idle
/// timeout is still served (a load balancer in front keeps its idle connections a minute or
/// more, and sends a request on one whenever it likes); idle past it, it is closed.
async fn assert_idle_connections_kept_for_the_idle_timeout(addr: SocketAddr) {
    let (mut reader, mut writer) = TcpStream::connect(addr).await.unwrap().into_split();
    let mut answer = vec![0; 4096];
    for pause in [Duration::ZERO, Duration::from_millis(2500)] {
        tokio::time::sleep(pause).await;
        writer
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        let read = tokio::time::timeout(Duration::from_secs(10), reader.read(&mut answer))
            .await
            .expect("answered")
            .unwrap();
        let head = String::from_utf8_lossy(&answer[..read]);
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "after {pause:?} idle: {head}"
        );
    }
    let idle = std::time::Instant::now();
    assert!(
        closed_by_server(reader).await,
        "idle for 30 s and still open"
    );
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(3500),
        "closed {waited:?} after its answer"
    );
}

#[tokio::test]
async fn idle_connections_are_kept_for_the_idle_timeout_on_both_planes() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--http-header-read-timeout",
        "1s",
        "--http-idle-timeout",
        "4s",
    ];
    let (_control, _api, http) = control_plane(&dir, &flags).await;
    let http: SocketAddr = http.trim_start_matches("http://").parse().unwrap();
    assert_idle_connections_kept_for_the_idle_timeout(http).await;

    let cluster = Cluster::start().await;
    let proxy = cluster
        .proxy_with(&["--header-read-timeout", "1s", "--idle-timeout", "4s"])
        .await;
    assert_idle_connections_kept_for_the_idle_timeout(proxy.addr).await;
}

/// Opens connections that each made a request (kept alive) until the server refuses one;
/// returns those it accepted. A refusal is a 503 or the connection closed without an answer.
async fn fill_up(addr: SocketAddr) -> Vec<TcpStream> {
    let mut open = Vec::new();
    for _ in 0..20 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut answer = vec![0; 4096];
        let sent = tcp
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await;
        let read = match sent {
            Ok(()) => tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut answer))
                .await
                .expect("no answer within 30 s"),
            Err(e) => Err(e),
        };
        let status = match read {
            Ok(n) => String::from_utf8_lossy(&answer[..n])
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
            Err(_) => String::new(),
        };
        if status.contains(" 200 ") {
            open.push(tcp);
        } else {
            assert!(status.is_empty() || status.contains(" 503 "), "{status}");
            return open;
        }
    }
    panic!("20 connections open at once and none refused");
}

/// Fills `addr` up to its limit of 4 connections; then the refusal must be in `server`'s log
/// and, once the connections closed, `metric` in `/metrics` (served again) at least 1.
async fn assert_refused_past_four(
    server: &sluice_e2e::process::Child,
    addr: SocketAddr,
    metric: &str,
) {
    let open = fill_up(addr).await;
    assert!(open.len() <= 4, "{} connections accepted", open.len());
    server
        .wait_for_line("the refusal logged", Duration::from_secs(10), |l| {
            l.contains("refused a connection: too many open connections")
                .then_some(())
        })
        .await
        .unwrap();
    drop(open);
    let client = crate::common::http_client();
    let metrics = async {
        loop {
            if let Ok(r) = client.get(format!("http://{addr}/metrics")).send().await
                && r.status() == 200
            {
                return r.text().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let text = tokio::time::timeout(Duration::from_secs(10), metrics)
        .await
        .expect("not served again after the connections closed");
    let refused = sluice_control::testing::metric_samples(&text)
        .get(metric)
        .copied();
    assert!(refused.is_some_and(|n| n >= 1.0), "{text}");
}

#[tokio::test]
async fn past_the_connection_limit_a_connection_is_refused_and_counted_on_both_planes() {
    let cluster = Cluster::start().await;
    let proxy = cluster.proxy_with(&["--max-connections", "4"]).await;
    assert_refused_past_four(&proxy.child, proxy.addr, "sluice_connections_refused_total").await;

    let dir = tempfile::tempdir().unwrap();
    let (control, _api, http) = control_plane(&dir, &["--http-max-connections", "4"]).await;
    let addr: SocketAddr = http.trim_start_matches("http://").parse().unwrap();
    assert_refused_past_four(&control, addr, "sluice_http_connections_refused_total").await;
}

/// A data plane out of file descriptors (a soft limit of 1,024 is what containerd and systemd
/// give a process by default; here 64) cannot open upstream connections: that is its own
/// state, not the backend's. Counted as the backend failing, it cooled a healthy backend
/// down for every replica. Such a request gets 503 `server_busy`, and the backend is not
/// cooled down; nor is its key charged for it (it reached no provider): charged its budget
/// reserve, every request of an incident drained the key's budget.
#[tokio::test]
async fn a_replica_out_of_file_descriptors_blames_no_backend() {
    let cluster = Cluster::start().await;
    let mock = crate::common::Mock::start_with("a", &["m"], &["--latency", "2s"]).await;
    cluster
        .add_backend(
            "a",
            &mock,
            sluice_proto::v1::Pool::Primary,
            0,
            &[("m", "m")],
        )
        .await;
    let key = cluster
        .admin()
        .await
        .create_client_key(sluice_proto::v1::CreateClientKeyRequest {
            name: "k".into(),
            max_budget: 1_000.0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key;
    let proxy = cluster
        .proxy_under(&["prlimit", "--nofile=64", "--"], &[])
        .await;
    let requests: Vec<_> = (0..80)
        .map(|_| {
            let (url, key) = (proxy.url("/v1/chat/completions"), key.clone());
            tokio::spawn(async move {
                let answer = reqwest::Client::new()
                    .post(url)
                    .bearer_auth(key)
                    // What `Proxy::chat` sends: the last request below, alone, says what
                    // one costs.
                    .json(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "say hello to me"}]}))
                    .send()
                    .await
                    .ok()?;
                let status = answer.status().as_u16();
                let body: serde_json::Value = answer.json().await.ok()?;
                Some((status, body["error"]["code"].as_str().map(str::to_owned)))
            })
        })
        .collect();
    let (mut busy, mut served) = (0u64, 0u64);
    for request in requests {
        match request.await.unwrap() {
            Some((503, code)) => {
                assert_eq!(code.as_deref(), Some("server_busy"));
                busy += 1;
            }
            Some((status, code)) => {
                assert_eq!(status, 200, "{code:?}");
                served += 1;
            }
            // Refused before it was read: the client's own connection found no descriptor.
            None => {}
        }
    }
    assert!(
        busy > 0,
        "no request ran out of file descriptors: the test proves nothing"
    );
    let cooldowns = cluster.cooldowns().await;
    assert!(cooldowns.is_empty(), "{cooldowns:?}");
    // The key spent what the served requests cost, each the same (one more, alone, says
    // how much), and nothing for the refused ones.
    let recorded = |n: u64| {
        let cluster = &cluster;
        async move { cluster.totals().await.request_count == n }
    };
    eventually(Duration::from_secs(10), "every request recorded", || {
        recorded(busy + served)
    })
    .await;
    let spent = cluster.client_key("k").await.spend;
    assert_eq!(proxy.chat(&key, "m").await.status(), 200, "served again");
    eventually(Duration::from_secs(10), "the last request recorded", || {
        recorded(busy + served + 1)
    })
    .await;
    let one = cluster.client_key("k").await.spend - spent;
    assert!(one > 0.0);
    assert!(
        (spent - served as f64 * one).abs() < one / 2.0,
        "{busy} refused and {served} served requests spent {spent}, one served request {one}"
    );
}
