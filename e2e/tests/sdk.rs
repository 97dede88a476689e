//! The official OpenAI SDKs (Python and Node), unchanged, against a real data plane:
//! base URL + client key is all they need. The SDKs come from `e2e/test-all.sh`.

use crate::common;

use std::path::Path;
use std::process::Command;

use std::time::Duration;

use common::{Cluster, Mock, eventually};
use sluice_e2e::mock::Fault;
use sluice_proto::v1 as pb;

const PYTHON: &str = r#"
import json, sys, openai
from openai import OpenAI
base, key, limited_key, expired_key = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
c = OpenAI(base_url=base, api_key=key, max_retries=0)
out = {}
r = c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}])
out["chat"] = [r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens]
parts, usage = [], None
for chunk in c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                       stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
out["stream"] = ["".join(parts), usage]
plain = list(c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True))
out["stream_no_usage"] = [any(ch.usage for ch in plain), len(plain)]
e = c.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
out["embeddings"] = [len(e.data), len(e.data[0].embedding), e.usage.prompt_tokens]
t = c.completions.create(model="gpt-3.5-turbo-instruct", prompt="once upon a time")
out["completions"] = [t.object, t.usage.prompt_tokens]
out["models"] = sorted(m.id for m in c.models.list())
def error_class(f):
    try:
        f()
        return "no error"
    except openai.APIStatusError as err:
        return [type(err).__name__, err.status_code]
out["401"] = error_class(lambda: OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).models.list())
def expired_call():
    try:
        OpenAI(base_url=base, api_key=expired_key, max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        return "no error"
    except openai.APIStatusError as err:
        return [type(err).__name__, err.status_code, err.code]
out["expired"] = expired_call()
out["404"] = error_class(lambda: c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}]))
out["403"] = error_class(lambda: OpenAI(base_url=base, api_key=limited_key, max_retries=0).chat.completions.create(
    model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]))
out["429"] = error_class(lambda: c.chat.completions.create(model="limited-model", messages=[{"role": "user", "content": "x"}]))
print(json.dumps(out))
"#;

const NODE: &str = r#"
const OpenAI = require(process.env.OPENAI_MODULE);
const [base, key, limitedKey, expiredKey] = process.argv.slice(1);
(async () => {
  const c = new OpenAI({ baseURL: base, apiKey: key, maxRetries: 0 });
  const out = {};
  const r = await c.chat.completions.create({ model: "gpt-4o-mini", messages: [{ role: "user", content: "hello there" }] });
  out.chat = [r.choices[0].message.content, r.usage.prompt_tokens, r.usage.completion_tokens];
  let parts = [], usage = null;
  const stream = await c.chat.completions.create({ model: "gpt-4o-mini", messages: [{ role: "user", content: "hi" }],
    stream: true, stream_options: { include_usage: true } });
  for await (const chunk of stream) {
    if (chunk.choices.length && chunk.choices[0].delta.content) parts.push(chunk.choices[0].delta.content);
    if (chunk.usage) usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens];
  }
  out.stream = [parts.join(""), usage];
  const e = await c.embeddings.create({ model: "text-embedding-3-small", input: ["a b", "c"] });
  out.embeddings = [e.data.length, e.data[0].embedding.length, e.usage.prompt_tokens];
  const t = await c.completions.create({ model: "gpt-3.5-turbo-instruct", prompt: "once upon a time" });
  out.completions = [t.object, t.usage.prompt_tokens];
  const models = [];
  for await (const m of c.models.list()) models.push(m.id);
  out.models = models.sort();
  const errorClass = async (f) => {
    try { await f(); return "no error"; } catch (err) { return [err.constructor.name, err.status]; }
  };
  out["401"] = await errorClass(() => new OpenAI({ baseURL: base, apiKey: "sk-wrong", maxRetries: 0 }).models.list());
  try {
    await new OpenAI({ baseURL: base, apiKey: expiredKey, maxRetries: 0 }).chat.completions.create(
      { model: "gpt-4o-mini", messages: [{ role: "user", content: "x" }] });
    out.expired = "no error";
  } catch (err) { out.expired = [err.constructor.name, err.status, err.code]; }
  out["404"] = await errorClass(() => c.chat.completions.create({ model: "nope", messages: [{ role: "user", content: "x" }] }));
  out["403"] = await errorClass(() => new OpenAI({ baseURL: base, apiKey: limitedKey, maxRetries: 0 }).chat.completions.create(
    { model: "gpt-4o-mini", messages: [{ role: "user", content: "x" }] }));
  out["429"] = await errorClass(() => c.chat.completions.create({ model: "limited-model", messages: [{ role: "user", content: "x" }] }));
  console.log(JSON.stringify(out));
})().catch((err) => { console.error(err); process.exit(1); });
"#;

struct Setup {
    _cluster: Cluster,
    _mock: Mock,
    _limited: Mock,
    proxy: common::Proxy,
    key: String,
    limited_key: String,
    /// A key past its expire_time, which the data plane already refuses.
    expired_key: String,
}

async fn setup() -> Setup {
    let cluster = Cluster::start().await;
    let mock = Mock::start(
        "sdk-mock",
        &[
            "gpt-4o-mini",
            "text-embedding-3-small",
            "gpt-3.5-turbo-instruct",
        ],
    )
    .await;
    cluster
        .add_backend(
            "sdk",
            &mock,
            pb::Pool::Primary,
            0,
            &[
                ("gpt-4o-mini", "gpt-4o-mini"),
                ("text-embedding-3-small", "text-embedding-3-small"),
                ("gpt-3.5-turbo-instruct", "gpt-3.5-turbo-instruct"),
            ],
        )
        .await;
    // A backend that always answers 429: with nothing else to try, the client gets a 429.
    let limited = Mock::start("limited", &["limited-model"]).await;
    limited
        .set_faults(vec![Fault::rate_limited(30).always()])
        .await;
    cluster
        .add_backend(
            "limited",
            &limited,
            pb::Pool::Primary,
            0,
            &[("limited-model", "limited-model")],
        )
        .await;
    let (_, key) = cluster.create_key("sdk", &[]).await;
    let (_, limited_key) = cluster
        .create_key("sdk-embeddings-only", &["text-embedding-3-small"])
        .await;
    let proxy = cluster.proxy().await;
    let expires = std::time::SystemTime::now() + Duration::from_secs(2);
    let expired_key = cluster.create_key_expiring("sdk-expiring", expires).await;
    // Refused as expired, not merely as not yet known to the replica.
    eventually(Duration::from_secs(30), "the key expired", || async {
        let body: serde_json::Value = proxy
            .chat(&expired_key, "gpt-4o-mini")
            .await
            .json()
            .await
            .unwrap_or_default();
        body["error"]["code"] == "api_key_expired"
    })
    .await;
    Setup {
        _cluster: cluster,
        _mock: mock,
        _limited: limited,
        proxy,
        key,
        limited_key,
        expired_key,
    }
}

fn check(output: std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "SDK script failed:\n{stdout}\n{stderr}"
    );
    let out: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let chat = &out["chat"];
    assert!(chat[0].as_str().unwrap().starts_with("[sdk-mock]"), "{out}");
    assert_eq!(
        (chat[1].as_u64(), chat[2].as_u64()),
        (Some(2), Some(5)),
        "{out}"
    );
    assert!(
        out["stream"][0].as_str().unwrap().starts_with("[sdk-mock]"),
        "{out}"
    );
    assert_eq!(out["stream"][1], serde_json::json!([1, 5]), "{out}");
    assert_eq!(out["embeddings"], serde_json::json!([2, 8, 3]), "{out}");
    assert_eq!(
        out["completions"],
        serde_json::json!(["text_completion", 4]),
        "{out}"
    );
    assert_eq!(
        out["models"],
        serde_json::json!([
            "gpt-3.5-turbo-instruct",
            "gpt-4o-mini",
            "limited-model",
            "text-embedding-3-small"
        ]),
        "{out}"
    );
    out
}

#[tokio::test]
async fn the_python_sdk_works_unchanged() {
    let s = setup().await;
    let base = s.proxy.url("/v1");
    let output = tokio::process::Command::new("python3")
        .args(["-c", PYTHON, &base, &s.key, &s.limited_key, &s.expired_key])
        .output()
        .await
        .expect("python3 with the openai package (run e2e/test-all.sh)");
    let out = check(output);
    assert_eq!(
        out["stream_no_usage"][0], false,
        "no usage chunk unless asked: {out}"
    );
    assert_eq!(out["401"], serde_json::json!(["AuthenticationError", 401]));
    assert_eq!(
        out["expired"],
        serde_json::json!(["AuthenticationError", 401, "api_key_expired"])
    );
    assert_eq!(out["404"], serde_json::json!(["NotFoundError", 404]));
    assert_eq!(
        out["403"],
        serde_json::json!(["PermissionDeniedError", 403])
    );
    assert_eq!(out["429"], serde_json::json!(["RateLimitError", 429]));
}

#[tokio::test]
async fn the_node_sdk_works_unchanged() {
    let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/node_modules/openai");
    assert!(
        module.exists(),
        "{} missing: run e2e/test-all.sh",
        module.display()
    );
    let s = setup().await;
    let base = s.proxy.url("/v1");
    let output = Command::new("node")
        .args([
            "-e",
            NODE,
            "--",
            &base,
            &s.key,
            &s.limited_key,
            &s.expired_key,
        ])
        .env("OPENAI_MODULE", &module)
        .output()
        .expect("node");
    let out = check(output);
    assert_eq!(out["401"], serde_json::json!(["AuthenticationError", 401]));
    assert_eq!(
        out["expired"],
        serde_json::json!(["AuthenticationError", 401, "api_key_expired"])
    );
    assert_eq!(out["404"], serde_json::json!(["NotFoundError", 404]));
    assert_eq!(
        out["403"],
        serde_json::json!(["PermissionDeniedError", 403])
    );
    assert_eq!(out["429"], serde_json::json!(["RateLimitError", 429]));
}

/// openai-python with its retries on, against two backends that never answer, through a data
/// plane whose request deadline is past the SDK's timeout (4 s; it tells the data plane,
/// `x-stainless-read-timeout`): an operator's for slow reasoning models, or the defaults,
/// both 600 s, where the SDK's clock starts first. The data plane answers within the SDK's
/// wait, 504 with `x-should-retry: false` (each attempt was sent, and may be billed), so the
/// SDK raises it and sends nothing again: the backends see the two attempts once. Answered
/// at its deadline, after the SDK had timed out, the request was sent twice more, through
/// both backends (six attempts).
#[tokio::test]
async fn the_python_sdk_reads_why_a_stalled_request_failed_and_does_not_send_it_again() {
    let cluster = Cluster::start().await;
    let (a, b) = (
        Mock::start("a", &["m"]).await,
        Mock::start("b", &["m"]).await,
    );
    cluster
        .add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    cluster
        .add_backend("b", &b, pb::Pool::Fallback, 0, &[("m", "m")])
        .await;
    for mock in [&a, &b] {
        mock.set_faults(vec![Fault::Stall.always()]).await;
    }
    cluster
        .set_settings(
            pb::Settings {
                request_timeout: Some(common::seconds(8)),
                answer_timeout: Some(common::seconds(2)),
                ..Default::default()
            },
            &["request_timeout", "answer_timeout"],
        )
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;
    let out = common::python(
        r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], timeout=4.0, max_retries=2)
try:
    c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    print(json.dumps("answered"))
except openai.APIStatusError as err:
    print(json.dumps([type(err).__name__, err.status_code]))
except openai.APITimeoutError:
    print(json.dumps("timed out"))
"#,
        &[&proxy.url("/v1"), &key],
    )
    .await;
    assert_eq!(out, serde_json::json!(["InternalServerError", 504]));
    let sent = a.stats().await.requests.total() + b.stats().await.requests.total();
    assert_eq!(sent, 2, "each backend's attempt once");
}

/// A voice model's audio bills at many times its text: OpenAI's gpt-audio $32 a million audio
/// tokens in and $64 out, against $2.50 and $10 for text. A route priced so (`sluicectl
/// --audio-price`) charges each answer's audio, prompt and spoken completion, as its `usage`
/// counts it (`prompt_tokens_details.audio_tokens`, `completion_tokens_details.audio_tokens`),
/// whole and streamed, with openai-python sending a recording and asking for speech.
#[tokio::test]
async fn audio_is_spent_at_the_routes_audio_prices() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("voice", &["gpt-audio-up"]).await;
    crate::gateway::add_openai_with_sluicectl(
        &cluster,
        &mock,
        &[
            "--model",
            "gpt-audio:gpt-audio-up:2.5:10",
            "--audio-price",
            "gpt-audio:32/64",
        ],
    )
    .await;
    let shown = cluster.sluicectl(&["backend", "get", "openai"]).await;
    assert!(
        shown.contains("AUDIO IN/OUT") && shown.contains("32/64"),
        "{shown}"
    );
    let (_, key) = cluster.create_key("listening", &[]).await;
    let key_id = cluster.client_key("listening").await.id;
    let proxy = cluster.proxy().await;
    let out = common::python(
        r#"
import base64, json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
wav = base64.b64encode(b"RIFF" + bytes(2_000)).decode()
hear = [{"role": "user", "content": [
    {"type": "text", "text": "what is said here"},
    {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]}]
out = []
for speak in [{}, {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}]:
    u = c.chat.completions.create(model="gpt-audio", messages=hear, **speak).usage
    out.append([u.prompt_tokens, u.prompt_tokens_details.audio_tokens,
                u.completion_tokens, u.completion_tokens_details.audio_tokens])
    chunks = c.chat.completions.create(model="gpt-audio", messages=hear, stream=True,
                                       stream_options={"include_usage": True}, **speak)
    u = [chunk.usage for chunk in chunks if chunk.usage][-1]
    out.append([u.prompt_tokens, u.prompt_tokens_details.audio_tokens,
                u.completion_tokens, u.completion_tokens_details.audio_tokens])
print(json.dumps(out))
"#,
        &[&proxy.url("/v1"), &key],
    )
    .await;
    let answers: Vec<[u64; 4]> = serde_json::from_value(out).unwrap();
    // Every answer heard the recording; the last two spoke.
    assert!(answers.iter().all(|a| a[1] > 0), "{answers:?}");
    assert_eq!(
        answers.iter().map(|a| a[3] > 0).collect::<Vec<_>>(),
        [false, false, true, true]
    );
    // Nano-units a token: a price per million × 1,000.
    let billed: u64 = answers
        .iter()
        .map(|&[prompt, audio_in, completion, audio_out]| {
            (prompt - audio_in) * 2_500
                + audio_in * 32_000
                + (completion - audio_out) * 10_000
                + audio_out * 64_000
        })
        .sum();
    eventually(
        Duration::from_secs(30),
        "the key's spend is the provider's bill",
        || async { (cluster.client_key(&key_id).await.spend * 1e9).round() as u64 == billed },
    )
    .await;
    // The statistics count the audio among the tokens, and `sluicectl` shows it.
    let totals = cluster.totals().await;
    let audio = |i: usize| answers.iter().map(|a| a[i]).sum::<u64>();
    assert_eq!(
        (totals.audio_prompt_tokens, totals.audio_completion_tokens),
        (audio(1), audio(3))
    );
    let shown = cluster.sluicectl(&["stats", "totals"]).await;
    let audio_lines: Vec<&str> = shown
        .lines()
        .filter(|line| line.contains("of them audio"))
        .collect();
    assert_eq!(audio_lines.len(), 2, "{shown}");
    assert!(
        audio_lines[0].ends_with(&format!(" {}", audio(1))),
        "{shown}"
    );
    assert!(
        audio_lines[1].ends_with(&format!(" {}", audio(3))),
        "{shown}"
    );
}

/// OpenAI's search models in Chat Completions search the web for every request and bill the
/// search on top of the tokens, and no answer says so (Perplexity's Sonar models add a
/// request fee likewise). A route that prices `request` (`--call-price MODEL:request=PRICE`,
/// per 1,000) charges it once for each request its backend answered, whole or streamed, none
/// for one the provider refused; a budget reserves it before the request is sent, so a key
/// whose budget cannot pay it is refused rather than overspent.
#[tokio::test]
async fn a_search_models_fee_is_spent_once_for_each_request_it_answers() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("search", &["gpt-4o-search-preview"]).await;
    crate::gateway::add_openai_with_sluicectl(
        &cluster,
        &mock,
        &[
            "--model",
            "search:gpt-4o-search-preview:2.5:10",
            "--call-price",
            "search:request=30",
        ],
    )
    .await;
    let shown = cluster.sluicectl(&["backend", "get", "openai"]).await;
    assert!(shown.contains(" request=30"), "{shown}");
    let budgeted = |name: &str, max_budget: f64| {
        let cluster = &cluster;
        let name = name.to_owned();
        async move {
            cluster
                .admin()
                .await
                .create_client_key(pb::CreateClientKeyRequest {
                    name,
                    max_budget,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let searching = budgeted("searching", 10.0).await;
    let key_id = searching.client_key.unwrap().id;
    let proxy = cluster.proxy().await;
    const SEARCHES: &str = r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
ask = [{"role": "user", "content": "what happened today"}]
out = []
u = c.chat.completions.create(model="search", messages=ask).usage
out.append([u.prompt_tokens, u.completion_tokens])
chunks = c.chat.completions.create(model="search", messages=ask, stream=True,
                                   stream_options={"include_usage": True})
u = [chunk.usage for chunk in chunks if chunk.usage][-1]
out.append([u.prompt_tokens, u.completion_tokens])
try:
    c.chat.completions.create(model="search", messages=ask, n=0)
    out.append("answered")
except openai.BadRequestError as e:
    out.append(e.status_code)
print(json.dumps(out))
"#;
    let out = common::python(SEARCHES, &[&proxy.url("/v1"), &searching.key]).await;
    let out = out.as_array().unwrap();
    assert_eq!(out[2], 400, "the provider refused the third: {out:?}");
    // Two answers, each its tokens and a search: $30 per 1,000, 30,000,000 nano-units. The
    // refused request's record counted too, before the spend is read.
    let billed: u64 = out[..2]
        .iter()
        .map(|a| a[0].as_u64().unwrap() * 2_500 + a[1].as_u64().unwrap() * 10_000 + 30_000_000)
        .sum();
    eventually(
        Duration::from_secs(30),
        "the three requests are counted",
        || async { cluster.totals().await.request_count == 3 },
    )
    .await;
    let spent = (cluster.client_key(&key_id).await.spend * 1e9).round() as u64;
    assert_eq!(spent, billed, "the key's spend is the provider's bill");

    // A connection lost after the request was sent may have been billed, its search too: the
    // key keeps its reserve, the prompt's estimate and the fee. (Another replica: this one's
    // kept connection, closed under it, could not tell that the request was sent.)
    let other = cluster.proxy().await;
    mock.set_faults(vec![Fault::Reset.times(1)]).await;
    let out = common::python(
        r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
try:
    c.chat.completions.create(model="search", messages=[{"role": "user", "content": "hi"}])
    print(json.dumps("answered"))
except openai.APIStatusError as e:
    print(json.dumps(e.status_code))
"#,
        &[&other.url("/v1"), &searching.key],
    )
    .await;
    assert_eq!(out, 502);
    let before = billed;
    eventually(
        Duration::from_secs(30),
        "the lost request keeps its reserve and its fee",
        || async {
            let spent = (cluster.client_key(&key_id).await.spend * 1e9).round() as u64;
            // The body's estimate (a few dozen tokens at $2.50 a million) and the three cents:
            // both, not the larger.
            (before + 30_000_001..before + 30_100_000).contains(&spent)
        },
    )
    .await;

    // Two cents cannot pay a three-cent search: refused before it is sent, not overspent.
    let poor = budgeted("poor", 0.02).await;
    let out = common::python(
        r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
try:
    c.chat.completions.create(model="search", messages=[{"role": "user", "content": "hi"}])
    print(json.dumps("answered"))
except openai.RateLimitError as e:
    print(json.dumps(e.code))
"#,
        &[&proxy.url("/v1"), &poor.key],
    )
    .await;
    assert_eq!(out, "insufficient_quota");
    let asked = mock.stats().await.requests.chat_completions;
    assert_eq!(asked, 4, "the refused request never reached the provider");
}

/// A Responses stream cut short (here its provider's connection, after three events) ends
/// with Sluice's `error` event, and openai-python raises on it, iterating the events or
/// waiting for the final response, as it does on OpenAI's own. Its fields were written flat
/// only, which the SDK yields as an event and then ends the loop: a cut answer taken for a
/// whole one.
#[tokio::test]
async fn the_python_sdk_raises_on_a_responses_stream_cut_short() {
    let cluster = Cluster::start().await;
    let mock = Mock::start("a", &["m"]).await;
    cluster
        .add_backend("a", &mock, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    mock.set_faults(vec![Fault::CutAfterChunks(3).always()])
        .await;
    let (_, key) = cluster.create_key("k", &[]).await;
    let proxy = cluster.proxy().await;
    let out = common::python(
        r#"
import json, sys, openai
c = openai.OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
out = []
def iterate():
    return [e.type for e in c.responses.create(model="m", input="tell me a story", stream=True)]
def final():
    with c.responses.stream(model="m", input="tell me a story") as s:
        return s.get_final_response().status
for f in [iterate, final]:
    try:
        out.append(["no error", f()])
    except openai.APIError as err:
        out.append([type(err).__name__, err.message])
print(json.dumps(out))
"#,
        &[&proxy.url("/v1"), &key],
    )
    .await;
    for raised in out.as_array().unwrap() {
        assert_eq!(raised[0], "APIError", "{out}");
        assert!(raised[1].as_str().unwrap().contains("interrupted"), "{out}");
    }
}
