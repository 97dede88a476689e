//! What sending a new snapshot to many replicas costs the control plane. At the largest
//! supported configuration a snapshot is 17–24 MiB, nearly all of it client keys, and each
//! change goes to every replica: a copy of the keys per replica would take memory and CPU
//! with the number of replicas. A test binary of its own: it counts every allocation the
//! process makes (a global allocator), which other tests running at the same time would add
//! to.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;
use std::time::Duration;

use sluice_control::testing::TestControlPlane;
use sluice_proto::v1 as pb;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Allocations and reallocations the process has made so far.
fn allocations() -> usize {
    let stats = ALLOCATOR.stats();
    stats.allocations + stats.reallocations
}

const KEYS: usize = 20_000;

/// A snapshot stream's message read for its snapshot's version only: the rest is skipped
/// unread, so the replicas of this test allocate nothing per key.
#[derive(Clone, PartialEq, prost::Message)]
struct Versioned {
    #[prost(message, optional, tag = "1")]
    snapshot: Option<VersionOnly>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct VersionOnly {
    #[prost(uint64, tag = "1")]
    version: u64,
}

/// A replica's snapshot stream, open while the value lives.
struct Replica {
    inbound: tonic::Streaming<Versioned>,
    _hello: mpsc::Sender<pb::StreamSnapshotsRequest>,
    version: u64,
}

impl Replica {
    async fn connect(cp: &TestControlPlane, node: &str) -> Self {
        let channel = tonic::transport::Channel::from_shared(cp.grpc_url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
        grpc.ready().await.unwrap();
        let (hello, rx) = mpsc::channel(1);
        hello
            .send(pb::StreamSnapshotsRequest {
                node_id: node.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", cp.dataplane_token).parse().unwrap(),
        );
        let inbound = grpc
            .streaming(
                request,
                http::uri::PathAndQuery::from_static("/sluice.v1.DataPlaneService/StreamSnapshots"),
                tonic_prost::ProstCodec::<pb::StreamSnapshotsRequest, Versioned>::default(),
            )
            .await
            .unwrap()
            .into_inner();
        Self {
            inbound,
            _hello: hello,
            version: 0,
        }
    }

    /// Reads snapshots until one of at least `version`.
    async fn reach(&mut self, version: u64) {
        while self.version < version {
            let message = tokio::time::timeout(Duration::from_secs(30), self.inbound.message())
                .await
                .expect("a snapshot within 30 s")
                .unwrap()
                .expect("the stream stays open");
            if let Some(snapshot) = message.snapshot {
                self.version = snapshot.version;
            }
        }
    }
}

/// The allocations made from a settings change until every replica has its snapshot.
async fn allocations_for_a_change(cp: &TestControlPlane, replicas: &mut [Replica]) -> usize {
    let store = cp.store().unwrap();
    let before = allocations();
    let (_, version) = store
        .update_settings(|s| {
            Ok(pb::Settings {
                max_attempts: s.max_attempts % 5 + 1,
                ..s.clone()
            })
        })
        .await
        .unwrap();
    for replica in replicas.iter_mut() {
        replica.reach(version).await;
    }
    allocations() - before
}

/// Backends of many routes, added through the admin API: what every replica is sent alike
/// of them is encoded once per version too (a copy per replica, each route's strings cloned,
/// was about three allocations per route per replica).
const BACKENDS: usize = 10;
const ROUTES: usize = 1_000;

async fn add_backends(cp: &TestControlPlane) {
    use sluice_proto::v1::admin_service_client::AdminServiceClient;
    let channel = tonic::transport::Channel::from_shared(cp.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = AdminServiceClient::with_interceptor(
        channel,
        sluice_control::testing::Bearer(cp.admin_token.clone()),
    );
    for b in 0..BACKENDS {
        let models = (0..ROUTES)
            .map(|r| pb::ModelRoute {
                name: format!("model-{r}"),
                upstream_name: format!("provider/model-{r}"),
                input_price_per_mtok: 1.0,
                output_price_per_mtok: 2.0,
                ..Default::default()
            })
            .collect();
        admin
            .create_backend(pb::CreateBackendRequest {
                backend: Some(pb::Backend {
                    name: format!("backend-{b}"),
                    base_url: "https://api.example.com/v1".into(),
                    weight: 1,
                    enabled: true,
                    models,
                    ..Default::default()
                }),
                api_key: "sk-provider-0123456789".into(),
            })
            .await
            .unwrap();
    }
}

/// The control plane encodes what every replica is sent alike once per version: a change
/// sent to eight replicas allocates fewer than one allocation per key more than one sent to
/// one (a copy of the keys per replica was about six per key per replica, and of the
/// backends' routes about three per route per replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_sent_to_more_replicas_copies_no_keys_per_replica() {
    let dir = tempfile::tempdir().unwrap();
    TestControlPlane::start(dir.path())
        .await
        .unwrap()
        .shutdown()
        .await;
    sluice_control::testing::insert_client_keys(
        &dir.path().join("sluice.db"),
        KEYS,
        |k| format!("key {k}"),
        |k| format!("sk-sluice-fanout-{k}"),
    )
    .unwrap();
    let cp = TestControlPlane::start(dir.path()).await.unwrap();
    let store = cp.store().unwrap();
    add_backends(&cp).await;

    let mut replicas = vec![Replica::connect(&cp, "node-0").await];
    // Joining publishes a snapshot with the replica counted.
    let joined = store.committed_version();
    replicas[0].reach(joined).await;
    let to_one = allocations_for_a_change(&cp, &mut replicas).await;

    for i in 1..8 {
        replicas.push(Replica::connect(&cp, &format!("node-{i}")).await);
    }
    let joined = store.committed_version();
    for replica in &mut replicas {
        replica.reach(joined).await;
    }
    let to_eight = allocations_for_a_change(&cp, &mut replicas).await;
    eprintln!("allocations for a change sent to one replica: {to_one}; to eight: {to_eight}");
    assert!(
        to_eight < to_one + KEYS,
        "seven more replicas took {} allocations more, with {KEYS} keys and {} routes",
        to_eight.saturating_sub(to_one),
        BACKENDS * ROUTES
    );
    cp.shutdown().await;
}
