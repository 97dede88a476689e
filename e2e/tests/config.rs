//! End to end: the servers take their options from a TOML file, environment variables and
//! flags, in that rising order of precedence, and refuse a bad file with one readable line.

use crate::common;

use std::time::Duration;

use common::free_port;
use sluice_e2e::process::{spawn, workspace_bin};

const START: Duration = Duration::from_secs(30);

/// Starts `bin` and returns the port its `listener` reports, then stops it.
async fn listening_port(
    bin: &str,
    listener: &str,
    args: &[String],
    envs: &[(&str, String)],
) -> u16 {
    let mut child = spawn(
        workspace_bin(bin),
        args,
        envs.iter().map(|(k, v)| (*k, v.as_str())),
    )
    .unwrap();
    let addr = child.wait_for_listening(listener, START).await.unwrap();
    child.terminate().await.unwrap();
    child.wait().await.unwrap();
    addr.port()
}

/// Every line the process wrote, once both its pipes have closed (`wait` can return before
/// the harness has read the last lines).
async fn output_to_the_end(child: &sluice_e2e::process::Child) -> Vec<String> {
    // Nothing matches, so this returns when the output ends (or at the timeout).
    let _ = child
        .wait_for_line("the end of the output", START, |_| None::<()>)
        .await;
    child.output()
}

#[tokio::test]
async fn the_data_plane_takes_flags_over_environment_over_file_over_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let (file_port, env_port, flag_port) = (free_port(), free_port(), free_port());
    let file = dir.path().join("sluice-proxy.toml");
    std::fs::write(
        &file,
        format!(
            "# a data plane\ncontrol_plane = \"http://127.0.0.1:{}\"\nlisten = \"127.0.0.1:{file_port}\"\n\
             drain-timeout = \"2s\"\nnode_id = \"from-file\"\n",
            free_port()
        ),
    )
    .unwrap();
    let token = ("SLUICE_DATAPLANE_TOKEN", "t".repeat(32));
    let config = ("SLUICE_CONFIG", file.display().to_string());
    let env_listen = ("SLUICE_LISTEN", format!("127.0.0.1:{env_port}"));
    let proxy = |args: Vec<String>, envs: Vec<(&'static str, String)>| async move {
        listening_port("sluice-proxy", "http", &args, &envs).await
    };
    assert_eq!(
        proxy(vec![], vec![token.clone(), config.clone()]).await,
        file_port,
        "the file (named by SLUICE_CONFIG) beats the default"
    );
    assert_eq!(
        proxy(vec![], vec![token.clone(), config, env_listen.clone()]).await,
        env_port,
        "the environment beats the file"
    );
    let args = vec![
        "--config".to_owned(),
        file.display().to_string(),
        "--listen".to_owned(),
        format!("127.0.0.1:{flag_port}"),
    ];
    assert_eq!(
        proxy(args, vec![token, env_listen]).await,
        flag_port,
        "the command line beats the environment"
    );
}

#[tokio::test]
async fn the_control_plane_reads_its_file_and_refuses_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_port(), free_port());
    let file = dir.path().join("sluice-control.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = \"{}\"\ngrpc_listen = \"127.0.0.1:{grpc}\"\nhttp-listen = \"127.0.0.1:{http}\"\nlog_format = \"json\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = spawn(
        workspace_bin("sluice-control"),
        ["--config", file.to_str().unwrap()],
        [
            ("SLUICE_ADMIN_TOKEN", "a".repeat(32)),
            ("SLUICE_DATAPLANE_TOKEN", "d".repeat(32)),
        ],
    )
    .unwrap();
    assert_eq!(
        child
            .wait_for_listening("grpc", START)
            .await
            .unwrap()
            .port(),
        grpc
    );
    assert_eq!(
        child
            .wait_for_listening("http", START)
            .await
            .unwrap()
            .port(),
        http
    );
    assert!(
        child.output().iter().any(|l| l.starts_with('{')),
        "log_format from the file"
    );
    assert!(dir.path().join("data/sluice.db").exists());
    child.terminate().await.unwrap();
    assert!(child.wait().await.unwrap().success());

    // A misspelt key: exit 2 and one line naming the key and the file.
    std::fs::write(&file, "grpc_listn = \"127.0.0.1:1\"\n").unwrap();
    for bin in ["sluice-control", "sluice-proxy"] {
        let mut child = spawn(
            workspace_bin(bin),
            ["--config", file.to_str().unwrap()],
            [("SLUICE_DATAPLANE_TOKEN", "d".repeat(32))],
        )
        .unwrap();
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(2), "{bin}");
        let output = output_to_the_end(&child).await;
        assert_eq!(output.len(), 1, "{bin}: {output:?}");
        assert!(output[0].contains("unknown key `grpc_listn`"), "{output:?}");
        assert!(output[0].contains("sluice-control.toml"), "{output:?}");
    }
}

/// A timeout of zero does not mean "off" (as in Go's and Node's servers) but would close every
/// connection at once or cut every stream: both servers refuse it at start, naming the flag,
/// whether it came as a flag, from the environment or from the file.
#[tokio::test]
async fn a_zero_timeout_is_refused_at_start_naming_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sluice.toml");
    std::fs::write(&file, "write_timeout = \"0s\"\n").unwrap();
    // (binary, flag, where the zero comes from)
    let cases = [
        ("sluice-proxy", "--header-read-timeout", "flag"),
        ("sluice-proxy", "--body-read-timeout", "env"),
        ("sluice-proxy", "--write-timeout", "file"),
        ("sluice-proxy", "--usage-spool-sync-interval", "flag"),
        ("sluice-control", "--http-write-timeout", "flag"),
        ("sluice-control", "--grpc-first-request-timeout", "env"),
    ];
    for (bin, flag, via) in cases {
        let mut env = vec![
            ("SLUICE_DATAPLANE_TOKEN".to_owned(), "d".repeat(32)),
            ("SLUICE_ADMIN_TOKEN".to_owned(), "a".repeat(32)),
        ];
        let args = match via {
            "flag" => vec![flag.to_owned(), "0s".to_owned()],
            "env" => {
                let name = format!("SLUICE_{}", flag[2..].replace('-', "_").to_uppercase());
                env.push((name, "0ms".to_owned()));
                Vec::new()
            }
            _ => vec!["--config".to_owned(), file.to_str().unwrap().to_owned()],
        };
        let mut child = spawn(workspace_bin(bin), args, env).unwrap();
        let status = tokio::time::timeout(START, child.wait())
            .await
            .unwrap_or_else(|_| panic!("{bin} started with {flag} at 0 ({via})"))
            .unwrap();
        assert_eq!(status.code(), Some(2), "{bin} {flag} ({via})");
        let output = output_to_the_end(&child).await;
        assert!(
            output[0].contains(flag) && output[0].contains("must be more than 0"),
            "{bin} ({via}): {output:?}"
        );
    }
}

/// A connection limit the open-files limit cannot serve (each request also holds an upstream
/// connection) is named at start with both numbers, rather than found when clients hang in
/// the listen queue; within half the limit, nothing is said.
#[tokio::test]
async fn a_connection_limit_past_half_the_open_files_limit_is_warned_of() {
    for (connections, warned) in [(600, true), (400, false)] {
        let child = spawn(
            "/bin/sh",
            [
                "-c".to_owned(),
                "ulimit -n 1024 && exec \"$0\" \"$@\"".to_owned(),
                workspace_bin("sluice-proxy").display().to_string(),
                "--listen".to_owned(),
                "127.0.0.1:0".to_owned(),
                "--max-connections".to_owned(),
                connections.to_string(),
            ],
            [("SLUICE_DATAPLANE_TOKEN", "d".repeat(32))],
        )
        .unwrap();
        child.wait_for_listening("http", START).await.unwrap();
        let warning = child
            .output()
            .into_iter()
            .find(|l| l.contains("--max-connections is more than half the open-files limit"));
        assert_eq!(warning.is_some(), warned, "{:?}", child.output());
        if let Some(line) = warning {
            assert!(
                line.contains("max_connections=600") && line.contains("open_files_limit=1024"),
                "{line}"
            );
        }
        child.terminate().await.unwrap();
    }
}

/// Secrets stay out of the file: it names the files that hold them, and the control plane
/// answers with exactly the token read from there.
#[tokio::test]
async fn the_control_plane_reads_its_tokens_from_files_the_config_names() {
    let dir = tempfile::tempdir().unwrap();
    let (admin_file, dataplane_file) = (dir.path().join("admin"), dir.path().join("dataplane"));
    std::fs::write(&admin_file, "admin-token-from-a-file-0123456789ab\n").unwrap();
    std::fs::write(&dataplane_file, "dataplane-token-from-a-file-01234567\n").unwrap();
    let file = dir.path().join("sluice-control.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = \"{}\"\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\
             admin_token_file = \"{}\"\ndataplane-token-file = \"{}\"\n",
            dir.path().join("data").display(),
            admin_file.display(),
            dataplane_file.display()
        ),
    )
    .unwrap();
    let no_env: [(&str, &str); 0] = [];
    let mut child = spawn(
        workspace_bin("sluice-control"),
        ["--config", file.to_str().unwrap()],
        no_env,
    )
    .unwrap();
    let http = child.wait_for_listening("http", START).await.unwrap();
    let list = |token: &'static str| {
        common::http_client()
            .post(format!(
                "http://{http}/api/sluice.v1.AdminService/ListBackends"
            ))
            .bearer_auth(token)
            .body("{}")
            .send()
    };
    assert_eq!(
        list("admin-token-from-a-file-0123456789ab")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(list("some-other-token").await.unwrap().status(), 401);
    assert!(
        !dir.path().join("data/admin-token").exists(),
        "no token generated when a file is named"
    );
    assert!(!dir.path().join("data/dataplane-token").exists());
    child.terminate().await.unwrap();
    assert!(child.wait().await.unwrap().success());
    assert!(
        !output_to_the_end(&child)
            .await
            .iter()
            .any(|l| l.contains("token-from-a-file")),
        "tokens never logged"
    );
}

/// The example files in `deploy/` are complete and valid: each binary starts from its file,
/// with only the paths and addresses that differ on a test machine overridden.
#[tokio::test]
async fn the_example_files_in_deploy_start_the_servers() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let control = root.join("deploy/sluice-control.toml");
    let grpc = listening_port(
        "sluice-control",
        "grpc",
        &[
            "--config".to_owned(),
            control.display().to_string(),
            "--data-dir".to_owned(),
            dir.path().join("data").display().to_string(),
            "--grpc-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--http-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ],
        &[],
    )
    .await;
    assert_ne!(grpc, 0);
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{}\n", "t".repeat(32))).unwrap();
    let proxy = root.join("deploy/sluice-proxy.toml");
    let http = listening_port(
        "sluice-proxy",
        "http",
        &[
            "--config".to_owned(),
            proxy.display().to_string(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--dataplane-token-file".to_owned(),
            token.display().to_string(),
            "--data-dir".to_owned(),
            dir.path().join("proxy").display().to_string(),
        ],
        &[],
    )
    .await;
    assert_ne!(http, 0);
    assert!(
        dir.path().join("proxy/usage-spool").is_dir(),
        "the example keeps a usage spool"
    );
}

/// A CA and a certificate it signed for 127.0.0.1, made with the `openssl` command:
/// `(ca.pem, server.pem, server.key)` in `dir`.
fn tls_files(dir: &std::path::Path) -> (String, String, String) {
    let path = |name: &str| dir.join(name).display().to_string();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("the openssl command (run e2e/test-all.sh)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(path("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=sluice test CA",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &path("server.key"),
        "-out",
        &path("server.csr"),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path("server.csr"),
        "-CA",
        &path("ca.pem"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &path("san.ext"),
        "-out",
        &path("server.pem"),
    ]);
    (path("ca.pem"), path("server.pem"), path("server.key"))
}

/// A control plane serving gRPC over TLS: a data plane reaches it over `https://` with the
/// CA given (`--control-plane-ca`), or without one when the CA is among the system's roots
/// (here through `SSL_CERT_FILE`, which the system's root store reads; tonic trusts no root
/// by default, and the data plane used to connect with none). A CA given for an `http://`
/// URL would be ignored and the token and snapshots sent in clear: refused at start, one line.
#[tokio::test]
async fn a_data_plane_reaches_a_tls_control_plane_with_its_ca_or_the_systems_roots() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(dir.path());
    let cluster = common::Cluster::start_with(&["--tls-cert", &cert, "--tls-key", &key]).await;
    let https = format!("https://127.0.0.1:{}", cluster.grpc_port);
    let with_ca = cluster
        .proxy_via(&https, &["--control-plane-ca", &ca], &[])
        .await;
    let system_roots = cluster
        .proxy_via(&https, &[], &[("SSL_CERT_FILE", ca.as_str())])
        .await;
    drop((with_ca, system_roots));

    let mut child = spawn(
        workspace_bin("sluice-proxy"),
        [
            "--listen",
            "127.0.0.1:0",
            "--control-plane",
            &format!("http://127.0.0.1:{}", cluster.grpc_port),
            "--control-plane-ca",
            &ca,
        ],
        [("SLUICE_DATAPLANE_TOKEN", common::DATAPLANE_TOKEN)],
    )
    .unwrap();
    let status = tokio::time::timeout(START, child.wait())
        .await
        .expect("refused at start")
        .unwrap();
    assert!(!status.success());
    let output = output_to_the_end(&child).await;
    assert_eq!(output.len(), 1, "{output:?}");
    assert!(
        output[0].contains("--control-plane-ca needs an https:// control plane URL"),
        "{output:?}"
    );
}

/// A file key that its environment variable overrides is not applied, as documented, and
/// each server says so once it logs, naming the file's key and the variable: a `data_dir` in
/// the file lost to a `SLUICE_DATA_DIR` set elsewhere (the Docker image set one) put the
/// database where nobody looked, without a word.
#[tokio::test]
async fn a_file_key_the_environment_overrides_is_logged_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (file_data, env_data) = (dir.path().join("file-data"), dir.path().join("env-data"));
    let file = dir.path().join("sluice-control.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = \"{}\"\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n",
            file_data.display()
        ),
    )
    .unwrap();
    let mut child = spawn(
        workspace_bin("sluice-control"),
        ["--config", file.to_str().unwrap()],
        [
            ("SLUICE_ADMIN_TOKEN", "a".repeat(32)),
            ("SLUICE_DATAPLANE_TOKEN", "d".repeat(32)),
            ("SLUICE_DATA_DIR", env_data.display().to_string()),
        ],
    )
    .unwrap();
    child.wait_for_listening("http", START).await.unwrap();
    assert!(env_data.join("sluice.db").exists(), "the environment wins");
    assert!(!file_data.exists());
    child.terminate().await.unwrap();
    assert!(child.wait().await.unwrap().success());
    let output = output_to_the_end(&child).await;
    let notices: Vec<&String> = output.iter().filter(|l| l.contains("is ignored")).collect();
    assert_eq!(
        notices.len(),
        1,
        "one notice, for data_dir only: {output:?}"
    );
    for part in ["data_dir", "SLUICE_DATA_DIR", "sluice-control.toml"] {
        assert!(notices[0].contains(part), "{part} in {notices:?}");
    }

    // The data plane alike, for its listen address.
    let file = dir.path().join("sluice-proxy.toml");
    std::fs::write(
        &file,
        format!(
            "control_plane = \"http://127.0.0.1:{}\"\nlisten = \"127.0.0.1:{}\"\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let port = free_port();
    let mut child = spawn(
        workspace_bin("sluice-proxy"),
        ["--config", file.to_str().unwrap()],
        [
            ("SLUICE_DATAPLANE_TOKEN", "d".repeat(32)),
            ("SLUICE_LISTEN", format!("127.0.0.1:{port}")),
        ],
    )
    .unwrap();
    assert_eq!(
        child
            .wait_for_listening("http", START)
            .await
            .unwrap()
            .port(),
        port
    );
    child.terminate().await.unwrap();
    child.wait().await.unwrap();
    let output = output_to_the_end(&child).await;
    let notices: Vec<&String> = output.iter().filter(|l| l.contains("is ignored")).collect();
    assert_eq!(notices.len(), 1, "one notice, for listen only: {output:?}");
    for part in ["listen", "SLUICE_LISTEN", "sluice-proxy.toml"] {
        assert!(notices[0].contains(part), "{part} in {notices:?}");
    }
}

/// A data directory the control plane's user may write but not chmod (a Kubernetes volume's
/// root: owned by root, its group the pod's `fsGroup`, mode 2775) is used as it is, with a
/// warning; refusing it (the chmod to 0700 failed with EPERM) left the control plane
/// crash-looping on a volume it could use. It needs root to make such a directory, and runs
/// the control plane as another user with `setpriv` (util-linux).
#[tokio::test]
async fn the_control_plane_uses_a_data_directory_it_may_write_but_not_chmod() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let dir = tempfile::tempdir().unwrap();
    // As every test that needs a tool: it fails, saying what it needs, rather than pass
    // unrun (cargo shows a skipped test's line only when it fails).
    assert_eq!(
        std::fs::metadata(dir.path()).unwrap().uid(),
        0,
        "making a directory another user may write but not chmod needs root: run the tests as root (e2e/test-all.sh, CI)"
    );
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(0), Some(10001)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o2775)).unwrap();
    let bin = workspace_bin("sluice-control");
    let mut child = spawn(
        "setpriv",
        [
            "--reuid",
            "10001",
            "--regid",
            "10001",
            "--clear-groups",
            bin.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        [
            ("SLUICE_ADMIN_TOKEN", "a".repeat(32)),
            ("SLUICE_DATAPLANE_TOKEN", "d".repeat(32)),
        ],
    )
    .unwrap();
    child.wait_for_listening("grpc", START).await.unwrap();
    assert!(data.join("sluice.db").exists());
    assert!(
        child.output().iter().any(|l| l.contains("used as it is")),
        "{:?}",
        child.output()
    );
    child.terminate().await.unwrap();
    assert!(child.wait().await.unwrap().success());
}

/// A database the control plane's user may not write (a restore copied as root into a volume
/// the control plane runs on as uid 10001) stops it with one line that names the file, its
/// owner and the user, and says what to do: it said "attempt to write a readonly database"
/// three times and nothing else. Needs root, as the test above.
#[tokio::test]
async fn a_database_the_control_plane_may_not_write_is_named_with_its_owner() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        std::fs::metadata(dir.path()).unwrap().uid(),
        0,
        "giving a file to root under another user's directory needs root: run the tests as root (e2e/test-all.sh, CI)"
    );
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let bin = workspace_bin("sluice-control");
    let envs = [
        ("SLUICE_ADMIN_TOKEN", "a".repeat(32)),
        ("SLUICE_DATAPLANE_TOKEN", "d".repeat(32)),
        (
            "SLUICE_MASTER_KEY",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned(),
        ),
    ];
    let args = |data: &std::path::Path| {
        vec![
            "--data-dir".to_owned(),
            data.display().to_string(),
            "--grpc-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--http-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ]
    };
    // The database made by root, as a restore copied as root leaves it.
    let mut child = spawn(&bin, args(&data), envs.clone()).unwrap();
    child.wait_for_listening("grpc", START).await.unwrap();
    child.terminate().await.unwrap();
    assert!(child.wait().await.unwrap().success());
    // The directory and all in it the control plane's user's, but the restored file.
    let db = data.join("sluice.db");
    for entry in walk(&data) {
        if entry != db {
            std::os::unix::fs::chown(&entry, Some(10001), Some(10001)).unwrap();
        }
    }
    assert_eq!(std::fs::metadata(&db).unwrap().uid(), 0);
    let mut setpriv = vec![
        "--reuid".to_owned(),
        "10001".to_owned(),
        "--regid".to_owned(),
        "10001".to_owned(),
        "--clear-groups".to_owned(),
        bin.display().to_string(),
    ];
    setpriv.extend(args(&data));
    let mut child = spawn("setpriv", setpriv, envs).unwrap();
    let status = tokio::time::timeout(START, child.wait())
        .await
        .expect("it stops")
        .unwrap();
    assert!(!status.success());
    let output = output_to_the_end(&child).await;
    let last = output.last().unwrap();
    for part in [
        db.display().to_string(),
        "owned by uid 0".to_owned(),
        "uid 10001".to_owned(),
        "chown 10001".to_owned(),
    ] {
        assert!(last.contains(&part), "{part} in {last}");
    }
    assert_eq!(
        last.matches("readonly database").count(),
        1,
        "the cause said once: {last}"
    );
}

/// `dir` and every file and directory under it.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = vec![dir.to_owned()];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}
