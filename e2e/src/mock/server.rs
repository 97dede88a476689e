//! Serving: the accept loop, connections we can reset, routing, and the `/_mock/` control API.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::MockConfig;
use super::anthropic::{self, AnthropicError, MessagesExchange};
use super::fault::{Fault, FaultSpec, STALL_LIMIT};
use super::openai::{self, ApiError, Meta, Usage};
use super::responses::{self, ResponseUsage};
use super::state::Shared;
use super::stats::{Endpoint, bump};
use super::stream::{self, BoxError, Flavor, StreamPlan};

/// Largest request body the mock reads.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Largest control API body.
const MAX_CONTROL_BODY: usize = 1024 * 1024;

pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Why a connection is closed without a (complete) response.
#[derive(Debug, thiserror::Error)]
enum Abort {
    #[error("connection reset by fault injection")]
    Reset,
    #[error("stalled request released")]
    Stall,
    #[error("request body could not be read")]
    Body,
    /// Over HTTP/2, hyper resets the stream with the reason found among an error's causes.
    #[error("stream reset by fault injection")]
    StreamReset(#[source] h2::Error),
}

/// A TCP stream that, when asked to, closes with a RST instead of a FIN.
struct ResettableStream {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Acquire) {
            // SO_LINGER 0: close() sends a RST, as a crashed or hostile upstream does.
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Binds `addr` with a backlog fit for benchmarks.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves the connections `listener` accepts until shutdown, over TLS when given an acceptor
/// (as a provider's `https://` endpoint; faults apply the same, a reset under TLS too).
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                bump(&shared.counters.connections);
                let shared = Arc::clone(&shared);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    let reset = Arc::new(AtomicBool::new(false));
                    let stream = ResettableStream {
                        stream,
                        reset: Arc::clone(&reset),
                    };
                    match tls {
                        None => serve_connection(stream, reset, shared).await,
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream)
                                if stream.get_ref().1.alpn_protocol() == Some(b"h2")
                                    && shared.faults.take_go_away() =>
                            {
                                bump(&shared.counters.faults_applied);
                                go_away(stream, &shared).await;
                            }
                            Ok(stream) => serve_connection(stream, reset, shared).await,
                            Err(e) => tracing::debug!(error = %e, "mock TLS handshake failed"),
                        },
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::debug!(error = %e, "mock accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve_connection<S>(stream: S, reset: Arc<AtomicBool>, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(stream);
    let shutdown = shared.shutdown.clone();
    let service = service_fn(move |req| handle(Arc::clone(&shared), Arc::clone(&reset), req));
    // HTTP/1.1, or HTTP/2 when the client opens with its preface (after ALPN's `h2`, or with
    // prior knowledge on plain TCP).
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection(io, service);
    tokio::select! {
        result = conn => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "mock connection closed with an error");
            }
        }
        _ = shutdown.cancelled() => {}
    }
}

/// [`Fault::GoAway`] on a new HTTP/2 connection, in raw frames (hyper's server, like the `h2`
/// crate's, counts every stream it has read as processed in its `GOAWAY`): the server's
/// SETTINGS, an ack of the client's, and at the first request's HEADERS a `GOAWAY` with
/// `NO_ERROR` and last stream id 0; then whatever the client sends is read until it closes.
async fn go_away<S>(mut stream: S, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const SETTINGS: u8 = 0x4;
    const HEADERS: u8 = 0x1;
    const GOAWAY: u8 = 0x7;
    const ACK: u8 = 0x1;
    let frame = |kind: u8, flags: u8, payload: &[u8]| {
        let len = u32::try_from(payload.len()).unwrap_or(0).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    };
    let exchange = async {
        let mut preface = [0u8; PREFACE.len()];
        stream.read_exact(&mut preface).await?;
        if preface != PREFACE {
            return Ok(());
        }
        stream.write_all(&frame(SETTINGS, 0, &[])).await?;
        stream.flush().await?;
        let mut sent = false;
        loop {
            let mut head = [0u8; 9];
            if stream.read_exact(&mut head).await.is_err() {
                return Ok(());
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
            let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0)];
            stream.read_exact(&mut payload).await?;
            match head[3] {
                SETTINGS if head[4] & ACK == 0 => {
                    stream.write_all(&frame(SETTINGS, ACK, &[])).await?;
                }
                HEADERS if !sent => {
                    sent = true;
                    bump(&shared.counters.go_aways);
                    // Last stream id 0 (none processed), error code 0 (NO_ERROR).
                    stream.write_all(&frame(GOAWAY, 0, &[0; 8])).await?;
                }
                _ => {}
            }
            stream.flush().await?;
        }
    };
    tokio::select! {
        result = exchange => {
            let result: io::Result<()> = result;
            if let Err(e) = result {
                tracing::debug!(error = %e, "mock GOAWAY connection closed with an error");
            }
        }
        _ = shared.shutdown.cancelled() => {}
    }
}

async fn handle(
    shared: Arc<Shared>,
    reset: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Abort> {
    if req.uri().path().starts_with("/_mock/") {
        return Ok(control(&shared, req).await);
    }
    let response = api(&shared, &reset, req).await?;
    shared.counters.response(response.status().as_u16());
    Ok(response)
}

/// The OpenAI endpoints the mock serves.
enum Route {
    Chat,
    Completion,
    Embeddings,
    ListModels,
    GetModel(String),
    CreateResponse,
    CompactResponse,
    CountResponseTokens,
    GetResponse(String),
    DeleteResponse(String),
    ResponseInputItems(String),
    CancelResponse(String),
    Messages,
    CountTokens,
}

/// The path a request is served as: Azure OpenAI's deployments' layout,
/// `/openai/deployments/<name>/chat/completions?api-version=…`, as `/v1/chat/completions`
/// (Azure answers 404 "Resource not found" without an `api-version`); any other as it is.
fn served_path(uri: &http::Uri) -> Result<std::borrow::Cow<'_, str>, ApiError> {
    let Some(rest) = uri.path().strip_prefix("/openai/deployments/") else {
        return Ok(uri.path().into());
    };
    let has_version = uri
        .query()
        .is_some_and(|q| q.split('&').any(|pair| pair.starts_with("api-version=")));
    match rest.split_once('/') {
        Some((deployment, endpoint)) if has_version && !deployment.is_empty() => {
            Ok(format!("/v1/{endpoint}").into())
        }
        _ => Err(ApiError::resource_not_found()),
    }
}

fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let path_only = path.trim_end_matches('/');
    let (route, allowed) = match path_only {
        "/v1/chat/completions" => (Route::Chat, Method::POST),
        "/v1/completions" => (Route::Completion, Method::POST),
        "/v1/embeddings" => (Route::Embeddings, Method::POST),
        "/v1/models" => (Route::ListModels, Method::GET),
        "/v1/responses" => (Route::CreateResponse, Method::POST),
        "/v1/responses/compact" => (Route::CompactResponse, Method::POST),
        "/v1/responses/input_tokens" => (Route::CountResponseTokens, Method::POST),
        "/v1/messages" => (Route::Messages, Method::POST),
        "/v1/messages/count_tokens" => (Route::CountTokens, Method::POST),
        p => match (
            p.strip_prefix("/v1/models/"),
            p.strip_prefix("/v1/responses/"),
        ) {
            (Some(id), _) if !id.is_empty() => (Route::GetModel(id.to_owned()), Method::GET),
            (_, Some(rest)) if !rest.is_empty() => match rest.split_once('/') {
                None if *method == Method::DELETE => {
                    (Route::DeleteResponse(rest.to_owned()), Method::DELETE)
                }
                None => (Route::GetResponse(rest.to_owned()), Method::GET),
                Some((id, "input_items")) => {
                    (Route::ResponseInputItems(id.to_owned()), Method::GET)
                }
                Some((id, "cancel")) => (Route::CancelResponse(id.to_owned()), Method::POST),
                Some(_) => return Err(ApiError::unknown_url(method, path)),
            },
            _ => return Err(ApiError::unknown_url(method, path)),
        },
    };
    if *method != allowed {
        return Err(ApiError::method_not_allowed(method, path));
    }
    Ok(route)
}

fn endpoint(route: &Result<Route, ApiError>) -> Endpoint {
    match route {
        Ok(Route::Chat) => Endpoint::ChatCompletions,
        Ok(Route::Completion) => Endpoint::Completions,
        Ok(Route::Embeddings) => Endpoint::Embeddings,
        Ok(Route::ListModels | Route::GetModel(_)) => Endpoint::Models,
        Ok(
            Route::CreateResponse
            | Route::CompactResponse
            | Route::CountResponseTokens
            | Route::GetResponse(_)
            | Route::DeleteResponse(_)
            | Route::ResponseInputItems(_)
            | Route::CancelResponse(_),
        ) => Endpoint::Responses,
        Ok(Route::Messages | Route::CountTokens) => Endpoint::Messages,
        Err(_) => Endpoint::Other,
    }
}

/// A request, parsed as far as it goes.
enum Call {
    Generation(Flavor, Result<openai::Generation, ApiError>),
    Embeddings(Result<openai::Embeddings, ApiError>),
    ListModels,
    GetModel(String),
    CreateResponse(Result<(String, responses::CreateRequest), ApiError>),
    CompactResponse(Result<(String, responses::CreateRequest), ApiError>),
    CountResponseTokens(Result<(String, responses::CreateRequest), ApiError>),
    GetResponse(String),
    DeleteResponse(String),
    ResponseInputItems(String, Option<String>),
    CancelResponse(String),
    /// Anthropic's Messages API: the request (or the error its headers or body earned), and
    /// whether it only counts tokens.
    Messages(Result<anthropic::MessagesRequest, AnthropicError>, bool),
}

/// What the mock will answer, before faults decide how it is sent.
enum Answer {
    Json {
        status: StatusCode,
        body: Bytes,
        usage: Option<Usage>,
    },
    Stream(Box<StreamPlan>),
    /// A Responses API stream: its events, fixed in advance, and the usage of its last one.
    Events(Vec<Bytes>, Option<ResponseUsage>),
}

impl From<ApiError> for Answer {
    fn from(e: ApiError) -> Self {
        Answer::Json {
            status: e.status,
            body: e.body(),
            usage: None,
        }
    }
}

async fn api(
    shared: &Arc<Shared>,
    reset: &AtomicBool,
    req: Request<Incoming>,
) -> Result<Response<Body>, Abort> {
    let route = served_path(req.uri()).and_then(|path| route(req.method(), &path));
    shared.counters.request(endpoint(&route));
    let http2 = req.version() == http::Version::HTTP_2;
    if http2 {
        bump(&shared.counters.http2_requests);
    }
    let route = match route {
        Ok(r) => r,
        Err(e) => return Ok(json_response(shared, e.status, e.body())),
    };
    let query = req.uri().query().map(str::to_owned);
    let responses_route = matches!(
        route,
        Route::CreateResponse
            | Route::CompactResponse
            | Route::CountResponseTokens
            | Route::GetResponse(_)
            | Route::DeleteResponse(_)
            | Route::ResponseInputItems(..)
            | Route::CancelResponse(_)
    );
    let exchange =
        (matches!(route, Route::Messages | Route::CountTokens) || responses_route).then(|| {
            MessagesExchange {
                path: req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned()),
                headers: req
                    .headers()
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
                ..MessagesExchange::default()
            }
        });
    let version = req
        .headers()
        .get("anthropic-version")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let exchange = match exchange {
        Some(exchange) if responses_route => {
            if let Ok(mut last) = shared.last_responses.lock() {
                *last = Some(exchange);
            }
            None
        }
        exchange => exchange,
    };
    let anthropic_headers = matches!(route, Route::Messages | Route::CountTokens).then(|| {
        anthropic::check_headers(
            req.headers(),
            shared.config.api_key.as_deref(),
            shared.config.key_header.as_deref(),
        )
    });
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).to_owned())
        .unwrap_or_default();
    let authorized = match (&shared.expected_auth, &shared.config.key_header) {
        (None, _) => Ok(()),
        (Some(_), Some(name)) => {
            let got = req.headers().get(name.as_str()).map(|v| {
                let v = v.as_bytes();
                match name.as_str() {
                    "authorization" => v.strip_prefix(b"Bearer ").unwrap_or(v),
                    _ => v,
                }
            });
            match (got, &shared.config.api_key) {
                (Some(got), Some(expected)) if got == expected.as_bytes() => Ok(()),
                (got, _) => Err(ApiError::invalid_api_key(got.is_some())),
            }
        }
        (Some(expected), None) => match req.headers().get(header::AUTHORIZATION) {
            Some(got) if got.as_bytes() == expected.as_bytes() => Ok(()),
            got => Err(ApiError::invalid_api_key(got.is_some())),
        },
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            let e = ApiError::too_large(MAX_BODY);
            return Ok(json_response(shared, e.status, e.body()));
        }
        Err(_) => return Err(Abort::Body),
    };
    let mut headers_refused = false;
    let call = match route {
        Route::Chat | Route::Completion => {
            let (flavor, parsed) = match route {
                Route::Chat => (Flavor::Chat, openai::parse_chat(&body)),
                _ => (Flavor::Completion, openai::parse_completion(&body)),
            };
            if let Some(m) = &parsed.model {
                shared.counters.model(m);
            }
            let request = match parsed.request {
                Ok(_) if shared.config.refuses_stream_options && has_stream_options(&body) => {
                    Err(ApiError::extra_forbidden("stream_options"))
                }
                request => request,
            };
            Call::Generation(flavor, request)
        }
        Route::Embeddings => {
            let parsed = openai::parse_embeddings(&body);
            if let Some(m) = &parsed.model {
                shared.counters.model(m);
            }
            Call::Embeddings(parsed.request)
        }
        Route::ListModels => Call::ListModels,
        Route::GetModel(id) => Call::GetModel(id),
        Route::CreateResponse => {
            let parsed = responses::parse_create(&body);
            if let Some(m) = &parsed.model {
                shared.counters.model(m);
            }
            Call::CreateResponse(parsed.request)
        }
        Route::CompactResponse | Route::CountResponseTokens => {
            let parsed = responses::parse_create(&body);
            if let Some(m) = &parsed.model {
                shared.counters.model(m);
            }
            match route {
                Route::CompactResponse => Call::CompactResponse(parsed.request),
                _ => Call::CountResponseTokens(parsed.request),
            }
        }
        Route::GetResponse(id) => Call::GetResponse(id),
        Route::DeleteResponse(id) => Call::DeleteResponse(id),
        Route::ResponseInputItems(id) => Call::ResponseInputItems(id, query),
        Route::CancelResponse(id) => Call::CancelResponse(id),
        Route::Messages | Route::CountTokens => {
            if let Some(mut exchange) = exchange {
                exchange.body = String::from_utf8_lossy(&body).into_owned();
                shared.messages_request(exchange);
            }
            let count_only = matches!(route, Route::CountTokens);
            let (model, parsed) = anthropic::parse(&body, count_only, version.as_deref());
            if let Some(m) = &model {
                shared.counters.model(m);
            }
            let checked = match anthropic_headers {
                Some(Err(e)) => {
                    headers_refused = true;
                    Err(e)
                }
                _ => parsed,
            };
            Call::Messages(checked, count_only)
        }
    };
    let anthropic_route = matches!(call, Call::Messages(..));

    // A provider checks the key (and Anthropic its headers) before anything else: a request
    // it refuses meets no fault, and leaves the faults planned for the next one.
    let refused = match anthropic_route {
        true => headers_refused,
        false => authorized.is_err(),
    };
    let fault = match refused {
        true => None,
        false => shared.faults.take(openai::model_only(&body).as_deref()),
    };
    if fault.is_some() {
        bump(&shared.counters.faults_applied);
    }
    match fault {
        Some(Fault::StreamReset(code)) if http2 => {
            bump(&shared.counters.stream_resets);
            return Err(Abort::StreamReset(h2::Reason::from(code).into()));
        }
        Some(Fault::Reset | Fault::StreamReset(_) | Fault::GoAway) => {
            bump(&shared.counters.resets);
            reset.store(true, Ordering::Release);
            return Err(Abort::Reset);
        }
        Some(Fault::Stall) => {
            bump(&shared.counters.stalls);
            // Ends early when the client hangs up: hyper then drops this future.
            tokio::select! {
                _ = shared.shutdown.cancelled() => {}
                _ = tokio::time::sleep(STALL_LIMIT) => {}
            }
            return Err(Abort::Stall);
        }
        Some(Fault::DelayMs(ms)) => tokio::time::sleep(Duration::from_millis(ms)).await,
        _ => {}
    }
    if !shared.config.latency.is_zero() {
        tokio::time::sleep(shared.config.latency).await;
    }
    match fault {
        Some(Fault::Status { code, retry_after }) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = if anthropic_route {
                AnthropicError::for_status(status).body()
            } else {
                ApiError::for_status(status).body()
            };
            let mut response = json_response(shared, status, body);
            if let Some(ra) = retry_after {
                let headers = response.headers_mut();
                if let Some(secs) = ra.seconds {
                    let value = if ra.as_http_date {
                        httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(secs))
                    } else {
                        secs.to_string()
                    };
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        headers.insert(header::RETRY_AFTER, v);
                    }
                }
                if let Some(ms) = ra.millis {
                    headers.insert("retry-after-ms", HeaderValue::from(ms));
                }
            }
            return Ok(response);
        }
        Some(Fault::EchoKey { code }) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::UNAUTHORIZED);
            let error = ApiError::echoing_key(status, &presented);
            return Ok(json_response(shared, status, error.body()));
        }
        Some(Fault::RequestTooLarge) => {
            let error = ApiError::request_too_large();
            return Ok(json_response(shared, error.status, error.body()));
        }
        Some(Fault::OutOfCredit) => {
            let body = serde_json::json!({"type": "error", "error": {
                "type": "invalid_request_error",
                "message": "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
            }});
            return Ok(json_response(
                shared,
                StatusCode::BAD_REQUEST,
                Bytes::from(body.to_string()),
            ));
        }
        Some(Fault::ModelAccessDenied) => {
            let model = openai::model_only(&body).unwrap_or_default();
            let error = ApiError::model_access_denied(&model);
            return Ok(json_response(shared, error.status, error.body()));
        }
        Some(Fault::Body { code, body }) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = json_response(shared, status, Bytes::from(body.clone()));
            if body.starts_with("data:") || body.starts_with("event:") {
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
            }
            return Ok(response);
        }
        Some(Fault::Trickle { code, every_ms }) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let every = Duration::from_millis(every_ms.max(1));
            let spaces = futures::stream::unfold((), move |()| async move {
                tokio::time::sleep(every).await;
                Some((Ok(hyper::body::Frame::data(Bytes::from_static(b" "))), ()))
            });
            let body = BodyExt::boxed_unsync(StreamBody::new(Box::pin(spaces)));
            return Ok(with_headers(shared, status, "application/json", body));
        }
        Some(Fault::Page { code }) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
            let page = "<!DOCTYPE html><html><head><title>Sign in</title></head>\
                        <body><p>Please log in to continue.</p></body></html>";
            let mut response = with_headers(
                shared,
                status,
                "text/html; charset=utf-8",
                full(Bytes::from_static(page.as_bytes())),
            );
            if status.is_redirection() {
                response.headers_mut().insert(
                    header::LOCATION,
                    HeaderValue::from_static("https://llm.example/v1/chat/completions?key=k"),
                );
            }
            return Ok(response);
        }
        Some(Fault::Unaffordable) => {
            let body = serde_json::json!({"error": {
                "code": 402,
                "message": "This request requires more credits, or fewer max_tokens. You requested up to 4096 tokens, but can only afford 1000. To increase, visit https://openrouter.ai/settings/credits and upgrade to a paid account",
            }});
            return Ok(json_response(
                shared,
                StatusCode::PAYMENT_REQUIRED,
                Bytes::from(body.to_string()),
            ));
        }
        Some(Fault::KeyInvalid) => {
            let body = serde_json::json!([{"error": {
                "code": 400,
                "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT",
                "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                }],
            }}]);
            return Ok(json_response(
                shared,
                StatusCode::BAD_REQUEST,
                Bytes::from(body.to_string()),
            ));
        }
        Some(Fault::XaiKeyInvalid) => {
            let shown = |chars: &mut dyn Iterator<Item = char>| chars.take(2).collect::<String>();
            let last: String = shown(&mut presented.chars().rev()).chars().rev().collect();
            let body = serde_json::json!({
                "code": "Client specified an invalid argument",
                "error": format!(
                    "Incorrect API key provided: {}***{last}. You can obtain an API key from https://console.x.ai.",
                    shown(&mut presented.chars()),
                ),
            });
            return Ok(json_response(
                shared,
                StatusCode::BAD_REQUEST,
                Bytes::from(body.to_string()),
            ));
        }
        Some(Fault::Garbage(kind)) => {
            let (content_type, body) = stream::garbage(kind);
            let body = BodyExt::boxed_unsync(StreamBody::new(body));
            return Ok(with_headers(shared, StatusCode::OK, content_type, body));
        }
        _ => {}
    }

    let answer = match authorized {
        Err(e) if !anthropic_route => e.into(),
        _ => answer(shared, call),
    };
    let cut = match fault {
        Some(Fault::CutAfterChunks(k)) => Some(k),
        _ => None,
    };
    Ok(match answer {
        Answer::Json {
            status,
            body,
            usage,
        } => match cut {
            None => {
                if let Some(Fault::QueuedMs(ms) | Fault::ThinkingMs(ms)) = fault {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                if let Some(u) = usage {
                    shared.counters.usage(u.prompt_tokens, u.completion_tokens);
                    shared.counters.detail(u.cached_tokens, u.reasoning_tokens);
                }
                json_response(shared, status, body)
            }
            Some(_) => {
                let len = body.len();
                let body = BodyExt::boxed_unsync(StreamBody::new(stream::cut_in_half(body)));
                let mut response = with_headers(shared, status, "application/json", body);
                response
                    .headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                response
            }
        },
        Answer::Stream(mut plan) => {
            plan.cut_after = cut;
            match fault {
                Some(Fault::QueuedMs(ms)) => plan.queued_for = Duration::from_millis(ms),
                Some(Fault::ThinkingMs(ms)) => plan.thinking_for = Duration::from_millis(ms),
                _ => {}
            }
            bump(&shared.counters.streams_started);
            let body =
                BodyExt::boxed_unsync(StreamBody::new(stream::sse(*plan, Arc::clone(shared))));
            sse_response(shared, body)
        }
        Answer::Events(mut events, _) if anthropic_route && cut.is_some() => {
            // Anthropic ends a stream that fails midway with an `error` event.
            events.truncate(cut.unwrap_or(0));
            events.push(
                AnthropicError::for_status(
                    StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                )
                .event(),
            );
            bump(&shared.counters.streams_started);
            let body = stream::events(events, None, None, Arc::clone(shared));
            sse_response(shared, BodyExt::boxed_unsync(StreamBody::new(body)))
        }
        Answer::Events(events, usage) => {
            bump(&shared.counters.streams_started);
            let body = stream::events(events, usage, cut, Arc::clone(shared));
            sse_response(shared, BodyExt::boxed_unsync(StreamBody::new(body)))
        }
    })
}

fn sse_response(shared: &Shared, body: Body) -> Response<Body> {
    let mut response = with_headers(
        shared,
        StatusCode::OK,
        "text/event-stream; charset=utf-8",
        body,
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn check_model(config: &MockConfig, model: &str) -> Result<(), ApiError> {
    if config.models.is_empty() || config.models.iter().any(|m| m == model) {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model))
    }
}

fn answer(shared: &Arc<Shared>, call: Call) -> Answer {
    let config = &shared.config;
    let result = match call {
        Call::Generation(flavor, request) => request.and_then(|g| {
            check_model(config, &g.model)?;
            Ok(generation(shared, flavor, g))
        }),
        Call::Embeddings(request) => request.and_then(|e| {
            check_model(config, &e.model)?;
            let (body, tokens) = openai::embeddings_json(&e, config.embedding_dims);
            Ok(Answer::Json {
                status: StatusCode::OK,
                body,
                usage: Some(Usage::new(tokens, 0)),
            })
        }),
        Call::ListModels => Ok(Answer::Json {
            status: StatusCode::OK,
            body: openai::models_json(&config.models),
            usage: None,
        }),
        Call::GetModel(id) => check_model(config, &id).map(|()| Answer::Json {
            status: StatusCode::OK,
            body: openai::json_bytes(&openai::model_json(&id)),
            usage: None,
        }),
        Call::CreateResponse(request) => request.and_then(|(model, r)| {
            check_model(config, &model)?;
            let created = shared
                .responses
                .create(config, &model, &r, || shared.next_id())?;
            Ok(if created.stream {
                Answer::Events(created.events, created.usage)
            } else {
                Answer::Json {
                    status: StatusCode::OK,
                    body: created.response,
                    usage: created.usage.map(Usage::from),
                }
            })
        }),
        Call::CompactResponse(request) => request.and_then(|(model, r)| {
            check_model(config, &model)?;
            let (body, usage) = shared.responses.compact(&r, || shared.next_id())?;
            Ok(Answer::Json {
                status: StatusCode::OK,
                body,
                usage: Some(Usage::from(usage)),
            })
        }),
        Call::CountResponseTokens(request) => request.and_then(|(model, r)| {
            check_model(config, &model)?;
            shared.responses.input_tokens(&r).map(ok_json)
        }),
        Call::GetResponse(id) => shared.responses.retrieve(&id).map(ok_json),
        Call::DeleteResponse(id) => shared.responses.delete(&id).map(ok_json),
        Call::ResponseInputItems(id, query) => shared
            .responses
            .input_items(&id, query.as_deref())
            .map(ok_json),
        Call::CancelResponse(id) => shared.responses.cancel(&id).map(ok_json),
        Call::Messages(request, count_only) => {
            return match request.and_then(|r| {
                if config.models.is_empty() || config.models.contains(&r.model) {
                    Ok(r)
                } else {
                    Err(AnthropicError::not_found_model(&r.model))
                }
            }) {
                Err(e) => {
                    let body = e.body();
                    shared.messages_answer(std::slice::from_ref(&body));
                    Answer::Json {
                        status: e.status,
                        body,
                        usage: None,
                    }
                }
                Ok(r) if count_only => {
                    let body = anthropic::count_tokens_json(&r);
                    shared.messages_answer(std::slice::from_ref(&body));
                    ok_json(body)
                }
                Ok(r) => {
                    let cache_read = r
                        .cache_prefix
                        .as_ref()
                        .map_or(0, |prefix| shared.prompt_cache_read(prefix));
                    let (body, events, usage) =
                        anthropic::answer(&config.name, shared.next_id(), config, &r, cache_read);
                    if r.stream {
                        shared.messages_answer(&events);
                    } else {
                        shared.messages_answer(std::slice::from_ref(&body));
                    }
                    if r.stream {
                        Answer::Events(
                            events,
                            Some(ResponseUsage {
                                input: usage.input,
                                cached: usage.cache_read,
                                output: usage.output,
                                ..ResponseUsage::default()
                            }),
                        )
                    } else {
                        Answer::Json {
                            status: StatusCode::OK,
                            body,
                            usage: Some(Usage {
                                cached_tokens: usage.cache_read,
                                ..Usage::new(usage.input, usage.output)
                            }),
                        }
                    }
                }
            };
        }
    };
    result.unwrap_or_else(Answer::from)
}

fn ok_json(body: Bytes) -> Answer {
    Answer::Json {
        status: StatusCode::OK,
        body,
        usage: None,
    }
}

fn generation(shared: &Shared, flavor: Flavor, g: openai::Generation) -> Answer {
    let config = &shared.config;
    let mut tokens = config.chunk_count as u64;
    let mut finish_reason = "stop";
    if let Some(max) = g.max_tokens
        && max > 0
        && max < tokens
    {
        tokens = max;
        finish_reason = "length";
    }
    let (cached, written) = shared.chat_cache_read(&g.cache_prefixes);
    // Reported where the cache was looked in, as OpenAI's prompt cache keys.
    let cache_write = (!g.cache_prefixes.is_empty()).then_some(written);
    let reasoning = match g.reasons {
        true => config.chunk_count as u64 * u64::from(g.n),
        false => 0,
    };
    let words = tokens * u64::from(g.n);
    let spoken = match g.speaks {
        true => words * openai::AUDIO_TOKENS_PER_WORD,
        false => 0,
    };
    let usage = Usage {
        cached_tokens: cached,
        cache_write_tokens: cache_write,
        reasoning_tokens: reasoning,
        audio_prompt_tokens: g.audio_prompt_tokens,
        audio_completion_tokens: spoken,
        ..Usage::new(g.prompt_tokens, words + spoken + reasoning)
    };
    let prefix = match flavor {
        Flavor::Chat => "chatcmpl",
        Flavor::Completion => "cmpl",
    };
    let id = format!("{prefix}-mock{:016x}", shared.next_id());
    let created = openai::now_secs();
    if let Some((name, arguments)) = &g.tool_call {
        let meta = Meta {
            id: &id,
            created,
            model: &g.model,
            service_tier: config.serves(g.service_tier),
        };
        // The same details as a text answer's.
        let reasoning = config.chunk_count as u64 * u64::from(g.reasons);
        let usage = Usage {
            cached_tokens: cached,
            cache_write_tokens: cache_write,
            reasoning_tokens: reasoning,
            audio_prompt_tokens: g.audio_prompt_tokens,
            ..Usage::new(
                g.prompt_tokens,
                config.chunk_count.max(1) as u64 + reasoning,
            )
        };
        let (whole, events) = openai::tool_call_answer(
            meta,
            name,
            arguments,
            usage,
            g.include_usage,
            g.obfuscate && !config.refuses_stream_options,
            config.tool_call_pieces,
        );
        return if g.stream {
            let counted = g.include_usage.then_some(ResponseUsage {
                input: usage.prompt_tokens,
                cached: usage.cached_tokens,
                cache_write: usage.cache_write_tokens.unwrap_or(0),
                output: usage.completion_tokens,
                reasoning: usage.reasoning_tokens,
            });
            Answer::Events(events, counted)
        } else {
            Answer::Json {
                status: StatusCode::OK,
                body: whole,
                usage: Some(usage),
            }
        };
    }
    if g.stream {
        return Answer::Stream(Box::new(StreamPlan {
            flavor,
            id,
            created,
            model: g.model,
            n: g.n,
            tokens: usize::try_from(tokens).unwrap_or(0),
            finish_reason,
            usage: g.include_usage.then_some(usage),
            last_chunk_usage: config.refuses_stream_options.then_some(usage),
            // Mistral's streams (the mock's other flavour) carry none.
            obfuscate: g.obfuscate && !config.refuses_stream_options,
            interval: config.chunk_interval,
            cut_after: None,
            queued_for: Duration::ZERO,
            thinking_for: Duration::ZERO,
            service_tier: config.serves(g.service_tier),
        }));
    }
    let meta = Meta {
        id: &id,
        created,
        model: &g.model,
        service_tier: config.serves(g.service_tier),
    };
    let text = openai::full_text(&config.name, tokens);
    let body = match flavor {
        Flavor::Chat => openai::chat_json(meta, g.n, &text, finish_reason, usage),
        Flavor::Completion => openai::completion_json(meta, g.n, &text, finish_reason, usage),
    };
    Answer::Json {
        status: StatusCode::OK,
        body,
        usage: Some(usage),
    }
}

/// Whether a request body has a top-level `stream_options` member.
fn has_stream_options(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body)
        .is_ok_and(|object| object.contains_key("stream_options"))
}

fn full(body: Bytes) -> Body {
    Full::new(body)
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn with_headers(
    shared: &Shared,
    status: StatusCode,
    content_type: &'static str,
    body: Body,
) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(name) = &shared.name_header {
        headers.insert("x-mock-name", name.clone());
    }
    if let Ok(v) = HeaderValue::from_str(&format!("req_mock{:016x}", shared.next_id())) {
        headers.insert("x-request-id", v);
    }
    response
}

fn json_response(shared: &Shared, status: StatusCode, body: Bytes) -> Response<Body> {
    with_headers(shared, status, "application/json", full(body))
}

/// `POST /_mock/faults` accepts one spec or a list (tried in order).
#[derive(Deserialize)]
#[serde(untagged)]
enum FaultsBody {
    One(FaultSpec),
    Many(Vec<FaultSpec>),
}

fn control_json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn control_error(status: StatusCode, message: String) -> Response<Body> {
    control_json(
        status,
        &serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}}),
    )
}

fn no_content() -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

async fn control(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().trim_end_matches('/').to_owned();
    match (&method, path.as_str()) {
        (&Method::GET, "/_mock/stats") => control_json(StatusCode::OK, &shared.counters.snapshot()),
        (&Method::POST, "/_mock/reset") => {
            shared.counters.reset();
            no_content()
        }
        (&Method::GET, "/_mock/faults") => control_json(StatusCode::OK, &shared.faults.status()),
        (&Method::GET, "/_mock/last_messages") => {
            let last = shared.last_messages.lock().ok().and_then(|l| l.clone());
            control_json(StatusCode::OK, &last)
        }
        (&Method::DELETE, "/_mock/faults") => {
            shared.faults.clear();
            no_content()
        }
        (&Method::POST, "/_mock/faults") => {
            let body = match Limited::new(req.into_body(), MAX_CONTROL_BODY)
                .collect()
                .await
            {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    return control_error(StatusCode::BAD_REQUEST, format!("unreadable body: {e}"));
                }
            };
            let specs = match serde_json::from_slice::<FaultsBody>(&body) {
                Ok(FaultsBody::One(spec)) => vec![spec],
                Ok(FaultsBody::Many(specs)) => specs,
                Err(e) => {
                    return control_error(
                        StatusCode::BAD_REQUEST,
                        format!("not a fault spec: {e}"),
                    );
                }
            };
            if let Some(code) = specs.iter().find_map(|s| match s.fault {
                Fault::Status { code, .. }
                | Fault::EchoKey { code }
                | Fault::Page { code }
                | Fault::Trickle { code, .. }
                    if !(200..=599).contains(&code) =>
                {
                    Some(code)
                }
                _ => None,
            }) {
                return control_error(
                    StatusCode::BAD_REQUEST,
                    format!("status {code} is not between 200 and 599"),
                );
            }
            shared.faults.set(specs);
            control_json(StatusCode::OK, &shared.faults.status())
        }
        _ => control_error(
            StatusCode::NOT_FOUND,
            format!("no control endpoint {method} {path}"),
        ),
    }
}
