//! Weak tokens and guessing: a token shorter than the documented minimum stops either server
//! at start with one line (that does not show it); wrong admin tokens are logged (a line per
//! 10 s, not per guess) and, past a burst, an address is refused before its token is looked
//! at, over gRPC and the JSON API alike, while other addresses are served.

use std::time::Duration;

use sluice_e2e::process::{spawn, workspace_bin};
use sluice_proto::v1 as pb;
use sluice_proto::v1::admin_service_client::AdminServiceClient;
use tonic::Code;

use crate::common::{ADMIN_TOKEN, Bearer, DATAPLANE_TOKEN, control_plane, eventually};

const SHORT: &str = "hunter2-hunter2";

#[tokio::test]
async fn a_short_token_stops_either_server_at_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let control_args = || {
        vec![
            "--data-dir".to_owned(),
            data.clone(),
            "--grpc-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--http-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ]
    };
    let proxy_args = vec![
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--control-plane".to_owned(),
        "http://127.0.0.1:1".to_owned(),
    ];
    // (binary, arguments, environment)
    type Run<'a> = (&'a str, Vec<String>, Vec<(&'a str, &'a str)>);
    let runs: Vec<Run> = vec![
        (
            "sluice-control",
            control_args(),
            vec![
                ("SLUICE_ADMIN_TOKEN", SHORT),
                ("SLUICE_DATAPLANE_TOKEN", DATAPLANE_TOKEN),
            ],
        ),
        (
            "sluice-control",
            control_args(),
            vec![
                ("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN),
                ("SLUICE_DATAPLANE_TOKEN", SHORT),
            ],
        ),
        (
            "sluice-proxy",
            proxy_args.clone(),
            vec![("SLUICE_DATAPLANE_TOKEN", SHORT)],
        ),
    ];
    for (bin, args, env) in runs {
        let mut child = spawn(workspace_bin(bin), args, env.clone()).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(!status.success(), "{bin} {env:?} started");
        // The output is read on its own task: wait for the line rather than race it.
        child
            .wait_for_line("the refusal", Duration::from_secs(30), |l| {
                l.contains("at least 32 characters").then_some(())
            })
            .await
            .unwrap();
        let output = child.output();
        assert!(!output.iter().any(|l| l.contains(SHORT)), "{output:?}");
    }
    // No token at all.
    let mut child = spawn(
        workspace_bin("sluice-proxy"),
        proxy_args,
        [("SLUICE_DATAPLANE_TOKEN", "")],
    )
    .unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success());
    child
        .wait_for_line("the refusal", Duration::from_secs(30), |l| {
            l.contains("no data-plane token").then_some(())
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn guessing_the_admin_token_is_logged_and_slowed_down() {
    let dir = tempfile::tempdir().unwrap();
    let (control, api, http) = control_plane(&dir, &[]).await;
    let guesser = AdminServiceClient::with_interceptor(
        api.channel().await,
        Bearer("sk-guess-0000000000000000000000000000".into()),
    );
    let mut codes = Vec::new();
    for _ in 0..40 {
        let code = guesser
            .clone()
            .list_backends(pb::ListBackendsRequest {})
            .await
            .unwrap_err()
            .code();
        codes.push(code);
    }
    let refused = codes
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    assert_eq!(
        codes
            .iter()
            .filter(|c| **c == Code::Unauthenticated)
            .count(),
        40 - refused
    );
    // A burst of 10 is checked; after that at most one guess per 2 s is.
    assert!(refused >= 25, "{codes:?}");

    // While the address is held back, even the right token is refused from it, over gRPC
    // and the JSON API, so a refusal never says whether a guess was right.
    let err = api
        .admin()
        .await
        .list_backends(pb::ListBackendsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("too many failed admin"), "{err:?}");
    let list = format!("{http}/api/sluice.v1.AdminService/ListBackends");
    // The JSON API's status for the right token, sent from `ip`.
    let list_from = |ip: [u8; 4]| {
        let list = list.clone();
        async move {
            reqwest::Client::builder()
                .local_address(std::net::IpAddr::from(ip))
                .build()
                .unwrap()
                .post(&list)
                .bearer_auth(ADMIN_TOKEN)
                .body("{}")
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(list_from([127, 0, 0, 1]).await, 429);
    // Another address is served.
    assert_eq!(list_from([127, 0, 0, 2]).await, 200);

    // Logged, but not once per guess.
    let lines: Vec<String> = control
        .output()
        .into_iter()
        .filter(|l| l.contains("authentication failed"))
        .collect();
    assert!(!lines.is_empty());
    assert!(lines.len() <= 5, "{lines:#?}");
    assert!(
        lines[0].contains("realm=\"admin\"") || lines[0].contains("realm=admin"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("127.0.0.1"), "{}", lines[0]);
    assert!(!lines.iter().any(|l| l.contains("sk-guess")), "{lines:#?}");

    // Once the guessing stops, the address gets its turn back.
    eventually(
        Duration::from_secs(15),
        "the right token works again",
        || async {
            api.admin()
                .await
                .list_backends(pb::ListBackendsRequest {})
                .await
                .is_ok()
        },
    )
    .await;
}
