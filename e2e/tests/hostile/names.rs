//! Look-alike names: invisible formatting characters and names that read as ids are refused
//! by the admin API, so what an operator reads is what is stored, and `backend get <id>`
//! always means the backend with that id.

use sluice_proto::v1 as pb;
use tonic::Code;

use crate::common::{Cluster, Mock};

fn backend(name: &str, mock: &Mock, model: &str) -> pb::CreateBackendRequest {
    pb::CreateBackendRequest {
        backend: Some(pb::Backend {
            name: name.into(),
            base_url: mock.base_url(),
            enabled: true,
            models: vec![pb::ModelRoute {
                name: model.into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        api_key: String::new(),
    }
}

#[tokio::test]
async fn invisible_characters_and_ids_are_refused_as_names() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    let mut admin = cluster.admin().await;
    let first = admin
        .create_backend(backend("openai", &mock, "m"))
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();

    let look_alikes = [
        "open\u{200B}ai",       // zero-width space: looks like "openai"
        "openai\u{200D}",       // zero-width joiner
        "evil\u{202E}ipa-nepo", // right-to-left override: shows as "evilopen-api"
        "\u{2067}x\u{2069}",    // bidi isolate
        "\u{FEFF}openai",       // byte-order mark
    ];
    for name in look_alikes {
        let err = admin
            .create_backend(backend(name, &mock, "m"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name:?}: {err:?}");
        assert!(
            err.message().starts_with("backend.name:"),
            "{name:?}: {err:?}"
        );
        let err = admin
            .create_client_key(pb::CreateClientKeyRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "key {name:?}: {err:?}");
    }
    // Model names and allow-list entries too: a client could never type them.
    let err = admin
        .create_backend(backend("b", &mock, "gpt\u{200B}-4o"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().starts_with("backend.models[0].name:"),
        "{err:?}"
    );
    let err = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: "k".into(),
            allowed_models: vec!["m\u{202E}".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("allowed_models[0]:"), "{err:?}");

    // A backend named with another's id, by create or by rename.
    let err = admin
        .create_backend(backend(&first.id, &mock, "m"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("must not be an id"), "{err:?}");
    let second = admin
        .create_backend(backend("second", &mock, "m"))
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    let err = admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: second.id.clone(),
                name: first.id.to_uppercase(),
                ..Default::default()
            }),
            update_mask: Some(sluice_proto::wkt::FieldMask {
                paths: vec!["name".into()],
            }),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: second.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // So an id names one backend, always the one it is the id of.
    let got = admin
        .get_backend(pb::GetBackendRequest {
            id: first.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!(got.name, "openai");
    let names: Vec<String> = admin
        .list_backends(pb::ListBackendsRequest {})
        .await
        .unwrap()
        .into_inner()
        .backends
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}
