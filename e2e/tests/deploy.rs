//! The deployment files are valid: Kubernetes manifests against the Kubernetes
//! schemas (kubernetes-validate, offline), the nginx config by nginx itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
        original.replace("replicas: 3", "replicas: \"three\""),
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
