//! Backends' cooldown states, stored per backend and per model at a backend, as
//! `sluice_domain::cooldown` defines them and applies the data planes' reports (and an
//! operator's resets) to them. A backend's own state is its row with model `''`; a model's
//! (named as the provider names it, `backend_models.upstream_name`) its row with that
//! model: a 429 for one model cools that model alone, as providers limit each model apart.

use rusqlite::{Connection, OptionalExtension as _, Transaction, params};
use sluice_domain::cooldown::{CooldownState, Report};
use sluice_domain::settings::Policy;
use sluice_proto::v1 as pb;

use super::backends::resolve_backend_id;
use super::settings::load_settings;
use super::{Reader, Store, StoreError, WriteOp, bump_version};
use crate::time::{UnixMs, now_ms};

/// A backend's cooldown state by the control plane's clock; replicas named by
/// `sluice_domain::cooldown::author`.
pub type Cooldown = CooldownState<UnixMs, String>;

/// A backend cooling down, as `ListCooldowns` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct CooldownRow {
    pub backend_id: String,
    pub backend_name: String,
    /// The model cooling down at the backend; empty: the whole backend.
    pub model: String,
    pub until_ms: i64,
    pub consecutive_failures: u32,
    pub reason: String,
    pub reported_by: String,
    pub create_time_ms: i64,
}

/// A data plane's report about a backend's health.
#[derive(Debug, Clone)]
pub struct CooldownEvent {
    pub backend_id: String,
    /// The model (its name at the provider) whose state it is about; empty: the backend's.
    pub model: String,
    pub report: Reported,
    pub reason: String,
    /// The node id, for display.
    pub reported_by: String,
    /// The replica as the author of changes (node id and incarnation).
    pub author: String,
    /// How long before it arrived the replica saw it.
    pub age: std::time::Duration,
}

/// What the report says, by the sender's version.
#[derive(Debug, Clone, Copy)]
pub enum Reported {
    /// From a data plane that names the epoch it knew.
    Report(Report),
    /// From a data plane older than epochs: its own streak and end time (its clock).
    Legacy { streak: u32, until_ms: i64 },
}

impl Store {
    /// Cooldowns still in force.
    pub async fn list_cooldowns(&self) -> Result<Vec<CooldownRow>, StoreError> {
        self.read(Reader::Admin, |conn, _| {
            load_active_cooldowns(conn, now_ms())
        })
        .await
    }

    /// Ends a backend's streak and cooldown and those of each of its models, or, given a
    /// `model`, that model's alone. Returns the new snapshot version.
    pub async fn reset_cooldown(&self, backend: String, model: String) -> Result<u64, StoreError> {
        self.write(WriteOp::cooldown, move |conn, _| {
            let tx = conn.transaction()?;
            let id = resolve_backend_id(&tx, &backend)?;
            let models = if model.is_empty() {
                // Every model it has a state of, and every model it serves: a 429 seen before
                // the reset and reported after it (a replica cut off meanwhile) is absorbed
                // by the reset's epoch, for a model that had no state yet too.
                let mut models = vec![String::new()];
                models.extend(
                    tx.prepare_cached(
                        "SELECT model FROM cooldowns WHERE backend_id = ?1 AND model != ''
                         UNION SELECT upstream_name FROM backend_models WHERE backend_id = ?1",
                    )?
                    .query_map(params![id], |r| r.get(0))?
                    .collect::<Result<Vec<String>, _>>()?,
                );
                models
            } else {
                if load_state(&tx, &id, &model)?.is_none() && !serves(&tx, &id, &model)? {
                    return Err(StoreError::NotFound {
                        kind: "model of the backend",
                        id: model,
                    });
                }
                vec![model]
            };
            let now = UnixMs(now_ms());
            for model in &models {
                let mut state = load_state(&tx, &id, model)?.unwrap_or_default();
                state.reset(now);
                store_state(&tx, &id, model, &state, "reset by an admin", "admin")?;
            }
            let version = bump_version(&tx)?;
            tx.commit()?;
            Ok(version)
        })
        .await
    }

    /// Applies data planes' reports in order, by the rules of `sluice_domain::cooldown`, with
    /// this control plane's clock. Returns the new snapshot version when anything changed.
    pub async fn record_cooldowns(
        &self,
        events: Vec<CooldownEvent>,
    ) -> Result<Option<u64>, StoreError> {
        self.record_cooldowns_at(events, now_ms()).await
    }

    /// [`Store::record_cooldowns`] with the clock reading `now_ms` (Unix ms): for a caller
    /// that keeps its own time, such as the protocol simulation.
    pub async fn record_cooldowns_at(
        &self,
        events: Vec<CooldownEvent>,
        now_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        self.write(WriteOp::cooldown, move |conn, _| {
            let tx = conn.transaction()?;
            let now = UnixMs(now_ms);
            let policy = Policy::try_from(&load_settings(&tx)?)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?
                .cooldown;
            let mut changed = false;
            for e in &events {
                // Unknown (deleted) backends are ignored, not an error: the data plane
                // may run an older snapshot.
                let exists: bool = tx
                    .prepare_cached("SELECT EXISTS (SELECT 1 FROM backends WHERE id = ?1)")?
                    .query_row(params![e.backend_id], |r| r.get(0))?;
                if !exists {
                    continue;
                }
                // Nor is a model the backend does not serve (any more): it has no route.
                if !e.model.is_empty() && !serves(&tx, &e.backend_id, &e.model)? {
                    continue;
                }
                let mut state = load_state(&tx, &e.backend_id, &e.model)?.unwrap_or_default();
                let before = state.clone();
                match e.report {
                    Reported::Report(report) => {
                        // Timed from when the replica saw it, by this clock.
                        let at =
                            UnixMs(now.0.saturating_sub(
                                i64::try_from(e.age.as_millis()).unwrap_or(i64::MAX),
                            ));
                        state.apply(&report, &e.author, &policy, at);
                    }
                    Reported::Legacy { streak, until_ms } => {
                        state.apply_legacy(streak, UnixMs(until_ms), now);
                    }
                }
                if state != before {
                    store_state(
                        &tx,
                        &e.backend_id,
                        &e.model,
                        &state,
                        &e.reason,
                        &e.reported_by,
                    )?;
                    changed = true;
                }
            }
            if !changed {
                return Ok(None);
            }
            let version = bump_version(&tx)?;
            tx.commit()?;
            Ok(Some(version))
        })
        .await
    }
}

fn load_active_cooldowns(conn: &Connection, now_ms: i64) -> Result<Vec<CooldownRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT c.backend_id, b.name, c.until_time, c.consecutive_failures, c.reason, c.reported_by, c.create_time, c.model
         FROM cooldowns c JOIN backends b ON b.id = c.backend_id
         WHERE c.until_time > ?1 ORDER BY c.until_time",
    )?;
    let rows = stmt.query_map(params![now_ms], |r| {
        Ok(CooldownRow {
            backend_id: r.get(0)?,
            backend_name: r.get(1)?,
            until_ms: r.get(2)?,
            consecutive_failures: r.get(3)?,
            reason: r.get(4)?,
            reported_by: r.get(5)?,
            create_time_ms: r.get(6)?,
            model: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A backend's cooldown states: its own, and those of its models that differ from the
/// initial one, by model.
#[derive(Debug, Clone, Default)]
pub struct CooldownStates {
    pub backend: Cooldown,
    pub models: Vec<(String, Cooldown)>,
}

/// Every backend's cooldown states that differ from the initial one, by backend id.
pub(crate) fn load_cooldown_states(
    conn: &Connection,
) -> Result<std::collections::HashMap<String, CooldownStates>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT backend_id, epoch, consecutive_failures, until_time, create_time, changed_by, run_basis, reset_time, model
         FROM cooldowns ORDER BY backend_id, model",
    )?;
    let mut states = std::collections::HashMap::<String, CooldownStates>::new();
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let state = state_of(r)?;
        let model: String = r.get(8)?;
        let of = states.entry(r.get(0)?).or_default();
        match model.is_empty() {
            true => of.backend = state,
            false => of.models.push((model, state)),
        }
    }
    Ok(states)
}

fn load_state(
    tx: &Transaction<'_>,
    backend_id: &str,
    model: &str,
) -> Result<Option<Cooldown>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT backend_id, epoch, consecutive_failures, until_time, create_time, changed_by, run_basis, reset_time
             FROM cooldowns WHERE backend_id = ?1 AND model = ?2",
        )?
        .query_row(params![backend_id, model], state_of)
        .optional()?)
}

/// Whether the backend serves `model` (its name at the provider).
fn serves(tx: &Transaction<'_>, backend_id: &str, model: &str) -> Result<bool, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM backend_models WHERE backend_id = ?1 AND upstream_name = ?2)",
        )?
        .query_row(params![backend_id, model], |r| r.get(0))?)
}

/// Columns 1 to 7: epoch, streak, until, since (0 for none), changed_by, run_basis ('' for
/// none), reset_time (0 for none).
fn state_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Cooldown> {
    let time = |ms: i64| (ms > 0).then_some(UnixMs(ms));
    let changed_by: String = r.get(5)?;
    let run_basis = r.get::<_, i64>(6)?.max(0) as u64;
    Ok(Cooldown {
        epoch: r.get::<_, i64>(1)?.max(0) as u64,
        streak: r.get(2)?,
        until: time(r.get(3)?),
        since: time(r.get(4)?),
        run: (!changed_by.is_empty()).then_some((changed_by, run_basis)),
        reset_at: time(r.get(7)?),
    })
}

fn store_state(
    tx: &Transaction<'_>,
    backend_id: &str,
    model: &str,
    state: &Cooldown,
    reason: &str,
    reported_by: &str,
) -> Result<(), StoreError> {
    let time = |t: Option<UnixMs>| t.map_or(0, |t| t.0);
    let (changed_by, run_basis) = state.run.clone().unwrap_or_default();
    tx.prepare_cached(
        "INSERT INTO cooldowns (backend_id, epoch, consecutive_failures, until_time, create_time, reason, reported_by, changed_by, run_basis, model, reset_time)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (backend_id, model) DO UPDATE SET
             epoch = excluded.epoch,
             consecutive_failures = excluded.consecutive_failures,
             until_time = excluded.until_time,
             create_time = excluded.create_time,
             reason = excluded.reason,
             reported_by = excluded.reported_by,
             changed_by = excluded.changed_by,
             run_basis = excluded.run_basis,
             reset_time = excluded.reset_time",
    )?
    .execute(params![
        backend_id,
        i64::try_from(state.epoch).unwrap_or(i64::MAX),
        state.streak,
        time(state.until),
        time(state.since),
        reason,
        reported_by,
        changed_by,
        i64::try_from(run_basis).unwrap_or(i64::MAX),
        model,
        time(state.reset_at),
    ])?;
    Ok(())
}

impl CooldownRow {
    pub fn to_proto(&self) -> pb::Cooldown {
        pb::Cooldown {
            backend_id: self.backend_id.clone(),
            backend_name: self.backend_name.clone(),
            until: Some(crate::time::timestamp(self.until_ms)),
            consecutive_failures: self.consecutive_failures,
            reason: self.reason.clone(),
            create_time: Some(crate::time::timestamp(self.create_time_ms)),
            reported_by: self.reported_by.clone(),
            model: self.model.clone(),
        }
    }
}
