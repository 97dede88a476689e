//! What an attempt at a backend showed of its health, recorded for the backend's cooldown: at
//! once for a whole answer or a failure ([`record_health`]), at its end for a stream
//! ([`StreamHealth`]), which the attempt hands to the stream's relay.

use std::sync::Arc;

use sluice_domain::cooldown::CooldownPolicy;

use super::AppState;
use crate::cooldown::{self, Outcome};
use crate::metrics::{CooldownReason, Label};
use crate::snapshot::Backend;

/// Records what an attempt showed of its backend's health for its cooldown, and reports a
/// change of the backend's state.
pub(super) fn record_health(
    app: &AppState,
    backend: &Backend,
    model: &str,
    basis: cooldown::Basis,
    policy: &CooldownPolicy,
    health: Outcome,
) {
    record_health_of(
        app,
        &backend.id,
        &backend.name,
        model,
        basis,
        policy,
        health,
    );
}

fn record_health_of(
    app: &AppState,
    backend_id: &str,
    backend_name: &Arc<str>,
    model: &str,
    basis: cooldown::Basis,
    policy: &CooldownPolicy,
    health: Outcome,
) {
    let answered = || app.store.clock().now();
    let events = app
        .store
        .cooldowns()
        .record_at(backend_id, model, basis, policy, health, answered);
    for event in events {
        // The model's own state, or the backend's (for every model).
        let model = (!event.model.is_empty()).then_some(event.model.as_str());
        match health {
            Outcome::Success | Outcome::Answering => match model {
                Some(model) => tracing::info!(
                    backend = %backend_name,
                    model,
                    "backend answered the model again: the model's streak ends"
                ),
                None => {
                    tracing::info!(backend = %backend_name, "backend answered again: its streak ends")
                }
            },
            Outcome::RateLimited { .. } | Outcome::Failure { .. } => {
                match model {
                    Some(model) => tracing::warn!(
                        backend = %backend_name,
                        model,
                        reason = %event.reason,
                        streak = event.consecutive_failures,
                        "model cooling down at the backend (its other models are still served)"
                    ),
                    None => tracing::warn!(
                        backend = %backend_name,
                        reason = %event.reason,
                        streak = event.consecutive_failures,
                        "backend cooling down"
                    ),
                }
                let reason = match health {
                    Outcome::RateLimited { .. } => CooldownReason::rate_limited,
                    _ => CooldownReason::failures,
                };
                app.metrics.cooldown(&Label::from(backend_name), reason);
            }
        }
        app.usage.event(event);
    }
}

/// What a stream's end says of its backend's health, recorded then ([`record_health`]): a
/// failure when the upstream broke it (cut, silent, an event that cannot be read, its own
/// error event), a success when it ended or its client left; nothing when the request's
/// deadline or this replica's stop ended it.
pub(super) struct StreamHealth {
    app: Arc<AppState>,
    backend_id: String,
    backend_name: Arc<str>,
    /// The model's name at the provider.
    model: String,
    basis: cooldown::Basis,
    policy: CooldownPolicy,
}

impl StreamHealth {
    pub(super) fn new(
        app: &Arc<AppState>,
        backend: &Backend,
        model: &str,
        basis: cooldown::Basis,
        policy: CooldownPolicy,
    ) -> Self {
        Self {
            app: Arc::clone(app),
            backend_id: backend.id.clone(),
            backend_name: Arc::clone(&backend.name),
            model: model.to_owned(),
            basis,
            policy,
        }
    }

    /// The stream's first event came after it was committed (`--stream-keepalive`): its
    /// backend answers, as an attempt's first event says, and the stream's end is judged at
    /// the state that leaves (see `forward_call`).
    pub(super) fn answering(&mut self) {
        self.note(Outcome::Answering);
        let now = self.app.store.clock().now().instant;
        self.basis =
            self.app
                .store
                .cooldowns()
                .restate(&self.backend_id, &self.model, self.basis, now);
    }

    /// The stream ended: `health` is how. A failure after the first event is counted apart
    /// (`sluice_streams_interrupted_total`): the attempt was counted `ok` at that event, and a
    /// backend breaking some of its streams, never `failure_threshold` in a row, looked
    /// healthy in every metric.
    pub(super) fn record(self, health: Outcome) {
        if matches!(health, Outcome::Failure { .. }) {
            self.app
                .metrics
                .stream_interrupted(&crate::metrics::Label::from(&self.backend_name));
        }
        self.note(health);
    }

    fn note(&self, health: Outcome) {
        record_health_of(
            &self.app,
            &self.backend_id,
            &self.backend_name,
            &self.model,
            self.basis,
            &self.policy,
            health,
        );
    }
}
