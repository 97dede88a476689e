//! Where the admin token, the data-plane token and the master key come from:
//! the environment or a file when given, else files in the data directory,
//! generated on first start so the embedded default just works.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rand::RngCore as _;

use crate::crypto::MasterKey;

/// Explicit sources; `None` means "use or generate the data-dir file". A value wins over
/// the file holding it when both are given.
#[derive(Clone, Default)]
pub struct SecretSources {
    pub admin_token: Option<String>,
    pub admin_token_file: Option<PathBuf>,
    pub dataplane_token: Option<String>,
    pub dataplane_token_file: Option<PathBuf>,
    /// Base64 of 32 bytes.
    pub master_key: Option<String>,
    pub master_key_file: Option<PathBuf>,
}

impl std::fmt::Debug for SecretSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSources")
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<set>"))
            .field("admin_token_file", &self.admin_token_file)
            .field(
                "dataplane_token",
                &self.dataplane_token.as_ref().map(|_| "<set>"),
            )
            .field("dataplane_token_file", &self.dataplane_token_file)
            .field("master_key", &self.master_key.as_ref().map(|_| "<set>"))
            .field("master_key_file", &self.master_key_file)
            .finish()
    }
}

/// The resolved secrets. Not `Debug`, so they cannot end up in a log by accident.
pub struct Secrets {
    pub admin_token: String,
    pub dataplane_token: String,
    pub master_key: MasterKey,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} is empty")]
    Empty { what: String },
    #[error("{what}: the master key must be base64 of exactly 32 bytes")]
    BadMasterKey { what: String },
    #[error(
        "no master key: the database {db} exists but neither SLUICE_MASTER_KEY nor --master-key-file is set \
         and {file} is missing"
    )]
    MissingMasterKey { db: PathBuf, file: PathBuf },
    #[error("{0}")]
    WeakToken(String),
}

pub const ADMIN_TOKEN_FILE: &str = "admin-token";
pub const DATAPLANE_TOKEN_FILE: &str = "dataplane-token";
pub const MASTER_KEY_FILE: &str = "master-key";

/// Resolves every secret; `existing_db` is the database file when it predates this start
/// (its provider keys then need the master key they were encrypted with).
pub fn resolve(
    data_dir: &Path,
    sources: &SecretSources,
    existing_db: Option<&Path>,
) -> Result<Secrets, SecretsError> {
    let admin_token = token(
        data_dir,
        sources.admin_token.as_deref(),
        sources.admin_token_file.as_deref(),
        ADMIN_TOKEN_FILE,
        "SLUICE_ADMIN_TOKEN",
    )?;
    let dataplane_token = token(
        data_dir,
        sources.dataplane_token.as_deref(),
        sources.dataplane_token_file.as_deref(),
        DATAPLANE_TOKEN_FILE,
        "SLUICE_DATAPLANE_TOKEN",
    )?;
    if admin_token == dataplane_token {
        return Err(SecretsError::WeakToken(
            "SLUICE_ADMIN_TOKEN and SLUICE_DATAPLANE_TOKEN (or their files) are the same token: \
             the data-plane token unlocks every provider key, so give it a token of its own"
                .into(),
        ));
    }
    let master_key = master_key(data_dir, sources, existing_db)?;
    Ok(Secrets {
        admin_token,
        dataplane_token,
        master_key,
    })
}

fn token(
    data_dir: &Path,
    given: Option<&str>,
    given_file: Option<&Path>,
    file: &str,
    env: &str,
) -> Result<String, SecretsError> {
    let strong = |what: &str, token: String| {
        sluice_domain::auth::check_token_strength(what, &token)
            .map(|()| token)
            .map_err(SecretsError::WeakToken)
    };
    if let Some(given) = given {
        let given = given.trim();
        if given.is_empty() {
            return Err(SecretsError::Empty {
                what: env.to_owned(),
            });
        }
        return strong(env, given.to_owned());
    }
    if let Some(path) = given_file {
        return strong(&path.display().to_string(), read_secret_file(path)?);
    }
    let path = data_dir.join(file);
    if path.exists() {
        return strong(&path.display().to_string(), read_secret_file(&path)?);
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    write_secret_file(&path, &token)?;
    tracing::warn!(
        file = %path.display(),
        "generated a new {env} into the data directory (mode 0600); read it from there or set {env}"
    );
    Ok(token)
}

fn master_key(
    data_dir: &Path,
    sources: &SecretSources,
    existing_db: Option<&Path>,
) -> Result<MasterKey, SecretsError> {
    if let Some(text) = &sources.master_key {
        return MasterKey::from_base64(text).map_err(|_| SecretsError::BadMasterKey {
            what: "SLUICE_MASTER_KEY".into(),
        });
    }
    if let Some(path) = &sources.master_key_file {
        let text = read_secret_file(path)?;
        return MasterKey::from_base64(&text).map_err(|_| SecretsError::BadMasterKey {
            what: path.display().to_string(),
        });
    }
    let path = data_dir.join(MASTER_KEY_FILE);
    if path.exists() {
        let text = read_secret_file(&path)?;
        return MasterKey::from_base64(&text).map_err(|_| SecretsError::BadMasterKey {
            what: path.display().to_string(),
        });
    }
    if let Some(db) = existing_db {
        return Err(SecretsError::MissingMasterKey {
            db: db.to_owned(),
            file: path,
        });
    }
    let key = MasterKey::generate();
    write_secret_file(&path, &key.to_base64())?;
    tracing::warn!(
        file = %path.display(),
        "generated a new master key into the data directory (mode 0600); back it up with the database, \
         or keep it elsewhere and pass SLUICE_MASTER_KEY / --master-key-file"
    );
    Ok(key)
}

pub fn read_secret_file(path: &Path) -> Result<String, SecretsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Io {
        path: path.to_owned(),
        source,
    })?;
    let text = text.trim().to_owned();
    if text.is_empty() {
        return Err(SecretsError::Empty {
            what: path.display().to_string(),
        });
    }
    Ok(text)
}

/// Writes `contents` to a new file readable by its owner only, durably.
pub fn write_secret_file(path: &Path, contents: &str) -> Result<(), SecretsError> {
    let io = |source| SecretsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.write_all(b"\n").map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The data-plane token unlocks every provider key (snapshots carry them decrypted): an
    /// admin token equal to it would give every admin-token holder the keys too.
    #[test]
    fn one_token_for_both_is_refused_without_showing_it() {
        let dir = tempfile::tempdir().unwrap();
        let token = "a-token-long-and-random-enough-0123456789abcdef";
        let err = resolve(
            dir.path(),
            &SecretSources {
                admin_token: Some(token.into()),
                dataplane_token: Some(token.into()),
                ..Default::default()
            },
            None,
        )
        .err()
        .expect("refused");
        let message = err.to_string();
        assert!(message.contains("SLUICE_ADMIN_TOKEN"), "{message}");
        assert!(message.contains("SLUICE_DATAPLANE_TOKEN"), "{message}");
        assert!(!message.contains(token), "{message}");
    }

    #[test]
    fn generates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sluice.db");
        let first = resolve(dir.path(), &SecretSources::default(), None).unwrap();
        let again = resolve(dir.path(), &SecretSources::default(), Some(&db)).unwrap();
        assert_eq!(first.admin_token, again.admin_token);
        assert_eq!(first.dataplane_token, again.dataplane_token);
        assert_ne!(first.admin_token, first.dataplane_token);
        assert_eq!(first.master_key.to_base64(), again.master_key.to_base64());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            for f in [ADMIN_TOKEN_FILE, DATAPLANE_TOKEN_FILE, MASTER_KEY_FILE] {
                let mode = std::fs::metadata(dir.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
    }

    #[test]
    fn token_files_are_read_and_a_given_value_wins() {
        let dir = tempfile::tempdir().unwrap();
        let admin_file = dir.path().join("admin.secret");
        let dataplane_file = dir.path().join("dataplane.secret");
        std::fs::write(&admin_file, "admin-from-file-0123456789abcdef0123\n").unwrap();
        std::fs::write(&dataplane_file, "dataplane-from-file-0123456789abcdef\n").unwrap();
        let sources = SecretSources {
            admin_token_file: Some(admin_file),
            dataplane_token: Some("dataplane-from-env-0123456789abcdef0".into()),
            dataplane_token_file: Some(dataplane_file),
            ..Default::default()
        };
        let secrets = resolve(dir.path(), &sources, None).unwrap();
        assert_eq!(secrets.admin_token, "admin-from-file-0123456789abcdef0123");
        assert_eq!(
            secrets.dataplane_token,
            "dataplane-from-env-0123456789abcdef0"
        );
        assert!(
            !dir.path().join(ADMIN_TOKEN_FILE).exists(),
            "nothing generated for a token given as a file"
        );
        let missing = SecretSources {
            admin_token_file: Some(dir.path().join("nope")),
            ..Default::default()
        };
        let err = resolve(dir.path(), &missing, None).err().unwrap();
        assert!(matches!(err, SecretsError::Io { .. }), "{err}");
    }

    #[test]
    fn an_existing_database_without_its_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sluice.db");
        let sources = SecretSources {
            admin_token: Some("a".repeat(32)),
            dataplane_token: Some("d".repeat(32)),
            ..Default::default()
        };
        let err = resolve(dir.path(), &sources, Some(&db)).err().unwrap();
        assert!(
            matches!(err, SecretsError::MissingMasterKey { .. }),
            "{err}"
        );
        let bad = SecretSources {
            master_key: Some("c2hvcnQ=".into()),
            ..sources
        };
        assert!(matches!(
            resolve(dir.path(), &bad, Some(&db)).err().unwrap(),
            SecretsError::BadMasterKey { .. }
        ));
    }

    #[test]
    fn a_short_token_is_refused_without_showing_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin.secret");
        std::fs::write(&file, "hunter2\n").unwrap();
        for sources in [
            SecretSources {
                admin_token: Some("x".into()),
                ..Default::default()
            },
            SecretSources {
                admin_token_file: Some(file.clone()),
                ..Default::default()
            },
            SecretSources {
                dataplane_token: Some("e2e-dataplane-token".into()),
                ..Default::default()
            },
        ] {
            let err = resolve(dir.path(), &sources, None).err().unwrap();
            let text = err.to_string();
            assert!(matches!(err, SecretsError::WeakToken(_)), "{text}");
            assert!(text.contains("at least 32 characters"), "{text}");
            assert!(
                !text.contains("hunter2") && !text.contains("e2e-dataplane"),
                "{text}"
            );
        }
    }
}
