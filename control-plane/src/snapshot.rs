//! Routing snapshots: built from the database after every committed change (the store
//! announces each new version) and published through a `watch`, so a subscriber always
//! sees the newest version, may skip some, and never goes backwards.
//!
//! Every snapshot carries the publisher's epoch, random per start. The version is
//! persisted and only grows while the database lives, but a database restored from a
//! backup starts again from the backup's lower version; data planes compare versions only
//! within an epoch, so they follow a restored control plane instead of refusing its
//! snapshots as stale.

use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use sluice_proto::v1 as pb;
use tokio::sync::watch;

use crate::store::{Reader, Store, StoreError};
use crate::time::{UnixMs, duration, now_ms, timestamp, timestamp_ms};

/// Builds and publishes snapshots. Cheap to share behind an `Arc`.
pub struct Publisher {
    store: Store,
    /// Random per start; see the module docs.
    epoch: String,
    tx: watch::Sender<Arc<pb::Snapshot>>,
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
        let first = build(&store, &epoch).await?;
        tracing::info!(
            %epoch,
            version = first.version,
            bytes = first.encoded_len(),
            build_ms = started.elapsed().as_millis() as u64,
            "snapshot epoch started"
        );
        let (tx, _) = watch::channel(Arc::new(first));
        Ok(Self { store, epoch, tx })
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
        let snapshot = build(&self.store, &self.epoch).await?;
        let version = snapshot.version;
        let build_ms = started.elapsed().as_millis() as u64;
        let published = self.tx.send_if_modified(|current| {
            if snapshot.version > current.version {
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
/// this one matters); one that has ended since the snapshot was built is left out.
pub fn as_sent(snapshot: &pb::Snapshot, now_ms: i64) -> pb::Snapshot {
    let mut sent = snapshot.clone();
    for b in &mut sent.backends {
        let left = b
            .cooldown_until
            .as_ref()
            .map(|until| timestamp_ms(until).saturating_sub(now_ms))
            .filter(|left| *left > 0);
        b.cooldown_remaining = left.map(duration);
        if left.is_none() {
            b.cooldown_until = None;
        }
    }
    sent
}

/// Builds the snapshot of the committed state, stamped with `epoch`.
pub async fn build(store: &Store, epoch: &str) -> Result<pb::Snapshot, StoreError> {
    let epoch = epoch.to_owned();
    store
        .read(Reader::Snapshot, move |conn, key| {
            // One read transaction, so the version matches the contents.
            let tx = conn.transaction()?;
            let version = crate::store::read_version_in(&tx)?;
            let now = now_ms();
            let cooldowns = crate::store::load_cooldown_states_in(&tx)?;
            let backends = crate::store::load_enabled_with_keys_in(&tx, key)?
                .into_iter()
                .map(|b| {
                    let cooldown = cooldowns.get(&b.backend.id).cloned().unwrap_or_default();
                    let spec = b.backend.spec;
                    pb::SnapshotBackend {
                        id: b.backend.id,
                        name: spec.name,
                        base_url: spec.base_url,
                        pool: pb::Pool::from(spec.pool) as i32,
                        priority: spec.priority,
                        weight: spec.weight,
                        models: spec.models.iter().map(|m| m.to_proto()).collect(),
                        api_key: b.api_key,
                        rpm_limit: spec.rpm_limit,
                        cooldown_until: cooldown
                            .cooling_until(UnixMs(now))
                            .map(|until| timestamp(until.0)),
                        consecutive_failures: cooldown.streak,
                        // Filled in as each copy is sent: see `as_sent`.
                        cooldown_remaining: None,
                        cooldown_epoch: cooldown.epoch,
                        cooldown_run_basis: cooldown.run.as_ref().map_or(0, |(_, basis)| *basis),
                        cooldown_changed_by: cooldown.run.map(|(by, _)| by).unwrap_or_default(),
                    }
                })
                .collect();
            let client_keys = crate::store::load_keys_in(&tx, true)?
                .into_iter()
                .map(|k| pb::SnapshotClientKey {
                    id: k.id,
                    name: k.name,
                    key_sha256: k.key_sha256,
                    allowed_models: k.allowed_models,
                    rpm_limit: k.rpm_limit,
                })
                .collect();
            let settings = crate::store::load_settings_in(&tx)?;
            // In the same transaction as the version: a change of it bumps the version.
            let replica_count = crate::store::count_share_holders_in(&tx)?;
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
            })
        })
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

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
