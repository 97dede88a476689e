//! `https://` endpoints: `sluicectl` verifies the control plane's certificate
//! against `--ca-cert` (or the system and webpki roots) before sending its token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;

use sluice_control::secrets::SecretSources;
use sluice_control::server::{Config, TlsFiles, start};
use tokio::process::Command;

const TOKEN: &str = "tls-test-admin-token-0123456789abcdef0123456789";

/// A CA and a server certificate for 127.0.0.1 signed by it, made with the
/// `openssl` command (Debian's `openssl` package).
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("the openssl command (apt-get install openssl)");
        assert!(status.success(), "openssl {args:?} failed");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=sluice test CA",
    ]);
    openssl(&ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
}

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

#[tokio::test]
async fn https_endpoint_is_verified_against_the_given_ca() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let data_dir = tempfile::tempdir().unwrap();
    let localhost = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let running = start(Config {
        data_dir: data_dir.path().to_owned(),
        grpc_listen: localhost,
        http_listen: localhost,
        http: Default::default(),
        secrets: SecretSources {
            admin_token: Some(TOKEN.into()),
            dataplane_token: Some("tls-test-dataplane-token-0123456789abcdef0123".into()),
            ..Default::default()
        },
        tls: Some(TlsFiles {
            cert: certs.path().join("server.pem"),
            key: certs.path().join("server.key"),
        }),
    })
    .await
    .unwrap();
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
