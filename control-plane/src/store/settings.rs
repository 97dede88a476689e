//! The routing settings: one row holding the whole `Settings` message as JSON; fields a
//! row lacks (written by an older version) come from the defaults.

use rusqlite::{Connection, OptionalExtension as _, params};
use sluice_proto::v1 as pb;

use super::{Reader, Store, StoreError, WriteOp, bump_version};
use crate::validation::ValidationError;

impl Store {
    /// The settings, read on the admin reads' connection: every statistics call reads the
    /// currency, which on the writer waited behind each group commit and retention batch.
    pub async fn get_settings(&self) -> Result<pb::Settings, StoreError> {
        self.read(Reader::Admin, |conn, _| load_settings(conn))
            .await
    }

    pub async fn put_settings(&self, settings: pb::Settings) -> Result<u64, StoreError> {
        self.update_settings(move |_| Ok(settings))
            .await
            .map(|(_, version)| version)
    }

    /// Replaces the settings with what `change` makes of the current ones, read in the same
    /// write transaction: two changes at once each see the other's (a read, then a separate
    /// write, let the later writer put back what the earlier had changed). Returns the new
    /// settings and the snapshot version that carries them.
    pub async fn update_settings<F>(&self, change: F) -> Result<(pb::Settings, u64), StoreError>
    where
        F: FnOnce(&pb::Settings) -> Result<pb::Settings, ValidationError> + Send + 'static,
    {
        self.write(WriteOp::admin, move |conn, _| {
            let tx = conn.transaction()?;
            let next = change(&load_settings(&tx)?)?;
            crate::settings::validate(&next)?;
            let body = serde_json::to_string(&next).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "INSERT INTO settings (id, body) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                params![body],
            )?;
            let version = bump_version(&tx)?;
            tx.commit()?;
            Ok((next, version))
        })
        .await
    }
}

pub(crate) fn load_settings(conn: &Connection) -> Result<pb::Settings, StoreError> {
    let body: Option<String> = conn
        .query_row("SELECT body FROM settings WHERE id = 1", [], |r| r.get(0))
        .optional()?;
    match body {
        None => Ok(sluice_domain::settings::defaults()),
        Some(body) => Ok(sluice_domain::settings::with_defaults(stored_settings(
            &body,
        )?)),
    }
}

/// The stored row's settings. A member this version does not know (one a newer version
/// wrote, before a rollback or a restore of its backup) is left out with a warning rather than
/// refused: this version cannot apply it anyway, and refusing stopped the control plane from
/// starting ("stored data is corrupt"). The next change of the settings writes the row without
/// it.
fn stored_settings(body: &str) -> Result<pb::Settings, StoreError> {
    use serde::Deserialize as _;
    let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("settings: {e}"));
    let mut stored: serde_json::Value = serde_json::from_str(body).map_err(|e| corrupt(&e))?;
    loop {
        let error = match pb::Settings::deserialize(&stored) {
            Ok(settings) => return Ok(settings),
            Err(e) => e,
        };
        let removed = unknown_member(&error.to_string()).and_then(|member| {
            let value = stored.as_object_mut()?.remove(&member)?;
            Some((member, value))
        });
        let Some((member, _)) = removed else {
            return Err(corrupt(&error));
        };
        tracing::warn!(
            %member,
            "the stored settings have a member this version does not know (written by a newer version?): ignored"
        );
    }
}

/// The member serde's "unknown field `name`, expected …" error names.
fn unknown_member(error: &str) -> Option<String> {
    let rest = error.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A row a newer version wrote, with a member this one does not know, is read (the
    /// member left out), not refused as corrupt: a rollback or a restored backup of a newer
    /// version otherwise kept the control plane from starting. A row that is not settings at
    /// all is still refused.
    #[test]
    fn a_member_a_newer_version_wrote_is_left_out() {
        let settings =
            stored_settings(r#"{"maxAttempts":4,"someFutureSetting":{"a":1},"currency":"EUR"}"#)
                .unwrap();
        assert_eq!(settings.max_attempts, 4);
        assert_eq!(settings.currency, "EUR");
        assert!(matches!(
            stored_settings(r#"{"maxAttempts":"four"}"#),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            stored_settings("[1]"),
            Err(StoreError::Corrupt(_))
        ));
    }

    /// A statistics call reads the currency first: it does not wait for the one writer (a
    /// group commit of usage, a retention batch).
    #[tokio::test]
    async fn reading_the_settings_does_not_wait_for_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(
            &dir.path().join("t.db"),
            crate::crypto::MasterKey::generate(),
        )
        .unwrap();
        let mut settings = store.get_settings().await.unwrap();
        settings.currency = "EUR".into();
        store.put_settings(settings).await.unwrap();
        let write = crate::store::Held::hold(&store, None).await;
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), store.get_settings())
            .await
            .expect("the settings read waited for the writer")
            .unwrap();
        assert_eq!(read.currency, "EUR");
        write.release().await;
    }
}
