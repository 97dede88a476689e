//! What the listeners give away: the control plane's dashboard, JSON API and `/metrics`
//! answer only requests for its own host (a page on another domain cannot read them
//! through DNS rebinding), and data-plane answers name their backend only when the
//! operator turned `expose_backend_header` on.

use std::time::Duration;

use sluice_proto::v1 as pb;

use crate::common::{ADMIN_TOKEN, Cluster, Mock, control_plane};

#[tokio::test]
async fn the_control_planes_http_listener_answers_only_its_own_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let (control, _, base) = control_plane(
        &dir,
        &["--allowed-hosts", "sluice.example.com,Metrics.Internal"],
    )
    .await;
    let http: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let client = reqwest::Client::new();
    let get = |path: &str, host: &str| {
        client
            .get(format!("http://{http}{path}"))
            .header("host", host)
            .bearer_auth(ADMIN_TOKEN)
            .send()
    };
    let port = http.port();
    for path in ["/", "/ui/app.js", "/metrics"] {
        for host in [
            "evil.example".to_owned(),
            format!("evil.example:{port}"),
            format!("127.0.0.1.evil.example:{port}"),
        ] {
            let response = get(path, &host).await.unwrap();
            assert_eq!(response.status(), 403, "{path} for {host}");
            let body = response.text().await.unwrap();
            assert!(!body.contains("sluice_"), "{path} for {host}: {body}");
        }
        for host in [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            "sluice.example.com".to_owned(),
            format!("metrics.internal:{port}"),
        ] {
            assert_eq!(
                get(path, &host).await.unwrap().status(),
                200,
                "{path} for {host}"
            );
        }
    }
    // The JSON API: refused before the token is even looked at.
    let response = client
        .post(format!(
            "http://{http}/api/sluice.v1.AdminService/ListBackends"
        ))
        .header("host", "evil.example")
        .bearer_auth(ADMIN_TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    // Probes reach health by any name.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            get(path, "evil.example").await.unwrap().status(),
            200,
            "{path}"
        );
    }
    control
        .wait_for_line("the refusal logged", Duration::from_secs(5), |l| {
            (l.contains("refused an HTTP request") && l.contains("evil.example")).then_some(())
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn answers_name_their_backend_only_when_the_operator_says_so() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    cluster
        .add_backend(
            "secret-provider",
            &mock,
            pb::Pool::Primary,
            0,
            &[("m", "m")],
        )
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;
    let answer = proxy.chat(&key, "m").await;
    assert_eq!(answer.status(), 200);
    assert!(
        answer.headers().get("x-sluice-backend").is_none(),
        "{:?}",
        answer.headers()
    );
    let refused = proxy.chat(&key, "nope").await;
    assert!(refused.headers().get("x-sluice-backend").is_none());

    cluster.expose_backend_header(true).await;
    cluster.wait_replicas_current(1).await;
    let answer = proxy.chat(&key, "m").await;
    assert_eq!(answer.headers()["x-sluice-backend"], "secret-provider");
}
