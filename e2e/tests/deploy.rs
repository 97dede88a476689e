//! The deployment files are valid: Kubernetes manifests against the Kubernetes
//! schemas (kubernetes-validate, offline), the nginx config by nginx itself.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy")
}

fn validate(files: &[PathBuf]) -> std::process::Output {
    Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(files)
        .output()
        .expect("kubernetes-validate (pip install kubernetes-validate; e2e/test-all.sh does)")
}

#[test]
fn kubernetes_manifests_match_the_schemas() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    // The Secret's example, kept out of the directory that is applied.
    files.push(deploy_dir().join("secret.example.yaml"));
    let output = validate(&files);
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    for kind in [
        "statefulset/sluice-control",
        "service/sluice-control",
        "deployment/sluice-proxy",
        "horizontalpodautoscaler/sluice-proxy",
        "poddisruptionbudget/sluice-proxy",
        "service/sluice-proxy",
        "secret/sluice-secrets",
        "networkpolicy/sluice-control",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{kind} not validated:\n{text}"
        );
    }

    // The validator really checks: a broken copy fails.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yaml");
    let original = std::fs::read_to_string(deploy_dir().join("k8s/data-plane.yaml")).unwrap();
    std::fs::write(
        &broken,
        original.replace("minReplicas: 3", "minReplicas: \"three\""),
    )
    .unwrap();
    assert!(!validate(&[broken]).status.success());
}

#[test]
fn the_nginx_config_is_accepted_by_nginx() {
    let nginx = ["/usr/sbin/nginx", "nginx"]
        .into_iter()
        .find(|n| Command::new(n).arg("-v").output().is_ok())
        .expect("nginx (apt-get install nginx; e2e/test-all.sh does)");
    let dir = tempfile::tempdir().unwrap();
    // Compose service names do not resolve here: point them at loopback.
    let conf = std::fs::read_to_string(deploy_dir().join("nginx.conf"))
        .unwrap()
        .replace("dataplane-1:8080", "127.0.0.1:18081")
        .replace("dataplane-2:8080", "127.0.0.1:18082")
        .replace("dataplane-3:8080", "127.0.0.1:18083");
    let path = dir.path().join("nginx.conf");
    std::fs::write(
        &path,
        format!(
            "pid {}/nginx.pid;\nerror_log stderr;\n{conf}",
            dir.path().display()
        ),
    )
    .unwrap();
    let output = Command::new(nginx)
        .arg("-t")
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The documents of a YAML file under `deploy/`, as JSON.
fn yaml_documents(file: &str) -> Vec<serde_json::Value> {
    let output = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; \
             print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(deploy_dir().join(file))
        .output()
        .expect("python3 with PyYAML (kubernetes-validate depends on it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The data planes' healthcheck in `deploy/compose.yaml` (the `x-dataplane` anchor): Docker's
/// `test` value.
fn compose_healthcheck() -> Vec<String> {
    serde_json::from_value(
        yaml_documents("compose.yaml")[0]["x-dataplane"]["healthcheck"]["test"].clone(),
    )
    .unwrap()
}

/// Answers every connection with `status` once it has read a request head.
fn answer_with(status: &'static str) -> u16 {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    port
}

/// Runs the healthcheck as Docker does in the image (Debian's `/bin/sh` is dash, whatever
/// this machine's is), aimed at `port` instead of the data plane's 8080.
fn run_healthcheck(test: &[String], port: u16) -> std::process::ExitStatus {
    let retarget = |s: &String| s.replace("127.0.0.1/8080", &format!("127.0.0.1/{port}"));
    let mut command = match test.first().map(String::as_str) {
        Some("CMD-SHELL") => {
            let mut c = Command::new("dash");
            c.arg("-c").arg(retarget(&test[1]));
            c
        }
        Some("CMD") => {
            let mut c = Command::new(&test[1]);
            c.args(test[2..].iter().map(retarget));
            c
        }
        other => panic!("a healthcheck test of an unknown form: {other:?}"),
    };
    let mut child = command.spawn().unwrap();
    // Docker's `timeout: 2s`.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return child.wait().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A data plane that answers 200 on `/readyz` passes the compose healthcheck, and one that
/// answers 503 (no snapshot yet) or nothing fails it. Under `CMD-SHELL` the check ran in
/// dash, which has no `/dev/tcp`: it never passed, and the containers stayed unhealthy.
#[test]
fn the_compose_healthcheck_passes_a_ready_data_plane_only() {
    let test = compose_healthcheck();
    let joined = test.join(" ");
    assert!(
        joined.contains("127.0.0.1/8080") && joined.contains("/readyz"),
        "the check asks the data plane's port for /readyz: {test:?}"
    );
    let compose = std::fs::read_to_string(deploy_dir().join("compose.yaml")).unwrap();
    assert!(
        compose.contains("SLUICE_LISTEN: 0.0.0.0:8080"),
        "the data planes listen on the port the check asks"
    );
    let ready = answer_with("200 OK");
    assert!(run_healthcheck(&test, ready).success(), "{test:?}");
    let not_ready = answer_with("503 Service Unavailable");
    assert!(!run_healthcheck(&test, not_ready).success());
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = nobody.local_addr().unwrap().port();
    drop(nobody);
    assert!(!run_healthcheck(&test, closed).success());
}

/// The variables `ENV` sets in a Dockerfile (both `ENV A=1 B=2` and `ENV A 1`).
fn dockerfile_env(text: &str) -> Vec<String> {
    text.replace("\\\n", " ")
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            l.get(..4)
                .filter(|k| k.eq_ignore_ascii_case("ENV "))
                .map(|_| &l[4..])
        })
        .flat_map(|rest| -> Vec<String> {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if words.first().is_some_and(|w| w.contains('=')) {
                words
                    .iter()
                    .filter_map(|w| w.split_once('=').map(|(name, _)| name.to_owned()))
                    .collect()
            } else {
                words.first().map(|w| (*w).to_owned()).into_iter().collect()
            }
        })
        .collect()
}

/// For each long option of `bin`, its environment variable, from `--help`.
fn env_of_options(bin: &str) -> std::collections::HashMap<String, String> {
    let output = Command::new(sluice_e2e::process::workspace_bin(bin))
        .arg("--help")
        .output()
        .unwrap();
    let mut map = std::collections::HashMap::new();
    let mut option = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let line = line.trim();
        if let Some(rest) = line.split("--").nth(1).filter(|_| line.starts_with('-')) {
            option = rest.split([' ', '=', '<']).next().map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix("[env: ")
            && let (Some(option), Some((name, _))) = (&option, rest.split_once('='))
        {
            map.insert(option.clone(), name.to_owned());
        }
    }
    map
}

/// The image sets no variable that stands for a key of the example configuration files: the
/// environment beats the file, so `ENV SLUICE_DATA_DIR` in the image made a mounted file's
/// `data_dir` ignored, and the database went into the container's own layer, lost when it
/// was recreated. compose.yaml and the Kubernetes manifests set what they need themselves.
#[test]
fn the_image_sets_no_variable_that_overrides_the_example_files() {
    let image_env =
        dockerfile_env(&std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap());
    for (bin, file) in [
        ("sluice-control", "sluice-control.toml"),
        ("sluice-proxy", "sluice-proxy.toml"),
    ] {
        let env = env_of_options(bin);
        assert_eq!(
            env.get("data-dir").map(String::as_str),
            Some(match bin {
                "sluice-control" => "SLUICE_DATA_DIR",
                _ => "SLUICE_PROXY_DATA_DIR",
            }),
            "{bin} --help names its variables: {env:?}"
        );
        let table: toml::Table = std::fs::read_to_string(deploy_dir().join(file))
            .unwrap()
            .parse()
            .unwrap();
        for key in table.keys() {
            let variable = env
                .get(&key.replace('_', "-"))
                .unwrap_or_else(|| panic!("{file}: `{key}` has no variable"));
            assert!(
                !image_env.contains(variable),
                "the Dockerfile sets {variable}, which overrides `{key}` in {file}"
            );
        }
    }
    // The check itself finds what the image used to set.
    assert_eq!(
        dockerfile_env("FROM x\nENV SLUICE_DATA_DIR=/var/lib/sluice/data A=1\nENV B 2\n"),
        ["SLUICE_DATA_DIR", "A", "B"]
    );
}

/// Seconds in a duration such as `30s` or `45`.
fn seconds(value: &serde_json::Value) -> u64 {
    value
        .as_u64()
        .or_else(|| value.as_str()?.trim_end_matches('s').parse().ok())
        .unwrap_or_else(|| panic!("not a number of seconds: {value}"))
}

/// The longest a data plane takes to stop after SIGTERM with the given drain delay, drain
/// and usage flush timeouts: the lame duck, the drain, its serving threads' runtimes' 1 s,
/// the stream relays' 5 s (`RELAY_WAIT`), the snapshot stream's close (`SUBSCRIBER_WAIT`,
/// 2 s), then the flush (data-plane/src/server.rs).
fn data_plane_stop(delay: u64, drain: u64, flush: u64) -> u64 {
    delay + drain + 1 + 5 + 2 + flush
}

/// The grace periods the deployments give a data plane cover the whole of its stop, so that
/// it is not SIGKILLed while it still reports its last usage. The Kubernetes one counts from
/// the preStop hook, before SIGTERM: 45 s left 40 s of the up to 46 s the stop can take.
#[test]
fn the_grace_periods_cover_a_data_planes_whole_stop() {
    let deployment = yaml_documents("k8s/data-plane.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    let flag = |name: &str, default: u64| {
        args.iter()
            .position(|a| *a == name)
            .map_or(default, |i| seconds(&serde_json::json!(args[i + 1])))
    };
    let defaults = (
        default_seconds("sluice-proxy", "drain-delay"),
        default_seconds("sluice-proxy", "drain-timeout"),
        default_seconds("sluice-proxy", "usage-flush-timeout"),
    );
    let (delay, drain, flush) = (
        flag("--drain-delay", defaults.0),
        flag("--drain-timeout", defaults.1),
        flag("--usage-flush-timeout", defaults.2),
    );
    assert!(
        !container["env"].to_string().contains("DRAIN_")
            && !container["env"].to_string().contains("USAGE_FLUSH_TIMEOUT"),
        "the manifest sets a timeout in the environment: count it here"
    );
    let pre_stop = seconds(&container["lifecycle"]["preStop"]["sleep"]["seconds"]);
    let grace = seconds(&pod["terminationGracePeriodSeconds"]);
    assert!(
        grace >= pre_stop + data_plane_stop(delay, drain, flush),
        "Kubernetes: {grace} s of grace for a {pre_stop} s preStop and a stop of up to {} s",
        data_plane_stop(delay, drain, flush)
    );
    // Cluster Autoscaler evicts the pods of a node it removes with at most 600 s of grace
    // (`--max-graceful-termination-sec`'s default): past it the pod is killed mid-drain and
    // its unacked usage goes with its emptyDir.
    assert!(
        grace <= 600,
        "Kubernetes: {grace} s of grace is past the 600 s Cluster Autoscaler gives"
    );
    // The drain lets in-flight requests finish: all of the default request_timeout (a stop
    // then cuts no request the provider is generating, which the SDKs send again), or, where
    // that would pass those 600 s, all the 600 s leave.
    let request_timeout = sluice_domain::settings::defaults()
        .request_timeout
        .unwrap()
        .seconds as u64;
    let most = 600 - pre_stop - data_plane_stop(delay, 0, flush);
    assert!(
        drain >= request_timeout.min(most),
        "drain {drain} s: request_timeout is {request_timeout} s, and 600 s leave {most} s"
    );

    let compose = &yaml_documents("compose.yaml")[0]["x-dataplane"];
    assert!(
        !compose.to_string().contains("DRAIN_") && !compose.to_string().contains("FLUSH"),
        "the defaults"
    );
    let grace = seconds(&compose["stop_grace_period"]);
    let stop = data_plane_stop(defaults.0, defaults.1, defaults.2);
    assert!(
        grace >= stop,
        "compose: {grace} s of grace for a stop of up to {stop} s"
    );
}

/// The default of `--option` in `bin --help`, in seconds.
fn default_seconds(bin: &str, option: &str) -> u64 {
    let output = Command::new(sluice_e2e::process::workspace_bin(bin))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout).into_owned();
    let after = help
        .split_once(&format!("--{option} "))
        .unwrap_or_else(|| panic!("{bin} --help has no --{option}"))
        .1;
    let default = after
        .split_once("[default: ")
        .and_then(|(_, rest)| rest.split_once(']'))
        .unwrap()
        .0;
    humantime::parse_duration(default).unwrap().as_secs()
}

/// The `keepalive_timeout` of each `upstream` block in `text`, in seconds (None where a block
/// has none: nginx's default is 60 s).
fn upstream_keepalive_timeouts(text: &str) -> Vec<Option<u64>> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if !(line.starts_with("upstream ") && line.ends_with('{')) {
            continue;
        }
        let timeout = lines
            .by_ref()
            .take_while(|l| *l != "}")
            .filter_map(|l| l.strip_prefix("keepalive_timeout "))
            .map(|v| {
                v.trim_end_matches(';')
                    .trim_end_matches('s')
                    .parse()
                    .unwrap()
            })
            .last();
        blocks.push(timeout);
    }
    blocks
}

/// nginx closes an idle kept-alive connection to a data plane before the data plane does:
/// the data plane closes one after --idle-timeout (75 s) without a request, and a request
/// nginx sent on a connection just being closed would fail (a 502, as nginx does not resend a
/// POST). Both the compose config and the one run.sh writes.
#[test]
fn nginx_lets_go_of_idle_connections_before_the_data_planes_do() {
    let sluice = default_seconds("sluice-proxy", "idle-timeout");
    for file in ["nginx.conf", "local/run.sh"] {
        let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
        let timeouts = upstream_keepalive_timeouts(&text);
        assert_eq!(timeouts.len(), 1, "{file}: one upstream block");
        let nginx = timeouts[0].unwrap_or(60);
        assert!(
            nginx + 5 <= sluice,
            "{file}: nginx keeps idle connections {nginx} s, the data planes {sluice} s"
        );
    }
}

/// At `--max-connections` a data plane answers every new connection 503 and closes it, the
/// kubelet's probes included. The liveness probe of `deploy/k8s/data-plane.yaml`, run as the
/// kubelet runs it, must still pass against a replica at its limit: a failing one restarts
/// the pod, dropping every connection it serves, and a client holding the limit's connections
/// open could restart every pod. (`GET /healthz` failed here with the 503; a TCP connect
/// passes.)
#[tokio::test]
async fn the_kubernetes_liveness_probe_passes_a_data_plane_at_its_connection_limit() {
    let documents = yaml_documents("k8s/data-plane.yaml");
    let probe = documents
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .and_then(|d| d["spec"]["template"]["spec"]["containers"][0].get("livenessProbe"))
        .cloned()
        .expect("the data plane's liveness probe");
    let cluster = common::Cluster::start().await;
    let proxy = cluster.proxy_with(&["--max-connections", "2"]).await;
    // Connections held open until one more is answered 503: the replica is at its limit.
    let mut held = Vec::new();
    loop {
        use tokio::io::AsyncReadExt as _;
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let mut answer = [0; 12];
        let wait = std::time::Duration::from_millis(500);
        match tokio::time::timeout(wait, tcp.read(&mut answer)).await {
            Ok(Ok(n)) if answer[..n].starts_with(b"HTTP/1.1 503") => break,
            _ => held.push(tcp),
        }
        assert!(held.len() <= 4, "never refused past --max-connections 2");
    }
    let passed = if probe.get("tcpSocket").is_some() {
        tokio::net::TcpStream::connect(proxy.addr).await.is_ok()
    } else if let Some(get) = probe.get("httpGet") {
        let path = get["path"].as_str().unwrap();
        match reqwest::get(format!("http://{}{path}", proxy.addr)).await {
            Ok(answer) => (200..400).contains(&answer.status().as_u16()),
            Err(_) => false,
        }
    } else {
        panic!("a liveness probe of another kind: {probe}");
    };
    assert!(passed, "the liveness probe {probe} fails a busy replica");
    drop(held);
}

/// The control plane opens its gRPC port only once its database is migrated, and an upgrade
/// that rebuilds the statistics tables (migrations 0002, 0003 and 0007 copy every row of them)
/// takes minutes on a large database. Its liveness probe gives up after 3 × 10 s; a startup
/// probe holds it off while the pod starts, for 15 minutes.
#[test]
fn the_control_plane_has_minutes_to_migrate_before_its_liveness_probe_counts() {
    let statefulset = yaml_documents("k8s/control-plane.yaml")
        .into_iter()
        .find(|d| d["kind"] == "StatefulSet")
        .unwrap();
    let container = &statefulset["spec"]["template"]["spec"]["containers"][0];
    let startup = &container["startupProbe"];
    assert_eq!(
        startup["grpc"], container["livenessProbe"]["grpc"],
        "the startup probe asks what the liveness probe asks"
    );
    let budget = seconds(&startup["periodSeconds"]) * seconds(&startup["failureThreshold"]);
    assert!(
        budget >= 15 * 60,
        "{budget} s for the control plane to migrate and open its port"
    );
}

/// The shipped manifests run the control plane on a read-only root filesystem: no `/tmp`,
/// `/var/tmp` or working directory it may write to, where SQLite would put the temporary file
/// of a sort larger than about 2 MB (every key ordered for a snapshot, past some 20,000 keys;
/// statistics grouped over a day of many keys). Such a sort failed with `disk I/O error`, and
/// the control plane could not start. It writes them in its data directory.
///
/// Runs the control plane in a mount namespace of its own (`unshare -m`, as root: CI runs
/// as root) with read-only file systems over those directories.
#[tokio::test]
async fn the_control_plane_sorts_without_a_writable_temp_directory() {
    use sluice_control::crypto::MasterKey;
    use sluice_control::store::Store;
    const KEYS: usize = 25_000;
    // Not under /tmp, which the control plane will not see.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let key = MasterKey::generate();
    std::fs::write(data.join("master-key"), key.to_base64()).unwrap();
    drop(Store::open(&data.join("sluice.db"), key).unwrap());
    sluice_control::testing::insert_client_keys(
        &data.join("sluice.db"),
        KEYS,
        |k| format!("a key named at some length, number {k:>12}"),
        |k| format!("sk-sluice-read-only-root-{k}"),
    )
    .unwrap();
    let read_only = dir.path().join("read-only");
    std::fs::create_dir_all(&read_only).unwrap();
    let grpc_port = common::free_port();
    let script = r#"set -e
        unset TMPDIR SQLITE_TMPDIR
        for d in /tmp /var/tmp "$RO"; do mount -t tmpfs -o ro tmpfs "$d"; done
        cd "$RO"
        exec "$@""#;
    let control = sluice_e2e::process::spawn(
        "unshare",
        [
            "-m".to_owned(),
            "sh".to_owned(),
            "-c".to_owned(),
            script.to_owned(),
            "sh".to_owned(),
            sluice_e2e::process::workspace_bin("sluice-control")
                .display()
                .to_string(),
            "--data-dir".to_owned(),
            data.display().to_string(),
            "--grpc-listen".to_owned(),
            format!("127.0.0.1:{grpc_port}"),
            "--http-listen".to_owned(),
            "127.0.0.1:0".to_owned(),
        ],
        [
            ("RO", read_only.display().to_string()),
            ("SLUICE_ADMIN_TOKEN", common::ADMIN_TOKEN.to_owned()),
            ("SLUICE_DATAPLANE_TOKEN", common::DATAPLANE_TOKEN.to_owned()),
        ],
    )
    .unwrap();
    let started = control
        .wait_for_listening("grpc", std::time::Duration::from_secs(60))
        .await;
    assert!(
        started.is_ok(),
        "the control plane did not start: {:#?}",
        control.output()
    );
    let api = common::ControlApi {
        url: format!("http://127.0.0.1:{grpc_port}"),
    };
    let listed = api
        .admin()
        .await
        .max_decoding_message_size(64 << 20)
        .list_client_keys(sluice_proto::v1::ListClientKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.client_keys.len(), KEYS);
    control.terminate().await.unwrap();
}

/// Bytes of a Kubernetes quantity (`512Mi`, `1Gi`, `134217728`).
fn quantity_bytes(quantity: &str) -> u64 {
    let units = [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)];
    for (suffix, unit) in units {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap() * unit;
        }
    }
    quantity.parse().unwrap()
}

/// While it publishes a change the control plane holds, per connected data plane, the
/// stream's copy of the snapshot's encoding and the backends' part encoded for it: 2–4
/// snapshots per replica at the peak (an audit measured 1,034 MiB at 14 replicas and a 21 MB
/// snapshot, over the 1 GiB the manifest then set). Its memory limit must hold that for as many
/// replicas as the data planes' HPA may run, at the largest supported configuration's
/// snapshot (docs/guarantees.md: 17–24 MiB), or a burst of admin writes gets it OOM-killed.
#[test]
fn the_control_planes_memory_limit_holds_the_hpas_replicas() {
    let statefulset = yaml_documents("k8s/control-plane.yaml")
        .into_iter()
        .find(|d| d["kind"] == "StatefulSet")
        .expect("the control plane's StatefulSet");
    let container = &statefulset["spec"]["template"]["spec"]["containers"][0];
    let limit = quantity_bytes(container["resources"]["limits"]["memory"].as_str().unwrap());
    let hpa = yaml_documents("k8s/data-plane.yaml")
        .into_iter()
        .find(|d| d["kind"] == "HorizontalPodAutoscaler")
        .expect("the data planes' HPA");
    let replicas = hpa["spec"]["maxReplicas"].as_u64().unwrap();
    let needed = (200 << 20) + replicas * 3 * (24 << 20);
    assert!(
        limit >= needed,
        "{limit} bytes for {replicas} replicas, which may need {needed}"
    );
}

/// The data plane holds request bodies in memory up to `--max-buffered-body-bytes` (each up
/// to twice), whole answers and streams' large events up to `--max-buffered-answer-bytes`,
/// its own answers on HTTP/2 up to one key's share of that, a connection its request head and
/// a small answer or a stream's small event, and a restart replays its
/// spool into memory (up to 75 MB at the default). Its pod's memory limit must hold that,
/// or the kernel kills the pod, every request on it with it, before the 503 `server_busy`
/// that bound promises; the limit was once that bound itself.
#[test]
fn the_data_planes_memory_limit_holds_what_it_may_buffer() {
    let deployment = yaml_documents("k8s/data-plane.yaml")
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("the data plane's Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let limit = quantity_bytes(container["resources"]["limits"]["memory"].as_str().unwrap());
    let env = |name: &str| {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap().parse::<u64>().unwrap())
            .unwrap_or_else(|| panic!("the manifest states {name} beside its memory limit"))
    };
    let bodies = env("SLUICE_MAX_BUFFERED_BODY_BYTES");
    let answers = env("SLUICE_MAX_BUFFERED_ANSWER_BYTES");
    // The replica's own answers on HTTP/2 (errors, model lists, /metrics) have a pool of one
    // key's share of the answers.
    let mut config = sluice_proxy::Config::new("http://cp", ([0, 0, 0, 0], 8080).into());
    config.max_buffered_answer_bytes = usize::try_from(answers).unwrap();
    let own = config.answers_per_key() as u64;
    // Each connection may hold a request head of up to the listener's bound until it ends,
    // and on HTTP/1 an answer of up to 64 KiB or a stream's small event, uncounted.
    let heads = env("SLUICE_MAX_CONNECTIONS")
        * (sluice_listener::MAX_HEAD_BYTES + sluice_proxy::answer_memory::UNCOUNTED_STREAM_BYTES)
            as u64;
    assert!(
        limit >= 2 * bodies + answers + own + heads + (128 << 20),
        "a memory limit of {limit} bytes cannot hold twice {bodies} bytes of bodies, \
         {answers} of answers, {own} of the replica's own answers, {heads} of request heads \
         and small answers, and 128 MiB"
    );
}

/// The control plane's gRPC port streams every provider key to whoever holds the data-plane
/// token; the manifests let only data planes (and pods labelled as admin tools) reach it.
#[test]
fn only_data_planes_and_admin_tools_reach_the_control_planes_grpc_port() {
    let documents = yaml_documents("k8s/control-plane.yaml");
    let policy = documents
        .iter()
        .find(|d| d["kind"] == "NetworkPolicy")
        .expect("a NetworkPolicy for the control plane");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "control-plane"
    );
    let grpc_rules: Vec<&serde_json::Value> = policy["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|rule| {
            rule["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["port"] == "grpc")
        })
        .collect();
    assert_eq!(grpc_rules.len(), 1, "{policy}");
    let from = grpc_rules[0]["from"].as_array().unwrap();
    assert!(!from.is_empty(), "a rule without `from` admits everyone");
    for peer in from {
        let labels = &peer["podSelector"]["matchLabels"];
        assert!(
            labels["app.kubernetes.io/component"] == "data-plane"
                || labels["sluice-admin"] == "true",
            "{peer} may reach the gRPC port"
        );
    }
}

/// The shipped nginx fronts (compose's, and the one run.sh writes) route no client to
/// `/metrics`, which names every backend and its traffic (docs/security.md), and wait for an
/// answer longer than the data planes' default `request_timeout`, so that a request past it
/// gets Sluice's own JSON 504 rather than nginx's HTML one (which also marks the replica down).
#[test]
fn nginx_hides_metrics_and_outwaits_the_request_timeout() {
    let request_timeout = sluice_domain::settings::defaults()
        .request_timeout
        .unwrap()
        .seconds as u64;
    for file in ["nginx.conf", "local/run.sh"] {
        let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
        let metrics = text
            .split("location = /metrics {")
            .nth(1)
            .unwrap_or_else(|| panic!("{file}: /metrics is routed"));
        assert!(
            metrics.trim_start().starts_with("return 404"),
            "{file}: {metrics}"
        );
        // run.sh's is a variable (a test shortens it), whose default is what runs.
        let default = text
            .lines()
            .find_map(|l| l.strip_prefix("NGINX_READ_TIMEOUT=${SLUICE_NGINX_READ_TIMEOUT:-"))
            .map(|v| v.trim_end_matches('}'));
        let read_timeouts: Vec<u64> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("proxy_read_timeout "))
            .map(|v| match v.trim_end_matches(';') {
                "$NGINX_READ_TIMEOUT" => default.unwrap_or_else(|| panic!("{file}: {v}")),
                v => v,
            })
            .map(|v| humantime::parse_duration(v).unwrap().as_secs())
            .collect();
        assert!(!read_timeouts.is_empty(), "{file}");
        for timeout in read_timeouts {
            assert!(
                timeout > request_timeout,
                "{file}: proxy_read_timeout {timeout} s, request_timeout {request_timeout} s"
            );
        }
    }
}

/// The shipped nginx fronts take a body somewhat larger than the data planes' default
/// `--max-body-bytes`, so that a body too large gets the data plane's JSON 413
/// (`request_too_large`, counted and logged) rather than nginx's HTML page: at the same 16 MiB
/// nginx always refused first.
#[test]
fn nginx_leaves_a_body_too_large_to_the_data_planes() {
    let limit = sluice_proxy::Config::new("http://127.0.0.1:50051", "127.0.0.1:0".parse().unwrap())
        .max_body_bytes;
    for file in ["nginx.conf", "local/run.sh"] {
        let text = std::fs::read_to_string(deploy_dir().join(file)).unwrap();
        let sizes: Vec<usize> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("client_max_body_size "))
            .map(|v| {
                let v = v.trim_end_matches(';');
                let megabytes: usize = v
                    .strip_suffix('m')
                    .unwrap_or_else(|| panic!("{file}: {v}"))
                    .parse()
                    .unwrap();
                megabytes << 20
            })
            .collect();
        assert_eq!(sizes.len(), 1, "{file}: one client_max_body_size");
        assert!(
            sizes[0] > limit,
            "{file}: nginx takes {} bytes, the data planes {limit}",
            sizes[0]
        );
    }
}

/// A Deployment an HPA scales has no `replicas` of its own: every `kubectl apply` (or GitOps
/// sync) would set the fleet back to it at once, whatever the HPA had scaled to. And the data
/// planes' drain lets a request finish at the default `request_timeout`: a shorter one cut
/// such requests, already billed, at every scale-down and rollout.
#[test]
fn the_data_planes_are_scaled_by_their_hpa_alone() {
    let documents = yaml_documents("k8s/data-plane.yaml");
    let deployment = documents
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let hpa = documents
        .iter()
        .find(|d| d["kind"] == "HorizontalPodAutoscaler")
        .unwrap();
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    assert!(
        deployment["spec"].get("replicas").is_none(),
        "{}",
        deployment["spec"]
    );
}

/// Nothing in the directory an operator applies (`kubectl apply -f deploy/k8s/`, a GitOps
/// sync) holds a placeholder secret: applied after the real Secret was created, it wrote the
/// placeholders over it, and the master key, which cannot be made again, was lost at the next
/// restart.
#[test]
fn the_applied_manifests_hold_no_placeholder_secret() {
    for entry in std::fs::read_dir(deploy_dir().join("k8s")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("REPLACE-ME"), "{}", path.display());
        let file = format!("k8s/{}", path.file_name().unwrap().to_string_lossy());
        for document in yaml_documents(&file) {
            assert_ne!(document["kind"], "Secret", "{file}");
        }
    }
}

/// The image's build context (the repository root) leaves out build output and local secrets:
/// `COPY . .` put `sluice-data/` (the master key and tokens `deploy/local/run.sh` makes) and
/// `deploy/.env` (compose's secrets) into the build stage, and sent `target/` at every build.
#[test]
fn the_docker_build_context_leaves_out_build_output_and_secrets() {
    let ignore = std::fs::read_to_string(deploy_dir().join("../.dockerignore"))
        .expect("a .dockerignore at the build context's root");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    for excluded in ["target/", "sluice-data/", "deploy/.env", ".git/"] {
        assert!(lines.contains(&excluded), "{excluded} is sent to the build");
    }
}
