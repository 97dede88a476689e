//! The Responses API end to end: the official `openai` Python SDK, unchanged, against two
//! data-plane replicas behind nginx (`deploy/local/run.sh`) and two mock providers that each
//! keep their own response state. A conversation continues through whichever replica nginx
//! picks and still reaches the backend holding it; usage lands in the statistics once.

use crate::common;

use std::time::Duration;

use common::{LocalRun, Mock, eventually};
use sluice_proto::v1 as pb;

const PYTHON: &str = r#"
import json, sys, openai
from openai import OpenAI
base, key = sys.argv[1], sys.argv[2]
c = OpenAI(base_url=base, api_key=key, max_retries=0)
out = {"chains": [], "usage": []}
def usage(u):
    return [u.input_tokens, u.output_tokens, u.input_tokens_details.cached_tokens,
            u.output_tokens_details.reasoning_tokens]
def who(r):
    return r.output_text.split("]")[0] + "]"
firsts = []
for i in range(24):
    r = c.responses.create(model="m", input="tell me a story")
    r2 = c.responses.create(model="m", input="go on", previous_response_id=r.id,
                            reasoning={"effort": "low"})
    out["chains"].append([who(r), who(r2), r2.previous_response_id == r.id])
    out["usage"] += [usage(r.usage), usage(r2.usage)]
    firsts.append(r)
r = firsts[0]
types, final, text = [], None, ""
for event in c.responses.create(model="m", input="and then", previous_response_id=r.id, stream=True):
    types.append(event.type)
    if event.type == "response.output_text.delta":
        text += event.delta
    if event.type == "response.completed":
        final = event.response
out["stream"] = [types[0], types[-1], text.split("]")[0] + "]", final.previous_response_id == r.id,
                 who(r)]
out["usage"].append(usage(final.usage))
compacted = c.responses.compact(model="m", previous_response_id=r.id)
out["compact"] = [compacted.object, compacted.output[-1].type, who(r)]
out["usage"].append(usage(compacted.usage))
counted = c.responses.input_tokens.count(model="m", input="and then", previous_response_id=r.id)
out["count"] = [counted.object, counted.input_tokens]
got = c.responses.retrieve(r.id)
out["retrieve"] = [got.id == r.id, got.status, got.output_text == r.output_text]
out["input_items"] = [i.content[0].text for i in c.responses.input_items.list(r.id, order="asc")]
def error_of(f):
    try:
        f()
        return "no error"
    except openai.APIStatusError as err:
        return [type(err).__name__, err.status_code, (err.body or {}).get("code")]
victim = firsts[1]
out["delete"] = c.responses.delete(victim.id) is None
out["deleted_retrieve"] = error_of(lambda: c.responses.retrieve(victim.id))
tampered = victim.id[:-3] + ("A" if victim.id[-3] != "A" else "B") + victim.id[-2:]
out["tampered_retrieve"] = error_of(lambda: c.responses.retrieve(tampered))
out["tampered_previous"] = error_of(lambda: c.responses.create(
    model="m", input="x", previous_response_id=tampered))
print(json.dumps(out))
"#;

#[tokio::test]
async fn the_python_sdk_converses_across_two_replicas_and_two_backends() {
    let run = LocalRun::start(2).await;
    let a = Mock::start("a", &["m"]).await;
    let b = Mock::start("b", &["m"]).await;
    run.add_backend("a", &a, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    run.add_backend("b", &b, pb::Pool::Primary, 0, &[("m", "m")])
        .await;
    let (_, warm) = run.create_key("warm-up", &[]).await;
    let (sdk, key) = run.create_key("responses", &[]).await;
    for i in 0..2 {
        let replica = run.replica(i);
        eventually(Duration::from_secs(10), "replica routes m", || async {
            replica.chat(&warm, "m").await.status() == 200
                && replica.chat(&key, "m").await.status() == 200
        })
        .await;
    }
    // The warm-up chats: 4 prompt and 5 completion tokens each.
    let chats = |s: &sluice_e2e::mock::MockStats| s.requests.chat_completions;
    let totals = || async {
        run.stats()
            .await
            .get_totals(pb::GetTotalsRequest {
                client_key_id: sdk.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    };

    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(PYTHON)
        .arg(run.front().url("/v1"))
        .arg(&key)
        .output()
        .await
        .expect("python3 with the openai package (run e2e/test-all.sh)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "SDK script failed:\n{stdout}\n{stderr}"
    );
    let out: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();

    // Every continuation reached the backend that created its first turn, through whichever
    // replica nginx chose; both backends held some conversations (24 first turns at random
    // between two equal backends: all on one once in 8 million runs; with 8 it was once in
    // 128, and it happened).
    let chains = out["chains"].as_array().unwrap();
    for chain in chains {
        assert_eq!(chain[0], chain[1], "{out}");
        assert_eq!(chain[2], true, "{out}");
    }
    let holders: std::collections::BTreeSet<&str> =
        chains.iter().map(|c| c[0].as_str().unwrap()).collect();
    assert_eq!(holders.len(), 2, "both backends hold conversations: {out}");
    // The providers answered 404 once: the retrieve after the delete, at the holder. No call
    // reached a backend that does not hold its response.
    assert_eq!(
        a.stats().await.responses_with(404) + b.stats().await.responses_with(404),
        1
    );

    // The Codex CLI's WebSocket handshake through nginx (which passes no Upgrade header on)
    // gets the 426 on which Codex uses HTTP at once, not a 405 it retries five times.
    let handshake = reqwest::Client::new()
        .get(run.front().url("/v1/responses"))
        .bearer_auth(&key)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(handshake.status(), 426);
    let refused: serde_json::Value = handshake.json().await.unwrap();
    assert_eq!(refused["error"]["code"], "websocket_not_supported");

    let stream = &out["stream"];
    assert_eq!(stream[0], "response.created", "{out}");
    assert_eq!(stream[1], "response.completed", "{out}");
    assert_eq!(
        stream[2], stream[4],
        "the stream continued at the holder: {out}"
    );
    assert_eq!(stream[3], true, "{out}");
    // The SDK's compaction and token count of a conversation, at the backend holding it:
    // the count is of its context (its usage, cached, plus the input), the compaction's usage
    // is in the totals below.
    assert_eq!(
        out["compact"],
        serde_json::json!(["response.compaction", "compaction", stream[4]]),
        "{out}"
    );
    assert_eq!(out["count"][0], "response.input_tokens", "{out}");
    assert!(out["count"][1].as_u64().unwrap() > 2, "{out}");
    assert_eq!(
        out["retrieve"],
        serde_json::json!([true, "completed", true])
    );
    assert_eq!(out["input_items"], serde_json::json!(["tell me a story"]));
    assert_eq!(out["delete"], true);
    assert_eq!(
        out["deleted_retrieve"],
        serde_json::json!(["NotFoundError", 404, null])
    );
    assert_eq!(
        out["tampered_retrieve"],
        serde_json::json!(["BadRequestError", 400, "invalid_response_id"])
    );
    assert_eq!(
        out["tampered_previous"],
        serde_json::json!(["BadRequestError", 400, "invalid_response_id"])
    );

    // A continuation is billed the conversation so far, which the provider had cached;
    // reasoning counts in the output.
    let usage: Vec<[u64; 4]> = out["usage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| serde_json::from_value(u.clone()).unwrap())
        .collect();
    assert_eq!(usage[0], [4, 5, 0, 0]);
    assert_eq!(usage[1], [4 + 5 + 2, 5 + 5, 4 + 5, 5]);

    // Both replicas served: nginx spread the calls.
    for i in 0..2 {
        let metrics = run.replica(i).metrics().await;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("sluice_requests_total{backend=\"") && !l.ends_with(" 0")),
            "replica {i} served nothing:\n{metrics}"
        );
    }

    // Usage and cost in the statistics exactly once: what the SDK was billed, what the
    // providers sent.
    let prompt: u64 = usage.iter().map(|u| u[0]).sum();
    let completion: u64 = usage.iter().map(|u| u[1]).sum();
    let (sa, sb) = (a.stats().await, b.stats().await);
    let chat_calls = chats(&sa) + chats(&sb);
    assert_eq!(sa.prompt_tokens + sb.prompt_tokens, prompt + 4 * chat_calls);
    assert_eq!(
        sa.completion_tokens + sb.completion_tokens,
        completion + 5 * chat_calls
    );
    // This key's chats during the warm-up, then its Responses calls.
    let key_chats = 2;
    eventually(
        Duration::from_secs(20),
        "usage in the statistics",
        || async {
            let t = totals().await;
            t.prompt_tokens >= prompt + 4 * key_chats
        },
    )
    .await;
    let t = totals().await;
    let chat_prompt = t.prompt_tokens - prompt;
    assert_eq!(chat_prompt % 4, 0, "only whole chats besides: {t:?}");
    let key_chats = chat_prompt / 4;
    assert_eq!(t.completion_tokens, completion + 5 * key_chats, "{t:?}");
    // Chat answers of the mock report no cached or reasoning tokens: these are the SDK's.
    let cached: u64 = usage.iter().map(|u| u[2]).sum();
    let reasoning: u64 = usage.iter().map(|u| u[3]).sum();
    assert!(cached > 0 && reasoning > 0);
    assert_eq!(
        (t.cached_prompt_tokens, t.reasoning_tokens),
        (cached, reasoning),
        "{t:?}"
    );
    let cost = (t.prompt_tokens as f64 * 1.0 + t.completion_tokens as f64 * 2.0) / 1e6;
    assert!((t.cost - cost).abs() < 1e-9, "{} vs {cost}", t.cost);
}
