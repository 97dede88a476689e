//! `https://` endpoints: `sluicectl` verifies the control plane's certificate
//! against `--ca-cert` (or the system and webpki roots) before sending its token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;

use sluice_control::secrets::SecretSources;
use sluice_control::server::{Config, GrpcOptions, TlsFiles, start};
use tokio::process::Command;

const TOKEN: &str = "tls-test-admin-token-0123456789abcdef0123456789";

async fn sluicectl(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_sluicectl"))
        .args(args)
        .env_remove("SLUICE_ENDPOINT")
        .env_remove("SLUICE_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// A control plane with TLS on its gRPC port, certificates in `certs`.
async fn start_with_tls(
    certs: &Path,
    data_dir: &Path,
    grpc: GrpcOptions,
) -> sluice_control::server::Running {
    let localhost = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    start(Config {
        data_dir: data_dir.to_owned(),
        grpc_listen: localhost,
        http_listen: localhost,
        http: Default::default(),
        grpc,
        secrets: SecretSources {
            admin_token: Some(TOKEN.into()),
            dataplane_token: Some("tls-test-dataplane-token-0123456789abcdef0123".into()),
            ..Default::default()
        },
        tls: Some(TlsFiles {
            cert: certs.join("server.pem"),
            key: certs.join("server.key"),
        }),
    })
    .await
    .unwrap()
}

/// A control plane with TLS whose gRPC port gives a connection 500 ms to send its first
/// request; its certificates' and data directories.
async fn impatient() -> (
    tempfile::TempDir,
    tempfile::TempDir,
    sluice_control::server::Running,
) {
    let certs = tempfile::tempdir().unwrap();
    sluice_e2e::certs::make_certificates(certs.path());
    let data_dir = tempfile::tempdir().unwrap();
    let grpc = GrpcOptions {
        first_request_timeout: std::time::Duration::from_millis(500),
        ..GrpcOptions::default()
    };
    let running = start_with_tls(certs.path(), data_dir.path(), grpc).await;
    (certs, data_dir, running)
}

/// A client that starts a TLS handshake and stalls in it (past the first bytes of its hello)
/// is closed once `--grpc-first-request-timeout` has passed, not held for good.
#[tokio::test]
async fn a_tls_handshake_left_half_done_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_certs, _data_dir, running) = impatient().await;
    let mut client = tokio::net::TcpStream::connect(running.grpc_addr)
        .await
        .unwrap();
    // A handshake record's header and the start of a ClientHello announcing 512 bytes.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x04, 0x01, 0x00, 0x02, 0x00, 0x03, 0x03,
    ];
    hello.extend_from_slice(&[0x2a; 40]);
    client.write_all(&hello).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_ok(), "still open 10 s later");
}

/// A client that completes the TLS handshake and then sends nothing (not even HTTP/2's
/// preface) is closed once `--grpc-first-request-timeout` has passed: hyper waits for the
/// preface with no timer of its own.
#[tokio::test]
async fn a_tls_connection_that_sends_no_request_is_closed() {
    let (certs, _data_dir, running) = impatient().await;
    // Its standard input kept open and empty: it sends nothing after the handshake, and
    // exits when the server closes the connection.
    let mut client = Command::new("openssl")
        .args(["s_client", "-quiet", "-alpn", "h2", "-CAfile"])
        .arg(certs.path().join("ca.pem"))
        .arg("-connect")
        .arg(running.grpc_addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let exited = tokio::time::timeout(std::time::Duration::from_secs(10), client.wait()).await;
    assert!(
        exited.is_ok(),
        "the idle TLS connection still open 10 s later"
    );
    let mut said = String::new();
    if let Some(mut stderr) = client.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = stderr.read_to_string(&mut said).await;
    }
    assert!(said.contains("verify return:1"), "{said}");
}

#[tokio::test]
async fn https_endpoint_is_verified_against_the_given_ca() {
    let certs = tempfile::tempdir().unwrap();
    sluice_e2e::certs::make_certificates(certs.path());
    let data_dir = tempfile::tempdir().unwrap();
    let running = start_with_tls(certs.path(), data_dir.path(), GrpcOptions::default()).await;
    let endpoint = format!("https://{}", running.grpc_addr);
    let ca = certs.path().join("ca.pem");

    let (code, stdout, stderr) = sluicectl(&[
        "--endpoint",
        &endpoint,
        "--ca-cert",
        ca.to_str().unwrap(),
        "--token",
        TOKEN,
        "backend",
        "list",
    ])
    .await;
    assert_eq!(
        (code, stdout.as_str(), stderr.as_str()),
        (0, "No backends.\n", "")
    );

    // Without the CA the certificate is not trusted: one line, exit 1.
    let (code, stdout, stderr) =
        sluicectl(&["--endpoint", &endpoint, "--token", TOKEN, "backend", "list"]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: cannot reach control plane at {endpoint}: "
        )) && stderr.contains("certificate"),
        "{stderr}"
    );

    // --ca-cert makes no sense without TLS: a usage error.
    let plain = format!("http://{}", running.grpc_addr);
    let (code, _, stderr) = sluicectl(&[
        "--endpoint",
        &plain,
        "--ca-cert",
        ca.to_str().unwrap(),
        "--token",
        TOKEN,
        "backend",
        "list",
    ])
    .await;
    assert_eq!(code, 2, "{stderr}");

    running.shutdown().await.unwrap();
}
