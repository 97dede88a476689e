//! The OpenAI wire format: the requests the mock reads and the bodies it writes.

use base64::Engine as _;
use bytes::Bytes;
use http::StatusCode;
use serde::{Deserialize, Serialize};

/// Largest `n` OpenAI accepts.
const MAX_N: u32 = 128;
/// Largest embedding size the mock will produce.
const MAX_DIMENSIONS: usize = 65_536;

/// An OpenAI-style error: `{"error":{"message","type","param","code"}}` with its status.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) kind: &'static str,
    pub(crate) param: Option<std::borrow::Cow<'static, str>>,
    pub(crate) code: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn invalid_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(std::borrow::Cow::Borrowed),
            code: None,
        }
    }

    /// Mistral's refusal of a member it does not take (422, pydantic's `extra_forbidden` at
    /// the member); the mock writes it in OpenAI's error shape, the detail as its message.
    pub(crate) fn extra_forbidden(member: &'static str) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!(
                "{{\"detail\":[{{\"type\":\"extra_forbidden\",\"loc\":[\"body\",\"{member}\"],\"msg\":\"Extra inputs are not permitted\"}}]}}"
            ),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    fn missing(param: &'static str) -> Self {
        Self {
            code: Some("missing_required_parameter"),
            ..Self::invalid_request(
                format!("Missing required parameter: '{param}'."),
                Some(param),
            )
        }
    }

    pub(crate) fn invalid_json(err: &serde_json::Error) -> Self {
        Self::invalid_request(
            format!(
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't \
                 using your HTTP library correctly. The OpenAI API expects a JSON payload.) ({err})"
            ),
            None,
        )
    }

    pub(crate) fn invalid_api_key(provided: bool) -> Self {
        let message = if provided {
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
        } else {
            "You didn't provide an API key. You need to provide your API key in an Authorization header using \
             Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        };
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.to_owned(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// An error quoting the key the request presented, as some providers' answers do.
    pub(crate) fn echoing_key(status: StatusCode, key: &str) -> Self {
        Self {
            status,
            message: format!(
                "Incorrect API key provided: {key}. You can find your API key at \
                 https://platform.openai.com/account/api-keys."
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// OpenAI's 429 for a request whose tokens alone pass the tokens per minute.
    pub(crate) fn request_too_large() -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: String::from(
                "Request too large for gpt-4o in organization org-Mk7vQ2xR9pLw4ZtB8nYc3HdF on tokens \
                 per min (TPM): \
                 Limit 30000, Requested 61337. The input or output tokens must be reduced in \
                 order to run successfully. Visit https://platform.openai.com/account/rate-limits \
                 to learn more.",
            ),
            kind: "tokens",
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    /// OpenAI's 403 for a model the project may not use.
    pub(crate) fn model_access_denied(model: &str) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            message: format!(
                "Project `proj_Zq3vN8xK2mLp7RtY5wBc` does not have access to model `{model}`"
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("model_not_found"),
        }
    }

    pub(crate) fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: None,
            code: Some("model_not_found"),
        }
    }

    pub(crate) fn unknown_url(method: &http::Method, path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("Invalid URL ({method} {path})"),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// Azure OpenAI's answer to a path it does not serve (a deployment's without its
    /// `api-version`).
    pub(crate) fn resource_not_found() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: "Resource not found".to_owned(),
            kind: "invalid_request_error",
            param: None,
            code: Some("404"),
        }
    }

    pub(crate) fn method_not_allowed(method: &http::Method, path: &str) -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("Method {method} is not allowed for {path}"),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub(crate) fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("Request body is larger than {limit} bytes."),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// The body OpenAI sends with an injected status.
    pub(crate) fn for_status(status: StatusCode) -> Self {
        let (message, kind, code) = match status.as_u16() {
            429 => (
                "Rate limit reached for gpt-4o-mini in organization org-Mk7vQ2xR9pLw4ZtB8nYc3HdF on \
                 requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s. \
                 Visit https://platform.openai.com/account/rate-limits to learn more.",
                "requests",
                Some("rate_limit_exceeded"),
            ),
            500 => (
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
            ),
            502 => ("Bad gateway.", "server_error", None),
            503 => (
                "The server is overloaded or not ready yet.",
                "server_error",
                None,
            ),
            400..=499 => ("The request was rejected.", "invalid_request_error", None),
            _ => (
                "The server could not answer the request.",
                "server_error",
                None,
            ),
        };
        Self {
            status,
            message: message.to_owned(),
            kind,
            param: None,
            code,
        }
    }

    pub(crate) fn body(&self) -> Bytes {
        #[derive(Serialize)]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: Option<&'a str>,
        }
        to_bytes(&Outer {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        })
    }
}

fn to_bytes<T: Serialize>(value: &T) -> Bytes {
    // Serializing these plain structs cannot fail; an empty body would show up in any test.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

/// A whole answer's body as OpenAI writes it: indented by two spaces, a member or an element a
/// line (its streams' chunks are compact).
fn to_pretty_bytes<T: Serialize>(value: &T) -> Bytes {
    // As in `to_bytes`: these values always serialize.
    Bytes::from(serde_json::to_vec_pretty(value).unwrap_or_default())
}

/// Whitespace-separated words: the mock's deterministic token count.
fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
    #[serde(default)]
    include_obfuscation: Option<bool>,
    /// Members OpenAI does not know: refused, each named (quoted) in the error.
    #[serde(flatten)]
    unknown: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(default)]
    text: Option<String>,
    /// `{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}`.
    #[serde(default)]
    input_audio: Option<InputAudio>,
}

#[derive(Deserialize)]
struct InputAudio {
    #[serde(default)]
    data: String,
}

/// The audio tokens of an `input_audio` part: one for each 100 bytes of its base64 data, at
/// least one (OpenAI counts about ten a second of speech).
fn audio_tokens(audio: &InputAudio) -> u64 {
    (audio.data.len() as u64).div_ceil(100).max(1)
}

/// The audio tokens a spoken answer (`modalities` with `audio`) spends for each of its text
/// tokens: its transcript's tokens are text, the speech is audio.
pub(crate) const AUDIO_TOKENS_PER_WORD: u64 = 4;

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// An assistant turn's calls, whose function names OpenAI checks as a tool's.
    #[serde(default)]
    tool_calls: Option<Vec<serde_json::Value>>,
}

/// The most characters of a function's name OpenAI takes (openai-python's
/// `FunctionDefinition.name`: "a-z, A-Z, 0-9, or contain underscores and dashes, with a
/// maximum length of 64").
const MAX_FUNCTION_NAME_CHARS: usize = 64;

/// OpenAI's 400 for a function name it refuses, at `param` (`tools[0].function.name`,
/// `messages[3].tool_calls[0].function.name`), in its words: `string_above_max_length` past 64
/// characters, `empty_string` for none, `invalid_value` for one outside `^[a-zA-Z0-9_-]+$`.
fn check_function_name(name: &str, param: String) -> Result<(), ApiError> {
    let length = name.chars().count();
    if length > MAX_FUNCTION_NAME_CHARS {
        return Err(ApiError {
            param: Some(param.clone().into()),
            code: Some("string_above_max_length"),
            ..ApiError::invalid_request(
                format!(
                    "Invalid '{param}': string too long. Expected a string with maximum length \
                     {MAX_FUNCTION_NAME_CHARS}, but got a string with length {length} instead."
                ),
                None,
            )
        });
    }
    if name.is_empty() {
        return Err(ApiError {
            param: Some(param.clone().into()),
            code: Some("empty_string"),
            ..ApiError::invalid_request(
                format!(
                    "Invalid '{param}': empty string. Expected a string with minimum length 1, \
                     but got an empty string instead."
                ),
                None,
            )
        });
    }
    let portable = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !portable {
        return Err(ApiError {
            param: Some(param.clone().into()),
            code: Some("invalid_value"),
            ..ApiError::invalid_request(
                format!(
                    "Invalid '{param}': string does not match pattern. Expected a string that \
                     matches the pattern '^[a-zA-Z0-9_-]+$'."
                ),
                None,
            )
        });
    }
    Ok(())
}

/// Checks the function names of a chat request's tools and its assistant turns' calls as
/// OpenAI does.
fn check_function_names(
    tools: Option<&[serde_json::Value]>,
    messages: &[ChatMessage],
) -> Result<(), ApiError> {
    let name = |function: Option<&serde_json::Value>| {
        function
            .and_then(|f| f.get("name"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    for (i, tool) in tools.unwrap_or_default().iter().enumerate() {
        if let Some(name) = name(tool.get("function")) {
            check_function_name(&name, format!("tools[{i}].function.name"))?;
        }
    }
    for (i, message) in messages.iter().enumerate() {
        for (j, call) in message.tool_calls.iter().flatten().enumerate() {
            if let Some(name) = name(call.get("function")) {
                check_function_name(
                    &name,
                    format!("messages[{i}].tool_calls[{j}].function.name"),
                )?;
            }
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct RawChatRequest {
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    tools: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    tool_choice: Option<serde_json::Value>,
    #[serde(default)]
    prompt_cache_key: Option<String>,
    #[serde(default)]
    service_tier: Option<String>,
    /// A reasoning model's effort: it thinks (and bills the reasoning as output) unless `none`.
    #[serde(default)]
    reasoning_effort: Option<String>,
    /// `["text", "audio"]` asks for a spoken answer.
    #[serde(default)]
    modalities: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

impl Prompt {
    /// Token count per input (strings count words, token arrays count ids).
    fn counts(&self) -> Vec<u64> {
        match self {
            Prompt::Text(t) => vec![words(t)],
            Prompt::Texts(ts) => ts.iter().map(|t| words(t)).collect(),
            Prompt::Tokens(ids) => vec![ids.len() as u64],
            Prompt::TokenLists(lists) => lists.iter().map(|l| l.len() as u64).collect(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Prompt::Text(t) => t.is_empty(),
            Prompt::Texts(ts) => ts.is_empty() || ts.iter().any(String::is_empty),
            Prompt::Tokens(ids) => ids.is_empty(),
            Prompt::TokenLists(lists) => lists.is_empty() || lists.iter().any(Vec::is_empty),
        }
    }
}

#[derive(Deserialize)]
struct RawCompletionRequest {
    model: Option<String>,
    prompt: Option<Prompt>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    n: Option<u32>,
}

#[derive(Deserialize)]
struct RawEmbeddingsRequest {
    model: Option<String>,
    input: Option<Prompt>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
}

/// A generation request (chat or legacy completion), validated.
#[derive(Debug, Clone)]
pub(crate) struct Generation {
    pub(crate) model: String,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    /// Whether a stream's chunks carry `obfuscation` (OpenAI's chat streams do unless
    /// `stream_options.include_obfuscation` is false).
    pub(crate) obfuscate: bool,
    pub(crate) max_tokens: Option<u64>,
    pub(crate) n: u32,
    pub(crate) prompt_tokens: u64,
    /// The function to call, with its arguments, when the answer is a tool call: the request
    /// offers tools (`tool_choice` not `none`) and its last message is not a tool result.
    pub(crate) tool_call: Option<(String, serde_json::Value)>,
    /// The request set a `reasoning_effort` other than `none`: each choice spends
    /// [`super::MockConfig::chunk_count`] reasoning tokens, inside `completion_tokens`.
    pub(crate) reasons: bool,
    /// With a `prompt_cache_key`: the tokens and hash (the key's and the messages') of the
    /// prompt to each message before the last, shortest first: what OpenAI's prompt cache may
    /// hold of it ([`super::state::Shared::chat_cache_read`]). Empty without a key.
    pub(crate) cache_prefixes: Vec<(u64, u64)>,
    /// The processing tier the answer says it was served at ([`served_tier`]).
    pub(crate) service_tier: &'static str,
    /// Of `prompt_tokens`, the audio of the messages' `input_audio` parts.
    pub(crate) audio_prompt_tokens: u64,
    /// A spoken answer: its completion spends [`AUDIO_TOKENS_PER_WORD`] audio tokens a word.
    pub(crate) speaks: bool,
}

/// The tier OpenAI serves a request at, by its `service_tier`, and says it did in the
/// answer's `service_tier`: the one asked for (`flex`, `scale`, `ultrafast`), `priority` for
/// `priority` and for its newer name `fast` (the answer says `priority` for both), else
/// `default` (for `auto`, `default` or none, as for a project without a tier of its own).
/// Any other value is refused, as OpenAI refuses it.
pub(crate) fn served_tier(asked: Option<&str>) -> Result<&'static str, ApiError> {
    match asked {
        None | Some("auto" | "default") => Ok("default"),
        Some("priority" | "fast") => Ok("priority"),
        Some("ultrafast") => Ok("ultrafast"),
        Some("flex") => Ok("flex"),
        Some("scale") => Ok("scale"),
        Some(other) => Err(ApiError::invalid_request(
            format!(
                "Invalid value: '{other}'. Supported values are: 'auto', 'default', 'flex', 'scale', 'priority', 'fast' and 'ultrafast'."
            ),
            Some("service_tier"),
        )),
    }
}

/// `name` as a tier the mock serves at, if it is one.
pub(crate) fn tier_name(name: &str) -> Option<&'static str> {
    ["default", "priority", "flex", "scale", "ultrafast"]
        .into_iter()
        .find(|tier| *tier == name)
}

/// An embeddings request, validated.
#[derive(Debug, Clone)]
pub(crate) struct Embeddings {
    pub(crate) model: String,
    pub(crate) base64: bool,
    pub(crate) dimensions: Option<usize>,
    /// One entry per input: its fingerprint (for the vector) and token count.
    inputs: Vec<(u64, u64)>,
}

/// A parsed request body: `model` comes out even when the rest is invalid, so it can be counted.
pub(crate) struct Parsed<T> {
    pub(crate) model: Option<String>,
    pub(crate) request: Result<T, ApiError>,
}

/// `stream`, `include_usage` and `include_obfuscation` (true unless said false).
fn stream_flags(
    stream: Option<bool>,
    options: Option<StreamOptions>,
) -> Result<(bool, bool, bool), ApiError> {
    let stream = stream.unwrap_or(false);
    match options {
        Some(_) if !stream => Err(ApiError::invalid_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            Some("stream_options"),
        )),
        Some(o) => match o.unknown.keys().next() {
            Some(name) => Err(ApiError {
                code: Some("unknown_parameter"),
                ..ApiError::invalid_request(
                    format!("Unknown parameter: 'stream_options.{name}'."),
                    Some("stream_options"),
                )
            }),
            None => Ok((
                true,
                o.include_usage.unwrap_or(false),
                o.include_obfuscation.unwrap_or(true),
            )),
        },
        None => Ok((stream, false, true)),
    }
}

fn check_n(n: Option<u32>) -> Result<u32, ApiError> {
    match n.unwrap_or(1) {
        0 => Err(ApiError::invalid_request(
            "0 is less than the minimum of 1 - 'n'",
            Some("n"),
        )),
        n if n > MAX_N => Err(ApiError::invalid_request(
            format!("{n} is greater than the maximum of {MAX_N} - 'n'"),
            Some("n"),
        )),
        n => Ok(n),
    }
}

fn require_model(model: Option<String>) -> Result<String, ApiError> {
    match model {
        Some(m) if !m.is_empty() => Ok(m),
        _ => Err(ApiError::invalid_request(
            "You must provide a model parameter.",
            Some("model"),
        )),
    }
}

/// Parses `body` as `R` and builds the request from it; the `model` is read even from a body
/// that is refused, so that the request can still be counted.
fn parse<R: HasModel + serde::de::DeserializeOwned, T>(
    body: &[u8],
    build: impl FnOnce(R) -> Result<T, ApiError>,
) -> Parsed<T> {
    match serde_json::from_slice::<R>(body) {
        Ok(raw) => Parsed {
            model: raw.model().clone(),
            request: build(raw),
        },
        Err(e) => Parsed {
            model: model_only(body),
            request: Err(ApiError::invalid_json(&e)),
        },
    }
}

/// A request body with a `model` field.
trait HasModel {
    fn model(&self) -> &Option<String>;
}

impl HasModel for RawChatRequest {
    fn model(&self) -> &Option<String> {
        &self.model
    }
}

impl HasModel for RawCompletionRequest {
    fn model(&self) -> &Option<String> {
        &self.model
    }
}

impl HasModel for RawEmbeddingsRequest {
    fn model(&self) -> &Option<String> {
        &self.model
    }
}

/// Reads the `model` of a body whose full parse failed, so that the request can still be counted.
pub(crate) fn model_only(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ModelOnly {
        model: Option<String>,
    }
    serde_json::from_slice::<ModelOnly>(body)
        .ok()
        .and_then(|m| m.model)
}

pub(crate) fn parse_chat(body: &[u8]) -> Parsed<Generation> {
    parse(body, |raw: RawChatRequest| {
        let model = require_model(raw.model)?;
        let messages = raw.messages.ok_or_else(|| ApiError::missing("messages"))?;
        if messages.is_empty() {
            return Err(ApiError::invalid_request(
                "[] is too short - 'messages'",
                Some("messages"),
            ));
        }
        let (stream, include_usage, obfuscate) = stream_flags(raw.stream, raw.stream_options)?;
        check_function_names(raw.tools.as_deref(), &messages)?;
        let text = |m: &ChatMessage| -> Vec<String> {
            match &m.content {
                None => Vec::new(),
                Some(Content::Text(t)) => vec![t.clone()],
                Some(Content::Parts(parts)) => {
                    parts.iter().filter_map(|p| p.text.clone()).collect()
                }
            }
        };
        let counts: Vec<u64> = messages
            .iter()
            .map(|m| text(m).iter().map(|t| words(t)).sum())
            .collect();
        let audio_prompt_tokens: u64 = messages
            .iter()
            .filter_map(|m| match &m.content {
                Some(Content::Parts(parts)) => Some(parts),
                _ => None,
            })
            .flatten()
            .filter_map(|p| p.input_audio.as_ref())
            .map(audio_tokens)
            .sum();
        let prompt_tokens = counts.iter().sum::<u64>().max(1) + audio_prompt_tokens;
        let speaks = raw
            .modalities
            .as_deref()
            .is_some_and(|m| m.iter().any(|m| m == "audio"));
        let mut cache_prefixes = Vec::new();
        if let Some(key) = &raw.prompt_cache_key {
            use std::hash::{Hash as _, Hasher as _};
            let mut hasher = std::hash::DefaultHasher::new();
            ("chat", key).hash(&mut hasher);
            let mut tokens = 0;
            for (m, count) in messages.iter().zip(&counts).take(messages.len() - 1) {
                (&m.role, text(m)).hash(&mut hasher);
                tokens += count;
                cache_prefixes.push((tokens, hasher.finish()));
            }
        }
        let answered = messages.last().is_some_and(|m| m.role == "tool");
        let tool_call = raw
            .tools
            .as_deref()
            .filter(|tools| !tools.is_empty() && !answered)
            .and_then(|tools| {
                let chosen = match &raw.tool_choice {
                    Some(serde_json::Value::String(s)) if s == "none" => return None,
                    Some(choice) => choice
                        .pointer("/function/name")
                        .and_then(serde_json::Value::as_str),
                    None => None,
                };
                let name = |f: &serde_json::Value| {
                    f.get("name")
                        .and_then(serde_json::Value::as_str)
                        .map(str::to_owned)
                };
                tools
                    .iter()
                    .filter_map(|t| t.get("function"))
                    .find(|f| chosen.is_none_or(|c| name(f).as_deref() == Some(c)))
                    .map(|f| {
                        let input = super::anthropic::input_for(f.get("parameters"));
                        (name(f).unwrap_or_default(), input)
                    })
            });
        Ok(Generation {
            model,
            stream,
            include_usage,
            obfuscate,
            max_tokens: raw.max_completion_tokens.or(raw.max_tokens),
            n: check_n(raw.n)?,
            prompt_tokens,
            tool_call,
            reasons: raw.reasoning_effort.is_some_and(|effort| effort != "none"),
            cache_prefixes,
            service_tier: served_tier(raw.service_tier.as_deref())?,
            audio_prompt_tokens,
            speaks,
        })
    })
}

pub(crate) fn parse_completion(body: &[u8]) -> Parsed<Generation> {
    parse(body, |raw: RawCompletionRequest| {
        let model = require_model(raw.model)?;
        let prompt = raw.prompt.ok_or_else(|| ApiError::missing("prompt"))?;
        // Legacy completions' streams carry no `obfuscation` here (OpenAI documents it for
        // chat and Responses streams).
        let (stream, include_usage, _) = stream_flags(raw.stream, raw.stream_options)?;
        Ok(Generation {
            model,
            stream,
            include_usage,
            obfuscate: false,
            max_tokens: raw.max_tokens,
            n: check_n(raw.n)?,
            prompt_tokens: prompt.counts().iter().sum::<u64>().max(1),
            tool_call: None,
            reasons: false,
            cache_prefixes: Vec::new(),
            service_tier: "default",
            audio_prompt_tokens: 0,
            speaks: false,
        })
    })
}

pub(crate) fn parse_embeddings(body: &[u8]) -> Parsed<Embeddings> {
    parse(body, |raw: RawEmbeddingsRequest| {
        let model = require_model(raw.model)?;
        let input = raw.input.ok_or_else(|| ApiError::missing("input"))?;
        if input.is_empty() {
            return Err(ApiError::invalid_request(
                "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.",
                Some("input"),
            ));
        }
        let base64 = match raw.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::invalid_request(
                    format!("'{other}' is not one of ['float', 'base64'] - 'encoding_format'"),
                    Some("encoding_format"),
                ));
            }
        };
        if let Some(d) = raw.dimensions
            && (d == 0 || d > MAX_DIMENSIONS)
        {
            return Err(ApiError::invalid_request(
                format!("{d} is not a valid number of dimensions"),
                Some("dimensions"),
            ));
        }
        let counts = input.counts();
        let fingerprints: Vec<u64> = match &input {
            Prompt::Text(t) => vec![fnv1a(t.as_bytes())],
            Prompt::Texts(ts) => ts.iter().map(|t| fnv1a(t.as_bytes())).collect(),
            Prompt::Tokens(ids) => vec![fnv1a_ids(ids)],
            Prompt::TokenLists(lists) => lists.iter().map(|l| fnv1a_ids(l)).collect(),
        };
        Ok(Embeddings {
            model,
            base64,
            dimensions: raw.dimensions,
            inputs: fingerprints.into_iter().zip(counts).collect(),
        })
    })
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn fnv1a_ids(ids: &[i64]) -> u64 {
    ids.iter().fold(0x6c62_272e_07bb_0142, |h, id| {
        id.to_le_bytes()
            .iter()
            .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
    })
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The deterministic unit vector the mock returns for an input with this fingerprint.
pub fn embedding_vector(fingerprint: u64, dims: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dims as u64)
        .map(|j| {
            let x = splitmix64(fingerprint ^ j.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// What a request's answer looks like, fixed before anything is sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta<'a> {
    pub(crate) id: &'a str,
    pub(crate) created: u64,
    pub(crate) model: &'a str,
    /// A chat answer's `service_tier` ([`served_tier`]).
    pub(crate) service_tier: &'static str,
}

/// The `usage` object.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) total_tokens: u64,
    /// Of `prompt_tokens`, read from the cache (the Responses API's continuations, chat
    /// requests with a `prompt_cache_key` whose earlier messages were seen under it).
    #[serde(skip)]
    pub(crate) cached_tokens: u64,
    /// Of `prompt_tokens`, written to the cache (`prompt_tokens_details.cache_write_tokens`):
    /// reported for chat requests with a `prompt_cache_key`, whose cache was looked in.
    #[serde(skip)]
    pub(crate) cache_write_tokens: Option<u64>,
    /// Of `completion_tokens`, spent on reasoning (Responses requests with `reasoning`, chat
    /// requests with `reasoning_effort`).
    #[serde(skip)]
    pub(crate) reasoning_tokens: u64,
    /// Of `prompt_tokens` and of `completion_tokens`, audio (chat requests with
    /// `input_audio` parts, or asking for a spoken answer).
    #[serde(skip)]
    pub(crate) audio_prompt_tokens: u64,
    #[serde(skip)]
    pub(crate) audio_completion_tokens: u64,
}

impl Usage {
    pub(crate) fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            cached_tokens: 0,
            cache_write_tokens: None,
            reasoning_tokens: 0,
            audio_prompt_tokens: 0,
            audio_completion_tokens: 0,
        }
    }
}

/// Seconds since the Unix epoch, for `created` fields.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Serialize)]
struct ChatUsage {
    #[serde(flatten)]
    usage: Usage,
    prompt_tokens_details: PromptDetails,
    completion_tokens_details: CompletionDetails,
}

#[derive(Serialize)]
struct PromptDetails {
    cached_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_write_tokens: Option<u64>,
    audio_tokens: u64,
}

#[derive(Serialize)]
struct CompletionDetails {
    reasoning_tokens: u64,
    audio_tokens: u64,
    accepted_prediction_tokens: u64,
    rejected_prediction_tokens: u64,
}

impl From<Usage> for ChatUsage {
    fn from(usage: Usage) -> Self {
        Self {
            usage,
            prompt_tokens_details: PromptDetails {
                cached_tokens: usage.cached_tokens,
                cache_write_tokens: usage.cache_write_tokens,
                audio_tokens: usage.audio_prompt_tokens,
            },
            completion_tokens_details: CompletionDetails {
                reasoning_tokens: usage.reasoning_tokens,
                audio_tokens: usage.audio_completion_tokens,
                accepted_prediction_tokens: 0,
                rejected_prediction_tokens: 0,
            },
        }
    }
}

const FINGERPRINT: &str = "fp_sluice_mock";

/// The text of completion token `i`: the first names the mock, so tests see which backend answered.
pub(crate) fn piece(name: &str, i: u64) -> String {
    if i == 0 {
        format!("[{name}]")
    } else {
        format!(" tok{i}")
    }
}

pub(crate) fn full_text(name: &str, tokens: u64) -> String {
    (0..tokens).map(|i| piece(name, i)).collect()
}

pub(crate) fn chat_json(
    meta: Meta<'_>,
    n: u32,
    text: &str,
    finish_reason: &str,
    usage: Usage,
) -> Bytes {
    #[derive(Serialize)]
    struct Body<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        model: &'a str,
        choices: Vec<Choice<'a>>,
        usage: ChatUsage,
        service_tier: &'static str,
        system_fingerprint: &'static str,
    }
    #[derive(Serialize)]
    struct Choice<'a> {
        index: u32,
        message: Message<'a>,
        logprobs: Option<()>,
        finish_reason: &'a str,
    }
    #[derive(Serialize)]
    struct Message<'a> {
        role: &'static str,
        content: &'a str,
        refusal: Option<()>,
        annotations: [(); 0],
    }
    to_pretty_bytes(&Body {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        choices: (0..n)
            .map(|index| Choice {
                index,
                message: Message {
                    role: "assistant",
                    content: text,
                    refusal: None,
                    annotations: [],
                },
                logprobs: None,
                finish_reason,
            })
            .collect(),
        usage: usage.into(),
        service_tier: meta.service_tier,
        system_fingerprint: FINGERPRINT,
    })
}

/// A chat answer that calls `name` with `arguments`: the whole completion, and its stream
/// (role, the call's id and name, its arguments in `pieces` pieces, the finish, the usage
/// chunk when `include_usage`, `[DONE]`), as OpenAI streams a tool call: with
/// `include_usage` every chunk before the usage one says `"usage":null`, and with
/// `obfuscate` every chunk ends with its `obfuscation`.
pub(crate) fn tool_call_answer(
    meta: Meta<'_>,
    name: &str,
    arguments: &serde_json::Value,
    usage: Usage,
    include_usage: bool,
    obfuscate: bool,
    pieces: usize,
) -> (Bytes, Vec<Bytes>) {
    use serde_json::json;
    let call_id = format!("call_{}", meta.id.trim_start_matches("chatcmpl-"));
    let arguments = arguments.to_string();
    // The same details as a text answer's.
    let usage_json = serde_json::to_value(ChatUsage::from(usage)).unwrap_or_default();
    let whole = json!({
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": null,
            "tool_calls": [{"id": call_id, "type": "function",
                            "function": {"name": name, "arguments": arguments}}]},
            "logprobs": null, "finish_reason": "tool_calls"}],
        "usage": usage_json,
        "service_tier": meta.service_tier,
        "system_fingerprint": FINGERPRINT,
    });
    let mut events = Vec::new();
    let mut push = |choices: serde_json::Value, usage: Option<serde_json::Value>, padded: usize| {
        let seed = events.len();
        let padding = obfuscate.then(|| obfuscation(seed, padded));
        events.push(sse_event(&ChatChunk::new(meta, choices, usage, padding)));
    };
    let null_usage = || include_usage.then_some(serde_json::Value::Null);
    let chunk = |delta: serde_json::Value, finish: Option<&str>| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    push(
        chunk(json!({"role": "assistant", "content": null}), None),
        null_usage(),
        0,
    );
    push(
        chunk(
            json!({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                    "function": {"name": name, "arguments": ""}}]}),
            None,
        ),
        null_usage(),
        name.len(),
    );
    for piece in super::in_pieces(&arguments, pieces) {
        push(
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                None,
            ),
            null_usage(),
            piece.len(),
        );
    }
    push(chunk(json!({}), Some("tool_calls")), null_usage(), 0);
    if include_usage {
        push(json!([]), Some(usage_json), 0);
    }
    events.push(Bytes::from_static(DONE));
    (to_pretty_bytes(&whole), events)
}

/// The `obfuscation` OpenAI ends each chunk of a chat stream with (unless the request's
/// `stream_options.include_obfuscation` is false): random letters and digits that pad the
/// chunk so that its size says less about its content. Here drawn from a fixed sequence
/// (`seed`, the chunk's place in its stream), as many (1–16) as bring `content` bytes to a
/// multiple of 16.
pub(crate) fn obfuscation(seed: usize, content: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..16 - content % 16)
        .map(|i| char::from(ALPHABET[(seed * 7 + i * 13) % ALPHABET.len()]))
        .collect()
}

pub(crate) fn completion_json(
    meta: Meta<'_>,
    n: u32,
    text: &str,
    finish_reason: &str,
    usage: Usage,
) -> Bytes {
    #[derive(Serialize)]
    struct Body<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        model: &'a str,
        system_fingerprint: &'static str,
        choices: Vec<Choice<'a>>,
        usage: Usage,
    }
    #[derive(Serialize)]
    struct Choice<'a> {
        text: &'a str,
        index: u32,
        logprobs: Option<()>,
        finish_reason: &'a str,
    }
    to_pretty_bytes(&Body {
        id: meta.id,
        object: "text_completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: FINGERPRINT,
        choices: (0..n)
            .map(|index| Choice {
                text,
                index,
                logprobs: None,
                finish_reason,
            })
            .collect(),
        usage,
    })
}

/// One choice's part of a streamed chunk.
pub(crate) enum Delta<'a> {
    Role,
    Content(&'a str),
    Finish(&'a str),
}

/// A `chat.completion.chunk` (`usage` present only when the client asked for it: `null` on these,
/// the totals on the last chunk, which has no choices), ending with its `obfuscation` when
/// given.
pub(crate) fn chat_chunk(
    meta: Meta<'_>,
    index: u32,
    delta: Option<Delta<'_>>,
    usage: Option<Option<Usage>>,
    obfuscation: Option<String>,
) -> Bytes {
    #[derive(Serialize)]
    struct Choice<'a> {
        index: u32,
        delta: DeltaBody<'a>,
        logprobs: Option<()>,
        finish_reason: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct DeltaBody<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        refusal: Option<Option<()>>,
    }
    let choices = match delta {
        None => Vec::new(),
        Some(d) => {
            let (delta, finish_reason) = match d {
                Delta::Role => (
                    DeltaBody {
                        role: Some("assistant"),
                        content: Some(""),
                        refusal: Some(None),
                    },
                    None,
                ),
                Delta::Content(t) => (
                    DeltaBody {
                        role: None,
                        content: Some(t),
                        refusal: None,
                    },
                    None,
                ),
                Delta::Finish(r) => (
                    DeltaBody {
                        role: None,
                        content: None,
                        refusal: None,
                    },
                    Some(r),
                ),
            };
            vec![Choice {
                index,
                delta,
                logprobs: None,
                finish_reason,
            }]
        }
    };
    sse_event(&ChatChunk::new(
        meta,
        choices,
        usage.map(|u| u.map(ChatUsage::from)),
        obfuscation,
    ))
}

/// A `chat.completion.chunk`'s members in the order OpenAI writes them: `usage` (when the
/// client asked for it) and the padding last.
#[derive(Serialize)]
struct ChatChunk<'a, C, U> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    service_tier: &'static str,
    system_fingerprint: &'static str,
    choices: C,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<U>,
    #[serde(skip_serializing_if = "Option::is_none")]
    obfuscation: Option<String>,
}

impl<'a, C, U> ChatChunk<'a, C, U> {
    fn new(meta: Meta<'a>, choices: C, usage: Option<U>, obfuscation: Option<String>) -> Self {
        Self {
            id: meta.id,
            object: "chat.completion.chunk",
            created: meta.created,
            model: meta.model,
            service_tier: meta.service_tier,
            system_fingerprint: FINGERPRINT,
            choices,
            usage,
            obfuscation,
        }
    }
}

/// A streamed `text_completion` chunk; `delta` None = the usage chunk.
pub(crate) fn completion_chunk(
    meta: Meta<'_>,
    index: u32,
    delta: Option<Delta<'_>>,
    usage: Option<Option<Usage>>,
) -> Bytes {
    #[derive(Serialize)]
    struct Chunk<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        choices: Vec<Choice<'a>>,
        model: &'a str,
        system_fingerprint: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        usage: Option<Option<Usage>>,
    }
    #[derive(Serialize)]
    struct Choice<'a> {
        text: &'a str,
        index: u32,
        logprobs: Option<()>,
        finish_reason: Option<&'a str>,
    }
    let choices = match delta {
        None => Vec::new(),
        Some(Delta::Role) => Vec::new(),
        Some(Delta::Content(text)) => vec![Choice {
            text,
            index,
            logprobs: None,
            finish_reason: None,
        }],
        Some(Delta::Finish(r)) => vec![Choice {
            text: "",
            index,
            logprobs: None,
            finish_reason: Some(r),
        }],
    };
    sse_event(&Chunk {
        id: meta.id,
        object: "text_completion",
        created: meta.created,
        choices,
        model: meta.model,
        system_fingerprint: FINGERPRINT,
        usage,
    })
}

/// `data: <json>\n\n`.
fn sse_event<T: Serialize>(value: &T) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    // As in `to_bytes`: these structs always serialize.
    let _ = serde_json::to_writer(&mut out, value);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";

/// The embeddings answer and its prompt token count.
pub(crate) fn embeddings_json(req: &Embeddings, default_dims: usize) -> (Bytes, u64) {
    #[derive(Serialize)]
    struct Body<'a> {
        object: &'static str,
        data: Vec<Item>,
        model: &'a str,
        usage: EmbeddingUsage,
    }
    #[derive(Serialize)]
    struct EmbeddingUsage {
        prompt_tokens: u64,
        total_tokens: u64,
    }
    #[derive(Serialize)]
    struct Item {
        object: &'static str,
        index: usize,
        embedding: Vector,
    }
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Vector {
        Float(Vec<f32>),
        Base64(String),
    }
    let dims = req.dimensions.unwrap_or(default_dims);
    let data = req
        .inputs
        .iter()
        .enumerate()
        .map(|(index, (fingerprint, _))| {
            let v = embedding_vector(*fingerprint, dims);
            let embedding = if req.base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Vector::Float(v)
            };
            Item {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    let tokens = req.inputs.iter().map(|(_, t)| t).sum::<u64>().max(1);
    let body = to_pretty_bytes(&Body {
        object: "list",
        data,
        model: &req.model,
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    });
    (body, tokens)
}

/// `{"id","object":"model","created","owned_by"}`.
pub(crate) fn model_json(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "sluice-mock"})
}

pub(crate) fn models_json(ids: &[String]) -> Bytes {
    to_bytes(&serde_json::json!({
        "object": "list",
        "data": ids.iter().map(|id| model_json(id)).collect::<Vec<_>>(),
    }))
}

pub(crate) fn json_bytes(value: &serde_json::Value) -> Bytes {
    to_bytes(value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn chat_prompt_tokens_count_words_in_text_and_parts() {
        let p = parse_chat(
            br#"{"model":"m","messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"one two three"},{"type":"image_url","image_url":{"url":"x"}}]},
                {"role":"assistant","content":null}]}"#,
        );
        let g = p.request.unwrap();
        assert_eq!(g.prompt_tokens, 5);
        assert!(!g.stream);
        assert_eq!(p.model.as_deref(), Some("m"));
    }

    /// OpenAI refuses a function name past 64 characters or outside `[a-zA-Z0-9_-]`, in a
    /// tool or an earlier turn's call, naming where it is: so does the mock.
    #[test]
    fn function_names_openai_refuses_are_refused_as_openai_refuses_them() {
        use serde_json::json;
        let request = |tool: &str, called: &str| {
            parse_chat(
                json!({"model": "m", "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": called, "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "c", "content": "ok"},
                    {"role": "user", "content": "again"}],
                    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}},
                              {"type": "function", "function": {"name": tool, "parameters": {}}}]})
                .to_string()
                .as_bytes(),
            )
            .request
        };
        let longest = "a".repeat(64);
        assert!(request(&longest, &longest).is_ok());
        assert!(request("get-weather_2", "f").is_ok());
        let long = "a".repeat(65);
        for (tool, called, param, code, says) in [
            (
                long.as_str(),
                "f",
                "tools[1].function.name",
                "string_above_max_length",
                "string too long. Expected a string with maximum length 64, but got a string with length 65 instead.",
            ),
            (
                "f",
                long.as_str(),
                "messages[1].tool_calls[0].function.name",
                "string_above_max_length",
                "string too long",
            ),
            (
                "get.weather",
                "f",
                "tools[1].function.name",
                "invalid_value",
                "string does not match pattern. Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
            ),
            (
                "f",
                "get weather",
                "messages[1].tool_calls[0].function.name",
                "invalid_value",
                "does not match pattern",
            ),
        ] {
            let error = request(tool, called).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            let body: serde_json::Value = serde_json::from_slice(&error.body()).unwrap();
            assert_eq!(body["error"]["type"], "invalid_request_error");
            assert_eq!(body["error"]["param"], param);
            assert_eq!(body["error"]["code"], code);
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.starts_with(&format!("Invalid '{param}': ")),
                "{message}"
            );
            assert!(message.contains(says), "{message}");
        }
    }

    #[test]
    fn invalid_bodies_still_yield_the_model_for_counting() {
        let p = parse_chat(br#"{"model":"m","messages":"nope"}"#);
        assert_eq!(p.model.as_deref(), Some("m"));
        assert_eq!(p.request.unwrap_err().status, StatusCode::BAD_REQUEST);
        let p = parse_chat(br#"{"messages":[]}"#);
        assert!(p.model.is_none());
        assert!(p.request.is_err());
    }

    #[test]
    fn an_unknown_member_of_stream_options_is_refused_by_name() {
        let p = parse_chat(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"stream_options":{"include_usage":true,"flag":1}}"#,
        );
        let refused = p.request.unwrap_err();
        assert_eq!(refused.message, "Unknown parameter: 'stream_options.flag'.");
        assert_eq!(refused.code, Some("unknown_parameter"));
    }

    #[test]
    fn stream_options_without_stream_is_rejected() {
        let p = parse_chat(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#);
        assert_eq!(
            p.request.unwrap_err().param.as_deref(),
            Some("stream_options")
        );
    }

    #[test]
    fn prompt_shapes() {
        for (body, tokens) in [
            (r#"{"model":"m","prompt":"a b c"}"#, 3),
            (r#"{"model":"m","prompt":["a b","c"]}"#, 3),
            (r#"{"model":"m","prompt":[1,2,3,4]}"#, 4),
            (r#"{"model":"m","prompt":[[1,2],[3]]}"#, 3),
            (r#"{"model":"m","prompt":"   "}"#, 1),
        ] {
            assert_eq!(
                parse_completion(body.as_bytes())
                    .request
                    .unwrap()
                    .prompt_tokens,
                tokens,
                "{body}"
            );
        }
    }

    #[test]
    fn vectors_are_unit_length_and_deterministic() {
        let a = embedding_vector(fnv1a(b"hello"), 8);
        assert_eq!(a, embedding_vector(fnv1a(b"hello"), 8));
        assert_ne!(a, embedding_vector(fnv1a(b"world"), 8));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }
}
