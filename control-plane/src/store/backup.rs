//! A consistent copy of the database, taken while the control plane runs.
//!
//! SQLite's online backup API (the `sqlite3` shell's `.backup`) copies a few pages a step and
//! starts again from the first page whenever another connection commits between two steps:
//! under traffic the control plane commits several times a second (every replica's usage
//! reports, snapshot acks, cooldowns), so such a backup never finishes. `VACUUM INTO` writes
//! the copy in one read transaction instead: a snapshot of one commit, finished whatever the
//! writer does meanwhile (it only keeps the WAL from being checkpointed past that commit for
//! as long as the copy takes). The copy holds no free pages, so nothing deleted (a sealed
//! provider key of a deleted backend) is in it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags};

/// What [`backup`] wrote.
#[derive(Debug)]
pub struct Backup {
    pub bytes: u64,
    pub took: Duration,
}

/// Writes a copy of the database at `db` to `out`, which must not exist: to a file of its own
/// beside it first (`OUT.<pid>.partial`, readable by the owner only, as the data directory
/// is), checked (`PRAGMA quick_check`) and flushed, then linked as `out` (which fails, rather
/// than replace it, if `out` has appeared meanwhile) and unlinked, so `out` is either a whole
/// copy or absent and nothing is ever overwritten. The database is opened read-only and no
/// lock is taken: the control plane keeps serving.
pub fn backup(db: &Path, out: &Path) -> anyhow::Result<Backup> {
    let started = Instant::now();
    anyhow::ensure!(db.exists(), "no database at {}", db.display());
    anyhow::ensure!(
        !out.exists(),
        "{} exists; give a new file (a backup never overwrites)",
        out.display()
    );
    let partial = partial_path(out)?;
    let written = write_copy(db, &partial);
    let linked = written.and_then(|()| {
        std::fs::hard_link(&partial, out).map_err(|err| {
            if err.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::anyhow!(
                    "{} exists; give a new file (a backup never overwrites)",
                    out.display()
                )
            } else {
                anyhow::Error::new(err).context(format!("writing {}", out.display()))
            }
        })
    });
    let _ = std::fs::remove_file(&partial);
    linked?;
    let bytes = std::fs::metadata(out)
        .with_context(|| format!("reading {}", out.display()))?
        .len();
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("flushing {}", dir.display()))?;
    }
    Ok(Backup {
        bytes,
        took: started.elapsed(),
    })
}

fn partial_path(out: &Path) -> anyhow::Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("{} names no file", out.display()))?;
    let mut partial = name.to_os_string();
    partial.push(format!(".{}.partial", std::process::id()));
    Ok(out.with_file_name(partial))
}

fn write_copy(db: &Path, partial: &Path) -> anyhow::Result<()> {
    // Created empty (which VACUUM INTO writes into) and for the owner only: the copy holds
    // the sealed provider keys and the key hashes, as the database does.
    let mut create = std::fs::OpenOptions::new();
    create.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut create, 0o600);
    create
        .open(partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let source = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening {}", db.display()))?;
    source.busy_timeout(Duration::from_secs(5))?;
    let target = partial
        .to_str()
        .with_context(|| format!("{} is not UTF-8", partial.display()))?;
    source
        .execute("VACUUM INTO ?1", [target])
        .with_context(|| format!("copying {} to {}", db.display(), partial.display()))?;
    drop(source);
    let copy = Connection::open_with_flags(partial, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let check: String = copy.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    anyhow::ensure!(check == "ok", "the copy fails its check: {check}");
    drop(copy);
    std::fs::File::open(partial)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("flushing {}", partial.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A writer committing as fast as it can (far more often than the shell's `.backup`
    /// can survive) does not keep the copy from finishing, and the copy is one commit's
    /// state: its rows are a prefix of what was written, each whole.
    #[test]
    fn a_copy_finishes_under_a_busy_writer_and_is_one_commits_state() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sluice.db");
        let writer = Connection::open(&db).unwrap();
        writer.pragma_update(None, "journal_mode", "WAL").unwrap();
        writer
            .execute_batch(
                "CREATE TABLE t (n INTEGER PRIMARY KEY, pad BLOB NOT NULL, twin INTEGER NOT NULL)",
            )
            .unwrap();
        // About 20 MB, so the copy takes many of the writer's commits.
        let tx = writer.unchecked_transaction().unwrap();
        for n in 0..20_000 {
            tx.execute("INSERT INTO t VALUES (?1, zeroblob(1000), ?1)", [n])
                .unwrap();
        }
        tx.commit().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The copy starts once the writer has committed ten times, and the writer goes on
        // committing through it. (Counted over the whole run, the commits passed ten only if
        // the writer's thread was scheduled enough beside the copy: on a loaded machine it
        // was not, and the test failed with nothing wrong.)
        let (busy_now, writer_busy) = std::sync::mpsc::channel();
        let busy = {
            let (db, stop) = (db.clone(), stop.clone());
            std::thread::spawn(move || {
                let writer = Connection::open(&db).unwrap();
                writer.busy_timeout(Duration::from_secs(5)).unwrap();
                for n in 20_000.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    writer
                        .execute("INSERT INTO t VALUES (?1, zeroblob(10), ?1)", [n])
                        .unwrap();
                    if n == 20_009 {
                        busy_now.send(()).unwrap();
                    }
                }
            })
        };
        writer_busy.recv().unwrap();
        let out = dir.path().join("backups").join("sluice-backup.db");
        std::fs::create_dir(out.parent().unwrap()).unwrap();
        let done = backup(&db, &out).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        busy.join().unwrap();
        assert_eq!(done.bytes, std::fs::metadata(&out).unwrap().len());
        assert!(!partial_path(&out).unwrap().exists());
        let copy = Connection::open(&out).unwrap();
        let (rows, max, torn): (i64, i64, i64) = copy
            .query_row("SELECT count(*), max(n), sum(n != twin) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((rows, torn), (max + 1, 0));
        assert!(
            rows >= 20_010,
            "the commits before the copy began are in it: {rows}"
        );
        // A backup never overwrites, and leaves nothing beside its file.
        let again = backup(&db, &out).unwrap_err();
        assert!(again.to_string().contains("exists"), "{again:#}");
        let beside: Vec<_> = std::fs::read_dir(out.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(beside, [out.file_name().unwrap()]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&out).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{mode:o}: the owner's only");
        }
    }
}
