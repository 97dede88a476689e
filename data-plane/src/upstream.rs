//! The HTTP client for upstream providers. Plain `http://` upstreams reached directly go over
//! the serving thread's own keep-alive HTTP/1 connections ([`pool`], which says why); every
//! other call (`https://`, which may speak HTTP/2, and whatever an egress proxy intercepts)
//! goes through one hyper-util pooled client, direct or through the egress proxy the
//! environment names.
//!
//! It is hyper-util's client with a rustls connector rather than reqwest, because this is the
//! hot path and needs none of reqwest's extras: every request reqwest sends is parsed from a
//! `Url` into a `Uri` again (IDNA host processing included), wrapped in redirect and retry
//! layers and given default headers. Here the upstream URIs are built once per snapshot and
//! cloning one only bumps reference counts; at 3,000 req/s that took the data plane's worker
//! CPU per request from about 250 to 177 µs.
//!
//! Egress proxies follow the variables other tools on the host read (`HTTPS_PROXY`,
//! `HTTP_PROXY`, `ALL_PROXY`, in either case, with `NO_PROXY` for exceptions), as
//! hyper-util's proxy matcher reads them. An `https://` upstream is reached through a
//! `CONNECT` tunnel, then TLS to the upstream inside it; an `http://` upstream gets its
//! request in absolute form on a connection to the proxy. Credentials in the proxy's URL
//! (`http://user:password@proxy:3128`) go in `Proxy-Authorization`, on the `CONNECT` or on
//! each forwarded request.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::TryFutureExt as _;
use futures::future::Either;
use http::uri::Scheme;
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;

mod pool;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The environment variables that name an egress proxy (the proxy matcher reads the same).
const PROXY_VARIABLES: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Pooled keep-alive connections to every backend: HTTP/1 connections kept per serving thread
/// for plain `http://` ones reached directly, hyper-util's pool for the others (HTTP/2 when a
/// TLS server offers it through ALPN). It never follows redirects (a provider redirect would
/// leak the key to another host).
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    client: Client<UpstreamConnector, Full<Bytes>>,
    /// What [`pool`] connects with: plain `http://` upstreams reached directly.
    http: HttpConnector,
    /// The most a new connection may take, from the name's lookup to its last handshake.
    connect_timeout: Duration,
    /// Set when the environment names an egress proxy.
    egress: Option<Arc<Egress>>,
}

/// The body of an upstream answer.
pub type UpstreamBody = Incoming;

/// How upstream TLS connections are made: which roots are trusted and whether HTTP/2 is
/// offered. The same for the whole process.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTls {
    /// Trusted besides the bundled Mozilla roots (`--upstream-ca`).
    pub extra_roots: Arc<[CertificateDer<'static>]>,
    /// Offer HTTP/2 through ALPN (`--upstream-http2`).
    pub http2: bool,
}

impl UpstreamTls {
    /// Reads the extra roots from the PEM file at `path`: at least one certificate, each one
    /// rustls can use as a root.
    pub fn with_roots_from(mut self, path: &std::path::Path) -> Result<Self, String> {
        let shown = path.display();
        let roots = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read --upstream-ca {shown}: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cannot read --upstream-ca {shown}: {e}"))?;
        if roots.is_empty() {
            return Err(format!("--upstream-ca {shown} holds no PEM certificate"));
        }
        let mut store = RootCertStore::empty();
        for root in &roots {
            store
                .add(root.clone())
                .map_err(|e| format!("--upstream-ca {shown}: not a usable CA certificate: {e}"))?;
        }
        self.extra_roots = roots.into();
        Ok(self)
    }

    /// The bundled roots and the extra ones.
    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        // Each was checked when read.
        roots.add_parsable_certificates(self.extra_roots.iter().cloned());
        roots
    }
}

impl UpstreamClient {
    /// A new client whose connection attempts give up after `connect_timeout`; through an
    /// egress proxy when the environment names one.
    pub fn new(connect_timeout: Duration, tls: &UpstreamTls) -> Result<Self, String> {
        let proxies = egress_proxy_from_env().then(Matcher::from_env);
        Self::with_proxies(connect_timeout, tls, proxies)
    }

    /// A new client that sends what `proxies` intercepts through the proxy it names, and the
    /// rest directly.
    pub fn with_proxies(
        connect_timeout: Duration,
        tls: &UpstreamTls,
        proxies: Option<Matcher>,
    ) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(tls.roots());
        let tls_config = |alpn: &[&[u8]]| -> Result<Arc<ClientConfig>, String> {
            let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(Arc::clone(&roots))
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        let mut http = HttpConnector::new();
        // The connector also serves `https://` URIs: TLS is layered on top of it.
        http.enforce_http(false);
        http.set_nodelay(true);
        // A peer gone without a word (a node lost, a NAT's state dropped) is found out in
        // about a minute of idleness, not the kernel's default quarter of an hour.
        http.set_keepalive(Some(Duration::from_secs(30)));
        http.set_keepalive_interval(Some(Duration::from_secs(10)));
        http.set_keepalive_retries(Some(3));
        // TCP's own connect; the whole of connecting is bounded by the connector below.
        http.set_connect_timeout(Some(connect_timeout));
        let upstream_tls = tls_config(if tls.http2 {
            &[b"h2", b"http/1.1"]
        } else {
            &[b"http/1.1"]
        })?;
        let egress = match proxies {
            Some(matcher) => Some(Arc::new(Egress {
                matcher,
                http: http.clone(),
                // HTTP/1.1 to the proxy itself: requests to it are in absolute form.
                proxy_tls: tls_config(&[b"http/1.1"])?,
                upstream_tls: Arc::clone(&upstream_tls),
            })),
            None => None,
        };
        let connector = UpstreamConnector {
            direct: HttpsConnector::from((http.clone(), upstream_tls)),
            egress: egress.clone(),
            connect_timeout,
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(pool::IDLE_TIMEOUT)
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            // An HTTP/2 connection that stops answering (black-holed) is closed when a ping
            // goes unanswered, rather than taking every request of its thread until each
            // times out. Pinged after a minute without a frame, while a request waits on it:
            // servers that enforce gRPC's ping policy take more frequent pings without data
            // as abuse (GOAWAY "too_many_pings").
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(Some(Duration::from_secs(60)))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .build(connector);
        Ok(Self {
            client,
            http,
            connect_timeout,
            egress,
        })
    }

    /// Sends `request` and returns the answer once its head has arrived. `host` is the
    /// request's [`host_header`], if it was made ahead.
    ///
    /// Not an `async fn`: the checks and the pool's look for a kept connection are done
    /// before the future is made, so the future (part of every request's future, moved with
    /// it) holds only what is still to come, not the request besides.
    pub fn send<'a>(
        &'a self,
        mut request: Request<Bytes>,
        host: Option<&HeaderValue>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, BoxError>> + Send + use<'a> {
        let forwarded = match &self.egress {
            Some(egress) => egress.authorize_forwarded(&mut request),
            None => false,
        };
        let direct_http = !forwarded && request.uri().scheme() == Some(&Scheme::HTTP);
        // This thread's pool writes no `Host` of its own.
        let made = match host {
            None if direct_http => host_header(request.uri()),
            _ => None,
        };
        let host = host.or(made.as_ref());
        if let Some(host) = host {
            // Where hyper-util would add it: last.
            request
                .headers_mut()
                .entry(header::HOST)
                .or_insert_with(|| host.clone());
        }
        let request = request.map(Full::new);
        if direct_http && host.is_some() {
            Either::Left(pool::send(&self.http, self.connect_timeout, request))
        } else {
            Either::Right(self.client.request(request).err_into())
        }
    }
}

/// An upstream call's error and its causes, for logs (hyper's top-level message alone is
/// vague).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `e` and its causes, [`pool::NotSent`]'s own error included (its `source` skips it, so
/// that [`error_chain`] names it once).
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| match e.downcast_ref::<pool::NotSent>() {
        Some(not_sent) => Some(not_sent.0.as_ref() as &(dyn std::error::Error + 'static)),
        None => e.source(),
    })
}

/// Whether `e` (an upstream call's error) came before its request was written: the
/// connection (or its TLS, or a proxy's tunnel) could not be made, or closed before the
/// request went out. Any other error, a connection that broke while the request was written
/// or its answer awaited, may come after the provider took the request: it may be
/// generating it, and bill it.
///
/// Never sent too, by HTTP's own word: a request hyper cancelled before writing it (its
/// connection closed first), and an HTTP/2 stream the server refused unprocessed
/// (`REFUSED_STREAM`) or left out of a graceful `GOAWAY` (as nginx, Envoy and Go servers send
/// when they recycle a connection).
pub fn never_sent(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e).any(|e| {
        e.is::<pool::NotSent>()
            || e.downcast_ref::<hyper_util::client::legacy::Error>()
                .is_some_and(hyper_util::client::legacy::Error::is_connect)
            || e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_canceled)
            || e.downcast_ref::<h2::Error>().is_some_and(|e| {
                e.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || (e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR))
            })
    })
}

/// Whether `e` (an upstream call's error) is this process running out of file descriptors:
/// an `EMFILE` or `ENFILE` anywhere in its chain of causes.
pub fn out_of_files(e: &(dyn std::error::Error + 'static)) -> bool {
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    causes(e).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|code| code == EMFILE || code == ENFILE)
    })
}

/// The `Host` header hyper-util's client writes into an HTTP/1 request to `uri` (`host`, or
/// `host:port` when the port is not the scheme's default), for a plain `http://` upstream:
/// made once per backend and passed to [`UpstreamClient::send`], it saves formatting and
/// allocating it at each request (about 900 instructions); the thread's [`pool`] writes no
/// `Host` of its own, so `send` makes it when none was made ahead. Not for `https://`: such a
/// connection may speak HTTP/2, which carries the authority instead, and only the client knows
/// which connection a request gets.
pub fn host_header(uri: &Uri) -> Option<HeaderValue> {
    if uri.scheme() != Some(&Scheme::HTTP) {
        return None;
    }
    let host = uri.host()?;
    match uri.port().filter(|port| port.as_u16() != 80) {
        Some(port) => HeaderValue::from_str(&format!("{host}:{port}")).ok(),
        None => HeaderValue::from_str(host).ok(),
    }
}

/// Whether the environment names an egress proxy for upstream calls.
pub fn egress_proxy_from_env() -> bool {
    egress_proxy_configured(|name| std::env::var_os(name))
}

/// Why the environment's proxy variables cannot be used as they are, if they cannot: a proxy
/// the matcher would use for `https://` or `http://` calls whose value is no URL or names no
/// HTTP(S) proxy (SOCKS), or a CGI environment (`REQUEST_METHOD`), in which the matcher
/// ignores them all. Taken as they are, calls would fail as every backend's connect errors,
/// or go direct while the start line says they go through the proxy. Judged as the matcher
/// reads them: for each scheme the first of its two variables that is set (upper case
/// first; an empty one says no proxy for that scheme, and then `ALL_PROXY`'s applies), so
/// an `ALL_PROXY` both scheme variables override is never used, and not judged. Names the
/// variable, never its value (it may carry credentials).
pub fn unusable_proxy_env() -> Option<String> {
    unusable_proxy_settings(|name| std::env::var_os(name))
}

fn unusable_proxy_settings(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<String> {
    if !egress_proxy_configured(&var) {
        return None;
    }
    if var("REQUEST_METHOD").is_some() {
        return Some(
            "REQUEST_METHOD is set (a CGI environment), in which the proxy variables are ignored: unset it"
                .to_owned(),
        );
    }
    // The first of a pair that is set, as the matcher takes it: set, even empty, it wins.
    let first = |pair: &[&'static str]| {
        pair.iter()
            .find_map(|name| Some((*name, var(name)?)))
            .filter(|(_, value)| !value.is_empty())
    };
    let (https, http, all) = (
        first(&PROXY_VARIABLES[0..2]),
        first(&PROXY_VARIABLES[2..4]),
        first(&PROXY_VARIABLES[4..6]),
    );
    let all = all.filter(|_| https.is_none() || http.is_none());
    [https, http, all]
        .into_iter()
        .flatten()
        .find_map(|(name, value)| {
            let unusable = match value.to_str().map(str::parse::<http::Uri>) {
                Some(Ok(uri)) if uri.authority().is_some() => match uri.scheme_str() {
                    None | Some("http" | "https") => return None,
                    Some(scheme) => format!(
                        "names a {scheme} proxy; only http:// and https:// proxies are supported"
                    ),
                },
                _ => "is not a proxy URL (http://host:port; a trailing newline or a space?)"
                    .to_owned(),
            };
            Some(format!("{name} {unusable}"))
        })
}

fn egress_proxy_configured(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    PROXY_VARIABLES
        .iter()
        .any(|name| var(name).is_some_and(|value| !value.is_empty()))
}

/// Which destinations go through which proxy, and how to reach a proxy.
struct Egress {
    matcher: Matcher,
    http: HttpConnector,
    proxy_tls: Arc<ClientConfig>,
    upstream_tls: Arc<ClientConfig>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The matcher's proxies may carry credentials.
        f.debug_struct("Egress").finish_non_exhaustive()
    }
}

impl Egress {
    /// A request to an `http://` upstream goes to the proxy in absolute form, carrying the
    /// proxy's credentials itself (an `https://` one carries them on its tunnel's `CONNECT`).
    /// Whether the request is such a forwarded one.
    fn authorize_forwarded(&self, request: &mut Request<Bytes>) -> bool {
        if request.uri().scheme() != Some(&Scheme::HTTP) {
            return false;
        }
        let Some(proxy) = self.matcher.intercept(request.uri()) else {
            return false;
        };
        if let Some(auth) = proxy.basic_auth() {
            request
                .headers_mut()
                .insert(header::PROXY_AUTHORIZATION, auth.clone());
        }
        true
    }

    /// A connection to the proxy itself (TLS when its URL is `https://`).
    fn to_proxy(&self) -> HttpsConnector<HttpConnector> {
        HttpsConnector::from((self.http.clone(), Arc::clone(&self.proxy_tls)))
    }
}

/// Connects to an upstream directly, through a `CONNECT` tunnel, or to the proxy that
/// forwards its requests, as the egress matcher says.
#[derive(Clone)]
struct UpstreamConnector {
    direct: HttpsConnector<HttpConnector>,
    egress: Option<Arc<Egress>>,
    /// TCP's connect timeout; connecting as a whole, DNS, TCP, a proxy's `CONNECT` and TLS
    /// together, is given [`connecting_bound`] of it: past it, a connect error, the request
    /// never sent.
    connect_timeout: Duration,
}

/// The most connecting may take as a whole (the name's lookup, TCP, a proxy's `CONNECT`, TLS,
/// the HTTP/1 handshake): three times `connect_timeout`, TCP's own share. Not the timeout
/// itself: a lookup retried after a lost packet (glibc waits 5 s, the default timeout) or a
/// slow proxy's tunnel would then fail connects that succeed, and the bound is for the stalls
/// that waited the first byte's deadline (a minute, five for a whole answer).
fn connecting_bound(connect_timeout: Duration) -> Duration {
    connect_timeout.saturating_mul(3)
}

/// The error of a connection not made `within` its bound.
fn connect_timed_out(within: Duration) -> BoxError {
    Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "connecting (name lookup, TCP, a proxy's CONNECT, TLS) took longer than {} ms (three times connect_timeout)",
            within.as_millis()
        ),
    ))
}

/// `connecting`, given at most `timeout`.
fn within_connect_timeout<T>(
    timeout: Duration,
    connecting: impl Future<Output = Result<T, BoxError>> + Send + 'static,
) -> Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>
where
    T: Send + 'static,
{
    let within = connecting_bound(timeout);
    Box::pin(async move {
        tokio::time::timeout(within, connecting)
            .await
            .map_err(|_| connect_timed_out(within))?
    })
}

type Tcp = TokioIo<TcpStream>;

/// A connection the client pools.
enum UpstreamStream {
    /// To the upstream (TLS for `https://`).
    Direct(MaybeHttpsStream<Tcp>),
    /// To a proxy that forwards absolute-form requests to an `http://` upstream.
    Forwarded(MaybeHttpsStream<Tcp>),
    /// TLS to an `https://` upstream inside a `CONNECT` tunnel through a proxy (boxed: the
    /// two TLS layers would make every direct connection as large).
    Tunneled(Box<MaybeHttpsStream<MaybeHttpsStream<Tcp>>>),
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Every connector below is always ready (HttpConnector is).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let proxy = self
            .egress
            .as_ref()
            .and_then(|egress| Some((egress, egress.matcher.intercept(&dst)?)));
        let timeout = self.connect_timeout;
        let Some((egress, proxy)) = proxy else {
            let connecting = self.direct.call(dst);
            return within_connect_timeout(timeout, async move {
                Ok(UpstreamStream::Direct(connecting.await?))
            });
        };
        if dst.scheme() == Some(&Scheme::HTTPS) {
            let mut tunnel = Tunnel::new(proxy.uri().clone(), egress.to_proxy());
            if let Some(auth) = proxy.basic_auth() {
                tunnel = tunnel.with_auth(auth.clone());
            }
            let mut tls = HttpsConnector::from((tunnel, Arc::clone(&egress.upstream_tls)));
            let connecting = tls.call(dst);
            within_connect_timeout(timeout, async move {
                Ok(UpstreamStream::Tunneled(Box::new(connecting.await?)))
            })
        } else {
            let connecting = egress.to_proxy().call(proxy.uri().clone());
            within_connect_timeout(timeout, async move {
                Ok(UpstreamStream::Forwarded(connecting.await?))
            })
        }
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            Self::Direct(stream) => stream.connected(),
            // Makes the client send absolute-form requests.
            Self::Forwarded(stream) => stream.connected().proxy(true),
            Self::Tunneled(stream) => stream.connected(),
        }
    }
}

impl Read for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Direct(s) | Self::Forwarded(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tunneled(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl Write for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Direct(s) | Self::Forwarded(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tunneled(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Direct(s) | Self::Forwarded(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tunneled(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Direct(s) | Self::Forwarded(s) => s.is_write_vectored(),
            Self::Tunneled(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Direct(s) | Self::Forwarded(s) => Pin::new(s).poll_flush(cx),
            Self::Tunneled(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Direct(s) | Self::Forwarded(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tunneled(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// The next data chunk of a response body (trailers are skipped), `None` at its end.
pub async fn next_chunk(body: &mut UpstreamBody) -> Result<Option<Bytes>, BoxError> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    /// `--upstream-ca` refuses the start, naming the flag and the file, for a file that
    /// cannot be read, holds no certificate, or one that is not a certificate at all.
    #[test]
    fn an_upstream_ca_file_without_a_usable_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let refused = |text: Option<&str>| {
            let path = dir.path().join("ca.pem");
            match text {
                Some(text) => std::fs::write(&path, text).unwrap(),
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
            let e = UpstreamTls::default().with_roots_from(&path).unwrap_err();
            assert!(e.contains("--upstream-ca") && e.contains("ca.pem"), "{e}");
            e
        };
        assert!(refused(None).contains("cannot read"));
        assert!(refused(Some("not a certificate\n")).contains("no PEM certificate"));
        let garbled = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(refused(Some(garbled)).contains("not a usable CA certificate"));
    }

    #[test]
    fn a_proxy_variable_with_a_value_selects_the_proxied_client() {
        let none = |_: &str| None;
        assert!(!egress_proxy_configured(none));
        let empty = |_: &str| Some(std::ffi::OsString::new());
        assert!(!egress_proxy_configured(empty));
        let https = |name: &str| (name == "https_proxy").then(|| "http://proxy:3128".into());
        assert!(egress_proxy_configured(https));
        let no_proxy_only = |name: &str| (name == "NO_PROXY").then(|| "*".into());
        assert!(!egress_proxy_configured(no_proxy_only));
    }

    /// A server that reads one request head, sends it back on the channel and answers
    /// `answer`, then closes.
    async fn one_shot_server(
        answer: &'static str,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            socket.write_all(answer.as_bytes()).await.unwrap();
            let _ = socket.shutdown().await;
        });
        (addr, rx)
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";

    /// Sends a POST to `uri` with a client whose egress proxies are `matcher`'s.
    async fn send(matcher: Matcher, uri: &str) -> Result<Response<UpstreamBody>, BoxError> {
        let client = UpstreamClient::with_proxies(
            Duration::from_secs(5),
            &UpstreamTls::default(),
            Some(matcher),
        )
        .unwrap();
        let host = host_header(&uri.parse().unwrap());
        client
            .send(
                Request::post(uri).body(Bytes::from_static(b"{}")).unwrap(),
                host.as_ref(),
            )
            .await
    }

    #[test]
    fn the_host_header_is_made_for_plain_http_only_with_a_port_other_than_80() {
        for (uri, host) in [
            ("http://provider.example/v1", Some("provider.example")),
            ("http://provider.example:80/v1", Some("provider.example")),
            (
                "http://provider.example:8080/v1",
                Some("provider.example:8080"),
            ),
            (
                "http://127.0.0.1:28081/v1/chat/completions",
                Some("127.0.0.1:28081"),
            ),
            ("http://[::1]:8000/v1", Some("[::1]:8000")),
            ("http://[::1]/v1", Some("[::1]")),
            ("https://provider.example/v1", None),
            ("https://provider.example:8443/v1", None),
        ] {
            let made = host_header(&uri.parse().unwrap());
            assert_eq!(made.as_ref().map(|v| v.to_str().unwrap()), host, "{uri}");
        }
    }

    /// A POST of `body` to `uri` with a JSON content type and an authorization, as the
    /// proxy sends.
    fn chat_request<B>(uri: Uri, body: B) -> Request<B> {
        let mut request = Request::post(uri).body(body).unwrap();
        let headers = request.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-up"),
        );
        request
    }

    /// The request head an HTTP/1 server receives for `uri` (a POST with a JSON body and an
    /// authorization), with `host` made ahead or not.
    async fn head_sent(path: &str, ahead: bool) -> String {
        let (server, head) = one_shot_server(OK).await;
        let uri: Uri = format!("http://{server}{path}").parse().unwrap();
        let host = ahead.then(|| host_header(&uri)).flatten();
        assert_eq!(host.is_some(), ahead);
        let request = chat_request(uri, Bytes::from_static(b"{}"));
        let client =
            UpstreamClient::with_proxies(Duration::from_secs(5), &UpstreamTls::default(), None)
                .unwrap();
        let response = client.send(request, host.as_ref()).await.unwrap();
        assert_eq!(response.status(), 200);
        head.await.unwrap()
    }

    #[tokio::test]
    async fn a_host_made_ahead_gives_the_bytes_the_client_would_have_written() {
        for path in ["/v1/chat/completions", "/v1/messages?beta=true"] {
            let (made, ahead) = (head_sent(path, false).await, head_sent(path, true).await);
            // Only the servers' ports differ.
            assert_eq!(without_port(&made), without_port(&ahead));
            assert!(made.contains("host: 127.0.0.1:"), "{made}");
        }
    }

    /// The request head the old path wrote: hyper-util's pooled client, connecting directly.
    async fn head_hyper_util_sent(path: &str) -> String {
        let (server, head) = one_shot_server(OK).await;
        let uri: Uri = format!("http://{server}{path}").parse().unwrap();
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let request = chat_request(uri, Full::new(Bytes::from_static(b"{}")));
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        head.await.unwrap()
    }

    /// `head` with the server's port (in `Host`) replaced by `PORT`.
    fn without_port(head: &str) -> String {
        let at = head.find("host: 127.0.0.1:").unwrap() + "host: 127.0.0.1:".len();
        let port = head[at..].split("\r\n").next().unwrap();
        head.replace(port, "PORT")
    }

    #[tokio::test]
    async fn the_threads_pool_writes_the_head_hyper_util_wrote() {
        for path in ["/v1/chat/completions", "/v1/messages?beta=true", "/"] {
            let old = without_port(&head_hyper_util_sent(path).await);
            let new = without_port(&head_sent(path, true).await);
            assert_eq!(old, new);
            assert!(
                new.starts_with(&format!("POST {path} HTTP/1.1\r\n")),
                "{new}"
            );
        }
    }

    /// An HTTP/1 server answering every request `{}` after `delay`, keeping connections
    /// open, with the number of connections it accepted.
    async fn counting_server(
        delay: Duration,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use hyper::service::service_fn;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let service = service_fn(move |request: Request<Incoming>| async move {
                    request.into_body().collect().await?;
                    tokio::time::sleep(delay).await;
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(socket), service),
                );
            }
        });
        (addr, accepted)
    }

    /// A POST to `http://{server}/v1/chat/completions` through `client`, its answer read to
    /// the end.
    async fn call(client: &UpstreamClient, server: std::net::SocketAddr) -> Result<(), BoxError> {
        let uri: Uri = format!("http://{server}/v1/chat/completions")
            .parse()
            .unwrap();
        let host = host_header(&uri);
        let mut request = Request::post(uri).body(Bytes::from_static(b"{}")).unwrap();
        request.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-secret-key"),
        );
        let response = client.send(request, host.as_ref()).await?;
        assert_eq!(response.status(), 200);
        assert_eq!(&response.into_body().collect().await?.to_bytes()[..], b"{}");
        Ok(())
    }

    fn direct_client() -> UpstreamClient {
        UpstreamClient::with_proxies(Duration::from_secs(5), &UpstreamTls::default(), None).unwrap()
    }

    fn accepted(count: &std::sync::atomic::AtomicUsize) -> usize {
        count.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A backend no longer called keeps its idle connections only until a look over all of
    /// the thread's connections finds them past the idle timeout: a server that never closes
    /// idle ones (TGI, Ollama) held them, a descriptor each, until the replica restarted.
    #[tokio::test]
    async fn idle_connections_of_a_backend_no_longer_called_are_closed() {
        let (server, _) = counting_server(Duration::ZERO).await;
        call(&direct_client(), server).await.unwrap();
        let authority = server.to_string();
        let now = std::time::Instant::now();
        assert_eq!(pool::kept_after_sweep_at(&authority, now), (1, 1));
        let later = now + Duration::from_secs(91);
        assert_eq!(pool::kept_after_sweep_at(&authority, later), (1, 0));
    }

    /// The thread's own task closes an idle connection once it is past the idle timeout,
    /// with no call to its backend or any other: after a burst, a backend called once a minute
    /// (or never again) held the burst's connections, a descriptor each at both ends, for
    /// hours against a server that keeps idle connections open.
    #[tokio::test]
    async fn idle_connections_are_closed_by_the_thread_without_another_call() {
        let (server, closed) = keep_alive_server();
        call(&direct_client(), server).await.unwrap();
        assert!(
            pool::sweeping_here(),
            "keeping a connection starts the sweep"
        );
        // The sweep as it runs, but every 10 ms and with its clock past the idle timeout.
        tokio::spawn(pool::sweeping_for_test(Duration::from_millis(10), || {
            std::time::Instant::now() + Duration::from_secs(56)
        }));
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("the idle connection was closed")
            .unwrap();
    }

    /// A server on a thread of its own that answers one request keep-alive, as TGI does, then
    /// waits for its client to close the connection, which it signals on the receiver.
    fn keep_alive_server() -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<()>) {
        use std::io::Read as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed, on_close) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            answer_one_request(&mut socket);
            // Held open until the client closes it (EOF) or resets it.
            let mut buf = [0u8; 4096];
            while matches!(socket.read(&mut buf), Ok(n) if n > 0) {}
            let _ = closed.send(());
        });
        (addr, on_close)
    }

    /// Reads one request of [`call`]'s (its head, then the two bytes of its body) from
    /// `socket` and answers it keep-alive.
    fn answer_one_request(socket: &mut std::net::TcpStream) {
        use std::io::{Read as _, Write as _};
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !(request.windows(4).any(|w| w == b"\r\n\r\n") && request.ends_with(b"{}")) {
            let n = socket.read(&mut buf).unwrap();
            assert!(n > 0, "the client closed before its request");
            request.extend_from_slice(&buf[..n]);
        }
        socket
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            .unwrap();
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (server, accepts) = counting_server(Duration::ZERO).await;
        let client = direct_client();
        for _ in 0..5 {
            call(&client, server).await.unwrap();
        }
        assert_eq!(accepted(&accepts), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_a_connection_then_reuse_them() {
        let (server, accepts) = counting_server(Duration::from_millis(100)).await;
        let client = direct_client();
        let four = || futures::future::join_all((0..4).map(|_| call(&client, server)));
        for answered in four().await {
            answered.unwrap();
        }
        assert_eq!(accepted(&accepts), 4);
        for answered in four().await {
            answered.unwrap();
        }
        call(&client, server).await.unwrap();
        assert_eq!(accepted(&accepts), 4);
    }

    /// A server on a thread of its own that answers one request per connection, keep-alive
    /// (no `connection: close`), waits 100 ms, closes the connection and only then writes a
    /// byte to `trigger`; with the number of connections it accepted.
    fn closing_server(
        trigger: std::net::TcpStream,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::Write as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        std::thread::spawn(move || {
            let mut trigger = trigger;
            for socket in listener.incoming() {
                let mut socket = socket.unwrap();
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                answer_one_request(&mut socket);
                std::thread::sleep(Duration::from_millis(100));
                // Closed before the trigger: should this thread be late, the client sees the
                // close first and leaves the connection out (the retry is then not exercised,
                // but nothing fails that would not fail for users).
                drop(socket);
                let _ = trigger.write_all(b"!");
            }
        });
        (addr, accepted)
    }

    /// A [`closing_server`], with the read end of its trigger.
    fn closing_server_triggering() -> (
        std::net::SocketAddr,
        Arc<std::sync::atomic::AtomicUsize>,
        std::net::TcpStream,
    ) {
        let triggers = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let trigger = std::net::TcpStream::connect(triggers.local_addr().unwrap()).unwrap();
        let (server, accepts) = closing_server(triggers.accept().unwrap().0);
        (server, accepts, trigger)
    }

    #[tokio::test]
    async fn a_request_on_a_connection_the_upstream_closed_goes_on_a_new_one() {
        use std::io::Read as _;
        let (server, accepts, mut trigger) = closing_server_triggering();
        let client = direct_client();
        call(&client, server).await.unwrap();
        // This (current-thread) runtime blocked until the trigger, which the server writes
        // after closing; then one look at its sockets (the yield) finds the close, and this
        // task (the one it blocks on) is polled before the kept connection's, which has not
        // read the close when the next request is given to it. hyper gives the request back
        // unsent.
        trigger.read_exact(&mut [0u8; 1]).unwrap();
        tokio::task::yield_now().await;
        call(&client, server).await.unwrap();
        assert_eq!(accepted(&accepts), 2);
        // With the runtime running while the next close comes, it is seen and the connection
        // left out (or, should this task run first, the request is given back as above).
        tokio::task::spawn_blocking(move || trigger.read_exact(&mut [0u8; 1]))
            .await
            .unwrap()
            .unwrap();
        call(&client, server).await.unwrap();
        assert_eq!(accepted(&accepts), 3);
    }

    /// A busy thread gives a kept connection its request in the instant the server closes it
    /// idle (the keep-alive race: uvicorn closes after 5 s, nginx after 75 s), before the
    /// runtime has seen the close: the request is written into the closing connection and
    /// fails at once. The server never read it: never sent, not a connection lost mid-answer
    /// (which would keep the request's reserve and tell the client not to try again).
    #[tokio::test]
    async fn a_kept_connection_closed_idle_as_it_was_reused_never_sent_its_request() {
        use std::io::Read as _;
        let (server, accepts, mut trigger) = closing_server_triggering();
        let client = direct_client();
        call(&client, server).await.unwrap();
        // No yield: the runtime has not looked at its sockets since the close.
        trigger.read_exact(&mut [0u8; 1]).unwrap();
        match call(&client, server).await {
            // The request failed on the closed connection: taken for one never sent.
            Err(e) => assert!(never_sent(&*e), "{}", error_chain(&*e)),
            // Or hyper gave it back before writing it, and it went on a new connection.
            Ok(()) => assert_eq!(accepted(&accepts), 2, "a second connection carried it"),
        }
    }

    /// Proxy variables the matcher would drop or could not use refuse the start, naming the
    /// variable and never its value: a SOCKS proxy failed every backend's call as a connect
    /// error, and a value that is no URL sent calls direct while the log said otherwise.
    #[test]
    fn proxy_variables_that_cannot_be_used_are_named() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        assert_eq!(unusable_proxy_settings(env(&[])), None);
        for usable in [
            &[("HTTPS_PROXY", "http://user:pw@proxy:3128")][..],
            &[("https_proxy", "proxy:3128"), ("NO_PROXY", "localhost")],
            &[("ALL_PROXY", "https://proxy:443")],
            // An ALL_PROXY both scheme variables override is never used (Clash, Docker's
            // allProxy write all three).
            &[
                ("HTTPS_PROXY", "http://proxy:3128"),
                ("HTTP_PROXY", "http://proxy:3128"),
                ("ALL_PROXY", "socks5://proxy:1080"),
            ],
            // An empty HTTPS_PROXY overriding an inherited https_proxy: no proxy for https.
            &[("HTTPS_PROXY", ""), ("https_proxy", "http://proxy:3128")],
        ] {
            assert_eq!(unusable_proxy_settings(env(usable)), None, "{usable:?}");
        }
        for (unusable, named) in [
            (
                &[("ALL_PROXY", "socks5h://proxy:1080")][..],
                "ALL_PROXY names a socks5h proxy",
            ),
            (
                &[("HTTPS_PROXY", "http://proxy:3128\n")],
                "HTTPS_PROXY is not a proxy URL",
            ),
            (
                &[
                    ("HTTPS_PROXY", "http://proxy:3128"),
                    ("all_proxy", "socks5://proxy:1080"),
                ],
                "all_proxy names a socks5 proxy",
            ),
            (
                &[
                    ("HTTP_PROXY", "http://proxy:3128"),
                    ("REQUEST_METHOD", "GET"),
                ],
                "REQUEST_METHOD is set",
            ),
        ] {
            let refused = unusable_proxy_settings(env(unusable)).unwrap();
            assert!(refused.starts_with(named), "{refused}");
            assert!(
                !refused.contains("3128") && !refused.contains("1080"),
                "no value in {refused}"
            );
        }
    }

    /// Connecting is bounded by `connect_timeout` as a whole: an `https://` upstream that
    /// accepts TCP and never answers the TLS handshake (a hung process whose kernel still
    /// accepts) is a connect error within it, never sent, not a wait for the first byte's
    /// deadline counted as a timeout that may have been billed.
    #[tokio::test]
    async fn a_tls_handshake_that_never_ends_is_a_connect_error_within_the_connect_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut sockets = Vec::new();
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                sockets.push(socket);
            }
        });
        let client =
            UpstreamClient::with_proxies(Duration::from_millis(300), &UpstreamTls::default(), None)
                .unwrap();
        let request = Request::post(format!("https://{server}/v1/chat/completions"))
            .body(Bytes::from_static(b"{}"))
            .unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), client.send(request, None))
            .await
            .expect("a connect error within 5 s")
            .unwrap_err();
        assert!(never_sent(&*e), "{}", error_chain(&*e));
        assert!(
            error_chain(&*e).contains("connect_timeout"),
            "{}",
            error_chain(&*e)
        );
        held.abort();
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_readable_error_without_the_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        drop(listener);
        let e = call(&direct_client(), server).await.unwrap_err();
        let chain = error_chain(&*e);
        assert!(chain.contains("refused"), "{chain}");
        let debug = format!("{e:?}");
        assert!(
            !chain.contains("sk-secret") && !debug.contains("sk-secret"),
            "{debug}"
        );
    }

    /// The request head a server received, lower-cased, checked for each of `lines`.
    async fn received(head: tokio::sync::oneshot::Receiver<String>, lines: &[&str]) -> String {
        let head = head.await.unwrap().to_ascii_lowercase();
        for line in lines {
            assert!(head.contains(&format!("{line}\r\n")), "{line:?} in {head}");
        }
        head
    }

    #[tokio::test]
    async fn an_http_upstream_is_reached_through_the_proxy_with_its_credentials() {
        let (proxy, head) = one_shot_server(OK).await;
        let matcher = Matcher::builder()
            .http(format!("http://user:pa%20ss@{proxy}"))
            .build();
        let response = send(matcher, "http://provider.invalid/v1/chat/completions").await;
        assert_eq!(response.unwrap().status(), 200);
        let head = received(
            head,
            &[
                "host: provider.invalid",
                // base64("user:pa ss")
                "proxy-authorization: basic dxnlcjpwysbzcw==",
            ],
        )
        .await;
        assert!(
            head.starts_with("post http://provider.invalid/v1/chat/completions http/1.1\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn an_https_upstream_is_tunneled_with_connect_and_the_credentials() {
        // The proxy refuses the tunnel: what matters is what it was asked.
        let (proxy, head) =
            one_shot_server("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n").await;
        let matcher = Matcher::builder()
            .https(format!("http://user:secret@{proxy}"))
            .build();
        let err = send(matcher, "https://provider.invalid/v1/chat/completions")
            .await
            .unwrap_err();
        // base64("user:secret")
        let head = received(head, &["proxy-authorization: basic dxnlcjpzzwnyzxq="]).await;
        assert!(
            head.starts_with("connect provider.invalid:443 http/1.1\r\n"),
            "{head}"
        );
        // The error names no credentials.
        let chain = format!("{err:?}");
        assert!(!chain.contains("secret"), "{chain}");
    }

    #[tokio::test]
    async fn hosts_in_no_proxy_and_other_schemes_go_direct() {
        // Nothing listens at the proxy's address: a request sent there would fail.
        let unreachable = "http://127.0.0.2:9";
        for matcher in [
            Matcher::builder().all(unreachable).no("127.0.0.1").build(),
            // Only an HTTPS proxy: an http:// upstream goes direct.
            Matcher::builder().https(unreachable).build(),
        ] {
            let (upstream, head) = one_shot_server(OK).await;
            let response = send(matcher, &format!("http://{upstream}/v1/embeddings")).await;
            assert_eq!(response.unwrap().status(), 200);
            let head = received(head, &[]).await;
            assert!(
                head.starts_with("post /v1/embeddings http/1.1\r\n"),
                "{head}"
            );
            assert!(!head.contains("proxy-authorization"), "{head}");
        }
    }
}
