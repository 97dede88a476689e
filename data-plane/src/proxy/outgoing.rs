//! The request as it goes upstream: a Messages request's chat body for an OpenAI-format
//! backend and a chat request's Messages body for an Anthropic one, the members Sluice changes
//! in a body (`stream_options` after a refusal, an output cap), the client's query on the
//! backend's URL.

use bytes::Bytes;

use crate::anthropic::{self, Sampling};
use crate::error::ProxyError;
use crate::request::ParsedRequest;
use crate::snapshot::Route;

/// The Messages request as a chat request for an OpenAI-format backend: written from its
/// members when it is in the shape simple requests are, else translated from its parse.
/// `max_tokens` becomes `limit` (the backend's [`crate::snapshot::completion_limit_member`]).
pub(super) fn chat_body(
    parsed: &ParsedRequest<'_>,
    route: &Route,
    limit: &'static str,
) -> Result<Bytes, ProxyError> {
    if let Some(body) = anthropic::request::messages_to_chat_in_shape(
        parsed.members(),
        &route.upstream_model,
        limit,
    ) {
        return Ok(Bytes::from(body));
    }
    let messages = parsed.object()?;
    let chat = anthropic::request::messages_to_chat(&messages, &route.upstream_model, limit)?;
    Ok(Bytes::from(serde_json::Value::Object(chat).to_string()))
}

/// What to send after a refusal of `stream_options` (`forward::stream_options_refusal`) of
/// `body`, and whether it is the body without the member (`true`) or with the member as
/// Sluice writes it alone (`false`); `None` if `body` is not a JSON object or has no
/// `stream_options`.
///
/// Only a refusal of `{"include_usage":true}` is the backend's refusal of the member: a
/// provider's error quotes what the client sent (OpenAI's `Unknown parameter:
/// 'stream_options.<name>'`, vLLM's validation errors), so the client's own members of it
/// could write the refusal's words, have the stream served without usage (charged an
/// estimate, its reasoning and tier lost) and its thread stop asking that backend for usage.
/// Those are left out first.
pub(super) fn after_options_refused(body: &Bytes) -> Option<(Bytes, bool)> {
    memchr::memmem::find(body, b"\"stream_options\"")?;
    let ours = serde_json::json!({"include_usage": true});
    let mut alone = false;
    let body = with_members_changed(body, |key, value| {
        (key == "stream_options").then(|| {
            alone =
                serde_json::from_str::<serde_json::Value>(value.get()).ok() == Some(ours.clone());
            (!alone).then(|| ours.to_string().into_bytes())
        })
    })?;
    Some((body, alone))
}

/// A translated request's output limit lowered to its route's `max_output_tokens`, in the
/// member the backend reads (`max_tokens`, `max_completion_tokens`): Claude Code asks 32,000
/// or 64,000 tokens, which gpt-4o (16,384 at most) and smaller models refuse with the whole
/// request. Written again only for a route with a cap, when the body asks more.
pub(super) fn capped(body: Bytes, cap: Option<u32>) -> Bytes {
    let Some(cap) = cap.map(u64::from) else {
        return body;
    };
    with_members_changed(&body, |key, value| {
        (matches!(key, "max_tokens" | "max_completion_tokens")
            && value.get().parse::<u64>().is_ok_and(|asked| asked > cap))
        .then(|| Some(cap.to_string().into_bytes()))
    })
    .unwrap_or(body)
}

/// A request body without its top-level `stream_options`; `None` if it is not a JSON object
/// or has none. Only for backends that refuse the member.
pub(super) fn without_stream_options(body: &Bytes) -> Option<Bytes> {
    memchr::memmem::find(body, b"\"stream_options\"")?;
    with_members_changed(body, |key, _| (key == "stream_options").then_some(None))
}

/// `body`, a JSON object, with the top-level members `change` names changed and the rest of
/// its text as it came (the schemas a request carries keep their members' order, which a
/// strict structured output follows): `change` answers `Some(Some(text))` for a member whose
/// value is to be `text`, `Some(None)` for one to leave out, `None` for one kept. `None` when
/// nothing changes or `body` is not a JSON object.
pub(super) fn with_members_changed(
    body: &[u8],
    mut change: impl FnMut(&str, &serde_json::value::RawValue) -> Option<Option<Vec<u8>>>,
) -> Option<Bytes> {
    use bytes::BufMut as _;
    let crate::request::Fields(members) =
        serde_json::from_slice::<crate::request::Fields<'_>>(body).ok()?;
    let changes: Vec<_> = members
        .iter()
        .map(|(key, value)| change(&key.0, value))
        .collect();
    if changes.iter().all(Option::is_none) {
        return None;
    }
    let mut out = bytes::BytesMut::with_capacity(body.len()).writer();
    out.get_mut().put_u8(b'{');
    let mut first = true;
    for ((key, value), changed) in members.iter().zip(changes) {
        let text = match &changed {
            Some(None) => continue,
            Some(Some(text)) => text.as_slice(),
            None => value.get().as_bytes(),
        };
        if !first {
            out.get_mut().put_u8(b',');
        }
        first = false;
        crate::request::write_json_string(&mut out, &key.0);
        out.get_mut().put_u8(b':');
        out.get_mut().put_slice(text);
    }
    out.get_mut().put_u8(b'}');
    Some(out.into_inner().freeze())
}

/// The chat request as a Messages request for an Anthropic backend: written from its members
/// when it is in the shape most requests are, else translated from its parse into values.
pub(super) fn messages_body(
    parsed: &ParsedRequest<'_>,
    route: &Route,
    sampling: Sampling,
    stream: bool,
) -> Result<Bytes, ProxyError> {
    if let Some(body) = anthropic::request::chat_to_messages_in_shape(
        parsed.members(),
        &route.upstream_model,
        route.default_max_tokens,
        sampling,
        stream,
    ) {
        return Ok(Bytes::from(body));
    }
    let chat = parsed.object()?;
    let mut messages = anthropic::request::chat_to_messages(
        &chat,
        &route.upstream_model,
        route.default_max_tokens,
        sampling,
    )?;
    messages.insert("stream".into(), serde_json::Value::Bool(stream));
    Ok(Bytes::from(serde_json::Value::Object(messages).to_string()))
}

/// `uri` with the client's query string after its own (a base URL's), if that makes a valid URI.
pub(super) fn with_query(uri: &http::Uri, query: &str) -> Option<http::Uri> {
    let mut parts = uri.clone().into_parts();
    let path_and_query = match parts.path_and_query.as_ref() {
        // The base URL's own query (Azure's `api-version`) first, then the client's.
        Some(p) => match p.query() {
            Some(own) => format!("{}?{own}&{query}", p.path()),
            None => format!("{}?{query}", p.path()),
        },
        None => format!("/?{query}"),
    };
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// `body` with every `from` replaced by `to`.
pub(super) fn replace_all(body: &[u8], from: &[u8], to: &[u8]) -> Bytes {
    if from.is_empty() {
        return Bytes::copy_from_slice(body);
    }
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = rest.windows(from.len()).position(|w| w == from) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(to);
        rest = &rest[at + from.len()..];
    }
    out.extend_from_slice(rest);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A Messages client's query (`?beta=true`) goes after the base URL's own (Azure's
    /// `api-version`), not in its place.
    #[test]
    fn the_clients_query_follows_the_base_urls() {
        let own: http::Uri = "https://h/anthropic/v1/messages?api-version=1"
            .parse()
            .unwrap();
        assert_eq!(
            with_query(&own, "beta=true").unwrap(),
            "https://h/anthropic/v1/messages?api-version=1&beta=true"
        );
        let bare: http::Uri = "https://h/v1/messages".parse().unwrap();
        assert_eq!(
            with_query(&bare, "beta=true").unwrap(),
            "https://h/v1/messages?beta=true"
        );
    }

    /// A translated request's limit is lowered to its route's cap, the rest of its text kept
    /// as it was (a schema's member order, which a strict structured output follows).
    #[test]
    fn a_capped_request_keeps_its_text_but_its_limit() {
        let body = r#"{"model":"m","response_format":{"type":"json_schema","json_schema":{"schema":{"properties":{"zeta":{"type":"string"},"alpha":{"type":"string"}}}}},"max_completion_tokens":64000}"#;
        let capped_body = capped(Bytes::from(body), Some(16_384));
        assert_eq!(
            std::str::from_utf8(&capped_body).unwrap(),
            body.replace("64000", "16384")
        );
        for (cap, text) in [(None, body), (Some(64_000), body)] {
            assert_eq!(capped(Bytes::from(text), cap), Bytes::from(text));
        }
    }

    /// After a refusal of `stream_options`, the client's own members of it are left out
    /// first; only the member as Sluice writes it alone, refused, is dropped.
    #[test]
    fn a_refused_stream_options_loses_the_clients_members_before_itself() {
        let body = |text: &str| Bytes::from(text.to_owned());
        let (reduced, alone) = after_options_refused(&body(
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true,"include_obfuscation":false}}"#,
        ))
        .unwrap();
        assert!(!alone);
        let reduced: serde_json::Value = serde_json::from_slice(&reduced).unwrap();
        assert_eq!(
            reduced,
            serde_json::json!({"model":"m","stream":true,"stream_options":{"include_usage":true}})
        );
        let (without, alone) = after_options_refused(&body(
            r#"{"model":"m","stream":true,"stream_options":{ "include_usage" : true }}"#,
        ))
        .unwrap();
        assert!(alone);
        let without: serde_json::Value = serde_json::from_slice(&without).unwrap();
        assert_eq!(without, serde_json::json!({"model":"m","stream":true}));
        assert!(after_options_refused(&body(r#"{"model":"m","stream":true}"#)).is_none());
    }
}
