//! The control plane's SQLite database: one file in WAL mode, one writer
//! connection. Every change that alters what data planes route by bumps the
//! snapshot version in the same transaction, and the store announces each committed
//! version on a `watch` channel ([`Store::commits`]), so no caller has to.
//!
//! The store knows nothing of gRPC, metrics or snapshots: it returns domain types and
//! [`StoreError`], and reports the time its writes take to the [`StoreObserver`] it was
//! opened with.

mod affinity_keys;
mod backends;
pub mod backup;
mod client_keys;
mod cooldowns;
mod data_planes;
mod key_spend;
mod settings;
pub mod sql_functions;
mod usage;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension as _, Transaction, TransactionBehavior, params};
use rusqlite_migration::{M, Migrations};
use tokio::sync::watch;

use crate::crypto::{CryptoError, MasterKey};
use crate::validation::ValidationError;

pub use crate::usage::UsageRow;
pub use backends::BackendWithKey;
pub use cooldowns::{Cooldown, CooldownEvent, CooldownRow, Reported};
pub use data_planes::{DataPlaneRow, NodeHello};
pub use usage::{
    Cursor, Granularity, GroupBy, GroupPage, Order, OutOfOrder, Page, SeriesPoint, Totals,
    TotalsFilter, UsageBatch,
};

/// Everything that can go wrong in the store (mapped to a gRPC status once, in `api::status`).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // What an error quotes from a request is cut (`quoted`): a status quoting a pasted file
    // whole passed the 16 KiB of headers a gRPC client accepts (tonic sends it as a header),
    // and the client reported a transport error instead of the refusal.
    #[error("{kind} {:?} not found", sluice_domain::text::quoted(id))]
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
    Migration(String),
    #[error("encryption failed: {0}")]
    Crypto(#[from] CryptoError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A conditional change found the record changed since the caller read it.
    #[error("{0}")]
    Changed(String),
    #[error("store task failed")]
    Join,
}

impl StoreError {
    /// Whether the fault is the caller's (a missing or duplicate name, invalid input)
    /// rather than the store's own.
    pub fn is_caller_error(&self) -> bool {
        matches!(
            self,
            StoreError::NotFound { .. }
                | StoreError::AlreadyExists(_)
                | StoreError::Invalid(_)
                | StoreError::Changed(_)
        )
    }
}

/// The database file inside the data directory.
pub const DB_FILE: &str = "sluice.db";

/// What a timed write transaction did.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum WriteOp {
    /// A group commit of usage batches.
    usage_ingest,
    /// Cooldowns reported by data planes, or reset.
    cooldown,
    /// Backends, client keys, settings.
    admin,
    /// Data-plane connects, acks, last-seen times, snapshot versions.
    data_plane,
    /// Deleting expired hourly usage.
    retention,
}

impl WriteOp {
    pub const ALL: [WriteOp; 5] = [
        WriteOp::usage_ingest,
        WriteOp::cooldown,
        WriteOp::admin,
        WriteOp::data_plane,
        WriteOp::retention,
    ];

    /// The name of the kind of write, as logs and metrics show it.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteOp::usage_ingest => "usage_ingest",
            WriteOp::cooldown => "cooldown",
            WriteOp::admin => "admin",
            WriteOp::data_plane => "data_plane",
            WriteOp::retention => "retention",
        }
    }
}

/// Told what the store did, for whoever measures it (the metrics). Called on the blocking
/// thread that ran the write, so it must be quick.
pub trait StoreObserver: Send + Sync + 'static {
    /// A write transaction of kind `op` held the writer for `took` (commit and fsync included).
    fn write(&self, op: WriteOp, took: Duration);
    /// A write transaction of kind `op` failed in SQLite (the volume full, the disk failing):
    /// nothing of it was stored. Not counted as a write.
    fn write_failed(&self, op: WriteOp);
    /// A transaction committed `records` new usage records (resent duplicates not counted).
    fn usage_committed(&self, records: u64);
    /// `records` usage records arrived with a value past its bound and are stored with a
    /// placeholder instead (see `UsageRow::clamp_to_bounds`).
    fn usage_clamped(&self, records: u64);
}

/// The observer of a store nobody measures.
struct Unobserved;

impl StoreObserver for Unobserved {
    fn write(&self, _: WriteOp, _: Duration) {}
    fn write_failed(&self, _: WriteOp) {}
    fn usage_committed(&self, _: u64) {}
    fn usage_clamped(&self, _: u64) {}
}

/// One readable line for a migration that failed, from the database's schema `at`
/// (`PRAGMA user_version`): rusqlite_migration's own text is its `Debug`, which prints the
/// whole migration file on the line, or does not say that the database is a newer build's.
fn migration_failed(error: rusqlite_migration::Error, at: i64) -> StoreError {
    use rusqlite_migration::{Error, MigrationDefinitionError};
    StoreError::Migration(match error {
        Error::MigrationDefinition(MigrationDefinitionError::DatabaseTooFarAhead) => format!(
            "this database was migrated by a newer sluice-control (its schema is {at}, this \
             build knows {}): run that version, or restore the backup taken before the upgrade",
            MIGRATIONS.len()
        ),
        Error::RusqliteError { err, .. } => {
            format!("the migrations after schema {at} failed, none applied: {err}")
        }
        other => other.to_string(),
    })
}

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_initial.sql"),
    include_str!("../../migrations/0002_usage_daily.sql"),
    include_str!("../../migrations/0003_usage_daily_by_backend.sql"),
    include_str!("../../migrations/0004_replica_shares.sql"),
    include_str!("../../migrations/0005_cooldown_epoch.sql"),
    include_str!("../../migrations/0006_client_key_expiry.sql"),
    include_str!("../../migrations/0007_usage_hourly_pool.sql"),
    include_str!("../../migrations/0008_affinity_keys.sql"),
    include_str!("../../migrations/0009_usage_token_details.sql"),
    include_str!("../../migrations/0010_key_budgets.sql"),
    include_str!("../../migrations/0011_backend_responses_api.sql"),
    include_str!("../../migrations/0012_backend_api_format.sql"),
    include_str!("../../migrations/0013_token_limits.sql"),
    include_str!("../../migrations/0014_deleted_backends.sql"),
    include_str!("../../migrations/0015_cache_writes.sql"),
    include_str!("../../migrations/0016_key_spend_total.sql"),
    include_str!("../../migrations/0017_client_key_order.sql"),
    include_str!("../../migrations/0018_database_id.sql"),
    include_str!("../../migrations/0019_model_cooldowns.sql"),
    include_str!("../../migrations/0020_snapshot_key_index.sql"),
    include_str!("../../migrations/0021_backend_key_header.sql"),
    include_str!("../../migrations/0022_price_tiers.sql"),
    include_str!("../../migrations/0023_long_context.sql"),
    include_str!("../../migrations/0024_call_prices.sql"),
    include_str!("../../migrations/0025_audio_prices.sql"),
    include_str!("../../migrations/0026_audio_usage.sql"),
    include_str!("../../migrations/0027_estimated_count.sql"),
    include_str!("../../migrations/0028_max_output_tokens.sql"),
    include_str!("../../migrations/0029_cooldown_reset_time.sql"),
];

/// A handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

// Fields are dropped in the order they are declared, and the order matters: the readers
// close before the writer. The last connection to close checkpoints the WAL into `sluice.db`
// and deletes it, and only one that can write can; with a reader left open (any that had
// read) the writer closed first could not, and a stopped control plane left its last commits
// in `sluice.db-wal` alone: a copy of `sluice.db` without it lacked them, the master key's
// check among them for a young database.
struct Inner {
    /// Read-only connections, so reads never queue behind a write's fsync (WAL lets
    /// readers and the writer run at once).
    readers: [Mutex<Connection>; 4],
    /// The one writer. Every change goes through it, one transaction at a time.
    conn: Mutex<Connection>,
    key: MasterKey,
    observer: Arc<dyn StoreObserver>,
    /// The newest committed snapshot version.
    commits: watch::Sender<u64>,
    /// The data directory's lock ([`Store::hold_lock`]), released with the last handle.
    lock: Mutex<Option<std::fs::File>>,
}

/// Which read-only connection a read uses. Snapshot builds get their own, so a
/// cooldown reaches the data planes without waiting for a long stats query; so do the
/// allowance engine's budget reads, which it makes holding the engine (every grant, ingest
/// and ack of every replica waits for them), so that a stats query of seconds does not stall
/// usage and turn replicas' asks into 503 `budget_unavailable`; and so do admin reads (lists
/// of keys, backends, cooldowns, replicas, as the dashboard polls them), which held the
/// writer (usage commits, cooldowns behind them) for a scan of every key, and would wait
/// for a stats query on the reader of queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reader {
    Snapshot = 0,
    Queries = 1,
    Budgets = 2,
    Admin = 3,
}

/// What [`Store::open`] found about the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// The file was created now, and the master key check written.
    Created,
    Existing,
}

/// Where SQLite writes the temporary files of large sorts and temporary tables (ordering
/// every key for a snapshot, grouping statistics, building an index): `dir`, made if missing
/// and private to this user, for the whole process. SQLite's own choice is `TMPDIR`,
/// `/var/tmp`, `/tmp` or the working directory, whichever is writable, and on a read-only root
/// filesystem (the shipped Kubernetes manifests) none is: every sort past about 2 MB failed
/// with `disk I/O error`, 20,000 keys' snapshot among them. The setting is the process's and
/// not safe to change while databases are open: called once, by the binary, before any is.
pub fn keep_temp_files_in(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let path = dir
        .to_str()
        .ok_or_else(|| std::io::Error::other("the path is not UTF-8"))?;
    rusqlite::Connection::open_in_memory()
        .and_then(|conn| {
            conn.execute_batch(&format!(
                "PRAGMA temp_store_directory = '{}'",
                path.replace('\'', "''")
            ))
        })
        .map_err(std::io::Error::other)
}

impl Store {
    /// Opens (creating if needed) the database at `path`, applies migrations and
    /// checks that `key` is the master key the database was written with.
    pub fn open(path: &Path, key: MasterKey) -> Result<(Self, Opened), StoreError> {
        Self::open_observed(path, key, Arc::new(Unobserved))
    }

    /// [`Store::open`], reporting every write to `observer`.
    pub fn open_observed(
        path: &Path,
        key: MasterKey,
        observer: Arc<dyn StoreObserver>,
    ) -> Result<(Self, Opened), StoreError> {
        let mut conn = Connection::open(path)?;
        configure(&conn)?;
        sql_functions::register(&conn)?;
        let before: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        // A wrong master key is refused before any migration runs: refused after, it left the
        // database at a version the binary rolled back to could no longer open.
        if before > 0 {
            let check: Option<Vec<u8>> = conn
                .query_row(
                    "SELECT value FROM meta WHERE key = 'master_key_check'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            if check.is_some_and(|check| !key.verify_check(&check)) {
                return Err(StoreError::WrongMasterKey);
            }
        }
        Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect())
            .to_latest(&mut conn)
            .map_err(|e| migration_failed(e, before))?;
        let after: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if after != before {
            // The migrations ran in one transaction, every page it wrote in the WAL (those that
            // rebuild the usage tables: about their size again). Checkpointed and truncated
            // now, the file gives that space back rather than keep it until the process ends.
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        }
        let opened = verify_or_write_check(&conn, &key)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if affinity_keys::ensure_active(&tx, &key)? {
            tracing::info!("created the first affinity key (it signs Responses API ids)");
        }
        tx.commit()?;
        let version = read_version(&conn)?;
        let readers = [
            open_reader(path)?,
            open_reader(path)?,
            open_reader(path)?,
            open_reader(path)?,
        ];
        Ok((
            Self {
                inner: Arc::new(Inner {
                    conn: Mutex::new(conn),
                    readers: readers.map(Mutex::new),
                    key,
                    observer,
                    commits: watch::Sender::new(version),
                    lock: Mutex::new(None),
                }),
            },
            opened,
        ))
    }

    /// The newest committed snapshot version, announced after every write transaction
    /// that bumped it (bursts may coalesce: a receiver sees the newest, never an older one).
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.inner.commits.subscribe()
    }

    /// The newest committed snapshot version (what [`Store::commits`] last announced).
    pub fn committed_version(&self) -> u64 {
        *self.inner.commits.borrow()
    }

    /// Runs `f` on the connection in a blocking task.
    pub(crate) async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &MasterKey) -> Result<T, StoreError> + Send + 'static,
    {
        self.on_writer(None, f).await
    }

    /// Runs the write transaction `f` on the writer like [`Store::call`], tells the observer
    /// how long it held the connection, and announces a new snapshot version if `f`
    /// committed one.
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
            log_failure(&result);
            if let Some(op) = op {
                if matches!(result, Err(StoreError::Sqlite(_))) {
                    inner.observer.write_failed(op);
                } else {
                    inner.observer.write(op, started.elapsed());
                }
                if result.is_ok()
                    && let Err(err) = announce_version(&conn, &inner.commits)
                {
                    // The change is committed but its version unread: wake the publisher all
                    // the same, which reads the version with the rest of its next snapshot.
                    // (Left for the next commit, a revocation or an expiry could wait for
                    // one that never comes.)
                    tracing::error!(error = %err, "cannot read the committed snapshot version; rebuilding the snapshot all the same");
                    inner.commits.send_modify(|_| {});
                }
            }
            result
        })
        .await
        .map_err(|_| StoreError::Join)?
    }

    /// Keeps `lock` (the data directory's, held) until the last handle on this store is gone:
    /// every write queued for the writer holds a handle, so the directory stays locked until
    /// the last of them committed. Held by the server's handle instead, it was released when
    /// the server stopped, while a write stuck behind a slow one could still commit: a
    /// `rotate-master-key` run in between would have had it seal a provider key with the old
    /// master key, and the next start fail to decrypt it.
    pub fn hold_lock(&self, lock: std::fs::File) {
        *self.inner.lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(lock);
    }

    /// Tells the observer that a transaction committed `records` new usage records.
    fn usage_committed(&self, records: u64) {
        self.inner.observer.usage_committed(records);
    }

    /// Tells the observer that `records` usage records had a value clamped to its bound.
    fn usage_clamped(&self, records: u64) {
        self.inner.observer.usage_clamped(records);
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
            let result = f(&mut conn, &inner.key);
            log_failure(&result);
            result
        })
        .await
        .map_err(|_| StoreError::Join)?
    }

    /// The newest committed snapshot version.
    pub async fn snapshot_version(&self) -> Result<u64, StoreError> {
        self.call(|conn, _| Ok(read_version(conn)?)).await
    }

    /// Whether `key` is the master key the database at `path` was encrypted with (any key
    /// is, for a database that holds no check value yet). Reads only.
    pub fn master_key_fits(path: &Path, key: &MasterKey) -> Result<bool, StoreError> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let check: Option<Vec<u8>> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'master_key_check'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(check.is_none_or(|check| key.verify_check(&check)))
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
        // Take the write lock before reading: a deferred transaction that reads first
        // fails at once with SQLITE_BUSY if another connection is writing when it
        // upgrades, whereas waiting for the lock honours the busy timeout.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        verify_or_write_check(&tx, old)?;
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
        affinity_keys::reencrypt(&tx, old, new)?;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'master_key_check'",
            params![new.make_check()?],
        )?;
        bump_version(&tx)?;
        tx.commit()?;
        Ok(rows.len())
    }
}

/// Logs a failure of the store itself (with its cause, which callers are not told).
fn log_failure<T>(result: &Result<T, StoreError>) {
    if let Err(err) = result
        && !err.is_caller_error()
    {
        tracing::error!(error = %err, "store failure");
    }
}

fn configure(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: an acked usage batch survives power loss, not just a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Deleted content is zeroed in the pages written anyway: a sealed provider key the
    // database no longer holds (a deleted backend's, one sealed again under a new master key)
    // does not stay in the file's free space, where backups copy it.
    conn.pragma_update(None, "secure_delete", "FAST")?;
    // A WAL grown by a large transaction (a retention sweep, a migration) is cut back to this
    // at its next reset instead of keeping its largest size on disk.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
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
    sql_functions::register(&conn)?;
    Ok(conn)
}

fn verify_or_write_check(conn: &Connection, key: &MasterKey) -> Result<Opened, StoreError> {
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

/// The database's identity (migration 18), which snapshots carry.
pub(crate) fn database_id_in(conn: &Connection) -> Result<String, StoreError> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'database_id'")?
        .query_row([], |r| r.get::<_, String>(0))?)
}
pub(crate) use affinity_keys::load_active as load_affinity_keys_in;
pub(crate) use backends::load_enabled_with_keys as load_enabled_with_keys_in;
pub(crate) use client_keys::snapshot_keys as snapshot_keys_in;
pub(crate) use cooldowns::load_cooldown_states as load_cooldown_states_in;
pub(crate) use data_planes::share_holders as share_holders_in;
pub use key_spend::KeyBudget;
pub(crate) use key_spend::spent_in_period as spent_in_period_in;
pub(crate) use settings::load_settings as load_settings_in;

/// Sends the committed version to the subscribers of [`Store::commits`] if it is newer.
fn announce_version(
    conn: &Connection,
    commits: &watch::Sender<u64>,
) -> Result<(), rusqlite::Error> {
    let version = read_version(conn)?;
    commits.send_if_modified(|announced| {
        let newer = version > *announced;
        if newer {
            *announced = version;
        }
        newer
    });
    Ok(())
}

fn read_version(conn: &Connection) -> Result<u64, rusqlite::Error> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = 'snapshot_version'")?
        .query_row([], |r| r.get::<_, i64>(0))
        .map(|v| v.max(0) as u64)
}

/// Nano-units as SQLite stores them, saturating at `i64::MAX`.
pub(crate) fn nanos_to_db(nanos: u64) -> i64 {
    i64::try_from(nanos).unwrap_or(i64::MAX)
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

/// One of the store's connections held, as a long statistics query or a long write holds
/// it, until [`Held::release`]: for tests that a read does not wait for it.
#[cfg(test)]
pub(crate) struct Held {
    release: std::sync::mpsc::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), StoreError>>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
impl Held {
    /// Holds `reader`, or the writer for `None`; returns once it is held.
    pub(crate) async fn hold(store: &Store, reader: Option<Reader>) -> Self {
        let held = Arc::new(std::sync::Barrier::new(2));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let task = {
            let (store, held) = (store.clone(), Arc::clone(&held));
            let wait = move |_: &mut Connection, _: &MasterKey| {
                held.wait();
                let _ = released.recv();
                Ok(())
            };
            tokio::spawn(async move {
                match reader {
                    Some(reader) => store.read(reader, wait).await,
                    None => store.write(WriteOp::usage_ingest, wait).await,
                }
            })
        };
        tokio::task::spawn_blocking(move || held.wait())
            .await
            .unwrap();
        Self { release, task }
    }

    pub(crate) async fn release(self) {
        self.release.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Every file of `migrations/` runs, in the order of its number: one left out of
    /// [`MIGRATIONS`] would never be applied, and nothing else would say so.
    #[test]
    fn every_migration_file_is_applied_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "sql"))
            .collect();
        files.sort();
        let texts: Vec<String> = files
            .iter()
            .map(|path| std::fs::read_to_string(path).unwrap())
            .collect();
        assert_eq!(texts.len(), MIGRATIONS.len(), "{files:?}");
        for ((path, text), listed) in files.iter().zip(&texts).zip(MIGRATIONS) {
            assert_eq!(
                text,
                listed,
                "{} is not listed at its place",
                path.display()
            );
        }
    }

    /// A migration, once it has been applied anywhere, is never edited: a database that ran it
    /// runs it never again (only `user_version` is compared), so an edit reaches new databases
    /// alone. 0016 was edited after builds had applied it (its `key_spend_day` index added 17
    /// minutes later), and the databases those builds migrated never got the index. Each file's
    /// SHA-256 (its first 16 hex digits) is pinned here when it is added: to change what a
    /// migration did, add a new one.
    #[test]
    fn a_migration_once_added_is_never_edited() {
        use sha2::Digest as _;
        let pinned = [
            "39c8892dac5fd89a", // 0001_initial.sql
            "ee115febd65447e4", // 0002_usage_daily.sql
            "e3370fb1cb25d526", // 0003_usage_daily_by_backend.sql
            "64bf7afb582c67d1", // 0004_replica_shares.sql
            "ff27e18bc130a4c4", // 0005_cooldown_epoch.sql
            "a38a6ae3e6adcb32", // 0006_client_key_expiry.sql
            "8fce887d3544191e", // 0007_usage_hourly_pool.sql
            "945021aea3e3298a", // 0008_affinity_keys.sql
            "edbbc8da6873ddab", // 0009_usage_token_details.sql
            "b242a43ffaa7ed32", // 0010_key_budgets.sql
            "fbddbe974d31de93", // 0011_backend_responses_api.sql
            "c632e3f99befe43d", // 0012_backend_api_format.sql
            "8e6aa11ff75970fe", // 0013_token_limits.sql
            "73dd0e31f9dd35d5", // 0014_deleted_backends.sql
            "98bf81daf0c4f961", // 0015_cache_writes.sql
            "657bff4d1accdd8c", // 0016_key_spend_total.sql
            "da36b73f9c0b284e", // 0017_client_key_order.sql
            "17d93d40af2a5219", // 0018_database_id.sql
            "97b204a96edc10d0", // 0019_model_cooldowns.sql
            "679c568e71bf6cef", // 0020_snapshot_key_index.sql
            "30150d3452b41875", // 0021_backend_key_header.sql
            "50560d0d9d414041", // 0022_price_tiers.sql
            "1779a529a05c6e88", // 0023_long_context.sql
            "9fc3c15e11d5d29c", // 0024_call_prices.sql
            "15f1d2dd988e1c9b", // 0025_audio_prices.sql
            "6379149881a5aad3", // 0026_audio_usage.sql
            "2cc7037854861fad", // 0027_estimated_count.sql
            "3584ba9c4bc08edc", // 0028_max_output_tokens.sql
            "99a9f5e187d0dc8d", // 0029_cooldown_reset_time.sql
        ];
        assert_eq!(
            MIGRATIONS.len(),
            pinned.len(),
            "a new migration: pin its hash here"
        );
        for (i, (sql, pinned)) in MIGRATIONS.iter().zip(pinned).enumerate() {
            let hash = hex::encode(sha2::Sha256::digest(sql.as_bytes()));
            assert_eq!(
                &hash[..16],
                pinned,
                "migration {} was edited: add a new migration instead",
                i + 1
            );
        }
    }

    /// A database at `path` migrated to one version before the latest, its key check written
    /// with `key`.
    fn one_version_behind(path: &std::path::Path, key: &MasterKey) -> Connection {
        let mut conn = Connection::open(path).unwrap();
        sql_functions::register(&conn).unwrap();
        Migrations::new(
            MIGRATIONS[..MIGRATIONS.len() - 1]
                .iter()
                .map(|sql| M::up(sql))
                .collect(),
        )
        .to_latest(&mut conn)
        .unwrap();
        verify_or_write_check(&conn, key).unwrap();
        conn
    }

    /// A wrong master key is refused before a pending migration runs: refused after, the
    /// database was left at a schema the binary rolled back to could not open ("migration
    /// number that is too high"), for a mistake that changed nothing.
    #[test]
    fn a_wrong_master_key_is_refused_before_any_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let right = MasterKey::generate();
        let latest = MIGRATIONS.len() as i64;
        // A database one version behind, written with `right`: its last migration still to
        // run.
        drop(one_version_behind(&path, &right));
        let refused = Store::open(&path, MasterKey::generate()).err().unwrap();
        assert!(matches!(refused, StoreError::WrongMasterKey), "{refused}");
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, latest - 1);
        // The right key migrates it.
        drop(Store::open(&path, right).unwrap());
    }

    /// A database a newer build migrated, and a migration SQLite refuses, are each said in one
    /// readable line: rusqlite_migration's text was its `Debug`, the whole migration file on
    /// the line, or "a migration number that is too high" with no word of a newer build.
    #[test]
    fn a_failed_migration_is_said_in_one_readable_line() {
        let dir = tempfile::tempdir().unwrap();
        let ahead = dir.path().join("ahead.db");
        let key = MasterKey::generate();
        drop(Store::open(&ahead, key.clone()).unwrap());
        let conn = Connection::open(&ahead).unwrap();
        conn.pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1)
            .unwrap();
        drop(conn);
        let said = Store::open(&ahead, key.clone()).err().unwrap().to_string();
        assert!(
            said.contains("migrated by a newer sluice-control"),
            "{said}"
        );
        assert!(!said.contains('\n') && said.len() < 300, "{said}");

        // One version behind, with the last migration's column already there.
        let behind = dir.path().join("behind.db");
        let conn = one_version_behind(&behind, &key);
        conn.execute_batch(MIGRATIONS[MIGRATIONS.len() - 1])
            .unwrap();
        drop(conn);
        let said = Store::open(&behind, key).err().unwrap().to_string();
        assert!(said.contains("duplicate column"), "{said}");
        assert!(
            !said.contains("ALTER TABLE") && !said.contains('\n'),
            "{said}"
        );
    }

    /// A write SQLite refuses (here, a table that does not exist; in life, a full volume) is
    /// counted as a failed write, not as a write: the write-time histogram looked healthy
    /// while every write failed.
    #[tokio::test]
    async fn a_write_sqlite_refuses_is_counted_as_failed() {
        #[derive(Default)]
        struct Seen(std::sync::Mutex<(u32, u32)>);
        impl StoreObserver for Seen {
            fn write(&self, _: WriteOp, _: Duration) {
                self.0.lock().unwrap().0 += 1;
            }
            fn write_failed(&self, _: WriteOp) {
                self.0.lock().unwrap().1 += 1;
            }
            fn usage_committed(&self, _: u64) {}
            fn usage_clamped(&self, _: u64) {}
        }
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Seen::default());
        let (store, _) = Store::open_observed(
            &dir.path().join("t.db"),
            crate::crypto::MasterKey::generate(),
            Arc::clone(&seen) as Arc<dyn StoreObserver>,
        )
        .unwrap();
        let before = *seen.0.lock().unwrap();
        let failed = store
            .write(WriteOp::admin, |conn, _| {
                conn.execute("INSERT INTO no_such_table VALUES (1)", [])?;
                Ok(())
            })
            .await;
        assert!(matches!(failed, Err(StoreError::Sqlite(_))), "{failed:?}");
        store.write(WriteOp::admin, |_, _| Ok(())).await.unwrap();
        let after = *seen.0.lock().unwrap();
        assert_eq!((after.0 - before.0, after.1 - before.1), (1, 1));
    }

    fn backend_named(name: &str) -> crate::backend::BackendSpec {
        crate::backend::BackendSpec {
            name: name.into(),
            base_url: "https://api.example.com/v1".into(),
            pool: crate::backend::Pool::Primary,
            priority: 0,
            weight: 1,
            models: vec![crate::backend::ModelRoute {
                name: "m".into(),
                ..Default::default()
            }],
            rpm_limit: 0,
            tpm_limit: 0,
            enabled: true,
            responses_api: None,
            api_format: Default::default(),
            anthropic_version: String::new(),
            key_header: Default::default(),
        }
    }

    fn ciphertext_of(path: &Path, name: &str) -> Vec<u8> {
        Connection::open(path)
            .unwrap()
            .query_row(
                "SELECT api_key_ciphertext FROM backends WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .unwrap()
    }

    fn file_holds(path: &Path, bytes: &[u8]) -> bool {
        let file = std::fs::read(path).unwrap();
        file.windows(bytes.len()).any(|w| w == bytes)
    }

    /// A sealed provider key the database no longer holds (its backend deleted, or sealed
    /// again under a new master key) is not left in the file's free space, where a backup
    /// (which copies pages as they are) and the old master key would still open it.
    #[tokio::test]
    async fn provider_keys_no_longer_held_are_not_left_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let old = crate::crypto::MasterKey::generate();
        let (store, _) = Store::open(&path, old.clone()).unwrap();
        store
            .create_backend(backend_named("kept"), "sk-kept-0123456789abcdef".into())
            .await
            .unwrap();
        store
            .create_backend(backend_named("gone"), "sk-gone-0123456789abcdef".into())
            .await
            .unwrap();
        let (kept, gone) = (ciphertext_of(&path, "kept"), ciphertext_of(&path, "gone"));
        store.delete_backend("gone".into()).await.unwrap();
        // Every reader has read, as in a running control plane (snapshots, lists, stats).
        for reader in [
            Reader::Snapshot,
            Reader::Queries,
            Reader::Budgets,
            Reader::Admin,
        ] {
            store
                .read(reader, |conn, _| read_version_in(conn))
                .await
                .unwrap();
        }
        drop(store);
        // Closed: the WAL is checkpointed into the file, and `sluice.db` alone is the
        // database.
        assert!(!path.with_extension("db-wal").exists());
        assert!(file_holds(&path, &kept), "the kept key is where it was");
        assert!(
            !file_holds(&path, &gone),
            "a deleted backend's key stayed in the file"
        );

        let new = crate::crypto::MasterKey::generate();
        Store::rotate_master_key(&path, &old, &new).unwrap();
        assert!(
            !file_holds(&path, &kept),
            "the key sealed under the old master key stayed in the file"
        );
        assert_ne!(ciphertext_of(&path, "kept"), kept);
    }

    /// A write holding the writer (from a handle of its own) until `finish` is sent; returned
    /// once it has started.
    fn hold_the_writer(
        store: &Store,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), StoreError>>,
    ) {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (finish, finishing) = std::sync::mpsc::channel::<()>();
        let writer = store.clone();
        let write = tokio::spawn(async move {
            writer
                .call(move |_, _| {
                    started_tx.send(()).unwrap();
                    finishing.recv().unwrap();
                    Ok(())
                })
                .await
        });
        started.recv().unwrap();
        (finish, write)
    }

    /// The dashboard polls the lists of keys, backends, cooldowns and replicas every few
    /// seconds: they read on a connection of their own, neither waiting for the writer nor
    /// holding it (usage commits and cooldown reports behind a scan of every key).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admin_reads_neither_wait_for_nor_hold_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(
            &dir.path().join("t.db"),
            crate::crypto::MasterKey::generate(),
        )
        .unwrap();
        let (finish, write) = hold_the_writer(&store);
        let wait = Duration::from_secs(5);
        let waited = "an admin read waited for the writer";
        use tokio::time::timeout as t;
        t(wait, store.list_client_keys(false, None, None))
            .await
            .expect(waited)
            .unwrap();
        t(wait, store.list_backends()).await.expect(waited).unwrap();
        t(wait, store.list_cooldowns())
            .await
            .expect(waited)
            .unwrap();
        t(wait, store.list_data_planes(0))
            .await
            .expect(waited)
            .unwrap();
        t(wait, store.next_key_expiry())
            .await
            .expect(waited)
            .unwrap();
        finish.send(()).unwrap();
        write.await.unwrap().unwrap();
    }

    /// The data directory stays locked while a write queued before the server stopped can
    /// still commit: released earlier, a `rotate-master-key` could run in between, and the
    /// write seal a provider key with the master key it just replaced.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_directory_stays_locked_until_the_last_queued_write_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let lock_path = dir.path().join("lock");
        let open_lock = || {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .unwrap()
        };
        let (store, _) = Store::open(
            &dir.path().join("t.db"),
            crate::crypto::MasterKey::generate(),
        )
        .unwrap();
        let lock = open_lock();
        lock.try_lock().unwrap();
        store.hold_lock(lock);
        // An admin call's write, queued behind a slow one: its handler holds a handle.
        let (finish, write) = hold_the_writer(&store);
        // The server is gone (its handle dropped); the write is still running.
        drop(store);
        assert!(
            open_lock().try_lock().is_err(),
            "unlocked under a running write"
        );
        finish.send(()).unwrap();
        write.await.unwrap().unwrap();
        assert!(
            open_lock().try_lock().is_ok(),
            "still locked once every write is done"
        );
    }
}
