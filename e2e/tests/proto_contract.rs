//! The public API as other languages see it: `buf lint` (STANDARD) passes, stock
//! protoc (grpcio-tools) compiles it, and a generated Python client manages a real
//! control plane. The tools come from `e2e/test-all.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sluice_e2e::process::{spawn, workspace_bin};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn run(cmd: &mut Command) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (run e2e/test-all.sh to install the tools)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn buf_lint_standard_passes() {
    let buf = repo_root().join("e2e/tools/node_modules/.bin/buf");
    assert!(
        buf.exists(),
        "{} missing: install it with `(cd e2e/tools && npm ci)` (e2e/test-all.sh does)",
        buf.display()
    );
    run(Command::new(buf)
        .arg("lint")
        .current_dir(repo_root().join("proto")));
}

#[tokio::test]
async fn a_python_client_generated_with_stock_protoc_manages_backends() {
    let out = tempfile::tempdir().unwrap();
    let proto = repo_root().join("proto");
    let files: Vec<PathBuf> = std::fs::read_dir(proto.join("sluice/v1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "proto"))
        .collect();
    assert!(files.len() >= 4);
    run(Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", out.path().display()))
        .arg(format!("--grpc_python_out={}", out.path().display()))
        .args(&files));

    let data = tempfile::tempdir().unwrap();
    let control = spawn(
        workspace_bin("sluice-control"),
        [
            "--data-dir",
            data.path().to_str().unwrap(),
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        [
            (
                "SLUICE_ADMIN_TOKEN",
                "py-admin-token-0123456789abcdef0123456789",
            ),
            ("RUST_LOG", "info"),
        ],
    )
    .unwrap();
    let addr = control
        .wait_for_listening("grpc", Duration::from_secs(20))
        .await
        .unwrap();

    let script = r#"
import sys, grpc
from sluice.v1 import admin_pb2 as a, admin_pb2_grpc as ag, resources_pb2 as r
from google.protobuf import field_mask_pb2
stub = ag.AdminServiceStub(grpc.insecure_channel(sys.argv[1]))
md = [("authorization", "Bearer py-admin-token-0123456789abcdef0123456789")]
b = r.Backend(name="py-backend", base_url="https://api.example.com/v1", pool=r.POOL_FALLBACK,
              priority=5, enabled=True,
              models=[r.ModelRoute(name="gpt-4o-mini", upstream_name="gpt-4o-mini", input_price_per_mtok=0.15, output_price_per_mtok=0.6)])
created = stub.CreateBackend(a.CreateBackendRequest(backend=b, api_key="sk-python-secret-abcd"), metadata=md).backend
upd = stub.UpdateBackend(a.UpdateBackendRequest(backend=r.Backend(id=created.id, priority=1),
                         update_mask=field_mask_pb2.FieldMask(paths=["priority"])), metadata=md).backend
key = stub.CreateClientKey(a.CreateClientKeyRequest(name="py-team", allowed_models=["gpt-4o-mini"]), metadata=md)
try:
    stub.ListBackends(a.ListBackendsRequest(), metadata=[("authorization", "Bearer wrong")])
    print("auth: accepted")
except grpc.RpcError as e:
    print("auth:", e.code().name)
listed = stub.ListBackends(a.ListBackendsRequest(), metadata=md).backends
print("backends:", [(x.name, r.Pool.Name(x.pool), x.priority, x.api_key_hint) for x in listed])
print("key:", key.key.startswith("sk-sluice-"), key.client_key.name)
"#;
    let output = run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(addr.to_string())
        .env("PYTHONPATH", out.path()));
    assert!(output.contains("auth: UNAUTHENTICATED"), "{output}");
    assert!(
        output.contains("backends: [('py-backend', 'POOL_FALLBACK', 1, 'abcd')]"),
        "{output}"
    );
    assert!(output.contains("key: True py-team"), "{output}");
}
