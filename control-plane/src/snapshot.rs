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
use crate::time::{now_ms, timestamp};

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

/// Builds the snapshot of the committed state, stamped with `epoch`.
pub async fn build(store: &Store, epoch: &str) -> Result<pb::Snapshot, StoreError> {
    let epoch = epoch.to_owned();
    store
        .read(Reader::Snapshot, move |conn, key| {
            // One read transaction, so the version matches the contents.
            let tx = conn.transaction()?;
            let version = crate::store::read_version_in(&tx)?;
            let now = now_ms();
            let cooldowns = crate::store::load_active_cooldowns_in(&tx, now)?;
            let backends = crate::store::load_enabled_with_keys_in(&tx, key)?
                .into_iter()
                .map(|b| {
                    let cooldown = cooldowns.iter().find(|c| c.backend_id == b.backend.id);
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
                        cooldown_until: cooldown.map(|c| timestamp(c.until_ms)),
                        consecutive_failures: cooldown.map_or(0, |c| c.consecutive_failures),
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
