//! The Anthropic translations, both ways, mapping by mapping (docs/anthropic.md lists them),
//! and a property test that a chat request → Messages → chat response round trip keeps text,
//! tool names and arguments.

use bytes::Bytes;
use http::StatusCode;
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use sluice_proxy::anthropic::message::completion_of;
use sluice_proxy::anthropic::request::{chat_to_messages, messages_to_chat};
use sluice_proxy::anthropic::response::{completion_to_message, completion_to_message_in_shape};
use sluice_proxy::anthropic::stream::{ChunksFromEvents, EventUsage, EventsFromChunks, Flow};
use sluice_proxy::anthropic::{Sampling, Usage, error};
use sluice_proxy::sse::{Event, Item, SseParser};

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn to_messages(chat: Value) -> Value {
    Value::Object(chat_to_messages(&obj(chat), "claude-up", 4096, Sampling::Taken).unwrap())
}

fn to_chat(messages: Value) -> Value {
    Value::Object(messages_to_chat(&obj(messages), "gpt-up", "max_tokens").unwrap())
}

// ---- chat request → Messages request -------------------------------------------------

#[test]
fn leading_system_and_developer_messages_become_the_top_level_system() {
    let m = to_messages(json!({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "No emoji."}]},
        {"role": "user", "content": "Hi"},
    ]}));
    assert_eq!(m["model"], "claude-up");
    assert_eq!(
        m["system"],
        json!([{"type": "text", "text": "Be brief."}, {"type": "text", "text": "No emoji."}])
    );
    assert_eq!(
        m["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    );
}

/// Later system and developer messages join the top-level `system`: Anthropic takes
/// `role: "system"` turns from Claude Opus 4.8 alone, and only right after a user turn (any
/// other model answers 400 "role 'system' is not supported on this model").
#[test]
fn later_system_messages_join_the_top_level_system() {
    let m = to_messages(json!({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "developer", "content": "Now answer in French."},
        {"role": "user", "content": "Bye"},
    ]}));
    assert_eq!(
        m["system"],
        json!([{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Now answer in French."}])
    );
    let roles: Vec<&str> = m["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
}

/// No turn goes empty or with a text of whitespace alone, which Anthropic refuses ("all
/// messages must have non-empty content", "text content blocks must contain non-whitespace
/// text"): such text is left out, a message left with nothing is left out and its neighbours
/// merge; an answer refused and sent back (`content: null`, `refusal`) is its refusal's text.
#[test]
fn no_turn_is_sent_empty_or_blank() {
    let hi_and = |answer: Value| {
        to_messages(json!({"model": "m", "messages": [
            {"role": "user", "content": "Hi"}, answer, {"role": "user", "content": [{"type": "text", "text": "Again"}, {"type": "text", "text": " \t"}]},
        ]}))
    };
    let merged = json!([{"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "text", "text": "Again"},
    ]}]);
    for empty in [
        json!({"role": "assistant", "content": ""}),
        json!({"role": "assistant", "content": null}),
        json!({"role": "assistant", "content": "\n\n"}),
        json!({"role": "assistant", "content": [{"type": "text", "text": "\u{a0}"}]}),
    ] {
        assert_eq!(hi_and(empty.clone())["messages"], merged, "{empty}");
    }
    let refused =
        hi_and(json!({"role": "assistant", "content": null, "refusal": "I can't help with that."}));
    assert_eq!(
        refused["messages"][1],
        json!({"role": "assistant", "content": [{"type": "text", "text": "I can't help with that."}]})
    );
    let blank_result = to_messages(json!({"model": "m", "system": "x", "messages": [
        {"role": "system", "content": "\n"},
        {"role": "user", "content": "List it."},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": " "},
    ]}));
    assert!(blank_result.get("system").is_none(), "{blank_result}");
    assert_eq!(
        blank_result["messages"][2],
        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1"}]})
    );
    // Nothing left to send: a 400 of Sluice's, not Anthropic's "at least one message is required".
    let alone = chat_to_messages(
        &obj(json!({"model": "m", "messages": [{"role": "system", "content": "Write a haiku."}, {"role": "user", "content": " "}]})),
        "claude-up",
        4096,
        Sampling::Taken,
    )
    .unwrap_err();
    assert_eq!(alone.param, "messages");
}

/// A request that would end with an assistant turn the client did not send last (its last
/// message blank, or a system message) is refused: Anthropic would continue that assistant
/// message (a prefill) instead of answering, or refuse its trailing whitespace. A client's own
/// last assistant message (a prefill it meant) goes as it is.
#[test]
fn a_request_left_ending_with_an_assistant_turn_is_refused_unless_sent_so() {
    for last in [
        json!({"role": "user", "content": " "}),
        json!({"role": "system", "content": "Summarise the conversation."}),
    ] {
        let refused = chat_to_messages(
            &obj(json!({"model": "m", "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!\n"},
                last,
            ]})),
            "claude-up",
            4096,
            Sampling::Taken,
        )
        .unwrap_err();
        assert_eq!(refused.param, "messages");
    }
    let prefilled = to_messages(json!({"model": "m", "messages": [
        {"role": "user", "content": "Answer in JSON."},
        {"role": "assistant", "content": "{"},
    ]}));
    assert_eq!(prefilled["messages"][1]["role"], "assistant");
}

/// A base64 image goes with the media type its bytes say, whatever its label (Anthropic
/// refuses `image/jpg`, which browsers write, and a label its bytes contradict); data it
/// cannot tell keeps its label, parameters left out.
#[test]
fn an_images_media_type_is_read_from_its_bytes() {
    let sent = |url: &str| {
        let m = to_messages(
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
            ]}]}),
        );
        m["messages"][0]["content"][0]["source"]["media_type"].clone()
    };
    assert_eq!(
        sent("data:image/jpg;base64,/9j/4AAQSkZJRgABAQ=="),
        "image/jpeg"
    );
    assert_eq!(
        sent("data:image/png;base64,/9j/4AAQSkZJRgABAQ=="),
        "image/jpeg"
    );
    assert_eq!(
        sent("data:image/jpeg;base64,iVBORw0KGgoAAAANSUhEUg=="),
        "image/png"
    );
    assert_eq!(
        sent("data:image/png;base64,R0lGODlhAQABAIAAAP8AAP8="),
        "image/gif"
    );
    assert_eq!(
        sent("data:image/png;base64,UklGRiQAAABXRUJQVlA4IBgA"),
        "image/webp"
    );
    assert_eq!(sent("data:image/jpg;base64,AAAA"), "image/jpeg");
    assert_eq!(
        sent("data:image/png;charset=utf-8;base64,AAAA"),
        "image/png"
    );
}

#[test]
fn consecutive_same_role_turns_are_merged() {
    let m = to_messages(json!({"model": "m", "messages": [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
    ]}));
    assert_eq!(
        m["messages"],
        json!([{"role": "user", "content": [
            {"type": "text", "text": "one"}, {"type": "text", "text": "two"}
        ]}])
    );
}

#[test]
fn max_tokens_comes_from_the_client_or_the_route_default() {
    let hi = json!([{"role": "user", "content": "Hi"}]);
    assert_eq!(
        to_messages(json!({"model": "m", "messages": hi}))["max_tokens"],
        4096
    );
    assert_eq!(
        to_messages(json!({"model": "m", "messages": hi, "max_tokens": 10}))["max_tokens"],
        10
    );
    assert_eq!(
        to_messages(
            json!({"model": "m", "messages": hi, "max_tokens": 10, "max_completion_tokens": 20})
        )["max_tokens"],
        20
    );
}

#[test]
fn sampling_and_stop_map_across() {
    let m = to_messages(
        json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
        "temperature": 0.5, "top_p": 0.9, "stop": "END", "stream": true,
        "frequency_penalty": 1.0, "seed": 7, "user": "u-1"}),
    );
    assert_eq!(m["temperature"], 0.5);
    // Anthropic's current models take one of the two.
    assert!(m.get("top_p").is_none());
    assert_eq!(m["stop_sequences"], json!(["END"]));
    assert_eq!(m["stream"], true);
    assert_eq!(m["metadata"], json!({"user_id": "u-1"}));
    assert!(m.get("frequency_penalty").is_none() && m.get("seed").is_none());
    let m = to_messages(
        json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stop": ["a", "b"]}),
    );
    assert_eq!(m["stop_sequences"], json!(["a", "b"]));
}

/// Structured output (what openai-python's `chat.completions.parse`, the Agents SDK's
/// `output_type` send) is Anthropic's `output_config.format` with the same schema; text is
/// the default, nothing to say.
#[test]
fn a_json_schema_response_format_becomes_the_output_format() {
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}},
                        "required": ["city"], "additionalProperties": false});
    let m = to_messages(
        json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "Weather", "schema": schema, "strict": true}}}),
    );
    assert_eq!(
        m["output_config"],
        json!({"format": {"type": "json_schema", "schema": schema}})
    );
    let m = to_messages(
        json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "text"}}),
    );
    assert!(m.get("output_config").is_none());
}

/// A schema as pydantic writes it for `Field(ge=1)`, `constr(max_length=…)`, a union and an
/// open object reaches Anthropic as its own SDK rewrites one: objects closed, `oneOf` as
/// `anyOf`, the keywords Anthropic does not take moved into the description.
#[test]
fn a_schema_is_rewritten_as_anthropics_sdk_rewrites_it() {
    let schema = json!({
        "type": "object", "title": "Order",
        "properties": {
            "count": {"type": "integer", "minimum": 1, "description": "How many"},
            "code": {"type": "string", "maxLength": 8, "format": "uuid"},
            "tags": {"type": "array", "items": {"type": "string", "format": "hex"}, "minItems": 2},
            "size": {"oneOf": [{"type": "integer"}, {"enum": ["S", "M"]}]},
            "ref": {"$ref": "#/$defs/Item"},
        },
        "$defs": {"Item": {"type": "object", "properties": {"id": {"type": "string"}}}},
        "required": ["count"], "additionalProperties": true,
    });
    let m = to_messages(
        json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "Order", "schema": schema}}}),
    );
    assert_eq!(
        m["output_config"]["format"]["schema"],
        json!({
            "$defs": {"Item": {"type": "object", "properties": {"id": {"type": "string"}},
                               "additionalProperties": false}},
            "type": "object", "title": "Order",
            "properties": {
                "count": {"type": "integer", "description": "How many\n\n{minimum: 1}"},
                "code": {"type": "string", "format": "uuid", "description": "{maxLength: 8}"},
                "tags": {"type": "array", "items": {"type": "string", "description": "{format: \"hex\"}"},
                         "description": "{minItems: 2}"},
                "size": {"anyOf": [{"type": "integer"}, {"enum": ["S", "M"]}]},
                "ref": {"$ref": "#/$defs/Item"},
            },
            "additionalProperties": false, "required": ["count"],
        })
    );
    // A part with nothing to say what it is, as the SDK refuses it.
    let mut body = obj(json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}));
    body.insert(
        "response_format".into(),
        json!({"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"x": {}}}}}),
    );
    assert_eq!(
        chat_to_messages(&body, "x", 1, Sampling::Taken)
            .unwrap_err()
            .param,
        "response_format.json_schema.schema"
    );
}

#[test]
fn tools_and_tool_choice_map_across() {
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": false});
    let tools = json!([{"type": "function", "function": {"name": "weather", "description": "Weather now", "parameters": schema}}]);
    let hi = json!([{"role": "user", "content": "Hi"}]);
    let m = to_messages(
        json!({"model": "m", "messages": hi, "tools": tools, "tool_choice": "required"}),
    );
    assert_eq!(
        m["tools"],
        json!([{"name": "weather", "description": "Weather now", "input_schema": schema}])
    );
    assert_eq!(m["tool_choice"], json!({"type": "any"}));
    for (chat, messages) in [
        (json!("auto"), json!({"type": "auto"})),
        (json!("none"), json!({"type": "none"})),
        (
            json!({"type": "function", "function": {"name": "weather"}}),
            json!({"type": "tool", "name": "weather"}),
        ),
    ] {
        let m =
            to_messages(json!({"model": "m", "messages": hi, "tools": tools, "tool_choice": chat}));
        assert_eq!(m["tool_choice"], messages);
    }
    let m = to_messages(
        json!({"model": "m", "messages": hi, "tools": tools, "parallel_tool_calls": false}),
    );
    assert_eq!(
        m["tool_choice"],
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    let m = to_messages(
        json!({"model": "m", "messages": hi, "tools": tools, "tool_choice": "required", "parallel_tool_calls": false}),
    );
    assert_eq!(
        m["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    let m = to_messages(
        json!({"model": "m", "messages": hi, "tools": [{"type": "function", "function": {"name": "now"}}]}),
    );
    assert_eq!(
        m["tools"][0]["input_schema"],
        json!({"type": "object", "properties": {}})
    );
}

/// The chat request for a chat body written both ways (in the shape, `None` outside it; and
/// from its parse into values), for a test that both writers agree.
fn to_messages_both_ways(chat: &Value) -> (Option<Value>, Value) {
    let text = chat.to_string();
    let parsed = sluice_proxy::request::parse(text.as_bytes()).unwrap();
    let in_shape = sluice_proxy::anthropic::request::chat_to_messages_in_shape(
        parsed.members(),
        "claude-up",
        4096,
        Sampling::Taken,
        false,
    )
    .map(|bytes| serde_json::from_slice(&bytes).unwrap());
    let mut whole = to_messages(chat.clone());
    whole["stream"] = Value::Bool(false);
    (in_shape, whole)
}

/// OpenAI's `allowed_tools` choice (openai-python's `ChatCompletionAllowedToolChoiceParam`)
/// lets the model call only the tools it lists, `auto` or `required`. Anthropic has no such
/// choice, but the model is offered the allowed tools alone, under `auto` or `any`; before,
/// the request was refused ("tool_choice must name a function").
#[test]
fn an_allowed_tools_choice_offers_the_model_those_tools_alone() {
    let tool = |name: &str| json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}});
    let allowed = |mode: &str, names: &[&str]| {
        let tools: Vec<Value> = names
            .iter()
            .map(|n| json!({"type": "function", "function": {"name": n}}))
            .collect();
        json!({"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": tools}})
    };
    let request = |choice: Value| {
        json!({"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [tool("weather"), tool("time"), tool("news")], "tool_choice": choice,
            "parallel_tool_calls": false})
    };
    for (mode, kind) in [("auto", "auto"), ("required", "any")] {
        let chat = request(allowed(mode, &["news", "weather"]));
        let (in_shape, m) = to_messages_both_ways(&chat);
        let names: Vec<&str> = m["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["weather", "news"], "{m}");
        assert_eq!(
            m["tool_choice"],
            json!({"type": kind, "disable_parallel_tool_use": true})
        );
        if let Some(in_shape) = in_shape {
            assert_eq!(in_shape, m);
        }
    }
    // Allowing a tool the request does not define, or no tool, allows nothing to call.
    for (choice, param) in [
        (
            allowed("auto", &["weather", "stocks"]),
            "tool_choice.allowed_tools.tools[1]",
        ),
        (allowed("auto", &[]), "tool_choice.allowed_tools.tools"),
        (
            allowed("sometimes", &["weather"]),
            "tool_choice.allowed_tools.mode",
        ),
        (
            json!({"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "custom", "custom": {"name": "weather"}}]}}),
            "tool_choice.allowed_tools.tools[0]",
        ),
    ] {
        let err = chat_to_messages(&obj(request(choice)), "x", 1, Sampling::Taken).unwrap_err();
        assert_eq!(err.param, param, "{}", err.message);
    }
}

/// A strict tool (OpenAI's `function.strict: true`, Anthropic's `strict: true`, openai-python's
/// `FunctionDefinition` and anthropic-sdk-python's `ToolParam`) guarantees that a call's input
/// fits its schema, and agents (the Agents SDK, by default) skip checking it. Before, the
/// member was dropped both ways: the model could answer arguments outside the schema.
#[test]
fn strict_tools_stay_strict_both_ways() {
    // chat → Messages: strict, the schema as Anthropic's strict mode takes it (`minimum`, a
    // keyword it refuses, moved into the description, as its SDK does).
    let parameters = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}, "required": ["n"], "additionalProperties": false});
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "Roll"}],
    "tools": [
        {"type": "function", "function": {"name": "roll", "parameters": parameters, "strict": true}},
        {"type": "function", "function": {"name": "loose", "parameters": parameters, "strict": false}},
    ]});
    let (in_shape, m) = to_messages_both_ways(&chat);
    assert_eq!(in_shape.as_ref(), Some(&m));
    assert_eq!(m["tools"][0]["strict"], true);
    assert_eq!(
        m["tools"][0]["input_schema"],
        json!({"type": "object", "properties": {"n": {"type": "integer", "description": "{minimum: 1}"}}, "additionalProperties": false, "required": ["n"]})
    );
    assert!(m["tools"][1].get("strict").is_none());
    assert_eq!(m["tools"][1]["input_schema"], parameters);

    // Messages → chat: strict where OpenAI's strict mode takes the schema (every property
    // required, no other allowed); not where it would refuse the request.
    let exact = json!({"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"], "additionalProperties": false});
    let optional = json!({"type": "object", "properties": {"q": {"type": "string"}}, "additionalProperties": false});
    let messages = json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Find"}],
    "tools": [
        {"name": "exact", "input_schema": exact, "strict": true},
        {"name": "optional", "input_schema": optional, "strict": true},
        {"name": "loose", "input_schema": exact},
    ]});
    let text = messages.to_string();
    let parsed = sluice_proxy::request::parse(text.as_bytes()).unwrap();
    let in_shape: Value = serde_json::from_slice(
        &sluice_proxy::anthropic::request::messages_to_chat_in_shape(
            parsed.members(),
            "gpt-up",
            "max_tokens",
        )
        .unwrap(),
    )
    .unwrap();
    let c = to_chat(messages);
    assert_eq!(in_shape, c);
    let functions: Vec<&Value> = c["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["function"])
        .collect();
    assert_eq!(functions[0]["strict"], true);
    assert_eq!(functions[0]["parameters"], exact);
    assert!(functions[1].get("strict").is_none() && functions[2].get("strict").is_none());
}

#[test]
fn tool_calls_and_tool_results_become_blocks() {
    let m = to_messages(json!({"model": "m", "messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "Rain"}]},
        {"role": "user", "content": "Thanks"},
    ]}));
    assert_eq!(
        m["messages"][1],
        json!({"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "weather", "input": {}},
        ]})
    );
    assert_eq!(
        m["messages"][2],
        json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": [{"type": "text", "text": "Sunny"}]},
            {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "Rain"}]},
            {"type": "text", "text": "Thanks"},
        ]})
    );
}

#[test]
fn invalid_tool_arguments_are_a_client_error_naming_the_field() {
    for arguments in ["{not json", "[1,2]"] {
        let err = chat_to_messages(
            &obj(json!({"model": "m", "messages": [
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
            ]})),
            "x",
            1,
            Sampling::Taken,
        )
        .unwrap_err();
        assert_eq!(err.param, "messages[0].tool_calls[0].function.arguments");
    }
}

#[test]
fn image_parts_become_image_blocks() {
    let m = to_messages(
        json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
        ]}]}),
    );
    assert_eq!(
        m["messages"][0]["content"],
        json!([
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        ])
    );
}

/// OpenAI's explicit prompt-cache breakpoints (`prompt_cache_breakpoint` on a content part)
/// are Anthropic's `cache_control` breakpoints: with `prompt_cache_options.mode: "explicit"`
/// the prompt is cached at the marks alone, so dropping them would cache nothing. Anthropic
/// refuses more than four: the latest four are kept.
#[test]
fn explicit_cache_breakpoints_become_cache_control() {
    let mark = json!({"mode": "explicit"});
    let explicit = json!({"mode": "explicit", "ttl": "30m"});
    let m = to_messages(
        json!({"model": "m", "prompt_cache_options": explicit, "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You are an agent.", "prompt_cache_breakpoint": mark}]},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}, "prompt_cache_breakpoint": mark},
            ]},
        ]}),
    );
    let ephemeral = json!({"type": "ephemeral"});
    assert_eq!(m["system"][0]["cache_control"], ephemeral);
    assert_eq!(m["messages"][0]["content"][0].get("cache_control"), None);
    assert_eq!(m["messages"][0]["content"][1]["cache_control"], ephemeral);
    assert_eq!(m.get("cache_control"), None);

    let parts: Vec<Value> = (0..5)
        .map(|i| json!({"type": "text", "text": format!("part {i}"), "prompt_cache_breakpoint": mark}))
        .collect();
    let m = to_messages(
        json!({"model": "m", "prompt_cache_options": explicit, "messages": [
            {"role": "user", "content": parts},
        ]}),
    );
    let marked: Vec<bool> = m["messages"][0]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|block| block.get("cache_control") == Some(&ephemeral))
        .collect();
    assert_eq!(marked, [false, true, true, true, true]);
}

#[test]
fn what_cannot_be_translated_is_refused_with_its_parameter() {
    let hi = json!([{"role": "user", "content": "Hi"}]);
    for (extra, param) in [
        (json!({"n": 2}), "n"),
        (json!({"logprobs": true}), "logprobs"),
        (
            json!({"functions": [{"name": "get_weather", "parameters": {"type": "object"}}]}),
            "functions",
        ),
        (json!({"function_call": "auto"}), "function_call"),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"tools": [{"type": "custom", "custom": {"name": "x"}}]}),
            "tools[0]",
        ),
        // Anthropic refuses a blank stop sequence, and the request with it.
        (json!({"stop": "\n"}), "stop"),
        (json!({"stop": ["END", " "]}), "stop"),
        (json!({"stop": [""]}), "stop"),
    ] {
        let mut body = obj(json!({"model": "m", "messages": hi}));
        body.extend(obj(extra));
        assert_eq!(
            chat_to_messages(&body, "x", 1, Sampling::Taken)
                .unwrap_err()
                .param,
            param
        );
    }
    let audio = json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]});
    assert_eq!(
        chat_to_messages(&obj(audio), "x", 1, Sampling::Taken)
            .unwrap_err()
            .param,
        "messages[0].content[0]"
    );
    let function =
        json!({"model": "m", "messages": [{"role": "function", "name": "f", "content": "x"}]});
    assert_eq!(
        chat_to_messages(&obj(function), "x", 1, Sampling::Taken)
            .unwrap_err()
            .param,
        "messages[0].role"
    );
}

// ---- Messages response → chat completion ---------------------------------------------

/// The chat completion of a message given as a value (of `type` `message` unless it says
/// otherwise), parsed.
fn message_to_completion(message: &Value, created: u64) -> Value {
    let mut message = message.clone();
    if let Some(members) = message.as_object_mut() {
        members.entry("type").or_insert_with(|| json!("message"));
    }
    let (completion, _) = completion_of(&message.to_string(), created).expect("a message");
    serde_json::from_slice(&completion).expect("JSON")
}

#[test]
fn a_message_becomes_a_chat_completion() {
    let c = message_to_completion(
        &json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Let me "},
                {"type": "text", "text": "check."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20},
        }),
        1_700_000_000,
    );
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["id"], "msg_1");
    assert_eq!(c["created"], 1_700_000_000);
    let choice = &c["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "Let me check.");
    assert_eq!(
        choice["message"]["tool_calls"],
        json!([{"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}])
    );
    assert_eq!(
        c["usage"],
        json!({"prompt_tokens": 130, "completion_tokens": 5, "total_tokens": 135,
               "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 20}})
    );
}

#[test]
fn stop_reasons_map_to_finish_reasons() {
    for (stop, finish) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ] {
        let c = message_to_completion(
            &json!({"id": "m", "model": "x", "content": [{"type": "text", "text": "t"}], "stop_reason": stop, "usage": {"input_tokens": 1, "output_tokens": 1}}),
            0,
        );
        assert_eq!(c["choices"][0]["finish_reason"], finish, "{stop}");
    }
    let refused = message_to_completion(
        &json!({"id": "m", "model": "x", "content": [{"type": "text", "text": "I can't."}], "stop_reason": "refusal", "usage": {}}),
        0,
    );
    assert_eq!(refused["choices"][0]["message"]["content"], Value::Null);
    assert_eq!(refused["choices"][0]["message"]["refusal"], "I can't.");
}

// ---- Messages request → chat request -------------------------------------------------

#[test]
fn a_messages_request_becomes_a_chat_request() {
    let schema = json!({"type": "object", "properties": {"q": {"type": "string"}}});
    let c = to_chat(json!({
        "model": "claude", "max_tokens": 100, "temperature": 0.2, "top_p": 0.8, "top_k": 5,
        "stop_sequences": ["END"], "stream": true, "metadata": {"user_id": "u"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "search", "description": "Search", "input_schema": schema}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "messages": [
            {"role": "user", "content": "Find cats"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Searching."},
                {"type": "tool_use", "id": "toolu_1", "name": "search", "input": {"q": "cats"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "3 cats"},
                {"type": "text", "text": "And dogs?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}},
            ]},
            {"role": "system", "content": "Answer in French."},
        ],
    }));
    assert_eq!(c["model"], "gpt-up");
    assert_eq!(c["max_tokens"], 100);
    assert_eq!(c["temperature"], 0.2);
    assert_eq!(c["top_p"], 0.8);
    assert_eq!(c["stop"], json!(["END"]));
    assert_eq!(c["stream"], true);
    assert_eq!(c["stream_options"], json!({"include_usage": true}));
    assert_eq!(c["user"], "u");
    assert!(c.get("top_k").is_none() && c.get("thinking").is_none());
    assert_eq!(c["tool_choice"], "required");
    assert_eq!(c["parallel_tool_calls"], false);
    assert_eq!(
        c["tools"],
        json!([{"type": "function", "function": {"name": "search", "description": "Search", "parameters": schema}}])
    );
    assert_eq!(
        c["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Find cats"},
            {"role": "assistant", "content": "Searching.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "search", "arguments": "{\"q\":\"cats\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "3 cats"},
            {"role": "user", "content": [
                {"type": "text", "text": "And dogs?"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
            ]},
            {"role": "system", "content": "Answer in French."},
        ])
    );
}

#[test]
fn messages_tool_choices_map_across() {
    for (anthropic, chat) in [
        (json!({"type": "auto"}), json!("auto")),
        (json!({"type": "none"}), json!("none")),
        (
            json!({"type": "tool", "name": "f"}),
            json!({"type": "function", "function": {"name": "f"}}),
        ),
    ] {
        let c = to_chat(json!({"model": "m", "max_tokens": 1, "messages": [],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}], "tool_choice": anthropic}));
        assert_eq!(c["tool_choice"], chat);
        assert!(c.get("parallel_tool_calls").is_none());
    }
}

/// OpenAI takes a function name of at most 64 characters of `[a-zA-Z0-9_-]`, Anthropic 128
/// (Claude Code's MCP tools pass 64). The chat request gives such a tool a portable name: the
/// same in its tools, its tool choice and an earlier turn's call, both ways the request is
/// written, and another for a name alike in its first 51 characters. Other names are kept.
#[test]
fn tool_names_openai_refuses_are_made_portable_alike_throughout_a_request() {
    let long = "mcp__8b383b1d-b46a-4b70-994c-c7c26b866287__check_domain_availability_and_price";
    let twin = "mcp__8b383b1d-b46a-4b70-994c-c7c26b866287__check_domain_availability_and_renew";
    let tool = |name: &str| json!({"name": name, "input_schema": {"type": "object"}});
    let request = json!({"model": "m", "max_tokens": 8,
        "tools": [tool(long), tool(twin), tool("mcp.read"), tool("Read")],
        "tool_choice": {"type": "tool", "name": long},
        "messages": [
            {"role": "user", "content": "Free?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": long, "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "yes"}]}]});
    let text = request.to_string();
    let parsed = sluice_proxy::request::parse(text.as_bytes()).unwrap();
    let in_shape: Value = serde_json::from_slice(
        &sluice_proxy::anthropic::request::messages_to_chat_in_shape(
            parsed.members(),
            "gpt-up",
            "max_tokens",
        )
        .unwrap(),
    )
    .unwrap();
    for chat in [to_chat(request), in_shape] {
        let names: Vec<&str> = chat["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap())
            .collect();
        let [portable, other, dotted, read] = names[..] else {
            panic!("{chat}");
        };
        for name in [portable, other, dotted] {
            assert!(name.len() <= 64, "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{name}"
            );
        }
        assert!(portable.starts_with(&long[..51]), "{portable}");
        assert_ne!(portable, other);
        assert_eq!(read, "Read");
        assert_eq!(chat["tool_choice"]["function"]["name"], portable, "{chat}");
        assert_eq!(
            chat["messages"][1]["tool_calls"][0]["function"]["name"], portable,
            "{chat}"
        );
    }
}

/// OpenAI's own API refuses `max_tokens` for its reasoning models: for a backend there, a
/// Messages request's `max_tokens` goes as `max_completion_tokens` (the request written from
/// its members is held to this one by the property tests in `anthropic/request.rs`).
#[test]
fn max_tokens_goes_by_the_name_the_backend_takes() {
    let request =
        json!({"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]});
    let parsed = messages_to_chat(&obj(request), "gpt-5", "max_completion_tokens").unwrap();
    assert_eq!(parsed["max_completion_tokens"], 64);
    assert!(parsed.get("max_tokens").is_none());
}

/// OpenAI's reasoning models (the o-series, GPT-5) refuse a `temperature` or `top_p` other
/// than the default ("Only the default (1) value is supported") and any `stop` (openai-python:
/// "Not supported with latest reasoning models"); OpenAI's API takes at most 4 stop
/// sequences. Before, a Messages client's `temperature: 0` (older Anthropic SDKs' apps,
/// hand-written clients) got a 400 from a GPT-5 route, and `stop_sequences` one the backend's
/// words; now sampling is left to the model, and stop sequences it cannot take are refused
/// here, naming them, so that another backend of the model may serve the request.
#[test]
fn openai_reasoning_models_get_no_sampling_and_no_stop_sequences() {
    let request = |extra: Value| {
        let mut body = obj(
            json!({"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}),
        );
        body.extend(obj(extra));
        body
    };
    let written = |body: &Map<String, Value>, model: &str, limit: &str| {
        let text = Value::Object(body.clone()).to_string();
        let parsed = sluice_proxy::request::parse(text.as_bytes()).unwrap();
        let in_shape = sluice_proxy::anthropic::request::messages_to_chat_in_shape(
            parsed.members(),
            model,
            limit,
        )
        .map(|bytes| serde_json::from_slice::<Value>(&bytes).unwrap());
        let whole = messages_to_chat(body, model, limit).map(Value::Object);
        if let (Some(in_shape), Ok(whole)) = (&in_shape, &whole) {
            assert_eq!(in_shape, whole);
        }
        whole
    };
    let sampled = request(json!({"temperature": 0, "top_p": 0.9, "stop_sequences": []}));
    for model in ["gpt-5", "gpt-5.1-codex", "o3", "o4-mini"] {
        let c = written(&sampled, model, "max_completion_tokens").unwrap();
        assert!(
            c.get("temperature").is_none() && c.get("top_p").is_none() && c.get("stop").is_none(),
            "{model}: {c}"
        );
        let err = written(
            &request(json!({"stop_sequences": ["END"]})),
            model,
            "max_completion_tokens",
        )
        .unwrap_err();
        assert_eq!(err.param, "stop_sequences");
    }
    // gpt-4o on OpenAI, and any model on another server, take them.
    for (model, limit) in [("gpt-4o", "max_completion_tokens"), ("gpt-5", "max_tokens")] {
        let c = written(&sampled, model, limit).unwrap();
        assert_eq!((&c["temperature"], &c["top_p"]), (&json!(0), &json!(0.9)));
    }
    // Five stop sequences: more than OpenAI's API takes, not more than another server does.
    let five = request(json!({"stop_sequences": ["a", "b", "c", "d", "e"]}));
    let err = written(&five, "gpt-4o", "max_completion_tokens").unwrap_err();
    assert_eq!(err.param, "stop_sequences");
    let c = written(&five, "qwen3", "max_tokens").unwrap();
    assert_eq!(c["stop"], json!(["a", "b", "c", "d", "e"]));
    let four = request(json!({"stop_sequences": ["a", "b", "c", "d"]}));
    let c = written(&four, "gpt-4o", "max_completion_tokens").unwrap();
    assert_eq!(c["stop"], json!(["a", "b", "c", "d"]));
}

#[test]
fn what_an_openai_backend_cannot_take_is_refused() {
    let err = messages_to_chat(
        &obj(json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]})),
        "x",
        "max_tokens",
    )
    .unwrap_err();
    assert_eq!(err.param, "messages[0].content[0]");
    let err = messages_to_chat(
        &obj(json!({"model": "m", "max_tokens": 1, "messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]})),
        "x",
        "max_tokens",
    )
    .unwrap_err();
    assert_eq!(err.param, "tools[0]");
}

// ---- chat completion → Messages response ---------------------------------------------

#[test]
fn a_chat_completion_becomes_a_message() {
    let m = completion_to_message(&json!({
        "id": "chatcmpl-abc", "object": "chat.completion", "model": "gpt-up",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": "On it.",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57, "prompt_tokens_details": {"cached_tokens": 30}},
    }))
    .unwrap();
    assert_eq!(
        m,
        json!({
            "id": "msg_abc", "type": "message", "role": "assistant", "model": "gpt-up",
            "content": [
                {"type": "text", "text": "On it."},
                {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 20, "output_tokens": 7, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 0},
        })
    );
    for (finish, stop) in [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("content_filter", "refusal"),
    ] {
        let m = completion_to_message(&json!({"id": "x", "choices": [{"finish_reason": finish, "message": {"content": "t"}}]})).unwrap();
        assert_eq!(m["stop_reason"], stop);
    }
    let broken = json!({"choices": [{"message": {"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}}]});
    assert!(completion_to_message(&broken).is_err());
}

/// A Messages client (Claude Code) over DeepSeek or xAI is told what the provider billed:
/// DeepSeek's `prompt_cache_hit_tokens` as cache reads, xAI's reasoning (beside
/// `completion_tokens`, inside `total_tokens`) as output, in the whole parse and the reading
/// in the shape alike.
#[test]
fn other_providers_usage_reaches_messages_clients_as_billed() {
    let answer = |usage: &str| {
        format!(
            r#"{{"id":"chatcmpl-1","object":"chat.completion","model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"Hi"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
        )
    };
    let deepseek = answer(
        r#"{"prompt_tokens":1000,"completion_tokens":5,"total_tokens":1005,"prompt_cache_hit_tokens":990,"prompt_cache_miss_tokens":10}"#,
    );
    let xai = answer(
        r#"{"prompt_tokens":10120,"completion_tokens":1499,"total_tokens":14428,"completion_tokens_details":{"reasoning_tokens":2809}}"#,
    );
    for (text, input, cache_read, output) in [(deepseek, 10, 990, 5), (xai, 10120, 0, 4308)] {
        let whole = completion_to_message(&serde_json::from_str(&text).unwrap()).unwrap();
        let usage = json!({"input_tokens": input, "output_tokens": output,
            "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": 0});
        assert_eq!(whole["usage"], usage, "{text}");
        assert_eq!(message_for(&text).unwrap()["usage"], usage, "{text}");
    }
}

/// What a Messages client is given for a completion's text, as the relay decides it: the
/// message read in its shape, else the whole parse's, else `None` (a 502).
fn message_for(text: &str) -> Option<Value> {
    if let Some(message) = completion_to_message_in_shape(text) {
        return Some(serde_json::from_slice(&message).unwrap());
    }
    completion_to_message(&serde_json::from_str(text).ok()?).ok()
}

/// A backend that runs out of tokens while writing a call's arguments answers
/// `finish_reason: length` with arguments cut off. The client gets what Anthropic gives, an
/// answer with `stop_reason: max_tokens` (its cue to retry with a larger `max_tokens`), not a
/// 502 its SDK retries as it came (paid for each time); the cut call is dropped, the calls
/// and text before it kept.
#[test]
fn a_completion_cut_off_in_a_tool_call_is_max_tokens_without_the_cut_call() {
    let call = |id: &str, arguments: &str| json!({"id": id, "type": "function", "function": {"name": "Write", "arguments": arguments}});
    let completion = |calls: Vec<Value>| {
        json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-up",
            "choices": [{"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": "Writing.",
                "tool_calls": calls}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7}})
        .to_string()
    };
    let cut = message_for(&completion(vec![call("call_1", "{\"content\":\"abc")]))
        .expect("an answer, not a 502");
    assert_eq!(cut["stop_reason"], "max_tokens");
    assert_eq!(
        cut["content"],
        json!([{"type": "text", "text": "Writing."}])
    );
    assert_eq!(cut["usage"]["output_tokens"], 7);
    // A call before the cut one is whole: kept.
    let after_one = message_for(&completion(vec![
        call("call_1", "{\"path\":\"a.md\"}"),
        call("call_2", "{\"content\":\"abc"),
    ]))
    .expect("an answer, not a 502");
    assert_eq!(after_one["stop_reason"], "max_tokens");
    assert_eq!(
        after_one["content"],
        json!([
            {"type": "text", "text": "Writing."},
            {"type": "tool_use", "id": "call_1", "name": "Write", "input": {"path": "a.md"}},
        ])
    );
    // Cut off after a call's arguments were whole: the call is kept, the reason still length's.
    let whole = message_for(&completion(vec![call("call_1", "{\"path\":\"a.md\"}")]))
        .expect("an answer, not a 502");
    assert_eq!(whole["stop_reason"], "max_tokens");
    assert_eq!(whole["content"][1]["input"], json!({"path": "a.md"}));
}

// ---- errors ----------------------------------------------------------------------------

#[test]
fn anthropic_errors_reach_chat_clients_in_openai_shape() {
    let (status, body) = error::to_openai(
        StatusCode::from_u16(529).unwrap(),
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    );
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        json!({"error": {"message": "Overloaded", "type": "server_error", "param": null, "code": "overloaded_error"}})
    );
    let (status, body) = error::to_openai(
        StatusCode::BAD_REQUEST,
        br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#,
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["message"], "max_tokens: Field required");
    assert_eq!(v["error"]["code"], "invalid_request_error");
    // A prompt past the model's context has OpenAI's code, which clients trim their history on.
    let (status, body) = error::to_openai(
        StatusCode::BAD_REQUEST,
        br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 215000 tokens > 200000 maximum"}}"#,
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["error"],
        json!({"message": "prompt is too long: 215000 tokens > 200000 maximum", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"})
    );
    // Anthropic's other words for it: the input with the answer asked for past the context.
    for message in [
        "input length and `max_tokens` exceed context limit: 182026 + 32000 > 200000, decrease input length or `max_tokens` and try again",
        "input is too long for requested model.",
    ] {
        let body = json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}});
        let (_, body) = error::to_openai(StatusCode::BAD_REQUEST, body.to_string().as_bytes());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "context_length_exceeded", "{message}");
        assert_eq!(v["error"]["param"], "messages", "{message}");
    }
}

#[test]
fn openai_errors_reach_messages_clients_in_anthropic_shape() {
    let body = error::to_anthropic(
        StatusCode::TOO_MANY_REQUESTS,
        br#"{"error":{"message":"Slow down","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}})
    );
    for (status, kind) in [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (529, "overloaded_error"),
    ] {
        assert_eq!(error::error_type(status), kind);
    }
}

/// A prompt past the model's context, as the OpenAI-compatible servers put behind Claude Code
/// say it, reaches a Messages client in Anthropic's words ("prompt is too long: …"), which
/// Claude Code compacts the conversation on: with their words after them, never the raw JSON
/// of Google's list-shaped body or xAI's. A 400 about something else keeps its own words.
#[test]
fn other_servers_context_overflows_reach_messages_clients_in_anthropics_words() {
    for (server, body, message) in [
        (
            "llama.cpp",
            json!({"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it", "type": "exceed_context_size_error", "n_prompt_tokens": 40000, "n_ctx": 32768}}),
            "the request exceeds the available context size, try increasing it",
        ),
        (
            "SGLang",
            json!({"object": "error", "message": "The input (140210 tokens) is longer than the model's context length (131072 tokens).", "type": "BadRequestError", "param": null, "code": 400}),
            "The input (140210 tokens) is longer than the model's context length (131072 tokens).",
        ),
        (
            "xAI",
            json!({"code": "Client specified an invalid argument", "error": "This model's maximum prompt length is 131072 but the request contains 537812 tokens."}),
            "This model's maximum prompt length is 131072 but the request contains 537812 tokens.",
        ),
        (
            "Gemini",
            json!([{"error": {"code": 400, "message": "The input token count (1300000) exceeds the maximum number of tokens allowed (1048575).", "status": "INVALID_ARGUMENT"}}]),
            "The input token count (1300000) exceeds the maximum number of tokens allowed (1048575).",
        ),
        (
            "Copilot",
            json!({"error": {"message": "prompt token count of 200000 exceeds the limit of 128000", "code": "model_max_prompt_tokens_exceeded"}}),
            "prompt token count of 200000 exceeds the limit of 128000",
        ),
        (
            "Groq",
            json!({"error": {"message": "Please reduce the length of the messages or completion.", "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}),
            "Please reduce the length of the messages or completion.",
        ),
    ] {
        let body = error::to_anthropic(StatusCode::BAD_REQUEST, body.to_string().as_bytes());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{server}");
        let said = v["error"]["message"].as_str().unwrap();
        assert!(said.starts_with("prompt is too long: "), "{server}: {said}");
        assert!(said.ends_with(message), "{server}: {said}");
    }
    // Other 400s, Google's list-shaped one included, keep their words.
    for (body, message) in [
        (
            json!({"error": {"message": "max_tokens is too large: 50000. This model supports at most 16384 completion tokens, whereas you provided 50000.", "type": "invalid_request_error", "param": "max_tokens", "code": "invalid_value"}}),
            "max_tokens is too large: 50000. This model supports at most 16384 completion tokens, whereas you provided 50000.",
        ),
        (
            json!([{"error": {"code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT"}}]),
            "Request contains an invalid argument.",
        ),
    ] {
        let body = error::to_anthropic(StatusCode::BAD_REQUEST, body.to_string().as_bytes());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["message"], message);
    }
    // The other way, an Anthropic-compatible endpoint's overflow in its own words (DeepSeek's)
    // has OpenAI's code for a chat client.
    let body = json!({"type": "error", "error": {"type": "invalid_request_error", "message": "This model's maximum context length is 131072 tokens. However, you requested 140210 tokens."}});
    let (_, body) = error::to_openai(StatusCode::BAD_REQUEST, body.to_string().as_bytes());
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
}

// ---- streams ---------------------------------------------------------------------------

/// Parses a whole SSE text into events.
fn events(text: &str) -> Vec<Event> {
    let mut items = Vec::new();
    SseParser::default()
        .push(text.as_bytes(), &mut items)
        .unwrap();
    items
        .into_iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some(e),
            Item::Comment(_) => None,
        })
        .collect()
}

fn anthropic_event(kind: &str, data: Value) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

/// A real Anthropic tool-use stream: message_start, ping, a text block, a tool block whose
/// first input_json_delta is empty, message_delta, message_stop.
fn anthropic_tool_stream() -> String {
    [
        anthropic_event("message_start", json!({"type": "message_start", "message": {"id": "msg_9", "type": "message", "role": "assistant", "model": "claude-up", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5}}})),
        anthropic_event("ping", json!({"type": "ping"})),
        anthropic_event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
        anthropic_event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking"}})),
        anthropic_event("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        anthropic_event("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}})),
        anthropic_event("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ""}})),
        anthropic_event("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}})),
        anthropic_event("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}})),
        anthropic_event("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
        anthropic_event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 42}})),
        anthropic_event("message_stop", json!({"type": "message_stop"})),
    ]
    .concat()
}

/// The chat chunks (frames) an Anthropic event stream `text` becomes, without the usage chunk.
fn chunks_of(text: &str) -> Vec<Bytes> {
    let mut translator = ChunksFromEvents::new(7, false);
    let mut frames = Vec::new();
    for event in events(text) {
        translator.push(&event, &mut frames);
    }
    frames
}

fn data_of(frames: &[Bytes]) -> Vec<Value> {
    frames
        .iter()
        .flat_map(|f| events(std::str::from_utf8(f).unwrap()))
        .filter(|e| e.data != "[DONE]")
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect()
}

#[test]
fn an_anthropic_stream_becomes_chat_chunks() {
    let mut translator = ChunksFromEvents::new(7, true);
    let mut frames = Vec::new();
    let mut flows = Vec::new();
    for event in events(&anthropic_tool_stream()) {
        flows.push(translator.push(&event, &mut frames));
    }
    assert_eq!(flows.last(), Some(&Flow::Done));
    assert!(
        flows[..flows.len() - 1]
            .iter()
            .all(|f| *f == Flow::Continue)
    );
    assert_eq!(
        frames.last().unwrap(),
        &Bytes::from_static(b"data: [DONE]\n\n")
    );
    let chunks = data_of(&frames);
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "msg_9")
    );
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["delta"])
        .collect();
    assert_eq!(deltas[0], &json!({"role": "assistant", "content": ""}));
    assert_eq!(deltas[1], &json!({"content": "Checking"}));
    assert_eq!(
        deltas[2],
        &json!({"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": ""}}]})
    );
    let arguments: String = deltas[3..]
        .iter()
        .filter_map(|d| d.pointer("/tool_calls/0/function/arguments")?.as_str())
        .collect();
    assert_eq!(arguments, "{\"city\": \"Paris\"}");
    // The empty first input_json_delta made no chunk.
    assert_eq!(deltas.len(), 6);
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"].get(0)?["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 30);
    assert_eq!(usage["usage"]["completion_tokens"], 42);
    assert_eq!(
        translator.usage(),
        Some(Usage {
            input: 30,
            output: 42,
            cache_read: 5,
            ..Usage::default()
        })
    );
}

/// A tool that takes no parameters streams one empty piece of input: the chat client, which
/// joins the pieces of a call's arguments and parses them, gets `{}` (as a whole answer gives
/// it), not an empty string its SDK fails to parse.
#[test]
fn a_tool_call_without_input_streams_empty_arguments_as_an_object() {
    let text = [
        anthropic_event("message_start", json!({"type": "message_start", "message": {"id": "msg_9", "type": "message", "role": "assistant", "model": "claude-up", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}})),
        anthropic_event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}})),
        anthropic_event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}})),
        anthropic_event("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        anthropic_event("content_block_start", json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {}}})),
        anthropic_event("content_block_delta", json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Paris\"}"}})),
        anthropic_event("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
        anthropic_event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 12}})),
        anthropic_event("message_stop", json!({"type": "message_stop"})),
    ]
    .concat();
    let frames = chunks_of(&text);
    let mut arguments = [String::new(), String::new()];
    for chunk in data_of(&frames) {
        for call in chunk
            .pointer("/choices/0/delta/tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = call["index"].as_u64().unwrap() as usize;
            arguments[index] += call["function"]["arguments"].as_str().unwrap();
        }
    }
    assert_eq!(arguments, ["{}", "{\"city\": \"Paris\"}"]);
}

/// A tool call whose whole input comes in its `content_block_start` (servers that make a
/// stream of a whole answer send no input delta) reaches the chat client with that input, not
/// `{}`.
#[test]
fn a_tool_input_given_at_its_start_is_the_calls_arguments() {
    let text = [
        anthropic_event("message_start", json!({"type": "message_start", "message": {"id": "msg_1", "model": "c", "usage": {"input_tokens": 5, "output_tokens": 1}}})),
        anthropic_event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}})),
        anthropic_event("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        anthropic_event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}})),
        anthropic_event("message_stop", json!({"type": "message_stop"})),
    ]
    .concat();
    let frames = chunks_of(&text);
    let arguments: String = data_of(&frames)
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/tool_calls/0/function/arguments"))
        .filter_map(Value::as_str)
        .collect();
    let arguments: Value = serde_json::from_str(&arguments).unwrap();
    assert_eq!(arguments, json!({"city": "Paris"}));
}

/// While Claude thinks (its thinking deltas give a chat client nothing) or Anthropic only
/// pings, the chat client still gets bytes: an SSE comment for each `ping` and every 32
/// events it gets nothing of, which the OpenAI SDKs skip. It got nothing for as long as the
/// model thought, and an idle timeout in front of it cut a stream both ends still served.
#[test]
fn a_thinking_models_silence_is_broken_by_comments() {
    let mut text = anthropic_event(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_1", "model": "c", "usage": {"input_tokens": 5, "output_tokens": 1}}}),
    );
    text += &anthropic_event(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
    );
    for _ in 0..100 {
        text += &anthropic_event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm "}}),
        );
    }
    text += &anthropic_event("ping", json!({"type": "ping"}));
    let frames = chunks_of(&text);
    let comments = frames.iter().filter(|f| f.starts_with(b":")).count();
    // 101 thinking events (the block's start among them): 3 comments; the ping: one more.
    assert_eq!(comments, 4, "{frames:?}");
    assert_eq!(
        frames.len(),
        1 + comments,
        "the role chunk, then comments alone"
    );
    // Every other frame is still a chunk a client reads.
    assert_eq!(data_of(&frames).len(), 1);
}

/// A `message_delta`'s usage is cumulative and stands over `message_start`'s: with server
/// tools (web search, code execution) its `input_tokens` pass the start's, and the turn is
/// billed the delta's. Read so when passed through and when translated for a chat client.
#[test]
fn a_message_deltas_cumulative_usage_stands() {
    let text = [
        anthropic_event("message_start", json!({"type": "message_start", "message": {"id": "msg_1", "model": "c", "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 0, "output_tokens": 1}}})),
        anthropic_event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})),
        anthropic_event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Found it."}})),
        anthropic_event("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        anthropic_event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"input_tokens": 30, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 0, "output_tokens": 12, "server_tool_use": {"web_search_requests": 1}}})),
        anthropic_event("message_stop", json!({"type": "message_stop"})),
    ]
    .concat();
    let expected = Usage {
        input: 35,
        output: 12,
        cache_read: 5,
        ..Usage::default()
    };
    let mut translator = ChunksFromEvents::new(7, false);
    let mut passed = EventUsage::default();
    let mut frames = Vec::new();
    for event in events(&text) {
        translator.push(&event, &mut frames);
        passed.observe(&event);
    }
    assert_eq!(translator.usage(), Some(expected));
    assert_eq!(passed.usage(), Some(expected));
}

#[test]
fn without_include_usage_no_usage_chunk_is_sent() {
    let mut translator = ChunksFromEvents::new(7, false);
    let mut frames = Vec::new();
    for event in events(&anthropic_tool_stream()) {
        translator.push(&event, &mut frames);
    }
    assert!(data_of(&frames).iter().all(|c| c.get("usage").is_none()));
    assert_eq!(translator.usage().unwrap().output, 42);
}

#[test]
fn an_error_event_ends_the_chat_stream_with_an_error() {
    let mut translator = ChunksFromEvents::new(0, false);
    let mut frames = Vec::new();
    let text = anthropic_event(
        "error",
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    );
    let flow = translator.push(&events(&text)[0], &mut frames);
    assert_eq!(flow, Flow::Failed);
    assert_eq!(data_of(&frames)[0]["error"]["message"], "Overloaded");
}

#[test]
fn passed_through_events_give_their_usage_and_end() {
    let mut usage = EventUsage::default();
    let flows: Vec<Flow> = events(&anthropic_tool_stream())
        .iter()
        .map(|e| usage.observe(e))
        .collect();
    assert_eq!(flows.last(), Some(&Flow::Done));
    assert_eq!(usage.usage().unwrap().input, 30);
    assert_eq!(usage.usage().unwrap().output, 42);
}

fn chat_chunk(delta: Value, finish: Option<&str>) -> String {
    format!(
        "data: {}\n\n",
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-up",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    )
}

/// An upstream that streams a tool call's arguments and never its name: the translation holds
/// the call until its name comes (nothing reaches the client, so nothing slows the upstream
/// down) and fails the stream once it holds more than an event may, rather than growing.
#[test]
fn a_tool_call_that_is_never_named_fails_the_stream_instead_of_growing() {
    let mut translator = EventsFromChunks::default();
    let mut frames = Vec::new();
    let first = chat_chunk(json!({"role": "assistant", "content": ""}), None);
    assert_eq!(
        translator.push(&events(&first)[0], &mut frames),
        Flow::Continue
    );
    let piece = chat_chunk(
        json!({"tool_calls": [{"index": 0, "function": {"arguments": "a".repeat(64 * 1024)}}]}),
        None,
    );
    let piece = &events(&piece)[0];
    let mut pushed = 0;
    let flow = loop {
        let flow = translator.push(piece, &mut frames);
        pushed += 1;
        if flow != Flow::Continue || pushed == 1_000 {
            break flow;
        }
    };
    assert_eq!(
        flow,
        Flow::Failed,
        "still holding after {pushed} pieces of 64 KiB"
    );
    assert!(pushed <= 20, "held {pushed} pieces of 64 KiB");
    let error = data_of(&frames).pop().unwrap();
    assert_eq!(error["type"], "error", "{error}");
}

/// Mistral's reasoning models write `content` as a list of parts, its thinking and its text:
/// the text reaches a Messages client, whole and streamed (it got an empty message, and was
/// charged for it), the thinking is left out as other servers' `reasoning_content` is.
#[test]
fn content_written_as_a_list_of_parts_reaches_a_messages_client() {
    let whole = completion_to_message(&json!({"id": "c", "model": "magistral-medium-2509",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": [
            {"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]},
            {"type": "text", "text": "Par"}, {"type": "text", "text": "is"}]},
            "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7}}))
    .unwrap();
    assert_eq!(whole["content"], json!([{"type": "text", "text": "Paris"}]));
    assert_eq!(whole["stop_reason"], "end_turn");

    let mut translator = EventsFromChunks::default();
    let mut frames = Vec::new();
    let text = [
        chat_chunk(json!({"role": "assistant", "content": [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]}]}), None),
        chat_chunk(json!({"content": [{"type": "text", "text": "Paris"}]}), None),
        chat_chunk(json!({}), Some("stop")),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    for event in events(&text) {
        translator.push(&event, &mut frames);
    }
    let deltas: Vec<Value> = data_of(&frames)
        .into_iter()
        .filter(|d| d["type"] == "content_block_delta")
        .collect();
    assert_eq!(deltas.len(), 1, "{deltas:?}");
    assert_eq!(
        deltas[0]["delta"],
        json!({"type": "text_delta", "text": "Paris"})
    );
}

/// Counters an upstream reports past what adds up (a hostile or broken one) count as the most
/// there is, rather than wrapping to a small prompt or panicking.
#[test]
fn an_anthropic_streams_counters_past_the_largest_add_up_to_the_largest() {
    let mut translator = ChunksFromEvents::new(7, true);
    let mut frames = Vec::new();
    let text = [
        anthropic_event("message_start", json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 1, "output_tokens": 1, "cache_read_input_tokens": u64::MAX}}})),
        anthropic_event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 3}})),
        anthropic_event("message_stop", json!({"type": "message_stop"})),
    ]
    .concat();
    for event in events(&text) {
        translator.push(&event, &mut frames);
    }
    assert_eq!(translator.usage().unwrap().input, u64::MAX);
}

#[test]
fn chat_chunks_become_an_anthropic_stream() {
    let text = [
        chat_chunk(json!({"role": "assistant", "content": ""}), None),
        chat_chunk(json!({"content": "Let me "}), None),
        chat_chunk(json!({"content": "look."}), None),
        // A tool call whose name comes in a later delta than its id.
        chat_chunk(json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"arguments": ""}}]}), None),
        chat_chunk(json!({"tool_calls": [{"index": 0, "function": {"name": "weather"}}]}), None),
        chat_chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}), None),
        chat_chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Rome\"}"}}]}), None),
        chat_chunk(json!({"tool_calls": [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "time", "arguments": "{}"}}]}), None),
        chat_chunk(json!({}), Some("tool_calls")),
        format!("data: {}\n\n", json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20}})),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    let mut translator = EventsFromChunks::default();
    let mut frames = Vec::new();
    let mut last = Flow::Continue;
    for event in events(&text) {
        last = translator.push(&event, &mut frames);
    }
    assert_eq!(last, Flow::Done);
    let all: Vec<Event> = frames
        .iter()
        .flat_map(|f| events(std::str::from_utf8(f).unwrap()))
        .collect();
    // Every event is named after its type, as the SDKs dispatch on the name.
    let names: Vec<&str> = all.iter().map(|e| e.event.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let data: Vec<Value> = all
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(data[0]["message"]["id"], "msg_1");
    assert_eq!(
        data[1]["content_block"],
        json!({"type": "text", "text": ""})
    );
    assert_eq!(
        data[5],
        json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "call_1", "name": "weather", "input": {}}})
    );
    assert_eq!(
        data[6]["delta"],
        json!({"type": "input_json_delta", "partial_json": "{\"city\":"})
    );
    assert_eq!(data[9]["content_block"]["name"], "time");
    assert_eq!(data[9]["index"], 2);
    assert_eq!(data[12]["delta"]["stop_reason"], "tool_use");
    assert_eq!(data[12]["usage"]["input_tokens"], 11);
    assert_eq!(data[12]["usage"]["output_tokens"], 9);
}

/// The events a translator makes of `text`'s chunks, as values.
fn translated(text: &str) -> Vec<Value> {
    let mut translator = EventsFromChunks::default();
    let mut frames = Vec::new();
    for event in events(text) {
        translator.push(&event, &mut frames);
    }
    frames
        .iter()
        .flat_map(|f| events(std::str::from_utf8(f).unwrap()))
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect()
}

/// Azure OpenAI starts its streams with its prompt filter's results: no choices, an empty id
/// and model. The message starts with the completion's first chunk, so it has its id and
/// model (before, every message from Azure was `msg_` of model "").
#[test]
fn a_first_chunk_without_choices_does_not_start_the_message() {
    let azure = json!({"choices": [], "created": 0, "id": "", "model": "", "object": "",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]});
    let text = [
        format!("data: {azure}\n\n"),
        chat_chunk(json!({"role": "assistant", "content": "Hi"}), None),
        chat_chunk(json!({}), Some("stop")),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    let data = translated(&text);
    assert_eq!(data[0]["type"], "message_start");
    assert_eq!(data[0]["message"]["id"], "msg_1");
    assert_eq!(data[0]["message"]["model"], "gpt-up");
    assert_eq!(data.last().unwrap()["type"], "message_stop");
}

/// A refusal streamed in `delta.refusal` is the answer's text, as in a whole answer (before,
/// the client got an empty message).
#[test]
fn a_streamed_refusal_is_the_messages_text() {
    let text = [
        chat_chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            None,
        ),
        chat_chunk(json!({"refusal": "I can't "}), None),
        chat_chunk(json!({"refusal": "help."}), None),
        chat_chunk(json!({}), Some("stop")),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    let deltas: Vec<Value> = translated(&text)
        .into_iter()
        .filter(|d| d["type"] == "content_block_delta")
        .map(|d| d["delta"]["text"].clone())
        .collect();
    assert_eq!(deltas, [json!("I can't "), json!("help.")]);
}

#[test]
fn a_chat_stream_without_content_still_frames_a_whole_message() {
    let mut translator = EventsFromChunks::default();
    let mut frames = Vec::new();
    for event in events(
        &[
            chat_chunk(json!({"role": "assistant"}), Some("length")),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat(),
    ) {
        translator.push(&event, &mut frames);
    }
    let all: Vec<Event> = frames
        .iter()
        .flat_map(|f| events(std::str::from_utf8(f).unwrap()))
        .collect();
    let names: Vec<&str> = all.iter().map(|e| e.event.as_deref().unwrap()).collect();
    assert_eq!(names, ["message_start", "message_delta", "message_stop"]);
    let delta: Value = serde_json::from_str(&all[1].data).unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
}

/// The same cut-off answer streamed: the tool block already sent cannot be taken back, so
/// the stop reason is what tells the client that its input is cut off: `max_tokens`, as
/// Anthropic streams it, not `tool_use`.
#[test]
fn a_chat_stream_cut_off_in_a_tool_call_stops_for_max_tokens() {
    let mut translator = EventsFromChunks::default();
    let mut frames = Vec::new();
    for event in events(
        &[
            chat_chunk(json!({"role": "assistant", "content": ""}), None),
            chat_chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "Write", "arguments": "{\"content\":\"abc"}}]}),
                None,
            ),
            chat_chunk(json!({}), Some("length")),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat(),
    ) {
        translator.push(&event, &mut frames);
    }
    let delta = data_of(&frames)
        .into_iter()
        .find(|e| e["type"] == "message_delta")
        .unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
}

/// A call whose first piece has no name, text streamed before its name comes (servers that
/// send a call's id first, then its name): the text block is stopped before the call's block
/// starts, as Anthropic streams blocks one after another (start, deltas, stop). Clients that
/// end a text part on its `content_block_stop` (the AI SDK) never ended it.
#[test]
fn a_call_named_after_text_started_stops_the_text_block_first() {
    let events = translated(
        &[
            chat_chunk(json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"arguments": ""}}]}), None),
            chat_chunk(json!({"content": "Reading it."}), None),
            chat_chunk(json!({"tool_calls": [{"index": 0, "function": {"name": "Read", "arguments": "{}"}}]}), None),
            chat_chunk(json!({}), Some("tool_calls")),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat(),
    );
    let blocks: Vec<(String, u64)> = events
        .iter()
        .filter(|e| e["type"].as_str().unwrap().starts_with("content_block_"))
        .filter(|e| e["type"] != "content_block_delta")
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["index"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected = [
        ("content_block_start", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_stop", 1),
    ]
    .map(|(kind, index)| (kind.to_owned(), index));
    assert_eq!(blocks, expected, "{events:?}");
    assert_eq!(events[1]["content_block"]["type"], "text");
    assert_eq!(events[4]["content_block"]["name"], "Read", "{events:?}");
}

/// Parallel calls that each come whole, with their own id and no index (as Gemini's
/// OpenAI-compatible endpoint sends them): a call with another id is another call, each its
/// own tool block, not pieces of the first.
#[test]
fn parallel_calls_without_an_index_become_a_block_each() {
    let call = |id: &str, name: &str, arguments: &str| {
        chat_chunk(
            json!({"tool_calls": [{"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}]}),
            None,
        )
    };
    let mut translator = EventsFromChunks::default();
    let mut frames = Vec::new();
    for event in events(
        &[
            chat_chunk(json!({"role": "assistant", "content": ""}), None),
            call("fc_1", "get_weather", "{\"city\":\"Paris\"}"),
            call("fc_2", "get_time", "{\"tz\":\"UTC\"}"),
            chat_chunk(json!({}), Some("stop")),
            "data: [DONE]\n\n".to_owned(),
        ]
        .concat(),
    ) {
        translator.push(&event, &mut frames);
    }
    let data = data_of(&frames);
    let starts: Vec<(u64, &str, &str)> = data
        .iter()
        .filter(|e| e["type"] == "content_block_start")
        .map(|e| {
            let block = &e["content_block"];
            (
                e["index"].as_u64().unwrap(),
                block["id"].as_str().unwrap(),
                block["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        starts,
        [(0, "fc_1", "get_weather"), (1, "fc_2", "get_time")]
    );
    for (index, input) in [(0, json!({"city": "Paris"})), (1, json!({"tz": "UTC"}))] {
        let joined: String = data
            .iter()
            .filter(|e| e["type"] == "content_block_delta" && e["index"] == index)
            .filter_map(|e| e["delta"]["partial_json"].as_str())
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&joined).ok(),
            Some(input),
            "{joined}"
        );
    }
    let delta = data.iter().find(|e| e["type"] == "message_delta").unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");

    // Not streamed, the two calls are two blocks already.
    let message = completion_to_message(&json!({"id": "x", "choices": [{"finish_reason": "stop", "message": {"content": null, "tool_calls": [
        {"id": "fc_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
        {"id": "fc_2", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\":\"UTC\"}"}},
    ]}}]}))
    .unwrap();
    assert_eq!(
        message["content"],
        json!([
            {"type": "tool_use", "id": "fc_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "fc_2", "name": "get_time", "input": {"tz": "UTC"}},
        ])
    );
    assert_eq!(message["stop_reason"], "tool_use");
}

/// An id of the form `prefix` and 32 hex digits, as Sluice makes for what the backend left
/// without one.
fn is_fresh_id(id: &Value, prefix: &str) -> bool {
    id.as_str()
        .and_then(|id| id.strip_prefix(prefix))
        .is_some_and(|rest| rest.len() == 32 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Some OpenAI-compatible servers write tool calls, and completions, without ids (no `id`,
/// `null`, `""`). Every `tool_use` a Messages client gets has an id of its own, unique across
/// answers: the client sends the conversation's blocks back, and Anthropic refuses a
/// conversation in which two share one (before: `"id": null` in a whole answer, `toolu_0` in
/// every stream, so a session's later turn failed over to an Anthropic backend got a 400).
#[test]
fn calls_and_messages_without_ids_get_ids_unique_across_answers() {
    let completion = json!({"id": "", "choices": [{"finish_reason": "tool_calls", "message": {"content": null, "tool_calls": [
        {"type": "function", "function": {"name": "a", "arguments": "{}"}},
        {"id": null, "type": "function", "function": {"name": "b", "arguments": "{}"}},
        {"id": "", "type": "function", "function": {"name": "c", "arguments": "{}"}},
    ]}}]});
    let text = completion.to_string();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2 {
        let message = message_for(&text).unwrap();
        assert!(is_fresh_id(&message["id"], "msg_"), "{message}");
        for block in message["content"].as_array().unwrap() {
            assert!(is_fresh_id(&block["id"], "toolu_"), "{block}");
            assert!(seen.insert(block["id"].clone()), "{block} twice");
        }
        assert_eq!(message["content"].as_array().unwrap().len(), 3);
    }

    let chunk = |index: u64, name: &str| {
        chat_chunk(
            json!({"tool_calls": [{"index": index, "type": "function", "function": {"name": name, "arguments": "{}"}}]}),
            None,
        )
    };
    let text = [
        "data: {\"id\":\"\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n".to_owned(),
        chunk(0, "a"),
        chunk(1, "b"),
        chat_chunk(json!({}), Some("tool_calls")),
        "data: [DONE]\n\n".to_owned(),
    ]
    .concat();
    for _ in 0..2 {
        let data = translated(&text);
        assert!(
            is_fresh_id(&data[0]["message"]["id"], "msg_"),
            "{}",
            data[0]
        );
        let starts: Vec<&Value> = data
            .iter()
            .filter(|e| e["type"] == "content_block_start")
            .map(|e| &e["content_block"]["id"])
            .collect();
        assert_eq!(starts.len(), 2, "{data:?}");
        for id in starts {
            assert!(is_fresh_id(id, "toolu_"), "{id}");
            assert!(seen.insert(id.clone()), "{id} twice");
        }
    }
}

// ---- the round trip --------------------------------------------------------------------

/// The answer an Anthropic backend would give to a translated request that echoes its last
/// turn: text and tool calls as blocks.
fn answer_of(text: &str, calls: &[(String, Value)]) -> Value {
    let mut content = Vec::new();
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    for (i, (name, input)) in calls.iter().enumerate() {
        content.push(
            json!({"type": "tool_use", "id": format!("toolu_{i}"), "name": name, "input": input}),
        );
    }
    json!({"id": "msg", "model": "x", "content": content, "stop_reason": if calls.is_empty() { "end_turn" } else { "tool_use" }, "usage": {"input_tokens": 1, "output_tokens": 1}})
}

fn arguments() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(
        "[a-z_]{1,8}",
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
        ],
        0..4,
    )
    .prop_map(|m| Value::Object(m.into_iter().collect()))
}

proptest! {
    #[test]
    fn a_round_trip_keeps_text_tool_names_and_arguments(
        text in ".{0,40}",
        calls in prop::collection::vec(("[a-zA-Z_][a-zA-Z0-9_-]{0,20}", arguments()), 0..4),
    ) {
        // The chat request an agent would send back: the assistant's turn with its calls.
        let tool_calls: Vec<Value> = calls.iter().enumerate().map(|(i, (name, args))| json!({
            "id": format!("call_{i}"), "type": "function",
            "function": {"name": name, "arguments": args.to_string()},
        })).collect();
        let mut assistant = json!({"role": "assistant", "content": text});
        if !tool_calls.is_empty() {
            assistant["tool_calls"] = Value::Array(tool_calls);
        }
        let chat = json!({"model": "m", "messages": [{"role": "user", "content": "go"}, assistant]});
        let messages = chat_to_messages(&obj(chat), "x", 16, Sampling::Taken).unwrap();
        // Whitespace alone is left out (Anthropic refuses it), and a turn of nothing with it.
        let text = if text.trim().is_empty() { String::new() } else { text };
        if text.is_empty() && calls.is_empty() {
            prop_assert_eq!(messages["messages"].as_array().unwrap().len(), 1);
            return Ok(());
        }
        // The backend answers with the very blocks it was given.
        let turn = &messages["messages"][1]["content"];
        let given_text: String = turn.as_array().unwrap().iter().filter_map(|b| b["text"].as_str()).collect();
        let given_calls: Vec<(String, Value)> = turn.as_array().unwrap().iter()
            .filter(|b| b["type"] == "tool_use")
            .map(|b| (b["name"].as_str().unwrap().to_owned(), b["input"].clone()))
            .collect();
        let completion = message_to_completion(&answer_of(&given_text, &given_calls), 0);
        let reply = &completion["choices"][0]["message"];
        if text.is_empty() && !calls.is_empty() {
            prop_assert_eq!(&reply["content"], &Value::Null);
        } else {
            prop_assert_eq!(reply["content"].as_str().unwrap(), text.as_str());
        }
        let back: Vec<(String, Value)> = reply["tool_calls"].as_array().map(|a| a.iter().map(|c| (
            c["function"]["name"].as_str().unwrap().to_owned(),
            serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap(),
        )).collect()).unwrap_or_default();
        prop_assert_eq!(back, calls);
    }
}

/// JSON built from the words both APIs use, in shapes right and wrong: what a client may send.
fn request_like() -> impl Strategy<Value = Value> {
    const WORDS: &[&str] = &[
        "user",
        "assistant",
        "system",
        "developer",
        "tool",
        "function",
        "text",
        "image",
        "image_url",
        "tool_use",
        "tool_result",
        "thinking",
        "document",
        "base64",
        "url",
        "auto",
        "any",
        "none",
        "required",
        "custom",
        "data:image/png;base64,AA",
        "https://x/y.png",
        "{}",
        "{\"a\":1}",
        "[1]",
        "",
    ];
    const KEYS: &[&str] = &[
        "type",
        "role",
        "content",
        "text",
        "source",
        "id",
        "name",
        "input",
        "tool_use_id",
        "is_error",
        "media_type",
        "data",
        "url",
        "image_url",
        "system",
        "messages",
        "tools",
        "tool_choice",
        "input_schema",
        "function",
        "arguments",
        "parameters",
        "tool_calls",
        "tool_call_id",
        "stream",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "stop_sequences",
        "metadata",
        "user_id",
        "user",
        "n",
        "logprobs",
        "response_format",
        "parallel_tool_calls",
        "disable_parallel_tool_use",
        "refusal",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(WORDS).prop_map(Value::from),
    ];
    let value = leaf.prop_recursive(5, 96, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(KEYS), inner, 0..6).prop_map(|m| {
                Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    });
    let roles = prop::sample::select(&["user", "assistant", "system", "developer", "tool"][..]);
    let word = prop::sample::select(WORDS).prop_map(str::to_owned);
    // Blocks and parts of both APIs, well formed, beside anything at all.
    let block = prop_oneof![
        word.clone().prop_map(|t| json!({"type": "text", "text": t})),
        word.clone().prop_map(|u| json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": u}})),
        word.clone().prop_map(|u| json!({"type": "image_url", "image_url": {"url": u}})),
        (word.clone(), arguments()).prop_map(|(n, i)| json!({"type": "tool_use", "id": "c", "name": n, "input": i})),
        word.clone().prop_map(|t| json!({"type": "tool_result", "tool_use_id": "c", "content": t})),
        word.clone().prop_map(|t| json!({"type": "thinking", "thinking": t, "signature": "s"})),
        value.clone(),
    ];
    let content = prop_oneof![
        word.clone().prop_map(Value::from),
        prop::collection::vec(block, 0..4).prop_map(Value::Array),
        value.clone(),
    ];
    let call = (word, arguments()).prop_map(
        |(n, a)| json!({"id": "c", "type": "function", "function": {"name": n, "arguments": a.to_string()}}),
    );
    let calls = prop_oneof![
        Just(Value::Null),
        prop::collection::vec(call, 0..3).prop_map(Value::Array),
        value.clone(),
    ];
    let turns = prop::collection::vec((roles, content, calls), 0..5);
    (
        prop::collection::btree_map(prop::sample::select(KEYS), value, 0..8),
        turns,
    )
        .prop_map(|(fields, turns)| {
            let mut request: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            // Most requests carry turns, so that most reach the translation of their blocks.
            let turns = turns
                .into_iter()
                .map(|(role, content, calls)| {
                    json!({"role": role, "content": content, "tool_calls": calls, "tool_call_id": "c"})
                })
                .collect();
            request.insert("messages".into(), Value::Array(turns));
            Value::Object(request)
        })
}

proptest! {
    /// Whatever a client sends, translating it either way never panics, and what is
    /// translated names the route's model and only roles the other API knows.
    #[test]
    fn any_request_translates_or_is_refused_without_panicking(request in request_like()) {
        let request = obj(request);
        if let Ok(chat) = messages_to_chat(&request, "up", "max_tokens") {
            prop_assert_eq!(&chat["model"], "up");
            for message in chat["messages"].as_array().unwrap() {
                let role = message["role"].as_str().unwrap();
                prop_assert!(["system", "user", "assistant", "tool"].contains(&role), "{}", role);
            }
            if chat.get("stream") == Some(&Value::Bool(true)) {
                prop_assert_eq!(&chat["stream_options"], &json!({"include_usage": true}));
            }
        }
        if let Ok(messages) = chat_to_messages(&request, "up", 16, Sampling::Taken) {
            prop_assert_eq!(&messages["model"], "up");
            prop_assert!(messages["max_tokens"].is_u64());
            for turn in messages["messages"].as_array().unwrap() {
                let role = turn["role"].as_str().unwrap();
                prop_assert!(["system", "user", "assistant"].contains(&role), "{}", role);
            }
        }
    }
}

/// Tool-call ids one API refuses (Kimi's `functions.Bash:0`, which Anthropic's
/// `^[a-zA-Z0-9_-]+$` refuses; vLLM's 46-character `chatcmpl-tool-…`, past OpenAI's 40) are
/// written as one portable id wherever the translation meets them: a backend's answer, whole
/// or streamed, and both directions of a request, a call and its result alike, so a
/// conversation that moves between the kinds of backend still names its calls consistently.
#[test]
fn tool_call_ids_either_api_refuses_are_mapped_alike_everywhere() {
    let portable = |id: &str| {
        id.len() <= 40
            && !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    for id in [
        "functions.Bash:0",
        "chatcmpl-tool-0123456789abcdef0123456789abcdef",
    ] {
        let whole = completion_to_message(
            &json!({"id": "c", "choices": [{"finish_reason": "tool_calls",
            "message": {"content": null, "tool_calls": [{"id": id, "type": "function",
                "function": {"name": "Bash", "arguments": "{}"}}]}}]}),
        )
        .unwrap();
        let mapped = whole["content"][0]["id"].as_str().unwrap().to_owned();
        assert!(portable(&mapped) && mapped != id, "{id} → {mapped}");

        let mut translator = EventsFromChunks::default();
        let mut frames = Vec::new();
        let chunk = chat_chunk(
            json!({"role": "assistant", "tool_calls": [{"index": 0, "id": id, "type": "function",
                "function": {"name": "Bash", "arguments": "{}"}}]}),
            None,
        );
        for event in events(&chunk) {
            translator.push(&event, &mut frames);
        }
        let started = data_of(&frames)
            .into_iter()
            .find(|e| e["type"] == "content_block_start")
            .unwrap();
        assert_eq!(started["content_block"]["id"], mapped.as_str());

        let m = to_messages(json!({"model": "m", "messages": [
            {"role": "user", "content": "Go"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": id, "type": "function",
                "function": {"name": "Bash", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": id, "content": "done"},
        ]}));
        assert_eq!(m["messages"][1]["content"][0]["id"], mapped.as_str());
        assert_eq!(
            m["messages"][2]["content"][0]["tool_use_id"],
            mapped.as_str()
        );

        let c = to_chat(json!({"model": "m", "max_tokens": 8, "messages": [
            {"role": "user", "content": "Go"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": id, "name": "Bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "done"}]},
        ]}));
        assert_eq!(c["messages"][1]["tool_calls"][0]["id"], mapped.as_str());
        assert_eq!(c["messages"][2]["tool_call_id"], mapped.as_str());
        // A portable id is its own mapping: the next turn keeps it.
        let again = to_chat(json!({"model": "m", "max_tokens": 8, "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": mapped, "name": "Bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": mapped, "content": "done"}]},
        ]}));
        assert_eq!(again["messages"][0]["tool_calls"][0]["id"], mapped.as_str());
    }
}
