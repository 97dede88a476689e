//! The control plane driven over real gRPC on 127.0.0.1, as operators and data
//! planes drive it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sluice_control::server::GrpcOptions;
use sluice_control::testing::{Bearer, TestControlPlane, metric_samples};
use sluice_proto::v1 as pb;
use sluice_proto::v1::admin_service_client::AdminServiceClient;
use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;
use sluice_proto::v1::stats_service_client::StatsServiceClient;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;
type Stats = StatsServiceClient<InterceptedService<Channel, Bearer>>;

async fn channel(cp: &TestControlPlane) -> Channel {
    Channel::from_shared(cp.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn admin(cp: &TestControlPlane) -> Admin {
    AdminServiceClient::with_interceptor(channel(cp).await, Bearer(cp.admin_token.clone()))
}

async fn stats(cp: &TestControlPlane) -> Stats {
    StatsServiceClient::with_interceptor(channel(cp).await, Bearer(cp.admin_token.clone()))
}

/// The totals of all time.
async fn totals(cp: &TestControlPlane) -> pb::GetTotalsResponse {
    stats(cp)
        .await
        .get_totals(pb::GetTotalsRequest::default())
        .await
        .unwrap()
        .into_inner()
}

fn backend(name: &str) -> pb::Backend {
    pb::Backend {
        name: name.into(),
        base_url: "https://api.example.com/v1".into(),
        pool: pb::Pool::Primary as i32,
        priority: 10,
        weight: 1,
        rpm_limit: 500,
        enabled: true,
        models: vec![pb::ModelRoute {
            default_max_tokens: Default::default(),
            max_output_tokens: Default::default(),
            name: "gpt-4o-mini".into(),
            upstream_name: "gpt-4o-mini-2024".into(),
            input_price_per_mtok: 0.15,
            output_price_per_mtok: 0.60,
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn create(admin: &mut Admin, name: &str, key: &str) -> pb::Backend {
    admin
        .create_backend(pb::CreateBackendRequest {
            backend: Some(backend(name)),
            api_key: key.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap()
}

async fn get(admin: &mut Admin, id: &str) -> pb::Backend {
    admin
        .get_backend(pb::GetBackendRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap()
}

/// An update listing routes that would set what a route stores back to its default is
/// refused unless it says it means it (`clear_route_fields`): a client that does not know a
/// newer field (an older sluicectl, a Rust/prost client, one that builds its routes anew)
/// sends it unset. An older sluicectl re-listing a backend's routes wrote them back without
/// their audio prices, and audio was charged at the text price, 12.8 times too little.
#[tokio::test]
async fn an_update_that_would_clear_a_routes_fields_unknowingly_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let created = create(&mut admin, "openai-audio", "sk-provider-secret-1234").await;
    let routes = |models: Vec<pb::ModelRoute>, meant: bool| pb::UpdateBackendRequest {
        backend: Some(pb::Backend {
            id: created.id.clone(),
            models,
            ..Default::default()
        }),
        update_mask: Some(mask(&["models"])),
        clear_route_fields: meant,
        ..Default::default()
    };
    let audio = pb::ModelRoute {
        audio_input_price_per_mtok: Some(32.0),
        audio_output_price_per_mtok: Some(64.0),
        ..created.models[0].clone()
    };
    admin
        .update_backend(routes(vec![audio.clone()], false))
        .await
        .unwrap();
    // The route as a client older than the audio prices knows it, and a new one beside it.
    let older = pb::ModelRoute {
        audio_input_price_per_mtok: None,
        audio_output_price_per_mtok: None,
        ..audio.clone()
    };
    let added = pb::ModelRoute {
        name: "added".into(),
        ..Default::default()
    };
    let status = admin
        .update_backend(routes(vec![added.clone(), older.clone()], false))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let message = status.message();
    assert!(
        message.starts_with("clear_route_fields: ")
            && message.contains("backend.models[1]")
            && message.contains("audio_input_price_per_mtok, audio_output_price_per_mtok"),
        "{message}"
    );
    let stored = get(&mut admin, &created.id).await;
    assert_eq!(stored.models, vec![audio.clone()]);
    // Meant: cleared.
    admin
        .update_backend(routes(vec![added, older.clone()], true))
        .await
        .unwrap();
    let stored = get(&mut admin, &created.id).await;
    assert_eq!(stored.models[1], older);
}

/// The refusal names the first routes it would clear and counts the rest: over gRPC the
/// message travels in a header, and a large backend's routes named whole (about 90 bytes
/// each) passed the 16 KiB a tonic client accepts, which then reported a transport error
/// (sluicectl: "cannot reach control plane") instead of `INVALID_ARGUMENT`.
#[tokio::test]
async fn a_refusal_to_clear_many_routes_stays_a_readable_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let priced = |i: usize| pb::ModelRoute {
        name: format!("provider/a-model-with-a-long-name-{i:04}"),
        input_price_per_mtok: 1.0,
        output_price_per_mtok: 2.0,
        cached_input_price_per_mtok: Some(0.5),
        max_output_tokens: 8192,
        ..Default::default()
    };
    let created = admin
        .create_backend(pb::CreateBackendRequest {
            backend: Some(pb::Backend {
                models: (0..1000).map(priced).collect(),
                ..backend("openrouter")
            }),
            api_key: "sk-provider-secret-1234".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    // The routes as a client that knows neither field sends them back.
    let unknowing = (0..1000)
        .map(|i| pb::ModelRoute {
            cached_input_price_per_mtok: None,
            max_output_tokens: 0,
            ..priced(i)
        })
        .collect();
    let status = admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: created.id.clone(),
                models: unknowing,
                ..Default::default()
            }),
            update_mask: Some(mask(&["models"])),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let message = status.message();
    assert!(
        message.starts_with("clear_route_fields: ")
            && message.contains("backend.models[9] (provider/a-model-with-a-long-name-0009)")
            && !message.contains("backend.models[10]")
            && message.contains("and 990 more routes"),
        "{message}"
    );
    assert!(message.len() < 4096, "{} bytes", message.len());
    let stored = get(&mut admin, &created.id).await;
    assert_eq!(stored.models[999].cached_input_price_per_mtok, Some(0.5));
}

/// Every field of `ModelRoute` is either one every client that writes routes sends, or one
/// `sluice_domain::route` checks an update does not clear unknowingly: a field added to the
/// protos without its check would be dropped by older clients unseen.
#[test]
fn every_route_field_is_checked_for_clearing_or_always_sent() {
    use prost::Message as _;
    let set = prost_types::FileDescriptorSet::decode(sluice_proto::FILE_DESCRIPTOR_SET).unwrap();
    let route = set
        .file
        .iter()
        .flat_map(|file| &file.message_type)
        .find(|message| message.name() == "ModelRoute")
        .unwrap();
    let mut fields: Vec<&str> = route.field.iter().map(|f| f.name()).collect();
    let mut known: Vec<&str> = sluice_domain::route::ALWAYS_SENT
        .iter()
        .chain(&sluice_domain::route::CHECKED)
        .copied()
        .collect();
    fields.sort_unstable();
    known.sort_unstable();
    assert_eq!(fields, known);
}

/// A read-modify-write of a backend's routes (as `sluicectl backend update --model NAME`
/// keeps the stored prices) gives back the etag it read: if another admin changed the
/// backend meanwhile, the update is refused with ABORTED and the other's change stays,
/// instead of the prices read a moment earlier being written back over it.
#[tokio::test]
async fn an_update_given_the_etag_it_read_is_refused_once_the_backend_changed() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let created = create(&mut admin, "openai-main", "sk-provider-secret-1234").await;
    let read = get(&mut admin, "openai-main").await;
    assert_eq!(read.etag.len(), 32, "{read:?}");
    assert_eq!(read.etag, created.etag, "the same backend, the same etag");
    let listed = admin
        .list_backends(pb::ListBackendsRequest {})
        .await
        .unwrap()
        .into_inner()
        .backends;
    assert_eq!(listed[0].etag, read.etag);
    let routes = |price: f64, etag: &str| pb::UpdateBackendRequest {
        backend: Some(pb::Backend {
            id: created.id.clone(),
            etag: etag.into(),
            models: vec![pb::ModelRoute {
                input_price_per_mtok: price,
                ..read.models[0].clone()
            }],
            ..Default::default()
        }),
        update_mask: Some(mask(&["models"])),
        api_key: String::new(),
        ..Default::default()
    };
    // Another admin raises the price (no etag: unconditional, as before).
    let raised = admin
        .update_backend(routes(9.0, ""))
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_ne!(raised.etag, read.etag);
    // The first writes back what it read: refused, the raised price kept.
    let status = admin
        .update_backend(routes(read.models[0].input_price_per_mtok, &read.etag))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("changed since it was read"),
        "{status:?}"
    );
    assert_eq!(
        get(&mut admin, "openai-main").await.models[0].input_price_per_mtok,
        9.0
    );
    // Read again, the same change goes through.
    let updated = admin
        .update_backend(routes(1.0, &raised.etag))
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!(updated.models[0].input_price_per_mtok, 1.0);
    assert_eq!(get(&mut admin, "openai-main").await.etag, updated.etag);
}

#[tokio::test]
async fn backend_lifecycle_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;

    let created = create(&mut admin, "openai-main", "sk-provider-secret-1234").await;
    assert_eq!(created.api_key_hint, "1234");
    assert!(!created.id.is_empty());
    assert!(created.create_time.is_some());

    let got = get(&mut admin, "openai-main").await;
    assert_eq!(got, created);

    // Only masked fields change.
    let updated = admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: created.id.clone(),
                priority: 1,
                rpm_limit: 1,
                ..Default::default()
            }),
            update_mask: Some(mask(&["priority"])),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!(updated.priority, 1);
    assert_eq!(updated.rpm_limit, 500);
    assert_eq!(updated.models, created.models);

    // A new key replaces the old one.
    let rekeyed = admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: created.id.clone(),
                ..Default::default()
            }),
            update_mask: None,
            api_key: "sk-provider-secret-9999".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!(rekeyed.api_key_hint, "9999");

    let dup = admin
        .create_backend(pb::CreateBackendRequest {
            backend: Some(backend("openai-main")),
            api_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);

    // The second a docs placeholder left in: `url` takes its host, the data planes' request
    // URIs would not, and every replica would refuse every snapshot from then on.
    for url in [
        "ftp://nowhere",
        "https://{resource}.openai.azure.com/openai/v1",
    ] {
        let mut bad = backend("bad");
        bad.base_url = url.into();
        let err = admin
            .create_backend(pb::CreateBackendRequest {
                backend: Some(bad),
                api_key: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with("backend.base_url:"),
            "{}",
            err.message()
        );
    }

    let mut no_models = backend("no-models");
    no_models.models.clear();
    let err = admin
        .create_backend(pb::CreateBackendRequest {
            backend: Some(no_models),
            api_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at least one model"));

    let err = admin
        .get_backend(pb::GetBackendRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    admin
        .delete_backend(pb::DeleteBackendRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap();
    let list = admin
        .list_backends(pb::ListBackendsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.backends.is_empty());
    let err = admin
        .delete_backend(pb::DeleteBackendRequest { id: created.id })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn an_anthropic_backend_keeps_its_format_version_and_max_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let mut spec = backend("claude");
    spec.api_format = pb::ApiFormat::Anthropic as i32;
    spec.anthropic_version = "2023-06-01".into();
    spec.models[0].default_max_tokens = 1024;
    spec.models[0].max_output_tokens = 16_384;
    let created = admin
        .create_backend(pb::CreateBackendRequest {
            backend: Some(spec),
            api_key: "sk-ant-secret".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!(created.api_format, pb::ApiFormat::Anthropic as i32);
    assert_eq!(created.anthropic_version, "2023-06-01");
    assert_eq!(created.models[0].default_max_tokens, 1024);
    assert_eq!(created.models[0].max_output_tokens, 16_384);
    assert_eq!(
        get(&mut admin, "claude").await.models[0].max_output_tokens,
        16_384
    );
    let mut capped_past = backend("capped-past");
    capped_past.models[0].max_output_tokens = 10_000_001;
    let refused = admin
        .create_backend(pb::CreateBackendRequest {
            backend: Some(capped_past),
            api_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("max_output_tokens"),
        "{refused:?}"
    );
    // Backends stored before formats existed, and those that name none, speak OpenAI.
    let plain = create(&mut admin, "plain", "").await;
    assert_eq!(plain.api_format, pb::ApiFormat::Openai as i32);

    let updated = admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: "claude".into(),
                api_format: pb::ApiFormat::Openai as i32,
                anthropic_version: String::new(),
                ..Default::default()
            }),
            update_mask: Some(sluice_proto::wkt::FieldMask {
                paths: vec!["api_format".into(), "anthropic_version".into()],
            }),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!(updated.api_format, pb::ApiFormat::Openai as i32);
    assert_eq!(updated.anthropic_version, "");
    assert_eq!(updated.models[0].default_max_tokens, 1024);
    assert_eq!(updated.models[0].max_output_tokens, 16_384);

    let mut bad = backend("bad-version");
    bad.anthropic_version = "2023 06 01".into();
    let err = admin
        .create_backend(pb::CreateBackendRequest {
            backend: Some(bad),
            api_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("anthropic_version"),
        "{}",
        err.message()
    );
    let mut bad = backend("bad-format");
    bad.api_format = 7;
    let err = admin
        .create_backend(pb::CreateBackendRequest {
            backend: Some(bad),
            api_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("api_format"), "{}", err.message());
}

#[tokio::test]
async fn every_admin_and_stats_call_needs_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let ch = channel(&cp).await;

    let mut anonymous = AdminServiceClient::new(ch.clone());
    let err = anonymous
        .list_backends(pb::ListBackendsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut wrong = AdminServiceClient::with_interceptor(ch.clone(), Bearer("wrong".into()));
    let err = wrong
        .list_backends(pb::ListBackendsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // The data-plane token is not an admin token, and the other way round.
    let mut dp_as_admin =
        AdminServiceClient::with_interceptor(ch.clone(), Bearer(cp.dataplane_token.clone()));
    assert_eq!(
        dp_as_admin
            .list_backends(pb::ListBackendsRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let mut stats = StatsServiceClient::with_interceptor(ch.clone(), Bearer("wrong".into()));
    assert_eq!(
        stats
            .get_totals(pb::GetTotalsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let mut dp =
        DataPlaneServiceClient::with_interceptor(ch.clone(), Bearer(cp.admin_token.clone()));
    let hello = pb::StreamSnapshotsRequest {
        node_id: "n1".into(),
        ..Default::default()
    };
    let err = dp
        .stream_snapshots(tokio_stream::iter(vec![hello]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Health needs no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn client_keys_are_shown_once_and_revocable() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let created = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: "team-a".into(),
            allowed_models: vec!["gpt-4o-mini".into()],
            rpm_limit: 60,
            expire_time: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.key.starts_with("sk-sluice-"));
    assert!(
        created.key.len() >= 10 + 32,
        "at least 128 bits of randomness"
    );
    let listed = admin
        .list_client_keys(pb::ListClientKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.client_keys.len(), 1);
    let listed_text = format!("{listed:?}");
    assert!(!listed_text.contains(&created.key));
    assert!(created.key.starts_with(&listed.client_keys[0].key_prefix));

    let err = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    admin
        .revoke_client_key(pb::RevokeClientKeyRequest {
            id: "team-a".into(),
        })
        .await
        .unwrap();
    let listed = admin
        .list_client_keys(pb::ListClientKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.client_keys[0].revoked);
    assert!(listed.client_keys[0].revoke_time.is_some());
}

/// A name is one name however its accents are encoded: `café` with `é` (NFC) and with `e` and
/// a combining accent (NFD, as a text copied from a macOS file name has it) were two keys,
/// listed alike, and `key revoke café` revoked whichever form the terminal typed.
#[tokio::test]
async fn a_name_written_with_a_combining_accent_is_the_same_name() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let (composed, decomposed) = ("caf\u{e9}", "cafe\u{301}");
    let created = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: decomposed.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    assert_eq!(created.name, composed, "stored composed");
    let err = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: composed.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    admin
        .revoke_client_key(pb::RevokeClientKeyRequest {
            id: decomposed.into(),
        })
        .await
        .unwrap();
    let listed = admin
        .list_client_keys(pb::ListClientKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.client_keys.len(), 1);
    assert!(listed.client_keys[0].revoked);
    // Backends alike.
    create(&mut admin, "r\u{e9}gion", "sk-provider-secret-1234").await;
    let err = admin
        .create_backend(pb::CreateBackendRequest {
            backend: Some(backend("re\u{301}gion")),
            api_key: "sk-provider-secret-1234".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(get(&mut admin, "re\u{301}gion").await.name, "r\u{e9}gion");
}

/// At 100,000 keys one answer with every key is 20 MiB and sums every key's spend; the
/// dashboard polled it every 5 s. Keys come a page at a time, oldest first, each exactly once
/// however keys are added or revoked between pages, revoked ones left out on request.
#[tokio::test]
async fn client_keys_are_listed_a_page_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let mut create = async |name: String| {
        admin
            .create_client_key(pb::CreateClientKeyRequest {
                name,
                ..Default::default()
            })
            .await
            .unwrap();
    };
    for i in 0..7 {
        create(format!("key-{i}")).await;
    }
    let mut admin = self::admin(&cp).await;
    let mut list = async |page_size: i32, page_token: String, active_only: bool| {
        admin
            .list_client_keys(pb::ListClientKeysRequest {
                page_size,
                page_token,
                active_only,
            })
            .await
            .map(|r| r.into_inner())
    };
    let names = |page: &pb::ListClientKeysResponse| -> Vec<String> {
        page.client_keys.iter().map(|k| k.name.clone()).collect()
    };

    let first = list(3, String::new(), false).await.unwrap();
    assert_eq!(names(&first), ["key-0", "key-1", "key-2"]);
    assert!(!first.next_page_token.is_empty());
    // Between pages: a key already listed is revoked, one to come is revoked, one is added.
    let mut changes = self::admin(&cp).await;
    for name in ["key-1", "key-4"] {
        changes
            .revoke_client_key(pb::RevokeClientKeyRequest { id: name.into() })
            .await
            .unwrap();
    }
    create("key-7".into()).await;
    let second = list(3, first.next_page_token.clone(), false).await.unwrap();
    assert_eq!(names(&second), ["key-3", "key-4", "key-5"]);
    assert!(second.client_keys[1].revoked);
    let third = list(3, second.next_page_token.clone(), false)
        .await
        .unwrap();
    assert_eq!(names(&third), ["key-6", "key-7"]);
    assert!(third.next_page_token.is_empty());

    // Revoked keys left out; the page size may change between pages.
    let active = list(4, String::new(), true).await.unwrap();
    assert_eq!(names(&active), ["key-0", "key-2", "key-3", "key-5"]);
    let rest = list(100, active.next_page_token.clone(), true)
        .await
        .unwrap();
    assert_eq!(names(&rest), ["key-6", "key-7"]);
    assert!(rest.next_page_token.is_empty());

    // Unpaged: every key, as before paging.
    let all = list(0, String::new(), false).await.unwrap();
    assert_eq!(all.client_keys.len(), 8);
    assert!(all.next_page_token.is_empty());

    // A token of another listing, a made-up token and a negative size are refused.
    let err = list(3, first.next_page_token.clone(), true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("page_token"), "{}", err.message());
    let err = list(3, "not-a-token".into(), false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = list(-1, String::new(), false).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("page_size"), "{}", err.message());
}

#[tokio::test]
async fn a_key_may_be_given_an_expiry_in_the_future_only() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |seconds| Some(sluice_proto::wkt::Timestamp { seconds, nanos: 0 });
    let err = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: "born-expired".into(),
            expire_time: at(now - 60),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("expire_time"), "{}", err.message());
    // Past the last second a Timestamp can hold (9999-12-31T23:59:59Z): refused, or it could
    // not be written back (the JSON API's lists failed with it, sluicectl could not print it).
    for seconds in [253_402_300_800, 10_i64.pow(13)] {
        let err = admin
            .create_client_key(pb::CreateClientKeyRequest {
                name: "far".into(),
                expire_time: at(seconds),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{seconds}");
        assert!(err.message().contains("9999-12-31"), "{}", err.message());
    }

    let expires = at(now + 3_600);
    let created = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: "team-a".into(),
            expire_time: expires,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    assert_eq!(created.expire_time, expires);
    assert!(!created.expired);
    let listed = admin
        .list_client_keys(pb::ListClientKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.client_keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["team-a"], "the refused key was not stored");
    assert_eq!(listed.client_keys[0].expire_time, expires);
    assert!(!listed.client_keys[0].expired);
}

#[tokio::test]
async fn a_key_is_read_and_changed_in_place_without_being_reissued() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = |seconds| Some(sluice_proto::wkt::Timestamp { seconds, nanos: 0 });
    let created = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: "team-a".into(),
            allowed_models: vec!["gpt-4o".into()],
            rpm_limit: 60,
            expire_time: at(now + 3_600),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    let get = |id: &str| pb::GetClientKeyRequest { id: id.into() };
    let by_name = admin
        .get_client_key(get("team-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_name.client_key.as_ref(), Some(&created));
    let by_id = admin
        .get_client_key(get(&created.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.client_key.as_ref(), Some(&created));

    let update = |key: pb::ClientKey, paths: &[&str]| pb::UpdateClientKeyRequest {
        client_key: Some(key),
        update_mask: Some(sluice_proto::wkt::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
    };
    // Models, limit and expiry change; the name, the key and its creation stay.
    let changed = admin
        .update_client_key(update(
            pb::ClientKey {
                id: "team-a".into(),
                name: "ignored: not in the mask".into(),
                allowed_models: vec!["gpt-4o-mini".into(), " gpt-4o-mini ".into()],
                rpm_limit: 600,
                expire_time: None,
                ..Default::default()
            },
            &["allowed_models", "rpm_limit", "expire_time"],
        ))
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    assert_eq!(changed.allowed_models, ["gpt-4o-mini"]);
    assert_eq!(changed.rpm_limit, 600);
    assert_eq!(
        changed.expire_time, None,
        "an unset expire_time in the mask clears it"
    );
    assert_eq!(changed.name, "team-a");
    assert_eq!(
        (&changed.id, &changed.key_prefix, &changed.create_time),
        (&created.id, &created.key_prefix, &created.create_time)
    );
    let read = admin
        .get_client_key(get(&created.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        read.client_key.as_ref(),
        Some(&changed),
        "the change was stored"
    );

    // Mistakes are named and change nothing.
    let key = |id: &str| pb::ClientKey {
        id: id.into(),
        expire_time: at(now - 1),
        ..Default::default()
    };
    for (request, code, says) in [
        (
            update(key("team-a"), &[]),
            Code::InvalidArgument,
            "update_mask",
        ),
        (
            update(key("team-a"), &["key_prefix"]),
            Code::InvalidArgument,
            "key_prefix",
        ),
        (
            update(key("team-a"), &["expire_time"]),
            Code::InvalidArgument,
            "expire_time",
        ),
        (
            update(key("team-a"), &["name"]),
            Code::InvalidArgument,
            "name",
        ),
        (
            update(key("nobody"), &["rpm_limit"]),
            Code::NotFound,
            "nobody",
        ),
        (
            update(key(""), &["rpm_limit"]),
            Code::InvalidArgument,
            "client_key.id",
        ),
    ] {
        let err = admin.update_client_key(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().contains(says), "{}", err.message());
    }
    let read = admin
        .get_client_key(get("team-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.client_key.as_ref(), Some(&changed));
    let err = admin.get_client_key(get("nobody")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A revoked key stays revoked: it can be read by id, not changed.
    admin
        .revoke_client_key(pb::RevokeClientKeyRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap();
    let read = admin
        .get_client_key(get(&created.id))
        .await
        .unwrap()
        .into_inner();
    assert!(read.client_key.unwrap().revoked);
    let err = admin
        .update_client_key(update(
            pb::ClientKey {
                id: created.id.clone(),
                rpm_limit: 1,
                ..Default::default()
            },
            &["rpm_limit"],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("revoked"), "{}", err.message());
}

#[tokio::test]
async fn token_and_parallel_limits_are_set_changed_checked_and_reach_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let created = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: "team-a".into(),
            tpm_limit: 100_000,
            max_parallel_requests: 8,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    assert_eq!(
        (created.tpm_limit, created.max_parallel_requests),
        (100_000, 8)
    );
    let backend = admin
        .create_backend(pb::CreateBackendRequest {
            backend: Some(pb::Backend {
                tpm_limit: 90_000,
                ..backend("b1")
            }),
            api_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!(backend.tpm_limit, 90_000);

    // Each changes alone through its mask path; 0 removes a limit.
    let changed = admin
        .update_client_key(pb::UpdateClientKeyRequest {
            client_key: Some(pb::ClientKey {
                id: "team-a".into(),
                tpm_limit: 0,
                max_parallel_requests: 4,
                rpm_limit: 1,
                ..Default::default()
            }),
            update_mask: Some(mask(&["tpm_limit", "max_parallel_requests"])),
        })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    assert_eq!(
        (
            changed.tpm_limit,
            changed.max_parallel_requests,
            changed.rpm_limit
        ),
        (0, 4, 0)
    );
    let changed = admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: "b1".into(),
                tpm_limit: 30_000,
                rpm_limit: 1,
                ..Default::default()
            }),
            update_mask: Some(mask(&["tpm_limit"])),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!((changed.tpm_limit, changed.rpm_limit), (30_000, 500));
    let read = admin
        .get_client_key(pb::GetClientKeyRequest {
            id: "team-a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    assert_eq!((read.tpm_limit, read.max_parallel_requests), (0, 4));

    // Past their bounds: INVALID_ARGUMENT naming the field, nothing stored.
    let err = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: "team-b".into(),
            tpm_limit: 2_000_000_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("tpm_limit"), "{}", err.message());
    let err = admin
        .update_client_key(pb::UpdateClientKeyRequest {
            client_key: Some(pb::ClientKey {
                id: "team-a".into(),
                max_parallel_requests: 2_000_000,
                ..Default::default()
            }),
            update_mask: Some(mask(&["max_parallel_requests"])),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("max_parallel_requests"),
        "{}",
        err.message()
    );
    let err = admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: "b1".into(),
                tpm_limit: 1_000_000_001,
                ..Default::default()
            }),
            update_mask: Some(mask(&["tpm_limit"])),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("backend.tpm_limit"),
        "{}",
        err.message()
    );
    let keys = admin
        .list_client_keys(pb::ListClientKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .client_keys;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].max_parallel_requests, 4);

    // A replica gets the totals; it divides them itself.
    let (_hello, mut stream) = replica(&cp, "replica-1").await;
    let snapshot = next(&mut stream).await;
    assert_eq!(snapshot.backends[0].tpm_limit, 30_000);
    assert_eq!(
        (
            snapshot.client_keys[0].tpm_limit,
            snapshot.client_keys[0].max_parallel_requests
        ),
        (0, 4)
    );
}

#[tokio::test]
async fn settings_round_trip_with_a_mask() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let before = admin
        .get_settings(pb::GetSettingsRequest {})
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(before.max_attempts, 3);
    let after = admin
        .update_settings(pb::UpdateSettingsRequest {
            settings: Some(pb::Settings {
                max_attempts: 5,
                failure_threshold: 99,
                ..Default::default()
            }),
            update_mask: Some(mask(&["max_attempts"])),
        })
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(after.max_attempts, 5);
    assert_eq!(after.failure_threshold, before.failure_threshold);
    let err = admin
        .update_settings(pb::UpdateSettingsRequest {
            settings: Some(pb::Settings {
                max_attempts: 0,
                ..Default::default()
            }),
            update_mask: Some(mask(&["max_attempts"])),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("settings.max_attempts"));

    // A Duration whose nanos are not within a second (a script's `nanos = ms * 1_000_000`)
    // is refused: stored, it read back as another duration (1.5 s as 0.15 s) or, with a part
    // below a millisecond, not at all, and the settings row broke every read after it.
    for nanos in [1_500_000_000, 1_000_000_001] {
        let err = admin
            .update_settings(pb::UpdateSettingsRequest {
                settings: Some(pb::Settings {
                    connect_timeout: Some(pbjson_types::Duration { seconds: 0, nanos }),
                    ..Default::default()
                }),
                update_mask: Some(mask(&["connect_timeout"])),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{nanos}");
        assert!(
            err.message().starts_with("settings.connect_timeout"),
            "{}",
            err.message()
        );
    }
    let kept = admin
        .get_settings(pb::GetSettingsRequest {})
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(kept.connect_timeout, before.connect_timeout);
}

#[tokio::test]
async fn snapshots_reach_a_replica_on_every_change_and_acks_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let (tx, mut stream) = open_snapshot_stream(
        &cp,
        pb::StreamSnapshotsRequest {
            node_id: "replica-1".into(),
            hostname: "host-1".into(),
            build_version: "test".into(),
            ..Default::default()
        },
    )
    .await;
    let first = next(&mut stream).await;
    assert!(first.backends.is_empty());
    // Snapshots only go forward; wait until one carries the new backend.
    create(&mut admin, "b1", "sk-provider-secret-1234").await;
    let mut snapshot = next(&mut stream).await;
    while snapshot.backends.is_empty() {
        assert!(snapshot.version > first.version);
        snapshot = next(&mut stream).await;
    }
    assert!(snapshot.version > first.version);
    assert_eq!(snapshot.backends[0].api_key, "sk-provider-secret-1234");
    assert_eq!(
        snapshot.backends[0].models[0].upstream_name,
        "gpt-4o-mini-2024"
    );
    assert_eq!(snapshot.replica_count, 1);
    tx.send(pb::StreamSnapshotsRequest {
        node_id: "replica-1".into(),
        version: snapshot.version,
        response_nonce: snapshot.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let planes = admin
            .list_data_planes(pb::ListDataPlanesRequest {})
            .await
            .unwrap()
            .into_inner();
        let plane = planes
            .data_planes
            .iter()
            .find(|d| d.node_id == "replica-1")
            .unwrap();
        assert!(plane.connected);
        assert_eq!(plane.hostname, "host-1");
        if plane.acked_version == snapshot.version {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "ack never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A disabled backend leaves the snapshot; a revoked key too.
    admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: "b1".into(),
                enabled: false,
                ..Default::default()
            }),
            update_mask: Some(mask(&["enabled"])),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut snapshot = next(&mut stream).await;
    while !snapshot.backends.is_empty() {
        snapshot = next(&mut stream).await;
    }
}

fn record(
    seq: u64,
    backend_id: &str,
    prompt: u64,
    completion: u64,
    latency_ms: i64,
) -> pb::UsageRecord {
    pb::UsageRecord {
        sequence: seq,
        request_id: format!("req-{seq}"),
        backend_id: backend_id.into(),
        model: "gpt-4o-mini".into(),
        client_key_id: "key-1".into(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        latency: Some(sluice_proto::wkt::Duration {
            seconds: latency_ms / 1000,
            nanos: ((latency_ms % 1000) * 1_000_000) as i32,
        }),
        status_code: 200,
        time: Some(sluice_proto::wkt::Timestamp {
            seconds: 1_764_000_000,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// A replica that refuses this control plane's snapshots as another database's (it was
/// started on an empty or wrong one) names the database it serves in its reports: refused
/// here, its usage waits on the replica for the right one. Acked into the wrong database, the
/// whole incident's usage was lost from the real one.
#[tokio::test]
async fn usage_served_under_another_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut dp = DataPlaneServiceClient::with_interceptor(
        channel(&cp).await,
        Bearer(cp.dataplane_token.clone()),
    );
    let ours: String = rusqlite::Connection::open(dir.path().join("sluice.db"))
        .unwrap()
        .query_row(
            "SELECT value FROM meta WHERE key = 'database_id'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let report = |database_id: &str, sequence: u64| pb::ReportUsageRequest {
        node_id: "replica-1".into(),
        incarnation: "inc-1".into(),
        records: vec![record(sequence, "b", 10, 10, 10)],
        database_id: database_id.into(),
        ..Default::default()
    };
    let refused = dp
        .report_usage(tokio_stream::iter(vec![report("another-database", 1)]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("another-database"),
        "{refused:?}"
    );
    for (database, sequence) in [(ours.as_str(), 1), ("", 2)] {
        let mut acks = dp
            .report_usage(tokio_stream::iter(vec![report(database, sequence)]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            acks.message().await.unwrap().unwrap().acked_sequence,
            sequence
        );
    }
    let totals = stats(&cp)
        .await
        .get_totals(pb::GetTotalsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(totals.request_count, 2);
}

#[tokio::test]
async fn usage_is_counted_once_even_when_resent() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let b = create(&mut admin, "b1", "").await;
    let mut dp = DataPlaneServiceClient::with_interceptor(
        channel(&cp).await,
        Bearer(cp.dataplane_token.clone()),
    );
    let batch = |records: Vec<pb::UsageRecord>| pb::ReportUsageRequest {
        node_id: "replica-1".into(),
        incarnation: "inc-1".into(),
        records,
        events: vec![],
        ..Default::default()
    };
    let first = batch(
        (1..=3)
            .map(|i| record(i, &b.id, 1_000_000, 1_000_000, 10))
            .collect(),
    );
    // The same records again (a resend after a lost ack), then one new one.
    let resend = batch(
        (2..=4)
            .map(|i| record(i, &b.id, 1_000_000, 1_000_000, 10))
            .collect(),
    );
    let mut acks = dp
        .report_usage(tokio_stream::iter(vec![first, resend]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.message().await.unwrap().unwrap().acked_sequence, 3);
    assert_eq!(acks.message().await.unwrap().unwrap().acked_sequence, 4);

    let mut stats = stats(&cp).await;
    let totals = stats
        .get_totals(pb::GetTotalsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(totals.request_count, 4);
    assert_eq!(totals.prompt_tokens, 4_000_000);
    assert_eq!(totals.completion_tokens, 4_000_000);
    // 4 × (1M × 0.15 + 1M × 0.60) / 1M
    assert!((totals.cost - 3.0).abs() < 1e-9, "{}", totals.cost);
    assert!(
        totals.p50_latency_ms >= 10.0 && totals.p50_latency_ms < 12.0,
        "{}",
        totals.p50_latency_ms
    );

    let filtered = stats
        .get_totals(pb::GetTotalsRequest {
            backend_id: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filtered.request_count, 0);
}

#[tokio::test]
async fn no_plaintext_provider_key_is_stored_in_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let secret = "sk-PLAINTEXT-provider-key-0123456789";
    create(&mut admin, "b1", secret).await;
    admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: "b1".into(),
                ..Default::default()
            }),
            update_mask: None,
            api_key: format!("{secret}-rotated"),
            ..Default::default()
        })
        .await
        .unwrap();
    cp.shutdown().await;
    let mut checked = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{} holds the plaintext key",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 2, "the database and its files were checked");
}

fn mask(paths: &[&str]) -> sluice_proto::wkt::FieldMask {
    sluice_proto::wkt::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    }
}

/// A replica's snapshot stream, opened with its hello; the stream lasts while the sender
/// is held.
async fn replica(
    cp: &TestControlPlane,
    node_id: &str,
) -> (
    tokio::sync::mpsc::Sender<pb::StreamSnapshotsRequest>,
    tonic::Streaming<pb::StreamSnapshotsResponse>,
) {
    open_snapshot_stream(
        cp,
        pb::StreamSnapshotsRequest {
            node_id: node_id.into(),
            ..Default::default()
        },
    )
    .await
}

/// A replica's snapshot stream opened with `hello`: the sender for its later messages, and
/// the stream.
async fn open_snapshot_stream(
    cp: &TestControlPlane,
    hello: pb::StreamSnapshotsRequest,
) -> (
    tokio::sync::mpsc::Sender<pb::StreamSnapshotsRequest>,
    tonic::Streaming<pb::StreamSnapshotsResponse>,
) {
    let mut dp = DataPlaneServiceClient::with_interceptor(
        channel(cp).await,
        Bearer(cp.dataplane_token.clone()),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(hello).await.unwrap();
    let stream = dp
        .stream_snapshots(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

async fn next(stream: &mut tonic::Streaming<pb::StreamSnapshotsResponse>) -> pb::Snapshot {
    // Generous: with 24 replicas joining at once it failed once in 5 s on a loaded machine.
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("a snapshot within 20 s")
        .unwrap()
        .unwrap()
        .snapshot
        .unwrap()
}

#[tokio::test]
async fn usage_series_splits_at_utc_hour_and_day_boundaries_and_groups() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    // Hourly rows kept whatever their age: the records below are of 2025-11-25, past the
    // default retention, and the pass the control plane runs at start may come after them.
    admin
        .update_settings(pb::UpdateSettingsRequest {
            settings: Some(pb::Settings {
                usage_retention_days: 0,
                ..Default::default()
            }),
            update_mask: Some(mask(&["usage_retention_days"])),
        })
        .await
        .unwrap();
    let b1 = create(&mut admin, "b1", "").await;
    let b2 = create(&mut admin, "b2", "").await;
    let mut dp = DataPlaneServiceClient::with_interceptor(
        channel(&cp).await,
        Bearer(cp.dataplane_token.clone()),
    );
    // 2025-11-24T23:59:59Z, 2025-11-25T00:00:00Z and 00:59:59Z, 01:00:00Z.
    let day = 1_764_028_800; // 2025-11-25T00:00:00Z
    let at = |seq: u64, backend: &str, secs: i64| {
        let mut r = record(seq, backend, 10, 5, 100);
        r.time = Some(sluice_proto::wkt::Timestamp {
            seconds: secs,
            nanos: 0,
        });
        r
    };
    let records = vec![
        at(1, &b1.id, day - 1),
        at(2, &b1.id, day),
        at(3, &b2.id, day + 3599),
        at(4, &b2.id, day + 3600),
    ];
    let mut acks = dp
        .report_usage(tokio_stream::iter(vec![pb::ReportUsageRequest {
            node_id: "n".into(),
            incarnation: "i".into(),
            records,
            events: vec![],
            ..Default::default()
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.message().await.unwrap().unwrap().acked_sequence, 4);

    let mut stats = stats(&cp).await;
    let hourly = stats
        .get_usage(pb::GetUsageRequest {
            granularity: pb::Granularity::Hour as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .buckets;
    let starts: Vec<(i64, u64)> = hourly
        .iter()
        .map(|b| (b.start_time.unwrap().seconds, b.request_count))
        .collect();
    assert_eq!(starts, vec![(day - 3600, 1), (day, 2), (day + 3600, 1)]);

    let daily = stats
        .get_usage(pb::GetUsageRequest {
            granularity: pb::Granularity::Day as i32,
            group_by: pb::GroupBy::Backend as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .buckets;
    let rows: Vec<(i64, String, u64, u64)> = daily
        .iter()
        .map(|b| {
            (
                b.start_time.unwrap().seconds,
                b.group_label.clone(),
                b.request_count,
                b.total_tokens,
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (day - 86_400, "b1".to_owned(), 1, 15),
            (day, "b1".to_owned(), 1, 15),
            (day, "b2".to_owned(), 2, 30),
        ]
    );
    // Sums over buckets equal the totals.
    let totals = stats
        .get_totals(pb::GetTotalsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        daily.iter().map(|b| b.request_count).sum::<u64>(),
        totals.request_count
    );
    let cost: f64 = daily.iter().map(|b| b.cost).sum();
    assert!((cost - totals.cost).abs() < 1e-12);
    // (10 × 0.15 + 5 × 0.60) / 1M per request
    assert!(
        (totals.cost - 4.0 * 4.5e-6).abs() < 1e-15,
        "{}",
        totals.cost
    );
}

#[tokio::test]
async fn metrics_count_calls_by_method_and_code_usage_writes_and_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let b = create(&mut admin, "b1", "sk-provider-secret-9876").await;
    let mut bad = backend("b2");
    bad.base_url = "not a url".into();
    let err = admin
        .create_backend(pb::CreateBackendRequest {
            backend: Some(bad),
            api_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut anonymous = AdminServiceClient::new(channel(&cp).await);
    let err = anonymous
        .list_backends(pb::ListBackendsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // One replica connected, 250 usage records in 3 batches, one batch resent.
    let mut dp = DataPlaneServiceClient::with_interceptor(
        channel(&cp).await,
        Bearer(cp.dataplane_token.clone()),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(pb::StreamSnapshotsRequest {
        node_id: "replica-1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = dp
        .stream_snapshots(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let version = next(&mut stream).await.version;
    let records: Vec<pb::UsageRecord> = (1..=250).map(|s| record(s, &b.id, 10, 5, 40)).collect();
    let mut batches: Vec<pb::ReportUsageRequest> = records
        .chunks(100)
        .map(|c| pb::ReportUsageRequest {
            node_id: "replica-1".into(),
            incarnation: "i1".into(),
            records: c.to_vec(),
            ..Default::default()
        })
        .collect();
    batches.push(batches[0].clone());
    let mut acks = dp
        .report_usage(tokio_stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    let mut last = 0;
    while let Some(ack) = acks.message().await.unwrap() {
        last = ack.acked_sequence;
    }
    assert_eq!(last, 250);

    let text = metrics_text(&cp).await;
    let m = metric_samples(&text);
    let get = |name: &str| -> f64 {
        *m.get(name)
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
    };
    let calls = |method: &str, code: &str| {
        get(&format!(
            r#"sluice_grpc_requests_total{{method="sluice.v1.AdminService/{method}",code="{code}"}}"#
        ))
    };
    assert_eq!(calls("CreateBackend", "OK"), 1.0);
    assert_eq!(calls("CreateBackend", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(calls("ListBackends", "UNAUTHENTICATED"), 1.0);
    assert_eq!(
        get(
            r#"sluice_grpc_request_duration_seconds_count{method="sluice.v1.AdminService/CreateBackend"}"#
        ),
        2.0
    );
    assert_eq!(
        get(
            r#"sluice_grpc_requests_total{method="sluice.v1.DataPlaneService/ReportUsage",code="OK"}"#
        ),
        1.0,
        "a stream counts when it ends"
    );
    // It is not timed: a stream's length is its client's (a replica's usage stream open for a
    // day landed in the duration histogram's +Inf).
    assert!(
        !m.contains_key(
            r#"sluice_grpc_request_duration_seconds_count{method="sluice.v1.DataPlaneService/ReportUsage"}"#
        ),
        "{text}"
    );
    assert_eq!(
        get("sluice_usage_records_ingested_total"),
        250.0,
        "the resent batch counted once"
    );
    assert!(get("sluice_usage_commits_total") >= 1.0);
    assert!(get(r#"sluice_sqlite_write_seconds_count{op="usage_ingest"}"#) >= 1.0);
    assert!(get(r#"sluice_sqlite_write_seconds_count{op="admin"}"#) >= 1.0);
    assert!(get(r#"sluice_sqlite_write_seconds_count{op="data_plane"}"#) >= 1.0);
    assert_eq!(get("sluice_data_planes_connected"), 1.0);
    assert!(get("sluice_snapshot_version") >= version as f64);
    assert!(!text.contains("sk-provider-secret-9876"));
    assert!(!text.contains(&cp.admin_token));
    assert!(!text.contains(&cp.dataplane_token));

    // Unknown paths never become labels.
    let mut raw = tonic::client::Grpc::new(channel(&cp).await);
    raw.ready().await.unwrap();
    let mut request = tonic::Request::new(());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", cp.admin_token).parse().unwrap(),
    );
    let err = raw
        .unary::<(), (), _>(
            request,
            "/sluice.v1.AdminService/NoSuchMethod".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    let text = metrics_text(&cp).await;
    assert!(!text.contains("NoSuchMethod"));
    assert!(
        text.contains(r#"sluice_grpc_requests_total{method="unknown",code="UNIMPLEMENTED"} 1"#)
    );
}

/// A record whose model or ids are past their bounds (an old or broken replica) is counted
/// under the placeholder, never stored as sent and never refused; a report larger than the
/// limit is refused with `OUT_OF_RANGE` after the acks already owed.
#[tokio::test]
async fn usage_values_past_their_bounds_are_clamped_and_oversized_reports_refused() {
    use sluice_proto::limits::{MAX_MODEL_NAME_BYTES, MAX_USAGE_REPORT_BYTES};
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let b = create(&mut admin, "b1", "").await;
    let mut dp = DataPlaneServiceClient::with_interceptor(
        channel(&cp).await,
        Bearer(cp.dataplane_token.clone()),
    )
    .max_encoding_message_size(usize::MAX);
    let batch = |records: Vec<pb::UsageRecord>| pb::ReportUsageRequest {
        node_id: "replica-1".into(),
        incarnation: "inc-1".into(),
        records,
        events: vec![],
        ..Default::default()
    };
    let mut long = record(1, &b.id, 10, 5, 10);
    long.model = "m".repeat(MAX_MODEL_NAME_BYTES + 1);
    let mut forged = record(2, &b.id, 10, 5, 10);
    forged.model = "gpt\nforged".into();
    let fine = record(3, &b.id, 10, 5, 10);
    let mut huge = record(4, &b.id, 10, 5, 10);
    huge.model = "m".repeat(MAX_USAGE_REPORT_BYTES);
    let mut acks = dp
        .report_usage(tokio_stream::iter(vec![
            batch(vec![long, forged, fine]),
            batch(vec![huge]),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.message().await.unwrap().unwrap().acked_sequence, 3);
    let refused = acks.message().await.unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");

    let mut stats = stats(&cp).await;
    let by_model = stats
        .get_usage(pb::GetUsageRequest {
            group_by: pb::GroupBy::Model as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut models: Vec<(String, u64)> = by_model
        .buckets
        .iter()
        .map(|p| (p.group_key.clone(), p.request_count))
        .collect();
    models.sort();
    assert_eq!(
        models,
        [("gpt-4o-mini".to_owned(), 1), ("other".to_owned(), 2)]
    );
    let text = metrics_text(&cp).await;
    assert_eq!(
        metric_samples(&text).get("sluice_usage_records_clamped_total"),
        Some(&2.0)
    );
}

/// Bytes sent on a stream as they are, whatever they decode to.
#[derive(Debug, Default, Clone)]
struct RawMessage(Vec<u8>);

impl prost::Message for RawMessage {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }
    fn encoded_len(&self) -> usize {
        self.0.len()
    }
    fn clear(&mut self) {
        self.0.clear();
    }
}

/// A report that is not a whole protobuf message (cut short) ends its stream with
/// `INVALID_ARGUMENT` and prost's reason, after the acks already owed, and nothing of it is
/// counted.
#[tokio::test]
async fn a_report_cut_short_is_refused_after_the_acks_owed() {
    use prost::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let b = create(&mut admin, "b1", "").await;
    let batch = |records: Vec<pb::UsageRecord>| pb::ReportUsageRequest {
        node_id: "replica-1".into(),
        incarnation: "inc-1".into(),
        records,
        ..Default::default()
    };
    let whole = batch(vec![record(1, &b.id, 10, 5, 10)]).encode_to_vec();
    let mut cut = batch(vec![
        record(2, &b.id, 10, 5, 10),
        record(3, &b.id, 10, 5, 10),
    ])
    .encode_to_vec();
    cut.truncate(cut.len() - 3);

    let mut raw = tonic::client::Grpc::new(channel(&cp).await);
    raw.ready().await.unwrap();
    let mut request = tonic::Request::new(tokio_stream::iter([RawMessage(whole), RawMessage(cut)]));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", cp.dataplane_token).parse().unwrap(),
    );
    let mut acks = raw
        .streaming(
            request,
            "/sluice.v1.DataPlaneService/ReportUsage".parse().unwrap(),
            sluice_proto::codec::SliceCodec::<RawMessage, pb::ReportUsageResponse>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.message().await.unwrap().unwrap().acked_sequence, 1);
    let refused = acks.message().await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("request: failed to decode Protobuf message"),
        "{refused:?}"
    );

    assert_eq!(totals(&cp).await.request_count, 1);
}

/// Many replicas join at once: the snapshot they all end up with divides every RPM limit by
/// the number that joined, never by a count some earlier build read while others were still
/// joining.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_joins_publish_the_final_replica_count() {
    const REPLICAS: usize = 24;
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let channel = channel(&cp).await;
    let mut streams = Vec::new();
    let mut senders = Vec::new();
    let joins: Vec<_> = (0..REPLICAS)
        .map(|i| {
            let mut dp = DataPlaneServiceClient::with_interceptor(
                channel.clone(),
                Bearer(cp.dataplane_token.clone()),
            );
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel(8);
                tx.send(pb::StreamSnapshotsRequest {
                    node_id: format!("replica-{i}"),
                    ..Default::default()
                })
                .await
                .unwrap();
                let stream = dp
                    .stream_snapshots(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                (tx, stream)
            })
        })
        .collect();
    for join in joins {
        let (tx, stream) = join.await.unwrap();
        senders.push(tx);
        streams.push(stream);
    }
    // Every replica ends up with a snapshot dividing by all of them.
    let mut lasts = Vec::new();
    let mut holders: Vec<String> = (0..REPLICAS).map(|i| format!("replica-{i}")).collect();
    holders.sort();
    for stream in &mut streams {
        let mut last = next(stream).await;
        while last.replica_count as usize != REPLICAS {
            last = next(stream).await;
        }
        // Named too, sorted: each replica's place is its rank (max_parallel_requests).
        assert_eq!(last.share_holders, holders);
        lasts.push(last.version);
    }
    // And keeps it: every join has committed now, so no snapshot up to the newest published
    // counts fewer (a count some build read before the last join, published after a correct
    // one, would leave every replica enforcing too large a share for good).
    let latest = admin(&cp)
        .await
        .list_data_planes(pb::ListDataPlanesRequest {})
        .await
        .unwrap()
        .into_inner()
        .data_planes
        .iter()
        .map(|p| p.latest_version)
        .max()
        .unwrap();
    for (stream, mut version) in streams.iter_mut().zip(lasts) {
        while version < latest {
            let last = next(stream).await;
            assert_eq!(last.replica_count as usize, REPLICAS, "v{}", last.version);
            version = last.version;
        }
    }
    drop(senders);
}

/// Text pasted by mistake where an id, an etag or a field name goes (20 KB of it) is
/// refused for what it is, and the answer quotes at most a line of it: a status quoting it
/// whole passed the 16 KiB of headers a tonic client accepts (a status travels in them), and
/// `sluicectl` reported the control plane unreachable instead of the refusal.
#[tokio::test]
async fn text_pasted_into_an_id_an_etag_or_a_field_is_refused_and_quoted_short() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let created = create(&mut admin, "openai-main", "sk-provider-secret-1234").await;
    let pasted = "pasted text ".repeat(1_700);
    let short = |status: &tonic::Status| {
        assert!(
            status.message().len() < 1_024,
            "{} bytes",
            status.message().len()
        );
    };
    let status = admin
        .get_backend(pb::GetBackendRequest { id: pasted.clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("at most 256 bytes"), "{status:?}");
    short(&status);
    let status = admin
        .revoke_client_key(pb::RevokeClientKeyRequest { id: pasted.clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: created.id.clone(),
                etag: pasted.clone(),
                weight: 2,
                ..Default::default()
            }),
            update_mask: Some(mask(&["weight"])),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("\"pasted text pasted"),
        "{status:?}"
    );
    short(&status);
    let status = admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(pb::Backend {
                id: created.id.clone(),
                ..Default::default()
            }),
            update_mask: Some(mask(&[&pasted])),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    short(&status);
    let status = admin
        .update_settings(pb::UpdateSettingsRequest {
            settings: Some(pb::Settings::default()),
            update_mask: Some(mask(&[&pasted])),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    short(&status);
    // A name 256 bytes long at most is looked up, and not found.
    let status = admin
        .get_backend(pb::GetBackendRequest {
            id: "n".repeat(256),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    short(&status);
}

/// The one replica's `last_error` as listed, once it said `error_detail` on its hello.
async fn listed_refusal(cp: &TestControlPlane, error_detail: String) -> String {
    let (tx, mut stream) = open_snapshot_stream(
        cp,
        pb::StreamSnapshotsRequest {
            node_id: "dp-1".into(),
            incarnation: "inc-a".into(),
            error_detail,
            ..Default::default()
        },
    )
    .await;
    next(&mut stream).await;
    let mut planes = admin(cp)
        .await
        .list_data_planes(pb::ListDataPlanesRequest {})
        .await
        .unwrap()
        .into_inner()
        .data_planes;
    assert_eq!(planes.len(), 1);
    drop(tx);
    planes.remove(0).last_error
}

/// A replica's refusal of a snapshot (said on its hello here; a nack goes through the same
/// reading) is stored and listed to admins: a megabyte of it is kept to its first 4,096
/// characters.
#[tokio::test]
async fn a_replicas_refusal_is_kept_to_its_first_lines() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let listed = listed_refusal(&cp, "é".repeat(1 << 19)).await;
    assert_eq!(listed, format!("{}…", "é".repeat(4096)));
}

/// A replica that could not decode a snapshot (past the size it accepts) loses the stream
/// it came on; it says so on its next stream's hello, which the control plane lists as the
/// replica's error (`sluicectl dataplane list`, the dashboard), as it lists any nack.
#[tokio::test]
async fn a_refusal_said_on_a_hello_is_listed_as_the_replicas_error() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let listed = listed_refusal(
        &cp,
        "snapshot larger than this replica accepts (64 MiB)".into(),
    )
    .await;
    assert!(
        listed.contains("larger than this replica accepts"),
        "{listed:?}"
    );
}

/// Two live processes given one node id count as one replica, so each takes the share of
/// every limit one replica has: together twice the limit. The control plane cannot tell them
/// from a restarted replica taking over its share, but it says so: the node is listed with
/// the error while streams of both incarnations are open, and no longer once one has closed.
#[tokio::test]
async fn two_processes_with_one_node_id_are_listed_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let channel = channel(&cp).await;
    let open = |incarnation: &str| {
        let mut dp = DataPlaneServiceClient::with_interceptor(
            channel.clone(),
            Bearer(cp.dataplane_token.clone()),
        );
        let hello = pb::StreamSnapshotsRequest {
            node_id: "dp-1".into(),
            incarnation: incarnation.into(),
            ..Default::default()
        };
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            tx.send(hello).await.unwrap();
            let mut stream = dp
                .stream_snapshots(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            next(&mut stream).await;
            (tx, stream)
        }
    };
    let mut admin = admin(&cp).await;
    let listed = |admin: &mut sluice_control::testing::AdminClient| {
        let mut admin = admin.clone();
        async move {
            let planes = admin
                .list_data_planes(pb::ListDataPlanesRequest {})
                .await
                .unwrap()
                .into_inner()
                .data_planes;
            assert_eq!(planes.len(), 1);
            planes[0].last_error.clone()
        }
    };
    let first = open("inc-a").await;
    assert_eq!(listed(&mut admin).await, "");
    let second = open("inc-b").await;
    let error = listed(&mut admin).await;
    assert!(error.contains("--node-id"), "{error:?}");

    drop(first);
    let mut cleared = false;
    for _ in 0..100 {
        if listed(&mut admin).await.is_empty() {
            cleared = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        cleared,
        "still listed with the error once one of them had gone"
    );
    drop(second);
}

#[tokio::test]
async fn the_responses_api_flag_and_the_affinity_key_reach_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let mut off = backend("no-responses");
    off.responses_api = Some(false);
    let created = admin
        .create_backend(pb::CreateBackendRequest {
            backend: Some(off),
            api_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!(created.responses_api, Some(false));
    let default = create(&mut admin, "default", "").await;
    assert_eq!(default.responses_api, None, "unset: the default");

    let (_hello, mut stream) = replica(&cp, "replica-1").await;
    let snapshot = next(&mut stream).await;
    let flag = |s: &pb::Snapshot, name: &str| {
        s.backends
            .iter()
            .find(|b| b.name == name)
            .and_then(|b| b.responses_api)
    };
    // The default is resolved for replicas.
    assert_eq!(flag(&snapshot, "no-responses"), Some(false));
    assert_eq!(flag(&snapshot, "default"), Some(true));
    assert_eq!(snapshot.affinity_keys.len(), 1);
    assert_eq!(snapshot.affinity_keys[0].secret.len(), 32);
    let key = snapshot.affinity_keys[0].clone();

    let mut update = pb::Backend {
        id: created.id.clone(),
        ..Default::default()
    };
    update.responses_api = Some(true);
    let updated = admin
        .update_backend(pb::UpdateBackendRequest {
            backend: Some(update),
            update_mask: Some(mask(&["responses_api"])),
            api_key: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!(updated.responses_api, Some(true));
    let mut later = next(&mut stream).await;
    while flag(&later, "no-responses") != Some(true) {
        later = next(&mut stream).await;
    }
    // The same affinity key: ids issued before the change still verify.
    assert_eq!(later.affinity_keys, vec![key]);
}

/// A provider key is write-only: no answer shows it. Moving its backend to another origin
/// (scheme, host or port) without giving the key again would have every replica send it
/// there, so the admin token could read any stored key; that needs the key again. A move
/// within the origin (another path) does not.
#[tokio::test]
async fn moving_a_backend_to_another_origin_needs_its_key_again() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let move_to = |id: &str, base_url: &str, api_key: &str| pb::UpdateBackendRequest {
        backend: Some(pb::Backend {
            id: id.into(),
            base_url: base_url.into(),
            ..Default::default()
        }),
        update_mask: Some(mask(&["base_url"])),
        api_key: api_key.into(),
        ..Default::default()
    };
    // A key too short to have a hint shown is a key all the same.
    let short = create(&mut admin, "b0", "sk-123").await;
    assert_eq!(short.api_key_hint, "");
    let err = admin
        .update_backend(move_to(&short.id, "https://collector.example/v1", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let created = create(&mut admin, "b1", "sk-provider-secret-1234").await;
    for elsewhere in [
        "https://collector.example/v1",
        "http://api.example.com/v1",
        "https://api.example.com:8443/v1",
    ] {
        let err = admin
            .update_backend(move_to(&created.id, elsewhere, ""))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{elsewhere}");
        assert!(err.message().starts_with("api_key:"), "{}", err.message());
    }
    let kept = admin
        .get_backend(pb::GetBackendRequest {
            id: created.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!(kept.base_url, "https://api.example.com/v1");

    for (base_url, api_key) in [
        ("https://api.example.com/v2", ""),
        ("https://API.example.com:443/v2", ""),
        ("https://collector.example/v1", "sk-collectors-own-key-5678"),
    ] {
        let moved = admin
            .update_backend(move_to(&created.id, base_url, api_key))
            .await
            .unwrap()
            .into_inner()
            .backend
            .unwrap();
        assert_eq!(moved.base_url, base_url.to_lowercase().replace(":443", ""));
    }

    // A keyed backend moved to a server that takes no key (a self-hosted vLLM): its key
    // cleared in the same update, which an empty `api_key` could not say.
    let unkeyed = pb::UpdateBackendRequest {
        clear_api_key: true,
        ..move_to(&created.id, "http://vllm.internal:8000/v1", "")
    };
    let moved = admin
        .update_backend(unkeyed)
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!(moved.base_url, "http://vllm.internal:8000/v1");
    assert_eq!(moved.api_key_hint, "");
    let hello = pb::StreamSnapshotsRequest {
        node_id: "n-clear".into(),
        ..Default::default()
    };
    let (_tx, mut stream) = open_snapshot_stream(&cp, hello).await;
    let snapshot = next(&mut stream).await;
    let sent = snapshot
        .backends
        .iter()
        .find(|b| b.id == created.id)
        .unwrap();
    assert_eq!(sent.api_key, "", "no key is sent anywhere");
    // Not with a key as well.
    let both = pb::UpdateBackendRequest {
        clear_api_key: true,
        ..move_to(
            &created.id,
            "http://vllm.internal:8000/v1",
            "sk-new-key-90123",
        )
    };
    let err = admin.update_backend(both).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("clear_api_key:"),
        "{}",
        err.message()
    );
}

/// A request that does not decode (a string field that is not UTF-8, as a client built from
/// a mismatched .proto or by hand sends) is the client's mistake: INVALID_ARGUMENT, as the
/// JSON API answers it, not INTERNAL, which says the server is broken and fires its alerts.
#[tokio::test]
async fn a_request_that_does_not_decode_is_an_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel(&cp).await);
    grpc.ready().await.unwrap();
    // GetBackendRequest.id (field 1, a string): two bytes that are not UTF-8.
    let mut request = tonic::Request::new(RawMessage(vec![0x0a, 0x02, 0xff, 0xfe]));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", cp.admin_token).parse().unwrap(),
    );
    let err = grpc
        .unary(
            request,
            http::uri::PathAndQuery::from_static("/sluice.v1.AdminService/GetBackend"),
            sluice_proto::codec::SliceCodec::<RawMessage, pb::GetBackendResponse>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("request: "), "{}", err.message());
}

/// A row stored before a rule was added keeps working: a change is checked on the fields it
/// names, so a backend whose stored base URL a later rule refuses (it ends with the endpoint's
/// path, which made every request 404) can still be taken out of rotation in an incident, and
/// a key named before names were checked for invisible characters can still be changed.
/// Enabling such a backend is refused, naming the field: it would join the snapshot as it is.
#[tokio::test]
async fn a_row_stored_before_a_rule_can_be_disabled_and_changed() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let mut admin = admin(&cp).await;
    let created = create(&mut admin, "legacy", "sk-provider-secret-1234").await;
    let key = admin
        .create_client_key(pb::CreateClientKeyRequest {
            name: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    let legacy_url = "https://api.example.com/v1/chat/completions";
    let db = rusqlite::Connection::open(dir.path().join("sluice.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute(
        "UPDATE backends SET base_url = ?1 WHERE id = ?2",
        rusqlite::params![legacy_url, created.id],
    )
    .unwrap();
    db.execute(
        "UPDATE client_keys SET name = ?1 WHERE id = ?2",
        rusqlite::params!["team\u{200b}a", key.id],
    )
    .unwrap();
    let change = |enabled: bool, priority: i32, paths: &[&str]| pb::UpdateBackendRequest {
        backend: Some(pb::Backend {
            id: created.id.clone(),
            enabled,
            priority,
            ..Default::default()
        }),
        update_mask: Some(mask(paths)),
        api_key: String::new(),
        ..Default::default()
    };

    let disabled = admin
        .update_backend(change(false, 0, &["enabled"]))
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert!(!disabled.enabled);
    assert_eq!(disabled.base_url, legacy_url, "kept as stored");
    let moved = admin
        .update_backend(change(false, 3, &["priority"]))
        .await
        .unwrap()
        .into_inner()
        .backend
        .unwrap();
    assert_eq!((moved.priority, moved.enabled), (3, false));

    let err = admin
        .update_backend(change(true, 0, &["enabled"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("backend.base_url:"),
        "{}",
        err.message()
    );
    assert!(!get(&mut admin, &created.id).await.enabled);

    let rekeyed = admin
        .update_client_key(pb::UpdateClientKeyRequest {
            client_key: Some(pb::ClientKey {
                id: key.id.clone(),
                rpm_limit: 60,
                ..Default::default()
            }),
            update_mask: Some(mask(&["rpm_limit"])),
        })
        .await
        .unwrap()
        .into_inner()
        .client_key
        .unwrap();
    assert_eq!(rekeyed.rpm_limit, 60);
    // A name given is checked as ever.
    let err = admin
        .update_client_key(pb::UpdateClientKeyRequest {
            client_key: Some(pb::ClientKey {
                id: key.id.clone(),
                name: "team\u{200b}b".into(),
                ..Default::default()
            }),
            update_mask: Some(mask(&["name"])),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
}

/// Anyone who can reach the gRPC port may open HTTP/2 connections to it (health checks and
/// reflection need no token). One connection may open at most 100 streams at once (a data
/// plane needs two), as the server's settings tell every client, not as many as it likes,
/// each a task and buffers on the control plane.
#[tokio::test]
async fn one_connection_to_the_grpc_port_may_open_a_bounded_number_of_streams() {
    let dir = tempfile::tempdir().unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let addr = cp.grpc_url.trim_start_matches("http://").to_owned();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let request = http::Request::post("/grpc.health.v1.Health/Check")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (answer, _) = send.send_request(request, true).unwrap();
    // The answer comes after the server's settings: driven until it does.
    tokio::select! {
        answer = answer => { answer.unwrap(); }
        closed = &mut connection => panic!("the connection closed: {closed:?}"),
    }
    assert_eq!(connection.max_concurrent_send_streams(), 100);
}

/// A connection to the gRPC port that makes no request with a token within
/// `--grpc-first-request-timeout` (and a second's grace) is closed, whether it sends nothing,
/// half of HTTP/2's preface, a whole handshake and then nothing, or requests that need no
/// token (health checks): such connections were held for good, each a task, a descriptor and
/// now a slot of the connection limit. A client with a token is served all along, and its
/// connection outlives the timeout.
#[tokio::test]
async fn a_connection_to_the_grpc_port_without_a_request_with_a_token_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let grpc = GrpcOptions {
        first_request_timeout: Duration::from_millis(300),
        ..GrpcOptions::default()
    };
    let cp = TestControlPlane::start_with_grpc(dir.path(), grpc)
        .await
        .unwrap();
    let addr = cp.grpc_url.trim_start_matches("http://").to_owned();
    let silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // The whole HTTP/2 handshake, then no request.
    let (_idle, idle) = h2_connection(&addr).await;
    // Health checks only: answered, but no token.
    let (mut health_only, probing) = h2_connection(&addr).await;
    let (answer, _) = health_only
        .send_request(grpc_request(HEALTH, None), true)
        .unwrap();
    assert_eq!(answer.await.unwrap().status(), 200);
    // A client with a token.
    let (mut admin, asked) = h2_connection(&addr).await;
    assert_eq!(list_backends(&mut admin, &cp.admin_token).await, 200);

    for mut connection in [silent, half] {
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(10), connection.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "still open 10 s later");
    }
    for (connection, what) in [(idle, "the idle HTTP/2"), (probing, "the health checks'")] {
        let closed = tokio::time::timeout(Duration::from_secs(10), connection).await;
        assert!(closed.is_ok(), "{what} connection still open 10 s later");
    }
    // Past the timeout and its grace, the client with a token is still connected.
    assert!(!asked.is_finished(), "closed after a request with a token");
    admin = admin.ready().await.unwrap();
    assert_eq!(list_backends(&mut admin, &cp.admin_token).await, 200);
}

/// The HTTP status of an empty `ListBackends` call sent with `token` on `connection`.
async fn list_backends(
    connection: &mut h2::client::SendRequest<bytes::Bytes>,
    token: &str,
) -> http::StatusCode {
    let list = "/sluice.v1.AdminService/ListBackends";
    let (answer, mut body) = connection
        .send_request(grpc_request(list, Some(token)), false)
        .unwrap();
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    answer.await.unwrap().status()
}

const HEALTH: &str = "/grpc.health.v1.Health/Check";

/// A raw HTTP/2 connection to `addr`, its connection driven by a task of its own.
async fn h2_connection(
    addr: &str,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(connection))
}

/// A gRPC request's head for `path`, with `token` as the bearer if given.
fn grpc_request(path: &str, token: Option<&str>) -> http::Request<()> {
    let mut request = http::Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.body(()).unwrap()
}

/// At most `--grpc-max-connections` connections to the gRPC port are open at once; a new one
/// past it is told so (HTTP/2's GOAWAY) and closed, counted in
/// `sluice_grpc_connections_refused_total`, and once connections close clients are served
/// again.
#[tokio::test]
async fn the_grpc_port_holds_at_most_its_connection_limit() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let grpc = GrpcOptions {
        max_connections: 3,
        ..GrpcOptions::default()
    };
    let cp = TestControlPlane::start_with_grpc(dir.path(), grpc)
        .await
        .unwrap();
    let addr = cp.grpc_url.trim_start_matches("http://").to_owned();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // The three are taken before a fourth (the kernel hands them over in order): it is
    // refused.
    let mut refused = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut told = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), refused.read_to_end(&mut told))
        .await
        .expect("closed")
        .unwrap();
    // The server's SETTINGS, then a GOAWAY (type 7) whose debug data says why.
    assert_eq!(told[3], 4, "{told:?}");
    assert_eq!(told[9 + 3], 7, "{told:?}");
    assert!(
        String::from_utf8_lossy(&told).contains("too many open connections"),
        "{told:?}"
    );
    let text = metrics_text(&cp).await;
    assert_eq!(
        metric_samples(&text).get("sluice_grpc_connections_refused_total"),
        Some(&1.0),
        "{text}"
    );
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let served = match cp.admin_client().await {
            Ok(mut admin) => admin
                .list_backends(pb::ListBackendsRequest::default())
                .await
                .is_ok(),
            Err(_) => false,
        };
        if served {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The control plane's `/metrics` text.
async fn metrics_text(cp: &TestControlPlane) -> String {
    reqwest::get(format!("{}/metrics", cp.http_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
