//! A yardstick, not part of Sluice: the cheapest reverse proxy on the data plane's own stack
//! (axum's server, hyper-util's pooled client, tokio), with no authentication, routing,
//! accounting, metrics or logs. `./e2e/bench-nginx.sh --hyper` measures it the way the
//! benchmarks measure Sluice, which shows how much of Sluice's cost is the stack's.
//!
//!   bare_proxy LISTEN UPSTREAM [per-core|shared]
//!
//! `per-core` (the default) runs one single-threaded runtime per core, each with its own
//! listening socket (SO_REUSEPORT) and upstream pool, like Sluice's serving threads; `shared`
//! runs one multi-threaded runtime.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

type Upstream = Client<HttpConnector, Body>;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: bare_proxy LISTEN UPSTREAM [per-core|shared]");
    };
    let listen: SocketAddr = listen.parse()?;
    let upstream = upstream.trim_end_matches('/').to_owned();
    if args.next().as_deref() == Some("shared") {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return runtime.block_on(serve(listen, upstream));
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            let upstream = upstream.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(serve(listen, upstream))
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a serving thread panicked"))??;
    }
    Ok(())
}

async fn serve(listen: SocketAddr, upstream: String) -> anyhow::Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new()).build(connector);
    let app = axum::Router::new()
        .fallback(forward)
        .with_state((client, upstream));
    let socket = if listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(listen)?;
    axum::serve(socket.listen(1024)?, app).await?;
    Ok(())
}

async fn forward(
    State((client, upstream)): State<(Upstream, String)>,
    mut request: Request,
) -> Response {
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("{upstream}{path}").parse() else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    *request.uri_mut() = uri;
    request.headers_mut().remove(http::header::HOST);
    match client.request(request).await {
        Ok(response) => response.map(Body::new),
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}
