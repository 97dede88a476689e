//! The control plane's SQLite database: one file in WAL mode, one writer
//! connection. Every change that alters what data planes route by bumps the
//! snapshot version in the same transaction.

mod backends;
mod client_keys;
mod cooldowns;
mod data_planes;
mod usage;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, Transaction, params};
use rusqlite_migration::{M, Migrations};

use crate::crypto::{CryptoError, MasterKey};
use crate::metrics::{Metrics, WriteOp};
use crate::validation::ValidationError;

pub use crate::usage::UsageRow;
pub use backends::BackendWithKey;
pub use cooldowns::{CooldownEvent, CooldownRow};
pub use data_planes::{DataPlaneRow, NodeHello};
pub use usage::{Granularity, GroupBy, SeriesPoint, Totals, TotalsFilter, UsageBatch};

/// Everything that can go wrong in the store, each mapped once to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    AlreadyExists(String),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(
        "the master key does not match this database (its provider keys were encrypted with another key); \
         give the right SLUICE_MASTER_KEY or --master-key-file"
    )]
    WrongMasterKey,
    #[error("stored provider key of backend {0} cannot be decrypted")]
    Undecryptable(String),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("encryption failed: {0}")]
    Crypto(#[from] CryptoError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store task failed")]
    Join,
}

impl From<StoreError> for tonic::Status {
    fn from(err: StoreError) -> Self {
        match &err {
            StoreError::NotFound { .. } => tonic::Status::not_found(err.to_string()),
            StoreError::AlreadyExists(_) => tonic::Status::already_exists(err.to_string()),
            StoreError::Invalid(_) => tonic::Status::invalid_argument(err.to_string()),
            _ => {
                tracing::error!(error = %err, "store failure");
                tonic::Status::internal("internal storage error; see the control plane's log")
            }
        }
    }
}

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_initial.sql"),
    include_str!("../../migrations/0002_usage_daily.sql"),
    include_str!("../../migrations/0003_usage_daily_by_backend.sql"),
];

/// A handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The one writer. Every change goes through it, one transaction at a time.
    conn: Mutex<Connection>,
    /// Read-only connections, so reads never queue behind a write's fsync (WAL lets
    /// readers and the writer run at once).
    readers: [Mutex<Connection>; 2],
    key: MasterKey,
    metrics: Arc<Metrics>,
}

/// Which read-only connection a read uses. Snapshot builds get their own, so a
/// cooldown reaches the data planes without waiting for a long stats query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reader {
    Snapshot = 0,
    Queries = 1,
}

/// What [`Store::open`] found about the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The file was created now, and the master key check written.
    Created,
    Existing,
}

impl Store {
    /// Opens (creating if needed) the database at `path`, applies migrations and
    /// checks that `key` is the master key the database was written with.
    pub fn open(path: &Path, key: MasterKey) -> Result<(Self, Opened), StoreError> {
        let mut conn = Connection::open(path)?;
        configure(&conn)?;
        crate::usage::register_sql_functions(&conn)?;
        Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect()).to_latest(&mut conn)?;
        let opened = verify_or_write_check(&mut conn, &key)?;
        let readers = [open_reader(path)?, open_reader(path)?];
        Ok((
            Self {
                inner: Arc::new(Inner {
                    conn: Mutex::new(conn),
                    readers: readers.map(Mutex::new),
                    key,
                    metrics: Arc::new(Metrics::new()),
                }),
            },
            opened,
        ))
    }

    /// Runs `f` on the connection in a blocking task.
    pub(crate) async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &MasterKey) -> Result<T, StoreError> + Send + 'static,
    {
        self.on_writer(None, f).await
    }

    /// Runs the write transaction `f` on the writer like [`Store::call`], and records how
    /// long it held the connection in `sluice_sqlite_write_seconds{op}`.
    pub(crate) async fn write<T, F>(&self, op: WriteOp, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &MasterKey) -> Result<T, StoreError> + Send + 'static,
    {
        self.on_writer(Some(op), f).await
    }

    async fn on_writer<T, F>(&self, op: Option<WriteOp>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &MasterKey) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock leaves no half-written state behind:
            // an open transaction rolls back when dropped.
            let mut conn = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
            let started = std::time::Instant::now();
            let result = f(&mut conn, &inner.key);
            if let Some(op) = op {
                inner.metrics.write(op, started.elapsed());
            }
            result
        })
        .await
        .map_err(|_| StoreError::Join)?
    }

    /// The control plane's metrics (the store records its writes there).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Runs `f` on one of the read-only connections in a blocking task. It sees the
    /// last committed state and cannot write.
    pub(crate) async fn read<T, F>(&self, reader: Reader, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &MasterKey) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.readers[reader as usize]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            f(&mut conn, &inner.key)
        })
        .await
        .map_err(|_| StoreError::Join)?
    }

    /// The newest committed snapshot version.
    pub async fn snapshot_version(&self) -> Result<u64, StoreError> {
        self.call(|conn, _| Ok(read_version(conn)?)).await
    }

    /// Bumps the snapshot version without another change (e.g. a replica joined,
    /// which changes every replica's RPM share).
    pub async fn bump_version(&self) -> Result<u64, StoreError> {
        self.write(WriteOp::data_plane, |conn, _| {
            let tx = conn.transaction()?;
            let v = bump_version(&tx)?;
            tx.commit()?;
            Ok(v)
        })
        .await
    }

    /// Re-encrypts every provider key under `new_key` in one transaction and
    /// replaces the check value. Returns how many keys were re-encrypted.
    pub fn rotate_master_key(
        path: &Path,
        old: &MasterKey,
        new: &MasterKey,
    ) -> Result<usize, StoreError> {
        let mut conn = Connection::open(path)?;
        configure(&conn)?;
        verify_or_write_check(&mut conn, old)?;
        let tx = conn.transaction()?;
        let rows: Vec<(String, Vec<u8>)> = {
            let mut stmt = tx.prepare(
                "SELECT id, api_key_ciphertext FROM backends WHERE api_key_ciphertext IS NOT NULL",
            )?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?
        };
        for (id, sealed) in &rows {
            let plain = old
                .decrypt(sealed, id.as_bytes())
                .map_err(|_| StoreError::Undecryptable(id.clone()))?;
            let resealed = new.encrypt(&plain, id.as_bytes())?;
            tx.execute(
                "UPDATE backends SET api_key_ciphertext = ?1 WHERE id = ?2",
                params![resealed, id],
            )?;
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'master_key_check'",
            params![new.make_check()?],
        )?;
        bump_version(&tx)?;
        tx.commit()?;
        Ok(rows.len())
    }
}

fn configure(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: an acked usage batch survives power loss, not just a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// A read-only connection to the database the writer has already opened (and so
/// migrated and switched to WAL).
fn open_reader(path: &Path) -> Result<Connection, rusqlite::Error> {
    use rusqlite::OpenFlags;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    crate::usage::register_sql_functions(&conn)?;
    Ok(conn)
}

fn verify_or_write_check(conn: &mut Connection, key: &MasterKey) -> Result<Opened, StoreError> {
    let check: Option<Vec<u8>> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'master_key_check'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    match check {
        Some(check) if key.verify_check(&check) => Ok(Opened::Existing),
        Some(_) => Err(StoreError::WrongMasterKey),
        None => {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('master_key_check', ?1)",
                params![key.make_check()?],
            )?;
            Ok(Opened::Created)
        }
    }
}

/// Read access for the snapshot builder, which reads everything in one transaction.
pub(crate) fn read_version_in(conn: &Connection) -> Result<u64, StoreError> {
    Ok(read_version(conn)?)
}
pub(crate) use backends::load_enabled_with_keys as load_enabled_with_keys_in;
pub(crate) use client_keys::load_keys as load_keys_in;
pub(crate) use cooldowns::{
    load_active_cooldowns as load_active_cooldowns_in, load_settings as load_settings_in,
};

fn read_version(conn: &Connection) -> Result<u64, rusqlite::Error> {
    conn.query_row(
        "SELECT value FROM meta WHERE key = 'snapshot_version'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|v| v.max(0) as u64)
}

/// Increments and returns the snapshot version inside `tx`.
pub(crate) fn bump_version(tx: &Transaction<'_>) -> Result<u64, rusqlite::Error> {
    tx.query_row(
        "UPDATE meta SET value = value + 1 WHERE key = 'snapshot_version' RETURNING value",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|v| v.max(0) as u64)
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Maps a unique-constraint failure to `AlreadyExists` with `message`.
fn unique_violation(err: rusqlite::Error, message: impl FnOnce() -> String) -> StoreError {
    match &err {
        rusqlite::Error::SqliteFailure(e, _)
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            StoreError::AlreadyExists(message())
        }
        _ => StoreError::Sqlite(err),
    }
}
