//! Routing snapshots: built from the database after every committed change (the store
//! announces each new version) and published through a `watch`, so a subscriber always
//! sees the newest version, may skip some, and never goes backwards.
//!
//! Every snapshot carries the publisher's epoch, random per start. The version is
//! persisted and only grows while the database lives, but a database restored from a
//! backup starts again from the backup's lower version; data planes compare versions only
//! within an epoch, so they follow a restored control plane instead of refusing its
//! snapshots as stale.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use sluice_proto::limits::{MAX_ID_BYTES, MAX_SNAPSHOT_BYTES};
use sluice_proto::v1 as pb;
use tokio::sync::watch;

use crate::backend::BackendSpec;
use crate::store::{Reader, Store, StoreError};
use crate::time::{duration, now_ms, timestamp, timestamp_ms};

/// Room kept below [`MAX_SNAPSHOT_BYTES`] for what changes without an admin write and grows
/// with neither keys nor backends: the settings, the nonce and times, the replica count, the
/// message around the snapshot. (What keys and backends may grow by without one, expiries,
/// spent budgets, cooldowns, is reserved as well: see [`ceiling`].)
pub const SNAPSHOT_HEADROOM_BYTES: usize = 64 * 1024;

/// An admin write refused because the snapshot would grow past what replicas accept.
#[derive(Debug, thiserror::Error)]
#[error(
    "refused: this change would let the routing snapshot reach {projected} bytes at its \
     largest (it is {now} bytes now; its largest counts what it may grow by with no admin \
     write: every key expiring and spending its budget, every backend and model cooling down), \
     past the {limit} bytes every data plane accepts ({} MiB, sluice_proto::limits::MAX_SNAPSHOT_BYTES, \
     less {SNAPSHOT_HEADROOM_BYTES} bytes of headroom); revoke or delete unused keys and \
     backends, or shorten allowed_models and model lists",
    MAX_SNAPSHOT_BYTES / (1024 * 1024)
)]
pub struct SnapshotTooLarge {
    pub projected: usize,
    /// The published snapshot's size: the operator reading `projected` alone looked for bytes
    /// the snapshot does not have.
    pub now: usize,
    pub limit: usize,
}

/// Builds and publishes snapshots. Cheap to share behind an `Arc`.
pub struct Publisher {
    store: Store,
    /// Random per start; see the module docs.
    epoch: String,
    tx: watch::Sender<Arc<pb::Snapshot>>,
    /// The largest snapshot admin writes may lead to (see [`Publisher::reserve`]).
    limit: usize,
    /// Growth admitted by [`Publisher::reserve`] and committed at a version (the first) not
    /// yet published: held against the limit until a published snapshot includes it.
    pending: tokio::sync::Mutex<Vec<(u64, usize)>>,
    /// The published version and its [`ceiling`], computed once per version (an encoded
    /// length walks every entry: at 100,000 keys, once per admin write made provisioning
    /// them quadratic).
    sized: std::sync::Mutex<(u64, usize)>,
    /// The published version and what of it every replica is sent alike, encoded once
    /// (see [`Publisher::sent`]).
    shared: std::sync::Mutex<(u64, Encoded)>,
}

/// What a snapshot may grow to with no admin write: its size now, plus every key expiring
/// and spending its budget (two flags), plus every backend cooling down with its cooldown's
/// fields at their largest, plus [`JOINING_REPLICAS`] more replicas holding a share, each
/// listed by its node id at the longest. The headroom is for what grows with none of these
/// (settings, times).
pub(crate) fn ceiling(snapshot: &pb::Snapshot) -> usize {
    static COOLDOWN_BYTES: LazyLock<usize> = LazyLock::new(|| {
        // (The entry's length prefix may grow too: a few bytes.)
        prost::Message::encoded_len(&cooling_at_most()) + 4
    });
    // Two flags of two bytes, and a byte more of the entry's length prefix should they take
    // it past 127 bytes.
    const KEY_FLAGS_BYTES: usize = 5;
    prost::Message::encoded_len(snapshot)
        + snapshot.client_keys.len() * KEY_FLAGS_BYTES
        + snapshot.backends.len() * *COOLDOWN_BYTES
        + snapshot
            .backends
            .iter()
            .flat_map(|b| &b.models)
            .map(|m| model_cooling_bytes(&m.upstream_name))
            .sum::<usize>()
        + JOINING_REPLICAS * SHARE_HOLDER_BYTES
}

/// Replicas a full snapshot has room to see join without an admin write (each is listed in
/// `share_holders`): about 66 KB. Without it, a snapshot filled to the guard by keys and
/// backends passed the limit replicas accept once a few hundred replicas with long node ids
/// joined, and every replica then refused every snapshot (revocations included).
const JOINING_REPLICAS: usize = 256;

/// A share holder's entry at its largest: the tag, the length, a node id of `MAX_ID_BYTES`.
const SHARE_HOLDER_BYTES: usize = MAX_ID_BYTES + 3;

/// The most one model's cooldown adds to its backend's entry: every field at its largest.
fn model_cooling_bytes(model: &str) -> usize {
    let most = cooling_at_most();
    entry_bytes(&pb::ModelCooldown {
        model: model.to_owned(),
        cooldown_until: most.cooldown_until,
        consecutive_failures: most.consecutive_failures,
        cooldown_remaining: most.cooldown_remaining,
        cooldown_epoch: most.cooldown_epoch,
        cooldown_run_basis: most.cooldown_run_basis,
        cooldown_changed_by: most.cooldown_changed_by,
    })
}

/// Room for an admin write's growth of the snapshot, held from [`Publisher::reserve`] until
/// the write is committed (then counted until published) or dropped (not counted). Admin
/// writes that grow the snapshot are made one at a time while it is held.
pub struct Reservation<'a> {
    pending: tokio::sync::MutexGuard<'a, Vec<(u64, usize)>>,
    bytes: usize,
}

impl Reservation<'_> {
    /// The write committed as snapshot `version`.
    pub fn committed(mut self, version: u64) {
        self.pending.push((version, self.bytes));
    }
}

/// What one entry of a repeated field adds to an encoded message: its bytes, its length
/// prefix and its field tag.
pub fn entry_bytes(entry: &impl prost::Message) -> usize {
    let len = entry.encoded_len();
    len + prost::length_delimiter_len(len) + 2
}

/// The most a backend with `spec` and `api_key` adds to a snapshot (cooling down included,
/// the backend and each of its models).
pub fn backend_entry_bytes(spec: &BackendSpec, api_key: &str) -> usize {
    let models: usize = spec
        .models
        .iter()
        .map(|m| model_cooling_bytes(&m.upstream_name))
        .sum();
    models
        + entry_bytes(&pb::SnapshotBackend {
            id: uuid::Uuid::nil().to_string(),
            name: spec.name.clone(),
            base_url: spec.base_url.clone(),
            pool: pb::Pool::from(spec.pool) as i32,
            priority: i32::MIN,
            weight: u32::MAX,
            models: spec.models.iter().map(|m| m.to_proto()).collect(),
            api_key: api_key.to_owned(),
            rpm_limit: u32::MAX,
            responses_api: Some(true),
            api_format: spec.api_format.to_proto() as i32,
            anthropic_version: spec.anthropic_version.clone(),
            key_header: spec.key_header.to_proto() as i32,
            tpm_limit: u32::MAX,
            ..cooling_at_most()
        })
}

/// A backend entry with only its cooldown's fields set, each at its largest.
fn cooling_at_most() -> pb::SnapshotBackend {
    pb::SnapshotBackend {
        cooldown_until: Some(pbjson_types::Timestamp {
            seconds: i64::MAX,
            nanos: i32::MAX,
        }),
        consecutive_failures: u32::MAX,
        cooldown_remaining: Some(pbjson_types::Duration {
            seconds: i64::MAX,
            nanos: i32::MAX,
        }),
        cooldown_epoch: u64::MAX,
        cooldown_run_basis: u64::MAX,
        // A node id and an incarnation, each at most MAX_ID_BYTES.
        cooldown_changed_by: "x".repeat(2 * MAX_ID_BYTES + 1),
        ..Default::default()
    }
}

/// The most a client key with `name` and `allowed_models` adds to a snapshot.
pub fn client_key_entry_bytes(name: &str, allowed_models: &[String]) -> usize {
    entry_bytes(&pb::SnapshotClientKey {
        id: uuid::Uuid::nil().to_string(),
        name: name.to_owned(),
        key_sha256: vec![0; 32],
        allowed_models: allowed_models.to_vec(),
        rpm_limit: u32::MAX,
        expired: true,
        budget_spent: true,
        max_budget: f64::MAX,
        budget_reset_time: Some(pbjson_types::Timestamp {
            seconds: i64::MAX,
            nanos: i32::MAX,
        }),
        tpm_limit: u32::MAX,
        max_parallel_requests: u32::MAX,
        budget_period_start: Some(pbjson_types::Timestamp {
            seconds: i64::MAX,
            nanos: i32::MAX,
        }),
        expire_time: Some(pbjson_types::Timestamp {
            seconds: i64::MAX,
            nanos: i32::MAX,
        }),
    })
}

impl Publisher {
    /// Builds the first snapshot and starts the task that rebuilds after every commit the
    /// store announces. Bursts of commits coalesce into one rebuild.
    pub async fn start(store: Store) -> Result<Arc<Self>, StoreError> {
        // Subscribed before the first build, so no commit falls between the two.
        let mut commits = store.commits();
        let publisher = Arc::new(Self::unstarted(store).await?);
        let weak = Arc::downgrade(&publisher);
        tokio::spawn(async move {
            while commits.changed().await.is_ok() {
                let Some(publisher) = weak.upgrade() else {
                    return;
                };
                while let Err(err) = publisher.rebuild().await {
                    tracing::error!(error = %err, "building a snapshot failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        Ok(publisher)
    }

    /// A publisher with its first snapshot built (and a new epoch drawn) that rebuilds only
    /// when [`Publisher::rebuild`] is called: for a caller that decides when, such as the
    /// protocol simulation.
    pub async fn unstarted(store: Store) -> Result<Self, StoreError> {
        let epoch = uuid::Uuid::new_v4().simple().to_string();
        let started = std::time::Instant::now();
        let mut first = build(&store, &epoch).await?;
        let shared = encode_shared(&mut first);
        tracing::info!(
            %epoch,
            version = first.version,
            bytes = first.encoded_len(),
            build_ms = started.elapsed().as_millis() as u64,
            "snapshot epoch started"
        );
        let first_version = first.version;
        let (tx, _) = watch::channel(Arc::new(first));
        Ok(Self {
            store,
            epoch,
            tx,
            limit: MAX_SNAPSHOT_BYTES - SNAPSHOT_HEADROOM_BYTES,
            pending: tokio::sync::Mutex::default(),
            sized: std::sync::Mutex::new((u64::MAX, 0)),
            shared: std::sync::Mutex::new((first_version, shared)),
        })
    }

    /// The same publisher with another limit for [`Publisher::reserve`] (tests).
    pub fn with_size_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Room for an admin write that adds at most `growth` bytes to the snapshot, or
    /// [`SnapshotTooLarge`] when the snapshot would then pass the limit replicas accept:
    /// refused at the write, with a message, rather than by every replica, which would then
    /// stay on its old snapshot (and keep serving keys revoked after it). Writes that only
    /// shrink it (revoking, deleting) need none.
    pub async fn reserve(&self, growth: usize) -> Result<Reservation<'_>, SnapshotTooLarge> {
        let mut pending = self.pending.lock().await;
        let latest = self.latest();
        pending.retain(|&(version, _)| version > latest.version);
        let held: usize = pending.iter().map(|&(_, bytes)| bytes).sum();
        let projected = self.ceiling_of(&latest) + held + growth;
        if projected > self.limit {
            tracing::warn!(
                projected,
                limit = self.limit,
                "refused an admin write: the snapshot would pass the size replicas accept"
            );
            return Err(SnapshotTooLarge {
                projected,
                now: prost::Message::encoded_len(&*latest),
                limit: self.limit,
            });
        }
        Ok(Reservation {
            pending,
            bytes: growth,
        })
    }

    fn ceiling_of(&self, latest: &pb::Snapshot) -> usize {
        let mut sized = lock(&self.sized);
        if sized.0 != latest.version {
            *sized = (latest.version, ceiling(latest));
        }
        sized.1
    }

    /// `snapshot` (one this publisher published) as [`as_sent`] at `now_ms`, written as
    /// it goes out: what every replica is sent alike encoded once per version, the backends
    /// (whose cooldowns are sent as the time left of them) encoded here. At the largest
    /// supported configuration nearly all of a 17–24 MiB snapshot is client keys, which a
    /// clone and an encoding per replica made some 70 MB and tens of milliseconds of CPU per
    /// replica and version.
    pub fn sent(&self, snapshot: &pb::Snapshot, now_ms: i64) -> SentSnapshot {
        let cached = {
            let shared = lock(&self.shared);
            (shared.0 == snapshot.version).then(|| shared.1.clone())
        };
        match cached {
            Some(shared) => SentSnapshot::of(snapshot, shared, now_ms),
            // An older version than the one published since (a stream that has not caught
            // up yet): encoded for it alone.
            None => SentSnapshot::new(snapshot, now_ms),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<pb::Snapshot>> {
        self.tx.subscribe()
    }

    pub fn latest(&self) -> Arc<pb::Snapshot> {
        self.tx.borrow().clone()
    }

    /// This start's epoch (see the module docs).
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Builds a snapshot of the committed state and publishes it if its version is newer
    /// than the one published.
    pub async fn rebuild(&self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let mut snapshot = build(&self.store, &self.epoch).await?;
        let version = snapshot.version;
        let build_ms = started.elapsed().as_millis() as u64;
        if version <= self.tx.borrow().version {
            return Ok(());
        }
        let shared = encode_shared(&mut snapshot);
        let published = self.tx.send_if_modified(|current| {
            if snapshot.version > current.version {
                // Before the stream tasks wake to the new version.
                *lock(&self.shared) = (version, shared);
                *current = Arc::new(snapshot);
                true
            } else {
                false
            }
        });
        if published {
            tracing::debug!(version, build_ms, "published snapshot");
        }
        Ok(())
    }
}

/// The snapshot as it goes out at `now_ms`: each cooldown also as the time left of it then,
/// which replicas add to their own monotonic clocks (so no skew between their wall clocks and
/// this one matters); one that has ended by then is left out. The only place a snapshot's
/// cooldowns meet a clock: [`build`] keeps every backend's last cooldown end.
///
/// (What replicas are sent is written as [`Publisher::sent`], the same message without
/// building it: this is what they decode.)
pub fn as_sent(snapshot: &pb::Snapshot, now_ms: i64) -> pb::Snapshot {
    pb::Snapshot {
        backends: backends_as_sent(snapshot, now_ms),
        ..pb::Snapshot {
            backends: Vec::new(),
            ..snapshot.clone()
        }
    }
}

/// The backends of [`as_sent`].
fn backends_as_sent(snapshot: &pb::Snapshot, now_ms: i64) -> Vec<pb::SnapshotBackend> {
    snapshot
        .backends
        .iter()
        .map(|b| backend_as_sent(b, now_ms))
        .collect()
}

/// One backend of [`as_sent`].
fn backend_as_sent(backend: &pb::SnapshotBackend, now_ms: i64) -> pb::SnapshotBackend {
    let mut b = backend.clone();
    (b.cooldown_remaining, b.cooldown_until) = remaining(b.cooldown_until.take(), now_ms);
    for m in &mut b.model_cooldowns {
        (m.cooldown_remaining, m.cooldown_until) = remaining(m.cooldown_until.take(), now_ms);
    }
    b
}

/// A cooldown's end as sent at `now_ms`: the time left of it, and the end itself, both unset
/// when it has ended.
fn remaining(
    until: Option<pbjson_types::Timestamp>,
    now_ms: i64,
) -> (
    Option<pbjson_types::Duration>,
    Option<pbjson_types::Timestamp>,
) {
    let left = until
        .as_ref()
        .map(|until| timestamp_ms(until).saturating_sub(now_ms))
        .filter(|left| *left > 0);
    (left.map(duration), left.and(until))
}

/// What every replica is sent alike of one version, encoded once: everything in the snapshot
/// but its backends, and each backend not cooling down (its encoding does not depend on when it
/// is sent). A cooling backend's cooldown goes out as the time left of it, so it is encoded for
/// each send. Encoded per replica, the backends were cloned and encoded for every replica and
/// version: at 74 backends of 1,000 routes, some 30 MB a replica while a change went out.
#[derive(Debug, Clone)]
pub struct Encoded {
    shared: Bytes,
    /// Each backend's field (`Snapshot.backends`), in order; `None` for one cooling down.
    backends: Arc<[Option<Bytes>]>,
}

/// `Snapshot.backends`' field number.
const BACKENDS_FIELD: u32 = 4;

/// [`Encoded`] of `snapshot`. (The backends are taken out for the shared part and put back.)
fn encode_shared(snapshot: &mut pb::Snapshot) -> Encoded {
    let backends = std::mem::take(&mut snapshot.backends);
    let shared = Bytes::from(snapshot.encode_to_vec());
    snapshot.backends = backends;
    let backends = snapshot
        .backends
        .iter()
        .map(|b| (!cooling(b)).then(|| backend_field(b)))
        .collect();
    Encoded { shared, backends }
}

/// Whether anything of `backend` is sent as the time left of it ([`backends_as_sent`]).
fn cooling(backend: &pb::SnapshotBackend) -> bool {
    backend.cooldown_until.is_some()
        || backend.cooldown_remaining.is_some()
        || backend
            .model_cooldowns
            .iter()
            .any(|m| m.cooldown_until.is_some() || m.cooldown_remaining.is_some())
}

/// `backend` encoded as one entry of `Snapshot.backends`.
fn backend_field(backend: &pb::SnapshotBackend) -> Bytes {
    let mut field = Vec::with_capacity(prost::encoding::message::encoded_len(
        BACKENDS_FIELD,
        backend,
    ));
    prost::encoding::message::encode(BACKENDS_FIELD, backend, &mut field);
    Bytes::from(field)
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A snapshot as it is written to a replica (see [`Publisher::sent`]): the encodings of two
/// parts of one `Snapshot`, written one after the other as its bytes. Protobuf decodes a
/// message's fields in any order and appends to repeated fields, so the two decode as one
/// snapshot, with the backends of the second part.
#[derive(Debug, Clone)]
pub struct SentSnapshot {
    shared: Bytes,
    /// Each backend's entry: the version's own, or (cooling down) encoded for this send.
    backends: Vec<Bytes>,
}

impl SentSnapshot {
    /// `snapshot` at `now_ms`, every part encoded here.
    pub fn new(snapshot: &pb::Snapshot, now_ms: i64) -> Self {
        let encoded = encode_shared(&mut snapshot.clone());
        Self::of(snapshot, encoded, now_ms)
    }

    /// `snapshot` at `now_ms`, given what of it is encoded once per version.
    fn of(snapshot: &pb::Snapshot, encoded: Encoded, now_ms: i64) -> Self {
        let backends = snapshot
            .backends
            .iter()
            .enumerate()
            .map(|(i, backend)| match encoded.backends.get(i) {
                Some(Some(field)) => field.clone(),
                _ => backend_field(&backend_as_sent(backend, now_ms)),
            })
            .collect();
        Self {
            shared: encoded.shared,
            backends,
        }
    }

    /// The length of the snapshot's encoding.
    pub fn len(&self) -> usize {
        self.shared.len() + self.backends.iter().map(Bytes::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the snapshot's encoding.
    pub fn write_to(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.shared);
        for backend in &self.backends {
            buf.put_slice(backend);
        }
    }

    /// The snapshot a replica decodes from it.
    pub fn decode(&self) -> Result<pb::Snapshot, prost::DecodeError> {
        let mut bytes = Vec::with_capacity(self.len());
        self.write_to(&mut bytes);
        pb::Snapshot::decode(bytes.as_slice())
    }
}

/// Builds the snapshot of the committed state, stamped with `epoch`.
pub async fn build(store: &Store, epoch: &str) -> Result<pb::Snapshot, StoreError> {
    let epoch = epoch.to_owned();
    store
        .read(Reader::Snapshot, move |conn, key| {
            // One read transaction, so the version matches the contents.
            let tx = conn.transaction()?;
            let version = crate::store::read_version_in(&tx)?;
            let database_id = crate::store::database_id_in(&tx)?;
            let now = now_ms();
            let cooldowns = crate::store::load_cooldown_states_in(&tx)?;
            let backends = crate::store::load_enabled_with_keys_in(&tx, key)?
                .into_iter()
                .map(|b| {
                    let states = cooldowns.get(&b.backend.id).cloned().unwrap_or_default();
                    let cooldown = states.backend;
                    let spec = b.backend.spec;
                    // Only models it serves now: a model taken off the backend has no route,
                    // and its row stays for when it is put back (its epoch never goes back).
                    let model_cooldowns = states
                        .models
                        .into_iter()
                        .filter(|(model, _)| spec.models.iter().any(|m| m.upstream_name == *model))
                        .map(|(model, state)| pb::ModelCooldown {
                            model,
                            cooldown_until: state.until.map(|until| timestamp(until.0)),
                            consecutive_failures: state.streak,
                            cooldown_remaining: None,
                            cooldown_epoch: state.epoch,
                            cooldown_run_basis: state.run.as_ref().map_or(0, |(_, basis)| *basis),
                            cooldown_changed_by: state.run.map(|(by, _)| by).unwrap_or_default(),
                        })
                        .collect();
                    let responses_api = Some(spec.serves_responses());
                    pb::SnapshotBackend {
                        responses_api,
                        id: b.backend.id,
                        name: spec.name,
                        base_url: spec.base_url,
                        pool: pb::Pool::from(spec.pool) as i32,
                        priority: spec.priority,
                        weight: spec.weight,
                        models: spec.models.iter().map(|m| m.to_proto()).collect(),
                        api_key: b.api_key,
                        rpm_limit: spec.rpm_limit,
                        tpm_limit: spec.tpm_limit,
                        // Ended or not: `as_sent` decides by the clock when each copy goes
                        // out, so that a snapshot built earlier is never sent as cooling.
                        cooldown_until: cooldown.until.map(|until| timestamp(until.0)),
                        consecutive_failures: cooldown.streak,
                        // Filled in as each copy is sent: see `as_sent`.
                        cooldown_remaining: None,
                        cooldown_epoch: cooldown.epoch,
                        cooldown_run_basis: cooldown.run.as_ref().map_or(0, |(_, basis)| *basis),
                        cooldown_changed_by: cooldown.run.map(|(by, _)| by).unwrap_or_default(),
                        api_format: spec.api_format.to_proto() as i32,
                        anthropic_version: spec.anthropic_version,
                        key_header: spec.key_header.to_proto() as i32,
                        model_cooldowns,
                    }
                })
                .collect();
            let mut client_keys = Vec::new();
            // Active keys, less those long expired that a version has left out (at the time,
            // not at some later change; and a step back of the clock does not bring them
            // back), so that keys issued to expire (a contractor's, a CI run's) neither fill
            // the snapshot nor slow its builds for good. Refused as unknown from then on. An
            // expiry once published stays: a step back of the clock must not revive the key
            // (nothing would publish its expiry again).
            for (k, expiry_published) in crate::store::snapshot_keys_in(&tx)? {
                // Only keys with a budget cost a read of their spend.
                let budget_spent = k.max_budget_nanos > 0
                    && crate::store::spent_in_period_in(&tx, &k, now)? >= k.max_budget_nanos;
                client_keys.push(pb::SnapshotClientKey {
                    expired: k.expired_at(now) || expiry_published,
                    expire_time: k.expire_time_ms.map(crate::time::timestamp),
                    budget_spent,
                    max_budget: sluice_domain::price::from_nanos(k.max_budget_nanos),
                    budget_reset_time: k
                        .budget_period
                        .period_of(now)
                        .map(|(_, end)| crate::time::timestamp(end)),
                    // The period as the grant engine voids by it (0: a lifetime budget).
                    budget_period_start: (k.max_budget_nanos > 0).then(|| {
                        crate::time::timestamp(
                            k.budget_period.period_of(now).map_or(0, |(start, _)| start),
                        )
                    }),
                    id: k.id,
                    name: k.name,
                    key_sha256: k.key_sha256,
                    allowed_models: k.allowed_models,
                    rpm_limit: k.rpm_limit,
                    tpm_limit: k.tpm_limit,
                    max_parallel_requests: k.max_parallel_requests,
                });
            }
            let settings = crate::store::load_settings_in(&tx)?;
            let affinity_keys = crate::store::load_affinity_keys_in(&tx, key)?;
            // In the same transaction as the version: a change of it bumps the version.
            let share_holders = crate::store::share_holders_in(&tx)?;
            let replica_count = u32::try_from(share_holders.len())
                .unwrap_or(u32::MAX)
                .max(1);
            tx.commit()?;
            Ok(pb::Snapshot {
                version,
                nonce: uuid::Uuid::new_v4().simple().to_string(),
                create_time: Some(timestamp(now)),
                backends,
                client_keys,
                settings: Some(settings),
                replica_count,
                epoch,
                affinity_keys,
                share_holders,
                database_id,
                model_cooldowns: true,
            })
        })
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A snapshot with every field set, two keys and three backends: one cooling down, one
    /// whose cooldown has ended, one never cooled.
    fn every_field_set() -> pb::Snapshot {
        let key = |i: u32| pb::SnapshotClientKey {
            id: format!("key-{i}"),
            allowed_models: vec!["a".into(), "b".into()],
            rpm_limit: i,
            max_budget: 2.5,
            budget_reset_time: Some(timestamp(1_000 + i64::from(i))),
            ..client_key_fields()
        };
        let backend = |i: u32, cooldown_until_ms: Option<i64>| pb::SnapshotBackend {
            id: format!("backend-{i}"),
            cooldown_until: cooldown_until_ms.map(timestamp),
            cooldown_remaining: None,
            ..cooling_at_most()
        };
        pb::Snapshot {
            version: 7,
            nonce: "nonce".into(),
            create_time: Some(timestamp(5_000)),
            backends: vec![
                backend(1, Some(20_000)),
                backend(2, Some(9_000)),
                backend(3, None),
            ],
            client_keys: vec![key(1), key(2)],
            settings: Some(pb::Settings {
                max_attempts: 3,
                ..Default::default()
            }),
            replica_count: 2,
            share_holders: vec!["a".into(), "b".into()],
            epoch: "epoch".into(),
            affinity_keys: vec![pb::AffinityKey {
                id: 1,
                secret: vec![7; 32],
            }],
            database_id: "database".into(),
            model_cooldowns: true,
        }
    }

    fn client_key_fields() -> pb::SnapshotClientKey {
        pb::SnapshotClientKey {
            name: "name".into(),
            key_sha256: vec![1; 32],
            expired: true,
            budget_spent: true,
            tpm_limit: 9,
            max_parallel_requests: 4,
            ..Default::default()
        }
    }

    /// What replicas are sent in two parts, the shared one encoded once per version, decodes
    /// as the snapshot as sent: every field, the backends in order, each cooldown as the time
    /// left of it at the moment of sending.
    #[test]
    fn a_snapshot_written_in_two_parts_decodes_as_sent() {
        let with_a_calm_backend = || {
            let mut snapshot = every_field_set();
            let mut calm = snapshot.backends[0].clone();
            calm.id = "calm".into();
            calm.cooldown_until = None;
            calm.model_cooldowns.clear();
            snapshot.backends.insert(1, calm);
            snapshot
        };
        let mut snapshot = with_a_calm_backend();
        let encoded = encode_shared(&mut snapshot);
        assert_eq!(snapshot, with_a_calm_backend(), "the backends are put back");
        let now = 10_000;
        let sent = SentSnapshot::of(&snapshot, encoded.clone(), now);
        let decoded = sent.decode().unwrap();
        assert_eq!(decoded, as_sent(&snapshot, now));
        assert_eq!(sent.len(), decoded.encoded_len());
        assert_eq!(
            decoded.backends[0].cooldown_remaining,
            Some(duration(10_000))
        );
        assert_eq!(decoded.backends[2].cooldown_until, None, "ended by then");
        // A backend not cooling down is the version's own bytes at every send, shared by every
        // replica's; a cooling one is encoded for the send, its time left then.
        let later = SentSnapshot::of(&snapshot, encoded, now + 1_000);
        assert_eq!(later.decode().unwrap(), as_sent(&snapshot, now + 1_000));
        assert_eq!(sent.backends[1].as_ptr(), later.backends[1].as_ptr());
        assert_ne!(sent.backends[0].as_ptr(), later.backends[0].as_ptr());
    }

    /// Snapshots name the database they were built from: the same after a restart and in a
    /// backup (a restore is followed by the replicas), another for another database (which
    /// replicas holding the first refuse: a control plane started on an empty database must
    /// not empty them).
    #[tokio::test]
    async fn snapshots_name_their_database_and_a_backup_keeps_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::crypto::MasterKey::generate();
        let path = dir.path().join("t.db");
        let id = |store| async move { build(&store, "epoch").await.unwrap().database_id };
        let (store, _) = Store::open(&path, key.clone()).unwrap();
        let first = id(store).await;
        assert_eq!(first.len(), 32, "{first}");
        let copy = dir.path().join("copy.db");
        crate::store::backup::backup(&path, &copy).unwrap();
        let (again, _) = Store::open(&path, key.clone()).unwrap();
        assert_eq!(id(again).await, first);
        let (restored, _) = Store::open(&copy, key.clone()).unwrap();
        assert_eq!(id(restored).await, first);
        let (other, _) = Store::open(&dir.path().join("other.db"), key).unwrap();
        assert_ne!(id(other).await, first);
    }

    /// Keys expiring or spending their budgets, and backends cooling down, grow the snapshot
    /// with no admin write: that growth is reserved too. With room for the snapshot as it is
    /// and a little more, a write is refused when every key's two flags and every backend's
    /// cooldown could not fit; otherwise a snapshot filled to the guard passed the limit
    /// replicas accept at the next expiry or outage, and every replica stayed on its old one.
    #[tokio::test]
    async fn growth_without_an_admin_write_is_reserved_too() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(
            &dir.path().join("t.db"),
            crate::crypto::MasterKey::generate(),
        )
        .unwrap();
        for i in 0..200 {
            store
                .create_client_key(crate::client_key::NewClientKey {
                    name: format!("key-{i}"),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let now = Publisher::unstarted(store.clone()).await.unwrap();
        let size = prost::Message::encoded_len(now.latest().as_ref());
        let growth = ceiling(&now.latest()) - size;
        assert!(growth >= 200 * 5, "{growth}");
        let tight = Publisher::unstarted(store.clone())
            .await
            .unwrap()
            .with_size_limit(size + 100);
        assert!(
            tight.reserve(1).await.is_err(),
            "200 keys may grow by 800 bytes"
        );
        // Each publisher builds its own snapshot, whose times (varints) may take a few bytes
        // more or less than the first's: a margin of 16 (it was 1, and failed now and then).
        let roomy = Publisher::unstarted(store)
            .await
            .unwrap()
            .with_size_limit(size + growth + 16);
        assert!(roomy.reserve(1).await.is_ok());
    }

    /// A snapshot at its ceiling still fits once its keys have all expired and spent their
    /// budgets (as before) and [`JOINING_REPLICAS`] replicas with the longest node ids joined.
    #[test]
    fn joining_replicas_fit_under_the_ceiling() {
        let snapshot = pb::Snapshot {
            client_keys: vec![pb::SnapshotClientKey::default(); 3],
            share_holders: vec!["n".into()],
            ..Default::default()
        };
        let reserved = ceiling(&snapshot);
        let mut joined = snapshot.clone();
        joined
            .share_holders
            .extend((0..JOINING_REPLICAS).map(|_| "n".repeat(MAX_ID_BYTES)));
        assert!(
            prost::Message::encoded_len(&joined) <= reserved,
            "{} > {reserved}",
            prost::Message::encoded_len(&joined)
        );
    }

    #[test]
    fn a_snapshot_sent_later_carries_what_is_left_of_each_cooldown() {
        let built_at = 1_700_000_000_000;
        let backend = |id: &str, until_ms: Option<i64>| pb::SnapshotBackend {
            id: id.into(),
            cooldown_until: until_ms.map(timestamp),
            consecutive_failures: 1,
            cooldown_epoch: 1,
            ..Default::default()
        };
        let snapshot = pb::Snapshot {
            backends: vec![
                backend("long", Some(built_at + 10_000)),
                backend("short", Some(built_at + 1_000)),
                backend("none", None),
            ],
            ..Default::default()
        };
        // Sent to a replica that connects 4 s after the snapshot was built.
        let sent = as_sent(&snapshot, built_at + 4_000);
        assert_eq!(sent.backends[0].cooldown_remaining, Some(duration(6_000)));
        assert_eq!(
            sent.backends[0].cooldown_until,
            snapshot.backends[0].cooldown_until
        );
        for ended in &sent.backends[1..] {
            assert_eq!(
                (ended.cooldown_until, ended.cooldown_remaining),
                (None, None)
            );
            // The streak outlives the cooldown.
            assert_eq!((ended.consecutive_failures, ended.cooldown_epoch), (1, 1));
        }
    }
}
