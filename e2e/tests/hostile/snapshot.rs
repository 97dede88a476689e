//! Configuration past what replicas accept. Every field that goes into the routing snapshot
//! is bounded, and an admin write that would grow the snapshot past the size every data
//! plane decodes is refused, with a message naming the limit: otherwise every replica would
//! refuse the snapshot and stay on its old one, and a key revoked afterwards would still work.

use std::time::Duration;

use sluice_proto::v1 as pb;
use tonic::Code;

use crate::common::{Cluster, Mock, eventually};

#[tokio::test]
async fn fields_that_go_into_the_snapshot_are_bounded() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    let mut admin = cluster.admin().await;
    let too_many: Vec<String> = (0..1_001).map(|i| format!("m{i}")).collect();
    let err = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: "many".into(),
            allowed_models: too_many,
            rpm_limit: 0,
            expire_time: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("allowed_models"), "{err:?}");

    let backend = |api_key: String| pb::CreateBackendRequest {
        backend: Some(pb::Backend {
            name: "b".into(),
            base_url: mock.base_url(),
            pool: pb::Pool::Primary as i32,
            weight: 1,
            enabled: true,
            models: vec![pb::ModelRoute {
                name: "m".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        api_key,
    };
    // A key no HTTP header can carry would make every replica refuse every snapshot.
    for api_key in ["sk-a\nb".to_owned(), "x".repeat(1 << 20)] {
        let err = admin.create_backend(backend(api_key)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with("api_key: "), "{err:?}");
    }
    let long_url = format!("{}/{}", mock.base_url(), "p".repeat(4096));
    let mut request = backend(String::new());
    request.backend.as_mut().unwrap().base_url = long_url;
    let err = admin.create_backend(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("base_url"), "{err:?}");
    // A key with surrounding whitespace (pasted from a file) is kept without it.
    admin
        .create_backend(backend(format!(" {}\n", mock.api_key.clone().unwrap())))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_write_that_would_outgrow_the_snapshot_is_refused_and_replicas_keep_following() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (victim, victim_key) = cluster.create_key("victim", &[]).await;
    let proxy = cluster.proxy().await;
    assert_eq!(proxy.chat(&victim_key, "m").await.status(), 200);

    // Keys each as large as validation allows (1,000 allowed models of 256 bytes: about
    // 260 KB of snapshot each) until the control plane refuses one. 400 of them would make
    // a snapshot of over 100 MiB.
    let models: Vec<String> = (0..1_000)
        .map(|i| format!("{i:04}{}", "m".repeat(252)))
        .collect();
    let mut admin = cluster.admin().await;
    let mut refused = None;
    for i in 0..400 {
        let created = admin
            .create_client_key(pb::CreateClientKeyRequest {
                name: format!("large-{i}"),
                allowed_models: models.clone(),
                rpm_limit: 0,
                expire_time: None,
                ..Default::default()
            })
            .await;
        if let Err(status) = created {
            refused = Some((i, status));
            break;
        }
    }
    let (created, status) = refused.expect("400 keys of 260 KB each were all accepted");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("64 MiB") && status.message().contains("MAX_SNAPSHOT_BYTES"),
        "the error names the limit: {status:?}"
    );
    assert!(
        created > 200,
        "refused after only {created} keys: {status:?}"
    );

    // The replica took every snapshot: a key revoked now stops working.
    admin
        .revoke_client_key(pb::RevokeClientKeyRequest { id: victim.id })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the revoked key is refused",
        || async { proxy.chat(&victim_key, "m").await.status() == 401 },
    )
    .await;
    let planes = admin
        .list_data_planes(pb::ListDataPlanesRequest {})
        .await
        .unwrap()
        .into_inner()
        .data_planes;
    assert!(
        planes.iter().all(|p| p.last_error.is_empty()),
        "a replica refused a snapshot: {planes:?}"
    );
}
