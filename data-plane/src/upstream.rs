//! The HTTP client for upstream providers: hyper's pooled client with a rustls connector.
//!
//! It is hyper-util's client rather than reqwest because this is the hot path and Sluice
//! needs none of reqwest's extras: every request reqwest sends is parsed from a `Url` into a
//! `Uri` again (IDNA host processing included), wrapped in redirect and retry layers and given
//! default headers. Here the upstream URIs are built once per snapshot and cloning one only
//! bumps reference counts. Measured at saturation, reqwest's own layers were about a tenth of
//! the data plane's CPU.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Pooled keep-alive connections to every backend; HTTP/2 when a TLS server offers it through
/// ALPN. It never follows redirects (a provider redirect would leak the key to another host).
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A new client whose connection attempts give up after `connect_timeout`.
pub fn client(connect_timeout: Duration) -> Result<UpstreamClient, rustls::Error> {
    let mut http = HttpConnector::new();
    // The connector also serves `https://` URIs: TLS is layered on top of it.
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_keepalive(Some(Duration::from_secs(30)));
    http.set_connect_timeout(Some(connect_timeout));
    let https = HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .pool_timer(TokioTimer::new())
        .build(https))
}

/// The next data chunk of a response body (trailers are skipped), `None` at its end.
pub async fn next_chunk(body: &mut Incoming) -> Result<Option<Bytes>, hyper::Error> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            return Ok(Some(data));
        }
    }
    Ok(None)
}
