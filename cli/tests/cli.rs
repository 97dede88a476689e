//! Runs the real `sluicectl` binary against a real control plane started in
//! this process, and checks what an operator sees: stdout, stderr, exit code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;

use serde_json::Value;
use sluice_control::testing::TestControlPlane;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const PROVIDER_KEY: &str = "sk-provider-SECRET-7f3a9c1e2b4d";
const PROVIDER_KEY_2: &str = "sk-provider-OTHER-SECRET-99c1e0ffee";

/// One finished `sluicectl` run.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts success and returns stdout.
    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "sluicectl failed: {self:#?}");
        assert!(self.stderr.is_empty(), "unexpected stderr: {self:#?}");
        &self.stdout
    }

    fn json(&self) -> Value {
        serde_json::from_str(self.ok()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:#?}"))
    }

    /// Asserts a failure reported as exactly one `error: ` line with exit code 1,
    /// and returns that line.
    fn one_line_error(&self) -> &str {
        assert_eq!(self.code, 1, "expected exit code 1: {self:#?}");
        assert!(self.stdout.is_empty(), "failure wrote stdout: {self:#?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line: {self:#?}");
        let line = lines[0];
        assert!(line.starts_with("error: "), "{line}");
        for dump in ["panicked", "Status {", "code:", "RUST_BACKTRACE"] {
            assert!(!line.contains(dump), "debug output in {line}");
        }
        line
    }
}

/// A control plane and a way to run `sluicectl` against it.
struct Harness {
    control: TestControlPlane,
    _data_dir: TempDir,
    /// Every byte `sluicectl` printed, to prove secrets never appear.
    printed: std::sync::Mutex<String>,
}

impl Harness {
    async fn start() -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let control = TestControlPlane::start(data_dir.path()).await.unwrap();
        Self {
            control,
            _data_dir: data_dir,
            printed: Default::default(),
        }
    }

    /// `sluicectl --endpoint <cp> --token <admin> ARGS`.
    async fn ctl(&self, args: &[&str]) -> Run {
        self.ctl_with(args, &[], None).await
    }

    async fn ctl_with(&self, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Run {
        let mut full = vec![
            "--endpoint",
            &self.control.grpc_url,
            "--token",
            &self.control.admin_token,
        ];
        full.extend_from_slice(args);
        let run = sluicectl(&full, env, stdin).await;
        let mut printed = self.printed.lock().unwrap();
        printed.push_str(&run.stdout);
        printed.push_str(&run.stderr);
        run
    }

    fn assert_never_printed(&self, secret: &str) {
        let printed = self.printed.lock().unwrap();
        assert!(!printed.is_empty());
        assert!(!printed.contains(secret), "a secret was printed");
    }
}

/// Runs the binary with a clean environment for its own variables.
async fn sluicectl(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluicectl"));
    command
        .args(args)
        .env_remove("SLUICE_ENDPOINT")
        .env_remove("SLUICE_ADMIN_TOKEN")
        .env("RUST_BACKTRACE", "1")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let output = child.wait_with_output().await.unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

fn bool_field(value: &Value, field: &str) -> bool {
    // proto3 JSON leaves out fields at their default, so a missing bool is false.
    value.get(field).and_then(Value::as_bool).unwrap_or(false)
}

#[tokio::test]
async fn backend_lifecycle_from_add_to_remove() {
    let h = Harness::start().await;

    let added = h
        .ctl_with(
            &[
                "backend",
                "add",
                "--name",
                "openai-main",
                "--base-url",
                "https://api.openai.com/v1",
                "--pool",
                "primary",
                "--priority",
                "10",
                "--rpm",
                "500",
                "--model",
                "gpt-4o-mini:gpt-4o-mini-2024-07-18:0.15:0.60",
                "--model",
                "gpt-4o",
                "--api-key-env",
                "OPENAI_API_KEY",
            ],
            &[("OPENAI_API_KEY", PROVIDER_KEY)],
            None,
        )
        .await;
    let added = added.ok();
    assert!(added.contains("openai-main"), "{added}");
    assert!(added.contains("gpt-4o-mini-2024-07-18"), "{added}");
    // The hint is the key's last four characters, never more.
    assert!(added.contains("…2b4d"), "{added}");

    // A second, fallback backend with a negative priority and the key from stdin.
    h.ctl_with(
        &[
            "backend",
            "add",
            "--name",
            "azure-backup",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--pool",
            "fallback",
            "--priority",
            "-1",
            "--weight",
            "3",
            "--disabled",
            "--model",
            "gpt-4o-mini",
            "--api-key-stdin",
        ],
        &[],
        Some(&format!("{PROVIDER_KEY_2}\n")),
    )
    .await
    .ok();

    // Table: a header and one row per backend with the columns an operator scans.
    let table = h.ctl(&["backend", "list"]).await;
    let table = table.ok();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    for column in [
        "NAME", "ID", "POOL", "PRIORITY", "WEIGHT", "MODELS", "RPM", "ENABLED", "KEY",
    ] {
        assert!(lines[0].contains(column), "{column} missing: {table}");
    }
    let main_row = lines.iter().find(|l| l.starts_with("openai-main")).unwrap();
    for cell in ["primary", "10", "gpt-4o-mini,gpt-4o", "500", "yes", "…2b4d"] {
        assert!(main_row.contains(cell), "{cell} missing: {main_row}");
    }
    let backup_row = lines
        .iter()
        .find(|l| l.starts_with("azure-backup"))
        .unwrap();
    for cell in ["fallback", "-1", "3", "no", "…ffee"] {
        assert!(backup_row.contains(cell), "{cell} missing: {backup_row}");
    }

    // JSON: the proto3 mapping of ListBackendsResponse.
    let list = h.ctl(&["-o", "json", "backend", "list"]).await.json();
    let backends = list["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    let main = backends
        .iter()
        .find(|b| b["name"] == "openai-main")
        .unwrap();
    assert_eq!(main["pool"], "POOL_PRIMARY");
    assert_eq!(main["priority"], 10);
    assert_eq!(main["rpmLimit"], 500);
    assert_eq!(main["apiKeyHint"], "2b4d");
    assert!(bool_field(main, "enabled"));
    assert_eq!(main["models"][0]["upstreamName"], "gpt-4o-mini-2024-07-18");
    assert_eq!(main["models"][0]["inputPricePerMtok"], 0.15);
    assert_eq!(main["models"][0]["outputPricePerMtok"], 0.6);
    assert_eq!(main["models"][1]["upstreamName"], "gpt-4o");
    let id = main["id"].as_str().unwrap().to_owned();

    // get by name and by id give the same backend; -o may come after the verb.
    let by_name = h
        .ctl(&["backend", "get", "openai-main", "-o", "json"])
        .await
        .json();
    let by_id = h.ctl(&["backend", "get", &id, "-o", "json"]).await.json();
    assert_eq!(by_name["backend"]["id"], id.as_str());
    assert_eq!(by_id["backend"]["name"], "openai-main");

    // update changes exactly the flags given; --model replaces the list.
    let updated = h
        .ctl(&[
            "-o",
            "json",
            "backend",
            "update",
            "openai-main",
            "--priority",
            "5",
            "--model",
            "gpt-4.1:gpt-4.1:2:8",
        ])
        .await
        .json();
    let backend = &updated["backend"];
    assert_eq!(backend["priority"], 5);
    assert_eq!(backend["rpmLimit"], 500, "rpm must not change");
    assert_eq!(backend["baseUrl"], "https://api.openai.com/v1");
    assert_eq!(backend["models"].as_array().unwrap().len(), 1);
    assert_eq!(backend["models"][0]["name"], "gpt-4.1");
    assert_eq!(backend["apiKeyHint"], "2b4d", "key must not change");

    // A model re-listed without prices keeps its route's prices (0 would make it free for
    // every budget); a new one without prices has none, and the operator is told so on
    // stderr (stdout stays the API's JSON).
    let run = h
        .ctl(&[
            "-o",
            "json",
            "backend",
            "update",
            "openai-main",
            "--model",
            "gpt-4.1",
            "--model",
            "o3",
        ])
        .await;
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(
        run.stderr.trim_end(),
        "sluicectl: note: o3 is new on this backend and was given no prices: its requests \
         cost 0 (give them: --model o3:UPSTREAM:IN:OUT)"
    );
    let relisted: Value = serde_json::from_str(&run.stdout).unwrap();
    let models = &relisted["backend"]["models"];
    assert_eq!(models[0]["name"], "gpt-4.1");
    assert_eq!(
        (
            &models[0]["inputPricePerMtok"],
            &models[0]["outputPricePerMtok"]
        ),
        (&serde_json::json!(2.0), &serde_json::json!(8.0)),
        "{relisted}"
    );
    assert_eq!(models[1]["name"], "o3");
    assert!(models[1].get("inputPricePerMtok").is_none(), "{relisted}");

    // Replacing the key through stdin on update.
    let rekeyed = h
        .ctl_with(
            &["-o", "json", "backend", "update", &id, "--api-key-stdin"],
            &[],
            Some(PROVIDER_KEY_2),
        )
        .await
        .json();
    assert_eq!(rekeyed["backend"]["apiKeyHint"], "ffee");
    assert_eq!(rekeyed["backend"]["priority"], 5);

    // disable / enable flip only `enabled`.
    let disabled = h
        .ctl(&["-o", "json", "backend", "disable", "openai-main"])
        .await
        .json();
    assert!(!bool_field(&disabled["backend"], "enabled"));
    assert_eq!(disabled["backend"]["priority"], 5);
    let shown = h.ctl(&["backend", "get", "openai-main"]).await;
    assert!(
        shown
            .ok()
            .lines()
            .any(|l| l.starts_with("enabled") && l.ends_with("no")),
        "{shown:?}"
    );
    let enabled = h
        .ctl(&["-o", "json", "backend", "enable", &id])
        .await
        .json();
    assert!(bool_field(&enabled["backend"], "enabled"));

    // remove, after which the name is unknown.
    let removed = h.ctl(&["backend", "remove", "openai-main"]).await;
    assert!(removed.ok().contains("openai-main"));
    let gone = h.ctl(&["backend", "get", "openai-main"]).await;
    let line = gone.one_line_error();
    assert!(
        line.contains("not found") && line.contains("openai-main"),
        "{line}"
    );
    let list = h.ctl(&["-o", "json", "backend", "list"]).await.json();
    assert_eq!(list["backends"].as_array().unwrap().len(), 1);

    h.assert_never_printed(PROVIDER_KEY);
    h.assert_never_printed(PROVIDER_KEY_2);
}

/// `--model NAME` on an update re-lists a route: a route whose public name differs from its
/// upstream's keeps asking the provider for the upstream model (were it pointed at its
/// public name, every request would get the provider's 404). `NAME:NAME` points it there.
#[tokio::test]
async fn a_model_relisted_without_upstream_keeps_its_upstream() {
    let h = Harness::start().await;
    h.ctl_with(
        &[
            "backend",
            "add",
            "--name",
            "claude",
            "--base-url",
            "https://api.anthropic.com",
            "--api-format",
            "anthropic",
            "--model",
            "sonnet:claude-sonnet-4-5:3/0.3/3.75:15",
            "--model",
            "haiku:claude-haiku-4-5:1:5",
            "--api-key-env",
            "ANTHROPIC_API_KEY",
        ],
        &[("ANTHROPIC_API_KEY", PROVIDER_KEY)],
        None,
    )
    .await
    .ok();

    let updated = h
        .ctl(&[
            "-o",
            "json",
            "backend",
            "update",
            "claude",
            "--model",
            "sonnet",
            "--model",
            "haiku:haiku",
        ])
        .await
        .json();
    let models = &updated["backend"]["models"];
    let route = |i: usize| {
        (
            models[i]["name"].as_str().unwrap(),
            models[i]["upstreamName"].as_str().unwrap(),
            models[i]["inputPricePerMtok"].as_f64().unwrap(),
        )
    };
    assert_eq!(route(0), ("sonnet", "claude-sonnet-4-5", 3.0), "{updated}");
    assert_eq!(route(1), ("haiku", "haiku", 1.0), "{updated}");

    // And so it is stored, not only answered.
    let stored = h
        .ctl(&["-o", "json", "backend", "get", "claude"])
        .await
        .json();
    assert_eq!(stored["backend"]["models"], *models);
}

/// `backend update` re-listing routes keeps what they store, and clears only what the
/// operator names (`--audio-price M:none`): it tells the control plane it means to clear
/// then, and only then (`clear_route_fields`), so fields newer than this sluicectl are refused
/// rather than cleared unknowingly.
#[tokio::test]
async fn an_update_clears_a_routes_prices_only_when_told() {
    let h = Harness::start().await;
    h.ctl_with(
        &[
            "backend",
            "add",
            "--name",
            "openai",
            "--base-url",
            "https://api.openai.com/v1",
            "--model",
            "gpt-audio:gpt-audio:2.5:10",
            "--audio-price",
            "gpt-audio:32/64",
            "--api-key-env",
            "OPENAI_API_KEY",
        ],
        &[("OPENAI_API_KEY", PROVIDER_KEY)],
        None,
    )
    .await
    .ok();
    let audio = |json: &serde_json::Value| {
        let route = &json["backend"]["models"][0];
        (
            route["audioInputPricePerMtok"].as_f64(),
            route["audioOutputPricePerMtok"].as_f64(),
        )
    };
    let relisted = h
        .ctl(&[
            "-o",
            "json",
            "backend",
            "update",
            "openai",
            "--model",
            "gpt-audio",
            "--model",
            "gpt-4o:gpt-4o:2.5:10",
        ])
        .await
        .json();
    assert_eq!(audio(&relisted), (Some(32.0), Some(64.0)), "{relisted}");
    let cleared = h
        .ctl(&[
            "-o",
            "json",
            "backend",
            "update",
            "openai",
            "--model",
            "gpt-audio",
            "--model",
            "gpt-4o",
            "--audio-price",
            "gpt-audio:none",
        ])
        .await
        .json();
    assert_eq!(audio(&cleared), (None, None), "{cleared}");

    // The stored provider key removed (a server that takes none): no hint left.
    assert!(
        cleared["backend"]["apiKeyHint"]
            .as_str()
            .is_some_and(|h| !h.is_empty())
    );
    let keyless = h
        .ctl(&[
            "-o",
            "json",
            "backend",
            "update",
            "openai",
            "--clear-api-key",
        ])
        .await
        .json();
    assert!(keyless["backend"]["apiKeyHint"].is_null(), "{keyless}");
}

#[tokio::test]
async fn api_keys_never_come_from_argv_and_bad_sources_fail_cleanly() {
    let h = Harness::start().await;
    let base = [
        "backend",
        "add",
        "--name",
        "b",
        "--base-url",
        "http://127.0.0.1:9",
        "--model",
        "m",
    ];

    // There is no flag that takes the key itself.
    let mut argv_key = base.to_vec();
    argv_key.extend(["--api-key", PROVIDER_KEY]);
    let run = h.ctl(&argv_key).await;
    assert_eq!(run.code, 2, "{run:#?}");

    let mut unset = base.to_vec();
    unset.extend(["--api-key-env", "SLUICECTL_TEST_UNSET_VARIABLE"]);
    let line = h.ctl(&unset).await.one_line_error().to_owned();
    assert!(line.contains("SLUICECTL_TEST_UNSET_VARIABLE"), "{line}");

    // The key given where its variable's name goes is refused without being printed: stderr
    // goes to terminals and CI logs.
    for mistake in [PROVIDER_KEY, "sk proj 123"] {
        let mut key_as_name = base.to_vec();
        key_as_name.extend(["--api-key-env", mistake]);
        let run = h.ctl(&key_as_name).await;
        assert_eq!(run.code, 2, "{run:#?}");
        assert!(run.stdout.is_empty(), "{run:#?}");
        assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
        assert!(
            run.stderr
                .starts_with("error: --api-key-env takes the NAME"),
            "{run:#?}"
        );
        assert!(!run.stderr.contains(mistake), "the value was printed");
    }
    h.assert_never_printed(PROVIDER_KEY);

    let mut empty_stdin = base.to_vec();
    empty_stdin.push("--api-key-stdin");
    let run = h.ctl_with(&empty_stdin, &[], Some("\n")).await;
    assert!(run.one_line_error().contains("empty"), "{run:#?}");

    // Nothing was created by the failed attempts.
    let list = h.ctl(&["-o", "json", "backend", "list"]).await.json();
    assert!(
        list.get("backends")
            .is_none_or(|b| b.as_array().unwrap().is_empty())
    );
}

#[tokio::test]
async fn client_key_is_printed_once_and_never_listed() {
    let h = Harness::start().await;

    let created = h
        .ctl(&[
            "key",
            "create",
            "--name",
            "team-a",
            "--allow-model",
            "gpt-4o-mini",
            "--allow-model",
            "gpt-4o",
            "--rpm",
            "60",
        ])
        .await;
    let created = created.ok();
    let keys: Vec<&str> = created
        .lines()
        .filter(|l| l.trim_start().starts_with("sk-sluice-"))
        .collect();
    assert_eq!(keys.len(), 1, "{created}");
    let key = keys[0].trim().to_owned();
    assert_eq!(created.matches(&key).count(), 1, "{created}");
    assert!(key.len() >= "sk-sluice-".len() + 22, "short key: {key}");
    assert!(created.contains("cannot be shown again"), "{created}");

    // JSON mode: the whole CreateClientKeyResponse.
    let json = h
        .ctl(&["-o", "json", "key", "create", "--name", "team-b"])
        .await
        .json();
    let key_b = json["key"].as_str().unwrap().to_owned();
    assert!(key_b.starts_with("sk-sluice-"));
    assert_eq!(json["clientKey"]["name"], "team-b");

    let table = h.ctl(&["key", "list"]).await;
    let table = table.ok();
    assert!(!table.contains(&key) && !table.contains(&key_b), "{table}");
    let row_a = table.lines().find(|l| l.starts_with("team-a")).unwrap();
    for cell in ["gpt-4o-mini,gpt-4o", "60", "active"] {
        assert!(row_a.contains(cell), "{cell} missing: {row_a}");
    }
    let row_b = table.lines().find(|l| l.starts_with("team-b")).unwrap();
    assert!(row_b.contains("all"), "{row_b}");

    let list = h.ctl(&["-o", "json", "key", "list"]).await;
    assert!(!list.ok().contains(&key) && !list.ok().contains(&key_b));

    // Revoke by name; the key shows as revoked.
    h.ctl(&["key", "revoke", "team-a"]).await.ok();
    let list = h.ctl(&["-o", "json", "key", "list"]).await.json();
    let team_a = list["clientKeys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "team-a")
        .unwrap();
    assert!(bool_field(team_a, "revoked"));
    let table = h.ctl(&["key", "list"]).await;
    let row_a = table
        .ok()
        .lines()
        .find(|l| l.starts_with("team-a"))
        .unwrap()
        .to_owned();
    assert!(row_a.contains("revoked"), "{row_a}");

    let unknown = h.ctl(&["key", "revoke", "nobody"]).await;
    assert!(
        unknown.one_line_error().contains("not found"),
        "{unknown:#?}"
    );

    // The key appeared exactly once in everything the CLI printed: at creation.
    let printed = h.printed.lock().unwrap();
    assert_eq!(printed.matches(&key).count(), 1);
    assert_eq!(printed.matches(&key_b).count(), 1);
}

/// `key update` shows the key's budget in the settings' currency, read in a call of its own.
/// It is read before the change: a run that says it failed has changed nothing, so a script
/// that retries or alerts on the failure is right to. `-o json` shows no currency and does
/// not ask for it.
#[tokio::test]
async fn a_key_update_that_says_it_failed_changed_nothing() {
    let h = Harness::start().await;
    h.ctl(&["key", "create", "--name", "team-a", "--rpm", "60"])
        .await
        .ok();
    // The settings row unreadable: GetSettings fails, the key's own calls do not.
    rusqlite::Connection::open(h._data_dir.path().join("sluice.db"))
        .unwrap()
        .execute(
            "INSERT OR REPLACE INTO settings (id, body) VALUES (1, 'not json')",
            [],
        )
        .unwrap();

    let run = h.ctl(&["key", "update", "team-a", "--rpm", "1200"]).await;
    run.one_line_error();
    let key = h.ctl(&["-o", "json", "key", "get", "team-a"]).await.json();
    assert_eq!(key["clientKey"]["rpmLimit"], 60, "{key}");

    let updated = h
        .ctl(&["-o", "json", "key", "update", "team-a", "--rpm", "1200"])
        .await
        .json();
    assert_eq!(updated["clientKey"]["rpmLimit"], 1200, "{updated}");
    h.ctl(&["-o", "json", "key", "list"]).await.ok();
}

#[tokio::test]
async fn a_key_is_created_with_an_expiry_and_listed_with_it() {
    let h = Harness::start().await;
    let json = h
        .ctl(&[
            "-o",
            "json",
            "key",
            "create",
            "--name",
            "contractor",
            "--expires",
            "2999-01-31T12:00:00Z",
        ])
        .await
        .json();
    assert_eq!(json["clientKey"]["expireTime"], "2999-01-31T12:00:00+00:00");
    let table = h.ctl(&["key", "list"]).await;
    let row = table
        .ok()
        .lines()
        .find(|l| l.starts_with("contractor"))
        .unwrap()
        .to_owned();
    assert!(row.contains("expires in"), "{row}");

    // An expiry in the past is refused by the control plane, in one line, and not created.
    let past = h
        .ctl(&["key", "create", "--name", "late", "--expires", "2001-01-01"])
        .await;
    assert!(past.one_line_error().contains("expire_time"), "{past:#?}");
    let malformed = h
        .ctl(&["key", "create", "--name", "late", "--expires", "soon"])
        .await;
    // A usage error from the argument parser (exit 2), naming the accepted forms.
    assert_eq!(malformed.code, 2, "{malformed:#?}");
    assert!(malformed.stderr.contains("RFC 3339"), "{malformed:#?}");
    let list = h.ctl(&["-o", "json", "key", "list"]).await.json();
    assert_eq!(list["clientKeys"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_key_is_shown_and_updated_without_being_reissued() {
    let h = Harness::start().await;
    let created = h
        .ctl(&[
            "-o", "json", "key", "create", "--name", "team-a", "--rpm", "60",
        ])
        .await
        .json();
    let id = created["clientKey"]["id"].as_str().unwrap().to_owned();
    let prefix = created["clientKey"]["keyPrefix"]
        .as_str()
        .unwrap()
        .to_owned();

    let updated = h
        .ctl(&[
            "key",
            "update",
            "team-a",
            "--rpm",
            "1200",
            "--allow-model",
            "gpt-4o",
            "--expires",
            "2999-06-30",
        ])
        .await;
    let text = updated.ok();
    assert!(text.contains("1200"), "{text}");
    assert!(text.contains("gpt-4o"), "{text}");
    assert!(text.contains("2999-06-30T00:00:00Z"), "{text}");

    let got = h.ctl(&["-o", "json", "key", "get", &id]).await.json();
    assert_eq!(got["clientKey"]["rpmLimit"], 1200);
    assert_eq!(
        got["clientKey"]["allowedModels"],
        serde_json::json!(["gpt-4o"])
    );
    assert_eq!(
        got["clientKey"]["keyPrefix"],
        prefix.as_str(),
        "the same key"
    );
    assert_eq!(got["clientKey"]["expireTime"], "2999-06-30T00:00:00+00:00");

    // Back to every model and no expiry; the limit stays as it was.
    h.ctl(&[
        "key",
        "update",
        "team-a",
        "--all-models",
        "--expires",
        "never",
    ])
    .await
    .ok();
    let got = h.ctl(&["-o", "json", "key", "get", "team-a"]).await.json();
    assert!(got["clientKey"].get("expireTime").is_none(), "{got}");
    assert!(got["clientKey"].get("allowedModels").is_none(), "{got}");
    assert_eq!(got["clientKey"]["rpmLimit"], 1200);
    let shown = h.ctl(&["key", "get", "team-a"]).await;
    assert!(shown.ok().contains("active"), "{shown:#?}");

    // A monthly budget: the listing shows spend against it, `get` what remains and when
    // the period resets.
    h.ctl(&[
        "key",
        "update",
        "team-a",
        "--max-budget",
        "50",
        "--budget-period",
        "monthly",
    ])
    .await
    .ok();
    let list = h.ctl(&["key", "list"]).await;
    let row = list
        .ok()
        .lines()
        .find(|l| l.starts_with("team-a"))
        .unwrap()
        .to_owned();
    assert!(row.contains("0.0000 / 50 USD monthly"), "{row}");
    let shown = h.ctl(&["key", "get", "team-a"]).await;
    let text = shown.ok();
    let remaining = text.lines().find(|l| l.starts_with("remaining")).unwrap();
    assert!(remaining.ends_with("50.0000 USD"), "{text}");
    let held = text.lines().find(|l| l.starts_with("held by data planes"));
    assert!(held.unwrap().ends_with("0.0000 USD"), "{text}");
    let resets = text.lines().find(|l| l.starts_with("resets")).unwrap();
    assert!(
        resets.contains("-01T00:00:00Z"),
        "the 1st of next month: {resets}"
    );
    let bad = h.ctl(&["key", "update", "team-a", "--max-budget=-5"]).await;
    assert!(bad.one_line_error().contains("max_budget"), "{bad:#?}");

    // Nothing to change is a usage error before any call; an unknown key is named.
    let nothing = h.ctl(&["key", "update", "team-a"]).await;
    assert_eq!(nothing.code, 2, "{nothing:#?}");
    assert!(nothing.stderr.contains("nothing to update"), "{nothing:#?}");
    let unknown = h.ctl(&["key", "update", "nobody", "--rpm", "1"]).await;
    assert!(unknown.one_line_error().contains("nobody"), "{unknown:#?}");
    let unknown = h.ctl(&["key", "get", "nobody"]).await;
    assert!(
        unknown.one_line_error().contains("not found"),
        "{unknown:#?}"
    );
}

#[tokio::test]
async fn token_and_parallel_limits_are_set_shown_and_changed() {
    let h = Harness::start().await;
    let created = h
        .ctl(&[
            "-o",
            "json",
            "key",
            "create",
            "--name",
            "team-a",
            "--tpm-limit",
            "100000",
            "--max-parallel",
            "8",
        ])
        .await
        .json();
    assert_eq!(created["clientKey"]["tpmLimit"], 100000);
    assert_eq!(created["clientKey"]["maxParallelRequests"], 8);
    let list = h.ctl(&["key", "list"]).await;
    let text = list.ok();
    assert!(text.lines().next().unwrap().contains("TPM"), "{text}");
    let row = text.lines().find(|l| l.starts_with("team-a")).unwrap();
    assert!(row.contains("100000") && row.contains(" 8 "), "{row}");

    // One flag changes one limit; 0 removes it.
    let shown = h
        .ctl(&["key", "update", "team-a", "--tpm-limit", "0"])
        .await;
    let text = shown.ok();
    let line = |label: &str| {
        text.lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(line("tpm limit").ends_with('-'), "{text}");
    assert!(line("max parallel").ends_with(" 8"), "{text}");
    let got = h.ctl(&["-o", "json", "key", "get", "team-a"]).await.json();
    assert!(got["clientKey"].get("tpmLimit").is_none(), "{got}");
    assert_eq!(got["clientKey"]["maxParallelRequests"], 8);
    let bad = h
        .ctl(&["key", "update", "team-a", "--max-parallel", "5000000"])
        .await;
    assert!(
        bad.one_line_error().contains("max_parallel_requests"),
        "{bad:#?}"
    );

    // A backend's token quota beside its request quota.
    h.ctl(&[
        "backend",
        "add",
        "--name",
        "b1",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "m",
        "--rpm",
        "500",
        "--tpm-limit",
        "90000",
    ])
    .await
    .ok();
    let list = h.ctl(&["backend", "list"]).await;
    let text = list.ok();
    let row = text.lines().find(|l| l.starts_with("b1")).unwrap();
    assert!(row.contains("500") && row.contains("90000"), "{row}");
    h.ctl(&["backend", "update", "b1", "--tpm-limit", "30000"])
        .await
        .ok();
    let got = h.ctl(&["-o", "json", "backend", "get", "b1"]).await.json();
    assert_eq!(got["backend"]["tpmLimit"], 30000);
    assert_eq!(got["backend"]["rpmLimit"], 500);
    let shown = h.ctl(&["backend", "get", "b1"]).await;
    assert!(shown.ok().contains("tpm limit"), "{shown:#?}");
    let bad = h
        .ctl(&["backend", "update", "b1", "--tpm-limit", "4000000000"])
        .await;
    assert!(
        bad.one_line_error().contains("backend.tpm_limit"),
        "{bad:#?}"
    );
}

#[tokio::test]
async fn validation_errors_are_one_line() {
    let h = Harness::start().await;
    let add = |name: &'static str, url: &'static str, model: Option<&'static str>| {
        let mut args = vec!["backend", "add", "--name", name, "--base-url", url];
        if let Some(model) = model {
            args.extend(["--model", model]);
        }
        args
    };

    let bad_url = h.ctl(&add("a", "ftp://example", Some("m"))).await;
    assert!(
        bad_url.one_line_error().contains("base_url"),
        "{bad_url:#?}"
    );

    let no_host = h.ctl(&add("a", "not a url", Some("m"))).await;
    no_host.one_line_error();

    let no_model = h.ctl(&add("a", "http://127.0.0.1:9", None)).await;
    assert!(no_model.one_line_error().contains("model"), "{no_model:#?}");

    h.ctl(&add("dup", "http://127.0.0.1:9", Some("m")))
        .await
        .ok();
    let duplicate = h.ctl(&add("dup", "http://127.0.0.1:9", Some("m"))).await;
    assert!(
        duplicate.one_line_error().contains("already exists"),
        "{duplicate:#?}"
    );

    let unknown = h
        .ctl(&["backend", "update", "nope", "--priority", "1"])
        .await;
    assert!(
        unknown.one_line_error().contains("not found"),
        "{unknown:#?}"
    );

    // Usage errors: exit code 2, one line too (clap's message without its usage block).
    let bad_spec = h
        .ctl(&add("a", "http://127.0.0.1:9", Some("m:u:0.15")))
        .await;
    assert_eq!(bad_spec.code, 2, "{bad_spec:#?}");
    assert_eq!(bad_spec.stderr.lines().count(), 1, "{bad_spec:#?}");
    assert!(bad_spec.stderr.starts_with("error: "), "{bad_spec:#?}");
    let no_name = h.ctl(&["key", "create"]).await;
    assert_eq!(no_name.code, 2, "{no_name:#?}");
    assert_eq!(
        no_name.stderr.trim_end(),
        "error: the following required arguments were not provided: --name <NAME> (see --help)"
    );
    let nothing = h.ctl(&["backend", "update", "dup"]).await;
    assert_eq!(nothing.code, 2, "{nothing:#?}");
    assert_eq!(nothing.stderr.lines().count(), 1, "{nothing:#?}");
    // A weight of 0 was stored as 1: an operator draining a backend that way still sent it
    // its full share.
    let drained = h.ctl(&["backend", "update", "dup", "--weight", "0"]).await;
    assert_eq!(drained.code, 2, "{drained:#?}");
    assert!(drained.stderr.contains("--weight"), "{drained:#?}");
}

#[tokio::test]
async fn wrong_or_missing_token_is_refused() {
    let h = Harness::start().await;

    let wrong = sluicectl(
        &["--endpoint", &h.control.grpc_url, "backend", "list"],
        &[("SLUICE_ADMIN_TOKEN", "not-the-token")],
        None,
    )
    .await;
    assert!(
        wrong.one_line_error().contains("unauthenticated"),
        "{wrong:#?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "still-wrong\n").unwrap();
    let wrong_file = sluicectl(
        &[
            "--endpoint",
            &h.control.grpc_url,
            "--token-file",
            token_file.to_str().unwrap(),
            "key",
            "list",
        ],
        &[],
        None,
    )
    .await;
    assert!(wrong_file.one_line_error().contains("unauthenticated"));

    // The right token from a file (with its trailing newline) and the endpoint from the env.
    std::fs::write(&token_file, format!("{}\n", h.control.admin_token)).unwrap();
    let right = sluicectl(
        &["--token-file", token_file.to_str().unwrap(), "key", "list"],
        &[("SLUICE_ENDPOINT", &h.control.grpc_url)],
        None,
    )
    .await;
    assert_eq!(right.ok(), "No client keys.\n");

    let missing = sluicectl(
        &["--endpoint", &h.control.grpc_url, "backend", "list"],
        &[],
        None,
    )
    .await;
    assert!(missing.one_line_error().contains("no admin token"));
}

#[tokio::test]
async fn unreachable_endpoint_is_one_line() {
    // A port that was just free: nothing listens there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let run = sluicectl(
        &["--endpoint", &endpoint, "--token", "t", "backend", "list"],
        &[],
        None,
    )
    .await;
    let line = run.one_line_error();
    assert_eq!(
        line,
        format!("error: cannot reach control plane at {endpoint}: connection refused")
    );
}

#[tokio::test]
async fn settings_round_trip() {
    let h = Harness::start().await;
    let before = h.ctl(&["-o", "json", "settings", "get"]).await.json();
    let before = &before["settings"];

    let set = h
        .ctl(&[
            "settings",
            "set",
            "--max-attempts",
            "5",
            "--cooldown-base",
            "2s",
            "--cooldown-cap",
            "2m",
            "--retry-on-rate-limit",
            "false",
            "--usage-retention-days",
            "30",
            "--usage-daily-retention-days",
            "400",
        ])
        .await;
    let table = set.ok();
    for line in [
        "max-attempts",
        "cooldown-base",
        "cooldown-cap",
        "retry-on-rate-limit",
    ] {
        assert!(table.contains(line), "{line} missing: {table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("cooldown-cap") && l.ends_with("2m")),
        "{table}"
    );

    let after = h.ctl(&["-o", "json", "settings", "get"]).await.json();
    let after = &after["settings"];
    assert_eq!(after["maxAttempts"], 5);
    assert_eq!(after["cooldownBase"], "2s");
    assert_eq!(after["cooldownCap"], "120s");
    assert!(!bool_field(after, "retryOnRateLimit"));
    assert_eq!(after["usageRetentionDays"], 30);
    assert_eq!(after["usageDailyRetentionDays"], 400);
    // Fields not given did not change.
    for field in [
        "connectTimeout",
        "firstByteTimeout",
        "requestTimeout",
        "failureThreshold",
        "retryOnServerError",
    ] {
        assert_eq!(after[field], before[field], "{field} changed");
    }

    let invalid = h.ctl(&["settings", "set", "--max-attempts", "0"]).await;
    invalid.one_line_error();
}

#[tokio::test]
async fn stats_cooldowns_and_data_planes_on_an_empty_database() {
    let h = Harness::start().await;

    let totals = h.ctl(&["stats", "totals"]).await;
    let totals = totals.ok();
    assert!(
        totals
            .lines()
            .any(|l| l.starts_with("requests") && l.ends_with(" 0")),
        "{totals}"
    );
    let json = h
        .ctl(&["-o", "json", "stats", "totals", "--since", "24h"])
        .await
        .json();
    assert!(json.is_object(), "{json}");
    assert!(json.get("requestCount").is_none_or(|c| c == "0"), "{json}");
    h.ctl(&[
        "stats",
        "totals",
        "--start",
        "2025-01-01",
        "--end",
        "2025-02-01T00:00:00+01:00",
    ])
    .await
    .ok();

    let usage = h
        .ctl(&[
            "stats",
            "usage",
            "--by",
            "model",
            "--since",
            "7d",
            "--granularity",
            "day",
        ])
        .await;
    assert_eq!(usage.ok().trim(), "No usage in this range.");

    let conflicting = h
        .ctl(&["stats", "totals", "--since", "1h", "--start", "2025-01-01"])
        .await;
    assert_eq!(conflicting.code, 2, "{conflicting:#?}");

    assert_eq!(
        h.ctl(&["cooldown", "list"]).await.ok().trim(),
        "No backend is cooling down."
    );
    assert_eq!(
        h.ctl(&["dataplane", "list"]).await.ok().trim(),
        "No data plane has connected."
    );

    h.ctl(&[
        "backend",
        "add",
        "--name",
        "cool",
        "--base-url",
        "http://127.0.0.1:9",
        "--model",
        "m",
    ])
    .await
    .ok();
    h.ctl(&["cooldown", "reset", "cool"]).await.ok();
    let unknown = h.ctl(&["cooldown", "reset", "nope"]).await;
    assert!(
        unknown.one_line_error().contains("not found"),
        "{unknown:#?}"
    );
}

/// Speaks `DataPlaneService` as a replica would, so the CLI has usage,
/// cooldowns and a connected replica to show.
mod replica {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use sluice_proto::v1 as pb;
    use sluice_proto::v1::data_plane_service_client::DataPlaneServiceClient;
    use sluice_proto::wkt;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::metadata::MetadataValue;
    use tonic::transport::Channel;

    pub type Client = DataPlaneServiceClient<
        tonic::service::interceptor::InterceptedService<
            Channel,
            Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>,
        >,
    >;

    pub async fn client(url: &str, token: &str) -> Client {
        let channel = Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let value: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        DataPlaneServiceClient::with_interceptor(
            channel,
            Box::new(move |mut request: tonic::Request<()>| {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
                Ok(request)
            }),
        )
    }

    pub fn timestamp(time: SystemTime) -> wkt::Timestamp {
        let since = time.duration_since(UNIX_EPOCH).unwrap();
        wkt::Timestamp {
            seconds: since.as_secs() as i64,
            nanos: since.subsec_nanos() as i32,
        }
    }

    /// Opens a snapshot stream, acks the first snapshot and keeps the stream
    /// open for as long as the returned sender lives.
    pub async fn connect(
        client: &mut Client,
        node_id: &str,
    ) -> (
        mpsc::Sender<pb::StreamSnapshotsRequest>,
        tonic::Streaming<pb::StreamSnapshotsResponse>,
        u64,
    ) {
        let (tx, rx) = mpsc::channel(4);
        let hello = pb::StreamSnapshotsRequest {
            node_id: node_id.into(),
            hostname: "replica-host".into(),
            build_version: "test-build".into(),
            ..Default::default()
        };
        tx.send(hello.clone()).await.unwrap();
        let mut snapshots = client
            .stream_snapshots(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let snapshot = tokio::time::timeout(Duration::from_secs(10), snapshots.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .snapshot
            .unwrap();
        tx.send(pb::StreamSnapshotsRequest {
            version: snapshot.version,
            response_nonce: snapshot.nonce.clone(),
            ..hello
        })
        .await
        .unwrap();
        (tx, snapshots, snapshot.version)
    }
}

#[tokio::test]
async fn usage_cooldowns_and_replicas_reported_by_a_data_plane() {
    use std::time::{Duration, SystemTime};

    use sluice_proto::v1 as pb;

    let h = Harness::start().await;
    // Added here, and again at the end once deleted.
    const ADD_BUSY: [&str; 10] = [
        "-o",
        "json",
        "backend",
        "add",
        "--name",
        "busy",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "gpt-4o-mini:gpt-4o-mini:0.15:0.60",
    ];
    let added = h.ctl(&ADD_BUSY).await.json();
    let backend_id = added["backend"]["id"].as_str().unwrap().to_owned();

    let key = h
        .ctl(&["-o", "json", "key", "create", "--name", "team-a"])
        .await
        .json();
    let key_id = key["clientKey"]["id"].as_str().unwrap().to_owned();

    let mut client = replica::client(&h.control.grpc_url, &h.control.dataplane_token).await;
    let (_keep_open, _snapshots, version) = replica::connect(&mut client, "replica-7").await;

    let now = SystemTime::now();
    let record = |sequence: u64| pb::UsageRecord {
        sequence,
        request_id: format!("req-{sequence}"),
        backend_id: backend_id.clone(),
        model: "gpt-4o-mini".into(),
        client_key_id: key_id.clone(),
        prompt_tokens: 1_000,
        completion_tokens: 500,
        latency: Some(Duration::from_millis(120).into()),
        status_code: 200,
        time: Some(replica::timestamp(now - Duration::from_secs(600))),
        ..Default::default()
    };
    let event = pb::BackendEvent {
        backend_id: backend_id.clone(),
        kind: pb::BackendEventKind::RateLimited as i32,
        cooldown_until: Some(replica::timestamp(now + Duration::from_secs(600))),
        consecutive_failures: 2,
        reason: "429 from upstream".into(),
        time: Some(replica::timestamp(now)),
        // A replica that predates cooldown epochs: its own streak and end time are taken.
        ..Default::default()
    };
    // And a 429 of one model, which cools that model alone at the backend.
    let of_model = pb::BackendEvent {
        backend_id: backend_id.clone(),
        model: "gpt-4o-mini".into(),
        kind: pb::BackendEventKind::RateLimited as i32,
        cooldown_epoch: Some(0),
        retry_after: Some(Duration::from_secs(300).into()),
        reason: "429 from upstream".into(),
        time: Some(replica::timestamp(now)),
        ..Default::default()
    };
    let mut acks = client
        .report_usage(tokio_stream::iter(vec![pb::ReportUsageRequest {
            node_id: "replica-7".into(),
            incarnation: "inc-1".into(),
            records: vec![record(1), record(2)],
            events: vec![event, of_model],
            ..Default::default()
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acks.message().await.unwrap().unwrap().acked_sequence, 2);

    // Cooldowns: the backend, the model (or every model), when it ends (relative), failures
    // and reason.
    let table = h.ctl(&["cooldown", "list"]).await;
    let rows: Vec<String> = table
        .ok()
        .lines()
        .filter(|l| l.starts_with("busy"))
        .map(str::to_owned)
        .collect();
    let model_row = rows
        .iter()
        .find(|l| l.contains("gpt-4o-mini"))
        .unwrap_or_else(|| panic!("no row of the model: {table:?}"));
    assert!(
        model_row.contains("(in 4m)") || model_row.contains("(in 5m)"),
        "{model_row}"
    );
    let row = rows
        .iter()
        .find(|l| l.contains("(every model)"))
        .unwrap_or_else(|| panic!("no cooldown row: {table:?}"))
        .to_owned();
    assert!(row.contains(&backend_id), "{row}");
    assert!(row.contains("(in 9m)") || row.contains("(in 10m)"), "{row}");
    assert!(row.contains("429 from upstream"), "{row}");
    let json = h.ctl(&["-o", "json", "cooldown", "list"]).await.json();
    // Listed by when each ends: the model's first.
    assert_eq!(json["cooldowns"][1]["backendName"], "busy");
    assert_eq!(json["cooldowns"][1]["consecutiveFailures"], 2);
    assert_eq!(json["cooldowns"][0]["model"], "gpt-4o-mini");

    // One model's cooldown ends alone; then the backend's with the rest.
    h.ctl(&["cooldown", "reset", "busy", "--model", "gpt-4o-mini"])
        .await
        .ok();
    let table = h.ctl(&["cooldown", "list"]).await;
    let left = table.ok().lines().filter(|l| l.starts_with("busy")).count();
    assert!(!table.ok().contains("gpt-4o-mini"), "{table:?}");
    assert_eq!(left, 1, "{table:?}");
    h.ctl(&["cooldown", "reset", "busy"]).await.ok();
    assert_eq!(
        h.ctl(&["cooldown", "list"]).await.ok().trim(),
        "No backend is cooling down."
    );

    // Totals over the last day, for this backend, and for a range without usage.
    let totals = h
        .ctl(&[
            "-o",
            "json",
            "stats",
            "totals",
            "--since",
            "24h",
            "--backend",
            &backend_id,
        ])
        .await
        .json();
    assert_eq!(totals["requestCount"], "2");
    assert_eq!(totals["promptTokens"], "2000");
    assert_eq!(totals["completionTokens"], "1000");
    // 2 × (1000 × 0.15 + 500 × 0.60) / 1M
    let cost = totals["cost"].as_f64().unwrap();
    assert!((cost - 0.0009).abs() < 1e-12, "{cost}");
    // Filters take names too.
    let by_name = h
        .ctl(&["-o", "json", "stats", "totals", "--backend", "busy"])
        .await
        .json();
    assert_eq!(by_name["requestCount"], "2");
    let by_key = h
        .ctl(&[
            "-o",
            "json",
            "stats",
            "totals",
            "--key",
            "team-a",
            "--model",
            "gpt-4o-mini",
        ])
        .await
        .json();
    assert_eq!(by_key["requestCount"], "2");
    // A name that is no backend's (a deleted backend's usage is kept under its id) is said,
    // not answered with zeros as if it had served nothing.
    let unknown = h
        .ctl(&[
            "-o",
            "json",
            "stats",
            "totals",
            "--backend",
            "no-such-backend",
        ])
        .await;
    assert!(
        unknown
            .stderr
            .contains("no backend is named or has the id \"no-such-backend\""),
        "{unknown:?}"
    );
    assert_eq!(unknown.code, 0);
    let other: Value = serde_json::from_str(&unknown.stdout).unwrap();
    assert!(other.get("requestCount").is_none(), "{other}");
    // So is a name that is no key's (a typo), where a key's name and id pass without one.
    let unknown = h
        .ctl(&["-o", "json", "stats", "totals", "--key", "team-aa"])
        .await;
    assert!(
        unknown
            .stderr
            .contains("no client key is named or has the id \"team-aa\""),
        "{unknown:?}"
    );
    assert_eq!(unknown.code, 0);
    let named = h
        .ctl(&["-o", "json", "stats", "totals", "--key", "team-a"])
        .await;
    assert!(!named.stderr.contains("note:"), "{named:?}");
    // And a model no backend serves, where one served passes without a note.
    let typo = h
        .ctl(&["-o", "json", "stats", "totals", "--model", "gpt-4o-mnii"])
        .await;
    assert_eq!(typo.code, 0, "{typo:?}");
    assert!(
        typo.stderr
            .contains("no backend serves a model named \"gpt-4o-mnii\""),
        "{typo:?}"
    );
    let served = h
        .ctl(&["-o", "json", "stats", "totals", "--model", "gpt-4o-mini"])
        .await;
    assert!(!served.stderr.contains("note:"), "{served:?}");
    // A timeout of nothing is a usage error, not a control plane out of reach.
    let instant = h.ctl(&["--timeout", "0s", "backend", "list"]).await;
    assert_eq!(instant.code, 2, "{instant:?}");
    assert!(instant.stderr.contains("--timeout"), "{instant:?}");
    // An id, as a deleted backend's usage is kept, is asked for as it is, without a note.
    h.ctl(&[
        "-o",
        "json",
        "stats",
        "totals",
        "--backend",
        "0190f3a2-7b1c-7d4e-9f00-123456789abc",
    ])
    .await
    .json();
    let table = h.ctl(&["stats", "totals", "--since", "24h"]).await;
    assert!(
        table
            .ok()
            .lines()
            .any(|l| l.starts_with("requests") && l.ends_with(" 2")),
        "{table:?}"
    );
    let old = h
        .ctl(&[
            "-o",
            "json",
            "stats",
            "totals",
            "--start",
            "2020-01-01",
            "--end",
            "2020-01-02",
        ])
        .await
        .json();
    assert!(old.get("requestCount").is_none(), "{old}");

    // Usage per backend: one hourly row labelled with the backend's name.
    let usage = h
        .ctl(&["stats", "usage", "--by", "backend", "--since", "24h"])
        .await;
    let lines: Vec<&str> = usage.ok().lines().collect();
    assert_eq!(lines.len(), 2, "{usage:?}");
    assert!(
        lines[0].contains("GROUP") && lines[0].contains("REQUESTS"),
        "{usage:?}"
    );
    assert!(lines[1].contains("busy"), "{usage:?}");
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    // START GROUP ID REQUESTS ERRORS PROMPT COMPLETION …: the id beside the name, the one a
    // deleted backend's usage is filtered by.
    assert_eq!(cells[2], backend_id, "{usage:?}");
    assert_eq!(cells[3..7], ["2", "0", "2000", "1000"], "{usage:?}");

    // A key rotated (revoked, and another made under its name): a name asks for one key's
    // usage, the active one's, and says which others had the name.
    let old_id = h.ctl(&["-o", "json", "key", "get", "team-a"]).await.json()["clientKey"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    h.ctl(&["key", "revoke", "team-a"]).await.ok();
    h.ctl(&["key", "create", "--name", "team-a"]).await.ok();
    let rotated = h
        .ctl(&["-o", "json", "stats", "totals", "--key", "team-a"])
        .await;
    assert_eq!(rotated.code, 0, "{rotated:?}");
    assert!(
        rotated.stderr.contains("1 other key had that name") && rotated.stderr.contains(&old_id),
        "{rotated:?}"
    );
    let figures: Value = serde_json::from_str(&rotated.stdout).unwrap();
    assert!(
        figures.get("requestCount").is_none(),
        "the new key spent nothing: {figures}"
    );
    // Grouped by key, the revoked one says so, and its id.
    let by_key = h
        .ctl(&["stats", "totals", "--by", "key", "--since", "24h"])
        .await;
    assert!(
        by_key
            .ok()
            .lines()
            .any(|l| l.contains("team-a (revoked)") && l.contains(&old_id)),
        "{by_key:?}"
    );

    // The replica that is connected, with the version it acked.
    let mut row = String::new();
    for _ in 0..100 {
        let table = h.ctl(&["dataplane", "list"]).await;
        row = table
            .ok()
            .lines()
            .find(|l| l.starts_with("replica-7"))
            .unwrap_or_default()
            .to_owned();
        if row.contains(&format!("{version}/")) {
            break;
        }
        // The ack travels on its own stream; wait for the control plane to record it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for cell in [
        "replica-host",
        "connected",
        "test-build",
        &format!("{version}/"),
    ] {
        assert!(row.contains(cell), "{cell} missing: {row}");
    }

    // A backend deleted and added again under its name (to start over): its name asks for
    // the new one's usage, and says which deleted one had the name and kept the rest.
    h.ctl(&["backend", "remove", "busy"]).await.ok();
    h.ctl(&ADD_BUSY).await.ok();
    let again = h
        .ctl(&["-o", "json", "stats", "totals", "--backend", "busy"])
        .await;
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again.stderr.contains("1 deleted backend had that name")
            && again.stderr.contains(&backend_id),
        "{again:?}"
    );
    let figures: Value = serde_json::from_str(&again.stdout).unwrap();
    assert!(
        figures.get("requestCount").is_none(),
        "the new backend served nothing: {figures}"
    );
}

/// `stats usage` reads a series whose single answer would pass 4 MiB (it pages), `--limit`
/// and `--newest-first` take the latest buckets, `--by pool` splits by pool with the
/// number of backends, and every cost carries the currency of the settings.
#[tokio::test]
async fn usage_by_pool_in_pages_with_its_currency() {
    use std::time::{Duration, SystemTime};

    use sluice_proto::v1 as pb;

    let h = Harness::start().await;
    // --help says how a long series is read.
    let help = h.ctl(&["stats", "usage", "--help"]).await;
    let help = help.ok();
    assert!(
        help.contains("pages of at most 5,000 buckets") && help.contains("--limit"),
        "{help}"
    );
    // 30 models named at the 256-byte limit in each of 250 hours: 7,500 buckets by model,
    // over 4 MiB as one answer. p1 prices the first.
    let models: Vec<String> = (0..30)
        .map(|m| format!("{m:03}{}", "x".repeat(253)))
        .collect();
    let priced = format!("{0}:{0}:1:2", models[0]);
    let mut ids = Vec::new();
    for (name, pool) in [("p1", "primary"), ("p2", "primary"), ("f1", "fallback")] {
        let added = h
            .ctl(&[
                "-o",
                "json",
                "backend",
                "add",
                "--name",
                name,
                "--base-url",
                "http://127.0.0.1:9/v1",
                "--pool",
                pool,
                "--model",
                if name == "p1" { &priced } else { "m" },
            ])
            .await
            .json();
        ids.push(added["backend"]["id"].as_str().unwrap().to_owned());
    }
    let mut client = replica::client(&h.control.grpc_url, &h.control.dataplane_token).await;
    let start = SystemTime::now() - Duration::from_secs(300 * 3600);
    let mut records = Vec::new();
    for hour in 0..250u64 {
        for (m, model) in models.iter().enumerate() {
            let sequence = records.len() as u64 + 1;
            records.push(pb::UsageRecord {
                sequence,
                request_id: format!("req-{sequence}"),
                backend_id: ids[m % 3].clone(),
                model: model.clone(),
                prompt_tokens: 1_000,
                completion_tokens: 500,
                latency: Some(Duration::from_millis(100).into()),
                status_code: 200,
                time: Some(replica::timestamp(start + Duration::from_secs(hour * 3600))),
                ..Default::default()
            });
        }
    }
    let total = records.len();
    let batches: Vec<pb::ReportUsageRequest> = records
        .chunks(2500)
        .map(|chunk| pb::ReportUsageRequest {
            node_id: "replica-1".into(),
            incarnation: "inc-1".into(),
            records: chunk.to_vec(),
            ..Default::default()
        })
        .collect();
    let mut acks = client
        .report_usage(tokio_stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    let mut acked = 0;
    while acked < total as u64 {
        acked = acks.message().await.unwrap().unwrap().acked_sequence;
    }

    let all = h
        .ctl(&["-o", "json", "stats", "usage", "--by", "model"])
        .await
        .json();
    let buckets = all["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), total);
    assert!(serde_json::to_string(&all).unwrap().len() > 4 * 1024 * 1024);

    // The latest ten buckets, newest first, and a note that more follow.
    let latest = h
        .ctl(&[
            "stats",
            "usage",
            "--by",
            "model",
            "--newest-first",
            "--limit",
            "10",
        ])
        .await;
    let lines: Vec<&str> = latest.ok().lines().collect();
    assert_eq!(lines.len(), 12, "{latest:?}");
    assert!(lines[11].contains("raise --limit"), "{latest:?}");
    // The newest hour, `2026-11-30T03`.
    let newest = &buckets.last().unwrap()["startTime"].as_str().unwrap()[..13];
    assert!(lines[1].starts_with(newest), "{} vs {newest}", lines[1]);

    // Per pool: two primary backends and one fallback each hour.
    let pools = h
        .ctl(&[
            "-o",
            "json",
            "stats",
            "usage",
            "--by",
            "pool",
            "--granularity",
            "day",
        ])
        .await
        .json();
    let mut per_pool: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for bucket in pools["buckets"].as_array().unwrap() {
        let entry = per_pool
            .entry(bucket["groupKey"].as_str().unwrap().to_owned())
            .or_default();
        entry.0 += bucket["requestCount"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap();
        entry.1 = entry
            .1
            .max(bucket["backendCount"].as_str().unwrap().parse().unwrap());
    }
    assert_eq!(
        per_pool,
        [
            ("fallback".to_owned(), (2500, 1)),
            ("primary".to_owned(), (5000, 2))
        ]
        .into()
    );
    let table = h.ctl(&["stats", "totals", "--by", "pool"]).await;
    let text = table.ok();
    assert!(
        text.lines()
            .any(|l| l.starts_with("backends") && l.ends_with(" 3")),
        "{text}"
    );
    let primary = text
        .lines()
        .find(|l| l.starts_with("primary"))
        .unwrap_or_else(|| panic!("no primary row: {text}"));
    let cells: Vec<&str> = primary.split_whitespace().collect();
    // GROUP REQUESTS ERRORS PROMPT COMPLETION COST CURRENCY BACKENDS ... (a pool is its own
    // name: no ID column)
    assert_eq!(cells[1], "5000", "{primary}");
    assert_eq!(cells[6..8], ["USD", "2"], "{primary}");

    // The currency is a setting; every cost shows it.
    h.ctl(&["settings", "set", "--currency", "EUR"]).await.ok();
    let totals = h.ctl(&["stats", "totals"]).await;
    // 250 priced records × (1000 × 1 + 500 × 2) / 1M = 0.5
    assert!(
        totals
            .ok()
            .lines()
            .any(|l| l.starts_with("cost") && l.ends_with("0.5000 EUR")),
        "{totals:?}"
    );
    let refused = h.ctl(&["settings", "set", "--currency", "euros"]).await;
    assert!(refused.one_line_error().contains("currency"), "{refused:?}");
}
