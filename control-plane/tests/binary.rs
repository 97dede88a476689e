//! The `sluice-control` binary as an operator runs it: first start on an empty
//! data directory, restarts, a wrong master key, and key rotation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-control");

fn command(data_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .env_remove("SLUICE_ADMIN_TOKEN")
        .env_remove("SLUICE_DATAPLANE_TOKEN")
        .env_remove("SLUICE_MASTER_KEY")
        .env_remove("SLUICE_MASTER_KEY_FILE")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Starts the binary and waits for its gRPC "listening on" line; returns the child,
/// the address and everything it logged until then.
#[allow(clippy::zombie_processes)] // the caller owns the child and stops it
fn start(data_dir: &std::path::Path) -> (Child, String, String) {
    let mut child = command(data_dir).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut log = String::new();
    while Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        log.push_str(&line);
        log.push('\n');
        if let Some(rest) = line.split("grpc listening on ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap().to_owned();
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return (child, addr, log);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("no listening line; log:\n{log}");
}

fn stop(mut child: Child) {
    // SIGTERM, as an init system would.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            return;
        }
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn first_start_generates_secrets_and_later_starts_reuse_them() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _addr, log) = start(dir.path());
    for file in ["admin-token", "dataplane-token", "master-key", "sluice.db"] {
        assert!(
            dir.path().join(file).exists(),
            "{file} missing; log:\n{log}"
        );
    }
    assert!(log.contains("generated a new master key"), "{log}");
    let token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    assert!(
        !log.contains(token.trim()),
        "the log must not show the token"
    );
    stop(child);

    let (child, _addr, log) = start(dir.path());
    assert!(
        !log.contains("generated"),
        "second start must reuse the secrets:\n{log}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("admin-token")).unwrap(),
        token
    );
    stop(child);
}

#[test]
fn a_wrong_master_key_refuses_to_start_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _, _) = start(dir.path());
    stop(child);
    let output = command(dir.path())
        .env(
            "SLUICE_MASTER_KEY",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap();
    assert!(
        last.contains("master key does not match this database"),
        "{stderr}"
    );
}

/// A control plane stopped cleanly leaves its whole database in `sluice.db`: a copy of that
/// file alone (a cold backup, a restore that removes `-wal` and `-shm` as operating.md says)
/// is the database, and still knows its master key. The readers that had read at start (the
/// first snapshot) used to close after the writer, so nobody could fold the WAL back into the
/// file: `sluice.db` alone lacked the master key's check and opened under any key as a new
/// database.
#[test]
fn a_stopped_control_plane_leaves_its_database_whole_in_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _, _) = start(dir.path());
    stop(child);
    for left in ["sluice.db-wal", "sluice.db-shm"] {
        assert!(!dir.path().join(left).exists(), "{left} left behind");
    }
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("sluice.db"), copy.path().join("sluice.db")).unwrap();
    let output = command(copy.path())
        .env(
            "SLUICE_MASTER_KEY",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("master key does not match this database"),
        "{stderr}"
    );
}

#[test]
fn a_second_control_plane_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _, _) = start(dir.path());
    let output = command(dir.path()).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("in use by another sluice-control"));
    stop(child);
}

/// Puts a backend with the provider key `sk-rotate-me-12345678` into the database in `dir`
/// (created with a master key of its own in `dir/master-key`).
fn store_a_provider_key(dir: &std::path::Path, rt: &tokio::runtime::Runtime) {
    rt.block_on(async {
        let cp = sluice_control::testing::TestControlPlane::start(dir)
            .await
            .unwrap();
        let store = cp.store().unwrap().clone();
        let spec = sluice_control::backend::BackendSpec {
            anthropic_version: Default::default(),
            api_format: Default::default(),
            key_header: Default::default(),
            name: "b1".into(),
            base_url: "http://127.0.0.1:1/v1".into(),
            pool: sluice_control::backend::Pool::Primary,
            priority: 0,
            weight: 1,
            models: vec![sluice_control::backend::ModelRoute {
                default_max_tokens: Default::default(),
                max_output_tokens: Default::default(),
                name: "m".into(),
                upstream_name: "m".into(),
                input_price_per_mtok: 0.0,
                output_price_per_mtok: 0.0,
                ..Default::default()
            }],
            rpm_limit: 0,
            tpm_limit: 0,
            enabled: true,
            responses_api: None,
        };
        store
            .create_backend(spec, "sk-rotate-me-12345678".into())
            .await
            .unwrap();
        // The handle keeps the data directory locked: let go of it before the control plane.
        drop(store);
        cp.shutdown().await;
    });
}

/// The provider key of the backend [`store_a_provider_key`] stored, decrypted with the
/// master key in `master-key` (base64).
fn stored_provider_key(
    dir: &std::path::Path,
    master_key: &str,
    rt: &tokio::runtime::Runtime,
) -> String {
    let key = sluice_control::crypto::MasterKey::from_base64(master_key).unwrap();
    let (store, _) = sluice_control::store::Store::open(&dir.join("sluice.db"), key).unwrap();
    rt.block_on(async {
        // The snapshot carries the decrypted key.
        let publisher = sluice_control::snapshot::Publisher::start(store)
            .await
            .unwrap();
        publisher.latest().backends[0].api_key.clone()
    })
}

#[test]
fn rotating_the_master_key_keeps_provider_keys_readable() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Put a provider key in through the library, then rotate with the binary.
    store_a_provider_key(dir.path(), &rt);
    let old_key = std::fs::read_to_string(dir.path().join("master-key")).unwrap();
    let rotated = command(dir.path())
        .arg("rotate-master-key")
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        rotated.status.success(),
        "rotate-master-key failed ({}); stderr:\n{}\nstdout:\n{}",
        rotated.status,
        String::from_utf8_lossy(&rotated.stderr),
        String::from_utf8_lossy(&rotated.stdout),
    );
    let new_key = std::fs::read_to_string(dir.path().join("master-key")).unwrap();
    assert_ne!(old_key, new_key);
    assert!(!dir.path().join("master-key.new").exists());

    // The old key is now refused; the new one decrypts the provider key.
    let output = command(dir.path())
        .env("SLUICE_MASTER_KEY", old_key.trim())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert_eq!(
        stored_provider_key(dir.path(), &new_key, &rt),
        "sk-rotate-me-12345678"
    );
}

/// A rotation that committed and then stopped before its rename (a kill, a crash) leaves the
/// database under the key in `master-key.new` and `master-key` holding the old one. The
/// control plane says so when it refuses to start, and running the rotation again finishes
/// it: the key the database is under is never overwritten.
#[test]
fn a_rotation_interrupted_after_its_commit_is_finished_by_running_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    store_a_provider_key(dir.path(), &rt);
    let old_key = std::fs::read_to_string(dir.path().join("master-key")).unwrap();
    let old = sluice_control::crypto::MasterKey::from_base64(&old_key).unwrap();
    let new = sluice_control::crypto::MasterKey::generate();
    sluice_control::store::Store::rotate_master_key(&dir.path().join("sluice.db"), &old, &new)
        .unwrap();
    std::fs::write(dir.path().join("master-key.new"), new.to_base64()).unwrap();

    let refused = command(dir.path()).output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("master-key.new"), "{stderr}");

    let finished = command(dir.path())
        .arg("rotate-master-key")
        .output()
        .unwrap();
    assert!(
        finished.status.success(),
        "{}",
        String::from_utf8_lossy(&finished.stderr)
    );
    let key = std::fs::read_to_string(dir.path().join("master-key")).unwrap();
    assert_eq!(key.trim(), new.to_base64());
    assert!(!dir.path().join("master-key.new").exists());
    assert_eq!(
        stored_provider_key(dir.path(), &key, &rt),
        "sk-rotate-me-12345678"
    );
}

/// A rotation asked with a key the database is not under changes nothing on disk.
#[test]
fn a_rotation_with_the_wrong_key_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    store_a_provider_key(dir.path(), &rt);
    let key = std::fs::read_to_string(dir.path().join("master-key")).unwrap();
    std::fs::write(
        dir.path().join("master-key"),
        sluice_control::crypto::MasterKey::generate().to_base64(),
    )
    .unwrap();
    let refused = command(dir.path())
        .arg("rotate-master-key")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("does not match"), "{stderr}");
    assert!(!dir.path().join("master-key.new").exists());
    assert_eq!(
        stored_provider_key(dir.path(), &key, &rt),
        "sk-rotate-me-12345678"
    );
}

/// A rotation that meets another writer holding the database's write lock waits for it
/// (SQLite's busy timeout) instead of failing. The lock is released only once the rotation
/// is at its write (its staged key file written just before) and still running a moment
/// later: released on a timer, as it was, a slow start let the test pass without the
/// rotation ever meeting the lock.
#[test]
fn rotating_waits_for_another_writer_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _, _) = start(dir.path());
    stop(child);
    // Another process writing (a backup tool, an operator's sqlite3 shell) holds the
    // write lock while the rotation runs.
    let holder = rusqlite::Connection::open(dir.path().join("sluice.db")).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let mut rotation = command(dir.path())
        .arg("rotate-master-key")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let staged = dir.path().join("master-key.new");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !staged.exists() {
        assert!(
            rotation.try_wait().unwrap().is_none(),
            "the rotation ended before its write"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no staged key in 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        rotation.try_wait().unwrap().is_none(),
        "the rotation gave up on the held lock instead of waiting"
    );
    holder.execute_batch("COMMIT").unwrap();
    let rotated = rotation.wait_with_output().unwrap();
    assert!(
        rotated.status.success(),
        "rotate-master-key failed ({}); stderr:\n{}",
        rotated.status,
        String::from_utf8_lossy(&rotated.stderr),
    );
}
