//! `AdminService`: backends, client keys, cooldowns, replicas and settings.
//! Every successful change commits a new snapshot version, which the store announces
//! to the snapshot publisher.

use std::sync::Arc;

use sluice_proto::limits::{
    MAX_ADMIN_RESPONSE_BYTES, MAX_ID_BYTES, MAX_KEY_PAGE_SIZE, MAX_MODEL_NAME_BYTES,
};
use sluice_proto::v1 as pb;
use sluice_proto::v1::admin_service_server::AdminService;
use tonic::{Request, Response, Status};

use super::paging::{decode_token, encode_token, page_size};
use crate::allowance::Allowances;
use crate::backend::{BackendSpec, check_api_key};
use crate::budget::BudgetPeriod;
use crate::client_key::{ClientKey, NewClientKey, budget_nanos};
use crate::membership::Registry;
use crate::snapshot::{self, Publisher};
use crate::store::{Cursor, Store};
use crate::validation::ValidationError;

/// The admin API over the store.
#[derive(Clone)]
pub struct Admin {
    store: Store,
    publisher: Arc<Publisher>,
    registry: Arc<Registry>,
    /// The budget allowances granted to data planes, which a key's `held_by_data_planes`
    /// shows.
    allowances: Arc<tokio::sync::Mutex<Allowances>>,
    /// The largest answer an unpaged list may give ([`MAX_ADMIN_RESPONSE_BYTES`]).
    max_response_bytes: usize,
}

impl Admin {
    pub fn new(store: Store, publisher: Arc<Publisher>, registry: Arc<Registry>) -> Self {
        Self {
            store,
            publisher,
            registry,
            allowances: Arc::default(),
            max_response_bytes: MAX_ADMIN_RESPONSE_BYTES,
        }
    }

    /// The same API showing what `allowances` (the data-plane service's) holds granted.
    pub fn with_allowances(mut self, allowances: Arc<tokio::sync::Mutex<Allowances>>) -> Self {
        self.allowances = allowances;
        self
    }

    /// The same API with another bound on unpaged answers (tests).
    #[cfg(test)]
    fn with_max_response_bytes(mut self, max: usize) -> Self {
        self.max_response_bytes = max;
        self
    }
}

impl Admin {
    /// Keys as the API shows them: with what each spent in its current period.
    async fn with_spend(&self, keys: Vec<ClientKey>) -> Result<Vec<pb::ClientKey>, Status> {
        let now = crate::time::now_ms();
        let spends = self.store.key_spends(keys.clone(), now).await?;
        let allowances = self.allowances.lock().await;
        Ok(keys
            .iter()
            .zip(spends)
            .map(|(key, spent)| {
                let mut shown = key.to_proto(now, spent);
                if key.max_budget_nanos > 0 {
                    let period_start = key.budget_period.period_of(now).map_or(0, |(s, _)| s);
                    let held =
                        allowances.outstanding_under(&key.id, period_start, key.max_budget_nanos);
                    shown.held_by_data_planes = sluice_domain::price::from_nanos(held);
                }
                shown
            })
            .collect())
    }
}

/// Runs an admin change to its end in a task of its own, whatever becomes of its call. A
/// client that gives up (`sluicectl`'s deadline, a stream reset) drops the call's handler,
/// and a write already handed to the store commits all the same: run in the handler, the
/// change's snapshot reservation was dropped with it, so that another write could be admitted
/// against a snapshot that did not count this one's growth (two together past the size every
/// replica accepts), and its audit line was never written.
async fn to_the_end<T: Send + 'static>(
    change: impl Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(change)
        .await
        .map_err(|_| Status::internal("the change failed; read it back before repeating it"))?
}

/// An update's mask, each path once: a path named twice sets its field once, and what is
/// logged of the mask stays the size of the message's fields (a request repeating one path
/// 80,000 times wrote a 1.3 MB log line).
fn mask_paths(mask: Option<sluice_proto::wkt::FieldMask>) -> Vec<String> {
    let mut paths = mask.map(|m| m.paths).unwrap_or_default();
    paths.sort_unstable();
    paths.dedup();
    paths
}

fn required_id(field: &str, id: &str) -> Result<String, Status> {
    // A name is looked up in the form it is stored in (ids are ASCII, which it leaves as is).
    let id = crate::validation::canonical_name(id);
    let id = id.as_str();
    if id.is_empty() {
        return Err(ValidationError::new(field, "must not be empty").into());
    }
    // No id or name is longer (names are at most 64 characters): a longer one is refused
    // for what it is, not looked up and quoted back whole as not found.
    if id.len() > MAX_ID_BYTES {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_ID_BYTES} bytes (an id or a name)"),
        )
        .into());
    }
    Ok(id.to_owned())
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_backend(
        &self,
        request: Request<pb::CreateBackendRequest>,
    ) -> Result<Response<pb::CreateBackendResponse>, Status> {
        let request = request.into_inner();
        let backend = request
            .backend
            .ok_or_else(|| ValidationError::new("backend", "is required"))?;
        let spec = BackendSpec::from_proto(&backend)?.validated()?;
        let api_key = request.api_key.trim().to_owned();
        check_api_key("api_key", &api_key)?;
        let admin = self.clone();
        let backend = to_the_end(async move {
            let room = admin
                .publisher
                .reserve(snapshot::backend_entry_bytes(&spec, &api_key))
                .await?;
            let (backend, version) = admin.store.create_backend(spec, api_key).await?;
            room.committed(version);
            tracing::info!(backend = %backend.id, name = %backend.spec.name, "backend created");
            Ok(backend)
        })
        .await?;
        Ok(Response::new(pb::CreateBackendResponse {
            backend: Some(backend.to_proto()),
        }))
    }

    async fn get_backend(
        &self,
        request: Request<pb::GetBackendRequest>,
    ) -> Result<Response<pb::GetBackendResponse>, Status> {
        let id = required_id("id", &request.into_inner().id)?;
        let backend = self.store.get_backend(id).await?;
        Ok(Response::new(pb::GetBackendResponse {
            backend: Some(backend.to_proto()),
        }))
    }

    async fn list_backends(
        &self,
        _request: Request<pb::ListBackendsRequest>,
    ) -> Result<Response<pb::ListBackendsResponse>, Status> {
        let backends = self.store.list_backends().await?;
        Ok(Response::new(pb::ListBackendsResponse {
            backends: backends.iter().map(|b| b.to_proto()).collect(),
        }))
    }

    async fn update_backend(
        &self,
        request: Request<pb::UpdateBackendRequest>,
    ) -> Result<Response<pb::UpdateBackendResponse>, Status> {
        let request = request.into_inner();
        let update = request
            .backend
            .ok_or_else(|| ValidationError::new("backend", "is required"))?;
        let id = required_id("backend.id", &update.id)?;
        let expected_etag = Some(update.etag.trim().to_owned()).filter(|etag| !etag.is_empty());
        let paths = mask_paths(request.update_mask);
        let mut api_key = Some(request.api_key.trim().to_owned()).filter(|key| !key.is_empty());
        if request.clear_api_key {
            if api_key.is_some() {
                return Err(ValidationError::new(
                    "clear_api_key",
                    "cannot be set with api_key: give one or the other",
                )
                .into());
            }
            // An empty key is stored as none (`store::backends::seal`).
            api_key = Some(String::new());
        }
        let clear_route_fields = request.clear_route_fields;
        if paths.is_empty() && api_key.is_none() {
            return Err(ValidationError::new(
                "update_mask",
                "names no field and no api_key was given: nothing to change",
            )
            .into());
        }
        if let Some(api_key) = api_key.as_ref().filter(|key| !key.is_empty()) {
            check_api_key("api_key", api_key)?;
        }
        // The updated backend, counted whole as growth (its old self is in the snapshot
        // still): more than it adds, never less. A disabled backend is not in the snapshot:
        // enabled without a new key, its stored key joins the snapshot too, counted at the
        // most a key may be (the store keeps it sealed).
        let stored = self.store.get_backend(id.clone()).await?.spec;
        let updated = stored.updated(&update, &paths)?;
        let stored_key_joins = api_key.is_none() && !stored.enabled && updated.enabled;
        let kept_key = if stored_key_joins {
            "k".repeat(crate::backend::MAX_API_KEY_BYTES)
        } else {
            String::new()
        };
        let growth =
            snapshot::backend_entry_bytes(&updated, api_key.as_deref().unwrap_or(&kept_key));
        let admin = self.clone();
        let backend = to_the_end(async move {
            let room = admin.publisher.reserve(growth).await?;
            let (backend, version) = admin
                .store
                .update_backend(
                    id,
                    expected_etag,
                    move |spec| {
                        let updated = spec.updated(&update, &paths)?;
                        spec.check_clearing(&updated, clear_route_fields)?;
                        Ok(updated)
                    },
                    api_key,
                )
                .await?;
            room.committed(version);
            tracing::info!(backend = %backend.id, "backend updated");
            Ok(backend)
        })
        .await?;
        Ok(Response::new(pb::UpdateBackendResponse {
            backend: Some(backend.to_proto()),
        }))
    }

    async fn delete_backend(
        &self,
        request: Request<pb::DeleteBackendRequest>,
    ) -> Result<Response<pb::DeleteBackendResponse>, Status> {
        let id = required_id("id", &request.into_inner().id)?;
        let store = self.store.clone();
        to_the_end(async move {
            store.delete_backend(id.clone()).await?;
            tracing::info!(backend = %id, "backend deleted");
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::DeleteBackendResponse {}))
    }

    async fn create_client_key(
        &self,
        request: Request<pb::CreateClientKeyRequest>,
    ) -> Result<Response<pb::CreateClientKeyResponse>, Status> {
        let request = request.into_inner();
        let new = NewClientKey {
            name: request.name,
            allowed_models: request.allowed_models,
            rpm_limit: request.rpm_limit,
            expire_time_ms: request.expire_time.as_ref().map(crate::time::timestamp_ms),
            max_budget_nanos: budget_nanos(request.max_budget)?,
            budget_period: BudgetPeriod::from_proto(request.budget_period)?,
            tpm_limit: request.tpm_limit,
            max_parallel_requests: request.max_parallel_requests,
        }
        .validated(crate::time::now_ms())?;
        let admin = self.clone();
        let (key, plaintext) = to_the_end(async move {
            let room = admin
                .publisher
                .reserve(snapshot::client_key_entry_bytes(
                    &new.name,
                    &new.allowed_models,
                ))
                .await?;
            let (key, plaintext, version) = admin.store.create_client_key(new).await?;
            room.committed(version);
            tracing::info!(client_key = %key.id, name = %key.name, "client key created");
            Ok((key, plaintext))
        })
        .await?;
        Ok(Response::new(pb::CreateClientKeyResponse {
            client_key: Some(key.to_proto(crate::time::now_ms(), 0)),
            key: plaintext,
        }))
    }

    async fn list_client_keys(
        &self,
        request: Request<pb::ListClientKeysRequest>,
    ) -> Result<Response<pb::ListClientKeysResponse>, Status> {
        let r = request.into_inner();
        let after = decode_token(&r)?;
        let limit = match page_size(r.page_size, MAX_KEY_PAGE_SIZE)? {
            // Every key, unless a token asks for the page after one.
            0 if after.is_none() => None,
            0 => Some(MAX_KEY_PAGE_SIZE),
            n => Some(n),
        };
        // One more than the page, to tell whether another follows.
        let mut keys = self
            .store
            .list_client_keys(r.active_only, after, limit.map(|n| n + 1))
            .await?;
        let more = limit.is_some_and(|n| keys.len() > n);
        if let Some(n) = limit {
            keys.truncate(n);
        }
        let next = keys.last().filter(|_| more).map(|last| Cursor {
            start_ms: last.create_time_ms,
            group_key: last.id.clone(),
        });
        let response = pb::ListClientKeysResponse {
            client_keys: self.with_spend(keys).await?,
            next_page_token: next.map(|c| encode_token(&r, c)).unwrap_or_default(),
        };
        // Every key ever issued, unpaged, may pass what a client accepts (revoked keys are
        // kept, and no snapshot bounds them): refused with the way out rather than failing in
        // the client's decoder.
        let len = prost::Message::encoded_len(&response);
        if limit.is_none() && len > self.max_response_bytes {
            return Err(super::stats::too_large(
                response.client_keys.len(),
                "client keys",
                len,
                self.max_response_bytes,
            ));
        }
        Ok(Response::new(response))
    }

    async fn get_client_key(
        &self,
        request: Request<pb::GetClientKeyRequest>,
    ) -> Result<Response<pb::GetClientKeyResponse>, Status> {
        let id = required_id("id", &request.into_inner().id)?;
        let key = self.store.get_client_key(id).await?;
        Ok(Response::new(pb::GetClientKeyResponse {
            client_key: self.with_spend(vec![key]).await?.pop(),
        }))
    }

    async fn update_client_key(
        &self,
        request: Request<pb::UpdateClientKeyRequest>,
    ) -> Result<Response<pb::UpdateClientKeyResponse>, Status> {
        let request = request.into_inner();
        let update = request
            .client_key
            .ok_or_else(|| ValidationError::new("client_key", "is required"))?;
        let id = required_id("client_key.id", &update.id)?;
        let paths = mask_paths(request.update_mask);
        if paths.is_empty() {
            return Err(
                ValidationError::new("update_mask", "names no field: nothing to change").into(),
            );
        }
        let now = crate::time::now_ms();
        // The updated key, counted whole as growth (its old self is in the snapshot still):
        // more than it adds, never less.
        let updated = NewClientKey::of(&self.store.get_client_key(id.clone()).await?)
            .updated(&update, &paths, now)?;
        let admin = self.clone();
        let key = to_the_end(async move {
            let room = admin
                .publisher
                .reserve(snapshot::client_key_entry_bytes(
                    &updated.name,
                    &updated.allowed_models,
                ))
                .await?;
            let (key, version) = admin
                .store
                .update_client_key(id, move |fields| fields.updated(&update, &paths, now))
                .await?;
            room.committed(version);
            tracing::info!(client_key = %key.id, "client key updated");
            Ok(key)
        })
        .await?;
        Ok(Response::new(pb::UpdateClientKeyResponse {
            client_key: self.with_spend(vec![key]).await?.pop(),
        }))
    }

    async fn revoke_client_key(
        &self,
        request: Request<pb::RevokeClientKeyRequest>,
    ) -> Result<Response<pb::RevokeClientKeyResponse>, Status> {
        let id = required_id("id", &request.into_inner().id)?;
        let store = self.store.clone();
        to_the_end(async move {
            store.revoke_client_key(id.clone()).await?;
            tracing::info!(client_key = %id, "client key revoked");
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::RevokeClientKeyResponse {}))
    }

    async fn list_cooldowns(
        &self,
        _request: Request<pb::ListCooldownsRequest>,
    ) -> Result<Response<pb::ListCooldownsResponse>, Status> {
        let rows = self.store.list_cooldowns().await?;
        Ok(Response::new(pb::ListCooldownsResponse {
            cooldowns: rows.iter().map(|c| c.to_proto()).collect(),
        }))
    }

    async fn reset_cooldown(
        &self,
        request: Request<pb::ResetCooldownRequest>,
    ) -> Result<Response<pb::ResetCooldownResponse>, Status> {
        let request = request.into_inner();
        let id = required_id("backend_id", &request.backend_id)?;
        let model = request.model.trim().to_owned();
        if model.len() > MAX_MODEL_NAME_BYTES {
            return Err(Status::invalid_argument(format!(
                "model: at most {MAX_MODEL_NAME_BYTES} bytes"
            )));
        }
        let store = self.store.clone();
        to_the_end(async move {
            store.reset_cooldown(id.clone(), model.clone()).await?;
            match model.is_empty() {
                true => {
                    tracing::info!(backend = %id, "cooldown reset, the backend's and its models'")
                }
                false => tracing::info!(backend = %id, model = %model, "model's cooldown reset"),
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::ResetCooldownResponse {}))
    }

    async fn rotate_affinity_key(
        &self,
        _request: Request<pb::RotateAffinityKeyRequest>,
    ) -> Result<Response<pb::RotateAffinityKeyResponse>, Status> {
        let store = self.store.clone();
        let (key_id, retired_keys) = to_the_end(async move {
            let (key_id, retired_keys) = store.rotate_affinity_key().await?;
            tracing::info!(key_id, retired_keys, "affinity key rotated");
            Ok((key_id, retired_keys))
        })
        .await?;
        Ok(Response::new(pb::RotateAffinityKeyResponse {
            key_id,
            retired_keys,
        }))
    }

    async fn list_data_planes(
        &self,
        _request: Request<pb::ListDataPlanesRequest>,
    ) -> Result<Response<pb::ListDataPlanesResponse>, Status> {
        // The newest committed version, not only the newest published: an admin call returns
        // once its change is committed, a moment before the snapshot that carries it is built,
        // and a replica listed as current must run every change made before the list.
        let latest = self
            .publisher
            .latest()
            .version
            .max(self.store.committed_version());
        let data_planes = self.registry.list(&self.store, latest).await?;
        Ok(Response::new(pb::ListDataPlanesResponse { data_planes }))
    }

    async fn get_settings(
        &self,
        _request: Request<pb::GetSettingsRequest>,
    ) -> Result<Response<pb::GetSettingsResponse>, Status> {
        let settings = self.store.get_settings().await?;
        Ok(Response::new(pb::GetSettingsResponse {
            settings: Some(settings),
        }))
    }

    async fn update_settings(
        &self,
        request: Request<pb::UpdateSettingsRequest>,
    ) -> Result<Response<pb::UpdateSettingsResponse>, Status> {
        let request = request.into_inner();
        let update = request
            .settings
            .ok_or_else(|| ValidationError::new("settings", "is required"))?;
        let paths = mask_paths(request.update_mask);
        if paths.is_empty() {
            return Err(
                ValidationError::new("update_mask", "names no field: nothing to change").into(),
            );
        }
        // The mask is applied inside the write, to the settings as they are then.
        let store = self.store.clone();
        let next = to_the_end(async move {
            let mask = paths.clone();
            let (next, _) = store
                .update_settings(move |current| {
                    crate::settings::apply_mask(current, &update, &mask)
                })
                .await?;
            tracing::info!(fields = ?paths, "settings updated");
            Ok(next)
        })
        .await?;
        Ok(Response::new(pb::UpdateSettingsResponse {
            settings: Some(next),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use crate::crypto::MasterKey;
    use crate::membership::Membership;
    use crate::store::NodeHello;

    /// A disabled backend is not in the snapshot; enabling it brings its stored key in too.
    /// Counted without it, enabling backends near the size limit passed it, and every replica
    /// then refused every snapshot (revocations included).
    #[tokio::test]
    async fn enabling_a_backend_counts_its_stored_key_against_the_snapshot_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("t.db"), MasterKey::generate()).unwrap();
        let unlimited = Arc::new(Publisher::unstarted(store.clone()).await.unwrap());
        let admin = Admin::new(store.clone(), unlimited, Arc::new(Registry::default()));
        let created = admin
            .create_backend(Request::new(pb::CreateBackendRequest {
                backend: Some(pb::Backend {
                    name: "big-key".into(),
                    base_url: "https://api.example.com/v1".into(),
                    models: vec![pb::ModelRoute {
                        name: "m".into(),
                        upstream_name: "m".into(),
                        ..Default::default()
                    }],
                    enabled: false,
                    weight: 1,
                    ..Default::default()
                }),
                api_key: "k".repeat(4000),
            }))
            .await
            .unwrap()
            .into_inner()
            .backend
            .unwrap();
        // Room for the backend's entry without its key, not with it.
        let publisher = Publisher::unstarted(store.clone()).await.unwrap();
        let room = snapshot::ceiling(&publisher.latest()) + 1_000;
        let admin = Admin::new(
            store.clone(),
            Arc::new(publisher.with_size_limit(room)),
            Arc::new(Registry::default()),
        );
        let refused = admin
            .update_backend(Request::new(pb::UpdateBackendRequest {
                backend: Some(pb::Backend {
                    id: created.id.clone(),
                    enabled: true,
                    ..Default::default()
                }),
                update_mask: Some(sluice_proto::wkt::FieldMask {
                    paths: vec!["enabled".into()],
                }),
                api_key: String::new(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert!(refused.message().contains("snapshot"), "{refused:?}");
        // The size it has now beside the size it may reach: the operator looked for bytes the
        // snapshot does not have.
        let now = prost::Message::encoded_len(&*admin.publisher.latest());
        assert!(
            refused
                .message()
                .contains(&format!("(it is {now} bytes now;")),
            "{refused:?}"
        );
        assert!(!store.get_backend(created.id).await.unwrap().spec.enabled);
    }

    /// A write whose caller gave up once it was handed to the store (`sluicectl`'s deadline
    /// while the writer is busy) commits, and its growth of the snapshot still counts until
    /// that snapshot is published: a second write that would take the snapshot past the size
    /// replicas accept is refused. Run in the handler, the dropped call took its reservation
    /// with it and the second write was admitted.
    #[tokio::test]
    async fn a_write_its_caller_left_still_holds_its_room_in_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("t.db"), MasterKey::generate()).unwrap();
        let backend = |name: &str| pb::Backend {
            name: name.into(),
            base_url: "https://api.example.com/v1".into(),
            models: vec![pb::ModelRoute {
                name: "m".into(),
                upstream_name: "m".into(),
                ..Default::default()
            }],
            enabled: true,
            weight: 1,
            ..Default::default()
        };
        let key = "k".repeat(4000);
        let create = |name: &str| pb::CreateBackendRequest {
            backend: Some(backend(name)),
            api_key: key.clone(),
        };
        let growth = snapshot::backend_entry_bytes(
            &BackendSpec::from_proto(&backend("a"))
                .unwrap()
                .validated()
                .unwrap(),
            &key,
        );
        // Room for one of the two backends, not for both.
        let publisher = Publisher::unstarted(store.clone()).await.unwrap();
        let room = snapshot::ceiling(&publisher.latest()) + 2 * growth - 1;
        let admin = Admin::new(
            store.clone(),
            Arc::new(publisher.with_size_limit(room)),
            Arc::new(Registry::default()),
        );

        let writer = crate::store::Held::hold(&store, None).await;
        // Polled once (reserved, handed to the store), then dropped, as a reset stream drops it.
        let left = tokio::time::timeout(
            std::time::Duration::ZERO,
            admin.create_backend(Request::new(create("a"))),
        )
        .await;
        assert!(
            left.is_err(),
            "the write cannot finish while the writer is held"
        );
        writer.release().await;
        let mut committed = false;
        for _ in 0..500 {
            let names: Vec<_> = store.list_backends().await.unwrap();
            if names.iter().any(|b| b.spec.name == "a") {
                committed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(committed, "the write its caller left commits");

        let refused = admin
            .create_backend(Request::new(create("b")))
            .await
            .unwrap_err();
        assert!(refused.message().contains("snapshot"), "{refused:?}");
        assert!(store.list_backends().await.unwrap().len() == 1);
    }

    /// An unpaged list of every key ever issued (revoked ones are kept) past what a client
    /// accepts is refused with the way out, pages, which still list them all.
    #[tokio::test]
    async fn an_unpaged_list_of_keys_too_large_asks_for_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("t.db"), MasterKey::generate()).unwrap();
        let publisher = Arc::new(Publisher::unstarted(store.clone()).await.unwrap());
        let admin = Admin::new(store, publisher, Arc::new(Registry::default()))
            .with_max_response_bytes(200);
        for name in ["a", "b", "c", "d"] {
            admin
                .create_client_key(Request::new(pb::CreateClientKeyRequest {
                    name: name.into(),
                    ..Default::default()
                }))
                .await
                .unwrap();
        }
        let list = |page_size, page_token| {
            admin.list_client_keys(Request::new(pb::ListClientKeysRequest {
                page_size,
                page_token,
                active_only: false,
            }))
        };
        let refused = list(0, String::new()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("4 client keys") && refused.message().contains("page_size"),
            "{refused:?}"
        );
        let mut names = Vec::new();
        let mut token = String::new();
        loop {
            let page = list(1, token).await.unwrap().into_inner();
            names.extend(page.client_keys.into_iter().map(|k| k.name));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        names.sort();
        assert_eq!(names, ["a", "b", "c", "d"]);
    }

    /// A mask naming a path many times sets its field once and is logged with each path once:
    /// one request repeating a path 80,000 times wrote a 1.3 MB line to the control plane's
    /// log, which log pipelines split or drop, the audit line of the change with it.
    #[tokio::test]
    async fn a_path_named_many_times_counts_once() {
        let mask = |paths: Vec<String>| Some(sluice_proto::wkt::FieldMask { paths });
        let repeated: Vec<String> = std::iter::repeat_n("max_attempts".to_owned(), 80_000)
            .chain(["currency".to_owned(), "max_attempts".to_owned()])
            .collect();
        assert_eq!(
            mask_paths(mask(repeated.clone())),
            ["currency", "max_attempts"]
        );
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("t.db"), MasterKey::generate()).unwrap();
        let publisher = Arc::new(Publisher::unstarted(store.clone()).await.unwrap());
        let admin = Admin::new(store.clone(), publisher, Arc::new(Registry::default()));
        admin
            .update_settings(Request::new(pb::UpdateSettingsRequest {
                settings: Some(pb::Settings {
                    max_attempts: 4,
                    currency: "EUR".into(),
                    ..Default::default()
                }),
                update_mask: mask(repeated),
            }))
            .await
            .unwrap();
        let settings = store.get_settings().await.unwrap();
        assert_eq!(
            (settings.max_attempts, settings.currency.as_str()),
            (4, "EUR")
        );
    }

    /// Two settings changes of different fields at once (a `sluicectl settings set` and a
    /// dashboard save) both land: neither puts back the field the other changed. The writer
    /// is held busy first, so that both calls wait for it together, as they do when they
    /// race.
    #[tokio::test]
    async fn two_settings_changes_at_once_both_land() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("t.db"), MasterKey::generate()).unwrap();
        let publisher = Arc::new(Publisher::unstarted(store.clone()).await.unwrap());
        let admin = Admin::new(store.clone(), publisher, Arc::new(Registry::default()));
        let set = |settings: pb::Settings, field: &str| {
            admin.update_settings(Request::new(pb::UpdateSettingsRequest {
                settings: Some(settings),
                update_mask: Some(sluice_proto::wkt::FieldMask {
                    paths: vec![field.to_owned()],
                }),
            }))
        };
        for round in 0..10_u32 {
            let busy = store.call(|_, _| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                Ok(())
            });
            let attempts = 2 + round % 5;
            let days = 30 + round;
            let (held, first, second) = tokio::join!(
                busy,
                set(
                    pb::Settings {
                        max_attempts: attempts,
                        ..Default::default()
                    },
                    "max_attempts"
                ),
                set(
                    pb::Settings {
                        usage_retention_days: days,
                        ..Default::default()
                    },
                    "usage_retention_days"
                ),
            );
            held.unwrap();
            first.unwrap();
            second.unwrap();
            let settings = store.get_settings().await.unwrap();
            assert_eq!(
                (settings.max_attempts, settings.usage_retention_days),
                (attempts, days),
                "round {round}"
            );
        }
    }

    /// An admin call returns once its change is committed, before the snapshot that carries
    /// it is built: until the replica has acked that snapshot, the list must not show it as
    /// current (a script waiting for current replicas would use the change too early).
    #[tokio::test]
    async fn a_replica_is_listed_as_current_only_once_it_runs_every_committed_change() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("t.db"), MasterKey::generate()).unwrap();
        // Rebuilds only when told: the moment between the commit and the snapshot, held open.
        let publisher = Arc::new(Publisher::unstarted(store.clone()).await.unwrap());
        let registry = Arc::new(Registry::default());
        let hello = NodeHello {
            node_id: "r1".into(),
            incarnation: String::new(),
            hostname: "h".into(),
            peer_address: String::new(),
            build_version: "t".into(),
        };
        Membership::new(store.clone(), Arc::clone(&registry))
            .joined(&hello, crate::time::now_ms(), false)
            .await
            .unwrap();
        let admin = Admin::new(store, Arc::clone(&publisher), Arc::clone(&registry));
        let current = || async {
            let planes = admin
                .list_data_planes(Request::new(pb::ListDataPlanesRequest {}))
                .await
                .unwrap()
                .into_inner()
                .data_planes;
            assert_eq!(planes.len(), 1);
            planes[0].acked_version == planes[0].latest_version
        };
        publisher.rebuild().await.unwrap();
        registry.record("r1", publisher.latest().version, "");
        assert!(current().await, "the replica runs the newest snapshot");

        admin
            .create_client_key(Request::new(pb::CreateClientKeyRequest {
                name: "k".into(),
                ..Default::default()
            }))
            .await
            .unwrap();
        assert!(
            !current().await,
            "the key is committed, its snapshot not built"
        );
        publisher.rebuild().await.unwrap();
        assert!(!current().await, "the snapshot is built, not acked");
        registry.record("r1", publisher.latest().version, "");
        assert!(
            current().await,
            "the replica acked the snapshot with the key"
        );
    }
}
