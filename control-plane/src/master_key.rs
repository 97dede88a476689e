//! `sluice-control rotate-master-key`: every stored provider key re-encrypted under a new
//! master key, offline (the control plane stopped), crash-safe at every step.

use std::path::Path;

use anyhow::Context as _;

use crate::crypto::MasterKey;
use crate::secrets::{self, SecretSources};
use crate::server::LOCK_FILE;
use crate::store::{DB_FILE, Store, StoreError};

/// Re-encrypts every stored provider key, and the check row, under a new master key in one
/// transaction: the key in `new_file`, else one generated (only when the current key is the
/// data directory's file, which the new one then replaces). Refused while a control plane
/// holds `data_dir`: it keeps the old key in memory, and would write keys under it beside
/// the rotated ones. The current key comes from `sources`, as at a start.
///
/// With the data directory's key, the new key is staged beside the old one
/// (`master-key.new`) before the commit and renamed over it after, each step made durable,
/// so a crash in between leaves both keys on disk; the next run finishes the rotation.
pub fn rotate(
    data_dir: &Path,
    sources: &SecretSources,
    new_file: Option<&Path>,
) -> anyhow::Result<()> {
    let db = data_dir.join(DB_FILE);
    anyhow::ensure!(db.exists(), "no database at {}", db.display());
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join(LOCK_FILE))
        .with_context(|| format!("opening {}", data_dir.display()))?;
    anyhow::ensure!(
        lock.try_lock().is_ok(),
        "the control plane is running on {}; stop it before rotating the master key",
        data_dir.display()
    );
    let data_dir_key = data_dir.join(secrets::MASTER_KEY_FILE);
    let old = match (&sources.master_key, &sources.master_key_file) {
        (Some(text), _) => MasterKey::from_base64(text).context("SLUICE_MASTER_KEY")?,
        (None, Some(path)) => MasterKey::from_base64(&secrets::read_secret_file(path)?)
            .with_context(|| path.display().to_string())?,
        (None, None) => MasterKey::from_base64(&secrets::read_secret_file(&data_dir_key)?)
            .with_context(|| data_dir_key.display().to_string())?,
    };
    let uses_data_dir_key = sources.master_key.is_none() && sources.master_key_file.is_none();
    let new = match new_file {
        Some(path) => MasterKey::from_base64(&secrets::read_secret_file(path)?)
            .with_context(|| path.display().to_string())?,
        None => {
            anyhow::ensure!(
                uses_data_dir_key,
                "give --new-master-key-file: the current key does not come from the data directory"
            );
            MasterKey::generate()
        }
    };
    // With the data-dir key, the new key is written beside the old one first, so a
    // crash between the commit and the rename leaves both keys on disk.
    let staged = data_dir.join(format!("{}.new", secrets::MASTER_KEY_FILE));
    if uses_data_dir_key && staged.exists() {
        // An earlier rotation stopped: finish it if it committed, and never write over the
        // key the database is under.
        let interrupted = MasterKey::from_base64(&secrets::read_secret_file(&staged)?)
            .with_context(|| staged.display().to_string())?;
        if Store::master_key_fits(&db, &interrupted)? && !Store::master_key_fits(&db, &old)? {
            std::fs::rename(&staged, &data_dir_key).context("replacing the master-key file")?;
            sync_dir(data_dir)?;
            tracing::info!(
                file = %data_dir_key.display(),
                "finished an interrupted rotation: the database was under the key in {}, which is now the master key; run rotate-master-key again for another key",
                staged.display()
            );
            return Ok(());
        }
    }
    // Checked before anything is written: a wrong key must not cost a staged one.
    anyhow::ensure!(
        Store::master_key_fits(&db, &old)?,
        "{}",
        StoreError::WrongMasterKey
    );
    if uses_data_dir_key {
        // Left by a rotation that stopped before its commit: the database is under `old`.
        let _ = std::fs::remove_file(&staged);
        secrets::write_secret_file(&staged, &new.to_base64())?;
        sync_dir(data_dir)?;
    }
    let count = Store::rotate_master_key(&db, &old, &new)?;
    if uses_data_dir_key {
        std::fs::rename(&staged, &data_dir_key).context("replacing the master-key file")?;
        sync_dir(data_dir)?;
        tracing::info!(keys = count, file = %data_dir_key.display(), "master key rotated");
    } else {
        tracing::info!(
            keys = count,
            "master key rotated; start the control plane with the new key"
        );
    }
    Ok(())
}

/// Makes a file created or renamed in `dir` survive a machine crash.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("flushing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::testing::TestControlPlane;

    /// A running control plane keeps the master key in memory: rotated under it, the
    /// database would end up with keys under two master keys and refuse the next start.
    /// The rotation is refused while one holds the data directory, before anything is
    /// written, and goes ahead once it has stopped.
    #[tokio::test]
    async fn rotation_is_refused_while_a_control_plane_holds_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let cp = TestControlPlane::start(dir.path()).await.unwrap();
        let key_file = dir.path().join(secrets::MASTER_KEY_FILE);
        let before = std::fs::read(&key_file).unwrap();

        let err = rotate(dir.path(), &SecretSources::default(), None).unwrap_err();
        assert!(
            err.to_string().contains("the control plane is running on"),
            "{err:#}"
        );
        assert_eq!(std::fs::read(&key_file).unwrap(), before);
        let staged = dir.path().join(format!("{}.new", secrets::MASTER_KEY_FILE));
        assert!(!staged.exists());

        cp.shutdown().await;
        rotate(dir.path(), &SecretSources::default(), None).unwrap();
        assert_ne!(std::fs::read(&key_file).unwrap(), before);
    }
}
