//! The Responses API's bodies as they come back from an upstream: the response ids in them
//! are replaced by Sluice's (see [`crate::affinity`]), and the usage is read from the response
//! object. Only the ids that name a stored response are touched: a response object's `id`
//! and `previous_response_id`, also inside the lifecycle events of a stream
//! (`response.created`, `response.in_progress`, `response.completed`, `response.failed`,
//! `response.incomplete`, `response.queued`, each with a `response` member). Item ids
//! (`msg_…`, `rs_…`) are not response ids and pass unchanged, as does everything else, byte
//! for byte but for whitespace between the members rewritten.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::affinity::{AffinityKeys, IdError};
use crate::request::{Fields, Key, write_json_string};
use crate::usage::Tokens;

/// How to turn an upstream's ids into Sluice's for one answer.
#[derive(Debug, Clone)]
pub struct IdRewrite {
    pub keys: Arc<AffinityKeys>,
    pub client_key_id: String,
    pub backend_id: String,
    /// The public model the ids carry.
    pub model: String,
    /// An id the client sent (`previous_response_id`, or the one in the path):
    /// `(upstream's, as the client sent it)`, so the answer echoes exactly what it sent.
    pub known: Option<(String, String)>,
}

impl IdRewrite {
    fn ours(&self, upstream: &str) -> Result<String, IdError> {
        match &self.known {
            Some((theirs, ours)) if theirs == upstream => Ok(ours.clone()),
            _ => self
                .keys
                .wrap(&self.client_key_id, &self.backend_id, &self.model, upstream),
        }
    }
}

/// Why an upstream body could not be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    #[error("the upstream's body is not a JSON object")]
    NotAnObject,
    #[error("cannot issue a response id: {0}")]
    Id(#[from] IdError),
}

/// What one rewritten body or event said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewritten {
    pub bytes: Bytes,
    /// The response object's usage, if it had figures.
    pub tokens: Option<Tokens>,
    /// The event's `type`, if it had one (stream events do).
    pub event_type: Option<String>,
    /// The event's `sequence_number`, if it had one (stream events do).
    pub sequence_number: Option<u64>,
}

/// Rewrites a response object (a create's, retrieve's or cancel's answer, or a delete's
/// `{"id","object","deleted"}`): `id` and `previous_response_id` become Sluice's.
pub fn rewrite_response(body: &[u8], ids: &IdRewrite) -> Result<Rewritten, RewriteError> {
    let Fields(fields) = serde_json::from_slice(body).map_err(|_| RewriteError::NotAnObject)?;
    let mut out = BytesMut::with_capacity(body.len() + 128).writer();
    let tokens = write_response(&fields, ids, &mut out)?;
    Ok(Rewritten {
        bytes: out.into_inner().freeze(),
        tokens,
        event_type: None,
        sequence_number: None,
    })
}

/// Rewrites one stream event's data: the `response` member of a lifecycle event; other
/// events are returned as they are.
pub fn rewrite_event(data: &str, ids: &IdRewrite) -> Result<Rewritten, RewriteError> {
    let Fields(fields) = serde_json::from_str(data).map_err(|_| RewriteError::NotAnObject)?;
    let event_type = fields
        .iter()
        .find(|(k, _)| k.0 == "type")
        .and_then(|(_, v)| serde_json::from_str::<Key<'_>>(v.get()).ok())
        .map(|Key(t)| t.into_owned());
    let sequence_number = fields
        .iter()
        .find(|(k, _)| k.0 == "sequence_number")
        .and_then(|(_, v)| serde_json::from_str::<u64>(v.get()).ok());
    let Some((_, response)) = fields.iter().find(|(k, _)| k.0 == "response") else {
        return Ok(Rewritten {
            bytes: Bytes::copy_from_slice(data.as_bytes()),
            tokens: None,
            event_type,
            sequence_number,
        });
    };
    let Fields(inner) =
        serde_json::from_str(response.get()).map_err(|_| RewriteError::NotAnObject)?;
    let mut out = BytesMut::with_capacity(data.len() + 128).writer();
    out.get_mut().put_u8(b'{');
    let mut tokens = None;
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.get_mut().put_u8(b',');
        }
        write_json_string(&mut out, &key.0);
        out.get_mut().put_u8(b':');
        if key.0 == "response" {
            tokens = write_response(&inner, ids, &mut out)?;
        } else {
            out.get_mut().put_slice(value.get().as_bytes());
        }
    }
    out.get_mut().put_u8(b'}');
    Ok(Rewritten {
        bytes: out.into_inner().freeze(),
        tokens,
        event_type,
        sequence_number,
    })
}

/// Whether a stream event of this `type` is the last the upstream sends.
pub fn is_terminal(event_type: &str) -> bool {
    matches!(
        event_type,
        "response.completed" | "response.failed" | "response.incomplete" | "error"
    )
}

fn write_response(
    fields: &[(Key<'_>, &RawValue)],
    ids: &IdRewrite,
    out: &mut bytes::buf::Writer<BytesMut>,
) -> Result<Option<Tokens>, RewriteError> {
    let mut tokens = None;
    out.get_mut().put_u8(b'{');
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.get_mut().put_u8(b',');
        }
        write_json_string(out, &key.0);
        out.get_mut().put_u8(b':');
        match key.0.as_ref() {
            "id" | "previous_response_id" => {
                match serde_json::from_str::<Option<Key<'_>>>(value.get()) {
                    Ok(Some(Key(upstream))) => write_json_string(out, &ids.ours(&upstream)?),
                    _ => out.get_mut().put_slice(value.get().as_bytes()),
                }
            }
            "usage" => {
                tokens = usage(value.get());
                out.get_mut().put_slice(value.get().as_bytes());
            }
            _ => out.get_mut().put_slice(value.get().as_bytes()),
        }
    }
    out.get_mut().put_u8(b'}');
    Ok(tokens)
}

/// The figures of a Responses API `usage` value, its text alone.
pub fn usage_tokens(json: &[u8]) -> Option<Tokens> {
    usage(std::str::from_utf8(json).ok()?)
}

/// The Responses API's `usage` object (`ResponseUsage`).
fn usage(json: &str) -> Option<Tokens> {
    #[derive(Deserialize)]
    struct InputDetails {
        #[serde(default)]
        cached_tokens: Option<u64>,
        #[serde(default)]
        cache_write_tokens: Option<u64>,
    }
    #[derive(Deserialize)]
    struct OutputDetails {
        #[serde(default)]
        reasoning_tokens: Option<u64>,
    }
    #[derive(Deserialize)]
    struct Usage {
        #[serde(default)]
        input_tokens: Option<u64>,
        #[serde(default)]
        output_tokens: Option<u64>,
        #[serde(default)]
        input_tokens_details: Option<InputDetails>,
        #[serde(default)]
        output_tokens_details: Option<OutputDetails>,
    }
    let usage: Usage = serde_json::from_str::<Option<Usage>>(json).ok()??;
    let (cached, written) = usage
        .input_tokens_details
        .map_or((None, None), |d| (d.cached_tokens, d.cache_write_tokens));
    Some(Tokens {
        prompt: usage.input_tokens.unwrap_or(0),
        completion: usage.output_tokens.unwrap_or(0),
        cached_prompt: cached.unwrap_or(0),
        reasoning: usage
            .output_tokens_details
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0),
        // OpenAI's GPT-5.6 and later bill these at 1.25 times the input price.
        cache_write: written.unwrap_or(0),
        cache_write_1h: 0,
        // The Responses API takes no audio in and speaks none out: none is reported.
        audio_prompt: 0,
        audio_completion: 0,
        unshown: 0,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::{Value, json};
    use sluice_proto::v1 as proto;

    fn ids() -> IdRewrite {
        IdRewrite {
            keys: Arc::new(
                AffinityKeys::from_proto(&[proto::AffinityKey {
                    id: 1,
                    secret: vec![5; 32],
                }])
                .unwrap(),
            ),
            client_key_id: "key".into(),
            backend_id: "b1".into(),
            model: "gpt".into(),
            known: Some(("resp_up_prev".into(), "resp_ours_prev".into())),
        }
    }

    #[test]
    fn a_response_object_gets_sluice_ids_and_its_usage_is_read() {
        let body = br#"{"id":"resp_up_1","object":"response","previous_response_id":"resp_up_prev","output":[{"id":"msg_1","type":"message","content":[{"type":"output_text","text":"id resp_up_1"}]}],"usage":{"input_tokens":9,"input_tokens_details":{"cached_tokens":4,"cache_write_tokens":2},"output_tokens":7,"output_tokens_details":{"reasoning_tokens":3},"total_tokens":16}}"#;
        let out = rewrite_response(body, &ids()).unwrap();
        let v: Value = serde_json::from_slice(&out.bytes).unwrap();
        let id = v["id"].as_str().unwrap();
        assert_ne!(id, "resp_up_1");
        assert_eq!(
            ids().keys.unwrap("key", id).unwrap().upstream_id,
            "resp_up_1"
        );
        assert_eq!(v["previous_response_id"], "resp_ours_prev");
        // Item ids and text are not response ids.
        assert_eq!(v["output"][0]["id"], "msg_1");
        assert_eq!(v["output"][0]["content"][0]["text"], "id resp_up_1");
        assert_eq!(
            out.tokens,
            Some(Tokens {
                prompt: 9,
                completion: 7,
                cached_prompt: 4,
                reasoning: 3,
                // OpenAI's GPT-5.6 and later report (and bill) prompt tokens written to the cache.
                cache_write: 2,
                ..Tokens::default()
            })
        );
        let null = rewrite_response(
            br#"{"id":"resp_x","previous_response_id":null,"usage":null}"#,
            &ids(),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&null.bytes).unwrap();
        assert_eq!(v["previous_response_id"], Value::Null);
        assert_eq!(null.tokens, None);
        assert_eq!(
            rewrite_response(b"[1]", &ids()),
            Err(RewriteError::NotAnObject)
        );
    }

    #[test]
    fn only_lifecycle_events_change() {
        let delta = r#"{"type":"response.output_text.delta","item_id":"msg_1","delta":"resp_up_1","sequence_number":4}"#;
        let out = rewrite_event(delta, &ids()).unwrap();
        assert_eq!(out.bytes, delta.as_bytes());
        assert_eq!(
            out.event_type.as_deref(),
            Some("response.output_text.delta")
        );
        let done = json!({"type": "response.completed", "sequence_number": 9,
            "response": {"id": "resp_up_1", "usage": {"input_tokens": 2, "output_tokens": 5}}})
        .to_string();
        let out = rewrite_event(&done, &ids()).unwrap();
        assert!(is_terminal(out.event_type.as_deref().unwrap()));
        let v: Value = serde_json::from_slice(&out.bytes).unwrap();
        assert_ne!(v["response"]["id"], "resp_up_1");
        assert_eq!(v["sequence_number"], 9);
        assert_eq!(out.tokens.unwrap().completion, 5);
    }
}
