//! A lean HTTP/1.1 client for load generation: hyper connections with `TCP_NODELAY`, a
//! keep-alive pool that opens a new connection whenever none is idle (so the generator never
//! waits for a connection), and OpenAI chat-completion requests prepared once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::BenchError;

/// An OpenAI-compatible endpoint: where to connect, the base path, the key and the model.
#[derive(Debug)]
pub struct Target {
    url: String,
    addr: SocketAddr,
    host: HeaderValue,
    /// The base URL's path (`/v1`), without its trailing slash.
    base_path: String,
    /// Where requests go: `…/chat/completions`, or `…/messages` for [`Api::Messages`].
    path: String,
    api: Api,
    /// Whether the body is a coding agent's ([`agent_chat_body`], [`agent_messages_body`])
    /// instead of a short one.
    agent: bool,
    /// Whether the short body asks for a tool call ([`tool_call_body`]).
    tool_call: bool,
    auth: Option<HeaderValue>,
    model: String,
}

/// The API a target's requests speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI's chat completions.
    Chat,
    /// Anthropic's Messages (non-streamed only).
    Messages,
}

impl Target {
    /// `url` is the base URL an OpenAI SDK takes (`http://127.0.0.1:8080/v1`); only plain
    /// `http://` is supported. Hosts other than loopback are refused unless `allow_remote`.
    pub fn new(
        url: &str,
        key: Option<&str>,
        model: &str,
        allow_remote: bool,
    ) -> Result<Self, BenchError> {
        let bad = |why: &str| BenchError::Url {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// URLs are supported"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let addr = if host == "localhost" {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            SocketAddr::new(ip, port)
        } else {
            (host, port)
                .to_socket_addrs()
                .map_err(|e| bad(&format!("cannot resolve the host: {e}")))?
                .next()
                .ok_or_else(|| bad("the host resolves to no address"))?
        };
        if !addr.ip().is_loopback() && !allow_remote {
            return Err(bad(
                "not a loopback address; pass --allow-remote to load a gateway on another host",
            ));
        }
        let auth = key
            .map(|k| HeaderValue::from_str(&format!("Bearer {k}")))
            .transpose()
            .map_err(|_| bad("the key is not a valid header value"))?;
        Ok(Self {
            url: url.to_owned(),
            addr,
            host: HeaderValue::from_str(authority.as_str()).map_err(|_| bad("bad host"))?,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            path: format!("{}/chat/completions", uri.path().trim_end_matches('/')),
            api: Api::Chat,
            agent: false,
            tool_call: false,
            auth,
            model: model.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// The same target sent Anthropic Messages requests (`POST …/messages`, with
    /// `anthropic-version` and the key as a bearer token, which Sluice and Anthropic's SDKs
    /// both use) instead of chat completions.
    pub fn speaking_messages(mut self) -> Self {
        self.path = format!("{}/messages", self.base_path);
        self.api = Api::Messages;
        self
    }

    /// The same target sent a coding agent's requests in its API ([`agent_chat_body`],
    /// [`agent_messages_body`]).
    pub fn as_agent(mut self) -> Self {
        self.agent = true;
        self
    }

    /// The same target sent short requests that ask for a tool call ([`tool_call_body`]).
    pub fn asking_for_a_tool_call(mut self) -> Self {
        self.tool_call = true;
        self
    }

    /// The body of a request for the target's model in its API ([`chat_body`],
    /// [`messages_body`], [`agent_chat_body`], [`agent_messages_body`] or [`tool_call_body`]).
    pub fn body(&self, stream: bool) -> Bytes {
        if self.tool_call {
            return tool_call_body(self.api, &self.model, stream);
        }
        match (self.api, self.agent) {
            (Api::Chat, false) => chat_body(&self.model, stream),
            (Api::Chat, true) => agent_chat_body(&self.model, stream),
            (Api::Messages, false) => messages_body(&self.model, stream),
            (Api::Messages, true) => agent_messages_body(&self.model, stream),
        }
    }

    /// A `POST` of this (already serialised) body to the target's endpoint
    /// (`…/chat/completions` or `…/messages`).
    pub fn request(&self, body: Bytes) -> Result<Request<Full<Bytes>>, BenchError> {
        let mut request = Request::post(self.path.as_str())
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        if self.api == Api::Messages {
            request = request.header("anthropic-version", "2023-06-01");
        }
        Ok(request.body(Full::new(body))?)
    }
}

/// The body of a short chat completion for `model`; streamed ones ask for the usage chunk so a
/// gateway that strips or adds it is compared on equal terms.
pub fn chat_body(model: &str, stream: bool) -> Bytes {
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    });
    if stream {
        body["stream"] = true.into();
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    Bytes::from(body.to_string())
}

/// The body of a short Anthropic Messages request for `model` (a stream reports its usage in
/// its events unasked).
pub fn messages_body(model: &str, stream: bool) -> Bytes {
    let mut body = serde_json::json!({
        "model": model,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    });
    if stream {
        body["stream"] = true.into();
    }
    Bytes::from(body.to_string())
}

/// The body of a Messages request as a coding agent sends it in the middle of a task, in the
/// shape Claude Code writes: two system blocks and the latest turn marked for caching, sixteen
/// tools with JSON schemas (about 28 KB), and five rounds of the assistant's text and tool call
/// each answered by the tool's result (a numbered file listing or command output, about 3 KB
/// each), ending on a result so the answer is text. About 60 KB in all, the same bytes on every
/// call.
pub fn agent_messages_body(model: &str, stream: bool) -> Bytes {
    use serde_json::{Value, json};
    let tools: Vec<Value> = AGENT_TOOLS
        .iter()
        .enumerate()
        .map(|(i, (name, params))| {
            let schema = agent_schema(i, params);
            json!({"name": name, "description": prose(i, 1_400), "input_schema": schema})
        })
        .collect();
    let mut turns = vec![json!({"role": "user", "content": [
        {"type": "text", "text": format!("<system-reminder>\n{}\n</system-reminder>", prose(3, 900))},
        {"type": "text", "text": "Find why the usage report drops a record when the spool is full, and fix it."},
    ]})];
    for round in 0..5 {
        let (name, _) = AGENT_TOOLS[[5, 2, 1, 5, 0][round]];
        let id = format!("toolu_01{round:0>22}");
        turns.push(json!({"role": "assistant", "content": [
            {"type": "text", "text": prose(round + 40, 200)},
            {"type": "tool_use", "id": id, "name": name,
             "input": {"file_path": format!("/work/src/module_{round}.rs"), "limit": 120}},
        ]}));
        let mut result =
            json!({"type": "tool_result", "tool_use_id": id, "content": agent_listing(round)});
        if round == 4 {
            // The latest turn is where the agent marks the cache's end.
            result["cache_control"] = json!({"type": "ephemeral"});
        }
        turns.push(json!({"role": "user", "content": [result]}));
    }
    let mut body = json!({
        "model": model,
        "max_tokens": 32_000,
        "temperature": 1,
        "system": [
            {"type": "text", "text": "You are a coding agent run from the command line.",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": prose(11, 9_000), "cache_control": {"type": "ephemeral"}},
        ],
        "tools": tools,
        "messages": turns,
        "metadata": {"user_id": "user_4f1c0ad2_account__session_9b7e"},
    });
    if stream {
        body["stream"] = true.into();
    }
    Bytes::from(body.to_string())
}

/// The same request as a coding agent on the OpenAI SDK sends it (the conversation of
/// [`agent_messages_body`] in chat completions: the system prompt as one string, sixteen
/// function tools, five rounds of an assistant message with a tool call each answered by a
/// `tool` message), about 60 KB.
pub fn agent_chat_body(model: &str, stream: bool) -> Bytes {
    use serde_json::{Value, json};
    let tools: Vec<Value> = AGENT_TOOLS
        .iter()
        .enumerate()
        .map(|(i, (name, params))| {
            let schema = agent_schema(i, params);
            let function =
                json!({"name": name, "description": prose(i, 1_400), "parameters": schema});
            json!({"type": "function", "function": function})
        })
        .collect();
    let task = "Find why the usage report drops a record when the spool is full, and fix it.";
    let mut messages = vec![
        json!({"role": "system", "content": prose(11, 9_000)}),
        json!({"role": "user", "content": format!("{}\n\n{task}", prose(3, 900))}),
    ];
    for round in 0..5 {
        let (name, _) = AGENT_TOOLS[[5, 2, 1, 5, 0][round]];
        let id = format!("call_{round:0>24}");
        let arguments = json!({"file_path": format!("/work/src/module_{round}.rs"), "limit": 120});
        let call = json!({"id": id, "type": "function",
            "function": {"name": name, "arguments": arguments.to_string()}});
        messages.push(
            json!({"role": "assistant", "content": prose(round + 40, 200), "tool_calls": [call]}),
        );
        messages.push(json!({"role": "tool", "tool_call_id": id, "content": agent_listing(round)}));
    }
    let mut body = json!({
        "model": model,
        "max_completion_tokens": 32_000,
        "temperature": 1,
        "tools": tools,
        "messages": messages,
        "user": "user_4f1c0ad2",
    });
    if stream {
        body["stream"] = true.into();
        body["stream_options"] = json!({"include_usage": true});
    }
    Bytes::from(body.to_string())
}

/// The JSON schema of the agent's tool `i`.
fn agent_schema(i: usize, params: &[&str]) -> serde_json::Value {
    use serde_json::{Map, Value, json};
    let properties: Map<String, Value> = params
        .iter()
        .enumerate()
        .map(|(j, param)| {
            let kind = if j % 3 == 2 { "number" } else { "string" };
            let about = prose(i * 7 + j, 160);
            (
                (*param).to_owned(),
                json!({"type": kind, "description": about}),
            )
        })
        .collect();
    json!({
        "type": "object",
        "properties": properties,
        "required": [params[0]],
        "additionalProperties": false,
        "$schema": "http://json-schema.org/draft-07/schema#",
    })
}

/// What the agent's tool returned in `round`: a file's 40 numbered lines, about 3 KB.
fn agent_listing(round: usize) -> String {
    let lines: Vec<String> = (1..=40)
        .map(|line| format!("{line:>6}\t    {}", prose(round * 40 + line, 64)))
        .collect();
    lines.join("\n")
}

/// The agent's tools, each with its parameters (the first required).
const AGENT_TOOLS: [(&str, &[&str]); 16] = [
    ("Task", &["description", "prompt", "subagent_type"]),
    ("Bash", &["command", "description", "timeout"]),
    ("Glob", &["pattern", "path"]),
    (
        "Grep",
        &["pattern", "path", "head_limit", "glob", "output_mode"],
    ),
    ("LS", &["path", "ignore"]),
    ("Read", &["file_path", "offset", "limit"]),
    (
        "Edit",
        &["file_path", "old_string", "new_string", "replace_all"],
    ),
    ("MultiEdit", &["file_path", "edits"]),
    ("Write", &["file_path", "content"]),
    (
        "NotebookEdit",
        &["notebook_path", "new_source", "cell_number"],
    ),
    ("WebFetch", &["url", "prompt"]),
    ("TodoWrite", &["todos"]),
    (
        "WebSearch",
        &["query", "allowed_domains", "blocked_domains"],
    ),
    ("BashOutput", &["bash_id", "filter"]),
    ("KillShell", &["shell_id"]),
    ("ExitPlanMode", &["plan"]),
];

/// About `bytes` of English-like text with quotes and line breaks, the same for the same
/// `seed`.
fn prose(seed: usize, bytes: usize) -> String {
    const WORDS: [&str; 24] = [
        "the",
        "request",
        "\"usage\"",
        "is",
        "read",
        "once",
        "before",
        "each",
        "record",
        "spool",
        "writes",
        "to",
        "disk;",
        "a",
        "replica",
        "must",
        "never",
        "count",
        "twice",
        "when",
        "`sluice`",
        "retries,",
        "and",
        "then.\n",
    ];
    let mut text = String::with_capacity(bytes + 16);
    let mut at = seed;
    while text.len() < bytes {
        text.push_str(WORDS[at % WORDS.len()]);
        text.push(' ');
        at = at.wrapping_mul(31).wrapping_add(7);
    }
    text
}

/// A short request in `api` that offers one tool (a `Write` of a file) and asks for a call of
/// it, so that the answer is a tool call (streamed as the mock's `--tool-call-pieces` pieces of
/// its arguments).
pub fn tool_call_body(api: Api, model: &str, stream: bool) -> Bytes {
    use serde_json::json;
    let schema = json!({"type": "object", "properties": {
        "file_path": {"type": "string"}, "description": {"type": "string"}, "content": {"type": "string"},
    }, "required": ["file_path", "content"]});
    let ask = json!([{"role": "user", "content": "Write the report to report.md."}]);
    let mut body = match api {
        Api::Chat => json!({"model": model, "messages": ask, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "Write", "parameters": schema}}]}),
        Api::Messages => json!({"model": model, "max_tokens": 256, "messages": ask,
            "tool_choice": {"type": "any"}, "tools": [{"name": "Write", "input_schema": schema}]}),
    };
    if stream {
        body["stream"] = true.into();
        if api == Api::Chat {
            body["stream_options"] = json!({"include_usage": true});
        }
    }
    Bytes::from(body.to_string())
}

/// One HTTP/1.1 connection.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Result<Self, BenchError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| BenchError::Connect { addr, source })?;
        stream
            .set_nodelay(true)
            .map_err(|source| BenchError::Connect { addr, source })?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the peer closes or the sender is dropped; errors show up on the sender.
            let _ = connection.await;
        });
        Ok(Self { sender })
    }

    /// Sends `request` once the previous answer on this connection is done.
    pub async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, BenchError> {
        self.sender.ready().await?;
        Ok(self.sender.send_request(request).await?)
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// A complete non-streamed answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body_bytes: usize,
}

/// Reads a response to its end, counting the body bytes.
pub async fn read_answer(response: Response<Incoming>) -> Result<Answer, BenchError> {
    let (parts, mut body) = response.into_parts();
    let mut body_bytes = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            body_bytes += data.len();
        }
    }
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body_bytes,
    })
}

/// Keep-alive connections to one target. A call takes an idle connection or opens a new one,
/// so concurrency is never capped by the pool.
pub struct Pool {
    target: Arc<Target>,
    idle: Mutex<Vec<Conn>>,
}

impl Pool {
    pub fn new(target: Arc<Target>) -> Self {
        Self {
            target,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// Opens `n` connections ahead of time.
    pub async fn warm(&self, n: usize) -> Result<(), BenchError> {
        for _ in 0..n {
            let conn = Conn::open(self.target.addr).await?;
            self.checkin(conn);
        }
        Ok(())
    }

    /// Sends a chat completion with `body` and reads the whole answer.
    pub async fn call(&self, body: Bytes) -> Result<Answer, BenchError> {
        let request = self.target.request(body)?;
        let mut conn = self.checkout().await?;
        let answer = read_answer(conn.send(request).await?).await?;
        self.checkin(conn);
        Ok(answer)
    }

    async fn checkout(&self) -> Result<Conn, BenchError> {
        while let Some(conn) = self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            if !conn.is_closed() {
                return Ok(conn);
            }
        }
        Conn::open(self.target.addr).await
    }

    fn checkin(&self, conn: Conn) {
        if conn.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_messages_target_posts_anthropic_requests() {
        let t = Target::new("http://127.0.0.1:8080/v1/", Some("sk-x"), "claude", false)
            .unwrap()
            .speaking_messages();
        let request = t.request(t.body(true)).unwrap();
        assert_eq!(request.uri().path(), "/v1/messages");
        assert_eq!(request.headers()["anthropic-version"], "2023-06-01");
        assert_eq!(request.headers()[AUTHORIZATION], "Bearer sk-x");
        let body: serde_json::Value = serde_json::from_slice(&t.body(false)).unwrap();
        assert_eq!(body["model"], "claude");
        assert_eq!(body["max_tokens"], 64);
        assert!(body.get("stream").is_none(), "{body}");
        let body: serde_json::Value = serde_json::from_slice(&t.body(true)).unwrap();
        assert_eq!(body["stream"], true);
        let chat = Target::new("http://127.0.0.1:8080/v1", None, "m", false).unwrap();
        let request = chat.request(chat.body(false)).unwrap();
        assert_eq!(request.uri().path(), "/v1/chat/completions");
        assert!(request.headers().get("anthropic-version").is_none());
    }

    /// The agent's body is a Messages request in Claude Code's shape, of the size given.
    #[test]
    fn an_agent_body_carries_tools_and_tool_rounds() {
        let t = Target::new("http://127.0.0.1:8080/v1", None, "claude", false)
            .unwrap()
            .speaking_messages()
            .as_agent();
        let bytes = t.body(true);
        assert!((50_000..80_000).contains(&bytes.len()), "{}", bytes.len());
        assert_eq!(bytes, t.body(true), "the same bytes on every call");
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["model"], "claude");
        assert_eq!(body["stream"], true);
        assert_eq!(body["tools"].as_array().unwrap().len(), 16);
        let turns = body["messages"].as_array().unwrap();
        assert_eq!(turns.len(), 11);
        assert_eq!(turns[1]["content"][1]["type"], "tool_use");
        let last = &turns[10]["content"][0];
        assert_eq!(last["type"], "tool_result");
        assert_eq!(last["tool_use_id"], turns[9]["content"][1]["id"]);
        assert_eq!(last["cache_control"]["type"], "ephemeral");
        assert!(last["content"].as_str().unwrap().contains("\n     2\t"));
    }

    /// The agent's chat body is the same conversation in chat completions.
    #[test]
    fn an_agent_chat_body_carries_tools_and_tool_calls() {
        let t = Target::new("http://127.0.0.1:8080/v1", None, "gpt", false)
            .unwrap()
            .as_agent();
        let bytes = t.body(false);
        assert!((50_000..80_000).contains(&bytes.len()), "{}", bytes.len());
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["tools"].as_array().unwrap().len(), 16);
        assert_eq!(body["tools"][5]["function"]["name"], "Read");
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 12);
        let call = &messages[10]["tool_calls"][0];
        let arguments: serde_json::Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(arguments["limit"], 120);
        assert_eq!(messages[11]["role"], "tool");
        assert_eq!(messages[11]["tool_call_id"], call["id"]);
        assert!(body.get("stream").is_none());
    }

    #[test]
    fn parses_base_urls_and_refuses_other_hosts() {
        let t = Target::new("http://127.0.0.1:8080/v1/", Some("sk-x"), "m", false).unwrap();
        assert_eq!(t.addr(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.path, "/v1/chat/completions");
        let t = Target::new("http://localhost:9/openai/v1", None, "m", false).unwrap();
        assert_eq!(t.path, "/openai/v1/chat/completions");
        assert!(Target::new("https://127.0.0.1/v1", None, "m", false).is_err());
        assert!(Target::new("http://10.1.2.3/v1", None, "m", false).is_err());
        assert!(Target::new("http://10.1.2.3/v1", None, "m", true).is_ok());
    }

    #[test]
    fn streamed_bodies_ask_for_usage() {
        let body: serde_json::Value = serde_json::from_slice(&chat_body("m", true)).unwrap();
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        let body: serde_json::Value = serde_json::from_slice(&chat_body("m", false)).unwrap();
        assert!(body.get("stream").is_none());
    }
}
