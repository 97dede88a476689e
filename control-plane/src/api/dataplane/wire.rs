//! `StreamSnapshots` as it is written. A snapshot goes out as a [`SentSnapshot`], whose part
//! every replica is sent alike is encoded once per version ([`Publisher::sent`]), instead of
//! as a message cloned and encoded for each replica. tonic's generated server encodes what a
//! method returns with the service's codec, so [`DataPlaneRoutes`] serves this one method with
//! a codec that writes those bytes as they are, and hands every other call to the generated
//! server. Replicas decode the same `StreamSnapshotsResponse` either way.
//!
//! [`Publisher::sent`]: crate::snapshot::Publisher::sent

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use prost::encoding::{WireType, encode_key, encode_varint};
use sluice_proto::codec::{SliceCodec, SliceDecoder};
use sluice_proto::v1 as pb;
use sluice_proto::v1::data_plane_service_server::{self, DataPlaneServiceServer};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::WatchStream;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, StdError};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use super::DataPlaneApi;
use crate::snapshot::{Publisher, SentSnapshot};
use crate::time::now_ms;

/// The method served here; every other path goes to the generated server.
const STREAM_SNAPSHOTS: &str = "/sluice.v1.DataPlaneService/StreamSnapshots";

/// `StreamSnapshotsResponse`'s field numbers.
const SNAPSHOT_FIELD: u32 = 1;
const ALLOWANCES_FIELD: u32 = 2;

/// One message of the snapshot stream.
#[derive(Debug)]
pub enum Outgoing {
    /// A message carrying only allowances (an empty update renews the lease).
    Allowances(pb::AllowanceUpdate),
    /// A `StreamSnapshotsResponse` carrying only this snapshot.
    Snapshot(SentSnapshot),
}

impl Outgoing {
    /// The message a replica decodes.
    pub fn into_message(self) -> Result<pb::StreamSnapshotsResponse, Status> {
        match self {
            Self::Allowances(update) => Ok(pb::StreamSnapshotsResponse {
                snapshot: None,
                allowances: Some(update),
            }),
            Self::Snapshot(sent) => Ok(pb::StreamSnapshotsResponse {
                snapshot: Some(sent.decode().map_err(|e| Status::internal(e.to_string()))?),
                allowances: None,
            }),
        }
    }

    fn write_to(&self, buf: &mut impl bytes::BufMut) {
        match self {
            Self::Allowances(update) => {
                prost::encoding::message::encode(ALLOWANCES_FIELD, update, buf)
            }
            Self::Snapshot(sent) => {
                encode_key(SNAPSHOT_FIELD, WireType::LengthDelimited, buf);
                encode_varint(sent.len() as u64, buf);
                sent.write_to(buf);
            }
        }
    }
}

pub type OutgoingStream = Pin<Box<dyn Stream<Item = Result<Outgoing, Status>> + Send>>;

/// What one replica's snapshot stream writes: the stream task's messages (allowances, an
/// error) as they come, ahead of any snapshot, and of the snapshots only the newest not yet
/// written, encoded when the transport takes it. A grant answering an ask waits for at most
/// the snapshot whose bytes are being written; when snapshots were queued with it, first in
/// first out, it waited behind two more (stale ones among them), which at the largest
/// configuration over a slow link took longer than a replica waits for a grant.
pub struct Outbound {
    messages: mpsc::Receiver<Result<Outgoing, Status>>,
    snapshots: WatchStream<Option<Arc<pb::Snapshot>>>,
    publisher: Arc<Publisher>,
}

impl Outbound {
    /// The stream task sends its messages on `messages` and the snapshot due on `snapshots`
    /// (replaced by a newer one before it is written, only the newer is).
    pub fn new(
        messages: mpsc::Receiver<Result<Outgoing, Status>>,
        snapshots: watch::Receiver<Option<Arc<pb::Snapshot>>>,
        publisher: Arc<Publisher>,
    ) -> Self {
        Self {
            messages,
            snapshots: WatchStream::from_changes(snapshots),
            publisher,
        }
    }
}

impl Stream for Outbound {
    type Item = Result<Outgoing, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Ends when the task does (it holds both senders); its last messages are written.
        if let Poll::Ready(message) = self.messages.poll_recv(cx) {
            return Poll::Ready(message);
        }
        loop {
            match Pin::new(&mut self.snapshots).poll_next(cx) {
                Poll::Ready(Some(Some(snapshot))) => {
                    let sent = self.publisher.sent(&snapshot, now_ms());
                    return Poll::Ready(Some(Ok(Outgoing::Snapshot(sent))));
                }
                Poll::Ready(Some(None)) => continue,
                // The task is ending: its messages' end is polled above.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Writes [`Outgoing`] messages; reads the replica's messages as every method does.
#[derive(Debug, Default, Clone)]
struct SnapshotStreamCodec;

impl Codec for SnapshotStreamCodec {
    type Encode = Outgoing;
    type Decode = pb::StreamSnapshotsRequest;
    type Encoder = OutgoingEncoder;
    type Decoder = SliceDecoder<pb::StreamSnapshotsRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        OutgoingEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        SliceCodec::<pb::StreamSnapshotsResponse, pb::StreamSnapshotsRequest>::default().decoder()
    }
}

#[derive(Debug)]
struct OutgoingEncoder;

impl Encoder for OutgoingEncoder {
    type Item = Outgoing;
    type Error = Status;

    fn encode(&mut self, item: Outgoing, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.write_to(dst);
        Ok(())
    }
}

struct StreamSnapshots(DataPlaneApi);

impl tonic::server::StreamingService<pb::StreamSnapshotsRequest> for StreamSnapshots {
    type Response = Outgoing;
    type ResponseStream = OutgoingStream;
    type Future = BoxFuture<Response<OutgoingStream>, Status>;

    fn call(&mut self, request: Request<Streaming<pb::StreamSnapshotsRequest>>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.snapshot_stream(request).await })
    }
}

/// `DataPlaneService` with `StreamSnapshots` written by [`SnapshotStreamCodec`].
#[derive(Clone)]
pub struct DataPlaneRoutes {
    api: DataPlaneApi,
    generated: DataPlaneServiceServer<DataPlaneApi>,
    max_decoding: usize,
    max_encoding: usize,
}

impl DataPlaneRoutes {
    /// Messages from replicas up to `max_decoding` bytes, to them up to `max_encoding`.
    pub fn new(api: DataPlaneApi, max_decoding: usize, max_encoding: usize) -> Self {
        Self {
            generated: DataPlaneServiceServer::new(api.clone())
                .max_decoding_message_size(max_decoding)
                .max_encoding_message_size(max_encoding),
            api,
            max_decoding,
            max_encoding,
        }
    }
}

impl NamedService for DataPlaneRoutes {
    const NAME: &'static str = data_plane_service_server::SERVICE_NAME;
}

impl<B> tower_service::Service<http::Request<B>> for DataPlaneRoutes
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != STREAM_SNAPSHOTS {
            return self.generated.call(request);
        }
        let method = StreamSnapshots(self.api.clone());
        let mut grpc = tonic::server::Grpc::new(SnapshotStreamCodec)
            .apply_max_message_size_config(Some(self.max_decoding), Some(self.max_encoding));
        Box::pin(async move { Ok(grpc.streaming(method, request).await) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use prost::Message as _;

    use super::*;

    /// While the transport is busy writing (it takes nothing), a grant and two newer
    /// snapshots fall due: when it next takes, the grant comes first, then the newest
    /// snapshot alone; the stale one between is never written.
    #[tokio::test]
    async fn a_grant_is_written_ahead_of_snapshots_and_stale_snapshots_are_not() {
        use futures::StreamExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = crate::store::Store::open(
            &dir.path().join("t.db"),
            crate::crypto::MasterKey::generate(),
        )
        .unwrap();
        let publisher = Arc::new(Publisher::unstarted(store).await.unwrap());
        let (messages, messages_rx) = mpsc::channel(2);
        let (due, due_rx) = watch::channel(None);
        let mut outbound = Outbound::new(messages_rx, due_rx, publisher);
        let snapshot = |version| {
            Arc::new(pb::Snapshot {
                version,
                ..Default::default()
            })
        };
        due.send_replace(Some(snapshot(1)));
        let version = |m: Option<Result<Outgoing, Status>>| match m.unwrap().unwrap() {
            Outgoing::Snapshot(sent) => sent.decode().unwrap().version,
            Outgoing::Allowances(_) => 0,
        };
        assert_eq!(version(outbound.next().await), 1);
        // Written meanwhile: two versions, then a grant.
        due.send_replace(Some(snapshot(2)));
        due.send_replace(Some(snapshot(3)));
        messages
            .send(Ok(Outgoing::Allowances(pb::AllowanceUpdate::default())))
            .await
            .unwrap();
        assert_eq!(version(outbound.next().await), 0, "the grant first");
        assert_eq!(version(outbound.next().await), 3, "the newest snapshot");
        // Nothing more is due; the stream ends with the task's senders.
        drop((messages, due));
        assert!(outbound.next().await.is_none());
    }

    /// Every message written decodes as the `StreamSnapshotsResponse` replicas expect.
    #[test]
    fn what_is_written_decodes_as_the_message() {
        let snapshot = pb::Snapshot {
            version: 3,
            epoch: "e".into(),
            backends: vec![pb::SnapshotBackend {
                id: "b".into(),
                cooldown_until: Some(crate::time::timestamp(2_000)),
                ..Default::default()
            }],
            client_keys: vec![pb::SnapshotClientKey {
                id: "k".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let allowances = pb::AllowanceUpdate {
            allowances: vec![pb::Allowance {
                client_key_id: "k".into(),
                ..Default::default()
            }],
        };
        for (outgoing, expected) in [
            (
                Outgoing::Snapshot(SentSnapshot::new(&snapshot, 1_000)),
                pb::StreamSnapshotsResponse {
                    snapshot: Some(crate::snapshot::as_sent(&snapshot, 1_000)),
                    allowances: None,
                },
            ),
            (
                Outgoing::Allowances(allowances.clone()),
                pb::StreamSnapshotsResponse {
                    snapshot: None,
                    allowances: Some(allowances),
                },
            ),
        ] {
            let mut written = Vec::new();
            outgoing.write_to(&mut written);
            let decoded = pb::StreamSnapshotsResponse::decode(written.as_slice()).unwrap();
            assert_eq!(decoded, expected);
            assert_eq!(outgoing.into_message().unwrap(), expected);
        }
    }
}
