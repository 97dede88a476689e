//! The largest configuration the docs say is supported, with the real binaries: 100,000
//! client keys and 1,000 backends of 10 model routes each. The control plane builds and sends
//! the snapshot, a data plane takes it and serves with the last key, and `sluicectl` lists
//! every key: each within the message limits of `sluice_proto::limits`, set on both sides.
//! Prints the snapshot's size and how long building, taking and listing took.

use crate::common;

use std::time::Instant;

use common::{ADMIN_TOKEN, Cluster, Mock};
use sluice_control::backend::{BackendSpec, ModelRoute, Pool};
use sluice_control::crypto::MasterKey;
use sluice_control::store::Store;
use sluice_e2e::process::workspace_bin;
use sluice_proto::limits::{MAX_ADMIN_RESPONSE_BYTES, MAX_SNAPSHOT_BYTES};

const KEYS: usize = 100_000;
const BACKENDS: usize = 1_000;
const MODELS: usize = 10;

/// A name of the longest allowed length (64 characters) ending in `i`.
fn long_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i:0>width$}", width = 63 - prefix.len())
}

#[tokio::test]
async fn the_largest_supported_configuration_reaches_replicas_and_sluicectl() {
    let mut cluster = Cluster::start().await;
    let mock = Mock::start("big", &["model-0"]).await;
    let data = cluster.dir.path().join("data");
    cluster.stop_control().await;

    // Backends through the store (their provider keys encrypted as the API would), the
    // keys in one SQL transaction: a hundred thousand API calls would take minutes.
    let key = std::fs::read_to_string(data.join("master-key")).unwrap();
    let (store, _) = Store::open(
        &data.join("sluice.db"),
        MasterKey::from_base64(key.trim()).unwrap(),
    )
    .unwrap();
    for b in 0..BACKENDS {
        store
            .create_backend(
                BackendSpec {
                    anthropic_version: Default::default(),
                    api_format: Default::default(),
                    key_header: Default::default(),
                    name: long_name("backend", b),
                    base_url: mock.base_url(),
                    pool: Pool::Primary,
                    priority: 10,
                    weight: 100,
                    models: (0..MODELS)
                        .map(|m| ModelRoute {
                            default_max_tokens: Default::default(),
                            max_output_tokens: Default::default(),
                            name: format!("model-{m}"),
                            upstream_name: format!("model-{m}"),
                            input_price_per_mtok: 2.5,
                            output_price_per_mtok: 10.0,
                            cached_input_price_per_mtok: Some(1.25),
                            cache_write_price_per_mtok: Some(3.125),
                            long_context: None,
                            call_prices: Vec::new(),
                            // Voice models alone price audio apart.
                            audio_input_price_per_mtok: None,
                            audio_output_price_per_mtok: None,
                            tier_multipliers: vec![("priority".into(), 2.0), ("flex".into(), 0.5)],
                        })
                        .collect(),
                    rpm_limit: 0,
                    tpm_limit: 0,
                    enabled: true,
                    responses_api: None,
                },
                mock.api_key.clone().unwrap(),
            )
            .await
            .unwrap();
    }
    drop(store);
    let last_key = format!("sk-sluice-limits-{}", KEYS - 1);
    sluice_control::testing::insert_client_keys(
        &data.join("sluice.db"),
        KEYS,
        |k| long_name("key", k),
        |k| format!("sk-sluice-limits-{k}"),
    )
    .unwrap();

    let started = Instant::now();
    cluster.start_control().await;
    let control = cluster.control_output();
    let (bytes, build_ms) = control
        .iter()
        .find_map(|line| {
            let line = line.split("snapshot epoch started").nth(1)?;
            let field = |name: &str| -> Option<u64> {
                let at = line.find(&format!("{name}="))? + name.len() + 1;
                line[at..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .ok()
            };
            Some((field("bytes")?, field("build_ms")?))
        })
        .expect("the control plane logs its first snapshot's size");
    eprintln!(
        "snapshot of {KEYS} keys and {BACKENDS} backends: {bytes} bytes ({:.1} MiB, limit {} MiB), built in {build_ms} ms",
        bytes as f64 / 1048576.0,
        MAX_SNAPSHOT_BYTES >> 20
    );
    assert!(bytes as usize * 2 < MAX_SNAPSHOT_BYTES, "{bytes}");

    let proxy = cluster.proxy().await;
    eprintln!(
        "a data plane took it and was ready {:.1} s after the control plane started",
        started.elapsed().as_secs_f64()
    );
    let r = proxy.chat(&last_key, "model-0").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let listed = Instant::now();
    let out = tokio::process::Command::new(workspace_bin("sluicectl"))
        .args([
            "--endpoint",
            &cluster.control_url(),
            "--timeout",
            "120s",
            "-o",
            "json",
            "key",
            "list",
        ])
        .env("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys = json["clientKeys"].as_array().unwrap();
    assert_eq!(keys.len(), KEYS);
    let response_bytes = {
        use prost::Message as _;
        let mut admin = cluster
            .admin()
            .await
            .max_decoding_message_size(MAX_ADMIN_RESPONSE_BYTES);
        admin
            .list_client_keys(sluice_proto::v1::ListClientKeysRequest::default())
            .await
            .unwrap()
            .into_inner()
            .encoded_len()
    };
    eprintln!(
        "sluicectl listed {} keys in {:.1} s; ListClientKeys is {response_bytes} bytes ({:.1} MiB, limit {} MiB)",
        keys.len(),
        listed.elapsed().as_secs_f64(),
        response_bytes as f64 / 1048576.0,
        MAX_ADMIN_RESPONSE_BYTES >> 20
    );
    assert!(response_bytes * 2 < MAX_ADMIN_RESPONSE_BYTES);
}
