//! Client keys: what applications present to the data plane. Only a SHA-256 of
//! the key is stored; the plaintext exists once, in the `CreateClientKey` answer.

use rand::RngCore as _;
use sluice_proto::v1 as pb;

use crate::budget::BudgetPeriod;
use crate::validation::{
    ValidationError, canonical_name, check_model_name, check_name, check_tpm_limit, not_updatable,
};

const PREFIX: &str = "sk-sluice-";
/// Characters of the key kept (beside the hash) to tell keys apart in listings.
const SHOWN_PREFIX_LEN: usize = PREFIX.len() + 6;

/// Entries a key's `allowed_models` may have, as many as routes a backend may have: every
/// one goes into the snapshot each replica must accept.
pub const MAX_ALLOWED_MODELS: usize = 1_000;

/// A stored client key.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientKey {
    pub id: String,
    pub name: String,
    pub key_prefix: String,
    pub key_sha256: Vec<u8>,
    pub allowed_models: Vec<String>,
    pub rpm_limit: u32,
    pub revoked: bool,
    pub create_time_ms: i64,
    pub revoke_time_ms: Option<i64>,
    /// From this instant (Unix ms, the control plane's clock) the key is refused as expired.
    pub expire_time_ms: Option<i64>,
    /// Spend allowed per period in nano-units; 0 means no budget.
    pub max_budget_nanos: u64,
    pub budget_period: BudgetPeriod,
    /// Prompt + completion tokens per minute across all replicas; 0 means no limit.
    pub tpm_limit: u32,
    /// Requests in flight at once across all replicas; 0 means no limit.
    pub max_parallel_requests: u32,
}

/// The fields of a key an operator sets: what a create asks for, and what an update
/// changes (`apply_mask`) on a stored key's current values (`of`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewClientKey {
    pub name: String,
    pub allowed_models: Vec<String>,
    pub rpm_limit: u32,
    pub expire_time_ms: Option<i64>,
    pub max_budget_nanos: u64,
    pub budget_period: BudgetPeriod,
    pub tpm_limit: u32,
    pub max_parallel_requests: u32,
}

/// The largest budget, in the currency: far below where nano-units would overflow.
pub const MAX_BUDGET: f64 = 1e9;

/// The fields `UpdateClientKey` may change, as named in its `update_mask`.
pub const UPDATABLE_FIELDS: &[&str] = &[
    "name",
    "allowed_models",
    "rpm_limit",
    "expire_time",
    "max_budget",
    "budget_period",
    "tpm_limit",
    "max_parallel_requests",
];

/// The largest `max_parallel_requests`: more than any replica holds connections for.
pub const MAX_PARALLEL_REQUESTS: u32 = 1_000_000;

impl NewClientKey {
    /// The request, trimmed and checked; `now_ms` is the control plane's clock, which an
    /// `expire_time` must be after (a key born expired is a mistake, not a wish).
    pub fn validated(self, now_ms: i64) -> Result<Self, ValidationError> {
        check_expiry(self.expire_time_ms, now_ms)?;
        self.checked()
    }

    /// The name and models trimmed and checked (not the expiry: a stored key's expiry may
    /// have passed, and changing its name must not fail for that).
    pub fn checked(self) -> Result<Self, ValidationError> {
        self.checked_fields(|_| true)
    }

    /// `self` with the fields `paths` names (an update mask's) taken from `update`, and
    /// those fields checked; the others stay as they were written. A rule added since (a
    /// name may not look like an id) does not hold a change of another field hostage: a
    /// key stored before it can still be changed.
    pub fn updated(
        &self,
        update: &pb::ClientKey,
        paths: &[String],
        now_ms: i64,
    ) -> Result<Self, ValidationError> {
        let mut updated = self.clone();
        updated.apply_mask(update, paths, now_ms)?;
        updated.checked_fields(|field| paths.iter().any(|path| path == field))
    }

    /// [`Self::checked`] of the fields `checks` says, by their mask path.
    fn checked_fields(mut self, checks: impl Fn(&str) -> bool) -> Result<Self, ValidationError> {
        if checks("name") {
            self.name = canonical_name(&self.name);
            check_name("name", &self.name)?;
        }
        if checks("tpm_limit") {
            check_tpm_limit("tpm_limit", self.tpm_limit)?;
        }
        if checks("max_parallel_requests") && self.max_parallel_requests > MAX_PARALLEL_REQUESTS {
            return Err(ValidationError::new(
                "max_parallel_requests",
                format!("must be at most {MAX_PARALLEL_REQUESTS} (0 means no limit)"),
            ));
        }
        if !checks("allowed_models") {
            return Ok(self);
        }
        if self.allowed_models.len() > MAX_ALLOWED_MODELS {
            return Err(ValidationError::new(
                "allowed_models",
                format!("at most {MAX_ALLOWED_MODELS} models"),
            ));
        }
        let mut models = Vec::with_capacity(self.allowed_models.len());
        for (i, model) in self.allowed_models.iter().enumerate() {
            let model = model.trim();
            check_model_name(&format!("allowed_models[{i}]"), model)?;
            if !models.iter().any(|m: &String| m == model) {
                models.push(model.to_owned());
            }
        }
        self.allowed_models = models;
        Ok(self)
    }

    /// The settable fields of a stored key, as they are.
    pub fn of(key: &ClientKey) -> Self {
        Self {
            name: key.name.clone(),
            allowed_models: key.allowed_models.clone(),
            rpm_limit: key.rpm_limit,
            expire_time_ms: key.expire_time_ms,
            max_budget_nanos: key.max_budget_nanos,
            budget_period: key.budget_period,
            tpm_limit: key.tpm_limit,
            max_parallel_requests: key.max_parallel_requests,
        }
    }

    /// Copies the fields named in `paths` from `update`. An expiry set here must be in the
    /// future by `now_ms`, as at creation; an unset one clears it (the key never expires).
    pub fn apply_mask(
        &mut self,
        update: &pb::ClientKey,
        paths: &[String],
        now_ms: i64,
    ) -> Result<(), ValidationError> {
        for path in paths {
            match path.as_str() {
                "name" => self.name = update.name.clone(),
                "allowed_models" => self.allowed_models = update.allowed_models.clone(),
                "rpm_limit" => self.rpm_limit = update.rpm_limit,
                "expire_time" => {
                    self.expire_time_ms =
                        update.expire_time.as_ref().map(crate::time::timestamp_ms);
                    check_expiry(self.expire_time_ms, now_ms)?;
                }
                "max_budget" => self.max_budget_nanos = budget_nanos(update.max_budget)?,
                "budget_period" => {
                    self.budget_period = BudgetPeriod::from_proto(update.budget_period)?
                }
                "tpm_limit" => self.tpm_limit = update.tpm_limit,
                "max_parallel_requests" => {
                    self.max_parallel_requests = update.max_parallel_requests
                }
                other => return Err(not_updatable(other, UPDATABLE_FIELDS)),
            }
        }
        Ok(())
    }
}

/// A budget as the API gives it (currency), in nano-units.
pub fn budget_nanos(max_budget: f64) -> Result<u64, ValidationError> {
    if !max_budget.is_finite() || !(0.0..=MAX_BUDGET).contains(&max_budget) {
        return Err(ValidationError::new(
            "max_budget",
            format!("must be a number from 0 (no budget) to {MAX_BUDGET}"),
        ));
    }
    let nanos = sluice_domain::price::to_nanos(max_budget);
    // A budget too small for a nano-unit would be stored as 0, which means no budget at all:
    // the key meant to spend nearly nothing could spend without limit.
    if nanos == 0 && max_budget > 0.0 {
        return Err(ValidationError::new(
            "max_budget",
            "must be 0 (no budget) or at least 0.000000001",
        ));
    }
    Ok(nanos)
}

/// The latest expiry a key may have, 9999-12-31T23:59:59Z: the last second a protobuf
/// `Timestamp` can hold. Later ones could not be written back as one (the JSON API failed
/// every list that held such a key, `sluicectl` could not print it).
const LATEST_EXPIRY_MS: i64 = 253_402_300_799_000;

fn check_expiry(expire_time_ms: Option<i64>, now_ms: i64) -> Result<(), ValidationError> {
    match expire_time_ms {
        Some(expire) if expire <= now_ms => {
            Err(ValidationError::new("expire_time", "must be in the future"))
        }
        Some(expire) if expire > LATEST_EXPIRY_MS => Err(ValidationError::new(
            "expire_time",
            "must be no later than 9999-12-31T23:59:59Z",
        )),
        _ => Ok(()),
    }
}

/// A fresh key: `sk-sluice-` and 32 random bytes (256 bits) as lowercase hex.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{PREFIX}{}", hex::encode(bytes))
}

pub fn hash(key: &str) -> Vec<u8> {
    sluice_domain::auth::client_key_hash(key).to_vec()
}

pub fn shown_prefix(key: &str) -> String {
    key.chars().take(SHOWN_PREFIX_LEN).collect()
}

impl ClientKey {
    /// Whether the key has expired at `now_ms` (the control plane's clock).
    pub fn expired_at(&self, now_ms: i64) -> bool {
        self.expire_time_ms.is_some_and(|expire| expire <= now_ms)
    }

    /// The key as the admin API shows it at `now_ms`, having spent `spend_nanos` in the
    /// period holding `now_ms`.
    pub fn to_proto(&self, now_ms: i64, spend_nanos: u64) -> pb::ClientKey {
        use sluice_domain::price::from_nanos;
        pb::ClientKey {
            id: self.id.clone(),
            name: self.name.clone(),
            key_prefix: self.key_prefix.clone(),
            allowed_models: self.allowed_models.clone(),
            rpm_limit: self.rpm_limit,
            revoked: self.revoked,
            create_time: Some(crate::time::timestamp(self.create_time_ms)),
            revoke_time: self.revoke_time_ms.map(crate::time::timestamp),
            expire_time: self.expire_time_ms.map(crate::time::timestamp),
            expired: self.expired_at(now_ms),
            max_budget: from_nanos(self.max_budget_nanos),
            budget_period: self.budget_period.to_proto() as i32,
            spend: from_nanos(spend_nanos),
            remaining_budget: from_nanos(self.max_budget_nanos.saturating_sub(spend_nanos)),
            budget_reset_time: self
                .budget_period
                .period_of(now_ms)
                .map(|(_, end)| crate::time::timestamp(end)),
            tpm_limit: self.tpm_limit,
            max_parallel_requests: self.max_parallel_requests,
            // The grant engine's, not the store's: the admin API fills it in.
            held_by_data_planes: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::validation::MAX_TPM_LIMIT;

    #[test]
    fn keys_are_long_random_and_prefixed() {
        let a = generate();
        let b = generate();
        assert!(a.starts_with("sk-sluice-"));
        assert_eq!(a.len(), PREFIX.len() + 64);
        assert_ne!(a, b);
        assert_eq!(hash(&a).len(), 32);
        assert_eq!(shown_prefix(&a).len(), 16);
    }

    #[test]
    fn models_are_trimmed_and_deduplicated() {
        let k = NewClientKey {
            name: " team-a ".into(),
            allowed_models: vec!["gpt-4o".into(), " gpt-4o ".into()],
            rpm_limit: 0,
            expire_time_ms: None,
            ..NewClientKey::default()
        }
        .validated(0)
        .unwrap();
        assert_eq!(k.name, "team-a");
        assert_eq!(k.allowed_models, vec!["gpt-4o".to_owned()]);
        assert!(
            NewClientKey {
                name: "x".into(),
                allowed_models: vec!["a b".into()],
                rpm_limit: 0,
                expire_time_ms: None,
                ..Default::default()
            }
            .validated(0)
            .is_err()
        );
    }

    #[test]
    fn an_expiry_must_be_in_the_future() {
        let new = |expire_time_ms| NewClientKey {
            name: "team-a".into(),
            allowed_models: Vec::new(),
            rpm_limit: 0,
            expire_time_ms,
            ..NewClientKey::default()
        };
        let err = new(Some(1_000)).validated(1_000).unwrap_err();
        assert!(err.to_string().contains("expire_time"), "{err}");
        assert!(new(Some(1_001)).validated(1_000).is_ok());
        assert!(new(None).validated(1_000).is_ok());
    }

    #[test]
    fn token_and_parallel_limits_are_bounded_with_the_field_named() {
        let new = |tpm_limit, max_parallel_requests| NewClientKey {
            name: "team-a".into(),
            tpm_limit,
            max_parallel_requests,
            ..NewClientKey::default()
        };
        assert!(
            new(MAX_TPM_LIMIT, MAX_PARALLEL_REQUESTS)
                .validated(0)
                .is_ok()
        );
        let err = new(MAX_TPM_LIMIT + 1, 0).validated(0).unwrap_err();
        assert!(err.to_string().contains("tpm_limit"), "{err}");
        let err = new(0, MAX_PARALLEL_REQUESTS + 1).validated(0).unwrap_err();
        assert!(err.to_string().contains("max_parallel_requests"), "{err}");
    }

    /// A positive budget smaller than a nano-unit is refused, not stored as 0 ("no budget");
    /// the smallest that is one is taken.
    #[test]
    fn a_budget_below_a_nano_unit_is_refused_not_made_unlimited() {
        for tiny in [1e-10, 4e-10, f64::MIN_POSITIVE] {
            let err = budget_nanos(tiny).unwrap_err();
            assert_eq!(err.field, "max_budget", "{tiny}");
        }
        assert_eq!(budget_nanos(0.0).unwrap(), 0);
        assert_eq!(budget_nanos(1e-9).unwrap(), 1);
        assert_eq!(budget_nanos(2.5).unwrap(), 2_500_000_000);
    }
}
