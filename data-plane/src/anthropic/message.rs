//! A whole Anthropic `Message` read for the chat completion it becomes ([`Reply`]), and that
//! completion written.
//!
//! A message is read from its text in the shape Anthropic writes it ([`Reply`]'s
//! `Deserialize`): its strings borrowed where they have no escapes, the members it does not need
//! checked as a parse into values would check them ([`Checked`](super::Checked)) and passed
//! over, no tree built. What is not in that shape — a member of a kind Anthropic does not write
//! there, text that is not a message — is parsed into a `Value` and read from that
//! ([`Reply::of_value`]), which decides every case; the property test below holds the first
//! reading to the second. Translating a short answer this way costs about a quarter of what
//! parsing it into values did (64,500 → 14,700 instructions: docs/benchmarks.md, "Whole chat
//! requests translated for an Anthropic backend").

use std::borrow::Cow;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::response::{UsageFigures, anthropic_usage, finish_reason};
use super::{Names, Usage, members};
use crate::request::Key;

/// What a chat completion is written from: a message's id, model, text (its text blocks
/// joined), tool calls, stop reason and usage.
#[derive(Debug)]
struct Reply<'a> {
    id: Option<Member<'a>>,
    model: Option<Member<'a>>,
    content: Blocks<'a>,
    stop_reason: Option<Cow<'a, str>>,
    /// `None` when the message has no `usage`.
    usage: Option<Usage>,
}

/// A message's `content` as a completion takes it: the text blocks' text joined, the
/// `tool_use` blocks as tool calls; other blocks (thinking) left out.
#[derive(Debug, Default)]
struct Blocks<'a> {
    text: Cow<'a, str>,
    calls: Vec<Call<'a>>,
}

impl<'a> Blocks<'a> {
    fn push_text(&mut self, text: Cow<'a, str>) {
        if self.text.is_empty() {
            self.text = text;
        } else {
            self.text.to_mut().push_str(&text);
        }
    }
}

/// An Anthropic message's text → the chat completion created at `created` (Unix seconds), and
/// the message's usage if it gives one. `None` if `text` is not a message (a JSON object whose
/// `type` is `message`). The module's comment tells the two readings.
pub fn completion_of(text: &str, created: u64) -> Option<(Vec<u8>, Option<Usage>)> {
    let write = |reply: Reply<'_>| Some((reply.completion(created).ok()?, reply.usage));
    match serde_json::from_str::<Reply<'_>>(text) {
        Ok(reply) => write(reply),
        Err(_) => write(Reply::of_value(&serde_json::from_str(text).ok()?)?),
    }
}

/// A `tool_use` block as the chat completion's tool call.
#[derive(Debug, Clone, Serialize)]
struct Call<'a> {
    id: Option<Member<'a>>,
    #[serde(rename = "type")]
    kind: &'static str,
    function: Function<'a>,
}

#[derive(Debug, Clone, Serialize)]
struct Function<'a> {
    name: Option<Member<'a>>,
    /// The block's `input` written as JSON text (`{}` when it has none).
    arguments: String,
}

/// A member the completion copies from the message: a string read from the text, or any value
/// of a parsed message. `None` in its place is written as `null`, as the message's absent one.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
enum Member<'a> {
    Text(Cow<'a, str>),
    Value(&'a Value),
}

impl<'a> Reply<'a> {
    /// Reads a parsed message, `None` if it is not one.
    fn of_value(message: &'a Value) -> Option<Self> {
        message.get("type").filter(|t| *t == "message")?;
        let mut content = Blocks::default();
        for block in message
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            match block.get("type").and_then(Value::as_str) {
                Some("text") => content.push_text(Cow::Borrowed(
                    block.get("text").and_then(Value::as_str).unwrap_or(""),
                )),
                Some("tool_use") => content.calls.push(Call::new(
                    block.get("id").map(Member::Value),
                    block.get("name").map(Member::Value),
                    block.get("input"),
                )),
                _ => {}
            }
        }
        Some(Reply {
            id: message.get("id").map(Member::Value),
            model: message.get("model").map(Member::Value),
            content,
            stop_reason: message
                .get("stop_reason")
                .and_then(Value::as_str)
                .map(Cow::Borrowed),
            usage: message.get("usage").map(anthropic_usage),
        })
    }

    /// The chat completion, created at `created` (Unix seconds): the text as `content` (as
    /// `refusal` when the model refused; `null` when there are only tool calls), the stop
    /// reason as a finish reason, the usage in OpenAI's figures. Written as fixed text around
    /// the values, each value by serde (serde's structs would also pass every key through the
    /// string escaper: 7,200 instructions for a short completion, against 1,650); the test
    /// below holds it to those structs' bytes.
    fn completion(&self, created: u64) -> serde_json::Result<Vec<u8>> {
        let Blocks { text, calls } = &self.content;
        let text = Some(text.as_ref());
        let (content, refusal) = if self.stop_reason.as_deref() == Some("refusal") {
            (None, text.filter(|t| !t.is_empty()))
        } else if text.is_some_and(str::is_empty) && !calls.is_empty() {
            (None, None)
        } else {
            (text, None)
        };
        let finish = self.stop_reason.as_deref().map_or("stop", finish_reason);
        let usage = self.usage.unwrap_or_default();
        let mut out = Vec::with_capacity(self.content.text.len() + 384);
        let put = |out: &mut Vec<u8>, text: &str| out.extend_from_slice(text.as_bytes());
        put(&mut out, "{\"id\":");
        serde_json::to_writer(&mut out, &self.id)?;
        put(&mut out, ",\"object\":\"chat.completion\",\"created\":");
        serde_json::to_writer(&mut out, &created)?;
        put(&mut out, ",\"model\":");
        serde_json::to_writer(&mut out, &self.model)?;
        put(
            &mut out,
            ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":",
        );
        serde_json::to_writer(&mut out, &content)?;
        put(&mut out, ",\"refusal\":");
        serde_json::to_writer(&mut out, &refusal)?;
        if !calls.is_empty() {
            put(&mut out, ",\"tool_calls\":");
            serde_json::to_writer(&mut out, calls)?;
        }
        // Finish reasons are names without escapes.
        put(&mut out, "},\"logprobs\":null,\"finish_reason\":\"");
        put(&mut out, finish);
        put(&mut out, "\"}],\"usage\":{\"prompt_tokens\":");
        serde_json::to_writer(&mut out, &usage.input)?;
        put(&mut out, ",\"completion_tokens\":");
        serde_json::to_writer(&mut out, &usage.output)?;
        put(&mut out, ",\"total_tokens\":");
        serde_json::to_writer(&mut out, &usage.input.saturating_add(usage.output))?;
        put(&mut out, ",\"prompt_tokens_details\":{\"cached_tokens\":");
        serde_json::to_writer(&mut out, &usage.cache_read)?;
        put(&mut out, ",\"cache_write_tokens\":");
        serde_json::to_writer(&mut out, &usage.cache_creation)?;
        put(&mut out, "}}}");
        Ok(out)
    }
}

impl<'a> Call<'a> {
    fn new(id: Option<Member<'a>>, name: Option<Member<'a>>, input: Option<&Value>) -> Self {
        Self {
            id,
            kind: "function",
            function: Function {
                name,
                arguments: input.map_or_else(|| "{}".to_owned(), Value::to_string),
            },
        }
    }
}

fn text_member(text: Option<Key<'_>>) -> Option<Member<'_>> {
    text.map(|Key(text)| Member::Text(text))
}

impl<'de> Deserialize<'de> for Reply<'de> {
    fn deserialize<D: Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        const NAMES: Names = Names(&["type", "id", "model", "content", "stop_reason", "usage"]);
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Reply<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Reply<'de>, A::Error> {
                let mut is_message = false;
                let mut reply = Reply {
                    id: None,
                    model: None,
                    content: Blocks::default(),
                    stop_reason: None,
                    usage: None,
                };
                members(map, NAMES, |at, map| {
                    match at {
                        0 => is_message = map.next_value::<Key>()?.0 == "message",
                        1 => reply.id = text_member(map.next_value()?),
                        2 => reply.model = text_member(map.next_value()?),
                        3 => reply.content = map.next_value::<Option<_>>()?.unwrap_or_default(),
                        4 => reply.stop_reason = map.next_value::<Option<Key>>()?.map(|t| t.0),
                        _ => reply.usage = Some(map.next_value::<UsageFigures>()?.usage()),
                    }
                    Ok(())
                })?;
                if !is_message {
                    return Err(de::Error::custom("not a message"));
                }
                Ok(reply)
            }
        }
        value.deserialize_map(Members)
    }
}

impl<'de> Deserialize<'de> for Blocks<'de> {
    fn deserialize<D: Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        struct Each;
        impl<'de> Visitor<'de> for Each {
            type Value = Blocks<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of content blocks")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Blocks<'de>, A::Error> {
                let mut blocks = Blocks::default();
                while let Some(block) = seq.next_element::<Block>()? {
                    match block.kind.as_ref().map(|t| t.0.as_ref()) {
                        Some("text") => {
                            blocks.push_text(block.text.map_or(Cow::Borrowed(""), |t| t.0));
                        }
                        Some("tool_use") => blocks.calls.push(Call::new(
                            text_member(block.id),
                            text_member(block.name),
                            block.input.as_ref(),
                        )),
                        _ => {}
                    }
                }
                Ok(blocks)
            }
        }
        value.deserialize_seq(Each)
    }
}

/// A content block's members that a completion takes.
struct Block<'a> {
    kind: Option<Key<'a>>,
    text: Option<Key<'a>>,
    id: Option<Key<'a>>,
    name: Option<Key<'a>>,
    /// Given (even as `null`) or not.
    input: Option<Value>,
}

impl<'de> Deserialize<'de> for Block<'de> {
    fn deserialize<D: Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        const NAMES: Names = Names(&["type", "text", "id", "name", "input"]);
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = Block<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a content block")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Block<'de>, A::Error> {
                let mut block = Block {
                    kind: None,
                    text: None,
                    id: None,
                    name: None,
                    input: None,
                };
                members(map, NAMES, |at, map| {
                    match at {
                        0 => block.kind = map.next_value()?,
                        1 => block.text = map.next_value()?,
                        2 => block.id = map.next_value()?,
                        3 => block.name = map.next_value()?,
                        _ => block.input = Some(map.next_value()?),
                    }
                    Ok(())
                })?;
                Ok(block)
            }
        }
        value.deserialize_map(Members)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// What the whole parse makes of `text`: the completion and usage of [`Reply::of_value`].
    fn parsed_whole(text: &str, created: u64) -> Option<(Vec<u8>, Option<Usage>)> {
        let message: Value = serde_json::from_str(text).ok()?;
        let reply = Reply::of_value(&message)?;
        Some((reply.completion(created).unwrap(), reply.usage))
    }

    fn string() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            1 => Just("\"msg\\u005f1\"".to_owned()),
            1 => Just("null".to_owned()),
            1 => Just("7".to_owned()),
        ]
    }

    /// A content block: Anthropic's kinds in their shape, and what is near them (members
    /// out of order, missing, twice, of another kind, not an object).
    fn block() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => string().prop_map(|t| format!("{{\"type\":\"text\",\"text\":{t}}}")),
            1 => string().prop_map(|t| format!("{{\"text\":{t},\"type\":\"text\",\"citations\":null}}")),
            1 => Just("{\"type\":\"text\"}".to_owned()),
            1 => Just("{\"type\":\"text\",\"text\":\"a\",\"text\":\"b\"}".to_owned()),
            1 => Just("{\"type\":\"text\",\"text\":\"a\",\"citations\":[{\"n\":1e400}]}".to_owned()),
            1 => Just("{\"type\":\"te\\u0078t\",\"text\":\"escaped type\"}".to_owned()),
            1 => Just("{\"type\":7,\"text\":\"x\"}".to_owned()),
            1 => Just("[\"text\",\"an array\"]".to_owned()),
            1 => Just("5".to_owned()),
            2 => (string(), string(), prop_oneof![
                Just(",\"input\":{\"city\":\"Paris\",\"n\":[1,2.5,-3]}"),
                Just(",\"input\":null"),
                Just(""),
                Just(",\"input\":{\"b\":1,\"a\":{}}"),
            ]).prop_map(|(id, name, input)| {
                format!("{{\"type\":\"tool_use\",\"id\":{id},\"name\":{name}{input}}}")
            }),
            1 => Just("{\"type\":\"thinking\",\"thinking\":\"hmm\",\"signature\":\"s\"}".to_owned()),
            1 => Just("{\"type\":\"server_tool_use\",\"id\":\"s1\",\"name\":\"web_search\",\"input\":{}}".to_owned()),
        ]
    }

    /// A message's member: Anthropic's in their shape and what is near them.
    fn member() -> impl Strategy<Value = String> {
        let content = prop_oneof![
            8 => prop::collection::vec(block(), 0..4).prop_map(|b| format!("[{}]", b.join(","))),
            1 => Just("null".to_owned()),
            1 => Just("\"text\"".to_owned()),
            1 => Just("{}".to_owned()),
        ];
        let stop = prop_oneof![
            Just("\"end_turn\""),
            Just("\"refusal\""),
            Just("\"tool_use\""),
            Just("\"max_tokens\""),
            Just("\"refus\\u0061l\""),
            Just("null"),
            Just("3"),
        ];
        let usage = prop_oneof![
            4 => (0..1000u64, 0..1000u64, 0..100u64).prop_map(|(i, o, c)| format!(
                "{{\"input_tokens\":{i},\"output_tokens\":{o},\"cache_read_input_tokens\":{c},\"cache_creation_input_tokens\":0,\"service_tier\":\"standard\"}}"
            )),
            1 => Just("{\"input_tokens\":1,\"input_tokens\":2}".to_owned()),
            1 => Just("{\"output_tokens\":-1,\"x\":1e400}".to_owned()),
            1 => Just("{\"output_tokens\":{\"x\":1e400}}".to_owned()),
            1 => Just("{\"output_tokens\":[\"\\ud800\"]}".to_owned()),
            1 => Just("null".to_owned()),
            1 => Just("[1]".to_owned()),
        ];
        prop_oneof![
            4 => Just("\"type\":\"message\"".to_owned()),
            1 => Just("\"typ\\u0065\":\"message\"".to_owned()),
            1 => Just("\"type\":\"messag\\u0065\"".to_owned()),
            1 => Just("\"type\":\"error\"".to_owned()),
            1 => Just("\"type\":null".to_owned()),
            2 => string().prop_map(|s| format!("\"id\":{s}")),
            2 => string().prop_map(|s| format!("\"model\":{s}")),
            1 => Just("\"role\":\"assistant\"".to_owned()),
            4 => content.prop_map(|c| format!("\"content\":{c}")),
            2 => stop.prop_map(|s| format!("\"stop_reason\":{s}")),
            1 => Just("\"stop_sequence\":null".to_owned()),
            2 => usage.prop_map(|u| format!("\"usage\":{u}")),
            1 => Just("\"big\":1e400".to_owned()),
            1 => Just("\"lone\":\"\\ud800\"".to_owned()),
            1 => Just(format!("\"deep\":{}{}", "[".repeat(128), "]".repeat(128))),
        ]
    }

    /// A message as Anthropic writes it, and the same with any members before and after.
    fn message() -> impl Strategy<Value = String> {
        let written = (
            string(),
            string(),
            prop::collection::vec(block(), 0..4),
            prop::collection::vec(member(), 0..3),
        )
            .prop_map(|(id, model, blocks, more)| {
                let mut members = vec![
                    format!("\"id\":{id}"),
                    "\"type\":\"message\"".to_owned(),
                    "\"role\":\"assistant\"".to_owned(),
                    format!("\"model\":{model}"),
                    format!("\"content\":[{}]", blocks.join(",")),
                    "\"stop_reason\":\"end_turn\"".to_owned(),
                    "\"stop_sequence\":null".to_owned(),
                    "\"usage\":{\"input_tokens\":5,\"output_tokens\":9}".to_owned(),
                ];
                members.extend(more);
                format!("{{{}}}", members.join(","))
            });
        prop_oneof![
            3 => written,
            2 => prop::collection::vec(member(), 0..9).prop_map(|m| format!("{{{}}}", m.join(","))),
            1 => "[a-z{}\\[\\]\":, 0-9]{0,30}",
        ]
    }

    proptest! {
        /// Whatever the text, the client gets the completion, and the usage is counted, as
        /// the whole parse gives them; the reading in the shape gives up (for the parse to
        /// decide) rather than answer otherwise.
        #[test]
        fn a_message_read_in_its_shape_translates_as_parsed_whole(
            text in message(),
            created in any::<u64>(),
        ) {
            let whole = parsed_whole(&text, created);
            prop_assert_eq!(&completion_of(&text, created), &whole, "{}", text);
            if let Ok(reply) = serde_json::from_str::<Reply<'_>>(&text) {
                prop_assert_eq!(Some((reply.completion(created).unwrap(), reply.usage)), whole);
            }
        }
    }

    // The completion as serde's structs write it: the writer before the fixed text, kept as
    // the oracle of `Reply::completion`.
    #[derive(Serialize)]
    struct Completion<'r, 'a> {
        id: &'r Option<Member<'a>>,
        object: &'static str,
        created: u64,
        model: &'r Option<Member<'a>>,
        choices: [Choice<'r, 'a>; 1],
        usage: crate::anthropic::response::OpenAiUsage,
    }

    #[derive(Serialize)]
    struct Choice<'r, 'a> {
        index: u32,
        message: Message<'r, 'a>,
        logprobs: (),
        finish_reason: &'static str,
    }

    #[derive(Serialize)]
    struct Message<'r, 'a> {
        role: &'static str,
        content: Option<&'r str>,
        refusal: Option<&'r str>,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        tool_calls: &'r [Call<'a>],
    }

    fn completion_by_structs(reply: &Reply<'_>, created: u64) -> Vec<u8> {
        let Blocks { text, calls } = &reply.content;
        let text = Some(text.as_ref());
        let (content, refusal) = if reply.stop_reason.as_deref() == Some("refusal") {
            (None, text.filter(|t| !t.is_empty()))
        } else if text.is_some_and(str::is_empty) && !calls.is_empty() {
            (None, None)
        } else {
            (text, None)
        };
        serde_json::to_vec(&Completion {
            id: &reply.id,
            object: "chat.completion",
            created,
            model: &reply.model,
            choices: [Choice {
                index: 0,
                message: Message {
                    role: "assistant",
                    content,
                    refusal,
                    tool_calls: calls,
                },
                logprobs: (),
                finish_reason: reply.stop_reason.as_deref().map_or("stop", finish_reason),
            }],
            usage: crate::anthropic::response::OpenAiUsage::from(reply.usage.unwrap_or_default()),
        })
        .unwrap()
    }

    /// A member as either reading gives it: absent, a string, or any value of a parsed message.
    fn copied() -> impl Strategy<Value = Option<Member<'static>>> {
        let value = prop_oneof![
            Just(json!(null)),
            Just(json!(7)),
            Just(json!({"b": [1, "x"], "a": 1.5})),
            any::<String>().prop_map(Value::from),
        ];
        prop_oneof![
            1 => Just(None),
            3 => any::<String>().prop_map(|s| Some(Member::Text(Cow::Owned(s)))),
            1 => value.prop_map(|v| Some(Member::Value(Box::leak(Box::new(v))))),
        ]
    }

    fn reply() -> impl Strategy<Value = Reply<'static>> {
        let call = (copied(), copied(), prop::option::of(any::<String>())).prop_map(
            |(id, name, input)| {
                let input: Option<&'static Value> =
                    input.map(|i| &*Box::leak(Box::new(json!({ "q": i }))));
                Call::new(id, name, input)
            },
        );
        let stop = prop_oneof![
            Just(None),
            Just(Some("end_turn".to_owned())),
            Just(Some("refusal".to_owned())),
            Just(Some("tool_use".to_owned())),
            Just(Some("max_tokens".to_owned())),
            any::<String>().prop_map(Some),
        ];
        let figure = prop_oneof![0..1_000_000u64, Just(u64::MAX), any::<u64>()];
        let usage = prop::option::of((figure.clone(), figure.clone(), figure.clone(), figure))
            .prop_map(|u| {
                u.map(|(input, output, cache_read, cache_creation)| Usage {
                    input,
                    output,
                    cache_read,
                    cache_creation,
                    ..Usage::default()
                })
            });
        (
            copied(),
            copied(),
            prop_oneof![Just(String::new()), any::<String>()],
            prop::collection::vec(call, 0..3),
            stop,
            usage,
        )
            .prop_map(|(id, model, text, calls, stop, usage)| Reply {
                id,
                model,
                content: Blocks {
                    text: Cow::Owned(text),
                    calls,
                },
                stop_reason: stop.map(Cow::Owned),
                usage,
            })
    }

    proptest! {
        /// The completion written as fixed text around its values is the one serde's structs
        /// write, byte for byte.
        #[test]
        fn a_completion_written_around_its_values_is_the_one_serde_writes(
            reply in reply(),
            created in any::<u64>(),
        ) {
            prop_assert_eq!(reply.completion(created).unwrap(), completion_by_structs(&reply, created));
        }
    }

    /// Anthropic's own messages are read in their shape, not parsed into values.
    #[test]
    fn a_message_as_anthropic_writes_it_is_read_in_its_shape() {
        for text in [
            r#"{"id":"msg_01","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello \"world\"\n"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":6,"service_tier":"standard"}}"#,
            r#"{"id":"msg_02","type":"message","role":"assistant","model":"m","content":[{"type":"thinking","thinking":"Let me see.","signature":"EqQB"},{"type":"text","text":"I'll check."},{"type":"tool_use","id":"toolu_1","name":"weather","input":{"city":"Paris"}}],"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":5}}"#,
        ] {
            let reply = serde_json::from_str::<Reply<'_>>(text);
            assert!(reply.is_ok(), "{text}");
            assert_eq!(
                reply.unwrap().completion(7).ok(),
                parsed_whole(text, 7).map(|w| w.0)
            );
        }
    }
}
