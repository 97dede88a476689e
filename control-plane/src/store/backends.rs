//! Backends and their models; provider keys encrypted with the backend id as
//! associated data.

use rusqlite::{Connection, OptionalExtension as _, Transaction, params};

use super::{Reader, Store, StoreError, WriteOp, bump_version, new_id, unique_violation};
use crate::backend::{
    ApiFormat, Backend, BackendSpec, KeyHeader, LongContextPrices, ModelRoute, Pool,
};
use crate::crypto::{MasterKey, key_hint};
use crate::time::now_ms;

/// A backend with its decrypted provider key, for snapshots only.
#[derive(Debug, Clone)]
pub struct BackendWithKey {
    pub backend: Backend,
    pub api_key: String,
}

impl Store {
    pub async fn create_backend(
        &self,
        spec: BackendSpec,
        api_key: String,
    ) -> Result<(Backend, u64), StoreError> {
        let spec = spec.validated()?;
        self.write(WriteOp::admin, move |conn, key| {
            let tx = conn.transaction()?;
            let id = new_id();
            let now = now_ms();
            let (sealed, hint) = seal(key, &id, &api_key)?;
            tx.execute(
                "INSERT INTO backends (id, name, base_url, pool, priority, weight, rpm_limit, enabled,
                                       api_key_ciphertext, api_key_hint, create_time, update_time,
                                       responses_api, api_format, anthropic_version, tpm_limit,
                                       key_header)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?12, ?13, ?14, ?15, ?16)",
                params![
                    id,
                    spec.name,
                    spec.base_url,
                    pool_to_db(spec.pool),
                    spec.priority,
                    spec.weight,
                    spec.rpm_limit,
                    spec.enabled,
                    sealed,
                    hint,
                    now,
                    spec.responses_api,
                    spec.api_format.as_str(),
                    spec.anthropic_version,
                    spec.tpm_limit,
                    spec.key_header.as_str()
                ],
            )
            .map_err(|e| unique_violation(e, || format!("a backend named {:?} already exists", spec.name)))?;
            insert_models(&tx, &id, &spec.models)?;
            let version = bump_version(&tx)?;
            let backend = load_backend(&tx, &id)?;
            tx.commit()?;
            Ok((backend, version))
        })
        .await
    }

    /// Looks a backend up by id, or else by its unique name.
    pub async fn get_backend(&self, id_or_name: String) -> Result<Backend, StoreError> {
        self.read(Reader::Admin, move |conn, _| {
            let id = resolve_backend_id(conn, &id_or_name)?;
            load_backend(conn, &id)
        })
        .await
    }

    pub async fn list_backends(&self) -> Result<Vec<Backend>, StoreError> {
        self.read(Reader::Admin, |conn, _| load_all(conn)).await
    }

    /// Stores what `change` makes of the stored spec (it validates what it changes:
    /// [`BackendSpec::updated`]) and, when given, replaces the provider key.
    pub async fn update_backend<F>(
        &self,
        id_or_name: String,
        expected_etag: Option<String>,
        change: F,
        api_key: Option<String>,
    ) -> Result<(Backend, u64), StoreError>
    where
        F: FnOnce(&BackendSpec) -> Result<BackendSpec, crate::validation::ValidationError>
            + Send
            + 'static,
    {
        self.write(WriteOp::admin, move |conn, key| {
            let tx = conn.transaction()?;
            let id = resolve_backend_id(&tx, &id_or_name)?;
            let current = load_backend(&tx, &id)?;
            if let Some(expected) = expected_etag
                && current.etag() != expected
            {
                return Err(StoreError::Changed(format!(
                    "backend {:?} changed since it was read (its etag is no longer {:?}): \
                     read it again and make the change on what it is now",
                    current.spec.name,
                    sluice_domain::text::quoted(&expected)
                )));
            }
            let spec = change(&current.spec)?;
            let holds_a_key = || {
                tx.query_row(
                    "SELECT api_key_ciphertext IS NOT NULL AND length(api_key_ciphertext) > 0
                     FROM backends WHERE id = ?1",
                    params![id],
                    |r| r.get::<_, bool>(0),
                )
            };
            if api_key.is_none()
                && !crate::backend::same_origin(&spec.base_url, &current.spec.base_url)
                && holds_a_key()?
            {
                return Err(crate::validation::ValidationError::new(
                    "api_key",
                    "moving a backend to another origin (scheme, host or port) needs its api_key \
                     again: the stored key is never sent anywhere it was not given for",
                )
                .into());
            }
            let now = now_ms();
            tx.execute(
                "UPDATE backends SET name = ?2, base_url = ?3, pool = ?4, priority = ?5, weight = ?6,
                        rpm_limit = ?7, enabled = ?8, update_time = ?9, responses_api = ?10,
                        api_format = ?11, anthropic_version = ?12, tpm_limit = ?13,
                        key_header = ?14 WHERE id = ?1",
                params![
                    id,
                    spec.name,
                    spec.base_url,
                    pool_to_db(spec.pool),
                    spec.priority,
                    spec.weight,
                    spec.rpm_limit,
                    spec.enabled,
                    now,
                    spec.responses_api,
                    spec.api_format.as_str(),
                    spec.anthropic_version,
                    spec.tpm_limit,
                    spec.key_header.as_str()
                ],
            )
            .map_err(|e| unique_violation(e, || format!("a backend named {:?} already exists", spec.name)))?;
            if spec.models != current.spec.models {
                tx.execute("DELETE FROM backend_models WHERE backend_id = ?1", params![id])?;
                insert_models(&tx, &id, &spec.models)?;
            }
            if let Some(api_key) = api_key {
                let (sealed, hint) = seal(key, &id, &api_key)?;
                tx.execute(
                    "UPDATE backends SET api_key_ciphertext = ?2, api_key_hint = ?3 WHERE id = ?1",
                    params![id, sealed, hint],
                )?;
            }
            let version = bump_version(&tx)?;
            let backend = load_backend(&tx, &id)?;
            tx.commit()?;
            Ok((backend, version))
        })
        .await
    }

    pub async fn delete_backend(&self, id_or_name: String) -> Result<u64, StoreError> {
        self.write(WriteOp::admin, move |conn, _| {
            let tx = conn.transaction()?;
            let id = resolve_backend_id(&tx, &id_or_name)?;
            // Its usage stays under its id: kept, its name and pool still say whose it is.
            tx.execute(
                "INSERT OR REPLACE INTO deleted_backends (id, name, pool, delete_time)
                 SELECT id, name, pool, ?2 FROM backends WHERE id = ?1",
                params![id, crate::time::now_ms()],
            )?;
            tx.execute("DELETE FROM backends WHERE id = ?1", params![id])?;
            let version = bump_version(&tx)?;
            tx.commit()?;
            Ok(version)
        })
        .await
    }
}

/// Every enabled backend with its decrypted key (for snapshots).
pub(crate) fn load_enabled_with_keys(
    conn: &Connection,
    key: &MasterKey,
) -> Result<Vec<BackendWithKey>, StoreError> {
    let mut out = Vec::new();
    for backend in load_all(conn)? {
        if !backend.spec.enabled {
            continue;
        }
        let sealed: Option<Vec<u8>> = conn.query_row(
            "SELECT api_key_ciphertext FROM backends WHERE id = ?1",
            params![backend.id],
            |r| r.get(0),
        )?;
        let api_key = match sealed {
            Some(sealed) => {
                let plain = key
                    .decrypt(&sealed, backend.id.as_bytes())
                    .map_err(|_| StoreError::Undecryptable(backend.id.clone()))?;
                String::from_utf8(plain)
                    .map_err(|_| StoreError::Undecryptable(backend.id.clone()))?
            }
            None => String::new(),
        };
        out.push(BackendWithKey { backend, api_key });
    }
    Ok(out)
}

fn seal(key: &MasterKey, id: &str, api_key: &str) -> Result<(Option<Vec<u8>>, String), StoreError> {
    if api_key.is_empty() {
        return Ok((None, String::new()));
    }
    Ok((
        Some(key.encrypt(api_key.as_bytes(), id.as_bytes())?),
        key_hint(api_key),
    ))
}

fn insert_models(tx: &Transaction<'_>, id: &str, models: &[ModelRoute]) -> Result<(), StoreError> {
    let mut stmt = tx.prepare(
        "INSERT INTO backend_models (backend_id, position, name, upstream_name,
                                     input_price_per_mtok, output_price_per_mtok,
                                     cached_input_price_per_mtok, default_max_tokens,
                                     cache_write_price_per_mtok, tier_multipliers,
                                     long_context_above, long_context_input_multiplier,
                                     long_context_output_multiplier, call_prices,
                                     audio_input_price_per_mtok, audio_output_price_per_mtok,
                                     max_output_tokens)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )?;
    for (position, m) in models.iter().enumerate() {
        stmt.execute(params![
            id,
            position as i64,
            m.name,
            m.upstream_name,
            m.input_price_per_mtok,
            m.output_price_per_mtok,
            m.cached_input_price_per_mtok,
            m.default_max_tokens,
            m.cache_write_price_per_mtok,
            pairs_to_db(&m.tier_multipliers),
            // Validation keeps it far below i64::MAX.
            m.long_context
                .map(|l| i64::try_from(l.above_prompt_tokens).unwrap_or(i64::MAX)),
            m.long_context.map(|l| l.input_multiplier),
            m.long_context.map(|l| l.output_multiplier),
            pairs_to_db(&m.call_prices),
            m.audio_input_price_per_mtok,
            m.audio_output_price_per_mtok,
            m.max_output_tokens,
        ])?;
    }
    Ok(())
}

/// The `backend_models.tier_multipliers` and `call_prices` columns: a JSON array of `[tier,
/// multiplier]` or `[tool, price per 1,000 calls]` pairs.
fn pairs_to_db(pairs: &[(String, f64)]) -> String {
    // Strings and finite numbers (validation refuses others) always serialize.
    serde_json::to_string(pairs).unwrap_or_else(|_| "[]".to_owned())
}

/// The columns [`route_from_row`] reads, in its order.
const ROUTE_COLUMNS: &str = "name, upstream_name, input_price_per_mtok, output_price_per_mtok,
    cached_input_price_per_mtok, default_max_tokens, cache_write_price_per_mtok,
    tier_multipliers, long_context_above, long_context_input_multiplier,
    long_context_output_multiplier, call_prices, audio_input_price_per_mtok,
    audio_output_price_per_mtok, max_output_tokens";

/// A model route from [`ROUTE_COLUMNS`], the first of them at `first`.
fn route_from_row(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<ModelRoute> {
    Ok(ModelRoute {
        name: r.get(first)?,
        upstream_name: r.get(first + 1)?,
        input_price_per_mtok: r.get(first + 2)?,
        output_price_per_mtok: r.get(first + 3)?,
        cached_input_price_per_mtok: r.get(first + 4)?,
        default_max_tokens: r.get(first + 5)?,
        cache_write_price_per_mtok: r.get(first + 6)?,
        tier_multipliers: pairs_from_db(r, first + 7)?,
        long_context: long_context_from_db(r, first + 8)?,
        call_prices: pairs_from_db(r, first + 11)?,
        audio_input_price_per_mtok: r.get(first + 12)?,
        audio_output_price_per_mtok: r.get(first + 13)?,
        max_output_tokens: r.get(first + 14)?,
    })
}

/// The long-context band of a route's row, from its three columns from `first` on (NULL: none).
fn long_context_from_db(
    r: &rusqlite::Row<'_>,
    first: usize,
) -> rusqlite::Result<Option<LongContextPrices>> {
    let Some(above) = r.get::<_, Option<i64>>(first)? else {
        return Ok(None);
    };
    Ok(Some(LongContextPrices {
        above_prompt_tokens: u64::try_from(above).unwrap_or(0),
        input_multiplier: r.get(first + 1)?,
        output_multiplier: r.get(first + 2)?,
    }))
}

/// [`pairs_to_db`]'s column read back; a value that is not such an array is a corrupt row.
fn pairs_from_db(r: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<Vec<(String, f64)>> {
    let text: String = r.get(column)?;
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, e.into())
    })
}

pub(crate) fn resolve_backend_id(
    conn: &Connection,
    id_or_name: &str,
) -> Result<String, StoreError> {
    conn.query_row(
        "SELECT id FROM backends WHERE id = ?1 UNION ALL SELECT id FROM backends WHERE name = ?1 LIMIT 1",
        params![id_or_name],
        |r| r.get(0),
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound {
        kind: "backend",
        id: id_or_name.to_owned(),
    })
}

/// The `backends.pool` column: 1 primary, 2 fallback.
fn pool_to_db(pool: Pool) -> i64 {
    match pool {
        Pool::Primary => 1,
        Pool::Fallback => 2,
    }
}

fn pool_from_db(value: i64) -> Pool {
    if value == 2 {
        Pool::Fallback
    } else {
        Pool::Primary
    }
}

const BACKEND_COLUMNS: &str = "id, name, base_url, pool, priority, weight, rpm_limit, enabled, api_key_hint, create_time, update_time, responses_api, api_format, anthropic_version, tpm_limit, key_header";

fn row_to_backend(r: &rusqlite::Row<'_>) -> rusqlite::Result<Backend> {
    Ok(Backend {
        id: r.get(0)?,
        spec: BackendSpec {
            name: r.get(1)?,
            base_url: r.get(2)?,
            pool: pool_from_db(r.get(3)?),
            priority: r.get(4)?,
            weight: r.get(5)?,
            models: Vec::new(),
            rpm_limit: r.get(6)?,
            tpm_limit: r.get(14)?,
            enabled: r.get(7)?,
            responses_api: r.get(11)?,
            api_format: ApiFormat::from_db(&r.get::<_, String>(12)?),
            anthropic_version: r.get(13)?,
            key_header: KeyHeader::from_db(&r.get::<_, String>(15)?),
        },
        api_key_hint: r.get(8)?,
        create_time_ms: r.get(9)?,
        update_time_ms: r.get(10)?,
    })
}

fn load_backend(conn: &Connection, id: &str) -> Result<Backend, StoreError> {
    let mut backend = conn
        .query_row(
            &format!("SELECT {BACKEND_COLUMNS} FROM backends WHERE id = ?1"),
            params![id],
            row_to_backend,
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound {
            kind: "backend",
            id: id.to_owned(),
        })?;
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ROUTE_COLUMNS} FROM backend_models WHERE backend_id = ?1 ORDER BY position"
    ))?;
    backend.spec.models = stmt
        .query_map(params![id], |r| route_from_row(r, 0))?
        .collect::<Result<_, _>>()?;
    Ok(backend)
}

fn load_all(conn: &Connection) -> Result<Vec<Backend>, StoreError> {
    let mut backends: Vec<Backend> = {
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {BACKEND_COLUMNS} FROM backends ORDER BY pool, priority, name"
        ))?;
        stmt.query_map([], row_to_backend)?
            .collect::<Result<_, _>>()?
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT backend_id, {ROUTE_COLUMNS} FROM backend_models ORDER BY backend_id, position"
    ))?;
    let mut by_backend: std::collections::HashMap<String, Vec<ModelRoute>> =
        std::collections::HashMap::new();
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, route_from_row(r, 1)?)))?;
    for row in rows {
        let (id, model) = row?;
        by_backend.entry(id).or_default().push(model);
    }
    for backend in &mut backends {
        backend.spec.models = by_backend.remove(&backend.id).unwrap_or_default();
    }
    Ok(backends)
}
